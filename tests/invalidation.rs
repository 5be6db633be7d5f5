//! Invalidation end to end: the Invalidate RPC by key, pattern, tag and whole
//! namespace, soft purges, jobs, write-through tag purges, correctness while
//! writers keep writing, and namespace isolation of patterns. Tags come from
//! the `surrogate-keys` example policy, compiled to wasm.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::{
    api::proto::v1::{
        DeleteRequest, GetInvalidationRequest, GetRequest, InvalidateRequest, InvalidateResponse,
        JobState, KeyList, MSetRequest, Outcome, SetRequest, TagList, cache_client::CacheClient,
        invalidate_request::Target,
    },
    config::{Config, FallbackMode},
};
use serde_json::json;
use support::{Backend, World, bind, wait_until};
use tonic::{Code, transport::Channel};

/// Bound to `surrogate-keys`: tags from the `surrogate-key` attribute.
const NS: &str = "catalog";
/// A neighbour that must never be touched by `catalog`'s invalidations.
const NEIGHBOUR: &str = "catalog.b";

on_both_stores!(
    tags_patterns_and_keys_remove_exactly_their_entries,
    a_soft_purge_serves_stale_until_a_hard_one_removes,
    a_soft_purge_of_entries_without_a_stale_window_misses_at_once,
    a_soft_purge_serves_stale_for_the_stale_window_from_the_purge_only,
    a_namespace_flush_hides_everything_at_once_and_only_there,
    client_patterns_never_leave_their_namespace,
    tag_invalidation_is_exact_while_writers_keep_writing,
    pattern_invalidation_is_exact_while_writers_keep_writing,
    writes_purge_the_tags_their_policy_names,
    long_jobs_answer_running_and_can_be_followed,
    bad_invalidations_are_refused_precisely,
);

fn catalog(config: &mut Config) {
    // The neighbour runs the same policy: same keys, same tags, other namespace.
    for namespace in [NS, NEIGHBOUR] {
        bind(
            config,
            namespace,
            "surrogate-keys",
            Some(json!({"ttl": "10m", "stale": "1m"})),
            FallbackMode::FailClosed,
        );
    }
}

async fn world(backend: Backend) -> World {
    World::start_with(backend, catalog).await
}

/// `surrogate-keys` with no stale window: entries are fresh, then gone.
const NO_WINDOW: &str = "catalog.no-window";
/// `surrogate-keys` with a short stale window, [`SHORT_WINDOW`].
const SHORT: &str = "catalog.short-window";
/// Long enough that a Get right after a purge lands inside it on a busy
/// machine; far below the entries' 10-minute TTL.
const SHORT_WINDOW: Duration = Duration::from_secs(1);

/// `catalog`, plus [`NO_WINDOW`] and [`SHORT`]: fresh for 10 minutes, with no
/// stale window and a [`SHORT_WINDOW`] one.
async fn windows_world(backend: Backend) -> World {
    World::start_with(backend, |config| {
        catalog(config);
        let short = format!("{}ms", SHORT_WINDOW.as_millis());
        for (namespace, stale) in [(NO_WINDOW, "0s"), (SHORT, short.as_str())] {
            bind(
                config,
                namespace,
                "surrogate-keys",
                Some(json!({"ttl": "10m", "stale": stale})),
                FallbackMode::FailClosed,
            );
        }
    })
    .await
}

fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn set_tagged(client: &mut CacheClient<Channel>, key: &str, tags: &str) {
    set_tagged_in(client, NS, key, tags).await;
}

async fn set_tagged_in(client: &mut CacheClient<Channel>, namespace: &str, key: &str, tags: &str) {
    let set = client
        .set(SetRequest {
            namespace: namespace.into(),
            key: key.into(),
            value: format!("value of {key}").into_bytes().into(),
            attributes: attrs(&[("surrogate-key", tags)]),
            ..Default::default()
        })
        .await
        .expect("set")
        .into_inner();
    assert!(set.stored && !set.degraded, "{key}: {set:?}");
}

async fn outcome(client: &mut CacheClient<Channel>, namespace: &str, key: &str) -> Outcome {
    let got = client
        .get(GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            allow_stale: true,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!got.degraded, "{namespace}/{key}");
    Outcome::try_from(got.outcome).unwrap()
}

async fn invalidate(
    client: &mut CacheClient<Channel>,
    namespace: &str,
    target: Target,
    soft: bool,
) -> InvalidateResponse {
    let answer = client
        .invalidate(InvalidateRequest {
            namespace: namespace.into(),
            target: Some(target),
            soft,
            wait_ms: 30_000,
            ..Default::default()
        })
        .await
        .expect("invalidate")
        .into_inner();
    assert_eq!(answer.state, JobState::Done as i32, "{answer:?}");
    assert!(answer.error.is_empty(), "{answer:?}");
    answer
}

fn tags(list: &[&str]) -> Target {
    Target::Tags(TagList {
        tags: list.iter().map(|tag| (*tag).to_owned()).collect(),
    })
}

