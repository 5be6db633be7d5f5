//! The near-cache's invalidation bus: Redis pub/sub on one channel
//! (`near_cache.channel`), a named subscriber connection per gateway and a
//! publisher connection for this gateway's own changes.
//!
//! Why pub/sub and not RESP3 client tracking: a PUBLISH reaches the
//! subscribers of every node of a Redis Cluster unchanged, while tracking
//! needs a tracking connection per node, and a namespace flush bumps a
//! generation counter without touching the entry keys, so tracking would not
//! report it. A message costs one round trip on the writer's side; delivery
//! is measured in `docs/BENCHMARKS.md`.
//!
//! The subscriber speaks RESP3 on a multiplexed connection, so it can be
//! named (`CLIENT SETNAME cachegw-l1`: operators and tests find it in CLIENT
//! LIST) and PINGed while subscribed. The connection takes a ready
//! [`redis::Client`] (see [`client`]), so another transport (a cluster
//! connection) can be swapped in without touching the near-cache.

use std::{sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value, aio::MultiplexedConnection};
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, info, warn};

use super::{Change, NearCache, NearCacheMetrics};
use crate::config::{NearCacheConfig, RedisConfig};

/// CLIENT SETNAME of each gateway's subscriber connection.
pub const SUBSCRIBER_NAME: &str = "cachegw-l1";
/// CLIENT SETNAME of each gateway's publisher connection.
pub const PUBLISHER_NAME: &str = "cachegw-l1-pub";

/// Version byte of the messages (a gateway ignores versions it does not know).
const VERSION: u8 = 1;
const KIND_KEYS: u8 = 1;
const KIND_NAMESPACE: u8 = 2;

/// Longest pause between attempts to resubscribe.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The Redis clients the bus connects with, tried in order: `redis` as the
/// store would reach it (TLS included, [`crate::tls::redis_client_for`]),
/// speaking RESP3; on a cluster, one per seed node (a cluster delivers a
/// PUBLISH to subscribers on every node, so any node that answers will do).
pub fn client(redis: &RedisConfig) -> redis::RedisResult<Vec<redis::Client>> {
    redis
        .seeds()
        .map(|url| {
            let separator = if url.contains('?') { '&' } else { '?' };
            crate::tls::redis_client_for(redis, &format!("{url}{separator}protocol=resp3"))
        })
        .collect()
}

/// Announces this gateway's changes on the channel.
pub struct Bus {
    /// Tried in order until one connects.
    clients: Vec<redis::Client>,
    channel: String,
    /// Tells our own messages apart when they come back.
    origin: u64,
    timeouts: AsyncConnectionConfig,
    /// Bound on one publish (connecting included).
    publish_timeout: Duration,
    publisher: Mutex<Option<MultiplexedConnection>>,
}

impl Bus {
    /// Publishes `change`; a failure is counted and logged: the other
    /// gateways keep what they hold until their near TTL ends (at most
    /// `near_cache.max_ttl`), unless their subscription drops first.
    pub(super) async fn publish(&self, change: &Change, metrics: &NearCacheMetrics) {
        let payload = encode(self.origin, change);
        let published = tokio::time::timeout(self.publish_timeout, self.send(&payload)).await;
        match published {
            Ok(Ok(())) => metrics.published(true),
            Ok(Err(err)) => {
                metrics.published(false);
                warn!(namespace = change.namespace(), cause = %err, "near cache: cannot announce a change");
            }
            Err(_) => {
                metrics.published(false);
                warn!(namespace = change.namespace(), timeout = ?self.publish_timeout, "near cache: announcing a change timed out");
            }
        }
    }

    async fn send(&self, payload: &[u8]) -> redis::RedisResult<()> {
        // Concurrent publishes share (and pipeline on) one connection; the
        // lock is held only to clone it, or to replace a broken one.
        let mut connection = self.connection().await?;
        match publish(&mut connection, &self.channel, payload).await {
            Ok(()) => Ok(()),
            Err(_) => {
                // One retry on a fresh connection: the old one may have been
                // dropped by Redis (a restart, CLIENT KILL) since last used.
                self.publisher.lock().await.take();
                let mut connection = self.connection().await?;
                publish(&mut connection, &self.channel, payload).await
            }
        }
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut publisher = self.publisher.lock().await;
        if let Some(connection) = publisher.as_ref() {
            return Ok(connection.clone());
        }
        let connection = named(&self.clients, &self.timeouts, PUBLISHER_NAME).await?;
        *publisher = Some(connection.clone());
        Ok(connection)
    }
}

async fn publish(
    connection: &mut MultiplexedConnection,
    channel: &str,
    payload: &[u8],
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .exec_async(connection)
        .await
}

/// A named connection through the first of `clients` that answers.
async fn named(
    clients: &[redis::Client],
    config: &AsyncConnectionConfig,
    name: &str,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut last = None;
    for client in clients {
        match named_one(client, config, name).await {
            Ok(connection) => return Ok(connection),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
    }))
}

async fn named_one(
    client: &redis::Client,
    config: &AsyncConnectionConfig,
    name: &str,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut connection = client
        .get_multiplexed_async_connection_with_config(config)
        .await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .exec_async(&mut connection)
        .await?;
    Ok(connection)
}

