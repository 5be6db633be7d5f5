//! The WebAssembly engine: one wasmtime `Engine` for the process, modules
//! compiled once and checked against the ABI (docs/POLICY_ABI.md), and every
//! request's calls run in a fresh instance (the items of one batch request
//! share one: [`PolicyModule::decide_reusing`]),
//! each call under a CPU-time deadline and a memory cap, with no capability
//! but a bounded log call.
//!
//! Calls run on wasmtime fibers (`call_async`), so a long call never holds a
//! request worker: at every epoch tick (1 ms) the deadline callback charges
//! the call the CPU time it actually ran ([`CpuMeter`]) and cuts it off past
//! `policy.deadline` of CPU (or `policy.wall_deadline` of wall time). A call
//! that has run [`LONG_CALL`] of CPU is a long call: it yields to the runtime
//! at every tick, which resumes it only once the worker has served every
//! other ready task, and it goes on only with one of its binding's long-call
//! permits (`policy.max_concurrent_calls`); while they are all held, the
//! binding's new calls wait for one before they start. So what one
//! namespace's slow or looping policy can take from the others is that many
//! cores, at the lowest priority. A decision that takes microseconds reaches
//! no tick, holds no permit and pays for none of this but a monotonic clock
//! read per poll and an atomic load.
//!
//! A binding's calls may start from a pre-initialised image of its module
//! instead of the module itself ([`preinit`]): still a fresh instance per
//! call, under the same limits. "Fresh" is a state, not an allocation: a
//! call may run in a recycled instance ([`recycle`]), one kept from an
//! earlier call and put back to exactly the state a new instance starts in.

mod input;
mod preinit;
mod recycle;
mod write_watch;

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Level, debug, error, info, trace, warn};
use wasmtime::{
    Caller, Config, Enabled, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker,
    Memory, Module, ModuleExport, PoolingAllocationConfig, ResourceLimiter, Store, StoreContextMut,
    Trap, TypedFunc, UpdateDeadline, ValType,
};

pub use self::input::{BorrowedInput, CallInput};
pub use self::preinit::{InputBuffer, Preinit, PreinitError};
use self::recycle::{IdleBudget, Recyclable, Recycler};
use crate::{api::proto::policy as pb, config::PolicyEngineConfig};

/// The ABI version this gateway speaks.
pub const ABI_VERSION: i32 = 1;

/// How often the engine's epoch advances: the resolution of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Table bytes reset with memset rather than madvise (policy tables are tiny;
/// madvise means a TLB shootdown across the gateway's threads).
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// Longest message a policy may log; the rest is cut.
const MAX_LOG_BYTES: usize = 1024;

/// Why a policy call did not produce a decision. Each kind is counted
/// separately; all of them make the binding's fallback apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The policy trapped (panic, unreachable, out-of-bounds access...).
    Trap(String),
    /// The call ran past its deadline.
    Timeout,
    /// The policy tried to grow its memory past the cap.
    Memory,
    /// The module does not implement the ABI (version, exports, imports).
    Abi(String),
    /// The output could not be read or decoded.
    Output(String),
    /// The policy declined to decide (it returned an error).
    Declined(String),
    /// The decision violates the contract (empty key, absurd TTL...).
    Invalid(String),
    /// No instance could be created (all pool slots busy).
    Capacity(String),
    /// No long-call permit of its binding (`policy.max_concurrent_calls`)
    /// came free within the call's wall deadline.
    Busy,
}

impl Fault {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Timeout => "timeout",
            Fault::Memory => "memory",
            Fault::Abi(_) => "abi",
            Fault::Output(_) => "output",
            Fault::Declined(_) => "declined",
            Fault::Invalid(_) => "invalid",
            Fault::Capacity(_) => "capacity",
            Fault::Busy => "busy",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Trap(reason) => write!(f, "trapped: {reason}"),
            Fault::Timeout => f.write_str("ran past its deadline"),
            Fault::Memory => f.write_str("tried to grow its memory past the cap"),
            Fault::Abi(reason) => write!(f, "does not implement the policy ABI: {reason}"),
            Fault::Output(reason) => write!(f, "returned unreadable output: {reason}"),
            Fault::Declined(reason) => write!(f, "declined to decide: {reason}"),
            Fault::Invalid(reason) => write!(f, "returned an invalid decision: {reason}"),
            Fault::Capacity(reason) => write!(f, "could not be instantiated: {reason}"),
            Fault::Busy => f.write_str(
                "waited its wall deadline for one of its binding's long-call permits \
                 (policy.max_concurrent_calls)",
            ),
        }
    }
}

/// Why a module could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Larger than `policy.max_module_bytes`.
    #[error("module is {size} bytes, over the limit of {limit} bytes (policy.max_module_bytes)")]
    TooLarge {
        /// The module's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a valid WebAssembly module, or one wasmtime cannot compile.
    #[error("not a valid WebAssembly module: {0}")]
    Compile(String),
    /// Imports something other than `cachegw.log`.
    #[error("{0}")]
    Imports(String),
}

