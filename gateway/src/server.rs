//! Assembling and running the gateway: the store, the cache, the gRPC
//! services (data API, health, reflection), TLS on their listeners and
//! graceful shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    api::{
        AdminApi, CacheApi,
        proto::{self, v1::policy_admin_server},
    },
    auth::{AuthSetupError, Authenticator},
    cache::{Cache, CacheMetrics, Namespaces, NearCache, near_bus},
    config::{Config, StoreKind},
    policy::{DecisionLimits, PolicyMetrics, PolicyRegistry},
    store::{GuardMetrics, GuardedStore, MemoryStore, RedisStore, Store, StoreError},
};

/// The fully qualified name of the data service, as health checks know it.
pub const CACHE_SERVICE: &str = "cachegw.v1.Cache";

/// Why the gateway could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The store could not be set up (a bad URL; an unreachable Redis is not
    /// an error: the gateway starts degraded).
    #[error("cannot set up the {store} store: {source}")]
    Store {
        /// Which store.
        store: StoreKind,
        /// Why.
        source: StoreError,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A namespace's policy could not be set up.
    #[error(transparent)]
    Policy(#[from] crate::policy::BindingError),
    /// The API tokens could not be loaded.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// Reflection descriptors could not be loaded.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A `[tls]` file could not be read.
    #[error("cannot set up TLS on the gRPC listeners: {0}")]
    Tls(#[from] crate::tls::PemError),
    /// rustls refused the `[tls]` certificates.
    #[error("cannot set up TLS on the gRPC listeners: {}", error_chain(.0))]
    TlsRejected(tonic::transport::Error),
}

/// An error and its sources, for errors whose own message says little
/// (tonic's "transport error").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The near-cache `[near_cache]` asks for. Only in front of Redis: the
/// memory store is already in this process, and there is no fleet to keep
/// coherent.
fn near_cache(config: &Config, registry: &mut Registry) -> Option<Arc<NearCache>> {
    if !config.near_cache.enabled {
        return None;
    }
    if config.store != StoreKind::Redis {
        warn!(store = %config.store, "near_cache.enabled is ignored: the near-cache only fronts the Redis store");
        return None;
    }
    Some(Arc::new(NearCache::new(&config.near_cache, registry)))
}

/// The largest message the admin API decodes. A PutPolicy carries a whole
/// module, so a module over `policy.max_module_bytes` must still decode for
/// validation to refuse it with RESOURCE_EXHAUSTED naming that limit:
/// `server.max_request_bytes`, the cap every listener buffers at most, or,
/// when the module limit is configured above it, the module limit and room
/// for the rest of the message. Larger still is OUT_OF_RANGE from tonic,
/// before decoding.
fn admin_max_request_bytes(config: &Config) -> usize {
    const ENVELOPE_BYTES: usize = 64 * 1024;
    config.server.max_request_bytes.max(
        config
            .policy
            .max_module_bytes
            .saturating_add(ENVELOPE_BYTES),
    )
}

/// A read-only view of the gateway's metrics, usable after `serve` has taken
/// the gateway.
#[derive(Clone)]
pub struct MetricsHandle(Arc<Registry>);

impl MetricsHandle {
    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.0);
        text
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// A gateway ready to serve.
pub struct Gateway {
    config: Config,
    cache: Arc<Cache>,
    policies: Arc<PolicyRegistry>,
    cache_metrics: CacheMetrics,
    metrics: MetricsHandle,
    auth: Arc<Authenticator>,
    /// TLS for both gRPC listeners; `None` serves plaintext.
    tls: Option<ServerTlsConfig>,
    /// The near-cache, when `[near_cache]` turns it on (its bus starts with
    /// `serve`).
    near: Option<Arc<NearCache>>,
}

impl Gateway {
    /// Builds the store, cache and metrics from `config`. Does not connect:
    /// Redis may be down; requests are answered degraded until it is up.
    pub fn new(config: Config) -> Result<Self, GatewayError> {
        let auth = Arc::new(Authenticator::from_config(&config.auth)?);
        let tls = crate::tls::server_config(&config.tls)?;
        if let Some(tls) = &tls {
            // Fails here, before anything is served, if rustls refuses the files.
            Server::builder()
                .tls_config(tls.clone())
                .map_err(GatewayError::TlsRejected)?;
        }
        let mut registry = Registry::default();
        let cache_metrics = CacheMetrics::register(&mut registry);
        let store: Arc<dyn Store> = match config.store {
            StoreKind::Redis => {
                let redis = RedisStore::new(&config.redis, config.limits.max_lease_ttl).map_err(
                    |source| GatewayError::Store {
                        store: StoreKind::Redis,
                        source,
                    },
                )?;
                if let Some(collector) = redis.pool_collector() {
                    registry.register_collector(Box::new(collector));
                }
                let guard_metrics = GuardMetrics::register(&mut registry);
                Arc::new(GuardedStore::new(
                    Arc::new(redis),
                    &config.breaker,
                    guard_metrics,
                ))
            }
            StoreKind::Memory => Arc::new(MemoryStore::new(
                config.memory.max_bytes,
                config.limits.max_lease_ttl,
            )),
        };
        let near = near_cache(&config, &mut registry);
        let namespaces = Namespaces::from_config(&config);
        let policies = Arc::new(PolicyRegistry::from_config(&config)?);
        let policy_metrics = PolicyMetrics::register(&mut registry);
        policies.count_into(policy_metrics.clone());
        let cache = Arc::new(
            Cache::new(
                &config,
                namespaces,
                Arc::clone(&policies),
                store,
                cache_metrics.clone(),
                policy_metrics,
            )
            .with_near_cache(near.clone()),
        );
        Ok(Gateway {
            config,
            cache,
            policies,
            cache_metrics,
            metrics: MetricsHandle(Arc::new(registry)),
            auth,
            tls,
            near,
        })
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> MetricsHandle {
        self.metrics.clone()
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The policy registry (versions and bindings).
    pub fn policies(&self) -> &Arc<PolicyRegistry> {
        &self.policies
    }

    /// A gRPC server builder, speaking TLS when `[tls]` says so. With a
    /// caller-supplied listener (`serve_with_incoming`) tonic still applies it:
    /// each accepted connection is handshaken in a task of its own, and one
    /// that fails the handshake (plaintext, no or a bad client certificate,
    /// `tls.handshake_timeout`) is dropped without disturbing the others.
    fn grpc_server(&self) -> Result<Server, GatewayError> {
        match &self.tls {
            Some(tls) => Server::builder()
                .tls_config(tls.clone())
                .map_err(GatewayError::TlsRejected),
            None => Ok(Server::builder()),
        }
    }

    fn decision_limits(&self) -> DecisionLimits {
        DecisionLimits {
            max_key_bytes: self.config.limits.max_key_bytes,
            max_ttl: self.config.policy.max_ttl,
            max_items: self.config.policy.max_decision_items,
        }
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then reports
    /// NOT_SERVING, stops accepting and drains in-flight requests for up to
    /// `server.shutdown_grace`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        self.serve_with_admin(listener, None, shutdown).await
    }

    /// Like [`Gateway::serve`], and serves the `PolicyAdmin` API on
    /// `admin_listener` (its own port, so it can be firewalled apart).
    pub async fn serve_with_admin(
        self,
        listener: TcpListener,
        admin_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let local_addr = listener.local_addr().ok();
        if self.config.store == StoreKind::Redis
            && self.config.policy.sync_through_redis
            && let Err(err) = crate::policy::sync::start(
                Arc::clone(&self.policies),
                &self.config.redis,
                self.config.policy.sync_catch_up,
            )
            .await
        {
            warn!(cause = %err, "policy sync through Redis is off");
        }
        if let Some(near) = &self.near {
            match near_bus::client(&self.config.redis) {
                Ok(client) => near_bus::start(
                    Arc::clone(near),
                    client,
                    &self.config.near_cache,
                    &self.config.redis,
                ),
                Err(err) => {
                    warn!(cause = %err, "near cache stays bypassed: no Redis client for its invalidation bus")
                }
            }
        }
        if let Some(dir) = &self.config.policy.watch_dir {
            crate::policy::watch::start(
                Arc::clone(&self.policies),
                dir.clone(),
                self.config.policy.watch_interval,
            )
            .await;
        }
        let (stop_admin_tx, stop_admin_rx) = tokio::sync::watch::channel(false);
        let mut admin_server = self.grpc_server()?;
        let admin = admin_listener.map(|admin_listener| {
            let admin_addr = admin_listener.local_addr().ok();
            let service = policy_admin_server::PolicyAdminServer::new(AdminApi::new(
                Arc::clone(&self.policies),
                Arc::clone(&self.cache),
                self.decision_limits(),
                self.cache_metrics.recent(),
                (self.config.store == StoreKind::Redis).then(|| self.config.redis.clone()),
            ))
            .max_decoding_message_size(admin_max_request_bytes(&self.config));
            let service = InterceptedService::new(service, self.auth.admin_interceptor());
            let mut stop = stop_admin_rx.clone();
            let shown = admin_addr.map_or_else(|| "?".to_owned(), |addr| addr.to_string());
            info!(addr = %shown, tls = self.tls.is_some(), "policy admin API serving");
            tokio::spawn(
                admin_server
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(admin_listener).with_nodelay(Some(true)),
                        async move {
                            let _ = stop.wait_for(|stop| *stop).await;
                        },
                    ),
            )
        });
        let shutdown = async move {
            shutdown.await;
            let _ = stop_admin_tx.send(true);
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        health
            .set_service_status(CACHE_SERVICE, ServingStatus::Serving)
            .await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let max_request = self.config.server.max_request_bytes;
        let cache_service = proto::v1::cache_server::CacheServer::new(CacheApi::new(
            Arc::clone(&self.cache),
            self.cache_metrics.clone(),
        ))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_request);
        let cache_service = InterceptedService::new(cache_service, self.auth.data_interceptor());

        log_start(&self.config, local_addr, self.cache.store_name());
        log_auth(&self.auth);

        let grace = self.config.server.shutdown_grace;
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            info!("shutting down: reporting NOT_SERVING and draining in-flight requests");
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(CACHE_SERVICE, ServingStatus::NotServing)
                .await;
            let _ = draining_tx.send(());
        };
        // A caller-supplied listener bypasses the builder's TCP settings: without
        // TCP_NODELAY, Nagle's algorithm holds small responses back.
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let server = self
            .grpc_server()?
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(cache_service)
            .serve_with_incoming_shutdown(incoming, signal);

        tokio::select! {
            served = server => {
                served?;
                if let Some(admin) = admin {
                    let _ = admin.await;
                }
                info!("stopped");
            }
            () = grace_elapsed(draining_rx, grace) => {
                warn!(?grace, "in-flight requests still running after the shutdown grace; stopping anyway");
            }
        }
        Ok(())
    }
}

/// Completes `grace` after draining starts; never if it does not start.
async fn grace_elapsed(draining: tokio::sync::oneshot::Receiver<()>, grace: Duration) {
    if draining.await.is_ok() {
        tokio::time::sleep(grace).await;
    } else {
        std::future::pending::<()>().await;
    }
}

fn log_auth(auth: &Authenticator) {
    if auth.enabled() {
        info!(
            principals = auth.principals(),
            "authentication on: every call needs a bearer token"
        );
    } else {
        warn!(
            "AUTHENTICATION IS OFF (auth.enabled = false): anyone who can reach the listeners can \
             read, write and invalidate every namespace and use the admin API. For local \
             development only; see docs/SECURITY.md"
        );
    }
}

fn log_start(config: &Config, addr: Option<SocketAddr>, store: &str) {
    let addr = addr.map_or_else(|| "?".to_owned(), |addr| addr.to_string());
    match config.store {
        StoreKind::Redis => info!(
            %addr,
            store,
            redis = %redact(&config.redis.url),
            max_connections = config.redis.max_connections,
            "cachegw serving"
        ),
        StoreKind::Memory => info!(
            %addr,
            store,
            max_bytes = config.memory.max_bytes,
            "cachegw serving (in-process store: entries are lost on restart and not shared between gateways)"
        ),
    }
    log_tls(config);
    if config.default_namespace.enabled {
        info!(
            declared = config.namespaces.len(),
            "undeclared namespaces are accepted with the default_namespace settings"
        );
    }
}

fn log_tls(config: &Config) {
    let tls = &config.tls;
    match (&tls.cert_file, tls.client_auth()) {
        (None, _) => info!("gRPC listeners (data and admin) speak plaintext: no tls.cert_file"),
        (Some(cert), None) => info!(
            cert = %cert.display(),
            "TLS on the gRPC listeners (data and admin); client certificates are not verified"
        ),
        (Some(cert), Some(client_auth)) => info!(
            cert = %cert.display(),
            client_ca = %tls.client_ca_file.as_deref().unwrap_or(std::path::Path::new("?")).display(),
            %client_auth,
            "mutual TLS on the gRPC listeners (data and admin)"
        ),
    }
    if config.store == StoreKind::Redis && config.redis.url.starts_with("rediss://") {
        let roots = config.redis.tls_ca_file.as_deref().map_or_else(
            || "the system's roots".to_owned(),
            |ca| ca.display().to_string(),
        );
        info!(
            trusting = %roots,
            client_cert = config.redis.tls_client_cert_file.is_some(),
            "TLS to Redis (rediss://)"
        );
    }
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{Config, admin_max_request_bytes, redact};

    #[test]
    fn the_admin_api_decodes_a_module_over_its_limit() {
        let mut config = Config::default();
        assert_eq!(
            admin_max_request_bytes(&config),
            config.server.max_request_bytes,
            "the default module limit is well inside the request limit"
        );
        config.policy.max_module_bytes = 2 * config.server.max_request_bytes;
        assert!(admin_max_request_bytes(&config) > config.policy.max_module_bytes);
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
    }
}
