//! The load tool behind `cachegw bench`: drives Get/Set through a running
//! gateway at a chosen concurrency over a chosen number of HTTP/2 channels,
//! and, in the same run, the same GETs straight at Redis (redis-rs, the same
//! number of multiplexed connections), so the gateway's cost is measured as a
//! ratio on one machine at one moment.
//!
//! Closed loop by default (each worker sends its next request when the last
//! one is answered: the peak rate); with `--rate`, open loop (requests leave
//! on a fixed schedule: latency at a chosen load, e.g. half of the peak).

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::api::proto::v1::{
    GetRequest, MGetRequest, MSetRequest, Outcome, SetRequest, cache_client::CacheClient,
    m_get_result,
};
use crate::auth::BearerToken;
use crate::{out, outln};

/// What `cachegw bench` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The gateway's gRPC API.
    Gateway,
    /// Redis directly, with redis-rs.
    Redis,
    /// The gateway's health Check RPC: a gRPC round trip with no cache work,
    /// the floor under any gateway RPC.
    Health,
}

/// The operation mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// Only GETs of keys written beforehand (all hits).
    Get,
    /// Only SETs.
    Set,
    /// GETs with `--set-percent` SETs among them.
    Mixed,
    /// MGETs of `--batch` keys written beforehand (all hits); straight at
    /// Redis, one MGET command.
    Mget,
}

/// Which keys the requests pick among the `--keys` written beforehand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every key as likely as any other.
    Uniform,
    /// Zipf's law with `--zipf-exponent`: a few keys take most requests,
    /// as in most caches' traffic.
    Zipf,
}

/// Options of `cachegw bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to drive, comma-separated; targets alternate round by round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "gateway,redis"
    )]
    pub target: Vec<Target>,
    /// The gateway's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// The Redis the gateway uses, for the direct comparison.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Requests in flight at any time (with `--rate`: at most).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop at this many requests per second in all (MGETs count as one
    /// each): the --concurrency workers take turns on one even schedule, and
    /// a request that leaves late because every worker was still waiting for
    /// an answer counts its latency from when it was due, so a slow server
    /// cannot hide its queue by slowing the sender (coordinated omission).
    /// Departures are grouped by the runtime's 1 ms timer. Without it: closed
    /// loop, each worker sending as soon as its last answer came (the peak).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// HTTP/2 channels to the gateway (and connections to Redis).
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// How long each measured round lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each round.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Rounds per target and namespace: they take turns round by round, every
    /// other round in reverse order (A B, B A), and with several namespaces the
    /// summary gives the median of their per-round ratios to the first.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Operation mix.
    #[arg(long, value_enum, default_value = "get")]
    pub op: Mix,
    /// Share of SETs with `--op mixed`, in percent.
    #[arg(long, default_value_t = 10)]
    pub set_percent: u8,
    /// Distinct keys, all written before the measured rounds.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// How requests pick their keys.
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// The exponent of `--distribution zipf` (0.99: the YCSB default).
    #[arg(long, default_value_t = 0.99)]
    pub zipf_exponent: f64,
    /// Keys per MGET with `--op mget`.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Namespaces driven at the gateway, comma-separated: each gets its own
    /// rounds (to compare, say, a policy-bound namespace with a default one).
    #[arg(long, value_delimiter = ',', default_value = "bench")]
    pub namespace: Vec<String>,
    /// Which keys the rounds draw: runs with the same seed draw the same keys,
    /// round by round (every target and namespace of a round the same ones);
    /// warm-ups and rounds draw keys of their own. Give separate runs that
    /// are to be compared the same seed, and repeated runs different ones, so
    /// that they do not replay keys an earlier run just read.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not write the keys first (the store may be down: measuring the
    /// degraded path, e.g. with the circuit breaker open).
    #[arg(long)]
    pub no_populate: bool,
    /// A file holding the tenant token to send [default: $CACHEGW_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The gateway's process id, when it runs on this machine (Linux): each
    /// round also reports the gateway's CPU time per request, the run time of
    /// its threads across the round (from /proc/PID/task/*/schedstat: what
    /// `perf stat -e task-clock -p PID` counts) over the requests answered.
    #[arg(long, value_name = "PID")]
    pub gateway_pid: Option<u32>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    /// What was driven.
    pub target: Target,
    /// The gateway namespace (gateway target only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Operation mix.
    pub op: Mix,
    /// Requests in flight (with `rate`: at most).
    pub concurrency: usize,
    /// The open-loop schedule, requests per second (`--rate`); absent: closed
    /// loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Channels/connections.
    pub channels: usize,
    /// Completed requests.
    pub requests: u64,
    /// Requests that failed outright.
    pub errors: u64,
    /// Gateway answers flagged degraded (or unexpected misses).
    pub degraded: u64,
    /// Throughput.
    pub ops_per_sec: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency, ms.
    pub p999_ms: f64,
    /// The gateway's CPU time per request over the round, µs (with
    /// `--gateway-pid`; an MGet is one request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cpu_us_per_request: Option<f64>,
}

