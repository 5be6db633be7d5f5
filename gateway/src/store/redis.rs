//! The Redis store, on a standalone Redis or a Redis Cluster.
//!
//! **Standalone.** Connections come from a deadpool-redis pool (bounded size,
//! wait/create/recycle timeouts, a PING health check on recycle). Each pooled
//! connection is a redis-rs `MultiplexedConnection`, so instead of checking a
//! connection out per request (one request per socket, plus deadpool's recycle
//! PING on every checkout), the store keeps up to `max_connections`
//! connections checked out in *lanes* and spreads requests over them
//! round-robin: concurrent requests pipeline on shared sockets. DESIGN.md
//! measured this at about twice the throughput of checkout-per-request;
//! docs/BENCHMARKS.md has our numbers.
//!
//! A lane goes back to the pool (and so through its health check) when a
//! command on it fails at the connection level, and every
//! `health_check_interval` in any case. Redis being down therefore costs one
//! failed connect per request at most, bounded by the pool's timeouts, and the
//! store reconnects by itself when Redis returns.
//!
//! **Cluster.** The lanes hold redis-rs cluster connections instead, built
//! from the seed nodes, without a pool: a cluster connection is already a set
//! of multiplexed connections (one per node) that routes every command by its
//! slot, follows MOVED and ASK, refreshes its slot map after a failover and
//! reconnects to nodes by itself. A deadpool pool over it would add a checkout
//! per request and a recycle PING that checks one node of many. A lane is
//! rebuilt only when its connection as a whole fails.
//!
//! Every operation is written once, as a [`Batch`] of single-slot groups:
//! one pipeline on a standalone Redis, concurrent per-slot pipelines on a
//! cluster. The layout ([`layout`]) hash-tags each entry with its lease and
//! each tag with its marks, so nothing needs two slots at once.

use std::{
    collections::HashMap,
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
    redis::{
        self, AsyncConnectionConfig, RedisError, Value,
        cluster::{ClusterClient, ClusterClientBuilder},
        cluster_async::ClusterConnection,
        cluster_routing::{RoutingInfo, SingleNodeRoutingInfo},
    },
};
use tracing::{debug, warn};

use super::{
    Fetched, LeaseCondition, LeaseGrant, Progress, PurgeMode, StorageKey, Store, StoreError,
    WriteEntry,
    batch::{Batch, Handle, Lua},
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

/// Cache entries in Redis, through lanes of multiplexed connections.
pub struct RedisStore {
    backend: Backend,
    next_lane: AtomicUsize,
    health_check_interval: Option<Duration>,
    epoch: Instant,
    generations: Generations,
    /// How long a tag purge's mark voids leases: the longest lease.
    lease_void_ttl: Duration,
    /// How long a command may wait for Redis's reply (`redis.response_timeout`).
    response_timeout: Duration,
}

/// Where connections come from.
enum Backend {
    /// A standalone Redis: pooled connections held in lanes.
    Standalone {
        pool: Pool,
        lanes: Box<[LaneSlot<Lane>]>,
    },
    /// A Redis Cluster: cluster connections held in lanes.
    Cluster {
        client: Box<ClusterClient>,
        lanes: Box<[LaneSlot<ClusterConnection>]>,
    },
}

/// Where a lane lives: the lane itself (swapped without locks on the hot
/// path), a lock taken only to fill it, and when filling it last failed.
struct LaneSlot<L> {
    current: ArcSwapOption<L>,
    filling: tokio::sync::Mutex<()>,
    last_failure: AtomicU64,
}

impl<L> Default for LaneSlot<L> {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            filling: tokio::sync::Mutex::new(()),
            last_failure: AtomicU64::new(0),
        }
    }
}

/// The lane a request took its connection from.
enum Taken {
    Standalone(usize, Arc<Lane>),
    Cluster(usize, Arc<ClusterConnection>),
}

impl Taken {
    fn index(&self) -> usize {
        match self {
            Taken::Standalone(index, _) | Taken::Cluster(index, _) => *index,
        }
    }
}

/// A pooled connection held out of the pool and shared by concurrent requests.
struct Lane {
    connection: Connection,
    checked_out_at: Instant,
}

impl RedisStore {
    /// Builds the pool (standalone) or the cluster client. Connects lazily:
    /// Redis need not be up yet. Leases last at most `max_lease_ttl`.
    pub fn new(config: &RedisConfig, max_lease_ttl: Duration) -> Result<Self, StoreError> {
        let lanes = config.max_connections.max(1);
        let backend = if config.is_cluster() {
            Backend::Cluster {
                client: Box::new(
                    cluster_client(config)
                        .map_err(|err| StoreError::Unavailable(format!("bad redis url: {err}")))?,
                ),
                lanes: (0..lanes).map(|_| LaneSlot::default()).collect(),
            }
        } else {
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
                .map_err(|err| {
                    StoreError::Unavailable(format!("cannot build redis pool: {err}"))
                })?;
            Backend::Standalone {
                pool,
                lanes: (0..lanes).map(|_| LaneSlot::default()).collect(),
            }
        };
        Ok(Self {
            backend,
            next_lane: AtomicUsize::new(0),
            health_check_interval: (!config.health_check_interval.is_zero())
                .then_some(config.health_check_interval),
            epoch: Instant::now(),
            generations: Generations::default(),
            lease_void_ttl: max_lease_ttl,
            response_timeout: config.response_timeout,
        })
    }

