//! `cachegw get|set|del|invalidate --remote` as people and scripts use them:
//! against a real gateway with authentication on, a value round-trips, the
//! exit codes say what happened, `--json` is parseable, and a refusal shows
//! the gateway's status with a non-zero exit. Every command that prints ends
//! quietly when the reader of its output has gone (`| head -n 1`).

mod support;

use std::process::{Command, Output, Stdio};

use gateway::api::proto::v1::SetRequest;
use gateway::{
    auth::token_digest_hex,
    config::{Right, StoreKind, TenantConfig, TokenSources},
};
use support::{TestGateway, test_config};

const CACHEGW: &str = env!("CARGO_BIN_EXE_cachegw");
const TOKEN: &str = "cli-tenant-token-0123456789";

async fn gateway() -> TestGateway {
    let mut config = test_config(StoreKind::Memory, None);
    config.auth.enabled = true;
    config.auth.tenants.insert(
        "cli".into(),
        TenantConfig {
            tokens: TokenSources {
                token_sha256: vec![token_digest_hex(TOKEN)],
                ..Default::default()
            },
            namespaces: [(
                "notes".to_owned(),
                vec![Right::Read, Right::Write, Right::Invalidate],
            )]
            .into(),
            rate_limit: 0,
            burst: None,
        },
    );
    TestGateway::start(config).await
}

/// Runs `cachegw ARGS --remote <gateway>` with the tenant's token (or none),
/// feeding `stdin`.
async fn run(gateway: &TestGateway, token: bool, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(CACHEGW);
    command
        .args(args)
        .args(["--remote", &gateway.addr.to_string()])
        .env_remove("CACHEGW_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if token {
        command.env("CACHEGW_TOKEN", TOKEN);
    }
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn cachegw");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &stdin).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_and_exit_codes_say_what_happened() {
    let gateway = gateway().await;

    let set = run(
        &gateway,
        true,
        &["set", "notes", "greeting", "hello, world"],
        b"",
    )
    .await;
    assert_eq!(set.status.code(), Some(0), "{}", text(&set.stderr));
    assert!(
        text(&set.stdout).contains("stored"),
        "{}",
        text(&set.stdout)
    );

    let got = run(&gateway, true, &["get", "notes", "greeting"], b"").await;
    assert_eq!(got.status.code(), Some(0), "{}", text(&got.stderr));
    assert_eq!(
        text(&got.stdout),
        "hello, world\n",
        "the value alone on stdout"
    );
    assert!(
        text(&got.stderr).starts_with("HIT"),
        "{}",
        text(&got.stderr)
    );

    // Bytes from stdin, exactly, and JSON for scripts.
    let bytes = [0u8, 159, 146, 150, b'\n', 255];
    let set = run(&gateway, true, &["set", "notes", "blob", "-"], &bytes).await;
    assert_eq!(set.status.code(), Some(0), "{}", text(&set.stderr));
    let raw = run(&gateway, true, &["get", "notes", "blob", "--raw"], b"").await;
    assert_eq!(raw.stdout, bytes, "--raw writes the bytes exactly");
    let json = run(&gateway, true, &["get", "notes", "blob", "--json"], b"").await;
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answer["outcome"], "hit", "{answer}");
    assert_eq!(answer["value_base64"], "AJ+Slgr/", "{answer}");

    let miss = run(&gateway, true, &["get", "notes", "absent"], b"").await;
    assert_eq!(miss.status.code(), Some(3), "MISS: {}", text(&miss.stderr));
    assert!(miss.stdout.is_empty());

    let invalidated = run(
        &gateway,
        true,
        &["invalidate", "notes", "--pattern", "gree*", "--json"],
        b"",
    )
    .await;
    assert_eq!(
        invalidated.status.code(),
        Some(0),
        "{}",
        text(&invalidated.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&invalidated.stdout).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["affected"].as_u64()),
        (Some("done"), Some(1)),
        "{job}"
    );
    let gone = run(&gateway, true, &["get", "notes", "greeting"], b"").await;
    assert_eq!(gone.status.code(), Some(3));

    let deleted = run(&gateway, true, &["del", "notes", "blob"], b"").await;
    assert_eq!(deleted.status.code(), Some(0), "{}", text(&deleted.stderr));
    let again = run(&gateway, true, &["del", "notes", "blob"], b"").await;
    assert_eq!(again.status.code(), Some(3), "nothing left to delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_show_the_status_and_exit_non_zero() {
    let gateway = gateway().await;
    for (token, args, shown) in [
        (false, &["get", "notes", "k"][..], "UNAUTHENTICATED"),
        (true, &["set", "other", "k", "v"][..], "PERMISSION_DENIED"),
        (true, &["set", "notes", "", "v"][..], "INVALID_ARGUMENT"),
    ] {
        let output = run(&gateway, token, args, b"").await;
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(shown), "{args:?}: {stderr}");
    }
    // Nothing was written by the refused Set.
    let absent = run(&gateway, true, &["get", "notes", "k"], b"").await;
    assert_eq!(absent.status.code(), Some(3));
    // A gateway that is not there: exit 1, saying so.
    let output = Command::new(CACHEGW)
        .args([
            "get",
            "notes",
            "k",
            "--remote",
            "127.0.0.1:1",
            "--timeout",
            "2s",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("cannot reach the gateway"),
        "{}",
        text(&output.stderr)
    );
    // Usage errors are 2 (clap).
    let output = Command::new(CACHEGW)
        .args(["invalidate", "notes"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// Runs `cachegw ARGS` with its stdout a pipe whose reader is closed before
/// it starts, so its first write fails (EPIPE) every time, as `| head -n 1`
/// makes a later one fail some of the time.
async fn run_with_reader_gone(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut command = Command::new(CACHEGW);
    command
        .args(args)
        .env_remove("CACHEGW_TOKEN")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || command.output().expect("run cachegw"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_end_quietly_when_the_reader_has_gone() {
    let gateway = TestGateway::start(test_config(StoreKind::Memory, None)).await;
    let mut client = gateway.client().await;
    client
        .set(SetRequest {
            namespace: "notes".into(),
            key: "greeting".into(),
            value: b"hello, world".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("set");
    let data = gateway.addr.to_string();
    let admin = gateway.admin_addr.to_string();
    for args in [
        &["token", "new"][..],
        &["get", "notes", "greeting", "--remote", &data],
        &["stats", "--json", "--remote", &admin],
        &["policy", "list", "--remote", &admin],
    ] {
        let output = run_with_reader_gone(args).await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.to_lowercase().contains("broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}
