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
    let mut child = Command::new(CACHEGW)
        .arg("serve")
        .args(args)
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
            if let Some(rest) = line.split_once("addr=").map(|(_, rest)| rest.to_owned()) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = found_tx.send(addr);
            }
        }
    });
    let addr = found_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("cachegw logged its listen address");
    (child, addr)
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
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.outcome, got.value.as_ref()),
        (Outcome::Hit as i32, &b"hello"[..])
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The client stays connected: the drain must not wait for it to leave.
    let exit = wait_for_exit(&mut child, Duration::from_secs(10)).await;
    assert!(exit.success(), "exit status {exit:?}");
}

fn print_config(file: Option<&std::path::Path>, env: &[(&str, &str)], flags: &[&str]) -> String {
    let mut command = Command::new(CACHEGW);
    command
        .args(["serve", "--print-config"])
        .args(flags)
        .env_remove("CACHEGW_CONFIG");
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
    ];
    let from_env = print_config(Some(&file), &env, &[]);
    assert!(
        from_env.contains("redis://env:2") && from_env.contains("250ms"),
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
