//! `cachegw bench-stampede`: a hot key that expires every `--ttl`, read
//! through by `--clients` clients spread over one or more gateways, with an
//! origin that takes `--origin-latency` per call. Each mode runs for
//! `--duration`, side by side in one run:
//!
//! - `plain`: the hand-rolled read-through — Get; on a miss, call the origin
//!   and Set. Every client that misses calls the origin: the stampede.
//! - `leases`: Get with a lease — the one caller granted it calls the origin
//!   and Sets with the token; the others wait for its fill (coalesced), up to
//!   `--wait`, and only call the origin themselves if it never comes.
//!
//! It reports origin calls per expiry (the target: at most one across the
//! fleet) and the clients' read-through latency.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::auth::{AuthedChannel, BearerToken};
use crate::{out, outln};

use crate::{
    api::proto::v1::{
        GetRequest, LeaseRequest, LeaseState, Outcome, SetRequest, cache_client::CacheClient,
    },
    bench_invalidation::{Figures, LoadResult},
};

/// How the clients read through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Get, and on a miss: origin, then Set.
    Plain,
    /// Get with a lease; only the holder calls the origin.
    Leases,
}

/// Options of `cachegw bench-stampede`.
#[derive(Debug, Clone, clap::Args)]
pub struct StampedeBenchArgs {
    /// A file holding the tenant token to send [default: $CACHEGW_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Gateways' gRPC addresses, comma-separated: clients are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    pub gateway: Vec<String>,
    /// The namespace; its entries must be fresh for `--ttl` with no stale
    /// window (the example config's `hot` namespace: 1 s).
    #[arg(long, default_value = "hot")]
    pub namespace: String,
    /// The namespace's fresh TTL, to count expiries.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 500)]
    pub clients: usize,
    /// HTTP/2 channels per gateway.
    #[arg(long, default_value_t = 8)]
    pub channels: usize,
    /// How long one origin call takes.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub origin_latency: Duration,
    /// Each client's pause between two reads.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub think: Duration,
    /// How long a lease mode client waits for another's fill.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// How long each mode runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Modes to run, comma-separated, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,leases"
    )]
    pub mode: Vec<Mode>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StampedeResult {
    /// How the clients read through.
    pub mode: Mode,
    /// Expiries of the hot key during the run (duration / ttl).
    pub expiries: f64,
    /// Origin calls in all.
    pub origin_calls: u64,
    /// Origin calls per expiry.
    pub origin_calls_per_expiry: f64,
    /// Reads answered by another caller's fill (leases mode).
    pub coalesced: u64,
    /// Lease waits that ran out, so the client called the origin itself.
    pub timed_out: u64,
    /// The clients' read-through: hits, waits and origin calls included.
    pub reads: LoadResult,
}

/// Runs every mode and prints the results.
pub async fn run(args: StampedeBenchArgs) -> anyhow::Result<Vec<StampedeResult>> {
    if args.clients == 0 || args.channels == 0 || args.gateway.is_empty() {
        bail!("--clients, --channels and --gateway need at least one");
    }
    if args.ttl.is_zero() || args.duration.is_zero() {
        bail!("--ttl and --duration must be longer than 0s");
    }
    let bearer = BearerToken::from_file_or_env(args.token_file.as_deref())?;
    let mut channels = Vec::new();
    for gateway in &args.gateway {
        for _ in 0..args.channels {
            channels.push(AuthedChannel::new(
                Endpoint::from_shared(gateway.clone())
                    .with_context(|| format!("bad --gateway address `{gateway}`"))?
                    .connect()
                    .await
                    .with_context(|| format!("cannot reach the gateway at {gateway}"))?,
                bearer.clone(),
            ));
        }
    }
    let mut results = Vec::new();
    for (round, mode) in args.mode.iter().enumerate() {
        // A key of its own per mode: no entry carries over.
        let key = format!("stampede:{}:{round}", std::process::id());
        results.push(run_mode(&args, &channels, *mode, &key).await?);
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        out!("{}", render(&args, &results))?;
    }
    Ok(results)
}

/// Counters shared by one mode's clients.
#[derive(Default)]
struct Counts {
    origin_calls: AtomicU64,
    coalesced: AtomicU64,
    timed_out: AtomicU64,
}

