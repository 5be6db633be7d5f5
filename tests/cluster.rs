//! The gateway on a Redis Cluster: what the scenario suites (`cluster_store::*`
//! in data_path, invalidation, leases, policies and rust_client, and the fleet
//! test) do not cover on their own: a pattern invalidation over 100 000 keys
//! spread over every primary, a primary killed under load, and slots moved
//! (MOVED/ASK) while the gateway serves.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::api::proto::v1::{
    GetInvalidationRequest, GetRequest, InvalidateRequest, JobState, MSetRequest, Outcome,
    SetRequest, cache_client::CacheClient, invalidate_request::Target,
};
use support::{RedisCluster, TestGateway, redis_cli_binary, wait_until};
use tonic::transport::Channel;

const NS: &str = "spread";

fn set_request(key: String, value: &str) -> SetRequest {
    SetRequest {
        namespace: NS.into(),
        key,
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

/// Writes `count` entries `{prefix}{i}` in batches of 1000.
async fn write_many(client: &mut CacheClient<Channel>, prefix: &str, count: usize) {
    for start in (0..count).step_by(1000) {
        let items = (start..(start + 1000).min(count))
            .map(|i| set_request(format!("{prefix}{i}"), "v"))
            .collect();
        let answer = client
            .m_set(MSetRequest { items })
            .await
            .expect("MSet")
            .into_inner();
        for result in answer.results {
            match result.result {
                Some(gateway::api::proto::v1::m_set_result::Result::Response(set)) => {
                    assert!(set.stored && !set.degraded, "{set:?}");
                }
                other => panic!("MSet item failed: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_invalidation_removes_100_000_keys_spread_over_every_primary() {
    let cluster = RedisCluster::start(3, 0).await;
    let mut config = cluster.config();
    config.server.store_timeout = Duration::from_secs(5);
    config.redis.response_timeout = Duration::from_secs(5);
    let gateway = TestGateway::start(config).await;
    let mut client = gateway.client().await;

    let started = Instant::now();
    write_many(&mut client, "p:", 100_000).await;
    write_many(&mut client, "keep:", 2_000).await;
    println!("wrote 102 000 entries in {:?}", started.elapsed());
    let matching = format!("cg:{{{NS}:0:p:*");
    let spread = cluster.key_counts(&matching).await;
    assert_eq!(spread.len(), 3, "three primaries: {spread:?}");
    assert_eq!(spread.iter().sum::<u64>(), 100_000, "{spread:?}");
    for count in &spread {
        // An even spread is ~33 333 each; a namespace is not pinned to a slot.
        assert!(*count > 25_000, "the keys are not spread: {spread:?}");
    }

    let started = Instant::now();
    let mut answer = client
        .invalidate(InvalidateRequest {
            namespace: NS.into(),
            target: Some(Target::Pattern("p:*".into())),
            wait_ms: 60_000,
            ..Default::default()
        })
        .await
        .expect("invalidate")
        .into_inner();
    while answer.state == JobState::Running as i32 {
        answer = client
            .get_invalidation(GetInvalidationRequest {
                job_id: answer.job_id.clone(),
                wait_ms: 10_000,
            })
            .await
            .expect("follow the job")
            .into_inner();
    }
    println!(
        "pattern invalidation of 100 000 keys over 3 primaries: {:?} ({} ms in the job)",
        started.elapsed(),
        answer.elapsed_ms
    );
    assert_eq!(answer.state, JobState::Done as i32, "{answer:?}");
    assert_eq!(answer.affected, 100_000, "{answer:?}");
    assert_eq!(cluster.key_count(&matching).await, 0);
    assert_eq!(
        cluster.key_count(&format!("cg:{{{NS}:0:keep:*")).await,
        2_000,
        "keys outside the pattern survive"
    );
    for key in ["keep:0", "keep:1999"] {
        let got = client
            .get(GetRequest {
                namespace: NS.into(),
                key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.outcome, Outcome::Hit as i32, "{key}: {got:?}");
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    degraded: AtomicU64,
    /// When the last degraded answer came (ms since `epoch`).
    last_degraded_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn degraded(&self) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.get_or_init(Instant::now);
        let at = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_degraded_ms.fetch_max(at, Ordering::Relaxed);
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(what);
    }
}

/// Sets and gets random keys (over every slot) until `stop`.
fn load(
    gateway: &TestGateway,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|worker| {
            let endpoint = gateway.endpoint();
            let tally = Arc::clone(&tally);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut client = CacheClient::connect(endpoint).await.unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("load:{worker}:{}", i % 500);
                    let set = client.set(set_request(key.clone(), "v")).await;
                    match set {
                        Ok(answer) if answer.get_ref().degraded => tally.degraded(),
                        Ok(answer) if answer.get_ref().stored => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(answer) => {
                            tally.error(format!("set not stored: {:?}", answer.get_ref()))
                        }
                        Err(status) => tally.error(format!("set: {status:?}")),
                    }
                    let got = client
                        .get(GetRequest {
                            namespace: NS.into(),
                            key,
                            ..Default::default()
                        })
                        .await;
                    match got {
                        Ok(answer) if answer.get_ref().degraded => tally.degraded(),
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => tally.error(format!("get: {status:?}")),
                    }
                }
            })
        })
        .collect()
}

/// Whether every one of `keys` can be written and read back, not degraded.
async fn all_served(client: &mut CacheClient<Channel>, keys: &[String]) -> bool {
    for key in keys {
        let Ok(set) = client.set(set_request(key.clone(), "after")).await else {
            return false;
        };
        if set.get_ref().degraded || !set.get_ref().stored {
            return false;
        }
        let Ok(got) = client
            .get(GetRequest {
                namespace: NS.into(),
                key: key.clone(),
                ..Default::default()
            })
            .await
        else {
            return false;
        };
        if got.get_ref().outcome != Outcome::Hit as i32 || got.get_ref().value.as_ref() != b"after"
        {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_fails_over_and_only_degrades_meanwhile() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let gateway = TestGateway::start(cluster.config()).await;
    let mut client = gateway.client().await;
    // Keys over every slot, so some live on the primary that dies.
    let probes: Vec<String> = (0..300).map(|i| format!("probe:{i}")).collect();
    assert!(
        all_served(&mut client, &probes).await,
        "served before the fault"
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gateway, Arc::clone(&tally), Arc::clone(&stop));
    wait_until("the load to run", Duration::from_secs(10), || {
        let tally = Arc::clone(&tally);
        async move { tally.ok.load(Ordering::Relaxed) > 200 }
    })
    .await;

    // SIGKILL the first primary: its replica must take over its slots.
    let victim = cluster.current_primaries().await[0].url();
    let killed_at = Instant::now();
    tally
        .epoch
        .set(killed_at)
        .expect("nothing degraded before the kill");
    let index = cluster
        .nodes
        .iter()
        .position(|node| node.url() == victim)
        .unwrap();
    cluster.nodes[index].kill();
    // Its replica is promoted once the others agree it failed (1 s node timeout
    // plus an election): then three live primaries again, and the cluster ok.
    wait_until("a replica to be promoted", Duration::from_secs(30), || {
        let cluster = &cluster;
        async move { cluster.current_primaries().await.len() == 3 }
    })
    .await;
    cluster.wait_until_ok(Duration::from_secs(30)).await;
    let promoted = killed_at.elapsed();
    wait_until(
        "every key to be served again after the failover",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let probes = probes.clone();
            async move { all_served(&mut client, &probes).await }
        },
    )
    .await;
    let recovered = killed_at.elapsed();
    let ok_at_recovery = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "the load to go on after recovery",
        Duration::from_secs(10),
        || {
            let tally = Arc::clone(&tally);
            async move { tally.ok.load(Ordering::Relaxed) > ok_at_recovery + 500 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let (ok, degraded, errors) = (
        tally.ok.load(Ordering::Relaxed),
        tally.degraded.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    let last_degraded = Duration::from_millis(tally.last_degraded_ms.load(Ordering::Relaxed));
    println!(
        "failover: replica promoted after {promoted:?}, last degraded answer of the load at \
         {last_degraded:?}, every probe key served after {recovered:?}; \
         {ok} answers ok, {degraded} degraded, {errors} other errors"
    );
    assert_eq!(
        errors,
        0,
        "only degraded answers during a failover; first: {:?}",
        tally.first_error.lock().unwrap()
    );
    assert!(
        degraded > 0,
        "the kill was not noticed: is the load reaching the victim?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_slots_while_serving_loses_nothing() {
    let cluster = RedisCluster::start(3, 0).await;
    let gateway = TestGateway::start(cluster.config()).await;
    let mut client = gateway.client().await;
    write_many(&mut client, "moved:", 3_000).await;

    // Move a third of the first primary's slots to the second while a reader
    // keeps reading every key: redis-rs follows MOVED (a slot that moved) and
    // ASK (a slot being migrated, key by key).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let endpoint = gateway.endpoint();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut client = CacheClient::connect(endpoint).await.unwrap();
            let mut outcomes: HashMap<String, u64> = HashMap::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 1) % 3_000;
                let got = client
                    .get(GetRequest {
                        namespace: NS.into(),
                        key: format!("moved:{i}"),
                        ..Default::default()
                    })
                    .await
                    .expect("get");
                let got = got.into_inner();
                let label = if got.degraded {
                    "degraded".to_owned()
                } else {
                    format!("{:?}", Outcome::try_from(got.outcome).unwrap())
                };
                *outcomes.entry(label).or_default() += 1;
            }
            outcomes
        })
    };
    let seeds = cluster.seed_urls();
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for url in &seeds[..2] {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let id: String = redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async(&mut connection)
                .await
                .unwrap();
            ids.push(id);
        }
        ids
    };
    let entry = seeds[0].trim_start_matches("redis://").to_owned();
    let output = tokio::process::Command::new(redis_cli_binary())
        .args(["--cluster", "reshard", &entry])
        .args(["--cluster-from", &ids[0], "--cluster-to", &ids[1]])
        .args([
            "--cluster-slots",
            "1800",
            "--cluster-yes",
            "--cluster-pipeline",
            "50",
        ])
        .output()
        .await
        .expect("run redis-cli --cluster reshard");
    assert!(
        output.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    cluster.wait_until_ok(Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = reader.await.unwrap();
    println!("reads while 1800 slots moved: {outcomes:?}");
    assert_eq!(
        outcomes.keys().collect::<Vec<_>>(),
        ["Hit"],
        "every read during the move was a hit: {outcomes:?}"
    );
    // And every key is where the gateway can find it afterwards.
    for i in (0..3_000).step_by(7) {
        let got = client
            .get(GetRequest {
                namespace: NS.into(),
                key: format!("moved:{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.outcome, Outcome::Hit as i32, "moved:{i}: {got:?}");
    }
}
