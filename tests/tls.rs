//! TLS end to end: the data and admin listeners over TLS and mutual TLS,
//! plaintext clients refused without disturbing TLS ones, bad certificate
//! files stopping start-up, and the Redis store over `rediss://` (trusting a
//! CA, presenting a client certificate, and degraded when it cannot trust the
//! server). Every test makes its own CA and certificates with rcgen.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use gateway::{
    Config, Gateway, GatewayError,
    api::proto::v1::{
        GetRequest, Outcome, SetRequest, StatsRequest, cache_client::CacheClient,
        policy_admin_client::PolicyAdminClient,
    },
    config::{ClientAuth, StoreKind},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use redis::aio::MultiplexedConnection;
use support::{TestGateway, test_config, wait_until};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const CACHEGW: &str = env!("CARGO_BIN_EXE_cachegw");

/// Longest any one connection attempt in these tests may take: a refused
/// client must get an error, not hang.
const ATTEMPT: Duration = Duration::from_secs(10);

/// A test PKI in a temporary directory: `ca.pem`; `server.pem`/`server.key`
/// for `localhost` and 127.0.0.1; `client.pem`/`client.key` issued by the same
/// CA; `other-ca.pem`, another CA, and `stranger.pem`/`stranger.key`, a
/// client certificate it issued.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = certificate_authority("cachegw test CA");
        write("ca.pem", &ca.pem());
        let (cert, key) = issue(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write("server.pem", &cert);
        write("server.key", &key);
        let (cert, key) = issue(
            &ca,
            &["client.cachegw.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("client.pem", &cert);
        write("client.key", &key);
        let other = certificate_authority("someone else's CA");
        write("other-ca.pem", &other.pem());
        let (cert, key) = issue(
            &other,
            &["stranger.cachegw.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("stranger.pem", &cert);
        write("stranger.key", &key);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// A client trusting the test CA, presenting no certificate.
    fn client(&self) -> ClientTlsConfig {
        gateway::tls::install_crypto_provider();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost")
    }

    /// A client trusting the test CA, presenting `name.pem` (`client`, `stranger`).
    fn client_with(&self, name: &str) -> ClientTlsConfig {
        self.client().identity(Identity::from_pem(
            self.read(&format!("{name}.pem")),
            self.read(&format!("{name}.key")),
        ))
    }

    /// Turns TLS on in `config` with the server certificate.
    fn serve_tls(&self, config: &mut Config) {
        config.tls.cert_file = Some(self.path("server.pem"));
        config.tls.key_file = Some(self.path("server.key"));
    }

    /// Turns mutual TLS on in `config`: client certificates from the test CA.
    fn serve_mutual_tls(&self, config: &mut Config, client_auth: Option<ClientAuth>) {
        self.serve_tls(config);
        config.tls.client_ca_file = Some(self.path("ca.pem"));
        config.tls.client_auth = client_auth;
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` issued by `ca`, and its key, as PEM.
fn issue(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Sets and gets one entry; the error says which step failed and why.
async fn round_trip(client: &mut CacheClient<Channel>, key: &str) -> Result<(), String> {
    let set = client
        .set(SetRequest {
            namespace: "tls".into(),
            key: key.into(),
            value: b"sealed".to_vec().into(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("Set failed: {status}"))?
        .into_inner();
    assert!(set.stored && !set.degraded, "{set:?}");
    let got = client
        .get(GetRequest {
            namespace: "tls".into(),
            key: key.into(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("Get failed: {status}"))?
        .into_inner();
    assert_eq!(got.outcome(), Outcome::Hit, "{got:?}");
    assert_eq!(&got.value[..], b"sealed");
    Ok(())
}

/// Connects with `tls` and round-trips an entry, within [`ATTEMPT`].
async fn try_tls(gateway: &TestGateway, tls: ClientTlsConfig, key: &str) -> Result<(), String> {
    let attempt = async {
        let mut client = gateway
            .tls_client(tls)
            .await
            .map_err(|err| format!("connect failed: {err:?}"))?;
        round_trip(&mut client, key).await
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .unwrap_or_else(|_| panic!("a TLS attempt hung for {ATTEMPT:?} instead of failing"))
}

/// A plaintext connection and Set to `addr`, within [`ATTEMPT`].
async fn try_plaintext(addr: std::net::SocketAddr) -> Result<(), String> {
    let attempt = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|err| format!("connect failed: {err:?}"))?;
        CacheClient::new(channel)
            .set(SetRequest {
                namespace: "tls".into(),
                key: "plain".into(),
                value: b"clear".to_vec().into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|status| format!("Set failed: {status}"))
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .unwrap_or_else(|_| panic!("a plaintext attempt hung for {ATTEMPT:?} instead of failing"))
}

async fn tls_gateway(configure: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = test_config(StoreKind::Memory, None);
    configure(&mut config);
    TestGateway::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_sets_gets_and_checks_health() {
    let pki = Pki::new();
    let gateway = tls_gateway(|config| pki.serve_tls(config)).await;
    let mut client = gateway.tls_client(pki.client()).await.expect("TLS connect");
    round_trip(&mut client, "user:42").await.unwrap();

    let channel = Endpoint::from_shared(format!("https://{}", gateway.addr))
        .unwrap()
        .tls_config(pki.client())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "cachegw.v1.Cache".into(),
        })
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused_and_tls_clients_keep_being_served() {
    let pki = Pki::new();
    let gateway = tls_gateway(|config| pki.serve_tls(config)).await;
    for attempt in 0..3 {
        let refused = try_plaintext(gateway.addr).await;
        assert!(refused.is_err(), "plaintext attempt {attempt} was served");
    }
    // A client that connects and never says anything must not hold up others.
    let _silent = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    try_tls(&gateway, pki.client(), "after-plaintext")
        .await
        .expect("TLS clients are still served");
    // A client that does not trust the server's CA gives up on its own.
    let untrusting = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("other-ca.pem")))
        .domain_name("localhost");
    assert!(try_tls(&gateway, untrusting, "untrusting").await.is_err());
    try_tls(&gateway, pki.client(), "still")
        .await
        .expect("still served");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let gateway = tls_gateway(|config| pki.serve_mutual_tls(config, None)).await;

    let without = try_tls(&gateway, pki.client(), "anonymous").await;
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );
    let stranger = try_tls(&gateway, pki.client_with("stranger"), "stranger").await;
    assert!(
        stranger.is_err(),
        "a certificate from another CA was accepted"
    );
    assert!(try_plaintext(gateway.addr).await.is_err());

    try_tls(&gateway, pki.client_with("client"), "known")
        .await
        .expect("a client certificate from the CA is accepted");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_accepts_no_certificate_but_not_a_bad_one() {
    let pki = Pki::new();
    let gateway =
        tls_gateway(|config| pki.serve_mutual_tls(config, Some(ClientAuth::Optional))).await;
    try_tls(&gateway, pki.client(), "anonymous")
        .await
        .expect("no certificate is fine when client_auth = optional");
    try_tls(&gateway, pki.client_with("client"), "known")
        .await
        .expect("a certificate from the CA is fine");
    let stranger = try_tls(&gateway, pki.client_with("stranger"), "stranger").await;
    assert!(
        stranger.is_err(),
        "a certificate from another CA was accepted"
    );
    gateway.stop().await;
}

async fn admin_over_tls(
    gateway: &TestGateway,
    tls: ClientTlsConfig,
) -> Result<PolicyAdminClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{}", gateway.admin_addr))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(ATTEMPT)
        .connect()
        .await?;
    Ok(PolicyAdminClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_speaks_the_same_tls() {
    let pki = Pki::new();
    let gateway = tls_gateway(|config| pki.serve_mutual_tls(config, None)).await;

    let mut admin = admin_over_tls(&gateway, pki.client_with("client"))
        .await
        .expect("admin TLS connect");
    let stats = admin
        .stats(StatsRequest {})
        .await
        .expect("Stats over mutual TLS")
        .into_inner();
    assert_eq!(stats.store, "memory");

    let anonymous = tokio::time::timeout(ATTEMPT, async {
        admin_over_tls(&gateway, pki.client())
            .await
            .map_err(|err| err.to_string())?
            .stats(StatsRequest {})
            .await
            .map_err(|status| status.to_string())
    })
    .await
    .expect("an anonymous admin client is refused, not left hanging");
    assert!(
        anonymous.is_err(),
        "the admin API served a client without a certificate"
    );
    assert!(try_plaintext(gateway.admin_addr).await.is_err());
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_start_up_and_name_the_field() {
    let pki = Pki::new();
    let missing = pki.path("missing.pem");
    type Misconfigure<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let cases: Vec<(&str, Misconfigure)> = vec![
        (
            "tls.cert_file",
            Box::new(|config| config.tls.key_file = Some(pki.path("server.key"))),
        ),
        (
            "tls.key_file",
            Box::new(|config| config.tls.cert_file = Some(pki.path("server.pem"))),
        ),
        (
            "tls.cert_file",
            Box::new(|config| {
                pki.serve_tls(config);
                config.tls.cert_file = Some(missing.clone());
            }),
        ),
        (
            "tls.cert_file",
            Box::new(|config| {
                pki.serve_tls(config);
                config.tls.cert_file = Some(pki.path("server.key"));
            }),
        ),
        (
            "tls.key_file",
            Box::new(|config| {
                pki.serve_tls(config);
                config.tls.key_file = Some(pki.path("client.key"));
            }),
        ),
        (
            "tls.client_ca_file",
            Box::new(|config| config.tls.client_ca_file = Some(pki.path("ca.pem"))),
        ),
        (
            "tls.client_ca_file",
            Box::new(|config| {
                pki.serve_mutual_tls(config, None);
                config.tls.client_ca_file = Some(pki.path("client.key"));
            }),
        ),
        (
            "tls.client_auth",
            Box::new(|config| {
                pki.serve_tls(config);
                config.tls.client_auth = Some(ClientAuth::Required);
            }),
        ),
        (
            "redis.tls_ca_file",
            Box::new(|config| config.redis.tls_ca_file = Some(pki.path("ca.pem"))),
        ),
        (
            "redis.tls_client_key_file",
            Box::new(|config| {
                config.redis.url = "rediss://127.0.0.1:6380".into();
                config.redis.tls_client_cert_file = Some(pki.path("client.pem"));
            }),
        ),
        (
            "redis.tls_ca_file",
            Box::new(|config| {
                config.redis.url = "rediss://127.0.0.1:6380".into();
                config.redis.tls_ca_file = Some(missing.clone());
            }),
        ),
    ];
    for (field, configure) in cases {
        let mut config = test_config(StoreKind::Memory, None);
        configure(&mut config);
        let err = config.validate().expect_err(field).to_string();
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
    }

    // Built without validation, the gateway still refuses to start.
    let mut config = test_config(StoreKind::Memory, None);
    pki.serve_tls(&mut config);
    config.tls.key_file = Some(missing.clone());
    let err = Gateway::new(config).err().expect("a missing key file");
    assert!(matches!(err, GatewayError::Tls(_)), "{err}");
    assert!(err.to_string().contains("tls.key_file"), "{err}");
    let mut config = test_config(StoreKind::Memory, None);
    pki.serve_tls(&mut config);
    config.tls.key_file = Some(pki.path("client.key"));
    let err = Gateway::new(config)
        .err()
        .expect("a key of another certificate");
    assert!(matches!(err, GatewayError::TlsRejected(_)), "{err}");
    assert!(err.to_string().contains("key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cachegw_serve_refuses_a_tls_key_without_its_certificate() {
    let pki = Pki::new();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(CACHEGW)
            .args(["serve", "--store", "memory", "--listen", "127.0.0.1:0"])
            .env("CACHEGW_TLS__KEY_FILE", pki.path("server.key"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cachegw exits instead of serving")
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
}

/// A `redis-server` speaking only TLS on its port, with the test PKI's
/// server certificate; with `auth_clients` it requires a client certificate
/// from the test CA.
struct TlsRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
    ca: Vec<u8>,
    client: redis::ClientTlsConfig,
}

impl TlsRedis {
    async fn start(pki: &Pki, auth_clients: bool) -> Self {
        let port = support::free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(support::redis_server_binary())
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--tls-cert-file")
            .arg(pki.path("server.pem"))
            .arg("--tls-key-file")
            .arg(pki.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = TlsRedis {
            port,
            child,
            _dir: dir,
            ca: pki.read("ca.pem"),
            client: redis::ClientTlsConfig {
                client_cert: pki.read("client.pem"),
                client_key: pki.read("client.key"),
            },
        };
        wait_until(
            "the TLS redis-server to answer PING",
            Duration::from_secs(10),
            || async {
                let Ok(mut connection) = server.connection().await else {
                    return false;
                };
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            },
        )
        .await;
        server
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A direct connection trusting the test CA, with the client certificate.
    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        gateway::tls::install_crypto_provider();
        let client = redis::Client::build_with_tls(
            self.url(),
            redis::TlsCertificates {
                client_tls: Some(self.client.clone()),
                root_cert: Some(self.ca.clone()),
            },
        )?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway on the Redis store at `redis` over `rediss://`, trusting the
/// CA in `ca` (or the system's roots) and presenting `client_cert`.
async fn rediss_gateway(
    redis: &TlsRedis,
    ca: Option<PathBuf>,
    client_cert: Option<(&Path, &Path)>,
) -> TestGateway {
    let mut config = test_config(StoreKind::Redis, Some(redis.url()));
    config.redis.tls_ca_file = ca;
    if let Some((cert, key)) = client_cert {
        config.redis.tls_client_cert_file = Some(cert.to_owned());
        config.redis.tls_client_key_file = Some(key.to_owned());
    }
    // Start-up waits this long at most for the fleet's bindings over Redis.
    config.policy.sync_catch_up = Duration::from_secs(2);
    TestGateway::start(config).await
}

/// Every Redis connection the gateway makes works over `rediss://`: the
/// store's pool (Set, Get), the policy sync (its named connection shows in
/// CLIENT LIST) and the Stats RPC's INFO connection.
async fn every_redis_connection_works(gateway: &TestGateway, redis: &TlsRedis) {
    let mut client = gateway.client().await;
    round_trip(&mut client, "over-rediss").await.unwrap();
    let mut direct = redis.connection().await.expect("direct TLS connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cg:*")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the entry is in the TLS Redis");
    wait_until(
        "the policy sync connection to show in CLIENT LIST",
        Duration::from_secs(10),
        || {
            let mut direct = direct.clone();
            async move {
                redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async::<String>(&mut direct)
                    .await
                    .is_ok_and(|list| list.contains(gateway::policy::sync::CLIENT_NAME))
            }
        },
    )
    .await;
    let stats = gateway
        .admin()
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.redis_error.is_empty(), "{}", stats.redis_error);
    assert!(stats.redis.is_some(), "{stats:?}");
}

/// What a gateway that cannot talk to its Redis says: degraded answers,
/// served, and a Stats error.
async fn answers_degraded(gateway: &TestGateway) {
    let mut client = gateway.client().await;
    for attempt in 0..3 {
        let set = client
            .set(SetRequest {
                namespace: "tls".into(),
                key: format!("untrusted-{attempt}"),
                value: b"x".to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("Set is answered")
            .into_inner();
        assert!(set.degraded && !set.stored, "{set:?}");
        let got = client
            .get(GetRequest {
                namespace: "tls".into(),
                key: format!("untrusted-{attempt}"),
                ..Default::default()
            })
            .await
            .expect("Get is answered")
            .into_inner();
        assert!(got.degraded, "{got:?}");
    }
    let stats = gateway
        .admin()
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.redis_error.is_empty(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_ca_stores_and_reads() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false).await;
    let gateway = rediss_gateway(&redis, Some(pki.path("ca.pem")), None).await;
    every_redis_connection_works(&gateway, &redis).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_without_the_ca_answers_degraded() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false).await;
    let gateway = rediss_gateway(&redis, None, None).await;
    answers_degraded(&gateway).await;
    // A CA that did not issue the server's certificate is no better.
    let other = rediss_gateway(&redis, Some(pki.path("other-ca.pem")), None).await;
    answers_degraded(&other).await;
    other.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_client_certificate_when_redis_requires_one() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, true).await;
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let gateway = rediss_gateway(&redis, Some(pki.path("ca.pem")), Some((&cert, &key))).await;
    every_redis_connection_works(&gateway, &redis).await;
    gateway.stop().await;

    let anonymous = rediss_gateway(&redis, Some(pki.path("ca.pem")), None).await;
    answers_degraded(&anonymous).await;
    anonymous.stop().await;
}

/// An operator's `cachegw stats --remote` against an admin listener with
/// mutual TLS and tokens: the CA, the client certificate and the admin token
/// all given, it prints the stats; without the token the gateway refuses
/// (UNAUTHENTICATED) and the command exits 1 saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_a_tls_admin_api_with_its_token() {
    const ADMIN_TOKEN: &str = "tls-cli-admin-token-0123456789";
    let pki = Pki::new();
    let gateway = tls_gateway(|config| {
        pki.serve_mutual_tls(config, None);
        config.auth.enabled = true;
        config.auth.admins.insert(
            "ops".into(),
            gateway::config::TokenSources {
                token_sha256: vec![gateway::auth::token_digest_hex(ADMIN_TOKEN)],
                ..Default::default()
            },
        );
    })
    .await;
    std::fs::write(pki.path("admin.token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let address = format!("localhost:{}", gateway.admin_addr.port());
    let cli = |with_token: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cachegw"));
        command
            .args(["stats", "--remote", &address, "--json", "--tls-ca"])
            .arg(pki.path("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.path("client.pem"))
            .arg("--tls-key")
            .arg(pki.path("client.key"))
            .env_remove("CACHEGW_TOKEN");
        if with_token {
            command.arg("--token-file").arg(pki.path("admin.token"));
        }
        command
    };
    let (mut with, mut without) = (cli(true), cli(false));
    let output =
        tokio::task::spawn_blocking(move || (with.output().unwrap(), without.output().unwrap()));
    let (with, without) = output.await.unwrap();
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&with.stdout).unwrap();
    assert_eq!(stats["store"], "memory", "{stats}");
    assert_eq!(without.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    gateway.stop().await;
}
