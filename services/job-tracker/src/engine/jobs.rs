//! Job definitions: create (idempotent), read, list, update.

use chrono::Utc;
use tidemark_kit::FieldError;

use super::{JOBS, NewJob, Tracker, job_pk, job_puts, parse};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, Op};
use crate::model::{Change, Job, JobKind, Transition};

impl Tracker {
    pub async fn get_job(&self, name: &str) -> TrackerResult<Job> {
        Ok(self.load_job(name).await?.0)
    }

    /// Creates a job; creating the same definition again returns it.
    pub async fn create_job(&self, new: NewJob, actor: &str) -> TrackerResult<Job> {
        crate::limits::check_spec(new.spec.as_ref())?;
        let now = Utc::now();
        let job = Job {
            name: new.name.clone(),
            kind: new.kind,
            description: new.description,
            spec: new.spec,
            next_run_time: match &new.schedule {
                Some(s) => crate::calendar::next_fire(s, now)
                    .map_err(|e| FieldError::new("job.schedule.cron", e))?,
                None => None,
            },
            schedule: new.schedule,
            default_unit_keys: new.default_unit_keys,
            explicit_completion: new.explicit_completion,
            max_attempts: new.max_attempts,
            max_concurrent_units: new.max_concurrent_units,
            revision: 1,
            create_time: now,
            update_time: now,
            last_run_id: None,
            blocking_run_id: None,
            active_run_id: None,
            last_processed: None,
            last_processed_run_id: None,
            due_since: None,
        };
        let mut ops = job_puts(&job, Expect::Absent)?;
        ops.push(self.job_transition(&job, actor, "created", vec!["*".to_owned()])?);
        if self.apply(ops).await?.is_some() {
            return Ok(job);
        }
        let existing = self.get_job(&job.name).await?;
        let same = existing.kind == job.kind
            && existing.description == job.description
            && existing.spec == job.spec
            && existing.schedule == job.schedule
            && existing.default_unit_keys == job.default_unit_keys
            && existing.explicit_completion == job.explicit_completion
            && existing.max_attempts == job.max_attempts
            && existing.max_concurrent_units == job.max_concurrent_units;
        if same {
            Ok(existing)
        } else {
            Err(TrackerError::AlreadyExists(format!(
                "job {:?} already exists with a different definition; pick another name or use UpdateJob",
                job.name
            )))
        }
    }

    /// A page of jobs in name order, after `after`; the next page token is
    /// the last name when the page was full.
    pub async fn list_jobs(
        &self,
        kind: Option<JobKind>,
        after: Option<&str>,
        limit: usize,
    ) -> TrackerResult<(Vec<Job>, Option<String>)> {
        let limit = limit.max(1);
        let page = self.kv.query(JOBS, "", after, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|e| e.sk.clone()))
            .flatten();
        let mut jobs = Vec::with_capacity(page.len());
        for entry in &page {
            let job: Job = parse(entry)?;
            if kind.is_none_or(|k| k == job.kind) {
                jobs.push(job);
            }
        }
        Ok((jobs, next))
    }

    /// Changes the listed fields of a job (revision + 1). `expected` guards
    /// against lost updates when non-zero.
    pub async fn update_job(
        &self,
        patch: NewJob,
        fields: &[String],
        expected: u64,
        actor: &str,
    ) -> TrackerResult<Job> {
        let fields: Vec<String> = fields.to_vec();
        if fields.iter().any(|f| f == "spec") {
            crate::limits::check_spec(patch.spec.as_ref())?;
        }
        self.retrying("update job", || async {
            let (mut job, rev) = self.load_job(&patch.name).await?;
            if expected != 0 && job.revision != expected {
                return Err(TrackerError::Precondition(format!(
                    "job {:?} is at revision {}, not {expected}; re-read it and retry",
                    job.name, job.revision
                )));
            }
            for field in &fields {
                match field.as_str() {
                    "description" => job.description.clone_from(&patch.description),
                    "spec" => job.spec.clone_from(&patch.spec),
                    "schedule" => {
                        job.schedule.clone_from(&patch.schedule);
                        job.next_run_time = match &job.schedule {
                            Some(s) => crate::calendar::next_fire(s, Utc::now())
                                .map_err(|e| FieldError::new("job.schedule.cron", e))?,
                            None => None,
                        };
                    }
                    "default_unit_keys" => {
                        job.default_unit_keys.clone_from(&patch.default_unit_keys);
                    }
                    "explicit_completion" => job.explicit_completion = patch.explicit_completion,
                    "max_attempts" => job.max_attempts = patch.max_attempts,
                    "max_concurrent_units" => job.max_concurrent_units = patch.max_concurrent_units,
                    other => {
                        return Err(FieldError::new(
                            "update_mask",
                            format!("{other:?} cannot be updated"),
                        )
                        .into());
                    }
                }
            }
            job.revision += 1;
            job.update_time = Utc::now();
            let mut ops = job_puts(&job, Expect::Rev(rev))?;
            ops.push(self.job_transition(&job, actor, "updated", fields.clone())?);
            Ok(self.apply(ops).await?.map(|()| job))
        })
        .await
    }

    /// The history record of a job's creation or update (`fields`), at its
    /// revision and update time.
    fn job_transition(
        &self,
        job: &Job,
        actor: &str,
        reason: &str,
        fields: Vec<String>,
    ) -> TrackerResult<Op> {
        self.transition(
            &job_pk(&job.name),
            Transition {
                sequence: 0,
                job_name: job.name.clone(),
                run_id: String::new(),
                unit_key: String::new(),
                time: job.update_time,
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                fencing_token: 0,
                change: Change::JobUpdate {
                    revision: job.revision,
                    fields,
                },
            },
        )
    }
}
