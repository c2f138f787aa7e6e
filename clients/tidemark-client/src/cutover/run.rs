//! The runner: each step of a plan under its deadline, in order, and the
//! clean-up of an abort (writers resumed, route restored).

use std::future::Future;
use std::time::{Duration, Instant};

use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tidemark_proto::verifier::v1 as vf;

use crate::connect::Tidemark;
use crate::cutover::plan::{CutoverPlan, Step};
use crate::cutover::report::{CutoverError, CutoverEvent, CutoverReport, StepOutcome, StepRecord};
use crate::error::{ClientError, ClientResult};
use crate::ops::state_name;
use crate::spec::{proto_duration, std_duration};

/// Runs one step under its deadline; the error is the reason in words.
pub(crate) async fn bounded<T>(
    step: Step,
    deadline: Duration,
    fut: impl Future<Output = ClientResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe_error(&e)),
        Err(_) => Err(format!(
            "missed its deadline of {} (deadlines.{} in the plan)",
            human(deadline),
            step.deadline_key()
        )),
    }
}

pub(crate) fn describe_error(e: &ClientError) -> String {
    match e {
        ClientError::Rpc(s) => format!("{} ({:?})", s.message(), s.code()),
        other => other.to_string(),
    }
}

fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// A report whose checks did not all pass, in one line.
/// Whether a report failed only on values: every failing check has no
/// error, equal counts, and no key missing, extra or at a stale version.
fn content_only(report: &vf::Report) -> bool {
    report.error.is_empty()
        && report
            .checks
            .iter()
            .filter(|c| c.verdict != vf::Verdict::Pass as i32)
            .all(|c| {
                let m = c.mismatches.unwrap_or_default();
                c.error.is_empty()
                    && c.source_count == c.target_count
                    && m.missing_in_target == 0
                    && m.extra_in_target == 0
                    && m.stale_version == 0
                    && m.different_content > 0
            })
}

fn verdict_failure(report: &vf::Report) -> Option<String> {
    if report.verdict == vf::Verdict::Pass as i32 {
        return None;
    }
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.verdict != vf::Verdict::Pass as i32)
        .map(|c| {
            let m = c.mismatches.unwrap_or_default();
            let why = if c.error.is_empty() {
                format!(
                    "{}; missing in target {}, extra in target {}, stale version {}, different content {}",
                    c.detail,
                    m.missing_in_target,
                    m.extra_in_target,
                    m.stale_version,
                    m.different_content
                )
            } else {
                c.error.clone()
            };
            format!("{} {} ({why})", c.name, verdict_name(c.verdict))
        })
        .collect();
    Some(format!(
        "verification {} did not pass: {}{}",
        report.verification_id,
        failed.join("; "),
        if report.error.is_empty() {
            String::new()
        } else {
            format!("; {}", report.error)
        }
    ))
}

/// `VERDICT_PASS` → `pass`.
pub fn verdict_name(v: i32) -> String {
    vf::Verdict::try_from(v).map_or_else(
        |_| v.to_string(),
        |v| {
            v.as_str_name()
                .trim_start_matches("VERDICT_")
                .to_ascii_lowercase()
        },
    )
}

impl Tidemark {
    /// Runs a cut-over plan (see the module comment of `cutover`), reporting
    /// each step to `observer`.
    ///
    /// # Errors
    /// [`ClientError::Cutover`] naming the step that failed and why, after
    /// resuming writers and leaving the route as it was;
    /// [`ClientError::Spec`] for a plan that cannot be sent.
    pub async fn cutover(
        &self,
        plan: &CutoverPlan,
        observer: &mut (dyn FnMut(CutoverEvent) + Send + Sync),
    ) -> ClientResult<CutoverReport> {
        plan.validate()?;
        let spec = plan.pipeline_spec()?;
        let verification = plan.verification_spec()?;
        let mut run = Run::new(self, plan, Direction::Forward, observer);
        run.start_replication(spec).await?;
        run.wait_backfill().await?;
        run.verify(verification.clone()).await?;
        let before = run.route_before().await?;
        run.pause_writers().await?;
        run.drain().await?;
        run.final_verify(verification).await?;
        run.start_reverse().await?;
        run.switch_route(&before).await?;
        run.resume_writers().await?;
        run.start_window().await?;
        Ok(run.report)
    }
}

/// Which way a run moves the route.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The cut-over: SOURCE to TARGET.
    Forward,
    /// Back to SOURCE in the window, through the reverse pipeline.
    Rollback,
}

