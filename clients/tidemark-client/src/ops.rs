//! Typed operations over the raw service clients: start work, follow it to
//! its end, and wait for a proof.

use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt as _};
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::verifier::v1 as vf;
use tonic::{Code, Request};

use crate::connect::Tidemark;
use crate::error::{ClientError, ClientResult};
use crate::spec::proto_duration;

/// Streams are followed for as long as the work lasts; their deadline only
/// guards against a server that never ends them.
const STREAM_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The run has finished: SUCCEEDED, FAILED (acknowledged or not) or SKIPPED.
pub fn is_terminal(status: i32) -> bool {
    matches!(
        jt::RunStatus::try_from(status),
        Ok(jt::RunStatus::Succeeded
            | jt::RunStatus::Failed
            | jt::RunStatus::FailedAcknowledged
            | jt::RunStatus::Skipped)
    )
}

/// How a followed run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The last progress seen (terminal).
    pub progress: jt::RunProgress,
    /// The run as stored when it ended (status reason, counters, result).
    pub run: jt::Run,
}

impl RunOutcome {
    pub fn succeeded(&self) -> bool {
        self.run.status == jt::RunStatus::Succeeded as i32
    }
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(deadline);
    r
}

impl Tidemark {
    /// Starts setting `spec.attribute_name` on every item lacking it
    /// (conditional updates that never overwrite a concurrent writer) and
    /// returns the job name and run id; follow it with [`Self::watch_run`].
    ///
    /// # Errors
    /// The replicator's refusal (bad spec, table missing, job blocked by a
    /// failed run, a run still running).
    pub async fn backfill_attribute(
        &self,
        request: rp::BackfillAttributeRequest,
    ) -> ClientResult<rp::BackfillAttributeResponse> {
        // Retrying is safe only with a fixed correlation id: a lost reply
        // then returns the run already started instead of starting another.
        let mut request = request;
        if request.correlation_id.is_empty() {
            request.correlation_id = new_correlation_id("backfill");
        }
        let svc = self.replicator();
        self.idempotent(|| {
            let mut svc = svc.clone();
            let req = request.clone();
            async move { svc.backfill_attribute(req).await }
        })
        .await
    }

    /// Starts migrating `units` of job `job` (created with `spec` if new),
    /// `concurrency` at a time across all workers; units MIGRATED in earlier
    /// runs are skipped (listed in the response).
    ///
    /// # Errors
    /// The replicator's refusal (bad spec, store missing, a failed run not
    /// yet acknowledged, a run still running).
    pub async fn migrate_units(
        &self,
        job: &str,
        spec: Option<rp::MigrateUnitSpec>,
        units: Vec<String>,
        concurrency: u32,
        actor: &str,
    ) -> ClientResult<rp::MigrateUnitResponse> {
        let request = rp::MigrateUnitRequest {
            job_name: job.to_owned(),
            spec,
            unit_keys: units,
            concurrency,
            force_remigrate: false,
            actor: actor.to_owned(),
            correlation_id: new_correlation_id("migrate"),
        };
        let svc = self.replicator();
        self.idempotent(|| {
            let mut svc = svc.clone();
            let req = request.clone();
            async move { svc.migrate_unit(req).await }
        })
        .await
    }

    /// Creates (or keeps, when identical) an incremental extract job with
    /// its schedule, and starts a run now when `request.run_now`.
    ///
    /// # Errors
    /// The replicator's refusal (bad spec, source missing, a job of that
    /// name with another definition, a blocked or running job with
    /// `run_now`).
    pub async fn incremental_extract(
        &self,
        request: rp::CreateIncrementalExtractRequest,
    ) -> ClientResult<rp::CreateIncrementalExtractResponse> {
        let mut svc = self.replicator();
        if request.run_now {
            // Starting a run is not idempotent here (no correlation id): one
            // attempt, so a lost reply never looks like a refused second run.
            return Ok(svc.create_incremental_extract(request).await?.into_inner());
        }
        self.idempotent(|| {
            let mut svc = svc.clone();
            let req = request.clone();
            async move { svc.create_incremental_extract(req).await }
        })
        .await
    }

