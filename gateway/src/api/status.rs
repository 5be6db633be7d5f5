//! The one place where domain errors become gRPC statuses.

use tonic::{Code, Status};

use super::proto::v1::ItemError;
use crate::cache::RequestError;

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
