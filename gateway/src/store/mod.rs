//! The storage layer: a small trait over "bytes under a key with an expiry",
//! with namespaces, tags and generations, and two implementations:
//! [`RedisStore`] (the product's default, through a deadpool-redis pool) and
//! [`MemoryStore`] (in-process, bounded by bytes).
//!
//! Stores own the physical layout ([`layout`]): where an entry of a namespace
//! lives, how its namespace's *generation* is folded into the key (bumping it
//! flushes the namespace in O(1)), and how tags are indexed. They know the
//! envelope only through its fixed header (tags and "fresh until"), for tag
//! purges and soft purges; the cache layer encodes and decodes it.

pub(crate) mod batch;
mod coalesce;
mod expiring;
mod generations;
pub mod glob;
mod guard;
pub mod layout;
mod memory;
mod redis;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;

pub(crate) use self::expiring::{Computed, Expiring, ExpiringEntries, Op, Weighed};
pub use self::guard::{GuardMetrics, GuardedStore};
pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
pub(crate) use self::redis::{cluster_client, connect};

/// Now, in ms since the Unix epoch (the clock of envelopes and indexes).
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// An entry's logical address: its namespace and the key its policy decided.
/// Built only by the cache layer, after the namespace and key were checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageKey {
    namespace: Arc<str>,
    key: Bytes,
}

impl StorageKey {
    /// An entry address; `namespace` is a checked namespace name.
    pub(crate) fn new(namespace: Arc<str>, key: Bytes) -> Self {
        Self { namespace, key }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The key inside the namespace.
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// One entry to write.
#[derive(Debug, Clone)]
pub struct WriteEntry {
    /// Where to write it.
    pub key: StorageKey,
    /// The encoded entry (an envelope that lists `tags`).
    pub value: Bytes,
    /// When the store should drop it.
    pub expire_after: Duration,
    /// The entry's tags, to index with it.
    pub tags: Vec<String>,
}

/// What a read found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The stored bytes, if any.
    pub value: Option<Bytes>,
    /// Entries of the namespace created at or before this time (ms since the
    /// Unix epoch) were soft-purged by a namespace flush: the reader applies
    /// the purge ([`crate::cache::envelope::Times::soft_purged`]).
    pub stale_before_ms: u64,
}

/// When a lease is worth granting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCondition {
    /// The entry is missing or not fresh (created at or before
    /// `stale_before_ms`, or past its fresh time): a fill is needed.
    Unfilled {
        /// The namespace's soft-flush time, as the caller's read saw it.
        stale_before_ms: u64,
    },
    /// The entry is still the version created at `created_at_ms`: an early
    /// refresh of it is needed (not of a version that replaced it).
    Refreshing {
        /// The creation time of the version the caller read.
        created_at_ms: u64,
    },
}

/// What a lease request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseGrant {
    /// The lease is the caller's.
    Granted,
    /// Another caller holds it.
    Held,
    /// No fill is needed any more: here is the entry that makes it so.
    Filled(Bytes),
}

/// What a purge does to the entries it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// Remove them.
    Delete,
    /// Mark the fresh ones stale as of `now_ms`: each stays servable as stale
    /// for its stale window from `now_ms`, then goes (at once when it has no
    /// window); see [`crate::cache::envelope::Times::soft_purged`].
    MarkStale {
        /// The current time, ms since the Unix epoch.
        now_ms: u64,
    },
}

/// How far a long purge has got; shared with whoever follows the job.
#[derive(Debug, Default)]
pub struct Progress {
    examined: AtomicU64,
    affected: AtomicU64,
}

impl Progress {
    /// Candidates looked at so far (keys a scan matched, tag members).
    pub fn examined(&self) -> u64 {
        self.examined.load(Ordering::Relaxed)
    }

    /// Entries removed or marked stale so far.
    pub fn affected(&self) -> u64 {
        self.affected.load(Ordering::Relaxed)
    }

