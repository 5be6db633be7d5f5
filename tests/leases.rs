//! Freshness and stampede protection end to end: fresh/stale/gone, leases
//! (one filler across gateways, coalesced waiters, fencing tokens, expiry,
//! release), stale-while-revalidate, stale-if-error and XFetch early refresh.
//! Entries get their fresh TTL and stale window from the `surrogate-keys`
//! example policy's config.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::{
    api::proto::v1::{
        DeleteRequest, GetRequest, GetResponse, InvalidateRequest, JobState, KeyList, LeaseRequest,
        LeaseState, LeaseWrite, Outcome, ReleaseLeaseRequest, SetRequest, SetResponse, TagList,
        cache_client::CacheClient, invalidate_request::Target,
    },
    config::{Config, FallbackMode, StoreKind},
};
use serde_json::json;
use support::{Backend, RedisServer, TestGateway, World, bind, test_config, wait_until};
use tonic::{Code, transport::Channel};

const NS: &str = "origin";

on_both_stores!(
    entries_are_fresh_then_stale_then_gone,
    a_miss_grants_one_lease_and_waiters_coalesce_on_the_fill,
    invalidations_void_leases_so_slow_fills_never_resurrect_data,
    stale_is_served_while_exactly_one_refresh_lease_is_out,
    a_dead_fillers_lease_expires_and_exactly_one_caller_gets_the_next,
    released_leases_pass_on_at_once_and_only_their_holder_can_release,
    bad_lease_requests_are_refused_precisely,
    ttl_jitter_spreads_the_expiries_of_entries_written_together,
);

/// Entries fresh for `ttl`, then stale for `stale`.
fn freshness(config: &mut Config, ttl: &str, stale: &str) {
    bind(
        config,
        NS,
        "surrogate-keys",
        Some(json!({"ttl": ttl, "stale": stale})),
        FallbackMode::FailClosed,
    );
}

async fn world(backend: Backend, ttl: &str, stale: &str) -> World {
    World::start_with(backend, |config| freshness(config, ttl, stale)).await
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        namespace: NS.into(),
        key: key.into(),
        ..Default::default()
    }
}

fn leased(key: &str, wait_ms: u64) -> GetRequest {
    GetRequest {
        lease: Some(LeaseRequest { wait_ms, ttl_ms: 0 }),
        ..get(key)
    }
}

fn set(key: &str, value: &str, token: &str) -> SetRequest {
    SetRequest {
        namespace: NS.into(),
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        lease_token: token.into(),
        ..Default::default()
    }
}

async fn call_get(client: &mut CacheClient<Channel>, request: GetRequest) -> GetResponse {
    let got = client.get(request).await.expect("get").into_inner();
    assert!(!got.degraded, "{got:?}");
    got
}

async fn call_set(client: &mut CacheClient<Channel>, request: SetRequest) -> SetResponse {
    let set = client.set(request).await.expect("set").into_inner();
    assert!(!set.degraded, "{set:?}");
    set
}

fn state(got: &GetResponse) -> LeaseState {
    LeaseState::try_from(got.lease).unwrap()
}

fn outcome(got: &GetResponse) -> Outcome {
    Outcome::try_from(got.outcome).unwrap()
}

async fn entries_are_fresh_then_stale_then_gone(backend: Backend) {
    let mut world = world(backend, "300ms", "5s").await;
    let client = &mut world.client;
    assert!(call_set(client, set("k", "v", "")).await.stored);
    let fresh = call_get(client, get("k")).await;
    assert_eq!(
        (outcome(&fresh), fresh.value.as_ref()),
        (Outcome::Hit, &b"v"[..])
    );
    assert_eq!(state(&fresh), LeaseState::LeaseNotRequested);

    wait_until("the entry goes stale", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            let got = call_get(
                &mut client,
                GetRequest {
                    allow_stale: true,
                    ..get("k")
                },
            )
            .await;
            outcome(&got) == Outcome::Stale
        }
    })
    .await;
    // Stale, and allowed (stale-if-error): the last value. Not allowed: a
    // miss without it.
    let stale = call_get(
        client,
        GetRequest {
            allow_stale: true,
            ..get("k")
        },
    )
    .await;
    assert_eq!(outcome(&stale), Outcome::Stale, "{stale:?}");
    assert_eq!(stale.value, b"v".as_slice());
    assert_eq!(stale.ttl_remaining_ms, 0);
    let strict = call_get(client, get("k")).await;
    assert_eq!(outcome(&strict), Outcome::Miss, "{strict:?}");
    assert!(strict.value.is_empty());

    wait_until("the entry is gone", Duration::from_secs(15), || {
        let mut client = client.clone();
        async move {
            let got = call_get(
                &mut client,
                GetRequest {
                    allow_stale: true,
                    ..get("k")
                },
            )
            .await;
            outcome(&got) == Outcome::Miss
        }
    })
    .await;
}

