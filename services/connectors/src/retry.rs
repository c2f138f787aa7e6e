//! The retries of every call Tidemark makes to a store or to another
//! service, in one place: full-jitter exponential backoff ([`RetryPolicy`],
//! a [`backon`] backoff) for errors the caller calls retryable, a store's
//! `retry_after` hint honoured, and never a sleep past the deadline of the
//! RPC being served ([`crate::deadline`]). Everything else is returned at
//! once.
//!
//! The AWS SDK clients these calls go through have their own retries turned
//! off (`dynamodb::own_retries`, `s3::own_retries`): one loop, not one
//! inside another (three SDK attempts in each of eight would be 24 for one
//! call).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, Retryable as _};
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
    /// The retries of a call to an AWS service whose client has the SDK's
    /// own turned off (`dynamodb::own_retries`, `s3::own_retries`): as
    /// patient as the SDK's three attempts inside each of the default eight
    /// were (an outage of several seconds is waited out, about 8 s expected,
    /// 16 s at most), in steps that start small so a throttled write is sent
    /// again soon.
    pub const AWS: Self = Self {
        max_attempts: 10,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_secs(5),
    };

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

/// The delays of one call's retries under a [`RetryPolicy`]: one fewer
/// than its attempts.
#[derive(Debug)]
pub struct FullJitter {
    policy: RetryPolicy,
    attempt: u32,
}

impl Iterator for FullJitter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.attempt + 1 >= self.policy.max_attempts {
            return None;
        }
        let delay = self.policy.delay(self.attempt);
        self.attempt += 1;
        Some(delay)
    }
}

impl BackoffBuilder for RetryPolicy {
    type Backoff = FullJitter;

    fn build(self) -> FullJitter {
        FullJitter {
            policy: self,
            attempt: 0,
        }
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or the
/// attempts run out (then the last error is returned).
///
/// # Errors
/// The first non-retryable error, or the last retryable one.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, op: F) -> ConnectorResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ConnectorResult<T>>,
{
    retry_when(
        policy,
        what,
        op,
        crate::ConnectorError::is_retryable,
        |e| match e {
            crate::ConnectorError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        },
    )
    .await
}

/// [`retry`] for any error: `retryable` says which to try again, `hint` how
/// long the other side asked to be left alone (used instead of the backoff's
/// delay). A retry that would sleep past the deadline of the RPC being
/// served is not made: the caller gets the error while it can still answer.
///
/// # Errors
/// The first error `retryable` refuses, or the last one.
pub async fn retry_when<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    op: F,
    retryable: impl FnMut(&E) -> bool,
    hint: impl Fn(&E) -> Option<Duration>,
) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    op.retry(policy.clone())
        .sleep(tokio::time::sleep)
        .when(retryable)
        .adjust(|e, next| {
            let delay = next.map(|d| hint(e).unwrap_or(d))?;
            match crate::deadline::remaining() {
                Some(left) if left <= delay => None,
                _ => Some(delay),
            }
        })
        .notify(|e, delay| {
            tracing::debug!(what, delay_ms = delay.as_millis(), error = %e, "retrying");
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use backon::BackoffBuilder as _;

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

    #[tokio::test(start_paused = true)]
    async fn no_retry_sleeps_past_the_deadline_of_the_rpc_being_served() {
        let calls = AtomicU32::new(0);
        let slow = RetryPolicy {
            max_attempts: 100,
            base_delay: Duration::from_millis(400),
            max_delay: Duration::from_millis(400),
        };
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_secs(2);
        let err = crate::deadline::within(deadline, async {
            retry(&slow, "t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(ConnectorError::Retryable {
                    backend: "t",
                    message: "x".into(),
                    retry_after: Some(Duration::from_millis(300)),
                })
            })
            .await
        })
        .await
        .unwrap_err();
        assert!(err.is_retryable());
        // The hint (300 ms) is used instead of the policy's 400 ms, and no
        // sleep ends past the deadline: attempts at 0, 300 … 1,800 ms; an
        // eighth would start at 2,100 ms.
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_backoff_yields_one_delay_fewer_than_the_attempts() {
        assert_eq!(fast().build().count(), 3);
        let one = RetryPolicy {
            max_attempts: 1,
            ..fast()
        };
        assert_eq!(one.build().count(), 0);
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
