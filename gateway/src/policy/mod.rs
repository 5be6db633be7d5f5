//! Caching decisions: for every request, which key an entry lives under, how
//! long it stays fresh, whether to cache at all, and what a write invalidates.
//!
//! A namespace bound to a WebAssembly policy asks it ([`engine`]); the answer
//! is validated ([`Decision::from_wire`]) and, if the call faulted in any way,
//! the binding's fallback decides instead: fail-open (the built-in
//! [`DefaultPolicy`]) or fail-closed (bypass). A fault never fails the
//! client's request; it is counted by kind and logged with the policy's name
//! and version. Namespaces without a binding use the [`DefaultPolicy`]: the
//! client's key, verbatim, and the namespace's configured TTL.

pub mod engine;
pub mod memo;
mod metrics;
pub mod registry;
pub mod sync;
pub mod tool;
pub mod watch;

use std::{
    fmt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use compact_str::CompactString;
use tokio::sync::Semaphore;
use tracing::warn;

pub use self::engine::{BorrowedInput, Fault, LiveInstance, LoadError, PolicyEngine, PolicyModule};
use self::memo::{DecisionMemo, MemoSeries, MemoStats, Miss, Reuse};
pub use self::metrics::{CallMetrics, PolicyMetrics};
pub use self::registry::{PolicyRegistry, RegistryError, Routes};
use crate::{
    api::proto::policy as pb,
    cache::{Attributes, MAX_TAG_BYTES, MAX_TAG_SECTION_BYTES, NamespaceSettings},
    config::FallbackMode,
};

/// The cache operation a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A read.
    Get,
    /// A write.
    Set,
    /// A removal.
    Delete,
}

/// How the gateway treats a value's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Compress values above the namespace's threshold.
    #[default]
    Auto,
    /// Never compress.
    Never,
    /// Compress whenever it saves space.
    Prefer,
}

/// Entries a write invalidates, inside its namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Exact keys.
    pub keys: Vec<String>,
    /// Glob patterns (Redis syntax) over keys.
    pub patterns: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
}

impl Invalidation {
    /// Nothing to invalidate.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.patterns.is_empty() && self.tags.is_empty()
    }
}

/// A decision's tags. Shared, so that a decision the memo hands out again
/// carries them without copying each one; none takes no allocation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tags(Option<Arc<[String]>>);

impl From<Vec<String>> for Tags {
    fn from(tags: Vec<String>) -> Self {
        Tags((!tags.is_empty()).then(|| tags.into()))
    }
}

impl std::ops::Deref for Tags {
    type Target = [String];

    fn deref(&self) -> &[String] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// How one request is cached.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The key within the namespace (the cache layer scopes it). Held
    /// inline up to 24 bytes: a decision the memo hands out again copies a
    /// short key with the decision, without an allocation or a read of
    /// memory elsewhere.
    pub key: CompactString,
    /// How long a written entry is fresh, before jitter.
    pub fresh_ttl: Millis,
    /// Up to this much is added at random to `fresh_ttl` when an entry is
    /// written, so entries written together do not expire together.
    pub ttl_jitter: Millis,
    /// How long after that it may still be served stale.
    pub stale_window: Millis,
    /// Tags attached to a written entry.
    pub tags: Tags,
    /// Skip the store for this request.
    pub bypass: bool,
    /// How to treat the value's bytes.
    pub compression: Compression,
    /// What a successful write invalidates; `None` for nothing, as almost
    /// every decision. Boxed: the three lists would be a third of a decision
    /// that every memo hit copies and every request moves.
    pub invalidate: Option<Box<Invalidation>>,
    /// XFetch early-refresh beta (0: the namespace default).
    pub early_refresh_beta: f64,
    /// How long this gateway's near-cache may keep the entry after a read
    /// (zero: not eligible). Not yet clamped: the near-cache applies its own
    /// `near_cache.max_ttl`, so a policy can be written once for fleets that
    /// configure it differently.
    pub near_cache_ttl: Millis,
    /// Who decided: `default`, `name@version`, or `fail-open:name@version` /
    /// `fail-closed:name@version` when the fallback did.
    pub decided_by: Label,
}

