//! Benchmarks: each figure a ratio against a raw baseline measured in the same
//! run, so it holds on a noisy, shared machine (DESIGN.md §6).
//!
//! A benchmark implements [`Benchmark`]: it brings up what it needs (in-process
//! servers on `127.0.0.1:0`, or the real components of `deploy/local`),
//! measures the raw baseline and the system with the load generators of
//! [`load`], and returns a [`Report`] of [`Row`]s. The binary prints the
//! report and rewrites that benchmark's own section of `BENCHMARKS.md`
//! ([`results`]). To add one, write a module under [`benches`] and list it in
//! [`benches::all`].

pub mod benches;
pub mod dynalite;
pub mod framework;
pub mod hot_path;
pub mod load;
pub mod machine;
pub mod proxy;
pub mod results;
pub mod throttle;

pub use framework::{Benchmark, Context, Report, Rounds, Row, Side, Sides, Target, interleaved};
pub use load::{ClosedLoop, LoadResult, OpenLoop};
pub use proxy::DelayProxy;
