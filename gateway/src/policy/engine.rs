//! The WebAssembly engine: one wasmtime `Engine` for the process, modules
//! compiled once and checked against the ABI (docs/POLICY_ABI.md), and every
//! call run in a fresh instance from the pooling allocator, under an epoch
//! deadline and a memory cap, with no capability but a bounded log call.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message;
use tracing::{Level, debug, error, info, trace, warn};
use wasmtime::{
    Caller, Config, Enabled, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker,
    Module, ModuleExport, PoolingAllocationConfig, ResourceLimiter, Store, Trap, ValType,
};

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
    deadline_ticks: u64,
    ticker_stop: Arc<AtomicBool>,
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

        let ticks = limits.deadline.as_micros().div_ceil(EPOCH_TICK.as_micros());
        Ok(Self {
            engine,
            linker,
            limits: limits.clone(),
            deadline_ticks: u64::try_from(ticks).unwrap_or(u64::MAX).max(1),
            ticker_stop,
        })
    }

    /// The limits calls run under.
    pub fn limits(&self) -> &PolicyEngineConfig {
        &self.limits
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
        let module = Module::new(&self.engine, bytes)
            .map_err(|err| LoadError::Compile(format!("{err:#}")))?;
        check_imports(&module)?;
        let version = content_version(bytes);
        let instance_pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|err| LoadError::Imports(format!("{err:#}")))?;
        let exports = Exports::find(&module);
        let mut loaded = PolicyModule {
            engine: Arc::clone(self),
            name: Arc::from(name),
            version: Arc::from(version.as_str()),
            label: Arc::from(format!("{name}@{version}").as_str()),
            instance_pre,
            exports: exports.clone().map_err(Fault::Abi),
            size: bytes.len(),
        };
        if loaded.exports.is_ok()
            && let Err(fault) = loaded.check_abi_version()
        {
            loaded.exports = Err(fault);
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

    fn new_store(&self, label: &Arc<str>) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                label: Arc::clone(label),
                memory_limit: self.limits.memory_limit_bytes,
                memory_capped: false,
                log_calls: 0,
                max_log_calls: self.limits.max_log_calls,
            },
        );
        store.limiter(|state| state);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        store
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

/// A compiled policy, ready to be called.
pub struct PolicyModule {
    engine: Arc<PolicyEngine>,
    name: Arc<str>,
    version: Arc<str>,
    label: Arc<str>,
    instance_pre: InstancePre<HostState>,
    exports: Result<Exports, Fault>,
    size: usize,
}