/// Who decided how a request is cached, as responses and logs name it:
/// `default`, `name@version`, `fail-open:name@version`. Interned for the
/// process's life, one per policy version and fallback mode loaded (a few
/// dozen bytes each), so that a decision carries a plain reference: a
/// decision handed out again (a memo hit, the default policy's) copies it,
/// where a shared reference count would be a cache line that every core
/// writes on every request (gateway/benches/memo.rs).
/// A thin reference (8 bytes, to the interned text's own reference), so that
/// a [`Decision`] fits the 128 bytes the compiler copies inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label(&'static &'static str);

impl Label {
    /// The default policy's.
    pub const DEFAULT: Label = Label(&"default");

    /// The label that reads `text`: the same one for the same text.
    pub fn intern(text: &str) -> Label {
        static INTERNED: std::sync::Mutex<std::collections::BTreeMap<&'static str, Label>> =
            std::sync::Mutex::new(std::collections::BTreeMap::new());
        let mut interned = INTERNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&known) = interned.get(text) {
            return known;
        }
        let text: &'static str = Box::leak(text.into());
        let label = Label(Box::leak(Box::new(text)));
        interned.insert(text, label);
        label
    }

    /// Its text.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for Label {
    type Target = str;

    fn deref(&self) -> &str {
        self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(*self.0, f)
    }
}

/// A decision's duration in whole milliseconds, what the policy ABI carries:
/// 8 bytes where a [`Duration`] takes 16, so that a [`Decision`] fits the 128
/// bytes the compiler copies inline (a memo hit copies one out; every
/// request moves one into its plan).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(u64);

impl Millis {
    /// No time at all.
    pub const ZERO: Millis = Millis(0);

    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Millis {
        Millis(ms)
    }

    /// `duration`, to the millisecond below (saturating).
    pub fn from_duration(duration: Duration) -> Millis {
        Millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    /// Its milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// As a [`Duration`].
    pub const fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }

    /// Whether it is no time at all.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<Millis> for Duration {
    fn from(millis: Millis) -> Duration {
        millis.duration()
    }
}

impl fmt::Debug for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.duration(), f)
    }
}

impl Decision {
    /// The decision without what cannot act on `op`: a Get writes nothing,
    /// so its tags (attached to written entries) and invalidations (made by
    /// a successful write) are dropped. Validated first, so a Get whose
    /// decision names a bad tag still faults. A Get's decision handed out
    /// again by the memo then shares no tag list whose reference count every
    /// core would write, and takes less of the memo.
    pub fn acting_on(mut self, op: Operation) -> Decision {
        if op == Operation::Get {
            self.tags = Tags::default();
            self.invalidate = None;
        }
        self
    }

    /// What a successful write invalidates (empty lists for nothing).
    pub fn invalidation(&self) -> &Invalidation {
        static NOTHING: Invalidation = Invalidation {
            keys: Vec::new(),
            patterns: Vec::new(),
            tags: Vec::new(),
        };
        self.invalidate.as_deref().unwrap_or(&NOTHING)
    }
}

/// The decision every namespace gets when no policy is bound to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl DefaultPolicy {
    /// The client's key, the namespace's default TTL, nothing else.
    pub fn decide(&self, namespace: &NamespaceSettings, key: &str) -> Decision {
        Decision {
            key: key.into(),
            fresh_ttl: Millis::from_duration(namespace.default_ttl),
            ttl_jitter: Millis::ZERO,
            stale_window: Millis::ZERO,
            tags: Tags::default(),
            bypass: false,
            compression: Compression::Auto,
            invalidate: None,
            early_refresh_beta: 0.0,
            near_cache_ttl: Millis::ZERO,
            decided_by: Label::DEFAULT,
        }
    }
}

