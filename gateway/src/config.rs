//! The gateway's configuration: one serde struct, merged from (lowest to
//! highest precedence) built-in defaults, a TOML file, `CACHEGW_*` environment
//! variables and command-line flags, then checked by [`Config::validate`].
//!
//! Every field is documented here; `docs/CONFIG.md` is the operator-facing
//! reference and `cachegw serve --print-config` shows the merged result.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// The top-level keys of [`Config`]: `CACHEGW_<SECTION>__...` variables are config.
const CONFIG_SECTIONS: &[&str] = &[
    "server",
    "admin",
    "metrics",
    "tls",
    "store",
    "redis",
    "memory",
    "near_cache",
    "limits",
    "invalidation",
    "breaker",
    "log",
    "auth",
    "policy",
    "default_namespace",
    "namespaces",
];

/// Longest TTL any namespace may declare: beyond this a TTL is a mistake.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener and request handling.
    pub server: ServerConfig,
    /// The policy administration API's listener.
    pub admin: AdminConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// TLS on the gRPC listeners (data and admin); off without a certificate.
    pub tls: TlsConfig,
    /// Which store backs the cache: `redis` (default) or `memory` (in-process).
    pub store: StoreKind,
    /// The Redis store (used when `store = "redis"`).
    pub redis: RedisConfig,
    /// The in-process store (used when `store = "memory"`).
    pub memory: MemoryConfig,
    /// The optional in-process near-cache (L1) in front of Redis.
    pub near_cache: NearCacheConfig,
    /// Limits applied to every request, whatever the namespace.
    pub limits: LimitsConfig,
    /// The Invalidate RPC's jobs.
    pub invalidation: InvalidationConfig,
    /// The circuit breaker and retries on the Redis path.
    pub breaker: BreakerConfig,
    /// Logs and traces.
    pub log: LogConfig,
    /// Who may call the gateway: API tokens, tenants and their rights.
    pub auth: AuthConfig,
    /// The WebAssembly policy engine's limits.
    pub policy: PolicyEngineConfig,
    /// Settings for namespaces not declared under `[namespaces]`.
    pub default_namespace: DefaultNamespaceConfig,
    /// Declared namespaces by name (`[namespaces.orders]`).
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

/// Which store the gateway uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Redis through a deadpool-redis pool; degraded (not failed) while Redis is down.
    #[default]
    Redis,
    /// An in-process store bounded by bytes; entries are lost on restart.
    Memory,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Redis => "redis",
            StoreKind::Memory => "memory",
        })
    }
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redis" => Ok(StoreKind::Redis),
            "memory" => Ok(StoreKind::Memory),
            other => Err(format!(
                "unknown store `{other}`: expected `redis` or `memory`"
            )),
        }
    }
}

/// The gRPC listener and request handling.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Upper bound on one store round trip (pool wait, connect and response
    /// together). Past it the request is answered `degraded`. A client deadline
    /// shorter than this wins.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Largest request message accepted, in bytes (checked while decoding).
    pub max_request_bytes: usize,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            store_timeout: Duration::from_millis(1000),
            max_request_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The `PolicyAdmin` API: upload, bind, roll back and dry-run policies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API. It changes what every request does: keep it on
    /// a loopback or otherwise protected address.
    pub enabled: bool,
    /// Its listen address, apart from the data API's so it can be firewalled
    /// and authorised separately. Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
        }
    }
}

/// The Prometheus endpoint: `GET /metrics` in the text exposition format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint.
    pub enabled: bool,
    /// Its listen address (HTTP). Port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// TLS on the gRPC listeners: the data API (with health and reflection) and
/// the admin API. Plaintext when `cert_file` is not set. Files are read at
/// start; a renewed certificate needs a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first. Setting it turns TLS
    /// on; a relative path is relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key of `cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to. Setting
    /// it turns on client-certificate verification (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<std::path::PathBuf>,
    /// With `client_ca_file`: `required` (the default) refuses a client
    /// without a valid certificate during the handshake; `optional` also
    /// accepts clients presenting none (one presented must still be valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
    /// How long a client may take to complete the TLS handshake before its
    /// connection is dropped.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// Whether the gRPC listeners speak TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Whether clients must present a certificate; `None` when client
    /// certificates are not verified at all.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca_file
            .as_ref()
            .map(|_| self.client_auth.unwrap_or(ClientAuth::Required))
    }
}

/// Whether a TLS client must present a certificate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a valid certificate is refused.
    Required,
    /// A client may present no certificate; one it presents must be valid.
    Optional,
}

impl std::fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientAuth::Required => "required",
            ClientAuth::Optional => "optional",
        })
    }
}

/// How the gateway talks to Redis.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis primary (or a proxy in front of several).
    #[default]
    Standalone,
    /// A Redis Cluster.
    Cluster,
}

impl RedisConfig {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.mode == RedisMode::Cluster
    }

    /// The seed nodes: `url`, then `cluster_seeds`.
    pub fn seeds(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.cluster_seeds.iter().map(String::as_str))
    }
}