/// Expects each key's outcome; names every key that differs.
async fn expect_outcomes(
    client: &mut CacheClient<Channel>,
    namespace: &str,
    expected: &[(&str, Outcome)],
) {
    let mut wrong = Vec::new();
    for (key, want) in expected {
        let got = outcome(client, namespace, key).await;
        if got != *want {
            wrong.push(format!("{key}: {got:?}, expected {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{namespace}: {wrong:#?}");
}

async fn tags_patterns_and_keys_remove_exactly_their_entries(backend: Backend) {
    let mut world = world(backend).await;
    let client = &mut world.client;
    let entries = [
        ("page:/p/1", "product:1 category:7"),
        ("page:/p/2", "product:2 category:7"),
        ("page:/p/3", "product:3 category:8"),
        ("page:/c/7", "category:7"),
        ("api:product:1", "product:1"),
        ("api:product:11", "product:11"),
        ("untagged", ""),
    ];
    for (key, tags) in entries {
        set_tagged(client, key, tags).await;
    }
    // The neighbour's entries carry the same tags and keys.
    let mut neighbour = world.gateway.client().await;
    for (key, tags) in entries {
        let set = neighbour
            .set(SetRequest {
                namespace: NEIGHBOUR.into(),
                key: key.into(),
                value: b"n".to_vec().into(),
                attributes: attrs(&[("surrogate-key", tags)]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(set.stored);
    }

    let by_tag = invalidate(client, NS, tags(&["category:7"]), false).await;
    assert_eq!(by_tag.affected, 3, "{by_tag:?}");
    use Outcome::{Hit, Miss};
    expect_outcomes(
        client,
        NS,
        &[
            ("page:/p/1", Miss),
            ("page:/p/2", Miss),
            ("page:/c/7", Miss),
            ("page:/p/3", Hit),
            ("api:product:1", Hit),
            ("api:product:11", Hit),
            ("untagged", Hit),
        ],
    )
    .await;
    // Invalidating a tag again, or one nobody carries, affects nothing.
    assert_eq!(
        invalidate(client, NS, tags(&["category:7", "nobody"]), false)
            .await
            .affected,
        0
    );

    // `product:1` must not take `product:11` with it.
    let by_tag = invalidate(client, NS, tags(&["product:1"]), false).await;
    assert_eq!(by_tag.affected, 1, "{by_tag:?}");
    expect_outcomes(
        client,
        NS,
        &[("api:product:1", Miss), ("api:product:11", Hit)],
    )
    .await;

    let by_pattern = invalidate(client, NS, Target::Pattern("page:/p/*".into()), false).await;
    assert_eq!(
        by_pattern.affected, 1,
        "only page:/p/3 was left: {by_pattern:?}"
    );
    let by_keys = invalidate(
        client,
        NS,
        Target::Keys(KeyList {
            keys: vec!["untagged".into(), "never-written".into()],
        }),
        false,
    )
    .await;
    assert_eq!(by_keys.affected, 1, "{by_keys:?}");
    assert!(by_keys.policy.starts_with("surrogate-keys@"), "{by_keys:?}");
    expect_outcomes(
        client,
        NS,
        &[
            ("page:/p/3", Miss),
            ("untagged", Miss),
            ("api:product:11", Hit),
        ],
    )
    .await;

    let untouched: Vec<(&str, Outcome)> = entries.iter().map(|(key, _)| (*key, Hit)).collect();
    expect_outcomes(&mut neighbour, NEIGHBOUR, &untouched).await;
    // ...though they do carry those tags, in their own namespace.
    let theirs = invalidate(&mut neighbour, NEIGHBOUR, tags(&["category:7"]), false).await;
    assert_eq!(theirs.affected, 3, "{theirs:?}");

    // Six jobs, all done, removing 3 + 0 + 1 + 1 + 1 + 3 entries.
    let metrics = world.gateway.metrics.encode();
    assert_eq!(
        support::counter_sum(&metrics, "cachegw_invalidation_jobs"),
        6
    );
    assert!(
        metrics.contains(
            r#"cachegw_invalidation_jobs_total{namespace="catalog",target="tags",outcome="done"} 3"#
        ),
        "{metrics}"
    );
    assert_eq!(
        support::counter_sum(&metrics, "cachegw_invalidated_entries"),
        9
    );
    assert_eq!(
        support::gauge(&metrics, "cachegw_invalidation_jobs_running"),
        0
    );
}

async fn a_soft_purge_serves_stale_until_a_hard_one_removes(backend: Backend) {
    let mut world = world(backend).await;
    let client = &mut world.client;
    set_tagged(client, "a", "t").await;
    set_tagged(client, "b", "t").await;
    set_tagged(client, "c", "other").await;

    let soft = invalidate(client, NS, tags(&["t"]), true).await;
    assert_eq!(soft.affected, 2, "{soft:?}");
    let got = client
        .get(GetRequest {
            namespace: NS.into(),
            key: "a".into(),
            allow_stale: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.outcome, Outcome::Stale as i32, "{got:?}");
    assert_eq!(
        got.value,
        b"value of a".as_slice(),
        "stale entries keep their value"
    );
    assert_eq!(got.ttl_remaining_ms, 0);
    expect_outcomes(client, NS, &[("b", Outcome::Stale), ("c", Outcome::Hit)]).await;
    // Already stale: a second soft purge changes nothing.
    assert_eq!(invalidate(client, NS, tags(&["t"]), true).await.affected, 0);

    // Soft-purged entries are still indexed: a hard purge finds them.
    let hard = invalidate(client, NS, tags(&["t"]), false).await;
    assert_eq!(hard.affected, 2, "{hard:?}");
    expect_outcomes(
        client,
        NS,
        &[
            ("a", Outcome::Miss),
            ("b", Outcome::Miss),
            ("c", Outcome::Hit),
        ],
    )
    .await;

    // Soft by pattern and by key too.
    set_tagged(client, "a", "").await;
    let soft = invalidate(client, NS, Target::Pattern("[ab]".into()), true).await;
    assert_eq!(soft.affected, 1, "{soft:?}");
    let keys = Target::Keys(KeyList {
        keys: vec!["c".into()],
    });
    assert_eq!(invalidate(client, NS, keys, true).await.affected, 1);
    expect_outcomes(client, NS, &[("a", Outcome::Stale), ("c", Outcome::Stale)]).await;
}

/// The PTTL of `key`'s entry in `namespace` (generation 0) in the standalone
/// test Redis (-2: gone); `None` on the other stores.
async fn raw_pttl(world: &World, namespace: &str, key: &str) -> Option<i64> {
    let redis = world.redis.as_ref()?;
    let ttl = redis::cmd("PTTL")
        .arg(format!("cg:{{{namespace}:0:{key}}}"))
        .query_async(&mut redis.connection().await)
        .await
        .expect("PTTL");
    Some(ttl)
}

/// Lets the wall clock move past the current millisecond: entries created
/// in the same millisecond as a soft flush count as written before it.
async fn next_millisecond() {
    let now = std::time::SystemTime::now();
    wait_until(
        "the clock moved on",
        Duration::from_secs(1),
        || async move { std::time::SystemTime::now() > now + Duration::from_millis(1) },
    )
    .await;
}

/// The four kinds of soft invalidation, each on its own entry of `namespace`
/// (`by-key`, `by-pattern:1`, `by-tag` and `kept`, which only the last, the
/// whole-namespace flush, reaches).
async fn soft_purge_each_way(world: &mut World, namespace: &str) -> [InvalidateResponse; 3] {
    let client = &mut world.client;
    for (key, tags) in [
        ("by-key", ""),
        ("by-pattern:1", ""),
        ("by-tag", "t"),
        ("kept", "u"),
    ] {
        set_tagged_in(client, namespace, key, tags).await;
    }
    let keys = Target::Keys(KeyList {
        keys: vec!["by-key".into()],
    });
    [
        invalidate(client, namespace, keys, true).await,
        invalidate(
            client,
            namespace,
            Target::Pattern("by-pattern:*".into()),
            true,
        )
        .await,
        invalidate(client, namespace, tags(&["t"]), true).await,
    ]
}

const PURGED: [&str; 3] = ["by-key", "by-pattern:1", "by-tag"];

async fn a_soft_purge_of_entries_without_a_stale_window_misses_at_once(backend: Backend) {
    let mut world = windows_world(backend).await;
    for answer in soft_purge_each_way(&mut world, NO_WINDOW).await {
        assert_eq!(answer.affected, 1, "{answer:?}");
    }
    use Outcome::{Hit, Miss};
    let client = &mut world.client;
    expect_outcomes(
        client,
        NO_WINDOW,
        &[
            ("by-key", Miss),
            ("by-pattern:1", Miss),
            ("by-tag", Miss),
            ("kept", Hit),
        ],
    )
    .await;
    for key in PURGED {
        if let Some(ttl) = raw_pttl(&world, NO_WINDOW, key).await {
            assert_eq!(ttl, -2, "{key}: nothing to serve, nothing kept");
        }
    }

    let client = &mut world.client;
    set_tagged_in(client, NO_WINDOW, "by-key", "").await;
    let flushed = invalidate(client, NO_WINDOW, Target::WholeNamespace(true), true).await;
    assert_eq!(flushed.generation, 0, "{flushed:?}");
    expect_outcomes(client, NO_WINDOW, &[("by-key", Miss), ("kept", Miss)]).await;
    next_millisecond().await;
    set_tagged_in(client, NO_WINDOW, "kept", "u").await;
    assert_eq!(
        outcome(client, NO_WINDOW, "kept").await,
        Hit,
        "written after the flush"
    );
}

async fn a_soft_purge_serves_stale_for_the_stale_window_from_the_purge_only(backend: Backend) {
    let mut world = windows_world(backend).await;
    let window = i64::try_from(SHORT_WINDOW.as_millis()).unwrap();
    for answer in soft_purge_each_way(&mut world, SHORT).await {
        assert_eq!(answer.affected, 1, "{answer:?}");
    }
    use Outcome::{Hit, Miss, Stale};
    let client = &mut world.client;
    expect_outcomes(
        client,
        SHORT,
        &[
            ("by-key", Stale),
            ("by-pattern:1", Stale),
            ("by-tag", Stale),
            ("kept", Hit),
        ],
    )
    .await;
    // A write after the purge is fresh, and keeps its own TTL.
    set_tagged_in(client, SHORT, "rewritten", "t").await;
    for key in PURGED {
        if let Some(ttl) = raw_pttl(&world, SHORT, key).await {
            assert!(
                (0..=window).contains(&ttl),
                "{key}: kept {ttl} ms, for more than its stale window"
            );
        }
    }
    let client = &mut world.client;
    for key in PURGED {
        wait_until(
            "the stale window to end",
            SHORT_WINDOW + Duration::from_secs(5),
            || {
                let mut client = client.clone();
                async move { outcome(&mut client, SHORT, key).await == Miss }
            },
        )
        .await;
    }
    expect_outcomes(client, SHORT, &[("kept", Hit), ("rewritten", Hit)]).await;
    if let Some(ttl) = raw_pttl(&world, SHORT, "rewritten").await {
        assert!(ttl > 60_000, "a later write keeps its TTL: {ttl}");
    }

    // A soft flush: stale at once, a miss when the window from the flush ends.
    let client = &mut world.client;
    set_tagged_in(client, SHORT, "by-key", "").await;
    let flushed = invalidate(client, SHORT, Target::WholeNamespace(true), true).await;
    assert_eq!(flushed.generation, 0, "{flushed:?}");
    expect_outcomes(client, SHORT, &[("by-key", Stale), ("kept", Stale)]).await;
    next_millisecond().await;
    set_tagged_in(client, SHORT, "after", "").await;
    for key in ["by-key", "kept"] {
        wait_until(
            "the stale window after the flush to end",
            SHORT_WINDOW + Duration::from_secs(5),
            || {
                let mut client = client.clone();
                async move { outcome(&mut client, SHORT, key).await == Miss }
            },
        )
        .await;
    }
    assert_eq!(
        outcome(client, SHORT, "after").await,
        Hit,
        "written after the flush"
    );
}

async fn a_namespace_flush_hides_everything_at_once_and_only_there(backend: Backend) {
    let mut world = world(backend).await;
    for i in 0..50 {
        set_tagged(&mut world.client, &format!("k{i}"), "t").await;
        world.set(NEIGHBOUR, &format!("k{i}"), b"n").await;
    }
    let client = &mut world.client;
    let flushed = invalidate(client, NS, Target::WholeNamespace(true), false).await;
    assert_eq!(flushed.generation, 1, "{flushed:?}");
    for i in 0..50 {
        let key = format!("k{i}");
        assert_eq!(outcome(client, NS, &key).await, Outcome::Miss, "{key}");
        assert_eq!(
            outcome(client, NEIGHBOUR, &key).await,
            Outcome::Hit,
            "{key}"
        );
    }
    // The old generation's tag index went with it.
    assert_eq!(
        invalidate(client, NS, tags(&["t"]), false).await.affected,
        0
    );
    // New writes land in the new generation.
    set_tagged(client, "k0", "t").await;
    assert_eq!(outcome(client, NS, "k0").await, Outcome::Hit);
    assert_eq!(
        invalidate(client, NS, tags(&["t"]), false).await.affected,
        1
    );

    // A soft flush makes what exists stale, and leaves later writes fresh.
    set_tagged(client, "k1", "").await;
    let soft = invalidate(client, NS, Target::WholeNamespace(true), true).await;
    assert_eq!(
        soft.generation, 1,
        "a soft flush keeps the generation: {soft:?}"
    );
    assert_eq!(outcome(client, NS, "k1").await, Outcome::Stale);
    // Entries created in the same millisecond as the flush count as before
    // it: let the wall clock move past that millisecond.
    let flushed_by = std::time::SystemTime::now();
    wait_until(
        "the clock moved on",
        Duration::from_secs(1),
        || async move { std::time::SystemTime::now() > flushed_by + Duration::from_millis(1) },
    )
    .await;
    set_tagged(client, "k2", "").await;
    assert_eq!(outcome(client, NS, "k2").await, Outcome::Hit);
    assert_eq!(outcome(client, NEIGHBOUR, "k1").await, Outcome::Hit);

    if let Some(redis) = &world.redis {
        // The flushed generation's entries are still in Redis, unreachable,
        // aging out by their own TTL: that is the documented trade-off.
        let mut connection = redis.connection().await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("cg:{{{NS}:0:k5}}"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ttl > 0, "old entries keep their TTL: {ttl}");
    }
}

/// Keys of the neighbour namespace, counted without the gateway: raw SCAN on
/// Redis, else through Gets.
async fn neighbour_count(world: &mut World, keys: &[&str]) -> usize {
    if let Some(redis) = &world.redis {
        let pattern = format!("cg:{{{NEIGHBOUR}:*");
        return support::scan_count(&mut redis.connection().await, &pattern).await as usize;
    }
    let mut count = 0;
    for key in keys {
        if outcome(&mut world.client, NEIGHBOUR, key).await == Outcome::Hit {
            count += 1;
        }
    }
    count
}

async fn client_patterns_never_leave_their_namespace(backend: Backend) {
    let mut world = world(backend).await;
    // Awkward keys on both sides: glob characters, separators, other
    // namespaces' prefixes spelled out.
    let keys = [
        "x",
        "*",
        "\\*",
        "[a-z]",
        "a:b",
        ":",
        "cg:catalog:0:x",
        "cg:catalog.b:0:x",
        "cg:{catalog.b:0:x}",
        "}",
        "0:x",
        "ключ",
    ];
    for key in keys {
        world.set(NEIGHBOUR, key, b"n").await;
    }
    let before = neighbour_count(&mut world, &keys).await;
    assert_eq!(before, keys.len());
    let patterns = [
        "*",
        "[a-z]*",
        "\\*",
        "*:*",
        ":*",
        "b:*",
        ".b:*",
        "catalog.b:*",
        "*catalog.b*",
        "cg:catalog.b:*",
        "cg:{catalog.b:*",
        "}*",
        "*}*",
        "0:*",
        "../catalog.b/*",
        "\\",
        "[",
        "?*",
    ];
    for pattern in patterns {
        for key in keys {
            set_tagged(&mut world.client, key, "").await;
        }
        let answer = invalidate(
            &mut world.client,
            NS,
            Target::Pattern(pattern.into()),
            false,
        )
        .await;
        assert!(
            answer.affected <= keys.len() as u64,
            "{pattern}: {answer:?}"
        );
        let after = neighbour_count(&mut world, &keys).await;
        assert_eq!(after, before, "pattern {pattern:?} reached the neighbour");
    }
    // And `*` does empty its own namespace.
    for key in keys {
        assert_eq!(
            outcome(&mut world.client, NS, key).await,
            Outcome::Miss,
            "{key}"
        );
    }
}

/// One write a writer made: the key, and when its Set was sent and answered.
struct Written {
    key: String,
    sent: Instant,
    answered: Instant,
}

/// Runs `writers` tasks that each keep writing fresh keys `{prefix}{w}:{n}`
/// with `tags`, until `stop`; returns what each wrote.
fn spawn_writers(
    world: &World,
    stop: &Arc<AtomicBool>,
    writers: usize,
    prefix: &'static str,
    tags: &'static str,
) -> Vec<tokio::task::JoinHandle<Vec<Written>>> {
    (0..writers)
        .map(|w| {
            let stop = Arc::clone(stop);
            let endpoint = world.gateway.endpoint();
            tokio::spawn(async move {
                let mut client = CacheClient::connect(endpoint).await.unwrap();
                let mut written = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("{prefix}{w}:{n}");
                    let sent = Instant::now();
                    set_tagged(&mut client, &key, tags).await;
                    written.push(Written {
                        key,
                        sent,
                        answered: Instant::now(),
                    });
                }
                written
            })
        })
        .collect()
}

/// While writers keep writing matching (`hot`) and non-matching (`cold`)
/// entries, `target` removes every matching entry written before the
/// invalidation started, nothing that does not match, and no entry written
/// after it completed.
async fn exact_under_concurrent_writes(backend: Backend, target: Target) {
    let mut world = world(backend).await;
    // Something to find from the start, in batches.
    for batch in 0..4 {
        let items = (0..250)
            .flat_map(|i| {
                [("hot:seed", "hot"), ("cold:seed", "cold")].map(|(prefix, tag)| SetRequest {
                    namespace: NS.into(),
                    key: format!("{prefix}{batch}:{i}"),
                    value: b"seed".to_vec().into(),
                    attributes: attrs(&[("surrogate-key", tag)]),
                    ..Default::default()
                })
            })
            .collect();
        world
            .client
            .m_set(MSetRequest { items })
            .await
            .expect("seed");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = spawn_writers(&world, &stop, 3, "hot:live", "hot");
    tasks.extend(spawn_writers(&world, &stop, 3, "cold:live", "cold"));
    // Let the writers get going (a condition, not a nap).
    wait_until("writers have written", Duration::from_secs(10), || {
        let endpoint = world.gateway.endpoint();
        async move {
            let mut client = CacheClient::connect(endpoint).await.unwrap();
            outcome(&mut client, NS, "cold:live0:20").await == Outcome::Hit
        }
    })
    .await;

    let started = Instant::now();
    let answer = invalidate(&mut world.client, NS, target.clone(), false).await;
    let finished = Instant::now();
    // Keep writing after the invalidation completed.
    wait_until("writers wrote after it", Duration::from_secs(10), || {
        let endpoint = world.gateway.endpoint();
        async move {
            let mut client = CacheClient::connect(endpoint).await.unwrap();
            let _ = &client;
            Instant::now() > finished + Duration::from_millis(300)
                && outcome(&mut client, NS, "cold:seed0:0").await == Outcome::Hit
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.unwrap());
    }
    for batch in 0..4 {
        for i in 0..250 {
            for prefix in ["hot:seed", "cold:seed"] {
                written.push(Written {
                    key: format!("{prefix}{batch}:{i}"),
                    sent: started - Duration::from_secs(3600),
                    answered: started - Duration::from_secs(3600),
                });
            }
        }
    }

    let (mut before, mut after, mut during) = (0, 0, 0);
    let mut wrong = Vec::new();
    for write in &written {
        let hot = write.key.starts_with("hot:");
        let expected = if !hot {
            Some(Outcome::Hit)
        } else if write.answered < started {
            before += 1;
            Some(Outcome::Miss)
        } else if write.sent > finished {
            after += 1;
            Some(Outcome::Hit)
        } else {
            during += 1;
            None
        };
        let got = outcome(&mut world.client, NS, &write.key).await;
        if let Some(expected) = expected
            && got != expected
        {
            wrong.push(format!("{}: {got:?}, expected {expected:?}", write.key));
        }
    }
    println!(
        "{target:?}: removed {} ({} examined) in {:?}; hot writes before {before}, during {during}, after {after}; {} writes in all",
        answer.affected,
        answer.examined,
        finished - started,
        written.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    assert!(
        before >= 1000 && after > 0,
        "the test must cover both sides"
    );
}

async fn tag_invalidation_is_exact_while_writers_keep_writing(backend: Backend) {
    exact_under_concurrent_writes(backend, tags(&["hot"])).await;
}

async fn pattern_invalidation_is_exact_while_writers_keep_writing(backend: Backend) {
    exact_under_concurrent_writes(backend, Target::Pattern("hot:*".into())).await;
}

async fn writes_purge_the_tags_their_policy_names(backend: Backend) {
    let mut world = world(backend).await;
    let client = &mut world.client;
    for key in ["search:shoes:1", "search:shoes:2"] {
        set_tagged(client, key, "search:shoes").await;
    }
    set_tagged(client, "search:hats:1", "search:hats").await;
    // A product write purges the searches that listed it.
    let set = client
        .set(SetRequest {
            namespace: NS.into(),
            key: "product:9".into(),
            value: b"new price".to_vec().into(),
            attributes: attrs(&[("surrogate-key", "product:9"), ("purge", "search:shoes")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(set.stored, "{set:?}");
    assert_eq!(
        (set.invalidated, set.invalidation_error.as_str()),
        (2, ""),
        "{set:?}"
    );
    expect_outcomes(
        client,
        NS,
        &[
            ("search:shoes:1", Outcome::Miss),
            ("search:shoes:2", Outcome::Miss),
            ("search:hats:1", Outcome::Hit),
            ("product:9", Outcome::Hit),
        ],
    )
    .await;
    // A delete purges too, after removing its own key.
    let deleted = client
        .delete(DeleteRequest {
            namespace: NS.into(),
            key: "product:9".into(),
            attributes: attrs(&[("purge", "search:hats")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted, "{deleted:?}");
    assert_eq!(deleted.invalidated, 1, "{deleted:?}");
    assert_eq!(outcome(client, NS, "search:hats:1").await, Outcome::Miss);
}

async fn long_jobs_answer_running_and_can_be_followed(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        catalog(config);
        // The job below waits on a paused Redis: give its commands time.
        config.redis.response_timeout = Duration::from_secs(10);
    })
    .await;
    let total = 20_000;
    for batch in 0..total / 1000 {
        let items = (0..1000)
            .map(|i| SetRequest {
                namespace: NS.into(),
                key: format!("bulk:{batch}:{i}"),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .collect();
        world.client.m_set(MSetRequest { items }).await.unwrap();
    }
    if let Some(redis) = &world.redis {
        // Redis holds back writes (the job's UNLINKs) for a second: the job
        // certainly outlives the call's wait.
        let mut connection = redis.connection().await;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1000)
            .arg("WRITE")
            .exec_async(&mut connection)
            .await
            .unwrap();
    }
    let started = world
        .client
        .invalidate(InvalidateRequest {
            namespace: NS.into(),
            target: Some(Target::Pattern("bulk:*".into())),
            wait_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!started.job_id.is_empty(), "{started:?}");
    if world.redis.is_some() {
        assert_eq!(started.state, JobState::Running as i32, "{started:?}");
    } else {
        // The in-process store may well finish 20 000 entries in a millisecond.
        assert!(
            [JobState::Running as i32, JobState::Done as i32].contains(&started.state),
            "{started:?}"
        );
    }
    let finished = world
        .client
        .get_invalidation(GetInvalidationRequest {
            job_id: started.job_id.clone(),
            wait_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(finished.state, JobState::Done as i32, "{finished:?}");
    assert_eq!(finished.affected, total, "{finished:?}");
    assert!(finished.examined >= total, "{finished:?}");
    assert!(finished.affected >= started.affected, "progress only grows");
    assert_eq!(
        outcome(&mut world.client, NS, "bulk:3:7").await,
        Outcome::Miss
    );
    // Finished jobs stay visible; unknown ones are NOT_FOUND.
    let again = world
        .client
        .get_invalidation(GetInvalidationRequest {
            job_id: started.job_id,
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, finished);
    let unknown = world
        .client
        .get_invalidation(GetInvalidationRequest {
            job_id: "nope-1".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("nope-1"), "{unknown:?}");
}

async fn bad_invalidations_are_refused_precisely(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        catalog(config);
        config.invalidation.max_targets = 3;
        config.default_namespace.enabled = false;
    })
    .await;
    set_tagged(&mut world.client, "k", "t").await;
    let cases: Vec<(&str, Option<Target>, Code, &str)> = vec![
        ("no target", None, Code::InvalidArgument, "target"),
        ("empty tags", Some(tags(&[])), Code::InvalidArgument, "tags"),
        (
            "empty tag",
            Some(tags(&[""])),
            Code::InvalidArgument,
            "tags",
        ),
        (
            "long tag",
            Some(Target::Tags(TagList {
                tags: vec!["t".repeat(256)],
            })),
            Code::InvalidArgument,
            "255",
        ),
        (
            "too many tags",
            Some(tags(&["a", "b", "c", "d"])),
            Code::ResourceExhausted,
            "invalidation.max_targets",
        ),
        (
            "empty key",
            Some(Target::Keys(KeyList {
                keys: vec!["k".into(), String::new()],
            })),
            Code::InvalidArgument,
            "key",
        ),
        (
            "no keys",
            Some(Target::Keys(KeyList { keys: vec![] })),
            Code::InvalidArgument,
            "keys",
        ),
        (
            "empty pattern",
            Some(Target::Pattern(String::new())),
            Code::InvalidArgument,
            "pattern",
        ),
        (
            "long pattern",
            Some(Target::Pattern("*".repeat(2000))),
            Code::InvalidArgument,
            "limits.max_key_bytes",
        ),
        (
            "whole_namespace false",
            Some(Target::WholeNamespace(false)),
            Code::InvalidArgument,
            "whole_namespace",
        ),
    ];
    for (case, target, code, mention) in cases {
        let err = world
            .client
            .invalidate(InvalidateRequest {
                namespace: NS.into(),
                target,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{case}: {err:?}");
        assert!(err.message().contains(mention), "{case}: {err:?}");
    }
    let unknown = world
        .client
        .invalidate(InvalidateRequest {
            namespace: "undeclared".into(),
            target: Some(Target::WholeNamespace(true)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    // Nothing was invalidated by any of them.
    assert_eq!(outcome(&mut world.client, NS, "k").await, Outcome::Hit);
}

/// The tag index does not outlive its entries: 100 000 entries that all
/// expired leave no index behind, and a long-lived tag's index sheds expired
/// members as it is written to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_tag_index_of_expired_entries_is_cleaned_up() {
    let world = World::start_with(Backend::Redis, |config| {
        bind(
            config,
            NS,
            "surrogate-keys",
            Some(json!({"ttl": "5s"})),
            FallbackMode::FailClosed,
        );
    })
    .await;
    let redis = world.redis.as_ref().unwrap();
    let connection = redis.connection().await;
    let total = 100_000;
    let started = Instant::now();
    let writers: Vec<_> = (0..4)
        .map(|c| {
            let endpoint = world.gateway.endpoint();
            tokio::spawn(async move {
                let mut client = CacheClient::connect(endpoint).await.unwrap();
                for batch in 0..total / 4 / 1000 {
                    let items = (0..1000)
                        .map(|i| SetRequest {
                            namespace: NS.into(),
                            key: format!("e:{c}:{batch}:{i}"),
                            value: b"v".to_vec().into(),
                            attributes: attrs(&[("surrogate-key", "short-lived shared")]),
                            ..Default::default()
                        })
                        .collect();
                    client.m_set(MSetRequest { items }).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let index_size = |tag: &'static str| {
        let mut connection = connection.clone();
        async move {
            redis::cmd("ZCARD")
                .arg(format!("cgt:{{{NS}:0:{tag}}}"))
                .query_async::<u64>(&mut connection)
                .await
                .unwrap()
        }
    };
    let indexed = index_size("short-lived").await;
    let live = support::scan_count(&mut connection.clone(), &format!("cg:{{{NS}:0:e:*")).await;
    println!(
        "wrote {total} tagged entries in {:?}; {live} still live, {indexed} indexed",
        started.elapsed()
    );
    // Every live entry is indexed; entries that expired while the writes went
    // on may already have been shed.
    assert!(
        live <= indexed && indexed <= total,
        "{live} live, {indexed} indexed"
    );
    assert!(
        live > 0,
        "the writes were too slow for the TTL to test anything"
    );

    // Nothing writes `short-lived` again: its index expires with its last
    // entry. `shared` keeps being written meanwhile, and sheds the members of
    // entries that expired as it goes: once they all have, it holds at most
    // the keepalive entries (a few milliseconds after `short-lived` goes:
    // each tag's index is scored by its own call, on Redis's clock).
    let client = world.gateway.client().await;
    let mut keepalives = 0u64;
    wait_until(
        "the expired tag's index to go and `shared` to shed every expired member",
        Duration::from_secs(60),
        || {
            keepalives += 1;
            let mut client = client.clone();
            let mut connection = connection.clone();
            let index_size = &index_size;
            async move {
                set_tagged(&mut client, &format!("keepalive:{keepalives}"), "shared").await;
                let short_lived_gone = redis::cmd("EXISTS")
                    .arg(format!("cgt:{{{NS}:0:short-lived}}"))
                    .query_async::<u64>(&mut connection)
                    .await
                    .unwrap()
                    == 0;
                short_lived_gone && index_size("shared").await <= keepalives
            }
        },
    )
    .await;
    // Nothing has written since: the index is as the last check found it.
    let shared = index_size("shared").await;
    println!("`shared` holds {shared} members after {keepalives} keepalive writes");
    assert!(shared >= 1, "the live keepalive entry is indexed");
}

/// A Redis that lost its data (restart without persistence, FLUSHALL) also
/// lost the namespace's generation: the gateway follows it back to 0 instead
/// of hiding the namespace behind the generation it remembers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_follows_a_generation_reset() {
    let mut world = world(Backend::Redis).await;
    let flushed = invalidate(&mut world.client, NS, Target::WholeNamespace(true), false).await;
    assert_eq!(flushed.generation, 1);
    set_tagged(&mut world.client, "k", "").await;
    assert_eq!(outcome(&mut world.client, NS, "k").await, Outcome::Hit);
    let mut connection = world.redis.as_ref().unwrap().connection().await;
    redis::cmd("FLUSHALL")
        .exec_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(outcome(&mut world.client, NS, "k").await, Outcome::Miss);
    set_tagged(&mut world.client, "k", "t").await;
    assert_eq!(outcome(&mut world.client, NS, "k").await, Outcome::Hit);
    let entries: Vec<String> = redis::cmd("KEYS")
        .arg("cg:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(entries, [format!("cg:{{{NS}:0:k}}")]);
    assert_eq!(
        invalidate(&mut world.client, NS, tags(&["t"]), false)
            .await
            .affected,
        1
    );
}

/// With Redis gone, an invalidation does not pretend: the job fails and says
/// why, and the call still answers within its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_failed_invalidations_say_why() {
    let mut world = world(Backend::Redis).await;
    set_tagged(&mut world.client, "k", "t").await;
    world.redis.as_mut().unwrap().kill();
    for target in [
        tags(&["t"]),
        Target::Pattern("*".into()),
        Target::WholeNamespace(true),
    ] {
        let started = Instant::now();
        let answer = world
            .client
            .invalidate(InvalidateRequest {
                namespace: NS.into(),
                target: Some(target.clone()),
                wait_ms: 10_000,
                ..Default::default()
            })
            .await
            .expect("the call itself succeeds")
            .into_inner();
        assert_eq!(
            answer.state,
            JobState::Failed as i32,
            "{target:?}: {answer:?}"
        );
        assert!(answer.error.contains("store"), "{target:?}: {answer:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    let metrics = world.gateway.metrics.encode();
    assert!(
        metrics.contains(r#"cachegw_invalidation_jobs_total{namespace="catalog",target="tags",outcome="failed"} 1"#),
        "{metrics}"
    );
}

/// Concurrent Gets share one Redis pipeline (gateway/src/store/coalesce.rs)
/// and keep the generation guarantee: once a flush on one gateway is
/// acknowledged, no Get that starts afterwards on another gateway serves an
/// entry from before it, however many Gets are in flight together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_gets_never_serve_a_namespace_flushed_on_another_gateway() {
    const SPACE: &str = "gathered";
    let redis = support::RedisServer::start().await;
    let config = || support::test_config(gateway::config::StoreKind::Redis, Some(redis.url()));
    let writer = support::TestGateway::start(config()).await;
    let reader = support::TestGateway::start(config()).await;
    let mut write = writer.client().await;
    for i in 0..32 {
        write
            .set(SetRequest {
                namespace: SPACE.into(),
                key: format!("k{i}"),
                value: b"old".to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("set");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool)>::new()));
    let mut readers = Vec::new();
    for task in 0..32 {
        let (stop, seen, mut client) =
            (Arc::clone(&stop), Arc::clone(&seen), reader.client().await);
        readers.push(tokio::spawn(async move {
            let mut i = task;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answer = client
                    .get(GetRequest {
                        namespace: SPACE.into(),
                        key: format!("k{}", i % 32),
                        ..Default::default()
                    })
                    .await
                    .expect("get")
                    .into_inner();
                let hit = answer.outcome == Outcome::Hit as i32;
                assert!(!hit || answer.value == b"old".as_slice(), "{answer:?}");
                seen.lock().unwrap().push((started, hit));
                i += 7;
            }
        }));
    }
    let count = |since: Option<Instant>| {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|(started, _)| since.is_none_or(|since| *started > since))
            .count()
    };
    let count = &count;
    wait_until("Gets in flight", Duration::from_secs(30), || async move {
        count(None) >= 300
    })
    .await;
    invalidate(&mut write, SPACE, Target::WholeNamespace(true), false).await;
    let acknowledged = Instant::now();
    wait_until(
        "Gets after the flush",
        Duration::from_secs(30),
        || async move { count(Some(acknowledged)) >= 300 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in readers {
        task.await.expect("reader");
    }
    // The lock is released before the next await.
    let answered = {
        let seen = seen.lock().unwrap();
        let hits_before = seen.iter().filter(|(_, hit)| *hit).count();
        assert!(hits_before > 0, "the entries were served before the flush");
        let served_after = seen
            .iter()
            .filter(|(started, hit)| *started > acknowledged && *hit)
            .count();
        assert_eq!(
            served_after, 0,
            "Gets started after the flush served old entries"
        );
        seen.len() as u64
    };
    // They were gathered: fewer reads of entries (one MGET, or one GET per
    // key on a cluster, per round) than Gets answered.
    let mut connection = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    let calls = |command: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let rounds = calls("mget") + calls("get");
    assert!(
        rounds > 0 && rounds < answered,
        "{rounds} entry reads for {answered} Gets:\n{info}"
    );
}
