//! The near-cache (L1): entries a policy marks eligible
//! ([`crate::policy::Decision::near_cache_ttl`]), kept in this process for a
//! few seconds after a store read so that hot keys are served without a
//! Redis round trip.
//!
//! It stores exactly what the store returned (the envelope bytes and the
//! namespace's soft-flush time), and the cache layer decodes a near hit with
//! the same code as a store hit, so freshness, stale windows and leases cannot
//! diverge between the two tiers. Only fresh hits are kept, each for the
//! policy's near TTL capped by `near_cache.max_ttl` and by the entry's
//! remaining fresh time.
//!
//! # Coherence
//! Every gateway drops what a write or an invalidation changes, locally and
//! on every other gateway through [`bus`] (Redis pub/sub), after the store
//! acknowledged and before the client is answered. Two races are closed
//! here rather than left to timing:
//! - a read in flight when an invalidation lands must not put back the value
//!   it read before: reads take a [`Ticket`] (the invalidation sequence)
//!   before the store read, and a fill lands only if no invalidation was
//!   applied since, checked under the entry's lock (a key drop takes the same
//!   lock, so it either sees the fill and removes it, or the fill sees it);
//! - a namespace drop or a clear cannot take every entry's lock, so entries
//!   remember the ticket they were filled with, and a lookup refuses those
//!   older than the last drop that covers them (the *floors*).
//!
//! While the subscription is down, nothing tells this gateway about writes
//! elsewhere: the near-cache is cleared and bypassed (every read goes to the
//! store) until it is subscribed again, then cleared once more.

pub mod bus;

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    config::NearCacheConfig,
    policy::Invalidation,
    store::{Computed, Expiring, ExpiringEntries, Fetched, Op, StorageKey, Weighed},
};

pub use self::bus::Bus;

/// Namespaces whose drop floors are remembered one by one; past this, a drop
/// raises the floor of every namespace (safe, and keeps the table bounded
/// whatever names clients make up).
const MAX_NAMESPACE_FLOORS: usize = 10_000;

