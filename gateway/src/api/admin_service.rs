//! `cachegw.v1.PolicyAdmin`: uploading, listing, binding, rolling back and
//! dry-running policies, and the gateway's recent statistics (Stats). Every
//! change is validated before it takes effect and logged (which admin, from
//! where, what, when) as an audit trail. Only admin tokens reach it (the
//! listener's interceptor, `auth::Authenticator::admin_interceptor`).

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::info;

use super::{
    proto::{
        policy as pb_policy,
        v1::{
            AutoRollback, BindMode, BindPolicyRequest, BindPolicyResponse, BindingInfo,
            EvalPolicyRequest, EvalPolicyResponse, FallbackMode as PbFallback, ListPoliciesRequest,
            ListPoliciesResponse, NamespaceStats, OpStats as PbOpStats, PolicyMemoStats,
            PolicyVersionInfo, PutPolicyRequest, PutPolicyResponse, RedisMemory, RollbackRequest,
            RollbackResponse, ShadowDifference, ShadowReportRequest, ShadowReportResponse,
            StatsRequest, StatsResponse, policy_admin_server,
        },
    },
    redis_info::{self, RedisFacts},
};
use crate::{
    cache::{Cache, NamespaceSettings, RequestError, validate_namespace_name},
    config::{FallbackMode, RedisConfig},
    policy::{Decision, DecisionLimits, PolicyRegistry, RegistryError, registry::CandidateKind},
    stats::{self, OpStats, RecentStats},
};

/// The admin API over a [`PolicyRegistry`].
pub struct AdminApi {
    registry: Arc<PolicyRegistry>,
    cache: Arc<Cache>,
    limits: DecisionLimits,
    recent: Arc<RecentStats>,
    redis: Option<RedisConfig>,
}

impl AdminApi {
    /// Serves `registry`; `cache` answers which namespaces exist. Stats
    /// reports `recent` and, when the store is Redis (`redis` is its
    /// config; `None` for the memory store), Redis's memory facts.
    pub fn new(
        registry: Arc<PolicyRegistry>,
        cache: Arc<Cache>,
        limits: DecisionLimits,
        recent: Arc<RecentStats>,
        redis: Option<RedisConfig>,
    ) -> Self {
        Self {
            registry,
            cache,
            limits,
            recent,
            redis,
        }
    }

    fn check_namespace(&self, namespace: &str) -> Result<(), Status> {
        self.cache
            .namespaces()
            .resolve(namespace)
            .map_err(Status::from)?;
        Ok(())
    }
}

/// Who made an admin call, for the audit log (`-` with authentication off).
fn admin_name<T>(request: &Request<T>) -> Arc<str> {
    crate::auth::caller(request).map_or_else(|_| Arc::from("?"), |caller| caller.name().clone())
}

impl From<RegistryError> for Status {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Rejected(_) => Status::invalid_argument(err.to_string()),
            RegistryError::TooLarge(_) => Status::resource_exhausted(err.to_string()),
            RegistryError::UnknownVersion(_) => Status::not_found(err.to_string()),
            RegistryError::NoPrevious(_) | RegistryError::NoActive(_) => {
                Status::failed_precondition(err.to_string())
            }
        }
    }
}

fn config_bytes(config_json: &str) -> Result<Bytes, Status> {
    if config_json.trim().is_empty() {
        return Ok(Bytes::new());
    }
    serde_json::from_str::<serde_json::Value>(config_json).map_err(|err| {
        Status::from(RequestError::invalid(
            "config_json",
            format!("is not JSON: {err}"),
        ))
    })?;
    Ok(Bytes::copy_from_slice(config_json.as_bytes()))
}

/// Groups the window's per-operation statistics by namespace (the snapshot
/// is sorted by namespace, then operation).
impl AdminApi {
    /// The memo counters of every binding that has used its memo.
    fn memo_stats(&self) -> Vec<PolicyMemoStats> {
        let mut memos = Vec::new();
        for info in self.registry.bindings() {
            let candidates = self.registry.candidates(&info.namespace);
            let canary = candidates.as_ref().and_then(|c| c.canary.as_ref());
            let shadow = candidates.as_ref().and_then(|c| c.shadow.as_ref());
            let roles = [
                ("active", Some(&info.binding)),
                ("canary", canary.map(|canary| &canary.binding)),
                ("shadow", shadow.map(|shadow| &shadow.binding)),
            ];
            for (role, binding) in roles {
                let Some(binding) = binding else { continue };
                let Some(stats) = binding.memo_stats() else {
                    continue;
                };
                let (hits, misses) = (stats.hits.get(), stats.misses.get());
                memos.push(PolicyMemoStats {
                    namespace: if info.namespace.is_empty() {
                        "_default".to_owned()
                    } else {
                        info.namespace.clone()
                    },
                    role: role.to_owned(),
                    policy: binding.module().label().to_string(),
                    hits,
                    misses,
                    evictions: stats.evictions.get(),
                    bytes: u64::try_from(stats.bytes.get()).unwrap_or(0),
                    hit_rate: if hits + misses == 0 {
                        -1.0
                    } else {
                        hits as f64 / (hits + misses) as f64
                    },
                });
            }
        }
        memos
    }
}

