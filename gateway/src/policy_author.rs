//! `cachegw policy new|build`: a policy crate of one's own, anywhere on disk, from nothing to a
//! checked `dist/NAME.wasm`.
//!
//! `new` writes a crate that builds where it lives: its own workspace, the SDK as a path
//! dependency on the checkout this binary was built from (or `--sdk`), the release profile and
//! memory layout of the example policies (`policies/Cargo.toml`, `policies/.cargo/config.toml`),
//! and the example policies' lock file, so it resolves the versions this repository tests.
//! `build` asks `scripts/wasm-toolchain` of the same checkout how this machine builds
//! wasm32-unknown-unknown (rustup's target, or Debian's toolchain building std from source), the
//! one place that knows, runs that cargo, and copies the module to `dist/`. Checking the module
//! is `policy check`'s job; the caller runs it on the path returned.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail, ensure};

/// The checkout this binary was built from: its SDK and scripts are the defaults.
const CHECKOUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

const TARGET: &str = "wasm32-unknown-unknown";

/// The memory layout every policy module is linked with (applies when cargo runs in the crate).
const CARGO_CONFIG: &str = include_str!("../../policies/.cargo/config.toml");

/// The versions the example policies are tested with; cargo keeps those still needed.
const LOCK_FILE: &str = include_str!("../../policies/Cargo.lock");

/// What `policy new` made.
#[derive(Debug)]
pub struct Created {
    /// The crate's folder.
    pub dir: PathBuf,
    /// The SDK it depends on (absolute).
    pub sdk: PathBuf,
}

/// Checks a policy name: it names the crate, the module file and the pushed policy.
fn check_name(name: &str) -> anyhow::Result<()> {
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure!(
        first_ok && rest_ok && name.len() <= 64 && !name.ends_with('-'),
        "policy name `{name}`: use 1-64 lowercase letters, digits and `-`, starting with a letter \
         (it names the crate, dist/NAME.wasm and the policy on the gateway)"
    );
    Ok(())
}

/// `game-ttl` -> `GameTtl`: the policy type's name.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The SDK to depend on: `sdk`, else this binary's checkout; absolute, and checked to be it.
fn find_sdk(sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (candidate, hint) = match sdk {
        Some(path) => (path.to_path_buf(), "--sdk / CACHEGW_POLICY_SDK"),
        None => (
            Path::new(CHECKOUT).join("policy-sdk"),
            "this cachegw was built from a checkout that is not there any more; pass \
             --sdk PATH/TO/cachegw/policy-sdk",
        ),
    };
    let manifest = candidate.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("no policy SDK at {} ({hint})", candidate.display()))?;
    let package: toml::Table = text
        .parse()
        .with_context(|| format!("cannot parse {}", manifest.display()))?;
    ensure!(
        package
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
            == Some("policy-sdk"),
        "{} is not the policy SDK (package `policy-sdk`) ({hint})",
        candidate.display()
    );
    candidate
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", candidate.display()))
}

/// Creates the policy crate `name` in `dir` (default `./NAME`), which must not exist or be
/// empty.
pub fn new_crate(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> anyhow::Result<Created> {
    check_name(name)?;
    let sdk = find_sdk(sdk)?;
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists() {
        let empty = dir.is_dir()
            && std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .next()
                .is_none();
        ensure!(
            empty,
            "{} already exists and is not empty: nothing written (choose another --dir)",
            dir.display()
        );
    }
    let sdk_text = sdk.to_str().with_context(|| {
        format!(
            "the SDK's path {} is not UTF-8, which Cargo.toml cannot name",
            sdk.display()
        )
    })?;
    let files = [
        ("Cargo.toml", cargo_toml(name, sdk_text)),
        ("Cargo.lock", LOCK_FILE.to_owned()),
        (".cargo/config.toml", CARGO_CONFIG.to_owned()),
        (".gitignore", "/target\n/dist\n".to_owned()),
        ("src/lib.rs", lib_rs(name)),
        ("README.md", readme(name, sdk_text)),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Created { dir, sdk })
}

fn cargo_toml(name: &str, sdk: &str) -> String {
    // A TOML basic string: quotes and backslashes of the path escaped.
    let sdk = toml::Value::String(sdk.to_owned()).to_string();
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the .wasm module the gateway loads; rlib: the native `cargo test`.
crate-type = ["cdylib", "rlib"]

[dependencies]
# The cachegw policy SDK, from the checkout `cachegw policy new` ran from (README.md: moving it).
cachegw_policy = {{ package = "policy-sdk", path = {sdk} }}

# A workspace of its own: the crate builds wherever it lives.
[workspace]

{PROFILE}"#
    )
}

