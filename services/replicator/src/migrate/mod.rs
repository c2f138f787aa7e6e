//! MigrateUnit (DESIGN.md problem 3): the RPC that starts a migration of
//! units (`rpc`) and the executor that migrates one unit (`run`).

pub mod rpc;
pub mod run;