    /// Starts a run of `job` now over its default units (a manual trigger,
    /// e.g. an extract between its scheduled runs) and returns the run.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` when a failed run blocks the job (acknowledge it
    /// first) or a run is still running; `NOT_FOUND` for an unknown job.
    pub async fn start_run(&self, job: &str, actor: &str) -> ClientResult<jt::Run> {
        let request = jt::StartRunRequest {
            job_name: job.to_owned(),
            trigger: jt::RunTrigger::Manual as i32,
            correlation_id: new_correlation_id("run"),
            actor: actor.to_owned(),
            ..Default::default()
        };
        let svc = self.jobs();
        let started = self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = request.clone();
                async move { svc.start_run(req).await }
            })
            .await?;
        Ok(started.run.unwrap_or_default())
    }

    /// Follows a run: its progress now, then at each change (at most one
    /// per `interval`), ending after the message showing a finished status.
    /// A dropped connection is re-opened (the job-tracker restarting is not
    /// the run failing).
    pub fn watch_run(
        &self,
        run_id: &str,
        interval: Duration,
    ) -> BoxStream<'static, ClientResult<jt::RunProgress>> {
        struct State {
            client: Tidemark,
            run_id: String,
            interval: Duration,
            stream: Option<tonic::Streaming<jt::WatchRunResponse>>,
            done: bool,
            reconnects: u32,
        }
        let state = State {
            client: self.clone(),
            run_id: run_id.to_owned(),
            interval,
            stream: None,
            done: false,
            reconnects: 0,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if st.stream.is_none() {
                    let req = jt::WatchRunRequest {
                        run_id: st.run_id.clone(),
                        min_interval: Some(proto_duration(st.interval)),
                    };
                    match st
                        .client
                        .jobs()
                        .watch_run(with_deadline(req, STREAM_DEADLINE))
                        .await
                    {
                        Ok(s) => st.stream = Some(s.into_inner()),
                        Err(s) if retry_stream(&s, &mut st.reconnects) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        Err(s) => {
                            st.done = true;
                            return Some((Err(s.into()), st));
                        }
                    }
                }
                let Some(stream) = st.stream.as_mut() else {
                    continue;
                };
                match stream.message().await {
                    Ok(Some(msg)) => {
                        let Some(p) = msg.progress else { continue };
                        st.reconnects = 0;
                        st.done = is_terminal(p.status);
                        return Some((Ok(p), st));
                    }
                    Ok(None) => {
                        // The server ends the stream after a finished status,
                        // which we would have seen; anything else is a
                        // restart: re-open.
                        st.stream = None;
                        if st.reconnects >= 5 {
                            st.done = true;
                            let msg =
                                format!("the WatchRun stream of run {} ended early", st.run_id);
                            return Some((Err(ClientError::StreamEnded(msg)), st));
                        }
                        st.reconnects += 1;
                    }
                    Err(s) if retry_stream(&s, &mut st.reconnects) => {
                        st.stream = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => {
                        st.done = true;
                        return Some((Err(s.into()), st));
                    }
                }
            }
        })
        .boxed()
    }

    /// Follows a run to its end (calling `on_progress` on each snapshot)
    /// and returns how it ended. `timeout` bounds the whole wait.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] past `timeout`; the job-tracker's errors.
    pub async fn wait_run(
        &self,
        run_id: &str,
        timeout: Duration,
        mut on_progress: impl FnMut(&jt::RunProgress),
    ) -> ClientResult<RunOutcome> {
        let follow = async {
            let mut stream = self.watch_run(run_id, Duration::from_millis(500));
            let mut last = None;
            while let Some(p) = stream.next().await {
                let p = p?;
                on_progress(&p);
                last = Some(p);
            }
            let progress = last.ok_or_else(|| {
                ClientError::StreamEnded(format!("no progress of run {run_id} was received"))
            })?;
            let run = self.get_run(run_id).await?;
            Ok(RunOutcome { progress, run })
        };
        tokio::time::timeout(timeout, follow)
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("run {run_id}"),
                after: timeout,
            })?
    }

    /// One run as stored.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown run.
    pub async fn get_run(&self, run_id: &str) -> ClientResult<jt::Run> {
        let svc = self.jobs();
        let req = jt::GetRunRequest {
            run_id: run_id.to_owned(),
        };
        Ok(self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = req.clone();
                async move { svc.get_run(req).await }
            })
            .await?
            .run
            .unwrap_or_default())
    }

    /// The effective route of a unit (or the job-wide route).
    ///
    /// # Errors
    /// NOT_FOUND for an unknown job.
    pub async fn get_route(&self, job: &str, unit: &str) -> ClientResult<jt::Route> {
        let svc = self.jobs();
        let req = jt::GetRouteRequest {
            job_name: job.to_owned(),
            unit_key: unit.to_owned(),
        };
        Ok(self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = req.clone();
                async move { svc.get_route(req).await }
            })
            .await?
            .route
            .unwrap_or_default())
    }

    /// Streams a pipeline's lag: once at once, then every `interval`, until
    /// dropped.
    pub fn watch_lag(
        &self,
        pipeline: &str,
        interval: Duration,
    ) -> BoxStream<'static, ClientResult<rp::PipelineLag>> {
        struct State {
            client: Tidemark,
            name: String,
            interval: Duration,
            stream: Option<tonic::Streaming<rp::WatchLagResponse>>,
            failed: bool,
            reconnects: u32,
        }
        let state = State {
            client: self.clone(),
            name: pipeline.to_owned(),
            interval,
            stream: None,
            failed: false,
            reconnects: 0,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.failed {
                    return None;
                }
                if st.stream.is_none() {
                    let req = rp::WatchLagRequest {
                        name: st.name.clone(),
                        interval: Some(proto_duration(st.interval)),
                    };
                    match st
                        .client
                        .replicator()
                        .watch_lag(with_deadline(req, STREAM_DEADLINE))
                        .await
                    {
                        Ok(s) => st.stream = Some(s.into_inner()),
                        Err(s) if retry_stream(&s, &mut st.reconnects) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        Err(s) => {
                            st.failed = true;
                            return Some((Err(s.into()), st));
                        }
                    }
                }
                let Some(stream) = st.stream.as_mut() else {
                    continue;
                };
                match stream.message().await {
                    Ok(Some(msg)) => {
                        let Some(lag) = msg.lag else { continue };
                        st.reconnects = 0;
                        return Some((Ok(lag), st));
                    }
                    Ok(None) => st.stream = None,
                    Err(s) if retry_stream(&s, &mut st.reconnects) => {
                        st.stream = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => {
                        st.failed = true;
                        return Some((Err(s.into()), st));
                    }
                }
            }
        })
        .boxed()
    }

    /// One pipeline.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown pipeline.
    pub async fn get_pipeline(&self, name: &str) -> ClientResult<rp::Pipeline> {
        let svc = self.replicator();
        let req = rp::GetPipelineRequest {
            name: name.to_owned(),
        };
        Ok(self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = req.clone();
                async move { svc.get_pipeline(req).await }
            })
            .await?
            .pipeline
            .unwrap_or_default())
    }

    /// Waits until the pipeline has finished its backfill (STREAMING),
    /// calling `on_lag` with its lag meanwhile.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] past `timeout`; FAILED_PRECONDITION when the
    /// pipeline FAILED or is PAUSED (it would never get there).
    pub async fn wait_streaming(
        &self,
        name: &str,
        timeout: Duration,
        mut on_lag: impl FnMut(&rp::PipelineLag),
    ) -> ClientResult<rp::Pipeline> {
        let wait = async {
            let mut lag = self.watch_lag(name, Duration::from_millis(500));
            loop {
                let p = self.get_pipeline(name).await?;
                match rp::PipelineState::try_from(p.state) {
                    Ok(rp::PipelineState::Streaming) => return Ok(p),
                    Ok(rp::PipelineState::Failed | rp::PipelineState::Paused) => {
                        return Err(tonic::Status::failed_precondition(format!(
                            "pipeline {name} is {} ({}); resume it with `tidemark replicate resume {name}`",
                            state_name(p.state),
                            p.state_reason
                        ))
                        .into());
                    }
                    _ => {}
                }
                // Each lag message (about every 500 ms) paces the polling.
                match lag.next().await {
                    Some(Ok(l)) => on_lag(&l),
                    Some(Err(e)) => return Err(e),
                    None => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("the backfill of pipeline {name}"),
                after: timeout,
            })?
    }

    /// Waits until everything committed to the pipeline's source before
    /// the call is applied to its sinks (lag 0), for at most `timeout`.
    ///
    /// # Errors
    /// DEADLINE_EXCEEDED with the remaining lag in the message; NOT_FOUND;
    /// FAILED_PRECONDITION when the pipeline is not STREAMING.
    pub async fn drain(&self, name: &str, timeout: Duration) -> ClientResult<rp::DrainResponse> {
        // Drain only waits and reads: a replicator that could not reach the
        // job-tracker for a moment (UNAVAILABLE) is asked again with the
        // time left (a cut-over aborted on one such blip in the fault
        // matrix).
        let started = Instant::now();
        let svc = self.replicator();
        self.idempotent(|| {
            let left = timeout.saturating_sub(started.elapsed());
            let req = rp::DrainRequest {
                name: name.to_owned(),
                timeout: Some(proto_duration(left)),
            };
            // The server answers at `left`; give the reply time to arrive.
            let call = with_deadline(req, left + Duration::from_secs(5));
            let mut svc = svc.clone();
            async move {
                svc.drain(call).await.map_err(|s| {
                    if s.code() == Code::DeadlineExceeded {
                        drain_timeout(name, &s)
                    } else {
                        s
                    }
                })
            }
        })
        .await
    }

    /// Starts a verification and waits for its report (polling `GetReport`,
    /// calling `on_report` with each partial one).
    ///
    /// # Errors
    /// The verifier's refusal; [`ClientError::Timeout`] past `timeout`.
    pub async fn verify(
        &self,
        request: vf::StartVerificationRequest,
        timeout: Duration,
        on_report: impl FnMut(&vf::Report),
    ) -> ClientResult<vf::Report> {
        let started = Instant::now();
        let mut request = request;
        if request.correlation_id.is_empty() {
            request.correlation_id = new_correlation_id("verify");
        }
        let svc = self.verifier();
        let id = self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = request.clone();
                async move { svc.start_verification(req).await }
            })
            .await?
            .verification_id;
        self.wait_report(&id, timeout.saturating_sub(started.elapsed()), on_report)
            .await
    }

    /// Waits for a verification's final report.
    ///
    /// # Errors
    /// NOT_FOUND; [`ClientError::Timeout`] past `timeout`.
    pub async fn wait_report(
        &self,
        verification_id: &str,
        timeout: Duration,
        mut on_report: impl FnMut(&vf::Report),
    ) -> ClientResult<vf::Report> {
        let svc = self.verifier();
        let wait = async {
            loop {
                let req = vf::GetReportRequest {
                    verification_id: verification_id.to_owned(),
                };
                let report = self
                    .idempotent(|| {
                        let mut svc = svc.clone();
                        let req = req.clone();
                        async move { svc.get_report(req).await }
                    })
                    .await?
                    .report
                    .unwrap_or_default();
                on_report(&report);
                if matches!(
                    vf::VerificationStatus::try_from(report.status),
                    Ok(vf::VerificationStatus::Completed | vf::VerificationStatus::Failed)
                ) {
                    return Ok(report);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("verification {verification_id}"),
                after: timeout,
            })?
    }
}

