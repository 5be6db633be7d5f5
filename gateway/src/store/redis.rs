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
        Arc, OnceLock,
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

use super::{
    Fetched, LeaseCondition, LeaseGrant, Progress, PurgeMode, StorageKey, Store, StoreError,
    WriteEntry,
    generations::{Generations, NamespaceState},
    layout, unix_millis,
};
use crate::config::RedisConfig;

/// The pool's figures, collected at each scrape: connections open, in use
/// (checked out, in lanes or for a single command), the configured maximum,
/// and requests waiting for a connection.
#[derive(Debug)]
pub struct PoolCollector(Pool);

impl prometheus_client::collector::Collector for PoolCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric, metrics::gauge::ConstGauge};
        let status = self.0.status();
        let in_use = status.size.saturating_sub(status.available);
        for (name, help, value) in [
            (
                "cachegw_redis_pool_connections",
                "Redis connections open",
                status.size,
            ),
            (
                "cachegw_redis_pool_in_use",
                "Redis connections checked out (lanes and single commands)",
                in_use,
            ),
            (
                "cachegw_redis_pool_max",
                "Most Redis connections the pool may open (redis.max_connections)",
                status.max_size,
            ),
            (
                "cachegw_redis_pool_waiting",
                "Requests waiting for a Redis connection",
                status.waiting,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Cache entries in Redis, through a pool of multiplexed connections.
pub struct RedisStore {
    pool: Pool,
    lanes: Box<[LaneSlot]>,
    next_lane: AtomicUsize,
    health_check_interval: Option<Duration>,
    epoch: Instant,
    generations: Generations,
    /// How long a tag purge's mark voids leases: the longest lease.
    lease_void_ttl: Duration,
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
    /// Builds the pool. Connects lazily: Redis need not be up yet. Leases
    /// last at most `max_lease_ttl`.
    pub fn new(config: &RedisConfig, max_lease_ttl: Duration) -> Result<Self, StoreError> {
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        // The connection info carries the `rediss://` certificates, if any.
        let client = crate::tls::redis_client(config)
            .map_err(|err| StoreError::Unavailable(format!("bad redis url: {err}")))?;
        let manager =
            Manager::new_with_config(client.get_connection_info().clone(), connection_config)
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
            generations: Generations::default(),
            lease_void_ttl: max_lease_ttl,
        })
    }

    /// Connections currently open in the pool (checked out in lanes or idle).
    pub fn open_connections(&self) -> usize {
        self.pool.status().size
    }

    /// A metrics collector reporting the pool's figures at each scrape.
    pub fn pool_collector(&self) -> PoolCollector {
        PoolCollector(self.pool.clone())
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

    /// Takes every lane out of its slot; commands in flight on them finish.
    fn retire_all(&self) {
        for slot in &self.lanes {
            slot.current.store(None);
        }
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
                if err.is_connection_dropped() || err.is_io_error() {
                    // The server closed this connection: it restarted, failed
                    // over or killed its clients, and then every lane opened
                    // before is just as dead. Retire them all, so that a retry
                    // (and every later call) gets a fresh connection instead
                    // of finding the next dead lane.
                    debug!(cause = %err, lane = index, "redis closed a connection: retiring every lane");
                    self.retire_all();
                } else if is_connection_error(&err) {
                    debug!(cause = %err, lane = index, "retiring redis connection");
                    self.retire(index, &lane);
                }
                Err(command_error(err))
            }
        }
    }
}

