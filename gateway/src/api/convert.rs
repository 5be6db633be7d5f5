//! Protobuf <-> domain conversion. Incoming messages are checked for what
//! needs no configuration (names, empty keys); limits that depend on the
//! namespace are the cache layer's to check.

use super::proto::v1 as pb;
use std::time::Duration;

use crate::cache::{
    DeleteCommand, DeleteResult, GetCommand, GetResult, InvalidateCommand, JobSnapshot, JobState,
    LeaseAsk, LeaseState, LeaseWrite, Outcome, ReleaseCommand, RequestError, SetCommand, SetResult,
    Target, validate_namespace_name,
};

fn checked_namespace(namespace: String) -> Result<String, RequestError> {
    validate_namespace_name(&namespace)
        .map_err(|reason| RequestError::invalid("namespace", reason))?;
    Ok(namespace)
}

fn checked_key(key: String) -> Result<String, RequestError> {
    if key.is_empty() {
        return Err(RequestError::invalid("key", "must not be empty"));
    }
    Ok(key)
}

impl TryFrom<pb::GetRequest> for GetCommand {
    type Error = RequestError;

    fn try_from(request: pb::GetRequest) -> Result<Self, Self::Error> {
        Ok(GetCommand {
            namespace: checked_namespace(request.namespace)?,
            key: checked_key(request.key)?,
            attributes: request.attributes,
            allow_stale: request.allow_stale,
            lease: request.lease.map(|lease| LeaseAsk {
                wait: Duration::from_millis(lease.wait_ms),
                ttl: (lease.ttl_ms > 0).then(|| Duration::from_millis(lease.ttl_ms)),
            }),
        })
    }
}

impl TryFrom<pb::SetRequest> for SetCommand {
    type Error = RequestError;

    fn try_from(request: pb::SetRequest) -> Result<Self, Self::Error> {
        Ok(SetCommand {
            namespace: checked_namespace(request.namespace)?,
            key: checked_key(request.key)?,
            value: request.value,
            content_type: request.content_type,
            attributes: request.attributes,
            lease_token: (!request.lease_token.is_empty()).then_some(request.lease_token),
        })
    }
}

impl TryFrom<pb::DeleteRequest> for DeleteCommand {
    type Error = RequestError;

    fn try_from(request: pb::DeleteRequest) -> Result<Self, Self::Error> {
        Ok(DeleteCommand {
            namespace: checked_namespace(request.namespace)?,
            key: checked_key(request.key)?,
            attributes: request.attributes,
        })
    }
}

impl From<GetResult> for pb::GetResponse {
    fn from(result: GetResult) -> Self {
        let outcome = match result.outcome {
            Outcome::Hit => pb::Outcome::Hit,
            Outcome::Miss => pb::Outcome::Miss,
            Outcome::Stale => pb::Outcome::Stale,
        };
        pb::GetResponse {
            outcome: outcome as i32,
            value: result.value,
            ttl_remaining_ms: millis(result.ttl_remaining),
            degraded: result.degraded,
            content_type: result.content_type,
            policy: String::from(&*result.policy),
            lease: lease_state(result.lease) as i32,
            lease_token: result.lease_token,
        }
    }
}

fn lease_state(state: LeaseState) -> pb::LeaseState {
    match state {
        LeaseState::NotRequested => pb::LeaseState::LeaseNotRequested,
        LeaseState::Granted => pb::LeaseState::Granted,
        LeaseState::Wait => pb::LeaseState::Wait,
        LeaseState::StaleServed => pb::LeaseState::StaleServed,
        LeaseState::Coalesced => pb::LeaseState::Coalesced,
        LeaseState::TimedOut => pb::LeaseState::TimedOut,
        LeaseState::NotNeeded => pb::LeaseState::NotNeeded,
    }
}

impl TryFrom<pb::ReleaseLeaseRequest> for ReleaseCommand {
    type Error = RequestError;

    fn try_from(request: pb::ReleaseLeaseRequest) -> Result<Self, Self::Error> {
        Ok(ReleaseCommand {
            namespace: checked_namespace(request.namespace)?,
            key: checked_key(request.key)?,
            attributes: request.attributes,
            token: request.lease_token,
        })
    }
}

