//! Flushes: a pending flush completed first, then the buffer taken out
//! under a new sequence and written entity by entity, each write
//! conditional on the sequence (exactly once).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::EntityDelta;
use tidemark_connectors::retry::retry;
use tidemark_kit::CancellationToken;

use super::{Engine, FlushReport, Running, now_micros};
use crate::error::{StatsError, StatsResult};
use crate::store::WriteOutcome;

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
        if !self.registered() {
            return Err(Self::unregistered());
        }
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