/// A reconnectable failure of a long stream (the server restarting or
/// draining), up to a few attempts.
fn retry_stream(status: &tonic::Status, reconnects: &mut u32) -> bool {
    if status.code() == Code::Unavailable && *reconnects < 5 {
        *reconnects += 1;
        true
    } else {
        false
    }
}

/// DEADLINE_EXCEEDED of a drain, its message completed with the remaining
/// lag the replicator put in its ErrorInfo.
fn drain_timeout(name: &str, status: &tonic::Status) -> tonic::Status {
    use tonic_types::StatusExt as _;
    let details = status.get_error_details();
    let behind = details.error_info().map(|info| {
        let get = |k: &str| {
            info.metadata
                .get(k)
                .cloned()
                .unwrap_or_else(|| "?".to_owned())
        };
        format!(
            "; {} records and {} s behind",
            get("records_behind"),
            get("seconds_behind")
        )
    });
    tonic::Status::deadline_exceeded(format!(
        "pipeline {name} did not drain: {}{}",
        status.message(),
        behind.unwrap_or_default()
    ))
}

/// `PIPELINE_STATE_STREAMING` → `streaming`.
pub fn state_name(state: i32) -> String {
    rp::PipelineState::try_from(state).map_or_else(
        |_| state.to_string(),
        |s| {
            s.as_str_name()
                .trim_start_matches("PIPELINE_STATE_")
                .to_ascii_lowercase()
        },
    )
}