impl From<SetResult> for pb::SetResponse {
    fn from(result: SetResult) -> Self {
        pb::SetResponse {
            stored: result.stored,
            ttl_ms: millis(result.ttl),
            degraded: result.degraded,
            policy: String::from(&*result.policy),
            invalidated: result.invalidation.removed,
            invalidation_error: result.invalidation.error,
            lease: match result.lease {
                LeaseWrite::None => pb::LeaseWrite::None,
                LeaseWrite::Accepted => pb::LeaseWrite::Accepted,
                LeaseWrite::Voided => pb::LeaseWrite::Voided,
            } as i32,
        }
    }
}

impl From<DeleteResult> for pb::DeleteResponse {
    fn from(result: DeleteResult) -> Self {
        pb::DeleteResponse {
            deleted: result.deleted,
            degraded: result.degraded,
            policy: String::from(&*result.policy),
            invalidated: result.invalidation.removed,
            invalidation_error: result.invalidation.error,
        }
    }
}

impl From<Result<GetResult, RequestError>> for pb::MGetResult {
    fn from(result: Result<GetResult, RequestError>) -> Self {
        use pb::m_get_result::Result as Item;
        pb::MGetResult {
            result: Some(match result {
                Ok(found) => Item::Response(found.into()),
                Err(err) => Item::Error(err.into()),
            }),
        }
    }
}

impl From<Result<SetResult, RequestError>> for pb::MSetResult {
    fn from(result: Result<SetResult, RequestError>) -> Self {
        use pb::m_set_result::Result as Item;
        pb::MSetResult {
            result: Some(match result {
                Ok(written) => Item::Response(written.into()),
                Err(err) => Item::Error(err.into()),
            }),
        }
    }
}

impl TryFrom<pb::InvalidateRequest> for InvalidateCommand {
    type Error = RequestError;

    fn try_from(request: pb::InvalidateRequest) -> Result<Self, Self::Error> {
        use pb::invalidate_request::Target as Wire;
        let target = match request.target {
            None => {
                return Err(RequestError::invalid(
                    "target",
                    "set one of keys, pattern, tags or whole_namespace",
                ));
            }
            Some(Wire::Keys(list)) => Target::Keys(
                list.keys
                    .into_iter()
                    .map(checked_key)
                    .collect::<Result<_, _>>()?,
            ),
            Some(Wire::Pattern(pattern)) => Target::Pattern(pattern),
            Some(Wire::Tags(list)) => Target::Tags(list.tags),
            Some(Wire::WholeNamespace(true)) => Target::WholeNamespace,
            Some(Wire::WholeNamespace(false)) => {
                return Err(RequestError::invalid(
                    "whole_namespace",
                    "must be true when set (to invalidate less, set keys, pattern or tags)",
                ));
            }
        };
        Ok(InvalidateCommand {
            namespace: checked_namespace(request.namespace)?,
            target,
            soft: request.soft,
            attributes: request.attributes,
            wait: (request.wait_ms > 0).then(|| Duration::from_millis(request.wait_ms)),
        })
    }
}

impl From<JobSnapshot> for pb::InvalidateResponse {
    fn from(job: JobSnapshot) -> Self {
        let state = match job.state {
            JobState::Running => pb::JobState::Running,
            JobState::Done => pb::JobState::Done,
            JobState::Failed => pb::JobState::Failed,
        };
        pb::InvalidateResponse {
            job_id: job.id,
            state: state as i32,
            affected: job.affected,
            examined: job.examined,
            error: job.error,
            generation: job.generation,
            elapsed_ms: millis(job.elapsed),
            policy: job.policy,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_field_they_fail_on() {
        let err = GetCommand::try_from(pb::GetRequest {
            namespace: "users".into(),
            key: String::new(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, RequestError::InvalidArgument { field: "key", .. }),
            "{err}"
        );

        let err = DeleteCommand::try_from(pb::DeleteRequest {
            namespace: "a:b".into(),
            key: "k".into(),
            attributes: Default::default(),
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                RequestError::InvalidArgument {
                    field: "namespace",
                    ..
                }
            ),
            "{err}"
        );
    }
}
