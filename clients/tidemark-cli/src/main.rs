//! `tidemark`: the command line of the Tidemark control plane.

use std::process::ExitCode;

use clap::Parser;
use tidemark_cli::cli::{Cli, Command};
use tidemark_cli::error::{CliResult, EXIT_CONFIG, report};
use tidemark_cli::{
    cutover, dev, docs, health, jobs, replicate, seed, stats, target, verify, work,
};
use tidemark_client::{Options, Tidemark, is_traceparent, new_traceparent};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Dev(args) => return dev::main(args),
        Command::Completions { shell } => return docs::completions(*shell),
        Command::Man => return docs::man(),
        _ => {}
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
    if let Command::Seed(args) = &cli.command {
        return runtime.block_on(seed::run(args, cli.output));
    }
    let env = |name: &str| std::env::var(name).ok();
    let target = match target::load(&cli.target, &env) {
        Ok(t) => t,
        Err(e) => return report(&e.into(), "the configured endpoints"),
    };
    // One trace for the command's calls: TRACEPARENT when the caller (a
    // script, a CI job) has one, else a new one.
    let traceparent = env("TRACEPARENT")
        .filter(|t| is_traceparent(t))
        .unwrap_or_else(new_traceparent);
    let options = match target.options(&Options {
        timeout: cli.call_timeout,
        traceparent: Some(traceparent),
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
            Command::Dev(_) | Command::Seed(_) | Command::Completions { .. } | Command::Man => {
                unreachable!("served above")
            }
            Command::Jobs(c) => jobs::run(&client, c, out).await,
            Command::BackfillAttribute(a) => work::backfill(&client, a, out).await,
            Command::MigrateUnits(a) => work::migrate(&client, a, out).await,
            Command::Extract(a) => work::extract(&client, a, out).await,
            Command::Replicate(c) => replicate::run(&client, c, out).await,
            Command::Cutover(a) => cutover::run(&client, a, out).await,
            Command::Verify(a) => verify::run(&client, a, out).await,
            Command::Stats(c) => stats::run(&client, c, out).await,
            Command::Health(a) => health::run(&client, a, out).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, &target.describe()),
    }
}