/// The Redis store's pool and connection settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL (`redis://[user:pass@]host:port[/db]`; `rediss://` for TLS).
    /// In cluster mode, one seed node of the cluster.
    pub url: String,
    /// `standalone` (one Redis primary) or `cluster` (Redis Cluster: `url`
    /// and `cluster_seeds` are seed nodes, the rest of the cluster and its
    /// slot map are discovered and followed through MOVED/ASK and failovers).
    pub mode: RedisMode,
    /// More seed nodes in cluster mode, tried after `url` (same scheme and
    /// credentials). Empty: `url` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_seeds: Vec<String>,
    /// With a `rediss://` URL: CA certificates (PEM) to trust for the Redis
    /// server's certificate, instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// With a `rediss://` URL: the client certificate chain (PEM) presented to
    /// a Redis that requires one (`tls-auth-clients yes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM) of `tls_client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_key_file: Option<std::path::PathBuf>,
    /// Most connections the pool opens. Concurrent requests pipeline on these
    /// shared connections, so a handful serves thousands of requests: fewer
    /// connections pipeline deeper (more throughput, docs/BENCHMARKS.md); more
    /// connections limit head-of-line blocking behind large values.
    pub max_connections: usize,
    /// How long a request waits for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// How long creating a new pooled connection may take (connect + handshake).
    #[serde(with = "humantime_serde")]
    pub create_timeout: Duration,
    /// How long the health check (PING) of a returned connection may take.
    #[serde(with = "humantime_serde")]
    pub recycle_timeout: Duration,
    /// TCP connect timeout of one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one command may wait for its reply (the socket read timeout).
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How often a connection in use is handed back to the pool, which
    /// health-checks it (PING) before it is used again. `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            mode: RedisMode::Standalone,
            cluster_seeds: Vec::new(),
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            max_connections: 4,
            wait_timeout: Duration::from_millis(500),
            create_timeout: Duration::from_millis(500),
            recycle_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(500),
            health_check_interval: Duration::from_secs(30),
        }
    }
}

/// The in-process store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Capacity in bytes (keys + values); least-recently-used entries go first.
    pub max_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The near-cache (L1): hot entries a policy marks eligible, kept in this
/// process for a short while and dropped on every gateway when they change
/// (invalidation messages over Redis pub/sub; see `docs/OPERATIONS.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NearCacheConfig {
    /// Run the near-cache. Off by default: it trades a bounded window of
    /// staleness after a write on another gateway (one pub/sub delivery) for
    /// reads without a Redis round trip. Only with `store = "redis"`; every
    /// gateway sharing the Redis must turn it on, since only gateways that run
    /// it publish their writes.
    pub enabled: bool,
    /// Capacity in bytes (keys + stored entries); least-recently-used go first.
    pub max_bytes: u64,
    /// Longest time an entry stays in the near-cache, whatever the policy
    /// asks for: the bound on staleness should invalidation messages be lost
    /// without the subscription noticing.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// The pub/sub channel gateways announce changes on (one per fleet).
    pub channel: String,
    /// How often the subscription is checked with a PING; one that does not
    /// answer within `redis.response_timeout` counts as lost, and the
    /// near-cache is dropped.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_bytes: 64 * 1024 * 1024,
            max_ttl: Duration::from_secs(5),
            channel: "cachegw:l1".to_owned(),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Limits applied to every request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// Most items in one MGet/MSet.
    pub max_batch_items: usize,
    /// Longest lease a Get may ask for (and how long a tag purge's mark
    /// voiding older leases is kept).
    #[serde(with = "humantime_serde")]
    pub max_lease_ttl: Duration,
    /// Longest a Get may wait for another caller's fill.
    #[serde(with = "humantime_serde")]
    pub max_lease_wait: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_batch_items: 1000,
            max_lease_ttl: Duration::from_secs(300),
            max_lease_wait: Duration::from_secs(30),
        }
    }
}

/// Who may call the gateway. Every data call carries `authorization: Bearer
/// <token>`; the token names a tenant, whose rights are granted per
/// namespace. The admin API (`PolicyAdmin`, `Stats`) takes admin tokens only.
/// Tokens are read from files or environment variables (or given as SHA-256
/// digests), kept only as digests, and compared in constant time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a token on every call. Turning it off lets anyone do
    /// anything (local development only); the gateway warns at start-up.
    pub enabled: bool,
    /// Admin credentials by name (`[auth.admins.ops]`), for the admin API.
    /// The name appears in the audit log.
    pub admins: BTreeMap<String, TokenSources>,
    /// Tenants by name (`[auth.tenants.shop]`).
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            admins: BTreeMap::new(),
            tenants: BTreeMap::new(),
        }
    }
}

/// Where a principal's tokens come from; any mix, at least one token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSources {
    /// SHA-256 digests of tokens, as 64 hex digits (`cachegw token hash`):
    /// safe to keep in the config file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_sha256: Vec<String>,
    /// Files holding tokens, one per line (blank lines and `#` comments
    /// skipped), read at start-up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_files: Vec<std::path::PathBuf>,
    /// Environment variables holding one token each, read at start-up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_env: Vec<String>,
}

/// One tenant: its tokens, its rights per namespace and its request rate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's tokens.
    #[serde(flatten)]
    pub tokens: TokenSources,
    /// Rights by namespace: `shop = ["read", "write", "invalidate"]`. A name
    /// ending in `*` grants every namespace starting with what precedes it
    /// (`"shop-*"`); nothing else is a wildcard.
    pub namespaces: BTreeMap<String, Vec<Right>>,
    /// Most requests per second from this tenant (all its tokens, every
    /// RPC; a batch counts once). 0: no limit. More: `RESOURCE_EXHAUSTED`.
    pub rate_limit: u32,
    /// Requests allowed in a burst above the rate (default: one second's worth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// What a tenant may do in a namespace.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Get and MGet (leases included: the Set that fills needs `write`).
    Read,
    /// Set, MSet, Delete and ReleaseLease.
    Write,
    /// Invalidate and GetInvalidation.
    Invalidate,
}

