//! The aggregator: ingestion into the buffer, flushes to the stats table
//! (each exactly once, DESIGN.md invariant 2), publication of absolute
//! values, and the writer pause of a cut-over (invariant 9).
//!
//! Flushes run one at a time behind `flush_lock`. A pause is set before the
//! lock is taken, so once PauseWriters holds the lock no flush is running
//! and every later one sees the pause: that is the "quiesced" proof.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::retry::{RetryPolicy, retry};
use tidemark_connectors::{Buffer, EntityDelta};
use tidemark_kit::{CancellationToken, FieldError};
use tidemark_proto::stats_aggregator::v1 as pb;
use tokio::sync::Notify;

use crate::convert::{self, Checks};
use crate::decimal;
use crate::error::{StatsError, StatsResult};
use crate::gauges::Gauges;
use crate::publish::Publisher;
use crate::store::{StatsStore, WriteOutcome};

pub use tidemark_connectors::now_micros;

/// How paused writers treat new events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseMode {
    Buffer,
    Reject,
}

#[derive(Clone, Debug)]
struct Pause {
    mode: PauseMode,
    reason: String,
    since: SystemTime,
    until: Option<SystemTime>,
}

#[derive(Default)]
struct Shared {
    pause: Option<Pause>,
    flush_in_progress: bool,
    last_flush: Option<(u64, SystemTime)>,
    next_flush: Option<SystemTime>,
}

/// What the aggregator needs besides its backends.
#[derive(Clone, Debug)]
pub struct Settings {
    pub dedup_window: Duration,
    pub flush_interval: Duration,
    pub flush_concurrency: usize,
    pub key_attribute: String,
    pub retry: RetryPolicy,
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
    pub duration: Duration,
}

pub struct Engine {
    buffer: Arc<dyn Buffer>,
    store: Arc<dyn StatsStore>,
    publisher: Option<Publisher>,
    settings: Settings,
    /// Serialises flushes; holds the last sequence this process used.
    flush_lock: tokio::sync::Mutex<u64>,
    shared: Mutex<Shared>,
    wake: Notify,
    gauges: Option<Gauges>,
}

