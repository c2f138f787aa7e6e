//! Retries with full-jitter exponential backoff for retryable connector
//! errors; everything else is returned at once.

use std::future::Future;
use std::time::Duration;

use rand::Rng as _;

use crate::error::ConnectorResult;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`: uniform in `[0, min(max, base·2^attempt)]`
    /// (full jitter spreads replicas that were throttled together).
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or the
/// attempts run out (then the last error is returned).
///
/// # Errors
/// The first non-retryable error, or the last retryable one.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> ConnectorResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ConnectorResult<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && attempt + 1 < policy.max_attempts => {
                let hinted = match &e {
                    crate::ConnectorError::Retryable { retry_after, .. } => *retry_after,
                    _ => None,
                };
                let delay = hinted.unwrap_or_else(|| policy.delay(attempt));
                tracing::debug!(what, attempt, delay_ms = delay.as_millis(), error = %e, "retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::ConnectorError;

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_retryable_until_success() {
        let calls = AtomicU32::new(0);
        let out = retry(&fast(), "t", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(ConnectorError::Retryable {
                    backend: "t",
                    message: "slow down".into(),
                    retry_after: None,
                })
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn does_not_retry_terminal_or_precondition() {
        let calls = AtomicU32::new(0);
        let err = retry(&fast(), "t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(ConnectorError::Precondition("newer version".into()))
        })
        .await
        .unwrap_err();
        assert!(err.is_precondition());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let calls = AtomicU32::new(0);
        let err = retry(&fast(), "t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(ConnectorError::Retryable {
                backend: "t",
                message: "x".into(),
                retry_after: None,
            })
        })
        .await
        .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn delay_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        for attempt in 0..30 {
            assert!(p.delay(attempt) <= Duration::from_millis(300));
        }
    }
}
