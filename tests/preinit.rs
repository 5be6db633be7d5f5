//! Pre-initialised bindings (`policy.preinit`): a binding's calls start from
//! an image of its module taken after `cachegw_init` ran on its config. The
//! image decides exactly what the module decides, byte for byte, for the
//! example policies; its decisions do not parse the config again; every new
//! binding (a rebind, a rollback, a canary, a shadow) has the image of its
//! own config.

mod support;

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use gateway::{
    api::proto::policy::v1 as pb,
    cache::NamespaceSettings,
    config::{Config, FallbackMode::FailOpen, StoreKind},
    policy::{
        Decider, DecisionLimits, DecisionRequest, Operation, PolicyMetrics, PolicyRegistry,
        registry::CandidateKind,
    },
};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::json;
use support::{bind, policy_module};

/// One test at a time: one of them reads the log through a subscriber of
/// its thread, which tracing's per-callsite interest cache does not promise
/// to see while other threads register the same callsites.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The example policies with their configs from policies/cachegw.toml.
fn example_bindings() -> Config {
    let mut config = support::test_config(StoreKind::Memory, None);
    // business-hours reads the clock: its decisions may differ across a
    // boundary between the two calls compared.
    let examples = support::example_policies()
        .into_iter()
        .filter(|(namespace, _, _)| *namespace != "hours");
    for (namespace, module, policy_config) in examples {
        bind(
            &mut config,
            namespace,
            module,
            Some(policy_config),
            FailOpen,
        );
    }
    config
}

/// A request drawn from keys and attributes the example policies act on,
/// with random parts (case, query strings, glob characters, ids).
fn random_input(rng: &mut StdRng, namespace: &str, config: &Bytes) -> pb::PolicyInput {
    let prefixes = [
        "leaderboard:",
        "ref:",
        "country-codes",
        "profile:",
        "settings:",
        "user:",
        "/Products?",
        "/products/",
        "product:",
        "",
    ];
    let tails = [
        "", "42", "*", "b=2&a=1", "A=1&b=2", "x?y", "[a-z]", "Ünï", " 7 ",
    ];
    let key = format!(
        "{}{}{}",
        prefixes.choose(rng).unwrap(),
        tails.choose(rng).unwrap(),
        rng.random_range(0..1000)
    );
    let mut attributes = HashMap::new();
    let attribute_choices = [
        ("field", vec!["email", "name"]),
        ("accept-language", vec!["en-US", "fr", "de-CH,de;q=0.9"]),
        ("tenant", vec!["acme", "globex"]),
        ("cache-control", vec!["no-store", "max-age=60"]),
        ("surrogate-key", vec!["product:7 category:3", "a"]),
        ("purge", vec!["product:7", "category:3 product:9"]),
        ("tags", vec!["product:7,category:3"]),
    ];
    for (name, values) in &attribute_choices {
        if rng.random_bool(0.3) {
            attributes.insert(name.to_string(), values.choose(rng).unwrap().to_string());
        }
    }
    // Now and then an input larger than an image's reserved input buffer
    // (8 KiB), which its call then allocates as a module's would.
    if rng.random_bool(0.05) {
        attributes.insert(
            "x-padding".into(),
            "p".repeat(rng.random_range(8_000..12_000)),
        );
    }
    let op = *[
        pb::Operation::Get,
        pb::Operation::Set,
        pb::Operation::Delete,
    ]
    .choose(rng)
    .unwrap();
    pb::PolicyInput {
        op: op as i32,
        namespace: namespace.into(),
        key,
        attributes,
        value_size: if op == pb::Operation::Set {
            rng.random_range(0..1 << 20)
        } else {
            0
        },
        now_unix_ms: rng.random_range(1_700_000_000_000..1_900_000_000_000),
        config: config.clone(),
    }
}

