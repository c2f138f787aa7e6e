//! A dry run: the plan in words and every precondition checked without
//! changing anything.

use serde::Serialize;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tidemark_proto::verifier::v1 as vf;
use tonic::Code;

use crate::connect::Tidemark;
use crate::cutover::plan::{CutoverPlan, Step};
use crate::cutover::run::describe_error;
use crate::ops::state_name;

/// One precondition checked by a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Precondition {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

impl CutoverPlan {
    /// The plan in words, step by step, for `--dry-run`.
    pub fn describe(&self) -> Vec<(Step, String)> {
        let p = &self.pipeline;
        let d = &self.deadlines;
        let sinks: Vec<String> = p
            .sinks
            .iter()
            .map(|s| format!("{} ({})", s.name, s.store))
            .collect();
        let checks = self
            .verification_spec()
            .map(|v| {
                v.checks
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let target = self
            .verified_sink()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let route = if self.route.unit.is_empty() {
            format!("job-wide route of {}", self.route_job())
        } else {
            format!("route of unit {} of {}", self.route.unit, self.route_job())
        };
        let writers = |what: &str| {
            if self.writers.pause {
                what.to_owned()
            } else {
                "skipped (writers.pause = false)".to_owned()
            }
        };
        let mode = self.pause_mode().unwrap_or(sa::PauseMode::Buffer);
        vec![
            (
                Step::StartReplication,
                format!(
                    "create pipeline {} from {} into {}",
                    p.name,
                    p.source,
                    sinks.join(", ")
                ),
            ),
            (
                Step::WaitBackfill,
                format!("wait until {} streams (backfill done)", p.name),
            ),
            (
                Step::Verify,
                format!("verify {} against sink {target}: {checks}", p.source),
            ),
            (
                Step::PauseWriters,
                writers(&format!(
                    "pause the stats-aggregator's writers ({}; they resume by themselves after {}s)",
                    mode.as_str_name()
                        .trim_start_matches("PAUSE_MODE_")
                        .to_ascii_lowercase(),
                    self.max_pause().as_secs()
                )),
            ),
            (
                Step::Drain,
                format!("drain {} to lag 0 (within {}s)", p.name, d.drain.as_secs()),
            ),
            (Step::FinalVerify, format!("verify again: {checks}")),
            (
                Step::StartReverse,
                if self.reverse {
                    format!(
                        "create pipeline {} from {target}'s stream back into {} (writes made after the switch reach the old store)",
                        self.reverse_pipeline(),
                        p.source
                    )
                } else {
                    "skipped (reverse = false)".to_owned()
                },
            ),
            (Step::SwitchRoute, format!("switch the {route} to TARGET")),
            (Step::ResumeWriters, writers("resume the writers")),
            (
                Step::StartWindow,
                self.window().map_or_else(
                    || "skipped (no [window], reverse = false)".to_owned(),
                    |w| {
                        format!(
                            "verify every {}s for {}s ({}); then `tidemark cutover complete` or `rollback`",
                            w.verify_every.as_secs(),
                            w.length.as_secs(),
                            self.window_job()
                        )
                    },
                ),
            ),
        ]
    }
}

/// The preconditions found so far, in the order they were checked.
#[derive(Default)]
struct Checks(Vec<Precondition>);

impl Checks {
    fn check(&mut self, check: &str, result: Result<String, String>) {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.0.push(Precondition {
            check: check.to_owned(),
            ok,
            detail,
        });
    }
}

/// Why a service cannot be used at all, as opposed to refusing one call.
fn unreachable(svc: &str, s: &tonic::Status) -> Option<String> {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unimplemented | Code::Unauthenticated | Code::Unknown
    )
    .then(|| format!("{svc} not usable: {} ({:?})", s.message(), s.code()))
}

impl Tidemark {
    /// Checks every precondition of a plan without changing anything:
    /// services reachable, the pipeline absent or identical and healthy,
    /// writers not already paused, verification jobs neither running nor
    /// blocked by a failed run, the route not already switched.
    pub async fn cutover_preflight(&self, plan: &CutoverPlan) -> Vec<Precondition> {
        let mut checks = Checks::default();
        let spec = match plan.validate().and_then(|()| plan.pipeline_spec()) {
            Ok(spec) => {
                checks.check("plan", Ok("valid".to_owned()));
                Some(spec)
            }
            Err(e) => {
                checks.check("plan", Err(e.to_string()));
                None
            }
        };
        self.check_job_tracker(&mut checks).await;
        let exists = self.check_pipeline(&mut checks, plan, spec.as_ref()).await;
        if let Some(spec) = spec {
            self.check_stores(&mut checks, plan, spec).await;
        }
        if plan.writers.pause {
            self.check_writers(&mut checks).await;
        }
        self.check_verifier(&mut checks).await;
        for final_one in [false, true] {
            self.check_verification_job(&mut checks, &plan.verification_job(final_one))
                .await;
        }
        if plan.reverse {
            self.check_reverse(&mut checks, plan).await;
        }
        self.check_route(&mut checks, plan, exists).await;
        checks.0
    }

