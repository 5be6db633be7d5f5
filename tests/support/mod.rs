//! Fixtures for the end-to-end tests: a real `redis-server` on a free port, a
//! real gateway on port 0 serving over TCP, and real tonic clients.
#![allow(dead_code)] // each test binary uses its own subset

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use gateway::{
    Config, Gateway, MetricsHandle,
    api::proto::v1::{GetRequest, SetRequest, cache_client::CacheClient},
    config::StoreKind,
};
use redis::aio::MultiplexedConnection;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// Polls `condition` until it holds or `within` passes; panics with `what`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` ports nobody listens on right now, all different: held at once while
/// they are picked (two [`free_port`] calls in a row may return the same
/// port, as the first one is free again when the second one asks).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [std::net::TcpListener; N] = std::array::from_fn(|_| {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")
    });
    listeners.map(|listener| listener.local_addr().expect("its address").port())
}

/// A port that refuses connections for as long as the returned socket lives:
/// bound and never listening, so that no other test or process can take it
/// meanwhile. (A [`free_port`] is free only when asked: a test that wants
/// an address nobody answers on, and got one another test then listened on,
/// would meet that test's server instead.)
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind an ephemeral port");
    let port = socket.local_addr().expect("its address").port();
    (socket, port)
}

/// The `redis-server` to start: the one on PATH, else the usual places.
pub fn redis_server_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(candidate).is_file() {
            return candidate.into();
        }
    }
    panic!("redis-server not found on PATH: install it (Debian: apt-get install redis-server)");
}

