//! Byte-keyed entries in this process's memory, bounded by bytes, each
//! expiring at its own instant: the one moka cache behind both the memory
//! store ([`super::MemoryStore`]) and the near-cache
//! ([`crate::cache::NearCache`]). What the two share lives here: how an
//! entry is weighed, how its expiry is kept across in-place rewrites, and the
//! walk that finds a namespace's entries by key prefix.

use std::{
    future::ready,
    time::{Duration, Instant},
};

use bytes::Bytes;
use moka::{
    Expiry,
    future::Cache,
    ops::compute::{CompResult, Op},
};

/// Entries a walk looks at between yields to the runtime.
const WALK_STEP: usize = 4096;

/// Per-entry bookkeeping moka does not keep for us.
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// What an entry's value weighs, in bytes, towards the capacity.
pub(crate) trait Weighed {
    /// Bytes held (the key and a fixed overhead are added).
    fn weight(&self) -> usize;
}

impl Weighed for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A value and the instant it stops being returned.
#[derive(Clone, Debug)]
pub(crate) struct Expiring<V> {
    /// The value.
    pub(crate) value: V,
    /// When it expires.
    pub(crate) expires_at: Instant,
}

/// Each entry expires when it was written to; rewriting it in place (a soft
/// purge) keeps that time.
struct WrittenExpiry;

impl<V> Expiry<Bytes, Expiring<V>> for WrittenExpiry {
    fn expire_after_create(
        &self,
        _key: &Bytes,
        value: &Expiring<V>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &Bytes,
        value: &Expiring<V>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(updated_at))
    }
}

/// The cache: at most `max_bytes` of keys and values (least recently used go
/// first), every entry gone at its own `expires_at`.
pub(crate) struct ExpiringEntries<V> {
    entries: Cache<Bytes, Expiring<V>>,
}

impl<V> ExpiringEntries<V>
where
    V: Weighed + Clone + Send + Sync + 'static,
{
    /// Holds at most `max_bytes` (keys, values and a fixed overhead each).
    pub(crate) fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &Bytes, value: &Expiring<V>| {
                let weight = key.len() + value.value.weight() + ENTRY_OVERHEAD_BYTES;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(WrittenExpiry)
            .build();
        Self { entries }
    }

    /// The entry under `key`, unless it expired.
    pub(crate) async fn get(&self, key: &[u8]) -> Option<Expiring<V>> {
        self.entries.get(key).await
    }

    /// Writes, replaces or removes the entry under `key` with `decide`, under
    /// moka's per-key lock: no other compute of the same key interleaves, so
    /// a check made in `decide` still holds when its answer is applied.
    pub(crate) async fn compute(
        &self,
        key: Bytes,
        decide: impl FnOnce(Option<&Expiring<V>>) -> Op<Expiring<V>>,
    ) -> CompResult<Bytes, Expiring<V>> {
        self.entries
            .entry(key)
            .and_compute_with(|current| {
                let op = decide(current.as_ref().map(|entry| entry.value()));
                ready(op)
            })
            .await
    }

    /// Removes the entry under `key` (through the per-key lock, see
    /// [`ExpiringEntries::compute`]); whether there was one.
    pub(crate) async fn remove(&self, key: Bytes) -> bool {
        matches!(
            self.compute(key, |current| match current {
                Some(_) => Op::Remove,
                None => Op::Nop,
            })
            .await,
            CompResult::Removed(_)
        )
    }

    /// The keys starting with `prefix` whose rest and value pass `select`.
    /// A full walk (there is no index to narrow it) that yields to the
    /// runtime every few thousand entries, so a large cache does not hold a
    /// worker thread away from the requests it serves.
    pub(crate) async fn keys_with_prefix(
        &self,
        prefix: &[u8],
        select: impl Fn(&[u8], &V) -> bool,
    ) -> Vec<Bytes> {
        let mut selected = Vec::new();
        for (walked, (key, entry)) in self.entries.iter().enumerate() {
            if key
                .strip_prefix(prefix)
                .is_some_and(|rest| select(rest, &entry.value))
            {
                selected.push(Bytes::clone(&key));
            }
            if walked % WALK_STEP == WALK_STEP - 1 {
                tokio::task::yield_now().await;
            }
        }
        selected
    }

    /// Drops every entry at once.
    pub(crate) fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Bytes currently accounted for (after pending maintenance has run).
    pub(crate) async fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.weighted_size()
    }

    /// Bytes accounted for as of the last maintenance (cheap, for metrics).
    pub(crate) fn approximate_bytes(&self) -> u64 {
        self.entries.weighted_size()
    }
}
