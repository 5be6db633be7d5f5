//! The Rust client (`clients/rust`, crate `cachegw-client`) against the real
//! gateway: a real redis-server (or the memory store), a gateway serving
//! gRPC over TCP in this process, and `cachegw_client::Client` over the wire.
//! `get_or_fill` runs one fill for a stampede of cold callers, never writes
//! back a fill that raced an invalidation, serves stale values while one
//! caller refreshes, and never fails because the cache does; values are
//! typed; retries are bounded; tokens are sent; TLS works.

mod support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cachegw_client::{
    Client, Code, Error, Fill, FillOptions, GetOptions, JobProgress, Lookup, Removal, RetryPolicy,
    Served, Write,
};
use gateway::{
    auth::token_digest_hex,
    config::{Config, FallbackMode, Right, TenantConfig, TokenSources},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::{Backend, TestGateway, bind, store_and_gateway, wait_until};
use tokio::sync::oneshot;

const NS: &str = "origin";

on_both_stores!(
    two_hundred_cold_callers_run_the_fill_once,
    a_fill_racing_an_invalidation_or_delete_is_not_written_back,
);

/// Entries of `NS` fresh for `ttl`, then stale for `stale` (the
/// `surrogate-keys` example policy's config, as in tests/leases.rs).
fn freshness(config: &mut Config, ttl: &str, stale: &str) {
    bind(
        config,
        NS,
        "surrogate-keys",
        Some(json!({"ttl": ttl, "stale": stale})),
        FallbackMode::FailClosed,
    );
}

async fn client(gateway: &TestGateway) -> Client {
    Client::connect(gateway.endpoint())
        .await
        .expect("connect the client")
}

/// Waits generously for the lease holder: these tests are about coalescing,
/// not about timing out.
fn patient() -> FillOptions {
    FillOptions {
        lease_wait: Duration::from_secs(20),
        ..Default::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    title: String,
    rows: Vec<(String, u64)>,
    totals: BTreeMap<String, f64>,
    footnote: Option<String>,
}

fn report(title: &str) -> Report {
    Report {
        title: title.into(),
        rows: vec![("eu-west".into(), 17), ("us-east".into(), 40)],
        totals: BTreeMap::from([("revenue".into(), 1234.5), ("refunds".into(), -12.25)]),
        footnote: Some("naïve ✓ \"quoted\"".into()),
    }
}

async fn two_hundred_cold_callers_run_the_fill_once(backend: Backend) {
    const CALLERS: usize = 200;
    let (_redis, gateway) =
        store_and_gateway(backend, |config| freshness(config, "1m", "0s")).await;
    // One client: every task shares its one connection.
    let cache = client(&gateway).await;
    let fills = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let cache = cache.clone();
            let fills = fills.clone();
            let metrics = gateway.metrics.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fill_with(NS, "cold", &patient(), || async move {
                        fills.fetch_add(1, Ordering::SeqCst);
                        // A real stampede: the origin answers only once every
                        // other caller is in flight, waiting on the lease ...
                        wait_until("every other caller waits", Duration::from_secs(30), || {
                            let waiting =
                                support::gauge(&metrics.encode(), "cachegw_lease_waiters");
                            async move { waiting >= CALLERS as i64 - 1 }
                        })
                        .await;
                        // ... and takes a while.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, std::io::Error>(report("filled once"))
                    })
                    .await
                    .expect("get_or_fill")
            })
        })
        .collect();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        let filled = task.await.unwrap();
        assert_eq!(filled.value, report("filled once"));
        *served.entry(format!("{:?}", filled.served)).or_default() += 1;
    }
    println!("{CALLERS} callers: {served:?} in {:?}", started.elapsed());
    assert_eq!(fills.load(Ordering::SeqCst), 1, "{served:?}");
    assert_eq!(served.get("Filled(Stored)"), Some(&1), "{served:?}");
    assert_eq!(served.get("Coalesced"), Some(&(CALLERS - 1)), "{served:?}");
    // The fill is cached: the next caller does not fill.
    let again: Report = cache
        .get_or_fill(NS, "cold", || async {
            Err::<Report, _>(std::io::Error::other("the fill must not run on a hit"))
        })
        .await
        .expect("a hit");
    assert_eq!(again, report("filled once"));
}

