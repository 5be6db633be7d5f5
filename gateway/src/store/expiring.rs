//! Byte-keyed entries in this process's memory, bounded by bytes, each
//! expiring at its own instant: the one cache behind both the memory store
//! ([`super::MemoryStore`]) and the near-cache ([`crate::cache::NearCache`]).
//! What the two share lives here: how an entry is weighed, how it is read and
//! rewritten under its key's lock with its expiry, and the walk that finds a
//! namespace's entries by key prefix.

use std::time::Instant;

use bytes::Bytes;
use quick_cache::{
    Weighter,
    sync::{Cache, EntryAction, EntryResult},
};

/// Entries a walk looks at between yields to the runtime.
const WALK_STEP: usize = 4096;

/// Per-entry bookkeeping the cache keeps beside a key and its value.
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

impl<V> Expiring<V> {
    fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

/// What [`ExpiringEntries::compute`] does with the entry it was shown.
#[derive(Debug)]
pub(crate) enum Op<V> {
    /// Leave it as it is (absent stays absent).
    Nop,
    /// Write this in its place.
    Put(Expiring<V>),
    /// Remove it.
    Remove,
}

/// What [`ExpiringEntries::compute`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Computed {
    /// Nothing changed (an expired entry may have been dropped).
    Unchanged,
    /// An entry was written where there was none.
    Inserted,
    /// An entry was written over a live one.
    Replaced,
    /// A live entry was removed.
    Removed,
}

/// Weighs an entry by its key, its value and a fixed overhead.
#[derive(Clone)]
struct ByWeight;

impl<V: Weighed> Weighter<Bytes, Expiring<V>> for ByWeight {
    fn weight(&self, key: &Bytes, entry: &Expiring<V>) -> u64 {
        (key.len() + entry.value.weight() + ENTRY_OVERHEAD_BYTES) as u64
    }
}

/// The cache: at most `max_bytes` of keys and values, each entry returned
/// until its own `expires_at`.
///
/// quick_cache (S3-FIFO): a read takes a shard's read lock and sets a flag,
/// with no per-read bookkeeping queued for later, unlike moka's, which this
/// replaced (its read path was ~10% of an in-process MGet,
/// docs/BENCHMARKS.md, "Close to the wire"). Expiry is checked on read, so an
/// expired entry still weighs until it is written over, walked past by
/// [`ExpiringEntries::keys_with_prefix`], or evicted: the eviction policy
/// drops entries nobody reads first, and the bound holds either way.
pub(crate) struct ExpiringEntries<V> {
    entries: Cache<Bytes, Expiring<V>, ByWeight, foldhash::fast::RandomState>,
}