#[derive(Clone)]
enum Driver {
    Gateway(CacheClient<InterceptedService<Channel, BearerToken>>),
    Redis(MultiplexedConnection),
    Health(HealthClient<Channel>),
}

enum Answer {
    Ok,
    Degraded,
}

struct Workload {
    op: Mix,
    set_percent: u8,
    keys: usize,
    pick: Pick,
    batch: usize,
    namespace: String,
    value: Bytes,
}

/// Draws key indices in `0..keys` by the chosen distribution.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Uniform(rand::distr::Uniform<usize>),
    Zipf(rand_distr::Zipf<f64>),
}

impl Pick {
    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        Ok(match args.distribution {
            Distribution::Uniform => Pick::Uniform(
                rand::distr::Uniform::new(0, args.keys).context("--keys must be at least 1")?,
            ),
            Distribution::Zipf => Pick::Zipf(
                rand_distr::Zipf::new(args.keys as f64, args.zipf_exponent).map_err(|err| {
                    anyhow::anyhow!("bad --zipf-exponent {}: {err}", args.zipf_exponent)
                })?,
            ),
        })
    }

    fn key(&self, rng: &mut impl rand::Rng) -> usize {
        match self {
            Pick::Uniform(uniform) => rng.sample(uniform),
            // Ranks run from 1; rank 1 is the most frequent key.
            Pick::Zipf(zipf) => (rng.sample(zipf) as usize).saturating_sub(1),
        }
    }
}

const REDIS_KEY_PREFIX: &str = "cachegw-bench:";

/// One measured series: a target (and namespace), its connections, its work.
type Lane = (Target, Option<String>, Vec<Driver>, Arc<Workload>);

