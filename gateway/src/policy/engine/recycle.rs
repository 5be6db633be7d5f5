//! Recycled instances: an instance kept after a call and put back to the
//! exact state its module starts every instance in, so that the next call
//! of the same module skips instantiating one and resetting a pool slot.
//!
//! An instance's whole state is its memories, its globals and its tables
//! (and, with some proposals, dropped segments and GC objects). A module
//! that wizer's `instrument` accepts mutates none but the first two: wizer
//! refuses every instruction that changes a table or drops a segment,
//! imported memories, tables and globals, and reference-typed mutable
//! globals, and it exports every memory and mutable global. For such a
//! module (one memory, as every Rust policy has), writing back the globals'
//! starting values and the memory's starting bytes wherever the call
//! changed them gives an instance no call can tell from a new one. Which
//! pages a call changed, the kernel says: `PAGEMAP_SCAN` (Linux 6.7+) lists
//! the pages of the memory that hold private data (a page only read is
//! still the image's file page or the shared zero page), as wasmtime's own
//! slot reset does; one `ioctl` and a copy of those pages per call.
//!
//! A call that faulted, that grew the memory, or whose reset fails drops its
//! instance instead; the next call instantiates a new one.

#[cfg(target_os = "linux")]
use std::fs::File;
use std::{
    io,
    ops::Range,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use wasmtime::{Global, Instance, Module, Store, Val};

use super::{Handles, HostState, write_watch::WriteWatch};

/// The instrumented export naming a module's only memory.
const MEMORY_EXPORT: &str = "__wizer_memory_0";
/// The prefix of the instrumented exports naming its mutable globals.
const GLOBAL_EXPORT_PREFIX: &str = "__wizer_global_";

/// What a module offers for its instances to be recycled: the names of
/// its mutable globals, as wizer exported them, and the bytes its memory
/// starts with.
pub(super) struct Recyclable {
    globals: Vec<String>,
    memory: Box<[u8]>,
}

impl Recyclable {
    /// Whether instances of `module`, compiled from `wasm` (wizer's
    /// instrumentation of a module), can be recycled: exactly one memory
    /// (`__wizer_memory_0`, no `__wizer_memory_1`), no start function (what
    /// an instance starts with is then the module's data, nothing run), and
    /// data at constant offsets. Else why not.
    pub(super) fn of(module: &Module, wasm: &[u8]) -> Result<Recyclable, String> {
        let mut memories = 0;
        let mut globals = Vec::new();
        for export in module.exports() {
            if export.name().starts_with("__wizer_memory_") {
                memories += 1;
            } else if export.name().starts_with(GLOBAL_EXPORT_PREFIX) {
                globals.push(export.name().to_owned());
            }
        }
        if memories != 1 || module.get_export(MEMORY_EXPORT).is_none() {
            return Err(format!("it has {memories} memories, not one"));
        }
        let memory = starting_memory(wasm).ok_or(
            "what its memory starts with is not its data alone (a start function, or data at an \
             offset that is not a constant)",
        )?;
        Ok(Recyclable { globals, memory })
    }
}

/// The bytes a module's one memory starts with, as instantiation lays them
/// out: its initial size in zeros, each active data segment copied in at
/// its offset. `None` when a start function could change them, or an offset
/// is not a constant.
fn starting_memory(wasm: &[u8]) -> Option<Box<[u8]>> {
    use wasmparser::{DataKind, Operator, Parser, Payload};
    let mut memory: Option<Vec<u8>> = None;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.ok()? {
            Payload::StartSection { .. } => return None,
            Payload::MemorySection(section) => {
                let ty = section.into_iter().next()?.ok()?;
                let page = 1u64 << ty.page_size_log2.unwrap_or(16);
                memory = Some(vec![
                    0;
                    usize::try_from(ty.initial.checked_mul(page)?).ok()?
                ]);
            }
            Payload::DataSection(section) => {
                let memory = memory.as_mut()?;
                for data in section {
                    let data = data.ok()?;
                    let DataKind::Active {
                        memory_index: 0,
                        offset_expr,
                    } = data.kind
                    else {
                        continue;
                    };
                    let mut ops = offset_expr.get_operators_reader();
                    let offset = match (ops.read().ok()?, ops.read().ok()?) {
                        (Operator::I32Const { value }, Operator::End) => u64::from(value as u32),
                        (Operator::I64Const { value }, Operator::End) => value as u64,
                        _ => return None,
                    };
                    let start = usize::try_from(offset).ok()?;
                    memory
                        .get_mut(start..start.checked_add(data.data.len())?)?
                        .copy_from_slice(data.data);
                }
            }
            _ => {}
        }
    }
    memory.map(Vec::into_boxed_slice)
}