async fn run_mode(
    args: &StampedeBenchArgs,
    channels: &[AuthedChannel],
    mode: Mode,
    key: &str,
) -> anyhow::Result<StampedeResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let client = Client {
                cache: CacheClient::new(channels[i % channels.len()].clone()),
                namespace: args.namespace.clone(),
                key: key.to_owned(),
                origin_latency: args.origin_latency,
                wait: args.wait,
                counts: Arc::clone(&counts),
            };
            let stop = Arc::clone(&stop);
            let think = args.think;
            tokio::spawn(async move { client.run(mode, think, &stop).await })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut reads = Figures::new();
    for client in clients {
        reads.merge(client.await.context("client task")?);
    }
    let expiries = elapsed.as_secs_f64() / args.ttl.as_secs_f64();
    let origin_calls = counts.origin_calls.load(Ordering::Relaxed);
    Ok(StampedeResult {
        mode,
        expiries,
        origin_calls,
        origin_calls_per_expiry: origin_calls as f64 / expiries,
        coalesced: counts.coalesced.load(Ordering::Relaxed),
        timed_out: counts.timed_out.load(Ordering::Relaxed),
        reads: reads.result(elapsed),
    })
}

/// One read-through client.
struct Client {
    cache: CacheClient<AuthedChannel>,
    namespace: String,
    key: String,
    origin_latency: Duration,
    wait: Duration,
    counts: Arc<Counts>,
}

impl Client {
    async fn run(mut self, mode: Mode, think: Duration, stop: &AtomicBool) -> Figures {
        let mut figures = Figures::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let ok = match mode {
                Mode::Plain => self.read_plain().await,
                Mode::Leases => self.read_leased().await,
            };
            figures.record(started.elapsed(), ok);
            tokio::time::sleep(think).await;
        }
        figures
    }

    /// The origin: slow, and counted.
    async fn origin(&self) -> Vec<u8> {
        self.counts.origin_calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.origin_latency).await;
        b"the origin's answer".to_vec()
    }

    fn get(&self, lease: Option<LeaseRequest>) -> GetRequest {
        GetRequest {
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            lease,
            ..Default::default()
        }
    }

    async fn set(&mut self, value: Vec<u8>, token: String) -> bool {
        let request = SetRequest {
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            value: value.into(),
            lease_token: token,
            ..Default::default()
        };
        self.cache.set(request).await.is_ok()
    }

    async fn read_plain(&mut self) -> bool {
        let Ok(got) = self.cache.get(self.get(None)).await else {
            return false;
        };
        if got.get_ref().outcome == Outcome::Hit as i32 {
            return true;
        }
        let value = self.origin().await;
        self.set(value, String::new()).await
    }

    async fn read_leased(&mut self) -> bool {
        let lease = LeaseRequest {
            wait_ms: u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX),
            ttl_ms: 0,
        };
        let Ok(got) = self.cache.get(self.get(Some(lease))).await else {
            return false;
        };
        let got = got.into_inner();
        match LeaseState::try_from(got.lease) {
            Ok(LeaseState::Granted) => {
                let value = self.origin().await;
                self.set(value, got.lease_token).await
            }
            Ok(LeaseState::Coalesced) => {
                self.counts.coalesced.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ if got.outcome == Outcome::Hit as i32 => true,
            // The holder never filled in time (or could not be asked): go to
            // the origin, as a client must.
            state => {
                if state == Ok(LeaseState::TimedOut) {
                    self.counts.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                self.origin().await;
                true
            }
        }
    }
}

fn render(args: &StampedeBenchArgs, results: &[StampedeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} clients over {} gateway(s), one key fresh for {:?}, origin {:?}, think {:?}",
        args.clients,
        args.gateway.len(),
        args.ttl,
        args.origin_latency,
        args.think
    );
    let _ = writeln!(
        out,
        "{:<7} {:>8} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "mode",
        "expiries",
        "origin",
        "per expiry",
        "coalesced",
        "timed out",
        "reads/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "errors"
    );
    for r in results {
        let mode = match r.mode {
            Mode::Plain => "plain",
            Mode::Leases => "leases",
        };
        let _ = writeln!(
            out,
            "{:<7} {:>8.1} {:>8} {:>10.2} {:>10} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}",
            mode,
            r.expiries,
            r.origin_calls,
            r.origin_calls_per_expiry,
            r.coalesced,
            r.timed_out,
            r.reads.ops_per_sec,
            r.reads.p50_ms,
            r.reads.p99_ms,
            r.reads.p999_ms,
            r.reads.max_ms,
            r.reads.errors
        );
    }
    out
}
