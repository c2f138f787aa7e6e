//! Errors of the kit itself, and the conversions every service uses to turn
//! bad input into `INVALID_ARGUMENT` with `google.rpc.BadRequest` details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Errors raised while configuring or running a service host.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("telemetry: {0}")]
    Telemetry(String),
}

pub type KitResult<T> = Result<T, KitError>;

/// One invalid field of a request, named by its path in the request message
/// (for example `events[3].entity_key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldError {
    pub field: String,
    pub description: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// Shorthand for a required field that was left empty.
    pub fn required(field: impl Into<String>) -> Self {
        Self::new(field, "is required")
    }

    /// Prefixes the field path with the enclosing message's field, so nested
    /// conversions report the full path.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl From<FieldError> for Status {
    fn from(err: FieldError) -> Self {
        invalid_argument(vec![err])
    }
}

/// `INVALID_ARGUMENT` carrying every violation as a `google.rpc.BadRequest`
/// field violation, with a message that lists them for clients that do not
/// decode details (grpcurl, plain logs).
pub fn invalid_argument(violations: Vec<FieldError>) -> Status {
    let message = violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .into_iter()
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// An internal failure: the cause goes to the log, the client gets a generic
/// message so no backend detail leaks over the wire.
pub fn internal(cause: &dyn std::error::Error) -> Status {
    tracing::error!(error = %cause, "internal error");
    Status::internal("internal error; see the service log")
}

/// Extension to attach a field path to a conversion result.
pub trait FieldResultExt<T> {
    #[allow(clippy::missing_errors_doc)]
    fn within(self, parent: &str) -> Result<T, FieldError>;
}

impl<T> FieldResultExt<T> for Result<T, FieldError> {
    fn within(self, parent: &str) -> Result<T, FieldError> {
        self.map_err(|e| e.within(parent))
    }
}

/// Returns the value of a required message field or a violation naming it.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, FieldError> {
    value.ok_or_else(|| FieldError::required(field))
}

/// Returns a non-empty string field or a violation naming it.
pub fn non_empty<'a>(value: &'a str, field: &str) -> Result<&'a str, FieldError> {
    if value.trim().is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_paths_compose() {
        let e = FieldError::required("entity_key")
            .within("[3]")
            .within("events");
        assert_eq!(e.field, "events[3].entity_key");
    }

    #[test]
    fn invalid_argument_carries_bad_request_details() {
        let status = invalid_argument(vec![FieldError::new("name", "must not be empty")]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("name: must not be empty"));
        let bad = status
            .get_details_bad_request()
            .expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "name");
    }
}