fn namespace_stats(snapshot: Vec<OpStats>) -> Vec<NamespaceStats> {
    let mut namespaces: Vec<NamespaceStats> = Vec::new();
    for op in snapshot {
        let same = namespaces
            .last()
            .is_some_and(|last| *last.namespace == *op.namespace);
        if !same {
            namespaces.push(NamespaceStats {
                namespace: op.namespace.to_string(),
                ops: Vec::new(),
                hit_rate: -1.0,
            });
        }
        if let Some(namespace) = namespaces.last_mut() {
            if op.op == "get" {
                namespace.hit_rate = op.hit_rate().unwrap_or(-1.0);
            }
            namespace.ops.push(op_stats(&op));
        }
    }
    namespaces
}

fn op_stats(op: &OpStats) -> PbOpStats {
    let millis = |latency: std::time::Duration| latency.as_secs_f64() * 1000.0;
    PbOpStats {
        op: op.op.to_owned(),
        requests: op.total(),
        outcomes: op
            .outcomes
            .iter()
            .map(|(outcome, count)| ((*outcome).to_owned(), *count))
            .collect(),
        p50_ms: millis(op.p50),
        p99_ms: millis(op.p99),
    }
}

impl From<RedisFacts> for RedisMemory {
    fn from(facts: RedisFacts) -> Self {
        Self {
            used_memory: facts.used_memory,
            used_memory_human: facts.used_memory_human,
            maxmemory: facts.maxmemory,
            maxmemory_policy: facts.maxmemory_policy,
            evicted_keys: facts.evicted_keys,
            keys: facts.keys,
            keys_with_ttl: facts.keys_with_ttl,
            nodes: facts.nodes,
        }
    }
}

fn fallback_of(mode: i32) -> Result<FallbackMode, Status> {
    match PbFallback::try_from(mode) {
        Ok(PbFallback::FailClosed) => Ok(FallbackMode::FailClosed),
        Ok(PbFallback::FailOpen | PbFallback::Unspecified) => Ok(FallbackMode::FailOpen),
        Err(_) => Err(Status::from(RequestError::invalid(
            "fallback",
            format!("{mode} is not a fallback mode"),
        ))),
    }
}

#[tonic::async_trait]
impl policy_admin_server::PolicyAdmin for AdminApi {
    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PutPolicyResponse>, Status> {
        let peer = request.remote_addr();
        let admin = admin_name(&request);
        let request = request.into_inner();
        let name = if request.name.is_empty() {
            "policy"
        } else {
            &request.name
        };
        validate_namespace_name(name)
            .map_err(|reason| Status::from(RequestError::invalid("name", reason)))?;
        let registry = Arc::clone(&self.registry);
        let (name_owned, module) = (name.to_owned(), request.module);
        // Compiling takes milliseconds of CPU: keep it off the async workers.
        let accepted =
            tokio::task::spawn_blocking(move || registry.put(&name_owned, &module, "admin"))
                .await
                .map_err(|err| Status::internal(format!("validation task failed: {err}")))?;
        let module = accepted.inspect_err(|err| {
            info!(audit = "put_policy", ?peer, %admin, name, outcome = "rejected", reason = %err);
        })?;
        info!(audit = "put_policy", ?peer, %admin, policy = %module.label(), outcome = "accepted");
        Ok(Response::new(PutPolicyResponse {
            version: module.version().to_owned(),
            label: module.label().to_string(),
        }))
    }