impl fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyModule")
            .field("label", &self.label)
            .field("size", &self.size)
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

    /// Size of the module in bytes.
    pub fn size(&self) -> usize {
        self.size
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
        let mut store = self.engine.new_store(&self.label);
        let outcome = (|| {
            let instance = self.instance_pre.instantiate(&mut store)?;
            let version = instance
                .get_module_export(&mut store, &exports.abi_version)
                .and_then(|export| export.into_func())
                .ok_or_else(|| wasmtime::Error::msg("cachegw_abi_version vanished"))?
                .typed::<(), i32>(&store)?
                .call(&mut store, ())?;
            Ok::<_, wasmtime::Error>(version)
        })();
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

    /// Asks the policy for a decision on `input`, in a fresh instance.
    pub fn decide(&self, input: &pb::PolicyInput) -> Result<pb::PolicyDecision, Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        let output = self.call(exports, &exports.decide, &input.encode_to_vec())?;
        decode_output(&output)
    }

    /// Runs the optional init export on a binding's config. `Ok(None)` when the
    /// config is accepted (or there is no init export), `Ok(Some(reason))` when
    /// the policy rejects it.
    pub fn init(&self, config: &[u8]) -> Result<Option<String>, Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        let Some(init) = &exports.init else {
            return Ok(None);
        };
        let output = self.call(exports, init, config)?;
        let output = pb::InitOutput::decode(output.as_slice())
            .map_err(|err| Fault::Output(format!("not an InitOutput: {err}")))?;
        Ok((!output.error.is_empty()).then_some(output.error))
    }

    /// One call: instantiate, allocate, write the input, call, read the output.
    fn call(
        &self,
        exports: &Exports,
        entry: &ModuleExport,
        input: &[u8],
    ) -> Result<Vec<u8>, Fault> {
        let mut store = self.engine.new_store(&self.label);
        let result = self
            .instance_pre
            .instantiate(&mut store)
            .and_then(|instance| invoke(&mut store, &instance, exports, entry, input));
        result.map_err(|err| fault_of(err, store.data()))
    }

    /// Measures `calls` decisions on `input`, reporting each one's latency to
    /// `record`. With `reuse`, one instance serves every call (what a "reset
    /// instance" strategy would cost at best, with no isolation); without, each
    /// call gets a fresh instance, as in production.
    pub fn measure(
        &self,
        input: &pb::PolicyInput,
        calls: u64,
        reuse: bool,
        mut record: impl FnMut(Duration, Option<Fault>),
    ) -> Result<(), Fault> {
        let exports = self.exports.as_ref().map_err(Clone::clone)?;
        let input = input.encode_to_vec();
        if !reuse {
            for _ in 0..calls {
                let started = Instant::now();
                let fault = self.call(exports, &exports.decide, &input).err();
                record(started.elapsed(), fault);
            }
            return Ok(());
        }
        let mut store = self.engine.new_store(&self.label);
        let instance = self
            .instance_pre
            .instantiate(&mut store)
            .map_err(|err| fault_of(err, store.data()))?;
        for _ in 0..calls {
            let started = Instant::now();
            store.set_epoch_deadline(self.engine.deadline_ticks);
            let fault = invoke(&mut store, &instance, exports, &exports.decide, &input)
                .err()
                .map(|err| fault_of(err, store.data()));
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

/// Allocates in the guest, writes `input`, calls `entry`, reads the output.
fn invoke(
    store: &mut Store<HostState>,
    instance: &wasmtime::Instance,
    exports: &Exports,
    entry: &ModuleExport,
    input: &[u8],
) -> wasmtime::Result<Vec<u8>> {
    let memory = instance
        .get_module_export(&mut *store, &exports.memory)
        .and_then(|export| export.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("memory export vanished"))?;
    let mut func = |export: &ModuleExport| {
        instance
            .get_module_export(&mut *store, export)
            .and_then(|export| export.into_func())
            .ok_or_else(|| wasmtime::Error::msg("function export vanished"))
    };
    let (alloc, entry) = (func(&exports.alloc)?, func(entry)?);
    let alloc = alloc.typed::<i32, i32>(&*store)?;
    let entry = entry.typed::<(i32, i32), i64>(&*store)?;

    let len = i32::try_from(input.len()).map_err(|_| OutputError("input too large".into()))?;
    let ptr = alloc.call(&mut *store, len)?;
    if ptr == 0 {
        return Err(OutputError("cachegw_alloc returned 0".into()).into());
    }
    memory
        .write(&mut *store, ptr as u32 as usize, input)
        .map_err(|_| OutputError(format!("cachegw_alloc returned {ptr:#x}, outside memory")))?;
    let packed = entry.call(&mut *store, (ptr, len))? as u64;
    let (out_ptr, out_len) = ((packed >> 32) as usize, (packed & 0xFFFF_FFFF) as usize);
    let data = memory.data(&*store);
    let end = out_ptr
        .checked_add(out_len)
        .filter(|end| *end <= data.len())
        .ok_or_else(|| {
            OutputError(format!(
                "output at {out_ptr:#x}+{out_len} lies outside the {}-byte memory",
                data.len()
            ))
        })?;
    Ok(data[out_ptr..end].to_vec())
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

/// Per-call host state: the memory cap and the log budget.
struct HostState {
    label: Arc<str>,
    memory_limit: usize,
    memory_capped: bool,
    log_calls: u32,
    max_log_calls: u32,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_capped = true;
            return Ok(false);
        }
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