    /// Counts `examined` candidates, of which `affected` were purged.
    pub fn add(&self, examined: u64, affected: u64) {
        self.examined.fetch_add(examined, Ordering::Relaxed);
        self.affected.fetch_add(affected, Ordering::Relaxed);
    }
}

/// Why a store operation failed. Every variant means "the store could not
/// answer"; the cache layer turns them into degraded responses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had in time (pool exhausted, connect failed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer within the time allowed.
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// The store refused to write because it is out of memory.
    #[error("store out of memory: {0}")]
    OutOfMemory(String),
    /// The store answered with an error or an unexpected reply.
    #[error("store error: {0}")]
    Command(String),
    /// The circuit breaker is open: the store was not even asked.
    #[error("store unavailable: circuit breaker open after repeated failures")]
    CircuitOpen,
}

impl StoreError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::OutOfMemory(_) => "out_of_memory",
            StoreError::Command(_) => "command",
            StoreError::CircuitOpen => "circuit_open",
        }
    }
}

/// A key-value store with per-entry expiry, namespaces and tags.
///
/// Implementations must be cancel-safe: the cache layer drops a call's future
/// when the request's time budget runs out. A write is atomic with its tag
/// index: no reader ever sees the entry without its tags indexed.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one entry of the namespace's current generation.
    async fn get(&self, key: &StorageKey) -> Result<Fetched, StoreError>;
    /// Reads many entries in one round trip; results in `keys` order.
    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError>;
    /// Writes one entry (and indexes its tags), replacing any previous one.
    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError>;
    /// Writes many entries in one round trip.
    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError>;
    /// Removes one entry; `true` when it existed.
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError>;
    /// Removes (or marks stale) the given entries; how many were affected.
    async fn purge_keys(&self, keys: &[StorageKey], mode: PurgeMode) -> Result<u64, StoreError>;
    /// Removes (or marks stale) every entry of `namespace` whose key matches
    /// `pattern` (Redis glob syntax, see [`glob`]); how many were affected.
    /// The namespace is a literal scope: no pattern reaches outside it.
    async fn purge_matching(
        &self,
        namespace: &str,
        pattern: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError>;
    /// Removes (or marks stale) every entry of `namespace` written with
    /// `tag`; how many were affected.
    async fn purge_tag(
        &self,
        namespace: &str,
        tag: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError>;
    /// Flushes a whole namespace in O(1): [`PurgeMode::Delete`] bumps its
    /// generation, so every existing entry becomes unreachable at once (and
    /// ages out by its TTL); [`PurgeMode::MarkStale`] records the time, and
    /// reads treat every entry created by then as soft-purged at it (stale
    /// for at most its stale window, a miss without one; the bytes age out
    /// by their TTL). Returns the namespace's generation afterwards.
    async fn flush_namespace(&self, namespace: &str, mode: PurgeMode) -> Result<u64, StoreError>;
    /// Grants the lease on `key` to `token` for `ttl`, unless a lease is
    /// held or `wanted` no longer holds for the entry, all in one atomic
    /// step (so a fill that lands between the caller's read and this call is
    /// seen, not granted over). Deletes and purges of the key, purges of a
    /// tag the filled entry carries, and namespace flushes void the lease.
    async fn acquire_lease(
        &self,
        key: &StorageKey,
        token: &str,
        ttl: Duration,
        wanted: LeaseCondition,
    ) -> Result<LeaseGrant, StoreError>;
    /// Writes `entry` only if `token` is its key's current lease and no tag
    /// the entry carries was purged since the lease was granted, consuming
    /// the lease, atomically; whether it was written.
    async fn set_leased(&self, entry: WriteEntry, token: &str) -> Result<bool, StoreError>;
    /// Gives the lease back if `token` holds it (compare-and-delete).
    async fn release_lease(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError>;
    /// A short name for logs and metrics (`redis`, `memory`).
    fn name(&self) -> &'static str;
}
