//! Fleet synchronisation through Redis: every gateway sharing a Redis
//! converges on the same policy versions and namespace bindings.
//!
//! - Modules live in the hash `cachegw:policy:modules` (version -> bytes) and
//!   their names in `cachegw:policy:names`; the active binding of each
//!   namespace in `cachegw:policy:bindings` (namespace -> JSON record). The
//!   `cachegw:` prefix cannot collide with cache entries (all `cg:`).
//! - A gateway that changes a binding (admin API, automatic rollback) writes
//!   the record and publishes on `cachegw:policy:events`; every gateway
//!   subscribed re-reads the records and applies what differs, validating
//!   each module as an upload would be.
//! - A gateway that starts later, or missed a message (Redis restarted, a
//!   connection dropped), catches up: it syncs at start and every
//!   `resync_interval`, whatever the channel says.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use deadpool_redis::redis::{self, AsyncCommands};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::{PolicyRegistry, registry::CandidateKind};
use crate::config::FallbackMode;

const MODULES: &str = "cachegw:policy:modules";
const NAMES: &str = "cachegw:policy:names";
const BINDINGS: &str = "cachegw:policy:bindings";
const EVENTS: &str = "cachegw:policy:events";
/// The name the sync connection shows in `CLIENT LIST`.
pub const CLIENT_NAME: &str = "cachegw-policy-sync";

/// The connection for the records: to the Redis, or to the whole cluster.
type Connection = crate::store::batch::Handle;

async fn named(config: &crate::config::RedisConfig) -> redis::RedisResult<Connection> {
    crate::store::connect(config, CLIENT_NAME).await
}

/// A pub/sub connection: to the Redis, or to the first cluster seed that
/// answers (a cluster delivers a PUBLISH to subscribers on every node).
async fn subscriber(config: &crate::config::RedisConfig) -> redis::RedisResult<redis::aio::PubSub> {
    let mut last = None;
    for seed in config.seeds() {
        match crate::tls::redis_client_for(config, seed) {
            Ok(client) => match client.get_async_pubsub().await {
                Ok(pubsub) => return Ok(pubsub),
                Err(err) => last = Some(err),
            },
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
    }))
}

/// How often a gateway re-reads the fleet's bindings even without a message.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A namespace's binding as the fleet stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BindingRecord {
    version: String,
    config: String,
    fail_closed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<CandidateRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shadow: Option<CandidateRecord>,
}

/// A canary or shadow candidate as the fleet stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CandidateRecord {
    version: String,
    config: String,
    fail_closed: bool,
    basis_points: u32,
}

impl CandidateRecord {
    fn of(binding: &super::Binding, basis_points: u32) -> Self {
        Self {
            version: binding.module().version().to_owned(),
            config: String::from_utf8_lossy(binding.config()).into_owned(),
            fail_closed: binding.fallback() == FallbackMode::FailClosed,
            basis_points,
        }
    }
}

fn fallback_of(fail_closed: bool) -> FallbackMode {
    if fail_closed {
        FallbackMode::FailClosed
    } else {
        FallbackMode::FailOpen
    }
}

/// Local changes to publish: a module uploaded, or a namespace re-bound.
#[derive(Debug, Clone)]
pub enum Change {
    /// A module version accepted here.
    Module {
        /// Its version.
        version: String,
        /// Its name.
        name: String,
        /// Its bytes.
        bytes: Bytes,
    },
    /// A namespace whose active binding changed here.
    Binding(String),
}

/// The sending half given to the registry and the admin API.
pub type ChangeSender = mpsc::UnboundedSender<Change>;

