//! Incremental extract (DESIGN.md problem 5): the RPC that creates the job
//! (`rpc`) and the executor of its segment units (`run`).

pub mod rpc;
pub mod run;