    /// Connections currently open: in the pool (checked out in lanes or
    /// idle), or the cluster connections held in lanes.
    pub fn open_connections(&self) -> usize {
        match &self.backend {
            Backend::Standalone { pool, .. } => pool.status().size,
            Backend::Cluster { lanes, .. } => lanes
                .iter()
                .filter(|slot| slot.current.load().is_some())
                .count(),
        }
    }

    /// A metrics collector reporting the pool's figures at each scrape (a
    /// standalone Redis; a cluster has no pool).
    pub fn pool_collector(&self) -> Option<PoolCollector> {
        match &self.backend {
            Backend::Standalone { pool, .. } => Some(PoolCollector(pool.clone())),
            Backend::Cluster { .. } => None,
        }
    }

    /// A connection handle for one command or batch, and the lane it came from.
    async fn connection(&self) -> Result<(Handle, Taken), StoreError> {
        let index = self.next_lane.fetch_add(1, Ordering::Relaxed);
        match &self.backend {
            Backend::Standalone { pool, lanes } => {
                let index = index % lanes.len();
                let interval = self.health_check_interval;
                let lane = self
                    .lane(
                        &lanes[index],
                        |lane: &Lane| {
                            // Due for its health check: hand it back, the pool PINGs it.
                            interval.is_none_or(|every| lane.checked_out_at.elapsed() < every)
                        },
                        // Boxed, here and for a cluster: the pool's future
                        // (connecting included) is ~7 KB, and unboxed it would
                        // be part of every command's future, which every Get
                        // allocates and moves, for a path taken once per lane.
                        async || {
                            let connection = Box::pin(pool.get()).await.map_err(pool_error)?;
                            Ok(Lane {
                                connection,
                                checked_out_at: Instant::now(),
                            })
                        },
                    )
                    .await?;
                let handle = Handle::Standalone((*lane.connection).clone());
                Ok((handle, Taken::Standalone(index, lane)))
            }
            Backend::Cluster { client, lanes } => {
                let index = index % lanes.len();
                let lane = self
                    .lane(
                        &lanes[index],
                        |_: &ClusterConnection| true,
                        async || {
                            Box::pin(client.get_async_connection())
                                .await
                                .map_err(|err| {
                                    StoreError::Unavailable(format!(
                                        "cannot connect to the cluster: {err}"
                                    ))
                                })
                        },
                    )
                    .await?;
                Ok((
                    Handle::Cluster((*lane).clone()),
                    Taken::Cluster(index, lane),
                ))
            }
        }
    }

    /// The lane in `slot`, filled by one caller while the others wait.
    async fn lane<L>(
        &self,
        slot: &LaneSlot<L>,
        usable: impl Fn(&L) -> bool,
        fill: impl AsyncFnOnce() -> Result<L, StoreError>,
    ) -> Result<Arc<L>, StoreError> {
        let current = |slot: &LaneSlot<L>| slot.current.load_full().filter(|lane| usable(lane));
        if let Some(lane) = current(slot) {
            return Ok(lane);
        }
        // One request fills an empty lane; the others on that lane wait for it
        // instead of all stampeding the pool (and its wait timeout).
        let waiting_since = self.clock();
        let _filling = slot.filling.lock().await;
        if let Some(lane) = current(slot) {
            return Ok(lane);
        }
        if slot.last_failure.load(Ordering::Acquire) > waiting_since {
            // The fill we queued behind just failed: fail fast too rather than
            // queueing another connect attempt behind it.
            return Err(StoreError::Unavailable(
                "redis connection failed moments ago".to_owned(),
            ));
        }
        // A lane due for its health check goes back (dropped) here.
        slot.current.store(None);
        match fill().await {
            Ok(lane) => {
                let lane = Arc::new(lane);
                slot.current.store(Some(Arc::clone(&lane)));
                Ok(lane)
            }
            Err(err) => {
                slot.last_failure
                    .store(self.clock().max(1), Ordering::Release);
                Err(err)
            }
        }
    }

