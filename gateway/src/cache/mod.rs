//! The read and write paths.
//!
//! Requests arrive here as validated commands (the API layer converted them
//! from protobuf). For each one the cache resolves the namespace, checks the
//! configured limits, asks the policy for a [`Decision`], scopes the decided
//! key under the namespace and talks to the [`Store`] within the request's
//! time budget. A store that cannot answer in time yields a *degraded* answer
//! (a MISS, or "not stored"), never an error: callers fall back to their
//! origin, exactly as they would on a miss.

mod envelope;
mod error;
mod metrics;
mod namespace;

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes, BytesMut};
use tracing::warn;

pub use self::envelope::{Envelope, EnvelopeError, MAX_CONTENT_TYPE_BYTES};
pub use self::error::RequestError;
pub use self::metrics::CacheMetrics;
pub use self::namespace::{NamespaceSettings, Namespaces, validate_namespace_name};
use crate::{
    config::Config,
    policy::{Decision, DefaultPolicy},
    store::{StorageKey, Store, StoreError, WriteEntry},
};

/// Request context a policy may vary on.
pub type Attributes = HashMap<String, String>;

/// A validated Get.
#[derive(Debug, Clone)]
pub struct GetCommand {
    /// Namespace name (syntax already checked).
    pub namespace: String,
    /// Non-empty key.
    pub key: String,
    /// Request context.
    pub attributes: Attributes,
}

/// A validated Set.
#[derive(Debug, Clone)]
pub struct SetCommand {
    /// Namespace name (syntax already checked).
    pub namespace: String,
    /// Non-empty key.
    pub key: String,
    /// The bytes to store.
    pub value: Bytes,
    /// Media type to store with the value (may be empty).
    pub content_type: String,
    /// Request context.
    pub attributes: Attributes,
}

/// A validated Delete.
#[derive(Debug, Clone)]
pub struct DeleteCommand {
    /// Namespace name (syntax already checked).
    pub namespace: String,
    /// Non-empty key.
    pub key: String,
    /// Request context.
    pub attributes: Attributes,
}

/// What a Get found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A fresh entry.
    Hit,
    /// No usable entry.
    Miss,
    /// An entry past its fresh TTL, inside its stale window.
    Stale,
}

/// The answer to a Get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult {
    /// Hit, miss or stale.
    pub outcome: Outcome,
    /// The stored value (empty on a miss).
    pub value: Bytes,
    /// Time left until the entry stops being fresh.
    pub ttl_remaining: Duration,
    /// The stored content type.
    pub content_type: String,
    /// The store could not answer in time: this miss is made up.
    pub degraded: bool,
}

impl GetResult {
    fn miss(degraded: bool) -> Self {
        GetResult {
            outcome: Outcome::Miss,
            value: Bytes::new(),
            ttl_remaining: Duration::ZERO,
            content_type: String::new(),
            degraded,
        }
    }
}

/// The answer to a Set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetResult {
    /// The entry was written.
    pub stored: bool,
    /// Its fresh TTL.
    pub ttl: Duration,
    /// The store could not answer in time: nothing was written.
    pub degraded: bool,
}

/// The answer to a Delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteResult {
    /// An entry existed and was removed.
    pub deleted: bool,
    /// The store could not answer in time: nothing was removed.
    pub degraded: bool,
}

/// The gateway's cache: namespaces, limits, policy and store together.
pub struct Cache {
    store: Arc<dyn Store>,
    namespaces: Namespaces,
    policy: DefaultPolicy,
    max_key_bytes: usize,
    max_batch_items: usize,
    store_timeout: Duration,
    metrics: CacheMetrics,
}

impl Cache {
    /// Builds the cache over `store` with the limits and namespaces of `config`.
    pub fn new(config: &Config, store: Arc<dyn Store>, metrics: CacheMetrics) -> Self {
        Cache {
            store,
            namespaces: Namespaces::from_config(config),
            policy: DefaultPolicy,
            max_key_bytes: config.limits.max_key_bytes,
            max_batch_items: config.limits.max_batch_items,
            store_timeout: config.server.store_timeout,
            metrics,
        }
    }

