//! The transition log: every change of a job, run, unit or route is
//! recorded with who made it and why, so an operator can replay what happened.

use chrono::Utc;
use tidemark_kit::FieldError;

use super::{Tracker, job_pk, micros, parse, put, run_pk};
use crate::error::TrackerResult;
use crate::kv::{Expect, Op, query_all};
use crate::model::{Change, Run, RunStatus, Transition, Unit, UnitStatus};
use std::sync::atomic::Ordering;

impl Tracker {
    /// A transition record. Sort keys are time-ordered, made unique across
    /// replicas by a random suffix.
    pub(super) fn transition(&self, pk: &str, mut t: Transition) -> TrackerResult<Op> {
        let now = micros(t.time).max(0).unsigned_abs();
        let local = self.sequence.fetch_add(1, Ordering::Relaxed) % 1000;
        t.sequence = now * 1000 + local;
        let sk = format!("t#{:020}#{:08x}", t.sequence, rand::random::<u32>());
        put(pk, &sk, &t, Expect::Absent)
    }

    pub(super) fn run_transition(
        &self,
        run: &Run,
        from: Option<RunStatus>,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<Op> {
        self.transition(
            &job_pk(&run.job_name),
            Transition {
                sequence: 0,
                job_name: run.job_name.clone(),
                run_id: run.run_id.clone(),
                unit_key: String::new(),
                time: Utc::now(),
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                fencing_token: 0,
                change: Change::RunStatus {
                    from,
                    to: run.status,
                },
            },
        )
    }

    pub(super) fn unit_transition(
        &self,
        unit: &Unit,
        from: Option<UnitStatus>,
        actor: &str,
        reason: &str,
        token: u64,
    ) -> TrackerResult<Op> {
        self.transition(
            &run_pk(&unit.run_id),
            Transition {
                sequence: 0,
                job_name: unit.job_name.clone(),
                run_id: unit.run_id.clone(),
                unit_key: unit.unit_key.clone(),
                time: Utc::now(),
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                fencing_token: token,
                change: Change::UnitStatus {
                    from,
                    to: unit.status,
                },
            },
        )
    }

    /// Transitions of a job, a run or a unit, oldest first.
    pub async fn list_transitions(
        &self,
        job_name: &str,
        run_id: &str,
        unit_key: &str,
    ) -> TrackerResult<Vec<Transition>> {
        let job = if run_id.is_empty() {
            job_name.to_owned()
        } else {
            self.run_job_name(run_id).await?
        };
        if job.is_empty() {
            return Err(FieldError::new("job_name", "give a job name or a run id").into());
        }
        self.load_job(&job).await?;
        let mut out: Vec<Transition> = query_all(self.kv.as_ref(), &job_pk(&job), "t#")
            .await?
            .iter()
            .map(parse)
            .collect::<TrackerResult<_>>()?;
        let runs: Vec<String> = if run_id.is_empty() {
            query_all(self.kv.as_ref(), &job_pk(&job), "run#")
                .await?
                .into_iter()
                .map(|e| e.sk[4..].to_owned())
                .collect()
        } else {
            vec![run_id.to_owned()]
        };
        for run in runs {
            for entry in query_all(self.kv.as_ref(), &run_pk(&run), "t#").await? {
                out.push(parse(&entry)?);
            }
        }
        out.retain(|t| {
            (run_id.is_empty() || t.run_id == run_id)
                && (unit_key.is_empty() || t.unit_key == unit_key)
        });
        out.sort_by_key(|t| t.sequence);
        Ok(out)
    }
}
