//! Tooling for policy authors, behind `cachegw policy check|eval|bench`: load
//! a module exactly as the gateway does and show what it decides.

use std::{collections::HashMap, path::Path, sync::Arc, time::Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{
    Decision, DecisionLimits, DecisionRequest, Fault, Operation, PolicyEngine, PolicyModule,
    engine::config_bytes,
    memo::{DecisionMemo, MemoKey, MemoStats, Reuse},
    module_name,
};
use crate::{
    api::proto::policy as pb,
    cache::NamespaceSettings,
    config::{NamespaceConfig, PolicyEngineConfig},
};

/// Why a tool could not even look at the module.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The module could not be loaded.
    #[error("cannot load {path}: {source}")]
    Load {
        /// The path.
        path: String,
        /// Why.
        source: super::LoadError,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

/// What `cachegw policy bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// A fresh instance per call, as the gateway calls a policy.
    Fresh,
    /// One instance for every call (no isolation: a lower bound).
    ReusedInstance,
    /// A decision the memo answers: key, look-up, copy.
    Memo,
}

/// One request to decide on.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The operation.
    pub op: pb::Operation,
    /// The namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// Attributes.
    pub attributes: HashMap<String, String>,
    /// Value size (Set).
    pub value_size: u64,
}

/// A fault, for JSON.
#[derive(Debug, Clone, Serialize)]
pub struct FaultView {
    /// The fault kind (`trap`, `timeout`, `memory`, `abi`, ...).
    pub kind: &'static str,
    /// What happened.
    pub message: String,
}

impl From<&Fault> for FaultView {
    fn from(fault: &Fault) -> Self {
        Self {
            kind: fault.kind(),
            message: fault.to_string(),
        }
    }
}

/// What a policy decided, as it said it (before the gateway's defaults).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionView {
    /// The storage key (the gateway prefixes it with the namespace).
    pub storage_key: String,
    /// Fresh TTL; absent: the namespace default.
    pub fresh_ttl_ms: Option<u64>,
    /// Stale window.
    pub stale_window_ms: u64,
    /// TTL jitter.
    pub ttl_jitter_ms: u64,
    /// Tags.
    pub tags: Vec<String>,
    /// Bypass the cache.
    pub bypass: bool,
    /// Compression hint.
    pub compression: String,
    /// Keys to invalidate.
    pub invalidate_keys: Vec<String>,
    /// Patterns to invalidate.
    pub invalidate_patterns: Vec<String>,
    /// Tags to invalidate.
    pub invalidate_tags: Vec<String>,
    /// XFetch beta.
    pub early_refresh_beta: f64,
    /// Near-cache (L1) TTL in ms (0: not eligible).
    pub near_cache_ttl_ms: u64,
}

impl From<&pb::PolicyDecision> for DecisionView {
    fn from(wire: &pb::PolicyDecision) -> Self {
        let invalidate = wire.invalidate.clone().unwrap_or_default();
        Self {
            storage_key: wire.storage_key.clone(),
            fresh_ttl_ms: wire.fresh_ttl_ms,
            stale_window_ms: wire.stale_window_ms,
            ttl_jitter_ms: wire.ttl_jitter_ms,
            tags: wire.tags.clone(),
            bypass: wire.bypass,
            compression: pb::CompressionHint::try_from(wire.compression).map_or_else(
                |_| format!("unknown({})", wire.compression),
                |hint| {
                    hint.as_str_name()
                        .trim_start_matches("COMPRESSION_HINT_")
                        .to_ascii_lowercase()
                },
            ),
            invalidate_keys: invalidate.keys,
            invalidate_patterns: invalidate.patterns,
            invalidate_tags: invalidate.tags,
            early_refresh_beta: wire.early_refresh_beta,
            near_cache_ttl_ms: wire.near_cache_ttl_ms,
        }
    }
}

/// The result of deciding one probe.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The operation.
    pub op: &'static str,
    /// The namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// The decision, if the policy made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionView>,
    /// The fault, if the call or the validation failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultView>,
    /// Microseconds the call took, instantiation included.
    pub micros: u64,
}

