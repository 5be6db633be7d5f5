//! The in-process store: a moka cache bounded by the bytes of its keys and
//! values, with each entry's own expiry. It lets the gateway run where there
//! is no Redis (development, single-node deployments); entries live only as
//! long as the process.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::{Expiry, future::Cache};

use super::{StorageKey, Store, StoreError, WriteEntry};

/// Per-entry bookkeeping moka does not keep for us.
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// Cache entries in this process's memory.
pub struct MemoryStore {
    entries: Cache<StorageKey, StoredValue>,
}

#[derive(Clone)]
struct StoredValue {
    bytes: Bytes,
    expire_after: Duration,
}

/// Each entry expires after the duration it was written with.
struct WrittenExpiry;

impl Expiry<StorageKey, StoredValue> for WrittenExpiry {
    fn expire_after_create(
        &self,
        _key: &StorageKey,
        value: &StoredValue,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expire_after)
    }

    fn expire_after_update(
        &self,
        _key: &StorageKey,
        value: &StoredValue,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expire_after)
    }
}

impl MemoryStore {
    /// A store that holds at most `max_bytes` of keys and values.
    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &StorageKey, value: &StoredValue| {
                let weight = key.as_bytes().len() + value.bytes.len() + ENTRY_OVERHEAD_BYTES;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(WrittenExpiry)
            .build();
        Self { entries }
    }

    /// Bytes currently accounted for (after pending maintenance has run).
    pub async fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.weighted_size()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self.entries.get(key).await.map(|value| value.bytes))
    }

    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.entries.get(key).await.map(|value| value.bytes));
        }
        Ok(values)
    }

    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError> {
        let value = StoredValue {
            bytes: entry.value,
            expire_after: entry.expire_after,
        };
        self.entries.insert(entry.key, value).await;
        Ok(())
    }

    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        for entry in entries {
            self.set(entry).await?;
        }
        Ok(())
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        Ok(self.entries.remove(key).await.is_some())
    }

    async fn delete_many(&self, keys: &[StorageKey]) -> Result<u64, StoreError> {
        let mut removed = 0;
        for key in keys {
            removed += u64::from(self.entries.remove(key).await.is_some());
        }
        Ok(removed)
    }

    async fn delete_matching(&self, prefix: &[u8], pattern: &str) -> Result<u64, StoreError> {
        // A full walk: the in-process store has no index to narrow it.
        let matching: Vec<StorageKey> = self
            .entries
            .iter()
            .filter(|(key, _)| {
                key.as_bytes()
                    .strip_prefix(prefix)
                    .is_some_and(|rest| super::glob::matches(pattern.as_bytes(), rest))
            })
            .map(|(key, _)| StorageKey::clone(&key))
            .collect();
        self.delete_many(&matching).await
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> StorageKey {
        StorageKey::from_scoped(Bytes::copy_from_slice(text.as_bytes()))
    }

    fn entry(text: &str, value: &[u8], ttl: Duration) -> WriteEntry {
        WriteEntry {
            key: key(text),
            value: Bytes::copy_from_slice(value),
            expire_after: ttl,
        }
    }

    #[tokio::test]
    async fn stores_reads_and_deletes() {
        let store = MemoryStore::new(1 << 20);
        store
            .set(entry("a", b"1", Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            store.get(&key("a")).await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert!(store.delete(&key("a")).await.unwrap());
        assert!(!store.delete(&key("a")).await.unwrap());
        assert_eq!(store.get(&key("a")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let store = MemoryStore::new(1 << 20);
        store
            .set(entry("short", b"x", Duration::from_millis(30)))
            .await
            .unwrap();
        store
            .set(entry("long", b"y", Duration::from_secs(60)))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.get(&key("short")).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "entry outlived its ttl");
            tokio::task::yield_now().await;
        }
        assert!(store.get(&key("long")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn pattern_deletes_stay_inside_the_prefix() {
        let store = MemoryStore::new(1 << 20);
        for text in [
            "cg:a:profile:1:x",
            "cg:a:profile:1:y",
            "cg:a:profile:2:x",
            "cg:b:profile:1:x",
        ] {
            store
                .set(entry(text, b"v", Duration::from_secs(60)))
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .delete_matching(b"cg:a:", "profile:1:*")
                .await
                .unwrap(),
            2
        );
        assert!(store.get(&key("cg:a:profile:2:x")).await.unwrap().is_some());
        assert!(store.get(&key("cg:b:profile:1:x")).await.unwrap().is_some());
        // A pattern that tries to name another namespace matches nothing.
        assert_eq!(store.delete_matching(b"cg:a:", "cg:b:*").await.unwrap(), 0);
        assert!(store.get(&key("cg:b:profile:1:x")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let budget = 64 * 1024;
        let store = MemoryStore::new(budget);
        let value = vec![7u8; 1000];
        for i in 0..1000 {
            store
                .set(entry(&format!("k{i}"), &value, Duration::from_secs(60)))
                .await
                .unwrap();
        }
        let used = store.weighted_size().await;
        assert!(used <= budget, "used {used} of {budget}");
        assert!(used > budget / 2, "evicted far too much: {used}");
    }
}
