//! The near-cache (L1): three gateways over one Redis with `[near_cache]`
//! on, bound to `surrogate-keys` with a near TTL of 30 s. After a write or
//! an invalidation acknowledged by one gateway, the others stop serving the
//! old value within the bus's delivery time (measured here; far below the
//! near TTL, which is what they would serve it for without the bus); a lost
//! subscription drops the near-cache; entries a policy does not mark
//! eligible are never served from it.

mod support;

use std::time::{Duration, Instant};

use gateway::{
    Config,
    api::proto::v1::{
        DeleteRequest, GetRequest, GetResponse, InvalidateRequest, JobState, KeyList, Outcome,
        SetRequest, TagList, cache_client::CacheClient, invalidate_request::Target,
    },
    config::{FallbackMode, StoreKind},
};
use redis::aio::MultiplexedConnection;
use support::{RedisServer, TestGateway, bind, gauge, test_config, wait_until};
use tonic::transport::Channel;

/// The near TTL the policy asks for: what a gateway would serve a stale
/// value for if the invalidation did not reach it.
const NEAR_TTL: &str = "30s";
/// Namespace whose Gets are near-cached.
const HOT: &str = "hot";
/// Namespace bound to the same policy without a near TTL.
const PLAIN: &str = "plain";
/// Every trial must converge well within this (the test fails if the bus
/// does not work: the old value would be served for the whole near TTL).
const BOUND: Duration = Duration::from_secs(1);

fn config(redis: &RedisServer) -> Config {
    let mut config = test_config(StoreKind::Redis, Some(redis.url()));
    config.near_cache.enabled = true;
    config.near_cache.max_ttl = Duration::from_secs(60);
    config.near_cache.heartbeat = Duration::from_millis(200);
    // Not under test here, and its own pub/sub connection would only add noise.
    config.policy.sync_through_redis = false;
    bind(
        &mut config,
        HOT,
        "surrogate-keys",
        Some(serde_json::json!({"ttl": "5m", "near": NEAR_TTL})),
        FallbackMode::FailOpen,
    );
    bind(
        &mut config,
        PLAIN,
        "surrogate-keys",
        Some(serde_json::json!({"ttl": "5m"})),
        FallbackMode::FailOpen,
    );
    config
}

struct Node {
    gateway: TestGateway,
    client: CacheClient<Channel>,
}

impl Node {
    async fn start(redis: &RedisServer) -> Self {
        let gateway = TestGateway::start(config(redis)).await;
        let client = gateway.client().await;
        let node = Node { gateway, client };
        node.wait_coherent().await;
        node
    }

    async fn wait_coherent(&self) {
        let metrics = self.gateway.metrics.clone();
        wait_until(
            "the near-cache to subscribe",
            Duration::from_secs(10),
            || {
                let text = metrics.encode();
                async move { gauge(&text, "cachegw_near_cache_coherent") == 1 }
            },
        )
        .await;
    }

    fn near_hits(&self) -> u64 {
        labelled(
            &self.gateway.metrics.encode(),
            "cachegw_near_cache_lookups_total",
            "hit",
        )
    }

    async fn get(&mut self, namespace: &str, key: &str) -> GetResponse {
        self.client
            .get(GetRequest {
                namespace: namespace.into(),
                key: key.into(),
                ..Default::default()
            })
            .await
            .expect("get")
            .into_inner()
    }

    async fn set(&mut self, namespace: &str, key: &str, value: &str, tags: &str) {
        let mut request = SetRequest {
            namespace: namespace.into(),
            key: key.into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        };
        request
            .attributes
            .insert("surrogate-key".into(), tags.into());
        let response = self.client.set(request).await.expect("set").into_inner();
        assert!(response.stored && !response.degraded, "{response:?}");
    }

    /// Reads `key` until it is in this gateway's near-cache with `value`
    /// (a near hit is counted for it).
    async fn prime(&mut self, key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = self.near_hits();
            let found = self.get(HOT, key).await;
            if found.value == value.as_bytes() && self.near_hits() > before {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{key} never came from the near-cache"
            );
        }
    }
}