impl std::fmt::Display for Right {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Invalidate => "invalidate",
        })
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: String| Err(ConfigError::Invalid { field, reason });
        if !self.enabled {
            return Ok(());
        }
        if self.admins.is_empty() && self.tenants.is_empty() {
            return invalid(
                "auth".to_owned(),
                "is enabled but names no tenant and no admin: add `[auth.tenants.NAME]` \
                 (tokens and namespaces) and `[auth.admins.NAME]`, or set `auth.enabled = false` \
                 for local development (see docs/SECURITY.md)"
                    .to_owned(),
            );
        }
        let principals = self
            .admins
            .iter()
            .map(|(name, tokens)| (format!("auth.admins.{name}"), name, tokens))
            .chain(
                self.tenants
                    .iter()
                    .map(|(name, tenant)| (format!("auth.tenants.{name}"), name, &tenant.tokens)),
            );
        for (path, name, tokens) in principals {
            if crate::cache::validate_namespace_name(name).is_err() {
                return invalid(
                    path,
                    "names must use only letters, digits, `_`, `.` and `-`".to_owned(),
                );
            }
            if tokens.token_sha256.is_empty()
                && tokens.token_files.is_empty()
                && tokens.token_env.is_empty()
            {
                return invalid(
                    path,
                    "has no tokens: give token_sha256, token_files or token_env".to_owned(),
                );
            }
            for digest in &tokens.token_sha256 {
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return invalid(
                        format!("{path}.token_sha256"),
                        "entries must be SHA-256 digests: 64 hex digits (`cachegw token hash`)"
                            .to_owned(),
                    );
                }
            }
        }
        for (name, tenant) in &self.tenants {
            let path = format!("auth.tenants.{name}");
            if tenant.namespaces.is_empty() {
                return invalid(
                    format!("{path}.namespaces"),
                    "grants nothing: name at least one namespace and its rights".to_owned(),
                );
            }
            for (namespace, rights) in &tenant.namespaces {
                let exact = namespace.strip_suffix('*').unwrap_or(namespace);
                if exact.contains('*')
                    || (!exact.is_empty() && crate::cache::validate_namespace_name(exact).is_err())
                {
                    return invalid(
                        format!("{path}.namespaces.{namespace}"),
                        "must be a namespace name, or a prefix followed by one `*`".to_owned(),
                    );
                }
                if rights.is_empty() {
                    return invalid(
                        format!("{path}.namespaces.{namespace}"),
                        "grants no right: list read, write and/or invalidate".to_owned(),
                    );
                }
            }
            if tenant.burst == Some(0) {
                return invalid(format!("{path}.burst"), "must be at least 1".to_owned());
            }
        }
        Ok(())
    }
}

/// Logs and traces.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line).
    pub format: LogFormatConfig,
    /// Export request spans over OTLP/gRPC to this endpoint (e.g.
    /// `http://127.0.0.1:4317`); needs a build with the `otel` feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatConfig {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The circuit breaker and retries on the Redis path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Put the breaker in front of Redis.
    pub enabled: bool,
    /// Open when more than this share of calls failed (connection failures
    /// and timeouts) within `window`...
    pub failure_rate: f64,
    /// ...and at least this many calls were made in it.
    pub min_requests: u32,
    /// The sliding window the failure rate is measured over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Open after this many failures in a row, whatever the rate.
    pub consecutive_failures: u32,
    /// How long the breaker stays open the first time, before it half-opens
    /// to probe.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// The open time doubles while probes keep failing, up to this.
    #[serde(with = "humantime_serde")]
    pub max_open_for: Duration,
    /// Wait before retrying an idempotent call after a broken connection
    /// (plus up to as much again of jitter).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Retries allowed, as a share of recent calls...
    pub retry_ratio: f32,
    /// ...and at least this many per second.
    pub retry_min_per_sec: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            consecutive_failures: 5,
            open_for: Duration::from_millis(250),
            max_open_for: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(5),
            retry_ratio: 0.1,
            retry_min_per_sec: 10,
        }
    }
}