/// Catches up with the fleet (bounded by `catch_up`, so a down Redis does
/// not hold start-up), then keeps `registry` in sync in a background task.
/// Local changes are published through the registry from then on.
pub async fn start(
    registry: Arc<PolicyRegistry>,
    redis_config: &crate::config::RedisConfig,
    catch_up: Duration,
) -> Result<(), redis::RedisError> {
    // Fails here on a URL that cannot work, before anything is spawned.
    crate::tls::redis_client(redis_config)?;
    let redis_config = redis_config.clone();
    // Redis round trips are bounded by the store's timeouts; compiling the
    // modules caught up with (local CPU) by `catch_up`.
    let first = async {
        let mut connection = named(&redis_config).await?;
        pull(&registry, &mut connection).await
    };
    match tokio::time::timeout(catch_up, first).await {
        Ok(Ok(())) => info!("policy bindings caught up with the fleet"),
        Ok(Err(err)) => warn!(cause = %err, "policy sync: cannot catch up at start; will retry"),
        Err(_) => warn!(?catch_up, "policy sync: catching up timed out; will retry"),
    }
    let (changes, mut local) = mpsc::unbounded_channel::<Change>();
    registry.publish_to(changes);
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        loop {
            let Ok(mut connection) = named(&redis_config).await else {
                debug!("policy sync: Redis unreachable, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let mut events = match subscriber(&redis_config).await {
                Ok(mut pubsub) => match pubsub.subscribe(EVENTS).await {
                    Ok(()) => pubsub.into_on_message(),
                    Err(err) => {
                        warn!(cause = %err, "policy sync: cannot subscribe");
                        continue;
                    }
                },
                Err(err) => {
                    warn!(cause = %err, "policy sync: no pub/sub connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Subscribed first, then read: nothing published in between is lost.
            if let Err(err) = pull(&registry, &mut connection).await {
                warn!(cause = %err, "policy sync failed");
            }
            loop {
                tokio::select! {
                    change = local.recv() => {
                        let Some(change) = change else { return };
                        if let Err(err) = push(&registry, &mut connection, change).await {
                            warn!(cause = %err, "policy sync: cannot publish a change");
                            break;
                        }
                    }
                    message = events.next() => {
                        if message.is_none() {
                            warn!("policy sync: pub/sub connection lost; reconnecting");
                            break;
                        }
                        if let Err(err) = pull(&registry, &mut connection).await {
                            warn!(cause = %err, "policy sync failed");
                        }
                    }
                    _ = resync.tick() => {
                        if let Err(err) = pull(&registry, &mut connection).await {
                            warn!(cause = %err, "policy sync failed");
                            break;
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// Writes a local change to Redis and tells the fleet.
async fn push(
    registry: &PolicyRegistry,
    connection: &mut Connection,
    change: Change,
) -> redis::RedisResult<()> {
    match change {
        Change::Module {
            version,
            name,
            bytes,
        } => {
            // Two keys (two slots on a cluster): the module first, so a name
            // never points at a module that is not there.
            let _: () = connection.hset(MODULES, &version, bytes.as_ref()).await?;
            let _: () = connection.hset(NAMES, &version, &name).await?;
        }
        Change::Binding(namespace) => {
            let Some(binding) = registry.active(&namespace) else {
                let _: () = connection.hdel(BINDINGS, &namespace).await?;
                return Ok(());
            };
            let candidates = registry.candidates(&namespace);
            let candidates = candidates.as_deref();
            let record = BindingRecord {
                version: binding.module().version().to_owned(),
                config: String::from_utf8_lossy(binding.config()).into_owned(),
                fail_closed: binding.fallback() == FallbackMode::FailClosed,
                canary: candidates
                    .and_then(|c| c.canary.as_ref())
                    .map(|c| CandidateRecord::of(&c.binding, c.basis_points)),
                shadow: candidates
                    .and_then(|c| c.shadow.as_ref())
                    .map(|s| CandidateRecord::of(&s.binding, s.basis_points)),
            };
            let record = serde_json::to_string(&record).unwrap_or_default();
            let _: () = connection.hset(BINDINGS, &namespace, record).await?;
            let _: () = connection.publish(EVENTS, &namespace).await?;
        }
    }
    Ok(())
}

/// Runs blocking registry work (compiling, validating) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> redis::RedisResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| redis::RedisError::from(std::io::Error::other(err.to_string())))
}

/// Makes sure `version` is loaded here, fetching and validating it from Redis
/// if need be. False (logged) when it cannot be.
async fn ensure_loaded(
    registry: &Arc<PolicyRegistry>,
    connection: &mut Connection,
    namespace: &str,
    version: &str,
) -> redis::RedisResult<bool> {
    if registry.version(version).is_ok() {
        return Ok(true);
    }
    let (bytes, name): (Option<Vec<u8>>, Option<String>) = (
        connection.hget(MODULES, version).await?,
        connection.hget(NAMES, version).await?,
    );
    let Some(bytes) = bytes else {
        warn!(namespace, version, "policy sync: module missing from Redis");
        return Ok(false);
    };
    let name = name.unwrap_or_else(|| "policy".to_owned());
    let registry = Arc::clone(registry);
    match blocking(move || registry.put(&name, &bytes, "redis")).await? {
        Ok(_) => Ok(true),
        Err(err) => {
            warn!(namespace, version, "policy sync: {err}");
            Ok(false)
        }
    }
}

/// Applies every fleet binding that differs from the local one.
async fn pull(
    registry: &Arc<PolicyRegistry>,
    connection: &mut Connection,
) -> redis::RedisResult<()> {
    let records: Vec<(String, String)> = connection.hgetall(BINDINGS).await?;
    for (namespace, record) in records {
        let Ok(record) = serde_json::from_str::<BindingRecord>(&record) else {
            warn!(namespace, "policy sync: unreadable binding record; skipped");
            continue;
        };
        let fallback = if record.fail_closed {
            FallbackMode::FailClosed
        } else {
            FallbackMode::FailOpen
        };
        let config = Bytes::from(record.config.clone().into_bytes());
        if !registry.is_active(&namespace, &record.version, &config, fallback) {
            if !ensure_loaded(registry, connection, &namespace, &record.version).await? {
                continue;
            }
            let registry = Arc::clone(registry);
            let (ns, version) = (namespace.clone(), record.version.clone());
            let bound =
                blocking(move || registry.bind_synced(&ns, &version, config, fallback)).await?;
            match bound {
                Ok(_) => info!(
                    namespace,
                    version = record.version,
                    "policy binding synced from the fleet"
                ),
                Err(err) => {
                    warn!(namespace, version = record.version, "policy sync: {err}");
                    continue;
                }
            }
        }
        for (kind, wanted) in [
            (CandidateKind::Canary, record.canary.clone()),
            (CandidateKind::Shadow, record.shadow.clone()),
        ] {
            let local = registry.candidates(&namespace).and_then(|c| match kind {
                CandidateKind::Canary => c
                    .canary
                    .as_ref()
                    .map(|c| CandidateRecord::of(&c.binding, c.basis_points)),
                CandidateKind::Shadow => c
                    .shadow
                    .as_ref()
                    .map(|s| CandidateRecord::of(&s.binding, s.basis_points)),
            });
            if local == wanted {
                continue;
            }
            let wanted = wanted.unwrap_or(CandidateRecord {
                version: String::new(),
                config: String::new(),
                fail_closed: false,
                basis_points: 0,
            });
            if wanted.basis_points > 0
                && !ensure_loaded(registry, connection, &namespace, &wanted.version).await?
            {
                continue;
            }
            let registry = Arc::clone(registry);
            let ns = namespace.clone();
            let applied = blocking(move || {
                registry.bind_candidate_synced(
                    &ns,
                    &wanted.version,
                    Bytes::from(wanted.config.into_bytes()),
                    fallback_of(wanted.fail_closed),
                    kind,
                    wanted.basis_points,
                )
            })
            .await?;
            if let Err(err) = applied {
                warn!(namespace, ?kind, "policy sync: {err}");
            }
        }
    }
    Ok(())
}
