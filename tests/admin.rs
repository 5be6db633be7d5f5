//! The PolicyAdmin API end to end: validated uploads, atomic swaps under load,
//! rollback, listing and dry runs.

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use gateway::api::proto::{
    policy::Operation as PolicyOp,
    v1::{
        BindPolicyRequest, EvalPolicyRequest, FallbackMode, GetRequest, ListPoliciesRequest,
        PutPolicyRequest, RollbackRequest, SetRequest, policy_admin_client::PolicyAdminClient,
    },
};
use support::{Backend, World, policy_module};
use tonic::{Code, transport::Channel};

async fn put(
    admin: &mut PolicyAdminClient<Channel>,
    name: &str,
    module: Vec<u8>,
) -> Result<String, tonic::Status> {
    admin
        .put_policy(PutPolicyRequest {
            name: name.into(),
            module: module.into(),
        })
        .await
        .map(|response| response.into_inner().label)
}

async fn put_example(admin: &mut PolicyAdminClient<Channel>, name: &str) -> String {
    let bytes = std::fs::read(policy_module(name)).unwrap();
    put(admin, name, bytes)
        .await
        .expect("a good module is accepted")
}

fn version_of(label: &str) -> String {
    label.split_once('@').unwrap().1.to_owned()
}

async fn bind(
    admin: &mut PolicyAdminClient<Channel>,
    namespace: &str,
    label: &str,
    config_json: &str,
) -> String {
    admin
        .bind_policy(BindPolicyRequest {
            namespace: namespace.into(),
            version: version_of(label),
            config_json: config_json.into(),
            fallback: FallbackMode::FailOpen as i32,
            ..Default::default()
        })
        .await
        .expect("bind")
        .into_inner()
        .previous_version
}

/// 64 clients of mixed Get/Set (one Set in three) on `namespace` until
/// stopped; collects which policy versions answered and every failure.
struct MixedLoad {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<LoadReport>>,
}

/// Failures each load client keeps the text of (the rest are counted).
const MAX_FAILURES_KEPT: usize = 20;

/// Versions seen, failures, requests made.
type LoadReport = (HashSet<String>, Vec<String>, u64);

