//! The one error table of Tidemark: every service's error enum converts into
//! a [`ServiceError`] (a kind, a message for the caller, the cause kept for
//! the log), and only [`ServiceError`] becomes a `tonic::Status`. So the same
//! store fault reaches a client with the same code from every service:
//!
//! | [`ConnectorError`]  | code                | message to the caller                    |
//! |---------------------|---------------------|------------------------------------------|
//! | `Retryable`         | `UNAVAILABLE`       | which backend; `RetryInfo` when it hinted |
//! | `IteratorExpired`   | `UNAVAILABLE`       | which backend                            |
//! | `Precondition`      | `FAILED_PRECONDITION` | the condition that did not hold        |
//! | `NotFound`          | `NOT_FOUND`         | what is missing (and the request field)  |
//! | `InvalidInput`      | `INVALID_ARGUMENT`  | what is wrong, as a `BadRequest` field violation when the field is known |
//! | `Terminal`          | `INTERNAL`          | generic, with a reference to the log line |
//!
//! Backend detail of internal and unavailable errors goes to the log with the
//! request's trace id, never into the status message.

use std::time::Duration;

use tidemark_connectors::ConnectorError;
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
    ServiceError::invalid(violations).into()
}

/// An internal failure: the cause goes to the log, the client gets a generic
/// message so no backend detail leaks over the wire.
pub fn internal(cause: &dyn std::error::Error) -> Status {
    ServiceError::internal(cause.to_string()).into()
}

/// What went wrong, as the caller should react to it; one `tonic::Code` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed: fix it and send it again.
    InvalidArgument,
    /// The request is well formed but the system is not in a state to do it
    /// (stale fencing token, paused writers, an unacknowledged failure).
    FailedPrecondition,
    NotFound,
    AlreadyExists,
    /// A backend or dependency cannot be reached or is overloaded: retry.
    Unavailable,
    ResourceExhausted,
    Unauthenticated,
    PermissionDenied,
    DeadlineExceeded,
    Unimplemented,
    /// A bug or a backend failure retrying will not fix.
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::Unavailable => Code::Unavailable,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Unimplemented => Code::Unimplemented,
            Self::Internal => Code::Internal,
        }
    }

    /// The kind of an upstream service's status, so a call to another
    /// Tidemark service passes its answer on with the same meaning.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::FailedPrecondition | Code::Aborted => Self::FailedPrecondition,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Unimplemented => Self::Unimplemented,
            Code::Unavailable | Code::Cancelled | Code::Unknown => Self::Unavailable,
            Code::Ok | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// `google.rpc.ErrorInfo`: reason, domain, metadata.
type ErrorInfo = (String, String, std::collections::HashMap<String, String>);

/// An error on its way to a caller: the kind decides the code, `message` is
/// what the caller reads, `violations` become `google.rpc.BadRequest`
/// details, and the cause is logged (with the trace id) when the status is
/// built, never sent.
#[derive(Debug)]
pub struct ServiceError {
    kind: ErrorKind,
    message: String,
    violations: Vec<FieldError>,
    retry_after: Option<Duration>,
    /// `google.rpc.ErrorInfo`: a machine-readable reason, its domain and
    /// figures a client can act on.
    info: Option<Box<ErrorInfo>>,
    cause: Option<Cause>,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(cause) = &self.cause {
            write!(f, " ({cause})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl ServiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
            info: None,
            cause: None,
        }
    }