/// A namespace's policy: the module, its config and its fallback mode.
#[derive(Debug)]
pub struct Binding {
    namespace: String,
    module: Arc<PolicyModule>,
    /// The module pre-initialised with `config` (`policy.preinit`): what its
    /// calls instantiate, when there is one.
    image: Option<Arc<PolicyModule>>,
    config: Bytes,
    fallback: FallbackMode,
    fallback_label: Label,
    faults: AtomicU64,
    window: FaultWindow,
    /// `policy.max_concurrent_calls` permits for calls that run past their
    /// first tick: what bounds the CPU this binding can take from every
    /// other namespace.
    long_calls: Arc<Semaphore>,
    /// Its identity in the decision memo: a new binding starts empty.
    memo_id: u64,
    /// Whether its decisions may be memoised (`memo` in its config).
    memo: bool,
    memo_stats: OnceLock<MemoSeries>,
    /// Its version's call counters, resolved at its first call.
    call_metrics: OnceLock<CallMetrics>,
}

/// Faults counted in a fixed window, for automatic rollback.
#[derive(Debug, Default)]
struct FaultWindow {
    started_ms: AtomicU64,
    faults: AtomicU64,
    tripped: std::sync::atomic::AtomicBool,
}

impl FaultWindow {
    /// Counts a fault; true exactly once, when `threshold` faults fall within
    /// one `window`.
    fn trips(&self, threshold: u64, window: Duration) -> bool {
        if threshold == 0 || self.tripped.load(Ordering::Relaxed) {
            return false;
        }
        let now = unix_millis();
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let started = self.started_ms.load(Ordering::Relaxed);
        let count = if now.saturating_sub(started) > window_ms {
            self.started_ms.store(now, Ordering::Relaxed);
            self.faults.store(1, Ordering::Relaxed);
            1
        } else {
            self.faults.fetch_add(1, Ordering::Relaxed) + 1
        };
        count >= threshold && !self.tripped.swap(true, Ordering::Relaxed)
    }
}

impl Binding {
    /// Binds `module` to `namespace` (`""`: the default-namespace template)
    /// with `config` (passed to the policy verbatim).
    pub fn new(
        namespace: &str,
        module: Arc<PolicyModule>,
        config: Bytes,
        fallback: FallbackMode,
    ) -> Self {
        let mode = match fallback {
            FallbackMode::FailOpen => "fail-open",
            FallbackMode::FailClosed => "fail-closed",
        };
        Self {
            namespace: namespace.to_owned(),
            fallback_label: Label::intern(&format!("{mode}:{}", module.label())),
            long_calls: Arc::new(Semaphore::new(module.limits().max_concurrent_calls)),
            memo_id: memo::next_memo_id(),
            memo: true,
            memo_stats: OnceLock::new(),
            call_metrics: OnceLock::new(),
            module,
            image: None,
            config,
            fallback,
            faults: AtomicU64::new(0),
            window: FaultWindow::default(),
        }
    }

    /// The namespace it is bound to (`""`: the default-namespace template).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The bound module.
    pub fn module(&self) -> &Arc<PolicyModule> {
        &self.module
    }

    /// Calls start from `image`, the module pre-initialised with this
    /// binding's config ([`PolicyModule::preinitialized`]).
    pub fn with_image(mut self, image: Arc<PolicyModule>) -> Self {
        self.image = Some(image);
        self
    }

    /// What its calls instantiate: its pre-initialised image, or the module.
    pub fn callee(&self) -> &Arc<PolicyModule> {
        self.image.as_ref().unwrap_or(&self.module)
    }

    /// The config bytes the policy receives.
    pub fn config(&self) -> &Bytes {
        &self.config
    }

    /// What applies when the policy faults.
    pub fn fallback(&self) -> FallbackMode {
        self.fallback
    }