    async fn check_job_tracker(&self, checks: &mut Checks) {
        let jobs = self
            .jobs()
            .list_jobs(jt::ListJobsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await;
        checks.check(
            "job-tracker reachable",
            jobs.map(|_| "answers".to_owned()).map_err(|s| {
                unreachable("job-tracker", &s).unwrap_or_else(|| s.message().to_owned())
            }),
        );
    }

    /// Whether the pipeline exists already.
    async fn check_pipeline(
        &self,
        checks: &mut Checks,
        plan: &CutoverPlan,
        spec: Option<&rp::PipelineSpec>,
    ) -> bool {
        let name = &plan.pipeline.name;
        let pipeline = self
            .replicator()
            .get_pipeline(rp::GetPipelineRequest { name: name.clone() })
            .await;
        checks.check(
            "replicator reachable",
            match &pipeline {
                Err(s) if unreachable("replicator", s).is_some() => {
                    Err(unreachable("replicator", s).unwrap_or_default())
                }
                _ => Ok("answers".to_owned()),
            },
        );
        let exists = pipeline.is_ok();
        match pipeline {
            Ok(r) => {
                let p = r.into_inner().pipeline.unwrap_or_default();
                let same = spec.is_none_or(|s| p.spec.as_ref() == Some(s));
                checks.check("pipeline", existing_pipeline(name, &p, same));
            }
            Err(s) if s.code() == Code::NotFound => {
                checks.check("pipeline", Ok(format!("{name} will be created")));
            }
            Err(s) => checks.check("pipeline", Err(s.message().to_owned())),
        }
        exists
    }

    /// The replicator checks the source, its stream or topic and every sink
    /// exactly as CreatePipeline would, creating nothing.
    async fn check_stores(&self, checks: &mut Checks, plan: &CutoverPlan, spec: rp::PipelineSpec) {
        let validated = self
            .replicator()
            .create_pipeline(rp::CreatePipelineRequest {
                name: plan.pipeline.name.clone(),
                spec: Some(spec),
                actor: String::new(),
                validate_only: true,
            })
            .await;
        match validated {
            Ok(r) => {
                for line in r.into_inner().checks {
                    let (what, detail) = line.split_once(": ").unwrap_or(("stores", &line));
                    checks.check(what, Ok(detail.to_owned()));
                }
            }
            Err(s) if unreachable("replicator", &s).is_none() => checks.check(
                "pipeline stores",
                Err(format!("{} ({:?})", s.message(), s.code())),
            ),
            Err(_) => {}
        }
    }

    async fn check_writers(&self, checks: &mut Checks) {
        let state = self
            .stats()
            .get_buffer_state(sa::GetBufferStateRequest {})
            .await;
        checks.check(
            "stats-aggregator writers",
            match state {
                Ok(r) => {
                    let s = r.into_inner().state.unwrap_or_default();
                    if s.paused {
                        Err(format!(
                            "already paused ({}); resume them (`tidemark stats resume`) or wait",
                            s.pause_reason
                        ))
                    } else {
                        Ok(format!(
                            "running, {} events buffered, last flush {}",
                            s.pending_events, s.last_flush_sequence
                        ))
                    }
                }
                Err(s) => {
                    Err(unreachable("stats-aggregator", &s)
                        .unwrap_or_else(|| s.message().to_owned()))
                }
            },
        );
    }

    async fn check_verifier(&self, checks: &mut Checks) {
        let probe = self
            .verifier()
            .get_report(vf::GetReportRequest {
                verification_id: "tidemark-preflight-probe".to_owned(),
            })
            .await;
        checks.check(
            "verifier reachable",
            match probe {
                Err(s) if unreachable("verifier", &s).is_some() => {
                    Err(unreachable("verifier", &s).unwrap_or_default())
                }
                _ => Ok("answers".to_owned()),
            },
        );
    }

    async fn check_verification_job(&self, checks: &mut Checks, job: &str) {
        let got = self
            .jobs()
            .get_job(jt::GetJobRequest {
                name: job.to_owned(),
            })
            .await;
        checks.check(
            &format!("verification job {job}"),
            match got {
                Err(s) if s.code() == Code::NotFound => Ok("will be created".to_owned()),
                Err(s) => Err(s.message().to_owned()),
                Ok(r) => idle_job(job, &r.into_inner().job.unwrap_or_default()),
            },
        );
    }

    /// The reverse pipeline is absent or paused (a rollback or complete
    /// left it), or identical and running (a cut-over resumed).
    async fn check_reverse(&self, checks: &mut Checks, plan: &CutoverPlan) {
        let name = plan.reverse_pipeline();
        let got = self
            .replicator()
            .get_pipeline(rp::GetPipelineRequest { name: name.clone() })
            .await;
        let want = plan.reverse_spec().ok();
        checks.check(
            "reverse pipeline",
            match got {
                Err(s) if s.code() == Code::NotFound => {
                    Ok(format!("{name} will be created at the switch"))
                }
                Err(s) => Err(s.message().to_owned()),
                Ok(r) => {
                    let p = r.into_inner().pipeline.unwrap_or_default();
                    if p.spec != want {
                        Err(format!(
                            "{name} exists with another spec: CreatePipeline would refuse it"
                        ))
                    } else {
                        Ok(format!("{name} exists ({})", state_name(p.state)))
                    }
                }
            },
        );
    }

    async fn check_route(&self, checks: &mut Checks, plan: &CutoverPlan, exists: bool) {
        let route_job = plan.route_job();
        if !exists && plan.route.job.is_empty() {
            checks.check(
                "route",
                Ok(format!(
                    "{route_job} is created with the pipeline (routes to SOURCE)"
                )),
            );
            return;
        }
        let route = self.get_route(&route_job, &plan.route.unit).await;
        checks.check(
            "route",
            match route {
                Ok(r) if r.target == jt::RouteTarget::Target as i32 => Err(format!(
                    "{route_job} already routes to TARGET (revision {}): the cut-over was done",
                    r.revision
                )),
                Ok(r) => Ok(format!(
                    "{route_job} routes to SOURCE (revision {})",
                    r.revision
                )),
                Err(e) => Err(describe_error(&e)),
            },
        );
    }
}

/// An existing pipeline the plan can reuse: the same spec, neither failed
/// nor paused.
fn existing_pipeline(name: &str, p: &rp::Pipeline, same: bool) -> Result<String, String> {
    if !same {
        Err(format!(
            "{name} exists with another spec: CreatePipeline would refuse it (pick another pipeline name or align the plan)"
        ))
    } else if p.state == rp::PipelineState::Failed as i32 {
        Err(format!(
            "{name} FAILED ({}); `tidemark replicate resume {name}` first",
            p.state_reason
        ))
    } else if p.state == rp::PipelineState::Paused as i32 {
        Err(format!(
            "{name} is paused; `tidemark replicate resume {name}` first"
        ))
    } else {
        Ok(format!(
            "{name} exists with this spec ({})",
            state_name(p.state)
        ))
    }
}

/// A verification job a proof can run: no run active, no failed run
/// blocking the next.
fn idle_job(job: &str, j: &jt::Job) -> Result<String, String> {
    let active = j.last_run.as_ref().is_some_and(|r| {
        r.status == jt::RunStatus::Running as i32 || r.status == jt::RunStatus::Queued as i32
    });
    if !j.blocking_run_id.is_empty() {
        Err(format!(
            "blocked by failed run {}: see `tidemark jobs show {job}`, then `tidemark jobs ack {job} --reason ...`",
            j.blocking_run_id
        ))
    } else if active {
        Err(format!("a run of {job} is still running; wait for it"))
    } else {
        Ok("no active run, not blocked".to_owned())
    }
}
