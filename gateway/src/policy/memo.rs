//! The decision memo: a policy instance keeps nothing across calls and can
//! reach nothing but a bounded log, so its decision is a function of its
//! input. Two requests a policy cannot tell apart get the same decision, and
//! the memo answers the second without a call.
//!
//! What makes it transparent:
//! - An entry belongs to one binding (`Binding::memo_id`): a version bound to
//!   a namespace with a config. A rebind, rollback, canary or shadow change or
//!   config change makes a new binding, which starts empty; a canary and a
//!   shadow have memos of their own.
//! - The key is everything else a policy can read: the operation, namespace,
//!   key and attributes. The clock and the value size are not in it, so a
//!   decision is kept only when the policy's SDK reported that it read
//!   neither, or the policy promised how long the decision holds
//!   (`Reuse::reusable_for_ms`; one that read the value size is then reused
//!   only for the same size). A module that reports nothing (an older SDK)
//!   is never memoised.
//! - Faults are never kept (only validated decisions are), so a fault is
//!   retried by the next identical request.
//!
//! One cache for the process (quick_cache: S3-FIFO eviction, and a read is a
//! shard read-lock and a flag, with no per-read bookkeeping to drain). A hit
//! writes almost nothing that another core reads: the read lock is one of the
//! shard's per-thread locks (quick_cache's `sharded-lock`), and the entry is
//! copied out, not shared by reference count; only a decision's tags are
//! (gateway/benches/memo.rs measures a hit on one core and on all of them).
//! The cache is bounded by `policy.memo_bytes` (weighed by each entry's key
//! and decision bytes and its overhead), shared by every binding, so the
//! bound holds however many bindings there are; bindings that go away age
//! out.
//!
//! In front of the cache, each thread that recalls keeps a [`Front`]: a
//! small table of copies of the decisions it recalled lately, found by a
//! hash of the key, with no lock and no atomic operation: a cache line per
//! copy (the keys and the promise), the rest of the input and decision in a
//! [`Shape`] that the copies of one namespace's requests share. A copy is a
//! decision the policy made for exactly that input (every field of it is
//! compared), checked against its promise like any entry, so answering
//! from it is answering from the memo, even after the cache has let the
//! entry go (a rebinding makes new inputs: its binding is part of them).
//! Only decisions that own no heap memory are copied, so a front weighs
//! exactly its slots and shapes, and the fronts' bytes are taken from
//! `policy.memo_bytes` as threads create them.
//!
//! Inserting into a full memo costs: an entry is evicted for each one kept.
//! Where inputs never repeat, that cost bought nothing and made the memo a
//! loss (0.75 of the same binding without it, docs/BENCHMARKS.md). So once
//! the memo is full, a decision is kept only for an input seen recently: the
//! [`Doorkeeper`] remembers a first sighting, and the second miss is kept.
//! Until the memo is full everything is kept, so a working set fills it at
//! once.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    mem::size_of,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use quick_cache::{Lifecycle, Weighter, sync::Cache};

use compact_str::CompactString;

use super::{Decision, DecisionRequest, Invalidation, Operation, pb};
use crate::cache::Attributes;

/// A binding's share of the memo's metrics, resolved once per binding.
#[derive(Debug, Clone, Default)]
pub struct MemoStats {
    /// Decisions answered from the memo.
    pub hits: Counter,
    /// Decisions the policy was asked for (not kept, or not there yet).
    pub misses: Counter,
    /// Entries pushed out by the byte bound.
    pub evictions: Counter,
    /// Bytes the binding's entries weigh now.
    pub bytes: Gauge,
    /// Decisions not kept because the memo was full and their input was
    /// seen for the first time lately (the [`Doorkeeper`]).
    pub first_sightings: Counter,
}

/// Remembers which inputs missed lately, in a bitmap of hashes (two bits per
/// input, a Bloom filter), so that a full memo keeps only decisions whose
/// input repeats. Cleared whenever it has taken one input per 8 bits, which
/// keeps false positives (a first sighting taken for a second) near 5% and
/// makes "lately" the last `bits / 8` first sightings.
struct Doorkeeper {
    bits: Box<[AtomicU64]>,
    /// Inputs taken since the last clear.
    taken: AtomicU64,
    hasher: foldhash::fast::RandomState,
}

impl Doorkeeper {
    /// A doorkeeper of `bits` bits (a power of two, at least 64).
    fn new(bits: usize) -> Self {
        debug_assert!(bits.is_power_of_two() && bits >= 64);
        Self {
            bits: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            taken: AtomicU64::new(0),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Whether `input` was seen since the last clear; remembers it.
    fn seen_before(&self, input: &[u8]) -> bool {
        let hash = self.hasher.hash_one(input);
        let mask = self.bits.len() * 64 - 1;
        let mut seen = true;
        for half in [hash as u32, (hash >> 32) as u32] {
            let bit = half as usize & mask;
            let word = &self.bits[bit / 64];
            let flag = 1 << (bit % 64);
            // A set bit is only read: the word is a cache line both cores
            // probe, and a write would take it from the other.
            if word.load(Ordering::Relaxed) & flag == 0 {
                seen &= word.fetch_or(flag, Ordering::Relaxed) & flag != 0;
            }
        }
        if !seen && self.taken.fetch_add(1, Ordering::Relaxed) + 1 >= (self.bits.len() * 8) as u64 {
            self.taken.store(0, Ordering::Relaxed);
            for word in &self.bits {
                word.store(0, Ordering::Relaxed);
            }
        }
        seen
    }
}

/// Whether a decision may be kept, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Not at all: an older module, or one that read the clock or the value
    /// size without promising anything.
    Never,
    /// For identical input, while the binding lasts (up to the promise, if
    /// one was made); `value_size` when the decision read it.
    For {
        /// How long, if the policy bounded it.
        promise: Option<Duration>,
        /// The value size the decision read, if it read it.
        value_size: Option<u64>,
    },
}

impl Reuse {
    /// Reads the SDK's report on a wire decision.
    pub fn of(wire: Option<&pb::Reuse>, value_size: u64) -> Reuse {
        let Some(reuse) = wire else {
            return Reuse::Never;
        };
        let promise =
            (reuse.reusable_for_ms > 0).then(|| Duration::from_millis(reuse.reusable_for_ms));
        if (reuse.read_clock || reuse.read_value_size) && promise.is_none() {
            return Reuse::Never;
        }
        Reuse::For {
            promise,
            value_size: reuse.read_value_size.then_some(value_size),
        }
    }
}

/// A kept decision. Held by value, not behind an `Arc`: a hit copies the
/// entry out under its shard's read lock, and a copy touches nothing shared,
/// where an `Arc`'s reference count is a cache line that every core hitting
/// the same entry would write in turn (gateway/benches/memo.rs).
#[derive(Clone)]
struct Entry {
    decision: Decision,
    /// The end of the policy's promise, in Unix ms ([`NO_END`]: none): it
    /// runs from the decided request's `now_unix_ms`, the time the policy saw.
    until_unix_ms: u64,
    /// The value size the decision read ([`ANY_SIZE`]: it read none).
    value_size: u64,
    weight: u32,
    /// Its binding's counters: an index into [`Series`].
    series: u32,
}

/// [`Entry::until_unix_ms`] of a decision kept without a promise. The
/// sentinels keep an entry at 128 bytes, what the compiler copies inline (a
/// hit copies one), where two `Option<u64>` took 16 bytes more.
const NO_END: u64 = u64::MAX;

/// [`Entry::value_size`] of a decision that did not read the value size (no
/// value is `u64::MAX` bytes long).
const ANY_SIZE: u64 = u64::MAX;

impl Entry {
    /// Whether the decision holds at `now_unix_ms` (read only for an entry
    /// that carries a promise) for a value of `value_size` bytes.
    fn holds(&self, value_size: u64, now_unix_ms: impl Fn() -> u64) -> bool {
        let other_size = self.value_size != ANY_SIZE && self.value_size != value_size;
        let expired = || self.until_unix_ms != NO_END && now_unix_ms() >= self.until_unix_ms;
        !other_size && !expired()
    }
}

/// An entry weighs what it was weighed at when kept.
#[derive(Clone)]
struct ByWeight;

impl Weighter<KeyBytes, Entry> for ByWeight {
    fn weight(&self, _key: &KeyBytes, entry: &Entry) -> u64 {
        u64::from(entry.weight)
    }
}

/// The bindings' counters, one set per series (policy version and
/// namespace, as the metric families count them; bounded as they are).
/// Entries name theirs by index, so a hit copies four bytes.
#[derive(Default)]
struct Series {
    ids: HashMap<(Arc<str>, String), u32>,
    stats: Vec<Arc<MemoStats>>,
}

/// Accounts for every entry that leaves the memo: quick_cache hands each one
/// here, whether the byte bound pushed it out, a newer decision for the same
/// input replaced it, or it was too heavy to keep at all. It leaves its
/// binding's bytes and the memo's.
#[derive(Clone)]
struct Departures {
    series: Arc<RwLock<Series>>,
    /// The memo's [`DecisionMemo::held`].
    held: Arc<AtomicU64>,
}

impl Lifecycle<KeyBytes, Entry> for Departures {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _key: KeyBytes, entry: Entry) {
        self.held
            .fetch_sub(u64::from(entry.weight), Ordering::Relaxed);
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        if let Some(stats) = series.stats.get(entry.series as usize) {
            stats.evictions.inc();
            stats.bytes.dec_by(i64::from(entry.weight));
        }
    }
}