    /// Whether its decisions may be memoised (default: yes).
    pub fn with_memo(mut self, memo: bool) -> Self {
        self.memo = memo;
        self
    }

    /// Its memo's counters (cumulative for this version in this namespace),
    /// once a request has used it.
    pub fn memo_stats(&self) -> Option<&MemoStats> {
        self.memo_stats.get().map(|stats| &**stats)
    }
}

/// What the decider needs to know about one request.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRequest<'a> {
    /// The operation.
    pub op: Operation,
    /// The namespace as the client named it.
    pub namespace: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// Request context.
    pub attributes: &'a Attributes,
    /// Bytes being written (Set only).
    pub value_size: usize,
}

/// Bounds a policy's decision must respect.
#[derive(Debug, Clone)]
pub struct DecisionLimits {
    /// Longest key.
    pub max_key_bytes: usize,
    /// Longest TTL, stale window or jitter.
    pub max_ttl: Duration,
    /// Most tags and most invalidation entries of each kind.
    pub max_items: usize,
}

/// What the items of one batch request share: each namespace's routes,
/// resolved at its first item, and one policy instance per binding they reach
/// (a batch may span namespaces, and a shadow version is a binding of its
/// own). Its memo hits are counted once, when it is dropped with the request,
/// which also returns the instances' pool slots. A batch sees each namespace's
/// bindings as they were at its first item there: a rebind or an automatic
/// rollback during the batch applies from the next request.
#[derive(Default)]
pub struct DecisionBatch {
    routes: Vec<(Box<str>, Option<Routes>)>,
    bindings: BatchBindings,
}

/// How many namespaces a batch keeps the routes of; items of any further
/// namespace look theirs up each time.
const BATCH_ROUTES: usize = 8;

impl DecisionBatch {
    /// How many policy instances the batch holds (for tests).
    pub fn instances(&self) -> usize {
        self.bindings
            .0
            .iter()
            .filter(|slot| slot.live.is_some())
            .count()
    }
}

impl fmt::Debug for DecisionBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionBatch")
            .field("namespaces", &self.routes.len())
            .field("instances", &self.instances())
            .finish()
    }
}

/// The bindings a batch reached, each with its instance and memo hits.
#[derive(Default)]
struct BatchBindings(Vec<BatchBinding>);

struct BatchBinding {
    binding: Arc<Binding>,
    /// Empty until the batch's first call to this binding.
    live: Option<LiveInstance>,
    /// Memo hits not yet added to the binding's counter.
    memo_hits: u64,
}

impl BatchBindings {
    /// `binding`'s slot (made at its first use).
    fn slot(&mut self, binding: &Arc<Binding>) -> &mut BatchBinding {
        let at = match self
            .0
            .iter()
            .position(|slot| Arc::ptr_eq(&slot.binding, binding))
        {
            Some(at) => at,
            None => {
                self.0.push(BatchBinding {
                    binding: Arc::clone(binding),
                    live: None,
                    memo_hits: 0,
                });
                self.0.len() - 1
            }
        };
        &mut self.0[at]
    }
}

/// A batch's hits reach the counters in one add per binding, not one per
/// item: the counter is a cache line every core writes.
impl Drop for BatchBindings {
    fn drop(&mut self) {
        for slot in &self.0 {
            if let Some(stats) = slot.binding.memo_stats.get()
                && slot.memo_hits > 0
            {
                stats.hits.inc_by(slot.memo_hits);
            }
        }
    }
}

/// What [`Decider::ask`] has: a remembered decision, or a policy call to
/// await.
enum Asked<F> {
    Remembered(Decision),
    Calling(Pin<Box<F>>),
}

/// Turns requests into decisions: asks the namespace's policy, validates the
/// answer, applies the fallback on any fault.
pub struct Decider {
    registry: Arc<PolicyRegistry>,
    memo: Option<DecisionMemo>,
    limits: DecisionLimits,
    metrics: PolicyMetrics,
    rollback_after_faults: u64,
    rollback_window: Duration,
}