/// The process-wide policy engine.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<HostState>,
    limits: PolicyEngineConfig,
    wall_deadline: Duration,
    ticker_stop: Arc<AtomicBool>,
    /// Whether calls recycle instances (`policy.recycle_instances`, and the
    /// kernel can say which pages a call wrote).
    recycling: bool,
    /// Whether recycled instances learn their written pages from
    /// write-protection faults (`policy.track_writes`, where available).
    track_writes: bool,
    /// Pool slots kept instances may hold, across modules.
    idle: Arc<IdleBudget>,
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl PolicyEngine {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(limits: &PolicyEngineConfig) -> Result<Self, LoadError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(limits.max_instances)
            .total_memories(limits.max_instances)
            .total_tables(limits.max_instances)
            .total_component_instances(0)
            // One fiber stack per call in flight (`call_async`).
            .total_stacks(limits.max_instances)
            .max_memory_size(limits.memory_limit_bytes);
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            // Reset a used memory by rewriting only the pages the call dirtied
            // (found with PAGEMAP_SCAN, Linux 6.7+) instead of unmapping it:
            // 25 -> 16 us per fresh instance (docs/BENCHMARKS.md). Without
            // PAGEMAP_SCAN this would memset the whole memory, so it stays off.
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(limits.memory_limit_bytes)
                .table_keep_resident(TABLE_KEEP_RESIDENT);
        }
        let mut config = Config::new();
        // Every decision instantiates and later resets a pooled slot, so what
        // matters is that neither step makes a system call. With guard pages
        // or signal-based traps, wasmtime re-protects the pages a call grew
        // its memory into (mprotect, then a TLB shootdown across the gateway's
        // threads) on every reuse; with explicit bounds checks it does not.
        // Measured: 25 -> 7 us per decision (docs/BENCHMARKS.md).
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(limits.memory_limit_bytes as u64)
            .memory_reservation_for_growth(0)
            .memory_guard_size(0)
            .guard_before_linear_memory(false)
            .signals_based_traps(false)
            .memory_init_cow(true);
        if limits.perf_map {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Some(dir) = &limits.compile_cache_dir {
            // wasmtime's own cache: keyed by the engine's compatibility hash and
            // the module's, written atomically, safe to share between processes.
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            match wasmtime::Cache::new(cache) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(err) => {
                    warn!(dir = %dir.display(), cause = %err, "compiled-policy cache is off")
                }
            }
        }
        let engine = Engine::new(&config).map_err(|err| LoadError::Compile(format!("{err:#}")))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap("cachegw", "log", host_log)
            .map_err(|err| LoadError::Compile(format!("{err:#}")))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stop = Arc::clone(&ticker_stop);
        thread::Builder::new()
            .name("cachegw-policy-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|err| LoadError::Compile(format!("cannot start the epoch ticker: {err}")))?;

        let recycling = limits.recycle_instances && recycle::available();
        if limits.recycle_instances && !recycling {
            warn!(
                "policy.recycle_instances is on, but this kernel does not answer PAGEMAP_SCAN \
                 (Linux 6.7+): every call instantiates its module"
            );
        }
        let track_writes = recycling
            && limits.track_writes
            && match write_watch::available() {
                Ok(()) => true,
                Err(reason) => {
                    warn!(
                        %reason,
                        "policy.track_writes is on, but write-protection faults cannot be had \
                         here: recycled instances are reset through PAGEMAP_SCAN after every call"
                    );
                    false
                }
            };
        Ok(Self {
            engine,
            linker,
            limits: limits.clone(),
            wall_deadline: limits.wall_deadline(),
            ticker_stop,
            recycling,
            track_writes,
            idle: IdleBudget::new(limits.max_instances),
        })
    }

    /// The limits calls run under.
    pub fn limits(&self) -> &PolicyEngineConfig {
        &self.limits
    }

    /// Whether calls run in recycled instances where a module allows it
    /// (`policy.recycle_instances`, on a kernel with `PAGEMAP_SCAN`).
    pub fn recycling(&self) -> bool {
        self.recycling
    }

    /// A recycler for `module`'s instances, if recycling is on and the
    /// module allows it, or why not. `wasm` is what `module` was compiled
    /// from: wizer's instrumentation of the module as loaded, or why that
    /// failed.
    fn recycler_for(&self, module: &Module, wasm: Result<&[u8], &str>) -> Result<Recycler, String> {
        if !self.recycling {
            return Err(if self.limits.recycle_instances {
                "this kernel does not answer PAGEMAP_SCAN (Linux 6.7+)".to_owned()
            } else {
                "off (policy.recycle_instances = false)".to_owned()
            });
        }
        let wasm = wasm.map_err(|reason| format!("its state cannot be reset: {reason}"))?;
        Recyclable::of(module, wasm)
            .map(|recyclable| Recycler::new(recyclable, Arc::clone(&self.idle), self.track_writes))
    }

    /// Compiles `bytes` and checks its imports. A module with a wrong ABI
    /// version or missing exports still loads: calling it is an `abi` fault,
    /// so a bad module never takes a namespace down (see [`PolicyModule::abi`]).
    pub fn load(self: &Arc<Self>, name: &str, bytes: &[u8]) -> Result<PolicyModule, LoadError> {
        if bytes.len() > self.limits.max_module_bytes {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                limit: self.limits.max_module_bytes,
            });
        }
        let started = Instant::now();
        // With `policy.preinit` or `policy.recycle_instances` the module is
        // compiled as wizer instruments it (its memories and mutable globals
        // exported too, nothing else changed): a binding's image is made
        // from an instance of this compilation (one compilation per binding,
        // the image's), and a recycled instance is reset through those
        // exports. A module wizer refuses is compiled as it is.
        let instrumented = if self.limits.preinit || self.recycling {
            preinit::instrument(bytes)
        } else {
            Err("policy.preinit is off".to_owned())
        };
        let image_source = match &instrumented {
            _ if !self.limits.preinit => Err("policy.preinit is off".to_owned()),
            Ok(_) => Ok(Bytes::copy_from_slice(bytes)),
            Err(reason) => Err(reason.clone()),
        };
        let compiled = instrumented.as_ref().map_or(bytes, Vec::as_slice);
        let module = Module::new(&self.engine, compiled)
            .map_err(|err| LoadError::Compile(format!("{err:#}")))?;
        check_imports(&module)?;
        let version = content_version(bytes);
        let instance_pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|err| LoadError::Imports(format!("{err:#}")))?;
        let exports = Exports::find(&module);
        let label = format!("{name}@{version}");
        let mut loaded = PolicyModule {
            engine: Arc::clone(self),
            name: Arc::from(name),
            version: Arc::from(version.as_str()),
            label: Arc::from(label.as_str()),
            decided_by: super::Label::intern(&label),
            instance_pre,
            exports: exports.clone().map_err(Fault::Abi),
            size: bytes.len(),
            image_source,
            preinit: None,
            recycler: Err("it does not implement the ABI".to_owned()),
        };
        if loaded.exports.is_ok()
            && let Err(fault) = loaded.check_abi_version()
        {
            loaded.exports = Err(fault);
        }
        if loaded.exports.is_ok() {
            loaded.recycler =
                self.recycler_for(&module, instrumented.as_deref().map_err(String::as_str));
        }
        info!(
            policy = %loaded.label,
            bytes = bytes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            abi = loaded.exports.as_ref().map_or_else(|fault| fault.to_string(), |_| "ok".to_owned()),
            "policy module loaded"
        );
        Ok(loaded)
    }

    fn new_store(
        &self,
        label: &Arc<str>,
        meter: Arc<CpuMeter>,
        yields: Yields,
        long_calls: Option<(&Arc<Semaphore>, Option<OwnedSemaphorePermit>)>,
    ) -> Store<HostState> {
        let (long_calls, long_call) = long_call_state(long_calls);
        let mut store = Store::new(
            &self.engine,
            HostState {
                label: Arc::clone(label),
                memory_limit: self.limits.memory_limit_bytes,
                memory_capped: false,
                log_calls: 0,
                max_log_calls: self.limits.max_log_calls,
                meter,
                cpu_deadline: self.limits.deadline,
                wall_deadline: self.wall_deadline,
                started: Instant::now(),
                yields,
                on_fiber: false,
                growing_until: None,
                long_calls,
                long_call,
                write_watch: None,
            },
        );
        store.limiter(|state| state);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(at_tick);
        store
    }
}

/// A call's binding permits and where it starts with them: holding the
/// permit it waited for up front, or not yet asking.
fn long_call_state(
    long_calls: Option<(&Arc<Semaphore>, Option<OwnedSemaphorePermit>)>,
) -> (Option<Arc<Semaphore>>, LongCall) {
    match long_calls {
        None => (None, LongCall::NotYet),
        Some((permits, None)) => (Some(Arc::clone(permits)), LongCall::NotYet),
        Some((permits, Some(permit))) => (
            Some(Arc::clone(permits)),
            LongCall::Holding { _permit: permit },
        ),
    }
}

