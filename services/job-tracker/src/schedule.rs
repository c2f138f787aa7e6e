//! Schedules: cron expressions (with a seconds field) evaluated by the
//! job-tracker itself. A due run starts only when the failure gate is open
//! and no run of the job is active; otherwise it waits up to the schedule's
//! max wait and is then recorded as SKIPPED with the reason.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tidemark_kit::CancellationToken;

use crate::engine::{StartRun, Tracker};
use crate::error::TrackerResult;
use crate::model::RunTrigger;

// Kept reachable under `schedule::` where callers first found them.
pub use crate::calendar::{next_fire, parse_cron, parse_zone};

/// One pass over the scheduled jobs: start, wait or skip what is due.
///
/// # Errors
/// When the store fails.
pub async fn tick(tracker: &Tracker, now: DateTime<Utc>) -> TrackerResult<()> {
    for (mut job, rev) in tracker.scheduled_jobs().await? {
        let (Some(schedule), Some(due)) = (job.schedule.clone(), job.next_run_time) else {
            continue;
        };
        if due > now {
            continue;
        }
        let next = next_fire(&schedule, now).unwrap_or(None);
        if job.blocking_run_id.is_none() && job.active_run_id.is_none() {
            // The correlation id makes the start idempotent across replicas.
            let started = tracker
                .start_run(StartRun {
                    job_name: job.name.clone(),
                    units: Vec::new(),
                    trigger: RunTrigger::Schedule,
                    correlation_id: format!("schedule:{}", due.to_rfc3339()),
                    actor: "scheduler".to_owned(),
                    reason: format!("scheduled for {}", due.to_rfc3339()),
                    force_remigrate: false,
                    window_start: None,
                    scheduled_time: Some(due),
                })
                .await;
            if let Err(e) = started {
                tracing::warn!(job = %job.name, error = %e, "scheduled run did not start");
            }
            let (mut fresh, fresh_rev) = tracker.load_job_with_rev(&job.name).await?;
            fresh.next_run_time = next;
            fresh.due_since = None;
            tracker.save_schedule_state(&fresh, fresh_rev).await?;
            continue;
        }
        if let Some(active) = &job.active_run_id {
            match tracker.finish_scheduled_start(active).await {
                Ok(true) => {
                    tracing::info!(job = %job.name, run = %active, "finished the interrupted start of a scheduled run");
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job = %job.name, run = %active, error = %e, "an interrupted scheduled start is still unfinished");
                }
            }
        }
        let waiting_since = *job.due_since.get_or_insert(now);
        let max_wait =
            chrono::Duration::milliseconds(i64::try_from(schedule.max_wait_ms).unwrap_or(i64::MAX));
        if now - waiting_since < max_wait {
            tracker.save_schedule_state(&job, rev).await?;
            continue;
        }
        let reason = match (&job.blocking_run_id, &job.active_run_id) {
            (Some(run), _) => {
                format!("skipped: the job is blocked by failed run {run} awaiting acknowledgement")
            }
            (None, Some(run)) => format!("skipped: run {run} was still active"),
            (None, None) => "skipped".to_owned(),
        };
        job.next_run_time = next;
        job.due_since = None;
        // Advance first: only the replica that wins records the skip.
        if tracker.save_schedule_state(&job, rev).await? {
            tracker.record_skipped(&job.name, due, &reason).await?;
            tracing::info!(job = %job.name, %reason, "scheduled run skipped");
        }
    }
    Ok(())
}

/// Runs [`tick`] every `every` until `shutdown`.
pub async fn run(tracker: Arc<Tracker>, every: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = tick(&tracker, Utc::now()).await {
            tracing::warn!(error = %e, "scheduler pass failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
