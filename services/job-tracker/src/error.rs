//! The job-tracker's errors and their one mapping to gRPC status codes.

use tidemark_connectors::ConnectorError;
use tidemark_kit::{FieldError, ServiceError};
use tonic::Status;

use crate::kv::KvError;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Stale fencing token, illegal transition, failure gate, run busy.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A fault of the job-tracker's own store, classified by its connector.
    #[error(transparent)]
    Store(#[from] ConnectorError),
}

pub type TrackerResult<T> = Result<T, TrackerError>;

impl From<KvError> for TrackerError {
    fn from(e: KvError) -> Self {
        match e {
            // A conflict that reaches here outlived every retry.
            KvError::Conflict => Self::Unavailable("too many concurrent writers; retry".to_owned()),
            KvError::Store(e) => Self::Store(e),
            KvError::Failed(m) => Self::Internal(m),
        }
    }
}

impl From<serde_json::Error> for TrackerError {
    fn from(e: serde_json::Error) -> Self {
        Self::Internal(format!("corrupt record: {e}"))
    }
}

impl From<TrackerError> for ServiceError {
    fn from(e: TrackerError) -> Self {
        match e {
            TrackerError::NotFound(m) => Self::not_found(m),
            TrackerError::AlreadyExists(m) => Self::already_exists(m),
            TrackerError::Precondition(m) => Self::precondition(m),
            TrackerError::Invalid(f) => f.into(),
            TrackerError::Unavailable(m) => {
                Self::unavailable("the job-tracker's store is unavailable; retry later")
                    .caused_by(m)
            }
            TrackerError::Internal(m) => Self::internal(m),
            TrackerError::Store(e) => e.into(),
        }
    }
}

impl From<TrackerError> for Status {
    fn from(e: TrackerError) -> Self {
        ServiceError::from(e).into()
    }
}
