//! The bounded cut-over (DESIGN.md invariant 9): start replication → wait
//! for its backfill → verify → pause writers → drain to lag 0 → verify again
//! → switch the route → resume writers. Every step has a deadline; a step
//! that fails or misses it aborts the cut-over cleanly — writers resumed,
//! route unchanged — and the error names the step and why. The writer pause
//! is measured and reported.
//!
//! `plan` reads and checks a plan, `convert` turns it into requests, `run`
//! executes it, `preflight` checks it against the services without changing
//! anything, and `report` holds what a cut-over tells its caller.

mod convert;
mod plan;
mod preflight;
// The client's error type carries a `CutoverError`.
pub(crate) mod report;
mod run;

pub use plan::{
    CheckPlan, CountPlan, CutoverPlan, Deadlines, DigestPlan, PipelinePlan, PredicatePlan,
    RoutePlan, SinkPlan, Step, VerifyPlan, WritersPlan,
};
pub use preflight::Precondition;
pub use report::{CutoverError, CutoverEvent, CutoverReport, StepOutcome, StepRecord};
pub use run::verdict_name;
