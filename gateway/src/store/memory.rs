//! The in-process store: a cache bounded by the bytes of its keys and
//! values, with each entry's own expiry ([`ExpiringEntries`], the type the
//! near-cache uses too). It lets the gateway run where there
//! is no Redis (development, single-node deployments); entries live only as
//! long as the process.
//!
//! Entries use the same physical keys as in Redis ([`layout`]), so patterns
//! and generations behave identically. There is no tag index: a tag purge
//! walks the namespace's entries and checks each envelope's tag section, which
//! is exact by construction and costs O(entries in the store), fine at the
//! sizes an in-process store holds. Every write goes through the per-key
//! compute lock ([`ExpiringEntries::compute`]), so a purge's read-check-write of one entry never races a
//! concurrent Set of the same key.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Fetched, LeaseCondition, LeaseGrant, Progress, PurgeMode, StorageKey, Store, StoreError,
    WriteEntry,
    expiring::{Computed, Expiring, ExpiringEntries, Op},
    generations::{Generations, NamespaceState},
    glob, layout, unix_millis,
};
use crate::cache::envelope::{self, SoftPurge};

/// An entry's envelope bytes and when the store drops it.
type StoredValue = Expiring<Bytes>;

/// Cache entries in this process's memory.
pub struct MemoryStore {
    entries: ExpiringEntries<Bytes>,
    generations: Generations,
    /// Every lease operation, and every void, under one lock: a leased
    /// write's check-and-write is atomic against them.
    leases: tokio::sync::Mutex<Leases>,
    /// How long a tag purge's mark voids leases: the longest lease.
    lease_void_ttl: Duration,
}

/// Leases held, and the marks tag purges leave to void them.
#[derive(Default)]
struct Leases {
    /// By lease key (see [`layout::lease_key`]).
    held: HashMap<Bytes, Held>,
    /// By tag void key: the tag sequence of the tag's last purge.
    voids: HashMap<Bytes, (u64, Instant)>,
    /// Each namespace's tag sequence: moves on at every tag purge.
    tag_seq: HashMap<Arc<str>, u64>,
    /// Operations since expired leases and marks were last swept.
    since_sweep: usize,
}

struct Held {
    token: String,
    /// The namespace's tag sequence when the lease was granted.
    tag_seq: u64,
    expires_at: Instant,
}

/// Operations between sweeps of expired leases and void marks.
const LEASE_SWEEP_EVERY: usize = 4096;

impl Leases {
    fn sweep_now_and_then(&mut self) {
        self.since_sweep += 1;
        if self.since_sweep >= LEASE_SWEEP_EVERY {
            self.since_sweep = 0;
            let now = Instant::now();
            self.held.retain(|_, held| held.expires_at > now);
            self.voids.retain(|_, (_, expires_at)| *expires_at > now);
        }
    }

    /// The live lease under `key` if `token` holds it.
    fn held_by(&self, key: &[u8], token: &str) -> Option<&Held> {
        self.held
            .get(key)
            .filter(|held| held.token == token && held.expires_at > Instant::now())
    }
}

impl MemoryStore {
    /// A store that holds at most `max_bytes` of keys and values, whose
    /// leases last at most `max_lease_ttl`.
    pub fn new(max_bytes: u64, max_lease_ttl: Duration) -> Self {
        Self {
            entries: ExpiringEntries::new(max_bytes),
            generations: Generations::default(),
            leases: tokio::sync::Mutex::new(Leases::default()),
            lease_void_ttl: max_lease_ttl,
        }
    }

    /// Bytes currently accounted for.
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    fn lease_key(&self, key: &StorageKey) -> Bytes {
        let generation = self.generations.get(key.namespace()).generation;
        Bytes::from(layout::lease_key(key.namespace(), generation, key.key()))
    }

    fn physical(&self, key: &StorageKey) -> (Bytes, NamespaceState) {
        let state = self.generations.get(key.namespace());
        let physical = layout::entry_key(key.namespace(), state.generation, key.key());
        (Bytes::from(physical), state)
    }