async fn a_fill_racing_an_invalidation_or_delete_is_not_written_back(backend: Backend) {
    let (_redis, gateway) =
        store_and_gateway(backend, |config| freshness(config, "1m", "0s")).await;
    let cache = client(&gateway).await;
    for (key, race) in [
        ("raced:invalidate", "invalidate"),
        ("raced:delete", "delete"),
    ] {
        let (started, fill_started) = oneshot::channel::<()>();
        let (release, released) = oneshot::channel::<()>();
        let filling = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_fill_with(NS, key, &patient(), || async move {
                        started.send(()).unwrap();
                        released.await.unwrap();
                        // Computed from what the origin said before the change.
                        Ok::<_, std::io::Error>(report("outdated"))
                    })
                    .await
            }
        });
        // The fill holds the lease and computes; meanwhile the data changes.
        fill_started.await.expect("the fill starts");
        match race {
            "invalidate" => {
                let job = cache.invalidate_keys(NS, [key]).await.expect("invalidate");
                assert_eq!(job.progress, JobProgress::Done, "{job:?}");
            }
            _ => assert_eq!(
                cache.delete(NS, key).await.expect("delete"),
                Removal::Absent
            ),
        }
        release.send(()).unwrap();
        let filled = filling.await.unwrap().expect("get_or_fill");
        // The caller gets what its fill computed, but it was not cached.
        assert_eq!(filled.value, report("outdated"), "{race}");
        assert_eq!(filled.served, Served::Filled(Fill::Voided), "{race}");
        assert_eq!(
            cache.get::<Report>(NS, key).await.expect("get"),
            Lookup::Miss,
            "{race}: a voided fill must not be in the cache"
        );
        // The next caller gets a new lease and its fill is written.
        let refilled = cache
            .get_or_fill_with(NS, key, &patient(), || async {
                Ok::<_, std::io::Error>(report("current"))
            })
            .await
            .expect("get_or_fill");
        assert_eq!(refilled.served, Served::Filled(Fill::Stored), "{race}");
        assert_eq!(
            cache.get::<Report>(NS, key).await.expect("get"),
            Lookup::Hit(report("current"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_round_trip_and_foreign_types_are_decode_errors() {
    let (_redis, gateway) =
        store_and_gateway(Backend::Redis, |config| freshness(config, "1m", "0s")).await;
    let cache = client(&gateway).await;
    assert_eq!(
        cache.get::<Report>(NS, "report:q3").await.unwrap(),
        Lookup::Miss
    );
    let written = cache.set(NS, "report:q3", &report("Q3")).await.unwrap();
    assert_eq!(
        written,
        Write::Stored {
            ttl: Duration::from_secs(60)
        }
    );
    assert_eq!(
        cache.get::<Report>(NS, "report:q3").await.unwrap(),
        Lookup::Hit(report("Q3"))
    );
    // The same JSON read as a looser type.
    let loose = cache
        .get::<serde_json::Value>(NS, "report:q3")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert_eq!(loose["rows"][1], json!(["us-east", 40]));
    // Read as a type its JSON does not fit: a decode error naming the entry.
    let err = cache.get::<Vec<u64>>(NS, "report:q3").await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { key, content_type, .. }
            if key == "report:q3" && content_type == "application/json"),
        "{err}"
    );
    assert_eq!(
        cache.delete(NS, "report:q3").await.unwrap(),
        Removal::Deleted
    );
    assert_eq!(
        cache.delete(NS, "report:q3").await.unwrap(),
        Removal::Absent
    );
    assert_eq!(
        cache.get::<Report>(NS, "report:q3").await.unwrap(),
        Lookup::Miss
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_values_are_served_while_one_caller_refreshes() {
    let (_redis, gateway) =
        store_and_gateway(Backend::Redis, |config| freshness(config, "300ms", "1m")).await;
    let cache = client(&gateway).await;
    cache.set(NS, "feed", &report("v1")).await.unwrap();
    let stale_lookup = GetOptions {
        allow_stale: true,
        ..Default::default()
    };
    wait_until("the entry goes stale", Duration::from_secs(10), || {
        let cache = cache.clone();
        let options = stale_lookup.clone();
        async move {
            matches!(
                cache
                    .get_with::<Report>(NS, "feed", &options)
                    .await
                    .unwrap(),
                Lookup::Stale(_)
            )
        }
    })
    .await;
    // Without allow_stale the stale entry is a miss.
    assert_eq!(cache.get::<Report>(NS, "feed").await.unwrap(), Lookup::Miss);

    // Stale-if-error: granted the refresh, the fill fails; the stale value
    // is served and the lease released.
    let failed = cache
        .get_or_fill_with(NS, "feed", &patient(), || async {
            Err::<Report, _>(std::io::Error::other("origin down"))
        })
        .await
        .expect("stale-if-error");
    assert_eq!(
        (failed.value, failed.served),
        (report("v1"), Served::CachedAfterFillError)
    );

    // One caller refreshes (and gets the lease at once: it was released) ...
    let (started, fill_started) = oneshot::channel::<()>();
    let (release, released) = oneshot::channel::<()>();
    let refreshing = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_fill_with(NS, "feed", &patient(), || async move {
                    started.send(()).unwrap();
                    released.await.unwrap();
                    Ok::<_, std::io::Error>(report("v2"))
                })
                .await
        }
    });
    fill_started.await.expect("the refresh starts");
    // ... while everyone else gets the stale value at once, without filling.
    for _ in 0..5 {
        let served = cache
            .get_or_fill_with(NS, "feed", &patient(), || async {
                Err::<Report, _>(std::io::Error::other("only the lease holder fills"))
            })
            .await
            .expect("stale served");
        assert_eq!((served.value, served.served), (report("v1"), Served::Stale));
    }
    release.send(()).unwrap();
    let refreshed = refreshing.await.unwrap().expect("refresh");
    assert_eq!(
        (refreshed.value, refreshed.served),
        (report("v2"), Served::Filled(Fill::Stored))
    );
    assert_eq!(
        cache.get::<Report>(NS, "feed").await.unwrap(),
        Lookup::Hit(report("v2"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_gateway_is_unavailable_after_bounded_retries() {
    let retry = RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    // Nothing listens there (nothing can, while `_refusing` lives); a lazy
    // client connects at the first call.
    let (_refusing, port) = support::refusing_port();
    let cache = Client::builder(format!("http://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .retries(retry)
        .connect_lazy()
        .expect("a lazy client needs no gateway");

    let started = Instant::now();
    let err = cache.get::<Report>(NS, "k").await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Status {
                call: "Get",
                code: Code::Unavailable,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_unreachable());
    // It backed off between attempts (at least half of 50 + 100 ms), and
    // gave up within its bound: 3 attempts of at most the connect timeout,
    // plus the backoff.
    assert!(elapsed >= Duration::from_millis(75), "{elapsed:?}");
    assert!(
        elapsed
            < 3 * Duration::from_millis(500) + retry.max_total_backoff() + Duration::from_secs(1),
        "{elapsed:?}"
    );

    // Invalidations are never resent.
    let err = cache.invalidate_namespace(NS).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Status {
                code: Code::Unavailable,
                attempts: 1,
                ..
            }
        ),
        "{err}"
    );

    // get_or_fill never fails because the cache does: it fills, uncached.
    let filled = cache
        .get_or_fill_with(NS, "k", &FillOptions::default(), || async {
            Ok::<_, std::io::Error>(report("from the origin"))
        })
        .await
        .expect("the fill answers");
    assert_eq!(
        (filled.value, filled.served),
        (
            report("from the origin"),
            Served::Filled(Fill::CacheUnavailable)
        )
    );

    // An eager connect says so at once.
    let eager = Client::connect(format!("http://127.0.0.1:{port}")).await;
    assert!(matches!(eager, Err(Error::Connect { .. })), "{eager:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_gateway_answers_degraded_and_get_or_fill_still_fills() {
    let (redis, gateway) =
        store_and_gateway(Backend::Redis, |config| freshness(config, "1m", "0s")).await;
    let cache = client(&gateway).await;
    cache.set(NS, "k", &report("cached")).await.unwrap();
    let mut redis = redis.unwrap();
    redis.kill();
    assert_eq!(
        cache.get::<Report>(NS, "k").await.unwrap(),
        Lookup::Degraded
    );
    assert_eq!(
        cache.set(NS, "k", &report("new")).await.unwrap(),
        Write::Degraded
    );
    let filled = cache
        .get_or_fill_with(NS, "k", &patient(), || async {
            Ok::<_, std::io::Error>(report("from the origin"))
        })
        .await
        .expect("the fill answers");
    assert_eq!(
        (filled.value, filled.served),
        (
            report("from the origin"),
            Served::Filled(Fill::CacheUnavailable)
        )
    );
}

const TOKEN: &str = "rust-client-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_and_without_it_calls_are_unauthenticated() {
    let (_redis, gateway) = store_and_gateway(Backend::Redis, |config| {
        freshness(config, "1m", "0s");
        config.auth.enabled = true;
        config.auth.tenants.insert(
            "shop".into(),
            TenantConfig {
                tokens: TokenSources {
                    token_sha256: vec![token_digest_hex(TOKEN)],
                    ..Default::default()
                },
                namespaces: [(
                    NS.to_owned(),
                    vec![Right::Read, Right::Write, Right::Invalidate],
                )]
                .into(),
                rate_limit: 0,
                burst: None,
            },
        );
    })
    .await;

    let authorized = Client::builder(gateway.endpoint())
        .token(TOKEN)
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        authorized.set(NS, "k", &report("mine")).await.unwrap(),
        Write::Stored { .. }
    ));
    assert_eq!(
        authorized.get::<Report>(NS, "k").await.unwrap(),
        Lookup::Hit(report("mine"))
    );
    let filled: Report = authorized
        .get_or_fill(NS, "other", || async {
            Ok::<_, std::io::Error>(report("filled"))
        })
        .await
        .unwrap();
    assert_eq!(filled, report("filled"));

    for anonymous in [
        Client::connect(gateway.endpoint()).await.unwrap(),
        Client::builder(gateway.endpoint())
            .token("not-the-token-0123456789abcdef")
            .connect()
            .await
            .unwrap(),
    ] {
        let err = anonymous.get::<Report>(NS, "k").await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Status {
                    code: Code::Unauthenticated,
                    attempts: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("Unauthenticated"), "{err}");
        // A refusal is not the cache being down: get_or_fill reports it
        // instead of quietly filling.
        let fills = AtomicU64::new(0);
        let err = anonymous
            .get_or_fill(NS, "k", || async {
                fills.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(report("never"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
        assert_eq!(fills.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_tls_to_a_tls_gateway() {
    let pki = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "rust client test CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(pki.path().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(pki.path().join("server.key"), key.serialize_pem()).unwrap();

    let (_redis, gateway) = store_and_gateway(Backend::Memory, |config| {
        freshness(config, "1m", "0s");
        config.tls.cert_file = Some(pki.path().join("server.pem"));
        config.tls.key_file = Some(pki.path().join("server.key"));
    })
    .await;
    let tls = cachegw_client::ClientTlsConfig::new()
        .ca_certificate(cachegw_client::Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let cache = Client::builder(format!("https://{}", gateway.addr))
        .tls(tls)
        .connect()
        .await
        .expect("connect over TLS");
    let filled: Report = cache
        .get_or_fill(NS, "sealed", || async {
            Ok::<_, std::io::Error>(report("over TLS"))
        })
        .await
        .unwrap();
    assert_eq!(filled, report("over TLS"));
    assert_eq!(
        cache.get::<Report>(NS, "sealed").await.unwrap(),
        Lookup::Hit(report("over TLS"))
    );

    // Plaintext to the TLS listener gets nothing it could mistake for an answer.
    let plain = Client::builder(gateway.endpoint())
        .timeout(Duration::from_secs(2))
        .retries(RetryPolicy::none())
        .connect_lazy()
        .unwrap();
    let err = plain.get::<Report>(NS, "sealed").await.unwrap_err();
    assert!(
        matches!(err, Error::Status { .. } | Error::Timeout { .. }),
        "{err}"
    );
}
