//! The Redis path's protection: a circuit breaker and budgeted retries,
//! wrapped around any [`Store`].
//!
//! - **Circuit breaker** (the `failsafe` crate's state machine): it opens
//!   when too many calls fail — a failure rate over a sliding window, or a
//!   run of consecutive failures — and then answers every call at once with
//!   [`StoreError::CircuitOpen`] (degraded, no waiting on dead sockets). After
//!   its open time (growing from `open_for` to `max_open_for` while Redis
//!   stays down) it half-opens: calls go through as probes, the first
//!   success closes it, a failure opens it again. Only availability counts:
//!   connection failures and timeouts — including a call abandoned at its
//!   deadline — are failures; an answer, even an error answer (out of
//!   memory, a refused command), is a success.
//! - **Retries** only of idempotent operations (reads, deletes, plain
//!   writes), only after a broken connection (whose lane the Redis store has
//!   just replaced), once, after a short jittered backoff, and only while a
//!   retry budget (tower's `TpsBudget`: a share of recent calls) allows, so
//!   that retries cannot multiply the load on a struggling Redis.
//! - **Gathered Gets**: concurrent single-key reads share one call (see
//!   [`super::coalesce`]), gathered here, above the breaker: the breaker, the
//!   retry budget and `cachegw_store_seconds` count calls to Redis, and a
//!   round of Gets is one call, guarded once.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_trait::async_trait;
use failsafe::{
    Config as BreakerBuilder, StateMachine,
    failure_policy::{self, FailurePolicy},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tower::retry::budget::{Budget, TpsBudget};
use tracing::{info, warn};

use super::{
    Fetched, LeaseCondition, LeaseGrant, Progress, PurgeMode, StorageKey, Store, StoreError,
    WriteEntry, coalesce::ReadRounds,
};
use crate::config::BreakerConfig;

/// The breaker's failure policy: a failure rate over a window, or a run of
/// consecutive failures, whichever trips first.
type Policy = failure_policy::OrElse<
    failure_policy::SuccessRateOverTimeWindow<Backoff>,
    failure_policy::ConsecutiveFailures<Backoff>,
>;

/// How long the breaker stays open: doubling from `open_for` up to
/// `max_open_for` while Redis keeps failing its probes. (failsafe's own
/// backoffs start at one second or more; a cache must probe sooner.)
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = current.saturating_mul(2).min(self.max);
        Some(current)
    }
}

/// Metrics of the breaker, the retries and the store's latency.
#[derive(Clone, Debug)]
pub struct GuardMetrics {
    latency: Family<OpLabels, Histogram>,
    /// `latency`'s series, each resolved at its operation's first call: a
    /// look-up in the family hashes the label and takes the family's lock,
    /// a line both cores would write on every call.
    latency_by_op: Arc<[OnceLock<Histogram>; Op::COUNT]>,
    state: Gauge,
    transitions: Family<TransitionLabels, Counter>,
    rejected: Counter,
    retries: Family<RetryLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    outcome: &'static str,
}

/// The store calls the guard times, one `cachegw_store_seconds` series each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AcquireLease,
    Delete,
    FlushNamespace,
    Get,
    GetMany,
    PurgeKeys,
    PurgeMatching,
    PurgeTag,
    ReleaseLease,
    Set,
    SetLeased,
    SetMany,
}

impl Op {
    const COUNT: usize = 12;

    fn label(self) -> &'static str {
        match self {
            Op::AcquireLease => "acquire_lease",
            Op::Delete => "delete",
            Op::FlushNamespace => "flush_namespace",
            Op::Get => "get",
            Op::GetMany => "get_many",
            Op::PurgeKeys => "purge_keys",
            Op::PurgeMatching => "purge_matching",
            Op::PurgeTag => "purge_tag",
            Op::ReleaseLease => "release_lease",
            Op::Set => "set",
            Op::SetLeased => "set_leased",
            Op::SetMany => "set_many",
        }
    }
}