/// For each example policy, 1 500 random requests decided by the module as
/// loaded and by the binding's pre-initialised image: the same bytes, for
/// inputs written into the image's reserved buffer and for larger ones.
#[test]
fn the_example_policies_decide_the_same_from_the_image_and_from_the_module() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let registry = PolicyRegistry::from_config(&example_bindings()).expect("bindings load");
    let mut rng = StdRng::seed_from_u64(0x9e1_1417);
    for namespace in ["api", "users", "pages", "catalog"] {
        let binding = registry.active(namespace).expect("bound");
        let image = binding.callee();
        let preinit = image.preinit();
        assert!(
            preinit.is_some(),
            "{namespace}: the binding has no pre-initialised image"
        );
        assert!(
            preinit.and_then(|preinit| preinit.input_buffer).is_some(),
            "{namespace}: the image reserved no input buffer"
        );
        for _ in 0..1_500 {
            let input = random_input(&mut rng, namespace, binding.config());
            let from_module = binding.module().decide_blocking(&input);
            let from_image = image.decide_blocking(&input);
            let bytes = |outcome: &Result<pb::PolicyDecision, _>| match outcome {
                Ok(decision) => decision.encode_to_vec(),
                Err(fault) => panic!("{namespace}: {input:?} faulted: {fault}"),
            };
            assert_eq!(
                bytes(&from_module),
                bytes(&from_image),
                "{namespace}: {input:?}"
            );
        }
    }
}

/// The policy log lines written while this is alive.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Captures this thread's log (a current-thread runtime runs the calls here).
    fn on_this_thread(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_max_level(tracing::Level::INFO)
                .finish(),
        )
    }

    /// Lines containing `needle` since the last call.
    fn take_lines_with(&self, needle: &str) -> usize {
        let text = std::mem::take(&mut *self.0.lock().unwrap());
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }
}

impl Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn decider(registry: Arc<PolicyRegistry>, config: &Config) -> Decider {
    let mut metrics_registry = prometheus_client::registry::Registry::default();
    let limits = DecisionLimits {
        max_key_bytes: config.limits.max_key_bytes,
        max_ttl: config.policy.max_ttl,
        max_items: config.policy.max_decision_items,
    };
    Decider::new(
        registry,
        limits,
        PolicyMetrics::register(&mut metrics_registry),
        &config.policy,
    )
}

/// What `config-counter` tagged `key`'s decision with: how many times
/// `from_config` had run in the instance, and the config's label.
async fn counted(decider: &Decider, namespace: &str, key: &str) -> Vec<String> {
    let settings = NamespaceSettings::new(namespace, &Default::default());
    let attributes = HashMap::new();
    // A Set: tags are attached to written entries, and a Get's decision
    // drops them (docs/POLICY_ABI.md).
    let decision = decider
        .decide(
            &settings,
            &DecisionRequest {
                op: Operation::Set,
                namespace,
                key,
                attributes: &attributes,
                value_size: 1,
            },
            None,
        )
        .await;
    assert!(
        !decision.decided_by.starts_with("fail-"),
        "the policy faulted: {decision:?}"
    );
    decision.tags.to_vec()
}

/// Config-counter bound to `counted` with the label `one`, the memo off (so
/// that every decision is a call).
fn counter_config(preinit: bool) -> Config {
    let mut config = support::test_config(StoreKind::Memory, None);
    config.policy.memo_bytes = 0;
    config.policy.preinit = preinit;
    bind(
        &mut config,
        "counted",
        "config-counter",
        Some(json!({"label": "one"})),
        FailOpen,
    );
    config
}