impl Driver {
    async fn call(&mut self, work: &Workload, keys: &[usize], set: bool) -> anyhow::Result<Answer> {
        let key = keys[0];
        match self {
            Driver::Gateway(client) if work.op == Mix::Mget => {
                let response = client
                    .m_get(MGetRequest {
                        items: keys
                            .iter()
                            .map(|key| GetRequest {
                                namespace: work.namespace.clone(),
                                key: format!("k{key}"),
                                ..Default::default()
                            })
                            .collect(),
                    })
                    .await?
                    .into_inner();
                let all_hits = response.results.len() == keys.len()
                    && response.results.iter().all(|result| {
                        matches!(
                            &result.result,
                            Some(m_get_result::Result::Response(found))
                                if found.outcome == Outcome::Hit as i32 && !found.degraded
                        )
                    });
                Ok(if all_hits {
                    Answer::Ok
                } else {
                    Answer::Degraded
                })
            }
            Driver::Redis(connection) if work.op == Mix::Mget => {
                let mut command = redis::cmd("MGET");
                for key in keys {
                    command.arg(format!("{REDIS_KEY_PREFIX}{key}"));
                }
                let values: Vec<Option<Bytes>> = command.query_async(connection).await?;
                Ok(if values.iter().all(Option::is_some) {
                    Answer::Ok
                } else {
                    Answer::Degraded
                })
            }
            Driver::Gateway(client) => {
                if set {
                    let response = client
                        .set(SetRequest {
                            namespace: work.namespace.clone(),
                            key: format!("k{key}"),
                            value: work.value.clone(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok(if response.stored {
                        Answer::Ok
                    } else {
                        Answer::Degraded
                    })
                } else {
                    let response = client
                        .get(GetRequest {
                            allow_stale: false,
                            lease: None,
                            namespace: work.namespace.clone(),
                            key: format!("k{key}"),
                            attributes: Default::default(),
                        })
                        .await?
                        .into_inner();
                    let hit = response.outcome == Outcome::Hit as i32;
                    Ok(if hit && !response.degraded {
                        Answer::Ok
                    } else {
                        Answer::Degraded
                    })
                }
            }
            Driver::Health(client) => {
                let response = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?
                    .into_inner();
                let serving = response.status == ServingStatus::Serving as i32;
                Ok(if serving {
                    Answer::Ok
                } else {
                    Answer::Degraded
                })
            }
            Driver::Redis(connection) => {
                let key = format!("{REDIS_KEY_PREFIX}{key}");
                if set {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(work.value.as_ref())
                        .arg("PX")
                        .arg(300_000)
                        .exec_async(connection)
                        .await?;
                    Ok(Answer::Ok)
                } else {
                    let value: Option<Bytes> =
                        redis::cmd("GET").arg(&key).query_async(connection).await?;
                    Ok(if value.is_some() {
                        Answer::Ok
                    } else {
                        Answer::Degraded
                    })
                }
            }
        }
    }
}

/// Runs the benchmark described by `args` and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<RoundResult>> {
    if args.concurrency == 0 || args.channels == 0 || args.keys == 0 || args.rounds == 0 {
        bail!("--concurrency, --channels, --keys and --rounds must be at least 1");
    }
    if args.set_percent > 100 {
        bail!("--set-percent must be between 0 and 100");
    }
    if args.namespace.is_empty() {
        bail!("--namespace needs at least one namespace");
    }
    if args.op == Mix::Mget && args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate must be a number of requests per second above 0, not {rate}");
    }
    let pick = Pick::new(&args)?;
    let workload = |namespace: &str| {
        Arc::new(Workload {
            op: args.op,
            set_percent: args.set_percent,
            keys: args.keys,
            pick,
            batch: if args.op == Mix::Mget { args.batch } else { 1 },
            namespace: namespace.to_owned(),
            value: Bytes::from(vec![b'v'; args.value_size]),
        })
    };
    let bearer = BearerToken::from_file_or_env(args.token_file.as_deref())?;
    let mut targets = args.target.clone();
    targets.dedup();
    // One "lane" per target and (for the gateway) per namespace; lanes
    // alternate round by round.
    let mut lanes: Vec<Lane> = Vec::new();
    for target in targets {
        match target {
            Target::Gateway => {
                for namespace in &args.namespace {
                    let drivers: Vec<Driver> = connect_gateway(&args)
                        .await?
                        .into_iter()
                        .map(|channel| {
                            Driver::Gateway(
                                CacheClient::with_interceptor(channel, bearer.clone())
                                    .max_decoding_message_size(64 * 1024 * 1024),
                            )
                        })
                        .collect();
                    let work = workload(namespace);
                    if !args.no_populate {
                        populate(&drivers[0], &work).await?;
                    }
                    lanes.push((target, Some(namespace.clone()), drivers, work));
                }
            }
            Target::Health => {
                let drivers = connect_gateway(&args)
                    .await?
                    .into_iter()
                    .map(|channel| Driver::Health(HealthClient::new(channel)))
                    .collect();
                lanes.push((target, None, drivers, workload("")));
            }
            Target::Redis => {
                let drivers = connect_redis(&args).await?;
                let work = workload("");
                if !args.no_populate {
                    populate(&drivers[0], &work).await?;
                }
                lanes.push((target, None, drivers, work));
            }
        }
    }
    let load = Load {
        concurrency: args.concurrency,
        rate: args.rate,
    };
    let mut results = Vec::new();
    for (turn, round) in (0..args.rounds as u64)
        .map(|round| args.seed.wrapping_add(round))
        .enumerate()
    {
        // Every other round the lanes go in reverse order (A B, then B A), so
        // that the machine's drift within a round lands on every lane alike.
        let mut order: Vec<&Lane> = lanes.iter().collect();
        if turn % 2 == 1 {
            order.reverse();
        }
        for (target, namespace, drivers, work) in order {
            // Every lane of a round draws the same keys; the warm-up and
            // each round draw keys of their own, so a round does not replay
            // the keys its warm-up (or the round before) just read.
            let run =
                |duration, phase| drive(drivers, work, load, duration, Draws::new(round, phase));
            let _ = run(args.warmup, Phase::Warmup).await;
            let before = args.gateway_pid.map(ThreadTimes::of).transpose()?;
            let measured = run(args.duration, Phase::Measured).await;
            let cpu = match (before, args.gateway_pid) {
                (Some(before), Some(pid)) => Some(ThreadTimes::of(pid)?.since(&before)),
                _ => None,
            };
            let mut result = measured.into_result(*target, &args);
            result.namespace = namespace.clone();
            result.gateway_cpu_us_per_request =
                cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / result.requests.max(1) as f64);
            results.push(result);
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&results)?)?;
    } else {
        out!("{}", render(&results))?;
    }
    Ok(results)
}