/// An instance between calls, with its handles: those its calls use, and
/// its mutable globals, which its reset writes back.
pub(super) struct Kept {
    pub(super) store: Store<HostState>,
    pub(super) instance: Instance,
    pub(super) handles: Handles,
    pub(super) globals: Vec<Global>,
}

/// One compiled module's kept instances.
pub(super) struct Recycler {
    recyclable: Recyclable,
    /// The globals' values in an instance no call has run in.
    starting_globals: OnceLock<Vec<Val>>,
    idle: Mutex<Vec<Kept>>,
    /// Most instances kept idle for this module.
    max_idle: usize,
    /// Instances kept idle for every module of the engine, and their bound
    /// (a kept instance holds a pool slot other modules may need).
    engine_idle: Arc<IdleBudget>,
    /// Whether kept instances' memories are watched for writes
    /// ([`WriteWatch`]) rather than scanned after every call. Turned off
    /// for the module (with a warning) the first time a watch cannot be
    /// started, so that its resets do not try again on every call.
    track_writes: AtomicBool,
}

/// Pool slots the engine's kept instances may hold between them.
#[derive(Debug)]
pub(super) struct IdleBudget {
    held: AtomicUsize,
    limit: usize,
}

impl IdleBudget {
    /// A quarter of the pool's slots: the rest stay free for new instances.
    pub(super) fn new(max_instances: u32) -> Arc<IdleBudget> {
        Arc::new(IdleBudget {
            held: AtomicUsize::new(0),
            limit: (max_instances as usize / 4).max(1),
        })
    }

    fn take_one(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.limit).then_some(held + 1)
            })
            .is_ok()
    }

    fn give_back(&self, count: usize) {
        self.held.fetch_sub(count, Ordering::AcqRel);
    }
}

