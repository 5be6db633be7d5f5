//! The Stats RPC (admin API) and `cachegw stats --remote`: the last minute's
//! requests per namespace and operation, and Redis's memory facts with
//! warnings about settings that hurt a cache.

mod support;

use gateway::{
    api::proto::v1::{NamespaceStats, StatsRequest, StatsResponse},
    config::{NamespaceConfig, StoreKind},
};
use support::{RedisCluster, RedisServer, TestGateway, World, test_config};

const CACHEGW: &str = env!("CARGO_BIN_EXE_cachegw");

/// A namespace the tests declare, so its statistics carry its own name.
const NAMESPACE: &str = "shop";

/// A gateway over `redis` (or the memory store) with `shop` declared.
async fn gateway(redis: Option<&RedisServer>) -> TestGateway {
    let store = if redis.is_some() {
        StoreKind::Redis
    } else {
        StoreKind::Memory
    };
    let mut config = test_config(store, redis.map(RedisServer::url));
    config
        .namespaces
        .insert(NAMESPACE.to_owned(), NamespaceConfig::default());
    TestGateway::start(config).await
}

async fn stats(gateway: &TestGateway) -> StatsResponse {
    gateway
        .admin()
        .await
        .stats(StatsRequest {})
        .await
        .expect("Stats answers")
        .into_inner()
}

fn namespace<'a>(stats: &'a StatsResponse, name: &str) -> &'a NamespaceStats {
    stats
        .namespaces
        .iter()
        .find(|namespace| namespace.namespace == name)
        .unwrap_or_else(|| panic!("no stats for namespace {name}: {stats:#?}"))
}

/// 3 Sets, 2 Gets that hit and 1 that misses, in `shop`.
async fn known_traffic(world: &mut World) {
    for key in ["a", "b", "c"] {
        assert!(world.set(NAMESPACE, key, b"value").await.stored);
    }
    for key in ["a", "b", "absent"] {
        world.get(NAMESPACE, key).await;
    }
}