/// The report of `cachegw policy check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The module's name.
    pub policy: String,
    /// Its content version.
    pub version: String,
    /// Its size.
    pub bytes: usize,
    /// Whether it implements the ABI, or why not.
    pub abi: String,
    /// Whether it exports `cachegw_init`.
    pub has_init: bool,
    /// What init said about the config.
    pub config: String,
    /// Whether a binding's calls would start from an image pre-initialised
    /// with the config (`policy.preinit`), or why not.
    pub preinit: String,
    /// Whether a binding's calls run in recycled instances
    /// (`policy.recycle_instances`: kept, and put back to a new instance's
    /// state after each call), or why not.
    pub recycled: String,
    /// The dry run.
    pub probes: Vec<ProbeReport>,
    /// Everything passed.
    pub ok: bool,
}

/// A module loaded for the tools, with a namespace to validate decisions in.
pub struct Loaded {
    module: PolicyModule,
    /// The module pre-initialised with the config, as a binding's calls
    /// instantiate it (`policy.preinit`), or why there is none.
    image: Result<PolicyModule, String>,
    namespace: NamespaceSettings,
    limits: DecisionLimits,
    config: bytes::Bytes,
}

impl Loaded {
    /// Loads `path` with the engine limits of `engine` and the JSON `config`.
    pub fn new(
        path: &Path,
        config: Option<&serde_json::Value>,
        engine: &PolicyEngineConfig,
        max_key_bytes: usize,
    ) -> Result<Self, ToolError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ToolError::Read {
            path: display.clone(),
            source,
        })?;
        let engine_instance =
            Arc::new(PolicyEngine::new(engine).map_err(|source| ToolError::Load {
                path: display.clone(),
                source,
            })?);
        let module = engine_instance
            .load(&module_name(path), &bytes)
            .map_err(|source| ToolError::Load {
                path: display,
                source,
            })?;
        let config = config_bytes(config);
        let image = if engine.preinit {
            module
                .preinitialized(&config)
                .map_err(|err| format!("not possible: {err}"))
        } else {
            Err("off (policy.preinit = false)".to_owned())
        };
        Ok(Self {
            module,
            image,
            namespace: NamespaceSettings::new("tool", &NamespaceConfig::default()),
            limits: DecisionLimits {
                max_key_bytes,
                max_ttl: engine.max_ttl,
                max_items: engine.max_decision_items,
            },
            config,
        })
    }

    /// The loaded module.
    pub fn module(&self) -> &PolicyModule {
        &self.module
    }

    /// What a binding's calls instantiate: the pre-initialised image, or the
    /// module.
    fn callee(&self) -> &PolicyModule {
        self.image.as_ref().unwrap_or(&self.module)
    }

    fn input(&self, probe: &Probe) -> pb::PolicyInput {
        pb::PolicyInput {
            op: probe.op as i32,
            namespace: probe.namespace.clone(),
            key: probe.key.clone(),
            attributes: probe.attributes.clone(),
            value_size: probe.value_size,
            now_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config: self.config.clone(),
        }
    }

    /// Decides on `probe` and validates the decision as the gateway would.
    pub fn eval(&self, probe: &Probe) -> ProbeReport {
        let started = Instant::now();
        let outcome = self.callee().decide_blocking(&self.input(probe));
        let micros = started.elapsed().as_micros() as u64;
        let (decision, fault) = match &outcome {
            Ok(wire) => {
                let valid = Decision::from_wire(
                    wire.clone(),
                    &self.namespace,
                    &self.limits,
                    self.module.decided_by(),
                );
                (
                    Some(DecisionView::from(wire)),
                    valid.err().map(|f| FaultView::from(&f)),
                )
            }
            Err(fault) => (None, Some(FaultView::from(fault))),
        };
        ProbeReport {
            op: match probe.op {
                pb::Operation::Get => "get",
                pb::Operation::Set => "set",
                pb::Operation::Delete => "delete",
                pb::Operation::Unspecified => "unspecified",
            },
            namespace: probe.namespace.clone(),
            key: probe.key.clone(),
            decision,
            fault,
            micros,
        }
    }

    /// Validates the module: ABI, init on the config, and a dry run of a Get,
    /// a Set and a Delete.
    pub fn check(&self) -> CheckReport {
        let abi = self.module.abi();
        let config = match self.module.init(&self.config) {
            _ if abi.is_err() => "not checked (the module does not implement the ABI)".to_owned(),
            Ok(None) if self.module.has_init() => "accepted by cachegw_init".to_owned(),
            Ok(None) => "not checked (no cachegw_init export)".to_owned(),
            Ok(Some(reason)) => format!("rejected: {reason}"),
            Err(fault) => format!("cachegw_init {fault}"),
        };
        let config_ok = !config.starts_with("rejected") && !config.starts_with("cachegw_init ");
        let probes: Vec<ProbeReport> = [
            (pb::Operation::Get, 0),
            (pb::Operation::Set, 128),
            (pb::Operation::Delete, 0),
        ]
        .into_iter()
        .map(|(op, value_size)| {
            self.eval(&Probe {
                op,
                namespace: "cachegw-check".into(),
                key: "cachegw-check:probe".into(),
                attributes: HashMap::new(),
                value_size,
            })
        })
        .collect();
        let ok = abi.is_ok() && config_ok && probes.iter().all(|probe| probe.fault.is_none());
        let callee = self.callee();
        let recycled = match callee.not_recycled() {
            Some(reason) => format!("no: {reason}"),
            None if callee.idle_instances() > 0 => format!(
                "yes: each call runs in a kept instance, put back to a new one's state after it \
                 (the pages it wrote known from {})",
                callee.written_pages_from().unwrap_or("PAGEMAP_SCAN")
            ),
            None => "no: its probe calls faulted or grew its memory, and such a call drops its \
                     instance"
                .to_owned(),
        };
        CheckReport {
            policy: self.module.name().to_owned(),
            version: self.module.version().to_owned(),
            bytes: self.module.size(),
            abi: abi.map_or_else(|fault| fault.to_string(), |()| "ok (version 1)".to_owned()),
            has_init: self.module.has_init(),
            config,
            preinit: match &self.image {
                Ok(image) => image.preinit().map_or_else(String::new, |preinit| {
                    format!(
                        "an image of {} bytes, made in {} ms",
                        preinit.image_bytes,
                        preinit.took.as_millis()
                    )
                }),
                Err(reason) => reason.clone(),
            },
            recycled,
            probes,
            ok,
        }
    }

    /// Runs `calls` decisions on `probe` and summarises latency and memory.
    pub fn bench(
        &self,
        probe: &Probe,
        calls: u64,
        mode: BenchMode,
    ) -> Result<BenchReport, ToolError> {
        let rss_before = resident_kib();
        let cpu_before = process_cpu();
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        let started = Instant::now();
        let mut faults: HashMap<&'static str, u64> = HashMap::new();
        let mut record = |elapsed: std::time::Duration, fault: Option<Fault>| {
            histogram.saturating_record((elapsed.as_nanos() as u64).max(1));
            if let Some(fault) = fault {
                *faults.entry(fault.kind()).or_default() += 1;
            }
        };
        let cannot =
            |fault: Fault| ToolError::Usage(format!("the policy cannot be called: {fault}"));
        match mode {
            BenchMode::Fresh | BenchMode::ReusedInstance => self
                .callee()
                .measure(
                    &self.input(probe),
                    calls,
                    mode == BenchMode::ReusedInstance,
                    record,
                )
                .map_err(cannot)?,
            BenchMode::Memo => {
                // What `Decider::ask` does on a memo hit: the key, the look-up,
                // the decision's copy.
                let input = self.input(probe);
                let wire = self.callee().decide_blocking(&input).map_err(cannot)?;
                let reuse = Reuse::of(wire.reuse.as_ref(), input.value_size);
                if reuse == Reuse::Never {
                    return Err(ToolError::Usage(
                        "this decision is never reused: the module predates decision reuse, or \
                         it read the clock or the value size without promising how long it holds"
                            .into(),
                    ));
                }
                let decision = Decision::from_wire(
                    wire,
                    &self.namespace,
                    &self.limits,
                    self.module.decided_by(),
                )
                .map_err(cannot)?;
                let memo = DecisionMemo::new(1 << 20);
                let stats = memo.series(self.module.label(), "", MemoStats::default);
                let attributes = probe.attributes.clone();
                let op = match probe.op {
                    pb::Operation::Set => Operation::Set,
                    pb::Operation::Delete => Operation::Delete,
                    _ => Operation::Get,
                };
                let key = MemoKey::new(1, op, &probe.namespace, &probe.key, &attributes);
                memo.put(key, &decision, reuse, input.now_unix_ms, &stats);
                // Recalled as the gateway recalls: from the request's fields,
                // through this thread's front.
                let request = DecisionRequest {
                    op,
                    namespace: &probe.namespace,
                    key: &probe.key,
                    attributes: &attributes,
                    value_size: input.value_size as usize,
                };
                for _ in 0..calls {
                    let started = Instant::now();
                    let hit = memo.recall(1, &request, || input.now_unix_ms);
                    let elapsed = started.elapsed();
                    std::hint::black_box(&hit);
                    record(
                        elapsed,
                        hit.is_err().then(|| Fault::Output("memo miss".into())),
                    );
                }
            }
        }
        let elapsed = started.elapsed();
        let cpu = process_cpu().saturating_sub(cpu_before);
        let rss_after = resident_kib();
        let micros = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        Ok(BenchReport {
            policy: self.module.label().to_string(),
            mode: match mode {
                BenchMode::Fresh => "fresh",
                BenchMode::ReusedInstance => "reuse",
                BenchMode::Memo => "memo",
            },
            preinit: self.image.is_ok(),
            recycled: mode == BenchMode::Fresh && self.callee().recycles(),
            written_pages_from: (mode == BenchMode::Fresh)
                .then(|| self.callee().written_pages_from())
                .flatten(),
            calls,
            calls_per_sec: calls as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            mean_us: histogram.mean() / 1000.0,
            p50_us: micros(0.5),
            p99_us: micros(0.99),
            p999_us: micros(0.999),
            cpu_us_per_call: cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
            rss_before_kib: rss_before,
            rss_after_kib: rss_after,
            faults,
        })
    }
}

