//! docs/POLICY_GUIDE.md, run as written: every command of its `sh` blocks in order, the `rust`
//! block as the crate's `src/lib.rs`, against a real gateway, checking that each output line the
//! guide shows under a command (`# ...`) is one the command printed. So the guide's path from
//! `cachegw policy new` through `cargo test`, `policy build` and `policy push --bind` to a Set
//! answered with the new TTL, a canary and a rollback, stays true.
//!
//! The commands run in bash, in a fresh folder outside the checkout, with `cachegw` on PATH: a
//! wrapper that adds `--remote` with the test gateway's addresses to the commands that talk to
//! one (the guide's gateway is `scripts/run`'s, on the default ports). Version hashes shown in
//! the guide are mapped to the ones this build produced (the guide says yours may differ).
//! Cargo's target dirs persist between runs (`CACHEGW_POLICY_TARGET_DIR`, as for
//! scripts/build-policies, else under this build's target dir), so a warm run takes seconds
//! of building rather than a minute.

mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use gateway::config::StoreKind;
use support::{TestGateway, test_config};

const CACHEGW: &str = env!("CARGO_BIN_EXE_cachegw");
const GUIDE: &str = include_str!("../docs/POLICY_GUIDE.md");

/// One thing the guide says to do.
#[derive(Debug)]
enum Step {
    /// A shell command and the output lines shown under it.
    Run { command: String, shown: Vec<String> },
    /// "Replace `src/lib.rs` with:" the guide's Rust block.
    WriteLib(String),
}

/// The guide's steps, in order: the lines of its `sh` blocks (a `# ` line right under a command
/// is output it shows) and its `rust` block.
fn steps(guide: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = guide.lines();
    while let Some(line) = lines.next() {
        let Some(language) = line.strip_prefix("```") else {
            continue;
        };
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        match language {
            "rust" => steps.push(Step::WriteLib(block.join("\n") + "\n")),
            "sh" => {
                for line in block {
                    match (line.strip_prefix("# "), steps.last_mut()) {
                        (Some(output), Some(Step::Run { shown, .. })) => {
                            shown.push(output.trim().to_owned());
                        }
                        (Some(_), _) => panic!("output shown under no command: {line}"),
                        (None, _) if line.trim().is_empty() => {}
                        (None, _) => steps.push(Step::Run {
                            command: line.to_owned(),
                            shown: Vec::new(),
                        }),
                    }
                }
            }
            _ => {}
        }
    }
    steps
}

/// The 12-hex-digit version hashes in `text`, as byte ranges.
fn versions(text: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
        if end == start {
            start += 1;
            continue;
        }
        if end - start == 12 && bytes[start..end].iter().all(u8::is_ascii_hexdigit) {
            found.push(start..end);
        }
        start = end;
    }
    found
}

/// `text` with the guide's versions replaced by the ones this run produced.
fn map_versions(text: &str, mapped: &HashMap<String, String>) -> String {
    let mut out = text.to_owned();
    for range in versions(text).into_iter().rev() {
        if let Some(actual) = mapped.get(&text[range.clone()]) {
            out.replace_range(range, actual);
        }
    }
    out
}

/// A `cachegw` for the guide's commands: the real one, pointed at the test gateway.
fn wrapper(dir: &Path, gateway: &TestGateway) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/usr/bin/env bash
case "$1 ${{2:-}}" in
    get\ * | set\ * | del\ * | invalidate\ *) exec {CACHEGW} "$@" --remote {data} ;;
    "policy push" | "policy bind" | "policy rollback" | "policy list" | stats\ *)
        exec {CACHEGW} "$@" --remote {admin} ;;
esac
exec {CACHEGW} "$@"
"#,
        data = gateway.addr,
        admin = gateway.admin_addr,
    );
    let path = bin.join("cachegw");
    std::fs::write(&path, script).unwrap();
    let status = Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    assert!(status.success());
    bin
}

/// Where cargo builds the guide's crate: persistent, and apart from the gateway's target dir.
fn target_dirs() -> (PathBuf, PathBuf) {
    let wasm = std::env::var_os("CACHEGW_POLICY_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guide-policies"),
        PathBuf::from,
    );
    (wasm.join("host"), wasm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_guide_runs_as_written() {
    let steps = steps(GUIDE);
    let commands: Vec<&str> = steps
        .iter()
        .filter_map(|step| match step {
            Step::Run { command, .. } => Some(command.as_str()),
            Step::WriteLib(_) => None,
        })
        .collect();
    for needed in [
        "cachegw policy new ",
        "cargo test",
        "cachegw policy build",
        "cachegw policy eval ",
        "cachegw policy push dist/game-ttl.wasm --bind games",
        "cachegw set games leaderboard:weekly",
        "--canary 10",
        "cachegw policy rollback games",
    ] {
        assert!(
            commands.iter().any(|command| command.contains(needed)),
            "the guide no longer runs `{needed}`: {commands:#?}"
        );
    }
    let lib = steps
        .iter()
        .find_map(|step| match step {
            Step::WriteLib(lib) => Some(lib.as_str()),
            Step::Run { .. } => None,
        })
        .expect("the guide's src/lib.rs");
    let decide_lines = lib
        .lines()
        .skip_while(|line| !line.contains("fn decide("))
        .take_while(|line| *line != "    }")
        .count()
        + 1;
    assert!(
        decide_lines <= 15,
        "the guide's decide is {decide_lines} lines"
    );

    let gateway = TestGateway::start(test_config(StoreKind::Memory, None)).await;
    let home = tempfile::tempdir().unwrap();
    let bin = wrapper(home.path(), &gateway);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (host_target, wasm_target) = target_dirs();
    let mut cwd = home.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    // Guide version -> the version this run pushed.
    let mut mapped = HashMap::new();

    for step in steps {
        let (command, shown) = match step {
            Step::WriteLib(lib) => {
                std::fs::write(cwd.join("src/lib.rs"), lib).expect("write src/lib.rs");
                continue;
            }
            Step::Run { command, shown } => (command, shown),
        };
        if let Some(dir) = command.strip_prefix("cd ") {
            cwd = cwd.join(dir.trim());
            assert!(cwd.is_dir(), "`{command}`: no such folder");
            continue;
        }
        let run = map_versions(&command, &mapped);
        let mut child = Command::new("bash");
        child
            .args(["-c", &run])
            .current_dir(&cwd)
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", &host_target)
            .env("CACHEGW_POLICY_TARGET_DIR", &wasm_target)
            .env_remove("CACHEGW_TOKEN");
        let output = tokio::task::spawn_blocking(move || child.output())
            .await
            .unwrap()
            .expect("run bash");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "`{run}` failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        // A push says which version it accepted: map the one the guide shows to it.
        let accepted = |text: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix("accepted game-ttl@"))
                .map(|version| version.trim().to_owned())
        };
        if let (Some(guide), Some(actual)) = (
            shown.iter().find_map(|line| accepted(line)),
            accepted(&stdout),
        ) {
            mapped.insert(guide, actual);
        }
        let printed: Vec<&str> = stdout
            .lines()
            .chain(stderr.lines())
            .map(str::trim)
            .collect();
        for line in &shown {
            let expected = map_versions(line, &mapped);
            assert!(
                printed.contains(&expected.as_str()),
                "`{run}` did not print `{expected}` (the guide shows `{line}`):\n{stdout}\n{stderr}"
            );
        }
    }
    assert_eq!(
        mapped.len(),
        2,
        "two versions pushed (the rule, then the canary): {mapped:?}"
    );
    let module = cwd.join("dist/game-ttl.wasm");
    assert!(module.is_file(), "{} was built", module.display());
}
