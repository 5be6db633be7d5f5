//! The storage layer: a small trait over "bytes under a key with an expiry",
//! with two implementations: [`RedisStore`] (the product's default, through a
//! deadpool-redis pool) and [`MemoryStore`] (in-process, bounded by bytes).
//!
//! Stores know nothing of namespaces, envelopes or policies; the cache layer
//! hands them finished [`StorageKey`]s and encoded entries.

pub mod glob;
mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// The exact key an entry is stored under, built only by the cache layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageKey(Bytes);

impl StorageKey {
    /// Wraps bytes that the cache layer has already scoped to a namespace.
    pub(crate) fn from_scoped(bytes: Bytes) -> Self {
        Self(bytes)
    }

    /// The key's bytes as the store sees them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One entry to write.
#[derive(Debug, Clone)]
pub struct WriteEntry {
    /// Where to write it.
    pub key: StorageKey,
    /// The encoded entry.
    pub value: Bytes,
    /// When the store should drop it.
    pub expire_after: Duration,
}

/// Why a store operation failed. Every variant means "the store could not
/// answer"; the cache layer turns them into degraded responses.
#[derive(Debug, thiserror::Error)]
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
}

impl StoreError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::OutOfMemory(_) => "out_of_memory",
            StoreError::Command(_) => "command",
        }
    }
}

/// A key-value store with per-entry expiry.
///
/// Implementations must be cancel-safe: the cache layer drops a call's future
/// when the request's time budget runs out.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one entry.
    async fn get(&self, key: &StorageKey) -> Result<Option<Bytes>, StoreError>;
    /// Reads many entries in one round trip; results in `keys` order.
    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Option<Bytes>>, StoreError>;
    /// Writes one entry, replacing any previous one.
    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError>;
    /// Writes many entries in one round trip.
    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError>;
    /// Removes one entry; `true` when it existed.
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError>;
    /// Removes many entries in one round trip; how many existed.
    async fn delete_many(&self, keys: &[StorageKey]) -> Result<u64, StoreError>;
    /// Removes every entry whose key starts with `prefix` and continues with
    /// something matching `pattern` (Redis glob syntax, see [`glob`]); how
    /// many there were. `prefix` is literal: no pattern can reach outside it.
    async fn delete_matching(&self, prefix: &[u8], pattern: &str) -> Result<u64, StoreError>;
    /// A short name for logs and metrics (`redis`, `memory`).
    fn name(&self) -> &'static str;
}