/// How the Invalidate RPC runs its jobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InvalidationConfig {
    /// How long an Invalidate call waits for its job before answering
    /// RUNNING with the job's id (unless the request asks for less, or its
    /// deadline is sooner).
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Most invalidation jobs running at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub max_running_jobs: usize,
    /// Most keys or tags in one Invalidate request.
    pub max_targets: usize,
    /// How long a finished job's outcome stays available to GetInvalidation.
    #[serde(with = "humantime_serde")]
    pub keep_finished: Duration,
    /// How long one job may run before it is stopped and reported failed.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(2),
            max_running_jobs: 16,
            max_targets: 1000,
            keep_finished: Duration::from_secs(15 * 60),
            job_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// Limits every policy call runs under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyEngineConfig {
    /// CPU-time budget of one policy call (instantiation included): the time
    /// the call actually ran, checked at every 1 ms epoch tick, so a call
    /// whose thread is descheduled on a busy machine is not charged for the
    /// wait. Past it the call is a `timeout` fault and the binding's fallback
    /// applies.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Wall-clock cap of one policy call, however little CPU it was given:
    /// past it the call is a `timeout` fault too. Unset: 20 x `deadline`, at
    /// least 100 ms.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub wall_deadline: Option<Duration>,
    /// Bytes the decision memo may hold, for every binding together (keys,
    /// decisions and bookkeeping, estimated): decisions a policy reports as
    /// reusable are answered from it without a call. 0 turns it off.
    pub memo_bytes: u64,
    /// Pre-initialise every binding: run the policy's `cachegw_init` on the
    /// binding's config once, snapshot that instance into an image (compiled
    /// like a module), and start each call of the binding from the image, so
    /// that no call parses the config again. Each call still gets a fresh
    /// instance. A binding whose module cannot be snapshotted serves from the
    /// module, with a warning.
    pub preinit: bool,
    /// Keep a binding's instances between calls and put each one back to
    /// the exact state a new instance starts in after every call (its
    /// memory's written pages, found with Linux's `PAGEMAP_SCAN`, and its
    /// globals), instead of creating and tearing down an instance per call.
    /// Only for modules whose whole state is their memory and globals (what
    /// wizer can snapshot); a call that faults or grows its memory drops
    /// its instance. Off, or on a kernel without `PAGEMAP_SCAN` (before
    /// Linux 6.7): a new instance per call.
    pub recycle_instances: bool,
    /// How a recycled instance's reset knows which pages its calls wrote.
    /// `true`: the kernel says so once per page, through write-protection
    /// faults (a userfaultfd: Linux 6.4+, where the process may create one),
    /// so a call makes no system call; elsewhere, with a warning, as with
    /// `false`: `PAGEMAP_SCAN` asked after every call.
    pub track_writes: bool,
    /// Long policy calls (past 2 ms of CPU) of one binding (one version bound
    /// to one namespace) that may run at once. This bounds the CPU one
    /// namespace's policy can take from its neighbours: a slow or looping
    /// policy occupies at most this many cores, and only while they have
    /// nothing else to run. A long call without one, or a new call while
    /// they are all held, waits for one up to the wall deadline, then is a
    /// `busy` fault. Fast calls never need one. Default: half the cores, at
    /// least 1.
    pub max_concurrent_calls: usize,
    /// Linear memory one policy instance may use. Growing past it is a
    /// `memory` fault.
    pub memory_limit_bytes: usize,
    /// Policy instances that may exist at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// Largest policy module accepted, in bytes.
    pub max_module_bytes: usize,
    /// Log calls (`cachegw.log`) honoured per decision; later ones are dropped.
    pub max_log_calls: u32,
    /// Longest fresh TTL, stale window or jitter a policy may decide; longer is
    /// an `invalid` fault.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Most tags, and most invalidation keys/patterns/tags, in one decision.
    pub max_decision_items: usize,
    /// Time budget of the invalidations a write's decision asks for (pattern
    /// scans can be long); they run after the write is acknowledged by the store.
    #[serde(with = "humantime_serde")]
    pub invalidation_timeout: Duration,
    /// A binding whose policy faults this many times within
    /// `rollback_window` is rolled back to the namespace's previous binding
    /// (if it has one). 0 turns automatic rollback off.
    pub rollback_after_faults: u64,
    /// The window `rollback_after_faults` is counted in.
    #[serde(with = "humantime_serde")]
    pub rollback_window: Duration,
    /// With the Redis store: share uploaded versions and bindings with every
    /// gateway using the same Redis (stored there, announced by pub/sub).
    pub sync_through_redis: bool,
    /// At start, how long to wait for the fleet's bindings (fetching and
    /// compiling their modules) before serving; past it the gateway serves
    /// with its config's bindings and keeps catching up in the background.
    #[serde(with = "humantime_serde")]
    pub sync_catch_up: Duration,
    /// Where compiled policy modules are cached (keyed by wasmtime's engine
    /// compatibility hash and the module's hash), so a restart with many
    /// policies skips compiling them. Remove the key to turn caching off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_cache_dir: Option<std::path::PathBuf>,
    /// Write `/tmp/perf-<pid>.map`, naming the compiled code of every policy
    /// loaded, so that `perf record` and `perf report` on the gateway (or on
    /// `cachegw policy bench`) attribute time to the policies' own functions
    /// instead of anonymous addresses. For profiling: the file only grows.
    pub perf_map: bool,
    /// A directory of `.wasm` policies to watch: each file is loaded as a
    /// version named after it, and when it changes every namespace bound to a
    /// module of that name moves to the new version (validated first; a
    /// rejected or half-written file leaves the old version serving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_dir: Option<std::path::PathBuf>,
    /// How often `watch_dir` is scanned; a file must look the same on two
    /// scans in a row before it is loaded, so partial writes never are.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl PolicyEngineConfig {
    /// The wall-clock cap of one call: `wall_deadline`, or 20 x `deadline`
    /// (at least 100 ms) when it is unset.
    pub fn wall_deadline(&self) -> Duration {
        self.wall_deadline
            .unwrap_or_else(|| (self.deadline * 20).max(Duration::from_millis(100)))
    }
}

impl Default for PolicyEngineConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(5),
            wall_deadline: None,
            memo_bytes: 32 * 1024 * 1024,
            preinit: true,
            recycle_instances: true,
            track_writes: true,
            max_concurrent_calls: std::thread::available_parallelism()
                .map_or(1, |cores| cores.get().div_ceil(2)),
            memory_limit_bytes: 16 * 1024 * 1024,
            max_instances: 128,
            max_module_bytes: 8 * 1024 * 1024,
            max_log_calls: 8,
            max_ttl: Duration::from_secs(30 * 24 * 3600),
            max_decision_items: 64,
            invalidation_timeout: Duration::from_secs(5),
            rollback_after_faults: 50,
            rollback_window: Duration::from_secs(10),
            sync_through_redis: true,
            sync_catch_up: Duration::from_secs(30),
            compile_cache_dir: Some(std::env::temp_dir().join("cachegw-compiled-policies")),
            perf_map: false,
            watch_dir: None,
            watch_interval: Duration::from_millis(250),
        }
    }
}

