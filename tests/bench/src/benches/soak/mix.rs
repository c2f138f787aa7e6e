//! The soak's mix of RPCs: each kind an open loop of its own at its share
//! of the rate, so each has its own latency histogram and error count.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::try_join_all;
use prost_types::Duration as PbDuration;
use tidemark_chaos::plane::Process;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::{KeySchema, Sink as _, SourceTable as _};
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tidemark_proto::stats_aggregator::v1 as st;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tidemark_proto::verifier::v1 as vf;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::benches::verifier::{digest_spec, item, record, sqlite};
use crate::load::{LoadResult, OpenLoop};

/// Entities the counters are spread over.
const ENTITIES: u64 = 1_000;
/// Events per IngestBatch.
const EVENTS: u64 = 10;
/// Items of each side of the verified tables.
const ITEMS: usize = 1_000;
/// Units of each run of the unit cycle: a run the size of a per-tenant
/// migration, then the next run (of the next job) takes the cycles.
pub const RUN_UNITS: u64 = 1_000;

/// One kind of request of the mix and what it measured.
pub struct Outcome {
    pub name: &'static str,
    pub process: &'static str,
    /// A gRPC health check: the baseline of its process.
    pub health: bool,
    /// RPCs per request (the unit cycle sends four).
    pub rpcs: u64,
    pub result: LoadResult,
}

type Call = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type Op = Box<dyn Fn(u64) -> Call + Send + Sync>;

/// One kind of request: its share of the rate (in requests, not RPCs).
struct Kind {
    name: &'static str,
    process: &'static str,
    share: f64,
    rpcs: u64,
    health: bool,
}

/// The mix: each kind's share of the rate, in requests; with the unit
/// cycle's four RPCs a rate of 2,000 schedules about 2,050 RPCs/s
/// ([`scheduled`]).
const MIX: [Kind; 14] = [
    kind("IngestBatch (10 events)", "stats-aggregator", 0.30, 1),
    kind("GetStats", "stats-aggregator", 0.15, 1),
    kind("GetBufferState", "stats-aggregator", 0.05, 1),
    kind(
        "unit cycle: AddUnits, ClaimUnit, Checkpoint, CompleteUnit",
        "job-tracker-units",
        0.075,
        4,
    ),
    kind("GetJob", "job-tracker", 0.05, 1),
    kind("ListJobs (10)", "job-tracker", 0.025, 1),
    kind("ListPipelines", "replicator", 0.05, 1),
    kind("GetReport", "verifier", 0.05, 1),
    kind(
        "StartVerification (1,000 items a side)",
        "verifier",
        0.001,
        1,
    ),
    health("job-tracker"),
    health("job-tracker-units"),
    health("replicator"),
    health("stats-aggregator"),
    health("verifier"),
];

const fn kind(name: &'static str, process: &'static str, share: f64, rpcs: u64) -> Kind {
    Kind {
        name,
        process,
        share,
        rpcs,
        health: false,
    }
}

const fn health(process: &'static str) -> Kind {
    Kind {
        name: "health Check",
        process,
        share: 0.01,
        rpcs: 1,
        health: true,
    }
}

/// RPCs per second the mix schedules at `rate` requests per second.
pub fn scheduled(rate: f64) -> f64 {
    MIX.iter().map(|k| rate * k.share * k.rpcs as f64).sum()
}

/// The mix in one line.
pub fn describe(rate: f64) -> String {
    let parts: Vec<String> = MIX
        .iter()
        .filter(|k| !k.health)
        .map(|k| format!("{} {}/s", k.name, fmt_rate(rate * k.share)))
        .collect();
    format!(
        "{} RPCs/s scheduled: {}, and a health check on each process at {}/s",
        fmt_rate(scheduled(rate)),
        parts.join(", "),
        fmt_rate(rate * 0.01)
    )
}