/// A `redis-server` owned by one test, on its own port, persisting nothing.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server on a given port (one a gateway already points at).
    pub async fn start_on(port: u16) -> Self {
        Self::start_on_with(port, &[]).await
    }

    /// Starts a server with extra `redis-server` arguments (`--maxmemory 1mb`).
    pub async fn start_with(extra_args: &[&str]) -> Self {
        Self::start_on_with(free_port(), extra_args).await
    }

    /// Starts a server on `port` with extra `redis-server` arguments.
    pub async fn start_on_with(port: u16, extra_args: &[&str]) -> Self {
        let mut server = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log_path = self.dir.path().join("redis-server.log");
        let log = std::fs::File::create(&log_path).expect("create the redis-server log");
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .stdout(log.try_clone().expect("share the redis-server log"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        // Kept before waiting, so that a failed wait still kills it on drop.
        self.child = Some(child);
        let url = self.url();
        let port = self.port;
        let child = self.child.as_mut().expect("just spawned");
        wait_until(
            "redis-server to answer PING",
            Duration::from_secs(10),
            || {
                // A server that exited will never answer: say why, now.
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server on port {port} exited ({status}) before answering PING:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                let url = url.clone();
                async move { ping(&url).await }
            },
        )
        .await;
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A direct connection for checks the gateway's API cannot make.
    pub async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    /// SIGKILLs the server (no shutdown, no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it persists nothing).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// SIGSTOP: the process stays, its sockets accept, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server ignores SIGKILL until continued on some kernels.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut connection)) = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            redis::cmd("PING").query_async::<String>(&mut connection)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Config for a test gateway: short timeouts so degraded answers come fast.
pub fn test_config(store: StoreKind, redis_url: Option<String>) -> Config {
    let mut config = Config {
        store,
        ..Default::default()
    };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    // Said explicitly, as a deployment must: the tests of tenants and tokens
    // (tests/auth.rs) turn it back on with their own.
    config.auth.enabled = false;
    config.server.store_timeout = Duration::from_millis(500);
    config.server.shutdown_grace = Duration::from_secs(5);
    if let Some(url) = redis_url {
        config.redis.url = url;
    }
    config.redis.max_connections = 8;
    config.redis.wait_timeout = Duration::from_millis(300);
    config.redis.create_timeout = Duration::from_millis(300);
    config.redis.recycle_timeout = Duration::from_millis(300);
    config.redis.connect_timeout = Duration::from_millis(300);
    config.redis.response_timeout = Duration::from_millis(300);
    // Generous: a debug-built gateway on 2 shared cores can take milliseconds to
    // instantiate a policy, and these tests are not about the deadline (the
    // hostile-policy tests set their own).
    config.policy.deadline = Duration::from_millis(250);
    config
}

/// A gateway running in this process, serving real gRPC over TCP.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The PolicyAdmin API's address.
    pub admin_addr: SocketAddr,
    pub metrics: MetricsHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), gateway::GatewayError>>>,
    /// The Redis Cluster this gateway stores in, when a scenario started one.
    pub cluster: Option<RedisCluster>,
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        config.validate().expect("test config is valid");
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .expect("bind the gateway");
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the admin API");
        let admin_addr = admin.local_addr().unwrap();
        let gateway = Gateway::new(config).expect("build the gateway");
        let metrics = gateway.metrics();
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve_with_admin(listener, Some(admin), async {
            let _ = signal.await;
        }));
        TestGateway {
            addr,
            admin_addr,
            metrics,
            shutdown: Some(shutdown),
            task: Some(task),
            cluster: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect to the gateway")
    }

    pub async fn admin(
        &self,
    ) -> gateway::api::proto::v1::policy_admin_client::PolicyAdminClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.admin_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the admin API");
        gateway::api::proto::v1::policy_admin_client::PolicyAdminClient::new(channel)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn client(&self) -> CacheClient<Channel> {
        CacheClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A data API client over TLS (`tls` says which CA to trust and which
    /// client certificate, if any, to present), or why it cannot connect.
    pub async fn tls_client(
        &self,
        tls: tonic::transport::ClientTlsConfig,
    ) -> Result<CacheClient<Channel>, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(CacheClient::new(channel))
    }

    /// Triggers graceful shutdown (without waiting for it).
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Shuts down and waits for the server to stop.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }

    /// Sum of every series of a counter family, from the metrics text.
    pub fn counter(&self, name: &str) -> u64 {
        counter_sum(&self.metrics.encode(), name)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Sums every sample of `name` (`name_total{...} N` lines) in Prometheus text.
pub fn counter_sum(text: &str, name: &str) -> u64 {
    let total = format!("{name}_total");
    text.lines()
        .filter(|line| {
            line.strip_prefix(&total)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The value of an unlabelled gauge `name` in Prometheus text.
pub fn gauge(text: &str, name: &str) -> i64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The compiled example policy `name` (policies/dist/NAME.wasm).
pub fn policy_module(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the policies first (scripts/build-policies; scripts/test does it)",
        path.display()
    );
    path
}

/// The example policies as policies/cachegw.toml binds them: (namespace,
/// module, config).
pub fn example_policies() -> [(&'static str, &'static str, serde_json::Value); 5] {
    use serde_json::json;
    [
        (
            "api",
            "ttl-by-route",
            json!({"rules": [{"prefix": "leaderboard:", "ttl": "60s"},
                             {"glob": "ref:*", "ttl": "24h"},
                             {"prefix": "country-codes", "ttl": "24h"}],
                   "default_ttl": "5m"}),
        ),
        ("users", "user-profile", json!({"ttl": "5m"})),
        (
            "pages",
            "tenant-keying",
            json!({"vary": ["accept-language"]}),
        ),
        (
            "catalog",
            "surrogate-keys",
            json!({"ttl": "10m", "stale": "1m"}),
        ),
        (
            "hours",
            "business-hours",
            json!({"open": "08:00", "close": "18:00"}),
        ),
    ]
}

/// Binds `namespace` to the compiled policy `module` with a JSON `config`.
pub fn bind(
    config: &mut Config,
    namespace: &str,
    module: &str,
    policy_config: Option<serde_json::Value>,
    fallback: gateway::config::FallbackMode,
) {
    config.namespaces.insert(
        namespace.to_owned(),
        gateway::config::NamespaceConfig {
            policy: Some(gateway::config::PolicyBindingConfig {
                module: policy_module(module),
                config: policy_config,
                fallback,
                memo: true,
            }),
            ..Default::default()
        },
    );
}

/// Generates, for each scenario function `async fn NAME(backend: Backend)` of
/// the calling test file, one `#[tokio::test]` per store:
/// `redis_store::NAME`, `memory_store::NAME` and `cluster_store::NAME` (a
/// three-primary Redis Cluster). Checks that read Redis directly
/// (`world.redis`) run on the standalone variant; key counts run on both.
#[macro_export]
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::support::Backend::Redis).await;
                }
            )*
        }
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::support::Backend::Memory).await;
                }
            )*
        }
        mod cluster_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::support::Backend::Cluster).await;
                }
            )*
        }
    };
}

