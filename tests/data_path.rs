//! The data path end to end: a real gateway over a real store, called through
//! a real gRPC client. Every behaviour runs against both stores (`redis`, a
//! test redis-server on a free port; `memory`, the in-process store).

mod support;

use std::time::Duration;

use gateway::api::proto::v1::{
    DeleteRequest, GetRequest, MGetRequest, MSetRequest, Outcome, SetRequest, m_get_result,
    m_set_result,
};
use support::{Backend, World};
use tonic::Code;

const NS: &str = "users";

on_both_stores!(
    values_round_trip_byte_for_byte,
    absent_keys_miss,
    deleted_keys_miss,
    entries_live_for_the_namespace_ttl,
    awkward_keys_round_trip_and_never_collide,
    bad_input_is_rejected_precisely_and_writes_nothing,
    batches_answer_per_item_in_request_order,
    oversized_batches_are_refused_whole,
    undeclared_namespaces_need_the_template,
    many_concurrent_clients_see_no_errors,
);

async fn values_round_trip_byte_for_byte(backend: Backend) {
    let mut world = World::start(backend).await;
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let mebibyte: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cases: [(&str, &[u8]); 5] = [
        ("empty", b""),
        ("one-byte", b"x"),
        ("binary", &every_byte),
        ("nul-and-newlines", b"\0\r\n\0"),
        ("one-mebibyte", &mebibyte),
    ];
    for (key, value) in cases {
        let set = world.set(NS, key, value).await;
        assert!(set.stored && !set.degraded, "{key}: {set:?}");
        let got = world.get(NS, key).await;
        assert_eq!(got.outcome, Outcome::Hit as i32, "{key}");
        assert!(!got.degraded);
        assert_eq!(got.value.len(), value.len(), "{key}");
        assert!(got.value == value, "{key}: bytes differ");
    }
}

async fn absent_keys_miss(backend: Backend) {
    let mut world = World::start(backend).await;
    let got = world.get(NS, "never-written").await;
    assert_eq!(got.outcome, Outcome::Miss as i32);
    assert!(got.value.is_empty());
    assert!(!got.degraded, "a real miss is not degraded");
}

