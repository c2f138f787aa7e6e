//! `tidemark-chaos`: the fault matrix (issue #15). The job-tracker (on the
//! DynamoDB store), two replicator replicas, the stats-aggregator (Redis
//! buffer, DynamoDB counters) and two verifier replicas run as separate
//! processes of their real binaries on the local components, while the five
//! problems run at once with writers that keep their own ledgers: counters
//! through ingest and periodic flushes (problem 1), a table's stream into
//! Elasticsearch (problem 2), per-unit migrations to S3 with a unit that
//! fails on purpose (problem 3), attribute backfills under concurrent
//! writers (problem 4), an incremental extract scheduled every 3 s
//! (problem 5), and verifications of a pair of tables with planted
//! differences. Services are killed -9 on a schedule drawn from the seed.
//! The stats-aggregator publishes its absolute values to Kafka.
//! Every store the services use (DynamoDB and S3, Elasticsearch, Redis,
//! Kafka) and
//! the job-tracker as the workers reach it sit behind fault proxies that
//! add latency, hang (blackhole), reset connections or close them slowly on
//! the same schedule. At the end the stores are checked against the ledgers,
//! not against the services' reports, and the job-tracker's history for
//! leases held twice; the exit status is 0 only when nothing was lost,
//! counted twice, resurrected or overwritten.

mod backfill;
mod counters;
mod cutover;
mod extract;
mod faults;
mod leases;
mod migrate;
mod proxy;
mod published;
mod report;
mod stream;
mod verify;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::testing::{local_env, local_sdk_config, unique_name, workspace_root};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tidemark_chaos::plane::{self, Process, build_services, free_addr};

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

/// The tables and the bucket of one run, created fresh (named after it).
struct Stores {
    run: String,
    dynamo_endpoint: String,
    es: String,
    redis: String,
    kafka: String,
    /// The topic the stats-aggregator publishes to.
    stats_topic: String,
    stats: (String, DynamoTable),
    /// Where problem 1's cut-over moves the counters.
    stats_v2: (String, DynamoTable),
    stream: (String, DynamoTable),
    backfill: (String, DynamoTable),
    units: String,
    orders: (String, DynamoTable),
    verified: [String; 3],
    s3: aws_sdk_s3::Client,
}

async fn table(
    dynamo: &aws_sdk_dynamodb::Client,
    name: String,
    schema: &tidemark_connectors::KeySchema,
    stream: bool,
) -> anyhow::Result<(String, DynamoTable)> {
    let t = DynamoTable::create(dynamo.clone(), &name, schema, stream)
        .await
        .with_context(|| format!("create table {name}"))?;
    Ok((name, t))
}

impl Stores {
    async fn create() -> anyhow::Result<Self> {
        let sdk = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
        let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
        let run = unique_name("chaos");
        // With a stream: the cut-over's pipeline follows it.
        let stats = table(&dynamo, format!("{run}-stats"), &counters::schema(), true).await?;
        let stats_v2 = table(
            &dynamo,
            format!("{run}-stats-v2"),
            &counters::schema(),
            false,
        )
        .await?;
        let stream = table(&dynamo, format!("{run}-docs"), &stream::schema(), true).await?;
        let backfill = table(&dynamo, format!("{run}-items"), &backfill::schema(), false).await?;
        backfill::seed(&backfill.1).await?;
        let units = table(&dynamo, format!("{run}-units"), &migrate::schema(), false).await?;
        migrate::seed(&units.1).await?;
        let orders = table(&dynamo, format!("{run}-orders"), &extract::schema(), false).await?;
        let mut verified = Vec::new();
        for side in ["source", "same", "diff"] {
            verified
                .push(table(&dynamo, format!("{run}-v-{side}"), &verify::schema(), false).await?);
        }
        verify::seed(&verified[0].1, &verified[1].1, &verified[2].1).await?;
        // The verifiers' shared table of mismatches (its layout is theirs).
        table(
            &dynamo,
            format!("{run}-mismatches"),
            &tidemark_connectors::KeySchema::new("run", Some("seq")),
            false,
        )
        .await?;
        let s3 = tidemark_connectors::testing::s3_client().await;
        tidemark_connectors::s3::S3Sink::ensure_bucket(&s3, &run)
            .await
            .context("create the bucket")?;
        let kafka = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
        let stats_topic = format!("{run}-stats");
        published::create_topic(&kafka, &stats_topic).await?;
        let [a, b, c] = <[(String, DynamoTable); 3]>::try_from(verified)
            .map_err(|_| anyhow::anyhow!("three verified tables"))?;
        Ok(Self {
            dynamo_endpoint: local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT"),
            es: local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
            redis: local_env("TIDEMARK_TEST_REDIS_URL"),
            kafka,
            stats_topic,
            run,
            stats,
            stats_v2,
            stream,
            backfill,
            units: units.0,
            orders,
            verified: [a.0, b.0, c.0],
            s3,
        })
    }
}

