//! `get_or_fill`: read-through with leases. Of all the callers that miss a
//! key at once, on every gateway sharing the store, one runs the fill and the
//! others wait for its value; stale values are served while one refreshes;
//! the fill's write carries the lease's fencing token, so a value invalidated
//! while it was computed is never written back.

use std::{future::Future, time::Duration};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Client,
    answers::Attributes,
    client::{Resend, decode, encode, millis, set_request},
    error::{Error, Result},
    proto::{
        GetRequest, GetResponse, LeaseRequest, LeaseState, LeaseWrite, Outcome,
        ReleaseLeaseRequest, SetRequest,
    },
};

/// How [`Client::get_or_fill`] asks for leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillOptions {
    /// Serve a stale value at once while another caller refreshes, and the
    /// stale value this caller holds if its own fill fails (default true).
    pub allow_stale: bool,
    /// How long to wait for another caller's fill before running the fill
    /// without writing (default 1 s): a little more than the fill's usual
    /// latency. At most the gateway's `limits.max_lease_wait` (30 s).
    pub lease_wait: Duration,
    /// How long the lease lasts if this caller dies mid-fill (`None`: the
    /// namespace's `lease_ttl`, 10 s by default): longer than the slowest
    /// fill to protect.
    pub lease_ttl: Option<Duration>,
    /// Request context for the namespace's policy.
    pub attributes: Attributes,
}

impl Default for FillOptions {
    fn default() -> Self {
        FillOptions {
            allow_stale: true,
            lease_wait: Duration::from_secs(1),
            lease_ttl: None,
            attributes: Attributes::new(),
        }
    }
}

/// Where the value [`Client::get_or_fill_with`] returned came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A fresh entry.
    Hit,
    /// Another caller's fill, waited for.
    Coalesced,
    /// A stale entry, while another caller holds the lease to refresh it.
    Stale,
    /// This caller ran the fill; what became of its write.
    Filled(Fill),
    /// This caller held the lease to refresh a cached (stale, or fresh but
    /// due for early refresh) value, its fill failed, and the cached value
    /// is returned (stale-if-error). The lease was released.
    CachedAfterFillError,
}

/// What became of a fill's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Written with the lease's token.
    Stored,
    /// Not written: an invalidation or delete of the key (or of a tag of the
    /// value), a namespace flush, or the lease's expiry came first. The value
    /// is still what the fill just returned, so this caller gets it; it is
    /// not retried, because the invalidation may be what made it outdated.
    Voided,
    /// Not written: the namespace's policy does not cache it.
    NotCached,
    /// Not written: this caller did not hold the lease, because the holder
    /// did not fill within the lease wait (or the lease wait is zero). The
    /// holder writes.
    LeaseBusy,
    /// Not written: the gateway was unreachable or answered degraded (its
    /// store is down). The cache being down never fails a `get_or_fill`.
    CacheUnavailable,
}

/// A [`Client::get_or_fill_with`] answer: the value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filled<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub served: Served,
}

