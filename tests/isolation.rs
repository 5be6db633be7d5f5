//! What one namespace's policy may cost the others, and what a busy machine
//! may cost a correct policy: decisions run on fibers that yield at every
//! epoch tick, within a per-binding concurrency budget, under a deadline of
//! CPU time (docs/OPERATIONS.md, "Policy isolation").

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway::{
    api::proto::v1::{GetRequest, Outcome, SetRequest},
    config::FallbackMode::{FailClosed, FailOpen},
};
use serde_json::json;
use support::{Backend, World, bind, wait_until};

/// These tests measure latency and load the cores on purpose: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `q`-quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

/// `reads` sequential Gets of a cached key in `namespace`: their latencies,
/// each checked to be a fresh, non-degraded hit.
async fn read_latencies(world: &mut World, namespace: &str, reads: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(reads);
    for _ in 0..reads {
        let began = Instant::now();
        let got = world
            .client
            .get(GetRequest {
                namespace: namespace.into(),
                key: "steady".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("{namespace}: a neighbour's Get failed: {status}"))
            .into_inner();
        latencies.push(began.elapsed());
        assert!(
            got.outcome == Outcome::Hit as i32 && !got.degraded && got.value == b"v"[..],
            "{namespace}: a neighbour's Get was not a clean hit: {got:?}"
        );
    }
    latencies
}

/// A barrage of Gets on a namespace bound to hostile-loop, while two
/// neighbours (one with no policy, one with its own) are read: each
/// neighbour's p99 stays within 2x its unloaded p99 + 5 ms, with no degraded
/// answer and no error.
async fn neighbours_keep_their_latency(deadline: Duration) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut world = World::start_with(Backend::Redis, |config| {
        config.policy.deadline = deadline;
        bind(config, "looping", "hostile-loop", None, FailOpen);
        bind(
            config,
            "routes",
            "ttl-by-route",
            Some(json!({"rules": [], "default_ttl": "5m"})),
            FailOpen,
        );
        // Every read of this neighbour calls its policy (no memo).
        if let Some(policy) = &mut config.namespaces.get_mut("routes").unwrap().policy {
            policy.memo = false;
        }
    })
    .await;
    for namespace in ["plain", "routes"] {
        assert!(world.set(namespace, "steady", b"v").await.stored);
    }
    const READS: usize = 400;
    let mut before = Vec::new();
    for namespace in ["plain", "routes"] {
        // Warm-up (connections, the policy's compiled code), then measure.
        read_latencies(&mut world, namespace, 50).await;
        let mut latencies = read_latencies(&mut world, namespace, READS).await;
        before.push(quantile(&mut latencies, 0.99));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut barrage = Vec::new();
    for _ in 0..16 {
        let mut client = world.gateway.client().await;
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        barrage.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                // Answers here are the looping namespace's business (fallback,
                // busy, the client's own deadline): only the neighbours count.
                let _ = client
                    .get(GetRequest {
                        namespace: "looping".into(),
                        key: format!("k{round}"),
                        ..Default::default()
                    })
                    .await;
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The barrage is on once its requests occupy the gateway.
    wait_until(
        "the barrage to fill the looping namespace",
        Duration::from_secs(10),
        || {
            let metrics = world.gateway.metrics.encode();
            async move { support::gauge(&metrics, "cachegw_requests_in_flight") >= 12 }
        },
    )
    .await;

    let mut loaded = Vec::new();
    for namespace in ["plain", "routes"] {
        let mut latencies = read_latencies(&mut world, namespace, READS).await;
        loaded.push(quantile(&mut latencies, 0.99));
    }
    stop.store(true, Ordering::Relaxed);
    let faults = world.gateway.counter("cachegw_policy_faults");
    let barrage_answers = answered.load(Ordering::Relaxed);
    for task in barrage {
        task.abort();
    }
    // The unloaded p99 is taken on both sides of the barrage, so a change in
    // whatever else the machine runs is not charged to the policy.
    wait_until(
        "the barrage's requests to end",
        Duration::from_secs(10),
        || {
            let metrics = world.gateway.metrics.encode();
            async move { support::gauge(&metrics, "cachegw_requests_in_flight") == 0 }
        },
    )
    .await;
    let mut report = Vec::new();
    for (i, namespace) in ["plain", "routes"].into_iter().enumerate() {
        let mut latencies = read_latencies(&mut world, namespace, READS).await;
        let unloaded_p99 = before[i].max(quantile(&mut latencies, 0.99));
        let bound = unloaded_p99 * 2 + Duration::from_millis(5);
        report.push(format!(
            "{namespace}: unloaded p99 {unloaded_p99:?}, loaded p99 {:?} (bound {bound:?})",
            loaded[i]
        ));
        assert!(
            loaded[i] <= bound,
            "deadline {deadline:?}: a neighbour slowed down: {report:?}"
        );
    }
    eprintln!(
        "deadline {deadline:?}: {report:?}; barrage answered {barrage_answers} requests, \
         {faults} policy faults"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_policy_with_a_50ms_deadline_does_not_slow_its_neighbours() {
    neighbours_keep_their_latency(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_policy_with_a_2s_deadline_does_not_slow_its_neighbours() {
    neighbours_keep_their_latency(Duration::from_secs(2)).await;
}

/// Spins a core until `stop`, or for `longest` at most.
fn busy_loop(stop: Arc<AtomicBool>, longest: Duration) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let began = Instant::now();
        let mut spins = 0u64;
        while !stop.load(Ordering::Relaxed) && began.elapsed() < longest {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
    })
}

/// With two busy loops competing for the two cores, 16 clients write and
/// read through two policies at the default 5 ms deadline: the policies,
/// which need microseconds of CPU, never fault, and every Set is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_machine_does_not_make_a_correct_policy_fault() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let world = World::start_with(Backend::Redis, |config| {
        config.policy.deadline = gateway::config::PolicyEngineConfig::default().deadline;
        bind(
            config,
            "api",
            "ttl-by-route",
            Some(json!({"rules": [{"prefix": "leaderboard:", "ttl": "60s"}], "default_ttl": "5m"})),
            FailOpen,
        );
        bind(
            config,
            "catalog",
            "surrogate-keys",
            Some(json!({"ttl": "10m", "stale": "1m"})),
            FailClosed,
        );
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| busy_loop(Arc::clone(&stop), Duration::from_secs(120)))
        .collect();

    const ROUNDS: usize = 150;
    let mut clients = Vec::new();
    for client_id in 0..16 {
        let mut client = world.gateway.client().await;
        clients.push(tokio::spawn(async move {
            let mut not_stored = Vec::new();
            for round in 0..ROUNDS {
                let (namespace, key) = if round % 2 == 0 {
                    ("api", format!("leaderboard:{client_id}:{round}"))
                } else {
                    ("catalog", format!("product:{client_id}:{round}"))
                };
                let set = client
                    .set(SetRequest {
                        namespace: namespace.into(),
                        key: key.clone(),
                        value: b"v".to_vec().into(),
                        ..Default::default()
                    })
                    .await
                    .expect("set")
                    .into_inner();
                if !set.stored || set.policy.starts_with("fail-") {
                    not_stored.push(format!("{namespace}/{key}: {set:?}"));
                }
                let got = client
                    .get(GetRequest {
                        namespace: namespace.into(),
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("get")
                    .into_inner();
                if got.policy.starts_with("fail-") {
                    not_stored.push(format!("{namespace}/{key}: Get {got:?}"));
                }
            }
            not_stored
        }));
    }
    let mut not_stored = Vec::new();
    for client in clients {
        not_stored.extend(client.await.expect("client task"));
    }
    stop.store(true, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().expect("busy loop");
    }
    let calls = world.gateway.counter("cachegw_policy_calls");
    let faults = world.gateway.counter("cachegw_policy_faults");
    let kinds: Vec<String> = world
        .gateway
        .metrics
        .encode()
        .lines()
        .filter(|line| line.starts_with("cachegw_policy_faults_total{"))
        .map(str::to_owned)
        .collect();
    eprintln!("{calls} policy calls under two busy loops, {faults} faults {kinds:?}");
    assert_eq!(calls, 16 * ROUNDS as u64 * 2, "one decision per request");
    assert_eq!(faults, 0, "a correct policy faulted: {not_stored:?}");
    assert!(
        not_stored.is_empty(),
        "not stored or fallen back: {not_stored:?}"
    );
}

/// At the default deadline and memory cap, the memory bomb is reported as
/// what it is: the refused growth is a `memory` fault, not a `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_a_memory_fault_at_default_settings() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut world = World::start_with(Backend::Memory, |config| {
        let defaults = gateway::config::PolicyEngineConfig::default();
        config.policy.deadline = defaults.deadline;
        config.policy.memory_limit_bytes = defaults.memory_limit_bytes;
        bind(config, "bomb", "hostile-memory", None, FailOpen);
    })
    .await;
    for round in 0..8 {
        let set = world.set("bomb", &format!("k{round}"), b"v").await;
        assert!(
            set.policy.starts_with("fail-open:hostile-memory@"),
            "{set:?}"
        );
    }
    let metrics = world.gateway.metrics.encode();
    let faults = |kind: &str| {
        metrics
            .lines()
            .filter(|line| {
                line.starts_with("cachegw_policy_faults_total{")
                    && line.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(
        (faults("memory"), faults("timeout")),
        (8, 0),
        "expected 8 memory faults and no timeout in\n{metrics}"
    );
}