/// An idempotency key unique enough for one start request, fixed across
/// its retries.
pub(crate) fn new_correlation_id(what: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{what}-{now}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_statuses_end_a_watch() {
        for s in [
            jt::RunStatus::Succeeded,
            jt::RunStatus::Failed,
            jt::RunStatus::FailedAcknowledged,
            jt::RunStatus::Skipped,
        ] {
            assert!(is_terminal(s as i32), "{s:?}");
        }
        for s in [jt::RunStatus::Queued, jt::RunStatus::Running] {
            assert!(!is_terminal(s as i32), "{s:?}");
        }
        assert!(!is_terminal(99));
    }

    #[test]
    fn a_drain_timeout_names_the_remaining_lag() {
        use tonic_types::{ErrorDetails, StatusExt as _};
        let details = ErrorDetails::with_error_info(
            "DRAIN_TIMEOUT",
            "tidemark.replicator.v1",
            [
                ("records_behind".to_owned(), "12".to_owned()),
                ("seconds_behind".to_owned(), "3.5".to_owned()),
            ],
        );
        let status =
            tonic::Status::with_error_details(Code::DeadlineExceeded, "lag not 0", details);
        let s = drain_timeout("orders", &status);
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(
            s.message().contains("12 records and 3.5 s behind"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn correlation_ids_differ() {
        assert_ne!(new_correlation_id("x"), new_correlation_id("x"));
        assert_eq!(state_name(rp::PipelineState::Streaming as i32), "streaming");
    }
}