impl Decider {
    /// A decider over `registry`'s bindings, enforcing `limits`, counting into
    /// `metrics`.
    pub fn new(
        registry: Arc<PolicyRegistry>,
        limits: DecisionLimits,
        metrics: PolicyMetrics,
        engine: &crate::config::PolicyEngineConfig,
    ) -> Self {
        Self {
            registry,
            memo: (engine.memo_bytes > 0).then(|| DecisionMemo::new(engine.memo_bytes)),
            limits,
            metrics,
            rollback_after_faults: engine.rollback_after_faults,
            rollback_window: engine.rollback_window,
        }
    }

    /// Decides how `request` is cached in `namespace`. The items of one
    /// batch pass the same `batch`, so that each policy they call is
    /// instantiated once for all of them; a single request passes `None`.
    pub async fn decide(
        &self,
        namespace: &NamespaceSettings,
        request: &DecisionRequest<'_>,
        batch: Option<&mut DecisionBatch>,
    ) -> Decision {
        let template = namespace.is_template();
        let single;
        let resolved;
        let ((binding, shadow), mut bindings) = match batch {
            // The Arc this request holds keeps its version alive to the end
            // of the request, whatever is bound meanwhile.
            None => {
                single = self
                    .registry
                    .route(request.namespace, template, request.key);
                let Some(route) = &single else {
                    return DefaultPolicy.decide(namespace, request.key);
                };
                ((&route.binding, route.shadow.as_ref()), None)
            }
            // A batch resolves each namespace once and routes its items by key.
            Some(DecisionBatch { routes, bindings }) => {
                let routes = match routes
                    .iter()
                    .position(|(name, _)| **name == *request.namespace)
                {
                    Some(at) => &routes[at].1,
                    None if routes.len() < BATCH_ROUTES => {
                        let found = self.registry.routes(request.namespace, template);
                        routes.push((request.namespace.into(), found));
                        &routes[routes.len() - 1].1
                    }
                    None => {
                        resolved = self.registry.routes(request.namespace, template);
                        &resolved
                    }
                };
                let Some(routes) = routes else {
                    return DefaultPolicy.decide(namespace, request.key);
                };
                (routes.for_key(request.key), Some(bindings))
            }
        };
        // A memo hit is answered here, without entering (and moving the
        // decision out of) another future.
        let decision = match self.ask(binding, namespace, request, bindings.as_deref_mut()) {
            Asked::Remembered(decision) => decision,
            Asked::Calling(call) => match call.await {
                Ok(decision) => decision,
                Err(fault) => self.fall_back(binding, namespace, request, &fault),
            },
        };
        if let Some(shadow) = shadow.filter(|shadow| shadow.samples()) {
            let candidate = match self.ask(&shadow.binding, namespace, request, bindings) {
                Asked::Remembered(decision) => Ok(decision),
                Asked::Calling(call) => call.await,
            };
            let difference = compare(request.key, &decision, &candidate);
            self.metrics
                .shadowed(shadow.binding.module.label(), difference.is_some());
            shadow.record(difference);
        }
        decision
    }

