//! The benchmarks, in the order `all` runs them. Add a module here and list
//! it in [`all`]; the command line, `--list` and `BENCHMARKS.md` pick it up.

use crate::framework::Benchmark;

pub mod hot_path;
pub mod job_tracker;
pub mod noop_rpc;
pub mod replicator;
pub mod scale;
pub mod soak;
pub mod stats_aggregator;
pub mod stats_memory;
pub mod throttling;
pub mod verifier;

pub fn all() -> Vec<Box<dyn Benchmark>> {
    vec![
        Box::new(noop_rpc::NoopRpc),
        Box::new(job_tracker::JobTrackerClaims),
        Box::new(replicator::ReplicatorBench),
        Box::new(hot_path::HotPath),
        Box::new(verifier::Verification),
        Box::new(stats_aggregator::StatsAggregatorBench),
        Box::new(throttling::Throttling),
    ]
}

/// Runs too long for `all`, each run by its name: the soak (10 minutes),
/// the scale curve (up to 5M items), the replica counts and the
/// stats-aggregator's dedup memory (two 10-minute windows).
pub fn long() -> Vec<Box<dyn Benchmark>> {
    vec![
        Box::new(soak::Soak),
        Box::new(scale::Scale),
        Box::new(replicator::replicas::Replicas),
        Box::new(stats_memory::StatsMemory),
    ]
}

/// The benchmark called `name`.
pub fn find(name: &str) -> Option<Box<dyn Benchmark>> {
    all().into_iter().chain(long()).find(|b| b.name() == name)
}