    /// Applies `mode` to the entry under `physical` if `still_selected`
    /// (checked under the key's lock) holds for it; whether it was affected.
    async fn purge_one(
        &self,
        physical: Bytes,
        mode: PurgeMode,
        still_selected: impl FnOnce(&[u8]) -> bool,
    ) -> bool {
        let result = self
            .entries
            .compute(physical, |current| match current {
                Some(entry) if still_selected(&entry.value) => match mode {
                    PurgeMode::Delete => Op::Remove,
                    PurgeMode::MarkStale { now_ms } => {
                        match envelope::soft_purge(&entry.value, now_ms) {
                            SoftPurge::Untouched => Op::Nop,
                            SoftPurge::Remove => Op::Remove,
                            SoftPurge::Rewrite {
                                bytes,
                                stale_for_ms,
                            } => Op::Put(StoredValue {
                                value: bytes,
                                expires_at: entry
                                    .expires_at
                                    .min(Instant::now() + Duration::from_millis(stale_for_ms)),
                            }),
                        }
                    }
                },
                _ => Op::Nop,
            })
            .await;
        matches!(result, Computed::Removed | Computed::Replaced)
    }

    /// Purges every entry of the namespace's current generation whose key
    /// (after the prefix) and bytes pass `select`.
    async fn purge_where(
        &self,
        namespace: &str,
        mode: PurgeMode,
        progress: &Progress,
        select: impl Fn(&[u8], &[u8]) -> bool,
    ) -> u64 {
        let state = self.generations.get(namespace);
        let prefix = layout::entry_prefix(namespace, state.generation);
        // Physical keys end with the layout's suffix after the entry key.
        let selected = self
            .entries
            .keys_with_prefix(&prefix, |rest, bytes: &Bytes| {
                rest.strip_suffix(layout::KEY_SUFFIX)
                    .is_some_and(|key| select(key, bytes))
            })
            .await;
        let mut affected = 0;
        for physical in selected {
            let rest = physical.slice(prefix.len()..physical.len() - layout::KEY_SUFFIX.len());
            let hit = self
                .purge_one(physical, mode, |bytes| select(&rest, bytes))
                .await;
            progress.add(1, u64::from(hit));
            affected += u64::from(hit);
        }
        affected
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &StorageKey) -> Result<Fetched, StoreError> {
        let (physical, state) = self.physical(key);
        Ok(Fetched {
            value: self.entries.get(&physical).map(|stored| stored.value),
            stale_before_ms: state.stale_before_ms,
        })
    }

    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }

    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError> {
        let (physical, _) = self.physical(&entry.key);
        let value = StoredValue {
            value: entry.value,
            expires_at: Instant::now() + entry.expire_after,
        };
        self.entries.compute(physical, |_| Op::Put(value)).await;
        Ok(())
    }

    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        for entry in entries {
            self.set(entry).await?;
        }
        Ok(())
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.leases.lock().await.held.remove(&self.lease_key(key));
        let (physical, _) = self.physical(key);
        Ok(self.purge_one(physical, PurgeMode::Delete, |_| true).await)
    }

    async fn purge_keys(&self, keys: &[StorageKey], mode: PurgeMode) -> Result<u64, StoreError> {
        {
            let mut leases = self.leases.lock().await;
            for key in keys {
                leases.held.remove(&self.lease_key(key));
            }
        }
        let mut affected = 0;
        for key in keys {
            let (physical, _) = self.physical(key);
            affected += u64::from(self.purge_one(physical, mode, |_| true).await);
        }
        Ok(affected)
    }

    async fn purge_matching(
        &self,
        namespace: &str,
        pattern: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        let pattern = pattern.as_bytes();
        {
            // Fills in progress of matching keys are voided too.
            let generation = self.generations.get(namespace).generation;
            let prefix = layout::lease_prefix(namespace, generation);
            self.leases.lock().await.held.retain(|key, _| {
                !(key.starts_with(&prefix)
                    && layout::inner_key(key, prefix.len())
                        .is_some_and(|rest| glob::matches(pattern, rest)))
            });
        }
        Ok(self
            .purge_where(namespace, mode, progress, |key, _| {
                glob::matches(pattern, key)
            })
            .await)
    }

    async fn purge_tag(
        &self,
        namespace: &str,
        tag: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        {
            let generation = self.generations.get(namespace).generation;
            let mut leases = self.leases.lock().await;
            let seq = leases.tag_seq.entry(Arc::from(namespace)).or_default();
            *seq += 1;
            let seq = *seq;
            leases.voids.insert(
                Bytes::from(layout::tag_void_key(namespace, generation, tag)),
                (seq, Instant::now() + self.lease_void_ttl),
            );
        }
        Ok(self
            .purge_where(namespace, mode, progress, |_, bytes| {
                envelope::carries_tag(bytes, tag)
            })
            .await)
    }

    async fn flush_namespace(&self, namespace: &str, mode: PurgeMode) -> Result<u64, StoreError> {
        let state = self.generations.update(namespace, |state| match mode {
            PurgeMode::Delete => state.generation += 1,
            PurgeMode::MarkStale { now_ms } => {
                state.stale_before_ms = state.stale_before_ms.max(now_ms);
            }
        });
        Ok(state.generation)
    }

    async fn acquire_lease(
        &self,
        key: &StorageKey,
        token: &str,
        ttl: Duration,
        wanted: LeaseCondition,
    ) -> Result<LeaseGrant, StoreError> {
        let lease_key = self.lease_key(key);
        let mut leases = self.leases.lock().await;
        // Under the lease lock, no leased write can land between this check
        // and the grant.
        let (physical, _) = self.physical(key);
        let current = self.entries.get(&physical).map(|stored| stored.value);
        let times = current.as_deref().and_then(envelope::times);
        match (wanted, times) {
            (LeaseCondition::Unfilled { stale_before_ms }, Some(times))
                if times.fresh_until_ms > unix_millis()
                    && times.created_at_ms > stale_before_ms =>
            {
                return Ok(LeaseGrant::Filled(current.unwrap_or_default()));
            }
            (LeaseCondition::Refreshing { created_at_ms }, Some(times))
                if times.created_at_ms != created_at_ms =>
            {
                return Ok(LeaseGrant::Filled(current.unwrap_or_default()));
            }
            (LeaseCondition::Refreshing { .. }, None) => return Ok(LeaseGrant::Held),
            _ => {}
        }
        leases.sweep_now_and_then();
        let now = Instant::now();
        if leases
            .held
            .get(&lease_key)
            .is_some_and(|held| held.expires_at > now)
        {
            return Ok(LeaseGrant::Held);
        }
        let tag_seq = leases
            .tag_seq
            .get(key.namespace())
            .copied()
            .unwrap_or_default();
        leases.held.insert(
            lease_key,
            Held {
                token: token.to_owned(),
                tag_seq,
                expires_at: now + ttl,
            },
        );
        Ok(LeaseGrant::Granted)
    }

    async fn set_leased(&self, entry: WriteEntry, token: &str) -> Result<bool, StoreError> {
        let lease_key = self.lease_key(&entry.key);
        let generation = self.generations.get(entry.key.namespace()).generation;
        let mut leases = self.leases.lock().await;
        let Some(granted_at) = leases.held_by(&lease_key, token).map(|held| held.tag_seq) else {
            return Ok(false);
        };
        leases.held.remove(&lease_key);
        let now = Instant::now();
        let voided = entry.tags.iter().any(|tag| {
            let void = layout::tag_void_key(entry.key.namespace(), generation, tag);
            leases
                .voids
                .get(void.as_slice())
                .is_some_and(|(seq, expires_at)| *seq > granted_at && *expires_at > now)
        });
        if voided {
            return Ok(false);
        }
        // Written while the lock is held: no void can slip in between.
        self.set(entry).await?;
        Ok(true)
    }

    async fn release_lease(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        let lease_key = self.lease_key(key);
        let mut leases = self.leases.lock().await;
        if leases.held_by(&lease_key, token).is_none() {
            return Ok(false);
        }
        leases.held.remove(&lease_key);
        Ok(true)
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::Envelope;

    fn key(namespace: &str, text: &str) -> StorageKey {
        StorageKey::new(
            Arc::from(namespace),
            Bytes::copy_from_slice(text.as_bytes()),
        )
    }

    fn entry(namespace: &str, text: &str, value: &[u8], ttl: Duration) -> WriteEntry {
        WriteEntry {
            key: key(namespace, text),
            value: Bytes::copy_from_slice(value),
            expire_after: ttl,
            tags: Vec::new(),
        }
    }

    fn tagged(namespace: &str, text: &str, tags: &[&str]) -> WriteEntry {
        stale_for(namespace, text, tags, 0)
    }

    /// A tagged entry fresh for ever, then stale for `window_ms`.
    fn stale_for(namespace: &str, text: &str, tags: &[&str], window_ms: u64) -> WriteEntry {
        let envelope = Envelope {
            created_at_ms: 1,
            fresh_until_ms: u64::MAX / 2,
            stale_until_ms: u64::MAX / 2 + window_ms,
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            fill_ms: 0,
            content_type: String::new(),
            compressed: false,
            value: Bytes::from_static(b"v"),
        };
        WriteEntry {
            key: key(namespace, text),
            value: envelope.encode(),
            expire_after: Duration::from_secs(60),
            tags: envelope.tags,
        }
    }

    async fn present(store: &MemoryStore, namespace: &str, text: &str) -> bool {
        store
            .get(&key(namespace, text))
            .await
            .unwrap()
            .value
            .is_some()
    }

    #[tokio::test]
    async fn stores_reads_and_deletes() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        store
            .set(entry("a", "k", b"1", Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            store.get(&key("a", "k")).await.unwrap().value.as_deref(),
            Some(&b"1"[..])
        );
        assert!(!present(&store, "b", "k").await, "namespaces are separate");
        assert!(store.delete(&key("a", "k")).await.unwrap());
        assert!(!store.delete(&key("a", "k")).await.unwrap());
        assert!(!present(&store, "a", "k").await);
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        store
            .set(entry("a", "short", b"x", Duration::from_millis(30)))
            .await
            .unwrap();
        store
            .set(entry("a", "long", b"y", Duration::from_secs(60)))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while present(&store, "a", "short").await {
            assert!(Instant::now() < deadline, "entry outlived its ttl");
            tokio::task::yield_now().await;
        }
        assert!(present(&store, "a", "long").await);
    }

    #[tokio::test]
    async fn pattern_purges_stay_inside_the_namespace() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        for (namespace, text) in [
            ("a", "profile:1:x"),
            ("a", "profile:1:y"),
            ("a", "profile:2:x"),
            ("b", "profile:1:x"),
        ] {
            store
                .set(entry(namespace, text, b"v", Duration::from_secs(60)))
                .await
                .unwrap();
        }
        let progress = Progress::default();
        let purged = store
            .purge_matching("a", "profile:1:*", PurgeMode::Delete, &progress)
            .await
            .unwrap();
        assert_eq!(
            (purged, progress.examined(), progress.affected()),
            (2, 2, 2)
        );
        assert!(present(&store, "a", "profile:2:x").await);
        assert!(present(&store, "b", "profile:1:x").await);
        // A pattern that tries to name another namespace matches nothing.
        for pattern in ["cg:b:*", "*:b:*", "../b/*"] {
            let purged = store
                .purge_matching("a", pattern, PurgeMode::Delete, &Progress::default())
                .await
                .unwrap();
            assert_eq!(purged, 0, "{pattern}");
        }
        assert!(present(&store, "b", "profile:1:x").await);
    }

    #[tokio::test]
    async fn tag_purges_take_exactly_the_tagged_entries() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        store.set(tagged("a", "one", &["t", "u"])).await.unwrap();
        store.set(tagged("a", "two", &["u"])).await.unwrap();
        store.set(tagged("a", "three", &["t"])).await.unwrap();
        store.set(tagged("b", "one", &["t"])).await.unwrap();
        // Retagged: no longer carries `t`.
        store.set(tagged("a", "three", &["v"])).await.unwrap();
        let purged = store
            .purge_tag("a", "t", PurgeMode::Delete, &Progress::default())
            .await
            .unwrap();
        assert_eq!(purged, 1);
        assert!(!present(&store, "a", "one").await);
        assert!(present(&store, "a", "two").await);
        assert!(present(&store, "a", "three").await);
        assert!(
            present(&store, "b", "one").await,
            "other namespace untouched"
        );
    }

    #[tokio::test]
    async fn soft_purges_keep_the_entry_for_its_stale_window_only() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        store
            .set(stale_for("a", "window", &["t"], 30_000))
            .await
            .unwrap();
        store.set(tagged("a", "none", &["t"])).await.unwrap();
        let mode = PurgeMode::MarkStale { now_ms: 1_000 };
        let purged = store
            .purge_tag("a", "t", mode, &Progress::default())
            .await
            .unwrap();
        assert_eq!(purged, 2);
        let stored = store.get(&key("a", "window")).await.unwrap().value.unwrap();
        let stored = Envelope::decode(stored).unwrap();
        assert_eq!(
            (stored.fresh_until_ms, stored.stale_until_ms),
            (1_000, 31_000)
        );
        assert!(
            !present(&store, "a", "none").await,
            "no stale window: gone at once"
        );
        let again = store
            .purge_tag("a", "t", mode, &Progress::default())
            .await
            .unwrap();
        assert_eq!(again, 0, "already stale");
    }

    #[tokio::test]
    async fn a_soft_purge_drops_the_entry_when_its_window_ends() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        store.set(stale_for("a", "k", &[], 50)).await.unwrap();
        let mode = PurgeMode::MarkStale {
            now_ms: unix_millis(),
        };
        assert_eq!(store.purge_keys(&[key("a", "k")], mode).await.unwrap(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while present(&store, "a", "k").await {
            assert!(
                Instant::now() < deadline,
                "kept past its stale window, for its old TTL"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_namespace_flush_hides_every_entry_at_once() {
        let store = MemoryStore::new(1 << 20, Duration::from_secs(60));
        for namespace in ["a", "b"] {
            store
                .set(entry(namespace, "k", b"v", Duration::from_secs(60)))
                .await
                .unwrap();
        }
        assert_eq!(
            store.flush_namespace("a", PurgeMode::Delete).await.unwrap(),
            1
        );
        assert!(!present(&store, "a", "k").await);
        assert!(present(&store, "b", "k").await);
        store
            .set(entry("a", "k", b"new", Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(
            present(&store, "a", "k").await,
            "new writes land in the new generation"
        );
        store
            .flush_namespace("b", PurgeMode::MarkStale { now_ms: 77 })
            .await
            .unwrap();
        assert_eq!(store.get(&key("b", "k")).await.unwrap().stale_before_ms, 77);
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let budget = 64 * 1024;
        let store = MemoryStore::new(budget, Duration::from_secs(60));
        let value = vec![7u8; 1000];
        for i in 0..1000 {
            store
                .set(entry(
                    "a",
                    &format!("k{i}"),
                    &value,
                    Duration::from_secs(60),
                ))
                .await
                .unwrap();
        }
        let used = store.weighted_size();
        assert!(used <= budget, "used {used} of {budget}");
        assert!(used > budget / 2, "evicted far too much: {used}");
    }
}
