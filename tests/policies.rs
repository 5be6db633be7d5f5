//! WebAssembly policies in the request path, end to end: the example policies
//! compiled to wasm (policies/dist), loaded by a real gateway, exercised
//! through gRPC, against both stores; and the hostile policies, which must
//! never fail a client's request.

mod support;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use gateway::{
    api::proto::v1::{DeleteRequest, GetRequest, GetResponse, Outcome, SetRequest, SetResponse},
    config::FallbackMode::{self, FailClosed, FailOpen},
};
use serde_json::json;
use support::{Backend, World, bind};

fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn set_with(
    world: &mut World,
    namespace: &str,
    key: &str,
    value: &[u8],
    attributes: &[(&str, &str)],
) -> SetResponse {
    world
        .client
        .set(SetRequest {
            namespace: namespace.into(),
            key: key.into(),
            value: value.to_vec().into(),
            attributes: attrs(attributes),
            ..Default::default()
        })
        .await
        .expect("set")
        .into_inner()
}

async fn get_with(
    world: &mut World,
    namespace: &str,
    key: &str,
    attributes: &[(&str, &str)],
) -> GetResponse {
    world
        .client
        .get(GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: attrs(attributes),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
}

/// Remaining TTL of an entry: Redis PTTL where there is Redis, else the
/// gateway's own ttl_remaining_ms.
async fn remaining_ttl_ms(world: &mut World, namespace: &str, key: &str) -> i64 {
    if let Some(redis) = &world.redis {
        let mut connection = redis.connection().await;
        redis::cmd("PTTL")
            .arg(format!("cg:{{{namespace}:0:{key}}}"))
            .query_async(&mut connection)
            .await
            .unwrap()
    } else {
        get_with(world, namespace, key, &[]).await.ttl_remaining_ms as i64
    }
}

on_both_stores!(
    ttl_by_route_gives_each_route_its_ttl,
    user_profile_email_change_invalidates_that_users_entries_only,
    tenant_keying_normalises_varies_and_bypasses,
    decisions_cannot_reach_another_namespace,
);

async fn ttl_by_route_gives_each_route_its_ttl(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        bind(config, "routes", "ttl-by-route", None, FailOpen);
        config.namespaces.get_mut("routes").unwrap().default_ttl = Duration::from_secs(120);
    })
    .await;
    let leaderboard = set_with(&mut world, "routes", "leaderboard:weekly", b"[1,2,3]", &[]).await;
    assert!(
        leaderboard.stored && leaderboard.policy.starts_with("ttl-by-route@"),
        "{leaderboard:?}"
    );
    assert_eq!(leaderboard.ttl_ms, 60_000);
    let countries = set_with(
        &mut world,
        "routes",
        "country-codes",
        b"{\"FR\":\"France\"}",
        &[],
    )
    .await;
    assert_eq!(countries.ttl_ms, 24 * 3600 * 1000);
    let other = set_with(&mut world, "routes", "article:7", b"text", &[]).await;
    assert_eq!(other.ttl_ms, 120_000, "no rule: the namespace default");

    let pttl = remaining_ttl_ms(&mut world, "routes", "leaderboard:weekly").await;
    assert!(pttl > 55_000 && pttl <= 60_000, "leaderboard PTTL {pttl}");
    let pttl = remaining_ttl_ms(&mut world, "routes", "country-codes").await;
    assert!(
        pttl > 86_390_000 && pttl <= 86_400_000,
        "country-codes PTTL {pttl}"
    );

    let got = get_with(&mut world, "routes", "leaderboard:weekly", &[]).await;
    assert_eq!(
        (got.outcome, got.value.as_ref()),
        (Outcome::Hit as i32, &b"[1,2,3]"[..])
    );
    assert_eq!(got.policy, leaderboard.policy);

    // Rules come from the binding's config.
    let mut world = World::start_with(backend, |config| {
        let rules = json!({"rules": [{"prefix": "hot:", "ttl": "7s"}], "default_ttl": "9s"});
        bind(config, "custom", "ttl-by-route", Some(rules), FailOpen);
    })
    .await;
    assert_eq!(
        set_with(&mut world, "custom", "hot:item", b"v", &[])
            .await
            .ttl_ms,
        7_000
    );
    assert_eq!(
        set_with(&mut world, "custom", "cold:item", b"v", &[])
            .await
            .ttl_ms,
        9_000
    );
}