/// An instance kept between the calls of one batch
/// ([`PolicyModule::decide_reusing`]); dropping it returns its pool slot.
pub struct LiveInstance {
    store: Store<HostState>,
    instance: wasmtime::Instance,
    handles: Handles,
}

/// An instance's exports as handles of its store, resolved once per
/// instance (a batch's and a recycled instance keep theirs), so that a call
/// looks nothing up by name or index.
#[derive(Clone)]
struct Handles {
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    decide: TypedFunc<(i32, i32), i64>,
}

impl Handles {
    fn resolve(
        store: &mut Store<HostState>,
        instance: &wasmtime::Instance,
        exports: &Exports,
    ) -> wasmtime::Result<Handles> {
        let memory = instance
            .get_module_export(&mut *store, &exports.memory)
            .and_then(|export| export.into_memory())
            .ok_or_else(|| wasmtime::Error::msg("memory export vanished"))?;
        let alloc = export_func(store, instance, &exports.alloc)?.typed(&*store)?;
        let decide = export_func(store, instance, &exports.decide)?.typed(&*store)?;
        Ok(Handles {
            memory,
            alloc,
            decide,
        })
    }
}

impl fmt::Debug for LiveInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveInstance")
            .field("policy", &self.store.data().label)
            .finish_non_exhaustive()
    }
}

/// A module's exports, resolved once so calls skip the name lookups.
#[derive(Clone)]
struct Exports {
    memory: ModuleExport,
    abi_version: ModuleExport,
    alloc: ModuleExport,
    decide: ModuleExport,
    init: Option<ModuleExport>,
}

impl Exports {
    fn find(module: &Module) -> Result<Exports, String> {
        use ValType::{I32, I64};
        let function = |name: &str, params: &[ValType], results: &[ValType]| {
            let Some(export) = module.get_export(name) else {
                return Err(format!("missing export `{name}`"));
            };
            let ExternType::Func(func) = export else {
                return Err(format!("export `{name}` is not a function"));
            };
            let matches = |actual: &mut dyn ExactSizeIterator<Item = ValType>,
                           expected: &[ValType]| {
                actual.len() == expected.len()
                    && actual.zip(expected).all(|(a, e)| ValType::eq(&a, e))
            };
            if !matches(&mut func.params(), params) || !matches(&mut func.results(), results) {
                return Err(format!("export `{name}` has the wrong signature ({func})"));
            }
            module
                .get_export_index(name)
                .ok_or_else(|| format!("missing export `{name}`"))
        };
        let memory = match module.get_export("memory") {
            Some(ExternType::Memory(_)) => module.get_export_index("memory").expect("exists"),
            Some(_) => return Err("export `memory` is not a memory".into()),
            None => return Err("missing export `memory`".into()),
        };
        Ok(Exports {
            memory,
            abi_version: function("cachegw_abi_version", &[], &[I32])?,
            alloc: function("cachegw_alloc", &[I32], &[I32])?,
            decide: function("cachegw_decide", &[I32, I32], &[I64])?,
            init: match module.get_export("cachegw_init") {
                None => None,
                Some(_) => Some(function("cachegw_init", &[I32, I32], &[I64])?),
            },
        })
    }
}

/// A compiled policy, ready to be called: a module as loaded, or a binding's
/// pre-initialised image of one ([`PolicyModule::preinitialized`]), which
/// has the same name, version and label.
pub struct PolicyModule {
    engine: Arc<PolicyEngine>,
    name: Arc<str>,
    version: Arc<str>,
    label: Arc<str>,
    /// The label again, as decisions carry it.
    decided_by: super::Label,
    instance_pre: InstancePre<HostState>,
    exports: Result<Exports, Fault>,
    size: usize,
    /// The module's bytes as loaded, which a binding's image is made from
    /// (compiled instrumented), or why none can be.
    image_source: Result<Bytes, String>,
    /// What the image cost, on a pre-initialised image.
    preinit: Option<Preinit>,
    /// Its kept instances, when its calls recycle them, or why they do not.
    recycler: Result<Recycler, String>,
}

impl fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyModule")
            .field("label", &self.label)
            .field("size", &self.size)
            .field("preinit", &self.preinit)
            .finish_non_exhaustive()
    }
}

impl PolicyModule {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its content hash (first 12 hex digits of SHA-256).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `name@version`, as logs and responses show it.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// `name@version`, as its decisions carry it.
    pub fn decided_by(&self) -> super::Label {
        self.decided_by
    }

    /// Size of the module in bytes (of the module as loaded, for an image).
    pub fn size(&self) -> usize {
        self.size
    }

    /// What the image cost, if this is a pre-initialised image.
    pub fn preinit(&self) -> Option<&Preinit> {
        self.preinit.as_ref()
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> &PolicyEngineConfig {
        &self.engine.limits
    }

    /// For each idle instance of this module, how many pages its write
    /// watch has noted (`None`: not watched).
    #[cfg(test)]
    pub(crate) fn watched_pages(&self) -> Vec<Option<usize>> {
        self.recycler
            .as_ref()
            .map_or_else(|_| Vec::new(), Recycler::watched_pages)
    }

    /// How a recycled instance's reset finds the pages its calls wrote:
    /// `write faults` (`policy.track_writes`) or `PAGEMAP_SCAN` after every
    /// call; `None` when its calls are not recycled.
    pub fn written_pages_from(&self) -> Option<&'static str> {
        let recycler = self.recycler.as_ref().ok()?;
        Some(if recycler.tracks_writes() {
            "write faults"
        } else {
            "PAGEMAP_SCAN"
        })
    }

    /// Whether its calls run in recycled instances (reset to their starting
    /// state after each call) rather than new ones.
    pub fn recycles(&self) -> bool {
        self.recycler.is_ok()
    }

    /// Why its calls do not recycle instances, if they do not.
    pub fn not_recycled(&self) -> Option<&str> {
        self.recycler.as_ref().err().map(String::as_str)
    }

    /// Instances kept idle for its next calls.
    pub fn idle_instances(&self) -> usize {
        self.recycler.as_ref().map_or(0, Recycler::idle)
    }

