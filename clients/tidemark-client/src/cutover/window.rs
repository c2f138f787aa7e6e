//! The monitoring window after a cut-over: `rollback` (back to the old
//! store with every write made since, through the reverse pipeline),
//! `complete` (the window ends: the reverse pipeline stops and the decision
//! is recorded on the route) and `status` (where the window stands).

use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use serde::Serialize;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::verifier::v1 as vf;
use tonic::Code;

use crate::connect::Tidemark;
use crate::cutover::plan::{CutoverPlan, Step};
use crate::cutover::report::{CutoverEvent, CutoverReport, StepOutcome};
use crate::cutover::run::{Direction, Run, bounded, describe_error, verdict_name};
use crate::error::{ClientError, ClientResult};
use crate::ops::state_name;
use crate::spec::SpecError;

/// Where a cut-over's window stands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowStatus {
    pub plan: String,
    /// `not-cut-over`, `window-open`, `complete` or `rolled-back`.
    pub state: String,
    pub route_job: String,
    /// `source` or `target`.
    pub route: String,
    pub route_revision: u64,
    /// Who set the route last, when (RFC 3339) and why.
    pub route_set_by: String,
    pub route_set_at: Option<String>,
    pub route_reason: String,
    pub reverse_pipeline: String,
    /// The reverse pipeline's state, empty when there is none.
    pub reverse_state: String,
    /// Records and seconds the reverse pipeline is behind the new store.
    pub reverse_lag_records: u64,
    pub reverse_lag_seconds: f64,
    pub window_job: String,
    /// When the window ends (RFC 3339) and the time left, in seconds.
    pub window_ends: Option<String>,
    pub window_left_seconds: Option<f64>,
    /// When the next scheduled verification is due.
    pub next_verification: Option<String>,
    pub last_verification: Option<LastVerification>,
}

/// The window's latest verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LastVerification {
    pub verification_id: String,
    /// `pass`, `fail`, … or `running`.
    pub verdict: String,
    pub finished_at: Option<String>,
    pub items_compared: i64,
    /// Mismatches over all checks, by kind.
    pub missing_in_target: i64,
    pub extra_in_target: i64,
    pub stale_version: i64,
    pub different_content: i64,
}

fn rfc3339(t: &prost_types::Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

fn seconds_until(t: &prost_types::Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    #[allow(clippy::cast_precision_loss, reason = "seconds left in a window")]
    let at = t.seconds as f64 + f64::from(t.nanos) / 1e9;
    (at - now.as_secs_f64()).max(0.0)
}

fn not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Rpc(s) if s.code() == Code::NotFound)
}

impl Tidemark {
    /// Goes back to the old store during the window: pause writers, drain
    /// the reverse pipeline, verify old against new, switch the route back
    /// to SOURCE, resume writers, stop the reverse pipeline, end the
    /// window. Each step under the plan's deadline; a failure before the
    /// route moved resumes writers and leaves the route on TARGET.
    ///
    /// # Errors
    /// [`ClientError::Cutover`] naming the step that failed;
    /// [`ClientError::Spec`] for a plan without `reverse` or not cut over.
    pub async fn cutover_rollback(
        &self,
        plan: &CutoverPlan,
        observer: &mut (dyn FnMut(CutoverEvent) + Send + Sync),
    ) -> ClientResult<CutoverReport> {
        plan.validate()?;
        if !plan.reverse {
            return Err(SpecError::new(
                "reverse",
                "a rollback needs the reverse pipeline (reverse = true when the cut-over ran): without it, writes made to the new store since the switch are not in the old one",
            )
            .into());
        }
        let verification = plan.window_verification_spec()?;
        let mut run = Run::new(self, plan, Direction::Rollback, observer);
        let before = on_target(
            plan,
            run.route_before().await?,
            "there is nothing to roll back",
        )?;
        run.report.reverse_pipeline = plan.reverse_pipeline();
        run.pause_writers().await?;
        run.drain().await?;
        run.final_verify(verification).await?;
        run.switch_route(&before).await?;
        run.resume_writers().await?;
        let why = format!("cutover {} rolled back", plan.name);
        run.stop_reverse(&why).await?;
        run.end_window(&why).await?;
        Ok(run.report)
    }