impl<V> ExpiringEntries<V>
where
    V: Weighed + Clone + Send + Sync + 'static,
{
    /// Holds at most `max_bytes` (keys, values and a fixed overhead each).
    pub(crate) fn new(max_bytes: u64) -> Self {
        // The estimate only sizes the memory of evicted keys the policy
        // keeps (its ghost list); the table grows as entries arrive.
        let estimated_items = usize::try_from(max_bytes / 256)
            .unwrap_or(usize::MAX)
            .max(16);
        Self {
            entries: Cache::with(
                estimated_items,
                max_bytes,
                ByWeight,
                foldhash::fast::RandomState::default(),
                Default::default(),
            ),
        }
    }

    /// The entry under `key`, unless it expired.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Expiring<V>> {
        self.entries
            .get(key)
            .filter(|entry| entry.live(Instant::now()))
    }

    /// Writes, replaces or removes the entry under `key` with `decide`, which
    /// sees the live entry (or none): no other compute of the same key
    /// interleaves, so a check made in `decide` still holds when its answer
    /// is applied (a live entry is decided under its shard's write lock, an
    /// absent one under a placeholder the other computes of the key wait on).
    pub(crate) async fn compute(
        &self,
        key: Bytes,
        decide: impl FnOnce(Option<&Expiring<V>>) -> Op<V>,
    ) -> Computed {
        let mut decide = Some(decide);
        let now = Instant::now();
        let occupied = self
            .entries
            .entry_async(&key, |_, current: &mut Expiring<V>| {
                let decide = decide.take().expect("called once");
                if !current.live(now) {
                    // Expired: what is decided is for an absent entry.
                    return match decide(None) {
                        Op::Put(entry) => {
                            *current = entry;
                            EntryAction::Retain(Computed::Inserted)
                        }
                        Op::Nop | Op::Remove => EntryAction::Remove,
                    };
                }
                match decide(Some(current)) {
                    Op::Nop => EntryAction::Retain(Computed::Unchanged),
                    Op::Put(entry) => {
                        *current = entry;
                        EntryAction::Retain(Computed::Replaced)
                    }
                    Op::Remove => EntryAction::Remove,
                }
            })
            .await;
        match occupied {
            EntryResult::Retained(computed) => computed,
            EntryResult::Removed(_, removed) => {
                if removed.live(now) {
                    Computed::Removed
                } else {
                    Computed::Unchanged
                }
            }
            EntryResult::Vacant(guard) => match decide.take().map(|decide| decide(None)) {
                Some(Op::Put(entry)) => match guard.insert(entry) {
                    Ok(()) => Computed::Inserted,
                    // The placeholder went meanwhile (a `clear`): nothing was written.
                    Err(_) => Computed::Unchanged,
                },
                // Dropping the guard lets the key's other computes go on.
                _ => Computed::Unchanged,
            },
            EntryResult::Replaced(..) | EntryResult::Timeout => {
                unreachable!(
                    "never asked to replace with a guard; entry_async waits without a timeout"
                )
            }
        }
    }

    /// Removes the entry under `key` (through the key's compute, see
    /// [`ExpiringEntries::compute`]); whether there was a live one.
    pub(crate) async fn remove(&self, key: Bytes) -> bool {
        self.compute(key, |current| match current {
            Some(_) => Op::Remove,
            None => Op::Nop,
        })
        .await
            == Computed::Removed
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
        let now = Instant::now();
        for (walked, (key, entry)) in self.entries.iter().enumerate() {
            if !entry.live(now) {
                // Walked past anyway: give its weight back.
                self.entries
                    .remove_if(&key, |entry: &Expiring<V>| !entry.live(now));
            } else if key
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
        self.entries.clear();
    }

    /// Bytes currently accounted for (expired entries not yet dropped
    /// included).
    pub(crate) fn weighted_size(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    fn expiring(value: &'static str, ttl: Duration) -> Expiring<Bytes> {
        Expiring {
            value: Bytes::from_static(value.as_bytes()),
            expires_at: Instant::now() + ttl,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn an_expired_entry_is_absent_to_reads_and_to_computes() {
        let entries = ExpiringEntries::<Bytes>::new(1 << 20);
        let key = Bytes::from_static(b"k");
        let put = |entry| move |_: Option<&Expiring<Bytes>>| Op::Put(entry);
        assert_eq!(
            entries
                .compute(key.clone(), put(expiring("old", Duration::ZERO)))
                .await,
            Computed::Inserted
        );
        assert!(entries.get(&key).is_none(), "expired at once");
        // A compute sees no entry, and removing nothing removes nothing.
        let mut seen = None;
        let removed = entries
            .compute(key.clone(), |current| {
                seen = Some(current.is_some());
                Op::Remove
            })
            .await;
        assert_eq!((seen, removed), (Some(false), Computed::Unchanged));
        // Writing over it is an insert, and the new entry is live.
        assert_eq!(
            entries
                .compute(key.clone(), put(expiring("new", HOUR)))
                .await,
            Computed::Inserted
        );
        assert_eq!(entries.get(&key).unwrap().value, "new");
        assert_eq!(
            entries
                .compute(key.clone(), put(expiring("newer", HOUR)))
                .await,
            Computed::Replaced
        );
        assert!(entries.remove(key.clone()).await);
        assert!(entries.get(&key).is_none());
        assert!(!entries.remove(key).await, "nothing left to remove");
    }

    #[tokio::test]
    async fn a_walk_gives_back_the_weight_of_expired_entries() {
        let entries = ExpiringEntries::<Bytes>::new(1 << 20);
        for i in 0..100 {
            let ttl = if i % 2 == 0 { Duration::ZERO } else { HOUR };
            let key = Bytes::from(format!("ns:{i}"));
            entries
                .compute(key, |_| Op::Put(expiring("value", ttl)))
                .await;
        }
        let before = entries.weighted_size();
        let live = entries.keys_with_prefix(b"ns:", |_, _| true).await;
        assert_eq!(live.len(), 50, "only the live entries are selected");
        let after = entries.weighted_size();
        assert!(
            after * 2 <= before + 1 && after > 0,
            "half the weight given back: {before} -> {after}"
        );
    }

    /// Computes of one key never interleave: every read-modify-write of a
    /// counter lands, from many tasks at once, on an absent entry too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn computes_of_one_key_never_interleave() {
        let entries = Arc::new(ExpiringEntries::<Bytes>::new(1 << 20));
        let key = Bytes::from_static(b"counter");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (entries, key) = (Arc::clone(&entries), key.clone());
                tokio::spawn(async move {
                    for _ in 0..250 {
                        entries
                            .compute(key.clone(), |current| {
                                let count: u64 = current.map_or(0, |entry| {
                                    std::str::from_utf8(&entry.value).unwrap().parse().unwrap()
                                });
                                // Widen the window between the read and the write.
                                std::thread::yield_now();
                                Op::Put(Expiring {
                                    value: Bytes::from((count + 1).to_string()),
                                    expires_at: Instant::now() + HOUR,
                                })
                            })
                            .await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(entries.get(&key).unwrap().value, "2000");
    }
}
