//! Connector errors, classified at the adapter: the caller only needs to know
//! whether to retry, whether a condition failed, or whether to give up.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Throttling, timeouts, 5xx, dropped connections: try again later.
    #[error("{backend}: retryable: {message}")]
    Retryable {
        backend: &'static str,
        message: String,
        /// The backend's own hint, when it gave one.
        retry_after: Option<Duration>,
    },
    /// A conditional write's condition did not hold (for example the target
    /// already has a newer version, or the attribute is already set).
    #[error("condition failed: {0}")]
    Precondition(String),
    /// The table, stream, index or bucket does not exist.
    #[error("{backend}: not found: {message}")]
    NotFound {
        backend: &'static str,
        message: String,
    },
    /// The request is malformed for this backend (bad key, bad value).
    #[error("{backend}: invalid input: {message}")]
    InvalidInput {
        backend: &'static str,
        message: String,
    },
    /// A shard iterator or cursor expired; re-open from the last position.
    #[error("{backend}: iterator expired")]
    IteratorExpired { backend: &'static str },
    /// Anything else: permissions, unknown failures. Retrying will not help.
    #[error("{backend}: {message}")]
    Terminal {
        backend: &'static str,
        message: String,
    },
}

pub type ConnectorResult<T> = Result<T, ConnectorError>;

impl ConnectorError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    pub fn is_precondition(&self) -> bool {
        matches!(self, Self::Precondition(_))
    }

    pub fn terminal(backend: &'static str, message: impl Into<String>) -> Self {
        Self::Terminal {
            backend,
            message: message.into(),
        }
    }

    pub fn invalid(backend: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            backend,
            message: message.into(),
        }
    }
}

#[cfg(feature = "sqlite")]
impl From<rusqlite::Error> for ConnectorError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Self::Retryable {
                    backend: "sqlite",
                    message: e.to_string(),
                    retry_after: None,
                }
            }
            _ => Self::terminal("sqlite", e.to_string()),
        }
    }
}
