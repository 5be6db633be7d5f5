//! `cachegw bench-invalidation`: how long invalidating many entries takes, and
//! what it does to everyone else's reads meanwhile.
//!
//! It writes `--keys` entries into a namespace bound to the `surrogate-keys`
//! policy (`--matching` of them under `hot:` tagged `hot`, the rest under
//! `cold:` tagged `cold`), then measures three phases, each under the same
//! read load (GETs of `cold:` keys through the gateway, and the same entries'
//! GETs straight at Redis):
//!
//! 1. baseline: no invalidation;
//! 2. tag: Invalidate by the tag `hot`;
//! 3. pattern: the `hot:` entries are written again, then Invalidate by the
//!    pattern `hot:*`.
//!
//! For each phase it reports the invalidation's wall time and what it removed,
//! and the read load's throughput and latency percentiles during it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::auth::{AuthedChannel, BearerToken};
use crate::{out, outln};

use crate::api::proto::v1::{
    GetRequest, InvalidateRequest, JobState, MSetRequest, Outcome, SetRequest, TagList,
    cache_client::CacheClient, invalidate_request::Target, m_set_result,
};

/// Options of `cachegw bench-invalidation`.
#[derive(Debug, Clone, clap::Args)]
pub struct InvalidationBenchArgs {
    /// A file holding the tenant token to send [default: $CACHEGW_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The gateway's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// The Redis the gateway uses: the read load also GETs it directly.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The namespace to fill; it must be bound to the `surrogate-keys`
    /// example policy (tags come from the `surrogate-key` attribute) and be in
    /// its first generation (never flushed), on a Redis used for nothing else.
    #[arg(long, default_value = "catalog")]
    pub namespace: String,
    /// Entries written in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: usize,
    /// Entries each invalidation should remove.
    #[arg(long, default_value_t = 100_000)]
    pub matching: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// GETs in flight through the gateway (and, separately, straight at Redis).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// HTTP/2 channels to the gateway.
    #[arg(long, default_value_t = 2)]
    pub channels: usize,
    /// How long the baseline phase measures.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub baseline: Duration,
    /// Skip writing the entries (they are already there from a previous run
    /// with the same --keys/--matching, and this run only re-measures).
    #[arg(long)]
    pub no_populate: bool,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// `baseline`, `tag` or `pattern`.
    pub phase: &'static str,
    /// Wall time of the Invalidate call (the baseline's measuring time).
    pub invalidation_ms: f64,
    /// The job's own time, as the gateway reports it.
    pub job_ms: u64,
    /// Entries the invalidation removed.
    pub removed: u64,
    /// Reads through the gateway during the phase.
    pub gateway: LoadResult,
    /// Reads straight at Redis during the phase.
    pub redis: LoadResult,
}

/// A read load's figures over one phase.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadResult {
    /// Completed reads.
    pub requests: u64,
    /// Reads that failed, were degraded or did not hit.
    pub errors: u64,
    /// Reads per second.
    pub ops_per_sec: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Slowest read, ms.
    pub max_ms: f64,
}