/// The example policies' release profile (`policies/Cargo.toml`; a unit test keeps them equal).
const PROFILE: &str = r#"# What a policy module is built with: optimised for speed (opt-level 3 made decisions 0.8-1.6 us
# faster than "s" for 25% more bytes; docs/BENCHMARKS.md), and a panic is a trap, not unwinding.
[profile.release]
opt-level = 3
lto = true
panic = "abort"
codegen-units = 1
strip = true
debug = false
"#;

fn lib_rs(name: &str) -> String {
    let ty = type_name(name);
    format!(
        r#"//! `{name}`: a cachegw policy. The gateway calls `decide` for every Get, Set and Delete of
//! the namespaces it is bound to; the decision says how the entry is cached (storage key, fresh
//! TTL, stale window, tags, bypass, invalidations). The SDK's docs: `cargo doc --open`.

use std::time::Duration;

use cachegw_policy::{{Decision, Policy, PolicyError, Request}};

#[derive(Default)]
pub struct {ty};

impl Policy for {ty} {{
    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {{
        // Every key as the client sent it, fresh for five minutes.
        Ok(Decision::cache(req.key()).fresh_for(Duration::from_secs(300)))
    }}
}}

cachegw_policy::export_policy!({ty});

#[cfg(test)]
mod tests {{
    use super::*;
    use cachegw_policy::{{Operation, testing}};

    #[test]
    fn entries_are_fresh_for_five_minutes() {{
        let decision = testing::request(Operation::Set, "games", "leaderboard:weekly")
            .decide::<{ty}>()
            .unwrap();
        assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(300)));
    }}
}}
"#
    )
}

fn readme(name: &str, sdk: &str) -> String {
    format!(
        r#"# {name}

A cachegw caching policy, made with `cachegw policy new {name}`. The
gateway runs it as a WebAssembly module for every request of the namespaces it is bound to;
`decide` in `src/lib.rs` says how each entry is cached.

```sh
cargo test                                   # the unit tests, natively
cachegw policy build                         # -> dist/{name}.wasm, then `policy check` on it
cachegw policy eval dist/{name}.wasm --op set --namespace games --key leaderboard:weekly
cachegw policy push dist/{name}.wasm --bind games     # to the gateway at 127.0.0.1:50052
cachegw set games leaderboard:weekly '[1,2,3]'       # answered with the policy's TTL
```

`cachegw policy build` builds with whichever wasm route this machine has: rustup's
`wasm32-unknown-unknown` target (`rustup target add wasm32-unknown-unknown`), or Debian's
`rustc-web cargo-web rust-web-src lld`, which build the standard library from source
(`cachegw policy build --install`, as root, installs them). It says what is missing otherwise.
Plain `cargo build --release --target wasm32-unknown-unknown` works too where rustup has the
target.

## The SDK dependency

`Cargo.toml` depends on the SDK by path, on the cachegw checkout this crate was made from:

    {sdk}

The SDK is not published to a registry; a path dependency builds offline and follows the
checkout you run the gateway from. If you move that checkout, or share this crate, change the
path (or point it at a git checkout: `cachegw_policy = {{ package = "policy-sdk", git = "URL" }}`).
`Cargo.lock` starts with the versions cachegw's own example policies are tested with.

## Files

- `src/lib.rs`: the policy and its tests (`cachegw_policy::testing` builds requests natively).
- `Cargo.toml`: `crate-type = ["cdylib", "rlib"]` (the module, and the native tests) and the
  release profile a module needs: optimised for speed, LTO, and `panic = "abort"` (a panic must trap).
- `.cargo/config.toml`: the module's memory layout (a 128 KiB stack, and no more initial memory
  than the stack and the data need), which keeps each decision's fresh instance cheap.
- `dist/{name}.wasm`: what `cachegw policy build` produces, and what you push.
"#
    )
}

/// How `scripts/wasm-toolchain` says to run cargo for wasm32 on this machine.
#[derive(Debug, Default)]
struct Toolchain {
    describe: String,
    cargo: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    target_subdir: String,
}

impl Toolchain {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut toolchain = Toolchain::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "describe" => toolchain.describe = value.to_owned(),
                "cargo" => toolchain.cargo = value.into(),
                "env" => {
                    let (name, value) = value
                        .split_once('=')
                        .with_context(|| format!("wasm-toolchain printed `{line}`"))?;
                    toolchain.env.push((name.to_owned(), value.to_owned()));
                }
                "arg" => toolchain.args.push(value.to_owned()),
                "target_subdir" => toolchain.target_subdir = value.to_owned(),
                _ => {}
            }
        }
        ensure!(
            !toolchain.cargo.as_os_str().is_empty(),
            "wasm-toolchain named no cargo"
        );
        Ok(toolchain)
    }

    /// Asks the checkout's `scripts/wasm-toolchain`; it explains on stderr what is missing.
    fn find(install: bool) -> anyhow::Result<Self> {
        let script = Path::new(CHECKOUT).join("scripts/wasm-toolchain");
        ensure!(
            script.is_file(),
            "{} is missing: this cachegw was built from a checkout that is not there any more",
            script.display()
        );
        let output = Command::new("bash")
            .arg(&script)
            .env("CACHEGW_INSTALL_DEPS", if install { "1" } else { "0" })
            .env(
                "CACHEGW_INSTALL_HINT",
                "or run `cachegw policy build --install` as root, which installs them",
            )
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !output.status.success() {
            bail!("no wasm toolchain to build the policy with (see above)");
        }
        Self::parse(&String::from_utf8_lossy(&output.stdout))
    }
}

