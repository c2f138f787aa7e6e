//! The job-tracker as the replicator's and the verifier's RPC handlers see
//! it: typed calls instead of hand-built requests, one classification of its
//! answers ([`ServiceError::upstream`]) and the retries of `UNAVAILABLE` in
//! one place. Unit leases (claim, heartbeat, checkpoint, complete, fail with
//! the fencing token) are in [`crate::worker`], built on the same client.

use std::future::Future;
use std::time::Duration;

use prost::Message;
use tidemark_connectors::retry::{RetryPolicy, retry_when};
use tidemark_proto::job_tracker::v1 as jpb;
use tonic::{Code, Status};

use crate::error::ServiceError;
use crate::worker::{JobTrackerClient, job_tracker_client, pack_any, unpack_any};

/// A protobuf message stored as a job's spec (a `google.protobuf.Any`).
pub trait JobSpec: Message + Default {
    /// The message's full name, as in the `Any`'s type URL.
    const TYPE: &'static str;
}

macro_rules! job_specs {
    ($($ty:path => $name:literal),* $(,)?) => {
        $(impl JobSpec for $ty {
            const TYPE: &'static str = $name;
        })*
    };
}

job_specs! {
    tidemark_proto::replicator::v1::BackfillAttributeSpec => "tidemark.replicator.v1.BackfillAttributeSpec",
    tidemark_proto::replicator::v1::MigrateUnitSpec => "tidemark.replicator.v1.MigrateUnitSpec",
    tidemark_proto::replicator::v1::Pipeline => "tidemark.replicator.v1.Pipeline",
    tidemark_proto::replicator::v1::IncrementalExtractSpec => "tidemark.replicator.v1.IncrementalExtractSpec",
    tidemark_proto::verifier::v1::VerificationSpec => "tidemark.verifier.v1.VerificationSpec",
    tidemark_proto::verifier::v1::Report => "tidemark.verifier.v1.Report",
}

/// Packs a spec into the `Any` a job stores.
pub fn pack_spec<T: JobSpec>(spec: &T) -> prost_types::Any {
    pack_any(T::TYPE, spec)
}

/// Unpacks a job's spec; a job of another kind is `FAILED_PRECONDITION`.
///
/// # Errors
/// No spec, a spec of another type, or bytes that do not decode.
pub fn spec_of<T: JobSpec>(job: &jpb::Job) -> Result<T, ServiceError> {
    unpack_any(job.spec.as_ref(), T::TYPE)
        .map_err(|e| ServiceError::precondition(format!("job {:?}: {e}", job.name)))
}

/// What a new run registers.
#[derive(Clone, Debug, Default)]
pub struct NewRun {
    pub job_name: String,
    /// Unit keys; empty: the job's default units.
    pub units: Vec<String>,
    /// The checkpoint some of `units` start from (by key), as if written
    /// before their first claim: a change feed's start position, say.
    pub first_checkpoints: std::collections::BTreeMap<String, Vec<u8>>,
    pub trigger: jpb::RunTrigger,
    pub correlation_id: String,
    pub actor: String,
    pub reason: String,
    pub force_remigrate: bool,
    pub window_start: Option<prost_types::Timestamp>,
}

/// A typed job-tracker client. Cheap to clone.
#[derive(Clone)]
pub struct JobTracker {
    raw: JobTrackerClient,
    retry: RetryPolicy,
}

impl std::fmt::Debug for JobTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTracker").finish_non_exhaustive()
    }
}

impl JobTracker {
    pub fn new(raw: JobTrackerClient) -> Self {
        Self {
            raw,
            retry: RetryPolicy {
                // About 10 s in all: longer than a job-tracker restart.
                max_attempts: 8,
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(4),
            },
        }
    }

    /// Connects lazily to the job-tracker at `url` (the first call dials).
    ///
    /// # Errors
    /// A malformed URL or token.
    pub fn connect(url: &str, token: Option<&str>) -> Result<Self, String> {
        job_tracker_client(url, token).map(Self::new)
    }

    /// The generated client, for the worker loop and the rare call that has
    /// no typed method.
    pub fn raw(&self) -> JobTrackerClient {
        self.raw.clone()
    }