/// A binding's share of the memo: its counters, and the series its entries
/// name ([`DecisionMemo::series`]).
#[derive(Debug, Clone)]
pub struct MemoSeries {
    id: u32,
    stats: Arc<MemoStats>,
}

impl std::ops::Deref for MemoSeries {
    type Target = MemoStats;

    fn deref(&self) -> &MemoStats {
        &self.stats
    }
}

/// A look-up that found no decision: what the memo will do with the one the
/// policy is about to make. Decided at the look-up, from the bytes it laid
/// out, so a miss lays its input out once and a decision the full memo will
/// not keep costs no key at all.
#[derive(Debug)]
pub struct Miss(Admission);

#[derive(Debug)]
enum Admission {
    /// Keep it under this input, if the policy allows.
    Keep(MemoKey),
    /// The memo is full and this input was not seen lately.
    FirstSighting,
}

/// The longest request key a front's slot holds; a longer one is answered
/// by the cache.
const FRONT_KEY: usize = 26;

/// A copy in a thread's [`Front`]: a request's key, the key of the
/// decision made for it (inline: at most 24 bytes) and its promise, in one
/// cache line, so that a hit reads one line that is not already the CPU's;
/// the rest of the input and decision is its [`Shape`] (the shapes are few,
/// and read by every hit).
#[repr(C, align(64))]
#[derive(Clone)]
struct Slot {
    /// As the entry's: until when the decision holds ([`NO_END`]: always).
    until_unix_ms: u64,
    decision_key: CompactString,
    /// The high half of the key's front hash (the low bits chose the set).
    tag: u32,
    /// Its shape's index in the front ([`EMPTY`]: an empty slot).
    shape: u8,
    len: u8,
    key: [u8; FRONT_KEY],
}

/// [`Slot::shape`] of an empty slot: no front has that many shapes.
const EMPTY: u8 = u8::MAX;

impl Slot {
    const EMPTY: Slot = Slot {
        until_unix_ms: 0,
        decision_key: CompactString::const_new(""),
        tag: 0,
        shape: EMPTY,
        len: 0,
        key: [0; FRONT_KEY],
    };

    fn key(&self) -> &[u8] {
        &self.key[..usize::from(self.len)]
    }

    /// As [`Entry::holds`] (a copy holds for any value size).
    fn holds(&self, now_unix_ms: impl Fn() -> u64) -> bool {
        self.until_unix_ms == NO_END || now_unix_ms() < self.until_unix_ms
    }
}

/// Everything of a copied input and its decision but the keys: the
/// binding, operation, namespace and attribute of the input, and the
/// decision's other fields. The inputs of one namespace's requests differ by
/// their keys, and most of their decisions by nothing else, so a front
/// holds a few shapes for thousands of slots. It owns no heap memory, so
/// that a front weighs exactly its slots and shapes.
#[derive(Clone, PartialEq)]
struct Shape {
    memo_id: u64,
    op: Operation,
    namespace: CompactString,
    /// The request's one attribute (a front takes no request with more).
    attribute: Option<(CompactString, CompactString)>,
    /// The decision, its key empty.
    decision: Decision,
}

impl Shape {
    /// The shape of `decision`, made for `request` to the binding `memo_id`,
    /// if a front can hold it: no tags, no invalidations (which own heap
    /// memory), every text inline.
    fn of(memo_id: u64, request: &DecisionRequest<'_>, decision: &Decision) -> Option<Shape> {
        if decision.tags.0.is_some() || decision.invalidate.is_some() {
            return None;
        }
        let inline = |text: &str| (text.len() <= INLINE_KEY).then(|| CompactString::from(text));
        let attribute = match request.attributes.iter().next() {
            None => None,
            Some((name, value)) => Some((inline(name)?, inline(value)?)),
        };
        Some(Shape {
            memo_id,
            op: request.op,
            namespace: inline(request.namespace)?,
            attribute,
            decision: Decision {
                key: CompactString::default(),
                ..decision.clone()
            },
        })
    }

    /// Whether this is the shape of `request`'s input to `memo_id` (of at
    /// most one attribute), its key aside.
    fn serves(&self, memo_id: u64, request: &DecisionRequest<'_>) -> bool {
        self.memo_id == memo_id
            && self.op == request.op
            && self.namespace == request.namespace
            && match (&self.attribute, request.attributes.iter().next()) {
                (None, None) => true,
                (Some((name, value)), Some((asked, given))) => name == asked && value == given,
                _ => false,
            }
    }

    /// The decision whose key is `key`. Field by field, not cloned: a shape
    /// has no tags and no invalidations to clone (and a field added to
    /// [`Decision`] must be added here, or this does not compile).
    fn decision_with(&self, key: &CompactString) -> Decision {
        let decision = &self.decision;
        Decision {
            key: key.clone(),
            fresh_ttl: decision.fresh_ttl,
            ttl_jitter: decision.ttl_jitter,
            stale_window: decision.stale_window,
            tags: super::Tags::default(),
            bypass: decision.bypass,
            compression: decision.compression,
            invalidate: None,
            early_refresh_beta: decision.early_refresh_beta,
            near_cache_ttl: decision.near_cache_ttl,
            decided_by: decision.decided_by,
        }
    }
}

/// The most shapes a front holds: a binding's few per operation, namespace
/// and attribute value, for a few dozen bindings.
const SHAPES: usize = 64;

