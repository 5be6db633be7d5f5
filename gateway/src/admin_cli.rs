//! `cachegw policy push|list|bind|rollback|eval --remote` and `cachegw stats
//! --remote`: thin wrappers over the `PolicyAdmin` API for operators at a
//! terminal (text) or in scripts (`--json`). A refused request exits non-zero
//! with the gateway's message. The admin token comes from `--token-file` or
//! `$CACHEGW_TOKEN`.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context;
use serde_json::json;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    api::proto::v1::{
        BindMode, BindPolicyRequest, EvalPolicyRequest, FallbackMode as PbFallback,
        ListPoliciesRequest, NamespaceStats, OpStats, PolicyMemoStats, PutPolicyRequest,
        RedisMemory, RollbackRequest, StatsRequest, StatsResponse,
        policy_admin_client::PolicyAdminClient,
    },
    auth::BearerToken,
    config::FallbackMode,
    out, outln,
    policy::tool::{DecisionView, Probe, parse_config},
};

/// A gateway's admin API and the admin token to present there.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `host:port`, or a URL (`http://host:port`).
    pub address: String,
    /// Sent as `authorization: Bearer <token>`; `None` for a gateway with
    /// authentication off.
    pub token: Option<String>,
    /// TLS to the admin API: the CA to trust, and a client certificate and
    /// key for mutual TLS. `None`: plaintext (unless the address says https).
    pub tls: Option<ClientTlsConfig>,
}

/// Where the CLI's TLS material lives (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM CA certificate(s) to trust for the gateway's certificate.
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a listener that requires one.
    pub cert: Option<std::path::PathBuf>,
    /// PEM key of the client certificate.
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The client TLS config these files make; `None` when none is given.
    pub fn client_config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let read = |flag: &str, file: &Path| {
            std::fs::read(file).with_context(|| format!("cannot read {flag} `{}`", file.display()))
        };
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("--tls-cert", cert)?,
                    read("--tls-key", key)?,
                ));
            }
            (None, None) => {}
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        Ok(Some(tls))
    }
}

impl Remote {
    /// `address` with the token from `token_file`, else from `$CACHEGW_TOKEN`.
    pub fn new(address: &str, token_file: Option<&Path>, tls: &TlsFiles) -> anyhow::Result<Self> {
        let token = crate::auth::client_token(token_file)?;
        Ok(Self {
            address: address.to_owned(),
            token,
            tls: tls.client_config()?,
        })
    }
}

type AdminClient = PolicyAdminClient<InterceptedService<Channel, BearerToken>>;

impl Remote {
    /// A channel to the address (https with TLS), and the token to send on
    /// it. `what` names the API in errors ("the admin API", "the gateway");
    /// `timeout` bounds connecting and every call (`None`: tonic's defaults).
    pub async fn connect(
        &self,
        what: &str,
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<(Channel, BearerToken)> {
        let address = &self.address;
        let uri = if address.contains("://") {
            address.to_owned()
        } else if self.tls.is_some() {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        };
        let bearer = BearerToken::new(self.token.as_deref())
            .context("the token has characters that cannot be sent as metadata")?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("bad --remote address `{address}`"))?;
        if let Some(timeout) = timeout {
            endpoint = endpoint.connect_timeout(timeout).timeout(timeout);
        }
        if let Some(tls) = &self.tls {
            crate::tls::install_crypto_provider();
            endpoint = endpoint
                .tls_config(tls.clone())
                .context("cannot use the --tls-* files")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {what} at {uri}"))?;
        Ok((channel, bearer))
    }
}

async fn connect(remote: &Remote) -> anyhow::Result<AdminClient> {
    let (channel, bearer) = remote.connect("the admin API", None).await?;
    Ok(PolicyAdminClient::with_interceptor(channel, bearer)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20))
}

fn status(err: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", err.code(), err.message())
}

fn config_json(config: Option<&str>) -> anyhow::Result<String> {
    Ok(parse_config(config)?
        .map(|value| value.to_string())
        .unwrap_or_default())
}