/// What a namespace does when its policy faults.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackMode {
    /// Cache as if no policy were bound: the client's key, the namespace's TTL.
    #[default]
    FailOpen,
    /// Do not cache: Gets miss, Sets are not stored, Deletes delete nothing.
    FailClosed,
}

/// A namespace's policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyBindingConfig {
    /// Path of the policy's `.wasm` module; a relative path is relative to the
    /// config file's directory.
    pub module: std::path::PathBuf,
    /// The binding's configuration, handed to the policy as JSON bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// What happens when the policy faults (trap, timeout, bad output...).
    #[serde(default)]
    pub fallback: FallbackMode,
    /// Reuse this binding's decisions for identical requests when the policy
    /// reports they may be (`policy.memo_bytes`, docs/POLICY_ABI.md "Decision
    /// reuse"). `false`: ask the policy on every request.
    #[serde(default = "default_true")]
    pub memo: bool,
}

fn default_true() -> bool {
    true
}

/// Settings applied to a namespace that is not declared under `[namespaces]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultNamespaceConfig {
    /// Accept undeclared namespaces. With `false`, a request for one gets
    /// `NOT_FOUND`.
    pub enabled: bool,
    /// Settings every undeclared namespace gets.
    #[serde(flatten)]
    pub settings: NamespaceConfig,
}

impl Default for DefaultNamespaceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            settings: NamespaceConfig::default(),
        }
    }
}

/// One namespace's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// How long an entry stays fresh when the policy does not say otherwise.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Values at least this many bytes are stored LZ4-compressed when that
    /// saves space (a policy can say never, or prefer compression for any size).
    pub compress_min_bytes: usize,
    /// How long a lease lasts when the Get asking for it names no TTL: the
    /// longest a fill may take before another caller gets the lease.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// XFetch early-refresh beta when the policy decides none: above 0, a
    /// lease-asking reader of a fresh entry gets a refresh lease with a
    /// probability that grows as the entry nears expiry (1.0 is the paper's
    /// recommendation; larger refreshes earlier); 0 turns early refresh off.
    pub early_refresh_beta: f64,
    /// The WebAssembly policy deciding this namespace's keys and TTLs; without
    /// one, the built-in default policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyBindingConfig>,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(300),
            max_value_bytes: 4 * 1024 * 1024,
            compress_min_bytes: 4096,
            lease_ttl: Duration::from_secs(10),
            early_refresh_beta: 1.0,
            policy: None,
        }
    }
}

/// A configuration that could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, environment or flags could not be parsed into a [`Config`].
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// A field has a value the gateway cannot run with.
    #[error("invalid config: `{field}` {reason}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Values given on the command line; they win over file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--redis`
    pub redis_url: Option<String>,
    /// `--redis-cluster`
    pub redis_cluster: bool,
    /// `--store`
    pub store: Option<StoreKind>,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
    /// `--metrics-listen`
    pub metrics_listen: Option<SocketAddr>,
    /// `--no-auth`
    pub no_auth: bool,
}