    /// Runs `call` again while the job-tracker cannot be reached (a restart,
    /// a lost connection, a timed-out call), with jittered backoff, within
    /// the deadline of the RPC being served. Only for calls that are safe to
    /// repeat.
    pub(crate) async fn retried<Req, T, F, Fut>(
        &self,
        what: &'static str,
        request: Req,
        call: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: Fn(JobTrackerClient, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // Boxed: a generated call future is large, and callers nest these.
        retry_when(
            &self.retry,
            what,
            || Box::pin(call(self.raw.clone(), request.clone())),
            transient,
            |_| None,
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// Creates `job` unless it exists with the same definition (then the
    /// stored job is returned as is).
    ///
    /// # Errors
    /// `ALREADY_EXISTS` for another definition under the name; the
    /// job-tracker's other refusals; `UNAVAILABLE`.
    pub async fn ensure_job(&self, job: jpb::Job) -> Result<jpb::Job, ServiceError> {
        let request = jpb::CreateJobRequest { job: Some(job) };
        self.retried("create_job", request, |mut c, r| async move {
            c.create_job(r).await
        })
        .await
        .map(|r| r.job.unwrap_or_default())
        .map_err(|s| upstream(&s))
    }

    /// # Errors
    /// `NOT_FOUND` for an unknown job; `UNAVAILABLE`.
    pub async fn get_job(&self, name: &str) -> Result<jpb::Job, ServiceError> {
        self.find_job(name)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("no job named {name:?}")))
    }

    /// The job, or `None` when there is none of that name.
    ///
    /// # Errors
    /// `UNAVAILABLE` and the job-tracker's other refusals.
    pub async fn find_job(&self, name: &str) -> Result<Option<jpb::Job>, ServiceError> {
        match self
            .retried(
                "get_job",
                jpb::GetJobRequest {
                    name: name.to_owned(),
                },
                |mut c, r| async move { c.get_job(r).await },
            )
            .await
        {
            Ok(r) => Ok(r.job),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(upstream(&s)),
        }
    }

    /// The job and its spec decoded as `T`.
    ///
    /// # Errors
    /// As [`Self::get_job`]; `FAILED_PRECONDITION` when the spec is not a `T`.
    pub async fn get_spec<T: JobSpec>(&self, name: &str) -> Result<(jpb::Job, T), ServiceError> {
        let job = self.get_job(name).await?;
        let spec = spec_of(&job)?;
        Ok((job, spec))
    }

    /// Replaces the spec of `job` with `spec`, if the job is still at the
    /// revision `job` was read at (compare-and-set: a concurrent change is
    /// `FAILED_PRECONDITION`, never overwritten).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` on a concurrent change; `UNAVAILABLE`.
    pub async fn update_spec<T: JobSpec>(
        &self,
        job: &jpb::Job,
        spec: &T,
        actor: &str,
    ) -> Result<jpb::Job, ServiceError> {
        self.update_job(
            jpb::Job {
                name: job.name.clone(),
                kind: job.kind,
                spec: Some(pack_spec(spec)),
                ..jpb::Job::default()
            },
            &["spec"],
            job.revision,
            actor,
        )
        .await
    }

    /// Changes the fields of `job` named in `fields`; `expected_revision` 0
    /// updates whatever the revision.
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn update_job(
        &self,
        job: jpb::Job,
        fields: &[&str],
        expected_revision: u64,
        actor: &str,
    ) -> Result<jpb::Job, ServiceError> {
        // Not retried: a lost answer to an applied compare-and-set would
        // come back as a revision conflict.
        self.raw
            .clone()
            .update_job(jpb::UpdateJobRequest {
                job: Some(job),
                update_mask: Some(prost_types::FieldMask {
                    paths: fields.iter().map(|f| (*f).to_owned()).collect(),
                }),
                expected_revision,
                actor: actor.to_owned(),
            })
            .await
            .map(|r| r.into_inner().job.unwrap_or_default())
            .map_err(|s| upstream(&s))
    }

    /// Starts a run; not retried, since a lost answer would start two.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` behind an unacknowledged failure or while a run
    /// is active; `UNAVAILABLE`.
    pub async fn start_run(&self, run: NewRun) -> Result<jpb::Run, ServiceError> {
        let mut first_checkpoints = run.first_checkpoints;
        self.raw
            .clone()
            .start_run(jpb::StartRunRequest {
                job_name: run.job_name,
                units: run
                    .units
                    .into_iter()
                    .map(|unit_key| jpb::UnitSpec {
                        checkpoint: first_checkpoints.remove(&unit_key).unwrap_or_default(),
                        unit_key,
                        after_unit_keys: Vec::new(),
                    })
                    .collect(),
                trigger: run.trigger as i32,
                correlation_id: run.correlation_id,
                actor: run.actor,
                reason: run.reason,
                force_remigrate: run.force_remigrate,
                window_start: run.window_start,
            })
            .await
            .map(|r| r.into_inner().run.unwrap_or_default())
            .map_err(|s| upstream(&s))
    }

    /// # Errors
    /// `NOT_FOUND` for an unknown run; `UNAVAILABLE`.
    pub async fn get_run(&self, run_id: &str) -> Result<jpb::Run, ServiceError> {
        let request = jpb::GetRunRequest {
            run_id: run_id.to_owned(),
        };
        self.retried(
            "get_run",
            request,
            |mut c, r| async move { c.get_run(r).await },
        )
        .await
        .map(|r| r.run.unwrap_or_default())
        .map_err(|s| upstream(&s))
    }

    /// The units of a run (all pages), only those of `unit_keys` when it is
    /// not empty, only those in `statuses` when it is not empty.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown run; `UNAVAILABLE`.
    pub async fn list_units(
        &self,
        run_id: &str,
        unit_keys: &[String],
        statuses: &[jpb::UnitStatus],
    ) -> Result<Vec<jpb::Unit>, ServiceError> {
        let mut units = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .retried(
                    "list_units",
                    jpb::ListUnitsRequest {
                        run_id: run_id.to_owned(),
                        statuses: statuses.iter().map(|s| *s as i32).collect(),
                        unit_keys: unit_keys.to_vec(),
                        page_size: 1000,
                        page_token: page_token.clone(),
                    },
                    |mut c, r| async move { c.list_units(r).await },
                )
                .await
                .map_err(|s| upstream(&s))?;
            units.extend(page.units);
            if page.next_page_token.is_empty() {
                return Ok(units);
            }
            page_token = page.next_page_token;
        }
    }