/// What changed in the store, as far as near-caches are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These keys (policy-side, inside the namespace) were written or removed.
    Keys {
        /// The namespace.
        namespace: Arc<str>,
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Anything in the namespace may have changed (a pattern or tag purge, a
    /// flush): near-caches drop the whole namespace, which is exact enough
    /// for entries that live seconds, and needs no tag or pattern matching.
    Namespace(Arc<str>),
}

impl Change {
    /// One written or removed entry.
    pub fn key(key: &StorageKey) -> Self {
        Change::Keys {
            namespace: Arc::from(key.namespace()),
            keys: vec![Bytes::copy_from_slice(key.key())],
        }
    }

    /// What running `invalidation` (or a flush) in `namespace` may change;
    /// `None` when it changes nothing.
    pub fn of_invalidation(
        namespace: &str,
        invalidation: &Invalidation,
        flush: bool,
    ) -> Option<Self> {
        if flush || !invalidation.patterns.is_empty() || !invalidation.tags.is_empty() {
            return Some(Change::Namespace(Arc::from(namespace)));
        }
        (!invalidation.keys.is_empty()).then(|| Change::Keys {
            namespace: Arc::from(namespace),
            keys: invalidation
                .keys
                .iter()
                .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                .collect(),
        })
    }

    /// The namespace changed.
    pub fn namespace(&self) -> &str {
        match self {
            Change::Keys { namespace, .. } | Change::Namespace(namespace) => namespace,
        }
    }
}

/// A read's right to fill the near-cache with what it reads: the
/// invalidation sequence when the read began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

#[derive(Clone, Debug)]
struct NearEntry {
    /// The stored bytes, exactly as the store returned them.
    value: Bytes,
    /// The namespace's soft-flush time as the store reported it.
    stale_before_ms: u64,
    /// The ticket the entry was filled with.
    born: u64,
}

impl Weighed for NearEntry {
    fn weight(&self) -> usize {
        self.value.len() + 2 * std::mem::size_of::<u64>()
    }
}

/// This gateway's near-cache.
pub struct NearCache {
    entries: ExpiringEntries<NearEntry>,
    max_ttl: Duration,
    /// Moves on at every drop applied (local or announced): in-flight fills
    /// that started before it do not land.
    seq: AtomicU64,
    /// Entries filled before this were cleared (a lost subscription, too many
    /// namespaces to track).
    floor: AtomicU64,
    /// Per namespace, entries filled before this were dropped.
    namespace_floors: RwLock<HashMap<Arc<str>, u64>>,
    /// Subscribed: announcements from other gateways reach us. Lookups and
    /// fills only happen while this holds.
    coherent: AtomicBool,
    /// Where changes are announced to the fleet (set once subscribed).
    bus: OnceLock<Arc<Bus>>,
    metrics: NearCacheMetrics,
}

impl NearCache {
    /// An empty near-cache, bypassed until [`NearCache::resume`] says it is
    /// subscribed; its metrics are registered in `registry`.
    pub fn new(config: &NearCacheConfig, registry: &mut Registry) -> Self {
        Self {
            entries: ExpiringEntries::new(config.max_bytes),
            max_ttl: config.max_ttl,
            seq: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            namespace_floors: RwLock::default(),
            coherent: AtomicBool::new(false),
            bus: OnceLock::new(),
            metrics: NearCacheMetrics::register(registry),
        }
    }

    /// Whether lookups are served (the subscription is live).
    pub fn is_coherent(&self) -> bool {
        self.coherent.load(Ordering::SeqCst)
    }

    /// The longest an entry may stay.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// How long a read decided with `asked` may keep its entry here (`None`:
    /// not eligible).
    pub(crate) fn ttl_for(&self, asked: Duration) -> Option<Duration> {
        (!asked.is_zero()).then(|| asked.min(self.max_ttl))
    }

    /// Takes a ticket for a read about to start; `None` while bypassed.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.is_coherent()
            .then(|| Ticket(self.seq.load(Ordering::SeqCst)))
    }

    /// The entry under `key`, as the store returned it when it was filled,
    /// if it is here and no drop since covers it.
    pub(crate) async fn lookup(&self, key: &StorageKey) -> Option<Fetched> {
        if !self.is_coherent() {
            return None;
        }
        let found = self
            .entries
            .get(&entry_key(key.namespace(), key.key()))
            .filter(|entry| self.is_current(key.namespace(), entry.value.born));
        if found.is_none() {
            self.metrics.lookup_outcome("miss");
        }
        found.map(|entry| Fetched {
            value: Some(entry.value.value),
            stale_before_ms: entry.value.stale_before_ms,
        })
    }

    /// Counts a found entry the cache layer served.
    pub(crate) fn served(&self) {
        self.metrics.lookup_outcome("hit");
    }

    /// Counts a found entry the cache layer did not serve after all (it had
    /// stopped being fresh by the time it was decoded): the store is asked.
    pub(crate) fn unserved(&self) {
        self.metrics.lookup_outcome("expired");
    }

    fn is_current(&self, namespace: &str, born: u64) -> bool {
        if born < self.floor.load(Ordering::SeqCst) {
            return false;
        }
        let floors = self
            .namespace_floors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        floors.get(namespace).is_none_or(|floor| born >= *floor)
    }

    /// Keeps what a read found under `key` for `ttl`, unless a drop was
    /// applied since the read took `ticket`.
    pub(crate) async fn fill(
        &self,
        key: &StorageKey,
        found: &Fetched,
        ttl: Duration,
        ticket: Ticket,
    ) {
        let Some(value) = found.value.clone() else {
            return;
        };
        if ttl.is_zero() {
            return;
        }
        let entry = Expiring {
            value: NearEntry {
                value,
                stale_before_ms: found.stale_before_ms,
                born: ticket.0,
            },
            expires_at: Instant::now() + ttl,
        };
        // Checked under the key's lock: a key drop bumps the sequence before
        // taking the same lock, so either this sees the bump, or the drop
        // comes after the fill and removes it.
        let result = self
            .entries
            .compute(entry_key(key.namespace(), key.key()), |_| {
                if self.is_coherent() && self.seq.load(Ordering::SeqCst) == ticket.0 {
                    Op::Put(entry)
                } else {
                    Op::Nop
                }
            })
            .await;
        match result {
            Computed::Inserted | Computed::Replaced => {
                self.metrics.fills.inc();
            }
            _ => {
                self.metrics.fills_raced.inc();
            }
        }
        self.metrics
            .bytes
            .set(gauge_value(self.entries.weighted_size()));
    }

    /// Applies `change` here, then announces it to the other gateways (when
    /// the bus runs). Called after the store acknowledged the change and
    /// before the client hears of it.
    pub(crate) async fn changed(&self, change: Change) {
        self.apply(&change).await;
        if let Some(bus) = self.bus.get() {
            bus.publish(&change, &self.metrics).await;
        }
    }

    /// Drops what `change` covers from this near-cache.
    pub(crate) async fn apply(&self, change: &Change) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        match change {
            Change::Keys { namespace, keys } => {
                for key in keys {
                    self.entries.remove(entry_key(namespace, key)).await;
                }
            }
            Change::Namespace(namespace) => {
                {
                    let mut floors = self
                        .namespace_floors
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if floors.len() >= MAX_NAMESPACE_FLOORS && !floors.contains_key(namespace) {
                        self.floor.fetch_max(seq, Ordering::SeqCst);
                        floors.clear();
                    } else {
                        floors.insert(Arc::clone(namespace), seq);
                    }
                }
                // The floor already hides them; removing them frees the memory.
                let prefix = namespace_prefix(namespace);
                for key in self.entries.keys_with_prefix(&prefix, |_, _| true).await {
                    self.entries.remove(key).await;
                }
            }
        }
        self.metrics
            .bytes
            .set(gauge_value(self.entries.weighted_size()));
    }

    /// Applies a change another gateway announced.
    pub(crate) async fn apply_announced(&self, change: &Change) {
        self.metrics.received(match change {
            Change::Keys { .. } => "keys",
            Change::Namespace(_) => "namespace",
        });
        self.apply(change).await;
    }

    /// The subscription is lost: from now on nothing tells us about writes
    /// elsewhere, so everything is dropped and lookups stop until
    /// [`NearCache::resume`]. Whether it was coherent until now.
    pub(crate) fn suspend(&self) -> bool {
        let was = self.coherent.swap(false, Ordering::SeqCst);
        self.clear();
        if was {
            self.metrics.dropped.inc();
        }
        self.metrics.coherent.set(0);
        was
    }

    /// Subscribed (again): whatever was kept before may have been changed by
    /// a message we missed, so start empty, then serve.
    pub(crate) fn resume(&self) {
        self.clear();
        self.coherent.store(true, Ordering::SeqCst);
        self.metrics.coherent.set(1);
    }

    fn clear(&self) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.floor.fetch_max(seq, Ordering::SeqCst);
        self.entries.clear();
        self.metrics.bytes.set(0);
    }

    /// Announces through `bus` from now on.
    pub(crate) fn attach(&self, bus: Arc<Bus>) {
        // Attached once at start; a second bus would be a wiring bug, and the
        // first keeps working.
        let _ = self.bus.set(bus);
    }
}

