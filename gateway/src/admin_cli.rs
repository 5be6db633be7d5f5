//! `cachegw policy push|list|bind|rollback|eval --remote`: thin wrappers over
//! the `PolicyAdmin` API for operators at a terminal (text) or in scripts
//! (`--json`). A refused request exits non-zero with the gateway's message.

use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::{
    api::proto::v1::{
        BindMode, BindPolicyRequest, EvalPolicyRequest, FallbackMode as PbFallback,
        ListPoliciesRequest, PutPolicyRequest, RollbackRequest,
        policy_admin_client::PolicyAdminClient,
    },
    config::FallbackMode,
    policy::tool::{DecisionView, Probe, parse_config},
};

async fn connect(address: &str) -> anyhow::Result<PolicyAdminClient<Channel>> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let channel = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("bad --remote address `{address}`"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {uri}"))?;
    Ok(PolicyAdminClient::new(channel)
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
    address: &str,
    file: &Path,
    name: &str,
    bind: Option<(String, Option<String>, FallbackMode)>,
    as_json: bool,
) -> anyhow::Result<()> {
    let module = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut admin = connect(address).await?;
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
        println!(
            "{}",
            json!({"version": pushed.version, "label": pushed.label,
                   "bound": bind.as_ref().map(|(ns, _, _)| ns), "previous_version": previous})
        );
    } else {
        println!("accepted {}", pushed.label);
        if let Some((namespace, _, _)) = &bind {
            match previous.as_deref() {
                Some("") | None => println!("bound to namespace {namespace}"),
                Some(previous) => println!("bound to namespace {namespace} (was {previous})"),
            }
        }
    }
    Ok(())
}

/// Prints versions and bindings.
pub async fn list(address: &str, as_json: bool) -> anyhow::Result<()> {
    let listed = connect(address)
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
                json!({"name": v.name, "version": v.version, "size_bytes": v.size_bytes,
                            "loaded_at_unix_ms": v.loaded_at_unix_ms, "source": v.source})
            })
            .collect();
        let bindings: Vec<_> = listed
            .bindings
            .iter()
            .map(|b| json!({"namespace": b.namespace, "policy": b.policy, "version": b.version,
                            "fallback": PbFallback::try_from(b.fallback).map(|f| f.as_str_name()).unwrap_or("?"),
                            "config_json": b.config_json, "previous_versions": b.previous_versions}))
            .collect();
        println!("{}", json!({"versions": versions, "bindings": bindings}));
        return Ok(());
    }
    println!("VERSIONS");
    for v in &listed.versions {
        println!(
            "  {}@{}  {} bytes  from {}",
            v.name, v.version, v.size_bytes, v.source
        );
    }
    println!("BINDINGS");
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
        println!("  {namespace} -> {}  {mode}", b.policy);
        if !b.previous_versions.is_empty() {
            println!("    rollback to: {}", b.previous_versions.join(", "));
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
    address: &str,
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
    let bound = connect(address)
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
        println!(
            "{}",
            json!({"namespace": namespace, "version": version, "previous_version": bound.previous_version})
        );
    } else if bound.previous_version.is_empty() {
        println!("{namespace} -> {version}");
    } else {
        println!("{namespace} -> {version} (was {})", bound.previous_version);
    }
    Ok(())
}

/// Rolls `namespace` back.
pub async fn rollback(address: &str, namespace: &str, as_json: bool) -> anyhow::Result<()> {
    let back = connect(address)
        .await?
        .rollback(RollbackRequest {
            namespace: namespace.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if as_json {
        println!(
            "{}",
            json!({"namespace": namespace, "version": back.version})
        );
    } else {
        println!("{namespace} rolled back to {}", back.version);
    }
    Ok(())
}

/// Dry-runs a loaded version; prints the decision as JSON. `Ok(false)` on a fault.
pub async fn eval(
    address: &str,
    version: &str,
    probe: Probe,
    config: Option<&str>,
) -> anyhow::Result<bool> {
    let answer = connect(address)
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
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(answer.fault_kind.is_empty())
}