    async fn list_policies(
        &self,
        _request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let versions = self
            .registry
            .versions()
            .into_iter()
            .map(|version| PolicyVersionInfo {
                name: version.module.name().to_owned(),
                version: version.module.version().to_owned(),
                size_bytes: version.module.size() as u64,
                loaded_at_unix_ms: version.loaded_at_ms,
                source: version.source.to_owned(),
                invalid_reason: version.invalid.unwrap_or_default(),
            })
            .collect();
        let bindings = self
            .registry
            .bindings()
            .into_iter()
            .map(|info| {
                let candidates = self.registry.candidates(&info.namespace);
                BindingInfo {
                    last_auto_rollback: self.registry.last_rollback(&info.namespace).map(|event| {
                        AutoRollback {
                            from: event.from,
                            at_unix_ms: event.at_ms,
                            reason: event.reason,
                        }
                    }),
                    namespace: info.namespace,
                    policy: info.binding.module().label().to_string(),
                    version: info.binding.module().version().to_owned(),
                    fallback: match info.binding.fallback() {
                        FallbackMode::FailOpen => PbFallback::FailOpen,
                        FallbackMode::FailClosed => PbFallback::FailClosed,
                    } as i32,
                    config_json: String::from_utf8_lossy(info.binding.config()).into_owned(),
                    canary_policy: candidates
                        .as_ref()
                        .and_then(|c| c.canary.as_ref())
                        .map(|c| c.binding.module().label().to_string())
                        .unwrap_or_default(),
                    canary_percent: candidates
                        .as_ref()
                        .and_then(|c| c.canary.as_ref())
                        .map_or(0.0, |c| f64::from(c.basis_points) / 100.0),
                    shadow_policy: candidates
                        .as_ref()
                        .and_then(|c| c.shadow.as_ref())
                        .map(|s| s.binding.module().label().to_string())
                        .unwrap_or_default(),
                    shadow_percent: candidates
                        .as_ref()
                        .and_then(|c| c.shadow.as_ref())
                        .map_or(0.0, |s| f64::from(s.basis_points) / 100.0),
                    previous_versions: info.previous,
                }
            })
            .collect();
        Ok(Response::new(ListPoliciesResponse { versions, bindings }))
    }