/// Which store a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Memory,
    /// A Redis Cluster of three primaries (no replicas).
    Cluster,
}

/// A store (a test redis-server for `Backend::Redis`) and a gateway over it,
/// its config adjusted by `configure`.
pub async fn store_and_gateway(
    backend: Backend,
    configure: impl FnOnce(&mut Config),
) -> (Option<RedisServer>, TestGateway) {
    if backend == Backend::Cluster {
        let cluster = RedisCluster::start(3, 0).await;
        let mut config = cluster.config();
        configure(&mut config);
        let mut gateway = TestGateway::start(config).await;
        gateway.cluster = Some(cluster);
        return (None, gateway);
    }
    let redis = match backend {
        Backend::Redis => Some(RedisServer::start().await),
        Backend::Memory | Backend::Cluster => None,
    };
    let store = match backend {
        Backend::Redis | Backend::Cluster => StoreKind::Redis,
        Backend::Memory => StoreKind::Memory,
    };
    let mut config = test_config(store, redis.as_ref().map(RedisServer::url));
    configure(&mut config);
    (redis, TestGateway::start(config).await)
}

/// `CLIENT KILL TYPE normal SKIPME yes`: drops every client connection but
/// `admin`'s (the gateway's); returns how many were killed.
pub async fn kill_client_connections(admin: &mut MultiplexedConnection) -> u64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(admin)
        .await
        .expect("CLIENT KILL")
}

/// A scenario's world: the store (a test redis-server, or none for the memory
/// store), a gateway over it, and a client.
pub struct World {
    pub redis: Option<RedisServer>,
    pub gateway: TestGateway,
    pub client: CacheClient<Channel>,
}

impl World {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts with a config adjusted by `configure`.
    pub async fn start_with(backend: Backend, configure: impl FnOnce(&mut Config)) -> Self {
        let (redis, gateway) = store_and_gateway(backend, configure).await;
        let client = gateway.client().await;
        World {
            redis,
            gateway,
            client,
        }
    }

