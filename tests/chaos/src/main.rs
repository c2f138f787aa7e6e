//! `tidemark-chaos`: the fault matrix (issue #15). The job-tracker (on the
//! DynamoDB store), two replicator replicas and the stats-aggregator (Redis
//! buffer, DynamoDB counters) run as separate processes of their real
//! binaries on the local components, while three problems run at once with
//! writers that keep their own ledgers: counters through ingest and
//! periodic flushes (problem 1), a table's stream into Elasticsearch
//! (problem 2), per-unit migrations to S3 with a unit that fails on purpose
//! (problem 3), attribute backfills under concurrent writers (problem 4),
//! and an incremental extract scheduled every 3 s (problem 5). Services are killed -9 on a schedule drawn from the seed.
//! Every store the services use (DynamoDB, Elasticsearch, Redis) and the
//! job-tracker as the replicators reach it sit behind fault proxies that
//! add latency, hang (blackhole) or reset connections on the same schedule.
//! At the end the stores are checked against the ledgers, not against the
//! services' reports; the exit status is 0 only when nothing was lost,
//! counted twice, resurrected or overwritten.

mod backfill;
mod counters;
mod extract;
mod faults;
mod migrate;
mod plane;
mod proxy;
mod report;
mod stream;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::testing::{local_env, local_sdk_config, unique_name, workspace_root};
use tokio_util::sync::CancellationToken;

use crate::plane::{Process, build_services, free_addr};

/// How long a backfill or migration run may take once started before the
/// matrix gives up on it (and fails: work that never ends is lost too).
pub const RUN_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(about = "Kill the control plane's processes while it works, and count what was lost")]
struct Args {
    /// How long faults are injected, e.g. 75s or 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the kill schedule and the writers: the same seed replays
    /// the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Kills; default one per 20 s of the run, at least 5.
    #[arg(long)]
    kills: Option<usize>,
    /// Rewrite the chaos section of RELIABILITY.md with this run.
    #[arg(long)]
    record: bool,
    /// Where the services' logs go (default: a temporary directory, kept
    /// when the run fails).
    #[arg(long)]
    logs: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number and s or m, e.g. 75s"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: the unit is s or m")),
    }
}

