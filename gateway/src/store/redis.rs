//! The Redis store.
//!
//! Connections come from a deadpool-redis pool (bounded size, wait/create/
//! recycle timeouts, a PING health check on recycle). Each pooled connection is
//! a redis-rs `MultiplexedConnection`, so instead of checking a connection out
//! per request (one request per socket, plus deadpool's recycle PING on every
//! checkout), the store keeps up to `max_connections` connections checked out
//! in *lanes* and spreads requests over them round-robin: concurrent requests
//! pipeline on shared sockets. DESIGN.md measured this at about twice the
//! throughput of checkout-per-request; docs/BENCHMARKS.md has our numbers.
//!
//! A lane goes back to the pool (and so through its health check) when a
//! command on it fails at the connection level, and every
//! `health_check_interval` in any case. Redis being down therefore costs one
//! failed connect per request at most, bounded by the pool's timeouts, and the
//! store reconnects by itself when Redis returns.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{
    Connection, Manager, Pool, PoolError, Runtime,
    redis::{self, AsyncConnectionConfig, RedisError, aio::MultiplexedConnection},
};
use tracing::{debug, warn};

use super::{StorageKey, Store, StoreError, WriteEntry};
use crate::config::RedisConfig;

/// Cache entries in Redis, through a pool of multiplexed connections.
pub struct RedisStore {
    pool: Pool,
    lanes: Box<[LaneSlot]>,
    next_lane: AtomicUsize,
    health_check_interval: Option<Duration>,
    epoch: Instant,
}

/// Where a lane lives: the lane itself (swapped without locks on the hot
/// path), a lock taken only to fill it, and when filling it last failed.
#[derive(Default)]
struct LaneSlot {
    current: ArcSwapOption<Lane>,
    filling: tokio::sync::Mutex<()>,
    last_failure: AtomicU64,
}

/// A pooled connection held out of the pool and shared by concurrent requests.
struct Lane {
    connection: Connection,
    checked_out_at: Instant,
}

impl RedisStore {
    /// Builds the pool. Connects lazily: Redis need not be up yet.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let manager = Manager::new_with_config(config.url.as_str(), connection_config)
            .map_err(|err| StoreError::Unavailable(format!("bad redis url: {err}")))?;
        let pool = Pool::builder(manager)
            .max_size(config.max_connections)
            .wait_timeout(Some(config.wait_timeout))
            .create_timeout(Some(config.create_timeout))
            .recycle_timeout(Some(config.recycle_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| StoreError::Unavailable(format!("cannot build redis pool: {err}")))?;
        let lanes = (0..config.max_connections)
            .map(|_| LaneSlot::default())
            .collect();
        Ok(Self {
            pool,
            lanes,
            next_lane: AtomicUsize::new(0),
            health_check_interval: (!config.health_check_interval.is_zero())
                .then_some(config.health_check_interval),
            epoch: Instant::now(),
        })
    }

    /// Connections currently open in the pool (checked out in lanes or idle).
    pub fn open_connections(&self) -> usize {
        self.pool.status().size
    }

    /// A connection handle for one command, and the lane it came from.
    async fn connection(&self) -> Result<(MultiplexedConnection, Arc<Lane>, usize), StoreError> {
        let index = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let slot = &self.lanes[index];
        if let Some(lane) = self.usable(slot) {
            return Ok(((*lane.connection).clone(), lane, index));
        }
        // One request fills an empty lane; the others on that lane wait for it
        // instead of all stampeding the pool (and its wait timeout).
        let waiting_since = self.clock();
        let _filling = slot.filling.lock().await;
        if let Some(lane) = self.usable(slot) {
            return Ok(((*lane.connection).clone(), lane, index));
        }
        if slot.last_failure.load(Ordering::Acquire) > waiting_since {
            // The fill we queued behind just failed: fail fast too rather than
            // queueing another connect attempt behind it.
            return Err(StoreError::Unavailable(
                "redis connection failed moments ago".to_owned(),
            ));
        }
        if let Some(stale) = slot.current.load_full() {
            // Due for its health check: hand it back, the pool PINGs it.
            self.retire(index, &stale);
        }
        let connection = match self.pool.get().await {
            Ok(connection) => connection,
            Err(err) => {
                slot.last_failure
                    .store(self.clock().max(1), Ordering::Release);
                return Err(pool_error(err));
            }
        };
        let lane = Arc::new(Lane {
            connection,
            checked_out_at: Instant::now(),
        });
        slot.current.store(Some(Arc::clone(&lane)));
        Ok(((*lane.connection).clone(), lane, index))
    }