impl GuardMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            // 50 µs to about 6 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
            }),
            latency_by_op: Arc::new(std::array::from_fn(|_| OnceLock::new())),
            state: Gauge::default(),
            transitions: Family::default(),
            rejected: Counter::default(),
            retries: Family::default(),
        };
        registry.register(
            "cachegw_store_seconds",
            "Time of each Redis call (retries included; breaker rejections are not calls), by operation",
            metrics.latency.clone(),
        );
        registry.register(
            "cachegw_breaker_state",
            "The Redis circuit breaker: 0 closed, 1 half-open (probing), 2 open",
            metrics.state.clone(),
        );
        registry.register(
            "cachegw_breaker_transitions",
            "Circuit breaker state changes, by the state entered",
            metrics.transitions.clone(),
        );
        registry.register(
            "cachegw_breaker_rejected",
            "Store calls answered degraded at once because the breaker was open",
            metrics.rejected.clone(),
        );
        registry.register(
            "cachegw_store_retries",
            "Idempotent store calls retried after a broken connection (retried), or not for lack of retry budget (budget_exhausted)",
            metrics.retries.clone(),
        );
        metrics
    }

    fn latency(&self, op: Op) -> &Histogram {
        self.latency_by_op[op as usize].get_or_init(|| {
            self.latency
                .get_or_create(&OpLabels { op: op.label() })
                .clone()
        })
    }

    fn entered(&self, to: &'static str, state: i64) {
        self.state.set(state);
        self.transitions
            .get_or_create(&TransitionLabels { to })
            .inc();
    }
}

impl failsafe::Instrument for GuardMetrics {
    fn on_call_rejected(&self) {
        self.rejected.inc();
    }

    fn on_open(&self) {
        warn!("redis circuit breaker open: answering degraded at once until a probe succeeds");
        self.entered("open", 2);
    }

    fn on_half_open(&self) {
        info!("redis circuit breaker half-open: probing");
        self.entered("half_open", 1);
    }

    fn on_closed(&self) {
        // The state machine starts closed: that is not news.
        if self.state.get() != 0 {
            info!("redis circuit breaker closed: redis answers again");
            self.entered("closed", 0);
        }
    }
}

/// A store behind a circuit breaker, with budgeted retries.
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    /// Single-key reads gathered into shared calls.
    reads: ReadRounds,
    breaker: Option<StateMachine<Policy, GuardMetrics>>,
    budget: TpsBudget,
    retry_backoff: Duration,
    metrics: GuardMetrics,
}

/// Whether an operation may be repeated without changing its effect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

impl GuardedStore {
    /// Guards `inner` as `config` says.
    pub fn new(inner: Arc<dyn Store>, config: &BreakerConfig, metrics: GuardMetrics) -> Self {
        let breaker = config.enabled.then(|| {
            let backoff = Backoff {
                next: config.open_for.min(config.max_open_for),
                max: config.max_open_for,
            };
            let policy = failure_policy::success_rate_over_time_window(
                1.0 - config.failure_rate,
                config.min_requests,
                config.window,
                backoff.clone(),
            )
            .or_else(failure_policy::consecutive_failures(
                config.consecutive_failures,
                backoff,
            ));
            BreakerBuilder::new()
                .failure_policy(policy)
                .instrument(metrics.clone())
                .build()
        });
        Self {
            inner,
            reads: ReadRounds::default(),
            breaker,
            budget: TpsBudget::new(
                Duration::from_secs(10),
                config.retry_min_per_sec,
                config.retry_ratio,
            ),
            retry_backoff: config.retry_backoff,
            metrics,
        }
    }