    /// One decision: from the memo if it holds one for this input, else a
    /// policy call (to await), validated, measured, and kept if the policy
    /// allows. A batch's hits are counted in its `batch` slot.
    fn ask<'a>(
        &'a self,
        binding: &'a Arc<Binding>,
        namespace: &'a NamespaceSettings,
        request: &'a DecisionRequest<'a>,
        batch: Option<&'a mut BatchBindings>,
    ) -> Asked<impl Future<Output = Result<Decision, Fault>> + 'a> {
        let slot = batch.map(|batch| batch.slot(binding));
        let memo = match &self.memo {
            Some(memo) if binding.memo => {
                let stats = binding.memo_stats.get_or_init(|| {
                    let (policy, namespace) = (binding.module.label(), &binding.namespace);
                    memo.series(policy, namespace, || {
                        self.metrics.memo_stats(policy, namespace)
                    })
                });
                match memo.recall(binding.memo_id, request, unix_millis) {
                    Ok(decision) => {
                        match slot {
                            Some(slot) => slot.memo_hits += 1,
                            None => {
                                stats.hits.inc();
                            }
                        }
                        return Asked::Remembered(decision);
                    }
                    Err(miss) => {
                        stats.misses.inc();
                        Some((memo, stats, miss))
                    }
                }
            }
            _ => None,
        };
        let live = slot.map(|slot| &mut slot.live);
        // Boxed: a call's future is large, and the futures that hold this
        // one (a request's) should not carry it when the memo answers.
        Asked::Calling(Box::pin(self.call(binding, namespace, request, live, memo)))
    }

    /// A policy call for one decision, validated, measured, and kept in
    /// `memo` if the policy allows.
    async fn call(
        &self,
        binding: &Arc<Binding>,
        namespace: &NamespaceSettings,
        request: &DecisionRequest<'_>,
        live: Option<&mut Option<LiveInstance>>,
        memo: Option<(&DecisionMemo, &MemoSeries, Miss)>,
    ) -> Result<Decision, Fault> {
        let now_unix_ms = unix_millis();
        let started = Instant::now();
        // Encoded from the request's own fields into the instance.
        let input = BorrowedInput {
            op: match request.op {
                Operation::Get => pb::Operation::Get,
                Operation::Set => pb::Operation::Set,
                Operation::Delete => pb::Operation::Delete,
            },
            namespace: request.namespace,
            key: request.key,
            attributes: request.attributes,
            value_size: request.value_size as u64,
            now_unix_ms,
            config: &binding.config,
        };
        let fresh = live.as_ref().is_none_or(|live| live.is_none());
        let outcome = binding
            .callee()
            .decide_reusing(&input, &binding.long_calls, live)
            .await
            .and_then(|wire| {
                let reuse = Reuse::of(wire.reuse.as_ref(), input.value_size);
                Decision::from_wire(wire, namespace, &self.limits, binding.module.decided_by())
                    .map(|decision| (decision.acting_on(request.op), reuse))
            });
        binding
            .call_metrics
            .get_or_init(|| self.metrics.call_metrics(binding.module.label()))
            .observe(started.elapsed(), fresh);
        if let Err(fault) = &outcome {
            self.metrics.fault(binding.module.label(), fault);
        }
        let (decision, reuse) = outcome?;
        if let Some((memo, stats, miss)) = memo {
            memo.keep(miss, &decision, reuse, now_unix_ms, stats);
        }
        Ok(decision)
    }

    fn fall_back(
        &self,
        binding: &Arc<Binding>,
        namespace: &NamespaceSettings,
        request: &DecisionRequest<'_>,
        fault: &Fault,
    ) -> Decision {
        let seen = binding.faults.fetch_add(1, Ordering::Relaxed) + 1;
        // A policy that faults on every request would flood the log: say it
        // the first time, then at every power of two.
        if seen.is_power_of_two() {
            warn!(
                policy = %binding.module.label(),
                namespace = request.namespace,
                kind = fault.kind(),
                faults = seen,
                fallback = %binding.fallback_label,
                "policy fault: {fault}"
            );
        }
        if binding
            .window
            .trips(self.rollback_after_faults, self.rollback_window)
        {
            let reason = format!(
                "{} faults within {:?}, the last: {fault}",
                self.rollback_after_faults, self.rollback_window
            );
            if self.registry.roll_back_faulty(binding, &reason) {
                self.metrics.rolled_back(binding.module.label());
            }
        }
        let mut decision = DefaultPolicy.decide(namespace, request.key);
        decision.bypass = binding.fallback == FallbackMode::FailClosed;
        decision.decided_by = binding.fallback_label;
        decision
    }
}