impl Config {
    /// Merges defaults, the optional TOML file, `CACHEGW_*` environment variables
    /// (`CACHEGW_REDIS__URL`, `CACHEGW_SERVER__LISTEN`, ... : sections and fields
    /// joined by `__`) and `overrides`, then validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid {
                    field: "--config".to_owned(),
                    reason: format!("names `{}`, which is not a readable file", file.display()),
                });
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(
            Env::prefixed("CACHEGW_")
                // Config variables name a field of a section (`CACHEGW_LOG__FORMAT`) or
                // the top-level `CACHEGW_STORE`; other CACHEGW_* variables (the
                // `CACHEGW_LOG` filter, `CACHEGW_TOKEN`, the scripts' own) are not config.
                .filter(|key| {
                    let key = key.as_str();
                    match key.split_once("__") {
                        Some((section, _)) => CONFIG_SECTIONS
                            .iter()
                            .any(|known| section.eq_ignore_ascii_case(known)),
                        None => key.eq_ignore_ascii_case("store"),
                    }
                })
                .split("__"),
        );
        if let Some(listen) = overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if overrides.no_auth {
            figment = figment.merge(Serialized::default("auth.enabled", false));
        }
        if let Some(url) = &overrides.redis_url {
            figment = figment.merge(Serialized::default("redis.url", url));
        }
        if overrides.redis_cluster {
            figment = figment.merge(Serialized::default("redis.mode", RedisMode::Cluster));
        }
        if let Some(metrics) = overrides.metrics_listen {
            figment = figment.merge(Serialized::default("metrics.listen", metrics));
        }
        if let Some(admin) = overrides.admin_listen {
            figment = figment.merge(Serialized::default("admin.listen", admin));
        }
        if let Some(store) = overrides.store {
            figment = figment.merge(Serialized::default("store", store));
        }
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// Makes relative policy module paths relative to `dir` (the config
    /// file's directory), so a config works from any working directory.
    fn resolve_paths(&mut self, dir: &Path) {
        let bindings = self
            .namespaces
            .values_mut()
            .chain(std::iter::once(&mut self.default_namespace.settings))
            .filter_map(|namespace| namespace.policy.as_mut());
        for binding in bindings {
            if binding.module.is_relative() {
                binding.module = dir.join(&binding.module);
            }
        }
        for path in [
            &mut self.policy.watch_dir,
            &mut self.policy.compile_cache_dir,
            &mut self.tls.cert_file,
            &mut self.tls.key_file,
            &mut self.tls.client_ca_file,
            &mut self.redis.tls_ca_file,
            &mut self.redis.tls_client_cert_file,
            &mut self.redis.tls_client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }

    /// Parses a TOML document on top of the defaults (no environment, no flags).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value the types alone cannot; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.server.store_timeout.is_zero() {
            return invalid("server.store_timeout", "must be greater than 0");
        }
        if self.server.max_request_bytes < 1024 {
            return invalid("server.max_request_bytes", "must be at least 1024");
        }
        if self.redis.max_connections == 0 {
            return invalid("redis.max_connections", "must be at least 1");
        }
        if let Err(err) = redis::Client::open(self.redis.url.as_str()) {
            return invalid("redis.url", &format!("is not a Redis URL: {err}"));
        }
        if let Some((seed, err)) = self.redis.cluster_seeds.iter().find_map(|seed| {
            redis::Client::open(seed.as_str())
                .err()
                .map(|err| (seed, err))
        }) {
            return invalid(
                "redis.cluster_seeds",
                &format!("holds `{seed}`, which is not a Redis URL: {err}"),
            );
        }
        if !self.redis.cluster_seeds.is_empty() && !self.redis.is_cluster() {
            return invalid(
                "redis.cluster_seeds",
                "is set but redis.mode is not `cluster`: a standalone Redis has one URL",
            );
        }
        for (field, value) in [
            ("redis.wait_timeout", self.redis.wait_timeout),
            ("redis.create_timeout", self.redis.create_timeout),
            ("redis.recycle_timeout", self.redis.recycle_timeout),
            ("redis.connect_timeout", self.redis.connect_timeout),
            ("redis.response_timeout", self.redis.response_timeout),
        ] {
            if value.is_zero() {
                return invalid(field, "must be greater than 0");
            }
        }
        self.validate_tls()?;
        if self.memory.max_bytes < 1024 {
            return invalid("memory.max_bytes", "must be at least 1024");
        }
        if self.near_cache.max_bytes < 1024 {
            return invalid("near_cache.max_bytes", "must be at least 1024");
        }
        if self.near_cache.max_ttl < Duration::from_millis(1)
            || self.near_cache.max_ttl > Duration::from_secs(3600)
        {
            return invalid("near_cache.max_ttl", "must be between 1ms and 1h");
        }
        if self.near_cache.channel.is_empty() {
            return invalid("near_cache.channel", "must not be empty");
        }
        if self.near_cache.heartbeat < Duration::from_millis(10) {
            return invalid("near_cache.heartbeat", "must be at least 10ms");
        }
        if self.limits.max_key_bytes == 0 {
            return invalid("limits.max_key_bytes", "must be at least 1");
        }
        let breaker = &self.breaker;
        if !(0.0..=1.0).contains(&breaker.failure_rate) {
            return invalid("breaker.failure_rate", "must be between 0 and 1");
        }
        if breaker.consecutive_failures == 0 {
            return invalid("breaker.consecutive_failures", "must be at least 1");
        }
        if breaker.window.is_zero() || breaker.open_for.is_zero() {
            return invalid(
                "breaker.window",
                "window and open_for must be longer than 0s",
            );
        }
        if breaker.max_open_for < breaker.open_for {
            return invalid("breaker.max_open_for", "must be at least breaker.open_for");
        }
        if !(0.0..=1.0).contains(&breaker.retry_ratio) {
            return invalid("breaker.retry_ratio", "must be between 0 and 1");
        }
        if self.invalidation.max_running_jobs == 0 {
            return invalid("invalidation.max_running_jobs", "must be at least 1");
        }
        if self.invalidation.max_targets == 0 {
            return invalid("invalidation.max_targets", "must be at least 1");
        }
        if self.invalidation.job_timeout.is_zero() {
            return invalid("invalidation.job_timeout", "must be longer than 0s");
        }
        if self.limits.max_batch_items == 0 {
            return invalid("limits.max_batch_items", "must be at least 1");
        }
        if self.policy.deadline < Duration::from_millis(1) {
            return invalid("policy.deadline", "must be at least 1ms (the epoch tick)");
        }
        if let Some(wall) = self.policy.wall_deadline
            && wall < self.policy.deadline
        {
            return invalid(
                "policy.wall_deadline",
                "must be at least policy.deadline (a call cannot run longer than it waits)",
            );
        }
        if self.policy.max_concurrent_calls == 0 {
            return invalid("policy.max_concurrent_calls", "must be at least 1");
        }
        if self.policy.memory_limit_bytes < 1024 * 1024 {
            return invalid("policy.memory_limit_bytes", "must be at least 1 MiB");
        }
        if self.policy.max_instances == 0 {
            return invalid("policy.max_instances", "must be at least 1");
        }
        if self.policy.watch_interval < Duration::from_millis(10) {
            return invalid("policy.watch_interval", "must be at least 10ms");
        }
        if let Some(dir) = &self.policy.watch_dir
            && !dir.is_dir()
        {
            return invalid(
                "policy.watch_dir",
                &format!("names `{}`, which is not a directory", dir.display()),
            );
        }
        if self.policy.max_ttl < Duration::from_secs(1) || self.policy.max_ttl > MAX_TTL {
            return invalid("policy.max_ttl", "must be between 1s and 365 days");
        }
        if self.limits.max_lease_ttl < Duration::from_millis(1) {
            return invalid("limits.max_lease_ttl", "must be at least 1ms");
        }
        self.default_namespace
            .settings
            .validate("default_namespace", self.server.max_request_bytes)?;
        let namespaces = std::iter::once((
            "default_namespace".to_owned(),
            &self.default_namespace.settings,
        ))
        .chain(
            self.namespaces
                .iter()
                .map(|(name, ns)| (format!("namespaces.{name}"), ns)),
        );
        for (path, namespace) in namespaces {
            if namespace.lease_ttl > self.limits.max_lease_ttl {
                return invalid(
                    &format!("{path}.lease_ttl"),
                    &format!(
                        "({:?}) must not exceed limits.max_lease_ttl ({:?})",
                        namespace.lease_ttl, self.limits.max_lease_ttl
                    ),
                );
            }
        }
        for (name, namespace) in &self.namespaces {
            if let Err(reason) = crate::cache::validate_namespace_name(name) {
                return invalid(&format!("namespaces.{name}"), &reason);
            }
            namespace.validate(&format!("namespaces.{name}"), self.server.max_request_bytes)?;
        }
        self.auth.validate()
    }
}

