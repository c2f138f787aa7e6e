//! `job-tracker`: a worker's hot path — `ClaimUnit` then `Checkpoint` of the
//! claimed unit — on the embedded store at 2,000 operations per second, and
//! on the local DynamoDB endpoint, next to a no-op RPC (`Health/Check`) on
//! the same server at the same rate as the baseline.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use job_tracker::StoreKind;
use job_tracker::engine::{ClaimRequest, Fence, Tracker};
use job_tracker::kv::{DynamoKv, KvStore, SqliteKv};
use job_tracker::model::Progress;
use tidemark_kit::{CancellationToken, ServerConfig, ServiceHost};
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::framework::{
    Benchmark, Context, Report, Rounds, Row, Side, Target, fmt_num, interleaved,
};
use crate::load::{ClosedLoop, LoadResult, OpenLoop};

/// DESIGN.md §6: ClaimUnit + Checkpoint p99 at 2k rps, embedded store, < 5 ms.
const RATE: f64 = 2_000.0;
const P99_TARGET_US: f64 = 5_000.0;
const ROUNDS: usize = 3;
const WARMUP: Duration = Duration::from_millis(500);
const ROUND: Duration = Duration::from_millis(1_500);
const CONNECTIONS: usize = 16;
/// The DynamoDB stand-in serves a few hundred requests a second in all, so
/// its side runs closed-loop at a concurrency it can take.
const DYNAMO_CONCURRENCY: usize = 4;
const DYNAMO_ROUND: Duration = Duration::from_millis(2_000);
/// Units a StartRun or AddUnits may register (the job-tracker's limit).
const UNITS_PER_CALL: usize = 10_000;
/// #16.5: DynamoDB requests per ClaimUnit + Checkpoint, at most.
const REQUESTS_TARGET: f64 = 3.0;
/// Operations of the pass that counts them, one at a time.
const COUNTED_OPS: u64 = 100;
/// Units of the DynamoDB side: its system rounds take one each per
/// operation (3 × 2.5 s at the stand-in's 30–60 ops/s) plus the counted
/// ones; a claim that finds none fails the bench rather than measuring an
/// empty queue. 300 ran out once the stand-in served 40 ops/s.
const DYNAMO_UNITS: usize = 1000;

/// Counts the DynamoDB requests a client sends (every attempt, retries
/// included), by operation, read from the `X-Amz-Target` header as the
/// request leaves.
#[derive(Debug, Default, Clone)]
struct RequestCounter(Arc<std::sync::Mutex<BTreeMap<String, u64>>>);

impl RequestCounter {
    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().expect("counter lock"))
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = context
            .request()
            .headers()
            .get("x-amz-target")
            .and_then(|t| t.rsplit('.').next())
            .unwrap_or("unknown")
            .to_owned();
        *self
            .0
            .lock()
            .expect("counter lock")
            .entry(operation)
            .or_default() += 1;
        Ok(())
    }
}

pub struct JobTrackerClaims;

