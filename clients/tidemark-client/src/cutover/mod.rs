//! The bounded cut-over (DESIGN.md invariant 9): start replication → wait
//! for its backfill → verify → pause writers → drain to lag 0 → verify again
//! → switch the route → resume writers. Every step has a deadline; a step
//! that fails or misses it aborts the cut-over cleanly — writers resumed,
//! route unchanged — and the error names the step and why. The writer pause
//! is measured and reported.
//!
//! With `reverse = true`, a reverse pipeline keeps the old store current
//! from the switch on, and the monitoring window (scheduled verifications)
//! ends with `complete` or `rollback` (`window`).
//!
//! `plan` reads and checks a plan, `convert` turns it into requests, `run`
//! executes it, `window` rolls it back, completes it or reports on it,
//! `preflight` checks it against the services without changing anything,
//! and `report` holds what a cut-over tells its caller.

mod convert;
mod plan;
mod preflight;
// The client's error type carries a `CutoverError`.
pub(crate) mod report;
mod run;
mod window;

pub use plan::{
    CheckPlan, CountPlan, CutoverPlan, Deadlines, DigestPlan, PipelinePlan, PredicatePlan,
    RoutePlan, SinkPlan, Step, VerifyPlan, WindowPlan, WritersPlan,
};
pub use preflight::Precondition;
pub use report::{CutoverError, CutoverEvent, CutoverReport, StepOutcome, StepRecord};
pub use run::verdict_name;
pub use window::{LastVerification, WindowStatus};