/// Removes or marks stale one entry, only if it is a cachegw envelope and, when
/// a tag is given, only if it still carries that tag (an entry rewritten
/// without the tag since it was indexed is left alone). Reads just the
/// envelope's header and tag section (see `cache/envelope.rs` for the layout).
///
/// Without a tag (a purge by key or pattern) it also voids the key's lease,
/// whether or not the entry exists: a fill in progress must not write back.
///
/// KEYS[1]: the entry, KEYS[2]: its lease. ARGV: mode (`d` delete, `s` mark
/// stale), now (ms, decimal), now (8 bytes little-endian), tag (empty: any
/// entry).
const PURGE_SCRIPT: &str = r"
if ARGV[4] == '' then redis.call('DEL', KEYS[2]) end
local header = redis.call('GETRANGE', KEYS[1], 0, 29)
if string.len(header) < 29 or string.sub(header, 1, 2) ~= 'cg' then return 0 end
local version = string.byte(header, 3)
if version ~= 1 and version ~= 2 then return 0 end
local tag = ARGV[4]
if tag ~= '' then
  if version ~= 2 or string.len(header) < 30 then return 0 end
  local len = string.byte(header, 29) + 256 * string.byte(header, 30)
  if len == 0 then return 0 end
  local section = redis.call('GETRANGE', KEYS[1], 30, 29 + len)
  local pos, found = 1, false
  while pos <= string.len(section) do
    local n = string.byte(section, pos)
    if n == 0 then break end
    if string.sub(section, pos + 1, pos + n) == tag then found = true break end
    pos = pos + 1 + n
  end
  if not found then return 0 end
end
if ARGV[1] == 'd' then return redis.call('UNLINK', KEYS[1]) end
local now = tonumber(ARGV[2])
local created, fresh = 0, 0
for i = 12, 5, -1 do created = created * 256 + string.byte(header, i) end
for i = 20, 13, -1 do fresh = fresh * 256 + string.byte(header, i) end
if fresh <= now or created > now then return 0 end
redis.call('SETRANGE', KEYS[1], 12, ARGV[3])
return 1
";

/// Starts a tag purge: voids the leases of fills that will carry the tag
/// (the namespace's tag sequence moves on, and the tag records it for as long
/// as a lease can live), then, for a hard purge, renames the tag index
/// (KEYS[1]) to the purge's private key (KEYS[2]) if it exists; 1 if it did.
///
/// KEYS[3]: the namespace state, KEYS[4]: the tag's void mark. ARGV[1]: the
/// mark's lifetime (ms), ARGV[2]: `take` (hard) or `keep` (soft).
const TAG_PURGE_SCRIPT: &str = r"
local seq = redis.call('HINCRBY', KEYS[3], 'tagseq', 1)
redis.call('SET', KEYS[4], seq, 'PX', ARGV[1])
if ARGV[2] ~= 'take' then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
";

/// Grants a lease unless one is held or no fill is needed any more: the
/// entry (KEYS[3]) is fresh (mode `unfilled`: fresh until after ARGV[3] and
/// created after ARGV[4]), or is no longer the version created at ARGV[4]
/// (mode `refresh`). The lease records the namespace's tag sequence at grant
/// time, for the leased write's check. Returns {state, generation, entry}
/// with state 1 granted, 0 held, 2 filled (and the entry that fills it).
///
/// KEYS[1]: the namespace state, KEYS[2]: the lease, KEYS[3]: the entry.
/// ARGV: token, lifetime (ms), now (ms), the time above, mode.
const ACQUIRE_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 'gen', 'tagseq')
local gen = tonumber(state[1] or '0')
local entry = redis.call('GET', KEYS[3])
if entry and string.len(entry) >= 20 and string.sub(entry, 1, 2) == 'cg' then
  local created, fresh = 0, 0
  for i = 12, 5, -1 do created = created * 256 + string.byte(entry, i) end
  for i = 20, 13, -1 do fresh = fresh * 256 + string.byte(entry, i) end
  local mark = tonumber(ARGV[4])
  if ARGV[5] == 'unfilled' then
    if fresh > tonumber(ARGV[3]) and created > mark then return {2, gen, entry} end
  elseif created ~= mark then
    return {2, gen, entry}
  end
elseif ARGV[5] == 'refresh' then
  return {0, gen, false}
end
local granted = redis.call('SET', KEYS[2], ARGV[1] .. ':' .. (state[2] or '0'), 'NX', 'PX', ARGV[2])
return {granted and 1 or 0, gen, false}
";

