//! `tidemark jobs`: list, show, acknowledge and trace the job-tracker's jobs.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tidemark_client::Tidemark;
use tidemark_proto::job_tracker::v1 as pb;

use crate::output::{CliResult, Output, table};

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// List jobs with their last run.
    Ls {
        /// Only jobs of this kind, e.g. unit-migration.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
    /// Show a job, its recent runs and their units.
    Show {
        name: String,
        /// How many recent runs to show.
        #[arg(long, default_value_t = 10)]
        runs: i32,
    },
    /// Acknowledge the job's failed run, so the next run may start.
    Ack {
        name: String,
        /// Why it is safe to go on (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Who acknowledges (recorded); defaults to $USER.
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
        /// The failed run; defaults to the job's blocking run.
        #[arg(long)]
        run: Option<String>,
    },
    /// Start a run of a job now over its default units (e.g. an extract
    /// between its scheduled runs) and follow it.
    Run {
        name: String,
        #[command(flatten)]
        follow: crate::work::Follow,
    },
    /// Every recorded transition of a job, run or unit, oldest first.
    History {
        name: String,
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        unit: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Kind {
    BackfillAttribute,
    UnitMigration,
    IncrementalExtract,
    Replication,
    Verification,
}

impl From<Kind> for pb::JobKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::BackfillAttribute => Self::BackfillAttribute,
            Kind::UnitMigration => Self::UnitMigration,
            Kind::IncrementalExtract => Self::IncrementalExtract,
            Kind::Replication => Self::Replication,
            Kind::Verification => Self::Verification,
        }
    }
}

pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// `RUN_STATUS_FAILED_ACKNOWLEDGED` → `failed-acknowledged`.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

pub fn run_status(v: i32) -> String {
    pb::RunStatus::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "RUN_STATUS_"),
    )
}

pub fn unit_status(v: i32) -> String {
    pb::UnitStatus::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "UNIT_STATUS_"),
    )
}

fn kind(v: i32) -> String {
    pb::JobKind::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "JOB_KIND_"),
    )
}

pub fn run_json(r: &pb::Run) -> Value {
    let units = r.units.unwrap_or_default();
    json!({
        "run_id": r.run_id, "status": run_status(r.status), "reason": r.status_reason,
        "trigger": r.trigger, "created": time(r.create_time.as_ref()), "finished": time(r.finish_time.as_ref()),
        "units": {"total": units.total, "not_migrated": units.not_migrated, "in_progress": units.in_progress,
                  "migrated": units.migrated, "failed": units.failed, "rolled_back": units.rolled_back},
        "items_processed": r.items_processed, "window_start": time(r.window_start.as_ref()),
        "last_processed": time(r.last_processed.as_ref().and_then(|w| w.time.as_ref())),
    })
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "name": j.name, "kind": kind(j.kind), "description": j.description, "revision": j.revision,
        "schedule": j.schedule.as_ref().map(|s| s.cron.clone()), "next_run": time(j.next_run_time.as_ref()),
        "blocking_run_id": j.blocking_run_id, "last_run": j.last_run.as_ref().map(run_json),
    })
}

fn units_text(r: &pb::Run) -> String {
    let u = r.units.unwrap_or_default();
    format!(
        "{}/{} migrated, {} failed, {} rolled back, {} in progress",
        u.migrated, u.total, u.failed, u.rolled_back, u.in_progress
    )
}

