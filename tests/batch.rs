//! One policy instance per batch (issue 16, item 3): the items of an MGet,
//! an MSet or an Invalidate by keys are decided one after another in one
//! instance of each policy they reach, not one instance per item; each item
//! still has its own deadline, and an item that faults takes the instance
//! with it, so the next item is decided in a fresh one.
//!
//! `cachegw_policy_calls_total` counts decisions, `cachegw_policy_instances_total`
//! the instances created for them. The memo is off in these gateways, so
//! every item is a policy call.

mod support;

use gateway::{
    api::proto::v1::{
        GetRequest, InvalidateRequest, KeyList, MGetRequest, MSetRequest, SetRequest,
        invalidate_request, m_get_result, m_set_result,
    },
    config::FallbackMode::FailOpen,
};
use support::{Backend, World, bind};

const ITEMS: usize = 100;

fn policy_counters(world: &World) -> (u64, u64) {
    (
        world.gateway.counter("cachegw_policy_calls"),
        world.gateway.counter("cachegw_policy_instances"),
    )
}

async fn routes_world() -> World {
    World::start_with(Backend::Redis, |config| {
        config.policy.memo_bytes = 0;
        bind(config, "routes", "ttl-by-route", None, FailOpen);
        bind(config, "plain-routes", "ttl-by-route", None, FailOpen);
    })
    .await
}

fn set_item(namespace: &str, key: String) -> SetRequest {
    SetRequest {
        namespace: namespace.into(),
        key,
        value: b"v".to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mset_and_an_mget_decide_all_their_items_in_one_instance() {
    let mut world = routes_world().await;
    let keys: Vec<String> = (0..ITEMS)
        .map(|i| match i % 3 {
            0 => format!("leaderboard:{i}"),
            1 => format!("country-codes:{i}"),
            _ => format!("session:{i}"),
        })
        .collect();

    let before = policy_counters(&world);
    let written = world
        .client
        .m_set(MSetRequest {
            items: keys
                .iter()
                .map(|key| set_item("routes", key.clone()))
                .collect(),
        })
        .await
        .expect("mset")
        .into_inner();
    let after_set = policy_counters(&world);
    assert_eq!(
        (after_set.0 - before.0, after_set.1 - before.1),
        (ITEMS as u64, 1),
        "(calls, instances) of an MSet of {ITEMS} items"
    );
    // Each item got its own decision: the TTL its key's rule gives.
    for (key, result) in keys.iter().zip(&written.results) {
        let Some(m_set_result::Result::Response(set)) = &result.result else {
            panic!("{key}: {result:?}");
        };
        let expected = if key.starts_with("leaderboard:") {
            60_000
        } else if key.starts_with("country-codes") {
            86_400_000
        } else {
            300_000
        };
        assert!(
            set.stored && set.policy.starts_with("ttl-by-route@"),
            "{key}: {set:?}"
        );
        assert_eq!(set.ttl_ms, expected, "{key}");
    }

    let read = world
        .client
        .m_get(MGetRequest {
            items: keys
                .iter()
                .map(|key| GetRequest {
                    namespace: "routes".into(),
                    key: key.clone(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("mget")
        .into_inner();
    let after_get = policy_counters(&world);
    assert_eq!(
        (after_get.0 - after_set.0, after_get.1 - after_set.1),
        (ITEMS as u64, 1),
        "(calls, instances) of an MGet of {ITEMS} items"
    );
    for (key, result) in keys.iter().zip(&read.results) {
        let Some(m_get_result::Result::Response(got)) = &result.result else {
            panic!("{key}: {result:?}");
        };
        assert_eq!(got.value.as_ref(), b"v", "{key}");
    }

    // Single requests still get a fresh instance each.
    for key in keys.iter().take(3) {
        world
            .client
            .get(GetRequest {
                namespace: "routes".into(),
                key: key.clone(),
                ..Default::default()
            })
            .await
            .expect("get");
    }
    let after_singles = policy_counters(&world);
    assert_eq!(
        (after_singles.0 - after_get.0, after_singles.1 - after_get.1),
        (3, 3),
        "(calls, instances) of three Gets"
    );
}

/// A batch spanning two namespaces bound to the same module uses one
/// instance per binding; an Invalidate by keys shares one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binding_of_a_batch_gets_its_own_instance() {
    let mut world = routes_world().await;
    let before = policy_counters(&world);
    world
        .client
        .m_set(MSetRequest {
            items: (0..ITEMS)
                .map(|i| {
                    let namespace = if i % 2 == 0 { "routes" } else { "plain-routes" };
                    set_item(namespace, format!("k{i}"))
                })
                .collect(),
        })
        .await
        .expect("mset");
    let after_set = policy_counters(&world);
    assert_eq!(
        (after_set.0 - before.0, after_set.1 - before.1),
        (ITEMS as u64, 2),
        "(calls, instances) of an MSet over two bindings"
    );

    let invalidated = world
        .client
        .invalidate(InvalidateRequest {
            namespace: "routes".into(),
            target: Some(invalidate_request::Target::Keys(KeyList {
                keys: (0..ITEMS).step_by(2).map(|i| format!("k{i}")).collect(),
            })),
            ..Default::default()
        })
        .await
        .expect("invalidate")
        .into_inner();
    assert_eq!(invalidated.affected, (ITEMS / 2) as u64, "{invalidated:?}");
    let after_invalidate = policy_counters(&world);
    assert_eq!(
        (
            after_invalidate.0 - after_set.0,
            after_invalidate.1 - after_set.1
        ),
        ((ITEMS / 2) as u64, 1),
        "(calls, instances) of an Invalidate of {} keys",
        ITEMS / 2
    );
}

/// hostile-flaky decides its dry-run probe keys and panics on any other:
/// in a batch alternating the two, every panic discards the instance, and
/// the next item is decided, correctly, in a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_faults_takes_the_instance_and_the_next_starts_fresh() {
    let mut world = World::start_with(Backend::Redis, |config| {
        config.policy.memo_bytes = 0;
        config.policy.rollback_after_faults = 1_000;
        bind(config, "flaky", "hostile-flaky", None, FailOpen);
    })
    .await;
    const PAIRS: usize = 10;
    let keys: Vec<String> = (0..PAIRS)
        .flat_map(|i| [format!("cachegw-dry-run:{i}"), format!("user:{i}")])
        .collect();
    let before = policy_counters(&world);
    let faults_before = world.gateway.counter("cachegw_policy_faults");
    let written = world
        .client
        .m_set(MSetRequest {
            items: keys
                .iter()
                .map(|key| set_item("flaky", key.clone()))
                .collect(),
        })
        .await
        .expect("mset")
        .into_inner();
    let after = policy_counters(&world);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (2 * PAIRS as u64, PAIRS as u64),
        "(calls, instances): one instance per probe, each lost to the panic after it"
    );
    assert_eq!(
        world.gateway.counter("cachegw_policy_faults") - faults_before,
        PAIRS as u64
    );
    for (key, result) in keys.iter().zip(&written.results) {
        let Some(m_set_result::Result::Response(set)) = &result.result else {
            panic!("{key}: {result:?}");
        };
        assert!(set.stored, "{key}: {set:?}");
        if key.starts_with("cachegw-dry-run:") {
            assert!(set.policy.starts_with("hostile-flaky@"), "{key}: {set:?}");
        } else {
            assert!(
                set.policy.starts_with("fail-open:hostile-flaky@"),
                "{key}: {set:?}"
            );
        }
    }
}