    /// The store's name (`redis`, `memory`).
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Reads one entry. `deadline` is the client's remaining time, if it set one.
    pub async fn get(
        &self,
        command: GetCommand,
        deadline: Option<Duration>,
    ) -> Result<GetResult, RequestError> {
        let planned = self
            .plan_read(&command.namespace, &command.key)
            .inspect_err(|_| self.metrics.rejected("get"))?;
        let result = match self.bounded(deadline, self.store.get(&planned.key)).await {
            Ok(stored) => self.read_entry(stored, &planned.namespace),
            Err(err) => self.degraded("get", &planned.namespace, &err, GetResult::miss(true)),
        };
        self.metrics.get_outcome(&planned.namespace, &result);
        Ok(result)
    }

    /// Writes one entry.
    pub async fn set(
        &self,
        command: SetCommand,
        deadline: Option<Duration>,
    ) -> Result<SetResult, RequestError> {
        let planned = self
            .plan_write(&command)
            .inspect_err(|_| self.metrics.rejected("set"))?;
        let ttl = planned.decision.fresh_ttl;
        let result = match self.bounded(deadline, self.store.set(planned.entry)).await {
            Ok(()) => SetResult {
                stored: true,
                ttl,
                degraded: false,
            },
            Err(err) => self.degraded("set", &planned.namespace, &err, Self::not_stored(ttl)),
        };
        self.metrics
            .write_outcome("set", &planned.namespace, result.stored, result.degraded);
        Ok(result)
    }

    /// Removes one entry.
    pub async fn delete(
        &self,
        command: DeleteCommand,
        deadline: Option<Duration>,
    ) -> Result<DeleteResult, RequestError> {
        let planned = self
            .plan_read(&command.namespace, &command.key)
            .inspect_err(|_| self.metrics.rejected("delete"))?;
        let result = match self
            .bounded(deadline, self.store.delete(&planned.key))
            .await
        {
            Ok(deleted) => DeleteResult {
                deleted,
                degraded: false,
            },
            Err(err) => self.degraded(
                "delete",
                &planned.namespace,
                &err,
                DeleteResult {
                    deleted: false,
                    degraded: true,
                },
            ),
        };
        self.metrics.write_outcome(
            "delete",
            &planned.namespace,
            result.deleted,
            result.degraded,
        );
        Ok(result)
    }