    /// Whether the module implements the ABI (exports, signatures, version).
    pub fn abi(&self) -> Result<(), Fault> {
        self.exports.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// Whether the module has the optional init export.
    pub fn has_init(&self) -> bool {
        matches!(&self.exports, Ok(exports) if exports.init.is_some())
    }

    fn check_abi_version(&self) -> Result<(), Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        let meter = Arc::new(CpuMeter::default());
        let mut store =
            self.engine
                .new_store(&self.label, Arc::clone(&meter), Yields::Anywhere, None);
        // A load-time check, not a request's call: its CPU is bounded by the
        // wall deadline, not by `policy.deadline`. A version whose check met
        // the per-call deadline (a loaded machine, a gateway under valgrind)
        // would otherwise be loaded as one that does not implement the ABI,
        // every call of it a fault, until it is loaded again.
        store.data_mut().cpu_deadline = self.engine.wall_deadline;
        let outcome = futures::executor::block_on(metered(&meter, async {
            let instance = self.instance_pre.instantiate(&mut store)?;
            store.data_mut().on_fiber = true;
            instance
                .get_module_export(&mut store, &exports.abi_version)
                .and_then(|export| export.into_func())
                .ok_or_else(|| wasmtime::Error::msg("cachegw_abi_version vanished"))?
                .typed::<(), i32>(&store)?
                .call_async(&mut store, ())
                .await
        }));
        match outcome {
            Ok(ABI_VERSION) => Ok(()),
            Ok(other) => Err(Fault::Abi(format!(
                "cachegw_abi_version returned {other}; this gateway speaks version {ABI_VERSION}"
            ))),
            Err(err) => Err(Fault::Abi(format!(
                "cachegw_abi_version failed: {}",
                classify(err, store.data())
            ))),
        }
    }

    /// Asks the policy for a decision on `input`, in a fresh instance. A call
    /// that runs past a tick yields to the async runtime between ticks, so it
    /// never holds the worker that polls it for more than a tick at a time,
    /// and goes on only with a permit of `long_calls` (its binding's).
    pub async fn decide(
        &self,
        input: &(impl CallInput + ?Sized),
        long_calls: &Arc<Semaphore>,
    ) -> Result<pb::PolicyDecision, Fault> {
        self.decide_reusing(input, long_calls, None).await
    }

    /// [`decide`](Self::decide) in `live`'s instance if it holds one, else in
    /// a fresh one that is left in `live` for the next call. The items of one
    /// batch (MGet, MSet: one caller, one request) are decided this way, one
    /// instantiation for all of them. Each call still has its own CPU and
    /// wall deadline, memory cap and log budget; a call that faults takes its
    /// instance with it (`live` is emptied), so the next item starts fresh.
    /// With `None`, every call gets a fresh instance (the rule across
    /// requests).
    pub async fn decide_reusing(
        &self,
        input: &(impl CallInput + ?Sized),
        long_calls: &Arc<Semaphore>,
        live: Option<&mut Option<LiveInstance>>,
    ) -> Result<pb::PolicyDecision, Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        // Every permit held: this binding's calls are running long, so this
        // one waits its turn before it starts (without spending CPU).
        let permit = if long_calls.available_permits() == 0 {
            let wait = Arc::clone(long_calls).acquire_owned();
            match tokio::time::timeout(self.engine.wall_deadline, wait).await {
                Ok(Ok(permit)) => Some(permit),
                _ => return Err(Fault::Busy),
            }
        } else {
            None
        };
        // The output is decoded where the instance left it: no copy.
        self.call(
            exports,
            &exports.decide,
            input,
            decode_output,
            Yields::ToTokio,
            Some((long_calls, permit)),
            live,
        )
        .await?
    }

    /// [`decide`](Self::decide) for callers that are not async (tools, the
    /// registry's dry runs): the call blocks this thread until it ends.
    pub fn decide_blocking(
        &self,
        input: &(impl CallInput + ?Sized),
    ) -> Result<pb::PolicyDecision, Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        futures::executor::block_on(self.call(
            exports,
            &exports.decide,
            input,
            decode_output,
            Yields::Anywhere,
            None,
            None,
        ))?
    }

    /// Runs the optional init export on a binding's config, blocking this
    /// thread. `Ok(None)` when the config is accepted (or there is no init
    /// export), `Ok(Some(reason))` when the policy rejects it.
    pub fn init(&self, config: &[u8]) -> Result<Option<String>, Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        let Some(init) = &exports.init else {
            return Ok(None);
        };
        futures::executor::block_on(self.call(
            exports,
            init,
            config,
            init_verdict,
            Yields::Anywhere,
            None,
            None,
        ))?
    }

    /// One call: instantiate (unless `live` holds an instance), allocate,
    /// write the input, call, read the output, all of it charged to the
    /// call's CPU budget. With `live`, the instance is left there after a
    /// call that succeeded.
    #[allow(clippy::too_many_arguments)]
    async fn call<R>(
        &self,
        exports: &Exports,
        entry: &ModuleExport,
        input: &(impl CallInput + ?Sized),
        read: impl FnOnce(&[u8]) -> R,
        yields: Yields,
        long_calls: Option<(&Arc<Semaphore>, Option<OwnedSemaphorePermit>)>,
        mut live: Option<&mut Option<LiveInstance>>,
    ) -> Result<R, Fault> {
        // A batch's instance, else (for a call of its own) a recycled one.
        let reused = match live.as_deref_mut() {
            Some(slot) => slot
                .take()
                .map(|live| (live.store, live.instance, live.handles, None)),
            None => self
                .recycler
                .as_ref()
                .ok()
                .and_then(Recycler::take)
                .map(|kept| (kept.store, kept.instance, kept.handles, Some(kept.globals))),
        };
        let (mut store, instance) = match reused {
            Some((mut store, instance, handles, globals)) => {
                let (permits, long_call) = long_call_state(long_calls);
                store.data_mut().restart(yields, permits, long_call);
                store.set_epoch_deadline(1);
                (store, Some((instance, handles, globals)))
            }
            None => {
                let meter = Arc::new(CpuMeter::default());
                let store = self
                    .engine
                    .new_store(&self.label, meter, yields, long_calls);
                (store, None)
            }
        };
        let meter = Arc::clone(&store.data().meter);
        let result = metered(&meter, async {
            let (instance, handles, globals, reserved) = match instance {
                // A recycled instance is in its starting state (its input
                // buffer pending); a batch's has run a call already.
                Some((instance, handles, globals)) => {
                    let reserved = globals
                        .is_some()
                        .then(|| self.reserved_input(exports, entry, input.encoded_len()))
                        .flatten();
                    (instance, handles, globals, reserved)
                }
                None => {
                    let instance = self.instance_pre.instantiate(&mut store)?;
                    store.data_mut().on_fiber = true;
                    let handles = Handles::resolve(&mut store, &instance, exports)?;
                    if let Ok(recycler) = &self.recycler {
                        recycler.note_start(&mut store, &instance);
                    }
                    let reserved = self.reserved_input(exports, entry, input.encoded_len());
                    (instance, handles, None, reserved)
                }
            };
            let function = if std::ptr::eq(entry, &exports.decide) {
                handles.decide.clone()
            } else {
                export_func(&mut store, &instance, entry)?.typed(&store)?
            };
            let output = invoke(&mut store, &handles, &function, input, read, reserved).await?;
            Ok::<_, wasmtime::Error>((instance, handles, globals, output))
        })
        .await;
        match result {
            Ok((instance, handles, globals, output)) => {
                match (live, self.recycler.as_ref().ok()) {
                    (Some(slot), _) => {
                        *slot = Some(LiveInstance {
                            store,
                            instance,
                            handles,
                        })
                    }
                    (None, Some(recycler)) => recycler.recycle(store, instance, handles, globals),
                    (None, None) => {}
                }
                Ok(output)
            }
            Err(err) => Err(fault_of(err, store.data())),
        }
    }

    /// Where an instance in its starting state takes `input` for `entry`
    /// without a `cachegw_alloc` call: an image's pending input buffer, for
    /// a decision whose input fits.
    fn reserved_input(&self, exports: &Exports, entry: &ModuleExport, len: usize) -> Option<u32> {
        self.preinit
            .as_ref()
            .and_then(|preinit| preinit.input_buffer)
            .filter(|buffer| {
                std::ptr::eq(entry, &exports.decide) && len <= buffer.capacity as usize
            })
            .map(|buffer| buffer.address)
    }

    /// Measures `calls` decisions on `input`, reporting each one's latency to
    /// `record`. With `reuse`, one instance serves every call (what a "reset
    /// instance" strategy would cost at best, with no isolation); without, each
    /// call gets a fresh instance, as in production, through the same path a
    /// request takes (fiber, CPU meter and all).
    pub fn measure(
        &self,
        input: &pb::PolicyInput,
        calls: u64,
        reuse: bool,
        mut record: impl FnMut(Duration, Option<Fault>),
    ) -> Result<(), Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        if !reuse {
            for _ in 0..calls {
                // As a request's call: the input encoded into the instance,
                // the output decoded where it lies.
                let started = Instant::now();
                let fault = futures::executor::block_on(self.call(
                    exports,
                    &exports.decide,
                    input,
                    decode_output,
                    Yields::Anywhere,
                    None,
                    None,
                ))
                .and_then(|decided| decided)
                .err();
                record(started.elapsed(), fault);
            }
            return Ok(());
        }
        let meter = Arc::new(CpuMeter::default());
        let mut store =
            self.engine
                .new_store(&self.label, Arc::clone(&meter), Yields::Anywhere, None);
        let instance = self
            .instance_pre
            .instantiate(&mut store)
            .map_err(|err| fault_of(err, store.data()))?;
        store.data_mut().on_fiber = true;
        let handles = Handles::resolve(&mut store, &instance, exports)
            .map_err(|err| fault_of(err, store.data()))?;
        for _ in 0..calls {
            let started = Instant::now();
            store
                .data_mut()
                .restart(Yields::Anywhere, None, LongCall::NotYet);
            let outcome = futures::executor::block_on(metered(
                &meter,
                invoke(
                    &mut store,
                    &handles,
                    &handles.decide,
                    input,
                    decode_output,
                    None,
                ),
            ));
            let fault = match outcome {
                Ok(decided) => decided.err(),
                Err(err) => Some(fault_of(err, store.data())),
            };
            record(started.elapsed(), fault);
        }
        Ok(())
    }
}