async fn a_miss_grants_one_lease_and_waiters_coalesce_on_the_fill(backend: Backend) {
    let world = world(backend, "1m", "0s").await;
    coalesce(&[&world.gateway], 200).await;
}

/// `callers` concurrent Get-with-lease calls of one cold key, spread over
/// `gateways`: exactly one is granted the lease and fills; everyone else
/// gets the filled value.
async fn coalesce(gateways: &[&TestGateway], callers: usize) {
    // A few channels per gateway, so that no HTTP/2 stream limit queues calls.
    let mut clients = Vec::new();
    for gateway in gateways {
        for _ in 0..8 {
            clients.push(gateway.client().await);
        }
    }
    let metrics: Vec<_> = gateways
        .iter()
        .map(|gateway| gateway.metrics.clone())
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let got = call_get(&mut client, leased("cold", 20_000)).await;
                if state(&got) == LeaseState::Granted {
                    // A real stampede: fill only once every other caller is
                    // waiting on this fill (in flight is not enough: a caller
                    // still on its way to the lease would find the fill done).
                    wait_until("every other caller waits", Duration::from_secs(30), || {
                        let waiting: i64 = metrics
                            .iter()
                            .map(|m| support::gauge(&m.encode(), "cachegw_lease_waiters"))
                            .sum();
                        async move { waiting >= callers as i64 - 1 }
                    })
                    .await;
                    // The origin takes a while.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let filled =
                        call_set(&mut client, set("cold", "filled once", &got.lease_token)).await;
                    assert_eq!(filled.lease, LeaseWrite::Accepted as i32, "{filled:?}");
                    assert!(filled.stored);
                }
                got
            })
        })
        .collect();
    let mut states: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let got = task.await.unwrap();
        let name = format!("{:?}", state(&got));
        if state(&got) == LeaseState::Coalesced {
            assert_eq!(outcome(&got), Outcome::Hit);
            assert_eq!(got.value, b"filled once".as_slice());
        }
        *states.entry(name).or_default() += 1;
    }
    println!(
        "{callers} callers over {} gateway(s): {states:?} in {:?}",
        gateways.len(),
        started.elapsed()
    );
    assert_eq!(states.get("Granted"), Some(&1), "{states:?}");
    assert_eq!(states.get("Coalesced"), Some(&(callers - 1)), "{states:?}");
    // Every outcome is counted, and the fill once.
    let counted: u64 = gateways
        .iter()
        .map(|gateway| support::counter_sum(&gateway.metrics.encode(), "cachegw_leases"))
        .sum();
    assert_eq!(
        counted,
        callers as u64 + 1,
        "each Get's outcome and the accepted fill"
    );
}

/// The headline stampede test: 1 000 callers over two gateway processes'
/// worth of gateways sharing one Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_one_lease_among_a_thousand_callers_on_two_gateways() {
    let redis = RedisServer::start().await;
    let mut config = test_config(StoreKind::Redis, Some(redis.url()));
    freshness(&mut config, "1m", "0s");
    // About coalescing, not speed: a debug build answering 1000 callers at once
    // on two shared cores can leave a reply unread for longer than the fixtures'
    // 300 ms, and timeouts would open the breaker and answer degraded.
    config.redis.response_timeout = Duration::from_secs(5);
    config.server.store_timeout = Duration::from_secs(5);
    let one = TestGateway::start(config.clone()).await;
    let two = TestGateway::start(config).await;
    coalesce(&[&one, &two], 1000).await;
}

