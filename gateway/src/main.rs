//! `cachegw`: parse flags, load config, init tracing, run.

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::{
    Config, Gateway,
    bench::{self, BenchArgs},
    config::{Overrides, StoreKind},
};
use tracing_subscriber::EnvFilter;

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
    /// Store backend: `redis`, or `memory` (in-process) [default: redis].
    #[arg(long, value_name = "STORE")]
    store: Option<StoreKind>,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format.
    #[arg(long, env = "CACHEGW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cachegw: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Bench(args) => bench::run(args).await.map(|_| ()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
        store: args.store,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    init_tracing(&args.log_format);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let gateway = Gateway::new(config)?;
    gateway.serve(listener, shutdown_signal()).await?;
    Ok(())
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_env("CACHEGW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM; only SIGINT stops the gateway");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