async fn deleted_keys_miss(backend: Backend) {
    let mut world = World::start(backend).await;
    world.set(NS, "k", b"v").await;
    let delete = |world: &mut World| {
        let mut client = world.client.clone();
        async move {
            client
                .delete(DeleteRequest {
                    namespace: NS.into(),
                    key: "k".into(),
                    attributes: Default::default(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = delete(&mut world).await;
    assert!(first.deleted && !first.degraded);
    assert_eq!(world.get(NS, "k").await.outcome, Outcome::Miss as i32);
    let second = delete(&mut world).await;
    assert!(
        !second.deleted && !second.degraded,
        "nothing left to delete"
    );
}

async fn entries_live_for_the_namespace_ttl(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        config.namespaces.insert(
            "short".into(),
            gateway::config::NamespaceConfig {
                default_ttl: Duration::from_secs(42),
                ..Default::default()
            },
        );
    })
    .await;
    let ttl_ms = 42_000;
    let set = world.set("short", "k", b"v").await;
    assert_eq!(set.ttl_ms, ttl_ms);
    let got = world.get("short", "k").await;
    assert!(
        got.ttl_remaining_ms <= ttl_ms && got.ttl_remaining_ms > ttl_ms - 2_000,
        "{}",
        got.ttl_remaining_ms
    );

    // Undeclared namespaces get the template's five minutes.
    assert_eq!(world.set("anything", "k", b"v").await.ttl_ms, 300_000);

    if let Some(redis) = &world.redis {
        let mut connection = redis.connection().await;
        let pttl: i64 = redis::cmd("PTTL")
            .arg("cg:{short:0:k}")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(
            pttl <= ttl_ms as i64 && pttl > ttl_ms as i64 - 2_000,
            "PTTL {pttl}"
        );
        let pttl: i64 = redis::cmd("PTTL")
            .arg("cg:{anything:0:k}")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(pttl <= 300_000 && pttl > 298_000, "PTTL {pttl}");
    }
}

async fn awkward_keys_round_trip_and_never_collide(backend: Backend) {
    let mut world = World::start(backend).await;
    let keys = [
        "plain",
        "*",
        "a*",
        "?",
        "a?b",
        "[abc]",
        "[",
        "]",
        "a:b",
        ":",
        "a::b",
        "users:a",
        "\\",
        "a\\*",
        " ",
        "a b",
        " lead",
        "trail ",
        "\n",
        "a\nb",
        "\r\n",
        "\t",
        "ключ",
        "キー",
        "🔑",
        "é",
        "e\u{301}",
        "cg:users:x",
        "cg:{users:0:x}",
        "}",
        "{",
        "a}b{c",
        "\u{0}",
    ];
    for (i, key) in keys.iter().enumerate() {
        let set = world.set(NS, key, format!("value-{i}").as_bytes()).await;
        assert!(set.stored, "{key:?}");
    }
    for (i, key) in keys.iter().enumerate() {
        let got = world.get(NS, key).await;
        assert_eq!(got.outcome, Outcome::Hit as i32, "{key:?}");
        assert_eq!(
            got.value,
            format!("value-{i}").as_bytes(),
            "{key:?} read another key's value"
        );
    }
    // The same key in another namespace is another entry.
    assert_eq!(
        world.get("other", "plain").await.outcome,
        Outcome::Miss as i32
    );
    if let Some(count) = world.redis_key_count().await {
        assert_eq!(count, keys.len() as u64, "one Redis key per distinct key");
    }
}

/// Sends a Set whose key bytes are not UTF-8, which no generated client can.
async fn set_with_raw_key(world: &World, key: Vec<u8>) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawSetRequest {
        #[prost(string, tag = "1")]
        namespace: String,
        #[prost(bytes = "vec", tag = "2")]
        key: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        value: Vec<u8>,
    }
    let mut grpc = tonic::client::Grpc::new(world.gateway.channel().await);
    grpc.ready().await.unwrap();
    let request = RawSetRequest {
        namespace: NS.into(),
        key,
        value: b"v".to_vec(),
    };
    grpc.unary::<_, gateway::api::proto::v1::SetResponse, _>(
        tonic::Request::new(request),
        "/cachegw.v1.Cache/Set".parse().unwrap(),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .unwrap_err()
}

async fn bad_input_is_rejected_precisely_and_writes_nothing(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        config.limits.max_key_bytes = 64;
        config.default_namespace.settings.max_value_bytes = 1000;
    })
    .await;
    let set = |namespace: &str, key: &str, value: Vec<u8>| SetRequest {
        namespace: namespace.into(),
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    let long_key = "k".repeat(65);
    let cases = [
        (
            set(NS, "", b"v".to_vec()),
            Code::InvalidArgument,
            vec!["key", "empty"],
        ),
        (
            set(NS, &long_key, b"v".to_vec()),
            Code::InvalidArgument,
            vec!["key", "65", "64", "limits.max_key_bytes"],
        ),
        (
            set(NS, "big", vec![0; 1001]),
            Code::ResourceExhausted,
            vec!["value", "1001", "1000", "max_value_bytes"],
        ),
        (
            set("", "k", b"v".to_vec()),
            Code::InvalidArgument,
            vec!["namespace", "empty"],
        ),
        (
            set("bad:name", "k", b"v".to_vec()),
            Code::InvalidArgument,
            vec!["namespace", "':'"],
        ),
        (
            set("bad name", "k", b"v".to_vec()),
            Code::InvalidArgument,
            vec!["namespace"],
        ),
    ];
    for (request, code, words) in cases {
        let described = format!("{}/{}", request.namespace, request.key.len());
        let status = world.client.set(request).await.expect_err(&described);
        assert_eq!(status.code(), code, "{described}: {status:?}");
        for word in words {
            assert!(
                status.message().contains(word),
                "{described}: {:?} lacks {word:?}",
                status.message()
            );
        }
    }
    // The value at the limit is fine, one byte over is not (checked above).
    assert!(world.set(NS, "at-limit", &[0; 1000]).await.stored);
    assert_eq!(world.get(NS, "big").await.outcome, Outcome::Miss as i32);

    let status = set_with_raw_key(&world, vec![b'k', 0xFF, 0xFE]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("key") && status.message().contains("UTF-8"),
        "{status:?}"
    );

    let status = world
        .client
        .get(GetRequest {
            namespace: NS.into(),
            key: String::new(),
            attributes: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    if let Some(count) = world.redis_key_count().await {
        assert_eq!(count, 1, "only the valid write reached Redis");
    }
    assert!(world.gateway.counter("cachegw_requests_rejected") >= 7);
}

async fn batches_answer_per_item_in_request_order(backend: Backend) {
    let mut world = World::start(backend).await;
    let item = |key: &str, value: &str| SetRequest {
        namespace: NS.into(),
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let response = world
        .client
        .m_set(MSetRequest {
            items: vec![
                item("a", "1"),
                item("", "bad"),
                item("c", "3"),
                item("d", "4"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 4);
    for (index, result) in response.results.iter().enumerate() {
        match (index, &result.result) {
            (1, Some(m_set_result::Result::Error(err))) => {
                assert_eq!(err.code, Code::InvalidArgument as i32);
                assert!(err.message.contains("key"));
            }
            (_, Some(m_set_result::Result::Response(written))) if index != 1 => {
                assert!(written.stored && !written.degraded)
            }
            other => panic!("unexpected result {other:?}"),
        }
    }

    let get = |key: &str| GetRequest {
        namespace: NS.into(),
        key: key.into(),
        attributes: Default::default(),
        ..Default::default()
    };
    let response = world
        .client
        .m_get(MGetRequest {
            items: vec![get("d"), get("missing"), get("a"), get(""), get("c")],
        })
        .await
        .unwrap()
        .into_inner();
    let summary: Vec<String> = response
        .results
        .iter()
        .map(|result| match &result.result {
            Some(m_get_result::Result::Response(found)) if found.outcome == Outcome::Hit as i32 => {
                String::from_utf8(found.value.to_vec()).unwrap()
            }
            Some(m_get_result::Result::Response(found))
                if found.outcome == Outcome::Miss as i32 =>
            {
                "miss".into()
            }
            Some(m_get_result::Result::Error(err)) => format!("error {}", err.code),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "4",
            "miss",
            "1",
            &format!("error {}", Code::InvalidArgument as i32),
            "3"
        ]
    );
}

async fn oversized_batches_are_refused_whole(backend: Backend) {
    let mut world = World::start_with(backend, |config| config.limits.max_batch_items = 10).await;
    let items = (0..11)
        .map(|i| SetRequest {
            namespace: NS.into(),
            key: format!("k{i}"),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .collect();
    let status = world.client.m_set(MSetRequest { items }).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("11") && status.message().contains("limits.max_batch_items"),
        "{status:?}"
    );
    assert_eq!(
        world.get(NS, "k0").await.outcome,
        Outcome::Miss as i32,
        "nothing of the batch was written"
    );
    if let Some(count) = world.redis_key_count().await {
        assert_eq!(count, 0);
    }
}

async fn undeclared_namespaces_need_the_template(backend: Backend) {
    let mut world = World::start_with(backend, |config| {
        config.default_namespace.enabled = false;
        config
            .namespaces
            .insert("declared".into(), Default::default());
    })
    .await;
    assert!(world.set("declared", "k", b"v").await.stored);
    let status = world
        .client
        .set(SetRequest {
            namespace: "undeclared".into(),
            key: "k".into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("undeclared")
            && status.message().contains("[namespaces.undeclared]"),
        "{status:?}"
    );
    if let Some(count) = world.redis_key_count().await {
        assert_eq!(count, 1);
    }
}

async fn many_concurrent_clients_see_no_errors(backend: Backend) {
    const CLIENTS: usize = 500;
    const OPS_PER_CLIENT: usize = 20;
    let world = World::start_with(backend, |config| {
        config.redis.max_connections = 20;
        // This is about correctness under concurrency, not speed: on a loaded
        // 2-core machine 500 clients can queue for longer than the fixtures'
        // short timeouts, and a degraded answer would hide what is checked.
        let patient = Duration::from_secs(5);
        config.server.store_timeout = patient;
        config.redis.wait_timeout = patient;
        config.redis.create_timeout = patient;
        config.redis.response_timeout = patient;
    })
    .await;
    let channels: Vec<_> = futures_channels(&world, 10).await;
    let mut tasks = Vec::new();
    for client_id in 0..CLIENTS {
        let mut client = gateway::api::proto::v1::cache_client::CacheClient::new(
            channels[client_id % channels.len()].clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut problems = Vec::new();
            for op in 0..OPS_PER_CLIENT {
                let key = format!("c{client_id}-k{}", (op / 2) % 5);
                if op % 2 == 0 {
                    let value = format!("{client_id}:{op}");
                    let request = SetRequest {
                        namespace: NS.into(),
                        key,
                        value: value.into_bytes().into(),
                        ..Default::default()
                    };
                    match client.set(request).await {
                        Ok(response) if response.get_ref().stored => {}
                        other => problems.push(format!("set: {other:?}")),
                    }
                } else {
                    let request = GetRequest {
                        namespace: NS.into(),
                        key,
                        ..Default::default()
                    };
                    match client.get(request).await {
                        Ok(response) if !response.get_ref().degraded => {
                            let response = response.into_inner();
                            // Each client reads back what it wrote just before.
                            let expected = format!("{client_id}:{}", op - 1);
                            if response.outcome != Outcome::Hit as i32
                                || response.value != expected.as_bytes()
                            {
                                problems.push(format!("get {op}: {response:?}"));
                            }
                        }
                        other => problems.push(format!("get: {other:?}")),
                    }
                }
            }
            problems
        }));
    }
    let mut problems = Vec::new();
    for task in tasks {
        problems.extend(task.await.unwrap());
    }
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}",
        problems.len(),
        problems.first()
    );

    if let Some(redis) = &world.redis {
        let mut connection = redis.connection().await;
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut connection)
            .await
            .unwrap();
        // Every connection but our own inspection connection and the policy
        // sync's two (commands, pub/sub) is the pool's.
        let gateway_connections = clients
            .lines()
            .filter(|line| !line.contains("sub=1") && !line.contains("name=cachegw-policy-sync"))
            .count()
            - 1;
        assert!(
            (1..=20).contains(&gateway_connections),
            "the gateway opened {gateway_connections} connections for a pool of 20"
        );
    }
}

async fn futures_channels(world: &World, count: usize) -> Vec<tonic::transport::Channel> {
    let mut channels = Vec::new();
    for _ in 0..count {
        channels.push(world.gateway.channel().await);
    }
    channels
}

#[tokio::test]
async fn undecodable_entries_are_counted_misses() {
    let mut world = World::start(Backend::Redis).await;
    let redis = world.redis.as_ref().unwrap();
    let mut connection = redis.connection().await;
    for (key, junk) in [
        ("legacy", &b"{\"written\":\"by another app\"}"[..]),
        ("short", b"cg"),
        ("future", b"cg\x09\x00"),
    ] {
        redis::cmd("SET")
            .arg(format!("cg:{{{NS}:0:{key}}}"))
            .arg(junk)
            .exec_async(&mut connection)
            .await
            .unwrap();
    }
    for key in ["legacy", "short", "future"] {
        let got = world.get(NS, key).await;
        assert_eq!(got.outcome, Outcome::Miss as i32, "{key}");
        assert!(!got.degraded);
    }
    assert_eq!(world.gateway.counter("cachegw_envelope_errors"), 3);
    // Overwriting through the gateway heals the entry.
    world.set(NS, "legacy", b"fresh").await;
    assert_eq!(world.get(NS, "legacy").await.value, &b"fresh"[..]);
}
