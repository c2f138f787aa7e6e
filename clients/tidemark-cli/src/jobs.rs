//! `tidemark jobs`: list, show, acknowledge and trace the job-tracker's jobs.

use tidemark_client::Tidemark;
use tidemark_proto::job_tracker::v1 as pb;

use crate::error::CliResult;
use crate::output::{self, Output};

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

pub async fn run(client: &Tidemark, command: JobsCommand, out: Output) -> CliResult {
    match command {
        JobsCommand::Ls { kind } => ls(client, kind, out).await,
        JobsCommand::Show { name, runs } => show(client, &name, runs, out).await,
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
            let run = client
                .jobs()
                .acknowledge_failure(req)
                .await?
                .into_inner()
                .run
                .unwrap_or_default();
            output::acknowledged(out, &name, &run);
            Ok(())
        }
        JobsCommand::Run { name, follow } => {
            crate::work::run_job(client, &name, &follow, out).await
        }
        JobsCommand::History { name, run, unit } => {
            history(
                client,
                &name,
                run.unwrap_or_default(),
                unit.unwrap_or_default(),
                out,
            )
            .await
        }
    }
}

async fn ls(client: &Tidemark, kind: Option<Kind>, out: Output) -> CliResult {
    let jobs = client.jobs();
    let req = pb::ListJobsRequest {
        kind: kind.map_or(0, |k| pb::JobKind::from(k) as i32),
        page_size: 1000,
        page_token: String::new(),
    };
    let resp = retried!(client, jobs, list_jobs, req)?;
    output::jobs(out, &resp.jobs);
    Ok(())
}

async fn show(client: &Tidemark, name: &str, runs: i32, out: Output) -> CliResult {
    let jobs = client.jobs();
    let job = retried!(
        client,
        jobs,
        get_job,
        pb::GetJobRequest {
            name: name.to_owned()
        }
    )?
    .job
    .unwrap_or_default();
    let list = retried!(
        client,
        jobs,
        list_runs,
        pb::ListRunsRequest {
            job_name: name.to_owned(),
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
    output::job(out, &job, &list.runs, &failed_units);
    Ok(())
}

async fn history(
    client: &Tidemark,
    name: &str,
    run: String,
    unit: String,
    out: Output,
) -> CliResult {
    let jobs = client.jobs();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListTransitionsRequest {
            job_name: name.to_owned(),
            run_id: run.clone(),
            unit_key: unit.clone(),
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
    output::history(out, &all);
    Ok(())
}
