//! `cachegw.v1.Cache`: each handler converts the request, runs it through the
//! cache within the client's deadline and converts the answer back.

use std::{future::Future, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{
    client_deadline,
    proto::v1::{
        DeleteRequest, DeleteResponse, GetInvalidationRequest, GetRequest, GetResponse,
        InvalidateRequest, InvalidateResponse, MGetRequest, MGetResponse, MSetRequest,
        MSetResponse, ReleaseLeaseRequest, ReleaseLeaseResponse, SetRequest, SetResponse,
        cache_server,
    },
};
use crate::cache::{Cache, CacheMetrics, RequestError};

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
    /// through the cache, convert the answer.
    async fn unary<In, Command, Answer, Out, Run, Running>(
        &self,
        op: &'static str,
        request: Request<In>,
        run: Run,
    ) -> Result<Response<Out>, Status>
    where
        In: TryInto<Command, Error = RequestError>,
        Run: FnOnce(Command, Option<Duration>) -> Running,
        Running: Future<Output = Result<Answer, RequestError>>,
        Answer: Into<Out>,
    {
        let _in_flight = self.metrics.in_flight();
        let deadline = client_deadline(&request);
        let command = request.into_inner().try_into().map_err(|err| {
            self.metrics.rejected(op);
            Status::from(err)
        })?;
        let answer = run(command, deadline).await?;
        Ok(Response::new(answer.into()))
    }
}

#[tonic::async_trait]
impl cache_server::Cache for CacheApi {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.unary("get", request, |command, deadline| {
            self.cache.get(command, deadline)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        self.unary("set", request, |command, deadline| {
            self.cache.set(command, deadline)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.unary("delete", request, |command, deadline| {
            self.cache.delete(command, deadline)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn m_get(&self, request: Request<MGetRequest>) -> Result<Response<MGetResponse>, Status> {
        let _in_flight = self.metrics.in_flight();
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

    #[tracing::instrument(level = "debug", skip_all)]
    async fn m_set(&self, request: Request<MSetRequest>) -> Result<Response<MSetResponse>, Status> {
        let _in_flight = self.metrics.in_flight();
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

    #[tracing::instrument(level = "debug", skip_all)]
    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        self.unary("invalidate", request, |command, deadline| {
            self.cache.invalidate(command, deadline)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_invalidation(
        &self,
        request: Request<GetInvalidationRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let deadline = client_deadline(&request);
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms);
        let job = self
            .cache
            .invalidation_status(&request.job_id, wait, deadline)
            .await?;
        Ok(Response::new(job.into()))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        self.unary("release_lease", request, |command, deadline| async move {
            let released = self.cache.release_lease(command, deadline).await?;
            Ok(ReleaseLeaseResponse { released })
        })
        .await
    }
}
