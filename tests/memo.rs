//! The decision memo never changes an answer: the example policies decide
//! the same with and without it through the real engine; every binding
//! (rebind, rollback, canary, shadow) sees its own version's decisions; a
//! faulting input is asked again, not remembered; a decision that depends
//! on the time of day is not reused past the boundary it declared.

mod support;

use std::{collections::HashMap, sync::Arc, time::Duration};

use gateway::{
    api::proto::v1::{
        BindMode, BindPolicyRequest, FallbackMode as PbFallback, MSetRequest, PutPolicyRequest,
        RollbackRequest, SetRequest, m_set_result, policy_admin_client::PolicyAdminClient,
    },
    cache::NamespaceSettings,
    config::{Config, FallbackMode::FailOpen, StoreKind},
    policy::{
        Decider, DecisionBatch, DecisionLimits, DecisionRequest, Operation, PolicyMetrics,
        PolicyRegistry,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::json;
use support::{Backend, World, bind, policy_module};
use tonic::transport::Channel;

/// A decider over `config`'s bindings, as the gateway builds it.
fn decider(config: &Config) -> (Decider, prometheus_client::registry::Registry) {
    let registry = Arc::new(PolicyRegistry::from_config(config).expect("bindings load"));
    let mut metrics_registry = prometheus_client::registry::Registry::default();
    let metrics = PolicyMetrics::register(&mut metrics_registry);
    let limits = DecisionLimits {
        max_key_bytes: config.limits.max_key_bytes,
        max_ttl: config.policy.max_ttl,
        max_items: config.policy.max_decision_items,
    };
    (
        Decider::new(registry, limits, metrics, &config.policy),
        metrics_registry,
    )
}

fn metric(registry: &prometheus_client::registry::Registry, name: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    support::counter_sum(&text, name)
}

/// 10 000 random requests, drawn from a small space so that many repeat,
/// decided by the example policies with the memo and without, and as the
/// items of batches of 100 (one instance per policy per batch): the same
/// decisions, field for field, and the memo really answered most of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_policies_decide_the_same_with_and_without_the_memo() {
    let policies = support::example_policies();
    let mut config = support::test_config(StoreKind::Memory, None);
    for (namespace, module, policy_config) in &policies {
        bind(
            &mut config,
            namespace,
            module,
            Some(policy_config.clone()),
            FailOpen,
        );
    }
    let (with_memo, with_metrics) = decider(&config);
    let mut no_memo_config = config.clone();
    no_memo_config.policy.memo_bytes = 0;
    let (without_memo, _) = decider(&no_memo_config);

    let keys = [
        "leaderboard:weekly",
        "ref:countries",
        "country-codes",
        "profile:42",
        "settings:42",
        "user:42",
        "/Products?b=2&a=1",
        "/products?a=1&b=2",
        "product:7",
        "anything",
    ];
    let attribute_choices: [&[(&str, &str)]; 5] = [
        &[],
        &[("field", "email")],
        &[("accept-language", "en-US")],
        &[("accept-language", "fr"), ("tenant", "acme")],
        &[("tags", "product:7,category:3")],
    ];
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut compared = 0;
    const BATCH: usize = 100;
    let mut batch = DecisionBatch::default();
    let mut memo_batch = DecisionBatch::default();
    for _ in 0..10_000 {
        let (namespace, _, _) = policies.choose(&mut rng).unwrap();
        let settings = NamespaceSettings::new(namespace, &Default::default());
        let op = *[Operation::Get, Operation::Set, Operation::Delete]
            .choose(&mut rng)
            .unwrap();
        let key = format!(
            "{}{}",
            keys.choose(&mut rng).unwrap(),
            rng.random_range(0..3)
        );
        let attributes: HashMap<String, String> = attribute_choices
            .choose(&mut rng)
            .unwrap()
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let request = DecisionRequest {
            op,
            namespace,
            key: &key,
            attributes: &attributes,
            value_size: if op == Operation::Set {
                rng.random_range(0..4096)
            } else {
                0
            },
        };
        let remembered = with_memo.decide(&settings, &request, None).await;
        let asked = without_memo.decide(&settings, &request, None).await;
        // The same request as an item of a batch: decided in the instance
        // the batch's earlier items used (issue 16, item 3).
        if compared % BATCH == 0 {
            batch = DecisionBatch::default();
            memo_batch = DecisionBatch::default();
        }
        let batched = without_memo
            .decide(&settings, &request, Some(&mut batch))
            .await;
        // And through the memo, as a batch's item: a hit from the routes
        // the batch resolved at its first item.
        let batched_remembered = with_memo
            .decide(&settings, &request, Some(&mut memo_batch))
            .await;
        assert!(
            !asked.decided_by.starts_with("fail-"),
            "{namespace}/{key}: the policy faulted: {asked:?}"
        );
        assert_eq!(remembered, asked, "{namespace} {op:?} {key} {attributes:?}");
        assert_eq!(
            batched, asked,
            "batched: {namespace} {op:?} {key} {attributes:?}"
        );
        assert_eq!(
            batched_remembered, asked,
            "batched, with the memo: {namespace} {op:?} {key} {attributes:?}"
        );
        compared += 1;
    }
    drop(memo_batch);
    let hits = metric(&with_metrics, "cachegw_policy_memo_hits");
    let calls = metric(&with_metrics, "cachegw_policy_calls");
    eprintln!("{compared} decisions compared; memo: {hits} hits, {calls} policy calls");
    assert!(
        hits > 5_000,
        "the memo answered only {hits} of {compared} decisions ({calls} calls)"
    );
}

async fn set_ttl(world: &mut World, namespace: &str, key: &str) -> (u64, String) {
    let set = world
        .client
        .set(SetRequest {
            namespace: namespace.into(),
            key: key.into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("set")
        .into_inner();
    (set.ttl_ms, set.policy)
}

/// ttl-by-route's config with no rules: every key gets `ttl`.
fn rules(ttl: &str) -> serde_json::Value {
    json!({"rules": [], "default_ttl": ttl})
}

/// A gateway whose `api` namespace is bound to ttl-by-route with `rules("1m")`,
/// its admin client, and the module's version as PutPolicy stored it (for
/// rebinds, canaries and shadows with other configs).
async fn api_on_ttl_by_route() -> (World, PolicyAdminClient<Channel>, String) {
    let world = World::start_with(Backend::Memory, |config| {
        bind(config, "api", "ttl-by-route", Some(rules("1m")), FailOpen);
    })
    .await;
    let mut admin = world.gateway.admin().await;
    let module = std::fs::read(policy_module("ttl-by-route")).unwrap();
    let version = admin
        .put_policy(PutPolicyRequest {
            name: "ttl-by-route".into(),
            module: module.into(),
        })
        .await
        .expect("put")
        .into_inner()
        .version;
    (world, admin, version)
}

/// Each binding has its own memo: a rebind with another config, a rollback,
/// a canary and a shadow each see their own version's decisions, never one
/// remembered for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binding_sees_its_own_decisions() {
    let (mut world, mut admin, version) = api_on_ttl_by_route().await;
    let bind_with = |ttl: &str, mode: BindMode, percent: f64| BindPolicyRequest {
        namespace: "api".into(),
        version: version.clone(),
        config_json: rules(ttl).to_string(),
        fallback: PbFallback::FailOpen as i32,
        mode: mode as i32,
        percent,
    };

    // Remembered: the same answer twice (the second from the memo).
    for _ in 0..2 {
        assert_eq!(set_ttl(&mut world, "api", "k").await.0, 60_000);
    }
    // A rebind with another config starts from an empty memo.
    admin
        .bind_policy(bind_with("2m", BindMode::Active, 0.0))
        .await
        .expect("rebind");
    for _ in 0..2 {
        assert_eq!(set_ttl(&mut world, "api", "k").await.0, 120_000);
    }
    // A rollback brings the previous binding's decisions back.
    admin
        .rollback(RollbackRequest {
            namespace: "api".into(),
        })
        .await
        .expect("rollback");
    for _ in 0..2 {
        assert_eq!(set_ttl(&mut world, "api", "k").await.0, 60_000);
    }
    // A canary on every key decides with its own config.
    admin
        .bind_policy(bind_with("3m", BindMode::Canary, 100.0))
        .await
        .expect("canary");
    for _ in 0..2 {
        assert_eq!(set_ttl(&mut world, "api", "k").await.0, 180_000);
    }
    admin
        .bind_policy(bind_with("3m", BindMode::Canary, 0.0))
        .await
        .expect("no canary");
    // A shadow decides beside the active binding and is never applied.
    admin
        .bind_policy(bind_with("4m", BindMode::Shadow, 100.0))
        .await
        .expect("shadow");
    for _ in 0..3 {
        assert_eq!(set_ttl(&mut world, "api", "k").await.0, 60_000);
    }
    let hits = world.gateway.counter("cachegw_policy_memo_hits");
    assert!(hits >= 5, "the memo answered {hits} decisions");
}

/// The items of a batch resolve their namespace once and are routed key by
/// key: with a canary on half the keys, each item of an MSet is decided by
/// the binding a single Set of its key gets. Their memo hits are counted
/// once per batch, and exactly: a second MSet of the same 200 keys adds 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_routes_each_item_by_its_key_and_counts_its_hits() {
    let (mut world, mut admin, version) = api_on_ttl_by_route().await;
    admin
        .bind_policy(BindPolicyRequest {
            namespace: "api".into(),
            version,
            config_json: rules("3m").to_string(),
            fallback: PbFallback::FailOpen as i32,
            mode: BindMode::Canary as i32,
            percent: 50.0,
        })
        .await
        .expect("canary");

    let keys: Vec<String> = (0..200).map(|i| format!("item:{i}")).collect();
    let mut single = Vec::new();
    for key in &keys {
        single.push(set_ttl(&mut world, "api", key).await.0);
    }
    let canaried = single.iter().filter(|&&ttl| ttl == 180_000).count();
    assert!(
        (50..150).contains(&canaried),
        "the canary took {canaried} of 200 keys"
    );
    let m_set = |world: &mut World| {
        let request = MSetRequest {
            items: keys
                .iter()
                .map(|key| SetRequest {
                    namespace: "api".into(),
                    key: key.clone(),
                    value: b"v".to_vec().into(),
                    ..Default::default()
                })
                .collect(),
        };
        let mut client = world.client.clone();
        async move { client.m_set(request).await.expect("mset").into_inner() }
    };
    let hits_before = world.gateway.counter("cachegw_policy_memo_hits");
    let batched = m_set(&mut world).await;
    let ttls: Vec<u64> = batched
        .results
        .iter()
        .map(|result| match &result.result {
            Some(m_set_result::Result::Response(set)) => set.ttl_ms,
            other => panic!("an item failed: {other:?}"),
        })
        .collect();
    assert_eq!(ttls, single, "each item decided as a single Set of its key");
    // The singles left every decision in the memo: the batch's 200 items are
    // 200 hits, counted when the batch is done.
    let hits_after = world.gateway.counter("cachegw_policy_memo_hits");
    assert_eq!(hits_after - hits_before, 200);
    m_set(&mut world).await;
    assert_eq!(
        world.gateway.counter("cachegw_policy_memo_hits") - hits_after,
        200
    );
}

/// A Get writes nothing, so its decision carries neither tags nor
/// invalidations, whatever the policy named: config-counter tags every
/// decision it makes, and a Get of a key gets the storage key without the
/// tags that a Set of it keeps, asked and remembered alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gets_decision_carries_no_tags_or_invalidations() {
    let mut config = support::test_config(StoreKind::Memory, None);
    bind(
        &mut config,
        "counted",
        "config-counter",
        Some(json!({"label": "shop"})),
        FailOpen,
    );
    let (decider, metrics) = decider(&config);
    let settings = NamespaceSettings::new("counted", &Default::default());
    let attributes = HashMap::new();
    let decide = |op| {
        let request = DecisionRequest {
            op,
            namespace: "counted",
            key: "/products",
            attributes: &attributes,
            value_size: 3,
        };
        let decider = &decider;
        let settings = &settings;
        async move { decider.decide(settings, &request, None).await }
    };
    for asked in 0..2 {
        let set = decide(Operation::Set).await;
        assert!(
            set.tags.iter().any(|tag| tag == "label:shop"),
            "Set, time {asked}: {:?}",
            set.tags
        );
        let get = decide(Operation::Get).await;
        assert_eq!(get.key, "/products");
        assert!(get.tags.is_empty(), "Get, time {asked}: {:?}", get.tags);
        assert!(get.invalidate.is_none(), "Get, time {asked}");
    }
    // The second time round, both came from the memo.
    assert_eq!(metric(&metrics, "cachegw_policy_memo_hits"), 2);
}

