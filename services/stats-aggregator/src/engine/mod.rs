//! The aggregator: ingestion into the buffer, flushes to the stats table
//! (each exactly once, DESIGN.md invariant 2), publication of absolute
//! values, and the writer pause of a cut-over (invariant 9).
//!
//! Flushes of one replica run one at a time behind `flush_lock`, and each
//! reads the pause first (from Redis when the replicas share one, see
//! [`crate::shared_pause`]). So a replica that holds its lock after seeing
//! the pause has no flush running and will start none: that is its
//! "quiesced" proof, which it confirms in Redis for the others to see.
//!
//! By concern: `flush` (flushes and their parts), `pause` (the writer pause,
//! the replica's heartbeat and confirmations), `stats` (GetStats).

mod flush;
mod pause;
mod stats;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tidemark_connectors::Buffer;
use tidemark_connectors::capacity::{AdaptiveRate, CapacityMeter};
use tidemark_connectors::retry::{RetryPolicy, retry};
use tidemark_kit::CancellationToken;
use tidemark_proto::stats_aggregator::v1 as pb;
use tokio::sync::Notify;

use crate::convert::{self, Checks};
use crate::dead_letters::{DeadLetter, DeadLetters};
use crate::error::{StatsError, StatsResult};
use crate::event_log::{is_dedup_full, is_replica_shortfall};
use crate::gauges::Gauges;
use crate::publish::Publisher;
use crate::shared_pause::{Pause, SharedPause};
use crate::store::StatsStore;

pub use crate::shared_pause::PauseMode;
pub use tidemark_connectors::now_micros;

#[derive(Default)]
struct Local {
    /// The pause as last read (this process's own when not shared).
    pause: Option<Pause>,
    flush_in_progress: bool,
    last_flush: Option<(u64, SystemTime)>,
    next_flush: Option<SystemTime>,
    /// Until when this replica is surely still registered as live: it stops
    /// writing past it, since others no longer wait for its confirmation.
    registered_until: Option<Instant>,
}

/// What the aggregator needs besides its backends.
#[derive(Clone, Debug)]
pub struct Settings {
    pub dedup_window: Duration,
    pub flush_interval: Duration,
    pub flush_concurrency: usize,
    /// Item writes a second a flush sends at most (0: unlimited until the
    /// store throttles).
    pub flush_write_rate: f64,
    pub key_attribute: String,
    pub retry: RetryPolicy,
    /// How long PauseWriters waits for every replica to confirm, unless the
    /// caller's deadline is sooner.
    pub pause_confirm_timeout: Duration,
    /// Time between a replica's heartbeats and its reads of a shared pause.
    pub heartbeat: Duration,
    /// How long a heartbeat keeps a replica live.
    pub replica_expiry: Duration,
}

impl Settings {
    /// The defaults of everything but the key attribute.
    pub fn new(key_attribute: &str) -> Self {
        Self {
            dedup_window: Duration::from_secs(3600),
            flush_interval: Duration::from_secs(300),
            flush_concurrency: 16,
            flush_write_rate: 0.0,
            key_attribute: key_attribute.to_owned(),
            retry: RetryPolicy::default(),
            pause_confirm_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_millis(250),
            replica_expiry: Duration::from_secs(3),
        }
    }
}

/// Totals of one ingestion call or message.
#[derive(Debug, Default)]
pub struct Ingested {
    pub accepted: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub rejections: Vec<pb::Rejection>,
}

impl Ingested {
    pub fn absorb(&mut self, other: Self) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        let room = convert::MAX_REJECTIONS.saturating_sub(self.rejections.len());
        self.rejections
            .extend(other.rejections.into_iter().take(room));
    }
}

/// What a flush did.
#[derive(Debug, Default, Clone)]
pub struct FlushReport {
    pub sequence: u64,
    pub items_written: i64,
    pub items_already_applied: i64,
    pub records_published: i64,
    /// Entities set aside as dead letters.
    pub items_dead_lettered: i64,
    pub duration: Duration,
    /// Write capacity units the store reported consumed.
    pub write_units_consumed: f64,
    /// Write attempts the store throttled (each retried).
    pub throttled: u64,
}

pub struct Engine {
    buffer: Arc<dyn Buffer>,
    store: Arc<dyn StatsStore>,
    publisher: Option<Publisher>,
    settings: Settings,
    /// Serialises flushes; holds the last sequence this process used.
    flush_lock: tokio::sync::Mutex<u64>,
    local: Mutex<Local>,
    wake: Notify,
    gauges: Option<Gauges>,
    /// The pause shared by the replicas of one buffer; `None`: this
    /// process is the only replica (the embedded buffer).
    shared_pause: Option<SharedPause>,
    /// Where entities refused for good are set aside; `None`: such an
    /// entity fails its flush.
    dead_letters: Option<Arc<dyn DeadLetters>>,
    /// The flush's write rate: the configured one (or unlimited until the
    /// store throttles), backing off on throttling and recovering (AIMD);
    /// its meter counts what the flushes consumed and how often they were
    /// throttled.
    rate: AdaptiveRate,
}

/// Marks a flush as running while alive.
struct Running<'a>(&'a Engine);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.local().flush_in_progress = false;
    }
}

impl Engine {
    pub fn new(
        buffer: Arc<dyn Buffer>,
        store: Arc<dyn StatsStore>,
        publisher: Option<Publisher>,
        settings: Settings,
        gauges: Option<Gauges>,
    ) -> Self {
        Self {
            buffer,
            store,
            publisher,
            rate: AdaptiveRate::new(settings.flush_write_rate, CapacityMeter::new()),
            settings,
            flush_lock: tokio::sync::Mutex::new(0),
            local: Mutex::new(Local::default()),
            wake: Notify::new(),
            gauges,
            shared_pause: None,
            dead_letters: None,
        }
    }

