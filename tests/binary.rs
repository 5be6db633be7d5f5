//! The `cachegw` binary as operators run it: flags, config file and
//! environment merged; a clean SIGTERM; useful errors; the load tool.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use gateway::api::proto::v1::{GetRequest, Outcome, SetRequest, cache_client::CacheClient};
use support::{Backend, World};

const CACHEGW: &str = env!("CARGO_BIN_EXE_cachegw");

/// Starts `cachegw serve ARGS` and returns it with the address it logged.
fn spawn_serve(args: &[&str]) -> (Child, String) {
    let (child, addr, _) = spawn_serve_with_admin(args);
    (child, addr)
}

/// Like [`spawn_serve`], also returning the admin API's address.
fn spawn_serve_with_admin(args: &[&str]) -> (Child, String, String) {
    let spawned = spawn_gateway(args);
    (spawned.child, spawned.data, spawned.admin)
}

/// Starts `cachegw serve ARGS` (every listener on a free port).
fn spawn_gateway(args: &[&str]) -> Spawned {
    let mut child = Command::new(CACHEGW)
        .arg("serve")
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-auth",
        ])
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("CACHEGW_CONFIG")
        .env("CACHEGW_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cachegw");
    let stderr = child.stderr.take().unwrap();
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let which = if line.contains("cachegw serving") {
                "data"
            } else if line.contains("policy admin API serving") {
                "admin"
            } else if line.contains("metrics endpoint serving") {
                "metrics"
            } else {
                continue;
            };
            if let Some(rest) = line.split_once("addr=").map(|(_, rest)| rest.to_owned()) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = found_tx.send((which, addr));
            }
        }
    });
    let mut found = std::collections::HashMap::new();
    while found.len() < 3 {
        let (which, addr) = found_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("cachegw logged its listen addresses");
        found.insert(which, addr);
    }
    Spawned {
        child,
        data: found["data"].clone(),
        admin: found["admin"].clone(),
        metrics: found["metrics"].clone(),
    }
}

/// Starts `cachegw serve ARGS` with `CACHEGW_LOG=filter` and streams its
/// stderr, line by line.
fn spawn_with_log(args: &[&str], filter: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(CACHEGW)
        .arg("serve")
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("CACHEGW_CONFIG")
        .env("CACHEGW_LOG", filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cachegw");
    let stderr = child.stderr.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, line_rx)
}

/// A running `cachegw serve` and the addresses it logged.
struct Spawned {
    child: Child,
    data: String,
    admin: String,
    metrics: String,
}

/// SIGTERMs `child` and asserts it exits cleanly within 10 s.
async fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for_exit(child, Duration::from_secs(10)).await;
    assert!(exit.success(), "exit status {exit:?}");
}

async fn wait_for_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cachegw did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn serve_answers_and_stops_cleanly_on_sigterm() {
    let (mut child, addr) = spawn_serve(&["--listen", "127.0.0.1:0", "--store", "memory"]);
    let mut client = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let set = SetRequest {
        namespace: "quickstart".into(),
        key: "greeting".into(),
        value: b"hello".to_vec().into(),
        ..Default::default()
    };
    assert!(client.set(set).await.unwrap().get_ref().stored);
    let got = client
        .get(GetRequest {
            namespace: "quickstart".into(),
            key: "greeting".into(),
            attributes: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.outcome, got.value.as_ref()),
        (Outcome::Hit as i32, &b"hello"[..])
    );

    // The client stays connected: the drain must not wait for it to leave.
    terminate(&mut child).await;
}