/// A decision that faulted is not remembered: the next identical request
/// asks the policy again (and faults again), and counts a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_input_is_asked_again_not_remembered() {
    let mut world = World::start_with(Backend::Memory, |config| {
        config.policy.rollback_after_faults = 0;
        bind(config, "flaky", "hostile-flaky", None, FailOpen);
    })
    .await;
    for _ in 0..3 {
        let (_, policy) = set_ttl(&mut world, "flaky", "k").await;
        assert!(policy.starts_with("fail-open:hostile-flaky@"), "{policy}");
    }
    assert_eq!(world.gateway.counter("cachegw_policy_calls"), 3);
    assert_eq!(world.gateway.counter("cachegw_policy_faults"), 3);
    assert_eq!(world.gateway.counter("cachegw_policy_memo_hits"), 0);
}

/// business-hours' TTL depends on the time of day and it promises its
/// decision only up to the next boundary. With the boundary a few seconds
/// away: before it, the Set's decision is remembered; after it, the new
/// TTL applies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_of_day_decision_is_not_reused_past_its_boundary() {
    use std::time::{SystemTime, UNIX_EPOCH};
    // The next whole minute at least 3 s away is "opening time".
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let opening_s = (now_s + 3).div_ceil(60) * 60;
    let hhmm = |s: u64| format!("{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60);
    let policy_config = json!({
        "open": hhmm(opening_s), "close": hhmm(opening_s + 3600),
        "open_ttl": "1m", "closed_ttl": "30m",
    });
    let mut world = World::start_with(Backend::Memory, |config| {
        bind(
            config,
            "hours",
            "business-hours",
            Some(policy_config),
            FailOpen,
        );
    })
    .await;
    let closed = set_ttl(&mut world, "hours", "k").await;
    assert_eq!(closed.0, 30 * 60_000, "before opening: {closed:?}");
    assert_eq!(set_ttl(&mut world, "hours", "k").await.0, 30 * 60_000);
    assert!(
        world.gateway.counter("cachegw_policy_memo_hits") >= 1,
        "remembered before the boundary"
    );
    // Across the boundary (waiting on the clock itself, with a deadline).
    support::wait_until("opening time", Duration::from_secs(70), || async move {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            >= opening_s
    })
    .await;
    assert_eq!(
        set_ttl(&mut world, "hours", "k").await.0,
        60_000,
        "after opening, the open TTL at once"
    );
}
