//! `tidemark cutover PLAN.toml [--dry-run]`: the bounded cut-over of a plan,
//! step by step, or its preconditions checked without changing anything;
//! `tidemark cutover rollback|complete|status PLAN.toml`: its window.

use std::path::{Path, PathBuf};

use tidemark_client::{ClientError, CutoverEvent, CutoverPlan, Tidemark};

use crate::error::{CliError, CliResult};
use crate::output::{self, Output};
use crate::progress;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CutoverArgs {
    /// The window after a cut-over: rollback, complete, status.
    #[command(subcommand)]
    window: Option<WindowCommand>,
    /// The plan (TOML; see the README's cut-over section).
    #[arg(required = true)]
    plan: Option<PathBuf>,
    /// Print the plan and check every precondition; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum WindowCommand {
    /// Go back to the old store during the window with every write made
    /// since the switch (needs reverse = true): pause writers, drain the
    /// reverse pipeline, verify old against new, route back to SOURCE,
    /// resume writers, stop the reverse pipeline, end the window.
    Rollback {
        /// The plan the cut-over ran.
        plan: PathBuf,
    },
    /// End the window: stop the reverse pipeline and the scheduled
    /// verifications, and record the decision on the route.
    Complete {
        /// The plan the cut-over ran.
        plan: PathBuf,
    },
    /// Where the window stands: route, reverse lag, time left, the last
    /// verification and its mismatches.
    Status {
        /// The plan the cut-over ran.
        plan: PathBuf,
    },
}

fn read_plan(path: &Path) -> Result<CutoverPlan, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::invalid(
            format!("cannot read the plan {}: {e}", path.display()),
            "pass the path of a TOML plan",
        )
    })?;
    CutoverPlan::from_toml(&text).map_err(|e| {
        CliError::invalid(
            format!("{}: {e}", path.display()),
            "fix the plan; the README's cut-over section shows every key",
        )
    })
}

pub async fn run(client: &Tidemark, a: CutoverArgs, out: Output) -> CliResult {
    let (plan, action) = match &a.window {
        Some(WindowCommand::Rollback { plan }) => (read_plan(plan)?, Action::Rollback),
        Some(WindowCommand::Complete { plan }) => (read_plan(plan)?, Action::Complete),
        Some(WindowCommand::Status { plan }) => {
            let plan = read_plan(plan)?;
            let status = client.cutover_status(&plan).await?;
            output::cutover_status(out, &status);
            return Ok(());
        }
        None => {
            let path = a.plan.as_deref().expect("clap requires the plan");
            (read_plan(path)?, Action::Forward)
        }
    };
    if a.dry_run {
        return dry_run(client, &plan, out).await;
    }
    let pb = progress::spinner(out, "starting");
    let mut observer = |event: CutoverEvent| match event {
        CutoverEvent::StepStarted { step, deadline } => {
            pb.set_message(format!("{step} (deadline {})", output::secs(deadline)));
        }
        CutoverEvent::StepFinished(r) => {
            if out == Output::Text {
                pb.println(output::cutover_step(&r));
            }
        }
        CutoverEvent::Lag(l) => pb.set_message(output::lag_line(&l)),
        CutoverEvent::Report(r) => pb.set_message(output::verify_progress(&r)),
    };
    let result = match action {
        Action::Forward => Box::pin(client.cutover(&plan, &mut observer)).await,
        Action::Rollback => Box::pin(client.cutover_rollback(&plan, &mut observer)).await,
        Action::Complete => Box::pin(client.cutover_complete(&plan, &mut observer)).await,
    };
    pb.finish_and_clear();
    match result {
        Ok(report) => {
            output::cutover_done(out, &plan, &report, action.done());
            Ok(())
        }
        Err(ClientError::Cutover(e)) => {
            output::cutover_aborted(out, &e);
            Err(CliError::Client(ClientError::Cutover(e)))
        }
        Err(e) => Err(e.into()),
    }
}

/// What `tidemark cutover` was asked to do with a plan.
#[derive(Clone, Copy)]
enum Action {
    Forward,
    Rollback,
    Complete,
}

impl Action {
    fn done(self) -> &'static str {
        match self {
            Self::Forward => "cut-over",
            Self::Rollback => "rollback",
            Self::Complete => "window complete",
        }
    }
}

async fn dry_run(client: &Tidemark, plan: &CutoverPlan, out: Output) -> CliResult {
    let checks = client.cutover_preflight(plan).await;
    let ok = checks.iter().all(|c| c.ok);
    output::cutover_dry_run(out, plan, &plan.describe(), &checks, ok);
    if ok {
        Ok(())
    } else {
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.check.clone())
            .collect();
        Err(CliError::Failed {
            message: format!("preconditions not met: {}", failed.join(", ")),
            hint: "each FAIL line above says what to do".to_owned(),
        })
    }
}
