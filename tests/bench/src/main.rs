//! `cargo run --release -p tidemark-bench -- <name>|all`: runs benchmarks,
//! prints their figures and rewrites their sections of `BENCHMARKS.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use clap::builder::PossibleValuesParser;
use tidemark_bench::framework::fmt_num;
use tidemark_bench::machine::RunInfo;
use tidemark_bench::{Benchmark, Context, Report, benches, results};

/// Every figure is a ratio against a raw baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "tidemark-bench")]
struct Args {
    /// The benchmark to run, or `all`.
    #[arg(required_unless_present = "list", value_parser = bench_names())]
    name: Option<String>,
    /// List the benchmarks and what each compares.
    #[arg(long)]
    list: bool,
    /// The results file whose sections are rewritten.
    #[arg(long, default_value_os_t = workspace_root().join("BENCHMARKS.md"))]
    output: PathBuf,
    /// Print the figures without touching the results file.
    #[arg(long)]
    no_write: bool,
    /// Smoke run with every duration cut twenty-fold; never written.
    #[arg(long)]
    quick: bool,
    /// Exit with a failure when a figure misses its target.
    #[arg(long)]
    check: bool,
}

fn bench_names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        benches::all()
            .iter()
            .chain(benches::long().iter())
            .map(|b| b.name())
            .chain(std::iter::once("all")),
    )
}

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The kit's telemetry (JSON at `info`, every span an OpenTelemetry span
/// with its ids in the lines, as a deployed service), written to a sink: the
/// per-RPC spans cost what they cost in a deployed service, and nothing
/// lands between the figures.
fn install_subscriber() {
    // Ignored if something installed one already: then that one is used.
    let _ = tidemark_kit::telemetry::init_with_writer(
        "tidemark-bench",
        tidemark_kit::config::LogFormat::Json,
        "info",
        None,
        std::io::sink,
    );
}

fn print_report(report: &Report) {
    println!(
        "{:<44} {:>16} {:>16} {:>9}",
        "figure", "system", "baseline", "ratio"
    );
    for row in &report.rows {
        let target = match (row.target, row.met()) {
            (Some(t), Some(met)) => {
                format!(
                    "  {} {}",
                    t.display(row.unit),
                    if met { "met" } else { "MISSED" }
                )
            }
            _ => String::new(),
        };
        println!(
            "{:<44} {:>16} {:>16} {:>8}×{target}",
            row.figure,
            format!("{} {}", fmt_num(row.system), row.unit),
            format!("{} {}", fmt_num(row.baseline), row.unit),
            fmt_num(row.ratio),
        );
    }
    for note in &report.notes {
        println!("  - {note}");
    }
}

async fn run_one(bench: &dyn Benchmark, ctx: &Context, args: &Args, command: &str) -> bool {
    let name = bench.name();
    eprintln!("== {name}: {}", bench.description());
    let run = RunInfo::detect(&ctx.workspace_root, command.to_owned());
    let started = Instant::now();
    let mut report = match bench.run(ctx).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{name} failed: {e:#}");
            return false;
        }
    };
    // A missed target is explained by where the time goes: the profile
    // `scripts/profile NAME` wrote, when there is one.
    let profile = format!("benchmarks/profiles/{name}.md");
    if !report.targets_met() && ctx.workspace_root.join(&profile).is_file() {
        report.notes.push(format!(
            "Where the time goes: [{profile}]({profile}) (`scripts/profile {name}`: perf, self time by crate and function)"
        ));
    }
    eprintln!("== {name} took {:.1}s", started.elapsed().as_secs_f64());
    print_report(&report);
    if args.quick || args.no_write {
        eprintln!(
            "(not written: {})",
            if args.quick { "--quick" } else { "--no-write" }
        );
    } else {
        let section = results::render_section(name, bench.description(), &report, &run);
        if let Err(e) = results::write_section(&args.output, name, &section) {
            eprintln!("cannot write {}: {e}", args.output.display());
            return false;
        }
        eprintln!("wrote the {name} section of {}", args.output.display());
    }
    !args.check || report.targets_met()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for bench in benches::all().into_iter().chain(benches::long()) {
            println!("{:<12} {}", bench.name(), bench.description());
        }
        return ExitCode::SUCCESS;
    }
    install_subscriber();
    let selected = match args.name.as_deref() {
        Some("all") => benches::all(),
        Some(name) => benches::find(name).into_iter().collect(),
        None => Vec::new(),
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; run with --release for figures worth keeping");
    }
    let command = std::iter::once("cargo run --release -p tidemark-bench --".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let ctx = Context {
        quick: args.quick,
        workspace_root: workspace_root(),
        figures: (!args.quick && !args.no_write).then(|| {
            args.output
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("benchmarks")
        }),
    };
    let mut ok = true;
    for bench in &selected {
        ok &= run_one(bench.as_ref(), &ctx, &args, &command).await;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