/// The AWS settings of the local components (credentials, region), which
/// the children need in their environment like any AWS program.
fn aws_env() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/local/.run/env")).unwrap_or_default();
    let mut vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    vars.extend(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")));
    vars
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    out.extend(aws_env());
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let logs_dir = tempfile::Builder::new()
        .prefix("tidemark-chaos")
        .tempdir()?;
    let logs = args
        .logs
        .clone()
        .unwrap_or_else(|| logs_dir.path().to_owned());
    std::fs::create_dir_all(&logs)?;
    let bins = logs.join("bin");
    build_services(&bins)?;
    // What was built: the commit, and whether the tree had changes.
    let built_from = report::built_from();
    let dynamo_endpoint = local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let redis = local_env("TIDEMARK_TEST_REDIS_URL");
    let sdk = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);

    let run = unique_name("chaos");
    let stats_table_name = format!("{run}-stats");
    let stats_table = DynamoTable::create(
        dynamo.clone(),
        &stats_table_name,
        &counters::schema(),
        false,
    )
    .await
    .context("create the counters table")?;
    let stream_table_name = format!("{run}-docs");
    let stream_table =
        DynamoTable::create(dynamo.clone(), &stream_table_name, &stream::schema(), true)
            .await
            .context("create the streamed table")?;
    let backfill_table_name = format!("{run}-items");
    let backfill_table = DynamoTable::create(
        dynamo.clone(),
        &backfill_table_name,
        &backfill::schema(),
        false,
    )
    .await
    .context("create the backfill table")?;
    backfill::seed(&backfill_table).await?;
    let units_table_name = format!("{run}-units");
    let units_table =
        DynamoTable::create(dynamo.clone(), &units_table_name, &migrate::schema(), false)
            .await
            .context("create the units table")?;
    migrate::seed(&units_table).await?;
    let orders_table_name = format!("{run}-orders");
    let orders_table = DynamoTable::create(
        dynamo.clone(),
        &orders_table_name,
        &extract::schema(),
        false,
    )
    .await
    .context("create the extracted table")?;
    let s3 = tidemark_connectors::testing::s3_client().await;
    tidemark_connectors::s3::S3Sink::ensure_bucket(&s3, &run)
        .await
        .context("create the bucket")?;

    let jobs_addr = free_addr()?;
    let jobs_url = format!("http://{jobs_addr}");
    // The services reach the stores (and the replicators the job-tracker)
    // through fault proxies; the writers and the checks go straight.
    let proxies = vec![
        proxy::FaultProxy::start("dynamodb", socket_of(&dynamo_endpoint).await?).await?,
        proxy::FaultProxy::start("elasticsearch", socket_of(&es).await?).await?,
        proxy::FaultProxy::start("redis", socket_of(&redis).await?).await?,
        proxy::FaultProxy::start("job-tracker", jobs_addr).await?,
    ];
    let via = |i: usize, scheme: &str| format!("{scheme}://{}", proxies[i].addr);
    let (dynamo_via, es_via, redis_via, jobs_via) = (
        via(0, "http"),
        via(1, "http"),
        via(2, "redis"),
        via(3, "http"),
    );
    let data = logs.join("data");
    let mut processes = vec![Process::new(
        "job-tracker",
        bins.join("job-tracker"),
        env(&[
            ("TIDEMARK_STORE", "dynamodb".to_owned()),
            ("TIDEMARK_DYNAMODB_TABLE", format!("{run}-jobs")),
            ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
            ("TIDEMARK_SCHEDULER_TICK_MS", "200".to_owned()),
        ]),
        jobs_addr,
        &logs,
    )];
    for replica in ["replicator-a", "replicator-b"] {
        processes.push(Process::new(
            replica,
            bins.join("replicator"),
            env(&[
                ("TIDEMARK_JOB_TRACKER_URL", jobs_via.clone()),
                ("TIDEMARK_WORKER_ID", replica.to_owned()),
                // Longer than the longest store fault: a blackhole of the
                // job-tracker must not cost every unit a lease.
                ("TIDEMARK_LEASE_SECS", "8".to_owned()),
                (
                    "TIDEMARK_DATA_DIR",
                    data.join(replica).display().to_string(),
                ),
                ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
                ("TIDEMARK_ELASTICSEARCH_URL", es_via.clone()),
                ("TIDEMARK_INJECT_UNIT_FAULT", migrate::FAULTY.to_owned()),
            ]),
            free_addr()?,
            &logs,
        ));
    }
    processes.push(Process::new(
        "stats-aggregator",
        bins.join("stats-aggregator"),
        env(&[
            ("TIDEMARK_BUFFER", "redis".to_owned()),
            ("TIDEMARK_REDIS_URL", redis_via),
            ("TIDEMARK_BUFFER_NAME", run.clone()),
            ("TIDEMARK_STORE", "dynamodb".to_owned()),
            ("TIDEMARK_STATS_TABLE", stats_table_name),
            ("TIDEMARK_AWS_ENDPOINT", dynamo_via),
            ("TIDEMARK_FLUSH_INTERVAL_MS", "1000".to_owned()),
            (
                "TIDEMARK_DATA_DIR",
                data.join("stats").display().to_string(),
            ),
        ]),
        free_addr()?,
        &logs,
    ));
    for p in &mut processes {
        p.start()?;
        p.wait_serving(Duration::from_secs(60)).await?;
    }
    let replicator_url = processes[1].url();
    let other_replicator_url = processes[2].url();
    let stats_url = processes[3].url();

    // The workloads.
    let stop = CancellationToken::new();
    let stream_ledger = stream::seed(&stream_table).await?;
    let pipeline = format!("{run}-sync");
    let index = format!("{run}-docs");
    stream::create(
        replicator_url.clone(),
        &pipeline,
        &stream_table_name,
        &index,
    )
    .await?;
    let counting = tokio::spawn(counters::write(
        stats_url.clone(),
        run.clone(),
        args.seed,
        stop.clone(),
    ));
    let streaming = tokio::spawn(stream::write(
        stream_table,
        stream_ledger,
        args.seed,
        stop.clone(),
    ));
    let extract_job = format!("{run}-extract");
    extract::create(
        replicator_url.clone(),
        &extract_job,
        &orders_table_name,
        &run,
    )
    .await?;
    let extracting = tokio::spawn(extract::write(orders_table, args.seed, stop.clone()));
    let migrating = tokio::spawn(migrate::runs(
        migrate::Setup {
            replicator: replicator_url.clone(),
            jobs: jobs_url.clone(),
            table: units_table_name,
            bucket: run.clone(),
            s3: s3.clone(),
        },
        args.seed,
        stop.clone(),
    ));
    let jobs_check_url = jobs_url.clone();
    let backfilling = tokio::spawn(backfill::rounds(
        other_replicator_url,
        jobs_url,
        backfill_table.clone(),
        backfill_table_name,
        args.seed,
        stop.clone(),
    ));

    // The faults.
    let kills = args.kills.unwrap_or_else(|| {
        usize::try_from(args.duration.as_secs() / 20)
            .unwrap_or(5)
            .max(5)
    });
    let schedule = faults::schedule(
        args.seed,
        args.duration,
        kills,
        processes.len(),
        proxies.len(),
    );
    let fault_phase = Instant::now();
    let done = faults::run(&mut processes, &proxies, &schedule).await;
    let done = match done {
        Ok(r) => r,
        Err(e) => {
            let _ = logs_dir.keep();
            return Err(e.context(format!(
                "the fault phase stopped; logs in {}",
                logs.display()
            )));
        }
    };
    while fault_phase.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    eprintln!("chaos: faults over; waiting for the runs in progress, then checking the stores");

    // The checks, against the ledgers.
    let counted = counting.await??;
    let streamed = streaming.await??;
    let backfilled = backfilling.await??;
    let migrated = migrating.await??;
    let extracted_writes = extracting.await??;
    let (lost_counts, doubled_counts) = counters::check(stats_url, &stats_table, &counted).await?;
    let synced = stream::check(replicator_url, &pipeline, &index, &streamed).await?;
    let extracted =
        extract::check(jobs_check_url, &extract_job, &run, s3, &extracted_writes).await?;
    for p in &mut processes {
        p.check_alive()?;
    }
    let outcome = report::Outcome {
        seed: args.seed,
        duration: args.duration,
        services: processes
            .iter()
            .map(|p| (p.name.clone(), p.kills))
            .collect(),
        recoveries: done.recoveries,
        store_faults: done.store_faults,
        counted,
        lost_counts,
        doubled_counts,
        streamed_writes: streamed.writes,
        synced,
        backfilled,
        migrated,
        extract_writes: extracted_writes.writes,
        extracted,
        elapsed: started.elapsed(),
    };
    let table = outcome.render();
    println!("{table}");
    if args.record {
        report::record(&table, &args_line(&args), &built_from)?;
    }
    if outcome.clean() {
        Ok(())
    } else {
        let _ = logs_dir.keep();
        anyhow::bail!(
            "the run lost, doubled, resurrected or overwrote data; logs in {}",
            logs.display()
        )
    }
}

/// The address of an endpoint URL (`http://host:port`, `redis://host:port`).
async fn socket_of(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolve {url}"))?
        .next()
        .with_context(|| format!("{url} resolves to nothing"))
}

fn args_line(args: &Args) -> String {
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    format!(
        "cargo run{profile} -p tidemark-chaos -- --duration {}s --seed {}{}",
        args.duration.as_secs(),
        args.seed,
        args.kills
            .map(|k| format!(" --kills {k}"))
            .unwrap_or_default()
    )
}
