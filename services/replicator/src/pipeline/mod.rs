//! Pipelines (DESIGN.md problems 1 and 2): the RPCs that create and steer
//! them (`rpc`, `checks`, `lag`, `repair`) and the executors of their units
//! (`run`: the feed unit's follow loop and the backfill segments, with
//! `feed`, `open` and the DBLog `watermark` backfill; `purge` deletes old
//! Elasticsearch tombstones while the feed unit runs). `spec` reads a
//! stored pipeline the same way on both sides.

pub mod checks;
pub mod feed;
pub mod lag;
pub mod open;
pub mod purge;
pub mod repair;
pub mod rpc;
pub mod run;
pub mod spec;
pub mod watermark;
