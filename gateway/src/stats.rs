//! Recent request statistics per namespace and operation, for the Stats RPC:
//! counts by outcome and latency percentiles over the last minute (six
//! 10-second buckets; the oldest is dropped as time moves on).
//!
//! Prometheus has the lifetime counters and histograms; this answers "how is
//! it doing right now" without a Prometheus server.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// Buckets kept.
const BUCKETS: usize = 6;
/// Time one bucket covers.
const BUCKET: Duration = Duration::from_secs(10);
/// Longest latency recorded exactly (longer ones count as this).
const MAX_LATENCY_MICROS: u64 = 60_000_000;

/// The window the statistics cover.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Recent statistics, shared by the cache (which records) and the admin API
/// (which reports).
#[derive(Debug, Default)]
pub struct RecentStats {
    series: Mutex<HashMap<SeriesKey, Arc<Mutex<Series>>>>,
}

/// One namespace and operation's recent statistics, resolved once.
#[derive(Debug, Clone)]
pub struct SeriesHandle(Arc<Mutex<Series>>);

impl SeriesHandle {
    /// Records requests, each with its outcome and latency, under one lock.
    pub fn record_all(&self, requests: impl IntoIterator<Item = (&'static str, Duration)>) {
        let mut series = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        series.advance(Instant::now());
        let bucket = series.current();
        for (outcome, latency) in requests {
            *bucket.outcomes.entry(outcome).or_default() += 1;
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            bucket
                .latency
                .saturating_record(micros.clamp(1, MAX_LATENCY_MICROS));
        }
    }
}

/// A namespace label and an operation.
type SeriesKey = (Arc<str>, &'static str);

/// One namespace and operation's buckets.
#[derive(Debug)]
struct Series {
    /// Index of the bucket of `since + k * BUCKET`, for the newest k.
    newest: u64,
    since: Instant,
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone)]
struct Bucket {
    outcomes: BTreeMap<&'static str, u64>,
    latency: Histogram<u64>,
}

impl Bucket {
    fn new() -> Self {
        Self {
            outcomes: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 2)
                .expect("constant bounds are valid"),
        }
    }
}

impl Series {
    fn new(now: Instant) -> Self {
        Self {
            newest: 0,
            since: now,
            buckets: vec![Bucket::new(); BUCKETS],
        }
    }

    /// Moves the window to `now`, clearing buckets that fell out of it.
    fn advance(&mut self, now: Instant) {
        let current = now.saturating_duration_since(self.since).as_secs() / BUCKET.as_secs();
        let stale = current.saturating_sub(self.newest).min(BUCKETS as u64);
        for step in 1..=stale {
            let index = ((self.newest + step) % BUCKETS as u64) as usize;
            self.buckets[index].outcomes.clear();
            self.buckets[index].latency.reset();
        }
        self.newest = self.newest.max(current);
    }

    fn current(&mut self) -> &mut Bucket {
        &mut self.buckets[(self.newest % BUCKETS as u64) as usize]
    }
}

/// What the window holds for one namespace and operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpStats {
    /// The namespace label (declared name, or `_default`).
    pub namespace: Arc<str>,
    /// The operation (`get`, `set`, `delete`, `invalidate`, ...).
    pub op: &'static str,
    /// Requests by outcome (`hit`, `miss`, `stale`, `coalesced`, `bypass`,
    /// `degraded`, `done`, `error`, ...).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

impl OpStats {
    /// Requests in all.
    pub fn total(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// Share of hits (fresh, stale or coalesced) among reads that reached a
    /// decision about the cache's contents (hits and misses); `None` when
    /// there were none.
    pub fn hit_rate(&self) -> Option<f64> {
        let hits = ["hit", "stale", "coalesced"]
            .iter()
            .map(|outcome| self.outcomes.get(outcome).copied().unwrap_or(0))
            .sum::<u64>();
        let misses = self.outcomes.get("miss").copied().unwrap_or(0);
        (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64)
    }
}

impl RecentStats {
    /// Records one request.
    pub fn record(
        &self,
        namespace: &Arc<str>,
        op: &'static str,
        outcome: &'static str,
        latency: Duration,
    ) {
        self.series(namespace, op).record_all([(outcome, latency)]);
    }