    /// Reads many entries with one store round trip. Each item is validated
    /// on its own; results are in request order.
    pub async fn get_many(
        &self,
        commands: Vec<Result<GetCommand, RequestError>>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Result<GetResult, RequestError>>, RequestError> {
        self.check_batch(commands.len())?;
        let plans: Vec<Result<ReadPlan, RequestError>> = commands
            .into_iter()
            .map(|command| command.and_then(|c| self.plan_read(&c.namespace, &c.key)))
            .collect();
        let keys: Vec<StorageKey> = plans
            .iter()
            .filter_map(|plan| plan.as_ref().ok().map(|plan| plan.key.clone()))
            .collect();
        let mut stored = match self.bounded(deadline, self.store.get_many(&keys)).await {
            Ok(values) => Ok(values.into_iter()),
            Err(err) => Err(err),
        };
        let mut results = Vec::with_capacity(plans.len());
        for plan in plans {
            let plan = match plan {
                Ok(plan) => plan,
                Err(err) => {
                    self.metrics.rejected("get");
                    results.push(Err(err));
                    continue;
                }
            };
            let result = match &mut stored {
                Ok(values) => self.read_entry(values.next().flatten(), &plan.namespace),
                Err(err) => self.degraded("get", &plan.namespace, err, GetResult::miss(true)),
            };
            self.metrics.get_outcome(&plan.namespace, &result);
            results.push(Ok(result));
        }
        Ok(results)
    }

    /// Writes many entries with one store round trip. Each item is validated
    /// on its own; results are in request order.
    pub async fn set_many(
        &self,
        commands: Vec<Result<SetCommand, RequestError>>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Result<SetResult, RequestError>>, RequestError> {
        self.check_batch(commands.len())?;
        let mut plans = Vec::with_capacity(commands.len());
        let mut entries = Vec::new();
        for command in commands {
            match command.and_then(|command| self.plan_write(&command)) {
                Ok(plan) => {
                    entries.push(plan.entry);
                    plans.push(Ok((plan.namespace, plan.decision.fresh_ttl)));
                }
                Err(err) => plans.push(Err(err)),
            }
        }
        let written = self.bounded(deadline, self.store.set_many(entries)).await;
        let results = plans
            .into_iter()
            .map(|plan| {
                let (namespace, ttl) = plan.inspect_err(|_| self.metrics.rejected("set"))?;
                let result = match &written {
                    Ok(()) => SetResult {
                        stored: true,
                        ttl,
                        degraded: false,
                    },
                    Err(err) => self.degraded("set", &namespace, err, Self::not_stored(ttl)),
                };
                self.metrics
                    .write_outcome("set", &namespace, result.stored, result.degraded);
                Ok(result)
            })
            .collect();
        Ok(results)
    }

    fn check_batch(&self, items: usize) -> Result<(), RequestError> {
        if items > self.max_batch_items {
            self.metrics.rejected("batch");
            return Err(RequestError::TooLarge {
                field: "items",
                reason: format!(
                    "{items} items exceed the limit of {} (limits.max_batch_items)",
                    self.max_batch_items
                ),
            });
        }
        Ok(())
    }

    fn plan_read(&self, namespace: &str, key: &str) -> Result<ReadPlan, RequestError> {
        let settings = self.namespaces.resolve(namespace)?;
        self.check_key(key)?;
        let decision = self.policy.decide(settings, key);
        Ok(ReadPlan {
            key: scoped_key(namespace, &decision.key),
            namespace: settings.label(),
        })
    }

    fn plan_write(&self, command: &SetCommand) -> Result<WritePlan, RequestError> {
        let settings = self.namespaces.resolve(&command.namespace)?;
        self.check_key(&command.key)?;
        if command.value.len() > settings.max_value_bytes {
            return Err(RequestError::TooLarge {
                field: "value",
                reason: format!(
                    "{} bytes exceed namespace `{}`'s limit of {} bytes (max_value_bytes)",
                    command.value.len(),
                    command.namespace,
                    settings.max_value_bytes
                ),
            });
        }
        if command.content_type.len() > MAX_CONTENT_TYPE_BYTES {
            return Err(RequestError::TooLarge {
                field: "content_type",
                reason: format!(
                    "{} bytes exceed the limit of {MAX_CONTENT_TYPE_BYTES} bytes",
                    command.content_type.len()
                ),
            });
        }
        let decision = self.policy.decide(settings, &command.key);
        let now = unix_millis();
        let fresh_until = now.saturating_add(millis(decision.fresh_ttl));
        let envelope = Envelope {
            created_at_ms: now,
            fresh_until_ms: fresh_until,
            stale_until_ms: fresh_until.saturating_add(millis(decision.stale_window)),
            content_type: command.content_type.clone(),
            compressed: false,
            value: command.value.clone(),
        };
        let entry = WriteEntry {
            key: scoped_key(&command.namespace, &decision.key),
            value: envelope.encode(),
            expire_after: decision.fresh_ttl + decision.stale_window,
        };
        Ok(WritePlan {
            namespace: settings.label(),
            decision,
            entry,
        })
    }

    fn check_key(&self, key: &str) -> Result<(), RequestError> {
        if key.is_empty() {
            return Err(RequestError::invalid("key", "must not be empty"));
        }
        if key.len() > self.max_key_bytes {
            return Err(RequestError::invalid(
                "key",
                format!(
                    "{} bytes exceed the limit of {} bytes (limits.max_key_bytes)",
                    key.len(),
                    self.max_key_bytes
                ),
            ));
        }
        Ok(())
    }

    fn read_entry(&self, stored: Option<Bytes>, namespace: &MetricNamespace) -> GetResult {
        let Some(bytes) = stored else {
            return GetResult::miss(false);
        };
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) if !envelope.compressed => envelope,
            Ok(_) => {
                self.metrics.envelope_error(namespace, "compressed");
                warn!(namespace = %namespace, "entry is compressed, which this gateway cannot read");
                return GetResult::miss(false);
            }
            Err(err) => {
                self.metrics.envelope_error(namespace, "undecodable");
                warn!(namespace = %namespace, cause = %err, "stored entry is not a valid envelope");
                return GetResult::miss(false);
            }
        };
        let now = unix_millis();
        let outcome = if now < envelope.fresh_until_ms {
            Outcome::Hit
        } else if now < envelope.stale_until_ms {
            Outcome::Stale
        } else {
            return GetResult::miss(false);
        };
        GetResult {
            outcome,
            ttl_remaining: Duration::from_millis(envelope.fresh_until_ms.saturating_sub(now)),
            value: envelope.value,
            content_type: envelope.content_type,
            degraded: false,
        }
    }

