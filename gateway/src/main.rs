//! `cachegw`: parse flags, load config, init tracing, run.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::{
    Config, Gateway,
    bench::{self, BenchArgs},
    bench_invalidation::{self, InvalidationBenchArgs},
    bench_stampede::{self, StampedeBenchArgs},
    config::{LogFormatConfig, Overrides, StoreKind},
    out, outln,
    policy::tool::{self, BenchMode},
    telemetry::{self, LogFormat},
};

/// cachegw: a gRPC cache gateway over Redis with per-namespace caching policies.
#[derive(Parser)]
#[command(name = "cachegw", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    ///
    /// Settings merge, lowest precedence first: built-in defaults, the TOML
    /// file (--config), CACHEGW_* environment variables (CACHEGW_REDIS__URL,
    /// CACHEGW_SERVER__STORE_TIMEOUT=250ms, ...: section and field joined by
    /// `__`), then these flags. docs/CONFIG.md lists every option.
    Serve(ServeArgs),
    /// Drive load through a running gateway and straight at Redis, and print
    /// throughput and latency percentiles side by side.
    Bench(BenchArgs),
    /// Fill a namespace bound to the surrogate-keys policy with --keys
    /// entries, then time invalidating --matching of them by tag and by
    /// pattern while a read load runs, and print the read latency before and
    /// during each invalidation.
    BenchInvalidation(InvalidationBenchArgs),
    /// Read one hot key through the gateway(s) with many clients and a slow
    /// origin, without and with leases, and print origin calls per expiry
    /// and read latency side by side.
    BenchStampede(StampedeBenchArgs),
    /// Tools for policy authors: check, evaluate and benchmark a .wasm policy
    /// exactly as the gateway runs it.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show a running gateway's last minute: requests, hit rate and latency
    /// per namespace and operation, and (Redis store) Redis's memory facts
    /// with warnings about settings that hurt a cache.
    Stats {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Read a value: the value on stdout, what the gateway said on stderr.
    /// Exit 0: found; 3: MISS; 4: degraded (the store is unavailable); 1:
    /// the gateway refused (its status is shown) or is unreachable.
    Get {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
        /// Serve a value past its fresh TTL, inside its stale window.
        #[arg(long)]
        allow_stale: bool,
        /// Write the value's bytes exactly, even when they are not UTF-8.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Write a value, from the argument, --file, or standard input (`-`).
    /// Exit 0: stored; 4: not stored (degraded, or the policy bypasses the
    /// cache); 1: refused (e.g. over the value limit) or unreachable.
    Set {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
        /// The value; `-` reads standard input.
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Media type stored with the entry (e.g. application/json).
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Delete a key. Exit 0: deleted; 3: nothing to delete; 4: degraded; 1:
    /// refused or unreachable.
    Del {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Invalidate entries of a namespace by keys, a glob pattern, tags, or all
    /// of it. Exit 0: done (or still running after --wait: the job id is
    /// printed); 1: refused, failed or unreachable.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(false)))]
    Invalidate {
        /// The namespace.
        namespace: String,
        /// Keys (mapped by the namespace's policy like Deletes); repeatable.
        #[arg(long = "key", value_name = "KEY", group = "what")]
        keys: Vec<String>,
        /// A glob (`*`, `?`, `[a-z]`, `\x`) over the namespace's keys.
        #[arg(long, value_name = "GLOB", group = "what")]
        pattern: Option<String>,
        /// Tags (surrogate keys); repeatable.
        #[arg(long = "tag", value_name = "TAG", group = "what")]
        tags: Vec<String>,
        /// Everything in the namespace (O(1)).
        #[arg(long, group = "what")]
        all: bool,
        /// Mark entries stale instead of removing them.
        #[arg(long)]
        soft: bool,
        /// How long to wait for the job before printing where it is.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Make and hash API tokens for `[auth]` (docs/SECURITY.md).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token (256 bits, hex) on the first line and its
    /// SHA-256 digest, for `token_sha256`, on the second.
    New,
    /// Read a token from standard input and print its SHA-256 digest.
    Hash,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create a policy crate of your own: a `decide` skeleton with a native
    /// unit test, a README, the release profile a module needs, and the SDK
    /// as a path dependency on this cachegw's checkout. docs/POLICY_GUIDE.md
    /// goes from here to a live policy.
    New {
        /// The policy's name (lowercase letters, digits, `-`): the crate,
        /// dist/NAME.wasm and the policy pushed to a gateway.
        name: String,
        /// Where to create it [default: ./NAME]; it must not exist, or be empty.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The policy SDK to depend on [default: policy-sdk in the checkout
        /// this cachegw was built from].
        #[arg(long, value_name = "DIR", env = "CACHEGW_POLICY_SDK")]
        sdk: Option<PathBuf>,
    },
    /// Build a policy crate to DIR/dist/NAME.wasm with whichever wasm
    /// toolchain this machine has (rustup's wasm32-unknown-unknown target, or
    /// Debian's rustc-web building std from source), then check it as
    /// `policy check` does. Says what is missing when neither is there.
    Build {
        /// The policy crate.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// As root: install Debian's toolchain (rustc-web cargo-web
        /// rust-web-src lld) with apt-get if no toolchain can build wasm.
        #[arg(long)]
        install: bool,
        /// Cargo's target dir [default: DIR/target].
        #[arg(long, value_name = "DIR", env = "CACHEGW_POLICY_TARGET_DIR")]
        target_dir: Option<PathBuf>,
        #[command(flatten)]
        common: PolicyArgs,
    },
    /// Validate a module: exports, ABI version, init on the config, and a dry
    /// run of a Get, a Set and a Delete. Prints a JSON report; exits 1 if
    /// anything is wrong.
    Check {
        /// The policy module.
        file: PathBuf,
        #[command(flatten)]
        common: PolicyArgs,
    },
    /// Ask a module for one decision and print it as JSON; exits 1 on a fault
    /// or an invalid decision.
    Eval {
        /// The policy module (omit with --remote: name a loaded --version).
        file: Option<PathBuf>,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        common: PolicyArgs,
        /// Ask a running gateway's admin API instead (e.g. 127.0.0.1:50052).
        #[arg(long, value_name = "ADDR", requires = "version")]
        remote: Option<String>,
        /// With --remote: the loaded version to evaluate.
        #[arg(long)]
        version: Option<String>,
        /// With --remote: a file holding the admin token [default: $CACHEGW_TOKEN].
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Upload a module to a running gateway (validated before it is accepted).
    Push {
        /// The policy module.
        file: PathBuf,
        /// Its name (default: the file name without .wasm).
        #[arg(long)]
        name: Option<String>,
        /// Also bind it to this namespace once accepted.
        #[arg(long, value_name = "NAMESPACE")]
        bind: Option<String>,
        /// With --bind: the binding's config (inline JSON, or @FILE).
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// With --bind: fail-open or fail-closed.
        #[arg(long, default_value = "fail-open")]
        fallback: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List a running gateway's policy versions and namespace bindings.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Bind a loaded version to a namespace of a running gateway.
    Bind {
        /// The namespace.
        namespace: String,
        /// The version (as printed by push or list).
        version: String,
        /// The binding's config (inline JSON, or @FILE).
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// fail-open or fail-closed.
        #[arg(long, default_value = "fail-open")]
        fallback: String,
        /// Install as a canary taking this percentage of keys (0 removes it).
        #[arg(long, value_name = "PERCENT", conflicts_with = "shadow")]
        canary: Option<f64>,
        /// Install as a shadow deciding this percentage of requests without
        /// applying the decisions (0 removes it).
        #[arg(long, value_name = "PERCENT")]
        shadow: Option<f64>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Re-bind a namespace's previous binding on a running gateway.
    Rollback {
        /// The namespace.
        namespace: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Time many decisions on one input (an instance per call, as served, or
    /// one reused instance for comparison) and report latency percentiles and
    /// this process's memory before and after.
    Bench {
        /// The policy module.
        file: PathBuf,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        common: PolicyArgs,
        /// Decisions to make.
        #[arg(long, default_value_t = 100_000)]
        calls: u64,
        /// Reuse one instance for every call instead of a fresh one each.
        #[arg(long, conflicts_with = "memo")]
        reuse_instance: bool,
        /// Time what a decision costs when the gateway's decision memo answers
        /// it: one real call, then every call a memo hit. Fails if the policy
        /// does not report the decision as reusable.
        #[arg(long)]
        memo: bool,
        /// Instantiate the module as loaded rather than its image
        /// pre-initialised with --config (as with `policy.preinit = false`).
        #[arg(long)]
        no_preinit: bool,
    },
}

#[derive(clap::Args)]
struct RemoteArgs {
    /// The gateway's admin API address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50052")]
    remote: String,
    /// A file holding the admin token [default: $CACHEGW_TOKEN].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl RemoteArgs {
    fn target(&self) -> anyhow::Result<gateway::admin_cli::Remote> {
        gateway::admin_cli::Remote::new(&self.remote, self.token_file.as_deref(), &self.tls.files())
    }
}

/// Where the data API is, and how to call it.
#[derive(clap::Args)]
struct DataArgs {
    /// The gateway's data API address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    remote: String,
    /// A file holding the tenant token [default: $CACHEGW_TOKEN].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// A request attribute for the namespace's policy; repeatable.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// The call's deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl DataArgs {
    fn common(&self) -> anyhow::Result<gateway::data_cli::Common> {
        Ok(gateway::data_cli::Common {
            remote: gateway::admin_cli::Remote::new(
                &self.remote,
                self.token_file.as_deref(),
                &self.tls.files(),
            )?,
            attributes: gateway::data_cli::parse_attributes(&self.attrs)?,
            timeout: self.timeout,
            json: self.json,
        })
    }
}

/// TLS to a gateway's admin API.
#[derive(clap::Args)]
struct TlsArgs {
    /// Connect with TLS, trusting this PEM CA for the gateway's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a listener that requires mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> gateway::admin_cli::TlsFiles {
        gateway::admin_cli::TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// The binding's config: inline JSON, or @FILE.
    #[arg(long, value_name = "JSON")]
    config: Option<String>,
    /// Config file whose [policy] limits to apply (deadline, memory...).
    #[arg(long = "gateway-config", value_name = "FILE")]
    gateway_config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Operation: get, set or delete.
    #[arg(long, default_value = "get")]
    op: String,
    /// Namespace the request addresses.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The client's key.
    #[arg(long)]
    key: String,
    /// A request attribute, NAME=VALUE (repeatable).
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// Size of the value being written (set).
    #[arg(long, default_value_t = 0)]
    value_size: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "CACHEGW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Redis URL [default: redis://127.0.0.1:6379].
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Treat `--redis` (redis.url) as a seed node of a Redis Cluster
    /// (redis.mode = "cluster").
    #[arg(long)]
    redis_cluster: bool,
    /// Store backend: `redis`, or `memory` (in-process) [default: redis].
    #[arg(long, value_name = "STORE")]
    store: Option<StoreKind>,
    /// Policy admin API listen address [default: 127.0.0.1:50052].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Prometheus endpoint listen address [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Turn authentication off (auth.enabled = false): anyone who can reach
    /// the listeners may do anything. For local development only.
    #[arg(long)]
    no_auth: bool,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format, `text` or `json` [default: log.format, text].
    #[arg(long, env = "CACHEGW_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<LogFormatConfig>,
    /// Export request spans over OTLP/gRPC to this endpoint (needs a build
    /// with `--features otel`) [default: log.otlp_endpoint].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// mimalloc v3 rather than glibc's malloc: per-thread free lists without
/// arena locks, for the entries one worker makes and another frees (the
/// memo's, the near-cache's, every request's buffers). Measured side by side
/// in docs/BENCHMARKS.md ("The allocator: mimalloc v3"): a Get hit 8-11% less
/// CPU, an MGet's keys 17-19% less, for ~15 MB more resident memory at start;
/// the memo's byte bound and its flat memory hold as with glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cachegw: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(data) = data_command(&cli.command) {
        return match runtime.block_on(data) {
            Ok(exit) => ExitCode::from(exit as u8),
            Err(err) => {
                eprintln!("cachegw: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Get { .. }
            | Command::Set { .. }
            | Command::Del { .. }
            | Command::Invalidate { .. } => {
                unreachable!("data commands are run above")
            }
            Command::Serve(args) => serve(args).await,
            Command::Bench(args) => bench::run(args).await.map(|_| ()),
            Command::BenchInvalidation(args) => bench_invalidation::run(args).await.map(|_| ()),
            Command::BenchStampede(args) => bench_stampede::run(args).await.map(|_| ()),
            Command::Policy(command) => policy_command(command).await,
            Command::Token(command) => token_command(command),
            Command::Stats { remote } => {
                gateway::admin_cli::stats(&remote.target()?, remote.json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<Failed>().is_some() => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("cachegw: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        redis_url: args.redis,
        redis_cluster: args.redis_cluster,
        store: args.store,
        admin_listen: args.admin_listen,
        metrics_listen: args.metrics_listen,
        no_auth: args.no_auth,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    if args.print_config {
        out!("{}", toml::to_string_pretty(&config)?)?;
        return Ok(());
    }
    let format = match args.log_format.unwrap_or(config.log.format) {
        LogFormatConfig::Text => LogFormat::Text,
        LogFormatConfig::Json => LogFormat::Json,
    };
    let otlp_endpoint = args
        .otlp_endpoint
        .or_else(|| config.log.otlp_endpoint.clone());
    // Kept to the end of `serve`: dropping it flushes exported spans.
    let _telemetry = telemetry::init(format, otlp_endpoint.as_deref())?;
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let admin = if config.admin.enabled {
        let admin = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
        Some(admin)
    } else {
        None
    };
    let metrics_listener = if config.metrics.enabled {
        Some(
            tokio::net::TcpListener::bind(config.metrics.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (metrics.listen)",
                        config.metrics.listen
                    )
                })?,
        )
    } else {
        None
    };
    let gateway = Gateway::new(config)?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(listener) = metrics_listener {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
        let metrics = gateway.metrics();
        tracing::info!(%addr, "metrics endpoint serving /metrics");
        tokio::spawn(async move {
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            if let Err(err) = metrics.serve(listener, stopped).await {
                tracing::error!(cause = %err, "metrics endpoint failed");
            }
        });
    }
    gateway.serve_with_admin(listener, admin, shutdown).await?;
    let _ = stop_metrics.send(());
    Ok(())
}

/// A tool already reported its failure on stdout; exit 1 without more words.
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed")
    }
}

impl std::error::Error for Failed {}

async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    use gateway::admin_cli as remote;
    let fallback = |text: &str| match text {
        "fail-open" => Ok(gateway::config::FallbackMode::FailOpen),
        "fail-closed" => Ok(gateway::config::FallbackMode::FailClosed),
        other => Err(anyhow::anyhow!(
            "--fallback `{other}`: expected fail-open or fail-closed"
        )),
    };
    match command {
        PolicyCommand::Push {
            file,
            name,
            bind,
            config,
            fallback: mode,
            remote: args,
        } => {
            let name = name.unwrap_or_else(|| gateway::policy::module_name(&file));
            let bind = match bind {
                Some(namespace) => Some((namespace, config, fallback(&mode)?)),
                None => None,
            };
            remote::push(&args.target()?, &file, &name, bind, args.json).await
        }
        PolicyCommand::List { remote: args } => remote::list(&args.target()?, args.json).await,
        PolicyCommand::Bind {
            namespace,
            version,
            config,
            fallback: mode,
            canary,
            shadow,
            remote: args,
        } => {
            let bind_as = match (canary, shadow) {
                (Some(percent), _) => remote::BindAs::Canary(percent),
                (_, Some(percent)) => remote::BindAs::Shadow(percent),
                _ => remote::BindAs::Active,
            };
            remote::bind(
                &args.target()?,
                &namespace,
                &version,
                config.as_deref(),
                fallback(&mode)?,
                bind_as,
                args.json,
            )
            .await
        }
        PolicyCommand::Rollback {
            namespace,
            remote: args,
        } => remote::rollback(&args.target()?, &namespace, args.json).await,
        PolicyCommand::New { name, dir, sdk } => {
            let created = gateway::policy_author::new_crate(&name, dir.as_deref(), sdk.as_deref())?;
            outln!(
                "created {} (policy SDK: {})",
                created.dir.display(),
                created.sdk.display()
            )?;
            outln!(
                "next: cd {} && cargo test && cachegw policy build",
                created.dir.display()
            )?;
            Ok(())
        }
        PolicyCommand::Build {
            dir,
            install,
            target_dir,
            common,
        } => {
            let file = gateway::policy_author::build(&dir, install, target_dir.as_deref())?;
            policy_tool(PolicyCommand::Check { file, common })
        }
        PolicyCommand::Eval {
            remote: Some(address),
            version: Some(version),
            token_file,
            tls,
            probe,
            common,
            ..
        } => {
            let probe = tool::Probe {
                op: tool::parse_op(&probe.op)?,
                namespace: probe.namespace,
                key: probe.key,
                attributes: tool::parse_attrs(&probe.attrs)?,
                value_size: probe.value_size,
            };
            let target = remote::Remote::new(&address, token_file.as_deref(), &tls.files())?;
            let ok = remote::eval(&target, &version, probe, common.config.as_deref()).await?;
            if ok { Ok(()) } else { Err(Failed.into()) }
        }
        local => policy_tool(local),
    }
}

fn policy_tool(command: PolicyCommand) -> anyhow::Result<()> {
    let (file, common) = match &command {
        PolicyCommand::Check { file, common } | PolicyCommand::Bench { file, common, .. } => {
            (file, common)
        }
        PolicyCommand::Eval {
            file: Some(file),
            common,
            ..
        } => (file, common),
        PolicyCommand::Eval { file: None, .. } => {
            anyhow::bail!("policy eval needs a FILE, or --remote ADDR --version VERSION")
        }
        _ => unreachable!("remote commands are handled by policy_command"),
    };
    // Only the [policy] limits matter here; the tool serves nobody, so a
    // file without tokens is fine.
    let tool_only = Overrides {
        no_auth: true,
        ..Overrides::default()
    };
    let mut config = Config::load(common.gateway_config.as_deref(), &tool_only)?;
    if let PolicyCommand::Bench {
        no_preinit: true, ..
    } = &command
    {
        config.policy.preinit = false;
    }
    let policy_config = tool::parse_config(common.config.as_deref())?;
    let loaded = tool::Loaded::new(
        file,
        policy_config.as_ref(),
        &config.policy,
        config.limits.max_key_bytes,
    )?;
    let probe = |args: &ProbeArgs| -> anyhow::Result<tool::Probe> {
        Ok(tool::Probe {
            op: tool::parse_op(&args.op)?,
            namespace: args.namespace.clone(),
            key: args.key.clone(),
            attributes: tool::parse_attrs(&args.attrs)?,
            value_size: args.value_size,
        })
    };
    match &command {
        PolicyCommand::Check { .. } => {
            let report = loaded.check();
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
            if !report.ok {
                return Err(Failed.into());
            }
        }
        PolicyCommand::Eval { probe: args, .. } => {
            let report = loaded.eval(&probe(args)?);
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
            if report.fault.is_some() {
                return Err(Failed.into());
            }
        }
        PolicyCommand::Bench {
            probe: args,
            calls,
            reuse_instance,
            memo,
            ..
        } => {
            let mode = match (reuse_instance, memo) {
                (true, _) => BenchMode::ReusedInstance,
                (_, true) => BenchMode::Memo,
                _ => BenchMode::Fresh,
            };
            let report = loaded.bench(&probe(args)?, *calls, mode)?;
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
        }
        _ => unreachable!("remote commands are handled by policy_command"),
    }
    Ok(())
}

/// The data commands, whose exit codes say what happened.
fn data_command(
    command: &Command,
) -> Option<impl std::future::Future<Output = anyhow::Result<gateway::data_cli::Exit>> + '_> {
    use gateway::data_cli::{self, What};
    let data = match command {
        Command::Get { data, .. }
        | Command::Set { data, .. }
        | Command::Del { data, .. }
        | Command::Invalidate { data, .. } => data,
        _ => return None,
    };
    Some(async move {
        let common = data.common()?;
        match command {
            Command::Get {
                namespace,
                key,
                allow_stale,
                raw,
                ..
            } => data_cli::get(&common, namespace, key, *allow_stale, *raw).await,
            Command::Set {
                namespace,
                key,
                value,
                file,
                content_type,
                ..
            } => {
                let bytes = match (value.as_deref(), file) {
                    (_, Some(file)) => std::fs::read(file)
                        .with_context(|| format!("cannot read --file `{}`", file.display()))?,
                    (Some("-"), None) => {
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                            .context("cannot read the value from standard input")?;
                        bytes
                    }
                    (Some(value), None) => value.as_bytes().to_vec(),
                    (None, None) => {
                        anyhow::bail!("give a VALUE, `-` for standard input, or --file")
                    }
                };
                data_cli::set(&common, namespace, key, bytes, content_type.clone()).await
            }
            Command::Del { namespace, key, .. } => data_cli::delete(&common, namespace, key).await,
            Command::Invalidate {
                namespace,
                keys,
                pattern,
                tags,
                all,
                soft,
                wait,
                ..
            } => {
                let what = match (keys.is_empty(), pattern, tags.is_empty(), all) {
                    (false, _, _, _) => What::Keys(keys.clone()),
                    (_, Some(pattern), _, _) => What::Pattern(pattern.clone()),
                    (_, _, false, _) => What::Tags(tags.clone()),
                    (_, _, _, true) => What::All,
                    _ => anyhow::bail!("say what to invalidate: --key, --pattern, --tag or --all"),
                };
                data_cli::invalidate(&common, namespace, what, *soft, *wait).await
            }
            _ => unreachable!("only data commands get here"),
        }
    })
}

fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    use gateway::auth::{MIN_TOKEN_BYTES, token_digest_hex};
    match command {
        TokenCommand::New => {
            let bytes: [u8; 32] = rand::random();
            let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            outln!("{token}")?;
            outln!("{}", token_digest_hex(&token))?;
        }
        TokenCommand::Hash => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("cannot read the token from standard input")?;
            let token = token.trim();
            anyhow::ensure!(
                token.len() >= MIN_TOKEN_BYTES,
                "the token is {} bytes; tokens must have at least {MIN_TOKEN_BYTES}",
                token.len()
            );
            outln!("{}", token_digest_hex(token))?;
        }
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: a signal arriving while the
/// gateway is still starting must start a graceful shutdown, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .inspect_err(|err| {
            tracing::error!(cause = %err, "cannot listen for SIGTERM; only SIGINT stops the gateway");
        })
        .ok();
    #[cfg(unix)]
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(terminate) => {},
                () = wait(interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