async fn user_profile_email_change_invalidates_that_users_entries_only(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        bind(config, "users", "user-profile", None, FailOpen)
    })
    .await;
    let seeded = [
        ("profile:42:name", true),
        ("profile:42:avatar", true),
        ("settings:42:theme", true),
        ("settings:42:locale", true),
        ("profile:43:name", false),
        ("settings:43:theme", false),
        ("profile:420:name", false),
        ("profile:4:name", false),
        ("sessions:42:token", false),
    ];
    for (key, _) in seeded {
        assert!(
            set_with(&mut world, "users", key, b"v", &[]).await.stored,
            "{key}"
        );
    }
    // The same keys in another namespace must survive too.
    for (key, _) in seeded {
        assert!(world.set("others", key, b"v").await.stored);
    }

    let changed = set_with(
        &mut world,
        "users",
        "profile:42",
        b"{\"email\":\"new@example.com\"}",
        &[("field", "email")],
    )
    .await;
    assert!(changed.stored, "{changed:?}");
    assert_eq!(changed.invalidated, 4, "{changed:?}");
    assert_eq!(changed.invalidation_error, "");

    for (key, removed) in seeded {
        let expected = if removed { Outcome::Miss } else { Outcome::Hit };
        assert_eq!(
            get_with(&mut world, "users", key, &[]).await.outcome,
            expected as i32,
            "{key}"
        );
        assert_eq!(
            world.get("others", key).await.outcome,
            Outcome::Hit as i32,
            "others/{key}"
        );
    }
    assert_eq!(
        get_with(&mut world, "users", "profile:42", &[])
            .await
            .outcome,
        Outcome::Hit as i32
    );

    // A write that is not an email change invalidates nothing.
    assert!(
        set_with(&mut world, "users", "profile:43:name", b"v2", &[])
            .await
            .invalidated
            == 0
    );
    assert_eq!(
        get_with(&mut world, "users", "settings:43:theme", &[])
            .await
            .outcome,
        Outcome::Hit as i32
    );
}

async fn tenant_keying_normalises_varies_and_bypasses(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        bind(
            config,
            "pages",
            "tenant-keying",
            Some(json!({"vary": ["accept-language"]})),
            FailOpen,
        );
    })
    .await;
    let en = [("accept-language", "en-US")];
    let fr = [("accept-language", "fr")];
    let set = set_with(
        &mut world,
        "pages",
        "/Products?b=2&a=1",
        b"english page",
        &en,
    )
    .await;
    assert!(set.stored, "{set:?}");

    // Another spelling of the same URL finds the same entry...
    let got = get_with(
        &mut world,
        "pages",
        "/products?a=1&b=2",
        &[("accept-language", "EN-us")],
    )
    .await;
    assert_eq!(
        (got.outcome, got.value.as_ref()),
        (Outcome::Hit as i32, &b"english page"[..])
    );
    // ...but another language is another entry.
    assert_eq!(
        get_with(&mut world, "pages", "/products?a=1&b=2", &fr)
            .await
            .outcome,
        Outcome::Miss as i32
    );
    assert!(
        set_with(
            &mut world,
            "pages",
            "/products?a=1&b=2",
            b"page francaise",
            &fr
        )
        .await
        .stored
    );
    let got = get_with(&mut world, "pages", "/PRODUCTS?b=2&a=1", &fr).await;
    assert_eq!(got.value, &b"page francaise"[..]);
    let got = get_with(&mut world, "pages", "/products?a=1&b=2", &en).await;
    assert_eq!(got.value, &b"english page"[..]);
    if let Some(count) = world.redis_key_count().await {
        assert_eq!(count, 2, "one entry per language");
    }

    // no-store: not written, and not read either.
    let no_store = [
        ("accept-language", "en-US"),
        ("cache-control", "private, no-store"),
    ];
    let set = set_with(&mut world, "pages", "/account", b"secret", &no_store).await;
    assert!(!set.stored && !set.degraded, "{set:?}");
    assert_eq!(
        get_with(&mut world, "pages", "/account", &en).await.outcome,
        Outcome::Miss as i32
    );
    let got = get_with(&mut world, "pages", "/products?a=1&b=2", &no_store).await;
    assert_eq!(
        got.outcome,
        Outcome::Miss as i32,
        "no-store reads bypass the cache"
    );
    assert!(!got.degraded);
    assert_eq!(world.gateway.counter("cachegw_policy_faults"), 0);
}