/// Connects `near` to the fleet: starts the subscriber task (the near-cache
/// serves once it is subscribed) and attaches the publisher.
pub fn start(
    near: Arc<NearCache>,
    clients: Vec<redis::Client>,
    config: &NearCacheConfig,
    redis: &RedisConfig,
) {
    let timeouts = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(redis.connect_timeout))
        .set_response_timeout(Some(redis.response_timeout));
    let bus = Arc::new(Bus {
        clients,
        channel: config.channel.clone(),
        origin: rand::random(),
        timeouts,
        publish_timeout: redis.connect_timeout + redis.response_timeout,
        publisher: Mutex::new(None),
    });
    near.attach(Arc::clone(&bus));
    let heartbeat = config.heartbeat;
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            let cause = subscribed(&near, &bus, heartbeat).await;
            if near.suspend() {
                warn!(cause = %cause, "near cache dropped: its invalidation subscription was lost; reads go to the store until it is back");
                backoff = Duration::from_millis(50);
            } else {
                debug!(cause = %cause, "near cache: still not subscribed");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

/// Subscribes, serves the near-cache while the subscription lives, and
/// returns why it ended.
async fn subscribed(near: &NearCache, bus: &Bus, heartbeat: Duration) -> String {
    let (sender, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
    let config = bus.timeouts.clone().set_push_sender(sender);
    let mut connection = match named(&bus.clients, &config, SUBSCRIBER_NAME).await {
        Ok(connection) => connection,
        Err(err) => return format!("cannot connect: {err}"),
    };
    if let Err(err) = connection.subscribe(&bus.channel).await {
        return format!("cannot subscribe to {}: {err}", bus.channel);
    }
    // Subscribed before resuming: a change published from here on reaches
    // us, and whatever we missed before is gone with the clear.
    near.resume();
    info!(channel = %bus.channel, "near cache subscribed and serving");
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                None => return "the connection closed".to_owned(),
                Some(PushInfo { kind: PushKind::Disconnection, .. }) => {
                    return "the connection was lost".to_owned();
                }
                Some(PushInfo { kind: PushKind::Message, data, .. }) => {
                    let message = data.get(1).ok_or("no payload").and_then(payload).and_then(decode);
                    match message {
                        Ok((origin, _)) if origin == bus.origin => {}
                        Ok((_, change)) => near.apply_announced(&change).await,
                        Err(reason) => warn!(reason, "near cache: ignoring an undecodable message"),
                    }
                }
                Some(_) => {}
            },
            _ = ticks.tick() => {
                let ping = redis::cmd("PING").exec_async(&mut connection).await;
                if let Err(err) = ping {
                    return format!("PING failed: {err}");
                }
            }
        }
    }
}

fn payload(value: &Value) -> Result<&[u8], &'static str> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        _ => Err("the payload is not a bulk string"),
    }
}

/// A message: version, origin, kind, the namespace behind its u16 length,
/// then (for keys) each key behind its u32 length. Big-endian throughout.
fn encode(origin: u64, change: &Change) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(VERSION);
    out.put_u64(origin);
    let namespace = change.namespace().as_bytes();
    out.put_u8(match change {
        Change::Keys { .. } => KIND_KEYS,
        Change::Namespace(_) => KIND_NAMESPACE,
    });
    // Namespace names are checked to be short; see `namespace_prefix`.
    out.put_u16(u16::try_from(namespace.len()).unwrap_or(u16::MAX));
    out.put_slice(namespace);
    if let Change::Keys { keys, .. } = change {
        for key in keys {
            out.put_u32(u32::try_from(key.len()).unwrap_or(u32::MAX));
            out.put_slice(key);
        }
    }
    out.freeze()
}

fn decode(mut bytes: &[u8]) -> Result<(u64, Change), &'static str> {
    fn take<'a>(bytes: &mut &'a [u8], len: usize) -> Result<&'a [u8], &'static str> {
        if bytes.len() < len {
            return Err("truncated");
        }
        let (head, rest) = bytes.split_at(len);
        *bytes = rest;
        Ok(head)
    }
    let header = take(&mut bytes, 1 + 8 + 1 + 2)?;
    if header[0] != VERSION {
        return Err("unknown version");
    }
    let origin = u64::from_be_bytes(header[1..9].try_into().map_err(|_| "truncated")?);
    let kind = header[9];
    let namespace_len = usize::from(u16::from_be_bytes([header[10], header[11]]));
    let namespace = std::str::from_utf8(take(&mut bytes, namespace_len)?)
        .map_err(|_| "the namespace is not UTF-8")?;
    let namespace: Arc<str> = Arc::from(namespace);
    let change = match kind {
        KIND_NAMESPACE => Change::Namespace(namespace),
        KIND_KEYS => {
            let mut keys = Vec::new();
            while !bytes.is_empty() {
                let len = take(&mut bytes, 4)?;
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                keys.push(Bytes::copy_from_slice(take(&mut bytes, len)?));
            }
            Change::Keys { namespace, keys }
        }
        _ => return Err("unknown kind"),
    };
    Ok((origin, change))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let changes = [
            Change::Keys {
                namespace: Arc::from("orders"),
                keys: vec![
                    Bytes::from_static(b"a"),
                    Bytes::new(),
                    Bytes::from(vec![0xFF; 300]),
                ],
            },
            Change::Namespace(Arc::from("orders")),
        ];
        for change in changes {
            let bytes = encode(42, &change);
            assert_eq!(decode(&bytes), Ok((42, change)));
            assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        }
        assert_eq!(decode(b""), Err("truncated"));
        let mut unknown = encode(1, &Change::Namespace(Arc::from("n"))).to_vec();
        unknown[0] = 9;
        assert_eq!(decode(&unknown), Err("unknown version"));
    }
}