impl Recycler {
    pub(super) fn new(
        recyclable: Recyclable,
        engine_idle: Arc<IdleBudget>,
        track_writes: bool,
    ) -> Recycler {
        // A call holds its thread from start to end (a long call yields, but
        // its instance stays its own), so about one idle instance per thread
        // that polls calls serves every call.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Recycler {
            recyclable,
            starting_globals: OnceLock::new(),
            idle: Mutex::new(Vec::new()),
            max_idle: (threads * 2).min(16),
            engine_idle,
            track_writes: AtomicBool::new(track_writes),
        }
    }

    /// Whether its resets learn the written pages from write faults (else
    /// they scan after every call).
    pub(super) fn tracks_writes(&self) -> bool {
        self.track_writes.load(Ordering::Relaxed)
    }

    /// How many instances are idle.
    pub(super) fn idle(&self) -> usize {
        self.idle.lock().expect("never poisoned").len()
    }

    /// For each idle instance, how many pages its write watch has noted
    /// (`None`: not watched).
    #[cfg(test)]
    pub(super) fn watched_pages(&self) -> Vec<Option<usize>> {
        self.idle
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|kept| {
                kept.store
                    .data()
                    .write_watch
                    .as_ref()
                    .map(WriteWatch::written_pages)
            })
            .collect()
    }

    /// An idle instance, in its starting state.
    pub(super) fn take(&self) -> Option<Kept> {
        let kept = self.idle.lock().expect("never poisoned").pop()?;
        self.engine_idle.give_back(1);
        Some(kept)
    }

    /// Notes the values the globals start with, from `instance` before any
    /// call ran in it (the first instance is enough: they all start alike).
    /// The memory's starting bytes come from the module itself: reading them
    /// from an instance would map every page of its memory, and each page
    /// mapped makes every later `PAGEMAP_SCAN` of it slower.
    pub(super) fn note_start(&self, store: &mut Store<HostState>, instance: &Instance) {
        if self.starting_globals.get().is_some() {
            return;
        }
        let Some(globals) = self.globals(store, instance) else {
            return;
        };
        let values = globals
            .iter()
            .map(|global| global.get(&mut *store))
            .collect();
        let _ = self.starting_globals.set(values);
    }

    /// Puts an instance whose call ended well back to its starting state and
    /// keeps it for the next call, or drops it: when its memory grew, when
    /// the reset cannot be done, or when enough instances are idle.
    /// `globals` are its globals' handles, if it was kept before.
    pub(super) fn recycle(
        &self,
        mut store: Store<HostState>,
        instance: Instance,
        handles: Handles,
        globals: Option<Vec<Global>>,
    ) {
        let Some(globals_at_start) = self.starting_globals.get() else {
            return;
        };
        let Some(globals) = globals.or_else(|| self.globals(&mut store, &instance)) else {
            return;
        };
        if self.idle.lock().expect("never poisoned").len() >= self.max_idle
            || !self.engine_idle.take_one()
        {
            return;
        }
        let mut kept = Kept {
            store,
            instance,
            handles,
            globals,
        };
        match reset(
            &mut kept,
            &self.recyclable.memory,
            globals_at_start,
            &self.track_writes,
        ) {
            Ok(()) => self.idle.lock().expect("never poisoned").push(kept),
            Err(reason) => {
                self.engine_idle.give_back(1);
                tracing::debug!(policy = %kept.store.data().label, %reason, "instance not recycled");
            }
        }
    }

    fn globals(&self, store: &mut Store<HostState>, instance: &Instance) -> Option<Vec<Global>> {
        self.recyclable
            .globals
            .iter()
            .map(|name| instance.get_global(&mut *store, name))
            .collect()
    }
}

impl Drop for Recycler {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map_or(0, |idle| idle.len());
        self.engine_idle.give_back(idle);
    }
}

/// Writes the starting state back into `kept`: every page of its memory
/// that a call may have written gets the starting bytes, every global its
/// starting value. Which pages: those its [`WriteWatch`] has noted, else
/// (the first reset of an instance, or without `track_writes`) those the
/// kernel reports as holding private data; with `track_writes`, the first
/// reset then starts the watch (and, if it cannot, turns `track_writes` off).
fn reset(
    kept: &mut Kept,
    memory_at_start: &[u8],
    globals_at_start: &[Val],
    track_writes_flag: &AtomicBool,
) -> Result<(), String> {
    // The watch is taken out of the store while its memory is borrowed, and
    // put back after; on an error it drops (the instance goes too).
    let watch = kept.store.data_mut().write_watch.take();
    // The module has one memory (`Recyclable::of`): the one its calls use.
    let data = kept.handles.memory.data_mut(&mut kept.store);
    if data.len() != memory_at_start.len() {
        return Err(format!(
            "its memory grew from {} to {} bytes",
            memory_at_start.len(),
            data.len()
        ));
    }
    let watch = match watch {
        Some(watch) => {
            watch.each_written(|pages| {
                data[pages.clone()].copy_from_slice(&memory_at_start[pages]);
            });
            Some(watch)
        }
        None => {
            let track_writes = track_writes_flag.load(Ordering::Relaxed);
            let (address, len) = (data.as_ptr() as u64, data.len());
            let mut written = Vec::new();
            written_pages(address, len, |pages| {
                data[pages.clone()].copy_from_slice(&memory_at_start[pages.clone()]);
                if track_writes {
                    written.push(pages);
                }
            })
            .map_err(|err| format!("PAGEMAP_SCAN failed: {err}"))?;
            // Those pages stay writable (every reset copies them); every
            // other page is protected until a call writes it.
            match track_writes.then(|| WriteWatch::start(address, len, &written)) {
                Some(Ok(watch)) => Some(watch),
                Some(Err(err)) => {
                    stop_tracking_writes(track_writes_flag, &err.to_string());
                    None
                }
                None => None,
            }
        }
    };
    kept.store.data_mut().write_watch = watch;
    for (global, value) in kept.globals.iter().zip(globals_at_start) {
        global
            .set(&mut kept.store, *value)
            .map_err(|err| format!("cannot set a global back: {err:#}"))?;
    }
    Ok(())
}