/// The fault proxies: the services reach the stores (and the workers the
/// job-tracker) through them; the writers and the checks go straight.
async fn proxies(stores: &Stores, jobs: SocketAddr) -> anyhow::Result<Vec<proxy::FaultProxy>> {
    Ok(vec![
        proxy::FaultProxy::start("dynamodb", socket_of(&stores.dynamo_endpoint).await?).await?,
        proxy::FaultProxy::start("elasticsearch", socket_of(&stores.es).await?).await?,
        proxy::FaultProxy::start("redis", socket_of(&stores.redis).await?).await?,
        proxy::FaultProxy::start("job-tracker", jobs).await?,
        proxy::FaultProxy::start_kafka("kafka", socket_of(&stores.kafka).await?).await?,
    ])
}

/// The processes, in this order: job-tracker, two replicators, the
/// stats-aggregator, two verifiers.
fn processes(
    stores: &Stores,
    proxies: &[proxy::FaultProxy],
    jobs: SocketAddr,
    bins: &Path,
    logs: &Path,
) -> anyhow::Result<Vec<Process>> {
    let via = |i: usize, scheme: &str| format!("{scheme}://{}", proxies[i].addr);
    let (dynamo_via, es_via, redis_via, jobs_via) = (
        via(0, "http"),
        via(1, "http"),
        via(2, "redis"),
        via(3, "http"),
    );
    let kafka_via = proxies[4].addr.to_string();
    let data = logs.join("data");
    let run = &stores.run;
    let mut processes = vec![Process::new(
        "job-tracker",
        bins.join("job-tracker"),
        env(&[
            ("TIDEMARK_STORE", "dynamodb".to_owned()),
            ("TIDEMARK_DYNAMODB_TABLE", format!("{run}-jobs")),
            ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
            ("TIDEMARK_SCHEDULER_TICK_MS", "200".to_owned()),
        ]),
        jobs,
        logs,
    )];
    for replica in ["replicator-a", "replicator-b"] {
        processes.push(Process::new(
            replica,
            bins.join("replicator"),
            env(&[
                ("TIDEMARK_JOB_TRACKER_URL", jobs_via.clone()),
                ("TIDEMARK_WORKER_ID", replica.to_owned()),
                // The product's default (15 s), not a shorter one: the
                // matrix runs what a deployment runs.
                ("TIDEMARK_LEASE_SECS", "15".to_owned()),
                (
                    "TIDEMARK_DATA_DIR",
                    data.join(replica).display().to_string(),
                ),
                ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
                ("TIDEMARK_ELASTICSEARCH_URL", es_via.clone()),
                ("TIDEMARK_INJECT_UNIT_FAULT", migrate::FAULTY.to_owned()),
            ]),
            free_addr()?,
            logs,
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
            ("TIDEMARK_STATS_TABLE", stores.stats.0.clone()),
            ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
            ("TIDEMARK_FLUSH_INTERVAL_MS", "1000".to_owned()),
            ("TIDEMARK_KAFKA_BROKERS", kafka_via),
            ("TIDEMARK_KAFKA_TOPIC", stores.stats_topic.clone()),
            (
                "TIDEMARK_DATA_DIR",
                data.join("stats").display().to_string(),
            ),
        ]),
        free_addr()?,
        logs,
    ));
    let replicator = processes[1].url();
    for replica in ["verifier-a", "verifier-b"] {
        processes.push(Process::new(
            replica,
            bins.join("verifier"),
            env(&[
                ("TIDEMARK_JOB_TRACKER_URL", jobs_via.clone()),
                ("TIDEMARK_REPLICATOR_URL", replicator.clone()),
                ("TIDEMARK_WORKER_ID", replica.to_owned()),
                (
                    "TIDEMARK_DATA_DIR",
                    data.join(replica).display().to_string(),
                ),
                ("TIDEMARK_AWS_ENDPOINT", dynamo_via.clone()),
                ("TIDEMARK_ELASTICSEARCH_URL", es_via.clone()),
                // Shared, so either replica answers for the other's
                // verifications.
                ("TIDEMARK_MISMATCH_TABLE", format!("{run}-mismatches")),
            ]),
            free_addr()?,
            logs,
        ));
    }
    Ok(processes)
}

/// The workloads' tasks, each returning its ledger or outcome.
struct Workloads {
    counting: JoinHandle<anyhow::Result<counters::Ledger>>,
    streaming: JoinHandle<anyhow::Result<stream::Ledger>>,
    extracting: JoinHandle<anyhow::Result<extract::Ledger>>,
    migrating: JoinHandle<anyhow::Result<migrate::Outcome>>,
    backfilling: JoinHandle<anyhow::Result<backfill::Outcome>>,
    verifying: JoinHandle<anyhow::Result<verify::Outcome>>,
    cutting: JoinHandle<anyhow::Result<(cutover::Outcome, tidemark_client::Tidemark)>>,
    pipeline: String,
    index: String,
    extract_job: String,
}

