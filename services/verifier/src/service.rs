//! `VerifierService` RPCs: starting a verification is creating (or reusing)
//! its job and starting a run in the job-tracker; reports and mismatches are
//! read back from there (or from this process while it runs the check).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tidemark_kit::jobs::NewRun;
use tidemark_kit::rpc::BoxStream;
use tidemark_kit::worker::{pack_any, unpack_any};
use tidemark_kit::{FieldError, ServiceError};
use tidemark_proto::job_tracker::v1 as jpb;
use tidemark_proto::verifier::v1::verifier_service_server::VerifierService;
use tidemark_proto::verifier::v1::*;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::checks::VERSIONS_ONLY_NEEDS_VERSIONS;
use crate::executor::pending_report;
use crate::mismatches::PAGE;
use crate::side::Sides;
use crate::spec::{CheckKind, Spec};
use crate::{REPORT_TYPE, SPEC_TYPE, UNIT_KEY, Verifier, VerifierError};

/// Mismatches per stream message.
const STREAM_BATCH: usize = 1000;
/// How often a following stream looks for news.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

fn valid_job_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c))
}

fn finished(status: i32) -> bool {
    matches!(
        jpb::RunStatus::try_from(status),
        Ok(jpb::RunStatus::Succeeded
            | jpb::RunStatus::Failed
            | jpb::RunStatus::FailedAcknowledged
            | jpb::RunStatus::Skipped)
    )
}

impl Verifier {
    async fn get_run(&self, id: &str) -> Result<jpb::Run, VerifierError> {
        let run = self.state.jobs.get_run(id).await.map_err(|e| {
            if e.code() == Code::NotFound {
                VerifierError::NotFound(format!("no verification {id:?}"))
            } else {
                e.into()
            }
        })?;
        if run.job_kind != jpb::JobKind::Verification as i32 {
            return Err(VerifierError::NotFound(format!(
                "{id:?} is not a verification"
            )));
        }
        Ok(run)
    }

    async fn job_spec(&self, job_name: &str) -> Result<VerificationSpec, VerifierError> {
        let job = self.state.jobs.get_job(job_name).await?;
        unpack_any(job.spec.as_ref(), SPEC_TYPE).map_err(VerifierError::Internal)
    }

    /// The report of a run: its result once finished, the live one while
    /// this process runs it, a PENDING one otherwise.
    async fn report(&self, run: &jpb::Run) -> Result<Report, VerifierError> {
        if finished(run.status) {
            if let Some(result) = &run.result {
                return unpack_any(Some(result), REPORT_TYPE).map_err(VerifierError::Internal);
            }
            let names = self.check_names(&run.job_name).await.unwrap_or_default();
            let mut report = pending_report(&run.run_id, &run.job_name, &names);
            report.status = VerificationStatus::Failed as i32;
            report.verdict = Verdict::Error as i32;
            report.error.clone_from(&run.status_reason);
            report.start_time = run.start_time;
            report.finish_time = run.finish_time;
            return Ok(report);
        }
        if let Some(live) = self.live(&run.run_id) {
            return Ok(live.lock().expect("live lock").report.clone());
        }
        let names = self.check_names(&run.job_name).await?;
        let mut report = pending_report(&run.run_id, &run.job_name, &names);
        let units = run.units.unwrap_or_default();
        if units.in_progress > 0 || units.migrated > 0 {
            report.status = VerificationStatus::Running as i32;
        }
        report.start_time = run.start_time;
        Ok(report)
    }

    async fn check_names(&self, job_name: &str) -> Result<Vec<String>, VerifierError> {
        Ok(self
            .job_spec(job_name)
            .await?
            .checks
            .into_iter()
            .map(|c| c.name)
            .collect())
    }

    fn live(&self, run_id: &str) -> Option<Arc<std::sync::Mutex<crate::Live>>> {
        self.state
            .live
            .lock()
            .expect("live lock")
            .get(run_id)
            .cloned()
    }