    /// Sets entities the store refuses for good aside in `letters`, so the
    /// rest of a flush goes on.
    #[must_use]
    pub fn with_dead_letters(mut self, letters: Arc<dyn DeadLetters>) -> Self {
        self.dead_letters = Some(letters);
        self
    }

    /// The entities set aside.
    ///
    /// # Errors
    /// The dead-letter store's failure.
    pub async fn dead_letters(&self) -> StatsResult<Vec<DeadLetter>> {
        match &self.dead_letters {
            Some(letters) => Ok(letters.list().await?),
            None => Ok(Vec::new()),
        }
    }

    /// Shares the writer pause with the other replicas of the buffer
    /// through `pause` (run [`Engine::run_replica`] beside it).
    #[must_use]
    pub fn with_shared_pause(mut self, pause: SharedPause) -> Self {
        self.shared_pause = Some(pause);
        self
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        // The state is plain data; a panic elsewhere cannot leave it torn.
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks and buffers one message's events; the first has the call's
    /// event number `base`.
    ///
    /// # Errors
    /// `Rejecting` while writers are paused in REJECT mode; the buffer's
    /// failure.
    pub async fn ingest(&self, events: Vec<pb::Event>, base: u64) -> StatsResult<Ingested> {
        if let Some(p) = self.rejecting().await? {
            let retry_after = p
                .until
                .and_then(|u| u.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            return Err(StatsError::Rejecting {
                reason: p.reason,
                retry_after,
            });
        }
        let checked = convert::events(
            events,
            base,
            &Checks {
                key_attribute: &self.settings.key_attribute,
                now_micros: now_micros(),
            },
        );
        let valid = i64::try_from(checked.events.len()).unwrap_or(i64::MAX);
        let duplicates = if checked.events.is_empty() {
            0
        } else {
            // Safe to retry: ids of a batch that landed make it all duplicates.
            // A batch short of its Redis replicas is not retried here: it
            // waited its timeout already, and the client's resend is as safe
            // (see `EventLogBuffer::with_replica_wait`). Nor is a batch
            // refused for a full id log: it would be until the window passes.
            let dups = retry(&self.settings.retry, "buffer events", || async {
                match self
                    .buffer
                    .apply_events(&checked.events, self.settings.dedup_window)
                    .await
                {
                    Err(e) if is_replica_shortfall(&e) || is_dedup_full(&e) => Ok(Err(e)),
                    other => other.map(Ok),
                }
            })
            .await??;
            i64::try_from(dups.len()).unwrap_or(i64::MAX)
        };
        Ok(Ingested {
            accepted: valid - duplicates,
            duplicates,
            rejected: i64::try_from(checked.rejected).unwrap_or(i64::MAX),
            rejections: checked.rejections,
        })
    }

    /// Refreshes the gauges every `every` until `shutdown`.
    pub async fn run_gauges(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let Some(gauges) = &self.gauges else { return };
        loop {
            match self.buffer.stats().await {
                Ok(stats) => gauges.buffer(&stats, self.current_pause().is_some()),
                Err(e) => tracing::debug!(error = %e, "gauges: buffer stats unavailable"),
            }
            if let Some(letters) = &self.dead_letters {
                match letters.count().await {
                    Ok(n) => gauges.dead_letters(n),
                    Err(e) => tracing::debug!(error = %e, "gauges: dead letters unavailable"),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The buffer and pause state. `quiesced` holds once no flush runs on
    /// this replica and every live replica confirmed the pause.
    ///
    /// # Errors
    /// The buffer's (or the shared pause's) failure.
    pub async fn state(&self) -> StatsResult<pb::BufferState> {
        let stats = self.buffer.stats().await?;
        let (pause, others_confirmed) = match &self.shared_pause {
            None => (self.current_pause(), true),
            Some(shared) => {
                let c = shared.confirmations().await?;
                self.local().pause.clone_from(&c.pause);
                (c.pause, c.missing.is_empty())
            }
        };
        let local = self.local();
        let (last_sequence, last_time) = local.last_flush.map_or((0, None), |(s, t)| (s, Some(t)));
        let paused = pause.is_some();
        Ok(pb::BufferState {
            dirty_keys: i64::try_from(stats.dirty_keys).unwrap_or(i64::MAX),
            pending_events: i64::try_from(stats.pending_events).unwrap_or(i64::MAX),
            last_flush_sequence: last_sequence.max(stats.last_acked.unwrap_or(0)),
            last_flush_time: last_time.map(convert::timestamp),
            next_flush_time: if paused {
                None
            } else {
                local.next_flush.map(convert::timestamp)
            },
            flush_in_progress: local.flush_in_progress,
            paused,
            pause_mode: match pause.as_ref().map(|p| p.mode) {
                None => pb::PauseMode::Unspecified,
                Some(PauseMode::Buffer) => pb::PauseMode::Buffer,
                Some(PauseMode::Reject) => pb::PauseMode::Reject,
            } as i32,
            pause_reason: pause.as_ref().map(|p| p.reason.clone()).unwrap_or_default(),
            pause_time: pause.as_ref().map(|p| convert::timestamp(p.since)),
            auto_resume_time: pause.as_ref().and_then(|p| p.until).map(convert::timestamp),
            quiesced: paused && others_confirmed && !local.flush_in_progress,
        })
    }

    pub async fn ping_store(&self) -> StatsResult<()> {
        Ok(self.store.ping().await?)
    }
}