    /// Ends the window: stops the reverse pipeline, ends the scheduled
    /// verifications, and records the decision on the route (a route
    /// change to TARGET with the reason), in the job-tracker's history.
    ///
    /// # Errors
    /// [`ClientError::Cutover`] naming the step that failed;
    /// [`ClientError::Spec`] when the route is not on TARGET.
    pub async fn cutover_complete(
        &self,
        plan: &CutoverPlan,
        observer: &mut (dyn FnMut(CutoverEvent) + Send + Sync),
    ) -> ClientResult<CutoverReport> {
        plan.validate()?;
        let mut run = Run::new(self, plan, Direction::Forward, observer);
        let before = on_target(plan, run.route_before().await?, "run the cut-over first")?;
        let why = format!(
            "cutover {} complete: the old store is no longer kept current",
            plan.name
        );
        run.stop_reverse(&why).await?;
        run.end_window(&why).await?;
        let step = Step::SwitchRoute;
        let (t0, _) = run.start(step);
        let recorded = self
            .jobs()
            .set_route(jt::SetRouteRequest {
                job_name: plan.route_job(),
                unit_key: plan.route.unit.clone(),
                target: jt::RouteTarget::Target as i32,
                actor: plan.actor.clone(),
                reason: why,
                expected_revision: before.revision,
            })
            .await;
        match recorded {
            Ok(r) => {
                let route = r.into_inner().route.unwrap_or_default();
                run.report.route_revision = Some(route.revision);
                let detail = format!(
                    "decision recorded on the route (TARGET, revision {})",
                    route.revision
                );
                run.finish(step, t0, StepOutcome::Done, detail);
                Ok(run.report)
            }
            Err(s) => Err(run.abort(step, t0, describe_error(&s.into()))),
        }
    }