/// The near-cache's own key for an entry: the namespace behind its length,
/// then the policy-side key, so a namespace's entries share a prefix no
/// other namespace's entries start with.
fn entry_key(namespace: &str, key: &[u8]) -> Bytes {
    let mut bytes = BytesMut::with_capacity(2 + namespace.len() + key.len());
    bytes.extend_from_slice(&namespace_prefix(namespace));
    bytes.put_slice(key);
    bytes.freeze()
}

fn namespace_prefix(namespace: &str) -> Vec<u8> {
    // Namespace names are short checked names; the length cannot overflow a
    // u16, and saturating keeps the prefix distinct even if it did.
    let len = u16::try_from(namespace.len()).unwrap_or(u16::MAX);
    let mut prefix = Vec::with_capacity(2 + namespace.len());
    prefix.extend_from_slice(&len.to_be_bytes());
    prefix.extend_from_slice(namespace.as_bytes());
    prefix
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The near-cache's metrics.
#[derive(Clone, Debug)]
pub(crate) struct NearCacheMetrics {
    lookups: Family<OutcomeLabels, Counter>,
    fills: Counter,
    fills_raced: Counter,
    received: Family<KindLabels, Counter>,
    published: Counter,
    publish_errors: Counter,
    dropped: Counter,
    coherent: Gauge,
    bytes: Gauge,
}

impl NearCacheMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            lookups: Family::default(),
            fills: Counter::default(),
            fills_raced: Counter::default(),
            received: Family::default(),
            published: Counter::default(),
            publish_errors: Counter::default(),
            dropped: Counter::default(),
            coherent: Gauge::default(),
            bytes: Gauge::default(),
        };
        registry.register(
            "cachegw_near_cache_lookups",
            "Near-cache (L1) lookups of eligible Gets by outcome: hit (served without the store), miss, expired (found but no longer fresh)",
            metrics.lookups.clone(),
        );
        registry.register(
            "cachegw_near_cache_fills",
            "Entries put in the near-cache after a store hit",
            metrics.fills.clone(),
        );
        registry.register(
            "cachegw_near_cache_fills_raced",
            "Near-cache fills skipped because a drop was applied while their store read was in flight",
            metrics.fills_raced.clone(),
        );
        registry.register(
            "cachegw_near_cache_messages_received",
            "Invalidation messages from other gateways applied to the near-cache, by kind (keys, namespace)",
            metrics.received.clone(),
        );
        registry.register(
            "cachegw_near_cache_messages_published",
            "Invalidation messages this gateway published for its writes and invalidations",
            metrics.published.clone(),
        );
        registry.register(
            "cachegw_near_cache_publish_errors",
            "Invalidation messages that could not be published (other gateways keep the old value until their near TTL ends)",
            metrics.publish_errors.clone(),
        );
        registry.register(
            "cachegw_near_cache_dropped",
            "Times the whole near-cache was dropped because its invalidation subscription was lost",
            metrics.dropped.clone(),
        );
        registry.register(
            "cachegw_near_cache_coherent",
            "1 while the near-cache is subscribed and serving, 0 while it is bypassed",
            metrics.coherent.clone(),
        );
        registry.register(
            "cachegw_near_cache_bytes",
            "Bytes the near-cache holds (as of its last maintenance)",
            metrics.bytes.clone(),
        );
        metrics
    }

    fn lookup_outcome(&self, outcome: &'static str) {
        self.lookups.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    fn received(&self, kind: &'static str) {
        self.received.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn published(&self, ok: bool) {
        if ok {
            self.published.inc();
        } else {
            self.publish_errors.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> NearCache {
        let near = NearCache::new(&NearCacheConfig::default(), &mut Registry::default());
        near.resume();
        near
    }

    fn key(namespace: &str, text: &str) -> StorageKey {
        StorageKey::new(
            Arc::from(namespace),
            Bytes::copy_from_slice(text.as_bytes()),
        )
    }

    fn found(text: &'static str) -> Fetched {
        Fetched {
            value: Some(Bytes::from_static(text.as_bytes())),
            stale_before_ms: 7,
        }
    }

    async fn filled(near: &NearCache, key: &StorageKey, text: &'static str) {
        let ticket = near.ticket().unwrap();
        near.fill(key, &found(text), Duration::from_secs(60), ticket)
            .await;
    }

    #[tokio::test]
    async fn serves_what_was_filled_until_its_key_changes() {
        let near = near();
        let k = key("a", "k");
        assert_eq!(near.lookup(&k).await, None);
        filled(&near, &k, "v1").await;
        assert_eq!(near.lookup(&k).await, Some(found("v1")));
        assert_eq!(
            near.lookup(&key("b", "k")).await,
            None,
            "namespaces are apart"
        );
        near.apply(&Change::key(&k)).await;
        assert_eq!(near.lookup(&k).await, None);
    }

    #[tokio::test]
    async fn a_drop_during_a_read_keeps_that_read_out() {
        let near = near();
        let k = key("a", "k");
        // The read takes its ticket, then the key is invalidated (here or
        // announced) while the store read is in flight...
        let ticket = near.ticket().unwrap();
        near.apply(&Change::key(&k)).await;
        // ...so the value it read (the old one) must not land.
        near.fill(&k, &found("old"), Duration::from_secs(60), ticket)
            .await;
        assert_eq!(near.lookup(&k).await, None);
        // A read that starts after the drop fills normally.
        filled(&near, &k, "new").await;
        assert_eq!(near.lookup(&k).await, Some(found("new")));
    }

    #[tokio::test]
    async fn a_namespace_drop_covers_its_namespace_only() {
        let near = near();
        let (a1, a2, b1) = (key("a", "1"), key("a", "2"), key("ab", "1"));
        for k in [&a1, &a2, &b1] {
            filled(&near, k, "v").await;
        }
        let stale = near.ticket().unwrap();
        near.apply(&Change::Namespace(Arc::from("a"))).await;
        assert_eq!(near.lookup(&a1).await, None);
        assert_eq!(near.lookup(&a2).await, None);
        assert_eq!(
            near.lookup(&b1).await,
            Some(found("v")),
            "`ab` is another namespace"
        );
        near.fill(&a1, &found("old"), Duration::from_secs(60), stale)
            .await;
        assert_eq!(near.lookup(&a1).await, None, "a read from before the drop");
        filled(&near, &a1, "new").await;
        assert_eq!(near.lookup(&a1).await, Some(found("new")));
    }

    #[tokio::test]
    async fn a_lost_subscription_clears_and_bypasses_until_resumed() {
        let near = near();
        let k = key("a", "k");
        filled(&near, &k, "v").await;
        let in_flight = near.ticket().unwrap();
        assert!(near.suspend());
        assert!(!near.is_coherent());
        assert_eq!(near.ticket(), None, "no fills while bypassed");
        assert_eq!(near.lookup(&k).await, None);
        near.resume();
        near.fill(&k, &found("old"), Duration::from_secs(60), in_flight)
            .await;
        assert_eq!(near.lookup(&k).await, None, "a read from before the loss");
        filled(&near, &k, "v2").await;
        assert_eq!(near.lookup(&k).await, Some(found("v2")));
    }

    #[tokio::test]
    async fn entries_leave_after_their_ttl() {
        let near = near();
        let k = key("a", "k");
        let ticket = near.ticket().unwrap();
        near.fill(&k, &found("v"), Duration::from_millis(20), ticket)
            .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while near.lookup(&k).await.is_some() {
            assert!(Instant::now() < deadline, "entry outlived its near TTL");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn ttls_are_opt_in_and_capped() {
        let near = near();
        assert_eq!(near.ttl_for(Duration::ZERO), None);
        assert_eq!(
            near.ttl_for(Duration::from_millis(300)),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            near.ttl_for(Duration::from_secs(3600)),
            Some(near.max_ttl())
        );
    }

    #[test]
    fn invalidations_become_key_or_namespace_drops() {
        let keys = Invalidation {
            keys: vec!["k".into()],
            ..Invalidation::default()
        };
        assert_eq!(
            Change::of_invalidation("a", &keys, false),
            Some(Change::Keys {
                namespace: Arc::from("a"),
                keys: vec![Bytes::from_static(b"k")]
            })
        );
        let tags = Invalidation {
            tags: vec!["t".into()],
            ..keys.clone()
        };
        assert_eq!(
            Change::of_invalidation("a", &tags, false),
            Some(Change::Namespace(Arc::from("a")))
        );
        assert_eq!(
            Change::of_invalidation("a", &Invalidation::default(), true),
            Some(Change::Namespace(Arc::from("a")))
        );
        assert_eq!(
            Change::of_invalidation("a", &Invalidation::default(), false),
            None
        );
    }
}
