//! Flushes: a pending flush completed first, then the buffer taken out
//! under a new sequence and written entity by entity, each write
//! conditional on the sequence (exactly once).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::capacity::metered;
use tidemark_connectors::retry::retry;
use tidemark_connectors::{ConnectorError, EntityDelta};
use tidemark_kit::CancellationToken;

use super::{Engine, FlushReport, Running, now_micros};
use crate::dead_letters::{DeadLetter, DeadLetters, Stage};
use crate::error::{StatsError, StatsResult};
use crate::store::{Part, WriteOutcome};

/// What became of one entity of a flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Written,
    AlreadyApplied,
    DeadLettered,
}

struct Written {
    fate: Fate,
    published: bool,
}

impl Written {
    fn dead_lettered() -> Self {
        Self {
            fate: Fate::DeadLettered,
            published: false,
        }
    }
}

/// Whether the store refused this entity's change for good: invalid for
/// the store (not a fault of the store itself, which would be retryable or
/// terminal for every entity alike).
fn poisoned(e: &ConnectorError) -> bool {
    matches!(e, ConnectorError::InvalidInput { .. })
}

/// The dead letter of `delta` of flush `sequence`; `parts` is (applied, of).
fn letter(
    sequence: u64,
    stage: Stage,
    error: &ConnectorError,
    delta: EntityDelta,
    parts: (u32, u32),
) -> DeadLetter {
    DeadLetter {
        entity: delta.entity.clone(),
        sequence,
        stage,
        reason: error.to_string(),
        delta,
        applied_parts: parts.0,
        parts: parts.1,
        at_micros: now_micros(),
    }
}

/// The parts of one entity's delta as one delta.
pub(super) fn merged(entity: &str, parts: Option<&[EntityDelta]>) -> EntityDelta {
    let mut out = EntityDelta {
        entity: entity.to_owned(),
        ..EntityDelta::default()
    };
    for p in parts.unwrap_or_default() {
        out.increments.extend(p.increments.clone());
        out.replaces.extend(p.replaces.clone());
        out.last_event_micros = out.last_event_micros.max(p.last_event_micros);
    }
    out
}

impl Engine {
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
        self.may_flush().await?;
        self.local().flush_in_progress = true;
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
        self.local().last_flush = Some((sequence, SystemTime::now()));
    }

    async fn write(
        &self,
        sequence: u64,
        content: Vec<EntityDelta>,
        report: &mut FlushReport,
    ) -> StatsResult<()> {
        let meter = self.rate.meter();
        let (consumed, throttled) = (meter.consumed(), meter.throttled());
        let writes = futures::stream::iter(content)
            .map(|delta| self.write_one(sequence, delta))
            .buffer_unordered(self.settings.flush_concurrency.max(1))
            .try_collect();
        let outcomes: Vec<Written> = metered(Arc::clone(meter), writes).await?;
        report.write_units_consumed += meter.consumed() - consumed;
        report.throttled += meter.throttled() - throttled;
        for outcome in outcomes {
            match outcome.fate {
                Fate::Written => report.items_written += 1,
                Fate::AlreadyApplied => report.items_already_applied += 1,
                Fate::DeadLettered => report.items_dead_lettered += 1,
            }
            if outcome.published {
                report.records_published += 1;
            }
        }
        report.sequence = sequence;
        Ok(())
    }

    /// Writes one entity of flush `sequence`, part by part, and publishes
    /// the result. An entity the store refuses for good is set aside as a
    /// dead letter (its parts from the refused one on), so it does not
    /// hold up the others.
    async fn write_one(&self, sequence: u64, delta: EntityDelta) -> StatsResult<Written> {
        let policy = &self.settings.retry;
        let parts = self.store.split(&delta);
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let (mut fate, mut item) = (Fate::AlreadyApplied, None);
        for (index, part) in (1..).zip(&parts) {
            if !self.registered() {
                return Err(Self::unregistered());
            }
            let at = Part { index, count };
            match retry(policy, "update stats item", || async {
                self.rate.acquire().await;
                self.store.apply_part(part, sequence, at).await
            })
            .await
            {
                Ok(WriteOutcome::Written(now)) => (fate, item) = (Fate::Written, Some(now)),
                Ok(WriteOutcome::AlreadyApplied(now)) => item = now.or(item),
                Err(e) => {
                    let Some(letters) = self.dead_letters.as_ref().filter(|_| poisoned(&e)) else {
                        return Err(e.into());
                    };
                    let rest = merged(&delta.entity, parts.get(at.index as usize - 1..));
                    let letter = letter(sequence, Stage::Write, &e, rest, (index - 1, count));
                    self.set_aside(letters.as_ref(), letter).await?;
                    return Ok(Written::dead_lettered());
                }
            }
        }
        if fate == Fate::AlreadyApplied {
            // Applied before a crash, maybe never published: publish the
            // item as it is (absolute values are safe to send twice).
            if item.is_none() && self.publisher.is_some() {
                item = retry(policy, "read stats item", || self.store.get(&delta.entity)).await?;
            }
            if let Some(i) = item.as_ref().filter(|i| i.last_flush_sequence > sequence) {
                tracing::error!(
                    entity = %delta.entity,
                    sequence,
                    stored = i.last_flush_sequence,
                    "the item carries a later flush than this one; this flush's changes to it were skipped"
                );
            }
        }
        let mut published = false;
        if let (Some(publisher), Some(item)) = (&self.publisher, &item) {
            match retry(policy, "publish stats item", || {
                publisher.publish(&delta.entity, item)
            })
            .await
            {
                Ok(()) => published = true,
                Err(e) => {
                    let Some(letters) = self.dead_letters.as_ref().filter(|_| !e.is_retryable())
                    else {
                        return Err(e.into());
                    };
                    let letter = letter(sequence, Stage::Publish, &e, delta, (count, count));
                    self.set_aside(letters.as_ref(), letter).await?;
                }
            }
        }
        Ok(Written { fate, published })
    }

    /// Keeps `letter`. The flush is not acknowledged before it is kept: a
    /// failure here fails the flush, which is completed later, the letter
    /// written again.
    async fn set_aside(&self, letters: &dyn DeadLetters, letter: DeadLetter) -> StatsResult<()> {
        tracing::error!(
            entity = %letter.entity,
            sequence = letter.sequence,
            stage = ?letter.stage,
            reason = %letter.reason,
            "an entity's change was refused for good; set aside as a dead letter, the flush goes on"
        );
        retry(&self.settings.retry, "keep a dead letter", || {
            letters.put(&letter)
        })
        .await?;
        Ok(())
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
            self.local().next_flush =
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
}
