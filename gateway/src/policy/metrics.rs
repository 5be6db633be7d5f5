//! The policy layer's metrics: calls, faults by kind, and call latency, per
//! policy version.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::Fault;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoLabels {
    policy: Arc<str>,
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    policy: Arc<str>,
    kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 µs to ~20 ms: decisions take microseconds; the deadline is milliseconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_01, 2.0, 12,
    ))
}

/// One policy version's call counters (shared by every binding of it).
#[derive(Clone, Debug)]
pub struct CallMetrics {
    calls: Counter,
    instances: Counter,
    latency: Histogram,
}

impl CallMetrics {
    /// One call: its latency, and whether it created an instance (`fresh`)
    /// or used its batch's.
    pub(super) fn observe(&self, elapsed: Duration, fresh: bool) {
        self.calls.inc();
        if fresh {
            self.instances.inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// Counters owned by the policy layer.
#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    calls: Family<PolicyLabels, Counter>,
    instances: Family<PolicyLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    latency: Family<PolicyLabels, Histogram, fn() -> Histogram>,
    rollbacks: Family<PolicyLabels, Counter>,
    uploads_rejected: Family<SourceLabels, Counter>,
    bound: Family<PolicyLabels, Counter>,
    shadow_compared: Family<PolicyLabels, Counter>,
    shadow_differences: Family<PolicyLabels, Counter>,
    memo_hits: Family<MemoLabels, Counter>,
    memo_misses: Family<MemoLabels, Counter>,
    memo_evictions: Family<MemoLabels, Counter>,
    memo_bytes: Family<MemoLabels, Gauge>,
    memo_first_sightings: Family<MemoLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

impl PolicyMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            calls: Family::default(),
            instances: Family::default(),
            faults: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            rollbacks: Family::default(),
            uploads_rejected: Family::default(),
            bound: Family::default(),
            shadow_compared: Family::default(),
            shadow_differences: Family::default(),
            memo_hits: Family::default(),
            memo_misses: Family::default(),
            memo_evictions: Family::default(),
            memo_bytes: Family::default(),
            memo_first_sightings: Family::default(),
        };
        registry.register(
            "cachegw_policy_memo_hits",
            "Decisions answered from the decision memo, without a policy call",
            metrics.memo_hits.clone(),
        );
        registry.register(
            "cachegw_policy_memo_misses",
            "Decisions of a memoised binding that needed a policy call",
            metrics.memo_misses.clone(),
        );
        registry.register(
            "cachegw_policy_memo_evictions",
            "Memoised decisions pushed out by policy.memo_bytes",
            metrics.memo_evictions.clone(),
        );
        registry.register(
            "cachegw_policy_memo_bytes",
            "Bytes a binding's memoised decisions weigh (estimated)",
            metrics.memo_bytes.clone(),
        );
        registry.register(
            "cachegw_policy_memo_first_sightings",
            "Decisions not memoised because the memo was full and their input had not missed lately (the input's next miss is memoised)",
            metrics.memo_first_sightings.clone(),
        );
        registry.register(
            "cachegw_policy_bindings",
            "Policy versions bound to a namespace since start-up (admin binds, watched-directory and fleet reloads), by the version bound",
            metrics.bound.clone(),
        );
        registry.register(
            "cachegw_policy_shadow_compared",
            "Requests a shadow candidate was asked about, by candidate version",
            metrics.shadow_compared.clone(),
        );
        registry.register(
            "cachegw_policy_shadow_differences",
            "Requests on which a shadow candidate decided differently from the applied policy, by candidate version",
            metrics.shadow_differences.clone(),
        );
        registry.register(
            "cachegw_policy_uploads_rejected",
            "Modules that failed validation, by source (admin, dir, redis)",
            metrics.uploads_rejected.clone(),
        );
        registry.register(
            "cachegw_policy_rollbacks",
            "Automatic rollbacks away from a policy version that kept faulting",
            metrics.rollbacks.clone(),
        );
        registry.register(
            "cachegw_policy_calls",
            "Policy decisions asked for, by policy (name@version)",
            metrics.calls.clone(),
        );
        registry.register(
            "cachegw_policy_instances",
            "Fresh policy instances decisions started in (new, or recycled: put back to a new one's state), by policy: one per call, except that the items of a batch request (MGet, MSet, Invalidate by keys) share one",
            metrics.instances.clone(),
        );
        registry.register(
            "cachegw_policy_faults",
            "Policy calls that faulted and fell back, by policy and kind",
            metrics.faults.clone(),
        );
        registry.register(
            "cachegw_policy_call_seconds",
            "Time to a validated decision, instantiation included",
            metrics.latency.clone(),
        );
        metrics
    }

    /// The memo counters of one policy version in one namespace (`""`: the
    /// default-namespace template), resolved once per binding.
    pub(super) fn memo_stats(&self, policy: &Arc<str>, namespace: &str) -> super::memo::MemoStats {
        let labels = MemoLabels {
            policy: Arc::clone(policy),
            namespace: if namespace.is_empty() {
                "_default"
            } else {
                namespace
            }
            .to_owned(),
        };
        super::memo::MemoStats {
            hits: self.memo_hits.get_or_create(&labels).clone(),
            misses: self.memo_misses.get_or_create(&labels).clone(),
            evictions: self.memo_evictions.get_or_create(&labels).clone(),
            bytes: self.memo_bytes.get_or_create(&labels).clone(),
            first_sightings: self.memo_first_sightings.get_or_create(&labels).clone(),
        }
    }

    pub(super) fn upload_rejected(&self, source: &'static str) {
        self.uploads_rejected
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    pub(super) fn bound(&self, policy: &Arc<str>) {
        self.bound
            .get_or_create(&PolicyLabels {
                policy: Arc::clone(policy),
            })
            .inc();
    }

    pub(super) fn shadowed(&self, candidate: &Arc<str>, differed: bool) {
        let labels = PolicyLabels {
            policy: Arc::clone(candidate),
        };
        self.shadow_compared.get_or_create(&labels).inc();
        if differed {
            self.shadow_differences.get_or_create(&labels).inc();
        }
    }

    pub(super) fn rolled_back(&self, policy: &Arc<str>) {
        self.rollbacks
            .get_or_create(&PolicyLabels {
                policy: Arc::clone(policy),
            })
            .inc();
    }

    /// The call counters of policy version `policy`, to keep with a binding
    /// so that its calls do no look-up by label.
    pub(super) fn call_metrics(&self, policy: &Arc<str>) -> CallMetrics {
        let labels = PolicyLabels {
            policy: Arc::clone(policy),
        };
        CallMetrics {
            calls: self.calls.get_or_create(&labels).clone(),
            instances: self.instances.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
        }
    }

    /// A call of `policy` that faulted (counted by kind).
    pub(super) fn fault(&self, policy: &Arc<str>, fault: &Fault) {
        self.faults
            .get_or_create(&FaultLabels {
                policy: Arc::clone(policy),
                kind: fault.kind(),
            })
            .inc();
    }
}