    /// Creates the job, or checks that the existing one is a verification
    /// of the same spec; returns the spec to run.
    async fn ensure_job(
        &self,
        name: &str,
        spec: Option<&VerificationSpec>,
        schedule: Option<&jpb::Schedule>,
    ) -> Result<VerificationSpec, VerifierError> {
        let jobs = &self.state.jobs;
        let existing = jobs.find_job(name).await?;
        if let Some(job) = existing {
            if job.kind != jpb::JobKind::Verification as i32 {
                return Err(VerifierError::AlreadyExists(format!(
                    "job {name:?} exists and is not a verification"
                )));
            }
            // Compared decoded: map fields do not encode in a stable order.
            let stored: VerificationSpec = unpack_any(job.spec.as_ref(), SPEC_TYPE)
                .map_err(|e| VerifierError::AlreadyExists(format!("job {name:?}: {e}")))?;
            if spec.is_some_and(|s| s != &stored) {
                return Err(VerifierError::AlreadyExists(format!(
                    "job {name:?} exists with another spec"
                )));
            }
            if let Some(schedule) = schedule
                && job.schedule.as_ref() != Some(schedule)
            {
                // UpdateJob reads the whole job (its kind included) and
                // applies the masked fields; its complaints about the
                // schedule are about this request's `schedule`.
                // Sent whole (a scheduled job must name its default units,
                // and the request's job is checked as a job).
                let change = jpb::Job {
                    schedule: Some(schedule.clone()),
                    ..job.clone()
                };
                jobs.update_job(change, &["schedule"], 0, "verifier")
                    .await
                    .map_err(|e| e.renamed("job.schedule", "schedule"))?;
            }
            return Ok(stored);
        }
        let spec = spec.ok_or_else(|| {
            VerifierError::Invalid(vec![FieldError::new(
                "spec",
                "is required to create a new verification job",
            )])
        })?;
        let created = jobs
            .ensure_job(jpb::Job {
                name: name.to_owned(),
                kind: jpb::JobKind::Verification as i32,
                description: "verification (StartVerification)".to_owned(),
                spec: Some(pack_any(SPEC_TYPE, spec)),
                schedule: schedule.cloned(),
                default_unit_keys: vec![UNIT_KEY.to_owned()],
                explicit_completion: true,
                ..jpb::Job::default()
            })
            .await;
        match created {
            Ok(_) => Ok(spec.clone()),
            // Created meanwhile by a concurrent call: compare with that one.
            Err(e) if e.code() == Code::AlreadyExists => {
                Box::pin(self.ensure_job(name, Some(spec), None)).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn start(
        &self,
        r: StartVerificationRequest,
    ) -> Result<StartVerificationResponse, VerifierError> {
        let mut violations = Vec::new();
        if r.actor.trim().is_empty() {
            violations.push(FieldError::required("actor"));
        }
        if !r.job_name.is_empty() && !valid_job_name(&r.job_name) {
            violations.push(FieldError::new(
                "job_name",
                "1-128 characters of letters, digits and ._:/-, starting with a letter or digit",
            ));
        }
        match r.spec.as_ref().map(|s| Spec::from_proto(s, "spec")) {
            Some(Err(v)) => violations.extend(v),
            Some(Ok(spec)) => {
                let sides = [
                    ("spec.source", Some(&spec.source)),
                    ("spec.target", spec.target.as_ref()),
                ];
                for (field, store) in sides {
                    if let Some(Err(e)) = store.map(|s| self.state.env.check_store(s)) {
                        violations.push(FieldError::new(field, e));
                    }
                }
            }
            None => {}
        }
        if !violations.is_empty() {
            return Err(VerifierError::Invalid(violations));
        }
        let name = if r.job_name.is_empty() {
            format!("verify-{}", uuid::Uuid::now_v7().simple())
        } else {
            r.job_name.clone()
        };
        let spec_pb = self
            .ensure_job(&name, r.spec.as_ref(), r.schedule.as_ref())
            .await?;
        let spec = Spec::from_proto(&spec_pb, "spec").map_err(VerifierError::Invalid)?;
        let sides = Sides::open(&spec, &self.state.env).await?;
        let versions = sides.source.versions_known()
            && sides.target.as_ref().is_some_and(|t| t.versions_known());
        if let Some(i) = spec.checks.iter().position(|c| {
            matches!(
                c.kind,
                CheckKind::Digest {
                    versions_only: true,
                    ..
                }
            )
        }) && !versions
        {
            return Err(ServiceError::precondition(VERSIONS_ONLY_NEEDS_VERSIONS)
                .on_field(&format!("spec.checks[{i}].digest.versions_only"))
                .into());
        }
        if let Some(pipeline) = &spec.recheck.pipeline {
            self.state
                .replicator
                .get_pipeline(pipeline)
                .await
                .map_err(|s| match s.code() {
                    Code::NotFound => VerifierError::NotFound(format!("no pipeline {pipeline:?}")),
                    _ => VerifierError::Unavailable(format!(
                        "replicator: cannot look up pipeline {pipeline:?}: {}",
                        s.message()
                    )),
                })?;
        }
        let run = self
            .state
            .jobs
            .start_run(NewRun {
                job_name: name.clone(),
                units: vec![UNIT_KEY.to_owned()],
                trigger: jpb::RunTrigger::Api,
                correlation_id: r.correlation_id.clone(),
                actor: r.actor.clone(),
                reason: "StartVerification".to_owned(),
                ..NewRun::default()
            })
            .await?;
        Ok(StartVerificationResponse {
            verification_id: run.run_id,
            job_name: name,
        })
    }
}

/// What `batch` holds beyond the first `sent` of each check, filtered;
/// `seen` counts each check's mismatches over the batches of one pass.
fn fresh(
    batch: &[Mismatch],
    seen: &mut HashMap<String, usize>,
    sent: &HashMap<String, usize>,
    check: &str,
    kinds: &BTreeSet<i32>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for m in batch {
        let n = seen.entry(m.check_name.clone()).or_default();
        *n += 1;
        if *n <= sent.get(&m.check_name).copied().unwrap_or(0) {
            continue;
        }
        if (check.is_empty() || m.check_name == check)
            && (kinds.is_empty() || kinds.contains(&m.kind))
        {
            out.push(m.clone());
        }
    }
    out
}

#[tonic::async_trait]
impl VerifierService for Verifier {
    #[instrument(skip_all, fields(job = %request.get_ref().job_name))]
    async fn start_verification(
        &self,
        request: Request<StartVerificationRequest>,
    ) -> Result<Response<StartVerificationResponse>, Status> {
        let response = self.start(request.into_inner()).await?;
        tracing::info!(verification_id = %response.verification_id, job = %response.job_name, "verification started");
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(verification_id = %request.get_ref().verification_id))]
    async fn get_report(
        &self,
        request: Request<GetReportRequest>,
    ) -> Result<Response<GetReportResponse>, Status> {
        let id = request.into_inner().verification_id;
        if id.trim().is_empty() {
            return Err(
                VerifierError::Invalid(vec![FieldError::required("verification_id")]).into(),
            );
        }
        let run = self.get_run(&id).await?;
        let report = self.report(&run).await?;
        Ok(Response::new(GetReportResponse {
            report: Some(report),
        }))
    }

    type StreamMismatchesStream = BoxStream<StreamMismatchesResponse>;

    #[instrument(skip_all, fields(verification_id = %request.get_ref().verification_id))]
    async fn stream_mismatches(
        &self,
        request: Request<StreamMismatchesRequest>,
    ) -> Result<Response<Self::StreamMismatchesStream>, Status> {
        let r = request.into_inner();
        if r.verification_id.trim().is_empty() {
            return Err(
                VerifierError::Invalid(vec![FieldError::required("verification_id")]).into(),
            );
        }
        let run = self.get_run(&r.verification_id).await?;
        if !r.check_name.is_empty() {
            let names = self.check_names(&run.job_name).await?;
            if !names.contains(&r.check_name) {
                return Err(VerifierError::Invalid(vec![FieldError::new(
                    "check_name",
                    format!("the verification has no check {:?}", r.check_name),
                )])
                .into());
            }
        }
        let kinds: BTreeSet<i32> = r.kinds.iter().copied().collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let send = |batch: Vec<Mismatch>| {
                let tx = tx.clone();
                async move {
                    for chunk in batch.chunks(STREAM_BATCH) {
                        if tx
                            .send(Ok(StreamMismatchesResponse {
                                mismatches: chunk.to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                    true
                }
            };
            let mut sent = HashMap::new();
            loop {
                let run = match this.get_run(&r.verification_id).await {
                    Ok(run) => run,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if finished(run.status) {
                    // What the live phase sent is skipped, per check.
                    let mut seen = HashMap::new();
                    let mut after = None;
                    loop {
                        match this.state.mismatches.page(&run.run_id, after, PAGE).await {
                            Ok((page, more)) => {
                                after = page.last().map(|(seq, _)| *seq);
                                let page: Vec<Mismatch> =
                                    page.into_iter().map(|(_, m)| m).collect();
                                let batch = fresh(&page, &mut seen, &sent, &r.check_name, &kinds);
                                if !send(batch).await || !more {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(VerifierError::from(e).into())).await;
                                return;
                            }
                        }
                    }
                }
                if let Some(live) = this.live(&run.run_id) {
                    let all = live.lock().expect("live lock").mismatches.clone();
                    let mut seen = HashMap::new();
                    let batch = fresh(&all, &mut seen, &sent, &r.check_name, &kinds);
                    sent = seen;
                    if !send(batch).await {
                        return;
                    }
                }
                if !r.follow {
                    return;
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(FOLLOW_POLL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