impl MixedLoad {
    fn start(world: &World, namespace: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..64u64)
            .map(|worker| {
                let mut client = world.client.clone();
                let (stop, namespace) = (Arc::clone(&stop), namespace.to_owned());
                tokio::spawn(async move {
                    let (mut seen, mut failures, mut requests) = (HashSet::new(), Vec::new(), 0u64);
                    let mut dropped_failures = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        requests += 1;
                        let key = format!("k{}", (worker * 31 + requests) % 50);
                        let answer = if requests.is_multiple_of(3) {
                            let request = SetRequest {
                                namespace: namespace.clone(),
                                key,
                                value: b"v".to_vec().into(),
                                ..Default::default()
                            };
                            client
                                .set(request)
                                .await
                                .map(|r| r.into_inner())
                                .map(|r| (r.policy, r.stored && !r.degraded))
                        } else {
                            let request = GetRequest {
                                namespace: namespace.clone(),
                                key,
                                ..Default::default()
                            };
                            client
                                .get(request)
                                .await
                                .map(|r| r.into_inner())
                                .map(|r| (r.policy, !r.degraded))
                        };
                        match answer {
                            Ok((policy, true)) => {
                                seen.insert(policy);
                            }
                            other => {
                                // Every failure counts (the callers assert there are
                                // none); a few are kept to show. Yielding keeps a
                                // broken channel, whose calls fail at once, from
                                // starving the runtime and filling memory.
                                if failures.len() < MAX_FAILURES_KEPT {
                                    failures.push(format!("{other:?}"));
                                } else {
                                    dropped_failures += 1;
                                }
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                    if dropped_failures > 0 {
                        failures.push(format!("... and {dropped_failures} more failures"));
                    }
                    (seen, failures, requests)
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients: the versions seen, the failures, the request count.
    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let (mut seen, mut failures, mut requests) = (HashSet::new(), Vec::new(), 0);
        for client in self.clients {
            let (s, f, r) = client.await.unwrap();
            seen.extend(s);
            failures.extend(f);
            requests += r;
        }
        (seen, failures, requests)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_validated_and_bad_ones_change_nothing() {
    let mut world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let good = put_example(&mut admin, "ttl-by-route").await;
    assert!(good.starts_with("ttl-by-route@"), "{good}");
    bind(&mut admin, "routes", &good, "").await;
    // Re-uploading the same bytes is the same version.
    assert_eq!(put_example(&mut admin, "ttl-by-route").await, good);

    let module = |name: &str| std::fs::read(policy_module(name)).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("hostile-trap", module("hostile-trap"), "trapped"),
        ("hostile-loop", module("hostile-loop"), "deadline"),
        ("hostile-memory", module("hostile-memory"), "memory"),
        ("hostile-garbage", module("hostile-garbage"), "output"),
        ("hostile-abi", module("hostile-abi"), "returned 999"),
        (
            "hostile-noexport",
            module("hostile-noexport"),
            "missing export `cachegw_decide`",
        ),
        (
            "not-wasm",
            b"#!/bin/sh\necho definitely not wasm\n".to_vec(),
            "not a valid WebAssembly module",
        ),
        ("empty", Vec::new(), "empty"),
    ];
    for (name, bytes, words) in cases {
        let status = put(&mut admin, name, bytes).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(words),
            "{name}: {:?} lacks {words:?}",
            status.message()
        );
        // Traffic continues on the old version.
        let set = world
            .client
            .set(SetRequest {
                namespace: "routes".into(),
                key: "leaderboard:x".into(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (set.policy.as_str(), set.ttl_ms),
            (good.as_str(), 60_000),
            "{name}"
        );
    }
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.versions.len(),
        1,
        "only the good module was kept: {listed:?}"
    );
    assert_eq!(listed.bindings.len(), 1);
    assert_eq!(listed.bindings[0].namespace, "routes");
    assert_eq!(listed.bindings[0].policy, good);

    // Binding checks the version, the namespace and the config.
    let err = admin
        .bind_policy(BindPolicyRequest {
            namespace: "routes".into(),
            version: "000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .bind_policy(BindPolicyRequest {
            namespace: "routes".into(),
            version: version_of(&good),
            config_json: r#"{"rules":[{"prefix":"x","ttl":"0s"}]}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("rejects this config"), "{err:?}");
    let err = admin
        .bind_policy(BindPolicyRequest {
            namespace: "bad name".into(),
            version: version_of(&good),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A gateway whose config file binds hostile modules (for a test namespace,
/// say) knows their versions; uploading the same bytes must still be refused
/// with the reason a fresh gateway gives, and ListPolicies (and `cachegw
/// policy list`) must show those versions as invalid, never as usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_config_loads_are_validated_like_any_upload() {
    let hostile = [
        ("hostile-abi", "returned 999"),
        ("hostile-noexport", "missing export `cachegw_decide`"),
        ("hostile-loop", "deadline"),
    ];
    let world = World::start_with(Backend::Memory, |config| {
        for (module, _) in hostile {
            support::bind(
                config,
                &format!("test-{module}"),
                module,
                None,
                gateway::config::FallbackMode::FailOpen,
            );
        }
    })
    .await;
    let mut admin = world.gateway.admin().await;
    for (module, words) in hostile {
        let bytes = std::fs::read(policy_module(module)).unwrap();
        let status = put(&mut admin, module, bytes).await.expect_err(module);
        assert_eq!(status.code(), Code::InvalidArgument, "{module}: {status:?}");
        assert!(
            status.message().contains(words) && status.message().contains("known-invalid"),
            "{module}: {:?} lacks {words:?} or says nothing of the config's version",
            status.message()
        );
    }

    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.versions.len(), hostile.len(), "{listed:?}");
    for (module, words) in hostile {
        let version = listed
            .versions
            .iter()
            .find(|version| version.name == module)
            .unwrap_or_else(|| panic!("{module} is listed: {listed:?}"));
        assert_eq!(version.source, "config");
        assert!(
            version.invalid_reason.contains(words),
            "{module} is listed as usable or without its reason: {version:?}"
        );
        // Binding it through the API is refused for the same reason.
        let err = admin
            .bind_policy(BindPolicyRequest {
                namespace: format!("test-{module}"),
                version: version.version.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{module}: {err:?}");
        assert!(err.message().contains(words), "{module}: {err:?}");
    }

    // The operator's view says the same.
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_cachegw"))
        .args(["policy", "list", "--json", "--remote"])
        .arg(world.gateway.admin_addr.to_string())
        .env_remove("CACHEGW_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let versions = report["versions"].as_array().unwrap();
    assert_eq!(versions.len(), hostile.len(), "{report}");
    for version in versions {
        assert_eq!(version["usable"], false, "{version}");
        assert!(version["invalid_reason"].is_string(), "{version}");
    }
}

/// A module over `policy.max_module_bytes` reaches validation, which refuses
/// it naming the limit; only a message over `server.max_request_bytes` is
/// refused by the decoder (OUT_OF_RANGE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_module_is_refused_naming_its_limit() {
    let world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let defaults = gateway::Config::default();
    let limit = defaults.policy.max_module_bytes;

    let status = put(&mut admin, "oversized", vec![0; limit + (1 << 20)])
        .await
        .expect_err("a module over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("policy.max_module_bytes"),
        "{:?}",
        status.message()
    );

    let absurd = defaults.server.max_request_bytes + 1;
    let status = put(&mut admin, "absurd", vec![0; absurd])
        .await
        .expect_err("a message over the request limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.versions.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_load_fail_no_request() {
    let world = World::start(Backend::Redis).await;
    let mut admin = world.gateway.admin().await;
    let first = put_example(&mut admin, "ttl-by-route").await;
    let second = put_example(&mut admin, "tenant-keying").await;
    bind(&mut admin, "swapped", &first, "").await;

    let load = MixedLoad::start(&world, "swapped");
    for swap in 0..100 {
        let target = if swap % 2 == 0 { &second } else { &first };
        bind(&mut admin, "swapped", target, "").await;
    }
    let (seen, failures, requests) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, first {:?}",
        failures.len(),
        failures.first()
    );
    let expected: HashSet<String> = [first.clone(), second.clone()].into();
    assert!(
        seen.is_subset(&expected),
        "responses named {seen:?}, expected only {expected:?}"
    );
    assert_eq!(seen, expected, "both versions served during the storm");
    assert!(requests > 1000, "load kept running: {requests} requests");
    assert_eq!(world.gateway.counter("cachegw_policy_faults"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_to_the_previous_binding() {
    let mut world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let ttl = put_example(&mut admin, "ttl-by-route").await;
    let keying = put_example(&mut admin, "tenant-keying").await;
    assert_eq!(bind(&mut admin, "ns", &ttl, "").await, "");
    assert_eq!(bind(&mut admin, "ns", &keying, "").await, version_of(&ttl));
    let decided = |world: &mut World| {
        let mut client = world.client.clone();
        async move {
            client
                .set(SetRequest {
                    namespace: "ns".into(),
                    key: "leaderboard:a".into(),
                    value: b"v".to_vec().into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .policy
        }
    };
    assert_eq!(decided(&mut world).await, keying);
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bindings[0].previous_versions, [version_of(&ttl)]);

    let back = admin
        .rollback(RollbackRequest {
            namespace: "ns".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.version, version_of(&ttl));
    assert_eq!(decided(&mut world).await, ttl);
    let err = admin
        .rollback(RollbackRequest {
            namespace: "ns".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn eval_dry_runs_a_loaded_version() {
    let world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let label = put_example(&mut admin, "user-profile").await;
    let answer = admin
        .eval_policy(EvalPolicyRequest {
            version: version_of(&label),
            op: PolicyOp::Set as i32,
            namespace: "users".into(),
            key: "profile:7".into(),
            attributes: [("field".to_string(), "email".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.fault_kind.is_empty(), "{answer:?}");
    let decision = answer.decision.unwrap();
    assert_eq!(
        decision.invalidate.unwrap().patterns,
        ["profile:7:*", "settings:7:*"]
    );
    // Nothing was bound by the dry run.
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.bindings.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_starts_faulting_is_rolled_back_automatically() {
    let world = World::start_with(Backend::Memory, |config| {
        config.policy.rollback_after_faults = 5;
        config.policy.rollback_window = std::time::Duration::from_secs(30);
    })
    .await;
    let mut admin = world.gateway.admin().await;
    let good = put_example(&mut admin, "ttl-by-route").await;
    bind(&mut admin, "ns", &good, "").await;
    // Passes validation (its dry-run probes are fine), traps on real traffic.
    let flaky = put_example(&mut admin, "hostile-flaky").await;
    bind(&mut admin, "ns", &flaky, "").await;

    let mut client = world.client.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    support::wait_until(
        "traffic back on the previous version",
        std::time::Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let good = good.clone();
            let seen = Arc::clone(&seen);
            async move {
                let set = SetRequest {
                    namespace: "ns".into(),
                    key: "leaderboard:a".into(),
                    value: b"v".to_vec().into(),
                    ..Default::default()
                };
                let answer = client
                    .set(set)
                    .await
                    .expect("never a failed request")
                    .into_inner();
                assert!(answer.stored, "fail-open keeps serving: {answer:?}");
                seen.lock().unwrap().push(answer.policy.clone());
                answer.policy == good
            }
        },
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|policy| policy == &format!("fail-open:{flaky}")),
        "{seen:?}"
    );
    // Back on ttl-by-route's decisions: leaderboard keys live 60 s.
    let set = SetRequest {
        namespace: "ns".into(),
        key: "leaderboard:b".into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    };
    let answer = client.set(set).await.unwrap().into_inner();
    assert_eq!(
        (answer.policy.as_str(), answer.ttl_ms),
        (good.as_str(), 60_000)
    );

    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    let binding = &listed.bindings[0];
    assert_eq!(binding.policy, good);
    let event = binding
        .last_auto_rollback
        .as_ref()
        .expect("the rollback is visible");
    assert_eq!(event.from, flaky);
    assert!(
        event.reason.contains("5 faults") && event.reason.contains("trapped"),
        "{event:?}"
    );
    assert_eq!(world.gateway.counter("cachegw_policy_rollbacks"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_its_share_of_keys_stably() {
    use gateway::api::proto::v1::{BindMode, MGetRequest, m_get_result};
    let world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let active = put_example(&mut admin, "ttl-by-route").await;
    let canary = put_example(&mut admin, "tenant-keying").await;
    bind(&mut admin, "ns", &active, "").await;
    admin
        .bind_policy(BindPolicyRequest {
            namespace: "ns".into(),
            version: version_of(&canary),
            mode: BindMode::Canary as i32,
            percent: 10.0,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut client = world.client.clone();
    let mut decided_by = std::collections::HashMap::new();
    for batch in 0..20 {
        let items = (0..500)
            .map(|i| GetRequest {
                namespace: "ns".into(),
                key: format!("key-{}", batch * 500 + i),
                attributes: Default::default(),
                ..Default::default()
            })
            .collect();
        let response = client
            .m_get(MGetRequest { items })
            .await
            .unwrap()
            .into_inner();
        for (i, result) in response.results.into_iter().enumerate() {
            let Some(m_get_result::Result::Response(found)) = result.result else {
                panic!("item error")
            };
            decided_by.insert(batch * 500 + i, found.policy);
        }
    }
    let on_canary = decided_by
        .values()
        .filter(|policy| **policy == canary)
        .count();
    let on_active = decided_by
        .values()
        .filter(|policy| **policy == active)
        .count();
    assert_eq!(
        on_canary + on_active,
        10_000,
        "every key decided by one of the two"
    );
    assert!(
        (700..=1300).contains(&on_canary),
        "canary decided {on_canary} of 10 000 keys, expected 10% ± 3%"
    );

    // Stable: the same keys again see the same versions.
    let items = (0..500)
        .map(|i| GetRequest {
            namespace: "ns".into(),
            key: format!("key-{i}"),
            attributes: Default::default(),
            ..Default::default()
        })
        .collect();
    let again = client
        .m_get(MGetRequest { items })
        .await
        .unwrap()
        .into_inner();
    for (i, result) in again.results.into_iter().enumerate() {
        let Some(m_get_result::Result::Response(found)) = result.result else {
            panic!("item error")
        };
        assert_eq!(found.policy, decided_by[&i], "key-{i} changed version");
    }
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            listed.bindings[0].canary_policy.as_str(),
            listed.bindings[0].canary_percent
        ),
        (canary.as_str(), 10.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_compared_but_never_applied() {
    use gateway::api::proto::v1::{BindMode, ShadowReportRequest};
    let world = World::start(Backend::Memory).await;
    let mut admin = world.gateway.admin().await;
    let version = put_example(&mut admin, "ttl-by-route").await;
    bind(
        &mut admin,
        "ns",
        &version,
        r#"{"rules":[{"prefix":"half:","ttl":"60s"}],"default_ttl":"5m"}"#,
    )
    .await;
    // The candidate changes the TTL of the `half:` keys only.
    admin
        .bind_policy(BindPolicyRequest {
            namespace: "ns".into(),
            version: version_of(&version),
            config_json: r#"{"rules":[{"prefix":"half:","ttl":"120s"}],"default_ttl":"5m"}"#.into(),
            mode: BindMode::Shadow as i32,
            percent: 100.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut client = world.client.clone();
    for i in 0..200 {
        let key = if i % 2 == 0 {
            format!("half:{i}")
        } else {
            format!("other:{i}")
        };
        let set = client
            .set(SetRequest {
                namespace: "ns".into(),
                key: key.clone(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let expected = if i % 2 == 0 { 60_000 } else { 300_000 };
        assert_eq!(
            set.ttl_ms, expected,
            "{key}: the active decision applies, never the shadow's"
        );
    }
    let report = admin
        .shadow_report(ShadowReportRequest {
            namespace: "ns".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.compared, report.differing),
        (200, 100),
        "{report:?}"
    );
    // The same figures on /metrics, by candidate version.
    let metrics = world.gateway.metrics.encode();
    assert_eq!(
        support::counter_sum(&metrics, "cachegw_policy_shadow_compared"),
        200
    );
    assert_eq!(
        support::counter_sum(&metrics, "cachegw_policy_shadow_differences"),
        100
    );
    assert!(
        support::counter_sum(&metrics, "cachegw_policy_bindings") >= 1,
        "{metrics}"
    );
    assert!(!report.examples.is_empty() && report.examples.len() <= 20);
    for example in &report.examples {
        assert!(
            example.key.starts_with("half:") && example.fields == ["fresh_ttl"],
            "{example:?}"
        );
    }
    // Rebinding the active version drops the shadow measured against the old one.
    bind(&mut admin, "ns", &version, "").await;
    let err = admin
        .shadow_report(ShadowReportRequest {
            namespace: "ns".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Publishes `bytes` as `dir/name` the way operators should: write, then rename.
fn publish(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    let staging = dir.join(format!(".{name}.tmp"));
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_through_the_watched_directory_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let first_bytes = std::fs::read(policy_module("ttl-by-route")).unwrap();
    let second_bytes = std::fs::read(policy_module("tenant-keying")).unwrap();
    publish(dir.path(), "swapper.wasm", &first_bytes);
    let module_path = dir.path().join("swapper.wasm");
    let world = World::start_with(Backend::Memory, |config| {
        config.policy.watch_dir = Some(dir.path().to_owned());
        config.policy.watch_interval = std::time::Duration::from_millis(20);
        config.namespaces.insert(
            "watched".into(),
            gateway::config::NamespaceConfig {
                policy: Some(gateway::config::PolicyBindingConfig {
                    module: module_path.clone(),
                    config: None,
                    fallback: gateway::config::FallbackMode::FailOpen,
                    memo: true,
                }),
                ..Default::default()
            },
        );
    })
    .await;
    let admin = world.gateway.admin().await;
    let binding = |admin: &PolicyAdminClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            let listed = admin
                .list_policies(ListPoliciesRequest {})
                .await
                .unwrap()
                .into_inner();
            listed
                .bindings
                .into_iter()
                .find(|b| b.namespace == "watched")
                .unwrap_or_default()
        }
    };
    let active = |admin: &PolicyAdminClient<Channel>| {
        let binding = binding(admin);
        async move { binding.await.policy }
    };
    let label = |bytes: &[u8]| {
        format!(
            "swapper@{}",
            gateway::policy::engine::content_version(bytes)
        )
    };
    let (first, second) = (label(&first_bytes), label(&second_bytes));
    assert_eq!(active(&admin).await, first);
    // Accept the second version up front (without binding it): its first
    // load compiles it, which on a cold compile cache, with the test
    // profile's unoptimised cranelift and other tests running, took over 20s
    // on this machine. What this test measures is the swaps, not a compile.
    let accepted = put(&mut admin.clone(), "swapper", second_bytes.clone())
        .await
        .expect("the second version is accepted");
    assert_eq!(accepted, second);
    assert_eq!(active(&admin).await, first, "an upload alone binds nothing");

    let load = MixedLoad::start(&world, "watched");
    for swap in 0..100 {
        let (bytes, want) = if swap % 2 == 0 {
            (&second_bytes, &second)
        } else {
            (&first_bytes, &first)
        };
        publish(dir.path(), "swapper.wasm", bytes);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let now = binding(&admin).await;
            if now.policy == *want {
                break;
            }
            if std::time::Instant::now() > deadline {
                // What the registry and the policy metrics say, to tell a
                // missed file from a rollback or a refused re-bind.
                let metrics = world.gateway.metrics.encode();
                let policy_lines: Vec<&str> = metrics
                    .lines()
                    .filter(|line| line.contains("policy") && !line.contains("_bucket"))
                    .collect();
                let versions = admin
                    .clone()
                    .list_policies(ListPoliciesRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .versions;
                panic!(
                    "swap {swap}: the watcher did not activate {want} within 20s; \
                     the binding is {now:?}; versions {versions:?}; policy metrics:\n{}",
                    policy_lines.join("\n")
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // A half-written file (no rename) is never activated: once the watcher has
    // tried and rejected it, the last complete version is still serving.
    let rejected = |world: &World| {
        support::counter_sum(
            &world.gateway.metrics.encode(),
            "cachegw_policy_uploads_rejected",
        )
    };
    let rejected_before = rejected(&world);
    let serving = active(&admin).await;
    std::fs::write(&module_path, &second_bytes[..second_bytes.len() / 2]).unwrap();
    support::wait_until(
        "the watcher to reject the truncated file",
        std::time::Duration::from_secs(20),
        || {
            let rejected_now = rejected(&world);
            async move { rejected_now > rejected_before }
        },
    )
    .await;
    assert_eq!(
        active(&admin).await,
        serving,
        "a truncated module is never activated"
    );

    let (seen, failures, _) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, first {:?}",
        failures.len(),
        failures.first()
    );
    let expected: HashSet<String> = [first.clone(), second.clone()].into();
    assert_eq!(
        seen, expected,
        "every response reports one of the two versions"
    );
}