async fn invalidations_void_leases_so_slow_fills_never_resurrect_data(backend: Backend) {
    let mut world = world(backend, "1m", "0s").await;
    let client = &mut world.client;
    let voiders = [
        (
            "keys",
            Target::Keys(KeyList {
                keys: vec!["k".into()],
            }),
        ),
        ("pattern", Target::Pattern("k*".into())),
        (
            "tag",
            Target::Tags(TagList {
                tags: vec!["t".into()],
            }),
        ),
        ("namespace", Target::WholeNamespace(true)),
    ];
    // First the plain Delete: Get(lease) -> Delete -> Set(token) is refused.
    let granted = call_get(client, leased("k", 0)).await;
    assert_eq!(state(&granted), LeaseState::Granted, "{granted:?}");
    client
        .delete(DeleteRequest {
            namespace: NS.into(),
            key: "k".into(),
            attributes: HashMap::new(),
        })
        .await
        .unwrap();
    let mut late = set("k", "computed before the delete", &granted.lease_token);
    late.attributes.insert("surrogate-key".into(), "t".into());
    let refused = call_set(client, late.clone()).await;
    assert_eq!(refused.lease, LeaseWrite::Voided as i32, "{refused:?}");
    assert!(!refused.stored);
    assert_eq!(outcome(&call_get(client, get("k")).await), Outcome::Miss);

    for (name, voider) in voiders {
        let granted = call_get(client, leased("k", 0)).await;
        assert_eq!(state(&granted), LeaseState::Granted, "{name}: {granted:?}");
        let voider = InvalidateRequest {
            namespace: NS.into(),
            target: Some(voider),
            ..Default::default()
        };
        let answer = client.invalidate(voider).await.unwrap().into_inner();
        assert_eq!(answer.state, JobState::Done as i32, "{name}: {answer:?}");
        let mut late = late.clone();
        late.lease_token = granted.lease_token.clone();
        let refused = call_set(client, late).await;
        assert_eq!(
            refused.lease,
            LeaseWrite::Voided as i32,
            "{name}: {refused:?}"
        );
        assert!(!refused.stored, "{name}");
        let after = call_get(client, get("k")).await;
        assert_eq!(outcome(&after), Outcome::Miss, "{name}: not resurrected");
    }

    // A tag purge voids only fills that carry the tag.
    let granted = call_get(client, leased("k", 0)).await;
    assert_eq!(state(&granted), LeaseState::Granted);
    client
        .invalidate(InvalidateRequest {
            namespace: NS.into(),
            target: Some(Target::Tags(TagList {
                tags: vec!["other".into()],
            })),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut fill = late.clone();
    fill.lease_token = granted.lease_token;
    let accepted = call_set(client, fill.clone()).await;
    assert_eq!(accepted.lease, LeaseWrite::Accepted as i32, "{accepted:?}");
    assert_eq!(outcome(&call_get(client, get("k")).await), Outcome::Hit);
    // A token is good for one write.
    let again = call_set(client, fill).await;
    assert_eq!(again.lease, LeaseWrite::Voided as i32, "{again:?}");
}

async fn stale_is_served_while_exactly_one_refresh_lease_is_out(backend: Backend) {
    let mut world = world(backend, "200ms", "1m").await;
    let client = &mut world.client;
    assert!(call_set(client, set("k", "v1", "")).await.stored);
    wait_until("the entry goes stale", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            let got = call_get(
                &mut client,
                GetRequest {
                    allow_stale: true,
                    ..get("k")
                },
            )
            .await;
            outcome(&got) == Outcome::Stale
        }
    })
    .await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                call_get(
                    &mut client,
                    GetRequest {
                        allow_stale: true,
                        ..leased("k", 5_000)
                    },
                )
                .await
            })
        })
        .collect();
    let mut token = None;
    let mut served = 0;
    for task in tasks {
        let got = task.await.unwrap();
        assert_eq!(outcome(&got), Outcome::Stale, "{got:?}");
        assert_eq!(
            got.value,
            b"v1".as_slice(),
            "everyone gets the stale value at once"
        );
        match state(&got) {
            LeaseState::Granted => assert!(token.replace(got.lease_token).is_none(), "two leases"),
            LeaseState::StaleServed => served += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let token = token.expect("one refresh lease");
    assert_eq!(served, 19);
    let refreshed = call_set(client, set("k", "v2", &token)).await;
    assert_eq!(refreshed.lease, LeaseWrite::Accepted as i32);
    let got = call_get(client, leased("k", 0)).await;
    assert_eq!(
        (outcome(&got), got.value.as_ref()),
        (Outcome::Hit, &b"v2"[..])
    );
    assert_eq!(state(&got), LeaseState::NotNeeded);
}

async fn a_dead_fillers_lease_expires_and_exactly_one_caller_gets_the_next(backend: Backend) {
    let mut world = world(backend, "1m", "0s").await;
    let client = &mut world.client;
    let short = |wait_ms| GetRequest {
        lease: Some(LeaseRequest {
            wait_ms,
            ttl_ms: 500,
        }),
        ..get("k")
    };
    // The filler is granted the lease and never fills.
    let dead = call_get(client, short(0)).await;
    assert_eq!(state(&dead), LeaseState::Granted);
    let granted_at = Instant::now();
    // Waiters give up after their bound.
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { call_get(&mut client, short(100)).await })
        })
        .collect();
    for waiter in waiters {
        let got = waiter.await.unwrap();
        if granted_at.elapsed() < Duration::from_millis(450) {
            assert_eq!(state(&got), LeaseState::TimedOut, "{got:?}");
            assert_eq!(outcome(&got), Outcome::Miss);
        }
    }
    // Once the lease has expired, exactly one of the next callers gets it.
    let next = Arc::new(AtomicU64::new(0));
    wait_until(
        "the dead filler's lease expires",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let next = Arc::clone(&next);
            async move {
                let callers: Vec<_> = (0..10)
                    .map(|_| {
                        let mut client = client.clone();
                        tokio::spawn(async move { call_get(&mut client, short(0)).await })
                    })
                    .collect();
                let mut granted = 0;
                for caller in callers {
                    let got = caller.await.unwrap();
                    match state(&got) {
                        LeaseState::Granted => granted += 1,
                        LeaseState::Wait => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert!(granted <= 1, "{granted} leases at once");
                next.store(granted, Ordering::Relaxed);
                granted == 1
            }
        },
    )
    .await;
    assert!(
        granted_at.elapsed() >= Duration::from_millis(450),
        "not before it expired"
    );
    // The dead filler's token is no good any more.
    let zombie = call_set(client, set("k", "late", &dead.lease_token)).await;
    assert_eq!(zombie.lease, LeaseWrite::Voided as i32);
}