/// The sample of `name` with label `outcome="..."`, from the metrics text.
fn labelled(text: &str, name: &str, outcome: &str) -> u64 {
    let prefix = format!("{name}{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// What a trial changes on the writing gateway.
#[derive(Debug, Clone, Copy)]
enum Change {
    Overwrite,
    Delete,
    InvalidateKey,
    InvalidateTag,
    InvalidatePattern,
    InvalidateNamespace,
}

async fn invalidate(node: &mut Node, target: Target) {
    let response = node
        .client
        .invalidate(InvalidateRequest {
            namespace: HOT.into(),
            target: Some(target),
            wait_ms: 5_000,
            ..Default::default()
        })
        .await
        .expect("invalidate")
        .into_inner();
    assert_eq!(response.state(), JobState::Done, "{response:?}");
}

/// One trial: `key` holds `old` in every reader's near-cache; `writer`
/// applies `change`; returns how long after its acknowledgement the last
/// reader stopped serving `old`.
async fn trial(nodes: &mut [Node], key: &str, old: &str, new: &str, change: Change) -> Duration {
    let tag = format!("t-{key}");
    let (writer, readers) = nodes.split_first_mut().expect("three gateways");
    writer.set(HOT, key, old, &tag).await;
    for reader in readers.iter_mut() {
        reader.prime(key, old).await;
    }
    match change {
        Change::Overwrite => writer.set(HOT, key, new, &tag).await,
        Change::Delete => {
            let response = writer
                .client
                .delete(DeleteRequest {
                    namespace: HOT.into(),
                    key: key.into(),
                    ..Default::default()
                })
                .await
                .expect("delete")
                .into_inner();
            assert!(response.deleted, "{response:?}");
        }
        Change::InvalidateKey => {
            let keys = KeyList {
                keys: vec![key.into()],
            };
            invalidate(writer, Target::Keys(keys)).await;
        }
        Change::InvalidateTag => {
            invalidate(writer, Target::Tags(TagList { tags: vec![tag] })).await;
        }
        Change::InvalidatePattern => {
            invalidate(writer, Target::Pattern(format!("{key}*"))).await;
        }
        Change::InvalidateNamespace => invalidate(writer, Target::WholeNamespace(true)).await,
    }
    let acknowledged = Instant::now();
    for reader in readers.iter_mut() {
        loop {
            let found = reader.get(HOT, key).await;
            let converged = match change {
                Change::Overwrite => found.value == new.as_bytes(),
                _ => found.outcome() == Outcome::Miss,
            };
            if converged {
                break;
            }
            assert_eq!(found.value, old.as_bytes(), "only the old or the new value");
            assert!(
                acknowledged.elapsed() < BOUND,
                "{change:?} of {key}: a gateway still served the old value {:?} after the write was acknowledged",
                acknowledged.elapsed()
            );
        }
    }
    acknowledged.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gateway_serves_an_old_value_after_a_write_is_acknowledged() {
    let redis = RedisServer::start().await;
    let mut nodes = vec![
        Node::start(&redis).await,
        Node::start(&redis).await,
        Node::start(&redis).await,
    ];
    let plan = [
        (Change::Overwrite, 100),
        (Change::Delete, 20),
        (Change::InvalidateKey, 20),
        (Change::InvalidateTag, 20),
        (Change::InvalidatePattern, 20),
        (Change::InvalidateNamespace, 20),
    ];
    let mut all = Vec::new();
    for (change, trials) in plan {
        let mut staleness = Vec::with_capacity(trials);
        for i in 0..trials {
            let key = format!("{change:?}-{i}");
            // The writer rotates, so each gateway publishes and each receives.
            nodes.rotate_left(1);
            staleness.push(trial(&mut nodes, &key, "old", "new", change).await);
        }
        staleness.sort();
        println!(
            "near-cache staleness, {change:?} ({trials} trials, 2 readers): max {:?}, p99 {:?}, p50 {:?}",
            staleness[staleness.len() - 1],
            percentile(&staleness, 0.99),
            percentile(&staleness, 0.5),
        );
        all.extend(staleness);
    }
    all.sort();
    println!(
        "near-cache staleness, all {} trials: max {:?}, p99 {:?}, p50 {:?}",
        all.len(),
        all[all.len() - 1],
        percentile(&all, 0.99),
        percentile(&all, 0.5),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_serves_without_the_store_and_only_what_is_eligible() {
    let redis = RedisServer::start().await;
    let mut node = Node::start(&redis).await;
    node.set(HOT, "k", "v", "").await;
    node.set(PLAIN, "k", "v", "").await;
    node.prime("k", "v").await;
    assert_eq!(node.get(PLAIN, "k").await.value, &b"v"[..]);
    // Behind the gateways' back (no announcement): Redis forgets everything.
    flush_all(&mut redis.connection().await).await;
    let hits = node.near_hits();
    let hot = node.get(HOT, "k").await;
    assert_eq!((hot.outcome(), &hot.value[..]), (Outcome::Hit, &b"v"[..]));
    assert_eq!(node.near_hits(), hits + 1, "served by the near-cache");
    let plain = node.get(PLAIN, "k").await;
    assert_eq!(
        plain.outcome(),
        Outcome::Miss,
        "not eligible: read from Redis"
    );
    assert_eq!(node.near_hits(), hits + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_drops_the_near_cache_until_it_is_back() {
    let redis = RedisServer::start().await;
    let mut node = Node::start(&redis).await;
    let mut admin = redis.connection().await;
    node.set(HOT, "k", "v", "").await;
    node.prime("k", "v").await;
    flush_all(&mut admin).await;
    assert_eq!(
        node.get(HOT, "k").await.value,
        &b"v"[..],
        "still in the near-cache"
    );

    let killed_at = Instant::now();
    let killed = kill_named(&mut admin, "cachegw-l1").await;
    assert_eq!(killed, 1, "one subscriber connection, named");
    let metrics = node.gateway.metrics.clone();
    wait_until(
        "the near-cache to be dropped",
        Duration::from_secs(5),
        || {
            let text = metrics.encode();
            async move { support::counter_sum(&text, "cachegw_near_cache_dropped") == 1 }
        },
    )
    .await;
    // Dropped: what Redis forgot is forgotten here too.
    assert_eq!(node.get(HOT, "k").await.outcome(), Outcome::Miss);
    node.wait_coherent().await;
    println!(
        "near-cache: dropped and resubscribed {:?} after CLIENT KILL",
        killed_at.elapsed()
    );
    assert_eq!(node.get(HOT, "k").await.outcome(), Outcome::Miss);
    node.set(HOT, "k", "v2", "").await;
    node.prime("k", "v2").await;
}

async fn flush_all(admin: &mut MultiplexedConnection) {
    redis::cmd("FLUSHALL")
        .exec_async(admin)
        .await
        .expect("FLUSHALL");
}

/// `CLIENT KILL ID` for every connection named `name`; how many.
async fn kill_named(admin: &mut MultiplexedConnection, name: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(admin)
        .await
        .expect("CLIENT LIST");
    let needle = format!(" name={name} ");
    let ids: Vec<String> = list
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| {
            line.strip_prefix("id=")?
                .split(' ')
                .next()
                .map(str::to_owned)
        })
        .collect();
    for id in &ids {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .exec_async(admin)
            .await
            .expect("CLIENT KILL ID");
    }
    ids.len()
}