impl Decision {
    /// Validates a policy's wire decision against the contract and `limits`.
    pub fn from_wire(
        wire: pb::PolicyDecision,
        namespace: &NamespaceSettings,
        limits: &DecisionLimits,
        decided_by: Label,
    ) -> Result<Decision, Fault> {
        let invalid = |reason: String| Err(Fault::Invalid(reason));
        if wire.storage_key.is_empty() {
            return invalid("storage_key is empty".into());
        }
        if wire.storage_key.len() > limits.max_key_bytes {
            return invalid(format!(
                "storage_key is {} bytes, over the {}-byte key limit",
                wire.storage_key.len(),
                limits.max_key_bytes
            ));
        }
        let max_ms = u64::try_from(limits.max_ttl.as_millis()).unwrap_or(u64::MAX);
        let fresh_ttl = match wire.fresh_ttl_ms {
            None => Millis::from_duration(namespace.default_ttl),
            Some(0) => return invalid("fresh_ttl_ms is 0 (use bypass not to cache)".into()),
            Some(ms) if ms > max_ms => {
                return invalid(format!(
                    "fresh_ttl_ms {ms} exceeds policy.max_ttl ({max_ms} ms)"
                ));
            }
            Some(ms) => Millis::from_millis(ms),
        };
        for (field, ms) in [
            ("stale_window_ms", wire.stale_window_ms),
            ("ttl_jitter_ms", wire.ttl_jitter_ms),
            ("near_cache_ttl_ms", wire.near_cache_ttl_ms),
        ] {
            if ms > max_ms {
                return invalid(format!("{field} {ms} exceeds policy.max_ttl ({max_ms} ms)"));
            }
        }
        if !wire.early_refresh_beta.is_finite() || wire.early_refresh_beta < 0.0 {
            return invalid(format!(
                "early_refresh_beta {} is not a finite number >= 0",
                wire.early_refresh_beta
            ));
        }
        let invalidate = wire.invalidate.unwrap_or_default();
        for (field, items) in [
            ("tags", &wire.tags),
            ("invalidate.keys", &invalidate.keys),
            ("invalidate.patterns", &invalidate.patterns),
            ("invalidate.tags", &invalidate.tags),
        ] {
            if items.len() > limits.max_items {
                return invalid(format!(
                    "{field} has {} entries, over policy.max_decision_items ({})",
                    items.len(),
                    limits.max_items
                ));
            }
            if let Some(bad) = items
                .iter()
                .find(|item| item.is_empty() || item.len() > limits.max_key_bytes)
            {
                return invalid(format!(
                    "{field} holds an entry of {} bytes (entries are 1 to {} bytes)",
                    bad.len(),
                    limits.max_key_bytes
                ));
            }
        }
        for (field, tags) in [("tags", &wire.tags), ("invalidate.tags", &invalidate.tags)] {
            if let Some(bad) = tags.iter().find(|tag| tag.len() > MAX_TAG_BYTES) {
                return invalid(format!(
                    "{field} holds a tag of {} bytes (tags are 1 to {MAX_TAG_BYTES} bytes)",
                    bad.len()
                ));
            }
        }
        let tag_bytes: usize = wire.tags.iter().map(|tag| 1 + tag.len()).sum();
        if tag_bytes > MAX_TAG_SECTION_BYTES {
            return invalid(format!(
                "tags take {tag_bytes} bytes, over the {MAX_TAG_SECTION_BYTES}-byte limit of an entry"
            ));
        }
        Ok(Decision {
            key: wire.storage_key.into(),
            fresh_ttl,
            ttl_jitter: Millis::from_millis(wire.ttl_jitter_ms),
            stale_window: Millis::from_millis(wire.stale_window_ms),
            tags: wire.tags.into(),
            bypass: wire.bypass,
            compression: match pb::CompressionHint::try_from(wire.compression) {
                Ok(pb::CompressionHint::Never) => Compression::Never,
                Ok(pb::CompressionHint::Prefer) => Compression::Prefer,
                _ => Compression::Auto,
            },
            invalidate: {
                let invalidate = Invalidation {
                    keys: invalidate.keys,
                    patterns: invalidate.patterns,
                    tags: invalidate.tags,
                };
                (!invalidate.is_empty()).then(|| Box::new(invalidate))
            },
            early_refresh_beta: wire.early_refresh_beta,
            near_cache_ttl: Millis::from_millis(wire.near_cache_ttl_ms),
            decided_by,
        })
    }
}

