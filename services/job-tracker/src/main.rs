use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use tidemark_kit::ServerFlags;
use tidemark_kit::main_support::{load_config, run_service};

/// The Tidemark job-tracker.
#[derive(Parser, Serialize)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    #[serde(flatten)]
    server: ServerFlags,
    /// Where state is kept.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<job_tracker::StoreKind>,
    /// Directory of the embedded store.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match load_config::<job_tracker::Config>("job-tracker", cli.server.config.as_deref(), &cli) {
        Ok(config) => run_service("job-tracker", config, job_tracker::run),
        Err(code) => code,
    }
}