fn fallback(mode: FallbackMode) -> i32 {
    let mode = match mode {
        FallbackMode::FailOpen => PbFallback::FailOpen,
        FallbackMode::FailClosed => PbFallback::FailClosed,
    };
    mode as i32
}

/// Uploads `file` as `name`, optionally binding it.
pub async fn push(
    remote: &Remote,
    file: &Path,
    name: &str,
    bind: Option<(String, Option<String>, FallbackMode)>,
    as_json: bool,
) -> anyhow::Result<()> {
    let module = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut admin = connect(remote).await?;
    let pushed = admin
        .put_policy(PutPolicyRequest {
            name: name.to_owned(),
            module: module.into(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut previous = None;
    if let Some((namespace, config, mode)) = &bind {
        let bound = admin
            .bind_policy(BindPolicyRequest {
                namespace: namespace.clone(),
                version: pushed.version.clone(),
                config_json: config_json(config.as_deref())?,
                fallback: fallback(*mode),
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        previous = Some(bound.previous_version);
    }
    if as_json {
        outln!(
            "{}",
            json!({"version": pushed.version, "label": pushed.label,
                   "bound": bind.as_ref().map(|(ns, _, _)| ns), "previous_version": previous})
        )?;
    } else {
        outln!("accepted {}", pushed.label)?;
        if let Some((namespace, _, _)) = &bind {
            match previous.as_deref() {
                Some("") | None => outln!("bound to namespace {namespace}")?,
                Some(previous) => outln!("bound to namespace {namespace} (was {previous})")?,
            }
        }
    }
    Ok(())
}

/// Prints versions and bindings.
pub async fn list(remote: &Remote, as_json: bool) -> anyhow::Result<()> {
    let listed = connect(remote)
        .await?
        .list_policies(ListPoliciesRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if as_json {
        let versions: Vec<_> = listed
            .versions
            .iter()
            .map(|v| {
                let invalid_reason = (!v.invalid_reason.is_empty()).then_some(&v.invalid_reason);
                json!({"name": v.name, "version": v.version, "size_bytes": v.size_bytes,
                            "loaded_at_unix_ms": v.loaded_at_unix_ms, "source": v.source,
                            "usable": invalid_reason.is_none(), "invalid_reason": invalid_reason})
            })
            .collect();
        let bindings: Vec<_> = listed
            .bindings
            .iter()
            .map(|b| json!({"namespace": b.namespace, "policy": b.policy, "version": b.version,
                            "fallback": PbFallback::try_from(b.fallback).map(|f| f.as_str_name()).unwrap_or("?"),
                            "config_json": b.config_json, "previous_versions": b.previous_versions}))
            .collect();
        outln!("{}", json!({"versions": versions, "bindings": bindings}))?;
        return Ok(());
    }
    outln!("VERSIONS")?;
    for v in &listed.versions {
        outln!(
            "  {}@{}  {} bytes  from {}",
            v.name,
            v.version,
            v.size_bytes,
            v.source
        )?;
        if !v.invalid_reason.is_empty() {
            outln!("    INVALID, cannot be bound: {}", v.invalid_reason)?;
        }
    }
    outln!("BINDINGS")?;
    for b in &listed.bindings {
        let namespace = if b.namespace.is_empty() {
            "(default namespace)"
        } else {
            &b.namespace
        };
        let mode = match PbFallback::try_from(b.fallback) {
            Ok(PbFallback::FailClosed) => "fail-closed",
            _ => "fail-open",
        };
        outln!("  {namespace} -> {}  {mode}", b.policy)?;
        if !b.previous_versions.is_empty() {
            outln!("    rollback to: {}", b.previous_versions.join(", "))?;
        }
    }
    Ok(())
}

/// How `cachegw policy bind` installs a version.
#[derive(Debug, Clone, Copy)]
pub enum BindAs {
    /// Replace the active binding.
    Active,
    /// A canary taking this percentage of keys (0 removes it).
    Canary(f64),
    /// A shadow sampling this percentage of requests (0 removes it).
    Shadow(f64),
}

/// Binds `version` to `namespace`.
pub async fn bind(
    remote: &Remote,
    namespace: &str,
    version: &str,
    config: Option<&str>,
    mode: FallbackMode,
    bind_as: BindAs,
    as_json: bool,
) -> anyhow::Result<()> {
    let (bind_mode, percent) = match bind_as {
        BindAs::Active => (BindMode::Active, 0.0),
        BindAs::Canary(percent) => (BindMode::Canary, percent),
        BindAs::Shadow(percent) => (BindMode::Shadow, percent),
    };
    let bound = connect(remote)
        .await?
        .bind_policy(BindPolicyRequest {
            namespace: namespace.to_owned(),
            version: version.to_owned(),
            config_json: config_json(config)?,
            fallback: fallback(mode),
            mode: bind_mode as i32,
            percent,
        })
        .await
        .map_err(status)?
        .into_inner();
    if as_json {
        outln!(
            "{}",
            json!({"namespace": namespace, "version": version, "previous_version": bound.previous_version})
        )?;
    } else if bound.previous_version.is_empty() {
        outln!("{namespace} -> {version}")?;
    } else {
        outln!("{namespace} -> {version} (was {})", bound.previous_version)?;
    }
    Ok(())
}

/// Rolls `namespace` back.
pub async fn rollback(remote: &Remote, namespace: &str, as_json: bool) -> anyhow::Result<()> {
    let back = connect(remote)
        .await?
        .rollback(RollbackRequest {
            namespace: namespace.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if as_json {
        outln!(
            "{}",
            json!({"namespace": namespace, "version": back.version})
        )?;
    } else {
        outln!("{namespace} rolled back to {}", back.version)?;
    }
    Ok(())
}

/// Dry-runs a loaded version; prints the decision as JSON. `Ok(false)` on a fault.
pub async fn eval(
    remote: &Remote,
    version: &str,
    probe: Probe,
    config: Option<&str>,
) -> anyhow::Result<bool> {
    let answer = connect(remote)
        .await?
        .eval_policy(EvalPolicyRequest {
            version: version.to_owned(),
            op: probe.op as i32,
            namespace: probe.namespace.clone(),
            key: probe.key.clone(),
            attributes: probe.attributes.clone(),
            value_size: probe.value_size,
            config_json: config_json(config)?,
        })
        .await
        .map_err(status)?
        .into_inner();
    let fault = (!answer.fault_kind.is_empty())
        .then(|| json!({"kind": answer.fault_kind, "message": answer.fault_message}));
    let report = json!({
        "version": version,
        "namespace": probe.namespace,
        "key": probe.key,
        "decision": answer.decision.as_ref().map(DecisionView::from),
        "fault": fault,
        "micros": answer.micros,
    });
    outln!("{}", serde_json::to_string_pretty(&report)?)?;
    Ok(answer.fault_kind.is_empty())
}

/// Prints the gateway's last-minute statistics per namespace and operation,
/// and Redis's memory facts and warnings.
pub async fn stats(remote: &Remote, as_json: bool) -> anyhow::Result<()> {
    let stats = connect(remote)
        .await?
        .stats(StatsRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&stats_json(&stats))?)?;
    } else {
        out!("{}", stats_text(&stats))?;
    }
    Ok(())
}

/// A hit rate as the API sends it (negative: none) as a JSON number or null.
fn hit_rate_json(rate: f64) -> serde_json::Value {
    if rate < 0.0 { json!(null) } else { json!(rate) }
}

fn stats_json(stats: &StatsResponse) -> serde_json::Value {
    let namespaces: Vec<_> = stats
        .namespaces
        .iter()
        .map(|namespace| {
            let ops: Vec<_> = namespace
                .ops
                .iter()
                .map(|op| {
                    let outcomes: BTreeMap<_, _> = op.outcomes.iter().collect();
                    json!({"op": op.op, "requests": op.requests, "outcomes": outcomes,
                           "p50_ms": op.p50_ms, "p99_ms": op.p99_ms})
                })
                .collect();
            json!({"namespace": namespace.namespace, "hit_rate": hit_rate_json(namespace.hit_rate),
                   "ops": ops})
        })
        .collect();
    let redis = stats.redis.as_ref().map(|redis| {
        json!({"used_memory": redis.used_memory, "used_memory_human": redis.used_memory_human,
               "maxmemory": redis.maxmemory, "maxmemory_policy": redis.maxmemory_policy,
               "evicted_keys": redis.evicted_keys, "keys": redis.keys,
               "keys_with_ttl": redis.keys_with_ttl, "nodes": redis.nodes})
    });
    let redis_error = (!stats.redis_error.is_empty()).then_some(&stats.redis_error);
    let memos: Vec<_> = stats
        .policy_memos
        .iter()
        .map(|memo| {
            json!({"namespace": memo.namespace, "role": memo.role, "policy": memo.policy,
                   "hits": memo.hits, "misses": memo.misses, "evictions": memo.evictions,
                   "bytes": memo.bytes, "hit_rate": hit_rate_json(memo.hit_rate)})
        })
        .collect();
    json!({"store": stats.store, "window_seconds": stats.window_seconds,
           "namespaces": namespaces, "policy_memos": memos, "redis": redis,
           "redis_error": redis_error, "warnings": stats.warnings})
}

/// The readable report: a table of the window's requests, then the Redis
/// facts and warnings.
fn stats_text(stats: &StatsResponse) -> String {
    let mut text = format!(
        "store: {}   window: the last {} s\n\n",
        stats.store, stats.window_seconds
    );
    if stats.namespaces.is_empty() {
        text.push_str("no requests in the window\n");
    } else {
        text.push_str(&requests_table(&stats.namespaces));
    }
    if !stats.policy_memos.is_empty() {
        text.push_str(&memo_text(&stats.policy_memos));
    }
    if let Some(redis) = &stats.redis {
        text.push_str(&redis_text(redis));
    } else if !stats.redis_error.is_empty() {
        text.push_str(&format!("\nREDIS\n  unavailable: {}\n", stats.redis_error));
    }
    if !stats.warnings.is_empty() {
        text.push_str("\nWARNINGS\n");
        for warning in &stats.warnings {
            text.push_str(&format!("  ! {warning}\n"));
        }
    }
    text
}

/// The decision memo of each binding, since the gateway started.
fn memo_text(memos: &[PolicyMemoStats]) -> String {
    let mut text = String::from("\nDECISION MEMO (since start)\n");
    for memo in memos {
        let rate = if memo.hit_rate < 0.0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", memo.hit_rate * 100.0)
        };
        text.push_str(&format!(
            "  {} ({} {}): hit rate {rate}, {} hits, {} calls, {} evicted, {} KiB\n",
            memo.namespace,
            memo.role,
            memo.policy,
            memo.hits,
            memo.misses,
            memo.evictions,
            memo.bytes.div_ceil(1024)
        ));
    }
    text
}

fn requests_table(namespaces: &[NamespaceStats]) -> String {
    let header = [
        "NAMESPACE",
        "OP",
        "REQUESTS",
        "HIT RATE",
        "P50",
        "P99",
        "OUTCOMES",
    ];
    let mut rows = vec![header.map(str::to_owned)];
    for namespace in namespaces {
        for op in &namespace.ops {
            rows.push(op_row(namespace, op));
        }
    }
    let columns = header.len();
    let widths: Vec<usize> = (0..columns)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if column + 1 == columns {
                    cell.clone()
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        table.push_str(cells.join("  ").trim_end());
        table.push('\n');
    }
    table
}

fn op_row(namespace: &NamespaceStats, op: &OpStats) -> [String; 7] {
    let hit_rate = if op.op == "get" && namespace.hit_rate >= 0.0 {
        format!("{:.1}%", namespace.hit_rate * 100.0)
    } else {
        "-".to_owned()
    };
    let outcomes: BTreeMap<_, _> = op.outcomes.iter().collect();
    let outcomes: Vec<String> = outcomes
        .into_iter()
        .map(|(outcome, count)| format!("{outcome}={count}"))
        .collect();
    [
        namespace.namespace.clone(),
        op.op.clone(),
        op.requests.to_string(),
        hit_rate,
        format!("{:.2}ms", op.p50_ms),
        format!("{:.2}ms", op.p99_ms),
        outcomes.join(" "),
    ]
}

fn redis_text(redis: &RedisMemory) -> String {
    let maxmemory = if redis.maxmemory == 0 {
        "0 (unset: no limit)".to_owned()
    } else {
        format!(
            "{} ({} bytes)",
            human_bytes(redis.maxmemory),
            redis.maxmemory
        )
    };
    // A cluster's figures are its primaries' totals.
    let heading = if redis.nodes > 1 {
        format!("REDIS MEMORY (the total of {} primaries)", redis.nodes)
    } else {
        "REDIS MEMORY".to_owned()
    };
    format!(
        "\n{heading}\n  used memory:       {} ({} bytes)\n  maxmemory:         {maxmemory}\n  \
         maxmemory-policy:  {}\n  evicted keys:      {} (since Redis started)\n  \
         keys:              {} ({} with a TTL)\n",
        redis.used_memory_human,
        redis.used_memory,
        redis.maxmemory_policy,
        redis.evicted_keys,
        redis.keys,
        redis.keys_with_ttl,
    )
}

/// `bytes` in the largest binary unit that keeps it at least 1 (`64.0 MiB`).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatsResponse {
        StatsResponse {
            store: "redis".into(),
            window_seconds: 60,
            namespaces: vec![NamespaceStats {
                namespace: "users".into(),
                ops: vec![
                    OpStats {
                        op: "get".into(),
                        requests: 3,
                        outcomes: [("hit".to_owned(), 2), ("miss".to_owned(), 1)].into(),
                        p50_ms: 0.5,
                        p99_ms: 1.25,
                    },
                    OpStats {
                        op: "set".into(),
                        requests: 3,
                        outcomes: [("done".to_owned(), 3)].into(),
                        p50_ms: 0.75,
                        p99_ms: 2.0,
                    },
                ],
                hit_rate: 2.0 / 3.0,
            }],
            redis: Some(RedisMemory {
                used_memory: 1000,
                used_memory_human: "1000B".into(),
                maxmemory_policy: "noeviction".into(),
                ..Default::default()
            }),
            redis_error: String::new(),
            warnings: vec!["maxmemory-policy is noeviction: fix it.".into()],
            policy_memos: vec![PolicyMemoStats {
                namespace: "users".into(),
                role: "active".into(),
                policy: "user-profile@abc".into(),
                hits: 3,
                misses: 1,
                evictions: 0,
                bytes: 2048,
                hit_rate: 0.75,
            }],
        }
    }

    #[test]
    fn the_text_report_has_a_row_per_operation_and_the_redis_facts() {
        let text = stats_text(&sample());
        assert!(text.contains("store: redis"), "{text}");
        let get = text
            .lines()
            .find(|line| line.starts_with("users      get"))
            .unwrap();
        assert!(
            get.contains("66.7%") && get.contains("hit=2 miss=1"),
            "{text}"
        );
        let set = text
            .lines()
            .find(|line| line.starts_with("users      set"))
            .unwrap();
        assert!(set.contains(" - ") && set.contains("done=3"), "{text}");
        assert!(
            text.contains("maxmemory:         0 (unset: no limit)"),
            "{text}"
        );
        assert!(text.contains("! maxmemory-policy is noeviction"), "{text}");
        assert!(
            text.contains("users (active user-profile@abc): hit rate 75.0%, 3 hits, 1 calls"),
            "{text}"
        );
    }

    #[test]
    fn byte_counts_read_in_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn the_json_report_has_null_for_no_hit_rate() {
        let mut stats = sample();
        stats.namespaces[0].hit_rate = -1.0;
        let report = stats_json(&stats);
        assert!(report["namespaces"][0]["hit_rate"].is_null());
        assert_eq!(report["namespaces"][0]["ops"][0]["outcomes"]["hit"], 2);
        assert_eq!(report["redis"]["maxmemory_policy"], "noeviction");
        assert!(report["redis_error"].is_null());
    }
}
