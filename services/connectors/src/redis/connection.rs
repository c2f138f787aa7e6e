//! Connecting to Redis, and the classification of its errors at the adapter.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::{BACKEND, PRECONDITION_CODE};
use crate::error::{ConnectorError, ConnectorResult};

/// Maps a Redis error to a [`ConnectorError`]: connection trouble, timeouts
/// and a server that is busy, loading or failing over are retryable; a flush
/// sequence refused by a script is a precondition; the rest is terminal.
pub fn classify(err: &RedisError) -> ConnectorError {
    let retryable = || ConnectorError::Retryable {
        backend: BACKEND,
        message: err.to_string(),
        retry_after: None,
    };
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        return retryable();
    }
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => return retryable(),
        ErrorKind::InvalidClientConfig => return ConnectorError::invalid(BACKEND, err.to_string()),
        _ => {}
    }
    match err.code() {
        // BUSY: another script is running; OOM: memory frees up as flushes
        // are acknowledged.
        Some("BUSY" | "LOADING" | "TRYAGAIN" | "OOM") => retryable(),
        Some(PRECONDITION_CODE) => {
            ConnectorError::Precondition(err.detail().unwrap_or_default().to_owned())
        }
        _ => ConnectorError::terminal(BACKEND, err.to_string()),
    }
}

impl From<RedisError> for ConnectorError {
    fn from(err: RedisError) -> Self {
        classify(&err)
    }
}

/// A reconnecting connection to the Redis at `url`, as the buffers use it.
///
/// # Errors
/// `InvalidInput` for a malformed URL, `Retryable` when Redis cannot be
/// reached.
pub async fn connection(url: &str) -> ConnectorResult<ConnectionManager> {
    let client = redis::Client::open(url)
        .map_err(|e| ConnectorError::invalid(BACKEND, format!("{url}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        // Generous: a flush of many entities is one script.
        .set_response_timeout(Some(Duration::from_secs(30)));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(classify(&io).is_retryable());
        let timeout = RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert!(classify(&timeout).is_retryable());
        let other = RedisError::from((ErrorKind::UnexpectedReturnType, "bad type"));
        assert!(
            matches!(classify(&other), ConnectorError::Terminal { .. }),
            "{other:?}"
        );
    }
}