    /// Points readers of one unit at `target`. Retried: setting a route
    /// twice to the same target changes nothing.
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn set_route(&self, request: jpb::SetRouteRequest) -> Result<(), ServiceError> {
        self.retried("set_route", request, |mut c, r| async move {
            c.set_route(r).await
        })
        .await
        .map(drop)
        .map_err(|s| upstream(&s))
    }

    /// The route readers of one unit follow (the unit's own, or the
    /// job-wide one when the unit has none).
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn get_route(
        &self,
        job_name: &str,
        unit_key: &str,
    ) -> Result<jpb::Route, ServiceError> {
        let request = jpb::GetRouteRequest {
            job_name: job_name.to_owned(),
            unit_key: unit_key.to_owned(),
        };
        self.retried("get_route", request, |mut c, r| async move {
            c.get_route(r).await
        })
        .await
        .map(|r| r.route.unwrap_or_default())
        .map_err(|s| upstream(&s))
    }

    /// A page of jobs.
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn list_jobs(
        &self,
        request: jpb::ListJobsRequest,
    ) -> Result<jpb::ListJobsResponse, ServiceError> {
        self.retried("list_jobs", request, |mut c, r| async move {
            c.list_jobs(r).await
        })
        .await
        .map_err(|s| upstream(&s))
    }

    /// Ends a run whose job completes explicitly (`explicit_completion`).
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn complete_run(
        &self,
        request: jpb::CompleteRunRequest,
    ) -> Result<jpb::Run, ServiceError> {
        self.retried("complete_run", request, |mut c, r| async move {
            c.complete_run(r).await
        })
        .await
        .map(|r| r.run.unwrap_or_default())
        .map_err(|s| upstream(&s))
    }

    /// Fails a run (explicit completion) with the reason operators read.
    ///
    /// # Errors
    /// The job-tracker's refusals; `UNAVAILABLE`.
    pub async fn fail_run(&self, request: jpb::FailRunRequest) -> Result<jpb::Run, ServiceError> {
        self.retried("fail_run", request, |mut c, r| async move {
            c.fail_run(r).await
        })
        .await
        .map(|r| r.run.unwrap_or_default())
        .map_err(|s| upstream(&s))
    }
}

/// The answers that say the call may not have been served, not that it was
/// refused.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
    )
}

fn upstream(status: &Status) -> ServiceError {
    ServiceError::upstream("job-tracker", status)
}