async fn released_leases_pass_on_at_once_and_only_their_holder_can_release(backend: Backend) {
    let mut world = world(backend, "1m", "0s").await;
    let client = &mut world.client;
    let first = call_get(client, leased("k", 0)).await;
    assert_eq!(state(&first), LeaseState::Granted);
    assert_eq!(
        state(&call_get(client, leased("k", 0)).await),
        LeaseState::Wait
    );
    let release = |token: &str| ReleaseLeaseRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: token.into(),
        ..Default::default()
    };
    // Someone else's (well-formed) token releases nothing.
    let forged = format!(
        "{}.0123456789abcdef",
        first.lease_token.split('.').next().unwrap()
    );
    let refused = client
        .release_lease(release(&forged))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.released);
    assert_eq!(
        state(&call_get(client, leased("k", 0)).await),
        LeaseState::Wait
    );
    let released = client
        .release_lease(release(&first.lease_token))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let second = call_get(client, leased("k", 0)).await;
    assert_eq!(state(&second), LeaseState::Granted, "{second:?}");
    assert_ne!(second.lease_token, first.lease_token);
    // Releasing twice: the second time there is nothing of this holder's.
    assert!(
        !client
            .release_lease(release(&first.lease_token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

async fn bad_lease_requests_are_refused_precisely(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        freshness(config, "1m", "0s");
        config.limits.max_lease_ttl = Duration::from_secs(60);
        config.limits.max_lease_wait = Duration::from_secs(5);
    })
    .await;
    let client = &mut world.client;
    let long_lease = GetRequest {
        lease: Some(LeaseRequest {
            wait_ms: 0,
            ttl_ms: 61_000,
        }),
        ..get("k")
    };
    let err = client.get(long_lease).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limits.max_lease_ttl"), "{err:?}");
    let err = client.get(leased("k", 6_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limits.max_lease_wait"), "{err:?}");
    for token in [
        "nonsense",
        "123",
        "123.xyz",
        "1.0123456789abcdefg",
        &"9".repeat(80),
    ] {
        let err = client.set(set("k", "v", token)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}");
        assert!(err.message().contains("lease_token"), "{err:?}");
    }
    // Nothing was written, and no lease is held.
    assert_eq!(outcome(&call_get(client, get("k")).await), Outcome::Miss);
    assert_eq!(
        state(&call_get(client, leased("k", 0)).await),
        LeaseState::Granted
    );
}

/// XFetch: with a fill that takes 100 ms and entries fresh for 1 s, readers
/// that keep reading get early-refresh leases shortly before each expiry,
/// about one per expiry, and never see the entry expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_xfetch_refreshes_about_once_per_expiry_before_it() {
    let world = World::start_with(Backend::Redis, |config| {
        freshness(config, "1s", "0s");
    })
    .await;
    let mut client = world.gateway.client().await;
    // The first fill, timed: the entry records how long it took.
    let first = call_get(&mut client, leased("hot", 0)).await;
    assert_eq!(state(&first), LeaseState::Granted);
    tokio::time::sleep(Duration::from_millis(100)).await; // the origin's work
    let filled = call_set(&mut client, set("hot", "version 0", &first.lease_token)).await;
    assert_eq!(filled.lease, LeaseWrite::Accepted as i32);

    let run_for = Duration::from_secs(6);
    let started = Instant::now();
    let version = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client.clone();
            let version = Arc::clone(&version);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while started.elapsed() < run_for {
                    let got = call_get(&mut client, leased("hot", 0)).await;
                    let value = String::from_utf8_lossy(&got.value).into_owned();
                    seen.push((
                        outcome(&got),
                        state(&got),
                        value.clone(),
                        got.ttl_remaining_ms,
                    ));
                    if state(&got) == LeaseState::Granted && outcome(&got) == Outcome::Hit {
                        // An early refresh: serve the value, refresh behind it.
                        let next = version.fetch_add(1, Ordering::Relaxed) + 1;
                        tokio::time::sleep(Duration::from_millis(100)).await; // the origin
                        let set = call_set(
                            &mut client,
                            set("hot", &format!("version {next}"), &got.lease_token),
                        )
                        .await;
                        assert_eq!(set.lease, LeaseWrite::Accepted as i32, "{set:?}");
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await; // pacing
                    }
                }
                seen
            })
        })
        .collect();
    let mut reads = Vec::new();
    for reader in readers {
        reads.extend(reader.await.unwrap());
    }
    // Early refreshes per version of the entry, and how much fresh time was
    // left when each was granted.
    let mut per_version: HashMap<String, u64> = HashMap::new();
    let mut left_ms = Vec::new();
    for (outcome, state, value, ttl) in &reads {
        assert_eq!(
            *outcome,
            Outcome::Hit,
            "readers never see the entry expire: {value} {state:?}"
        );
        if *state == LeaseState::Granted {
            *per_version.entry(value.clone()).or_default() += 1;
            left_ms.push(*ttl);
        }
    }
    let refreshes: u64 = per_version.values().sum();
    let mut distribution: HashMap<u64, u64> = HashMap::new();
    for count in per_version.values() {
        *distribution.entry(*count).or_default() += 1;
    }
    left_ms.sort_unstable();
    println!(
        "{} reads over {run_for:?}: {refreshes} early refreshes of {} versions; refreshes per version {distribution:?}; fresh time left when granted (ms) {left_ms:?}",
        reads.len(),
        per_version.len()
    );
    // Refreshes kept coming, each before its version expired (every read
    // above was a hit), and one per version: the lease is conditional on the
    // version read, so a reader that read a version just before its refresh
    // landed does not refresh it again.
    assert!(refreshes >= 4, "{refreshes} refreshes in {run_for:?}");
    assert!(
        per_version.values().all(|count| *count == 1),
        "one refresh lease per version: {per_version:?}"
    );
    assert!(left_ms.iter().all(|left| *left < 1_000), "{left_ms:?}");
}

async fn ttl_jitter_spreads_the_expiries_of_entries_written_together(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        bind(
            config,
            "jittered",
            "ttl-by-route",
            Some(json!({"rules": [{"prefix": "j:", "ttl": "10s", "jitter": "5s"}]})),
            FallbackMode::FailClosed,
        );
    })
    .await;
    let mut ttls = Vec::new();
    for i in 0..50 {
        let set = world
            .client
            .set(SetRequest {
                namespace: "jittered".into(),
                key: format!("j:{i}"),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(set.stored, "{set:?}");
        assert!((10_000..=15_000).contains(&set.ttl_ms), "{set:?}");
        ttls.push(set.ttl_ms);
        let got = world
            .client
            .get(GetRequest {
                namespace: "jittered".into(),
                key: format!("j:{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.ttl_remaining_ms <= set.ttl_ms && got.ttl_remaining_ms + 2_000 > set.ttl_ms);
    }
    ttls.sort_unstable();
    let spread = ttls[ttls.len() - 1] - ttls[0];
    println!("50 entries written together expire over {spread} ms: {ttls:?}");
    // 50 uniform draws over 5 s: all within 1 s of each other has a chance
    // of about 50 * 0.2^49.
    assert!(spread >= 1_000, "{ttls:?}");
}
