//! Why a request is refused before it reaches the store.

/// A request the gateway will not execute. Nothing has been written when one
/// of these is returned. `api::status` maps each variant to a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A field is malformed (empty key, bad namespace name, ...).
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it, with the limit where there is one.
        reason: String,
    },
    /// A field is larger than a configured limit allows.
    #[error("`{field}` too large: {reason}")]
    TooLarge {
        /// The request field at fault.
        field: &'static str,
        /// The size and the limit, and the setting that controls it.
        reason: String,
    },
    /// The namespace is not declared and the default-namespace template is off.
    #[error(
        "namespace `{0}` is not declared in the gateway's config (add [namespaces.{0}] or enable [default_namespace])"
    )]
    UnknownNamespace(String),
    /// The store refused the write because it is full (Redis `maxmemory`
    /// reached under a `noeviction` policy). Nothing was written.
    #[error(
        "the store is full and refused the write (Redis maxmemory reached with a noeviction policy; nothing was written): {0}"
    )]
    StoreFull(String),
    /// Something the request names does not exist (an invalidation job id).
    #[error("unknown `{field}`: {reason}")]
    NotFound {
        /// The request field at fault.
        field: &'static str,
        /// What was looked for and where.
        reason: String,
    },
}

impl RequestError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RequestError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
