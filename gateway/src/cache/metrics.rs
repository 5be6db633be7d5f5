//! The cache layer's metrics: request outcomes, rejected requests, store
//! errors, undecodable entries and invalidation jobs.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwap;

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

use super::{GetResult, LeaseState, MetricNamespace, Outcome};
use crate::{
    stats::{RecentStats, SeriesHandle},
    store::StoreError,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    namespace: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    op: &'static str,
    namespace: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    namespace: Arc<str>,
    target: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    namespace: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    store: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvelopeErrorLabels {
    namespace: Arc<str>,
    kind: &'static str,
}

/// Counters owned by the cache layer.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    recent: Arc<RecentStats>,
    rejected: Family<OpLabels, Counter>,
    store_errors: Family<StoreErrorLabels, Counter>,
    envelope_errors: Family<EnvelopeErrorLabels, Counter>,
    in_flight: Gauge,
    invalidated: Counter,
    jobs: Family<JobLabels, Counter>,
    jobs_running: Gauge,
    leases: Family<LeaseLabels, Counter>,
    lease_waiters: Gauge,
    /// Each namespace's Get metrics, resolved at its first Get.
    gets: Arc<ArcSwap<GetMetersByNamespace>>,
}

/// Namespaces' Get metrics by name. foldhash: names are operators' (or, for
/// undeclared namespaces, bounded by the metric families' own bound), and this
/// map is read on every Get.
type GetMetersByNamespace = HashMap<Arc<str>, Arc<GetMeters>, foldhash::fast::RandomState>;

/// Outcomes a Get is counted under.
const GET_OUTCOMES: [&str; 6] = ["degraded", "bypass", "coalesced", "hit", "miss", "stale"];

/// One namespace's Get metrics, looked up by label once instead of on every
/// Get (a label look-up hashes the labels under the family's lock). The
/// outcome counters are created at their first use, as the families would.
#[derive(Debug)]
struct GetMeters {
    outcomes: [OnceLock<Counter>; GET_OUTCOMES.len()],
    latency: Histogram,
    recent: SeriesHandle,
}

/// Where a Get's outcome is counted, an index into [`GET_OUTCOMES`].
fn get_outcome_index(result: &GetResult, bypass: bool) -> usize {
    match (result.degraded, bypass, result.outcome) {
        (true, _, _) => 0,
        (false, true, _) => 1,
        (false, false, Outcome::Hit) if result.lease == LeaseState::Coalesced => 2,
        (false, false, Outcome::Hit) => 3,
        (false, false, Outcome::Miss) => 4,
        (false, false, Outcome::Stale) => 5,
    }
}

/// A batch's Get outcomes, gathered item by item and counted at once by
/// [`CacheMetrics::get_outcomes`].
#[derive(Debug, Default)]
pub(super) struct GetTally {
    /// Items of one namespace in a row share a run.
    runs: Vec<TallyRun>,
}

#[derive(Debug)]
struct TallyRun {
    namespace: MetricNamespace,
    gets: Vec<(usize, Duration)>,
}

impl GetTally {
    /// Adds one item's outcome.
    pub(super) fn add(
        &mut self,
        namespace: &MetricNamespace,
        result: &GetResult,
        bypass: bool,
        latency: Duration,
    ) {
        let outcome = (get_outcome_index(result, bypass), latency);
        match self.runs.last_mut() {
            Some(run) if run.namespace == *namespace => run.gets.push(outcome),
            _ => self.runs.push(TallyRun {
                namespace: Arc::clone(namespace),
                gets: vec![outcome],
            }),
        }
    }
}