/// Writes an entry only if its lease is still the caller's and none of its
/// tags was purged since the lease was granted; consumes the lease either
/// way once checked. Returns {written, generation}.
///
/// KEYS[1]: the namespace state, KEYS[2]: the lease, KEYS[3]: the entry,
/// then n tag indexes, then the n tags' void marks. ARGV: token, value, ttl
/// (ms), expiry (ms since the epoch), now (ms), the entry's key, n.
const LEASED_SET_SCRIPT: &str = r"
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local token = ARGV[1]
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, #token + 1) ~= token .. ':' then return {0, gen} end
local seq = tonumber(string.sub(lease, #token + 2)) or 0
local n = tonumber(ARGV[7])
redis.call('DEL', KEYS[2])
for i = 1, n do
  if tonumber(redis.call('GET', KEYS[3 + n + i]) or '0') > seq then return {0, gen} end
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
for i = 1, n do
  local index = KEYS[3 + i]
  redis.call('ZADD', index, ARGV[4], ARGV[6])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. ARGV[5])
  redis.call('PEXPIRE', index, ARGV[3], 'NX')
  redis.call('PEXPIRE', index, ARGV[3], 'GT')
end
return {1, gen}
";

/// Compare-and-delete: releases the lease (KEYS[1]) only if it is the
/// token's (ARGV[1]).
const RELEASE_SCRIPT: &str = r"
local token = ARGV[1]
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, 1, #token + 1) == token .. ':' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// Moves a namespace's soft-flush time forward (never back) and returns its
/// generation. KEYS[1]: the namespace state hash. ARGV[1]: now (ms).
const SOFT_FLUSH_SCRIPT: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'stale') or '0')
if tonumber(ARGV[1]) > current then redis.call('HSET', KEYS[1], 'stale', ARGV[1]) end
return tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
";

/// How often a read or write is retried when it finds that the namespace's
/// generation moved under it (a concurrent flush) before giving up on it.
const GENERATION_ATTEMPTS: usize = 3;

impl RedisStore {
    /// Adds `HMGET {state} gen stale` to `pipeline`.
    fn read_state(pipeline: &mut redis::Pipeline, namespace: &str) {
        pipeline
            .cmd("HMGET")
            .arg(layout::namespace_state_key(namespace))
            .arg(layout::GENERATION_FIELD)
            .arg(layout::STALE_BEFORE_FIELD);
    }

    /// Records the reply of [`Self::read_state`].
    fn learn(&self, namespace: &str, reply: &[Option<u64>]) -> NamespaceState {
        let state = NamespaceState {
            generation: reply.first().copied().flatten().unwrap_or(0),
            stale_before_ms: reply.get(1).copied().flatten().unwrap_or(0),
        };
        self.generations.learn(namespace, state);
        state
    }

    /// The current state of `namespace`, read from Redis.
    async fn current_state(&self, namespace: &str) -> Result<NamespaceState, StoreError> {
        let mut pipeline = redis::pipe();
        Self::read_state(&mut pipeline, namespace);
        let (reply,): (Vec<Option<u64>>,) = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        Ok(self.learn(namespace, &reply))
    }

