//! The aggregator's errors and their one mapping to gRPC status codes.

use std::time::Duration;

use tidemark_connectors::ConnectorError;
use tidemark_kit::{ErrorKind, FieldError, KitError, ServiceError};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    /// Flushes are stopped while writers are paused.
    #[error("writers are paused ({0}); resume them to flush")]
    Paused(String),
    /// PauseWriters set the pause, but these live replicas did not confirm
    /// in time that they have seen it with no flush running.
    #[error(
        "writers are paused, but replicas {} did not confirm within {waited:?} that they saw the pause with no flush running; the pause holds: call PauseWriters again to wait longer, or ResumeWriters to give up",
        replicas.join(", ")
    )]
    PauseUnconfirmed {
        replicas: Vec<String>,
        waited: Duration,
    },
    /// The pause ended (ResumeWriters, or its max_pause) while PauseWriters
    /// waited for the replicas.
    #[error(
        "the pause ended (ResumeWriters or max_pause) before every replica confirmed it; writers are not paused"
    )]
    PauseEnded,
    /// Writers are paused in REJECT mode: the client should retry later.
    #[error("writers are paused and events are refused ({reason}); retry later")]
    Rejecting {
        reason: String,
        retry_after: Duration,
    },
    #[error(transparent)]
    Backend(#[from] ConnectorError),
    #[error(transparent)]
    Kit(#[from] KitError),
    /// The configured stats table or topic is not usable at start-up.
    #[error("{0}")]
    Startup(String),
}

pub type StatsResult<T> = Result<T, StatsError>;

impl From<StatsError> for ServiceError {
    fn from(e: StatsError) -> Self {
        match e {
            StatsError::Invalid(f) => f.into(),
            StatsError::NotFound(m) => Self::not_found(m),
            StatsError::Paused(_) | StatsError::PauseEnded => Self::precondition(e.to_string()),
            StatsError::PauseUnconfirmed { .. } => Self::deadline(e.to_string()),
            StatsError::Rejecting { retry_after, .. } => {
                Self::unavailable(e.to_string()).with_retry_after(retry_after)
            }
            StatsError::Backend(b) if crate::event_log::is_dedup_full(&b) => {
                let after = match &b {
                    ConnectorError::Retryable { retry_after, .. } => *retry_after,
                    _ => None,
                };
                let error = Self::new(ErrorKind::ResourceExhausted, b.to_string());
                match after {
                    Some(after) => error.with_retry_after(after),
                    None => error,
                }
            }
            StatsError::Backend(b) => b.into(),
            StatsError::Kit(k) => k.into(),
            StatsError::Startup(m) => Self::precondition(m),
        }
    }
}

impl From<StatsError> for Status {
    fn from(e: StatsError) -> Self {
        ServiceError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn rejecting_carries_retry_info() {
        let status = Status::from(StatsError::Rejecting {
            reason: "cut-over".into(),
            retry_after: Duration::from_secs(2),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(2)));
    }

    #[test]
    fn an_unconfirmed_pause_names_the_replicas() {
        let status = Status::from(StatsError::PauseUnconfirmed {
            replicas: vec!["pod-a-1".into(), "pod-b-2".into()],
            waited: Duration::from_secs(10),
        });
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status.message().contains("pod-a-1, pod-b-2"),
            "{}",
            status.message()
        );
        assert_eq!(
            Status::from(StatsError::PauseEnded).code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn a_full_id_log_is_resource_exhausted() {
        let status = Status::from(StatsError::Backend(ConnectorError::Retryable {
            backend: crate::event_log::DEDUP_CAPACITY,
            message: "full".into(),
            retry_after: Some(Duration::from_secs(7)),
        }));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(7)));
    }

    #[test]
    fn retryable_backend_is_unavailable() {
        let status = Status::from(StatsError::Backend(ConnectorError::Retryable {
            backend: "redis",
            message: "down".into(),
            retry_after: None,
        }));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
