//! The writer pause: set, confirmed by every live replica, ended; and the
//! replica's side of it (heartbeat, reading the pause, confirming it once
//! its flush lock is free).

use std::time::{Duration, Instant, SystemTime};

use tidemark_connectors::ConnectorError;
use tidemark_kit::CancellationToken;
use tidemark_proto::stats_aggregator::v1 as pb;

use super::{Engine, PauseMode};
use crate::error::{StatsError, StatsResult};
use crate::shared_pause::{Pause, SharedPause};

/// Time between two looks at the replicas' confirmations.
const CONFIRM_POLL: Duration = Duration::from_millis(25);

impl Engine {
    /// The pause in force as this replica last saw it, ending it first if
    /// its `max_pause` has passed.
    pub(super) fn current_pause(&self) -> Option<Pause> {
        let mut local = self.local();
        if local
            .pause
            .as_ref()
            .is_some_and(|p| p.ended(SystemTime::now()))
        {
            tracing::info!("writers resumed by themselves: max_pause elapsed");
            local.pause = None;
            self.wake.notify_waiters();
        }
        local.pause.clone()
    }

    /// The pause when it refuses events. A shared pause seen here is read
    /// again from Redis first, so a resume through another replica takes
    /// effect at once rather than at the next heartbeat.
    pub(super) async fn rejecting(&self) -> StatsResult<Option<Pause>> {
        let Some(p) = self.current_pause().filter(|p| p.mode == PauseMode::Reject) else {
            return Ok(None);
        };
        let Some(shared) = &self.shared_pause else {
            return Ok(Some(p));
        };
        let (pause, _) = shared.read().await?;
        self.local().pause.clone_from(&pause);
        Ok(pause.filter(|p| p.mode == PauseMode::Reject))
    }

    /// The check a flush makes under the flush lock: refuses while paused.
    /// A shared pause is read from Redis (never from what this replica last
    /// saw), after making sure this replica is registered as live, so a
    /// PauseWriters elsewhere waits for it.
    pub(super) async fn may_flush(&self) -> StatsResult<()> {
        let pause = match &self.shared_pause {
            None => self.current_pause(),
            Some(shared) => {
                if !self.registered() {
                    self.heartbeat(shared).await?;
                }
                let (pause, _) = shared.read().await?;
                self.local().pause.clone_from(&pause);
                pause
            }
        };
        match pause {
            Some(p) => Err(StatsError::Paused(p.reason)),
            None => Ok(()),
        }
    }

    /// Whether this replica may still write: it is surely still registered
    /// as live (always, when the pause is not shared).
    pub(super) fn registered(&self) -> bool {
        self.shared_pause.is_none()
            || self
                .local()
                .registered_until
                .is_some_and(|until| Instant::now() < until)
    }

    /// The error of a flush stopped because this replica may no longer be
    /// counted as live.
    pub(super) fn unregistered() -> StatsError {
        StatsError::Backend(ConnectorError::Retryable {
            backend: "redis",
            message:
                "this replica's heartbeat lapsed: its flush stopped before a pause could miss it"
                    .to_owned(),
            retry_after: None,
        })
    }

    async fn heartbeat(&self, shared: &SharedPause) -> StatsResult<()> {
        let sent = Instant::now();
        let expiry = self.settings.replica_expiry;
        shared.heartbeat(expiry).await?;
        // Redis counts the expiry from when it ran the script, after `sent`;
        // a third of it is kept as a margin for clock drift and slow writes.
        self.local().registered_until = Some(sent + expiry - expiry / 3);
        Ok(())
    }

