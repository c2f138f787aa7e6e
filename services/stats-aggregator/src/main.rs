use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use tidemark_kit::ServerFlags;
use tidemark_kit::main_support::{load_config, run_service};

/// The Tidemark stats-aggregator.
#[derive(Parser, Serialize)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    #[serde(flatten)]
    server: ServerFlags,
    /// Redis URL of the aggregation buffer.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
    /// Time between flushes in milliseconds (at least 100).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    flush_interval_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match load_config::<stats_aggregator::Config>(
        "stats-aggregator",
        cli.server.config.as_deref(),
        &cli,
    ) {
        Ok(config) => run_service("stats-aggregator", config, stats_aggregator::run),
        Err(code) => code,
    }
}