/// The report of `cachegw policy bench`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `name@version`.
    pub policy: String,
    /// `fresh` (an instance per call, as served) or `reuse` (one instance).
    pub mode: &'static str,
    /// Whether calls instantiated an image pre-initialised with the config
    /// (`policy.preinit`; `check` says why not).
    pub preinit: bool,
    /// Whether calls ran in recycled instances (`fresh` mode with
    /// `policy.recycle_instances`; `check` says why not).
    pub recycled: bool,
    /// How their resets found the pages a call wrote (`write faults`,
    /// `policy.track_writes`, or `PAGEMAP_SCAN`); null when not recycled.
    pub written_pages_from: Option<&'static str>,
    /// Calls made.
    pub calls: u64,
    /// Throughput of one thread.
    pub calls_per_sec: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// This process's CPU time (user and system, every thread) over the
    /// run, per call, µs: what the gateway's `perf stat -e task-clock`
    /// would charge the calls, resetting the instances' memory included.
    pub cpu_us_per_call: f64,
    /// Resident memory before, KiB (Linux).
    pub rss_before_kib: Option<u64>,
    /// Resident memory after, KiB (Linux).
    pub rss_after_kib: Option<u64>,
    /// Calls that faulted, by kind (they are timed too).
    pub faults: HashMap<&'static str, u64>,
}

/// CPU time this process has used (every thread, user and system).
fn process_cpu() -> std::time::Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// This process's resident set size, from /proc (Linux only).
pub fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Parses `--op`.
pub fn parse_op(op: &str) -> Result<pb::Operation, ToolError> {
    match op.to_ascii_lowercase().as_str() {
        "get" => Ok(pb::Operation::Get),
        "set" => Ok(pb::Operation::Set),
        "delete" | "del" => Ok(pb::Operation::Delete),
        other => Err(ToolError::Usage(format!(
            "unknown --op `{other}`: expected get, set or delete"
        ))),
    }
}

/// Parses `--attr k=v` values.
pub fn parse_attrs(pairs: &[String]) -> Result<HashMap<String, String>, ToolError> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ToolError::Usage(format!("--attr `{pair}` is not NAME=VALUE")))
        })
        .collect()
}

/// Parses `--config` (inline JSON, or `@FILE`).
pub fn parse_config(config: Option<&str>) -> Result<Option<serde_json::Value>, ToolError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let text = match config.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|source| ToolError::Read {
            path: path.to_owned(),
            source,
        })?,
        None => config.to_owned(),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|err| ToolError::Usage(format!("--config is not JSON: {err}")))
}
