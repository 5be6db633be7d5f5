//! `cachegw get|set|del|invalidate --remote ADDR`: the data API for people at
//! a terminal and for scripts.
//!
//! Text output puts the value on stdout and what the gateway said about it
//! (outcome, TTL, policy) on stderr, so `cachegw get ns key > file` captures
//! the value alone; `--json` prints one object on stdout instead. The exit
//! code says what happened ([`Exit`]), so scripts need not parse anything.

use std::{collections::HashMap, time::Duration};

use anyhow::Context;
use serde_json::json;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    admin_cli::Remote,
    api::proto::v1::{
        DeleteRequest, GetRequest, InvalidateRequest, InvalidateResponse, JobState, KeyList,
        Outcome, SetRequest, TagList, cache_client::CacheClient, invalidate_request::Target,
    },
    auth::BearerToken,
    cli_output, outln,
};

/// What a data command's exit code means (2 is a usage error, from the
/// argument parser).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done: a value found, stored, deleted, invalidated.
    Done = 0,
    /// The gateway refused or failed the call (its status is printed), or
    /// could not be reached.
    Failed = 1,
    /// `get`: no value (MISS); `del`: nothing to delete.
    NotFound = 3,
    /// The gateway answered degraded (its store is unavailable), or the Set
    /// was not stored (the policy bypassed it, or its lease was voided).
    NotDone = 4,
}

/// A gRPC status from the gateway, shown as `CODE: message` with exit 1.
#[derive(Debug)]
pub struct Refused(pub tonic::Status);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.0.code()), self.0.message())
    }
}

impl std::error::Error for Refused {}

