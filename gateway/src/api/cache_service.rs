//! `cachegw.v1.Cache`: each handler checks that the caller may do this in the
//! request's namespace, converts the request, runs it through the cache within
//! the client's deadline and converts the answer back.

use std::{future::Future, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::{Instrument, field::Empty};

use super::{
    client_deadline,
    proto::v1::{
        DeleteRequest, DeleteResponse, GetInvalidationRequest, GetRequest, GetResponse,
        InvalidateRequest, InvalidateResponse, MGetRequest, MGetResponse, MSetRequest,
        MSetResponse, ReleaseLeaseRequest, ReleaseLeaseResponse, SetRequest, SetResponse,
        cache_server,
    },
};
use crate::{
    auth::{self, Caller},
    cache::{
        Cache, CacheMetrics, DeleteResult, GetResult, JobSnapshot, JobState, LeaseState,
        LeaseWrite, Outcome, RequestError, SetResult,
    },
    config::Right,
};

/// Opens a request's `request` span with `fields`, where something reads it:
/// at `debug` for the log, at `info` when spans are exported. Opening a span
/// costs every request the formatting of its fields, which the log layer does
/// then whether or not a line of the request is ever written (~7% of a Get's
/// instructions, docs/BENCHMARKS.md); the warnings a request can raise name
/// their namespace themselves.
macro_rules! request_span {
    ($($fields:tt)*) => {
        if crate::telemetry::spans_exported() {
            tracing::info_span!("request", $($fields)*)
        } else {
            tracing::debug_span!("request", $($fields)*)
        }
    };
}

/// The data API over a [`Cache`].
#[derive(Clone)]
pub struct CacheApi {
    cache: Arc<Cache>,
    metrics: CacheMetrics,
}

impl CacheApi {
    /// Serves `cache`; conversion rejections are counted in `metrics`.
    pub fn new(cache: Arc<Cache>, metrics: CacheMetrics) -> Self {
        Self { cache, metrics }
    }

    /// The shape of every single-item RPC: count it in flight, read the
    /// client's deadline, convert the request (counting a rejection), run it
    /// through the cache, convert the answer — all inside a `request` span
    /// (where something reads it: [`request_span!`]) carrying the op, the
    /// namespace, and once known the outcome and the policy version that
    /// decided, so every log line of the request says which one it was.
    async fn unary<In, Command, Answer, Out, Run, Running>(
        &self,
        op: &'static str,
        right: Right,
        request: Request<In>,
        run: Run,
    ) -> Result<Response<Out>, Status>
    where
        In: TryInto<Command, Error = RequestError> + Namespaced,
        Run: FnOnce(Command, Option<Duration>) -> Running,
        Running: Future<Output = Result<Answer, RequestError>>,
        Answer: Into<Out> + Traced,
    {
        let span = request_span!(
            op,
            namespace = request.get_ref().namespace(),
            outcome = Empty,
            policy = Empty,
        );
        async {
            let _in_flight = self.metrics.in_flight();
            self.authorize(op, &request, |caller, request| {
                caller.authorize(request.namespace(), right)
            })?;
            let deadline = client_deadline(&request);
            let command = request.into_inner().try_into().map_err(|err| {
                self.metrics.rejected(op);
                tracing::Span::current().record("outcome", "rejected");
                tracing::debug!(cause = %err, "request refused");
                Status::from(err)
            })?;
            let answer = run(command, deadline).await?;
            // Formatting the fields into the span costs every request, and
            // only a debug log of the answer or an exported span reads them.
            if tracing::enabled!(tracing::Level::DEBUG) || crate::telemetry::spans_exported() {
                let span = tracing::Span::current();
                span.record("outcome", answer.outcome());
                span.record("policy", answer.policy());
                tracing::debug!("request answered");
            }
            Ok(Response::new(answer.into()))
        }
        .instrument(span)
        .await
    }
}

impl CacheApi {
    /// Checks `allowed` for the request's caller; a refusal is counted as a
    /// rejected request and recorded in the span.
    fn authorize<T>(
        &self,
        op: &'static str,
        request: &Request<T>,
        allowed: impl FnOnce(&Caller, &T) -> Result<(), auth::AuthError>,
    ) -> Result<(), Status> {
        let refused = match auth::caller(request) {
            Ok(caller) => match allowed(&caller, request.get_ref()) {
                Ok(()) => return Ok(()),
                Err(err) => Status::from(err),
            },
            Err(status) => status,
        };
        self.metrics.rejected(op);
        tracing::Span::current().record("outcome", "refused");
        tracing::debug!(cause = %refused.message(), "request refused");
        Err(refused)
    }
}

/// Requests that name a namespace (for the request span).
trait Namespaced {
    fn namespace(&self) -> &str;
}

macro_rules! namespaced {
    ($($request:ty),* $(,)?) => {
        $(impl Namespaced for $request {
            fn namespace(&self) -> &str {
                &self.namespace
            }
        })*
    };
}

namespaced!(
    GetRequest,
    SetRequest,
    DeleteRequest,
    InvalidateRequest,
    ReleaseLeaseRequest
);

/// Answers that report an outcome and a deciding policy (for the span).
trait Traced {
    fn outcome(&self) -> &'static str;
    fn policy(&self) -> &str {
        ""
    }
}

impl Traced for GetResult {
    fn outcome(&self) -> &'static str {
        match (self.degraded, self.lease, self.outcome) {
            (true, _, _) => "degraded",
            (false, LeaseState::Coalesced, _) => "coalesced",
            (false, _, Outcome::Hit) => "hit",
            (false, _, Outcome::Miss) => "miss",
            (false, _, Outcome::Stale) => "stale",
        }
    }

    fn policy(&self) -> &str {
        &self.policy
    }
}