    /// Adds the commands writing `entry` in `generation` to `pipeline`: a
    /// plain SET, or for a tagged entry a MULTI/EXEC block that writes it and
    /// indexes it under each tag (scored by its expiry), drops index members
    /// that have expired, and keeps each index alive as long as its
    /// longest-lived entry. A transaction suffices (no script): nothing in it
    /// depends on what Redis holds, and a purge checks each entry's own tags
    /// before touching it.
    fn write_commands(
        pipeline: &mut redis::Pipeline,
        entry: &WriteEntry,
        generation: u64,
        now_ms: u64,
    ) {
        let namespace = entry.key.namespace();
        let ttl = expiry_millis(entry.expire_after);
        let tagged = !entry.tags.is_empty();
        if tagged {
            pipeline.cmd("MULTI").ignore();
        }
        pipeline
            .cmd("SET")
            .arg(layout::entry_key(namespace, generation, entry.key.key()))
            .arg(entry.value.as_ref())
            .arg("PX")
            .arg(ttl)
            .ignore();
        if tagged {
            let expires_at = now_ms.saturating_add(ttl);
            for tag in &entry.tags {
                let index = layout::tag_index_key(namespace, generation, tag);
                pipeline
                    .cmd("ZADD")
                    .arg(&index)
                    .arg(expires_at)
                    .arg(entry.key.key())
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&index)
                    .arg("-inf")
                    .arg(format!("({now_ms}"))
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&index)
                    .arg(ttl)
                    .arg("NX")
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&index)
                    .arg(ttl)
                    .arg("GT")
                    .ignore();
            }
            pipeline.cmd("EXEC").ignore();
        }
    }

    /// Writes `entries` in one round trip, each in its namespace's current
    /// generation; entries whose generation moved meanwhile are rewritten.
    async fn write(&self, mut entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        for _ in 0..GENERATION_ATTEMPTS {
            let namespaces = distinct_namespaces(entries.iter().map(|entry| &entry.key));
            let guesses: Vec<NamespaceState> = namespaces
                .iter()
                .map(|namespace| self.generations.get(namespace))
                .collect();
            let mut pipeline = redis::pipe();
            for namespace in &namespaces {
                Self::read_state(&mut pipeline, namespace);
            }
            let now_ms = unix_millis();
            for entry in &entries {
                let at = position(&namespaces, entry.key.namespace());
                Self::write_commands(&mut pipeline, entry, guesses[at].generation, now_ms);
            }
            let replies: Vec<Vec<Option<u64>>> = self
                .run(async |conn| pipeline.query_async(conn).await)
                .await?;
            let moved: Vec<&str> = namespaces
                .iter()
                .zip(&guesses)
                .zip(&replies)
                .filter(|((namespace, guess), reply)| {
                    self.learn(namespace, reply).generation != guess.generation
                })
                .map(|((namespace, _), _)| namespace.as_ref())
                .collect();
            if moved.is_empty() {
                return Ok(());
            }
            // Those entries went to a generation that was flushed meanwhile
            // (unreachable, they age out): write them again.
            entries.retain(|entry| moved.contains(&entry.key.namespace()));
        }
        Err(StoreError::Command(
            "namespace flushed repeatedly during the write".to_owned(),
        ))
    }

    /// Reads `keys` in one round trip from their namespaces' current
    /// generations; keys whose generation moved meanwhile are read again.
    async fn read(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError> {
        let mut results: Vec<Option<Fetched>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        for _ in 0..GENERATION_ATTEMPTS {
            let namespaces = distinct_namespaces(pending.iter().map(|&i| &keys[i]));
            let guesses: Vec<NamespaceState> = namespaces
                .iter()
                .map(|namespace| self.generations.get(namespace))
                .collect();
            let mut pipeline = redis::pipe();
            for namespace in &namespaces {
                Self::read_state(&mut pipeline, namespace);
            }
            for &i in &pending {
                let key = &keys[i];
                let generation = guesses[position(&namespaces, key.namespace())].generation;
                pipeline
                    .cmd("GET")
                    .arg(layout::entry_key(key.namespace(), generation, key.key()));
            }
            let replies: Vec<redis::Value> = self
                .run(async |conn| pipeline.query_async(conn).await)
                .await?;
            let mut replies = replies.into_iter();
            let mut states = Vec::with_capacity(namespaces.len());
            for (namespace, guess) in namespaces.iter().zip(&guesses) {
                let reply: Vec<Option<u64>> = parse(replies.next())?;
                let state = self.learn(namespace, &reply);
                states.push((state, state.generation == guess.generation));
            }
            let mut still_pending = Vec::new();
            for &i in &pending {
                let value: Option<Bytes> = parse(replies.next())?;
                let (state, current) = states[position(&namespaces, keys[i].namespace())];
                if current {
                    results[i] = Some(Fetched {
                        value,
                        stale_before_ms: state.stale_before_ms,
                    });
                } else {
                    still_pending.push(i);
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
        }
        // Whatever a flush storm kept moving reads as absent: never an entry
        // from a generation that was flushed.
        Ok(results.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Voids the leases of fills that will carry `tag`, and with a
    /// `snapshot` key takes the tag's index over into it; whether there was
    /// an index to take.
    async fn begin_tag_purge(
        &self,
        namespace: &str,
        generation: u64,
        tag: &str,
        snapshot: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let script = tag_purge_script();
        let mut invocation = script.key(layout::tag_index_key(namespace, generation, tag));
        invocation
            .key(snapshot.unwrap_or_default())
            .key(layout::namespace_state_key(namespace))
            .key(layout::tag_void_key(namespace, generation, tag))
            .arg(expiry_millis(self.lease_void_ttl))
            .arg(if snapshot.is_some() { "take" } else { "keep" });
        let mut pipeline = redis::pipe();
        pipeline
            .load_script(script)
            .ignore()
            .invoke_script(&invocation);
        let (taken,): (bool,) = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        Ok(taken)
    }

    /// Applies `mode` to the entries of `namespace` (generation `generation`)
    /// with the given keys, optionally only to those carrying `tag`.
    async fn purge_batch(
        &self,
        namespace: &str,
        generation: u64,
        keys: &[Bytes],
        mode: PurgeMode,
        tag: &str,
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let script = purge_script();
        let (flag, now_ms) = match mode {
            PurgeMode::Delete => ("d", 0),
            PurgeMode::MarkStale { now_ms } => ("s", now_ms),
        };
        let mut pipeline = redis::pipe();
        // Loaded in the same pipeline: a restarted Redis has lost its script cache.
        pipeline.load_script(script).ignore();
        for key in keys {
            let mut invocation = script.key(layout::entry_key(namespace, generation, key));
            invocation
                .key(layout::lease_key(namespace, generation, key))
                .arg(flag)
                .arg(now_ms)
                .arg(now_ms.to_le_bytes().as_slice())
                .arg(tag);
            pipeline.invoke_script(&invocation);
        }
        let affected: Vec<u64> = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        Ok(affected.iter().sum())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &StorageKey) -> Result<Fetched, StoreError> {
        // The hot path: `read` for one key, without its bookkeeping.
        let namespace = key.namespace();
        let mut guess = self.generations.get(namespace);
        for _ in 0..GENERATION_ATTEMPTS {
            let mut pipeline = redis::pipe();
            Self::read_state(&mut pipeline, namespace);
            pipeline
                .cmd("GET")
                .arg(layout::entry_key(namespace, guess.generation, key.key()));
            let (reply, value): (Vec<Option<u64>>, Option<Bytes>) = self
                .run(async |conn| pipeline.query_async(conn).await)
                .await?;
            let state = self.learn(namespace, &reply);
            if state.generation == guess.generation {
                return Ok(Fetched {
                    value,
                    stale_before_ms: state.stale_before_ms,
                });
            }
            guess = state;
        }
        // Never an entry from a generation that was flushed.
        Ok(Fetched::default())
    }

    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.read(keys).await
    }

    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError> {
        self.write(vec![entry]).await
    }

    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(entries).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let namespace = key.namespace();
        let mut guess = self.generations.get(namespace);
        for _ in 0..GENERATION_ATTEMPTS {
            let mut pipeline = redis::pipe();
            Self::read_state(&mut pipeline, namespace);
            // UNLINK frees large values off Redis's main thread. The key's
            // lease goes too: a fill in progress must not write back.
            pipeline
                .cmd("UNLINK")
                .arg(layout::entry_key(namespace, guess.generation, key.key()))
                .cmd("UNLINK")
                .arg(layout::lease_key(namespace, guess.generation, key.key()))
                .ignore();
            let (reply, removed): (Vec<Option<u64>>, u64) = self
                .run(async |conn| pipeline.query_async(conn).await)
                .await?;
            let state = self.learn(namespace, &reply);
            if state.generation == guess.generation {
                return Ok(removed > 0);
            }
            guess = state;
        }
        // The namespace keeps being flushed: nothing of it is reachable anyway.
        Ok(false)
    }

    async fn purge_keys(&self, keys: &[StorageKey], mode: PurgeMode) -> Result<u64, StoreError> {
        let mut affected = 0;
        for namespace in distinct_namespaces(keys.iter()) {
            let state = self.current_state(&namespace).await?;
            let batch: Vec<Bytes> = keys
                .iter()
                .filter(|key| key.namespace() == &*namespace)
                .map(|key| Bytes::copy_from_slice(key.key()))
                .collect();
            affected += self
                .purge_batch(&namespace, state.generation, &batch, mode, "")
                .await?;
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
        // SCAN with a bounded COUNT and one UNLINK (or one pipeline of purge
        // scripts) per batch: never KEYS, never one huge command. The prefix
        // (`cg:{namespace}:{generation}:`) holds no glob metacharacters, so
        // the pattern cannot reach outside it.
        let generation = self.current_state(namespace).await?.generation;
        // One scan finds the entries and the leases (fills in progress) the
        // pattern matches: the leases are voided with the entries.
        let prefix_len = layout::entry_prefix(namespace, generation).len();
        let mut matcher = layout::entry_or_lease_matcher(namespace, generation);
        matcher.extend_from_slice(pattern.as_bytes());
        let mut cursor: u64 = 0;
        let mut affected = 0;
        loop {
            let (next, found): (u64, Vec<Bytes>) = self
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
            let (leases, entries): (Vec<Bytes>, Vec<Bytes>) =
                found.into_iter().partition(|key| layout::is_lease_key(key));
            if !leases.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for key in &leases {
                    unlink.arg(key.as_ref());
                }
                self.run(async |conn| unlink.exec_async(conn).await).await?;
            }
            if !entries.is_empty() {
                let removed = match mode {
                    PurgeMode::Delete => {
                        let mut unlink = redis::cmd("UNLINK");
                        for key in &entries {
                            unlink.arg(key.as_ref());
                        }
                        self.run(async |conn| unlink.query_async::<u64>(conn).await)
                            .await?
                    }
                    PurgeMode::MarkStale { .. } => {
                        let inner: Vec<Bytes> =
                            entries.iter().map(|key| key.slice(prefix_len..)).collect();
                        self.purge_batch(namespace, generation, &inner, mode, "")
                            .await?
                    }
                };
                progress.add(entries.len() as u64, removed);
                affected += removed;
            }
            if next == 0 {
                return Ok(affected);
            }
            cursor = next;
        }
    }

    async fn purge_tag(
        &self,
        namespace: &str,
        tag: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        let generation = self.current_state(namespace).await?.generation;
        let index = layout::tag_index_key(namespace, generation, tag);
        let now_ms = unix_millis();
        let mut affected = 0;
        match mode {
            PurgeMode::Delete => {
                // Take the index over atomically: every entry tagged before
                // this point is in the snapshot, and writes from now on index
                // into a fresh set that this purge leaves alone.
                let snapshot = layout::tag_purge_key(namespace, generation, rand::random());
                if !self
                    .begin_tag_purge(namespace, generation, tag, Some(&snapshot))
                    .await?
                {
                    return Ok(0);
                }
                loop {
                    let popped: Vec<(Bytes, f64)> = self
                        .run(async |conn| {
                            redis::cmd("ZPOPMIN")
                                .arg(&snapshot)
                                .arg(TAG_BATCH)
                                .query_async(conn)
                                .await
                        })
                        .await?;
                    if popped.is_empty() {
                        return Ok(affected);
                    }
                    // Members scored before now belong to entries that expired.
                    let live: Vec<Bytes> = popped
                        .iter()
                        .filter(|(_, expires_at)| *expires_at >= now_ms as f64)
                        .map(|(key, _)| key.clone())
                        .collect();
                    let removed = self
                        .purge_batch(namespace, generation, &live, mode, tag)
                        .await?;
                    progress.add(popped.len() as u64, removed);
                    affected += removed;
                }
            }
            PurgeMode::MarkStale { .. } => {
                // Entries marked stale stay indexed (a later hard purge of the
                // tag must still find them), so walk the live index.
                self.begin_tag_purge(namespace, generation, tag, None)
                    .await?;
                let mut cursor: u64 = 0;
                loop {
                    let (next, flat): (u64, Vec<Bytes>) = self
                        .run(async |conn| {
                            redis::cmd("ZSCAN")
                                .arg(&index)
                                .arg(cursor)
                                .arg("COUNT")
                                .arg(TAG_BATCH)
                                .query_async(conn)
                                .await
                        })
                        .await?;
                    let members: Vec<Bytes> = flat.into_iter().step_by(2).collect();
                    let marked = self
                        .purge_batch(namespace, generation, &members, mode, tag)
                        .await?;
                    progress.add(members.len() as u64, marked);
                    affected += marked;
                    if next == 0 {
                        return Ok(affected);
                    }
                    cursor = next;
                }
            }
        }
    }

    async fn flush_namespace(&self, namespace: &str, mode: PurgeMode) -> Result<u64, StoreError> {
        let state_key = layout::namespace_state_key(namespace);
        let generation: u64 = match mode {
            PurgeMode::Delete => {
                self.run(async |conn| {
                    redis::cmd("HINCRBY")
                        .arg(&state_key)
                        .arg(layout::GENERATION_FIELD)
                        .arg(1)
                        .query_async(conn)
                        .await
                })
                .await?
            }
            PurgeMode::MarkStale { now_ms } => {
                let script = soft_flush_script();
                let mut invocation = script.key(&state_key);
                invocation.arg(now_ms);
                let mut pipeline = redis::pipe();
                pipeline
                    .load_script(script)
                    .ignore()
                    .invoke_script(&invocation);
                let (generation,): (u64,) = self
                    .run(async |conn| pipeline.query_async(conn).await)
                    .await?;
                generation
            }
        };
        self.current_state(namespace).await?;
        Ok(generation)
    }

    async fn acquire_lease(
        &self,
        key: &StorageKey,
        token: &str,
        ttl: Duration,
        wanted: LeaseCondition,
    ) -> Result<LeaseGrant, StoreError> {
        let namespace = key.namespace();
        let mut guess = self.generations.get(namespace);
        let script = acquire_script();
        let (mode, mark) = match wanted {
            LeaseCondition::Unfilled { stale_before_ms } => ("unfilled", stale_before_ms),
            LeaseCondition::Refreshing { created_at_ms } => ("refresh", created_at_ms),
        };
        for _ in 0..GENERATION_ATTEMPTS {
            let mut invocation = script.key(layout::namespace_state_key(namespace));
            invocation
                .key(layout::lease_key(namespace, guess.generation, key.key()))
                .key(layout::entry_key(namespace, guess.generation, key.key()))
                .arg(token)
                .arg(expiry_millis(ttl))
                .arg(unix_millis())
                .arg(mark)
                .arg(mode);
            let mut pipeline = redis::pipe();
            pipeline
                .load_script(script)
                .ignore()
                .invoke_script(&invocation);
            let ((state, generation, entry),): ((u8, u64, Option<Bytes>),) = self
                .run(async |conn| pipeline.query_async(conn).await)
                .await?;
            if generation == guess.generation {
                return Ok(match (state, entry) {
                    (1, _) => LeaseGrant::Granted,
                    (2, Some(entry)) => LeaseGrant::Filled(entry),
                    _ => LeaseGrant::Held,
                });
            }
            // Granted (if at all) in a flushed generation, where nobody looks.
            guess = NamespaceState {
                generation,
                ..guess
            };
            self.generations.learn(namespace, guess);
        }
        Ok(LeaseGrant::Held)
    }

    async fn set_leased(&self, entry: WriteEntry, token: &str) -> Result<bool, StoreError> {
        let namespace = entry.key.namespace();
        let guess = self.generations.get(namespace);
        let generation = guess.generation;
        let script = leased_set_script();
        let ttl = expiry_millis(entry.expire_after);
        let now_ms = unix_millis();
        let mut invocation = script.key(layout::namespace_state_key(namespace));
        invocation
            .key(layout::lease_key(namespace, generation, entry.key.key()))
            .key(layout::entry_key(namespace, generation, entry.key.key()));
        for tag in &entry.tags {
            invocation.key(layout::tag_index_key(namespace, generation, tag));
        }
        for tag in &entry.tags {
            invocation.key(layout::tag_void_key(namespace, generation, tag));
        }
        invocation
            .arg(token)
            .arg(entry.value.as_ref())
            .arg(ttl)
            .arg(now_ms.saturating_add(ttl))
            .arg(now_ms)
            .arg(entry.key.key())
            .arg(entry.tags.len());
        let mut pipeline = redis::pipe();
        pipeline
            .load_script(script)
            .ignore()
            .invoke_script(&invocation);
        let ((written, current),): ((bool, u64),) = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        if current != generation {
            // The namespace was flushed since: that voids every lease of the
            // old generation (what was written there is unreachable).
            self.generations.learn(
                namespace,
                NamespaceState {
                    generation: current,
                    ..guess
                },
            );
            return Ok(false);
        }
        Ok(written)
    }

    async fn release_lease(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        let namespace = key.namespace();
        let generation = self.generations.get(namespace).generation;
        let script = release_script();
        let mut invocation = script.key(layout::lease_key(namespace, generation, key.key()));
        invocation.arg(token);
        let mut pipeline = redis::pipe();
        pipeline
            .load_script(script)
            .ignore()
            .invoke_script(&invocation);
        let (released,): (bool,) = self
            .run(async |conn| pipeline.query_async(conn).await)
            .await?;
        Ok(released)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

fn purge_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(PURGE_SCRIPT))
}

fn tag_purge_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(TAG_PURGE_SCRIPT))
}

