//! The read and write paths.
//!
//! Requests arrive here as validated commands (the API layer converted them
//! from protobuf). For each one the cache resolves the namespace, checks the
//! configured limits, asks the policy for a [`Decision`], scopes the decided
//! key under the namespace and talks to the [`Store`] within the request's
//! time budget. A store that cannot answer in time yields a *degraded* answer
//! (a MISS, or "not stored"), never an error: callers fall back to their
//! origin, exactly as they would on a miss.

pub mod envelope;
mod error;
mod invalidation;
mod lease;
mod metrics;
mod namespace;
mod near;

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tracing::warn;

use self::envelope::Times;
pub use self::envelope::{
    Envelope, EnvelopeError, MAX_CONTENT_TYPE_BYTES, MAX_TAG_BYTES, MAX_TAG_SECTION_BYTES,
};
pub use self::error::RequestError;
pub use self::invalidation::{InvalidateCommand, InvalidationJobs, JobSnapshot, JobState, Target};
use self::lease::{Fills, Freshness};
pub use self::lease::{LeaseAsk, LeaseState, LeaseWrite, ReleaseCommand};
pub use self::metrics::CacheMetrics;
use self::metrics::GetTally;
pub use self::namespace::{NamespaceSettings, Namespaces, validate_namespace_name};
use self::near::Ticket;
pub use self::near::{Change, NearCache, bus as near_bus};
use crate::{
    config::Config,
    policy::{
        Compression, Decider, Decision, DecisionBatch, DecisionLimits, DecisionRequest, Label,
        Operation, PolicyMetrics, PolicyRegistry,
    },
    store::{Fetched, StorageKey, Store, StoreError, WriteEntry, unix_millis},
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
    /// Serve an entry past its fresh TTL, inside its stale window.
    pub allow_stale: bool,
    /// The lease protocol, if the caller takes part.
    pub lease: Option<LeaseAsk>,
}

impl GetCommand {
    /// What its policy decides on.
    pub(crate) fn decision_request(&self) -> DecisionRequest<'_> {
        DecisionRequest {
            op: Operation::Get,
            namespace: &self.namespace,
            key: &self.key,
            attributes: &self.attributes,
            value_size: 0,
        }
    }
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
    /// The lease this write fills, if any.
    pub lease_token: Option<String>,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// Who decided how this request is cached.
    pub policy: Label,
    /// What became of the lease request.
    pub lease: LeaseState,
    /// With [`LeaseState::Granted`]: the token to fill with.
    pub lease_token: String,
}

impl GetResult {
    fn miss(degraded: bool, policy: Label) -> Self {
        GetResult {
            outcome: Outcome::Miss,
            value: Bytes::new(),
            ttl_remaining: Duration::ZERO,
            content_type: String::new(),
            degraded,
            policy,
            lease: LeaseState::NotRequested,
            lease_token: String::new(),
        }
    }
}

/// What the invalidations a write asked for did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidationReport {
    /// Entries removed.
    pub removed: u64,
    /// Why some of them could not run (empty when all ran).
    pub error: String,
}

/// The answer to a Set.
#[derive(Debug, Clone, PartialEq)]
pub struct SetResult {
    /// The entry was written.
    pub stored: bool,
    /// Its fresh TTL.
    pub ttl: Duration,
    /// The store could not answer in time: nothing was written.
    pub degraded: bool,
    /// Who decided how this request is cached.
    pub policy: Label,
    /// The decision's invalidations, run after the write.
    pub invalidation: InvalidationReport,
    /// What became of the lease token.
    pub lease: LeaseWrite,
}

/// The answer to a Delete.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteResult {
    /// An entry existed and was removed.
    pub deleted: bool,
    /// The store could not answer in time: nothing was removed.
    pub degraded: bool,
    /// Who decided how this request is cached.
    pub policy: Label,
    /// The decision's invalidations, run after the delete.
    pub invalidation: InvalidationReport,
}

/// The gateway's cache: namespaces, limits, policies and store together.
pub struct Cache {
    store: Arc<dyn Store>,
    namespaces: Namespaces,
    decider: Decider,
    max_key_bytes: usize,
    max_batch_items: usize,
    store_timeout: Duration,
    invalidation_timeout: Duration,
    jobs: InvalidationJobs,
    fills: Arc<Fills>,
    max_lease_ttl: Duration,
    max_lease_wait: Duration,
    metrics: CacheMetrics,
    /// The near-cache (L1), when `[near_cache]` turns it on.
    near: Option<Arc<NearCache>>,
}

