//! Graceful degradation and the gRPC conventions: a Redis that dies, is down
//! at start, or hangs; health, reflection and graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use gateway::{
    api::proto::v1::{GetRequest, Outcome, SetRequest},
    config::StoreKind,
};
use support::{Backend, RedisServer, TestGateway, World, test_config, wait_until};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const NS: &str = "orders";

fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        namespace: NS.into(),
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        namespace: NS.into(),
        key: key.into(),
        attributes: Default::default(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_killed_mid_run_degrades_then_recovers_in_the_same_gateway() {
    let mut world = World::start(Backend::Redis).await;
    // store_timeout in the test config; a degraded answer must come within it.
    let budget = Duration::from_millis(500);
    let margin = Duration::from_millis(400);

    // Load running before, during and after the outage.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..16 {
        let mut client = world.client.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut ok, mut degraded, mut errors, mut slowest) =
                (0u64, 0u64, Vec::new(), Duration::ZERO);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let began = Instant::now();
                let key = format!("w{worker}-{}", i % 10);
                let result = if i.is_multiple_of(2) {
                    client
                        .set(set(&key, "v"))
                        .await
                        .map(|r| r.into_inner().degraded)
                } else {
                    client.get(get(&key)).await.map(|r| r.into_inner().degraded)
                };
                slowest = slowest.max(began.elapsed());
                match result {
                    Ok(true) => degraded += 1,
                    Ok(false) => ok += 1,
                    Err(status) => errors.push(status),
                }
            }
            (ok, degraded, errors, slowest)
        }));
    }

    let mut client = world.client.clone();
    wait_until(
        "normal answers before the outage",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                client
                    .set(set("probe", "1"))
                    .await
                    .is_ok_and(|r| r.get_ref().stored)
            }
        },
    )
    .await;

    world.redis.as_mut().unwrap().kill();
    wait_until(
        "degraded answers after the kill",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get(get("probe"))
                    .await
                    .is_ok_and(|r| r.get_ref().degraded)
            }
        },
    )
    .await;
    // While Redis is down every answer is degraded, and quickly.
    for _ in 0..5 {
        let began = Instant::now();
        let response = client
            .get(get("probe"))
            .await
            .expect("degraded, not an error")
            .into_inner();
        assert!(
            response.degraded && response.outcome == Outcome::Miss as i32,
            "{response:?}"
        );
        assert!(
            began.elapsed() < budget + margin,
            "degraded answer took {:?}",
            began.elapsed()
        );
        let response = client
            .set(set("probe", "2"))
            .await
            .expect("degraded, not an error")
            .into_inner();
        assert!(!response.stored && response.degraded, "{response:?}");
    }

    world.redis.as_mut().unwrap().restart().await;
    wait_until(
        "normal service after Redis restarts",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                client
                    .set(set("after", "3"))
                    .await
                    .is_ok_and(|r| r.get_ref().stored)
            }
        },
    )
    .await;
    let response = client.get(get("after")).await.unwrap().into_inner();
    assert_eq!(
        (response.outcome, response.value.as_ref()),
        (Outcome::Hit as i32, &b"3"[..])
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut degraded) = (0, 0);
    for task in load {
        let (o, d, errors, slowest) = task.await.unwrap();
        assert!(
            errors.is_empty(),
            "requests failed instead of degrading: {:?}",
            errors.first()
        );
        assert!(slowest < budget + margin, "a request took {slowest:?}");
        ok += o;
        degraded += d;
    }
    assert!(ok > 0 && degraded > 0, "ok {ok}, degraded {degraded}");
    assert!(world.gateway.counter("cachegw_store_errors") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_without_redis_serves_degraded_then_connects() {
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let gateway = TestGateway::start(test_config(StoreKind::Redis, Some(url))).await;
    let mut client = gateway.client().await;
    let began = Instant::now();
    let response = client
        .get(get("k"))
        .await
        .expect("gateway serves without Redis")
        .into_inner();
    assert!(response.degraded && response.outcome == Outcome::Miss as i32);
    assert!(
        began.elapsed() < Duration::from_millis(900),
        "took {:?}",
        began.elapsed()
    );
    assert!(!client.set(set("k", "v")).await.unwrap().get_ref().stored);

    // Redis appears on that port later: the gateway connects by itself.
    let redis = RedisServer::start_on(port).await;
    wait_until(
        "the gateway to use the late Redis",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                client
                    .set(set("k", "v"))
                    .await
                    .is_ok_and(|r| r.get_ref().stored)
            }
        },
    )
    .await;
    let mut connection = redis.connection().await;
    let exists: u32 = redis::cmd("EXISTS")
        .arg("cg:{orders:0:k}")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(exists, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_at_most_the_client_deadline() {
    let mut world = World::start_with(Backend::Redis, |config| {
        config.server.store_timeout = Duration::from_secs(2);
        config.redis.response_timeout = Duration::from_secs(2);
    })
    .await;
    assert!(world.set(NS, "k", b"v").await.stored);
    world.redis.as_ref().unwrap().pause();

    let mut request = tonic::Request::new(get("k"));
    request.set_timeout(Duration::from_millis(150));
    let began = Instant::now();
    let response = world
        .client
        .get(request)
        .await
        .expect("degraded, not DEADLINE_EXCEEDED")
        .into_inner();
    let took = began.elapsed();
    assert!(response.degraded, "{response:?}");
    assert!(
        took < Duration::from_millis(600),
        "answered after {took:?} for a 150ms deadline"
    );

    world.redis.as_ref().unwrap().resume();
    let client = world.client.clone();
    wait_until(
        "normal answers after SIGCONT",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get(get("k"))
                    .await
                    .is_ok_and(|r| r.get_ref().outcome == Outcome::Hit as i32)
            }
        },
    )
    .await;
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let mut world = World::start(Backend::Memory).await;
    let mut health = HealthClient::new(world.gateway.channel().await);
    for service in ["", "cachegw.v1.Cache"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "cachegw.v1.Cache".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    world.gateway.begin_shutdown();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a status change");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let world = World::start(Backend::Memory).await;
    let mut reflection = ServerReflectionClient::new(world.gateway.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in ["cachegw.v1.Cache", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    // A hung Redis makes a Get take the whole store timeout: a request that is
    // certainly in flight when shutdown begins.
    let mut world = World::start_with(Backend::Redis, |config| {
        config.server.store_timeout = Duration::from_millis(1500);
        config.redis.response_timeout = Duration::from_secs(5);
        config.redis.create_timeout = Duration::from_secs(5);
        config.redis.connect_timeout = Duration::from_secs(5);
    })
    .await;
    assert!(world.set(NS, "k", b"v").await.stored);
    world.redis.as_ref().unwrap().pause();
    let mut client = world.client.clone();
    let began = Instant::now();
    let in_flight = tokio::spawn(async move { client.get(get("k")).await });
    let metrics = world.gateway.metrics.clone();
    wait_until(
        "the request to be in flight at the gateway",
        Duration::from_secs(5),
        || {
            let in_flight = support::gauge(&metrics.encode(), "cachegw_requests_in_flight");
            async move { in_flight == 1 }
        },
    )
    .await;
    world.gateway.begin_shutdown();
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes during the drain");
    assert!(answer.get_ref().degraded);
    assert!(
        began.elapsed() >= Duration::from_millis(1400),
        "the request was in flight for the store timeout"
    );
    world.redis.as_ref().unwrap().resume();
}

/// The circuit breaker: Redis dies, the breaker opens and answers degraded at
/// once (no waiting on dead sockets), half-opens with probes, and closes as
/// soon as Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_answers_at_once_and_closes_when_redis_returns() {
    let mut world = World::start(Backend::Redis).await;
    let mut client = world.client.clone();
    assert!(client.set(set("k", "v")).await.unwrap().into_inner().stored);
    let state =
        |world: &World| support::gauge(&world.gateway.metrics.encode(), "cachegw_breaker_state");
    assert_eq!(state(&world), 0, "closed");

    world.redis.as_mut().unwrap().kill();
    wait_until("the breaker opens", Duration::from_secs(10), || {
        let mut client = client.clone();
        let open = state(&world) == 2;
        async move {
            let _ = client.get(get("k")).await;
            open
        }
    })
    .await;
    // Open: degraded answers without touching the network.
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let began = Instant::now();
        let got = client.get(get("k")).await.unwrap().into_inner();
        latencies.push(began.elapsed());
        if state(&world) == 2 {
            assert!(got.degraded, "{got:?}");
        }
    }
    latencies.sort_unstable();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "breaker open: p50 {:?}, p99 {p99:?} per Get (debug build, over gRPC)",
        latencies[100]
    );
    // Far below the 500 ms store timeout and the 300 ms connect timeout a
    // call to the dead Redis would cost (the release-build figure is in
    // docs/BENCHMARKS.md).
    assert!(p99 < Duration::from_millis(50), "{p99:?}");
    let metrics = world.gateway.metrics.encode();
    assert!(
        support::counter_sum(&metrics, "cachegw_breaker_rejected") > 0,
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cachegw_store_errors_total{store="redis",kind="circuit_open"}"#),
        "{metrics}"
    );

    world.redis.as_mut().unwrap().restart().await;
    let back = Instant::now();
    wait_until("service is back", Duration::from_secs(2), || {
        let mut client = client.clone();
        async move {
            client
                .get(get("probe"))
                .await
                .is_ok_and(|r| !r.get_ref().degraded)
        }
    })
    .await;
    println!("normal answers {:?} after Redis was back", back.elapsed());
    assert_eq!(state(&world), 0, "closed again");
    let metrics = world.gateway.metrics.encode();
    for to in ["open", "half_open", "closed"] {
        assert!(
            metrics.contains(&format!(
                r#"cachegw_breaker_transitions_total{{to="{to}"}}"#
            )),
            "{to}: {metrics}"
        );
    }
}

/// Connections killed under the gateway (CLIENT KILL, a Redis failover):
/// idempotent calls are retried once on a fresh connection, within the retry
/// budget, so callers do not even see a degraded answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_retried_not_reported() {
    let world = World::start(Backend::Redis).await;
    let mut client = world.client.clone();
    for i in 0..20 {
        assert!(
            client
                .set(set(&format!("k{i}"), "v"))
                .await
                .unwrap()
                .into_inner()
                .stored
        );
    }
    let mut admin = world.redis.as_ref().unwrap().connection().await;
    let killed = support::kill_client_connections(&mut admin).await;
    assert!(killed > 0);
    for i in 0..20 {
        let got = client
            .get(get(&format!("k{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (got.outcome, got.degraded),
            (Outcome::Hit as i32, false),
            "k{i}"
        );
    }
    let metrics = world.gateway.metrics.encode();
    assert!(
        metrics.contains(r#"cachegw_store_retries_total{outcome="retried"}"#),
        "{metrics}"
    );
    assert_eq!(support::gauge(&metrics, "cachegw_breaker_state"), 0);
}