impl Config {
    /// The `[tls]` section and the `redis.tls_*` keys: which files go together,
    /// and that each is readable and holds what it should (see [`crate::tls`]).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        let tls = &self.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => return invalid("tls.key_file", "is needed with tls.cert_file"),
            (None, Some(_)) => return invalid("tls.cert_file", "is needed with tls.key_file"),
            _ => {}
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            return invalid(
                "tls.client_ca_file",
                "needs tls.cert_file and tls.key_file: client certificates are verified over TLS",
            );
        }
        if tls.client_auth.is_some() && tls.client_ca_file.is_none() {
            return invalid(
                "tls.client_auth",
                "needs tls.client_ca_file, the CA client certificates are verified against",
            );
        }
        if tls.handshake_timeout.is_zero() {
            return invalid("tls.handshake_timeout", "must be greater than 0");
        }
        let redis = &self.redis;
        match (&redis.tls_client_cert_file, &redis.tls_client_key_file) {
            (Some(_), None) => {
                return invalid(
                    "redis.tls_client_key_file",
                    "is needed with redis.tls_client_cert_file",
                );
            }
            (None, Some(_)) => {
                return invalid(
                    "redis.tls_client_cert_file",
                    "is needed with redis.tls_client_key_file",
                );
            }
            _ => {}
        }
        if !redis.url.starts_with("rediss://") {
            for (field, value) in [
                ("redis.tls_ca_file", &redis.tls_ca_file),
                ("redis.tls_client_cert_file", &redis.tls_client_cert_file),
            ] {
                if value.is_some() {
                    return invalid(
                        field,
                        "is set but redis.url is not a `rediss://` (TLS) URL: the connection would be plaintext",
                    );
                }
            }
        }
        crate::tls::check(self).map_err(|err| ConfigError::Invalid {
            field: err.field.to_owned(),
            reason: err.reason_with_path(),
        })
    }
}

