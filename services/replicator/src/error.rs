//! The replicator's errors. They reach callers only through the kit's error
//! table ([`ServiceError`]), so a store fault answers with the same code here
//! as from every other service.

use tidemark_connectors::ConnectorError;
use tidemark_kit::{FieldError, KitError, ServiceError};
use tonic::Status;

use crate::context::UnitFailure;

#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    /// Bad request fields, every one named.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but the pipeline, job or store is not in a
    /// state to do it.
    #[error("{0}")]
    Precondition(String),
    /// A store fault met while serving a request.
    #[error(transparent)]
    Store(#[from] ConnectorError),
    /// A store fault about the store a request field names.
    #[error("{field}: {source}")]
    StoreOf {
        field: String,
        source: ConnectorError,
    },
    /// Already classified: a job-tracker answer, or an error with details.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// A bug or corrupt stored state; the cause goes to the log only.
    #[error("{0}")]
    Internal(String),
    /// The service cannot start: a backend it needs cannot be set up.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Kit(#[from] KitError),
}

pub type ReplicatorResult<T> = Result<T, ReplicatorError>;

impl ReplicatorError {
    /// A store fault about the store named by request field `field`.
    pub fn store_of(field: &str) -> impl FnOnce(ConnectorError) -> Self + '_ {
        move |source| Self::StoreOf {
            field: field.to_owned(),
            source,
        }
    }
}

/// A pipeline's stores could not be opened or written while serving a
/// request (repair, replay): worth a retry when the store said so.
impl From<UnitFailure> for ReplicatorError {
    fn from(f: UnitFailure) -> Self {
        match f {
            UnitFailure::LeaseLost => Self::Precondition("the unit's lease was lost".to_owned()),
            UnitFailure::Failed {
                message,
                retryable: true,
                ..
            } => Self::Service(
                ServiceError::unavailable("a store of the pipeline is unavailable; retry later")
                    .caused_by(message),
            ),
            UnitFailure::Failed { message, .. } => Self::Precondition(message),
        }
    }
}

impl From<FieldError> for ReplicatorError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(vec![e])
    }
}

impl From<Vec<FieldError>> for ReplicatorError {
    fn from(v: Vec<FieldError>) -> Self {
        Self::Invalid(v)
    }
}

impl From<ReplicatorError> for ServiceError {
    fn from(e: ReplicatorError) -> Self {
        match e {
            ReplicatorError::Invalid(v) => Self::invalid(v),
            ReplicatorError::NotFound(m) => Self::not_found(m),
            ReplicatorError::AlreadyExists(m) => Self::already_exists(m),
            ReplicatorError::Precondition(m) => Self::precondition(m),
            ReplicatorError::Store(e) => e.into(),
            ReplicatorError::StoreOf { field, source } => Self::from(source).on_field(&field),
            ReplicatorError::Service(s) => s,
            ReplicatorError::Internal(m) | ReplicatorError::Setup(m) => Self::internal(m),
            ReplicatorError::Kit(e) => e.into(),
        }
    }
}

impl From<ReplicatorError> for Status {
    fn from(e: ReplicatorError) -> Self {
        ServiceError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_name_dynamodb_refuses_names_the_request_field() {
        // BackfillAttribute with a 2 MB table name answered INTERNAL: the
        // connectors now refuse the name as invalid input, which must reach
        // the caller as INVALID_ARGUMENT on the field that held it.
        let source =
            tidemark_connectors::dynamodb::check_table_name(&"t".repeat(2 << 20)).unwrap_err();
        let e = ServiceError::from(ReplicatorError::store_of("spec.table")(source));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.violations().len(), 1);
        assert_eq!(e.violations()[0].field, "spec.table");
        assert!(e.violations()[0].description.contains("3 to 255"));
    }
}