    /// The lane in `slot`, unless it is empty or due for a health check.
    fn usable(&self, slot: &LaneSlot) -> Option<Arc<Lane>> {
        let lane = slot.current.load_full()?;
        let due = self
            .health_check_interval
            .is_some_and(|interval| lane.checked_out_at.elapsed() >= interval);
        (!due).then_some(lane)
    }

    /// Nanoseconds since the store was built (a cheap, comparable timestamp).
    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `lane` out of its slot (if it is still there) so it returns to the
    /// pool once the commands in flight on it finish.
    fn retire(&self, index: usize, lane: &Arc<Lane>) {
        let current = Some(Arc::clone(lane));
        self.lanes[index]
            .current
            .compare_and_swap(&current, None::<Arc<Lane>>);
    }

    /// Runs one command or pipeline on a lane, retiring the lane if the
    /// connection itself failed.
    async fn run<T, F>(&self, command: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> Result<T, RedisError>,
    {
        let (mut handle, lane, index) = self.connection().await?;
        match command(&mut handle).await {
            Ok(value) => Ok(value),
            Err(err) => {
                if is_connection_error(&err) {
                    debug!(cause = %err, lane = index, "retiring redis connection");
                    self.retire(index, &lane);
                }
                Err(command_error(err))
            }
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Bytes>, StoreError> {
        self.run(async |conn| {
            redis::cmd("GET")
                .arg(key.as_bytes())
                .query_async::<Option<Bytes>>(conn)
                .await
        })
        .await
    }

    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for key in keys {
            pipeline.cmd("GET").arg(key.as_bytes());
        }
        self.run(async |conn| pipeline.query_async::<Vec<Option<Bytes>>>(conn).await)
            .await
    }

    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command
            .arg(entry.key.as_bytes())
            .arg(entry.value.as_ref())
            .arg("PX")
            .arg(expiry_millis(entry.expire_after));
        self.run(async |conn| command.exec_async(conn).await).await
    }

    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for entry in &entries {
            pipeline
                .cmd("SET")
                .arg(entry.key.as_bytes())
                .arg(entry.value.as_ref())
                .arg("PX")
                .arg(expiry_millis(entry.expire_after))
                .ignore();
        }
        self.run(async |conn| pipeline.exec_async(conn).await).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        // UNLINK frees large values off Redis's main thread.
        self.run(async |conn| {
            redis::cmd("UNLINK")
                .arg(key.as_bytes())
                .query_async::<u64>(conn)
                .await
        })
        .await
        .map(|removed| removed > 0)
    }

    async fn delete_many(&self, keys: &[StorageKey]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // One UNLINK per key in a pipeline rather than one multi-key UNLINK:
        // keys of a batch may live on different Redis Cluster slots.
        let mut pipeline = redis::pipe();
        for key in keys {
            pipeline.cmd("UNLINK").arg(key.as_bytes());
        }
        let removed: Vec<u64> = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        Ok(removed.iter().sum())
    }

    async fn delete_matching(&self, prefix: &[u8], pattern: &str) -> Result<u64, StoreError> {
        // SCAN with a bounded COUNT and one UNLINK per batch: never KEYS, never
        // one huge command. The prefix is a namespace scope made of
        // `[A-Za-z0-9_.-:]`, which holds no glob metacharacters.
        let mut matcher = Vec::with_capacity(prefix.len() + pattern.len());
        matcher.extend_from_slice(prefix);
        matcher.extend_from_slice(pattern.as_bytes());
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Bytes>) = self
                .run(async |conn| {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&matcher)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(conn)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for key in &keys {
                    unlink.arg(key.as_ref());
                }
                removed += self
                    .run(async |conn| unlink.query_async::<u64>(conn).await)
                    .await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// Keys examined per SCAN step.
const SCAN_COUNT: u64 = 1000;

/// Redis rejects `PX 0`; anything shorter than a millisecond is a millisecond.
fn expiry_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

fn command_error(err: RedisError) -> StoreError {
    if err.is_timeout() {
        StoreError::Timeout(Duration::ZERO)
    } else if err.code() == Some("OOM") {
        StoreError::OutOfMemory(err.to_string())
    } else if is_connection_error(&err) {
        StoreError::Unavailable(err.to_string())
    } else {
        warn!(cause = %err, "redis command failed");
        StoreError::Command(err.to_string())
    }
}

fn pool_error(err: PoolError) -> StoreError {
    match err {
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("no redis connection in time ({kind:?} timeout)"))
        }
        PoolError::Backend(err) => StoreError::Unavailable(format!("cannot connect: {err}")),
        other => StoreError::Unavailable(other.to_string()),
    }
}
