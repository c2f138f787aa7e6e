//! `tidemark`: the command line of the Tidemark control plane.

use tidemark_cli::dev;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Move live data between stores without losing or double-counting an update"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole control plane (all four services) in one process on the
    /// embedded defaults: SQLite files under --data-dir, one listen address.
    Dev(dev::DevArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::main(&args),
    }
}