    /// Nanoseconds since the store was built (a cheap, comparable timestamp).
    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `taken` out of its slot (if it is still there: a concurrent
    /// request may have replaced it already) so it returns to the pool (or
    /// closes) once the commands in flight on it finish.
    fn retire(&self, taken: &Taken) {
        fn swap_out<L>(slot: &LaneSlot<L>, lane: &Arc<L>) {
            let current = Some(Arc::clone(lane));
            slot.current.compare_and_swap(&current, None::<Arc<L>>);
        }
        match (&self.backend, taken) {
            (Backend::Standalone { lanes, .. }, Taken::Standalone(index, lane)) => {
                swap_out(&lanes[*index], lane);
            }
            (Backend::Cluster { lanes, .. }, Taken::Cluster(index, lane)) => {
                swap_out(&lanes[*index], lane);
            }
            _ => {}
        }
    }

    /// Takes every lane out of its slot; commands in flight on them finish.
    fn retire_all(&self) {
        match &self.backend {
            Backend::Standalone { lanes, .. } => {
                lanes.iter().for_each(|slot| slot.current.store(None));
            }
            Backend::Cluster { lanes, .. } => {
                lanes.iter().for_each(|slot| slot.current.store(None));
            }
        }
    }

    /// Runs one command or pipeline on a lane, retiring the lane if the
    /// connection itself failed.
    async fn run<T, F>(&self, command: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut Handle) -> Result<T, RedisError>,
    {
        let (mut handle, taken) = self.connection().await?;
        match command(&mut handle).await {
            Ok(value) => Ok(value),
            Err(err) => {
                let cluster = matches!(handle, Handle::Cluster(_));
                if !cluster && (err.is_connection_dropped() || err.is_io_error()) {
                    // The server closed this connection: it restarted, failed
                    // over or killed its clients, and then every lane opened
                    // before is just as dead. Retire them all, so that a retry
                    // (and every later call) gets a fresh connection instead
                    // of finding the next dead lane.
                    debug!(cause = %err, lane = taken.index(), "redis closed a connection: retiring every lane");
                    self.retire_all();
                } else if is_connection_error(&err) {
                    // A cluster connection reconnects to a node by itself; it is
                    // rebuilt only when it failed as a whole.
                    debug!(cause = %err, lane = taken.index(), "retiring redis connection");
                    self.retire(&taken);
                }
                Err(command_error(err, self.response_timeout))
            }
        }
    }

    /// Runs `batch` on a lane: one pipeline, or one per slot group.
    async fn exec(&self, batch: Batch) -> Result<Vec<Value>, StoreError> {
        self.run(async move |handle| batch.run(handle).await).await
    }

    /// Where a scan must look: the Redis itself (`None`), or every primary of
    /// the cluster, by address.
    async fn scan_targets(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        if matches!(self.backend, Backend::Standalone { .. }) {
            return Ok(vec![None]);
        }
        let nodes: String = self
            .run(async |handle| {
                let Handle::Cluster(connection) = handle else {
                    unreachable!("a cluster backend hands out cluster connections")
                };
                let reply = connection
                    .route_command(
                        redis::cmd("CLUSTER").arg("NODES").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                    )
                    .await?;
                redis::from_redis_value(reply).map_err(RedisError::from)
            })
            .await?;
        let primaries = cluster_primaries(&nodes);
        if primaries.is_empty() {
            return Err(StoreError::Command(
                "the cluster lists no primary serving slots".to_owned(),
            ));
        }
        Ok(primaries.into_iter().map(Some).collect())
    }

    /// One SCAN step on `target` (see [`Self::scan_targets`]).
    async fn scan_step(
        &self,
        target: Option<&(String, u16)>,
        cursor: u64,
        matcher: &[u8],
    ) -> Result<(u64, Vec<Bytes>), StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(matcher)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        self.run(async |handle| match (handle, target) {
            (Handle::Cluster(connection), Some((host, port))) => {
                let reply = connection
                    .route_command(
                        scan,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                redis::from_redis_value(reply).map_err(RedisError::from)
            }
            (handle, _) => scan.query_async(handle).await,
        })
        .await
    }
}

/// A connection of its own (not a lane) to the Redis `config` names, for
/// the policy sync and other background work: a multiplexed connection, or a
/// cluster connection.
pub(crate) async fn connect(config: &RedisConfig, client_name: &str) -> Result<Handle, RedisError> {
    if config.is_cluster() {
        let connection = cluster_client(config)?.get_async_connection().await?;
        return Ok(Handle::Cluster(connection));
    }
    let timeouts = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout));
    let mut connection = crate::tls::redis_client(config)?
        .get_multiplexed_async_connection_with_config(&timeouts)
        .await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(client_name)
        .exec_async(&mut connection)
        .await?;
    Ok(Handle::Standalone(connection))
}