/// Runs the benchmark and prints its results.
pub async fn run(args: InvalidationBenchArgs) -> anyhow::Result<Vec<PhaseResult>> {
    if args.matching == 0 || args.matching >= args.keys {
        bail!("--matching must be between 1 and --keys - 1");
    }
    if args.concurrency == 0 || args.channels == 0 {
        bail!("--concurrency and --channels must be at least 1");
    }
    let bearer = BearerToken::from_file_or_env(args.token_file.as_deref())?;
    let mut channels = Vec::new();
    for _ in 0..args.channels {
        channels.push(AuthedChannel::new(
            Endpoint::from_shared(args.gateway.clone())
                .with_context(|| format!("bad --gateway address `{}`", args.gateway))?
                .connect()
                .await
                .with_context(|| format!("cannot reach the gateway at {}", args.gateway))?,
            bearer.clone(),
        ));
    }
    let redis = redis::Client::open(args.redis.as_str())
        .with_context(|| format!("bad --redis URL `{}`", args.redis))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot reach Redis at {}", args.redis))?;
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let cold = args.keys - args.matching;
    if !args.no_populate {
        let started = Instant::now();
        write(&channels, &args.namespace, "cold", cold, &value).await?;
        write(&channels, &args.namespace, "hot", args.matching, &value).await?;
        eprintln!(
            "wrote {} entries in {:.1?} ({:.0}/s)",
            args.keys,
            started.elapsed(),
            args.keys as f64 / started.elapsed().as_secs_f64()
        );
    }

    let load = Load {
        channels: channels.clone(),
        redis: redis.clone(),
        namespace: args.namespace.clone(),
        cold,
        concurrency: args.concurrency,
    };
    let mut client = CacheClient::new(channels[0].clone());
    let mut results = Vec::new();

    let baseline = args.baseline;
    let (_, gateway, redis_load) = load
        .during(async {
            tokio::time::sleep(baseline).await;
        })
        .await;
    results.push(PhaseResult {
        phase: "baseline",
        invalidation_ms: millis(baseline),
        job_ms: 0,
        removed: 0,
        gateway,
        redis: redis_load,
    });

    for phase in ["tag", "pattern"] {
        if phase == "pattern" {
            write(&channels, &args.namespace, "hot", args.matching, &value).await?;
        }
        let target = match phase {
            "tag" => Target::Tags(TagList {
                tags: vec!["hot".to_owned()],
            }),
            _ => Target::Pattern("hot:*".to_owned()),
        };
        let request = InvalidateRequest {
            namespace: args.namespace.clone(),
            target: Some(target),
            wait_ms: 600_000,
            ..Default::default()
        };
        let (answer, gateway, redis_load) = load
            .during(async {
                let started = Instant::now();
                let answer = client.invalidate(request).await;
                (answer, started.elapsed())
            })
            .await;
        let (answer, took) = answer;
        let answer = answer.context("Invalidate failed")?.into_inner();
        if answer.state != JobState::Done as i32 {
            bail!("the {phase} invalidation did not finish: {answer:?}");
        }
        if answer.affected != args.matching as u64 {
            eprintln!(
                "warning: the {phase} invalidation removed {} entries, expected {} (is the namespace bound to surrogate-keys, and fresh?)",
                answer.affected, args.matching
            );
        }
        results.push(PhaseResult {
            phase,
            invalidation_ms: millis(took),
            job_ms: answer.elapsed_ms,
            removed: answer.affected,
            gateway,
            redis: redis_load,
        });
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        out!("{}", render(&args, &results))?;
    }
    Ok(results)
}