    pub async fn set(
        &mut self,
        namespace: &str,
        key: &str,
        value: &[u8],
    ) -> gateway::api::proto::v1::SetResponse {
        self.client
            .set(SetRequest {
                namespace: namespace.into(),
                key: key.into(),
                value: value.to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("set")
            .into_inner()
    }

    pub async fn get(
        &mut self,
        namespace: &str,
        key: &str,
    ) -> gateway::api::proto::v1::GetResponse {
        self.client
            .get(GetRequest {
                namespace: namespace.into(),
                key: key.into(),
                attributes: Default::default(),
                ..Default::default()
            })
            .await
            .expect("get")
            .into_inner()
    }

    /// Entries in the test Redis or cluster (None for the memory store): keys
    /// under `cg:`, leaving out tag indexes and namespace state.
    pub async fn redis_key_count(&self) -> Option<u64> {
        if let Some(cluster) = &self.gateway.cluster {
            return Some(cluster.key_count("cg:*").await);
        }
        let redis = self.redis.as_ref()?;
        Some(scan_count(&mut redis.connection().await, "cg:*").await)
    }
}

/// Keys matching `pattern` on one Redis (SCAN, never KEYS).
pub async fn scan_count(connection: &mut MultiplexedConnection, pattern: &str) -> u64 {
    let mut cursor = 0u64;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .expect("SCAN");
        count += keys.len() as u64;
        if next == 0 {
            return count;
        }
        cursor = next;
    }
}

/// The `redis-cli` next to the `redis-server` in use.
pub fn redis_cli_binary() -> PathBuf {
    let server = redis_server_binary();
    let candidate = server.with_file_name("redis-cli");
    if candidate.is_file() {
        return candidate;
    }
    PathBuf::from("redis-cli")
}

/// A local Redis Cluster: `redis-server --cluster-enabled yes` processes on
/// free ports, joined by `redis-cli --cluster create`.
pub struct RedisCluster {
    /// Every node; the first `primaries` were created as primaries.
    pub nodes: Vec<RedisServer>,
    primaries: usize,
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas` replicas each and waits
    /// until every node reports `cluster_state:ok` with every slot assigned.
    pub async fn start(primaries: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            // The cluster bus listens on its own port. Left to itself, Redis
            // takes the client port + 10000 and refuses to start when that
            // passes 65535, which a fifth of the ephemeral range (32768-60999)
            // does: name a free port for it instead, picked together with the
            // client port so that the two differ.
            let [port, bus_port] = free_ports();
            let bus_port = bus_port.to_string();
            nodes.push(
                RedisServer::start_on_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &bus_port,
                    ],
                )
                .await,
            );
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = Command::new(redis_cli_binary())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, primaries };
        cluster.wait_until_ok(Duration::from_secs(20)).await;
        if replicas > 0 {
            cluster.wait_for_replicas(Duration::from_secs(20)).await;
        }
        cluster
    }

    /// Waits until every running node agrees the cluster is ok.
    pub async fn wait_until_ok(&self, within: Duration) {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(RedisServer::url)
            .collect();
        wait_until("the cluster to be ok on every node", within, || {
            let urls = urls.clone();
            async move {
                for url in &urls {
                    let Some(info) = command_text(url, &["CLUSTER", "INFO"]).await else {
                        return false;
                    };
                    if !info.contains("cluster_state:ok")
                        || !info.contains("cluster_slots_assigned:16384")
                    {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }

    async fn wait_for_replicas(&self, within: Duration) {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        wait_until("every replica to be in sync", within, || {
            let urls = urls.clone();
            async move {
                for url in &urls {
                    let Some(info) = command_text(url, &["INFO", "replication"]).await else {
                        return false;
                    };
                    if info.contains("role:slave") && !info.contains("master_link_status:up") {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }

    /// Seed URLs of the nodes created as primaries.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes[..self.primaries]
            .iter()
            .map(RedisServer::url)
            .collect()
    }

    /// A test config for a gateway on this cluster.
    pub fn config(&self) -> Config {
        let seeds = self.seed_urls();
        let mut config = test_config(StoreKind::Redis, Some(seeds[0].clone()));
        // Three redis-servers, the gateway and the test share two cores: the
        // fixtures' 300 ms would turn a busy moment into degraded answers. The
        // cluster variants test behaviour, not speed (docs/BENCHMARKS.md has
        // the speed).
        config.redis.response_timeout = Duration::from_secs(2);
        config.server.store_timeout = Duration::from_secs(2);
        config.redis.mode = gateway::config::RedisMode::Cluster;
        config.redis.cluster_seeds = seeds[1..].to_vec();
        config
    }

    /// The nodes that are primaries now (replicas may have been promoted).
    pub async fn current_primaries(&self) -> Vec<&RedisServer> {
        let mut primaries = Vec::new();
        for node in &self.nodes {
            if node.child.is_none() {
                continue;
            }
            if let Some(info) = command_text(&node.url(), &["INFO", "replication"]).await
                && info.contains("role:master")
            {
                primaries.push(node);
            }
        }
        primaries
    }

    /// Keys matching `pattern` on every primary (SCAN, never KEYS).
    pub async fn key_count(&self, pattern: &str) -> u64 {
        self.key_counts(pattern).await.iter().sum()
    }

    /// Keys matching `pattern`, per current primary.
    pub async fn key_counts(&self, pattern: &str) -> Vec<u64> {
        let mut counts = Vec::new();
        for node in self.current_primaries().await {
            counts.push(scan_count(&mut node.connection().await, pattern).await);
        }
        counts
    }
}

/// A command's reply as text, or None when the node does not answer.
async fn command_text(url: &str, args: &[&str]) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut connection = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    tokio::time::timeout(
        Duration::from_millis(500),
        cmd.query_async::<String>(&mut connection),
    )
    .await
    .ok()?
    .ok()
}
