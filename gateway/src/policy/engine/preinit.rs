//! Pre-initialised images: a module's instance snapshotted once
//! `cachegw_init` has run on a binding's config, so that every call of the
//! binding starts from that state (for an SDK policy: the policy value built,
//! the config parsed) instead of the module's, and skips `from_config`.
//!
//! wasmtime-wizer makes the image: its `instrument` exports the module's
//! memories and mutable globals (the engine compiles a module so when it
//! loads it, [`instrument`]), `cachegw_init` runs in an instance of that
//! under the usual limits (deadline, memory cap, fault handling), and its
//! `snapshot` writes what they hold into a new module (data segments, global
//! initialisers), compiled like any other. The engine reads the state itself
//! ([`Snapshotted`]): wizer's own wasmtime glue would turn on wasmtime
//! features the gateway does not use.
//!
//! Nothing else changes: each call is a fresh instance, of the image instead
//! of the module. The contract that makes this safe is the ABI's (a decision
//! is the same whether or not its instance ran `cachegw_init` first; the SDK
//! keeps the policy value only for the config it was built from).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    time::{Duration, Instant},
};

use wasmtime::{Instance, Module, Store, Val};
use wasmtime_wizer::{InstanceState, SnapshotVal, ValType, Wizer};

use super::{
    CpuMeter, Exports, Fault, Handles, HostState, PolicyModule, Yields, export_func, fault_of,
    init_verdict, invoke, metered, reserve,
};

/// `wasm` with its memories and mutable globals exported under wizer's
/// names, or why wizer cannot snapshot it.
pub(super) fn instrument(wasm: &[u8]) -> Result<Vec<u8>, String> {
    // wizer asserts what it expects of a valid module; a module that breaks
    // one must cost the binding its image, not the load.
    catch_unwind(|| Wizer::new().instrument(wasm))
        .map_err(|_| "wizer panicked while instrumenting it".to_owned())?
        .map(|(_, instrumented)| instrumented)
        .map_err(|err| format!("{err:#}"))
}

/// What a pre-initialised image cost to make.
#[derive(Debug, Clone, Copy)]
pub struct Preinit {
    /// Size of the image module (its code and the initialised memory).
    pub image_bytes: usize,
    /// Instrumenting, compiling, running `cachegw_init`, snapshotting and
    /// compiling the image.
    pub took: Duration,
    /// A buffer `cachegw_alloc` reserved just before the snapshot, so that
    /// every instance of the image starts with it pending: a decision whose
    /// input fits is written there and needs no `cachegw_alloc` call.
    pub input_buffer: Option<InputBuffer>,
}

/// Where an image's reserved input buffer lies ([`Preinit::input_buffer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputBuffer {
    /// Its address in the image's memory.
    pub address: u32,
    /// Its length: inputs up to this many bytes use it.
    pub capacity: u32,
}

/// The input buffer an image reserves: a `PolicyInput` of a 1 KiB key with
/// a few attributes and a config of a few KiB fits; a larger one is
/// allocated by its call as without an image.
const INPUT_BUFFER_BYTES: u32 = 8 * 1024;