fn acquire_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(ACQUIRE_SCRIPT))
}

fn leased_set_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(LEASED_SET_SCRIPT))
}

fn release_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(RELEASE_SCRIPT))
}

fn soft_flush_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(SOFT_FLUSH_SCRIPT))
}

/// The namespaces of `keys`, each once, in order of first appearance.
fn distinct_namespaces<'a>(keys: impl Iterator<Item = &'a StorageKey>) -> Vec<Arc<str>> {
    let mut namespaces: Vec<Arc<str>> = Vec::new();
    for key in keys {
        if !namespaces.iter().any(|known| **known == *key.namespace()) {
            namespaces.push(Arc::from(key.namespace()));
        }
    }
    namespaces
}

fn position(namespaces: &[Arc<str>], namespace: &str) -> usize {
    namespaces
        .iter()
        .position(|known| **known == *namespace)
        .expect("namespace collected from the same keys")
}

fn parse<T: redis::FromRedisValue>(reply: Option<redis::Value>) -> Result<T, StoreError> {
    let reply = reply.ok_or_else(|| StoreError::Command("short pipeline reply".to_owned()))?;
    redis::from_redis_value(reply).map_err(|err| StoreError::Command(err.to_string()))
}

/// Tag index members handled per step of a tag purge.
const TAG_BATCH: u64 = 500;

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

/// Redis refused a write at `maxmemory` (`-OOM`), alone or as one command of
/// a pipeline or transaction (redis-rs reports those as a list of server
/// errors, whose first one sets the error's kind).
fn is_out_of_memory(err: &RedisError) -> bool {
    err.code() == Some("OOM")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "OOM"))
}

fn command_error(err: RedisError) -> StoreError {
    if err.is_timeout() {
        StoreError::Timeout(Duration::ZERO)
    } else if is_out_of_memory(&err) {
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