/// A read that may use the near-cache: how long it may keep its entry, and
/// its ticket to fill it.
struct NearRead<'a> {
    near: &'a NearCache,
    ttl: Duration,
    ticket: Ticket,
}

impl Cache {
    /// Builds the cache over `store` with the limits of `config` and the
    /// already loaded `namespaces`.
    pub fn new(
        config: &Config,
        namespaces: Namespaces,
        registry: Arc<PolicyRegistry>,
        store: Arc<dyn Store>,
        metrics: CacheMetrics,
        policy_metrics: PolicyMetrics,
    ) -> Self {
        let limits = DecisionLimits {
            max_key_bytes: config.limits.max_key_bytes,
            max_ttl: config.policy.max_ttl,
            max_items: config.policy.max_decision_items,
        };
        Cache {
            store,
            namespaces,
            decider: Decider::new(registry, limits, policy_metrics, &config.policy),
            max_key_bytes: config.limits.max_key_bytes,
            max_batch_items: config.limits.max_batch_items,
            store_timeout: config.server.store_timeout,
            invalidation_timeout: config.policy.invalidation_timeout,
            jobs: InvalidationJobs::new(&config.invalidation),
            fills: Arc::default(),
            max_lease_ttl: config.limits.max_lease_ttl,
            max_lease_wait: config.limits.max_lease_wait,
            metrics,
            near: None,
        }
    }

    /// Puts `near` in front of the store for reads whose decision allows it.
    pub fn with_near_cache(mut self, near: Option<Arc<NearCache>>) -> Self {
        self.near = near;
        self
    }