impl NamespaceConfig {
    fn validate(&self, path: &str, max_request_bytes: usize) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| {
            Err(ConfigError::Invalid {
                field: format!("{path}.{field}"),
                reason,
            })
        };
        if self.default_ttl < Duration::from_millis(1) {
            return invalid("default_ttl", "must be at least 1ms".to_owned());
        }
        if self.default_ttl > MAX_TTL {
            return invalid("default_ttl", "must be at most 365 days".to_owned());
        }
        if self.lease_ttl < Duration::from_millis(1) {
            return invalid("lease_ttl", "must be at least 1ms".to_owned());
        }
        if !self.early_refresh_beta.is_finite() || self.early_refresh_beta < 0.0 {
            return invalid(
                "early_refresh_beta",
                format!("({}) must be a finite number >= 0", self.early_refresh_beta),
            );
        }
        if self.max_value_bytes >= max_request_bytes {
            return invalid(
                "max_value_bytes",
                format!(
                    "({}) must be below server.max_request_bytes ({max_request_bytes})",
                    self.max_value_bytes
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_accept_any_namespace_for_five_minutes() {
        let mut config = Config::default();
        // Authentication is on by default and needs tokens: that is the one
        // thing the defaults cannot decide.
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("`auth`"), "{err}");
        assert!(err.to_string().contains("auth.enabled = false"), "{err}");
        config.auth.enabled = false;
        config.validate().unwrap();
        assert!(config.default_namespace.enabled);
        assert_eq!(
            config.default_namespace.settings.default_ttl,
            Duration::from_secs(300)
        );
        assert_eq!(config.store, StoreKind::Redis);
        assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn toml_declares_namespaces_and_can_turn_the_template_off() {
        let config = Config::from_toml(
            r#"
            store = "memory"
            [default_namespace]
            enabled = false
            [namespaces.orders]
            default_ttl = "90s"
            max_value_bytes = 2048
            [redis]
            max_connections = 20
            response_timeout = "250ms"
            [auth]
            enabled = false
            "#,
        )
        .unwrap();
        assert!(!config.default_namespace.enabled);
        assert_eq!(config.store, StoreKind::Memory);
        let orders = &config.namespaces["orders"];
        assert_eq!(orders.default_ttl, Duration::from_secs(90));
        assert_eq!(orders.max_value_bytes, 2048);
        assert_eq!(config.redis.max_connections, 20);
        assert_eq!(config.redis.response_timeout, Duration::from_millis(250));
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::from_toml("[redis]\nmax_conections = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = Config::from_toml("[namespaces.orders]\ndefault_ttl = \"0s\"\n").unwrap_err();
        assert!(
            err.to_string().contains("namespaces.orders.default_ttl"),
            "{err}"
        );
        let err = Config::from_toml("[namespaces.\"bad name\"]\n").unwrap_err();
        assert!(err.to_string().contains("namespaces.bad name"), "{err}");
        let err = Config::from_toml("[redis]\nurl = \"http://nope\"\n").unwrap_err();
        assert!(err.to_string().contains("redis.url"), "{err}");
        let err = Config::from_toml("[redis]\nmax_connections = 0\n").unwrap_err();
        assert!(err.to_string().contains("redis.max_connections"), "{err}");
    }

    #[test]
    fn flags_win_over_file_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cachegw.toml");
        std::fs::write(
            &file,
            "store = \"redis\"\n[server]\nlisten = \"127.0.0.1:7000\"\n[auth]\nenabled = false\n",
        )
        .unwrap();
        let from_file = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(from_file.server.listen.port(), 7000);

        let overrides = Overrides {
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            redis_url: Some("redis://127.0.0.1:6390".to_owned()),
            redis_cluster: false,
            store: Some(StoreKind::Memory),
            admin_listen: None,
            metrics_listen: None,
            no_auth: false,
        };
        let merged = Config::load(Some(&file), &overrides).unwrap();
        assert_eq!(merged.server.listen.port(), 7001);
        assert_eq!(merged.redis.url, "redis://127.0.0.1:6390");
        assert_eq!(merged.store, StoreKind::Memory);
    }

    #[test]
    fn tls_client_auth_is_required_once_a_client_ca_is_given() {
        let mut tls = TlsConfig::default();
        assert!(!tls.enabled());
        assert_eq!(tls.client_auth(), None);
        tls.cert_file = Some("server.pem".into());
        tls.client_ca_file = Some("clients.pem".into());
        assert!(tls.enabled());
        assert_eq!(tls.client_auth(), Some(ClientAuth::Required));
        tls.client_auth = Some(ClientAuth::Optional);
        assert_eq!(tls.client_auth(), Some(ClientAuth::Optional));

        let err = Config::from_toml("[tls]\nclient_auth = \"sometimes\"\n").unwrap_err();
        assert!(err.to_string().contains("client_auth"), "{err}");
    }

    #[test]
    fn tls_paths_are_relative_to_the_config_file() {
        let mut config = Config::default();
        config.tls.cert_file = Some("tls/server.pem".into());
        config.tls.key_file = Some("/etc/cachegw/server.key".into());
        config.redis.tls_ca_file = Some("redis-ca.pem".into());
        config.resolve_paths(Path::new("/srv/cachegw"));
        assert_eq!(
            config.tls.cert_file.as_deref(),
            Some(Path::new("/srv/cachegw/tls/server.pem"))
        );
        assert_eq!(
            config.tls.key_file.as_deref(),
            Some(Path::new("/etc/cachegw/server.key"))
        );
        assert_eq!(
            config.redis.tls_ca_file.as_deref(),
            Some(Path::new("/srv/cachegw/redis-ca.pem"))
        );
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_a_silent_default() {
        let err = Config::load(
            Some(Path::new("/nonexistent/cachegw.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cachegw.toml"),
            "{err}"
        );
    }

    #[test]
    fn auth_rejects_principals_without_tokens_and_grants_that_are_not_names() {
        let err = Config::from_toml("[auth.tenants.shop]\nnamespaces = { shop = [\"read\"] }\n")
            .unwrap_err();
        assert!(err.to_string().contains("auth.tenants.shop"), "{err}");
        assert!(err.to_string().contains("no tokens"), "{err}");

        let digest = "ab".repeat(32);
        let tenant = |grants: &str| {
            format!(
                "[auth.tenants.shop]\ntoken_sha256 = [\"{digest}\"]\nnamespaces = {{ {grants} }}\n"
            )
        };
        Config::from_toml(&tenant("shop = [\"read\"], \"shop-*\" = [\"write\"]")).unwrap();
        for bad in [
            "\"sh*op\" = [\"read\"]",
            "\"a:b\" = [\"read\"]",
            "shop = []",
        ] {
            let err = Config::from_toml(&tenant(bad)).unwrap_err();
            assert!(
                err.to_string().contains("auth.tenants.shop.namespaces"),
                "{bad}: {err}"
            );
        }
        let err = Config::from_toml(&tenant("shop = [\"delete\"]")).unwrap_err();
        assert!(err.to_string().contains("delete"), "{err}");

        let err =
            Config::from_toml("[auth.admins.ops]\ntoken_sha256 = [\"not-hex\"]\n").unwrap_err();
        assert!(
            err.to_string().contains("auth.admins.ops.token_sha256"),
            "{err}"
        );
    }

    #[test]
    fn near_cache_is_off_by_default_and_checked_when_configured() {
        assert!(!Config::default().near_cache.enabled);
        let config = Config::from_toml(
            r#"
            [near_cache]
            enabled = true
            max_bytes = 4096
            max_ttl = "2s"
            channel = "fleet-a:l1"
            [auth]
            enabled = false
            "#,
        )
        .unwrap();
        assert!(config.near_cache.enabled);
        assert_eq!(config.near_cache.max_ttl, Duration::from_secs(2));
        assert_eq!(config.near_cache.channel, "fleet-a:l1");
        config.validate().unwrap();
        let mut bad = config.clone();
        bad.near_cache.max_ttl = Duration::ZERO;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("near_cache.max_ttl"), "{err}");
        let mut bad = config;
        bad.near_cache.channel.clear();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("near_cache.channel"), "{err}");
    }
}
