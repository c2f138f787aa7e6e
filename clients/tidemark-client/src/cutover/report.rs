//! What a cut-over reports: as it goes ([`CutoverEvent`]), when it is done
//! ([`CutoverReport`]) and when it stops ([`CutoverError`]).

use std::time::Duration;

use serde::Serialize;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::verifier::v1 as vf;

use crate::cutover::plan::Step;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Done,
    Failed,
    /// Not needed by this plan (e.g. no writers to pause).
    Skipped,
}

/// One step's record in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: Step,
    pub outcome: StepOutcome,
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub deadline: Duration,
    pub detail: String,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// What a cut-over did, step by step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CutoverReport {
    pub plan: String,
    pub pipeline: String,
    pub steps: Vec<StepRecord>,
    /// From the PauseWriters call to ResumeWriters' answer: the longest
    /// writers can have been held (None when writers were not paused).
    #[serde(serialize_with = "ser_opt_secs")]
    pub writer_pause: Option<Duration>,
    /// The verifications run (before the pause, during it).
    pub verification_ids: Vec<String>,
    /// The route job and unit, and the route revision after the switch.
    pub route_job: String,
    pub route_unit: String,
    pub route_revision: Option<u64>,
    /// Writers were resumed after a failure (or at the end).
    pub writers_resumed: bool,
    /// The route is as it was before the cut-over (true unless it switched).
    pub route_unchanged: bool,
    /// The reverse pipeline, when the plan has one and it was started.
    pub reverse_pipeline: String,
    /// The window's scheduled verification job and when the window ends
    /// (RFC 3339), when it was opened.
    pub window_job: String,
    pub window_ends: Option<String>,
}

/// A cut-over that stopped at `step`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cut-over {plan} aborted at step {step}: {reason}{}", cleanup(self))]
pub struct CutoverError {
    pub plan: String,
    pub step: Step,
    pub reason: String,
    pub report: CutoverReport,
}

fn cleanup(e: &CutoverError) -> String {
    let paused = e.report.writer_pause.is_some() || e.step == Step::PauseWriters;
    let mut out = String::new();
    if paused {
        out.push_str(if e.report.writers_resumed {
            "; writers resumed"
        } else {
            "; WRITERS NOT RESUMED (they resume by themselves at the pause's max duration; `tidemark stats resume` resumes them now)"
        });
    }
    out.push_str(if e.report.route_unchanged {
        "; route unchanged"
    } else {
        "; ROUTE SWITCHED"
    });
    out
}

/// What a cut-over reports as it goes (progress bars, logs).
#[derive(Debug, Clone)]
pub enum CutoverEvent {
    StepStarted { step: Step, deadline: Duration },
    StepFinished(StepRecord),
    Lag(rp::PipelineLag),
    Report(vf::Report),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_says_what_was_cleaned_up() {
        let e = CutoverError {
            plan: "p".into(),
            step: Step::Drain,
            reason: "missed its deadline of 20s".into(),
            report: CutoverReport {
                writer_pause: Some(Duration::from_secs(21)),
                writers_resumed: true,
                route_unchanged: true,
                ..Default::default()
            },
        };
        assert_eq!(
            e.to_string(),
            "cut-over p aborted at step drain: missed its deadline of 20s; writers resumed; route unchanged"
        );
    }
}