    async fn bind_policy(
        &self,
        request: Request<BindPolicyRequest>,
    ) -> Result<Response<BindPolicyResponse>, Status> {
        let peer = request.remote_addr();
        let admin = admin_name(&request);
        let request = request.into_inner();
        self.check_namespace(&request.namespace)?;
        let config = config_bytes(&request.config_json)?;
        let fallback = fallback_of(request.fallback)?;
        let registry = Arc::clone(&self.registry);
        let (namespace, version) = (request.namespace.clone(), request.version.clone());
        let candidate = match BindMode::try_from(request.mode) {
            Ok(BindMode::Active) => None,
            Ok(BindMode::Canary) => Some(CandidateKind::Canary),
            Ok(BindMode::Shadow) => Some(CandidateKind::Shadow),
            Err(_) => {
                return Err(RequestError::invalid(
                    "mode",
                    format!("{} is not a bind mode", request.mode),
                )
                .into());
            }
        };
        if let Some(kind) = candidate {
            if !(0.0..=100.0).contains(&request.percent) {
                return Err(RequestError::invalid(
                    "percent",
                    format!("{} is not between 0 and 100", request.percent),
                )
                .into());
            }
            let basis_points = (request.percent * 100.0).round() as u32;
            tokio::task::spawn_blocking(move || {
                registry.bind_candidate(&namespace, &version, config, fallback, kind, basis_points)
            })
            .await
            .map_err(|err| Status::internal(format!("bind task failed: {err}")))??;
            info!(audit = "bind_policy", ?peer, %admin, namespace = %request.namespace, version = %request.version, ?kind, percent = request.percent, outcome = "candidate updated");
            return Ok(Response::new(BindPolicyResponse::default()));
        }
        let previous = tokio::task::spawn_blocking(move || {
            registry.bind(&namespace, &version, config, fallback)
        })
        .await
        .map_err(|err| Status::internal(format!("bind task failed: {err}")))?
        .inspect_err(|err| {
            info!(audit = "bind_policy", ?peer, %admin, namespace = %request.namespace, version = %request.version, outcome = "rejected", reason = %err);
        })?;
        info!(
            audit = "bind_policy",
            ?peer, %admin,
            namespace = %request.namespace,
            version = %request.version,
            previous = previous.as_deref().unwrap_or(""),
            ?fallback,
            outcome = "bound"
        );
        Ok(Response::new(BindPolicyResponse {
            previous_version: previous.unwrap_or_default(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let peer = request.remote_addr();
        let admin = admin_name(&request);
        let namespace = request.into_inner().namespace;
        self.check_namespace(&namespace)?;
        let version = self.registry.rollback(&namespace)?;
        info!(audit = "rollback", ?peer, %admin, namespace, to = %version, outcome = "rolled back");
        Ok(Response::new(RollbackResponse { version }))
    }

    async fn eval_policy(
        &self,
        request: Request<EvalPolicyRequest>,
    ) -> Result<Response<EvalPolicyResponse>, Status> {
        let request = request.into_inner();
        let module = self.registry.version(&request.version)?;
        let input = pb_policy::PolicyInput {
            op: request.op,
            namespace: request.namespace,
            key: request.key,
            attributes: request.attributes,
            value_size: request.value_size,
            now_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
            config: config_bytes(&request.config_json)?,
        };
        let limits = self.limits.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome = module.decide_blocking(&input);
            let micros = started.elapsed().as_micros() as u64;
            let namespace = NamespaceSettings::new("eval", &Default::default());
            let (decision, fault) = match outcome {
                Ok(wire) => {
                    let valid =
                        Decision::from_wire(wire.clone(), &namespace, &limits, module.decided_by());
                    (Some(wire), valid.err())
                }
                Err(fault) => (None, Some(fault)),
            };
            EvalPolicyResponse {
                decision,
                fault_kind: fault
                    .as_ref()
                    .map(|f| f.kind().to_owned())
                    .unwrap_or_default(),
                fault_message: fault.map(|f| f.to_string()).unwrap_or_default(),
                micros,
            }
        })
        .await
        .map_err(|err| Status::internal(format!("eval task failed: {err}")))?;
        Ok(Response::new(answer))
    }

    async fn shadow_report(
        &self,
        request: Request<ShadowReportRequest>,
    ) -> Result<Response<ShadowReportResponse>, Status> {
        let namespace = request.into_inner().namespace;
        let shadow = self
            .registry
            .candidates(&namespace)
            .and_then(|candidates| candidates.shadow.clone())
            .ok_or_else(|| {
                Status::not_found(format!("namespace `{namespace}` has no shadow candidate"))
            })?;
        let (compared, differing, examples) = shadow.report();
        Ok(Response::new(ShadowReportResponse {
            candidate: shadow.binding.module().label().to_string(),
            compared,
            differing,
            examples: examples
                .into_iter()
                .map(|example| ShadowDifference {
                    key: example.key,
                    fields: example.fields.iter().map(|f| (*f).to_owned()).collect(),
                    active: example.active,
                    candidate: example.candidate,
                })
                .collect(),
        }))
    }

    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let mut response = StatsResponse {
            store: if self.redis.is_some() {
                "redis"
            } else {
                "memory"
            }
            .to_owned(),
            window_seconds: stats::WINDOW.as_secs(),
            namespaces: namespace_stats(self.recent.snapshot()),
            policy_memos: self.memo_stats(),
            ..Default::default()
        };
        if let Some(config) = &self.redis {
            match redis_info::read(config).await {
                Ok(read) => {
                    response.warnings = read.warnings;
                    response.redis = Some(read.facts.into());
                }
                Err(err) => response.redis_error = err.to_string(),
            }
        }
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;

    fn op(namespace: &str, op: &'static str, outcomes: &[(&'static str, u64)]) -> OpStats {
        OpStats {
            namespace: Arc::from(namespace),
            op,
            outcomes: outcomes.iter().copied().collect::<BTreeMap<_, _>>(),
            p50: Duration::from_micros(1500),
            p99: Duration::from_millis(12),
        }
    }

    #[test]
    fn groups_operations_by_namespace_with_the_gets_hit_rate() {
        let grouped = namespace_stats(vec![
            op("api", "get", &[("hit", 3), ("miss", 1), ("degraded", 5)]),
            op("api", "set", &[("done", 2)]),
            op("users", "set", &[("done", 1)]),
        ]);
        assert_eq!(grouped.len(), 2);
        let api = &grouped[0];
        assert_eq!(api.namespace, "api");
        assert_eq!(api.hit_rate, 0.75, "degraded Gets are left out");
        assert_eq!(api.ops.len(), 2);
        assert_eq!(api.ops[0].requests, 9);
        assert_eq!(api.ops[0].outcomes.get("degraded"), Some(&5));
        assert_eq!((api.ops[0].p50_ms, api.ops[0].p99_ms), (1.5, 12.0));
        assert_eq!(grouped[1].hit_rate, -1.0, "no reads: no hit rate");
    }
}
