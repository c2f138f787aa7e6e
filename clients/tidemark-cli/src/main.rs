//! `tidemark`: the command line of the Tidemark control plane.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidemark_cli::output::{Output, report};
use tidemark_cli::{dev, jobs};
use tidemark_client::{Options, Tidemark};

const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure; 2 bad usage; 3 not found; 4 the current state does not allow it \
(for example a failed run awaiting acknowledgement); 5 Tidemark unreachable; 64 bad configuration; 65 invalid argument.";

#[derive(Parser)]
#[command(name = "tidemark", version, about = "Move live data between stores without losing or double-counting an update", after_help = EXIT_CODES)]
struct Cli {
    /// Tidemark endpoint.
    #[arg(
        long,
        global = true,
        env = "TIDEMARK_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Bearer token, when the services require one.
    #[arg(long, global = true, env = "TIDEMARK_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Dev(args) => return dev::main(&args),
        Command::Jobs(c) => c,
    };
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
    // The channel spawns its connection task: create it inside the runtime.
    let _entered = runtime.enter();
    let client = match Tidemark::connect(Options {
        endpoint: cli.endpoint.clone(),
        token: cli.token.clone(),
        ..Options::default()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    match runtime.block_on(jobs::run(&client, command, cli.output)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, &cli.endpoint),
    }
}