    /// The series of `namespace` and `op`, to record into without looking it
    /// up again (series are never removed).
    pub fn series(&self, namespace: &Arc<str>, op: &'static str) -> SeriesHandle {
        let mut table = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        SeriesHandle(Arc::clone(
            table
                .entry((Arc::clone(namespace), op))
                .or_insert_with(|| Arc::new(Mutex::new(Series::new(Instant::now())))),
        ))
    }

    /// The last minute, per namespace and operation, sorted by namespace then
    /// operation; series with no request in the window are left out.
    pub fn snapshot(&self) -> Vec<OpStats> {
        let series: Vec<_> = {
            let table = self
                .series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            table
                .iter()
                .map(|((namespace, op), series)| (Arc::clone(namespace), *op, Arc::clone(series)))
                .collect()
        };
        let now = Instant::now();
        let mut stats: Vec<OpStats> = series
            .into_iter()
            .filter_map(|(namespace, op, series)| {
                let mut series = series
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                series.advance(now);
                let mut outcomes = BTreeMap::new();
                let mut latency = Bucket::new().latency;
                for bucket in &series.buckets {
                    for (outcome, count) in &bucket.outcomes {
                        *outcomes.entry(*outcome).or_default() += count;
                    }
                    // Same bounds on both sides: adding cannot fail.
                    let _ = latency.add(&bucket.latency);
                }
                if outcomes.is_empty() {
                    return None;
                }
                let at = |quantile| Duration::from_micros(latency.value_at_quantile(quantile));
                Some(OpStats {
                    namespace,
                    op,
                    outcomes,
                    p50: at(0.5),
                    p99: at(0.99),
                })
            })
            .collect();
        stats.sort_by(|a, b| (&a.namespace, a.op).cmp(&(&b.namespace, b.op)));
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes_and_latency_per_namespace_and_op() {
        let stats = RecentStats::default();
        let users: Arc<str> = Arc::from("users");
        for i in 1..=100u64 {
            let outcome = if i % 4 == 0 { "miss" } else { "hit" };
            stats.record(&users, "get", outcome, Duration::from_micros(i * 100));
        }
        stats.record(&users, "set", "done", Duration::from_millis(2));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.len(), 2);
        let get = &snapshot[0];
        assert_eq!((get.op, get.total()), ("get", 100));
        assert_eq!(get.outcomes.get("miss"), Some(&25));
        assert_eq!(get.hit_rate(), Some(0.75));
        // 2 significant figures: within 1%.
        assert!(
            (4_950..=5_050).contains(&get.p50.as_micros()),
            "{:?}",
            get.p50
        );
        assert!(
            (9_800..=10_000).contains(&get.p99.as_micros()),
            "{:?}",
            get.p99
        );
        assert_eq!(snapshot[1].hit_rate(), None, "writes have no hit rate");
    }

    #[test]
    fn the_window_forgets_what_is_older_than_a_minute() {
        let mut series = Series::new(Instant::now());
        series.current().outcomes.insert("hit", 5);
        // Three buckets on: the old one is still in the window.
        series.advance(series.since + BUCKET * 3);
        let kept: u64 = series
            .buckets
            .iter()
            .flat_map(|b| b.outcomes.values())
            .sum();
        assert_eq!(kept, 5);
        // A minute on: it is gone.
        series.advance(series.since + BUCKET * 9);
        let kept: u64 = series
            .buckets
            .iter()
            .flat_map(|b| b.outcomes.values())
            .sum();
        assert_eq!(kept, 0);
    }
}