fn fmt_rate(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// Clients of every process and what the reads read.
pub struct Fixture {
    jobs: JobTrackerServiceClient<Channel>,
    units: JobTrackerServiceClient<Channel>,
    replicator: ReplicatorServiceClient<Channel>,
    stats: StatsAggregatorServiceClient<Channel>,
    verifier: VerifierServiceClient<Channel>,
    health: Vec<(String, HealthClient<Channel>)>,
    /// Runs of `job-tracker-units` that only the soak claims from, by
    /// block of [`RUN_UNITS`] cycles, started as the cycles reach them.
    cycle_runs: tokio::sync::Mutex<std::collections::BTreeMap<u64, String>>,
    /// A finished verification and its job.
    report_id: String,
    job_name: String,
    spec: vf::VerificationSpec,
}

impl Fixture {
    /// Counters for every entity, a run for the unit cycle, two verified
    /// tables and one finished verification of them.
    pub async fn set_up(plane: &[Process], dir: &Path) -> anyhow::Result<Self> {
        let channel = |name: &str| -> anyhow::Result<Channel> {
            let p = plane
                .iter()
                .find(|p| p.name == name)
                .with_context(|| format!("no process {name}"))?;
            Ok(Channel::from_shared(p.url())?.connect_lazy())
        };
        let mut stats = StatsAggregatorServiceClient::new(channel("stats-aggregator")?);
        stats
            .ingest_batch(st::IngestBatchRequest {
                events: (0..ENTITIES)
                    .map(|i| event(&format!("seed-{i}"), i))
                    .collect(),
            })
            .await?;
        let mut units = JobTrackerServiceClient::new(channel("job-tracker-units")?);
        let cycle_runs = tokio::sync::Mutex::new([(0, unit_run(&mut units, 0).await?)].into());
        let spec = tables(dir).await?;
        let mut verifier = VerifierServiceClient::new(channel("verifier")?);
        let (report_id, job_name) = verified(&mut verifier, &spec).await?;
        let health = plane
            .iter()
            .map(|p| Ok((p.name.clone(), HealthClient::new(channel(&p.name)?))))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            jobs: JobTrackerServiceClient::new(channel("job-tracker")?),
            units,
            replicator: ReplicatorServiceClient::new(channel("replicator")?),
            stats,
            verifier,
            health,
            cycle_runs,
            report_id,
            job_name,
            spec,
        })
    }

    /// The request of `kind` numbered `i`.
    fn op(self: &Arc<Self>, kind: &Kind) -> anyhow::Result<Op> {
        let f = Arc::clone(self);
        if kind.health {
            let client = self
                .health
                .iter()
                .find(|(n, _)| n == kind.process)
                .map(|(_, c)| c.clone())
                .context("no health client")?;
            return Ok(Box::new(move |_| {
                let mut c = client.clone();
                Box::pin(async move {
                    c.check(HealthCheckRequest::default()).await?;
                    Ok(())
                })
            }));
        }
        Ok(match kind.name {
            "IngestBatch (10 events)" => Box::new(move |i| {
                let mut c = f.stats.clone();
                let events = (0..EVENTS)
                    .map(|k| event(&format!("e-{i}-{k}"), i * EVENTS + k))
                    .collect();
                Box::pin(async move {
                    c.ingest_batch(st::IngestBatchRequest { events }).await?;
                    Ok(())
                })
            }),
            "GetStats" => Box::new(move |i| {
                let mut c = f.stats.clone();
                Box::pin(async move {
                    c.get_stats(st::GetStatsRequest {
                        entity_key: entity(i),
                        metrics: vec!["views".to_owned()],
                    })
                    .await?;
                    Ok(())
                })
            }),
            "GetBufferState" => Box::new(move |_| {
                let mut c = f.stats.clone();
                Box::pin(async move {
                    c.get_buffer_state(st::GetBufferStateRequest {}).await?;
                    Ok(())
                })
            }),
            "GetJob" => Box::new(move |_| {
                let (mut c, name) = (f.jobs.clone(), f.job_name.clone());
                Box::pin(async move {
                    c.get_job(jt::GetJobRequest { name }).await?;
                    Ok(())
                })
            }),
            "ListJobs (10)" => Box::new(move |_| {
                let mut c = f.jobs.clone();
                Box::pin(async move {
                    c.list_jobs(jt::ListJobsRequest {
                        page_size: 10,
                        ..Default::default()
                    })
                    .await?;
                    Ok(())
                })
            }),
            "ListPipelines" => Box::new(move |_| {
                let mut c = f.replicator.clone();
                Box::pin(async move {
                    c.list_pipelines(rp::ListPipelinesRequest {
                        page_size: 10,
                        ..Default::default()
                    })
                    .await?;
                    Ok(())
                })
            }),
            "GetReport" => Box::new(move |_| {
                let (mut c, verification_id) = (f.verifier.clone(), f.report_id.clone());
                Box::pin(async move {
                    c.get_report(vf::GetReportRequest { verification_id })
                        .await?;
                    Ok(())
                })
            }),
            "StartVerification (1,000 items a side)" => Box::new(move |i| {
                let (mut c, spec) = (f.verifier.clone(), f.spec.clone());
                Box::pin(async move {
                    c.start_verification(vf::StartVerificationRequest {
                        job_name: format!("soak-verify-{i}"),
                        spec: Some(spec),
                        actor: "soak".to_owned(),
                        ..Default::default()
                    })
                    .await?;
                    Ok(())
                })
            }),
            "unit cycle: AddUnits, ClaimUnit, Checkpoint, CompleteUnit" => Box::new(move |i| {
                let f = Arc::clone(&f);
                Box::pin(async move { f.unit_cycle(i).await })
            }),
            other => anyhow::bail!("no request for {other:?}"),
        })
    }

    /// The run of cycle `i`'s block, started by the block's first cycle to
    /// ask.
    async fn cycle_run(&self, i: u64) -> anyhow::Result<String> {
        let block = i / RUN_UNITS;
        let mut runs = self.cycle_runs.lock().await;
        if let Some(run) = runs.get(&block) {
            return Ok(run.clone());
        }
        let run = unit_run(&mut self.units.clone(), block).await?;
        runs.insert(block, run.clone());
        Ok(run)
    }

    /// A unit added to the soak's run, claimed, checkpointed and completed.
    async fn unit_cycle(&self, i: u64) -> anyhow::Result<()> {
        let mut c = self.units.clone();
        let run_id = self.cycle_run(i).await?;
        let unit_key = format!("u-{i}");
        c.add_units(jt::AddUnitsRequest {
            run_id: run_id.clone(),
            units: vec![jt::UnitSpec {
                unit_key: unit_key.clone(),
                ..Default::default()
            }],
            actor: "soak".to_owned(),
        })
        .await?;
        let claimed = c
            .claim_unit(jt::ClaimUnitRequest {
                worker_id: "soak".to_owned(),
                run_id: run_id.clone(),
                unit_key: unit_key.clone(),
                lease_duration: Some(PbDuration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .unit
            .context("the added unit was not claimed")?;
        let token = claimed
            .lease
            .context("a claimed unit without a lease")?
            .fencing_token;
        c.checkpoint(jt::CheckpointRequest {
            run_id: run_id.clone(),
            unit_key: unit_key.clone(),
            fencing_token: token,
            checkpoint: b"half-way".to_vec(),
            items_processed: 5,
            ..Default::default()
        })
        .await?;
        c.complete_unit(jt::CompleteUnitRequest {
            run_id,
            unit_key,
            fencing_token: token,
            items_processed: 10,
            ..Default::default()
        })
        .await?;
        Ok(())
    }
}

/// Runs every kind of the mix at its share of `rate` for `duration`.
pub async fn run(fixture: Fixture, rate: f64, duration: Duration) -> anyhow::Result<Vec<Outcome>> {
    let fixture = Arc::new(fixture);
    let warmup = (duration / 10).min(Duration::from_secs(10));
    let loops = MIX.iter().map(|kind| {
        let fixture = Arc::clone(&fixture);
        async move {
            let op = fixture.op(kind)?;
            let result = OpenLoop {
                rate: rate * kind.share,
                warmup,
                duration: duration.saturating_sub(warmup),
                max_in_flight: 512,
            }
            .run(op)
            .await?;
            anyhow::Ok(Outcome {
                name: kind.name,
                process: kind.process,
                health: kind.health,
                rpcs: kind.rpcs,
                result,
            })
        }
    });
    try_join_all(loops).await
}

fn entity(i: u64) -> String {
    format!("entity-{}", i % ENTITIES)
}

fn event(id: &str, i: u64) -> st::Event {
    st::Event {
        event_id: id.to_owned(),
        entity_key: entity(i),
        metric: "views".to_owned(),
        op: Some(st::event::Op::Increment(st::Increment { delta: 1 })),
        ..Default::default()
    }
}

/// An explicit-completion run of a job no worker claims from (it lives on
/// the soak's own job-tracker): it stays open while units are added.
async fn unit_run(c: &mut JobTrackerServiceClient<Channel>, block: u64) -> anyhow::Result<String> {
    let name = format!("soak-units-{block}");
    c.create_job(jt::CreateJobRequest {
        job: Some(jt::Job {
            name: name.clone(),
            kind: jt::JobKind::BackfillAttribute as i32,
            explicit_completion: true,
            max_attempts: 3,
            ..Default::default()
        }),
    })
    .await?;
    let run = c
        .start_run(jt::StartRunRequest {
            job_name: name,
            units: vec![jt::UnitSpec {
                unit_key: "first".to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?
        .into_inner()
        .run
        .context("StartRun without a run")?;
    Ok(run.run_id)
}

/// Two identical tables in the verifier's embedded database, and the spec
/// that verifies one against the other.
async fn tables(dir: &Path) -> anyhow::Result<vf::VerificationSpec> {
    let store = EmbeddedStore::open(&verifier::side::sqlite_path(&dir.join("verifier"), None))?;
    let (src, dst) = ("soak_src", "soak_dst");
    let table = store.table(src, KeySchema::new("id", None));
    let sink = store.sink(dst);
    let items: Vec<_> = (0..ITEMS).map(item).collect();
    for it in &items {
        table.put(it, None).await?;
    }
    let records: Vec<_> = items.iter().map(record).collect();
    sink.apply(&records).await?;
    Ok(digest_spec(sqlite(src, &["id"]), sqlite(dst, &[]), 1))
}

/// One verification of the tables, waited for: its id and its job.
async fn verified(
    c: &mut VerifierServiceClient<Channel>,
    spec: &vf::VerificationSpec,
) -> anyhow::Result<(String, String)> {
    let started = c
        .start_verification(vf::StartVerificationRequest {
            job_name: "soak-verify".to_owned(),
            spec: Some(spec.clone()),
            actor: "soak".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let report = c
            .get_report(vf::GetReportRequest {
                verification_id: started.verification_id.clone(),
            })
            .await?
            .into_inner()
            .report
            .context("GetReport without a report")?;
        if report.status == vf::VerificationStatus::Completed as i32 {
            anyhow::ensure!(
                report.verdict == vf::Verdict::Pass as i32,
                "identical tables did not verify: {report:?}"
            );
            return Ok((started.verification_id, started.job_name));
        }
        anyhow::ensure!(
            report.status != vf::VerificationStatus::Failed as i32,
            "the soak's first verification failed: {}",
            report.error
        );
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the soak's first verification did not finish in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
