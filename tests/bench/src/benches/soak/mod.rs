//! `soak`: the four services as separate processes of their release
//! binaries under 2,000 requests/s of mixed RPCs for 10 minutes (30 s with
//! `--quick`). Figures: errors (none allowed), each RPC's p99 against a
//! health check on the same process in the same run, and each process's
//! resident memory and open file descriptors, sampled every 10 s and
//! printed as they come, the last third of the run against the first
//! (flat: nothing grows with the requests served).

mod mix;
pub mod sample;

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tidemark_chaos::plane::{Process, build_services, free_addr, start_all};

use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};

/// Requests per second over all RPCs (a unit cycle counts its four).
const RATE: f64 = 2_000.0;
const FULL: Duration = Duration::from_secs(600);
/// Resident memory and descriptors of the last third over the first (after
/// a tenth of warm-up) at most this.
const FLAT: f64 = 1.2;

pub struct Soak;

#[async_trait::async_trait]
impl Benchmark for Soak {
    fn name(&self) -> &'static str {
        "soak"
    }

    fn description(&self) -> &'static str {
        "2,000 requests/s of mixed RPCs on the four services as separate processes \
         (release binaries, embedded stores): errors, each RPC's p99 against a gRPC \
         health check on the same process in the same run, and each process's \
         resident memory and open descriptors, the last third of the run against the \
         first (flat)."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let duration = ctx.time(FULL);
        let dir = tempfile::tempdir()?;
        let mut plane = start(dir.path()).await?;
        let fixture = mix::Fixture::set_up(&plane, dir.path()).await?;
        let every = (duration / 60).clamp(Duration::from_secs(1), Duration::from_secs(10));
        let pids = plane
            .iter()
            .map(|p| Ok((p.name.clone(), p.pid().context("a process is down")?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sampler = sample::Sampler::spawn("soak".to_owned(), pids, every);
        let results = mix::run(fixture, RATE, duration).await?;
        let samples = sampler.stop().await?;
        for p in &mut plane {
            p.check_alive()?;
        }
        let mut report = Report::default();
        rows(&mut report, &results, duration);
        for (name, series) in &samples {
            flat_rows(&mut report, name, series, duration);
        }
        report.notes.push(format!(
            "{} for {} s; sampled every {} s; binaries built in release into a temporary \
             directory; job-tracker-units serves only the unit cycle (no worker claims \
             its units), each run of it {} units",
            mix::describe(RATE),
            duration.as_secs(),
            every.as_secs(),
            mix::RUN_UNITS
        ));
        Ok(report)
    }
}

/// The processes: the job-tracker the services use, one more that only
/// the soak's unit cycle claims from (every replicator or verifier claims
/// any unit of its kinds), the replicator, the stats-aggregator and the
/// verifier, each on the embedded stores in `dir`.
async fn start(dir: &Path) -> anyhow::Result<Vec<Process>> {
    let bins = dir.join("bin");
    let into = bins.clone();
    tokio::task::spawn_blocking(move || build_services(&into)).await??;
    let data = |name: &str| {
        (
            "TIDEMARK_DATA_DIR".to_owned(),
            dir.join(name).display().to_string(),
        )
    };
    let jobs = free_addr()?;
    let jobs_url = (
        "TIDEMARK_JOB_TRACKER_URL".to_owned(),
        format!("http://{jobs}"),
    );
    let worker = |name: &str| ("TIDEMARK_WORKER_ID".to_owned(), name.to_owned());
    let replicator = free_addr()?;
    let mut plane = vec![
        Process::new(
            "job-tracker",
            bins.join("job-tracker"),
            vec![data("jobs")],
            jobs,
            dir,
        ),
        Process::new(
            "job-tracker-units",
            bins.join("job-tracker"),
            vec![data("units")],
            free_addr()?,
            dir,
        ),
        Process::new(
            "replicator",
            bins.join("replicator"),
            vec![
                data("replicator"),
                jobs_url.clone(),
                worker("soak-replicator"),
            ],
            replicator,
            dir,
        ),
        Process::new(
            "stats-aggregator",
            bins.join("stats-aggregator"),
            vec![
                data("stats"),
                ("TIDEMARK_STORE".to_owned(), "embedded".to_owned()),
                ("TIDEMARK_BUFFER".to_owned(), "embedded".to_owned()),
            ],
            free_addr()?,
            dir,
        ),
        Process::new(
            "verifier",
            bins.join("verifier"),
            vec![
                data("verifier"),
                jobs_url,
                worker("soak-verifier"),
                (
                    "TIDEMARK_REPLICATOR_URL".to_owned(),
                    format!("http://{replicator}"),
                ),
            ],
            free_addr()?,
            dir,
        ),
    ];
    start_all(&mut plane).await?;
    Ok(plane)
}

/// The p99 of each RPC against its process's health check, and the errors.
fn rows(report: &mut Report, results: &[mix::Outcome], duration: Duration) {
    let health = |process: &str| {
        results
            .iter()
            .find(|o| o.health && o.process == process)
            .map_or(f64::NAN, |o| o.result.latency_us(0.99) / 1000.0)
    };
    let (mut errors, mut requests) = (0u64, 0u64);
    for o in results {
        errors += o.result.errors;
        requests += (o.result.ok + o.result.errors) * o.rpcs;
        if let Some(e) = &o.result.first_error {
            report.notes.push(format!(
                "{}: {} errors, first: {e}",
                o.name, o.result.errors
            ));
        }
        if o.health {
            continue;
        }
        report.rows.push(Row::new(
            format!("{} p99 (vs health check)", o.name),
            "ms",
            o.result.latency_us(0.99) / 1000.0,
            health(o.process),
        ));
    }
    report.rows.push(
        Row::new(
            "RPCs failed (vs sent)",
            "req",
            errors as f64,
            requests as f64,
        )
        .with_target(Target::SystemBelow(1.0)),
    );
    let answered: u64 = results.iter().map(|o| o.result.ok * o.rpcs).sum();
    report.rows.push(
        Row::new(
            "RPCs answered per second (vs scheduled)",
            "req/s",
            answered as f64 / duration.as_secs_f64(),
            mix::scheduled(RATE),
        )
        .with_target(Target::RatioAtLeast(0.95)),
    );
}

/// Resident memory and descriptors of one process: the median of the last
/// third of the run against the median of the first third after warm-up.
fn flat_rows(report: &mut Report, name: &str, series: &[sample::Sample], duration: Duration) {
    let warm = duration / 10;
    let early: Vec<&sample::Sample> = series
        .iter()
        .filter(|s| s.at >= warm && s.at < duration * 2 / 5)
        .collect();
    let late: Vec<&sample::Sample> = series.iter().filter(|s| s.at >= duration * 2 / 3).collect();
    let median = |v: &[&sample::Sample], f: fn(&sample::Sample) -> f64| {
        let mut x: Vec<f64> = v.iter().map(|s| f(s)).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let rss = |s: &sample::Sample| s.rss_bytes as f64 / (1024.0 * 1024.0);
    let fds = |s: &sample::Sample| s.fds as f64;
    report.rows.push(
        Row::new(
            format!("{name} resident memory, last third vs first"),
            "MiB",
            median(&late, rss),
            median(&early, rss),
        )
        .with_target(Target::RatioAtMost(FLAT)),
    );
    report.rows.push(
        Row::new(
            format!("{name} open descriptors, last third vs first"),
            "fds",
            median(&late, fds),
            median(&early, fds),
        )
        .with_target(Target::RatioAtMost(FLAT)),
    );
    if let (Some(first), Some(last)) = (series.first(), series.last()) {
        report.notes.push(format!(
            "{name}: {} MiB and {} fds at {} s, {} MiB and {} fds at {} s",
            fmt_num(rss(first)),
            first.fds,
            first.at.as_secs(),
            fmt_num(rss(last)),
            last.fds,
            last.at.as_secs()
        ));
    }
}