async fn decisions_cannot_reach_another_namespace(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        bind(config, "attacker", "hostile-escape", None, FailOpen);
        // The victim tags its entries `shared`, the tag the attacker also
        // attaches and then invalidates.
        bind(
            config,
            "victim",
            "surrogate-keys",
            Some(serde_json::json!({"ttl": "10m"})),
            FailOpen,
        );
    })
    .await;
    for key in ["secret", "other"] {
        let set = set_with(
            &mut world,
            "victim",
            key,
            b"victim's",
            &[("surrogate-key", "shared")],
        )
        .await;
        assert!(set.stored, "{set:?}");
    }
    // The decision names `cg:victim:secret` and asks to invalidate it: both land in
    // the attacker's own namespace (the write, then its own invalidation, which
    // removes exactly that one entry).
    for key in ["secret", "other"] {
        let set = set_with(&mut world, "attacker", key, b"attacker's", &[]).await;
        assert!(
            set.stored && set.invalidated == 1 && set.invalidation_error.is_empty(),
            "{set:?}"
        );
    }
    if let Some(redis) = &world.redis {
        // Something of the attacker's own for its `*` pattern to find.
        let mut connection = redis.connection().await;
        redis::cmd("SET")
            .arg("cg:{attacker:0:seed}")
            .arg("x")
            .exec_async(&mut connection)
            .await
            .unwrap();
    }
    let deleted = world
        .client
        .delete(DeleteRequest {
            namespace: "attacker".into(),
            key: "x".into(),
            attributes: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.invalidation_error.is_empty(), "{deleted:?}");
    if world.redis.is_some() {
        assert_eq!(
            deleted.invalidated, 1,
            "the `*` pattern ran, inside the attacker's namespace: {deleted:?}"
        );
    }

    for key in ["secret", "other"] {
        let got = world.get("victim", key).await;
        assert_eq!(
            (got.outcome, got.value.as_ref()),
            (Outcome::Hit as i32, &b"victim's"[..]),
            "victim/{key}"
        );
    }
    if let Some(redis) = &world.redis {
        let mut connection = redis.connection().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .unwrap();
        keys.sort();
        let entries: Vec<&String> = keys.iter().filter(|key| key.starts_with("cg:")).collect();
        assert_eq!(
            entries,
            ["cg:{victim:0:other}", "cg:{victim:0:secret}"],
            "only the victim's entries are left, untouched: {keys:?}"
        );
        assert!(
            keys.contains(&"cgt:{victim:0:shared}".to_owned()),
            "the victim's tag index is untouched: {keys:?}"
        );
        assert!(
            !keys
                .iter()
                .any(|key| key.contains(":victim:") && key.starts_with("cgt:{attacker")),
            "{keys:?}"
        );
    }
}