struct Deployment {
    jobs: Vec<JobTrackerServiceClient<Channel>>,
    health: Vec<HealthClient<Channel>>,
    /// The store the service writes, for the engine called directly.
    store: Arc<dyn KvStore>,
    run_id: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A memory-backed file system (Linux's tmpfs), for the control that runs
/// the embedded store without a disk under it.
const MEMORY_DIR: &str = "/dev/shm";

/// Serves a job-tracker on `store` with one run of `units` units; an
/// embedded store keeps its file in a new directory under `base` (the
/// system's temporary directory when `None`).
async fn serve(
    store: StoreKind,
    units: usize,
    counter: Option<RequestCounter>,
    base: Option<&Path>,
) -> anyhow::Result<(Deployment, Duration)> {
    let dir = match base {
        Some(base) => tempfile::tempdir_in(base)?,
        None => tempfile::tempdir()?,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = job_tracker::Config {
        server: ServerConfig {
            listen: addr,
            concurrency_limit: 4096,
            ..ServerConfig::default()
        },
        data_dir: dir.path().to_owned(),
        // What the service reads by itself, not per operation, as seldom
        // as allowed, so it does not land in the window where requests are
        // counted: the scheduler's look at due jobs (no job here has a
        // schedule), the gauges' recount of the active run's units (about
        // 5 Queries every 15 s by default) and the health check's
        // DescribeTable (every 5 s). What remains is subtracted as
        // measured in an idle window.
        scheduler_tick_ms: 60_000,
        gauge_refresh_ms: 3_600_000,
        store_probe_ms: 3_600_000,
        ..job_tracker::Config::default()
    };
    let store: Arc<dyn KvStore> = match store {
        StoreKind::Embedded => Arc::new(SqliteKv::open(dir.path())?),
        StoreKind::Dynamodb => {
            // The local endpoint with the local set-up's test credentials.
            let (mut client, _) = tidemark_connectors::testing::dynamodb_clients().await;
            if let Some(counter) = counter {
                client = aws_sdk_dynamodb::Client::from_conf(
                    client.config().to_builder().interceptor(counter).build(),
                );
            }
            let kv = DynamoKv::new(
                client,
                &tidemark_connectors::testing::unique_name("bench-jobs"),
            );
            kv.ensure_table().await?;
            Arc::new(kv)
        }
    };
    let stop = CancellationToken::new();
    let mut host = ServiceHost::new(config.server.clone(), stop.clone());
    job_tracker::register_with_store(&config, store.clone(), &mut host);
    let server = tokio::spawn(host.serve(listener));
    let mut jobs = Vec::new();
    let mut health = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_lazy();
        jobs.push(JobTrackerServiceClient::new(channel.clone()));
        health.push(HealthClient::new(channel));
    }
    let mut client = jobs[0].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .is_err()
    {
        anyhow::ensure!(
            !server.is_finished(),
            "the job-tracker stopped: {:?}",
            server.await
        );
        anyhow::ensure!(Instant::now() < deadline, "the job-tracker did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .create_job(pb::CreateJobRequest {
            job: Some(pb::Job {
                name: "bench".into(),
                kind: pb::JobKind::BackfillAttribute as i32,
                ..Default::default()
            }),
        })
        .await
        .context("create the job")?;
    let specs: Vec<pb::UnitSpec> = (0..units)
        .map(|i| pb::UnitSpec {
            unit_key: format!("segment-{i:06}"),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    // At most UNITS_PER_CALL a call: the first with the run, the rest added.
    let mut chunks = specs.chunks(UNITS_PER_CALL);
    let started = Instant::now();
    let run = client
        .start_run(pb::StartRunRequest {
            job_name: "bench".into(),
            units: chunks.next().unwrap_or_default().to_vec(),
            ..Default::default()
        })
        .await
        .context("start the run")?
        .into_inner()
        .run
        .context("no run")?;
    for chunk in chunks {
        client
            .add_units(pb::AddUnitsRequest {
                run_id: run.run_id.clone(),
                units: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .context("add units")?;
    }
    Ok((
        Deployment {
            jobs,
            health,
            store,
            run_id: run.run_id,
            stop,
            _dir: dir,
        },
        started.elapsed(),
    ))
}

/// One worker step: claim the next unit, store a checkpoint for it.
async fn claim_and_checkpoint(
    mut client: JobTrackerServiceClient<Channel>,
    run_id: String,
    i: u64,
) -> Result<(), tonic::Status> {
    let unit = client
        .claim_unit(pb::ClaimUnitRequest {
            worker_id: "bench".into(),
            run_id: run_id.clone(),
            lease_duration: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .unit
        .ok_or_else(|| {
            tonic::Status::resource_exhausted("the run ran out of units; register more")
        })?;
    client
        .checkpoint(pb::CheckpointRequest {
            run_id,
            unit_key: unit.unit_key,
            fencing_token: unit.lease.map_or(0, |l| l.fencing_token),
            checkpoint: format!("{{\"LastEvaluatedKey\":{{\"id\":{{\"S\":\"item-{i:012}\"}}}}}}")
                .into_bytes(),
            items_processed: i64::try_from(i).unwrap_or(0),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// [`claim_and_checkpoint`] on the engine itself: the same store and the
/// same work, without gRPC and its client.
async fn claim_and_checkpoint_direct(
    tracker: &Tracker,
    run_id: String,
    i: u64,
) -> Result<(), String> {
    let claimed = tracker
        .claim_unit(&ClaimRequest {
            worker_id: "bench".into(),
            kinds: vec![],
            job_name: String::new(),
            run_id: run_id.clone(),
            unit_key: String::new(),
            lease: Duration::from_secs(600),
            wait: Duration::ZERO,
        })
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the run ran out of units; register more")?;
    let fence = Fence {
        run_id,
        unit_key: claimed.unit.unit_key,
        fencing_token: claimed.unit.fencing_token,
    };
    tracker
        .checkpoint(
            &fence,
            format!("{{\"LastEvaluatedKey\":{{\"id\":{{\"S\":\"item-{i:012}\"}}}}}}").into_bytes(),
            Progress {
                items_processed: i64::try_from(i).unwrap_or(0),
                ..Progress::default()
            },
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The target's rounds (ClaimUnit + Checkpoint at [`RATE`] through gRPC)
/// on a store whose file is on the disk (system side) and on one whose file
/// is on tmpfs (baseline side), interleaved; `None` without [`MEMORY_DIR`].
async fn disk_against_memory(ctx: &Context, round: Duration) -> anyhow::Result<Option<Rounds>> {
    if !Path::new(MEMORY_DIR).is_dir() {
        return Ok(None);
    }
    let units = units_needed(RATE, round);
    let (disk, _) = serve(StoreKind::Embedded, units, None, None).await?;
    let (memory, _) = serve(
        StoreKind::Embedded,
        units,
        None,
        Some(Path::new(MEMORY_DIR)),
    )
    .await?;
    let open = OpenLoop {
        rate: RATE,
        warmup: ctx.time(WARMUP),
        duration: round,
        max_in_flight: 512,
    };
    let mut rounds = Rounds::default();
    for side in interleaved(ROUNDS) {
        let target = if side == Side::System { &disk } else { &memory };
        let result = measure(target, Side::System, Load::Open(open)).await?;
        anyhow::ensure!(
            result.errors == 0,
            "claims failed: {:?}",
            result.first_error
        );
        rounds.push(side, result);
    }
    disk.stop.cancel();
    memory.stop.cancel();
    Ok(Some(rounds))
}

/// Rounds of the engine called directly at `open`'s rate: its p50 and p99
/// (µs, medians of the rounds) and the cores the process kept busy.
async fn measure_direct(target: &Deployment, open: OpenLoop) -> anyhow::Result<(f64, f64, f64)> {
    let tracker = Arc::new(Tracker::new(target.store.clone(), CancellationToken::new()));
    // One side only: the engine's rounds, for their medians.
    let mut rounds = Rounds::default();
    for _ in 0..ROUNDS {
        let (tracker, run_id) = (tracker.clone(), target.run_id.clone());
        let result = open
            .run(move |i| {
                let (tracker, run_id) = (tracker.clone(), run_id.clone());
                async move { claim_and_checkpoint_direct(&tracker, run_id, i).await }
            })
            .await?;
        anyhow::ensure!(
            result.errors == 0,
            "direct claims failed: {:?}",
            result.first_error
        );
        rounds.push(Side::System, result);
    }
    let median = |f: fn(&LoadResult) -> f64| rounds.median(Side::System, f);
    Ok((
        median(|r| r.latency_us(0.50)),
        median(|r| r.latency_us(0.99)),
        median(LoadResult::cores_busy),
    ))
}

async fn noop(mut client: HealthClient<Channel>) -> Result<(), tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
}

fn pick<T: Clone>(pool: &[T], i: u64) -> T {
    pool[usize::try_from(i).unwrap_or(0) % pool.len()].clone()
}

async fn measure(target: &Deployment, side: Side, load: Load) -> anyhow::Result<LoadResult> {
    let jobs = Arc::new(target.jobs.clone());
    let health = Arc::new(target.health.clone());
    let run_id = target.run_id.clone();
    let op = move |i: u64| {
        let (jobs, health, run_id) = (jobs.clone(), health.clone(), run_id.clone());
        async move {
            match side {
                Side::System => claim_and_checkpoint(pick(&jobs, i), run_id, i).await,
                Side::Baseline => noop(pick(&health, i)).await,
            }
        }
    };
    match load {
        Load::Open(open) => open.run(op).await,
        Load::Closed(closed) => closed.run(op).await,
    }
}

#[derive(Clone, Copy)]
enum Load {
    Open(OpenLoop),
    Closed(ClosedLoop),
}

fn units_needed(rate: f64, per_round: Duration) -> usize {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (rate * (WARMUP + per_round).as_secs_f64() * ROUNDS as f64 * 1.3) as usize;
    n + 500
}

#[async_trait::async_trait]
impl Benchmark for JobTrackerClaims {
    fn name(&self) -> &'static str {
        "job-tracker"
    }

    fn description(&self) -> &'static str {
        "ClaimUnit + Checkpoint round trips on the embedded store at 2k rps and on the local DynamoDB endpoint, ÷ a no-op RPC on the same server"
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let round = ctx.time(ROUND);
        let rates = [RATE / 2.0, RATE];
        // Each rate's rounds through gRPC, then as many on the engine directly.
        let units: usize = 2 * rates.iter().map(|r| units_needed(*r, round)).sum::<usize>();
        let (target, registration) = serve(StoreKind::Embedded, units, None, None).await?;
        for rate in rates {
            let open = OpenLoop {
                rate,
                warmup: ctx.time(WARMUP),
                duration: round,
                max_in_flight: 512,
            };
            let mut rounds = Rounds::default();
            for side in interleaved(ROUNDS) {
                rounds.push(side, measure(&target, side, Load::Open(open)).await?);
            }
            let sys = rounds.pooled(Side::System);
            anyhow::ensure!(sys.errors == 0, "claims failed: {:?}", sys.first_error);
            let at = format!("embedded, {} ops/s", fmt_num(rate));
            report
                .rows
                .push(rounds.row(format!("{at}: p50 latency"), "µs", |r| r.latency_us(0.50)));
            let p99 = rounds.row(format!("{at}: p99 latency"), "µs", |r| r.latency_us(0.99));
            #[allow(clippy::float_cmp)]
            report.rows.push(if rate == RATE {
                p99.with_target(Target::SystemBelow(P99_TARGET_US))
            } else {
                p99
            });
            report.rows.push(rounds.row(
                format!("{at}: throughput"),
                "ops/s",
                LoadResult::throughput,
            ));
            report.rows.push(rounds.row(
                format!("{at}: CPU per operation"),
                "µs",
                LoadResult::cpu_per_request_us,
            ));
            report.notes.push(format!(
                "Spread of the p99 rounds at {} ops/s: {}; cores busy (this process: client and server): system {:.2}, baseline {:.2} of {}",
                fmt_num(rate),
                rounds.spread("µs", |r| r.latency_us(0.99)),
                rounds.median(Side::System, LoadResult::cores_busy),
                rounds.median(Side::Baseline, LoadResult::cores_busy),
                std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
            ));
            let (p50, p99, cores) = measure_direct(&target, open).await?;
            report.notes.push(format!(
                "The engine called directly at {} ops/s (the same store and work, no gRPC, no client): p50 {} µs, p99 {} µs, {cores:.2} cores busy (medians of {ROUNDS} rounds). What the service adds to this is the two RPCs' stack, client and server, on the same two cores.",
                fmt_num(rate),
                fmt_num(p50),
                fmt_num(p99),
            ));
        }
        target.stop.cancel();
        report.notes.push(format!(
            "An operation is two RPCs on one connection: ClaimUnit (lease 600 s) then Checkpoint of the claimed unit (a ~50-byte LastEvaluatedKey and progress); the baseline is one Health/Check through the same server and stack at the same rate. Open loop from the scheduled send time, {} connections, {} rounds per side of {} s in ABBA order after {} s warm-up; medians. Client and server share this process and its two cores, so the client's CPU counts too.",
            CONNECTIONS,
            ROUNDS,
            round.as_secs_f64(),
            ctx.time(WARMUP).as_secs_f64()
        ));
        report.notes.push(format!(
            "Embedded store: one SQLite file (WAL, synchronous=NORMAL); each claim is one read of the run's queue (headed by copies of the run and of its job; its entries carry their units) and one transaction of single-statement writes, each checkpoint by the replica that granted the lease one write. The run held {units} units, registered in {:.1} s.",
            registration.as_secs_f64()
        ));

        if let Some(rounds) = disk_against_memory(ctx, round).await? {
            let at = format!(
                "embedded, {} ops/s, store on disk (vs on tmpfs)",
                fmt_num(RATE)
            );
            report
                .rows
                .push(rounds.row(format!("{at}: p50 latency"), "µs", |r| r.latency_us(0.50)));
            report
                .rows
                .push(rounds.row(format!("{at}: p99 latency"), "µs", |r| r.latency_us(0.99)));
            report.notes.push(format!(
                "Where the p99 goes: the same ClaimUnit + Checkpoint rounds at {} ops/s on two fresh deployments, interleaved, one with the store's file on this machine's disk (system), one on tmpfs ({MEMORY_DIR}, baseline): same code and work, no disk under the second. Spread of the p99 rounds: {}. Their difference is what the disk adds: the fsyncs (the background checkpoint's of the WAL, four times a second, and the WAL restart's of the database file) and the writeback behind them.",
                fmt_num(RATE),
                rounds.spread("µs", |r| r.latency_us(0.99)),
            ));
        } else {
            report.notes.push(format!(
                "No tmpfs at {MEMORY_DIR} on this machine: the control with the store's file in memory did not run."
            ));
        }

        let dynamo_round = ctx.time(DYNAMO_ROUND);
        let counter = RequestCounter::default();
        let (target, registration) = serve(
            StoreKind::Dynamodb,
            DYNAMO_UNITS,
            Some(counter.clone()),
            None,
        )
        .await?;
        let closed = ClosedLoop {
            concurrency: DYNAMO_CONCURRENCY,
            warmup: ctx.time(WARMUP),
            duration: dynamo_round,
        };
        let mut rounds = Rounds::default();
        for side in interleaved(ROUNDS) {
            rounds.push(side, measure(&target, side, Load::Closed(closed)).await?);
        }
        // Then one operation at a time, every request counted; then as long
        // idle, counting what the service sends by itself (the scheduler's
        // look at due jobs, once a second), which is not the operations'.
        counter.take();
        let started = Instant::now();
        for i in 0..COUNTED_OPS {
            claim_and_checkpoint(target.jobs[0].clone(), target.run_id.clone(), i).await?;
        }
        let busy = started.elapsed();
        let mut counted = counter.take();
        tokio::time::sleep(busy).await;
        let idle = counter.take();
        target.stop.cancel();
        for (op, n) in &idle {
            if let Some(c) = counted.get_mut(op) {
                *c = c.saturating_sub(*n);
            }
        }
        let total: u64 = counted.values().sum();
        #[allow(clippy::cast_precision_loss)]
        let per_op = total as f64 / COUNTED_OPS as f64;
        report.rows.push(
            Row::new(
                "DynamoDB store: requests per ClaimUnit + Checkpoint (vs its 2 RPCs)",
                "req",
                per_op,
                2.0,
            )
            .with_target(Target::SystemAtMost(REQUESTS_TARGET)),
        );
        report.notes.push(format!(
            "DynamoDB requests counted as they leave the job-tracker's client (every attempt), over {COUNTED_OPS} claims + checkpoints one at a time ({:.1} s), less those it sent by itself in as long idle right after ({}): {}",
            busy.as_secs_f64(),
            if idle.is_empty() {
                "none".to_owned()
            } else {
                idle.iter()
                    .map(|(op, n)| format!("{op} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            counted
                .iter()
                .map(|(op, n)| {
                    #[allow(clippy::cast_precision_loss)]
                    let each = *n as f64 / COUNTED_OPS as f64;
                    format!("{op} {}", fmt_num(each))
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let sys = rounds.pooled(Side::System);
        anyhow::ensure!(
            sys.errors == 0,
            "claims on DynamoDB failed: {:?}",
            sys.first_error
        );
        report.rows.push(rounds.row(
            "DynamoDB endpoint, closed loop of 4: throughput",
            "ops/s",
            LoadResult::throughput,
        ));
        report.rows.push(rounds.row(
            "DynamoDB endpoint, closed loop of 4: p50 latency",
            "µs",
            |r| r.latency_us(0.50),
        ));
        report.rows.push(rounds.row(
            "DynamoDB endpoint, closed loop of 4: p99 latency",
            "µs",
            |r| r.latency_us(0.99),
        ));
        report.notes.push(format!(
            "DynamoDB side: the local stand-in (about 240 sequential writes/s on this machine) is the bottleneck, not the job-tracker (each operation's requests are counted below). It therefore runs closed-loop with {DYNAMO_CONCURRENCY} workers rather than at 2,000/s; against AWS DynamoDB each request is a few milliseconds and the rate scales with workers. {DYNAMO_UNITS} units registered in {:.1} s.",
            registration.as_secs_f64()
        ));
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enough_units_for_every_round() {
        // Every operation claims a fresh unit: the run must outlast the schedule.
        let needed = units_needed(RATE, ROUND);
        #[allow(clippy::cast_precision_loss)]
        let sends = RATE * (WARMUP + ROUND).as_secs_f64() * ROUNDS as f64;
        assert!(needed as f64 > sends);
    }
}
