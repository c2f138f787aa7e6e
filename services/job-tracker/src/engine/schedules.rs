//! What the scheduler (`crate::schedule`) reads and writes on the store.

use chrono::{DateTime, Utc};

use super::{JOBS, Tracker, job_pk, job_puts, parse, put, run_pk};
use crate::error::TrackerResult;
use crate::kv::{Expect, Op, query_all};
use crate::model::{Job, Run, RunStatus, RunTrigger};

impl Tracker {
    /// Jobs that have a schedule (the scheduler's work list).
    pub async fn scheduled_jobs(&self) -> TrackerResult<Vec<(Job, u64)>> {
        let mut out = Vec::new();
        for entry in query_all(self.kv.as_ref(), JOBS, "").await? {
            let job: Job = parse(&entry)?;
            if job.schedule.is_some() {
                out.push((job, entry.rev));
            }
        }
        Ok(out)
    }

    /// Records a run that was due but could not start (gate closed, or a
    /// run still active past the schedule's max wait).
    pub async fn record_skipped(
        &self,
        job_name: &str,
        scheduled: DateTime<Utc>,
        reason: &str,
    ) -> TrackerResult<Run> {
        let (job, _) = self.load_job(job_name).await?;
        let run_id = uuid::Uuid::now_v7().to_string();
        let now = Utc::now();
        let run = Run {
            run_id: run_id.clone(),
            job_name: job.name.clone(),
            job_kind: job.kind,
            job_revision: job.revision,
            correlation_id: run_id.clone(),
            trigger: RunTrigger::Schedule,
            actor: "scheduler".to_owned(),
            status: RunStatus::Skipped,
            status_reason: reason.to_owned(),
            create_time: now,
            scheduled_time: Some(scheduled),
            start_time: None,
            finish_time: Some(now),
            window_start: None,
            window_end: None,
            last_processed: None,
            force_remigrate: false,
            explicit_completion: job.explicit_completion,
            max_attempts: job.max_attempts,
            result: None,
            acknowledgement: None,
            window_start_run_id: None,
        };
        self.kv
            .transact(vec![
                put(
                    &job_pk(&job.name),
                    &format!("run#{run_id}"),
                    &run,
                    Expect::Absent,
                )?,
                Op::Put {
                    pk: run_pk(&run_id),
                    sk: "#run".to_owned(),
                    body: job.name.clone(),
                    expect: Expect::Absent,
                },
                self.run_transition(&run, None, "scheduler", reason)?,
            ])
            .await?;
        Ok(run)
    }

    /// Stores the scheduler's bookkeeping on the job (next fire time, since
    /// when the due run waits) if the job did not change meanwhile.
    pub async fn save_schedule_state(&self, job: &Job, rev: u64) -> TrackerResult<bool> {
        Ok(self
            .apply(job_puts(job, Expect::Rev(rev))?)
            .await?
            .is_some())
    }

    pub async fn load_job_with_rev(&self, name: &str) -> TrackerResult<(Job, u64)> {
        self.load_job(name).await
    }
}
