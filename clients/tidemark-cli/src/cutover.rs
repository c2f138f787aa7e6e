//! `tidemark cutover PLAN.toml [--dry-run]`: the bounded cut-over of a plan,
//! step by step, or its preconditions checked without changing anything.

use std::path::PathBuf;

use tidemark_client::{ClientError, CutoverEvent, CutoverPlan, Tidemark};

use crate::error::{CliError, CliResult};
use crate::output::{self, Output};
use crate::progress;

#[derive(clap::Args, Debug)]
pub struct CutoverArgs {
    /// The plan (TOML; see the README's cut-over section).
    plan: PathBuf,
    /// Print the plan and check every precondition; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(client: &Tidemark, a: CutoverArgs, out: Output) -> CliResult {
    let text = std::fs::read_to_string(&a.plan).map_err(|e| {
        CliError::invalid(
            format!("cannot read the plan {}: {e}", a.plan.display()),
            "pass the path of a TOML plan",
        )
    })?;
    let plan = CutoverPlan::from_toml(&text).map_err(|e| {
        CliError::invalid(
            format!("{}: {e}", a.plan.display()),
            "fix the plan; the README's cut-over section shows every key",
        )
    })?;
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
    let result = Box::pin(client.cutover(&plan, &mut observer)).await;
    pb.finish_and_clear();
    match result {
        Ok(report) => {
            output::cutover_done(out, &plan, &report);
            Ok(())
        }
        Err(ClientError::Cutover(e)) => {
            output::cutover_aborted(out, &e);
            Err(CliError::Client(ClientError::Cutover(e)))
        }
        Err(e) => Err(e.into()),
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