async fn connect_gateway(args: &BenchArgs) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..args.channels {
        let channel = Endpoint::from_shared(args.gateway.clone())
            .with_context(|| format!("bad --gateway address `{}`", args.gateway))?
            .connect()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", args.gateway))?;
        channels.push(channel);
    }
    Ok(channels)
}

async fn connect_redis(args: &BenchArgs) -> anyhow::Result<Vec<Driver>> {
    let client = redis::Client::open(args.redis.as_str())
        .with_context(|| format!("bad --redis URL `{}`", args.redis))?;
    let mut drivers = Vec::new();
    for _ in 0..args.channels {
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot reach Redis at {}", args.redis))?;
        drivers.push(Driver::Redis(connection));
    }
    Ok(drivers)
}

/// Writes every key once so that GETs hit.
async fn populate(driver: &Driver, work: &Workload) -> anyhow::Result<()> {
    match driver.clone() {
        Driver::Health(_) => {}
        Driver::Gateway(mut client) => {
            let keys: Vec<usize> = (0..work.keys).collect();
            for chunk in keys.chunks(500) {
                let items = chunk
                    .iter()
                    .map(|key| SetRequest {
                        namespace: work.namespace.clone(),
                        key: format!("k{key}"),
                        value: work.value.clone(),
                        ..Default::default()
                    })
                    .collect();
                let response = client.m_set(MSetRequest { items }).await?.into_inner();
                if response.results.iter().any(|result| {
                    !matches!(
                        &result.result,
                        Some(crate::api::proto::v1::m_set_result::Result::Response(r)) if r.stored
                    )
                }) {
                    bail!("the gateway did not store the benchmark keys (is its store up?)");
                }
            }
        }
        Driver::Redis(mut connection) => {
            let keys: Vec<usize> = (0..work.keys).collect();
            for chunk in keys.chunks(500) {
                let mut pipeline = redis::pipe();
                for key in chunk {
                    pipeline
                        .cmd("SET")
                        .arg(format!("{REDIS_KEY_PREFIX}{key}"))
                        .arg(work.value.as_ref())
                        .arg("PX")
                        .arg(600_000)
                        .ignore();
                }
                pipeline.exec_async(&mut connection).await?;
            }
        }
    }
    Ok(())
}

struct Measured {
    histogram: Histogram<u64>,
    errors: u64,
    degraded: u64,
    elapsed: Duration,
    first_error: Option<String>,
}

