use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use tidemark_kit::ServerFlags;
use tidemark_kit::main_support::{load_config, run_service};

/// The Tidemark verifier.
#[derive(Parser, Serialize)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    #[serde(flatten)]
    server: ServerFlags,
    /// Address of the job-tracker, e.g. http://job-tracker:50051.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    job_tracker_url: Option<String>,
    /// Address of the replicator (lag and repairs), e.g. http://replicator:50051.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    replicator_url: Option<String>,
    /// This replica's id in leases (unique per process), e.g. the pod name.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<String>,
    /// Directory of the embedded (SQLite) databases.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match load_config::<verifier::Config>("verifier", cli.server.config.as_deref(), &cli) {
        Ok(config) => run_service("verifier", config, verifier::run),
        Err(code) => code,
    }
}