fn code_name(code: Code) -> String {
    // `Code`'s Debug is CamelCase (`PermissionDenied`); gRPC's own names are
    // the upper-case ones clients see in docs.
    let camel = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

type DataClient = CacheClient<InterceptedService<Channel, BearerToken>>;

async fn connect(remote: &Remote, timeout: Duration) -> anyhow::Result<DataClient> {
    let (channel, bearer) = remote.connect("the gateway", Some(timeout)).await?;
    Ok(CacheClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Options every data command shares.
#[derive(Debug, Clone)]
pub struct Common {
    /// Where, with which token and TLS.
    pub remote: Remote,
    /// Request attributes for the namespace's policy.
    pub attributes: HashMap<String, String>,
    /// The call's deadline.
    pub timeout: Duration,
    /// One JSON object on stdout instead of text.
    pub json: bool,
}

/// Parses `k=v` request attributes.
pub fn parse_attributes(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--attr `{pair}`: expected NAME=VALUE"))
        })
        .collect()
}

fn text_or_base64(value: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    match std::str::from_utf8(value) {
        Ok(text) => json!({ "value": text }),
        Err(_) => {
            json!({ "value_base64": base64::engine::general_purpose::STANDARD.encode(value) })
        }
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// A duration for people: whole seconds from a second up.
fn ms(ms: u64) -> String {
    let duration = if ms >= 1000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(duration).to_string()
}

/// `cachegw get NS KEY`.
pub async fn get(
    common: &Common,
    namespace: &str,
    key: &str,
    allow_stale: bool,
    raw: bool,
) -> anyhow::Result<Exit> {
    let mut client = connect(&common.remote, common.timeout).await?;
    let got = client
        .get(GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: common.attributes.clone(),
            allow_stale,
            ..Default::default()
        })
        .await
        .map_err(Refused)?
        .into_inner();
    let outcome = Outcome::try_from(got.outcome).unwrap_or(Outcome::Miss);
    let exit = match (got.degraded, outcome) {
        (true, _) => Exit::NotDone,
        (false, Outcome::Hit | Outcome::Stale) => Exit::Done,
        (false, _) => Exit::NotFound,
    };
    let outcome_name = if got.degraded {
        "degraded"
    } else {
        match outcome {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            _ => "miss",
        }
    };
    if common.json {
        let mut answer = json!({
            "outcome": outcome_name,
            "ttl_remaining_ms": got.ttl_remaining_ms,
            "content_type": got.content_type,
            "policy": got.policy,
        });
        if exit == Exit::Done
            && let (Some(answer), serde_json::Value::Object(value)) =
                (answer.as_object_mut(), text_or_base64(&got.value))
        {
            answer.extend(value);
        }
        print_json(&answer)?;
        return Ok(exit);
    }
    if exit == Exit::Done {
        match std::str::from_utf8(&got.value) {
            Ok(text) if !raw => outln!("{text}")?,
            Err(_) if !raw => eprintln!(
                "({} bytes that are not UTF-8: use --raw for the bytes, or --json for base64)",
                got.value.len()
            ),
            _ => cli_output::write_bytes(&got.value)?,
        }
    }
    let detail = match exit {
        Exit::Done => format!(
            "{}, fresh for {}{}, policy {}",
            outcome_name.to_uppercase(),
            ms(got.ttl_remaining_ms),
            if got.content_type.is_empty() {
                String::new()
            } else {
                format!(", {}", got.content_type)
            },
            got.policy
        ),
        Exit::NotDone => {
            "DEGRADED: the gateway could not reach its store in time; nothing is known about the key"
                .to_owned()
        }
        _ => format!("MISS: no value for `{key}` in `{namespace}`"),
    };
    eprintln!("{detail}");
    Ok(exit)
}

/// `cachegw set NS KEY VALUE`.
pub async fn set(
    common: &Common,
    namespace: &str,
    key: &str,
    value: Vec<u8>,
    content_type: Option<String>,
) -> anyhow::Result<Exit> {
    let mut client = connect(&common.remote, common.timeout).await?;
    let set = client
        .set(SetRequest {
            namespace: namespace.into(),
            key: key.into(),
            value: value.into(),
            attributes: common.attributes.clone(),
            content_type: content_type.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(Refused)?
        .into_inner();
    let exit = if set.stored {
        Exit::Done
    } else {
        Exit::NotDone
    };
    if common.json {
        print_json(&json!({
            "stored": set.stored,
            "degraded": set.degraded,
            "ttl_ms": set.ttl_ms,
            "policy": set.policy,
            "invalidated": set.invalidated,
            "invalidation_error": set.invalidation_error,
        }))?;
        return Ok(exit);
    }
    if set.stored {
        outln!(
            "stored, fresh for {} (policy {})",
            ms(set.ttl_ms),
            set.policy
        )?;
    } else if set.degraded {
        outln!("NOT stored: the gateway could not reach its store in time (degraded)")?;
    } else {
        outln!(
            "NOT stored: the namespace's policy ({}) bypasses the cache for this key",
            set.policy
        )?;
    }
    if set.invalidated > 0 {
        outln!(
            "the policy's invalidations removed {} entries",
            set.invalidated
        )?;
    }
    if !set.invalidation_error.is_empty() {
        eprintln!("invalidations incomplete: {}", set.invalidation_error);
    }
    Ok(exit)
}

/// `cachegw del NS KEY`.
pub async fn delete(common: &Common, namespace: &str, key: &str) -> anyhow::Result<Exit> {
    let mut client = connect(&common.remote, common.timeout).await?;
    let deleted = client
        .delete(DeleteRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: common.attributes.clone(),
        })
        .await
        .map_err(Refused)?
        .into_inner();
    let exit = match (deleted.degraded, deleted.deleted) {
        (true, _) => Exit::NotDone,
        (false, true) => Exit::Done,
        (false, false) => Exit::NotFound,
    };
    if common.json {
        print_json(&json!({
            "deleted": deleted.deleted,
            "degraded": deleted.degraded,
            "policy": deleted.policy,
            "invalidated": deleted.invalidated,
            "invalidation_error": deleted.invalidation_error,
        }))?;
        return Ok(exit);
    }
    outln!(
        "{}",
        match exit {
            Exit::Done => "deleted".to_owned(),
            Exit::NotFound => format!("nothing to delete: no `{key}` in `{namespace}`"),
            _ => "NOT deleted: the gateway could not reach its store in time (degraded)".to_owned(),
        }
    )?;
    if deleted.invalidated > 0 {
        outln!(
            "the policy's invalidations removed {} entries",
            deleted.invalidated
        )?;
    }
    Ok(exit)
}

/// What `cachegw invalidate` removes.
#[derive(Debug, Clone)]
pub enum What {
    /// These keys (mapped by the policy like Deletes).
    Keys(Vec<String>),
    /// A glob over the namespace's keys.
    Pattern(String),
    /// Entries carrying any of these tags.
    Tags(Vec<String>),
    /// Everything in the namespace.
    All,
}

/// `cachegw invalidate NS ...`.
pub async fn invalidate(
    common: &Common,
    namespace: &str,
    what: What,
    soft: bool,
    wait: Duration,
) -> anyhow::Result<Exit> {
    let mut client = connect(
        &common.remote,
        common.timeout.max(wait + Duration::from_secs(1)),
    )
    .await?;
    let target = match what {
        What::Keys(keys) => Target::Keys(KeyList { keys }),
        What::Pattern(pattern) => Target::Pattern(pattern),
        What::Tags(tags) => Target::Tags(TagList { tags }),
        What::All => Target::WholeNamespace(true),
    };
    let job: InvalidateResponse = client
        .invalidate(InvalidateRequest {
            namespace: namespace.into(),
            target: Some(target),
            soft,
            attributes: common.attributes.clone(),
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        })
        .await
        .map_err(Refused)?
        .into_inner();
    let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
    let exit = match state {
        JobState::Done | JobState::Running => Exit::Done,
        _ => Exit::Failed,
    };
    if common.json {
        print_json(&json!({
            "job_id": job.job_id,
            "state": format!("{state:?}").to_lowercase(),
            "affected": job.affected,
            "examined": job.examined,
            "error": job.error,
            "generation": job.generation,
            "elapsed_ms": job.elapsed_ms,
        }))?;
        return Ok(exit);
    }
    // A soft purge leaves an entry stale for its stale window, or removes it at once when it
    // has none (docs/OPERATIONS.md, "Soft purge").
    let verb = if soft {
        "purged softly (stale for their stale window, or gone)"
    } else {
        "removed"
    };
    match state {
        JobState::Done => outln!(
            "done: {} entries {verb} ({} examined) in {} (job {})",
            job.affected,
            job.examined,
            ms(job.elapsed_ms),
            job.job_id
        )?,
        JobState::Running => outln!(
            "still running after {}: {} entries {verb} so far; job {} (follow it with GetInvalidation on this gateway)",
            ms(job.elapsed_ms),
            job.affected,
            job.job_id
        )?,
        _ => eprintln!(
            "FAILED after {} entries {verb}: {} (job {})",
            job.affected, job.error, job.job_id
        ),
    }
    Ok(exit)
}