    /// Runs `call` through the breaker, retrying it once after a broken
    /// connection when it is idempotent and the budget allows.
    async fn guarded<T, F, Fut>(
        &self,
        op: Op,
        idempotent: Idempotent,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = std::time::Instant::now();
        let result = self.with_retry(idempotent, call).await;
        if !matches!(result, Err(StoreError::CircuitOpen)) {
            self.metrics
                .latency(op)
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn with_retry<T, F, Fut>(&self, idempotent: Idempotent, call: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.budget.deposit();
        let first = self.through_breaker(&call).await;
        let retry =
            idempotent == Idempotent::Yes && matches!(first, Err(StoreError::Unavailable(_)));
        if !retry {
            return first;
        }
        if !self.budget.withdraw() {
            self.metrics
                .retries
                .get_or_create(&RetryLabels {
                    outcome: "budget_exhausted",
                })
                .inc();
            return first;
        }
        self.metrics
            .retries
            .get_or_create(&RetryLabels { outcome: "retried" })
            .inc();
        let jitter = rand::random_range(0..=self.retry_backoff.as_micros() as u64);
        tokio::time::sleep(self.retry_backoff + Duration::from_micros(jitter)).await;
        self.through_breaker(&call).await
    }

    async fn through_breaker<T, F, Fut>(&self, call: &F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let Some(breaker) = &self.breaker else {
            return call().await;
        };
        if !breaker.is_call_permitted() {
            return Err(StoreError::CircuitOpen);
        }
        // A call dropped before it finishes (its deadline passed) is a
        // failure too: Redis did not answer in time.
        let mut pending = Pending {
            breaker,
            settled: false,
        };
        let result = call().await;
        pending.settled = true;
        match &result {
            Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => breaker.on_error(),
            _ => breaker.on_success(),
        }
        result
    }
}

/// Records a failure if dropped before the call settled.
struct Pending<'a> {
    breaker: &'a StateMachine<Policy, GuardMetrics>,
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.on_error();
        }
    }
}

#[async_trait]
impl Store for GuardedStore {
    async fn get(&self, key: &StorageKey) -> Result<Fetched, StoreError> {
        self.reads
            .read(key, |keys| async move {
                self.guarded(Op::Get, Idempotent::Yes, || self.inner.get_many(&keys))
                    .await
            })
            .await
    }

    async fn get_many(&self, keys: &[StorageKey]) -> Result<Vec<Fetched>, StoreError> {
        self.guarded(Op::GetMany, Idempotent::Yes, || self.inner.get_many(keys))
            .await
    }

    async fn set(&self, entry: WriteEntry) -> Result<(), StoreError> {
        self.guarded(Op::Set, Idempotent::Yes, || self.inner.set(entry.clone()))
            .await
    }

    async fn set_many(&self, entries: Vec<WriteEntry>) -> Result<(), StoreError> {
        self.guarded(Op::SetMany, Idempotent::Yes, || {
            self.inner.set_many(entries.clone())
        })
        .await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.guarded(Op::Delete, Idempotent::Yes, || self.inner.delete(key))
            .await
    }

    async fn purge_keys(&self, keys: &[StorageKey], mode: PurgeMode) -> Result<u64, StoreError> {
        self.guarded(Op::PurgeKeys, Idempotent::No, || {
            self.inner.purge_keys(keys, mode)
        })
        .await
    }

    async fn purge_matching(
        &self,
        namespace: &str,
        pattern: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        self.guarded(Op::PurgeMatching, Idempotent::No, || {
            self.inner
                .purge_matching(namespace, pattern, mode, progress)
        })
        .await
    }

    async fn purge_tag(
        &self,
        namespace: &str,
        tag: &str,
        mode: PurgeMode,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        self.guarded(Op::PurgeTag, Idempotent::No, || {
            self.inner.purge_tag(namespace, tag, mode, progress)
        })
        .await
    }

    async fn flush_namespace(&self, namespace: &str, mode: PurgeMode) -> Result<u64, StoreError> {
        self.guarded(Op::FlushNamespace, Idempotent::No, || {
            self.inner.flush_namespace(namespace, mode)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        key: &StorageKey,
        token: &str,
        ttl: Duration,
        wanted: LeaseCondition,
    ) -> Result<LeaseGrant, StoreError> {
        self.guarded(Op::AcquireLease, Idempotent::No, || {
            self.inner.acquire_lease(key, token, ttl, wanted)
        })
        .await
    }

    async fn set_leased(&self, entry: WriteEntry, token: &str) -> Result<bool, StoreError> {
        self.guarded(Op::SetLeased, Idempotent::No, || {
            self.inner.set_leased(entry.clone(), token)
        })
        .await
    }

    async fn release_lease(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        self.guarded(Op::ReleaseLease, Idempotent::No, || {
            self.inner.release_lease(key, token)
        })
        .await
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_time_doubles_up_to_its_maximum() {
        let backoff = Backoff {
            next: Duration::from_millis(250),
            max: Duration::from_secs(1),
        };
        let steps: Vec<u128> = backoff.take(5).map(|d| d.as_millis()).collect();
        assert_eq!(steps, [250, 500, 1000, 1000, 1000]);
    }
}
