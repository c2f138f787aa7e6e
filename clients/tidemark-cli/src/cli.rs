//! The command line's arguments: global flags and the commands. In the
//! library so that `tidemark completions` and `tidemark man` (and their
//! tests) render the same definition the binary parses.

use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark_client::spec::parse_duration;

use crate::output::Output;
use crate::target::TargetArgs;
use crate::{cutover, dev, jobs, replicate, seed, stats, verify, work};

pub const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure; 2 bad usage; 3 not found; 4 the current state does not allow it \
(for example a failed run awaiting acknowledgement); 5 Tidemark unreachable; 6 the operation ran and did not succeed \
(a run failed, a verification did not pass, a cut-over aborted cleanly); 64 bad configuration; 65 invalid argument.";

#[derive(Parser)]
#[command(name = "tidemark", version, about = "Move live data between stores without losing or double-counting an update", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Deadline of each call (long operations set their own, see --timeout
    /// of each command).
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub call_timeout: Duration,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the whole control plane (all four services) in one process on the
    /// embedded defaults: SQLite files under --data-dir, one listen address.
    Dev(dev::DevArgs),
    /// Write sample items into an embedded table of a local `tidemark dev`
    /// (its --data-dir), to try the operations on sqlite: stores alone.
    Seed(seed::SeedArgs),
    /// Jobs, runs and units of the job-tracker.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Set an attribute on every item lacking it, never overwriting a
    /// concurrent writer (problem 4), and follow the run.
    BackfillAttribute(work::BackfillArgs),
    /// Migrate units (courses, tenants) each as one transaction, N at a time,
    /// and follow the run; a rerun leaves MIGRATED units alone.
    MigrateUnits(work::MigrateArgs),
    /// Create an incremental extract job (items changed since the last run
    /// to S3, with a manifest per run), optionally scheduled; --run-now
    /// starts and follows a run.
    Extract(work::ExtractArgs),
    /// Replication pipelines: create, list, pause, resume, drain, lag.
    #[command(subcommand)]
    Replicate(replicate::ReplicateCommand),
    /// Run a cut-over plan: replicate, verify, pause writers, drain, verify,
    /// switch the route, resume writers; each step under a deadline.
    Cutover(cutover::CutoverArgs),
    /// Prove a target agrees with its source: counts, predicate, digests.
    Verify(verify::VerifyArgs),
    /// The stats-aggregator: ingest events, read counters, pause writers.
    #[command(subcommand)]
    Stats(stats::StatsCommand),
    /// Each service's gRPC health (grpc.health.v1, as the readiness probes
    /// ask): exit 0 when every one asked is SERVING.
    Health(crate::health::HealthArgs),
    /// Print a shell completion script to stdout, e.g. `tidemark
    /// completions bash > /etc/bash_completion.d/tidemark`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, e.g. `tidemark man > tidemark.1`.
    Man,
}