/// Why a module could not be pre-initialised (its calls then start from the
/// module itself, as without pre-initialisation).
#[derive(Debug, thiserror::Error)]
pub enum PreinitError {
    /// Nothing to pre-initialise.
    #[error("it exports no cachegw_init")]
    NoInit,
    /// The module does not implement the ABI: every call faults anyway.
    #[error("{0}")]
    Abi(Fault),
    /// wizer cannot snapshot this module (table mutations, imported
    /// memories, reference-typed globals...).
    #[error("its state cannot be snapshotted: {0}")]
    Unsupported(String),
    /// `cachegw_init` faulted.
    #[error("cachegw_init {0}")]
    Init(Fault),
    /// `cachegw_init` rejected the config.
    #[error("cachegw_init rejects the config: {0}")]
    Rejected(String),
    /// The image is over `policy.max_module_bytes`.
    #[error("its image is {size} bytes, over policy.max_module_bytes ({limit} bytes)")]
    TooLarge {
        /// The image's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The image does not compile or link.
    #[error("its image does not compile: {0}")]
    Compile(String),
}

impl PolicyModule {
    /// This policy, with every call starting from the state `cachegw_init`
    /// left on `config` rather than from the module's: an image of the
    /// module, with its name, version and label. Blocks this thread for an
    /// init call and a compilation (through the engine's compile cache).
    pub fn preinitialized(&self, config: &[u8]) -> Result<PolicyModule, PreinitError> {
        let started = Instant::now();
        let exports = self
            .exports
            .as_ref()
            .map_err(|f| PreinitError::Abi(f.clone()))?;
        let Some(init) = &exports.init else {
            return Err(PreinitError::NoInit);
        };
        let wasm = self
            .image_source
            .as_ref()
            .map_err(|reason| PreinitError::Unsupported(reason.clone()))?;
        let engine = &self.engine;
        // What `load` compiled: the same instrumentation, and the context
        // wizer needs to read its state.
        let wizer = Wizer::new();
        let (context, _) = wizer
            .instrument(wasm)
            .map_err(|err| PreinitError::Unsupported(format!("{err:#}")))?;
        let meter = Arc::new(CpuMeter::default());
        let mut store = engine.new_store(&self.label, Arc::clone(&meter), Yields::Anywhere, None);
        let initialised = futures::executor::block_on(metered(&meter, async {
            let instance = self.instance_pre.instantiate(&mut store)?;
            store.data_mut().on_fiber = true;
            let handles = Handles::resolve(&mut store, &instance, exports)?;
            let init = export_func(&mut store, &instance, init)?.typed(&store)?;
            let verdict = invoke(&mut store, &handles, &init, config, init_verdict, None).await?;
            Ok::<_, wasmtime::Error>((instance, handles, verdict))
        }));
        let (instance, handles, verdict) =
            initialised.map_err(|err| PreinitError::Init(fault_of(err, store.data())))?;
        if let Some(reason) = verdict.map_err(PreinitError::Init)? {
            return Err(PreinitError::Rejected(reason));
        }
        // A module that cannot spare the bytes just gets no buffer.
        let input_buffer = futures::executor::block_on(metered(
            &meter,
            reserve(&mut store, &handles, INPUT_BUFFER_BYTES),
        ))
        .ok()
        .map(|address| InputBuffer {
            address,
            capacity: INPUT_BUFFER_BYTES,
        });

        // As in `instrument`: a broken assertion costs the image, not the bind.
        let snapshot = catch_unwind(AssertUnwindSafe(|| {
            futures::executor::block_on(wizer.snapshot(
                &context,
                &mut Snapshotted {
                    store: &mut store,
                    instance,
                },
            ))
        }))
        .map_err(|_| PreinitError::Unsupported("wizer panicked while snapshotting".into()))?
        .map_err(|err| PreinitError::Unsupported(format!("{err:#}")))?;
        let limit = engine.limits.max_module_bytes;
        if snapshot.len() > limit {
            return Err(PreinitError::TooLarge {
                size: snapshot.len(),
                limit,
            });
        }
        // Instrumented again when its instances are to be recycled: the
        // snapshot no longer exports the globals a reset writes back.
        let recycled_image = if engine.recycling {
            instrument(&snapshot)
        } else {
            Err("recycling is off".to_owned())
        };
        let compiled = recycled_image.as_deref().unwrap_or(&snapshot);
        let image = Module::new(&engine.engine, compiled)
            .map_err(|err| PreinitError::Compile(format!("{err:#}")))?;
        let instance_pre = engine
            .linker
            .instantiate_pre(&image)
            .map_err(|err| PreinitError::Compile(format!("{err:#}")))?;
        let exports = Exports::find(&image).map_err(PreinitError::Compile)?;
        Ok(PolicyModule {
            engine: Arc::clone(engine),
            name: Arc::clone(&self.name),
            version: Arc::clone(&self.version),
            label: Arc::clone(&self.label),
            decided_by: self.decided_by,
            instance_pre,
            exports: Ok(exports),
            size: self.size,
            image_source: Err("it is an image already".to_owned()),
            preinit: Some(Preinit {
                image_bytes: snapshot.len(),
                took: started.elapsed(),
                input_buffer,
            }),
            recycler: engine
                .recycler_for(&image, recycled_image.as_deref().map_err(String::as_str)),
        })
    }
}

/// An initialised instance of an instrumented module, as wizer reads it:
/// the memories and mutable globals `instrument` exported.
struct Snapshotted<'a> {
    store: &'a mut Store<HostState>,
    instance: Instance,
}

impl InstanceState for Snapshotted<'_> {
    async fn global_get(&mut self, name: &str, _: ValType) -> SnapshotVal {
        let global = self
            .instance
            .get_global(&mut *self.store, name)
            .expect("wizer's instrument exports every mutable global");
        match global.get(&mut *self.store) {
            Val::I32(value) => SnapshotVal::I32(value),
            Val::I64(value) => SnapshotVal::I64(value),
            Val::F32(bits) => SnapshotVal::F32(bits),
            Val::F64(bits) => SnapshotVal::F64(bits),
            Val::V128(value) => SnapshotVal::V128(value.as_u128()),
            other => panic!("wizer refuses reference-typed globals, got {other:?}"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        let memory = self
            .instance
            .get_memory(&mut *self.store, name)
            .expect("wizer's instrument exports every memory");
        contents(memory.data(&*self.store));
    }
}