    /// The near-cache read `plan` may make, if any: the decision asks for it
    /// and the near-cache is subscribed. The ticket is taken here, before
    /// the store is read.
    fn near_read(&self, plan: &Plan) -> Option<NearRead<'_>> {
        let near = self.near.as_deref()?;
        if plan.decision.bypass {
            return None;
        }
        let ttl = near.ttl_for(plan.decision.near_cache_ttl.duration())?;
        Some(NearRead {
            near,
            ttl,
            ticket: near.ticket()?,
        })
    }

    /// A fresh hit from the near-cache for `plan`, decoded exactly as a store
    /// hit would be; `None` sends the read to the store.
    async fn near_hit(&self, read: &NearRead<'_>, plan: &Plan) -> Option<(GetResult, Freshness)> {
        let fetched = read.near.lookup(&plan.key).await?;
        let found = self.read_entry(fetched, plan);
        // Only fresh entries are served from here: a stale one goes back to
        // the store, where the lease protocol sees the entry as it is.
        if found.0.outcome == Outcome::Hit {
            read.near.served();
            Some(found)
        } else {
            read.near.unserved();
            None
        }
    }

    /// Keeps a store read's fresh hit in the near-cache, for the near TTL but
    /// never past the entry's own freshness.
    async fn near_fill(read: &NearRead<'_>, key: &StorageKey, stored: &Fetched, found: &GetResult) {
        if found.outcome == Outcome::Hit && !found.degraded {
            let ttl = read.ttl.min(found.ttl_remaining);
            read.near.fill(key, stored, ttl, read.ticket).await;
        }
    }

    /// Drops what `change` covers from the near-caches of this gateway and,
    /// through the bus, of every other one. Called after the store
    /// acknowledged and before the client is answered.
    async fn announce(&self, change: Option<Change>) {
        if let (Some(near), Some(change)) = (&self.near, change) {
            near.changed(change).await;
        }
    }

    /// The store's name (`redis`, `memory`).
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// The namespaces this cache serves.
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Reads one entry, taking part in the lease protocol if asked to.
    /// `deadline` is the client's remaining time, if it set one.
    pub async fn get(
        &self,
        command: GetCommand,
        deadline: Option<Duration>,
    ) -> Result<GetResult, RequestError> {
        let plan = self
            .plan(command.decision_request(), None, Instant::now())
            .await
            .inspect_err(|_| self.metrics.rejected("get"))?;
        let ask = command
            .lease
            .map(|ask| self.check_lease_ask(ask))
            .transpose()
            .inspect_err(|_| self.metrics.rejected("get"))?;
        let near = self.near_read(&plan);
        let near_hit = match &near {
            Some(read) => self.near_hit(read, &plan).await,
            None => None,
        };
        let (found, freshness) = if plan.decision.bypass {
            let miss = GetResult::miss(false, plan.decision.decided_by);
            (miss, Freshness::default())
        } else if let Some(hit) = near_hit {
            hit
        } else {
            match self.bounded(deadline, self.store.get(&plan.key)).await {
                Ok(stored) => {
                    let found = self.read_entry(stored.clone(), &plan);
                    if let Some(read) = &near {
                        Self::near_fill(read, &plan.key, &stored, &found.0).await;
                    }
                    found
                }
                Err(err) => {
                    let miss = GetResult::miss(true, plan.decision.decided_by);
                    let miss = self.degraded("get", &plan.metric, &err, miss);
                    (miss, Freshness::default())
                }
            }
        };
        let result = match ask {
            Some(ask) if !found.degraded && !plan.decision.bypass => {
                self.lease(found, freshness, &plan, ask, command.allow_stale, deadline)
                    .await
            }
            _ => lease::without_stale(found, command.allow_stale),
        };
        self.metrics.get_outcome(
            &plan.metric,
            &result,
            plan.decision.bypass,
            plan.started.elapsed(),
        );
        Ok(result)
    }

    /// Writes one entry (only while its lease is current, when it carries a
    /// lease token), then runs the invalidations its decision asks for.
    pub async fn set(
        &self,
        command: SetCommand,
        deadline: Option<Duration>,
    ) -> Result<SetResult, RequestError> {
        let granted_at = command
            .lease_token
            .as_deref()
            .map(lease::check_token)
            .transpose()
            .inspect_err(|_| self.metrics.rejected("set"))?;
        let fill_ms = granted_at.map_or(0, lease::fill_ms);
        let plan = self
            .plan_write(&command, fill_ms, None, Instant::now())
            .await
            .inspect_err(|_| self.metrics.rejected("set"))?;
        let (written, lease) = match (&plan.entry, &command.lease_token) {
            (None, None) => (Ok(false), LeaseWrite::None),
            (Some(entry), None) => (
                self.bounded(deadline, self.store.set(entry.clone()))
                    .await
                    .map(|()| true),
                LeaseWrite::None,
            ),
            (None, Some(token)) => {
                // Nothing to fill with (the policy bypasses): let the next
                // caller have the lease rather than wait for its expiry.
                let released = self
                    .bounded(deadline, self.store.release_lease(&plan.read.key, token))
                    .await;
                (released.map(|_| false), LeaseWrite::None)
            }
            (Some(entry), Some(token)) => {
                match self
                    .bounded(deadline, self.store.set_leased(entry.clone(), token))
                    .await
                {
                    Ok(true) => {
                        self.deliver_fill(&entry.key, entry.value.clone());
                        self.metrics.lease(&plan.read.metric, "accepted");
                        (Ok(true), LeaseWrite::Accepted)
                    }
                    Ok(false) => {
                        self.metrics.lease(&plan.read.metric, "voided");
                        (Ok(false), LeaseWrite::Voided)
                    }
                    Err(err) => (Err(err), LeaseWrite::None),
                }
            }
        };
        if let Err(StoreError::OutOfMemory(reason)) = &written {
            return Err(self.store_full(&plan.read, reason));
        }
        if matches!(written, Ok(true)) {
            self.announce(Some(Change::key(&plan.read.key))).await;
        }
        Ok(self.finish_write(plan, written, lease).await)
    }

    /// Removes one entry, then runs the invalidations its decision asks for.
    pub async fn delete(
        &self,
        command: DeleteCommand,
        deadline: Option<Duration>,
    ) -> Result<DeleteResult, RequestError> {
        let plan = self
            .plan(
                DecisionRequest {
                    op: Operation::Delete,
                    namespace: &command.namespace,
                    key: &command.key,
                    attributes: &command.attributes,
                    value_size: 0,
                },
                None,
                Instant::now(),
            )
            .await
            .inspect_err(|_| self.metrics.rejected("delete"))?;
        let deleted = if plan.decision.bypass {
            Ok(false)
        } else {
            self.bounded(deadline, self.store.delete(&plan.key)).await
        };
        let (deleted, degraded) = match deleted {
            Ok(deleted) => (deleted, false),
            Err(err) => self.degraded("delete", &plan.metric, &err, (false, true)),
        };
        if !degraded && !plan.decision.bypass {
            // Announced even when nothing was there: another gateway may
            // still hold what this one did not find.
            self.announce(Some(Change::key(&plan.key))).await;
        }
        let invalidation = if degraded {
            InvalidationReport::default()
        } else {
            self.write_side_effects(plan.key.namespace(), plan.decision.invalidation())
                .await
        };
        let outcome = match (degraded, plan.decision.bypass, deleted) {
            (true, _, _) => "degraded",
            (false, true, _) => "bypass",
            (false, false, true) => "done",
            (false, false, false) => "noop",
        };
        self.metrics
            .request("delete", &plan.metric, outcome, plan.started.elapsed());
        Ok(DeleteResult {
            deleted,
            degraded,
            policy: plan.decision.decided_by,
            invalidation,
        })
    }

    /// Reads many entries with one store round trip. Each item is validated
    /// and decided on its own; results are in request order.
    pub async fn get_many(
        &self,
        commands: Vec<Result<GetCommand, RequestError>>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Result<GetResult, RequestError>>, RequestError> {
        self.check_batch(commands.len())?;
        // One policy instance per binding for the whole batch, and one start
        // time: the items are one request.
        let mut batch = DecisionBatch::default();
        let started = Instant::now();
        let mut plans: Vec<Result<Plan, RequestError>> = Vec::with_capacity(commands.len());
        for command in commands {
            plans.push(match command {
                Ok(c) => self
                    .plan(c.decision_request(), Some(&mut batch), started)
                    .await
                    .map(|mut plan| {
                        plan.allow_stale = c.allow_stale;
                        plan
                    }),
                Err(err) => Err(err),
            });
        }
        drop(batch);
        // Near hits first; only the rest go to the store, in one round trip.
        let mut near_reads = Vec::with_capacity(plans.len());
        let mut near_hits = Vec::with_capacity(plans.len());
        for plan in &plans {
            let read = plan.as_ref().ok().and_then(|plan| self.near_read(plan));
            let hit = match (&read, plan) {
                (Some(read), Ok(plan)) => self.near_hit(read, plan).await.map(|(found, _)| found),
                _ => None,
            };
            near_reads.push(read);
            near_hits.push(hit);
        }
        let keys: Vec<StorageKey> = plans
            .iter()
            .zip(&near_hits)
            .filter(|(_, hit)| hit.is_none())
            .filter_map(|(plan, _)| plan.as_ref().ok())
            .filter(|plan| !plan.decision.bypass)
            .map(|plan| plan.key.clone())
            .collect();
        let mut stored = if keys.is_empty() {
            Ok(Vec::new().into_iter())
        } else {
            self.bounded(deadline, self.store.get_many(&keys))
                .await
                .map(Vec::into_iter)
        };
        // Every item waited for the same answer: one latency for all of them.
        let took = started.elapsed();
        let mut results = Vec::with_capacity(plans.len());
        let mut tally = GetTally::default();
        for ((plan, near), near_hit) in plans.into_iter().zip(&near_reads).zip(near_hits) {
            let plan = match plan {
                Ok(plan) => plan,
                Err(err) => {
                    self.metrics.rejected("get");
                    results.push(Err(err));
                    continue;
                }
            };
            let result = if plan.decision.bypass {
                GetResult::miss(false, plan.decision.decided_by)
            } else if let Some(found) = near_hit {
                lease::without_stale(found, plan.allow_stale)
            } else {
                match &mut stored {
                    Ok(values) => {
                        let fetched = values.next().unwrap_or_default();
                        let (found, _) = self.read_entry(fetched.clone(), &plan);
                        if let Some(read) = near {
                            Self::near_fill(read, &plan.key, &fetched, &found).await;
                        }
                        lease::without_stale(found, plan.allow_stale)
                    }
                    Err(err) => self.degraded(
                        "get",
                        &plan.metric,
                        err,
                        GetResult::miss(true, plan.decision.decided_by),
                    ),
                }
            };
            tally.add(&plan.metric, &result, plan.decision.bypass, took);
            results.push(Ok(result));
        }
        self.metrics.get_outcomes(tally);
        Ok(results)
    }

    /// Writes many entries with one store round trip, then runs each item's
    /// invalidations. Each item is validated and decided on its own; results
    /// are in request order.
    pub async fn set_many(
        &self,
        commands: Vec<Result<SetCommand, RequestError>>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Result<SetResult, RequestError>>, RequestError> {
        self.check_batch(commands.len())?;
        let mut batch = DecisionBatch::default();
        let started = Instant::now();
        let mut plans: Vec<Result<WritePlan, RequestError>> = Vec::with_capacity(commands.len());
        for command in commands {
            plans.push(match command {
                Ok(command) => {
                    self.plan_write(&command, 0, Some(&mut batch), started)
                        .await
                }
                Err(err) => Err(err),
            });
        }
        // The instances go back to the pool before the store round trip.
        drop(batch);
        let entries: Vec<WriteEntry> = plans
            .iter()
            .filter_map(|plan| plan.as_ref().ok()?.entry.clone())
            .collect();
        let changes = changes_of_writes(&entries);
        let written = self.bounded(deadline, self.store.set_many(entries)).await;
        if written.is_ok() {
            for change in changes {
                self.announce(Some(change)).await;
            }
        }
        let mut results = Vec::with_capacity(plans.len());
        for plan in plans {
            let plan = match plan {
                Ok(plan) => plan,
                Err(err) => {
                    self.metrics.rejected("set");
                    results.push(Err(err));
                    continue;
                }
            };
            let outcome = match (&plan.entry, &written) {
                (None, _) => Ok(false),
                (Some(_), Ok(())) => Ok(true),
                (Some(_), Err(StoreError::OutOfMemory(reason))) => {
                    results.push(Err(self.store_full(&plan.read, reason)));
                    continue;
                }
                (Some(_), Err(err)) => Err(StoreError::Unavailable(err.to_string())),
            };
            results.push(Ok(self.finish_write(plan, outcome, LeaseWrite::None).await));
        }
        Ok(results)
    }

    /// Reports a write and runs its invalidations once it is acknowledged.
    async fn finish_write(
        &self,
        plan: WritePlan,
        written: Result<bool, StoreError>,
        lease: LeaseWrite,
    ) -> SetResult {
        let ttl = plan.fresh_ttl;
        let (stored, degraded) = match written {
            Ok(stored) => (stored, false),
            Err(err) => self.degraded("set", &plan.read.metric, &err, (false, true)),
        };
        // A write the store did not acknowledge invalidates nothing: the
        // caller will retry it, and its invalidations with it. Neither does a
        // write whose lease was voided: it never happened.
        let invalidation = if degraded || lease == LeaseWrite::Voided {
            InvalidationReport::default()
        } else {
            self.write_side_effects(plan.read.key.namespace(), plan.read.decision.invalidation())
                .await
        };
        let outcome = match (degraded, plan.read.decision.bypass, lease) {
            (true, _, _) => "degraded",
            (false, true, _) => "bypass",
            (false, false, LeaseWrite::Voided) => "voided",
            (false, false, _) => "done",
        };
        self.metrics.request(
            "set",
            &plan.read.metric,
            outcome,
            plan.read.started.elapsed(),
        );
        SetResult {
            stored,
            ttl,
            degraded,
            policy: plan.read.decision.decided_by,
            invalidation,
            lease,
        }
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

    /// Resolves the namespace, checks the key and asks for a decision; the
    /// items of a batch request share `batch` (see [`Decider::decide`]).
    async fn plan(
        &self,
        request: DecisionRequest<'_>,
        batch: Option<&mut DecisionBatch>,
        started: Instant,
    ) -> Result<Plan, RequestError> {
        let settings = self.namespaces.resolve(request.namespace)?;
        self.check_key(request.key)?;
        let decision = self.decider.decide(settings, &request, batch).await;
        Ok(Plan {
            key: scoped_key(request.namespace, &decision.key),
            metric: settings.label(),
            max_value_bytes: settings.max_value_bytes,
            compress_min_bytes: settings.compress_min_bytes,
            lease_ttl: settings.lease_ttl,
            early_refresh_beta: settings.early_refresh_beta,
            allow_stale: false,
            started,
            decision,
        })
    }

    /// Plans a write; `fill_ms` is how long the fill took (0: not a fill).
    async fn plan_write(
        &self,
        command: &SetCommand,
        fill_ms: u32,
        batch: Option<&mut DecisionBatch>,
        started: Instant,
    ) -> Result<WritePlan, RequestError> {
        let settings = self.namespaces.resolve(&command.namespace)?;
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
        let read = self
            .plan(
                DecisionRequest {
                    op: Operation::Set,
                    namespace: &command.namespace,
                    key: &command.key,
                    attributes: &command.attributes,
                    value_size: command.value.len(),
                },
                batch,
                started,
            )
            .await?;
        // Jitter spreads the expiry of entries written together.
        let fresh_ttl =
            read.decision.fresh_ttl.duration() + jitter(read.decision.ttl_jitter.duration());
        let entry = (!read.decision.bypass).then(|| {
            let decision = &read.decision;
            let (value, compressed) = compress(
                &command.value,
                decision.compression,
                read.compress_min_bytes,
            );
            let now = unix_millis();
            let fresh_until = now.saturating_add(millis(fresh_ttl));
            let envelope = Envelope {
                created_at_ms: now,
                fresh_until_ms: fresh_until,
                stale_until_ms: fresh_until.saturating_add(decision.stale_window.as_millis()),
                tags: decision.tags.to_vec(),
                fill_ms,
                content_type: command.content_type.clone(),
                compressed,
                value,
            };
            WriteEntry {
                key: read.key.clone(),
                value: envelope.encode(),
                expire_after: fresh_ttl + decision.stale_window.duration(),
                tags: envelope.tags,
            }
        });
        Ok(WritePlan {
            read,
            entry,
            fresh_ttl,
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

    /// What stored bytes mean for a Get, and what the lease protocol needs
    /// to know of them.
    fn read_entry(&self, stored: Fetched, plan: &Plan) -> (GetResult, Freshness) {
        let policy = plan.decision.decided_by;
        let unread = Freshness {
            stale_before_ms: stored.stale_before_ms,
            ..Freshness::default()
        };
        let miss = || (GetResult::miss(false, policy), unread);
        let Some(bytes) = stored.value else {
            return miss();
        };
        let envelope = match Envelope::decode_untagged(bytes) {
            Ok(envelope) => envelope,
            Err(err) => {
                self.metrics.envelope_error(&plan.metric, "undecodable");
                warn!(namespace = %plan.metric, cause = %err, "stored entry is not a valid envelope");
                return miss();
            }
        };
        // A soft namespace flush is a soft purge of everything written before
        // it, applied as the entry is read.
        let Times {
            fresh_until_ms,
            stale_until_ms,
            ..
        } = envelope.times().soft_purged(stored.stale_before_ms);
        let value = if envelope.compressed {
            match decompress(&envelope.value, plan.max_value_bytes) {
                Ok(value) => value,
                Err(reason) => {
                    self.metrics.envelope_error(&plan.metric, "decompression");
                    warn!(namespace = %plan.metric, reason, "stored entry does not decompress");
                    return miss();
                }
            }
        } else {
            envelope.value
        };
        let now = unix_millis();
        let outcome = if now < fresh_until_ms {
            Outcome::Hit
        } else if now < stale_until_ms {
            Outcome::Stale
        } else {
            return miss();
        };
        let result = GetResult {
            outcome,
            ttl_remaining: Duration::from_millis(fresh_until_ms.saturating_sub(now)),
            value,
            content_type: envelope.content_type,
            degraded: false,
            policy,
            lease: LeaseState::NotRequested,
            lease_token: String::new(),
        };
        let freshness = Freshness {
            created_at_ms: envelope.created_at_ms,
            fresh_until_ms,
            fill_ms: envelope.fill_ms,
            stale_before_ms: stored.stale_before_ms,
        };
        (result, freshness)
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

    /// A write the store refused for lack of memory: counted, and a clear
    /// error for the client rather than a degraded answer (the store is up;
    /// retrying will not help until it has room).
    fn store_full(&self, plan: &Plan, reason: &str) -> RequestError {
        let namespace = &plan.metric;
        self.metrics.store_error(
            self.store.name(),
            &StoreError::OutOfMemory(reason.to_owned()),
        );
        self.metrics
            .request("set", namespace, "error", plan.started.elapsed());
        warn!(namespace = %namespace, reason, "store full: write refused");
        RequestError::StoreFull(reason.to_owned())
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
}

/// The part of a client's remaining time a waiting call may use, keeping a
/// little for the answer to travel back.
fn reserve_answer_time(deadline: Duration) -> Duration {
    let reserve = (deadline / 10).clamp(Duration::from_millis(1), Duration::from_millis(50));
    deadline.saturating_sub(reserve)
}

/// Values smaller than this are never worth compressing.
const MIN_COMPRESSIBLE_BYTES: usize = 64;

/// LZ4-compresses `value` when the decision and the size call for it and it
/// actually saves space; returns the bytes to store and whether they are
/// compressed.
fn compress(value: &Bytes, hint: Compression, min_bytes: usize) -> (Bytes, bool) {
    let wanted = match hint {
        Compression::Never => false,
        Compression::Auto => value.len() >= min_bytes.max(MIN_COMPRESSIBLE_BYTES),
        Compression::Prefer => value.len() >= MIN_COMPRESSIBLE_BYTES,
    };
    if wanted {
        let compressed = lz4_flex::compress_prepend_size(value);
        if compressed.len() < value.len() {
            return (Bytes::from(compressed), true);
        }
    }
    (value.clone(), false)
}

/// Decompresses a stored value, refusing anything that claims to be larger
/// than the namespace accepts (a corrupt or hostile entry cannot make the
/// gateway allocate without bound).
fn decompress(stored: &[u8], max_bytes: usize) -> Result<Bytes, String> {
    let claimed = stored
        .get(..4)
        .map(|size| u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize)
        .ok_or("shorter than the size header")?;
    if claimed > max_bytes {
        return Err(format!(
            "claims {claimed} bytes, over the namespace limit of {max_bytes}"
        ));
    }
    lz4_flex::decompress_size_prepended(stored)
        .map(Bytes::from)
        .map_err(|err| err.to_string())
}

/// The namespace label used in metrics and logs: declared namespaces by name,
/// every undeclared one as `_default` (so metric cardinality stays bounded).
type MetricNamespace = Arc<str>;

/// What a request will do, decided before the store is touched.
struct Plan {
    /// The entry's key, namespace included.
    key: StorageKey,
    metric: MetricNamespace,
    max_value_bytes: usize,
    compress_min_bytes: usize,
    lease_ttl: Duration,
    early_refresh_beta: f64,
    /// MGet items: serve stale entries (single Gets handle it themselves).
    allow_stale: bool,
    /// When the request began (for its latency).
    started: Instant,
    decision: Decision,
}

/// A write's plan: the entry to store (none when the decision bypasses).
struct WritePlan {
    read: Plan,
    entry: Option<WriteEntry>,
    /// The fresh TTL written, jitter included.
    fresh_ttl: Duration,
}

/// What a batch of acknowledged writes changed, one announcement per
/// namespace.
fn changes_of_writes(entries: &[WriteEntry]) -> Vec<Change> {
    let mut by_namespace: std::collections::BTreeMap<&str, Vec<Bytes>> = Default::default();
    for entry in entries {
        by_namespace
            .entry(entry.key.namespace())
            .or_default()
            .push(Bytes::copy_from_slice(entry.key.key()));
    }
    by_namespace
        .into_iter()
        .map(|(namespace, keys)| Change::Keys {
            namespace: Arc::from(namespace),
            keys,
        })
        .collect()
}

/// A random duration in `0..=max`.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random_range(0..=millis(max)))
}

/// The address of `key` in `namespace` (the store lays it out, see
/// [`crate::store::layout`]).
fn scoped_key(namespace: &str, key: &str) -> StorageKey {
    StorageKey::new(Arc::from(namespace), Bytes::copy_from_slice(key.as_bytes()))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_follows_the_hint_and_only_when_it_pays() {
        let text = Bytes::from("abc".repeat(2000));
        let (stored, compressed) = compress(&text, Compression::Auto, 4096);
        assert!(compressed && stored.len() < text.len());
        assert_eq!(decompress(&stored, 1 << 20).unwrap(), text);
        assert!(!compress(&text, Compression::Never, 4096).1);
        let small = Bytes::from("abc".repeat(100));
        assert!(
            !compress(&small, Compression::Auto, 4096).1,
            "under the threshold"
        );
        assert!(
            compress(&small, Compression::Prefer, 4096).1,
            "prefer ignores the threshold"
        );
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let random: Bytes = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert!(
            !compress(&random, Compression::Prefer, 0).1,
            "incompressible stays raw"
        );
    }

    #[test]
    fn decompression_refuses_sizes_over_the_namespace_limit() {
        let (stored, _) = compress(&Bytes::from(vec![0u8; 100_000]), Compression::Prefer, 0);
        assert!(decompress(&stored, 99_999).unwrap_err().contains("100000"));
        assert_eq!(decompress(&stored, 100_000).unwrap().len(), 100_000);
        assert!(decompress(&[1, 0], 10).is_err());
    }
}