/// Counts a request as in flight until dropped.
pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl CacheMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            // 100 µs to about 13 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
            }),
            recent: Arc::default(),
            rejected: Family::default(),
            store_errors: Family::default(),
            envelope_errors: Family::default(),
            in_flight: Gauge::default(),
            invalidated: Counter::default(),
            jobs: Family::default(),
            jobs_running: Gauge::default(),
            leases: Family::default(),
            lease_waiters: Gauge::default(),
            gets: Arc::default(),
        };
        registry.register(
            "cachegw_request_seconds",
            "Time the gateway took per request, from decoded request to answer (policy, store and waits included), by op and namespace",
            metrics.latency.clone(),
        );
        registry.register(
            "cachegw_requests",
            "Cache operations by op, namespace and outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "cachegw_requests_rejected",
            "Requests refused before reaching the store (invalid or over a limit)",
            metrics.rejected.clone(),
        );
        registry.register(
            "cachegw_store_errors",
            "Store calls that failed or timed out, answered degraded",
            metrics.store_errors.clone(),
        );
        registry.register(
            "cachegw_envelope_errors",
            "Stored entries that were not valid envelopes, answered as misses",
            metrics.envelope_errors.clone(),
        );
        registry.register(
            "cachegw_invalidated_entries",
            "Entries removed or marked stale, by Invalidate jobs and by the invalidations of write decisions",
            metrics.invalidated.clone(),
        );
        registry.register(
            "cachegw_invalidation_jobs",
            "Finished invalidation jobs by namespace, target (keys, pattern, tags, namespace) and outcome (done, failed)",
            metrics.jobs.clone(),
        );
        registry.register(
            "cachegw_invalidation_jobs_running",
            "Invalidation jobs running right now",
            metrics.jobs_running.clone(),
        );
        registry.register(
            "cachegw_leases",
            "Lease protocol outcomes by namespace: granted, early_refresh, wait, stale_served, coalesced, timed_out, not_needed (Gets); accepted, voided (Sets); released, release_stale",
            metrics.leases.clone(),
        );
        registry.register(
            "cachegw_lease_waiters",
            "Gets waiting right now for another caller's fill of their key (lease held elsewhere)",
            metrics.lease_waiters.clone(),
        );
        registry.register(
            "cachegw_requests_in_flight",
            "Cache requests being executed right now",
            metrics.in_flight.clone(),
        );
        metrics
    }

    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Recent statistics (the Stats RPC's source).
    pub fn recent(&self) -> Arc<RecentStats> {
        Arc::clone(&self.recent)
    }

    pub(super) fn get_outcome(
        &self,
        namespace: &MetricNamespace,
        result: &GetResult,
        bypass: bool,
        latency: Duration,
    ) {
        let outcome = get_outcome_index(result, bypass);
        self.with_get_meters(namespace, |meters| {
            self.get_counter(meters, namespace, outcome).inc();
            meters.latency.observe(latency.as_secs_f64());
            meters.recent.record_all([(GET_OUTCOMES[outcome], latency)]);
        });
    }

    /// Counts a batch's Gets (an MGet's items): each namespace's meters are
    /// resolved, its counters added to and its recent window locked once per
    /// run of items, not once per item.
    pub(super) fn get_outcomes(&self, tally: GetTally) {
        for run in tally.runs {
            let meters = self.get_meters(&run.namespace);
            let mut counts = [0u64; GET_OUTCOMES.len()];
            for &(outcome, latency) in &run.gets {
                counts[outcome] += 1;
                meters.latency.observe(latency.as_secs_f64());
            }
            for (outcome, &count) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                self.get_counter(&meters, &run.namespace, outcome)
                    .inc_by(count);
            }
            meters.recent.record_all(
                run.gets
                    .iter()
                    .map(|&(outcome, latency)| (GET_OUTCOMES[outcome], latency)),
            );
        }
    }

    /// The counter of `outcome` among `namespace`'s Gets, created at its first use.
    fn get_counter<'m>(
        &self,
        meters: &'m GetMeters,
        namespace: &MetricNamespace,
        outcome: usize,
    ) -> &'m Counter {
        meters.outcomes[outcome].get_or_init(|| {
            self.requests
                .get_or_create(&RequestLabels {
                    op: "get",
                    namespace: Arc::clone(namespace),
                    outcome: GET_OUTCOMES[outcome],
                })
                .clone()
        })
    }

    /// The Get metrics of `namespace`, resolved at its first Get.
    fn get_meters(&self, namespace: &MetricNamespace) -> Arc<GetMeters> {
        self.with_get_meters(namespace, Arc::clone)
    }

    /// `f` of the Get metrics of `namespace`, resolved at its first Get: a
    /// single Get borrows them, where a clone of their `Arc` would write a
    /// reference count that every core's Gets of the namespace share.
    fn with_get_meters<R>(
        &self,
        namespace: &MetricNamespace,
        f: impl FnOnce(&Arc<GetMeters>) -> R,
    ) -> R {
        if let Some(meters) = self.gets.load().get(namespace) {
            return f(meters);
        }
        let meters = Arc::new(GetMeters {
            outcomes: Default::default(),
            latency: self
                .latency
                .get_or_create(&LatencyLabels {
                    op: "get",
                    namespace: Arc::clone(namespace),
                })
                .clone(),
            recent: self.recent.series(namespace, "get"),
        });
        self.gets.rcu(|known| {
            let mut known = GetMetersByNamespace::clone(known);
            known
                .entry(Arc::clone(namespace))
                .or_insert_with(|| Arc::clone(&meters));
            known
        });
        self.with_get_meters(namespace, f)
    }

    pub(super) fn lease(&self, namespace: &MetricNamespace, outcome: &'static str) {
        self.leases
            .get_or_create(&LeaseLabels {
                namespace: Arc::clone(namespace),
                outcome,
            })
            .inc();
    }

    pub(super) fn invalidated(&self, entries: u64) {
        self.invalidated.inc_by(entries);
    }

    /// Counts a Get as waiting on another caller's fill until the returned
    /// guard is dropped.
    pub(super) fn lease_waiting(&self) -> InFlight {
        self.lease_waiters.inc();
        InFlight(self.lease_waiters.clone())
    }

    /// Counts a job as running until the returned guard is dropped.
    pub(super) fn job_started(&self) -> InFlight {
        self.jobs_running.inc();
        InFlight(self.jobs_running.clone())
    }

    pub(super) fn job_finished(
        &self,
        namespace: &MetricNamespace,
        target: &'static str,
        failed: bool,
    ) {
        self.jobs
            .get_or_create(&JobLabels {
                namespace: Arc::clone(namespace),
                target,
                outcome: if failed { "failed" } else { "done" },
            })
            .inc();
    }

    pub(super) fn request(
        &self,
        op: &'static str,
        namespace: &MetricNamespace,
        outcome: &'static str,
        latency: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                op,
                namespace: Arc::clone(namespace),
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                op,
                namespace: Arc::clone(namespace),
            })
            .observe(latency.as_secs_f64());
        self.recent.record(namespace, op, outcome, latency);
    }

    pub(crate) fn rejected(&self, op: &'static str) {
        self.rejected.get_or_create(&OpLabels { op }).inc();
    }

    pub(super) fn store_error(&self, store: &'static str, err: &StoreError) {
        self.store_errors
            .get_or_create(&StoreErrorLabels {
                store,
                kind: err.kind(),
            })
            .inc();
    }

    pub(super) fn envelope_error(&self, namespace: &MetricNamespace, kind: &'static str) {
        self.envelope_errors
            .get_or_create(&EnvelopeErrorLabels {
                namespace: Arc::clone(namespace),
                kind,
            })
            .inc();
    }
}