/// Reads the bytes `cachegw_decide` returned: a `PolicyOutput` carrying a
/// decision (still to be validated, see `Decision::from_wire`) or the
/// policy's refusal. Public for the fuzz targets: these bytes come from the
/// policy, untrusted.
pub fn decode_output(output: &[u8]) -> Result<pb::PolicyDecision, Fault> {
    let output = pb::PolicyOutput::decode(output)
        .map_err(|err| Fault::Output(format!("not a PolicyOutput: {err}")))?;
    match output.result {
        Some(pb::policy_output::Result::Decision(decision)) => Ok(decision),
        Some(pb::policy_output::Result::Error(reason)) => Err(Fault::Declined(reason)),
        None => Err(Fault::Output(
            "PolicyOutput carries neither decision nor error".into(),
        )),
    }
}

/// Reads the bytes `cachegw_init` returned: `Ok(None)` when the policy
/// accepts the config, `Ok(Some(reason))` when it rejects it.
fn init_verdict(output: &[u8]) -> Result<Option<String>, Fault> {
    let output = pb::InitOutput::decode(output)
        .map_err(|err| Fault::Output(format!("not an InitOutput: {err}")))?;
    Ok((!output.error.is_empty()).then_some(output.error))
}

/// Reserves `len` bytes with the instance's `cachegw_alloc`; their address.
async fn reserve(
    store: &mut Store<HostState>,
    handles: &Handles,
    len: u32,
) -> wasmtime::Result<u32> {
    let len = i32::try_from(len).map_err(|_| OutputError("input too large".into()))?;
    match handles.alloc.call_async(&mut *store, len).await? {
        0 => Err(OutputError("cachegw_alloc returned 0".into()).into()),
        ptr => Ok(ptr as u32),
    }
}

fn export_func(
    store: &mut Store<HostState>,
    instance: &wasmtime::Instance,
    export: &ModuleExport,
) -> wasmtime::Result<wasmtime::Func> {
    instance
        .get_module_export(&mut *store, export)
        .and_then(|export| export.into_func())
        .ok_or_else(|| wasmtime::Error::msg("function export vanished"))
}

/// Writes `input` into the instance (at `reserved`, a buffer the image
/// holds pending, or else where `cachegw_alloc` says), calls `entry`, and
/// hands the output, where it lies in the instance's memory, to `read`.
async fn invoke<R>(
    store: &mut Store<HostState>,
    handles: &Handles,
    entry: &TypedFunc<(i32, i32), i64>,
    input: &(impl CallInput + ?Sized),
    read: impl FnOnce(&[u8]) -> R,
    reserved: Option<u32>,
) -> wasmtime::Result<R> {
    let memory = handles.memory;
    let input_len = input.encoded_len();
    let len = i32::try_from(input_len).map_err(|_| OutputError("input too large".into()))?;
    let ptr = match reserved {
        Some(address) => address as i32,
        None => reserve(store, handles, len as u32).await? as i32,
    };
    let at = ptr as u32 as usize;
    let target = memory
        .data_mut(&mut *store)
        .get_mut(at..at.saturating_add(input_len))
        .ok_or_else(|| OutputError(format!("cachegw_alloc returned {ptr:#x}, outside memory")))?;
    input.write(target);
    let packed = entry.call_async(&mut *store, (ptr, len)).await? as u64;
    let (out_ptr, out_len) = ((packed >> 32) as usize, (packed & 0xFFFF_FFFF) as usize);
    let data = memory.data(&*store);
    let output = out_ptr
        .checked_add(out_len)
        .and_then(|end| data.get(out_ptr..end))
        .ok_or_else(|| {
            OutputError(format!(
                "output at {out_ptr:#x}+{out_len} lies outside the {}-byte memory",
                data.len()
            ))
        })?;
    Ok(read(output))
}

/// The CPU time one call has run, whichever threads polled it. The
/// thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`) is what counts: time
/// the thread waited for a core, descheduled, is not the policy's.
///
/// That clock is a system call (a microsecond or more on a VM), so it is
/// read only once a call has reached a tick, never by a call that ends
/// within one. A call's CPU before its first tick is taken as its wall time,
/// at most a tick (the thread ran no longer than that before the tick that
/// called back, or it would have met an earlier one); from the first tick
/// on, the clock is read at each tick, when a poll ends and when the next
/// one starts. (Charging every poll's first stretch as wall time, as this
/// once did, charged a long call that yields at every tick its wall time:
/// on a loaded machine, the time it waited for a core too, so a memory bomb
/// filling pages slowly could be cut off as a `timeout`.)
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// CPU time charged so far, in nanoseconds.
    spent_ns: AtomicU64,
    /// When the current poll began, on [`wall_ns`]'s clock.
    poll_started_ns: AtomicU64,
    /// The polling thread's CPU clock at the poll's last tick; 0 before one.
    last_tick_cpu_ns: AtomicU64,
}

