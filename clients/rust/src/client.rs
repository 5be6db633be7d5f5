//! The connection: one tonic channel shared by every clone, the token, the
//! deadline and the retry policy every call goes through, and the plain
//! typed calls (get, set, delete, invalidate).

use std::{future::Future, sync::Arc, time::Duration};

use serde::{Serialize, de::DeserializeOwned};
use tonic::{
    Response, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    answers::{Attributes, Invalidate, Invalidation, Lookup, Removal, Write},
    error::{Error, Result},
    fill::FillOptions,
    proto::{
        DeleteRequest, GetInvalidationRequest, GetRequest, GetResponse, InvalidateRequest, Outcome,
        SetRequest, cache_client::CacheClient,
    },
    retry::RetryPolicy,
};

/// The content type the client writes values with: every value is its
/// `serde_json` serialization.
pub const CONTENT_TYPE: &str = "application/json";

/// Largest message the client sends or accepts (values are bounded by the
/// namespace's `max_value_bytes` well before this).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Whether a call may be sent again after `UNAVAILABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// Sending it twice does no harm (Get, Set, Delete, ReleaseLease,
    /// GetInvalidation).
    Safe,
    /// It could start work twice (Invalidate).
    Never,
}

/// A cachegw client. Cloning is cheap: clones share one HTTP/2 connection
/// (reconnected when it drops), the token, the deadline and the retry policy.
///
/// Every call has a deadline ([`ClientBuilder::timeout`], plus the lease wait
/// for lease requests), sent to the gateway as `grpc-timeout` and enforced
/// here. Calls that fail with `UNAVAILABLE` (the connection failed; the
/// gateway itself never answers it) are retried with exponential backoff and
/// jitter ([`RetryPolicy`]) when sending them twice is harmless: `Get`, `Set`,
/// `Delete`, `ReleaseLease` and `GetInvalidation`. `Invalidate` is never
/// retried (it could start a job twice). Lease requests and leased writes
/// are retried too, which is safe because of the fencing tokens; see
/// [`Client::get_or_fill`].
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    cache: CacheClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Duration,
    retry: RetryPolicy,
    fill: FillOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field(
                "token",
                &self.shared.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.shared.timeout)
            .field("retry", &self.shared.retry)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Client`]; start with [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoint: String,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    tls: Option<ClientTlsConfig>,
    fill: FillOptions,
}

impl ClientBuilder {
    /// Sends `authorization: Bearer <token>` with every call (required unless
    /// the gateway runs with authentication off).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The deadline of each call (default 2 s). A lease request's deadline is
    /// this plus its lease wait.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long establishing a connection may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How calls are retried on `UNAVAILABLE` (default
    /// [`RetryPolicy::default`]; [`RetryPolicy::none`] turns retries off).
    pub fn retries(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Speaks TLS (the endpoint should be `https://`): which CA to trust,
    /// the server name, and a client certificate for mutual TLS.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The options [`Client::get_or_fill`] uses (default
    /// [`FillOptions::default`]).
    pub fn fill_options(mut self, fill: FillOptions) -> Self {
        self.fill = fill;
        self
    }

    /// Connects now: fails with [`Error::Connect`] if no gateway answers.
    pub async fn connect(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        self.finish(channel)
    }

    /// Returns at once and connects on the first call (and reconnects when
    /// the connection drops), so a gateway that is down fails calls, with
    /// `UNAVAILABLE` after the retries, rather than the construction.
    pub fn connect_lazy(self) -> Result<Client> {
        let channel = self.endpoint()?.connect_lazy();
        self.finish(channel)
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let invalid = |source| Error::InvalidEndpoint {
            endpoint: self.endpoint.clone(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(invalid)?
            .connect_timeout(self.connect_timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(invalid)?;
        }
        Ok(endpoint)
    }

    fn finish(self, channel: Channel) -> Result<Client> {
        let authorization = self
            .token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .map_err(|_| Error::InvalidToken)?;
        let cache = CacheClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client {
            shared: Arc::new(Shared {
                cache,
                authorization,
                timeout: self.timeout,
                retry: self.retry,
                fill: self.fill,
            }),
        })
    }
}

/// Options of a [`Client::get_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetOptions {
    /// Serve an entry past its fresh TTL but inside its stale window as
    /// [`Lookup::Stale`] (without it, such an entry is a miss).
    pub allow_stale: bool,
    /// Request context for the namespace's policy.
    pub attributes: Attributes,
}