impl Traced for SetResult {
    fn outcome(&self) -> &'static str {
        match (self.degraded, self.stored, self.lease) {
            (true, _, _) => "degraded",
            (false, _, LeaseWrite::Voided) => "voided",
            (false, true, _) => "stored",
            (false, false, _) => "not_stored",
        }
    }

    fn policy(&self) -> &str {
        &self.policy
    }
}

impl Traced for DeleteResult {
    fn outcome(&self) -> &'static str {
        match (self.degraded, self.deleted) {
            (true, _) => "degraded",
            (false, true) => "deleted",
            (false, false) => "absent",
        }
    }

    fn policy(&self) -> &str {
        &self.policy
    }
}

impl Traced for JobSnapshot {
    fn outcome(&self) -> &'static str {
        match self.state {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    fn policy(&self) -> &str {
        &self.policy
    }
}

impl Traced for ReleaseLeaseResponse {
    fn outcome(&self) -> &'static str {
        if self.released {
            "released"
        } else {
            "not_held"
        }
    }
}

#[tonic::async_trait]
impl cache_server::Cache for CacheApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.unary("get", Right::Read, request, |command, deadline| {
            self.cache.get(command, deadline)
        })
        .await
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        self.unary("set", Right::Write, request, |command, deadline| {
            self.cache.set(command, deadline)
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.unary("delete", Right::Write, request, |command, deadline| {
            self.cache.delete(command, deadline)
        })
        .await
    }

    async fn m_get(&self, request: Request<MGetRequest>) -> Result<Response<MGetResponse>, Status> {
        let span = request_span!(op = "mget", items = request.get_ref().items.len());
        async move {
            let _in_flight = self.metrics.in_flight();
            self.authorize("mget", &request, |caller, batch| {
                batch
                    .items
                    .iter()
                    .try_for_each(|item| caller.authorize(&item.namespace, Right::Read))
            })?;
            let deadline = client_deadline(&request);
            let commands = request
                .into_inner()
                .items
                .into_iter()
                .map(TryInto::try_into)
                .collect();
            let results = self.cache.get_many(commands, deadline).await?;
            Ok(Response::new(MGetResponse {
                results: results.into_iter().map(Into::into).collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn m_set(&self, request: Request<MSetRequest>) -> Result<Response<MSetResponse>, Status> {
        let span = request_span!(op = "mset", items = request.get_ref().items.len());
        async move {
            let _in_flight = self.metrics.in_flight();
            self.authorize("mset", &request, |caller, batch| {
                batch
                    .items
                    .iter()
                    .try_for_each(|item| caller.authorize(&item.namespace, Right::Write))
            })?;
            let deadline = client_deadline(&request);
            let commands = request
                .into_inner()
                .items
                .into_iter()
                .map(TryInto::try_into)
                .collect();
            let results = self.cache.set_many(commands, deadline).await?;
            Ok(Response::new(MSetResponse {
                results: results.into_iter().map(Into::into).collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        self.unary(
            "invalidate",
            Right::Invalidate,
            request,
            |command, deadline| self.cache.invalidate(command, deadline),
        )
        .await
    }

    async fn get_invalidation(
        &self,
        request: Request<GetInvalidationRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let span = request_span!(op = "get_invalidation", job = %request.get_ref().job_id);
        async move {
            // A job is the invalidating tenant's: following it takes the right
            // to invalidate its namespace (an unknown id is NOT_FOUND below).
            let namespace = self.cache.invalidation_namespace(&request.get_ref().job_id);
            if let Some(namespace) = namespace {
                self.authorize("get_invalidation", &request, |caller, _| {
                    caller.authorize(&namespace, Right::Invalidate)
                })?;
            } else {
                self.authorize("get_invalidation", &request, |_, _| Ok(()))?;
            }
            let deadline = client_deadline(&request);
            let request = request.into_inner();
            let wait = Duration::from_millis(request.wait_ms);
            let job = self
                .cache
                .invalidation_status(&request.job_id, wait, deadline)
                .await?;
            Ok(Response::new(job.into()))
        }
        .instrument(span)
        .await
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        self.unary(
            "release_lease",
            Right::Write,
            request,
            |command, deadline| async move {
                let released = self.cache.release_lease(command, deadline).await?;
                Ok(ReleaseLeaseResponse { released })
            },
        )
        .await
    }
}
