//! The deadline of the RPC being served, for the calls made on its behalf.
//!
//! The server sets it around each RPC (the caller's `grpc-timeout`, or the
//! server's own request timeout when that is sooner); [`crate::retry`] makes
//! no retry that would sleep past it, and the outgoing calls to other
//! services carry what is left of it as their own `grpc-timeout`, so a
//! downstream call never outlives the caller that is waiting for it. Work
//! spawned to run in the background has no deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work` with `deadline`, or with the current one when that is sooner
/// (a nested scope never extends its caller's).
pub async fn within<F: Future>(deadline: Instant, work: F) -> F::Output {
    let deadline = current().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, work).await
}

/// The deadline of the RPC being served, if any.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// The time left until [`current`] (zero once it passed); `None` outside
/// any RPC.
pub fn remaining() -> Option<Duration> {
    current().map(|d| d.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_nested_scope_keeps_the_sooner_deadline() {
        assert_eq!(remaining(), None);
        let now = Instant::now();
        within(now + Duration::from_secs(5), async {
            assert_eq!(remaining(), Some(Duration::from_secs(5)));
            within(now + Duration::from_secs(60), async {
                assert_eq!(remaining(), Some(Duration::from_secs(5)));
            })
            .await;
            within(now + Duration::from_secs(1), async {
                assert_eq!(remaining(), Some(Duration::from_secs(1)));
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert_eq!(remaining(), Some(Duration::ZERO));
            })
            .await;
        })
        .await;
        assert_eq!(remaining(), None);
    }
}