/// The cluster client: every seed node, the store's timeouts, the TLS
/// certificates of `rediss://` seeds. redis-rs retries a command a few times
/// across MOVED/ASK and reconnects; the cache layer's deadline bounds it all.
pub(crate) fn cluster_client(config: &RedisConfig) -> Result<ClusterClient, RedisError> {
    let seeds = config
        .seeds()
        .map(|url| {
            crate::tls::redis_client_for(config, url)
                .map(|client| client.get_connection_info().clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.response_timeout)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(10)
        .max_retry_wait(200);
    if let Some(certificates) = crate::tls::redis_certificates(config)? {
        builder = builder.certs(certificates);
    }
    builder.build()
}

/// How often redis-rs retries a cluster command (MOVED, ASK, a node that is
/// failing over) before it reports the error.
const CLUSTER_RETRIES: u32 = 4;

/// The primaries serving slots, from a `CLUSTER NODES` reply: lines of
/// `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong> <epoch>
/// <link> <slot>...`.
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serving = flags.split(',').any(|flag| flag == "master")
                && !flags
                    .split(',')
                    .any(|flag| flag == "fail" || flag == "noaddr")
                && fields.len() > 8;
            if !serving {
                return None;
            }
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// Removes or marks stale one entry, only if it is a cachegw envelope and, when
/// a tag is given, only if it still carries that tag (an entry rewritten
/// without the tag since it was indexed is left alone). Reads just the
/// envelope's header and tag section (see `cache/envelope.rs` for the layout).
///
/// Without a tag (a purge by key or pattern) it also voids the key's lease,
/// whether or not the entry exists: a fill in progress must not write back.
///
/// Marking stale follows `Times::soft_purged` (`cache/envelope.rs`): an entry
/// fresh at `now` (and created by then) gets "fresh until" `now` and "stale
/// until" `now` plus its stale window, and the key's expiry is cut to that
/// window; without a window the entry is unlinked. Times are below 2^53, so
/// Lua's doubles hold them exactly.
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
local created, fresh, stale = 0, 0, 0
for i = 12, 5, -1 do created = created * 256 + string.byte(header, i) end
for i = 20, 13, -1 do fresh = fresh * 256 + string.byte(header, i) end
for i = 28, 21, -1 do stale = stale * 256 + string.byte(header, i) end
if fresh <= now or created > now then return 0 end
local window = stale - fresh
if window <= 0 then return redis.call('UNLINK', KEYS[1]) end
local stale_until, rest = {}, now + window
for i = 1, 8 do
  stale_until[i] = rest % 256
  rest = math.floor(rest / 256)
end
redis.call('SETRANGE', KEYS[1], 12, ARGV[3] .. string.char(unpack(stale_until)))
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or ttl > window then redis.call('PEXPIRE', KEYS[1], window) end
return 1
";

/// Starts a tag purge, after the namespace's tag sequence moved on to
/// ARGV[1]: the tag's void mark (KEYS[3]) records it (never going back) for as
/// long as a lease can live, ARGV[2] ms, which voids the leased writes of
/// fills granted before; then, for a hard purge (ARGV[3] `take`), renames the
/// tag index (KEYS[1]) to the purge's private key (KEYS[2]) if it exists; 1 if
/// it did. All three keys share the tag's slot.
const TAG_PURGE_SCRIPT: &str = r"
local seq = tonumber(ARGV[1])
if seq > tonumber(redis.call('GET', KEYS[3]) or '0') then
  redis.call('SET', KEYS[3], seq, 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
if ARGV[3] ~= 'take' then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
";

/// Grants a lease unless one is held or no fill is needed any more: the
/// entry (KEYS[2]) is fresh (mode `unfilled`: fresh until after ARGV[3] and
/// created after ARGV[4]), or is no longer the version created at ARGV[4]
/// (mode `refresh`). The lease records the namespace's tag sequence as the
/// caller last read it (ARGV[6], read before this call, so never newer than
/// the grant), for the leased write's check. Returns {state, entry} with
/// state 1 granted, 0 held, 2 filled (and the entry that fills it).
///
/// KEYS[1]: the lease, KEYS[2]: the entry (one slot). ARGV: token, lifetime
/// (ms), now (ms), the time above, mode, tag sequence.
const ACQUIRE_SCRIPT: &str = r"
local entry = redis.call('GET', KEYS[2])
if entry and string.len(entry) >= 20 and string.sub(entry, 1, 2) == 'cg' then
  local created, fresh = 0, 0
  for i = 12, 5, -1 do created = created * 256 + string.byte(entry, i) end
  for i = 20, 13, -1 do fresh = fresh * 256 + string.byte(entry, i) end
  local mark = tonumber(ARGV[4])
  if ARGV[5] == 'unfilled' then
    if fresh > tonumber(ARGV[3]) and created > mark then return {2, entry} end
  elseif created ~= mark then
    return {2, entry}
  end
elseif ARGV[5] == 'refresh' then
  return {0, false}
end
local granted = redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[6], 'NX', 'PX', ARGV[2])
return {granted and 1 or 0, false}
";

/// The first step of a leased write: writes the entry (KEYS[2]) only if its
/// lease (KEYS[1]) is still the caller's (ARGV[1]), consuming the lease.
/// Returns the tag sequence the lease recorded, or -1 (not written). ARGV:
/// token, value, ttl (ms).
///
/// The tag checks come after, from the tags' own slots: see
/// [`RedisStore::set_leased`].
const LEASED_WRITE_SCRIPT: &str = r"
local token = ARGV[1]
local lease = redis.call('GET', KEYS[1])
if not lease or string.sub(lease, 1, #token + 1) ~= token .. ':' then return -1 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return tonumber(string.sub(lease, #token + 2)) or 0
";

/// Indexes entries under one tag (KEYS[1], a sorted set of entry keys scored
/// by expiry). ARGV: pairs of TTL (ms) and entry key.
///
/// Scores come from Redis's own clock, read here, after the entries' SETs
/// ran (an earlier phase of the same batch), so a member's score is never
/// below its entry's expiry: trimming the members whose score has passed
/// drops only entries that have expired. (Scoring by the gateway's clock
/// would not hold: a write queued behind others reaches Redis later than the
/// gateway read its clock, and its entry outlives its member.) A score only
/// moves up (GT): two attempts at one write keep the later expiry. The index
/// lives as long as its longest-lived entry.
const INDEX_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local longest = 0
for i = 1, #ARGV, 2 do
  local ttl = tonumber(ARGV[i])
  redis.call('ZADD', KEYS[1], 'GT', string.format('%d', now + ttl), ARGV[i + 1])
  if ttl > longest then longest = ttl end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now))
if redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
return 0
";

/// Takes back a leased write that a tag purge voided: removes the entry
/// (KEYS[1]) only if it is still the version written (its header, ARGV[1]).
const UNDO_SCRIPT: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) == ARGV[1] then
  return redis.call('UNLINK', KEYS[1])