/// A thread's copies of the decisions it recalled lately, in sets of
/// [`WAYS`] slots found by the key's hash (so that up to four inputs of one
/// set all stay), their shapes, and the buffer its inputs are laid out in.
/// Aligned to its own cache lines (two, for the adjacent-line prefetcher):
/// `ThreadLocal` holds the threads' fronts side by side, and a recall writes
/// to its own (the `RefCell`'s flag, the buffer's length), which would
/// otherwise take the line from a neighbour on another core at every hit.
#[repr(align(128))]
struct Front {
    slots: Box<[Slot]>,
    shapes: Vec<Shape>,
    /// Copies asked for since the front last started over.
    asked: usize,
    scratch: Vec<u8>,
}

impl Front {
    fn new(slots: usize) -> Self {
        Front {
            slots: std::iter::repeat_n(Slot::EMPTY, slots).collect(),
            shapes: Vec::with_capacity(if slots == 0 { 0 } else { SHAPES }),
            asked: 0,
            scratch: Vec::new(),
        }
    }

    /// What a front of `slots` slots weighs: its slots, its shapes and its
    /// buffer's largest size.
    fn bytes(slots: usize) -> u64 {
        (slots * size_of::<Slot>() + SHAPES * size_of::<Shape>() + SCRATCH_BYTES) as u64
    }

    /// Where the set of `hash` starts in a front of `len` slots (not 0).
    fn home(len: usize, hash: u64) -> usize {
        hash as usize & (len - WAYS)
    }

    /// The set of `slots` that `hash` belongs in (none in a front without
    /// slots).
    fn set(slots: &[Slot], hash: u64) -> &[Slot] {
        match slots.len() {
            0 => &[],
            len => {
                let home = Self::home(len, hash);
                &slots[home..home + WAYS]
            }
        }
    }

    /// The decision this front holds for `request` to `memo_id`, whose front
    /// hash is `hash`, if it still holds at `now_unix_ms`.
    fn answer(
        &self,
        hash: u64,
        memo_id: u64,
        request: &DecisionRequest<'_>,
        now_unix_ms: impl Fn() -> u64,
    ) -> Option<Decision> {
        let (tag, key) = ((hash >> 32) as u32, request.key.as_bytes());
        for slot in Self::set(&self.slots, hash) {
            if slot.tag == tag
                && slot.key() == key
                && let Some(shape) = self.shapes.get(usize::from(slot.shape))
                && shape.serves(memo_id, request)
                && slot.holds(&now_unix_ms)
            {
                return Some(shape.decision_with(&slot.decision_key));
            }
        }
        None
    }

    /// Copies `entry`, kept for `request` to `memo_id` (whose front hash is
    /// `hash`), into its set: first, the others moved down a slot (an older
    /// copy of the same input, or else the last, leaves). Not copied: a
    /// decision that read the value size, one whose key is not inline, or
    /// one a shape cannot hold ([`Shape::of`]). When a new shape finds the
    /// shapes all taken, the front starts over empty, at most once per
    /// slots' worth of copies asked for, so that inputs of ever new shapes
    /// cost a look-up, not a front cleared at each.
    fn copy(&mut self, hash: u64, memo_id: u64, request: &DecisionRequest<'_>, entry: &Entry) {
        if self.slots.is_empty()
            || request.key.len() > FRONT_KEY
            || entry.value_size != ANY_SIZE
            || entry.decision.key.is_heap_allocated()
        {
            return;
        }
        self.asked += 1;
        let Some(shape) = Shape::of(memo_id, request, &entry.decision) else {
            return;
        };
        let index = match self.shapes.iter().position(|held| *held == shape) {
            Some(index) => index,
            None => {
                if self.shapes.len() == SHAPES {
                    if self.asked < self.slots.len() {
                        return;
                    }
                    self.slots.fill(Slot::EMPTY);
                    self.shapes.clear();
                    self.asked = 0;
                }
                self.shapes.push(shape);
                self.shapes.len() - 1
            }
        };
        let mut copy = Slot {
            until_unix_ms: entry.until_unix_ms,
            decision_key: entry.decision.key.clone(),
            tag: (hash >> 32) as u32,
            shape: index as u8,
            len: request.key.len() as u8,
            key: [0; FRONT_KEY],
        };
        copy.key[..request.key.len()].copy_from_slice(request.key.as_bytes());
        let home = Self::home(self.slots.len(), hash);
        let set = &mut self.slots[home..home + WAYS];
        let leaving = set
            .iter()
            .position(|held| {
                held.shape == copy.shape && held.tag == copy.tag && held.key() == copy.key()
            })
            .unwrap_or(WAYS - 1);
        set[..=leaving].rotate_right(1);
        set[0] = copy;
    }
}

/// How many slots each thread's front has in a memo of `max_bytes`: one
/// per 8 entries the memo holds (~550 bytes each), up to 4 096 (256 KiB; a
/// hot set of a few thousand inputs, within a core's second-level cache),
/// and few enough that a front for each core and two more fit in the
/// quarter of the memo that fronts may take. A power of two.
fn front_slots(max_bytes: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let shapes = (SHAPES * size_of::<Shape>() + SCRATCH_BYTES) as u64;
    let slots = (max_bytes / 550 / 8)
        .min((max_bytes / 4 / (cores + 2)).saturating_sub(shapes) / size_of::<Slot>() as u64)
        .clamp(WAYS as u64, 4096);
    1 << slots.ilog2()
}

/// Slots in a front's set: inputs whose keys hash alike that all stay.
/// Four, where two let a hot set of 1 000 keys in 4 096 slots miss 9% of
/// the time (keys whose pair held three or more).
const WAYS: usize = 4;

/// The most a front's buffer keeps between look-ups.
const SCRATCH_BYTES: usize = 4096;

/// The process's decision memo.
pub struct DecisionMemo {
    entries: Cache<KeyBytes, Entry, ByWeight, foldhash::fast::RandomState, Departures>,
    /// The threads' fronts, created at a thread's first recall.
    fronts: thread_local::ThreadLocal<std::cell::RefCell<Front>>,
    /// Slots in each front.
    front_slots: usize,
    /// The fronts' hasher.
    hasher: foldhash::fast::RandomState,
    /// `policy.memo_bytes`: what the entries and the fronts may weigh.
    max_bytes: u64,
    /// What the fronts created so far weigh; held while a front is
    /// created, so that the entries' capacity follows every front.
    fronts_bytes: std::sync::Mutex<u64>,
    /// What the entries may weigh: `max_bytes` less the fronts'.
    capacity: AtomicU64,
    doorkeeper: Doorkeeper,
    /// Bytes of the entries alive now, counted as they are kept and dropped: whether the memo
    /// is full, asked on every miss, without quick_cache's `weight()`, which takes every
    /// shard's lock.
    held: Arc<AtomicU64>,
    series: Arc<RwLock<Series>>,
}

impl std::fmt::Debug for DecisionMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionMemo")
            .field("entries", &self.entries.len())
            .field("bytes", &self.entries.weight())
            .finish()
    }
}

/// What one entry costs beyond its key and decision bytes: the cache's slot
/// and hash-table index, the entry's fields. Calibrated on the gateway's
/// resident memory under a million distinct keys, when an entry was a slot
/// holding an `Arc` to a separate allocation: entries weighed with 480 here
/// (moka's figure) held 0.71 of `memo_bytes` in quick_cache, ~548 bytes of
/// RSS per ttl-by-route entry against 770 weighed (docs/BENCHMARKS.md, "The
/// memo on quick_cache"), so that `policy.memo_bytes` bounds what the memo
/// really holds. An entry held in its slot costs no more than that.
const ENTRY_OVERHEAD: usize = 256;

/// What the allocator adds to each heap allocation (its header, rounding).
const ALLOCATION_OVERHEAD: usize = 16;