/// A [`World`] over a gateway built by [`gateway`].
async fn world(redis: Option<RedisServer>) -> World {
    let gateway = gateway(redis.as_ref()).await;
    let client = gateway.client().await;
    World {
        redis,
        gateway,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noeviction_and_no_maxmemory_are_warned_about() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]).await;
    let gateway = gateway(Some(&redis)).await;
    let stats = stats(&gateway).await;
    assert_eq!(stats.store, "redis");
    assert_eq!(stats.redis_error, "");
    let facts = stats.redis.as_ref().expect("Redis facts");
    assert_eq!(facts.maxmemory_policy, "noeviction");
    assert_eq!(facts.maxmemory, 0);
    assert!(facts.used_memory > 0 && !facts.used_memory_human.is_empty());
    assert_eq!(stats.warnings.len(), 2, "{:?}", stats.warnings);
    assert!(
        stats
            .warnings
            .iter()
            .any(|w| w.contains("maxmemory is not set")),
        "{:?}",
        stats.warnings
    );
    assert!(
        stats
            .warnings
            .iter()
            .any(|w| w.contains("noeviction") && w.contains("allkeys-lru")),
        "{:?}",
        stats.warnings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_allkeys_lru_redis_has_no_warnings() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
            .await;
    let gateway = gateway(Some(&redis)).await;
    let stats = stats(&gateway).await;
    assert_eq!(stats.redis_error, "");
    let facts = stats.redis.as_ref().expect("Redis facts");
    assert_eq!(facts.maxmemory, 64 << 20);
    assert_eq!(facts.maxmemory_policy, "allkeys-lru");
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_exactly_the_requests_made_and_the_hit_rate() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
            .await;
    let mut world = world(Some(redis)).await;
    known_traffic(&mut world).await;
    let stats = stats(&world.gateway).await;
    assert_eq!(stats.window_seconds, 60);
    let shop = namespace(&stats, NAMESPACE);
    assert!(
        (shop.hit_rate - 2.0 / 3.0).abs() < 1e-9,
        "hit rate {}",
        shop.hit_rate
    );
    let ops: Vec<&str> = shop.ops.iter().map(|op| op.op.as_str()).collect();
    assert_eq!(ops, ["get", "set"]);
    let (get, set) = (&shop.ops[0], &shop.ops[1]);
    assert_eq!(get.requests, 3);
    assert_eq!(get.outcomes.len(), 2, "{:?}", get.outcomes);
    assert_eq!((get.outcomes["hit"], get.outcomes["miss"]), (2, 1));
    assert_eq!(set.requests, 3);
    assert_eq!(set.outcomes.len(), 1, "{:?}", set.outcomes);
    assert_eq!(set.outcomes["done"], 3);
    for op in [get, set] {
        assert!(
            op.p50_ms > 0.0 && op.p50_ms <= op.p99_ms,
            "{}: p50 {} p99 {}",
            op.op,
            op.p50_ms,
            op.p99_ms
        );
    }
    // The three entries carry a TTL.
    let facts = stats.redis.as_ref().expect("Redis facts");
    assert!(facts.keys >= 3 && facts.keys_with_ttl >= 3, "{facts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_answers_without_redis_facts() {
    let mut world = world(None).await;
    known_traffic(&mut world).await;
    let stats = stats(&world.gateway).await;
    assert_eq!(stats.store, "memory");
    assert!(stats.redis.is_none());
    assert_eq!(stats.redis_error, "");
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    let shop = namespace(&stats, NAMESPACE);
    assert!((shop.hit_rate - 2.0 / 3.0).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_stats_still_reports_the_namespaces() {
    let redis = RedisServer::start().await;
    let mut world = world(Some(redis)).await;
    known_traffic(&mut world).await;
    if let Some(redis) = world.redis.as_mut() {
        redis.kill();
    }
    let stats = stats(&world.gateway).await;
    assert_eq!(stats.store, "redis");
    assert!(stats.redis.is_none());
    assert!(
        stats.redis_error.contains("cannot read Redis INFO"),
        "{}",
        stats.redis_error
    );
    assert_eq!(namespace(&stats, NAMESPACE).ops.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_command_prints_the_namespaces_and_the_warnings() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]).await;
    let mut world = world(Some(redis)).await;
    known_traffic(&mut world).await;
    let admin = world.gateway.admin_addr.to_string();

    let text = run_cachegw(&["stats", "--remote", &admin]).await;
    assert!(text.status.success(), "{text:?}");
    let stdout = String::from_utf8_lossy(&text.stdout);
    let get = stdout
        .lines()
        .find(|line| line.starts_with(NAMESPACE) && line.contains(" get "))
        .unwrap_or_else(|| panic!("no get row for {NAMESPACE}:\n{stdout}"));
    assert!(
        get.contains("66.7%") && get.contains("hit=2 miss=1"),
        "{stdout}"
    );
    assert!(stdout.contains("maxmemory-policy:  noeviction"), "{stdout}");
    assert!(stdout.contains("WARNINGS"), "{stdout}");
    assert!(stdout.contains("RESOURCE_EXHAUSTED"), "{stdout}");

    let json = run_cachegw(&["stats", "--remote", &admin, "--json"]).await;
    assert!(json.status.success(), "{json:?}");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(report["store"], "redis");
    let shop = report["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["namespace"] == NAMESPACE))
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(shop["ops"][0]["outcomes"]["hit"], 2);
    assert_eq!(report["redis"]["maxmemory_policy"], "noeviction");
    assert_eq!(report["warnings"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_command_exits_non_zero_with_the_status_of_a_failed_call() {
    // The data API's listener serves no PolicyAdmin: the call is refused.
    let world = world(None).await;
    let data = world.gateway.addr.to_string();
    let output = run_cachegw(&["stats", "--remote", &data]).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Unimplemented"), "{stderr}");
}

#[tokio::test]
async fn the_stats_command_fails_when_the_gateway_cannot_be_reached() {
    let (_refusing, port) = support::refusing_port();
    let nobody = format!("127.0.0.1:{port}");
    let output = run_cachegw(&["stats", "--remote", &nobody]).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
}

/// Runs `cachegw ARGS` to completion (without blocking the runtime the test
/// gateway serves on).
async fn run_cachegw(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(CACHEGW)
        .args(args)
        .env_remove("CACHEGW_CONFIG")
        .output()
        .await
        .expect("run cachegw")
}

/// On a Redis Cluster the facts are every primary's, totalled, and a warning
/// names the primaries it concerns (not just the seed's facts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_facts_total_every_primary_and_warnings_name_them() {
    let cluster = RedisCluster::start(3, 0).await;
    let primaries: Vec<&RedisServer> = cluster.nodes.iter().take(3).collect();
    // Only the first primary is set up as a cache should be.
    let mut bounded = primaries[0].connection().await;
    for (setting, value) in [("maxmemory", "64mb"), ("maxmemory-policy", "allkeys-lru")] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(setting)
            .arg(value)
            .exec_async(&mut bounded)
            .await
            .unwrap();
    }
    let mut config = cluster.config();
    config
        .namespaces
        .insert(NAMESPACE.to_owned(), NamespaceConfig::default());
    let gateway = TestGateway::start(config).await;
    let client = gateway.client().await;
    let mut world = World {
        redis: None,
        gateway,
        client,
    };
    for key in 0..60 {
        assert!(world.set(NAMESPACE, &format!("k{key}"), b"v").await.stored);
    }
    let stats = stats(&world.gateway).await;
    assert_eq!(stats.redis_error, "");
    let facts = stats.redis.as_ref().expect("Redis facts");
    assert_eq!(facts.nodes, 3);

    // Nothing writes meanwhile: every primary's own count adds up to it.
    let mut keys_on_primaries = 0;
    for primary in &primaries {
        let mut connection = primary.connection().await;
        let size: u64 = redis::cmd("DBSIZE")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(
            size > 0,
            "60 keys and the namespace state spread over every primary"
        );
        keys_on_primaries += size;
    }
    assert_eq!(facts.keys, keys_on_primaries, "{facts:?}");
    assert!(facts.keys >= 60 && facts.keys_with_ttl >= 60, "{facts:?}");
    assert_eq!(facts.maxmemory, 0, "two primaries have no limit: {facts:?}");
    assert_eq!(facts.maxmemory_policy, "allkeys-lru,noeviction");

    let address = |server: &RedisServer| server.url().trim_start_matches("redis://").to_owned();
    let unbounded = stats
        .warnings
        .iter()
        .find(|warning| warning.contains("maxmemory is not set"))
        .unwrap_or_else(|| panic!("{:?}", stats.warnings));
    assert!(
        !unbounded.contains(&address(primaries[0]))
            && unbounded.contains(&address(primaries[1]))
            && unbounded.contains(&address(primaries[2])),
        "the warning names the two unbounded primaries, not the bounded one: {unbounded}"
    );
}

/// An MGet's items are counted one by one, each under its own namespace and
/// outcome, although a batch is counted at once: interleaved namespaces,
/// hits and misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_counts_every_item_under_its_namespace_and_outcome() {
    use gateway::api::proto::v1::{GetRequest, MGetRequest};
    const OTHER: &str = "elsewhere"; // admitted by the template: `_default`
    let redis = RedisServer::start().await;
    let mut world = world(Some(redis)).await;
    for key in ["a", "b"] {
        assert!(world.set(NAMESPACE, key, b"value").await.stored);
    }
    assert!(world.set(OTHER, "a", b"value").await.stored);
    let items = [
        (NAMESPACE, "a"),
        (OTHER, "a"),
        (NAMESPACE, "b"),
        (NAMESPACE, "absent"),
        (OTHER, "absent"),
        (OTHER, "absent too"),
        (NAMESPACE, "a"),
    ]
    .map(|(namespace, key)| GetRequest {
        namespace: namespace.into(),
        key: key.into(),
        ..Default::default()
    });
    let got = world
        .client
        .m_get(MGetRequest {
            items: items.to_vec(),
        })
        .await
        .expect("mget")
        .into_inner();
    assert_eq!(got.results.len(), items.len());

    let stats = stats(&world.gateway).await;
    for (name, hits, misses) in [(NAMESPACE, 3, 1), ("_default", 1, 2)] {
        let get = namespace(&stats, name)
            .ops
            .iter()
            .find(|op| op.op == "get")
            .unwrap_or_else(|| panic!("no Gets in {name}: {stats:#?}"));
        assert_eq!(get.requests, hits + misses, "{name}: {get:?}");
        assert_eq!(
            (get.outcomes["hit"], get.outcomes["miss"]),
            (hits, misses),
            "{name}: {get:?}"
        );
    }
    let metrics = world.gateway.metrics.encode();
    for (name, outcome, count) in [
        (NAMESPACE, "hit", 3),
        (NAMESPACE, "miss", 1),
        ("_default", "hit", 1),
        ("_default", "miss", 2),
    ] {
        let series = format!(
            r#"cachegw_requests_total{{op="get",namespace="{name}",outcome="{outcome}"}} {count}"#
        );
        assert!(
            metrics.lines().any(|line| line == series),
            "{series} missing from:\n{metrics}"
        );
    }
}