impl CpuMeter {
    /// CPU time used so far, charging the current poll up to now; called
    /// from inside a poll (the epoch callback, the memory limiter).
    fn used(&self) -> Duration {
        let cpu = thread_cpu_ns();
        let charged = match self.last_tick_cpu_ns.swap(cpu, Ordering::Relaxed) {
            0 => wall_ns()
                .saturating_sub(self.poll_started_ns.load(Ordering::Relaxed))
                .min(EPOCH_TICK.as_nanos() as u64),
            last => cpu.saturating_sub(last),
        };
        Duration::from_nanos(self.spent_ns.fetch_add(charged, Ordering::Relaxed) + charged)
    }

    /// CPU time used so far, for a later [`used`](Self::used) to measure
    /// from: read from the clock once the call has met a tick (a long call),
    /// else what is charged (no clock read, for the many calls that end
    /// within a tick). What is charged lags to the last tick, and ticks come
    /// late when the epoch ticker's thread waits for a core: a memory bomb's
    /// growth stamped that way looked 10 ms old on a loaded machine, and the
    /// bomb was cut off as a `timeout` instead of meeting the memory cap.
    fn stamp(&self) -> Duration {
        if self.last_tick_cpu_ns.load(Ordering::Relaxed) != 0 {
            self.used()
        } else {
            self.charged()
        }
    }

    /// CPU time charged up to the last tick or poll end (no clock read).
    fn charged(&self) -> Duration {
        Duration::from_nanos(self.spent_ns.load(Ordering::Relaxed))
    }

    fn poll_starts(&self) {
        // Only a call that has met a tick has been charged anything.
        let resumed = self.spent_ns.load(Ordering::Relaxed) > 0;
        self.poll_started_ns.store(wall_ns(), Ordering::Relaxed);
        self.last_tick_cpu_ns
            .store(if resumed { thread_cpu_ns() } else { 0 }, Ordering::Relaxed);
    }

    fn poll_ends(&self) {
        let last = self.last_tick_cpu_ns.swap(0, Ordering::Relaxed);
        if last != 0 {
            self.spent_ns
                .fetch_add(thread_cpu_ns().saturating_sub(last), Ordering::Relaxed);
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
        .max(1)
}

/// Nanoseconds on a monotonic clock (the vDSO's: no system call).
fn wall_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Runs `call`, charging the CPU time of every poll to `meter`.
async fn metered<F: Future>(meter: &CpuMeter, call: F) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        meter.poll_starts();
        let polled = call.as_mut().poll(cx);
        meter.poll_ends();
        polled
    })
    .await
}

/// How a call that runs past a tick gives its thread back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Yields {
    /// Through tokio's `yield_now`: resumed only after the worker has run
    /// every other ready task and polled its I/O driver.
    ToTokio,
    /// Through wasmtime's own yield, for calls driven by a blocking executor
    /// (tokio's would park the waker on the worker that is blocked on it).
    Anywhere,
}

/// CPU time after which a call is long: it yields at every tick and needs a
/// long-call permit. Two ticks, because the first segment of a poll is
/// charged up to a tick of wall time ([`CpuMeter`]), so a call that was
/// merely descheduled is never taken for a long one.
const LONG_CALL: Duration = Duration::from_millis(2);

/// How long after a memory growth a call is not cut off for CPU time, before
/// [`FAULT_IN_GRACE`] for the pages it grew by: filling fresh memory is the
/// kernel faulting pages in, bounded by the memory cap (the wall deadline
/// still applies), so a memory bomb meets the cap and is reported as
/// `memory` even where page faults are slow. (A growth before the call's
/// first tick is stamped with no CPU at all, so the grace is a tick longer
/// than the window it means for it.)
const GROWTH_GRACE: Duration = Duration::from_millis(3);

/// CPU time a call may spend per 4 KiB page it grew by, after
/// [`GROWTH_GRACE`], before it is cut off for CPU time: the time to fault the
/// page in on a slow machine. Here a page fault costs 1-3 µs of the faulting
/// thread's CPU, and filling a fresh MiB 0.2-1.7 ms; on a machine that has
/// to reclaim memory, or whose hypervisor faults in the guest's memory behind
/// it, a fault costs ten times that and more (a clean CI machine took over
/// 3 ms for a MiB). So a call that grows by 1 MiB (256 pages) may run 10 ms
/// more of CPU; it can gain no more than the memory cap allows, and never
/// beyond its wall deadline.
const FAULT_IN_GRACE: Duration = Duration::from_micros(40);

/// The CPU time, stamped `now`, until which a call that grew its memory
/// from `current` to `desired` bytes is not cut off for CPU time.
fn grace_after_growth(now: Duration, current: usize, desired: usize) -> Duration {
    let pages = desired.saturating_sub(current).div_ceil(write_watch::PAGE);
    now + GROWTH_GRACE + FAULT_IN_GRACE.saturating_mul(u32::try_from(pages).unwrap_or(u32::MAX))
}

/// The epoch callback, at every tick a call is still running: a timeout past
/// its CPU or wall deadline; a long call without a permit waits for one (or
/// is `busy`); otherwise a yield until the next tick.
fn at_tick(mut store: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    let used = state.meter.used();
    let growing = state.growing_until.is_some_and(|until| used < until);
    if (used >= state.cpu_deadline && !growing) || state.started.elapsed() >= state.wall_deadline {
        return Ok(UpdateDeadline::Interrupt);
    }
    // Instantiation runs a start function synchronously: it cannot yield. A
    // call that has not run LONG_CALL of CPU is not long, only descheduled:
    // it goes on at once rather than queue behind the worker's other tasks.
    if !state.on_fiber || used < LONG_CALL {
        return Ok(UpdateDeadline::Continue(1));
    }
    if let Some(wait) = state.admit_long_call()? {
        return Ok(UpdateDeadline::YieldCustom(0, wait));
    }
    Ok(match state.yields {
        Yields::ToTokio => UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())),
        Yields::Anywhere => UpdateDeadline::Yield(1),
    })
}

/// Where a call stands with its binding's long-call permits.
enum LongCall {
    /// It has not asked (it has not reached a tick, or has no binding).
    NotYet,
    /// It is waiting; the permit arrives here, or nothing if none came in time.
    Waiting(Arc<Mutex<Option<OwnedSemaphorePermit>>>),
    /// It holds one until it ends.
    Holding { _permit: OwnedSemaphorePermit },
    /// None came in time: the call ends as `busy`.
    Refused,
}

