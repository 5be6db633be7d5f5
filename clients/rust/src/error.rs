//! The client's one error type: what went wrong talking to the gateway, with
//! the values, or in the caller's fill.

use std::{convert::Infallible, time::Duration};

use tonic::Code;

/// What a call of the client failed with.
///
/// `F` is the error type of a [`Client::get_or_fill`](crate::Client::get_or_fill)
/// fill; every other call never fails with [`Error::Fill`] and uses the
/// default, [`Infallible`].
#[derive(Debug, thiserror::Error)]
pub enum Error<F = Infallible> {
    /// The endpoint is not a valid URI, or the TLS settings were refused.
    #[error("invalid endpoint {endpoint:?}: {source}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token holds characters an HTTP header cannot carry.
    #[error("the token cannot be sent as an `authorization` header")]
    InvalidToken,
    /// An eager [`ClientBuilder::connect`](crate::ClientBuilder::connect)
    /// found no gateway at the endpoint.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gateway (or the transport) answered a gRPC error, after
    /// `attempts` tries (more than one only for retried `UNAVAILABLE`s).
    #[error("{call} failed with {code:?} after {attempts} attempt(s): {message}")]
    Status {
        /// The RPC, e.g. `Get`.
        call: &'static str,
        /// The gRPC status code of the last attempt (`UNAUTHENTICATED`,
        /// `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `UNAVAILABLE`, ...).
        code: Code,
        /// The status message of the last attempt.
        message: String,
        /// How many times the call was sent.
        attempts: u32,
    },
    /// No answer came within the call's deadline (the client gave up).
    #[error("{call} got no answer within {deadline:?}")]
    Timeout {
        /// The RPC, e.g. `Get`.
        call: &'static str,
        /// The deadline that passed.
        deadline: Duration,
    },
    /// The value could not be serialized as JSON.
    #[error("cannot serialize the value for {namespace}/{key} as JSON: {source}")]
    Encode {
        /// The entry's namespace.
        namespace: String,
        /// The entry's key.
        key: String,
        /// serde_json's reason.
        #[source]
        source: serde_json::Error,
    },
    /// The cached bytes are not the JSON of the requested type (another
    /// writer, or another version of the type, wrote them).
    #[error(
        "the cached value of {namespace}/{key} (content type {content_type:?}) does not decode as the requested type: {source}"
    )]
    Decode {
        /// The entry's namespace.
        namespace: String,
        /// The entry's key.
        key: String,
        /// The content type the entry was written with.
        content_type: String,
        /// serde_json's reason.
        #[source]
        source: serde_json::Error,
    },
    /// The caller's fill failed (and the cache had no value to serve instead).
    #[error("the fill failed: {0}")]
    Fill(F),
}

impl<F> Error<F> {
    /// The gRPC status code, for [`Error::Status`] (and `DEADLINE_EXCEEDED`
    /// for [`Error::Timeout`]).
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            Error::Timeout { .. } => Some(Code::DeadlineExceeded),
            _ => None,
        }
    }

    /// True when the gateway could not be reached or did not answer in time:
    /// the cache is unavailable, the request itself is not at fault.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.code(),
            Some(Code::Unavailable | Code::DeadlineExceeded)
        )
    }
}

impl Error {
    /// The same error as an `Error<F>` (it is not a fill error).
    pub(crate) fn widen<F>(self) -> Error<F> {
        match self {
            Error::InvalidEndpoint { endpoint, source } => {
                Error::InvalidEndpoint { endpoint, source }
            }
            Error::InvalidToken => Error::InvalidToken,
            Error::Connect { endpoint, source } => Error::Connect { endpoint, source },
            Error::Status {
                call,
                code,
                message,
                attempts,
            } => Error::Status {
                call,
                code,
                message,
                attempts,
            },
            Error::Timeout { call, deadline } => Error::Timeout { call, deadline },
            Error::Encode {
                namespace,
                key,
                source,
            } => Error::Encode {
                namespace,
                key,
                source,
            },
            Error::Decode {
                namespace,
                key,
                content_type,
                source,
            } => Error::Decode {
                namespace,
                key,
                content_type,
                source,
            },
            Error::Fill(never) => match never {},
        }
    }
}

/// The result of a client call.
pub type Result<T, F = Infallible> = std::result::Result<T, Error<F>>;