/// One cut-over (or rollback) under way: the steps in the order of the
/// runbook.
pub(crate) struct Run<'a> {
    pub(crate) client: &'a Tidemark,
    pub(crate) plan: &'a CutoverPlan,
    pub(crate) report: CutoverReport,
    observer: &'a mut (dyn FnMut(CutoverEvent) + Send + Sync),
    /// When PauseWriters was sent: from then on every failure resumes the
    /// writers (a pause that timed out may still have taken effect).
    paused_at: Option<Instant>,
    direction: Direction,
}

impl<'a> Run<'a> {
    pub(crate) fn new(
        client: &'a Tidemark,
        plan: &'a CutoverPlan,
        direction: Direction,
        observer: &'a mut (dyn FnMut(CutoverEvent) + Send + Sync),
    ) -> Self {
        Self {
            client,
            plan,
            report: CutoverReport {
                plan: plan.name.clone(),
                pipeline: plan.pipeline.name.clone(),
                route_job: plan.route_job(),
                route_unit: plan.route.unit.clone(),
                route_unchanged: true,
                ..CutoverReport::default()
            },
            observer,
            paused_at: None,
            direction,
        }
    }
}

impl Run<'_> {
    /// The pipeline drained during the pause: the one that carries writes
    /// towards the store the route is about to name.
    fn drained_pipeline(&self) -> String {
        match self.direction {
            Direction::Forward => self.plan.pipeline.name.clone(),
            Direction::Rollback => self.plan.reverse_pipeline(),
        }
    }

    fn verification_job(&self, final_one: bool) -> String {
        match self.direction {
            Direction::Forward => self.plan.verification_job(final_one),
            Direction::Rollback => format!("cutover/{}/rollback", self.plan.name),
        }
    }

    fn route_to(&self) -> jt::RouteTarget {
        match self.direction {
            Direction::Forward => jt::RouteTarget::Target,
            Direction::Rollback => jt::RouteTarget::Source,
        }
    }

    fn why(&self) -> String {
        match self.direction {
            Direction::Forward => format!("cutover {}", self.plan.name),
            Direction::Rollback => format!("cutover {} rolled back", self.plan.name),
        }
    }

    pub(crate) fn start(&mut self, step: Step) -> (Instant, Duration) {
        let deadline = step.deadline(&self.plan.deadlines);
        (self.observer)(CutoverEvent::StepStarted { step, deadline });
        (Instant::now(), deadline)
    }

    pub(crate) fn finish(&mut self, step: Step, t0: Instant, outcome: StepOutcome, detail: String) {
        let record = StepRecord {
            step,
            outcome,
            elapsed: t0.elapsed(),
            deadline: step.deadline(&self.plan.deadlines),
            detail,
        };
        self.report.steps.push(record.clone());
        (self.observer)(CutoverEvent::StepFinished(record));
    }

    /// Records the failed step; the error carries the report so far.
    pub(crate) fn abort(&mut self, step: Step, t0: Instant, reason: String) -> ClientError {
        self.finish(step, t0, StepOutcome::Failed, reason.clone());
        ClientError::Cutover(Box::new(CutoverError {
            plan: self.plan.name.clone(),
            step,
            reason,
            report: std::mem::take(&mut self.report),
        }))
    }

    /// [`Self::abort`] after resuming the writers if they were paused.
    async fn abort_paused(&mut self, step: Step, t0: Instant, reason: String) -> ClientError {
        self.resume_after_failure().await;
        self.abort(step, t0, reason)
    }

    pub(crate) fn skip(&mut self, step: Step, why: &str) {
        let t0 = Instant::now();
        self.finish(step, t0, StepOutcome::Skipped, why.to_owned());
    }

    /// 1. Start replication (an identical pipeline is returned as is).
    async fn start_replication(&mut self, spec: rp::PipelineSpec) -> ClientResult<()> {
        let step = Step::StartReplication;
        let (t0, deadline) = self.start(step);
        let create = rp::CreatePipelineRequest {
            name: self.plan.pipeline.name.clone(),
            spec: Some(spec),
            actor: self.plan.actor.clone(),
            validate_only: false,
        };
        let svc = self.client.replicator();
        let created = bounded(
            step,
            deadline,
            self.client.idempotent(|| {
                let mut svc = svc.clone();
                let req = create.clone();
                async move { svc.create_pipeline(req).await }
            }),
        )
        .await;
        match created {
            Ok(r) => {
                let p = r.pipeline.unwrap_or_default();
                let detail = format!("pipeline {} is {}", p.name, state_name(p.state));
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }

    /// 2. Wait for the backfill.
    async fn wait_backfill(&mut self) -> ClientResult<()> {
        let step = Step::WaitBackfill;
        let (t0, deadline) = self.start(step);
        let name = &self.plan.pipeline.name;
        let observer = &mut *self.observer;
        let waited = bounded(
            step,
            deadline,
            self.client.wait_streaming(name, deadline, |lag| {
                observer(CutoverEvent::Lag(lag.clone()));
            }),
        )
        .await;
        match waited {
            Ok(_) => {
                let detail = "backfill done, streaming".to_owned();
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }

    /// Runs one proof (`final_one`: the one during the pause); the detail
    /// of a pass, or the reason it did not pass.
    async fn prove(
        &mut self,
        step: Step,
        deadline: Duration,
        final_one: bool,
        spec: vf::VerificationSpec,
    ) -> Result<String, (String, bool)> {
        let request = vf::StartVerificationRequest {
            job_name: self.verification_job(final_one),
            spec: Some(spec),
            schedule: None,
            actor: self.plan.actor.clone(),
            correlation_id: String::new(),
        };
        let observer = &mut *self.observer;
        let report = bounded(
            step,
            deadline,
            // Boxed: the verify future is large, and every step awaiting
            // it would carry its size.
            Box::pin(self.client.verify(request, deadline, |r| {
                observer(CutoverEvent::Report(r.clone()));
            })),
        )
        .await
        .map_err(|reason| (reason, false))?;
        self.report
            .verification_ids
            .push(report.verification_id.clone());
        verdict_failure(&report).map_or_else(
            || {
                Ok(format!(
                    "verification {} passed ({} items compared)",
                    report.verification_id, report.items_compared
                ))
            },
            |reason| Err((reason, content_only(&report))),
        )
    }

    /// 3. Verify while writers still run: a cheap early "no" before the
    ///    pause (re-checks absorb what is still in flight).
    async fn verify(&mut self, spec: vf::VerificationSpec) -> ClientResult<()> {
        let step = Step::Verify;
        let (t0, deadline) = self.start(step);
        match self.prove(step, deadline, false, spec).await {
            Ok(detail) => {
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            // Writers still write: values of keys being written differ
            // until the copy catches up, and may differ again at every
            // re-check. With every key present on both sides and no stale
            // version, that is not a "no"; the verify after the pause and
            // the drain, with the source quiet, decides.
            Err((reason, true)) => {
                let detail = format!(
                    "only values of keys being written differ while writers run ({reason}); the final verify decides"
                );
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err((reason, false)) => Err(self.abort(step, t0, reason)),
        }
    }

    /// The route before the switch, to switch only from it (and to restore
    /// it if a timed-out switch took effect anyway).
    pub(crate) async fn route_before(&mut self) -> ClientResult<jt::Route> {
        let route = self
            .client
            .get_route(&self.report.route_job, &self.plan.route.unit)
            .await;
        route.map_err(|e| {
            let reason = format!("cannot read the route to switch: {}", describe_error(&e));
            self.abort(Step::SwitchRoute, Instant::now(), reason)
        })
    }

    /// 4. Pause writers. From here on every failure resumes them.
    pub(crate) async fn pause_writers(&mut self) -> ClientResult<()> {
        if !self.plan.writers.pause {
            self.skip(Step::PauseWriters, "writers.pause = false");
            return Ok(());
        }
        let step = Step::PauseWriters;
        let (t0, deadline) = self.start(step);
        self.paused_at = Some(Instant::now());
        let req = sa::PauseWritersRequest {
            mode: self.plan.pause_mode()? as i32,
            reason: self.why(),
            max_pause: Some(proto_duration(self.plan.max_pause())),
        };
        let svc = self.client.stats();
        let paused = bounded(
            step,
            deadline,
            self.client.idempotent(|| {
                let mut svc = svc.clone();
                let req = req.clone();
                async move { svc.pause_writers(req).await }
            }),
        )
        .await;
        match paused {
            Ok(r) => {
                let s = r.state.unwrap_or_default();
                let detail = format!(
                    "writers paused and quiesced={} ({} events buffered)",
                    s.quiesced, s.pending_events
                );
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort_paused(step, t0, reason).await),
        }
    }

    /// 5. Drain to lag 0.
    pub(crate) async fn drain(&mut self) -> ClientResult<()> {
        let step = Step::Drain;
        let (t0, deadline) = self.start(step);
        let name = self.drained_pipeline();
        // The bound outlasts the drain's own timeout, so a slow drain
        // reports the lag it left rather than a bare missed deadline.
        let drained = bounded(
            step,
            deadline + Duration::from_secs(5),
            self.client.drain(&name, deadline),
        )
        .await;
        match drained {
            Ok(r) => {
                let lag = r.lag.unwrap_or_default();
                let detail = format!(
                    "{name} at lag 0 after {:.1}s",
                    std_duration(r.elapsed.as_ref()).as_secs_f64()
                );
                (self.observer)(CutoverEvent::Lag(lag));
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort_paused(step, t0, reason).await),
        }
    }

    /// 6. Verify again, with the source quiet.
    pub(crate) async fn final_verify(&mut self, spec: vf::VerificationSpec) -> ClientResult<()> {
        let step = Step::FinalVerify;
        let (t0, deadline) = self.start(step);
        match self.prove(step, deadline, true, spec).await {
            Ok(detail) => {
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err((reason, _)) => Err(self.abort_paused(step, t0, reason).await),
        }
    }

    /// 7. With `reverse`: create the reverse pipeline, and see its feed
    ///    read the new store's stream before anyone can write there (it
    ///    starts where the stream is when first read).
    async fn start_reverse(&mut self) -> ClientResult<()> {
        let step = Step::StartReverse;
        if !self.plan.reverse {
            self.skip(step, "reverse = false");
            return Ok(());
        }
        let (t0, deadline) = self.start(step);
        let name = self.plan.reverse_pipeline();
        let create = rp::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(self.plan.reverse_spec()?),
            actor: self.plan.actor.clone(),
            validate_only: false,
        };
        let client = self.client;
        let started = bounded(step, deadline, async {
            let svc = client.replicator();
            match client.get_pipeline(&name).await {
                // A rollback or complete left it paused: it goes on from
                // where it stopped.
                Ok(p) if p.spec == create.spec && p.state == rp::PipelineState::Paused as i32 => {
                    svc.clone()
                        .resume_pipeline(rp::ResumePipelineRequest {
                            name: name.clone(),
                            actor: create.actor.clone(),
                        })
                        .await?;
                }
                Ok(_) | Err(_) => {
                    client
                        .idempotent(|| {
                            let mut svc = svc.clone();
                            let req = create.clone();
                            async move { svc.create_pipeline(req).await }
                        })
                        .await?;
                }
            }
            client.drain(&name, deadline).await
        })
        .await;
        match started {
            Ok(_) => {
                self.report.reverse_pipeline.clone_from(&name);
                let detail = format!("{name} follows the new store's stream into the old store");
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => Err(self.abort_paused(step, t0, reason).await),
        }
    }

    /// 10. The monitoring window: a verification of old against new on the
    ///     plan's schedule until its end (or `complete`).
    async fn start_window(&mut self) -> ClientResult<()> {
        let step = Step::StartWindow;
        let Some(window) = self.plan.window() else {
            self.skip(step, "no [window] and reverse = false");
            return Ok(());
        };
        let (t0, deadline) = self.start(step);
        let now = std::time::SystemTime::now();
        let end = now + window.length;
        let request = vf::StartVerificationRequest {
            job_name: self.plan.window_job(),
            spec: Some(self.plan.window_verification_spec()?),
            schedule: Some(jt::Schedule {
                cron: window.cron()?,
                time_zone: String::new(),
                max_wait: Some(proto_duration(window.verify_every)),
                start_time: Some(now.into()),
                end_time: Some(end.into()),
            }),
            actor: self.plan.actor.clone(),
            correlation_id: String::new(),
        };
        let mut svc = self.client.verifier();
        let started = bounded(step, deadline, async {
            Ok(svc.start_verification(request).await?.into_inner())
        })
        .await;
        match started {
            Ok(r) => {
                self.report.window_job = self.plan.window_job();
                self.report.window_ends =
                    Some(chrono::DateTime::<chrono::Utc>::from(end).to_rfc3339());
                let detail = format!(
                    "{} verifies every {}s until {} (first run {})",
                    self.report.window_job,
                    window.verify_every.as_secs(),
                    self.report.window_ends.clone().unwrap_or_default(),
                    r.verification_id
                );
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            // The route already switched and writers run: that stands.
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }

    /// 8. Switch the route, only from the route read before the pause.
    pub(crate) async fn switch_route(&mut self, before: &jt::Route) -> ClientResult<()> {
        let step = Step::SwitchRoute;
        let (t0, deadline) = self.start(step);
        let to = self.route_to();
        let req = jt::SetRouteRequest {
            job_name: self.report.route_job.clone(),
            unit_key: self.plan.route.unit.clone(),
            target: to as i32,
            actor: self.plan.actor.clone(),
            reason: self.why(),
            expected_revision: before.revision,
        };
        let mut svc = self.client.jobs();
        let switched = bounded(step, deadline, async {
            Ok(svc.set_route(req).await?.into_inner())
        })
        .await;
        match switched {
            Ok(r) => {
                let route = r.route.unwrap_or_default();
                self.report.route_revision = Some(route.revision);
                self.report.route_unchanged = false;
                let detail = format!(
                    "route → {} (revision {})",
                    to.as_str_name().trim_start_matches("ROUTE_TARGET_"),
                    route.revision
                );
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            Err(reason) => {
                self.restore_route(before).await;
                Err(self.abort_paused(step, t0, reason).await)
            }
        }
    }

    /// 9. Resume writers.
    pub(crate) async fn resume_writers(&mut self) -> ClientResult<()> {
        if !self.plan.writers.pause {
            self.skip(Step::ResumeWriters, "writers.pause = false");
            return Ok(());
        }
        let step = Step::ResumeWriters;
        let (t0, deadline) = self.start(step);
        let resumed = bounded(step, deadline, self.send_resume()).await;
        self.report.writer_pause = self.paused_at.map(|t| t.elapsed());
        match resumed {
            Ok(()) => {
                self.report.writers_resumed = true;
                let detail = format!(
                    "writers resumed; paused for {:.2}s",
                    self.report.writer_pause.unwrap_or_default().as_secs_f64()
                );
                self.finish(step, t0, StepOutcome::Done, detail);
                Ok(())
            }
            // The route already switched: that part stands; the writers
            // resume by themselves at max_pause.
            Err(reason) => Err(self.abort(step, t0, reason)),
        }
    }

    /// ResumeWriters, retried while UNAVAILABLE.
    async fn send_resume(&self) -> ClientResult<()> {
        let svc = self.client.stats();
        self.client
            .idempotent(|| {
                let mut svc = svc.clone();
                async move {
                    svc.resume_writers(sa::ResumeWritersRequest { flush_now: false })
                        .await
                }
            })
            .await
            .map(drop)
    }

    /// Resumes writers after a failed step (retrying within the resume
    /// deadline) and records the pause.
    async fn resume_after_failure(&mut self) {
        let Some(paused_at) = self.paused_at else {
            return;
        };
        let resumed =
            tokio::time::timeout(self.plan.deadlines.resume_writers, self.send_resume()).await;
        self.report.writer_pause = Some(paused_at.elapsed());
        self.report.writers_resumed = matches!(resumed, Ok(Ok(())));
        if !self.report.writers_resumed {
            tracing::error!(plan = %self.plan.name, "writers could not be resumed after a failed cut-over step");
        }
    }

    /// After a failed or timed-out switch: if the route did change, set it
    /// back, so the cut-over leaves it as it found it.
    async fn restore_route(&mut self, before: &jt::Route) {
        let job = self.plan.route_job();
        let unit = self.plan.route.unit.clone();
        let Ok(now) = self.client.get_route(&job, &unit).await else {
            self.report.route_unchanged = false;
            return;
        };
        if now.revision == before.revision {
            return;
        }
        let back = if before.target == jt::RouteTarget::Unspecified as i32 {
            jt::RouteTarget::Source as i32
        } else {
            before.target
        };
        let req = jt::SetRouteRequest {
            job_name: job,
            unit_key: unit,
            target: back,
            actor: self.plan.actor.clone(),
            reason: format!("{} aborted: route restored", self.why()),
            expected_revision: now.revision,
        };
        let restored = self.client.jobs().set_route(req).await;
        self.report.route_unchanged = restored.is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_verification_says_which_check_and_why() {
        let report = vf::Report {
            verification_id: "v1".into(),
            verdict: vf::Verdict::Fail as i32,
            checks: vec![
                vf::CheckResult {
                    name: "counts".into(),
                    verdict: vf::Verdict::Pass as i32,
                    ..Default::default()
                },
                vf::CheckResult {
                    name: "content".into(),
                    verdict: vf::Verdict::Fail as i32,
                    detail: "3 missing in target".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let why = verdict_failure(&report).unwrap();
        assert!(
            why.contains("content fail (3 missing in target; missing in target 0"),
            "{why}"
        );
        assert!(!why.contains("counts"), "{why}");
        assert!(
            verdict_failure(&vf::Report {
                verdict: vf::Verdict::Pass as i32,
                ..Default::default()
            })
            .is_none()
        );
    }

    #[tokio::test]
    async fn a_step_past_its_deadline_fails_with_the_plan_key() {
        let r: Result<(), String> = bounded(Step::Drain, Duration::from_millis(20), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await;
        assert_eq!(
            r.unwrap_err(),
            "missed its deadline of 20ms (deadlines.drain in the plan)"
        );
    }
}