/// Writes `count` entries `{prefix}:{i}` tagged `{prefix}`, in batches over
/// every channel.
async fn write(
    channels: &[AuthedChannel],
    namespace: &str,
    prefix: &'static str,
    count: usize,
    value: &Bytes,
) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    let writers: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(w, channel)| {
            let mut client = CacheClient::new(channel.clone());
            let namespace = namespace.to_owned();
            let value = value.clone();
            let writers = channels.len();
            tokio::spawn(async move {
                let tags = HashMap::from([("surrogate-key".to_owned(), prefix.to_owned())]);
                for start in (w * BATCH..count).step_by(writers * BATCH) {
                    let mut items: Vec<SetRequest> = (start..(start + BATCH).min(count))
                        .map(|i| SetRequest {
                            namespace: namespace.clone(),
                            key: format!("{prefix}:{i}"),
                            value: value.clone(),
                            attributes: tags.clone(),
                            ..Default::default()
                        })
                        .collect();
                    // Retry what was not stored, as a client would: under
                    // CPU starvation a policy call can miss its deadline, and
                    // a fail-closed binding then stores nothing.
                    for attempt in 1.. {
                        let written = client
                            .m_set(MSetRequest {
                                items: items.clone(),
                            })
                            .await?
                            .into_inner();
                        let mut stored = written.results.iter().map(|result| {
                            matches!(&result.result, Some(m_set_result::Result::Response(r)) if r.stored)
                        });
                        items.retain(|_| !stored.next().unwrap_or(false));
                        if items.is_empty() {
                            break;
                        }
                        if attempt == 3 {
                            bail!(
                                "the gateway did not store {} entries after 3 attempts (is its store up?)",
                                items.len()
                            );
                        }
                        eprintln!("retrying {} entries the gateway did not store", items.len());
                    }
                }
                Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    Ok(())
}

/// The read load: GETs of random `cold:` entries, through the gateway and
/// straight at Redis.
struct Load {
    channels: Vec<AuthedChannel>,
    redis: MultiplexedConnection,
    namespace: String,
    cold: usize,
    concurrency: usize,
}

impl Load {
    /// Runs the load while `action` runs; returns what `action` returned and
    /// the figures of both loads over exactly that time.
    async fn during<T>(&self, action: impl Future<Output = T>) -> (T, LoadResult, LoadResult) {
        let stop = Arc::new(AtomicBool::new(false));
        let mut gateway_tasks = Vec::new();
        let mut redis_tasks = Vec::new();
        for task in 0..self.concurrency {
            let halt = Arc::clone(&stop);
            let mut client = CacheClient::new(self.channels[task % self.channels.len()].clone());
            let namespace = self.namespace.clone();
            let cold = self.cold;
            gateway_tasks.push(tokio::spawn(async move {
                let mut figures = Figures::new();
                while !halt.load(Ordering::Relaxed) {
                    let key = format!("cold:{}", rand::random_range(0..cold));
                    let started = Instant::now();
                    let answer = client
                        .get(GetRequest {
                            allow_stale: false,
                            lease: None,
                            namespace: namespace.clone(),
                            key,
                            attributes: HashMap::new(),
                        })
                        .await;
                    let hit = matches!(&answer, Ok(r) if r.get_ref().outcome == Outcome::Hit as i32 && !r.get_ref().degraded);
                    figures.record(started.elapsed(), hit);
                }
                figures
            }));
            let halt = Arc::clone(&stop);
            let mut connection = self.redis.clone();
            let namespace = self.namespace.clone();
            redis_tasks.push(tokio::spawn(async move {
                let mut figures = Figures::new();
                while !halt.load(Ordering::Relaxed) {
                    let key = crate::store::layout::entry_key(
                        &namespace,
                        0,
                        format!("cold:{}", rand::random_range(0..cold)).as_bytes(),
                    );
                    let started = Instant::now();
                    let answer: redis::RedisResult<Option<Bytes>> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut connection)
                        .await;
                    figures.record(started.elapsed(), matches!(answer, Ok(Some(_))));
                }
                figures
            }));
        }
        let started = Instant::now();
        let output = action.await;
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut gateway = Figures::new();
        for task in gateway_tasks {
            gateway.merge(task.await.expect("load task"));
        }
        let mut redis = Figures::new();
        for task in redis_tasks {
            redis.merge(task.await.expect("load task"));
        }
        (output, gateway.result(elapsed), redis.result(elapsed))
    }
}

/// Latencies (µs) and failures of one load (shared with the other load
/// tools).
pub(crate) struct Figures {
    histogram: Histogram<u64>,
    errors: u64,
}

impl Figures {
    pub(crate) fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            errors: 0,
        }
    }

    pub(crate) fn record(&mut self, latency: Duration, ok: bool) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
        self.errors += u64::from(!ok);
    }

    pub(crate) fn merge(&mut self, other: Figures) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        self.errors += other.errors;
    }

    pub(crate) fn result(&self, elapsed: Duration) -> LoadResult {
        let ms = |quantile: f64| self.histogram.value_at_quantile(quantile) as f64 / 1000.0;
        LoadResult {
            requests: self.histogram.len(),
            errors: self.errors,
            ops_per_sec: self.histogram.len() as f64 / elapsed.as_secs_f64(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.histogram.max() as f64 / 1000.0,
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn render(args: &InvalidationBenchArgs, results: &[PhaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} of {} entries per invalidation; read load: {} GETs in flight through the gateway, {} straight at Redis",
        args.matching, args.keys, args.concurrency, args.concurrency
    );
    let _ = writeln!(
        out,
        "{:<9} {:>10} {:>8} {:>9} | {:>9} {:>7} {:>7} {:>7} {:>7} {:>6} | {:>9} {:>7} {:>7} {:>7} {:>7}",
        "phase",
        "wall ms",
        "job ms",
        "removed",
        "gw ops/s",
        "p50",
        "p99",
        "p999",
        "max",
        "errors",
        "rd ops/s",
        "p50",
        "p99",
        "p999",
        "max"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<9} {:>10.0} {:>8} {:>9} | {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>6} | {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
            r.phase,
            r.invalidation_ms,
            r.job_ms,
            r.removed,
            r.gateway.ops_per_sec,
            r.gateway.p50_ms,
            r.gateway.p99_ms,
            r.gateway.p999_ms,
            r.gateway.max_ms,
            r.gateway.errors + r.redis.errors,
            r.redis.ops_per_sec,
            r.redis.p50_ms,
            r.redis.p99_ms,
            r.redis.p999_ms,
            r.redis.max_ms,
        );
    }
    out
}
