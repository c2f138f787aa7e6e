//! The worker side: a claimed `verify` unit runs every check of its job's
//! spec, keeps a live report for `GetReport`, and finishes the run with the
//! report (SUCCEEDED on PASS, FAILED otherwise).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use tidemark_kit::worker::{Claim, Executor, Progress, pack_any, unpack_any};
use tidemark_proto::job_tracker::v1 as jpb;
use tidemark_proto::verifier::v1 as pb;

use crate::checks::Runner;
use crate::side::Sides;
use crate::spec::Spec;
use crate::{Live, REPORT_TYPE, SPEC_TYPE, State};

/// The report and samples kept as the unit's result: the job-tracker takes
/// 64 KiB as stored, which may be up to four times the value.
const STORED_BYTES: usize = 12 * 1024;
/// Progress checkpoints while a check runs.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

pub(crate) fn executor(state: Arc<State>) -> Executor {
    Arc::new(move |claim: Claim| {
        let state = state.clone();
        Box::pin(execute(state, claim))
    })
}

pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Sums the checks into the report's totals and verdict.
pub(crate) fn summarise(report: &mut pb::Report) {
    let mut counts = pb::MismatchCounts::default();
    let mut compared = 0;
    let (mut fail, mut error, mut pending) = (false, false, false);
    for c in &report.checks {
        compared += c.source_count.max(c.target_count);
        if let Some(m) = &c.mismatches {
            counts.missing_in_target += m.missing_in_target;
            counts.extra_in_target += m.extra_in_target;
            counts.stale_version += m.stale_version;
            counts.different_content += m.different_content;
        }
        match pb::Verdict::try_from(c.verdict) {
            Ok(pb::Verdict::Fail) => fail = true,
            Ok(pb::Verdict::Error) => error = true,
            Ok(pb::Verdict::Pass) => {}
            _ => pending = true,
        }
    }
    report.items_compared = compared;
    report.mismatches = Some(counts);
    report.verdict = if pending {
        pb::Verdict::Pending
    } else if fail {
        pb::Verdict::Fail
    } else if error {
        pb::Verdict::Error
    } else {
        pb::Verdict::Pass
    } as i32;
}

/// A report with every check PENDING, before anything ran.
pub(crate) fn pending_report(run_id: &str, job_name: &str, names: &[String]) -> pb::Report {
    pb::Report {
        verification_id: run_id.to_owned(),
        job_name: job_name.to_owned(),
        status: pb::VerificationStatus::Queued as i32,
        verdict: pb::Verdict::Pending as i32,
        checks: names
            .iter()
            .map(|n| pb::CheckResult {
                name: n.clone(),
                verdict: pb::Verdict::Pending as i32,
                ..pb::CheckResult::default()
            })
            .collect(),
        ..pb::Report::default()
    }
}