    /// Runs a store call within the request's budget: the configured store
    /// timeout, or (a little less than) the client's deadline if that is sooner.
    async fn bounded<T>(
        &self,
        deadline: Option<Duration>,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Keep a little of the client's time for answering: a degraded answer
        // that arrives after the deadline is no answer at all.
        let budget = deadline.map_or(self.store_timeout, |deadline| {
            let reserve =
                (deadline / 10).clamp(Duration::from_millis(1), Duration::from_millis(20));
            deadline.saturating_sub(reserve).min(self.store_timeout)
        });
        tokio::time::timeout(budget, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(budget)))
    }

    fn degraded<T>(
        &self,
        op: &'static str,
        namespace: &MetricNamespace,
        err: &StoreError,
        answer: T,
    ) -> T {
        self.metrics.store_error(self.store.name(), err);
        warn!(op, namespace = %namespace, store = self.store.name(), cause = %err, "store unavailable, answering degraded");
        answer
    }

    fn not_stored(ttl: Duration) -> SetResult {
        SetResult {
            stored: false,
            ttl,
            degraded: true,
        }
    }
}

/// The namespace label used in metrics and logs: declared namespaces by name,
/// every undeclared one as `_default` (so metric cardinality stays bounded).
type MetricNamespace = Arc<str>;

struct ReadPlan {
    key: StorageKey,
    namespace: MetricNamespace,
}

struct WritePlan {
    namespace: MetricNamespace,
    decision: Decision,
    entry: WriteEntry,
}

/// The store key for `key` in `namespace`: `cg:{namespace}:{key}`.
///
/// Namespace names cannot contain `:`, so the prefix is unambiguous and the key
/// is appended byte for byte: distinct (namespace, key) pairs never collide,
/// whatever characters the key holds.
fn scoped_key(namespace: &str, key: &str) -> StorageKey {
    let mut out = BytesMut::with_capacity(4 + namespace.len() + key.len());
    out.put_slice(b"cg:");
    out.put_slice(namespace.as_bytes());
    out.put_u8(b':');
    out.put_slice(key.as_bytes());
    StorageKey::from_scoped(out.freeze())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| millis(elapsed))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_keys_keep_every_character_and_never_collide() {
        let awkward = [
            "a", "a:b", "a*", "a?", "[a]", "a\\b", "a b", "a\nb", "ключ", "a:",
        ];
        let mut seen = std::collections::HashSet::new();
        for namespace in ["users", "users.v2"] {
            for key in awkward {
                let scoped = scoped_key(namespace, key);
                assert!(scoped.as_bytes().ends_with(key.as_bytes()));
                assert!(seen.insert(scoped), "collision for {namespace}/{key}");
            }
        }
    }
}