/// On a pre-initialised binding, `from_config` ran once in every call's
/// instance, before the call (when the image was made: no call logs it);
/// without pre-initialisation it runs in every call (one log line each).
#[tokio::test]
async fn decisions_on_a_preinitialised_binding_do_not_parse_the_config() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let log = CapturedLog::default();
    let _capture = log.on_this_thread();
    let keys: Vec<String> = (0..20).map(|i| format!("key:{i}")).collect();

    let config = counter_config(true);
    let registry = Arc::new(PolicyRegistry::from_config(&config).expect("bindings load"));
    let binding = registry.active("counted").expect("bound");
    assert!(binding.callee().preinit().is_some(), "no image");
    let preinitialised = decider(Arc::clone(&registry), &config);
    log.take_lines_with("from_config ran");
    for key in &keys {
        assert_eq!(
            counted(&preinitialised, "counted", key).await,
            ["from_config:1", "label:one"]
        );
    }
    assert_eq!(
        log.take_lines_with("from_config ran"),
        0,
        "a decision on the image ran from_config"
    );

    // The image asked with other config bytes parses them: a second
    // from_config in an instance that ran one already, and its answer
    // follows the config it was given.
    let other = pb::PolicyInput {
        op: pb::Operation::Get as i32,
        namespace: "counted".into(),
        key: "k".into(),
        config: Bytes::from_static(br#"{"label":"two"}"#),
        ..Default::default()
    };
    assert!(
        binding.callee().recycles(),
        "calls recycle instances (policy.recycle_instances is on by default)"
    );
    for _ in 0..3 {
        // In a recycled instance too: it starts from the image again, so
        // the count never reaches 3 and the label is the input's.
        let decision = binding.callee().decide_blocking(&other).expect("decides");
        assert_eq!(decision.tags, ["from_config:2", "label:two"]);
        assert_eq!(
            log.take_lines_with("from_config ran (2 in this instance)"),
            1
        );
        assert_eq!(
            counted(&preinitialised, "counted", "key:0").await,
            ["from_config:1", "label:one"]
        );
    }

    let config = counter_config(false);
    let registry = Arc::new(PolicyRegistry::from_config(&config).expect("bindings load"));
    assert!(
        registry
            .active("counted")
            .expect("bound")
            .callee()
            .preinit()
            .is_none(),
        "policy.preinit = false made an image"
    );
    let plain = decider(registry, &config);
    log.take_lines_with("from_config ran");
    for key in &keys {
        assert_eq!(
            counted(&plain, "counted", key).await,
            ["from_config:1", "label:one"]
        );
    }
    assert_eq!(log.take_lines_with("from_config ran"), keys.len());
}

/// Every binding made through the admin paths has the image of its own
/// config: a rebind with another config, a rollback to the previous binding,
/// a canary and a shadow. A stale image would answer with the label it was
/// made with, or parse the config again (`from_config:2`).
#[tokio::test]
async fn every_new_binding_gets_the_image_of_its_own_config() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut config = support::test_config(StoreKind::Memory, None);
    config.policy.memo_bytes = 0;
    let registry = Arc::new(PolicyRegistry::new(&config));
    let module = std::fs::read(policy_module("config-counter")).unwrap();
    let version = registry
        .put("config-counter", &module, "admin")
        .expect("accepted")
        .version()
        .to_owned();
    let decider = decider(Arc::clone(&registry), &config);
    let label = |label: &str| Bytes::from(json!({ "label": label }).to_string());
    let decides = |expected: &'static str| {
        let decider = &decider;
        async move {
            assert_eq!(
                counted(decider, "ns", "k").await,
                ["from_config:1", expected],
            );
        }
    };

    registry
        .bind("ns", &version, label("one"), FailOpen)
        .unwrap();
    decides("label:one").await;
    let first_image = Arc::as_ptr(registry.active("ns").unwrap().callee());

    registry
        .bind("ns", &version, label("two"), FailOpen)
        .unwrap();
    decides("label:two").await;
    let second = registry.active("ns").unwrap();
    assert!(second.callee().preinit().is_some());
    assert_ne!(Arc::as_ptr(second.callee()), first_image);

    // Back to a version and config that a binding still holds (the first,
    // kept for rollback): its image, not a new one.
    registry
        .bind("ns", &version, label("one"), FailOpen)
        .unwrap();
    decides("label:one").await;
    assert_eq!(
        Arc::as_ptr(registry.active("ns").unwrap().callee()),
        first_image
    );

    registry.rollback("ns").unwrap();
    decides("label:two").await;
    assert!(Arc::ptr_eq(&registry.active("ns").unwrap(), &second));

    registry
        .bind_candidate(
            "ns",
            &version,
            label("canary"),
            FailOpen,
            CandidateKind::Canary,
            10_000,
        )
        .unwrap();
    decides("label:canary").await;
    registry
        .bind_candidate(
            "ns",
            &version,
            label("shadow"),
            FailOpen,
            CandidateKind::Shadow,
            10_000,
        )
        .unwrap();
    let candidates = registry.candidates("ns").unwrap();
    let shadow = candidates.shadow.as_ref().unwrap();
    assert!(shadow.binding.callee().preinit().is_some());
    let input = pb::PolicyInput {
        op: pb::Operation::Get as i32,
        namespace: "ns".into(),
        key: "k".into(),
        config: shadow.binding.config().clone(),
        ..Default::default()
    };
    let decision = shadow
        .binding
        .callee()
        .decide_blocking(&input)
        .expect("decides");
    assert_eq!(decision.tags, ["from_config:1", "label:shadow"]);
}