/// The call was refused a long-call permit (a `busy` fault).
#[derive(Debug)]
struct Busy;

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no long-call permit")
    }
}

impl std::error::Error for Busy {}

type Wait = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl HostState {
    /// At a tick: takes one of the binding's long-call permits if the call
    /// has none, or returns the wait for one (within the call's wall
    /// deadline).
    fn admit_long_call(&mut self) -> wasmtime::Result<Option<Wait>> {
        let Some(permits) = &self.long_calls else {
            return Ok(None);
        };
        match &self.long_call {
            LongCall::Holding { .. } => Ok(None),
            LongCall::Refused => Err(Busy.into()),
            LongCall::Waiting(slot) => {
                let arrived = slot.lock().map_or(None, |mut slot| slot.take());
                match arrived {
                    Some(permit) => {
                        self.long_call = LongCall::Holding { _permit: permit };
                        Ok(None)
                    }
                    None => {
                        self.long_call = LongCall::Refused;
                        Err(Busy.into())
                    }
                }
            }
            LongCall::NotYet => match Arc::clone(permits).try_acquire_owned() {
                Ok(permit) => {
                    self.long_call = LongCall::Holding { _permit: permit };
                    Ok(None)
                }
                Err(_) => {
                    let slot = Arc::new(Mutex::new(None));
                    self.long_call = LongCall::Waiting(Arc::clone(&slot));
                    let permits = Arc::clone(permits);
                    let patience = self.wall_deadline.saturating_sub(self.started.elapsed());
                    Ok(Some(Box::pin(async move {
                        if let Ok(Ok(permit)) =
                            tokio::time::timeout(patience, permits.acquire_owned()).await
                            && let Ok(mut slot) = slot.lock()
                        {
                            *slot = Some(permit);
                        }
                    })))
                }
            },
        }
    }
}

fn fault_of(err: wasmtime::Error, state: &HostState) -> Fault {
    match err.downcast::<OutputError>() {
        Ok(OutputError(reason)) => Fault::Output(reason),
        Err(err) => classify(err, state),
    }
}

/// A protocol violation found by the host during a call.
#[derive(Debug)]
struct OutputError(String);

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutputError {}

fn classify(err: wasmtime::Error, state: &HostState) -> Fault {
    if state.memory_capped {
        return Fault::Memory;
    }
    if matches!(state.long_call, LongCall::Refused) || err.downcast_ref::<Busy>().is_some() {
        return Fault::Busy;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Fault::Timeout,
        Some(trap) => Fault::Trap(trap.to_string()),
        None => {
            let text = format!("{err:#}");
            if text.contains("maximum concurrent") || text.contains("pooling allocator") {
                Fault::Capacity(text)
            } else {
                Fault::Trap(text)
            }
        }
    }
}

/// Per-call host state: the deadlines, the memory cap and the log budget.
struct HostState {
    label: Arc<str>,
    memory_limit: usize,
    memory_capped: bool,
    log_calls: u32,
    max_log_calls: u32,
    meter: Arc<CpuMeter>,
    cpu_deadline: Duration,
    wall_deadline: Duration,
    started: Instant,
    yields: Yields,
    /// Whether wasm now runs on a fiber (`call_async`), where it may yield.
    on_fiber: bool,
    /// CPU time until which the call is filling memory it grew, and not
    /// cut off for CPU time ([`grace_after_growth`]).
    growing_until: Option<Duration>,
    /// The binding's long-call permits (none outside a binding: tools, checks).
    long_calls: Option<Arc<Semaphore>>,
    long_call: LongCall,
    /// A kept instance's memory, watched for writes (`policy.track_writes`).
    /// Here so that it ends before the instance's pool slot is released:
    /// wasmtime drops a store's data before its instances.
    write_watch: Option<write_watch::WriteWatch>,
}

impl HostState {
    /// Starts a new call's budgets in a reused store: its own CPU and wall
    /// deadlines, log budget, way of yielding and long-call standing (a
    /// batch's next item, a recycled instance, `policy bench
    /// --reuse-instance`).
    fn restart(&mut self, yields: Yields, long_calls: Option<Arc<Semaphore>>, long_call: LongCall) {
        self.yields = yields;
        self.started = Instant::now();
        self.log_calls = 0;
        self.growing_until = None;
        self.memory_capped = false;
        self.long_calls = long_calls;
        self.long_call = long_call;
        self.meter.spent_ns.store(0, Ordering::Relaxed);
        self.meter.poll_starts();
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_capped = true;
            return Ok(false);
        }
        let until = grace_after_growth(self.meter.stamp(), current, desired);
        // `None` orders below any `Some`: the later of the two graces.
        self.growing_until = self.growing_until.max(Some(until));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// `cachegw.log(level, ptr, len)`: the one host capability. Bounded in size
/// and count; a bad pointer drops the message rather than faulting the call.
fn host_log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) {
    let state = caller.data_mut();
    state.log_calls += 1;
    if state.log_calls > state.max_log_calls {
        return;
    }
    let label = Arc::clone(&state.label);
    let Some(memory) = caller
        .get_export("memory")
        .and_then(|export| export.into_memory())
    else {
        return;
    };
    let data = memory.data(&caller);
    let start = ptr as u32 as usize;
    let len = (len as u32 as usize).min(MAX_LOG_BYTES);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        return;
    };
    let message = String::from_utf8_lossy(bytes);
    let level = match level {
        0 => Level::TRACE,
        1 => Level::DEBUG,
        3 => Level::WARN,
        4 => Level::ERROR,
        _ => Level::INFO,
    };
    match level {
        Level::TRACE => trace!(policy = %label, "{message}"),
        Level::DEBUG => debug!(policy = %label, "{message}"),
        Level::WARN => warn!(policy = %label, "{message}"),
        Level::ERROR => error!(policy = %label, "{message}"),
        _ => info!(policy = %label, "{message}"),
    }
}

fn check_imports(module: &Module) -> Result<(), LoadError> {
    for import in module.imports() {
        let allowed = import.module() == "cachegw"
            && import.name() == "log"
            && matches!(import.ty(), ExternType::Func(_));
        if !allowed {
            return Err(LoadError::Imports(format!(
                "imports `{}.{}`; a policy may import only `cachegw.log` (no WASI, no other host functions)",
                import.module(),
                import.name()
            )));
        }
    }
    Ok(())
}