#[tracing::instrument(skip_all, fields(run_id = %claim.run.run_id, job = %claim.job.name))]
async fn execute(state: Arc<State>, claim: Claim) {
    let Claim {
        run, job, lease, ..
    } = claim;
    let run_id = run.run_id.clone();
    let decoded: Result<Spec, String> =
        unpack_any::<pb::VerificationSpec>(job.spec.as_ref(), SPEC_TYPE).and_then(|p| {
            Spec::from_proto(&p, "spec").map_err(|v| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
    let names: Vec<String> = decoded
        .as_ref()
        .map(|s| s.checks.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let mut report = pending_report(&run_id, &job.name, &names);
    report.status = pb::VerificationStatus::Running as i32;
    report.start_time = Some(timestamp(SystemTime::now()));
    let spec = match decoded {
        Ok(spec) => spec,
        Err(e) => {
            report.status = pb::VerificationStatus::Failed as i32;
            report.error = format!("the job's spec cannot run: {e}");
            report.verdict = pb::Verdict::Error as i32;
            finish(&state, &lease, report, Vec::new(), &Progress::default()).await;
            return;
        }
    };
    let live = Arc::new(Mutex::new(Live {
        report: report.clone(),
        mismatches: Vec::new(),
    }));
    state
        .live
        .lock()
        .expect("live lock")
        .insert(run_id.clone(), live.clone());
    let progress = Arc::new(AtomicI64::new(0));
    let ticker = tokio::spawn({
        let lease = lease.clone();
        let progress = progress.clone();
        async move {
            loop {
                tokio::time::sleep(CHECKPOINT_EVERY).await;
                let p = Progress {
                    items_processed: progress.load(Ordering::Relaxed),
                    ..Progress::default()
                };
                if let Err(e) = lease.checkpoint(Vec::new(), &p).await {
                    tracing::debug!(error = %e, "progress checkpoint failed");
                }
            }
        }
    });
    let mut all = Vec::new();
    match Sides::open(&spec, &state.env).await {
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the stores");
            for c in &mut report.checks {
                c.verdict = pb::Verdict::Error as i32;
                c.error = format!("cannot open the stores: {e}");
            }
        }
        Ok(sides) => {
            let runner = Runner {
                spec: &spec,
                sides: &sides,
                replicator: spec
                    .recheck
                    .pipeline
                    .as_ref()
                    .map(|_| state.replicator.clone()),
                progress: progress.clone(),
                cancel: lease.lost().clone(),
                limits: state.limits,
            };
            for (i, check) in spec.checks.iter().enumerate() {
                let outcome = runner.run(check).await;
                if lease.lost().is_cancelled() {
                    // Another worker owns the unit now (or we shut down): it
                    // starts over, nothing of ours may be written.
                    ticker.abort();
                    state.live.lock().expect("live lock").remove(&run_id);
                    return;
                }
                report.checks[i] = outcome.result;
                report.rounds = report.rounds.max(outcome.rounds);
                let mut l = live.lock().expect("live lock");
                l.report = report.clone();
                l.mismatches.extend(outcome.mismatches.iter().cloned());
                drop(l);
                all.extend(outcome.mismatches);
            }
        }
    }
    ticker.abort();
    report.status = pb::VerificationStatus::Completed as i32;
    let p = Progress {
        items_processed: progress.load(Ordering::Relaxed),
        ..Progress::default()
    };
    finish(&state, &lease, report, all, &p).await;
    state.live.lock().expect("live lock").remove(&run_id);
}

/// The unit's result: the report with every mismatch as its samples, as
/// many as fit the job-tracker's limit (the detail says when some did not).
/// The report as the unit's result keeps it: the job-tracker caps a result
/// (64 KiB as stored, ~16 KiB of value to be safe), so samples beyond what
/// fits are cut, and the check's detail says so.
fn stored_report(report: &pb::Report) -> pb::Report {
    let mut stored = report.clone();
    let mut samples: Vec<Vec<pb::Mismatch>> = stored
        .checks
        .iter_mut()
        .map(|c| std::mem::take(&mut c.sample_mismatches))
        .collect();
    let mut budget = STORED_BYTES.saturating_sub(stored.encoded_len());
    for (c, kept) in stored.checks.iter_mut().zip(&mut samples) {
        let mut cut = 0;
        for m in kept.drain(..) {
            let size = m.encoded_len() + 8;
            if size > budget {
                cut += 1;
                continue;
            }
            budget -= size;
            c.sample_mismatches.push(m);
        }
        if cut > 0 {
            c.detail.push_str(&format!(
                "; {cut} samples left out of the stored report (size limit); StreamMismatches has them"
            ));
        }
    }
    stored
}

async fn finish(
    state: &State,
    lease: &tidemark_kit::worker::UnitLease,
    mut report: pb::Report,
    all: Vec<pb::Mismatch>,
    progress: &Progress,
) {
    report.finish_time = Some(timestamp(SystemTime::now()));
    let failed = report.status == pb::VerificationStatus::Failed as i32;
    if !failed {
        summarise(&mut report);
    }
    // Every mismatch goes to the mismatch store; the unit's result keeps
    // the report with what of the samples fits its size cap.
    if let Err(e) = state.mismatches.replace(lease.run_id(), &all).await {
        tracing::warn!(error = %e, "cannot keep the mismatches; the unit is retried");
        return;
    }
    let failing: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.verdict != pb::Verdict::Pass as i32)
        .map(|c| c.name.as_str())
        .collect();
    let error = if report.error.is_empty() {
        format!("verification failed: {}", failing.join(", "))
    } else {
        report.error.clone()
    };
    let passed = report.verdict == pb::Verdict::Pass as i32;
    // The run's end goes with the unit's completion: the job-tracker ends
    // the run from it even if this replica dies right after.
    let stored = Some(pack_any(REPORT_TYPE, &stored_report(&report)));
    let end_run = jpb::RunEnd {
        failed: !passed,
        error: if passed { String::new() } else { error.clone() },
        last_processed: None,
    };
    if let Err(e) = lease
        .complete_and_end_run(progress, stored.clone(), end_run)
        .await
    {
        tracing::warn!(error = %e, "cannot complete the verification unit");
        return;
    }
    state.metrics.finished(&report);
    // The run's result is the stored report too: the full one may be over
    // the job-tracker's size cap, and a refused CompleteRun would leave the
    // run RUNNING.
    let result = stored;
    // An older job-tracker ignores `end_run`: end the run here too (a no-op
    // once the job-tracker ended it the same way).
    let run_id = lease.run_id().to_owned();
    let done = if passed {
        state
            .jobs
            .complete_run(jpb::CompleteRunRequest {
                run_id,
                last_processed: None,
                result,
                actor: "verifier".to_owned(),
            })
            .await
    } else {
        state
            .jobs
            .fail_run(jpb::FailRunRequest {
                run_id,
                error,
                result,
                actor: "verifier".to_owned(),
            })
            .await
    };
    if let Err(e) = done {
        tracing::warn!(error = %e, "cannot finish the verification run");
    }
}
