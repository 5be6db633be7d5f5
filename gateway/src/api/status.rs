//! The one place where domain errors become gRPC statuses.

use tonic::{Code, Status};

use super::proto::v1::ItemError;
use crate::{auth::AuthError, cache::RequestError};

fn code(err: &RequestError) -> Code {
    match err {
        RequestError::InvalidArgument { .. } => Code::InvalidArgument,
        RequestError::TooLarge { .. } | RequestError::StoreFull(_) => Code::ResourceExhausted,
        RequestError::UnknownNamespace(_) | RequestError::NotFound { .. } => Code::NotFound,
    }
}

impl From<RequestError> for Status {
    fn from(err: RequestError) -> Self {
        Status::new(code(&err), err.to_string())
    }
}

impl From<RequestError> for ItemError {
    fn from(err: RequestError) -> Self {
        ItemError {
            code: code(&err) as i32,
            message: err.to_string(),
        }
    }
}

/// Missing or unknown credentials: `UNAUTHENTICATED`; known but not allowed:
/// `PERMISSION_DENIED`; over the tenant's rate: `RESOURCE_EXHAUSTED`.
impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        match err {
            AuthError::Missing | AuthError::Malformed | AuthError::Unknown => {
                Status::unauthenticated(message)
            }
            AuthError::Denied { .. } | AuthError::NotAdmin(_) | AuthError::AdminOnData(_) => {
                Status::permission_denied(message)
            }
            AuthError::RateLimited { .. } => Status::resource_exhausted(message),
        }
    }
}