async fn start_workloads(
    stores: &Stores,
    processes: &[Process],
    jobs_url: &str,
    args: &Args,
    stop: &CancellationToken,
) -> anyhow::Result<Workloads> {
    let seed = args.seed;
    let run = &stores.run;
    let replicator_url = processes[1].url();
    let stream_ledger = stream::seed(&stores.stream.1).await?;
    let pipeline = format!("{run}-sync");
    let index = format!("{run}-docs");
    stream::create(replicator_url.clone(), &pipeline, &stores.stream.0, &index).await?;
    let extract_job = format!("{run}-extract");
    extract::create(replicator_url.clone(), &extract_job, &stores.orders.0, run).await?;
    Ok(Workloads {
        counting: tokio::spawn(counters::write(
            processes[3].url(),
            run.clone(),
            seed,
            stop.clone(),
        )),
        streaming: tokio::spawn(stream::write(
            stores.stream.1.clone(),
            stream_ledger,
            seed,
            stop.clone(),
        )),
        extracting: tokio::spawn(extract::write(stores.orders.1.clone(), seed, stop.clone())),
        migrating: tokio::spawn(migrate::runs(
            migrate::Setup {
                replicator: replicator_url,
                jobs: jobs_url.to_owned(),
                table: stores.units.clone(),
                bucket: run.clone(),
                s3: stores.s3.clone(),
            },
            seed,
            stop.clone(),
        )),
        backfilling: tokio::spawn(backfill::rounds(
            processes[2].url(),
            jobs_url.to_owned(),
            stores.backfill.1.clone(),
            stores.backfill.0.clone(),
            seed,
            stop.clone(),
        )),
        verifying: tokio::spawn(verify::rounds(
            [processes[4].url(), processes[5].url()],
            stores.verified.clone(),
            RUN_DEADLINE,
            stop.clone(),
        )),
        cutting: tokio::spawn(cutover::run(
            cutover::Urls {
                jobs: jobs_url.to_owned(),
                replicator: processes[1].url(),
                verifier: processes[4].url(),
                stats: processes[3].url(),
            },
            run.clone(),
            stores.stats.0.clone(),
            stores.stats_v2.0.clone(),
            args.duration / 3,
            stop.clone(),
        )),
        pipeline,
        index,
        extract_job,
    })
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
    let stores = Stores::create().await?;
    let jobs_addr = free_addr()?;
    let jobs_url = format!("http://{jobs_addr}");
    let proxies = proxies(&stores, jobs_addr).await?;
    let mut processes = processes(&stores, &proxies, jobs_addr, &bins, &logs)?;
    for p in &mut processes {
        p.start()?;
        p.wait_serving(Duration::from_secs(60)).await?;
    }
    let stop = CancellationToken::new();
    let work = start_workloads(&stores, &processes, &jobs_url, &args, &stop).await?;

    // The faults: by default one kill per 20 s, and every process killed.
    let kills = args.kills.unwrap_or_else(|| {
        usize::try_from(args.duration.as_secs() / 20)
            .unwrap_or(0)
            .max(processes.len())
    });
    let schedule = faults::schedule(
        args.seed,
        args.duration,
        kills,
        processes.len(),
        proxies.len(),
    );
    let fault_phase = Instant::now();
    let done = match faults::run(&mut processes, &proxies, &schedule).await {
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
    let outcome = check(
        &args,
        stores,
        &mut processes,
        work,
        &jobs_url,
        done,
        started,
    )
    .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = logs_dir.keep();
            return Err(e.context(format!("checking the run; logs in {}", logs.display())));
        }
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

/// The checks, against the ledgers.
async fn check(
    args: &Args,
    stores: Stores,
    processes: &mut [Process],
    work: Workloads,
    jobs_url: &str,
    done: faults::Done,
    started: Instant,
) -> anyhow::Result<report::Outcome> {
    let counted = work.counting.await??;
    let streamed = work.streaming.await??;
    let backfilled = work.backfilling.await??;
    let migrated = work.migrating.await??;
    let extracted_writes = work.extracting.await??;
    let verified = work.verifying.await??;
    let (cut, client) = work.cutting.await??;
    let (lost_counts, doubled_counts) =
        counters::check(processes[3].url(), &stores.stats.1, &counted).await?;
    let cut = cutover::check(&client, &stores.run, cut, &stores.stats_v2.1, &counted).await?;
    let published = published::check(
        &stores.kafka,
        &stores.stats_topic,
        &format!("{}-check", stores.run),
        &counted.sums,
    )
    .await?;
    let synced = stream::check(processes[1].url(), &work.pipeline, &work.index, &streamed).await?;
    let extracted = extract::check(
        jobs_url.to_owned(),
        &work.extract_job,
        &stores.run,
        stores.s3,
        &extracted_writes,
    )
    .await?;
    let leases = leases::check(jobs_url.to_owned()).await?;
    for p in processes.iter_mut() {
        p.check_alive()?;
    }
    Ok(report::Outcome {
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
        published,
        streamed_writes: streamed.writes,
        synced,
        backfilled,
        migrated,
        extract_writes: extracted_writes.writes,
        extracted,
        verified,
        cut,
        leases,
        elapsed: started.elapsed(),
    })
}

/// The address of an endpoint URL (`http://host:port`, `redis://host:port`).
async fn socket_of(url: &str) -> anyhow::Result<SocketAddr> {
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
