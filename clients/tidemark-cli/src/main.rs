//! `tidemark`: the command line of the Tidemark control plane.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark_cli::error::{CliResult, EXIT_CONFIG, report};
use tidemark_cli::output::Output;
use tidemark_cli::target::TargetArgs;
use tidemark_cli::{cutover, dev, jobs, replicate, stats, target, verify, work};
use tidemark_client::spec::parse_duration;
use tidemark_client::{Options, Tidemark};

const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure; 2 bad usage; 3 not found; 4 the current state does not allow it \
(for example a failed run awaiting acknowledgement); 5 Tidemark unreachable; 6 the operation ran and did not succeed \
(a run failed, a verification did not pass, a cut-over aborted cleanly); 64 bad configuration; 65 invalid argument.";

#[derive(Parser)]
#[command(name = "tidemark", version, about = "Move live data between stores without losing or double-counting an update", after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    /// Deadline of each call (long operations set their own, see --timeout
    /// of each command).
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    call_timeout: Duration,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole control plane (all four services) in one process on the
    /// embedded defaults: SQLite files under --data-dir, one listen address.
    Dev(dev::DevArgs),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Dev(args) = &cli.command {
        return dev::main(args);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let target = match target::load(&cli.target, &env) {
        Ok(t) => t,
        Err(e) => return report(&e.into(), "the configured endpoints"),
    };
    let options = match target.options(&Options {
        timeout: cli.call_timeout,
        ..Options::default()
    }) {
        Ok(o) => o,
        Err(e) => return report(&e.into(), &target.describe()),
    };
    // The channel spawns its connection task: create it inside the runtime.
    let _entered = runtime.enter();
    let client = match Tidemark::connect(options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "hint: --endpoint and the per-service URLs take http://HOST:PORT or https://HOST:PORT"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let out = cli.output;
    let result: CliResult = runtime.block_on(async {
        match cli.command {
            Command::Dev(_) => unreachable!("served above"),
            Command::Jobs(c) => jobs::run(&client, c, out).await,
            Command::BackfillAttribute(a) => work::backfill(&client, a, out).await,
            Command::MigrateUnits(a) => work::migrate(&client, a, out).await,
            Command::Extract(a) => work::extract(&client, a, out).await,
            Command::Replicate(c) => replicate::run(&client, c, out).await,
            Command::Cutover(a) => cutover::run(&client, a, out).await,
            Command::Verify(a) => verify::run(&client, a, out).await,
            Command::Stats(c) => stats::run(&client, c, out).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, &target.describe()),
    }
}