impl Measured {
    fn into_result(self, target: Target, args: &BenchArgs) -> RoundResult {
        if let Some(err) = &self.first_error {
            eprintln!("{target:?}: {} errors, first: {err}", self.errors);
        }
        let ms = |quantile: f64| self.histogram.value_at_quantile(quantile) as f64 / 1000.0;
        let requests = self.histogram.len();
        RoundResult {
            target,
            namespace: None,
            op: args.op,
            concurrency: args.concurrency,
            rate: args.rate,
            channels: args.channels,
            requests,
            errors: self.errors,
            degraded: self.degraded,
            ops_per_sec: requests as f64 / self.elapsed.as_secs_f64(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            gateway_cpu_us_per_request: None,
        }
    }
}

/// How long each thread of a local process has run so far, by thread id.
struct ThreadTimes(std::collections::HashMap<u32, u64>);

impl ThreadTimes {
    /// Reads /proc/PID/task/*/schedstat, whose first field is the thread's
    /// time on a CPU in nanoseconds.
    fn of(pid: u32) -> anyhow::Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let tasks = std::fs::read_dir(&dir).with_context(|| {
            format!("--gateway-pid {pid}: cannot read {dir} (is it a process on this machine?)")
        })?;
        let mut times = std::collections::HashMap::new();
        for task in tasks {
            let task = task.with_context(|| format!("reading {dir}"))?;
            let Some(tid) = task.file_name().to_str().and_then(|name| name.parse().ok()) else {
                continue;
            };
            // A thread that ended since the directory was listed has no file.
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            let ns = text
                .split_whitespace()
                .next()
                .and_then(|field| field.parse().ok())
                .with_context(|| format!("{dir}/{tid}/schedstat: unexpected contents {text:?}"))?;
            times.insert(tid, ns);
        }
        Ok(Self(times))
    }

    /// The run time since `earlier`: what every thread alive now ran since
    /// then (a thread started since counts whole; one that ended since is
    /// lost, which a long-lived server's threads rarely do).
    fn since(&self, earlier: &Self) -> Duration {
        let ns = self
            .0
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        Duration::from_nanos(ns)
    }
}

/// Which stretch of a run a key sequence is for.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Warmup,
    Measured,
}

/// The key sequences of one stretch of a run: deterministic, the same for
/// every lane of a round (so targets and namespaces read the same keys),
/// different between stretches and between a stretch's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Draws(u64);

impl Draws {
    fn new(round: u64, phase: Phase) -> Self {
        Self(
            round
                .wrapping_mul(2)
                .wrapping_add(matches!(phase, Phase::Measured) as u64),
        )
    }