/// Turns write tracking off for a module whose memory could not be watched,
/// saying so once.
fn stop_tracking_writes(track_writes: &AtomicBool, cause: &str) {
    if track_writes.swap(false, Ordering::Relaxed) {
        tracing::warn!(
            %cause,
            "a policy instance's memory cannot be watched for writes: this module's resets scan \
             with PAGEMAP_SCAN after every call"
        );
    }
}

/// Whether this kernel answers `PAGEMAP_SCAN` for this process.
pub(super) fn available() -> bool {
    written_pages(0, 0, |_| {}).is_ok()
}

/// Calls `each` with the offsets (from `base`) of every run of pages of the
/// `len` bytes at `base` that hold private data: present or swapped out,
/// and neither a file's page (the image's, as the module's instances map
/// it) nor the shared zero page. A page no call wrote is one of those, or
/// not there at all.
#[cfg(target_os = "linux")]
fn written_pages(base: u64, len: usize, mut each: impl FnMut(Range<usize>)) -> io::Result<()> {
    static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();
    let pagemap = PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").ok())
        .as_ref()
        .ok_or_else(|| io::Error::other("/proc/self/pagemap cannot be opened"))?;
    let end = base + len as u64;
    let mut start = base;
    loop {
        let walk_end = pagemap_scan::private_pages(pagemap, start..end, |pages| {
            each((pages.start - base) as usize..(pages.end - base) as usize)
        })?;
        // The scan stops early when its buffer of regions is full.
        if walk_end >= end || walk_end <= start {
            return Ok(());
        }
        start = walk_end;
    }
}

/// Elsewhere than Linux no kernel says which pages were written: instances
/// are never recycled.
#[cfg(not(target_os = "linux"))]
fn written_pages(_: u64, _: usize, _: impl FnMut(Range<usize>)) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "PAGEMAP_SCAN is Linux's",
    ))
}