impl Client {
    /// Returns the value of `key` in `namespace` from the cache, or from
    /// `fill` — and of all the callers that miss it at once, on every gateway
    /// sharing the store, only one runs `fill`; the others wait for its
    /// value. Uses the client's [`FillOptions`]; [`Client::get_or_fill_with`]
    /// takes others and says where the value came from.
    ///
    /// The protocol (docs/READ_THROUGH.md): a `Get` with a lease request.
    /// - A fresh entry, another caller's fill (`COALESCED`) or, with
    ///   `allow_stale`, a stale entry while another caller refreshes
    ///   (`STALE_SERVED`) is returned.
    /// - Granted the lease: `fill` runs and its value is `Set` with the
    ///   lease's fencing token. If an invalidation came meanwhile the write
    ///   is voided: the caller still gets the value, but it is not cached
    ///   and the write is not retried. On an early refresh or a stale entry
    ///   the refresh runs in this call (the caller waits for it).
    /// - `fill` fails: the lease is released, so the next caller can try at
    ///   once; the cached value, if this caller had one, is returned
    ///   (stale-if-error), else [`Error::Fill`].
    /// - The holder did not fill within the lease wait (`TIMED_OUT`): `fill`
    ///   runs without writing (a second lease is not asked for: the holder
    ///   is slow or dead and the lease expires by itself).
    /// - The gateway is unreachable or degraded: `fill` runs without writing.
    ///
    /// Errors: [`Error::Fill`]; the gateway refusing the request
    /// (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `INVALID_ARGUMENT`);
    /// [`Error::Decode`] if the cached bytes are not `T`'s JSON;
    /// [`Error::Encode`] if the fill's value cannot be serialized. `fill`
    /// itself has no deadline: bound it yourself if the origin can hang.
    pub async fn get_or_fill<T, F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        fill: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let options = self.fill_options().clone();
        Ok(self
            .get_or_fill_with(namespace, key, &options, fill)
            .await?
            .value)
    }

    /// [`Client::get_or_fill`] with `options`, answering where the value
    /// came from.
    pub async fn get_or_fill_with<T, F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        options: &FillOptions,
        fill: F,
    ) -> Result<Filled<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let request = GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: options.attributes.clone(),
            allow_stale: options.allow_stale,
            lease: Some(LeaseRequest {
                wait_ms: millis(options.lease_wait),
                ttl_ms: options.lease_ttl.map_or(0, millis),
            }),
        };
        // Retrying a lease request is safe: a grant whose answer was lost
        // makes the retry wait (and fill without writing), and only the
        // current token can ever write.
        let deadline = self.timeout() + options.lease_wait;
        let answered = self
            .call(
                "Get",
                Resend::Safe,
                deadline,
                request,
                |mut cache, request| async move { cache.get(request).await },
            )
            .await;
        let got = match answered {
            Ok(got) if !got.degraded => got,
            Ok(_) => return uncached(fill, Fill::CacheUnavailable).await,
            Err(err) if err.is_unreachable() => {
                tracing::debug!(namespace, key, cause = %err, "cache unreachable, filling without it");
                return uncached(fill, Fill::CacheUnavailable).await;
            }
            Err(err) => return Err(err.widen()),
        };
        let outcome = Outcome::try_from(got.outcome).unwrap_or(Outcome::Miss);
        let cached = |served| -> Result<Filled<T>, E> {
            Ok(Filled {
                value: decode(namespace, key, &got).map_err(Error::widen)?,
                served,
            })
        };
        match (LeaseState::try_from(got.lease), outcome) {
            (Ok(LeaseState::Granted), _) => {
                self.fill_under_lease(namespace, key, options, got, fill)
                    .await
            }
            (Ok(LeaseState::Coalesced), Outcome::Hit) => cached(Served::Coalesced),
            (_, Outcome::Hit) => cached(Served::Hit),
            (_, Outcome::Stale) => cached(Served::Stale),
            // TIMED_OUT, WAIT, or no lease at all (a policy that bypasses the
            // cache): the origin is the source of truth, and not ours to write.
            _ => uncached(fill, Fill::LeaseBusy).await,
        }
    }

    /// Runs `fill` holding the lease `got` granted, then writes with its
    /// token (or releases it if the fill fails).
    async fn fill_under_lease<T, F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        options: &FillOptions,
        got: GetResponse,
        fill: F,
    ) -> Result<Filled<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let had_value = matches!(
            Outcome::try_from(got.outcome),
            Ok(Outcome::Hit | Outcome::Stale)
        );
        let value = match fill().await {
            Ok(value) => value,
            Err(err) => {
                self.release(namespace, key, options, &got.lease_token)
                    .await;
                if had_value {
                    return Ok(Filled {
                        value: decode(namespace, key, &got).map_err(Error::widen)?,
                        served: Served::CachedAfterFillError,
                    });
                }
                return Err(Error::Fill(err));
            }
        };
        let bytes = match encode(namespace, key, &value) {
            Ok(bytes) => bytes,
            Err(err) => {
                self.release(namespace, key, options, &got.lease_token)
                    .await;
                return Err(err.widen());
            }
        };
        let request = SetRequest {
            value: bytes,
            attributes: options.attributes.clone(),
            lease_token: got.lease_token.clone(),
            ..set_request(namespace, key)
        };
        // A resent leased Set whose first copy was written answers VOIDED
        // (a token is good for one write): reported as voided, harmless.
        let fill = match self.send_set(request).await {
            Ok(set) if set.degraded => Fill::CacheUnavailable,
            Ok(set) if set.lease == LeaseWrite::Voided as i32 => {
                tracing::debug!(namespace, key, "fill voided by an invalidation; not cached");
                Fill::Voided
            }
            Ok(set) if set.stored => Fill::Stored,
            Ok(_) => Fill::NotCached,
            Err(err) if err.is_unreachable() => Fill::CacheUnavailable,
            Err(err) => {
                // Refused (say, a token without the write right): the lease
                // was not consumed, so pass it on rather than block the key.
                self.release(namespace, key, options, &got.lease_token)
                    .await;
                return Err(err.widen());
            }
        };
        Ok(Filled {
            value,
            served: Served::Filled(fill),
        })
    }

    /// Gives the lease back so the next caller can fill at once; a failure
    /// only delays that until the lease expires, so it is logged, not raised.
    async fn release(&self, namespace: &str, key: &str, options: &FillOptions, token: &str) {
        let request = ReleaseLeaseRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes: options.attributes.clone(),
            lease_token: token.into(),
        };
        let released = self
            .call(
                "ReleaseLease",
                Resend::Safe,
                self.timeout(),
                request,
                |mut cache, request| async move { cache.release_lease(request).await },
            )
            .await;
        if let Err(err) = released {
            tracing::warn!(namespace, key, cause = %err, "could not release a lease; it expires by itself");
        }
    }
}

/// Runs `fill` without a lease: its value is returned, not written.
async fn uncached<T, F, Fut, E>(fill: F, why: Fill) -> Result<Filled<T>, E>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let value = fill().await.map_err(Error::Fill)?;
    Ok(Filled {
        value,
        served: Served::Filled(why),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_errors_need_only_display_and_debug() {
        // anyhow::Error is not a std::error::Error, and must still do.
        fn is_error<T: std::error::Error>() {}
        is_error::<Error<anyhow::Error>>();
        is_error::<Error<std::io::Error>>();
        let err: Error<anyhow::Error> = Error::Fill(anyhow::anyhow!("origin down"));
        assert_eq!(err.to_string(), "the fill failed: origin down");
        assert_eq!(err.code(), None);
    }

    #[test]
    fn default_fill_options_allow_stale_and_wait_a_second() {
        let options = FillOptions::default();
        assert!(options.allow_stale);
        assert_eq!(options.lease_wait, Duration::from_secs(1));
        assert_eq!(options.lease_ttl, None);
    }
}