/// Marks a flush as running while alive.
struct Running<'a>(&'a Engine);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.shared().flush_in_progress = false;
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
            settings,
            flush_lock: tokio::sync::Mutex::new(0),
            shared: Mutex::new(Shared::default()),
            wake: Notify::new(),
            gauges,
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The state is plain data; a panic elsewhere cannot leave it torn.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pause in force, ending it first if its `max_pause` has passed.
    fn current_pause(&self) -> Option<Pause> {
        let mut shared = self.shared();
        if let Some(until) = shared.pause.as_ref().and_then(|p| p.until)
            && SystemTime::now() >= until
        {
            tracing::info!("writers resumed by themselves: max_pause elapsed");
            shared.pause = None;
            self.wake.notify_waiters();
        }
        shared.pause.clone()
    }

    /// Checks and buffers one message's events; the first has the call's
    /// event number `base`.
    ///
    /// # Errors
    /// `Rejecting` while writers are paused in REJECT mode; the buffer's
    /// failure.
    pub async fn ingest(&self, events: Vec<pb::Event>, base: u64) -> StatsResult<Ingested> {
        if let Some(p) = self.current_pause()
            && p.mode == PauseMode::Reject
        {
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
            let dups = retry(&self.settings.retry, "buffer events", || {
                self.buffer
                    .apply_events(&checked.events, self.settings.dedup_window)
            })
            .await?;
            i64::try_from(dups.len()).unwrap_or(i64::MAX)
        };
        Ok(Ingested {
            accepted: valid - duplicates,
            duplicates,
            rejected: i64::try_from(checked.rejected).unwrap_or(i64::MAX),
            rejections: checked.rejections,
        })
    }

    /// Flushes now: first completes a flush left pending by a crash, then
    /// takes out everything buffered and writes it. Waits for a flush
    /// already running.
    ///
    /// # Errors
    /// `Paused` while writers are paused; a backend's failure (the flush is
    /// then completed by a later one, idempotently).
    #[tracing::instrument(skip_all)]
    pub async fn flush(&self) -> StatsResult<FlushReport> {
        let mut last_sequence = self.flush_lock.lock().await;
        if let Some(p) = self.current_pause() {
            return Err(StatsError::Paused(p.reason));
        }
        self.shared().flush_in_progress = true;
        let _running = Running(self);
        let started = Instant::now();
        let mut report = FlushReport::default();
        let stats = self.buffer.stats().await?;
        if let Some(sequence) = stats.pending_flush {
            let content = self.buffer.take_for_flush(sequence).await?;
            tracing::info!(
                sequence,
                entities = content.len(),
                "completing an interrupted flush"
            );
            self.write(sequence, content, &mut report).await?;
            self.buffer.ack_flush(sequence).await?;
            *last_sequence = (*last_sequence).max(sequence);
            self.completed(sequence);
        }
        // Strictly above every sequence used, and at least the clock in
        // microseconds: should the buffer lose its memory of the last one
        // (a Redis failover), the next flush still sorts after it, instead of
        // being skipped by the store as already applied.
        let sequence = [
            *last_sequence + 1,
            stats.last_acked.unwrap_or(0) + 1,
            stats.pending_flush.unwrap_or(0) + 1,
            u64::try_from(now_micros()).unwrap_or(0),
        ]
        .into_iter()
        .max()
        .unwrap_or(1);
        let content = self.buffer.take_for_flush(sequence).await?;
        if !content.is_empty() {
            *last_sequence = sequence;
            self.write(sequence, content, &mut report).await?;
            self.buffer.ack_flush(sequence).await?;
            self.completed(sequence);
        }
        report.duration = started.elapsed();
        if let Some(g) = &self.gauges {
            g.flushed(&report);
        }
        Ok(report)
    }

    fn completed(&self, sequence: u64) {
        self.shared().last_flush = Some((sequence, SystemTime::now()));
    }

    async fn write(
        &self,
        sequence: u64,
        content: Vec<EntityDelta>,
        report: &mut FlushReport,
    ) -> StatsResult<()> {
        let outcomes: Vec<(bool, bool)> = futures::stream::iter(content)
            .map(|delta| self.write_one(sequence, delta))
            .buffer_unordered(self.settings.flush_concurrency.max(1))
            .try_collect()
            .await?;
        for (written, published) in outcomes {
            if written {
                report.items_written += 1;
            } else {
                report.items_already_applied += 1;
            }
            if published {
                report.records_published += 1;
            }
        }
        report.sequence = sequence;
        Ok(())
    }

    /// Writes one entity of flush `sequence` and publishes the result:
    /// (written, published).
    async fn write_one(&self, sequence: u64, delta: EntityDelta) -> StatsResult<(bool, bool)> {
        let policy = &self.settings.retry;
        let outcome = retry(policy, "update stats item", || {
            self.store.apply(&delta, sequence)
        })
        .await?;
        let (written, item) = match outcome {
            WriteOutcome::Written(item) => (true, Some(item)),
            WriteOutcome::AlreadyApplied(item) => {
                // Applied before a crash, maybe never published: publish the
                // item as it is (absolute values are safe to send twice).
                let item = match item {
                    Some(item) => Some(item),
                    None if self.publisher.is_some() => {
                        retry(policy, "read stats item", || self.store.get(&delta.entity)).await?
                    }
                    None => None,
                };
                if let Some(i) = &item
                    && i.last_flush_sequence > sequence
                {
                    tracing::error!(
                        entity = %delta.entity,
                        sequence,
                        stored = i.last_flush_sequence,
                        "the item carries a later flush than this one; this flush's changes to it were skipped"
                    );
                }
                (false, item)
            }
        };
        let mut published = false;
        if let (Some(publisher), Some(item)) = (&self.publisher, &item) {
            retry(policy, "publish stats item", || {
                publisher.publish(&delta.entity, item)
            })
            .await?;
            published = true;
        }
        Ok((written, published))
    }

    /// Flushes every `flush_interval` until `shutdown`; at start-up at once
    /// when a flush was left pending by a crash.
    pub async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken) {
        let interval = self.settings.flush_interval;
        let mut due = match self.buffer.stats().await {
            Ok(s) if s.pending_flush.is_some() => Instant::now(),
            _ => Instant::now() + interval,
        };
        loop {
            let pause = self.current_pause();
            if let Some(until) = pause.as_ref().and_then(|p| p.until) {
                // Wake for the auto-resume rather than a whole interval later.
                let left = until.duration_since(SystemTime::now()).unwrap_or_default();
                due = due.min(Instant::now() + left);
            }
            self.shared().next_flush =
                Some(SystemTime::now() + due.saturating_duration_since(Instant::now()));
            let woken = self.wake.notified();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due.into()) => {}
                () = woken => continue,
            }
            if self.current_pause().is_none() {
                match self.flush().await {
                    Ok(r) if r.sequence > 0 => tracing::debug!(
                        sequence = r.sequence,
                        written = r.items_written,
                        already_applied = r.items_already_applied,
                        "flushed"
                    ),
                    Ok(_) | Err(StatsError::Paused(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "flush failed; the next one completes it"),
                }
            }
            due = Instant::now() + interval;
        }
    }

    /// Refreshes the gauges every `every` until `shutdown`.
    pub async fn run_gauges(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let Some(gauges) = &self.gauges else { return };
        loop {
            match self.buffer.stats().await {
                Ok(stats) => gauges.buffer(&stats, self.current_pause().is_some()),
                Err(e) => tracing::debug!(error = %e, "gauges: buffer stats unavailable"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Pauses the writers; returns once no flush is running.
    ///
    /// # Errors
    /// The buffer's failure while reading the state (the pause holds).
    pub async fn pause(
        &self,
        mode: PauseMode,
        reason: String,
        max_pause: Option<Duration>,
    ) -> StatsResult<pb::BufferState> {
        let now = SystemTime::now();
        {
            let mut shared = self.shared();
            let since = shared.pause.as_ref().map_or(now, |p| p.since);
            shared.pause = Some(Pause {
                mode,
                reason: reason.clone(),
                since,
                until: max_pause.map(|d| now + d),
            });
        }
        self.wake.notify_waiters();
        tracing::info!(?mode, %reason, ?max_pause, "writers paused");
        // A flush that started before the pause finishes first; any later
        // one sees the pause.
        drop(self.flush_lock.lock().await);
        self.state().await
    }

    /// Ends the pause; with `flush_now`, flushes before returning.
    ///
    /// # Errors
    /// The flush's failure (writers stay resumed).
    pub async fn resume(&self, flush_now: bool) -> StatsResult<pb::BufferState> {
        let was = self.shared().pause.take();
        self.wake.notify_waiters();
        if was.is_some() {
            tracing::info!("writers resumed");
        }
        if flush_now {
            self.flush().await?;
        }
        self.state().await
    }

    /// The buffer and pause state.
    ///
    /// # Errors
    /// The buffer's failure.
    pub async fn state(&self) -> StatsResult<pb::BufferState> {
        let stats = self.buffer.stats().await?;
        let pause = self.current_pause();
        let shared = self.shared();
        let (last_sequence, last_time) = shared.last_flush.map_or((0, None), |(s, t)| (s, Some(t)));
        let paused = pause.is_some();
        Ok(pb::BufferState {
            dirty_keys: i64::try_from(stats.dirty_keys).unwrap_or(i64::MAX),
            pending_events: i64::try_from(stats.pending_events).unwrap_or(i64::MAX),
            last_flush_sequence: last_sequence.max(stats.last_acked.unwrap_or(0)),
            last_flush_time: last_time.map(convert::timestamp),
            next_flush_time: if paused {
                None
            } else {
                shared.next_flush.map(convert::timestamp)
            },
            flush_in_progress: shared.flush_in_progress,
            paused,
            pause_mode: match pause.as_ref().map(|p| p.mode) {
                None => pb::PauseMode::Unspecified,
                Some(PauseMode::Buffer) => pb::PauseMode::Buffer,
                Some(PauseMode::Reject) => pb::PauseMode::Reject,
            } as i32,
            pause_reason: pause.as_ref().map(|p| p.reason.clone()).unwrap_or_default(),
            pause_time: pause.as_ref().map(|p| convert::timestamp(p.since)),
            auto_resume_time: pause.as_ref().and_then(|p| p.until).map(convert::timestamp),
            quiesced: paused && !shared.flush_in_progress,
        })
    }

    /// An entity's stored values and what is still buffered for it.
    ///
    /// # Errors
    /// `Invalid` for an empty key, `NotFound` when neither stored nor
    /// buffered, a backend's failure.
    pub async fn get_stats(
        &self,
        entity: &str,
        metrics: &[String],
    ) -> StatsResult<pb::GetStatsResponse> {
        if entity.is_empty() {
            return Err(FieldError::required("entity_key").into());
        }
        let (stored, pending, live) = tokio::try_join!(
            self.store.get(entity),
            self.buffer.peek_pending(entity),
            self.buffer.peek(entity),
        )?;
        // A pending flush already applied to the item is in its stored values.
        let pending = pending.filter(|(sequence, _)| {
            stored
                .as_ref()
                .is_none_or(|s| s.last_flush_sequence < *sequence)
        });
        let live_empty = live.increments.is_empty() && live.replaces.is_empty();
        if stored.is_none() && pending.is_none() && live_empty {
            return Err(StatsError::NotFound(format!(
                "entity {entity:?} is neither stored nor buffered"
            )));
        }
        let mut buffered: BTreeMap<String, Buffered> = BTreeMap::new();
        if let Some((_, delta)) = &pending {
            fold(&mut buffered, delta);
        }
        fold(&mut buffered, &live);
        let stored_values = stored
            .as_ref()
            .map(|s| s.metrics(&self.settings.key_attribute))
            .unwrap_or_default();
        let wanted: BTreeSet<&str> = metrics.iter().map(String::as_str).collect();
        let names: BTreeSet<&str> = stored_values
            .keys()
            .chain(buffered.keys())
            .map(String::as_str)
            .filter(|m| wanted.is_empty() || wanted.contains(m))
            .collect();
        let mut out = BTreeMap::new();
        for name in names {
            let stored_value = stored_values.get(name).cloned().unwrap_or_default();
            let b = buffered.get(name).cloned().unwrap_or_default();
            let base = b
                .replace
                .clone()
                .or_else(|| (!stored_value.is_empty()).then(|| stored_value.clone()))
                .unwrap_or_else(|| "0".to_owned());
            let effective = decimal::add(&base, b.delta).map_err(|e| {
                StatsError::Backend(tidemark_connectors::ConnectorError::terminal("stats", e))
            })?;
            out.insert(
                name.to_owned(),
                pb::MetricValue {
                    stored_value,
                    pending_delta: i64::try_from(b.delta).unwrap_or(if b.delta < 0 {
                        i64::MIN
                    } else {
                        i64::MAX
                    }),
                    pending_replace: b.replace,
                    effective_value: effective,
                },
            );
        }
        let last_event = [
            stored.as_ref().and_then(|s| s.last_event_micros),
            pending.as_ref().and_then(|(_, d)| d.last_event_micros),
            live.last_event_micros,
        ]
        .into_iter()
        .flatten()
        .max();
        Ok(pb::GetStatsResponse {
            entity_key: entity.to_owned(),
            metrics: out.into_iter().collect(),
            version: stored.as_ref().map_or(0, |s| s.version),
            last_flush_sequence: stored.as_ref().map_or(0, |s| s.last_flush_sequence),
            last_event_time: last_event.map(convert::timestamp_micros),
        })
    }

    pub async fn ping_store(&self) -> StatsResult<()> {
        Ok(self.store.ping().await?)
    }
}

/// A metric's buffered change: a replacement (or none) and the increments
/// after it.
#[derive(Clone, Debug, Default)]
struct Buffered {
    replace: Option<String>,
    delta: i128,
}

/// Folds a later delta onto earlier buffered changes.
fn fold(into: &mut BTreeMap<String, Buffered>, delta: &EntityDelta) {
    for (metric, value) in &delta.replaces {
        into.insert(
            metric.clone(),
            Buffered {
                replace: Some(value.clone()),
                delta: i128::from(delta.increments.get(metric).copied().unwrap_or(0)),
            },
        );
    }
    for (metric, n) in &delta.increments {
        if !delta.replaces.contains_key(metric) {
            into.entry(metric.clone()).or_default().delta += i128::from(*n);
        }
    }
}