/// The `PAGEMAP_SCAN` ioctl: the gateway's one use of `unsafe`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod pagemap_scan {
    use std::{fs::File, io, mem::MaybeUninit, ops::Range, os::fd::AsRawFd};

    use linux_raw_sys::general::{
        PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, page_region, pm_scan_arg,
    };

    /// `_IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h).
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((size_of::<pm_scan_arg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

    /// Scans `range` for pages that are present or swapped, and neither a
    /// file's page nor the zero page, passing each run found to `each`;
    /// returns where the kernel stopped (before the end when 32 runs filled
    /// its buffer).
    pub(super) fn private_pages(
        pagemap: &File,
        range: Range<u64>,
        mut each: impl FnMut(Range<u64>),
    ) -> io::Result<u64> {
        let mut regions = [MaybeUninit::<page_region>::uninit(); 32];
        let mut arg = pm_scan_arg {
            size: size_of::<pm_scan_arg>() as u64,
            flags: 0,
            start: range.start,
            end: range.end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            // Neither a file page nor the zero page...
            category_inverted: u64::from(PAGE_IS_FILE | PAGE_IS_PFNZERO),
            category_mask: u64::from(PAGE_IS_FILE | PAGE_IS_PFNZERO),
            // ...and there, in memory or in swap.
            category_anyof_mask: u64::from(PAGE_IS_PRESENT | PAGE_IS_SWAPPED),
            return_mask: 0,
        };
        // SAFETY: `arg` is a valid `pm_scan_arg`, its `size` this struct's,
        // and its `vec` points at `regions`: `vec_len` entries the kernel may
        // write. The kernel reads the page tables of `range` (any range, even
        // one not mapped) and touches none of its pages.
        let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if found < 0 {
            return Err(io::Error::last_os_error());
        }
        for region in &regions[..found as usize] {
            // SAFETY: the ioctl returned how many entries it wrote.
            let region = unsafe { region.assume_init() };
            each(region.start..region.end);
        }
        Ok(arg.walk_end)
    }
}

#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::*;
    use crate::{
        api::proto::policy as pb,
        config::PolicyEngineConfig,
        policy::engine::{Fault, PolicyEngine, PolicyModule},
    };

    /// A policy whose every call changes its state, and whose decision shows
    /// the state it started from: storage key `k` and three digits, the
    /// calls counted in a mutable global, in a data byte (page 0) and in a
    /// byte of zero memory on one of ten pages (1 to 10 of its 4 KiB pages),
    /// chosen by the input's length, each including this call. In a fresh
    /// instance, and in a recycled one, the key is always `k111`. An input of
    /// over 100 bytes also grows the memory; one of exactly 50 bytes traps,
    /// after counting.
    const STATEFUL: &str = r#"
        (module
          (memory (export "memory") 1)
          (global $calls (mut i32) (i32.const 0))
          ;; PolicyOutput { decision: { storage_key: "k???" } }
          (data (i32.const 0) "\0a\06\0a\04k")
          (func (export "cachegw_abi_version") (result i32) (i32.const 1))
          (func (export "cachegw_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "cachegw_decide") (param $ptr i32) (param $len i32) (result i64)
            (local $at i32)
            (local.set $at (i32.add (i32.const 6000)
              (i32.mul (i32.rem_u (local.get $len) (i32.const 10)) (i32.const 4096))))
            (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
            (i32.store8 (i32.const 16) (i32.add (i32.load8_u (i32.const 16)) (i32.const 1)))
            (i32.store8 (local.get $at) (i32.add (i32.load8_u (local.get $at)) (i32.const 1)))
            (i32.store8 (i32.const 5) (i32.add (global.get $calls) (i32.const 48)))
            (i32.store8 (i32.const 6) (i32.add (i32.load8_u (i32.const 16)) (i32.const 48)))
            (i32.store8 (i32.const 7) (i32.add (i32.load8_u (local.get $at)) (i32.const 48)))
            (if (i32.gt_u (local.get $len) (i32.const 100))
              (then (drop (memory.grow (i32.const 1)))))
            (if (i32.eq (local.get $len) (i32.const 50))
              (then unreachable))
            ;; the output: 8 bytes at address 0
            (i64.const 8)))
    "#;

    /// An input `len` bytes long, encoded.
    fn input(len: usize) -> pb::PolicyInput {
        (1..len)
            .map(|key_len| pb::PolicyInput {
                op: pb::Operation::Get as i32,
                namespace: "ns".into(),
                key: "x".repeat(key_len),
                ..Default::default()
            })
            .find(|input| input.encoded_len() == len)
            .expect("a key that long")
    }

    /// `STATEFUL`, loaded in an engine of its own with recycling on or off,
    /// and with writes tracked by faults or by scans.
    fn stateful(recycle_instances: bool, track_writes: bool) -> PolicyModule {
        let engine = Arc::new(
            PolicyEngine::new(&PolicyEngineConfig {
                compile_cache_dir: None,
                recycle_instances,
                track_writes,
                ..PolicyEngineConfig::default()
            })
            .unwrap(),
        );
        engine
            .load("stateful", &wat::parse_str(STATEFUL).unwrap())
            .unwrap()
    }

    /// Every call of a recycled instance starts from the state a new
    /// instance starts in (memory, data and zero pages, globals), whether
    /// its reset learns the written pages from write faults or from scans,
    /// including pages that no earlier call wrote; a call that grows the
    /// memory or faults takes its instance with it.
    #[test]
    fn a_recycled_instance_starts_each_call_as_a_new_one() {
        if !available() {
            eprintln!("PAGEMAP_SCAN is not available here: instances are never recycled");
            return;
        }
        let faults = match super::super::write_watch::available() {
            Ok(()) => vec![false, true],
            Err(reason) => {
                eprintln!("write faults cannot be watched here ({reason}): scans only");
                vec![false]
            }
        };
        for track_writes in faults {
            let module = stateful(true, track_writes);
            assert!(module.recycles());
            let key =
                |input: &pb::PolicyInput| module.decide_blocking(input).map(|d| d.storage_key);

            // Inputs of 10 to 19 bytes write ten different pages: after the
            // first call, each call writes a page no call has written before
            // in this instance, then ones earlier calls wrote.
            for call in 0..30 {
                assert_eq!(
                    key(&input(10 + call % 10)),
                    Ok("k111".into()),
                    "call {call}, track_writes {track_writes}"
                );
                assert_eq!(module.idle_instances(), 1, "call {call}: kept");
            }
            let watched = module.watched_pages();
            if track_writes {
                // Page 0 and the ten pages, at least: each noted by a fault
                // but the first call's, found by the first reset's scan.
                assert!(
                    matches!(watched.as_slice(), [Some(pages)] if *pages >= 11),
                    "{watched:?}"
                );
            } else {
                assert_eq!(watched, [None]);
            }
            // Growing its memory: the decision stands, the instance goes.
            assert_eq!(key(&input(200)), Ok("k111".into()));
            assert_eq!(
                module.idle_instances(),
                0,
                "an instance that grew is dropped"
            );
            assert_eq!(key(&input(10)), Ok("k111".into()));
            assert_eq!(module.idle_instances(), 1);
            // A trap: the instance goes too, and the next call starts fresh.
            assert!(matches!(key(&input(50)), Err(Fault::Trap(_))));
            assert_eq!(module.idle_instances(), 0, "a faulted instance is dropped");
            for call in 0..12 {
                assert_eq!(key(&input(11 + call % 6)), Ok("k111".into()));
            }
            assert_eq!(module.idle_instances(), 1);
        }

        // Off: a new instance per call, and the same decisions.
        let module = stateful(false, true);
        assert!(!module.recycles());
        for len in 10..13 {
            assert_eq!(
                module.decide_blocking(&input(len)).map(|d| d.storage_key),
                Ok("k111".into())
            );
        }
    }

    /// What a module's memory starts with is read from the module: zeros,
    /// with its data where its segments put it; a start function, which
    /// could change that, makes it unknown.
    #[test]
    fn starting_memory_is_the_modules_data_laid_out() {
        let memory = starting_memory(&wat::parse_str(STATEFUL).unwrap()).unwrap();
        assert_eq!(memory.len(), 65536);
        assert_eq!(&memory[..5], b"\x0a\x06\x0a\x04k");
        assert!(memory[5..].iter().all(|byte| *byte == 0));
        let started = r#"(module (memory 1) (func $f) (start $f) (data (i32.const 8) "a"))"#;
        assert_eq!(starting_memory(&wat::parse_str(started).unwrap()), None);
        let placed = r#"(module (memory 2) (data (i32.const 65535) "ab"))"#;
        let memory = starting_memory(&wat::parse_str(placed).unwrap()).unwrap();
        assert_eq!((memory.len(), &memory[65535..65537]), (131072, &b"ab"[..]));
    }

    #[test]
    fn written_pages_are_the_ones_written() {
        if !available() {
            eprintln!("PAGEMAP_SCAN is not available here; nothing to check");
            return;
        }
        const PAGE: usize = 4096;
        // An anonymous mapping of 100 pages, none touched yet.
        let len = 100 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is `len` bytes, readable and writable, ours.
        let memory = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        let scan = |memory: &[u8]| {
            let mut pages = Vec::new();
            written_pages(memory.as_ptr() as u64, memory.len(), |range| {
                assert_eq!((range.start % PAGE, range.end % PAGE), (0, 0));
                pages.extend(range.start / PAGE..range.end / PAGE);
            })
            .expect("scan");
            pages
        };
        assert_eq!(scan(memory), Vec::<usize>::new(), "nothing written yet");
        // Reading maps the zero page, which is not a write.
        let read: u32 = (0..len).step_by(PAGE).map(|at| u32::from(memory[at])).sum();
        assert_eq!(read, 0);
        assert_eq!(scan(memory), Vec::<usize>::new(), "only read");
        // 40 scattered writes: more runs than one scan's 32 regions hold.
        let written: Vec<usize> = (0..40).map(|i| i * 2 + 3).collect();
        for page in &written {
            memory[page * PAGE + 17] = 1;
        }
        assert_eq!(scan(memory), written);
        // SAFETY: unmapping what we mapped; `memory` is not used after.
        unsafe { libc::munmap(ptr, len) };
    }
}