    /// The random source of `worker`'s requests.
    fn rng(self, worker: usize) -> StdRng {
        StdRng::seed_from_u64(
            0x9E37_79B9_7F4A_7C15
                ^ (worker as u64 + 1)
                ^ self.0.wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }
}

/// How requests leave: `concurrency` workers, back to back or on a schedule.
#[derive(Debug, Clone, Copy)]
struct Load {
    concurrency: usize,
    /// Requests per second in all, open loop; `None`: closed loop.
    rate: Option<f64>,
}

impl Load {
    /// When `worker`'s requests are due on the open-loop schedule: its first,
    /// then every `interval`. The workers' turns interleave, so together they
    /// send one request every `1 / rate`.
    fn schedule(&self, worker: usize, started: Instant) -> Option<(Instant, Duration)> {
        self.rate.map(|rate| {
            let gap = Duration::from_secs_f64(1.0 / rate);
            (started + gap * worker as u32, gap * self.concurrency as u32)
        })
    }
}

/// Sends requests for `duration` from `load.concurrency` workers spread
/// round-robin over `drivers`, and records each request's latency in
/// microseconds: from when it was sent (closed loop), or from when it was due
/// if it left late (open loop).
async fn drive(
    drivers: &[Driver],
    work: &Arc<Workload>,
    load: Load,
    duration: Duration,
    draws: Draws,
) -> Measured {
    let started = Instant::now();
    let stop = started + duration;
    let mut tasks = Vec::with_capacity(load.concurrency);
    for worker in 0..load.concurrency {
        let mut schedule = load.schedule(worker, started);
        let mut driver = drivers[worker % drivers.len()].clone();
        let work = Arc::clone(work);
        tasks.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut errors, mut degraded, mut first_error) = (0, 0, None);
            let mut rng = draws.rng(worker);
            let mut keys = vec![0; work.batch];
            loop {
                // Open loop: wait for this worker's turn. A worker that is
                // behind (its last answer came after this request was due)
                // counts from when it was due; one that slept counts from
                // when the timer woke it, whose lateness is the sender's.
                let due = match &mut schedule {
                    None => None,
                    Some((next, interval)) => {
                        let due = *next;
                        *next += *interval;
                        if due >= stop {
                            break;
                        }
                        if Instant::now() < due {
                            tokio::time::sleep_until(due.into()).await;
                            None
                        } else {
                            Some(due)
                        }
                    }
                };
                if due.is_none() && Instant::now() >= stop {
                    break;
                }
                for key in &mut keys {
                    *key = work.pick.key(&mut rng);
                }
                let set = match work.op {
                    Mix::Get | Mix::Mget => false,
                    Mix::Set => true,
                    Mix::Mixed => rng.random_range(0..100) < work.set_percent,
                };
                let begun = due.unwrap_or_else(Instant::now);
                match driver.call(&work, &keys, set).await {
                    Ok(answer) => {
                        let micros = begun.elapsed().as_micros().max(1) as u64;
                        histogram.saturating_record(micros);
                        if matches!(answer, Answer::Degraded) {
                            degraded += 1;
                        }
                    }
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{err:#}"));
                    }
                }
            }
            (histogram, errors, degraded, first_error)
        }));
    }
    let mut total = Measured {
        histogram: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        errors: 0,
        degraded: 0,
        elapsed: Duration::ZERO,
        first_error: None,
    };
    for task in tasks {
        if let Ok((histogram, errors, degraded, first_error)) = task.await {
            let _ = total.histogram.add(histogram);
            total.errors += errors;
            total.degraded += degraded;
            if total.first_error.is_none() {
                total.first_error = first_error;
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

fn label(result: &RoundResult) -> String {
    let target = format!("{:?}", result.target).to_lowercase();
    match &result.namespace {
        Some(namespace) => format!("{target}({namespace})"),
        None => target,
    }
}

fn render(results: &[RoundResult]) -> String {
    let mut out = String::new();
    if let Some(rate) = results.first().and_then(|r| r.rate) {
        let _ = writeln!(
            out,
            "open loop: {rate} requests/s scheduled; a request sent late counts from when it was due"
        );
    }
    let cpu = results
        .iter()
        .any(|r| r.gateway_cpu_us_per_request.is_some());
    let _ = writeln!(
        out,
        "{:<8} {:<6} {:>5} {:>5} {:>10} {:>12} {:>8} {:>8} {:>8} {:>7} {:>8}{}",
        "target",
        "op",
        "conc",
        "chans",
        "requests",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "errors",
        "degraded",
        if cpu { " gateway CPU µs/req" } else { "" }
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:>5} {:>5} {:>10} {:>12.0} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>8}{}",
            label(r),
            format!("{:?}", r.op).to_lowercase(),
            r.concurrency,
            r.channels,
            r.requests,
            r.ops_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.errors,
            r.degraded,
            r.gateway_cpu_us_per_request
                .map(|us| format!(" {us:>18.2}"))
                .unwrap_or_default()
        );
    }
    let mean_of = |wanted: &dyn Fn(&RoundResult) -> bool| {
        let rounds: Vec<f64> = results
            .iter()
            .filter(|r| wanted(r))
            .map(|r| r.ops_per_sec)
            .collect();
        (!rounds.is_empty()).then(|| rounds.iter().sum::<f64>() / rounds.len() as f64)
    };
    let mean = |target: Target| mean_of(&|r: &RoundResult| r.target == target);
    let namespaces: Vec<&String> = {
        let mut seen = Vec::new();
        for r in results {
            if let Some(ns) = &r.namespace
                && !seen.contains(&ns)
            {
                seen.push(ns);
            }
        }
        seen
    };
    if let Some((first, rest)) = namespaces.split_first() {
        let of = |namespace: &String| -> Vec<&RoundResult> {
            results
                .iter()
                .filter(|r| r.namespace.as_ref() == Some(namespace))
                .collect()
        };
        let base = mean_of(&|r: &RoundResult| r.namespace.as_ref() == Some(*first));
        for other in rest {
            let this = mean_of(&|r: &RoundResult| r.namespace.as_ref() == Some(*other));
            if let (Some(base), Some(this)) = (base, this) {
                let _ = writeln!(
                    out,
                    "gateway({other})/gateway({first}) throughput ratio: {:.3} ({this:.0} vs {base:.0} ops/s, mean over rounds)",
                    this / base
                );
            }
            // Round by round: both sides of a pair ran within moments of
            // each other, so a burst of the machine's noise lands in few pairs.
            let pairs: Vec<(&RoundResult, &RoundResult)> =
                of(other).into_iter().zip(of(first)).collect();
            if pairs.len() >= 3 {
                let rates = Spread::of(
                    pairs
                        .iter()
                        .map(|(this, base)| this.ops_per_sec / base.ops_per_sec),
                );
                let _ = write!(
                    out,
                    "  per round, median (interquartile range) of {} rounds: throughput {rates}",
                    pairs.len()
                );
                let cpus: Option<Vec<f64>> = pairs
                    .iter()
                    .map(|(this, base)| {
                        Some(this.gateway_cpu_us_per_request? / base.gateway_cpu_us_per_request?)
                    })
                    .collect();
                if let Some(cpus) = cpus {
                    let _ = write!(out, ", gateway CPU per request {}", Spread::of(cpus));
                }
                let _ = writeln!(out);
            }
        }
    }
    if namespaces.len() > 1 {
        return out;
    }
    if let Some(gateway) = mean(Target::Gateway) {
        for (other, name) in [(Target::Redis, "redis"), (Target::Health, "health")] {
            if let Some(baseline) = mean(other) {
                let _ = writeln!(
                    out,
                    "gateway/{name} throughput ratio: {:.2} ({gateway:.0} vs {baseline:.0} ops/s, mean over rounds)",
                    gateway / baseline,
                );
            }
        }
    }
    out
}