    /// Where the window stands: the route, the reverse pipeline and its
    /// lag, the time left, the last verification and its mismatches.
    ///
    /// # Errors
    /// A service that cannot be asked.
    pub async fn cutover_status(&self, plan: &CutoverPlan) -> ClientResult<WindowStatus> {
        plan.validate()?;
        let route = self.get_route(&plan.route_job(), &plan.route.unit).await?;
        let on_target = route.target == jt::RouteTarget::Target as i32;
        let mut status = WindowStatus {
            plan: plan.name.clone(),
            route_job: plan.route_job(),
            route: if on_target { "target" } else { "source" }.to_owned(),
            route_revision: route.revision,
            route_set_by: route.actor.clone(),
            route_set_at: route.update_time.as_ref().map(rfc3339),
            route_reason: route.reason.clone(),
            ..WindowStatus::default()
        };
        if plan.reverse {
            status.reverse_pipeline = plan.reverse_pipeline();
            match self.get_pipeline(&status.reverse_pipeline).await {
                Ok(p) => {
                    status.reverse_state = state_name(p.state);
                    let first = tokio::time::timeout(
                        Duration::from_secs(10),
                        self.watch_lag(&status.reverse_pipeline, Duration::from_millis(100))
                            .next(),
                    )
                    .await;
                    if let Ok(Some(Ok(lag))) = first {
                        status.reverse_lag_records =
                            u64::try_from(lag.records_behind.unwrap_or(0)).unwrap_or(0);
                        status.reverse_lag_seconds =
                            crate::spec::std_duration(lag.max_time_behind.as_ref()).as_secs_f64();
                    }
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let job = self
            .jobs()
            .get_job(jt::GetJobRequest {
                name: plan.window_job(),
            })
            .await;
        let mut window_open = false;
        match job {
            Ok(r) => {
                let job = r.into_inner().job.unwrap_or_default();
                status.window_job = job.name.clone();
                if let Some(end) = job.schedule.as_ref().and_then(|s| s.end_time.as_ref()) {
                    status.window_ends = Some(rfc3339(end));
                    let left = seconds_until(end);
                    status.window_left_seconds = Some(left);
                    window_open = left > 0.0;
                }
                status.next_verification = job.next_run_time.as_ref().map(rfc3339);
                if let Some(run) = job.last_run {
                    status.last_verification = Some(self.last_verification(&run).await?);
                }
            }
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
        status.state = if route.revision == 0 {
            "not-cut-over"
        } else if !on_target {
            if plan.reverse && !status.reverse_state.is_empty() {
                "rolled-back"
            } else {
                "not-cut-over"
            }
        } else if window_open && status.reverse_state != "paused" {
            "window-open"
        } else {
            "complete"
        }
        .to_owned();
        Ok(status)
    }

    async fn last_verification(&self, run: &jt::Run) -> ClientResult<LastVerification> {
        let report = self
            .verifier()
            .get_report(vf::GetReportRequest {
                verification_id: run.run_id.clone(),
            })
            .await
            .map(tonic::Response::into_inner);
        let mut last = LastVerification {
            verification_id: run.run_id.clone(),
            verdict: "running".to_owned(),
            finished_at: run.finish_time.as_ref().map(rfc3339),
            ..LastVerification::default()
        };
        if let Ok(r) = report {
            let r = r.report.unwrap_or_default();
            if r.verdict != vf::Verdict::Unspecified as i32 {
                last.verdict = verdict_name(r.verdict);
            }
            last.items_compared = r.items_compared;
            for c in &r.checks {
                let m = c.mismatches.unwrap_or_default();
                last.missing_in_target += m.missing_in_target;
                last.extra_in_target += m.extra_in_target;
                last.stale_version += m.stale_version;
                last.different_content += m.different_content;
            }
        }
        Ok(last)
    }
}

impl Run<'_> {
    /// Pauses the reverse pipeline (its position is kept): the old store
    /// is no longer written.
    pub(crate) async fn stop_reverse(&mut self, why: &str) -> ClientResult<()> {
        let step = Step::StopReverse;
        if !self.plan.reverse {
            self.skip(step, "reverse = false");
            return Ok(());
        }
        let (t0, deadline) = self.start(step);
        let name = self.plan.reverse_pipeline();
        let req = rp::PausePipelineRequest {
            name: name.clone(),
            actor: self.plan.actor.clone(),
            reason: why.to_owned(),
        };
        let mut svc = self.client.replicator();
        // Ok(false): there is no reverse pipeline to stop.
        let paused = bounded(step, deadline, async {
            match svc.pause_pipeline(req).await {
                Ok(_) => Ok(true),
                Err(s) if s.code() == Code::NotFound => Ok(false),
                Err(s) => Err(s.into()),
            }
        })
        .await;
        match paused {
            Ok(true) => {
                self.finish(step, t0, StepOutcome::Done, format!("{name} paused"));
                Ok(())
            }
            Ok(false) => {
                let detail = format!("{name} does not exist");
                self.finish(step, t0, StepOutcome::Skipped, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }

    /// Ends the window's schedule now: no more verifications fall due.
    pub(crate) async fn end_window(&mut self, why: &str) -> ClientResult<()> {
        let step = Step::EndWindow;
        let (t0, deadline) = self.start(step);
        let name = self.plan.window_job();
        let client = self.client;
        // Some(false): the window was already over; None: no window job.
        // Boxed: two job-tracker calls make a large future.
        let ended = bounded(
            step,
            deadline,
            Box::pin(async {
                let job = match client
                    .jobs()
                    .get_job(jt::GetJobRequest { name: name.clone() })
                    .await
                {
                    Ok(r) => r.into_inner().job.unwrap_or_default(),
                    Err(s) if s.code() == Code::NotFound => return Ok(None),
                    Err(s) => return Err(s.into()),
                };
                let Some(mut schedule) = job.schedule.clone() else {
                    return Ok(Some(false));
                };
                let now = SystemTime::now();
                // A window already over keeps its end.
                let over = schedule
                    .end_time
                    .as_ref()
                    .is_some_and(|e| seconds_until(e) <= 0.0);
                if over {
                    return Ok(Some(false));
                }
                let start = schedule.start_time;
                schedule.end_time = Some(now.into());
                if start.as_ref().is_some_and(|s| seconds_until(s) > 0.0) {
                    schedule.start_time = Some(now.into());
                }
                client
                    .jobs()
                    .update_job(jt::UpdateJobRequest {
                        job: Some(jt::Job {
                            schedule: Some(schedule),
                            ..job.clone()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["schedule".to_owned()],
                        }),
                        expected_revision: job.revision,
                        actor: self.plan.actor.clone(),
                    })
                    .await?;
                Ok(Some(true))
            }),
        )
        .await;
        match ended {
            Ok(Some(true)) => {
                let detail = format!("{name}: no verification falls due after now ({why})");
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Ok(Some(false)) => {
                let detail = format!("{name}: window already over");
                self.finish(step, t0, StepOutcome::Skipped, detail);
                Ok(())
            }
            Ok(None) => {
                let detail = format!("{name} does not exist");
                self.finish(step, t0, StepOutcome::Skipped, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }
}

/// The route, when it is on TARGET (a cut-over ran); otherwise why not.
fn on_target(plan: &CutoverPlan, route: jt::Route, otherwise: &str) -> ClientResult<jt::Route> {
    if route.target == jt::RouteTarget::Target as i32 {
        return Ok(route);
    }
    Err(SpecError::new(
        "route",
        format!(
            "{} does not route to TARGET (revision {}): {otherwise}",
            plan.route_job(),
            route.revision
        ),
    )
    .into())
}