fn print_config(file: Option<&std::path::Path>, env: &[(&str, &str)], flags: &[&str]) -> String {
    let mut command = Command::new(CACHEGW);
    command
        .args(["serve", "--print-config"])
        .args(flags)
        .env_remove("CACHEGW_CONFIG")
        .env("CACHEGW_AUTH__ENABLED", "false");
    if let Some(file) = file {
        command.arg("--config").arg(file);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cachegw.toml");
    std::fs::write(
        &file,
        "[redis]\nurl = \"redis://file:1\"\n[namespaces.orders]\ndefault_ttl = \"90s\"\n",
    )
    .unwrap();

    let from_file = print_config(Some(&file), &[], &[]);
    assert!(from_file.contains("redis://file:1"), "{from_file}");
    assert!(
        from_file.contains("[namespaces.orders]") && from_file.contains("1m 30s"),
        "{from_file}"
    );

    let env = [
        ("CACHEGW_REDIS__URL", "redis://env:2"),
        ("CACHEGW_SERVER__STORE_TIMEOUT", "250ms"),
        ("CACHEGW_STORE", "memory"),
        // Not config: the log filter and the CLI's token.
        ("CACHEGW_LOG", "debug"),
        ("CACHEGW_TOKEN", "not-a-config-value"),
    ];
    let from_env = print_config(Some(&file), &env, &[]);
    assert!(
        from_env.contains("redis://env:2")
            && from_env.contains("250ms")
            && from_env.contains("store = \"memory\""),
        "{from_env}"
    );

    let from_flags = print_config(
        Some(&file),
        &env,
        &["--redis", "redis://flag:3", "--store", "memory"],
    );
    assert!(
        from_flags.contains("redis://flag:3") && from_flags.contains("store = \"memory\""),
        "{from_flags}"
    );
}

#[test]
fn bad_config_exits_non_zero_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cachegw.toml");
    for (text, field) in [
        ("[redis]\nmax_conections = 3\n", "max_conections"),
        (
            "[namespaces.orders]\ndefault_ttl = \"0s\"\n",
            "namespaces.orders.default_ttl",
        ),
        ("[server]\nlisten = \"not an address\"\n", "listen"),
    ] {
        std::fs::write(&file, text).unwrap();
        let output = Command::new(CACHEGW)
            .args(["serve", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
    let output = Command::new(CACHEGW)
        .args(["serve", "--store", "postgres"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("postgres"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_measures_gateway_and_redis_side_by_side() {
    let world = World::start(Backend::Redis).await;
    let redis_url = world.redis.as_ref().unwrap().url();
    let output = tokio::process::Command::new(CACHEGW)
        .args([
            "bench",
            "--target",
            "gateway,redis",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--keys",
            "200",
        ])
        .args(["--concurrency", "8", "--channels", "2", "--json"])
        .args([
            "--gateway",
            &world.gateway.endpoint(),
            "--redis",
            &redis_url,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rounds: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rounds = rounds.as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for (round, target) in rounds.iter().zip(["gateway", "redis"]) {
        assert_eq!(round["target"], target);
        assert!(round["requests"].as_u64().unwrap() > 100, "{round}");
        assert_eq!(round["errors"], 0, "{round}");
        assert_eq!(
            round["degraded"], 0,
            "every GET of a populated key hits: {round}"
        );
        assert!(round["p50_ms"].as_f64().unwrap() > 0.0);
    }
}

/// `--op mget` sends MGETs of `--batch` keys (one MGET command straight at
/// Redis), and `--distribution zipf` draws them by Zipf's law: every key
/// drawn was populated, so every item of every batch hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_sends_mget_batches_of_zipf_distributed_keys() {
    let world = World::start(Backend::Redis).await;
    let redis_url = world.redis.as_ref().unwrap().url();
    let gets_before = world.gateway.counter("cachegw_requests");
    let output = tokio::process::Command::new(CACHEGW)
        .args(["bench", "--target", "gateway,redis", "--op", "mget"])
        .args(["--batch", "25", "--distribution", "zipf", "--keys", "300"])
        .args(["--duration", "1s", "--warmup", "0s", "--concurrency", "4"])
        .args(["--json", "--gateway", &world.gateway.endpoint()])
        .args(["--redis", &redis_url])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rounds: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rounds = rounds.as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for (round, target) in rounds.iter().zip(["gateway", "redis"]) {
        assert_eq!(
            (&round["target"], &round["op"]),
            (&target.into(), &"mget".into())
        );
        assert!(round["requests"].as_u64().unwrap() > 10, "{round}");
        assert_eq!(
            (&round["errors"], &round["degraded"]),
            (&0.into(), &0.into()),
            "{round}"
        );
    }
    // Each MGET's 25 items are counted as Gets by the gateway.
    let mgets = rounds[0]["requests"].as_u64().unwrap();
    let gets = world.gateway.counter("cachegw_requests") - gets_before;
    assert!(
        gets >= mgets * 25,
        "{mgets} MGETs of 25 but {gets} requests counted"
    );

    let bad = tokio::process::Command::new(CACHEGW)
        .args(["bench", "--distribution", "zipf", "--zipf-exponent=-1"])
        .args([
            "--gateway",
            &world.gateway.endpoint(),
            "--target",
            "gateway",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--zipf-exponent"));
}

/// `--rate` sends on a schedule instead of as fast as answers come back: at 400
/// requests/s for one second, four workers send about 400 Gets (never more
/// than the schedule holds), where closed loop they send thousands. A rate
/// that is not a positive number is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_sends_on_an_open_loop_schedule_with_rate() {
    let world = World::start(Backend::Memory).await;
    let bench = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(CACHEGW);
        command
            .args(["bench", "--target", "gateway", "--keys", "50"])
            .args(["--duration", "1s", "--warmup", "0s", "--concurrency", "4"])
            .args(["--json", "--gateway", &world.gateway.endpoint()])
            .args(extra);
        command.output()
    };
    let run = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rounds: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        rounds[0].clone()
    };
    let paced = run(bench(&["--rate", "400"]).await.unwrap());
    let requests = paced["requests"].as_u64().unwrap();
    assert!(
        (100..=404).contains(&requests),
        "400/s for 1 s sent {requests}: {paced}"
    );
    assert_eq!(paced["rate"], 400.0, "{paced}");
    assert_eq!(
        (&paced["errors"], &paced["degraded"]),
        (&0.into(), &0.into())
    );

    let unpaced = run(bench(&[]).await.unwrap());
    assert!(
        unpaced["requests"].as_u64().unwrap() > 404,
        "closed loop is not held to a schedule: {unpaced}"
    );
    assert!(unpaced.get("rate").is_none(), "{unpaced}");

    for bad in ["--rate=0", "--rate=-5", "--rate=NaN"] {
        let output = bench(&[bad]).await.unwrap();
        assert_eq!(output.status.code(), Some(1), "{bad}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("--rate"),
            "{bad}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn dist(name: &str) -> String {
    support::policy_module(name).display().to_string()
}

fn run_policy_tool(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let output = Command::new(CACHEGW)
        .arg("policy")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code(), json, stderr)
}

#[test]
fn policy_check_passes_good_modules_and_explains_bad_ones() {
    let (code, report, stderr) = run_policy_tool(&["check", &dist("ttl-by-route")]);
    assert_eq!(code, Some(0), "{report} {stderr}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["abi"], "ok (version 1)");
    assert_eq!(report["probes"].as_array().unwrap().len(), 3);
    let recycled = report["recycled"].as_str().unwrap();
    assert!(
        recycled.starts_with("yes") || recycled.contains("PAGEMAP_SCAN"),
        "{report}"
    );

    for (module, words) in [
        ("hostile-abi", "returned 999"),
        ("hostile-noexport", "missing export `cachegw_decide`"),
    ] {
        let (code, report, _) = run_policy_tool(&["check", &dist(module)]);
        assert_eq!(code, Some(1), "{module}: {report}");
        assert!(
            report["abi"].as_str().unwrap().contains(words),
            "{module}: {report}"
        );
    }
    let (code, report, _) = run_policy_tool(&["check", &dist("hostile-loop")]);
    assert_eq!(code, Some(1));
    assert_eq!(report["probes"][0]["fault"]["kind"], "timeout", "{report}");
    assert!(
        report["recycled"].as_str().unwrap().starts_with("no:"),
        "a call that times out drops its instance: {report}"
    );

    let (code, report, _) = run_policy_tool(&[
        "check",
        &dist("ttl-by-route"),
        "--config",
        r#"{"rules":[{"prefix":"a","ttl":"0s"}]}"#,
    ]);
    assert_eq!(code, Some(1));
    assert!(
        report["config"].as_str().unwrap().starts_with("rejected"),
        "{report}"
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm junk").unwrap();
    let (code, _, stderr) = run_policy_tool(&["check", junk.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("junk.wasm") && stderr.contains("not a valid WebAssembly module"),
        "{stderr}"
    );
}

/// `policy bench` times decisions the way the gateway makes them (a fresh
/// instance of the binding's image per call) and says what they cost in
/// CPU, not only in latency.
#[test]
fn policy_bench_reports_latency_and_cpu_per_call() {
    let config = r#"{"rules":[{"prefix":"leaderboard:","ttl":"60s"}],"default_ttl":"5m"}"#;
    let (code, report, stderr) = run_policy_tool(&[
        "bench",
        &dist("ttl-by-route"),
        "--key",
        "leaderboard:weekly",
        "--config",
        config,
        "--calls",
        "3000",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["mode"], "fresh", "{report}");
    assert_eq!(report["preinit"], true, "{report}");
    assert!(report["recycled"].is_boolean(), "{report}");
    // Recycled calls say how their resets found the written pages.
    assert_eq!(
        report["recycled"] == true,
        ["write faults", "PAGEMAP_SCAN"]
            .iter()
            .any(|from| report["written_pages_from"] == *from),
        "{report}"
    );
    assert_eq!(report["calls"], 3000, "{report}");
    assert_eq!(report["faults"], serde_json::json!({}), "{report}");
    let p50 = report["p50_us"].as_f64().unwrap();
    let cpu = report["cpu_us_per_call"].as_f64().unwrap();
    let wall = 1e6 / report["calls_per_sec"].as_f64().unwrap();
    assert!(p50 > 0.0, "{report}");
    // One thread makes the calls: their CPU is some of the wall time they
    // took (the epoch ticker adds next to nothing), never all of it twice.
    assert!(cpu > 0.0 && cpu < wall * 1.5, "{report}");
}

#[test]
fn policy_eval_prints_the_decision() {
    let (code, report, stderr) = run_policy_tool(&[
        "eval",
        &dist("user-profile"),
        "--op",
        "set",
        "--namespace",
        "users",
        "--key",
        "profile:42",
        "--attr",
        "field=email",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["decision"]["storage_key"], "profile:42");
    assert_eq!(
        report["decision"]["invalidate_patterns"],
        serde_json::json!(["profile:42:*", "settings:42:*"])
    );

    let (code, report, _) = run_policy_tool(&[
        "eval",
        &dist("tenant-keying"),
        "--key",
        "/A?b=1&a=2",
        "--attr",
        "accept-language=de",
        "--config",
        r#"{"vary":["accept-language"]}"#,
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(
        report["decision"]["storage_key"], "/a?a=2&b=1|accept-language=de",
        "{report}"
    );

    let (code, report, _) = run_policy_tool(&["eval", &dist("hostile-trap"), "--key", "k"]);
    assert_eq!(code, Some(1));
    assert_eq!(report["fault"]["kind"], "trap");

    let (code, _, stderr) = run_policy_tool(&[
        "eval",
        &dist("ttl-by-route"),
        "--key",
        "k",
        "--op",
        "frobnicate",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("frobnicate"), "{stderr}");
}

#[tokio::test]
async fn the_example_config_serves_the_example_policies() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/cachegw.toml");
    // From another working directory: module paths are relative to the file.
    let (mut child, addr) = spawn_serve(&[
        "--config",
        config,
        "--store",
        "memory",
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut client = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let set = SetRequest {
        namespace: "api".into(),
        key: "leaderboard:daily".into(),
        value: b"[]".to_vec().into(),
        ..Default::default()
    };
    let set = client.set(set).await.unwrap().into_inner();
    assert!(
        set.stored && set.ttl_ms == 60_000 && set.policy.starts_with("ttl-by-route@"),
        "{set:?}"
    );
    terminate(&mut child).await;
}

fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(CACHEGW).args(args).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn operators_push_bind_list_and_roll_back_from_the_cli() {
    let (mut child, addr, admin) =
        spawn_serve_with_admin(&["--store", "memory", "--listen", "127.0.0.1:0"]);
    let (code, out, err) = cli(&[
        "policy",
        "push",
        &dist("ttl-by-route"),
        "--bind",
        "api",
        "--remote",
        &admin,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = pushed["label"].as_str().unwrap().to_owned();

    let mut client = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let set = || SetRequest {
        namespace: "api".into(),
        key: "leaderboard:x".into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    };
    assert_eq!(client.set(set()).await.unwrap().into_inner().policy, first);

    let (code, out, err) = cli(&[
        "policy",
        "push",
        &dist("tenant-keying"),
        "--bind",
        "api",
        "--remote",
        &admin,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("accepted tenant-keying@") && out.contains("bound to namespace api (was "),
        "{out}"
    );
    assert!(
        client
            .set(set())
            .await
            .unwrap()
            .into_inner()
            .policy
            .starts_with("tenant-keying@")
    );

    let (code, out, _) = cli(&["policy", "list", "--remote", &admin]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("api -> tenant-keying@") && out.contains("rollback to: "),
        "{out}"
    );

    let (code, out, err) = cli(&["policy", "rollback", "api", "--remote", &admin]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("rolled back to"), "{out}");
    assert_eq!(client.set(set()).await.unwrap().into_inner().policy, first);

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let (code, _, err) = cli(&["policy", "push", junk.to_str().unwrap(), "--remote", &admin]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("InvalidArgument") && err.contains("not a valid WebAssembly module"),
        "{err}"
    );

    terminate(&mut child).await;
}

#[tokio::test]
async fn prometheus_scrapes_the_metrics_endpoint() {
    use gateway::api::proto::v1::{
        DeleteRequest, GetRequest, InvalidateRequest, LeaseRequest, invalidate_request::Target,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut gateway = spawn_gateway(&["--store", "memory", "--listen", "127.0.0.1:0"]);
    let mut client = CacheClient::connect(format!("http://{}", gateway.data))
        .await
        .unwrap();
    // A known sequence: 3 Sets, 2 hits, 1 miss, 1 lease granted on a miss,
    // 1 Delete, 1 Invalidate removing 1 entry.
    for key in ["a", "b", "c"] {
        let set = SetRequest {
            namespace: "scraped".into(),
            key: key.into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        };
        assert!(client.set(set).await.unwrap().into_inner().stored);
    }
    let get = |key: &str| GetRequest {
        namespace: "scraped".into(),
        key: key.into(),
        ..Default::default()
    };
    for key in ["a", "b", "missing"] {
        client.get(get(key)).await.unwrap();
    }
    let leased = GetRequest {
        lease: Some(LeaseRequest::default()),
        ..get("cold")
    };
    assert_eq!(client.get(leased).await.unwrap().into_inner().lease, 1);
    let delete = DeleteRequest {
        namespace: "scraped".into(),
        key: "a".into(),
        ..Default::default()
    };
    assert!(client.delete(delete).await.unwrap().into_inner().deleted);
    let invalidate = InvalidateRequest {
        namespace: "scraped".into(),
        target: Some(Target::Pattern("b".into())),
        wait_ms: 10_000,
        ..Default::default()
    };
    assert_eq!(
        client
            .invalidate(invalidate)
            .await
            .unwrap()
            .into_inner()
            .affected,
        1
    );

    let mut stream = tokio::net::TcpStream::connect(&gateway.metrics)
        .await
        .unwrap();
    stream
        .write_all(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                gateway.metrics
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("content-type: application/openmetrics-text"),
        "{response}"
    );
    for line in [
        r#"cachegw_requests_total{op="set",namespace="_default",outcome="done"} 3"#,
        r#"cachegw_requests_total{op="get",namespace="_default",outcome="hit"} 2"#,
        r#"cachegw_requests_total{op="get",namespace="_default",outcome="miss"} 2"#,
        r#"cachegw_requests_total{op="delete",namespace="_default",outcome="done"} 1"#,
        r#"cachegw_requests_total{op="invalidate",namespace="_default",outcome="done"} 1"#,
        r#"cachegw_request_seconds_count{op="get",namespace="_default"} 4"#,
        r#"cachegw_request_seconds_count{op="set",namespace="_default"} 3"#,
        r#"cachegw_leases_total{namespace="_default",outcome="granted"} 1"#,
        r#"cachegw_invalidation_jobs_total{namespace="_default",target="pattern",outcome="done"} 1"#,
        "cachegw_invalidated_entries_total 1",
    ] {
        let found = response.lines().any(|scraped| scraped == line);
        assert!(found, "missing `{line}` in:\n{response}");
    }
    // Nothing else was counted for this namespace.
    let requests: u64 = response
        .lines()
        .filter(|line| line.starts_with("cachegw_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(requests, 9, "{response}");
    terminate(&mut gateway.child).await;
}

/// `[log] format = "json"` (from the config file, with `CACHEGW_LOG` still a
/// filter beside it): every line is one JSON object, and a request's lines
/// carry its `request` span with the op, namespace, outcome and deciding
/// policy.
#[tokio::test]
async fn json_logs_carry_the_request_span() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cachegw.toml");
    std::fs::write(&file, "store = \"memory\"\n[log]\nformat = \"json\"\n").unwrap();
    let config = file.to_str().unwrap();
    let (mut child, lines) = spawn_with_log(
        &[
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-auth",
        ],
        "info,gateway::api=debug",
    );
    let next_line = |what: &str, matches: &dyn Fn(&serde_json::Value) -> bool| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|err| panic!("no log line with {what}: {err}"));
        let line: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("a log line that is not JSON ({err}): {line}"));
        if matches(&line) {
            return line;
        }
    };

    let serving = next_line("the data listener's address", &|line| {
        line["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("cachegw serving"))
    });
    let addr = serving["fields"]["addr"].as_str().unwrap().to_owned();
    let mut client = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .set(SetRequest {
            namespace: "logs".into(),
            key: "k".into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .get(GetRequest {
            namespace: "logs".into(),
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let answered = next_line("the Get's request span", &|line| {
        line["fields"]["message"] == "request answered" && line["span"]["op"] == "get"
    });
    let span = &answered["span"];
    assert_eq!(span["name"], "request", "{answered}");
    assert_eq!(span["namespace"], "logs", "{answered}");
    assert_eq!(span["outcome"], "hit", "{answered}");
    assert_eq!(span["policy"], "default", "{answered}");
    assert_eq!(answered["level"], "DEBUG", "{answered}");
    terminate(&mut child).await;
}

/// Authentication is on unless turned off: with no tokens configured,
/// `serve` refuses to start and says what to do; `--no-auth` starts it with
/// a warning that cannot be missed.
#[tokio::test]
async fn serve_without_tokens_refuses_to_start_unless_auth_is_turned_off() {
    let output = Command::new(CACHEGW)
        .args(["serve", "--store", "memory", "--listen", "127.0.0.1:0"])
        .current_dir(std::env::temp_dir())
        .env_remove("CACHEGW_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`auth`") && stderr.contains("auth.enabled = false"),
        "{stderr}"
    );

    let (mut child, lines) = spawn_with_log(
        &[
            "--store",
            "memory",
            "--no-auth",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        "info",
    );
    let warning = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a start-up warning that authentication is off");
        if line.contains("AUTHENTICATION IS OFF") {
            break line;
        }
    };
    assert!(warning.contains("WARN"), "{warning}");
    terminate(&mut child).await;
}