end
return 0
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
    /// Adds `HMGET {state} gen stale tagseq`, a group of its own, to `batch`.
    fn read_state(batch: &mut Batch, namespace: &str) {
        let mut hmget = redis::cmd("HMGET");
        hmget
            .arg(layout::namespace_state_key(namespace))
            .arg(layout::GENERATION_FIELD)
            .arg(layout::STALE_BEFORE_FIELD)
            .arg(layout::TAG_SEQUENCE_FIELD);
        batch.group().add(hmget);
    }

    /// Records the reply of [`Self::read_state`].
    fn learn(&self, namespace: &str, reply: Option<Value>) -> Result<NamespaceState, StoreError> {
        let reply: Vec<Option<u64>> = parse(reply)?;
        let field = |at: usize| reply.get(at).copied().flatten().unwrap_or(0);
        let state = NamespaceState {
            generation: field(0),
            stale_before_ms: field(1),
            tag_sequence: field(2),
        };
        self.generations.learn(namespace, state);
        Ok(state)
    }

    /// The current state of `namespace`, read from Redis.
    async fn current_state(&self, namespace: &str) -> Result<NamespaceState, StoreError> {
        let mut batch = Batch::new();
        Self::read_state(&mut batch, namespace);
        let mut replies = self.exec(batch).await?.into_iter();
        self.learn(namespace, replies.next())
    }

    /// Adds the SET writing `entry` in `generation` to `batch` (in the
    /// entry's slot), and for a tagged entry records it in `indexing`, the
    /// tags to index in a later phase (see [`TagIndexing`]).
    ///
    /// The entry is written before it is indexed, and the two are not one
    /// transaction (on a cluster they live in different slots). That is safe
    /// because a tag purge owner-checks each member's own tags (in the
    /// envelope) before touching it, and because of the order: a purge that
    /// takes the index between the two steps misses this write, which was not
    /// acknowledged yet (so it is ordered after the purge), and the write then
    /// lands in the fresh index, where the next purge finds it. Every
    /// acknowledged tagged write is indexed; the index may list a few more.
    fn write_commands<'a>(
        batch: &mut Batch,
        indexing: &mut TagIndexing<'a>,
        entry: &'a WriteEntry,
        generation: u64,
    ) {
        let namespace = entry.key.namespace();
        let ttl = expiry_millis(entry.expire_after);
        let mut set = redis::cmd("SET");
        set.arg(layout::EntryKey {
            namespace,
            generation,
            key: entry.key.key(),
        })
        .arg(entry.value.as_ref())
        .arg("PX")
        .arg(ttl);
        batch.group().add_ignored(set);
        indexing.add(entry, generation, ttl);
    }

    /// Writes `entries` (one round trip on a standalone Redis), each in its
    /// namespace's current generation; entries whose generation moved
    /// meanwhile are rewritten.
    async fn write(&self, mut entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        for _ in 0..GENERATION_ATTEMPTS {
            let namespaces = distinct_namespaces(entries.iter().map(|entry| &entry.key));
            let guesses: Vec<NamespaceState> = namespaces
                .iter()
                .map(|namespace| self.generations.get(namespace))
                .collect();
            let mut batch = Batch::new();
            for namespace in &namespaces {
                Self::read_state(&mut batch, namespace);
            }
            let mut indexing = TagIndexing::default();
            for entry in &entries {
                let at = position(&namespaces, entry.key.namespace());
                Self::write_commands(&mut batch, &mut indexing, entry, guesses[at].generation);
            }
            indexing.into_phase(&mut batch);
            let mut replies = self.exec(batch).await?.into_iter();
            let mut moved: Vec<&str> = Vec::new();
            for (namespace, guess) in namespaces.iter().zip(&guesses) {
                if self.learn(namespace, replies.next())?.generation != guess.generation {
                    moved.push(namespace);
                }
            }
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

    /// Reads `keys` (one round trip on a standalone Redis, one per slot
    /// concurrently on a cluster) from their namespaces' current generations;
    /// keys whose generation moved meanwhile are read again.
    ///
    /// On a standalone Redis a namespace's keys go as one MGET: one command
    /// for Redis to dispatch and one reply for the connection to parse,
    /// instead of one of each per key. On a cluster every entry key has a
    /// slot of its own, so each is its own GET.
    async fn read(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError> {
        let one_mget_per_namespace = matches!(self.backend, Backend::Standalone { .. });
        let mut results: Vec<Option<Fetched>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        for _ in 0..GENERATION_ATTEMPTS {
            let namespaces = distinct_namespaces(pending.iter().map(|&i| &keys[i]));
            let guesses: Vec<NamespaceState> = namespaces
                .iter()
                .map(|namespace| self.generations.get(namespace))
                .collect();
            let mut batch = Batch::new();
            for namespace in &namespaces {
                Self::read_state(&mut batch, namespace);
            }
            let entry_key = |i: usize| {
                let key = &keys[i];
                layout::EntryKey {
                    namespace: key.namespace(),
                    generation: guesses[position(&namespaces, key.namespace())].generation,
                    key: key.key(),
                }
            };
            // The keys in the order their values come back.
            let mut asked: Vec<usize> = Vec::with_capacity(pending.len());
            if one_mget_per_namespace {
                let one_namespace = namespaces.len() == 1;
                for (namespace, guess) in namespaces.iter().zip(&guesses) {
                    let entry_key = |i: usize| layout::EntryKey {
                        namespace,
                        generation: guess.generation,
                        key: keys[i].key(),
                    };
                    let start = asked.len();
                    asked.extend(
                        pending
                            .iter()
                            .copied()
                            .filter(|&i| one_namespace || *keys[i].namespace() == **namespace),
                    );
                    // Sized once, so that a hundred keys do not grow it by doubling.
                    let mine = &asked[start..];
                    let bytes = mine.iter().map(|&i| entry_key(i).byte_len()).sum::<usize>();
                    let mut mget = redis::Cmd::with_capacity(1 + mine.len(), 4 + bytes);
                    mget.arg("MGET");
                    for &i in mine {
                        mget.arg(entry_key(i));
                    }
                    batch.group().add(mget);
                }
            } else {
                for &i in &pending {
                    let mut get = redis::cmd("GET");
                    get.arg(entry_key(i));
                    batch.group().add(get);
                    asked.push(i);
                }
            }
            let mut replies = self.exec(batch).await?.into_iter();
            let mut states = Vec::with_capacity(namespaces.len());
            for (namespace, guess) in namespaces.iter().zip(&guesses) {
                let state = self.learn(namespace, replies.next())?;
                states.push((state, state.generation == guess.generation));
            }
            let values: Vec<Option<Bytes>> = if one_mget_per_namespace {
                let mut values = Vec::with_capacity(asked.len());
                for _ in &namespaces {
                    values.extend(parse::<Vec<Option<Bytes>>>(replies.next())?);
                }
                values
            } else {
                replies
                    .map(|reply| parse(Some(reply)))
                    .collect::<Result<_, _>>()?
            };
            if values.len() != asked.len() {
                return Err(StoreError::Command(format!(
                    "{} values for {} keys read",
                    values.len(),
                    asked.len()
                )));
            }
            let mut still_pending = Vec::new();
            for (i, value) in asked.into_iter().zip(values) {
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

    /// Voids the leases of fills that will carry `tag` (the namespace's tag
    /// sequence moves on, then the tag records it), and with a `snapshot` key
    /// takes the tag's index over into it; whether there was an index to take.
    async fn begin_tag_purge(
        &self,
        namespace: &str,
        generation: u64,
        tag: &str,
        snapshot: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let sequence: u64 = self
            .run(async |handle| {
                redis::cmd("HINCRBY")
                    .arg(layout::namespace_state_key(namespace))
                    .arg(layout::TAG_SEQUENCE_FIELD)
                    .arg(1)
                    .query_async(handle)
                    .await
            })
            .await?;
        let index = layout::tag_index_key(namespace, generation, tag);
        let void = layout::tag_void_key(namespace, generation, tag);
        // Without a snapshot the script never touches KEYS[2]; the index's own
        // name keeps the call in one slot.
        let snapshot = snapshot.unwrap_or(&index).to_vec();
        let mut batch = Batch::new();
        batch
            .eval(tag_purge_script(), &[&index, &snapshot, &void])
            .arg(sequence)
            .arg(expiry_millis(self.lease_void_ttl))
            .arg(if snapshot != index { "take" } else { "keep" });
        let mut replies = self.exec(batch).await?.into_iter();
        parse(replies.next())
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
        let (flag, now_ms) = match mode {
            PurgeMode::Delete => ("d", 0),
            PurgeMode::MarkStale { now_ms } => ("s", now_ms),
        };
        let mut batch = Batch::new();
        for key in keys {
            let entry = layout::entry_key(namespace, generation, key);
            let lease = layout::lease_key(namespace, generation, key);
            batch
                .group()
                .eval(purge_script(), &[&entry, &lease])
                .arg(flag)
                .arg(now_ms)
                .arg(now_ms.to_le_bytes().as_slice())
                .arg(tag);
        }
        let affected = self.exec(batch).await?;
        affected
            .into_iter()
            .map(|reply| parse::<u64>(Some(reply)))
            .sum()
    }

    /// Unlinks `keys` (each in its own slot); how many existed.
    async fn unlink(&self, keys: &[Bytes]) -> Result<u64, StoreError> {
        let mut batch = Batch::new();
        for key in keys {
            let mut unlink = redis::cmd("UNLINK");
            unlink.arg(key.as_ref());
            batch.group().add(unlink);
        }
        let removed = self.exec(batch).await?;
        removed
            .into_iter()
            .map(|reply| parse::<u64>(Some(reply)))
            .sum()
    }
}

/// The tag indexing of a batch of writes: per tag index, the entries to add
/// (TTL and key), so each index gets one script call however many of the
/// batch's entries carry its tag.
#[derive(Default)]
struct TagIndexing<'a> {
    /// Per tag index key, in order of first use: its members.
    indexes: Vec<(Vec<u8>, Vec<Member<'a>>)>,
    /// Where each index key is in `indexes` (a batch may carry many tags).
    positions: HashMap<Vec<u8>, usize>,
}

/// An entry to index: its TTL (ms) and key.
type Member<'a> = (u64, &'a [u8]);

impl<'a> TagIndexing<'a> {
    /// Records `entry` (written in `generation`, for `ttl` ms) under each of
    /// its tags.
    fn add(&mut self, entry: &'a WriteEntry, generation: u64, ttl: u64) {
        let namespace = entry.key.namespace();
        for tag in &entry.tags {
            let index = layout::tag_index_key(namespace, generation, tag);
            let member = (ttl, entry.key.key());
            match self.positions.get(&index) {
                Some(&at) => self.indexes[at].1.push(member),
                None => {
                    self.positions.insert(index.clone(), self.indexes.len());
                    self.indexes.push((index, vec![member]));
                }
            }
        }
    }

    /// Adds the indexing to `batch` as a new phase (after the SETs), one
    /// group per tag index; nothing when no entry was tagged. Replies are
    /// dropped.
    fn into_phase(self, batch: &mut Batch) {
        if self.indexes.is_empty() {
            return;
        }
        batch.then();
        for (index, members) in self.indexes {
            Self::add_index(batch, &index, &members);
        }
    }

    /// One tag index's call, in its own group of `batch`.
    fn add_index(batch: &mut Batch, index: &[u8], members: &[Member<'_>]) {
        let call = batch.group().eval_ignored(index_script(), &[index]);
        for &(ttl, member) in members {
            call.arg(ttl).arg(member);
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &StorageKey) -> Result<Fetched, StoreError> {
        // Served, concurrent Gets reach this store gathered into `get_many`
        // calls (`GuardedStore`, `coalesce`); this is a read on its own.
        let mut fetched = self.read(std::slice::from_ref(key)).await?;
        Ok(fetched.pop().unwrap_or_default())
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
            let mut batch = Batch::new();
            Self::read_state(&mut batch, namespace);
            // UNLINK frees large values off Redis's main thread. The key's
            // lease goes too (same slot): a fill in progress must not write back.
            let mut entry = redis::cmd("UNLINK");
            entry.arg(layout::entry_key(namespace, guess.generation, key.key()));
            let mut lease = redis::cmd("UNLINK");
            lease.arg(layout::lease_key(namespace, guess.generation, key.key()));
            batch.group().add(entry).add_ignored(lease);
            let mut replies = self.exec(batch).await?.into_iter();
            let state = self.learn(namespace, replies.next())?;
            let removed: u64 = parse(replies.next())?;
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
        // SCAN with a bounded COUNT on every primary, and one pipeline of
        // UNLINKs (or purge scripts) per batch: never KEYS, never one huge
        // command. The prefix (`cg:{<ns>:<gen>:`) holds no glob
        // metacharacters, so the pattern cannot reach outside it.
        let generation = self.current_state(namespace).await?.generation;
        // One scan finds the entries and the leases (fills in progress) the
        // pattern matches: the leases are voided with the entries.
        let prefix_len = layout::entry_prefix(namespace, generation).len();
        let mut matcher = layout::entry_or_lease_matcher(namespace, generation);
        matcher.extend_from_slice(pattern.as_bytes());
        matcher.extend_from_slice(layout::KEY_SUFFIX);
        let mut affected = 0;
        for target in self.scan_targets().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, found) = self.scan_step(target.as_ref(), cursor, &matcher).await?;
                let (leases, entries): (Vec<Bytes>, Vec<Bytes>) =
                    found.into_iter().partition(|key| layout::is_lease_key(key));
                if !leases.is_empty() {
                    self.unlink(&leases).await?;
                }
                if !entries.is_empty() {
                    let removed = match mode {
                        PurgeMode::Delete => self.unlink(&entries).await?,
                        PurgeMode::MarkStale { .. } => {
                            let inner: Vec<Bytes> = entries
                                .iter()
                                .filter_map(|key| {
                                    let inner = layout::inner_key(key, prefix_len)?;
                                    Some(Bytes::copy_from_slice(inner))
                                })
                                .collect();
                            self.purge_batch(namespace, generation, &inner, mode, "")
                                .await?
                        }
                    };
                    progress.add(entries.len() as u64, removed);
                    affected += removed;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(affected)
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
                // Take the index over atomically: every entry indexed before
                // this point is in the snapshot, and writes from now on index
                // into a fresh set that this purge leaves alone.
                let snapshot = layout::tag_purge_key(namespace, generation, tag, rand::random());
                if !self
                    .begin_tag_purge(namespace, generation, tag, Some(&snapshot))
                    .await?
                {
                    return Ok(0);
                }
                loop {
                    let popped: Vec<(Bytes, f64)> = self
                        .run(async |handle| {
                            redis::cmd("ZPOPMIN")
                                .arg(&snapshot)
                                .arg(TAG_BATCH)
                                .query_async(handle)
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
                        .run(async |handle| {
                            redis::cmd("ZSCAN")
                                .arg(&index)
                                .arg(cursor)
                                .arg("COUNT")
                                .arg(TAG_BATCH)
                                .query_async(handle)
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
                self.run(async |handle| {
                    redis::cmd("HINCRBY")
                        .arg(&state_key)
                        .arg(layout::GENERATION_FIELD)
                        .arg(1)
                        .query_async(handle)
                        .await
                })
                .await?
            }
            PurgeMode::MarkStale { now_ms } => {
                let mut batch = Batch::new();
                batch.eval(soft_flush_script(), &[&state_key]).arg(now_ms);
                let mut replies = self.exec(batch).await?.into_iter();
                parse(replies.next())?
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
        let (mode, mark) = match wanted {
            LeaseCondition::Unfilled { stale_before_ms } => ("unfilled", stale_before_ms),
            LeaseCondition::Refreshing { created_at_ms } => ("refresh", created_at_ms),
        };
        for _ in 0..GENERATION_ATTEMPTS {
            let lease = layout::lease_key(namespace, guess.generation, key.key());
            let entry = layout::entry_key(namespace, guess.generation, key.key());
            let mut batch = Batch::new();
            Self::read_state(&mut batch, namespace);
            // The tag sequence recorded is the one last read (by the caller's
            // own read, moments ago): older than the grant, so a tag purge
            // that starts after the grant always voids the fill.
            batch
                .group()
                .eval(acquire_script(), &[&lease, &entry])
                .arg(token)
                .arg(expiry_millis(ttl))
                .arg(unix_millis())
                .arg(mark)
                .arg(mode)
                .arg(guess.tag_sequence);
            let mut replies = self.exec(batch).await?.into_iter();
            let state = self.learn(namespace, replies.next())?;
            let (granted, filled): (u8, Option<Bytes>) = parse(replies.next())?;
            if state.generation == guess.generation {
                return Ok(match (granted, filled) {
                    (1, _) => LeaseGrant::Granted,
                    (2, Some(entry)) => LeaseGrant::Filled(entry),
                    _ => LeaseGrant::Held,
                });
            }
            // Granted (if at all) in a flushed generation, where nobody looks.
            guess = state;
        }
        Ok(LeaseGrant::Held)
    }

    /// A leased write in three ordered steps, each in one slot: (1) in the
    /// entry's slot, check and consume the lease and write the entry; (2) in
    /// each tag's slot, index the entry, then (3) read the tag's void mark. A
    /// mark newer than the lease means a tag purge started after the fill
    /// was granted: the write is taken back (only if it is still the version
    /// written) and reported as not written.
    ///
    /// Why no purge can miss it: the purge moves the mark before it takes the
    /// index. If the mark moved before step 3 read it, the write takes itself
    /// back; if after, the purge took the index after step 2 indexed the
    /// entry, and removes it itself.
    async fn set_leased(&self, entry: WriteEntry, token: &str) -> Result<bool, StoreError> {
        let namespace = entry.key.namespace();
        let generation = self.generations.get(namespace).generation;
        let ttl = expiry_millis(entry.expire_after);
        let entry_key = layout::entry_key(namespace, generation, entry.key.key());
        let lease_key = layout::lease_key(namespace, generation, entry.key.key());
        let mut batch = Batch::new();
        Self::read_state(&mut batch, namespace);
        batch
            .group()
            .eval(leased_write_script(), &[&lease_key, &entry_key])
            .arg(token)
            .arg(entry.value.as_ref())
            .arg(ttl);
        batch.then();
        for tag in &entry.tags {
            let index = layout::tag_index_key(namespace, generation, tag);
            // The index and its void mark share the tag's slot: one group.
            TagIndexing::add_index(&mut batch, &index, &[(ttl, entry.key.key())]);
            let mut void = redis::cmd("GET");
            void.arg(layout::tag_void_key(namespace, generation, tag));
            batch.add(void);
        }
        let mut replies = self.exec(batch).await?.into_iter();
        let state = self.learn(namespace, replies.next())?;
        let sequence: i64 = parse(replies.next())?;
        let mut voided = false;
        for _ in &entry.tags {
            let mark: Option<u64> = parse(replies.next())?;
            voided |= u64::try_from(sequence).is_ok_and(|sequence| mark.unwrap_or(0) > sequence);
        }
        if sequence < 0 {
            return Ok(false);
        }
        if voided {
            let header = &entry.value[..entry.value.len().min(ENVELOPE_VERSION_BYTES)];
            let mut batch = Batch::new();
            batch.eval(undo_script(), &[&entry_key]).arg(header);
            self.exec(batch).await?;
            return Ok(false);
        }
        // Written in a generation flushed since (the flush voids every lease
        // of the old generation): unreachable, so not written.
        Ok(state.generation == generation)
    }

    async fn release_lease(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        let namespace = key.namespace();
        let generation = self.generations.get(namespace).generation;
        let lease = layout::lease_key(namespace, generation, key.key());
        let mut batch = Batch::new();
        batch.eval(release_script(), &[&lease]).arg(token);
        let mut replies = self.exec(batch).await?.into_iter();
        parse(replies.next())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// The envelope bytes that identify a version: magic, version, creation and
/// fresh-until times (see `cache/envelope.rs`).
const ENVELOPE_VERSION_BYTES: usize = 20;

fn purge_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(PURGE_SCRIPT))
}

fn tag_purge_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(TAG_PURGE_SCRIPT))
}

fn acquire_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(ACQUIRE_SCRIPT))
}

fn leased_write_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(LEASED_WRITE_SCRIPT))
}

fn index_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(INDEX_SCRIPT))
}

fn undo_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(UNDO_SCRIPT))
}

fn release_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(RELEASE_SCRIPT))
}

fn soft_flush_script() -> &'static Lua {
    static SCRIPT: OnceLock<Lua> = OnceLock::new();
    SCRIPT.get_or_init(|| Lua::new(SOFT_FLUSH_SCRIPT))
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

/// `response_timeout`: what a timed-out command waited (`redis.response_timeout`).
fn command_error(err: RedisError, response_timeout: Duration) -> StoreError {
    if err.is_timeout() {
        StoreError::Timeout(response_timeout)
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