    /// Pauses the writers; returns once no flush runs on any live replica
    /// and every one of them has seen the pause. Waits at most `deadline`
    /// (the caller's) or the configured confirmation timeout.
    ///
    /// # Errors
    /// `PauseUnconfirmed` naming the replicas that did not confirm in time
    /// and `PauseEnded` when it was resumed meanwhile (both leave any pause
    /// in force as it is); the buffer's or Redis's failure.
    pub async fn pause(
        &self,
        mode: PauseMode,
        reason: String,
        max_pause: Option<Duration>,
        deadline: Option<Duration>,
    ) -> StatsResult<pb::BufferState> {
        let started = Instant::now();
        let pause = match &self.shared_pause {
            Some(shared) => shared.set(mode, &reason, max_pause).await?,
            None => {
                let now = SystemTime::now();
                Pause {
                    id: 0,
                    mode,
                    reason: reason.clone(),
                    since: self.local().pause.as_ref().map_or(now, |p| p.since),
                    until: max_pause.map(|d| now + d),
                }
            }
        };
        let id = pause.id;
        self.local().pause = Some(pause);
        self.wake.notify_waiters();
        tracing::info!(?mode, %reason, ?max_pause, id, "writers paused");
        // A flush that started before the pause finishes first; any later
        // one sees the pause.
        drop(self.flush_lock.lock().await);
        if let Some(shared) = &self.shared_pause {
            shared.confirm(id).await?;
            let bound = deadline.map_or(self.settings.pause_confirm_timeout, |d| {
                d.min(self.settings.pause_confirm_timeout)
            });
            self.await_confirmations(shared, started, bound).await?;
        }
        self.state().await
    }

    /// Waits until every live replica confirmed the pause in force.
    async fn await_confirmations(
        &self,
        shared: &SharedPause,
        started: Instant,
        bound: Duration,
    ) -> StatsResult<()> {
        loop {
            let c = shared.confirmations().await?;
            if c.pause.is_none() {
                return Err(StatsError::PauseEnded);
            }
            if c.missing.is_empty() {
                tracing::info!(
                    replicas = c.live.len(),
                    "every live replica confirmed the pause"
                );
                return Ok(());
            }
            if started.elapsed() + CONFIRM_POLL > bound {
                tracing::warn!(missing = ?c.missing, "replicas did not confirm the pause in time");
                return Err(StatsError::PauseUnconfirmed {
                    replicas: c.missing,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }

    /// Ends the pause (for every replica); with `flush_now`, flushes before
    /// returning.
    ///
    /// # Errors
    /// Redis's failure (the pause holds); the flush's failure (writers stay
    /// resumed).
    pub async fn resume(&self, flush_now: bool) -> StatsResult<pb::BufferState> {
        let was_shared = match &self.shared_pause {
            Some(shared) => shared.clear().await?,
            None => false,
        };
        let was = self.local().pause.take();
        self.wake.notify_waiters();
        if was.is_some() || was_shared {
            tracing::info!("writers resumed");
        }
        if flush_now {
            self.flush().await?;
        }
        self.state().await
    }

    /// Keeps this replica registered and confirms every shared pause it
    /// sees, until `shutdown`; then unregisters it. Does nothing when the
    /// pause is not shared.
    pub async fn run_replica(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let Some(shared) = &self.shared_pause else {
            return;
        };
        // Two loops: the heartbeat must go on while the watch waits for a
        // long flush to end, or the replica would drop out of the live set
        // (and stop its flush) exactly when it matters.
        tokio::join!(
            self.heartbeats(shared, &shutdown),
            self.watch(shared, &shutdown)
        );
        if let Err(e) = shared.leave().await {
            tracing::debug!(error = %e, "could not unregister the replica");
        }
    }

    async fn heartbeats(&self, shared: &SharedPause, shutdown: &CancellationToken) {
        loop {
            if let Err(e) = self.heartbeat(shared).await {
                tracing::warn!(error = %e, replica = shared.replica(), "heartbeat failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.settings.heartbeat) => {}
            }
        }
    }

    async fn watch(&self, shared: &SharedPause, shutdown: &CancellationToken) {
        loop {
            match shared.read().await {
                Ok((pause, confirmed)) => {
                    let newly = pause.is_some() && self.local().pause.is_none();
                    self.local().pause.clone_from(&pause);
                    if newly {
                        self.wake.notify_waiters();
                    }
                    if let Some(p) = pause.filter(|_| !confirmed) {
                        let lock = tokio::select! {
                            () = shutdown.cancelled() => return,
                            lock = self.flush_lock.lock() => lock,
                        };
                        // Under the lock: no flush of this replica runs, and
                        // the next one reads the pause first.
                        let confirmed = shared.confirm(p.id).await;
                        drop(lock);
                        match confirmed {
                            // Read again at once: a newer pause needs its own.
                            Ok(_) => {
                                tracing::info!(id = p.id, "confirmed the writer pause");
                                continue;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not confirm the pause"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the writer pause"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.settings.heartbeat) => {}
            }
        }
    }
}