impl DecisionMemo {
    /// A memo of at most `max_bytes` (0: none is kept).
    pub fn new(max_bytes: u64) -> Self {
        let held = Arc::<AtomicU64>::default();
        let series = Arc::<RwLock<Series>>::default();
        let entries = Cache::with(
            usize::try_from(max_bytes / 550)
                .unwrap_or(usize::MAX)
                .max(16),
            max_bytes,
            ByWeight,
            foldhash::fast::RandomState::default(),
            Departures {
                series: Arc::clone(&series),
                held: Arc::clone(&held),
            },
        );
        // One bit per 16 bytes of memo: ~32 bits per entry the memo can hold
        // (~550 bytes each), 256 KiB of bitmap for the default 32 MiB. It
        // clears after bits / 8 first sightings, so it remembers those of the
        // last ~4 memo-fulls of inputs: an input that repeats within that is
        // kept at its second miss (docs/BENCHMARKS.md, "Zipf, counted").
        let bits = (max_bytes / 16).clamp(1 << 12, 1 << 28).next_power_of_two() as usize;
        Self {
            entries,
            fronts: thread_local::ThreadLocal::new(),
            front_slots: front_slots(max_bytes),
            hasher: foldhash::fast::RandomState::default(),
            max_bytes,
            fronts_bytes: std::sync::Mutex::new(0),
            capacity: AtomicU64::new(max_bytes),
            doorkeeper: Doorkeeper::new(bits),
            held,
            series,
        }
    }

    /// The series of `policy` (a version's label) in `namespace`: its
    /// counters (`make`, the first time), under the index its entries carry.
    pub fn series(
        &self,
        policy: &Arc<str>,
        namespace: &str,
        make: impl FnOnce() -> MemoStats,
    ) -> MemoSeries {
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let Series { ids, stats } = &mut *series;
        let id = *ids
            .entry((Arc::clone(policy), namespace.to_owned()))
            .or_insert_with(|| {
                stats.push(Arc::new(make()));
                u32::try_from(stats.len() - 1).expect("fewer than 2^32 series")
            });
        MemoSeries {
            id,
            stats: Arc::clone(&stats[id as usize]),
        }
    }

    /// Whether the memo is full (to within 1/16), so that it keeps only
    /// what repeats.
    fn full(&self) -> bool {
        let capacity = self.capacity.load(Ordering::Relaxed);
        self.held.load(Ordering::Relaxed) >= capacity - capacity / 16
    }

    /// A new front for this thread, its bytes taken from the entries'. The
    /// fronts take at most a quarter of the memo: a thread beyond that gets
    /// a front without slots (the cache answers it).
    fn new_front(&self) -> std::cell::RefCell<Front> {
        let mut slots = self.front_slots;
        let bytes = Front::bytes(slots);
        let mut taken = self
            .fronts_bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *taken + bytes > self.max_bytes / 4 {
            slots = 0;
        } else {
            *taken += bytes;
            let capacity = self.max_bytes - *taken;
            self.capacity.store(capacity, Ordering::Relaxed);
            self.entries.set_capacity(capacity);
        }
        drop(taken);
        std::cell::RefCell::new(Front::new(slots))
    }

    /// Whether the memo is full and the input laid out in `bytes` was not
    /// seen lately, so that its decision is not kept (the doorkeeper now
    /// remembers it).
    fn first_sighting(&self, bytes: &[u8]) -> bool {
        self.full() && !self.doorkeeper.seen_before(bytes)
    }

    /// The decision kept for `input`, if there is one that still holds at
    /// `now_unix_ms` for a value of `value_size` bytes.
    pub fn get(&self, input: &MemoKey, value_size: u64, now_unix_ms: u64) -> Option<Decision> {
        self.look_up(input.bytes(), value_size, || now_unix_ms)
    }

    /// [`get`](Self::get) for `request` to the binding `memo_id`, without
    /// building a [`MemoKey`]: this thread's [`Front`] answers first, from
    /// the request's own fields; then the cache, from its bytes laid out in
    /// the front's buffer (and the front copies its answer). A hit
    /// allocates nothing but a decision's key longer than 24 bytes (a
    /// shorter one is copied with the decision).
    /// The clock is read (`now_unix_ms`) only for an entry that carries a
    /// promise. A miss says what [`keep`](Self::keep) will do with the
    /// decision to come.
    pub fn recall(
        &self,
        memo_id: u64,
        request: &DecisionRequest<'_>,
        now_unix_ms: impl Fn() -> u64,
    ) -> Result<Decision, Miss> {
        let value_size = request.value_size as u64;
        let mut front = self.fronts.get_or(|| self.new_front()).borrow_mut();
        // The front is asked by the request's own fields, without laying
        // them out: a request with two attributes or more would have to sort
        // them, and is left to the cache.
        let hash = (request.attributes.len() <= 1 && request.key.len() <= FRONT_KEY)
            .then(|| self.front_hash(memo_id, request));
        if let Some(hash) = hash
            && let Some(decision) = front.answer(hash, memo_id, request, &now_unix_ms)
        {
            return Ok(decision);
        }
        let front = &mut *front;
        MemoKey::lay_out_request(&mut front.scratch, memo_id, request);
        let bytes = front.scratch.as_slice();
        let answer = match self.entries.get(bytes) {
            Some(entry) if entry.holds(value_size, &now_unix_ms) => {
                if let Some(hash) = hash {
                    front.copy(hash, memo_id, request, &entry);
                }
                Ok(entry.decision)
            }
            _ => Err(Miss(if self.first_sighting(bytes) {
                Admission::FirstSighting
            } else {
                Admission::Keep(MemoKey(KeyBytes::from_slice(bytes)))
            })),
        };
        // A rare long input does not keep its buffer's size for the thread's life.
        if front.scratch.capacity() > SCRATCH_BYTES {
            front.scratch = Vec::new();
        }
        answer
    }