/// The median and quartiles of a few ratios.
struct Spread {
    low: f64,
    median: f64,
    high: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            // Linear interpolation between the closest ranks.
            let rank = q * (values.len() - 1) as f64;
            let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
            values[below] + (values[above] - values[below]) * (rank - below as f64)
        };
        Self {
            low: at(0.25),
            median: at(0.5),
            high: at(0.75),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} ({:.3}-{:.3})", self.median, self.low, self.high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_keys(draws: Draws, worker: usize) -> Vec<u32> {
        let mut rng = draws.rng(worker);
        (0..32).map(|_| rng.random()).collect()
    }

    #[test]
    fn lanes_of_a_round_share_keys_and_stretches_do_not() {
        let measured = Draws::new(3, Phase::Measured);
        assert_eq!(
            first_keys(measured, 5),
            first_keys(Draws::new(3, Phase::Measured), 5)
        );
        for other in [
            Draws::new(3, Phase::Warmup),
            Draws::new(2, Phase::Measured),
            Draws::new(4, Phase::Warmup),
        ] {
            assert_ne!(other, measured);
            assert_ne!(first_keys(other, 5), first_keys(measured, 5), "{other:?}");
        }
        assert_ne!(first_keys(measured, 5), first_keys(measured, 6));
    }

    #[test]
    fn a_spread_is_the_median_and_the_quartiles() {
        let spread = Spread::of([5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((spread.low, spread.median, spread.high), (2.0, 3.0, 4.0));
        let spread = Spread::of([1.0, 2.0, 3.0, 4.0]);
        assert_eq!((spread.low, spread.median, spread.high), (1.75, 2.5, 3.25));
        assert_eq!(Spread::of([0.97]).to_string(), "0.970 (0.970-0.970)");
    }

    #[test]
    fn thread_times_count_the_work_done_between_two_readings() {
        let pid = std::process::id();
        let before = ThreadTimes::of(pid).unwrap();
        assert_eq!(before.since(&before), Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut spun = 0u64;
        loop {
            // Work, then look: the reading must grow with the work done.
            for i in 0..100_000u64 {
                spun = std::hint::black_box(spun.wrapping_mul(31).wrapping_add(i));
            }
            if ThreadTimes::of(pid).unwrap().since(&before) >= Duration::from_millis(20) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "20 ms of work never showed in schedstat"
            );
        }
        let error = ThreadTimes::of(u32::MAX).err().unwrap().to_string();
        assert!(error.contains("--gateway-pid"), "{error}");
    }
}