impl Client {
    /// Connects to the gateway at `endpoint` (`http://host:port`, or
    /// `https://` with [`ClientBuilder::tls`]) with the default settings and
    /// no token.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client> {
        Client::builder(endpoint).connect().await
    }

    /// Settings for a client of the gateway at `endpoint`.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            token: None,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            tls: None,
            fill: FillOptions::default(),
        }
    }

    /// Reads `key` of `namespace` and deserializes it from JSON. A value
    /// that is not the JSON of `T` is an [`Error::Decode`].
    pub async fn get<T: DeserializeOwned>(&self, namespace: &str, key: &str) -> Result<Lookup<T>> {
        self.get_with(namespace, key, &GetOptions::default()).await
    }

    /// [`Client::get`] with stale values and policy attributes.
    pub async fn get_with<T: DeserializeOwned>(
        &self,
        namespace: &str,
        key: &str,
        options: &GetOptions,
    ) -> Result<Lookup<T>> {
        let request = GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: options.attributes.clone(),
            allow_stale: options.allow_stale,
            lease: None,
        };
        let got = self
            .call(
                "Get",
                Resend::Safe,
                self.shared.timeout,
                request,
                |mut cache, request| async move { cache.get(request).await },
            )
            .await?;
        if got.degraded {
            return Ok(Lookup::Degraded);
        }
        Ok(match Outcome::try_from(got.outcome) {
            Ok(Outcome::Hit) => Lookup::Hit(decode(namespace, key, &got)?),
            Ok(Outcome::Stale) => Lookup::Stale(decode(namespace, key, &got)?),
            Ok(Outcome::Miss | Outcome::Unspecified) | Err(_) => Lookup::Miss,
        })
    }

    /// Writes `value`, serialized as JSON (`content_type` `application/json`),
    /// to `key` of `namespace`; the namespace's policy decides the TTL.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        namespace: &str,
        key: &str,
        value: &T,
    ) -> Result<Write> {
        self.set_with(namespace, key, value, &Attributes::new())
            .await
    }

    /// [`Client::set`] with policy attributes (e.g. `surrogate-key` tags).
    pub async fn set_with<T: Serialize + ?Sized>(
        &self,
        namespace: &str,
        key: &str,
        value: &T,
        attributes: &Attributes,
    ) -> Result<Write> {
        let request = SetRequest {
            value: encode(namespace, key, value)?,
            attributes: attributes.clone(),
            ..set_request(namespace, key)
        };
        let set = self.send_set(request).await?;
        Ok(Write::from(&set))
    }

    /// Removes `key` of `namespace`.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<Removal> {
        self.delete_with(namespace, key, &Attributes::new()).await
    }

    /// [`Client::delete`] with policy attributes.
    pub async fn delete_with(
        &self,
        namespace: &str,
        key: &str,
        attributes: &Attributes,
    ) -> Result<Removal> {
        let request = DeleteRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: attributes.clone(),
        };
        let deleted = self
            .call(
                "Delete",
                Resend::Safe,
                self.shared.timeout,
                request,
                |mut cache, request| async move { cache.delete(request).await },
            )
            .await?;
        Ok(Removal::from(&deleted))
    }

    /// Removes exact keys of `namespace` (each mapped by its policy like a
    /// Delete). Never retried.
    pub async fn invalidate_keys<K: Into<String>>(
        &self,
        namespace: &str,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Invalidation> {
        let keys = keys.into_iter().map(Into::into).collect();
        self.invalidate(namespace, Invalidate::Keys(keys), false)
            .await
    }

    /// Removes the entries of `namespace` whose keys match the glob
    /// `pattern` (`*`, `?`, `[a-z]`, `\x`). Never retried.
    pub async fn invalidate_pattern(&self, namespace: &str, pattern: &str) -> Result<Invalidation> {
        self.invalidate(namespace, Invalidate::Pattern(pattern.into()), false)
            .await
    }

    /// Removes the entries of `namespace` carrying any of `tags`. Never
    /// retried.
    pub async fn invalidate_tags<S: Into<String>>(
        &self,
        namespace: &str,
        tags: impl IntoIterator<Item = S>,
    ) -> Result<Invalidation> {
        let tags = tags.into_iter().map(Into::into).collect();
        self.invalidate(namespace, Invalidate::Tags(tags), false)
            .await
    }

    /// Makes every entry of `namespace` unreachable at once. Never retried.
    pub async fn invalidate_namespace(&self, namespace: &str) -> Result<Invalidation> {
        self.invalidate(namespace, Invalidate::Namespace, false)
            .await
    }

    /// Invalidates `target` in `namespace`; `soft` marks the entries stale
    /// instead of removing them. Answers when the job is done, or
    /// [`JobProgress::Running`](crate::JobProgress::Running) if it takes longer than
    /// the call's deadline. Never retried: it could start the job twice.
    pub async fn invalidate(
        &self,
        namespace: &str,
        target: Invalidate,
        soft: bool,
    ) -> Result<Invalidation> {
        let request = InvalidateRequest {
            namespace: namespace.into(),
            target: Some(target.into()),
            soft,
            ..Default::default()
        };
        let job = self
            .call(
                "Invalidate",
                Resend::Never,
                self.shared.timeout,
                request,
                |mut cache, request| async move { cache.invalidate(request).await },
            )
            .await?;
        Ok(job.into())
    }

    /// The progress of invalidation job `job_id` (started on this gateway),
    /// waiting up to `wait` for it to finish.
    pub async fn invalidation(&self, job_id: &str, wait: Duration) -> Result<Invalidation> {
        let request = GetInvalidationRequest {
            job_id: job_id.into(),
            wait_ms: millis(wait),
        };
        let deadline = self.shared.timeout + wait;
        let job = self
            .call(
                "GetInvalidation",
                Resend::Safe,
                deadline,
                request,
                |mut cache, request| async move { cache.get_invalidation(request).await },
            )
            .await?;
        Ok(job.into())
    }

    pub(crate) fn fill_options(&self) -> &FillOptions {
        &self.shared.fill
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    pub(crate) async fn send_set(&self, request: SetRequest) -> Result<crate::proto::SetResponse> {
        self.call(
            "Set",
            Resend::Safe,
            self.shared.timeout,
            request,
            |mut cache, request| async move { cache.set(request).await },
        )
        .await
    }

    /// Sends `message` with the token and `deadline`, resending it on
    /// `UNAVAILABLE` as the retry policy says when `resend` allows.
    pub(crate) async fn call<Req, Resp, Fut>(
        &self,
        call: &'static str,
        resend: Resend,
        deadline: Duration,
        message: Req,
        send: impl Fn(CacheClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Req: Clone,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let shared = &self.shared;
        let mut attempt = 1;
        loop {
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(deadline);
            if let Some(authorization) = &shared.authorization {
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
            }
            let status =
                match tokio::time::timeout(deadline, send(shared.cache.clone(), request)).await {
                    Ok(Ok(response)) => return Ok(response.into_inner()),
                    Ok(Err(status)) => status,
                    Err(_elapsed) => return Err(Error::Timeout { call, deadline }),
                };
            if resend == Resend::Safe && shared.retry.retries(status.code(), attempt) {
                let pause = shared.retry.backoff(attempt, rand::random::<f64>());
                tracing::debug!(
                    call,
                    attempt,
                    pause_ms = pause.as_millis() as u64,
                    cause = %status.message(),
                    "gateway unavailable, retrying"
                );
                tokio::time::sleep(pause).await;
                attempt += 1;
                continue;
            }
            return Err(Error::Status {
                call,
                code: status.code(),
                message: status.message().to_owned(),
                attempts: attempt,
            });
        }
    }
}

/// A Set of `key` in `namespace` with the client's content type.
pub(crate) fn set_request(namespace: &str, key: &str) -> SetRequest {
    SetRequest {
        namespace: namespace.into(),
        key: key.into(),
        content_type: CONTENT_TYPE.into(),
        ..Default::default()
    }
}

pub(crate) fn encode<T: Serialize + ?Sized>(
    namespace: &str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Encode {
        namespace: namespace.into(),
        key: key.into(),
        source,
    })
}

pub(crate) fn decode<T: DeserializeOwned>(
    namespace: &str,
    key: &str,
    got: &GetResponse,
) -> Result<T> {
    serde_json::from_slice(&got.value).map_err(|source| Error::Decode {
        namespace: namespace.into(),
        key: key.into(),
        content_type: got.content_type.clone(),
        source,
    })
}

/// Whole milliseconds, saturating (the wire's unit).
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_as_json_and_foreign_bytes_say_what_they_are() {
        let bytes = encode("ns", "k", &vec![1u32, 2, 3]).unwrap();
        assert_eq!(bytes, b"[1,2,3]");
        let got = GetResponse {
            value: bytes,
            content_type: CONTENT_TYPE.into(),
            ..Default::default()
        };
        assert_eq!(decode::<Vec<u32>>("ns", "k", &got).unwrap(), [1, 2, 3]);
        let foreign = GetResponse {
            value: b"\x89PNG".to_vec(),
            content_type: "image/png".into(),
            ..Default::default()
        };
        let err = decode::<Vec<u32>>("ns", "k", &foreign).unwrap_err();
        assert!(
            matches!(&err, Error::Decode { content_type, .. } if content_type == "image/png"),
            "{err}"
        );
    }

    // A lazy channel spawns its worker, hence the runtime.
    #[tokio::test]
    async fn a_token_that_cannot_be_a_header_is_refused_up_front() {
        let built = Client::builder("http://127.0.0.1:1")
            .token("line\nbreak")
            .connect_lazy();
        assert!(matches!(built, Err(Error::InvalidToken)));
        let built = Client::builder("not a uri").connect_lazy();
        assert!(matches!(built, Err(Error::InvalidEndpoint { .. })));
    }
}