/// The module's content version: the first 12 hex digits of its SHA-256.
pub fn content_version(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    digest[..6]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Bytes of the input the policy sees for one request.
pub fn config_bytes(config: Option<&serde_json::Value>) -> Bytes {
    match config {
        None | Some(serde_json::Value::Null) => Bytes::new(),
        Some(value) => Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on this thread until its CPU clock has advanced by `cpu`.
    fn spin_for(cpu: Duration) {
        let until = thread_cpu_ns() + cpu.as_nanos() as u64;
        while thread_cpu_ns() < until {
            std::hint::spin_loop();
        }
    }

    /// A long call's memory growth is stamped with the CPU it has used up to
    /// the growth, not up to its last tick: ticks come late when the epoch
    /// ticker waits for a core, and a stale stamp made a memory bomb that was
    /// still growing look idle for 10 ms (a `timeout` instead of `memory`).
    #[test]
    fn a_long_calls_growth_is_stamped_with_the_cpu_used_until_then() {
        let meter = CpuMeter::default();
        meter.poll_starts();
        // Before its first tick a call is stamped with what is charged: nothing.
        spin_for(Duration::from_micros(200));
        assert_eq!(meter.stamp(), Duration::ZERO);
        spin_for(Duration::from_micros(1300));
        let at_tick = meter.used();
        // No tick for the next 5 ms of CPU (the ticker is late), then a growth.
        spin_for(Duration::from_millis(5));
        let grew_at = meter.stamp();
        assert!(
            grew_at >= at_tick + Duration::from_millis(5),
            "a growth 5 ms of CPU after a tick at {at_tick:?} was stamped {grew_at:?}"
        );
        // The tick that finally comes finds the growth recent.
        let late_tick = meter.used();
        assert!(
            late_tick - grew_at < Duration::from_micros(500),
            "{late_tick:?} vs {grew_at:?}"
        );
    }

    /// Filling memory a call grew is time the kernel spends faulting pages
    /// in: a growth earns time in proportion to the pages it adds, so a
    /// memory bomb's MiB at a time is not cut off where faults are slow.
    #[test]
    fn a_growth_earns_time_to_fault_its_pages_in() {
        let now = Duration::from_millis(4);
        let mib = 1 << 20;
        let after_a_page = grace_after_growth(now, mib, mib + write_watch::PAGE) - now;
        let after_a_mib = grace_after_growth(now, mib, 2 * mib) - now;
        assert!(after_a_page < Duration::from_millis(4), "{after_a_page:?}");
        assert!(after_a_mib >= Duration::from_millis(10), "{after_a_mib:?}");
        // Whatever the sizes, no overflow: the memory cap refuses what is too big.
        let _ = grace_after_growth(now, 0, usize::MAX);
    }

    /// A long call's later polls are charged the CPU they ran, not the wall
    /// time they spanned: a thread that waits (here, sleeps; on a loaded
    /// machine, waits for a core) is not charged for it.
    #[test]
    fn a_resumed_poll_is_charged_its_cpu_not_its_wall_time() {
        let meter = CpuMeter::default();
        // The first poll meets a tick after a millisecond and a half of CPU:
        // a long call from then on.
        meter.poll_starts();
        spin_for(Duration::from_micros(1500));
        let at_first_tick = meter.used();
        assert!(at_first_tick > Duration::ZERO, "{at_first_tick:?}");
        meter.poll_ends();
        let after_first_poll = meter.charged();
        // The next poll waits 30 ms without running, then meets a tick.
        meter.poll_starts();
        std::thread::sleep(Duration::from_millis(30));
        let waited = meter.used() - after_first_poll;
        assert!(
            waited < Duration::from_micros(500),
            "a poll that waited 30 ms on one millisecond's tick was charged {waited:?}"
        );
        // What it runs is charged.
        spin_for(Duration::from_millis(2));
        let ran = meter.used() - after_first_poll;
        assert!(
            ran >= Duration::from_millis(2) && ran < Duration::from_millis(3),
            "2 ms of CPU charged as {ran:?}"
        );
    }

    /// `perf_map` names the compiled code of every module loaded in
    /// `/tmp/perf-<pid>.map`, the file `perf report` reads.
    #[test]
    fn perf_map_names_the_code_of_loaded_modules() {
        // (module (func)): one function, no imports, no exports.
        const MODULE: &[u8] = &[
            0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x60, 0x00, 0x00,
            0x03, 0x02, 0x01, 0x00, 0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b,
        ];
        let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()));
        let lines = || {
            std::fs::read_to_string(&map)
                .map(|text| text.lines().count())
                .unwrap_or(0)
        };
        let before = lines();
        let engine = Arc::new(
            PolicyEngine::new(&PolicyEngineConfig {
                perf_map: true,
                compile_cache_dir: None,
                ..PolicyEngineConfig::default()
            })
            .unwrap(),
        );
        let module = engine.load("tiny", MODULE).unwrap();
        assert!(
            module.abi().is_err(),
            "no exports: an abi fault when called"
        );
        assert!(
            lines() > before,
            "{} names none of the module's code",
            map.display()
        );
    }

    /// The load-time ABI check runs under the wall deadline, not the per-call
    /// CPU deadline: a module whose `cachegw_abi_version` takes longer than
    /// `policy.deadline` still loads as implementing the ABI, and one that
    /// never returns is still refused.
    #[test]
    fn the_abi_check_is_bounded_by_the_wall_deadline_not_the_call_deadline() {
        // `cachegw_abi_version` counts down from $n before it answers 1.
        let module = |n: u64| {
            wat::parse_str(format!(
                r#"(module
                    (memory (export "memory") 1)
                    (func (export "cachegw_abi_version") (result i32) (local $i i64)
                        (local.set $i (i64.const {n}))
                        (block $done (loop $again
                            (br_if $done (i64.eqz (local.get $i)))
                            (local.set $i (i64.sub (local.get $i) (i64.const 1)))
                            (br $again)))
                        (i32.const 1))
                    (func (export "cachegw_alloc") (param i32) (result i32) (i32.const 0))
                    (func (export "cachegw_decide") (param i32 i32) (result i64) (i64.const 0)))"#
            ))
            .unwrap()
        };
        let engine = Arc::new(
            PolicyEngine::new(&PolicyEngineConfig {
                deadline: Duration::from_millis(1),
                wall_deadline: Some(Duration::from_secs(3)),
                compile_cache_dir: None,
                ..PolicyEngineConfig::default()
            })
            .unwrap(),
        );
        // Far more than 1 ms of CPU on any machine, far less than 3 s.
        let slow = engine.load("slow-abi", &module(20_000_000)).unwrap();
        assert_eq!(slow.abi().err(), None, "a slow check is still a pass");
        let looping = engine.load("looping-abi", &module(u64::MAX)).unwrap();
        assert!(
            looping.abi().is_err(),
            "a check that never answers is a fault"
        );
    }

    #[test]
    fn output_is_a_decision_a_refusal_or_a_fault() {
        let decision = pb::PolicyDecision {
            storage_key: "k".into(),
            ..Default::default()
        };
        let output = |result| pb::PolicyOutput { result }.encode_to_vec();
        assert_eq!(
            decode_output(&output(Some(pb::policy_output::Result::Decision(
                decision.clone()
            )))),
            Ok(decision)
        );
        assert_eq!(
            decode_output(&output(Some(pb::policy_output::Result::Error("no".into())))),
            Err(Fault::Declined("no".into()))
        );
        assert!(matches!(
            decode_output(&output(None)),
            Err(Fault::Output(_))
        ));
        assert!(matches!(
            decode_output(&[0xFF, 0xFF]),
            Err(Fault::Output(_))
        ));
    }
}