    /// `INVALID_ARGUMENT` naming every wrong field.
    pub fn invalid(violations: Vec<FieldError>) -> Self {
        let message = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            violations,
            ..Self::new(ErrorKind::InvalidArgument, message)
        }
    }

    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid(vec![FieldError::new(field, description)])
    }

    pub fn deadline(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// `INTERNAL` with a generic message; `cause` goes to the log only.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Self::new(ErrorKind::Internal, "internal error").caused_by(cause)
    }

    /// An answer of another Tidemark service (`upstream` names it): what the
    /// caller caused passes on with its code, message and field violations;
    /// transport trouble and the upstream's own failures are `UNAVAILABLE`.
    pub fn upstream(upstream: &str, status: &Status) -> Self {
        let kind = ErrorKind::of_code(status.code());
        match kind {
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DeadlineExceeded => {
                Self::unavailable(format!("{upstream} unavailable; retry later"))
                    .caused_by(format!("{upstream}: {status}"))
            }
            _ => Self {
                violations: status
                    .get_details_bad_request()
                    .map(|b| {
                        b.field_violations
                            .into_iter()
                            .map(|v| FieldError::new(v.field, v.description))
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Self::new(kind, status.message())
            },
        }
    }

    #[must_use]
    pub fn caused_by(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// Adds a `google.rpc.ErrorInfo` (e.g. reason `DRAIN_TIMEOUT` in domain
    /// `tidemark.replicator.v1` with the lag left).
    #[must_use]
    pub fn with_info(
        mut self,
        reason: &str,
        domain: &str,
        metadata: std::collections::HashMap<String, String>,
    ) -> Self {
        self.info = Some(Box::new((reason.to_owned(), domain.to_owned(), metadata)));
        self
    }

    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Names the request field the error is about: a field violation for
    /// invalid input, a prefix of the message otherwise.
    #[must_use]
    pub fn on_field(mut self, field: &str) -> Self {
        if self.kind == ErrorKind::InvalidArgument {
            if self.violations.is_empty() {
                self.violations
                    .push(FieldError::new(field, std::mem::take(&mut self.message)));
            } else {
                self.violations = std::mem::take(&mut self.violations)
                    .into_iter()
                    .map(|v| v.within(field))
                    .collect();
            }
            self.message = self
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
        } else if self.kind != ErrorKind::Internal {
            self.message = format!("{field}: {}", self.message);
        }
        self
    }

    /// Renames the violations' field paths that start with `from` (a
    /// downstream request's path, e.g. `job.schedule`) to `to` (where the
    /// caller's own request carries the value, e.g. `schedule`).
    #[must_use]
    pub fn renamed(mut self, from: &str, to: &str) -> Self {
        let mut renamed = false;
        for v in &mut self.violations {
            if let Some(rest) = v.field.strip_prefix(from)
                && (rest.is_empty() || rest.starts_with(['.', '[']))
            {
                v.field = format!("{to}{rest}");
                renamed = true;
            }
        }
        if renamed {
            self.message = self
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn code(&self) -> Code {
        self.kind.code()
    }

    /// What the caller reads.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn violations(&self) -> &[FieldError] {
        &self.violations
    }
}

/// The canonical mapping of store faults (the table at the top of this file).
impl From<ConnectorError> for ServiceError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Retryable {
                backend,
                retry_after,
                ..
            } => {
                let mut error = Self::unavailable(format!("{backend} is unavailable; retry later"));
                error.retry_after = retry_after;
                error.caused_by(e)
            }
            ConnectorError::IteratorExpired { backend } => {
                Self::unavailable(format!("{backend}: the read position expired; retry"))
                    .caused_by(e)
            }
            ConnectorError::Precondition(message) => Self::precondition(message),
            ConnectorError::NotFound { backend, message } => {
                Self::not_found(format!("{backend}: {message}"))
            }
            ConnectorError::InvalidInput { backend, message } => {
                Self::new(ErrorKind::InvalidArgument, format!("{backend}: {message}"))
            }
            ConnectorError::Terminal { .. } => Self::internal(e),
        }
    }
}

impl From<FieldError> for ServiceError {
    fn from(e: FieldError) -> Self {
        Self::invalid(vec![e])
    }
}

impl From<Vec<FieldError>> for ServiceError {
    fn from(v: Vec<FieldError>) -> Self {
        Self::invalid(v)
    }
}

impl From<KitError> for ServiceError {
    fn from(e: KitError) -> Self {
        Self::internal(e)
    }
}

/// The trace id of the current span, so a log line and the caller's
/// trace meet.
fn current_trace_id() -> Option<String> {
    crate::trace_context::current_trace_id()
}

/// The most of a status message (and of each violation's description) sent
/// back: messages quote the caller's input, and an echo of a 1 MiB name does
/// not fit the HTTP/2 header it travels in (the client then read a protocol
/// error instead of the answer; found by the e2e RPC fuzzer).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The most field violations sent back in a `BadRequest`.
pub const MAX_VIOLATIONS: usize = 20;