pub async fn run(client: &Tidemark, command: JobsCommand, out: Output) -> CliResult {
    let mut jobs = client.jobs();
    match command {
        JobsCommand::Ls { kind: k } => {
            let req = pb::ListJobsRequest {
                kind: k.map_or(0, |k| pb::JobKind::from(k) as i32),
                page_size: 1000,
                page_token: String::new(),
            };
            let resp = retried!(client, jobs, list_jobs, req)?;
            out.print(
                &Value::Array(resp.jobs.iter().map(job_json).collect()),
                || {
                    let rows: Vec<Vec<String>> = resp
                        .jobs
                        .iter()
                        .map(|j| {
                            let last = j.last_run.as_ref();
                            vec![
                                j.name.clone(),
                                kind(j.kind),
                                last.map(|r| run_status(r.status))
                                    .unwrap_or_else(|| "-".into()),
                                last.map(units_text).unwrap_or_default(),
                                if j.blocking_run_id.is_empty() {
                                    String::new()
                                } else {
                                    format!("blocked by {}", j.blocking_run_id)
                                },
                            ]
                        })
                        .collect();
                    table(&["JOB", "KIND", "LAST RUN", "UNITS", "GATE"], &rows)
                },
            );
        }
        JobsCommand::Show { name, runs } => {
            let job = retried!(
                client,
                jobs,
                get_job,
                pb::GetJobRequest { name: name.clone() }
            )?
            .job
            .unwrap_or_default();
            let list = retried!(
                client,
                jobs,
                list_runs,
                pb::ListRunsRequest {
                    job_name: name.clone(),
                    page_size: runs.clamp(1, 1000),
                    ..Default::default()
                }
            )?;
            let mut failed_units = Vec::new();
            if let Some(r) = list.runs.first() {
                let req = pb::ListUnitsRequest {
                    run_id: r.run_id.clone(),
                    statuses: vec![
                        pb::UnitStatus::Failed as i32,
                        pb::UnitStatus::RolledBack as i32,
                    ],
                    page_size: 1000,
                    ..Default::default()
                };
                failed_units = retried!(client, jobs, list_units, req)?.units;
            }
            let mut value = job_json(&job);
            value["runs"] = Value::Array(list.runs.iter().map(run_json).collect());
            value["failed_units"] = Value::Array(
                failed_units.iter().map(|u| json!({"unit": u.unit_key, "status": unit_status(u.status), "error": u.last_error})).collect(),
            );
            out.print(&value, || {
                let mut text = format!("job {} ({}), revision {}\n", job.name, kind(job.kind), job.revision);
                if !job.description.is_empty() {
                    text.push_str(&format!("  {}\n", job.description));
                }
                if let Some(s) = &job.schedule {
                    text.push_str(&format!("  schedule: {} {}; next run {}\n", s.cron, s.time_zone, time(job.next_run_time.as_ref())));
                }
                if !job.blocking_run_id.is_empty() {
                    text.push_str(&format!(
                        "  BLOCKED by failed run {}: acknowledge with `tidemark jobs ack {} --reason \"...\"`\n",
                        job.blocking_run_id, job.name
                    ));
                }
                let rows: Vec<Vec<String>> = list
                    .runs
                    .iter()
                    .map(|r| vec![r.run_id.clone(), run_status(r.status), time(r.create_time.as_ref()), units_text(r), r.status_reason.clone()])
                    .collect();
                text.push_str(&table(&["RUN", "STATUS", "CREATED", "UNITS", "REASON"], &rows));
                for u in &failed_units {
                    text.push_str(&format!("  unit {} {}: {}\n", u.unit_key, unit_status(u.status), u.last_error));
                }
                text
            });
        }
        JobsCommand::Ack {
            name,
            reason,
            actor,
            run,
        } => {
            let req = pb::AcknowledgeFailureRequest {
                job_name: name.clone(),
                run_id: run.unwrap_or_default(),
                actor,
                reason,
            };
            let run = jobs
                .acknowledge_failure(req)
                .await?
                .into_inner()
                .run
                .unwrap_or_default();
            out.print(&run_json(&run), || {
                format!(
                    "acknowledged run {} of {name}; the next run may start\n",
                    run.run_id
                )
            });
        }
        JobsCommand::Run { name, follow } => {
            return crate::work::run_job(client, &name, &follow, out).await;
        }
        JobsCommand::History { name, run, unit } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let req = pb::ListTransitionsRequest {
                    job_name: name.clone(),
                    run_id: run.clone().unwrap_or_default(),
                    unit_key: unit.clone().unwrap_or_default(),
                    page_size: 1000,
                    page_token: token.clone(),
                };
                let page = retried!(client, jobs, list_transitions, req)?;
                all.extend(page.transitions);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let describe = |t: &pb::Transition| -> String {
                use pb::transition::Change;
                match &t.change {
                    Some(Change::RunStatus(c)) => format!(
                        "run {} → {}",
                        run_status(c.from_status),
                        run_status(c.to_status)
                    ),
                    Some(Change::UnitStatus(c)) => format!(
                        "unit {} → {}",
                        unit_status(c.from_status),
                        unit_status(c.to_status)
                    ),
                    Some(Change::Route(c)) => format!(
                        "route → {} (revision {})",
                        if c.to_target == 2 { "target" } else { "source" },
                        c.revision
                    ),
                    Some(Change::JobUpdate(c)) => {
                        format!("job revision {} ({})", c.revision, c.fields.join(", "))
                    }
                    None => String::new(),
                }
            };
            let values: Vec<Value> = all
                .iter()
                .map(|t| json!({"time": time(t.time.as_ref()), "run_id": t.run_id, "unit": t.unit_key, "change": describe(t),
                                 "actor": t.actor, "reason": t.reason, "fencing_token": t.fencing_token}))
                .collect();
            out.print(&Value::Array(values), || {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|t| {
                        vec![
                            time(t.time.as_ref()),
                            t.run_id.clone(),
                            t.unit_key.clone(),
                            describe(t),
                            t.actor.clone(),
                            t.reason.clone(),
                        ]
                    })
                    .collect();
                table(&["TIME", "RUN", "UNIT", "CHANGE", "ACTOR", "REASON"], &rows)
            });
        }
    }
    Ok(())
}