    /// Where in a front the input of `request` to `memo_id` belongs: a hash
    /// of its key, and its binding's identity. Inputs that differ in
    /// namespace, operation or attribute only share a set of slots; a
    /// copy is compared with the whole input anyway.
    fn front_hash(&self, memo_id: u64, request: &DecisionRequest<'_>) -> u64 {
        self.hasher.hash_one(request.key) ^ memo_id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn look_up(
        &self,
        input: &[u8],
        value_size: u64,
        now_unix_ms: impl Fn() -> u64,
    ) -> Option<Decision> {
        let entry = self.entries.get(input)?;
        entry
            .holds(value_size, now_unix_ms)
            .then_some(entry.decision)
    }

    /// Keeps `decision`, made at `decided_at_unix_ms` (the `now_unix_ms` the
    /// policy saw), for `input`, as `reuse` allows; a full memo only for an
    /// input seen lately.
    pub fn put(
        &self,
        input: MemoKey,
        decision: &Decision,
        reuse: Reuse,
        decided_at_unix_ms: u64,
        series: &MemoSeries,
    ) {
        let miss = Miss(if self.first_sighting(input.bytes()) {
            Admission::FirstSighting
        } else {
            Admission::Keep(input)
        });
        self.keep(miss, decision, reuse, decided_at_unix_ms, series);
    }

    /// Keeps the decision a [`recall`](Self::recall) missed, made at
    /// `decided_at_unix_ms` (the `now_unix_ms` the policy saw), as `reuse`
    /// allows and the miss admitted.
    pub fn keep(
        &self,
        miss: Miss,
        decision: &Decision,
        reuse: Reuse,
        decided_at_unix_ms: u64,
        series: &MemoSeries,
    ) {
        let Reuse::For {
            promise,
            value_size,
        } = reuse
        else {
            return;
        };
        let input = match miss.0 {
            Admission::Keep(input) => input,
            Admission::FirstSighting => {
                series.first_sightings.inc();
                return;
            }
        };
        let weight = heap_bytes(&input.0) + decision_bytes(decision) + ENTRY_OVERHEAD;
        let weight = u32::try_from(weight).unwrap_or(u32::MAX);
        series.bytes.inc_by(i64::from(weight));
        self.held.fetch_add(u64::from(weight), Ordering::Relaxed);
        self.entries.insert(
            input.0,
            Entry {
                decision: decision.clone(),
                until_unix_ms: promise.map_or(NO_END, |promise| {
                    decided_at_unix_ms
                        .saturating_add(u64::try_from(promise.as_millis()).unwrap_or(u64::MAX))
                }),
                value_size: value_size.unwrap_or(ANY_SIZE),
                weight,
                series: series.id,
            },
        );
    }

    /// Bytes the entries weigh now (after pending maintenance); the
    /// threads' fronts weigh [`front_bytes`](Self::front_bytes) more.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    /// What the threads' fronts weigh.
    pub fn front_bytes(&self) -> u64 {
        *self
            .fronts_bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Heap bytes of a decision, roughly.
fn decision_bytes(decision: &Decision) -> usize {
    // Each string is an allocation, and so is each non-empty list of them.
    let strings = |items: &[String]| -> usize {
        let list = if items.is_empty() {
            0
        } else {
            ALLOCATION_OVERHEAD
        };
        list + items
            .iter()
            .map(|item| item.len() + size_of::<String>() + ALLOCATION_OVERHEAD)
            .sum::<usize>()
    };
    // A short key is held in the decision itself.
    let key = if decision.key.is_heap_allocated() {
        decision.key.len() + ALLOCATION_OVERHEAD
    } else {
        0
    };
    size_of::<Decision>()
        + key
        + strings(&decision.tags)
        + decision.invalidate.as_deref().map_or(0, |lists| {
            size_of::<Invalidation>()
                + ALLOCATION_OVERHEAD
                + strings(&lists.keys)
                + strings(&lists.patterns)
                + strings(&lists.tags)
        })
}

/// The canonical bytes of what a policy may read of a request, but the
/// clock and the value size, prefixed by the binding: equal bytes, equal
/// input. Lengths are prefixed (LEB128, a byte for up to 127), so no two
/// inputs share bytes; attributes go in name order (the request holds them
/// unordered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoKey(KeyBytes);

impl MemoKey {
    /// The key of one request to the binding `memo_id`.
    pub fn new(
        memo_id: u64,
        op: Operation,
        namespace: &str,
        key: &str,
        attributes: &Attributes,
    ) -> Self {
        let mut bytes = Vec::new();
        Self::lay_out(&mut bytes, memo_id, op, namespace, key, attributes);
        MemoKey(KeyBytes::from_slice(&bytes))
    }

    fn lay_out_request(bytes: &mut Vec<u8>, memo_id: u64, request: &DecisionRequest<'_>) {
        Self::lay_out(
            bytes,
            memo_id,
            request.op,
            request.namespace,
            request.key,
            request.attributes,
        );
    }

    /// Writes the key's bytes into `bytes` (cleared first).
    fn lay_out(
        bytes: &mut Vec<u8>,
        memo_id: u64,
        op: Operation,
        namespace: &str,
        key: &str,
        attributes: &Attributes,
    ) {
        // Most requests carry no attribute or one: no list to sort then.
        let sorted: Vec<(&String, &String)>;
        let first: Option<(&String, &String)>;
        let names: &[(&String, &String)] = if attributes.len() > 1 {
            let mut all: Vec<_> = attributes.iter().collect();
            all.sort_unstable();
            sorted = all;
            &sorted
        } else {
            first = attributes.iter().next();
            first.as_slice()
        };
        let size = 10
            + 1
            + 10 * (2 + 2 * names.len())
            + namespace.len()
            + key.len()
            + names
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        bytes.clear();
        bytes.reserve_exact(size);
        leb128(bytes, memo_id);
        bytes.push(op_code(op));
        let mut field = |text: &str| {
            leb128(bytes, text.len() as u64);
            bytes.extend_from_slice(text.as_bytes());
        };
        field(namespace);
        field(key);
        for (name, value) in names {
            field(name);
            field(value);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The byte an operation is laid out as.
fn op_code(op: Operation) -> u8 {
    match op {
        Operation::Get => 0,
        Operation::Set => 1,
        Operation::Delete => 2,
    }
}

/// Appends `n` in LEB128: seven bits a byte, low first, the top bit set on
/// every byte but the last.
fn leb128(bytes: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        bytes.push(n as u8 | 0x80);
        n >>= 7;
    }
    bytes.push(n as u8);
}

/// How many bytes of key an entry holds in its own slot.
const INLINE_KEY: usize = 24;

/// A memo key's bytes: in the entry's own slot up to [`INLINE_KEY`] bytes
/// (a namespace and key of ~19 bytes together, attributes included), so
/// that a look-up compares them where it has just read the entry, not in an
/// allocation elsewhere (a cache miss per hit, on a memo the request's other
/// work has pushed out of the CPU's caches); on the heap beyond. 32 bytes.
/// Hashed, compared and borrowed as the bytes it holds, so that a look-up by
/// `&[u8]` (quick_cache's `Equivalent`) finds it.
type KeyBytes = smallvec::SmallVec<[u8; INLINE_KEY]>;

/// What a key takes on the heap beside its slot.
fn heap_bytes(key: &KeyBytes) -> usize {
    if key.spilled() {
        key.len() + ALLOCATION_OVERHEAD
    } else {
        0
    }
}

/// A fresh memo identity for each binding.
pub fn next_memo_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(key: &str) -> Decision {
        let mut decision = super::super::DefaultPolicy.decide(
            &crate::cache::NamespaceSettings::new("ns", &Default::default()),
            key,
        );
        decision.decided_by = crate::policy::Label::intern("p@1");
        decision
    }

    fn attributes(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn a_decision_and_an_entry_fit_an_inline_copy() {
        // Above 128 bytes the compiler copies through `memcpy` calls: a hit
        // copies an entry out and hands its decision on (docs/BENCHMARKS.md).
        assert!(size_of::<Decision>() <= 128, "{}", size_of::<Decision>());
        assert!(size_of::<Entry>() <= 128, "{}", size_of::<Entry>());
        // A front's slot: one cache line; its 64 shapes, 12 KiB.
        assert_eq!(size_of::<Slot>(), 64);
        assert!(size_of::<Shape>() <= 192, "{}", size_of::<Shape>());
        assert_eq!(size_of::<KeyBytes>(), 32);
    }

    #[test]
    fn keys_differ_by_every_input_but_not_by_attribute_order() {
        let base = MemoKey::new(
            1,
            Operation::Get,
            "ns",
            "k",
            &attributes(&[("a", "1"), ("b", "2")]),
        );
        let reordered = MemoKey::new(
            1,
            Operation::Get,
            "ns",
            "k",
            &attributes(&[("b", "2"), ("a", "1")]),
        );
        assert_eq!(base, reordered);
        for other in [
            MemoKey::new(
                2,
                Operation::Get,
                "ns",
                "k",
                &attributes(&[("a", "1"), ("b", "2")]),
            ),
            MemoKey::new(
                1,
                Operation::Set,
                "ns",
                "k",
                &attributes(&[("a", "1"), ("b", "2")]),
            ),
            MemoKey::new(
                1,
                Operation::Get,
                "nt",
                "k",
                &attributes(&[("a", "1"), ("b", "2")]),
            ),
            MemoKey::new(
                1,
                Operation::Get,
                "ns",
                "j",
                &attributes(&[("a", "1"), ("b", "2")]),
            ),
            MemoKey::new(
                1,
                Operation::Get,
                "ns",
                "k",
                &attributes(&[("a", "1"), ("b", "3")]),
            ),
            MemoKey::new(1, Operation::Get, "ns", "k", &attributes(&[("a", "1")])),
            // Length prefixes: moving a byte from the namespace to the key changes the key.
            MemoKey::new(
                1,
                Operation::Get,
                "n",
                "sk",
                &attributes(&[("a", "1"), ("b", "2")]),
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn only_what_the_sdk_reports_as_reusable_is_kept() {
        let read = |clock, size, promise_ms| {
            Reuse::of(
                Some(&pb::Reuse {
                    read_clock: clock,
                    read_value_size: size,
                    reusable_for_ms: promise_ms,
                }),
                42,
            )
        };
        assert_eq!(Reuse::of(None, 42), Reuse::Never);
        assert_eq!(
            read(false, false, 0),
            Reuse::For {
                promise: None,
                value_size: None
            }
        );
        assert_eq!(read(true, false, 0), Reuse::Never);
        assert_eq!(read(false, true, 0), Reuse::Never);
        assert_eq!(
            read(true, true, 1500),
            Reuse::For {
                promise: Some(Duration::from_millis(1500)),
                value_size: Some(42)
            }
        );
    }

    #[test]
    fn a_kept_decision_holds_for_its_promise_and_its_value_size_only() {
        let memo = DecisionMemo::new(1 << 20);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        let key = || MemoKey::new(1, Operation::Set, "ns", "k", &Attributes::new());
        memo.put(
            key(),
            &decision("forever"),
            Reuse::For {
                promise: None,
                value_size: None,
            },
            1_000,
            &stats,
        );
        assert_eq!(
            memo.get(&key(), 7, 1_000).map(|d| d.key.into_string()),
            Some("forever".to_owned())
        );

        memo.put(
            key(),
            &decision("sized"),
            Reuse::For {
                promise: None,
                value_size: Some(7),
            },
            1_000,
            &stats,
        );
        assert_eq!(
            memo.get(&key(), 7, 1_000).map(|d| d.key.into_string()),
            Some("sized".to_owned())
        );
        assert_eq!(memo.get(&key(), 8, 1_000), None);

        memo.put(
            key(),
            &decision("brief"),
            Reuse::For {
                promise: Some(Duration::ZERO),
                value_size: None,
            },
            1_000,
            &stats,
        );
        assert_eq!(
            memo.get(&key(), 7, 1_000),
            None,
            "a promise of 0 ms has passed at once"
        );

        // A promise runs from the time the policy saw, not from when it is kept.
        let promise = Reuse::For {
            promise: Some(Duration::from_millis(500)),
            value_size: None,
        };
        memo.put(key(), &decision("promised"), promise, 1_000, &stats);
        assert_eq!(
            memo.get(&key(), 7, 1_499).map(|d| d.key.into_string()),
            Some("promised".to_owned())
        );
        assert_eq!(memo.get(&key(), 7, 1_500), None);

        memo.put(key(), &decision("never"), Reuse::Never, 2_000, &stats);
        assert_eq!(memo.get(&key(), 7, 2_000), None, "Never is not kept");
    }

    fn keep(memo: &DecisionMemo, key: &str, stats: &MemoSeries) -> MemoKey {
        let input = MemoKey::new(1, Operation::Get, "ns", key, &Attributes::new());
        memo.put(input.clone(), &decision(key), FOREVER, 1_000, stats);
        input
    }

    /// Keeps the decisions of `keys` distinct inputs, twice each: a full
    /// memo keeps an input's decision at its second miss.
    fn keep_each_twice(memo: &DecisionMemo, keys: usize, stats: &MemoSeries) {
        for i in 0..keys {
            let key = format!("key-{i}");
            keep(memo, &key, stats);
            keep(memo, &key, stats);
        }
    }

    /// Keys held in the entry's slot and keys on the heap are found by the
    /// bytes a look-up lays out, and told apart at the boundary between them.
    #[test]
    fn short_and_long_keys_are_found_and_told_apart() {
        let memo = DecisionMemo::new(1 << 20);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        let keys: Vec<String> = [1, 20, 24, 25, 26, 27, 40, 300]
            .iter()
            .map(|&len| "k".repeat(len))
            .collect();
        let inputs: Vec<MemoKey> = keys.iter().map(|key| keep(&memo, key, &stats)).collect();
        assert!(
            inputs.iter().any(|input| !input.0.spilled())
                && inputs.iter().any(|input| input.0.spilled()),
            "both kinds: {inputs:?}"
        );
        for (key, input) in keys.iter().zip(&inputs) {
            let found = memo.get(input, 0, 1_000).expect("kept");
            assert_eq!(found.key, key.as_str());
            // As `recall` finds it: from the bytes laid out afresh.
            let request = DecisionRequest {
                op: Operation::Get,
                namespace: "ns",
                key,
                attributes: &Attributes::new(),
                value_size: 0,
            };
            let recalled = memo.recall(1, &request, || 1_000).expect("recalled");
            assert_eq!(recalled.key, key.as_str());
        }
        let unknown = MemoKey::new(1, Operation::Get, "ns", &"k".repeat(28), &Attributes::new());
        assert!(memo.get(&unknown, 0, 1_000).is_none());
    }

    #[test]
    fn a_full_memo_keeps_a_decision_at_its_inputs_second_miss() {
        let memo = DecisionMemo::new(256 * 1024);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        // Until it is full, every decision is kept at once.
        let first = keep(&memo, "early", &stats);
        assert!(memo.get(&first, 0, 1_000).is_some());
        let mut filled = 0;
        while !memo.full() {
            keep(&memo, &format!("fill-{filled}"), &stats);
            filled += 1;
        }
        assert_eq!(
            stats.first_sightings.get(),
            0,
            "nothing refused while filling"
        );

        // Full: a new input's first miss is only remembered ...
        let input = keep(&memo, "newcomer", &stats);
        assert_eq!(memo.get(&input, 0, 1_000), None);
        assert_eq!(stats.first_sightings.get(), 1);
        // ... and its second miss is kept.
        keep(&memo, "newcomer", &stats);
        assert!(memo.get(&input, 0, 1_000).is_some());
        assert_eq!(stats.first_sightings.get(), 1);
    }

    #[test]
    fn a_miss_decides_at_the_look_up_what_its_decision_will_do() {
        let memo = DecisionMemo::new(256 * 1024);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        let attributes = Attributes::new();
        let request = |key| DecisionRequest {
            op: Operation::Get,
            namespace: "ns",
            key,
            attributes: &attributes,
            value_size: 0,
        };
        let recall = |key| memo.recall(1, &request(key), || 1_000);

        // Not full: a miss keeps its decision, under the key `get` finds it by.
        let miss = recall("early").expect_err("nothing kept yet");
        memo.keep(miss, &decision("early"), FOREVER, 1_000, &stats);
        assert_eq!(
            recall("early").ok().map(|d| d.key.into_string()),
            Some("early".to_owned())
        );
        let input = MemoKey::new(1, Operation::Get, "ns", "early", &attributes);
        assert!(memo.get(&input, 0, 1_000).is_some());

        let mut filled = 0;
        while !memo.full() {
            keep(&memo, &format!("fill-{filled}"), &stats);
            filled += 1;
        }
        // Full: a decision that may not be reused is not a first sighting ...
        let miss = recall("never").expect_err("not kept");
        memo.keep(miss, &decision("never"), Reuse::Never, 1_000, &stats);
        assert_eq!(stats.first_sightings.get(), 0);
        // ... a reusable one's first miss is remembered, not kept ...
        let miss = recall("newcomer").expect_err("not kept");
        memo.keep(miss, &decision("newcomer"), FOREVER, 1_000, &stats);
        assert_eq!(stats.first_sightings.get(), 1);
        // ... and its second is kept.
        let miss = recall("newcomer").expect_err("not kept yet");
        memo.keep(miss, &decision("newcomer"), FOREVER, 1_000, &stats);
        assert_eq!(
            recall("newcomer").ok().map(|d| d.key.into_string()),
            Some("newcomer".to_owned())
        );
        assert_eq!(stats.first_sightings.get(), 1);
    }

    #[test]
    fn every_entry_that_leaves_is_accounted_to_its_series() {
        let memo = DecisionMemo::new(1 << 20);
        let label: Arc<str> = Arc::from("p@1");
        let a = memo.series(&label, "a", MemoStats::default);
        let a_again = memo.series(&label, "a", || unreachable!("one series per name"));
        let b = memo.series(&label, "b", MemoStats::default);
        assert_eq!(a.id, a_again.id);
        assert_ne!(a.id, b.id);

        keep(&memo, "k", &a);
        let one = a.bytes.get();
        assert!(one > 0);
        // The same input kept again: the newer decision replaces the older,
        // whose bytes leave with it.
        keep(&memo, "k", &a_again);
        assert_eq!(a.bytes.get(), one);
        assert_eq!(a.evictions.get(), 1, "the replaced entry");
        keep(&memo, "j", &b);
        assert_eq!(b.evictions.get(), 0);
        assert_eq!((a.bytes.get() + b.bytes.get()) as u64, memo.bytes());
        assert_eq!(memo.held.load(Ordering::Relaxed), memo.bytes());
    }

    #[test]
    fn the_doorkeeper_forgets_once_it_has_taken_its_share() {
        let doorkeeper = Doorkeeper::new(1 << 12);
        assert!(!doorkeeper.seen_before(b"a"));
        assert!(doorkeeper.seen_before(b"a"));
        // 512 first sightings (bits / 8) clear it: "a" is new again.
        let mut fresh = 0;
        for i in 0..2_000 {
            if !doorkeeper.seen_before(format!("k{i}").as_bytes()) {
                fresh += 1;
            }
            if fresh == 512 {
                break;
            }
        }
        assert!(!doorkeeper.seen_before(b"a"), "cleared after bits / 8");
    }

    #[test]
    fn the_memo_stays_within_its_bytes_under_a_million_distinct_keys() {
        let bound = 256 * 1024;
        let memo = DecisionMemo::new(bound);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        keep_each_twice(&memo, 1_000_000, &stats);
        assert!(
            stats.first_sightings.get() > 900_000,
            "{} first sightings",
            stats.first_sightings.get()
        );
        let held = memo.bytes();
        assert!(held <= bound, "{held} bytes held, bound {bound}");
        assert!(held > bound / 2, "the memo is used: {held} bytes");
        assert!(
            stats.evictions.get() > 40_000,
            "{} evictions",
            stats.evictions.get()
        );
        assert_eq!(
            stats.bytes.get() as u64,
            held,
            "per-binding bytes follow the memo's"
        );
        assert_eq!(
            memo.held.load(Ordering::Relaxed),
            held,
            "the memo's own count follows quick_cache's weight"
        );
    }

    fn get_request<'a>(key: &'a str, attributes: &'a Attributes) -> DecisionRequest<'a> {
        DecisionRequest {
            op: Operation::Get,
            namespace: "ns",
            key,
            attributes,
            value_size: 0,
        }
    }

    /// Transparency through the fronts: over 10 000 inputs (24 per key,
    /// which differ by binding, namespace, operation or attributes only;
    /// keys too long for a front; decisions kept forever, for one value
    /// size, for a promise, or never) recalled and kept at random in a memo
    /// that holds a fraction of them, every answer is a decision the
    /// "policy" made for exactly that input, for that value size, within
    /// its promise, whether the front or the cache gave it. The decisions
    /// are the request's key and a suffix, as a front holds them; those
    /// made at a time are of a new shape each, so the fronts also fill
    /// their shapes and start over.
    #[test]
    fn every_answer_is_one_the_policy_made_for_that_input() {
        use rand::{Rng, SeedableRng};
        let memo = DecisionMemo::new(1 << 20);
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        struct Input {
            memo_id: u64,
            op: Operation,
            namespace: &'static str,
            key: String,
            attributes: Attributes,
        }
        let inputs: Vec<Input> = (0..10_000)
            .map(|i| {
                let (op, attributes) = match i % 6 {
                    0 => (Operation::Get, attributes(&[])),
                    1 => (Operation::Set, attributes(&[])),
                    2 => (Operation::Get, attributes(&[("tenant", "a")])),
                    3 => (Operation::Get, attributes(&[("tenant", "b")])),
                    4 => (
                        Operation::Get,
                        attributes(&[("tenant", "a"), ("route", "r")]),
                    ),
                    _ => (Operation::Set, attributes(&[("route", "a")])),
                };
                let key = if (i / 24) % 11 == 0 {
                    format!("/long/{}/{}", "x".repeat(40), i / 24)
                } else {
                    format!("/k/{}", i / 24)
                };
                Input {
                    memo_id: 1 + (i as u64 / 6) % 2,
                    op,
                    namespace: ["ns", "ns2"][(i / 12) % 2],
                    key,
                    attributes,
                }
            })
            .collect();
        let mut now = 1_000u64;
        let (mut hits, mut misses) = (0, 0);
        for _ in 0..300_000 {
            now += rng.random_range(0..3);
            // Skewed, so that inputs repeat while others are pushed out.
            let at = (rng.random::<f64>().powi(3) * inputs.len() as f64) as usize;
            let value_size = rng.random_range(0..3usize);
            let input = &inputs[at];
            let request = DecisionRequest {
                op: input.op,
                namespace: input.namespace,
                key: &input.key,
                attributes: &input.attributes,
                value_size,
            };
            // What the policy decides for this input: its key, and which of
            // the key's 24 inputs it is.
            let decided = format!("{}#{}", input.key, at % 24);
            match memo.recall(input.memo_id, &request, || now) {
                Ok(found) => {
                    hits += 1;
                    let found = found.key.as_str();
                    match at % 4 {
                        0 => assert_eq!(found, decided),
                        1 => assert_eq!(found, format!("{decided}@{value_size}")),
                        2 => {
                            let decided_at: u64 = found
                                .strip_prefix(&format!("{decided}@t"))
                                .and_then(|at| at.parse().ok())
                                .unwrap_or_else(|| panic!("{found} for input {at}"));
                            assert!(now < decided_at + 50, "{found} held at {now}");
                        }
                        _ => panic!("a decision never to be reused was: {found}"),
                    }
                }
                Err(miss) => {
                    misses += 1;
                    let (decided, reuse) = match at % 4 {
                        0 => (decided, FOREVER),
                        1 => (
                            format!("{decided}@{value_size}"),
                            Reuse::For {
                                promise: None,
                                value_size: Some(value_size as u64),
                            },
                        ),
                        2 => (
                            format!("{decided}@t{now}"),
                            Reuse::For {
                                promise: Some(Duration::from_millis(50)),
                                value_size: None,
                            },
                        ),
                        _ => (decided, Reuse::Never),
                    };
                    memo.keep(miss, &decision(&decided), reuse, now, &stats);
                }
            }
        }
        assert!(
            hits > 60_000 && misses > 60_000,
            "{hits} hits, {misses} misses"
        );
        assert!(
            stats.evictions.get() > 10_000,
            "{} evictions",
            stats.evictions.get()
        );
    }

    const FOREVER: Reuse = Reuse::For {
        promise: None,
        value_size: None,
    };

    /// A front's copy answers for exactly the input it was made for: with
    /// the same hash (as two inputs whose hashes collide would have), a
    /// request that differs in its key, binding, operation, namespace or
    /// attribute gets nothing from it. Copies of one shape share it, each
    /// with its own decision key.
    #[test]
    fn a_front_answers_only_for_the_very_input_it_copied() {
        let mut front = Front::new(16);
        let none = Attributes::new();
        let tenant = attributes(&[("tenant", "a")]);
        let (tenant_b, route) = (
            attributes(&[("tenant", "b")]),
            attributes(&[("route", "a")]),
        );
        let request = |op, namespace, key, attributes| DecisionRequest {
            op,
            namespace,
            key,
            attributes,
            value_size: 0,
        };
        let entry = |key: &str| Entry {
            decision: decision(key),
            until_unix_ms: NO_END,
            value_size: ANY_SIZE,
            weight: 0,
            series: 0,
        };
        let hash = 0x5eed_0000_0000_0004;
        let copied = request(Operation::Get, "ns", "/k", &tenant);
        front.copy(hash, 1, &copied, &entry("v1:/k|lang=en"));
        let answer = |memo_id, asked: &DecisionRequest<'_>| {
            front
                .answer(hash, memo_id, asked, || 0)
                .map(|decision| decision.key.to_string())
        };
        assert_eq!(answer(1, &copied).as_deref(), Some("v1:/k|lang=en"));
        for (memo_id, other) in [
            (1, request(Operation::Get, "ns", "/j", &tenant)),
            (1, request(Operation::Get, "ns", "/k/", &tenant)),
            (2, request(Operation::Get, "ns", "/k", &tenant)),
            (1, request(Operation::Set, "ns", "/k", &tenant)),
            (1, request(Operation::Get, "ns2", "/k", &tenant)),
            (1, request(Operation::Get, "ns", "/k", &none)),
            (1, request(Operation::Get, "ns", "/k", &tenant_b)),
            (1, request(Operation::Get, "ns", "/k", &route)),
        ] {
            assert_eq!(answer(memo_id, &other), None, "{memo_id} {other:?}");
        }
        // Another key of the same shape: one shape, its own key in its decision.
        let sibling = request(Operation::Get, "ns", "/other", &tenant);
        front.copy(hash + 4, 1, &sibling, &entry("v1:/other|lang=en"));
        assert_eq!(front.shapes.len(), 1);
        assert_eq!(
            front
                .answer(hash + 4, 1, &sibling, || 0)
                .map(|d| d.key.to_string()),
            Some("v1:/other|lang=en".to_owned())
        );
        // Any decision's key, as long as it is inline; one that read the
        // value size is not copied (it holds for one size only).
        let unlike = request(Operation::Get, "ns", "/u", &tenant);
        front.copy(hash + 8, 1, &unlike, &entry("elsewhere"));
        assert_eq!(
            front
                .answer(hash + 8, 1, &unlike, || 0)
                .map(|d| d.key.to_string()),
            Some("elsewhere".to_owned())
        );
        let long = request(Operation::Get, "ns", "/l", &tenant);
        front.copy(hash + 12, 1, &long, &entry("v1:/l|a-language-tag=en-GB"));
        assert_eq!(front.answer(hash + 12, 1, &long, || 0), None);
        let sized = request(Operation::Get, "ns", "/s", &tenant);
        let mut by_size = entry("/s");
        by_size.value_size = 0;
        front.copy(hash + 16, 1, &sized, &by_size);
        assert_eq!(front.answer(hash + 16, 1, &sized, || 0), None);
    }

    /// A front answers from its copy once the cache has let the entry go
    /// (the copy is still the policy's decision for that input); another
    /// thread, whose front holds no copy, misses.
    #[test]
    fn a_front_answers_from_its_copy_after_the_cache_let_go() {
        let memo = Arc::new(DecisionMemo::new(1 << 20));
        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        let attributes = Attributes::new();
        let request = get_request("/front", &attributes);
        let miss = memo.recall(1, &request, || 0).expect_err("empty");
        memo.keep(miss, &decision("/front"), FOREVER, 0, &stats);
        // From the cache, copied into this thread's front.
        assert!(memo.recall(1, &request, || 0).is_ok());
        let input = MemoKey::new(1, Operation::Get, "ns", "/front", &attributes);
        assert!(memo.entries.remove(input.bytes()).is_some());
        let copied = memo.recall(1, &request, || 0).expect("this thread's copy");
        assert_eq!(copied.key, "/front");
        let elsewhere = Arc::clone(&memo);
        let other = std::thread::spawn(move || {
            let attributes = Attributes::new();
            elsewhere
                .recall(1, &get_request("/front", &attributes), || 0)
                .is_ok()
        });
        assert!(
            !other.join().expect("no panic"),
            "another thread has no copy"
        );
        // A key longer than a front's slot holds is not copied.
        let long = "/long".repeat(10);
        let request = get_request(&long, &attributes);
        let miss = memo.recall(1, &request, || 0).expect_err("new");
        memo.keep(miss, &decision(&long), FOREVER, 0, &stats);
        assert!(memo.recall(1, &request, || 0).is_ok());
        let input = MemoKey::new(1, Operation::Get, "ns", &long, &attributes);
        assert!(memo.entries.remove(input.bytes()).is_some());
        assert!(memo.recall(1, &request, || 0).is_err(), "no copy of it");
    }

    /// The fronts' bytes come out of `memo_bytes`: each thread's front is
    /// taken from the entries' capacity, up to a quarter of the memo.
    #[test]
    fn the_fronts_weigh_in_the_bound() {
        let bound = 1 << 20;
        let memo = Arc::new(DecisionMemo::new(bound));
        let one = Front::bytes(memo.front_slots);
        // Threads alive at once (a finished thread's front is reused by the next).
        let recall_together = |threads: usize| {
            let barrier = Arc::new(std::sync::Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (memo, barrier) = (Arc::clone(&memo), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        let attributes = Attributes::new();
                        let _ = memo.recall(1, &get_request("k", &attributes), || 0);
                        barrier.wait();
                    })
                })
                .collect();
            for handle in handles {
                handle.join().expect("no panic");
            }
        };
        recall_together(3);
        assert_eq!(memo.front_bytes(), 3 * one);
        assert_eq!(memo.capacity.load(Ordering::Relaxed), bound - 3 * one);

        let stats = memo.series(&Arc::from("p@1"), "ns", MemoStats::default);
        keep_each_twice(&memo, 20_000, &stats);
        assert!(
            memo.bytes() + memo.front_bytes() <= bound,
            "{} + {} over {bound}",
            memo.bytes(),
            memo.front_bytes()
        );
        assert!(memo.bytes() > bound / 2, "the entries still fill the rest");

        recall_together(64);
        assert!(memo.front_bytes() <= bound / 4, "{}", memo.front_bytes());
        assert!(memo.front_bytes() > bound / 4 - one);
    }
}