/// A hostile policy bound with each fallback mode, next to a well-behaved
/// namespace: every request answers in time, the fallback is honoured, the
/// fault is counted by kind, and the neighbour is unaffected.
async fn hostile(module: &str, fault_kind: &str, spare: Option<&str>) {
    let deadline = Duration::from_millis(20);
    let mut world = World::start_with(Backend::Redis, |config| {
        config.policy.deadline = deadline;
        config.policy.memory_limit_bytes = 4 << 20;
        let policy_config = spare.map(|prefix| json!({"spare_prefix": prefix}));
        bind(config, "open", module, policy_config.clone(), FailOpen);
        bind(config, "closed", module, policy_config, FailClosed);
    })
    .await;
    // Margin: a debug-built gateway on 2 shared cores, instantiation included.
    let budget = deadline + Duration::from_millis(400);

    for (namespace, mode) in [("open", FailOpen), ("closed", FailClosed)] {
        let began = Instant::now();
        let set = set_with(&mut world, namespace, "k", b"value", &[]).await;
        assert!(
            began.elapsed() < budget,
            "{module}/{namespace}: Set took {:?}",
            began.elapsed()
        );
        let began = Instant::now();
        let got = get_with(&mut world, namespace, "k", &[]).await;
        assert!(
            began.elapsed() < budget,
            "{module}/{namespace}: Get took {:?}",
            began.elapsed()
        );
        match mode {
            FallbackMode::FailOpen => {
                assert!(
                    set.stored && set.policy.starts_with(&format!("fail-open:{module}@")),
                    "{set:?}"
                );
                assert_eq!(
                    (got.outcome, got.value.as_ref()),
                    (Outcome::Hit as i32, &b"value"[..])
                );
            }
            FallbackMode::FailClosed => {
                assert!(
                    !set.stored && !set.degraded && set.policy.starts_with("fail-closed:"),
                    "{set:?}"
                );
                assert_eq!(got.outcome, Outcome::Miss as i32);
            }
        }
    }
    // Fail-open stores under the client's key, in the namespace.
    if let Some(redis) = &world.redis {
        let mut connection = redis.connection().await;
        let exists: u32 = redis::cmd("EXISTS")
            .arg("cg:{open:0:k}")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(exists, 1);
    }

    let metrics = world.gateway.metrics.encode();
    let faults: u64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("cachegw_policy_faults_total{")
                && line.contains(&format!("kind=\"{fault_kind}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        faults, 4,
        "{module}: expected 4 `{fault_kind}` faults in\n{metrics}"
    );

    // The neighbour namespace (default policy) serves normally meanwhile.
    assert!(world.set("neighbour", "k", b"fine").await.stored);
    assert_eq!(world.get("neighbour", "k").await.value, &b"fine"[..]);

    // A spared key gets a real decision from the same module (it still works).
    if let Some(prefix) = spare {
        let set = set_with(&mut world, "closed", &format!("{prefix}k"), b"v", &[]).await;
        assert!(
            set.stored && set.policy.starts_with(&format!("{module}@")),
            "{set:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_policy_falls_back() {
    hostile("hostile-trap", "trap", Some("dry:")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_policy_is_stopped_at_its_deadline() {
    hostile("hostile-loop", "timeout", Some("dry:")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_cap() {
    hostile("hostile-memory", "memory", Some("dry:")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_output_falls_back() {
    hostile("hostile-garbage", "output", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_abi_version_falls_back() {
    hostile("hostile-abi", "abi", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_export_falls_back() {
    hostile("hostile-noexport", "abi", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_decisions_fall_back() {
    // hostile-garbage's `invalid` marker: a decision with an empty storage key.
    let mut world = World::start_with(Backend::Memory, |config| {
        bind(config, "ns", "hostile-garbage", None, FailOpen)
    })
    .await;
    let set = set_with(&mut world, "ns", "invalid", b"v", &[]).await;
    assert!(
        set.stored && set.policy.starts_with("fail-open:"),
        "{set:?}"
    );
    let metrics = world.gateway.metrics.encode();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("cachegw_policy_faults_total{") && l.contains("kind=\"invalid\"")
        ),
        "{metrics}"
    );
    for marker in ["oob", "wrap", "empty"] {
        let set = set_with(&mut world, "ns", marker, b"v", &[]).await;
        assert!(
            set.stored && set.policy.starts_with("fail-open:"),
            "{marker}: {set:?}"
        );
    }
}

#[tokio::test]
async fn a_policy_that_rejects_its_config_stops_start_up_with_the_reason() {
    let mut config = support::test_config(gateway::config::StoreKind::Memory, None);
    bind(
        &mut config,
        "routes",
        "ttl-by-route",
        Some(json!({"rules": [{"prefix": "x", "ttl": "0s"}]})),
        FailOpen,
    );
    let err = gateway::Gateway::new(config)
        .err()
        .expect("start-up refused");
    let message = err.to_string();
    assert!(
        message.contains("namespaces.routes.policy.config") && message.contains("ttl-by-route@"),
        "{message}"
    );
}

#[tokio::test]
async fn a_module_that_is_not_wasm_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"definitely not wasm").unwrap();
    let mut config = support::test_config(gateway::config::StoreKind::Memory, None);
    config.namespaces.insert(
        "ns".into(),
        gateway::config::NamespaceConfig {
            policy: Some(gateway::config::PolicyBindingConfig {
                module: bogus.clone(),
                config: None,
                fallback: FailOpen,
                memo: true,
            }),
            ..Default::default()
        },
    );
    let message = gateway::Gateway::new(config)
        .err()
        .expect("start-up refused")
        .to_string();
    assert!(
        message.contains("namespaces.ns.policy.module") && message.contains("bogus.wasm"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_ask_the_policy_for_every_item() {
    use gateway::api::proto::v1::{MGetRequest, MSetRequest, m_get_result, m_set_result};
    let mut world = World::start_with(Backend::Redis, |config| {
        bind(config, "routes", "ttl-by-route", None, FailOpen)
    })
    .await;
    let item = |key: &str| SetRequest {
        namespace: "routes".into(),
        key: key.into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    };
    let response = world
        .client
        .m_set(MSetRequest {
            items: vec![item("leaderboard:a"), item("country-codes"), item("plain")],
        })
        .await
        .unwrap()
        .into_inner();
    let ttls: Vec<u64> = response
        .results
        .iter()
        .map(|result| match &result.result {
            Some(m_set_result::Result::Response(written)) if written.stored => written.ttl_ms,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ttls, [60_000, 86_400_000, 300_000]);
    let get = |key: &str| GetRequest {
        namespace: "routes".into(),
        key: key.into(),
        attributes: Default::default(),
        ..Default::default()
    };
    let response = world
        .client
        .m_get(MGetRequest {
            items: vec![get("country-codes"), get("leaderboard:a")],
        })
        .await
        .unwrap()
        .into_inner();
    for result in response.results {
        match result.result {
            Some(m_get_result::Result::Response(found)) => {
                assert_eq!(found.outcome, Outcome::Hit as i32);
                assert!(found.policy.starts_with("ttl-by-route@"));
            }
            other => panic!("{other:?}"),
        }
    }
}
