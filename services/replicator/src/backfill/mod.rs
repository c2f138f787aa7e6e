//! BackfillAttribute (DESIGN.md problem 4): the RPCs that start and steer a
//! backfill (`rpc`) and the executor of its segment units (`run`).

pub mod rpc;
pub mod run;
