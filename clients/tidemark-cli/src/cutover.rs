//! `tidemark cutover PLAN.toml [--dry-run]`: the bounded cut-over of a plan,
//! step by step, or its preconditions checked without changing anything.

use std::path::PathBuf;

use serde_json::{Value, json};
use tidemark_client::{ClientError, CutoverEvent, CutoverPlan, StepOutcome, Tidemark};

use crate::output::{CliError, CliResult, Output, table};
use crate::progress;

#[derive(clap::Args, Debug)]
pub struct CutoverArgs {
    /// The plan (TOML; see the README's cut-over section).
    plan: PathBuf,
    /// Print the plan and check every precondition; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn secs(d: std::time::Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
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
            pb.set_message(format!("{step} (deadline {})", secs(deadline)));
        }
        CutoverEvent::StepFinished(r) => {
            let mark = match r.outcome {
                StepOutcome::Done => "done",
                StepOutcome::Failed => "FAILED",
                StepOutcome::Skipped => "skipped",
            };
            if out == Output::Text {
                pb.println(format!(
                    "{:<18} {mark:<7} {:>8}  {}",
                    r.step.name(),
                    secs(r.elapsed),
                    r.detail
                ));
            }
        }
        CutoverEvent::Lag(l) => pb.set_message(progress::lag_line(&l)),
        CutoverEvent::Report(r) => pb.set_message(format!(
            "verifying: {} items compared, round {}",
            r.items_compared, r.rounds
        )),
    };
    let result = Box::pin(client.cutover(&plan, &mut observer)).await;
    pb.finish_and_clear();
    match result {
        Ok(report) => {
            let value = serde_json::to_value(&report).unwrap_or(Value::Null);
            out.print(&json!({"ok": true, "report": value}), || {
                format!(
                    "cut-over {} done: route {} → TARGET (revision {}); writers paused for {}\n",
                    plan.name,
                    report.route_job,
                    report.route_revision.unwrap_or_default(),
                    report
                        .writer_pause
                        .map_or_else(|| "no time (not paused)".to_owned(), secs)
                )
            });
            Ok(())
        }
        Err(ClientError::Cutover(e)) => {
            // Scripts get the report of what ran (and was undone) on stdout.
            if out == Output::Json {
                out.print(
                    &json!({"ok": false, "failed_step": e.step, "reason": e.reason,
                            "report": serde_json::to_value(&e.report).unwrap_or(Value::Null)}),
                    String::new,
                );
            }
            Err(CliError::Client(ClientError::Cutover(e)))
        }
        Err(e) => Err(e.into()),
    }
}

async fn dry_run(client: &Tidemark, plan: &CutoverPlan, out: Output) -> CliResult {
    let checks = client.cutover_preflight(plan).await;
    let steps = plan.describe();
    let ok = checks.iter().all(|c| c.ok);
    let value = json!({
        "plan": plan.name,
        "steps": steps.iter().map(|(s, what)| json!({
            "step": s.name(), "what": what, "deadline_seconds": s.deadline(&plan.deadlines).as_secs_f64(),
        })).collect::<Vec<_>>(),
        "preconditions": checks,
        "ok": ok,
    });
    out.print(&value, || {
        let rows: Vec<Vec<String>> = steps
            .iter()
            .enumerate()
            .map(|(i, (s, what))| {
                vec![
                    format!("{}. {}", i + 1, s.name()),
                    secs(s.deadline(&plan.deadlines)),
                    what.clone(),
                ]
            })
            .collect();
        let pre: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    if c.ok { "ok" } else { "FAIL" }.to_owned(),
                    c.check.clone(),
                    c.detail.clone(),
                ]
            })
            .collect();
        format!(
            "cut-over plan {}\n{}\npreconditions:\n{}{}",
            plan.name,
            table(&["STEP", "DEADLINE", "WHAT"], &rows),
            table(&["", "CHECK", "DETAIL"], &pre),
            if ok {
                "all preconditions hold; run it without --dry-run\n"
            } else {
                ""
            }
        )
    });
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