/// `text` cut to [`MAX_MESSAGE_BYTES`] on a character boundary, marked.
fn capped(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("… (cut)");
    }
    text
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = e.kind.code();
        let mut message = capped(e.message);
        match (e.kind, &e.cause) {
            (ErrorKind::Internal, cause) => {
                // A reference the caller can quote, found in the log line.
                let reference =
                    current_trace_id().unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
                let cause = cause.as_ref().map(ToString::to_string).unwrap_or_default();
                tracing::error!(error = %cause, reference = %reference, "internal error");
                message = format!("{message} (reference {reference}); see the service log");
            }
            (_, Some(cause)) => {
                let trace_id = current_trace_id().unwrap_or_default();
                tracing::warn!(error = %cause, code = ?code, trace_id = %trace_id, "request failed");
            }
            (_, None) => {}
        }
        let mut details = ErrorDetails::new();
        if !e.violations.is_empty() {
            // Like the message, the details travel in a header: a request
            // with 10000 bad keys gets the first violations only.
            let left_out = e.violations.len().saturating_sub(MAX_VIOLATIONS);
            let mut violations = e.violations;
            violations.truncate(MAX_VIOLATIONS);
            if left_out > 0 {
                let last = violations
                    .last()
                    .map(|v| v.field.clone())
                    .unwrap_or_default();
                violations.push(FieldError::new(
                    last,
                    format!("and {left_out} more violations not listed"),
                ));
            }
            details.set_bad_request(
                violations
                    .into_iter()
                    .map(|v| {
                        tonic_types::FieldViolation::new(capped(v.field), capped(v.description))
                    })
                    .collect::<Vec<_>>(),
            );
        }
        if let Some(after) = e.retry_after {
            details.set_retry_info(Some(after));
        }
        if let Some((reason, domain, metadata)) = e.info.map(|i| *i) {
            details.set_error_info(reason, domain, metadata);
        }
        Status::with_error_details(code, message, details)
    }
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

    fn faults() -> Vec<(ConnectorError, Code)> {
        vec![
            (
                ConnectorError::Retryable {
                    backend: "dynamodb",
                    message: "ProvisionedThroughputExceeded: secret detail".into(),
                    retry_after: Some(Duration::from_millis(300)),
                },
                Code::Unavailable,
            ),
            (
                ConnectorError::IteratorExpired {
                    backend: "dynamodb-streams",
                },
                Code::Unavailable,
            ),
            (
                ConnectorError::Precondition("version 7 is older than 9".into()),
                Code::FailedPrecondition,
            ),
            (
                ConnectorError::NotFound {
                    backend: "dynamodb",
                    message: "table items does not exist".into(),
                },
                Code::NotFound,
            ),
            (
                ConnectorError::invalid("dynamodb", "key attribute id is missing"),
                Code::InvalidArgument,
            ),
            (
                ConnectorError::terminal("s3", "AccessDenied: secret detail"),
                Code::Internal,
            ),
        ]
    }

    #[test]
    fn connector_faults_map_by_the_table() {
        for (fault, code) in faults() {
            let status = Status::from(ServiceError::from(fault));
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                !status.message().contains("secret detail"),
                "backend detail leaked: {status:?}"
            );
        }
    }

    #[test]
    fn retry_hint_becomes_retry_info() {
        let status = Status::from(ServiceError::from(ConnectorError::Retryable {
            backend: "dynamodb",
            message: "throttled".into(),
            retry_after: Some(Duration::from_millis(300)),
        }));
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(300)));
    }

    #[test]
    fn a_downstream_field_path_is_renamed_to_the_callers() {
        let e = ServiceError::field("job.schedule.start_time", "is out of range")
            .renamed("job.schedule", "schedule");
        let status = Status::from(e);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "schedule.start_time");
        assert!(
            status.message().starts_with("schedule.start_time"),
            "{}",
            status.message()
        );
        // Other paths stay as they are.
        let kept = ServiceError::field("job.kind", "bad").renamed("job.schedule", "schedule");
        assert_eq!(
            Status::from(kept)
                .get_details_bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            "job.kind"
        );
    }

    #[test]
    fn huge_messages_are_cut_to_fit_a_header() {
        let huge = "é".repeat(1 << 20);
        let status = Status::from(
            ServiceError::not_found(format!("no job named {huge:?}")).on_field("job_name"),
        );
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES + 16,
            "{}",
            status.message().len()
        );
        assert!(status.message().starts_with("job_name: no job named"));
        let status = Status::from(ServiceError::field("name", huge));
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "name");
        assert!(bad.field_violations[0].description.len() <= MAX_MESSAGE_BYTES + 16);
        let many = (0..10_000)
            .map(|i| FieldError::new(format!("unit_keys[{i}]"), "is bad"))
            .collect();
        let status = Status::from(ServiceError::invalid(many));
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS + 1);
        assert!(
            bad.field_violations[MAX_VIOLATIONS]
                .description
                .contains("9980 more")
        );
    }

    #[test]
    fn invalid_input_on_a_field_is_a_field_violation() {
        let status = Status::from(
            ServiceError::from(ConnectorError::invalid("dynamodb", "bad key")).on_field("source"),
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "source");
        assert!(bad.field_violations[0].description.contains("bad key"));
    }

    #[test]
    fn internal_message_is_generic_with_a_reference() {
        let status = Status::from(ServiceError::internal("disk on fire"));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("disk on fire"));
        assert!(status.message().contains("reference"), "{status:?}");
    }

    #[test]
    fn upstream_refusals_pass_on_and_outages_become_unavailable() {
        let refused = ServiceError::upstream(
            "job-tracker",
            &invalid_argument(vec![FieldError::new("job.name", "must not be empty")]),
        );
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(refused.violations()[0].field, "job.name");
        let gate = ServiceError::upstream(
            "job-tracker",
            &Status::failed_precondition("the last run failed"),
        );
        assert_eq!(gate.code(), Code::FailedPrecondition);
        let down = ServiceError::upstream("job-tracker", &Status::internal("db gone"));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(!down.message().contains("db gone"));
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