/// What differs between the applied decision and a shadow's, if anything.
fn compare(
    key: &str,
    active: &Decision,
    candidate: &Result<Decision, Fault>,
) -> Option<registry::ShadowDifference> {
    let brief = |d: &Decision| {
        let invalidate = d.invalidation();
        format!(
            "key={:?} ttl={:?} stale={:?} near={:?} tags={:?} bypass={} invalidate={:?}/{:?}/{:?}",
            d.key,
            d.fresh_ttl,
            d.stale_window,
            d.near_cache_ttl,
            d.tags,
            d.bypass,
            invalidate.keys,
            invalidate.patterns,
            invalidate.tags
        )
    };
    let candidate = match candidate {
        Ok(candidate) => candidate,
        Err(fault) => {
            return Some(registry::ShadowDifference {
                key: key.to_owned(),
                fields: vec!["fault"],
                active: brief(active),
                candidate: format!("{} fault: {fault}", fault.kind()),
            });
        }
    };
    let mut fields = Vec::new();
    if active.key != candidate.key {
        fields.push("key");
    }
    if active.fresh_ttl != candidate.fresh_ttl || active.ttl_jitter != candidate.ttl_jitter {
        fields.push("fresh_ttl");
    }
    if active.stale_window != candidate.stale_window {
        fields.push("stale_window");
    }
    if active.tags != candidate.tags {
        fields.push("tags");
    }
    if active.bypass != candidate.bypass {
        fields.push("bypass");
    }
    if active.near_cache_ttl != candidate.near_cache_ttl {
        fields.push("near_cache_ttl");
    }
    if active.invalidation() != candidate.invalidation() {
        fields.push("invalidate");
    }
    (!fields.is_empty()).then(|| registry::ShadowDifference {
        key: key.to_owned(),
        fields,
        active: brief(active),
        candidate: brief(candidate),
    })
}

/// Why a binding could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// The module file could not be read.
    #[error("`{field}`: cannot read policy module {path}: {source}")]
    Read {
        /// The config field naming the module.
        field: String,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The module is not loadable.
    #[error("`{field}`: cannot load policy module {path}: {source}")]
    Load {
        /// The config field naming the module.
        field: String,
        /// The path.
        path: PathBuf,
        /// Why.
        source: LoadError,
    },
    /// The policy rejected its config.
    #[error("`{field}`: the policy {policy} rejects this config: {reason}")]
    ConfigRejected {
        /// The config field holding the policy config.
        field: String,
        /// The policy's label.
        policy: String,
        /// What it said.
        reason: String,
    },
    /// The engine could not be built.
    #[error("cannot start the policy engine: {0}")]
    Engine(LoadError),
}

/// A module's name: its file name without `.wasm`.
pub fn module_name(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".to_owned())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::Label;

    #[test]
    fn a_label_is_interned_once_per_text() {
        let text = format!("interned@{}", std::process::id());
        let first = Label::intern(&text);
        let again = Label::intern(&text.clone());
        assert_eq!(first.as_str(), text);
        assert!(
            std::ptr::eq(first.as_str(), again.as_str()),
            "the same text is not leaked twice"
        );
        assert_ne!(Label::intern("other@1"), first);
        assert_eq!(Label::DEFAULT.to_string(), "default");
    }
}