/// The `[package] name` of the crate in `dir`.
fn package_name(dir: &Path) -> anyhow::Result<String> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "no {} (make a policy crate with `cachegw policy new NAME`)",
            manifest.display()
        )
    })?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("cannot parse {}", manifest.display()))?;
    table
        .get("package")
        .and_then(|package| package.get("name"))
        .and_then(|name| name.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no [package] name", manifest.display()))
}

/// Builds the policy crate in `dir` to `dir/dist/NAME.wasm` and returns that path. Cargo's
/// output goes to stderr, so stdout stays the caller's.
pub fn build(dir: &Path, install: bool, target_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let name = package_name(dir)?;
    let toolchain = Toolchain::find(install)?;
    let mut target_dir = target_dir.map_or_else(|| dir.join("target"), Path::to_path_buf);
    if !toolchain.target_subdir.is_empty() {
        target_dir.push(&toolchain.target_subdir);
    }
    eprintln!(
        "policy build: {name} with {}, target dir {}",
        toolchain.describe,
        target_dir.display()
    );
    let started = Instant::now();
    let stdout_to_stderr = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .context("cannot pass standard error to cargo")?;
    let status = Command::new(&toolchain.cargo)
        .args(["build", "--release", "--target", TARGET])
        .args(&toolchain.args)
        // In the crate, so that its .cargo/config.toml (memory layout) applies.
        .current_dir(dir)
        .envs(toolchain.env.iter().map(|(k, v)| (k, v)))
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdout(stdout_to_stderr)
        .status()
        .with_context(|| format!("cannot run {}", toolchain.cargo.display()))?;
    ensure!(status.success(), "cargo build failed ({status}); see above");
    let built = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    ensure!(
        built.is_file(),
        "cargo built no {} (is the crate-type cdylib?)",
        built.display()
    );
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;
    let module = dist.join(format!("{name}.wasm"));
    std::fs::copy(&built, &module)
        .with_context(|| format!("cannot copy {} to {}", built.display(), module.display()))?;
    let bytes = std::fs::metadata(&module).map_or(0, |meta| meta.len());
    eprintln!(
        "policy build: {} ({bytes} bytes) in {:.0?}; checking it:",
        module.display(),
        started.elapsed()
    );
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["game-ttl", "a", "p2p-cache"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Game", "2fast", "game_ttl", "game-", "a b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(type_name("game-ttl"), "GameTtl");
        assert_eq!(type_name("p2p-cache"), "P2pCache");
    }

    /// A policy of one's own is built like the examples.
    #[test]
    fn the_profile_is_the_example_policies_one() {
        let examples: toml::Table = include_str!("../../policies/Cargo.toml").parse().unwrap();
        let ours: toml::Table = PROFILE.parse().unwrap();
        assert_eq!(ours["profile"]["release"], examples["profile"]["release"]);
    }

    #[test]
    fn a_new_crate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let created = new_crate("game-ttl", Some(&dir.path().join("p")), None).unwrap();
        assert!(created.sdk.is_absolute());
        let manifest = std::fs::read_to_string(created.dir.join("Cargo.toml")).unwrap();
        let table: toml::Table = manifest.parse().unwrap();
        assert_eq!(
            table["dependencies"]["cachegw_policy"]["path"].as_str(),
            created.sdk.to_str()
        );
        assert_eq!(package_name(&created.dir).unwrap(), "game-ttl");
        let again = new_crate("game-ttl", Some(&created.dir), None).unwrap_err();
        assert!(again.to_string().contains("not empty"), "{again}");
    }

    #[test]
    fn toolchain_lines_are_read() {
        let toolchain = Toolchain::parse(
            "route=debian\ndescribe=debian (x)\ncargo=/usr/bin/cargo\nenv=RUSTC=/usr/bin/rustc\n\
             env=RUSTC_BOOTSTRAP=1\narg=-Zbuild-std=std,panic_abort\ntarget_subdir=debian\n",
        )
        .unwrap();
        assert_eq!(toolchain.cargo, Path::new("/usr/bin/cargo"));
        assert_eq!(toolchain.env[0], ("RUSTC".into(), "/usr/bin/rustc".into()));
        assert_eq!(toolchain.args, ["-Zbuild-std=std,panic_abort"]);
        assert_eq!(toolchain.target_subdir, "debian");
    }
}
