//! `replicas`: do more replicator replicas add throughput? The attribute
//! backfill of a DynamoDB table and a pipeline's initial backfill into a
//! DynamoDB table, each with 1, 2 and 4 replicator processes (release
//! binaries) sharing one job-tracker, every DynamoDB request through the
//! 50 ms delay proxy so the work is latency-bound as against a remote
//! DynamoDB. Figures: items/s at 2 and 4 replicas ÷ items/s at 1.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tidemark_chaos::plane::{Process, build_services, free_addr};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::unique_name;
use tidemark_connectors::{AttrValue, Item, KeySchema, ScanRequest, SourceTable as _};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::transport::Channel;

use super::backfill::{
    BackfillRequest, RUN_WITHIN, client_at, raw_parallel, run_backfill, seed_table,
};
use super::{DELAY, SEGMENTS, copy_pipeline, table_ref};
use crate::dynalite::Dynalite;
use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};
use crate::proxy::{DelayProxy, Delays};

const REPLICAS: [usize; 3] = [1, 2, 4];
/// Units each replica works on at once, and writes each keeps in flight
/// (the attribute backfill's `writes_in_flight`, the pipeline's DynamoDB
/// sink's): one unit of 4, so that four replicas' demand (4 × 4 writes per
/// 50 ms, about 320 a second) stays well within what the local dynalite
/// serves on this machine (about 550 conditional writes a second) and the
/// work stays latency-bound, as against a remote DynamoDB. With the
/// defaults (4 units of 16) one replica alone asks for more than it can
/// answer; with 1 unit of 16 a raw client's throughput at four replicas'
/// demand was 2.65× its throughput at one's (measured), the stand-in's
/// ceiling, not a replica's.
const UNITS_PER_REPLICA: usize = 1;
const WRITES_IN_FLIGHT: u32 = 4;
/// #16.2: throughput over one replica, at least.
const AT_TWO: f64 = 1.8;
const AT_FOUR: f64 = 3.2;
const SOURCE: &str = "replicas_src";

pub struct Replicas;

#[async_trait::async_trait]
impl Benchmark for Replicas {
    fn name(&self) -> &'static str {
        "replicas"
    }

    fn description(&self) -> &'static str {
        "Replicas add throughput: an attribute backfill of a DynamoDB table and a \
         pipeline's initial backfill into a DynamoDB table with 1, 2 and 4 replicator \
         processes sharing one job-tracker, every DynamoDB request through a proxy adding \
         50 ms (a remote DynamoDB); items/s at 2 and 4 replicas ÷ items/s at 1."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let items = if ctx.quick { 400 } else { 6_000 };
        let bins = tempfile::tempdir()?;
        let into = bins.path().to_owned();
        tokio::task::spawn_blocking(move || build_services(&into)).await??;
        let dynalite = Dynalite::start().await?;
        let proxy = DelayProxy::start(dynalite.addr(), Delays::per_request(DELAY)).await?;
        let proxied = format!("http://{}", proxy.addr());
        let table = seed_table(&dynalite.endpoint(), items).await?;
        // The pipeline's source: an embedded table every replica opens in
        // the one data directory they share (its change log is the feed).
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        {
            let store = EmbeddedStore::open(&data.join("default.db"))?;
            let source = store.table(SOURCE, KeySchema::new("id", None));
            source.put_all((0..items).map(document).collect()).await?;
        }
        let mut backfill = Vec::new();
        let mut pipeline = Vec::new();
        let mut phases = Vec::new();
        for n in REPLICAS {
            let (b, p, phase) = match round(
                bins.path(),
                dir.path(),
                &data,
                n,
                &dynalite,
                &proxied,
                &table,
                items,
            )
            .await
            {
                Ok(rates) => rates,
                Err(e) => {
                    let logs = dir.keep();
                    return Err(e.context(format!(
                        "the processes' logs are kept in {}",
                        logs.display()
                    )));
                }
            };
            backfill.push(b);
            pipeline.push(p);
            phases.push(format!("{n}: {phase}"));
        }
        // What the stand-in itself serves at those demands: a raw client
        // sending the backfill's requests through the same proxy with one
        // replica's and four replicas' units in flight.
        let mut raw = Vec::new();
        for units in [1, 4] {
            raw.push(
                raw_parallel(
                    &proxied,
                    &table,
                    &format!("raw_{units}"),
                    items,
                    units * UNITS_PER_REPLICA,
                    WRITES_IN_FLIGHT as usize,
                )
                .await?,
            );
        }
        eprintln!(
            "raw client: {} items/s at one replica's concurrency, {} at four's",
            fmt_num(raw[0]),
            fmt_num(raw[1])
        );
        let mut report = Report::default();
        for (name, rates) in [
            ("attribute backfill", &backfill),
            ("pipeline initial backfill", &pipeline),
        ] {
            for (i, target) in [(1, AT_TWO), (2, AT_FOUR)] {
                report.rows.push(
                    Row::new(
                        format!("{name}: {} replicas (vs 1)", REPLICAS[i]),
                        "items/s",
                        rates[i],
                        rates[0],
                    )
                    .with_target(Target::RatioAtLeast(target)),
                );
            }
        }
        report.rows.push(Row::new(
            "attribute backfill: 4 replicas ÷ a raw client at their concurrency",
            "items/s",
            backfill[2],
            raw[1],
        ));
        report.rows.push(Row::new(
            "raw client: 4 replicas' concurrency (vs 1's)",
            "items/s",
            raw[1],
            raw[0],
        ));
        report.notes.push(format!(
            "{items} items (5-attribute items for the pipeline, key-only for the backfill); {SEGMENTS} segments per operation; each replica works on {UNITS_PER_REPLICA} unit at a time with {WRITES_IN_FLIGHT} writes in flight (the backfill's `writes_in_flight`, the DynamoDB sink's; the defaults are 4 units of 16: one replica alone would then ask more of the local dynalite than it serves, and no count of replicas could add anything); every DynamoDB request of the replicas through the proxy adding {} ms; the job-tracker (embedded store) unproxied",
            DELAY.as_millis()
        ));
        report.notes.push(
            "raw client: the backfill's own requests (segmented scans, the same conditional UpdateItems, as many in flight per segment) from the bench process through the same proxy, with as many segments at once as 1 and 4 replicas work on: what the local DynamoDB stand-in serves at those demands, whatever runs the work"
                .to_owned(),
        );
        report.notes.push(format!(
            "where a pipeline's time went, by replica count (from the job-tracker's history of its units): {}. The pipeline's feed starts where the source's change log ended at CreatePipeline, so it does not replay the {items} writes that seeded the source (the segments copy those): what follows the segments is the feed catching up and Drain",
            phases.join("; ")
        ));
        report.notes.push(
            "each replica count on fresh processes: a job-tracker and that many replicator processes, the first of which takes the RPCs; units go to whichever replica claims them. The attribute backfill sets a new attribute on every item of one table per count; the pipeline copies an embedded table (the replicas share its database file) into a new DynamoDB table, from CreatePipeline to STREAMING and drained"
                .to_owned(),
        );
        Ok(report)
    }
}

/// One replica count on fresh processes: the attribute backfill's and the
/// pipeline's items/s, and where the pipeline's time went.
#[allow(clippy::too_many_arguments)]
async fn round(
    bins: &Path,
    dir: &Path,
    data: &Path,
    n: usize,
    dynalite: &Dynalite,
    proxied: &str,
    table: &str,
    items: usize,
) -> anyhow::Result<(f64, f64, Phases)> {
    let mut plane = start(bins, dir, data, n, proxied).await?;
    let channel = |p: &Process| Channel::from_shared(p.url()).map(|c| c.connect_lazy());
    let mut jobs = JobTrackerServiceClient::new(channel(&plane[0])?);
    let mut replicator = ReplicatorServiceClient::new(channel(&plane[1])?);
    let b = attribute_backfill(&mut replicator, &mut jobs, table, n, items).await?;
    let sink = unique_name("bench-replicas-dst");
    DynamoTable::create(
        client_at(&dynalite.endpoint()).await,
        &sink,
        &KeySchema::new("id", None),
        false,
    )
    .await?;
    let created = std::time::SystemTime::now();
    let p = tokio::time::timeout(
        RUN_WITHIN,
        copy(&mut replicator, &format!("replicas-{n}"), &sink, items),
    )
    .await
    .with_context(|| format!("pipeline replicas-{n} not drained after {RUN_WITHIN:?}"))??;
    let phases = Phases::of(&mut jobs, &format!("pipeline/replicas-{n}"), created).await?;
    let copied = count(&dynalite.endpoint(), &sink).await?;
    anyhow::ensure!(
        copied == items,
        "the pipeline copied {copied} of {items} items"
    );
    for process in &mut plane {
        process.check_alive()?;
    }
    eprintln!(
        "replicas {n}: attribute backfill {} items/s, pipeline initial backfill {} items/s ({phases})",
        fmt_num(b),
        fmt_num(p)
    );
    Ok((b, p, phases))
}

/// Where a pipeline's time went, from the job-tracker's record of its
/// backfill segments: CreatePipeline to the first segment claimed, first
/// claim to the last segment done, and from there to STREAMING and drained.
struct Phases {
    before: Duration,
    segments: Duration,
    after: Duration,
}

impl Phases {
    async fn of(
        jobs: &mut JobTrackerServiceClient<Channel>,
        job: &str,
        created: std::time::SystemTime,
    ) -> anyhow::Result<Self> {
        use tidemark_proto::job_tracker::v1 as jt;
        let drained = std::time::SystemTime::now();
        let run_id = jobs
            .get_job(jt::GetJobRequest {
                name: job.to_owned(),
            })
            .await?
            .into_inner()
            .job
            .and_then(|j| j.last_run)
            .context("the pipeline's job has no run")?
            .run_id;
        let mut times = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = jobs
                .list_transitions(jt::ListTransitionsRequest {
                    run_id: run_id.clone(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for t in &page.transitions {
                if t.reason.contains("fail") || t.reason.contains("expired") {
                    eprintln!("  {job} {}: {} ({})", t.unit_key, t.reason, t.actor);
                }
            }
            times.extend(
                page.transitions
                    .iter()
                    .filter(|t| t.unit_key.starts_with("segment"))
                    .filter_map(|t| {
                        let claim = matches!(
                            &t.change,
                            Some(jt::transition::Change::UnitStatus(c))
                                if c.to_status == jt::UnitStatus::InProgress as i32
                        );
                        let time = t
                            .time
                            .and_then(|t| std::time::SystemTime::try_from(t).ok())?;
                        Some((claim, time))
                    }),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let first = times
            .iter()
            .filter(|(claim, _)| *claim)
            .map(|(_, t)| *t)
            .min()
            .context("no segment was claimed")?;
        let last = times.iter().map(|(_, t)| *t).max().context("no segment")?;
        let span = |a: std::time::SystemTime, b: std::time::SystemTime| {
            b.duration_since(a).unwrap_or_default()
        };
        Ok(Self {
            before: span(created, first),
            segments: span(first, last),
            after: span(last, drained),
        })
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} s to the first segment's claim, {:.1} s of segments, {:.1} s from the last segment to STREAMING and drained",
            self.before.as_secs_f64(),
            self.segments.as_secs_f64(),
            self.after.as_secs_f64()
        )
    }
}

fn document(i: usize) -> Item {
    [
        ("id".to_owned(), AttrValue::s(format!("doc-{i:07}"))),
        ("n".to_owned(), AttrValue::n(i64::try_from(i).unwrap_or(0))),
        (
            "title".to_owned(),
            AttrValue::s(format!("a document of the replicas benchmark, number {i}")),
        ),
        ("v".to_owned(), AttrValue::n(1i64)),
        (
            "tags".to_owned(),
            AttrValue::Ss(["a".to_owned(), "b".to_owned()].into()),
        ),
    ]
    .into()
}

/// A job-tracker and `n` replicators, all on one data directory's embedded
/// database for the pipeline's source, every replicator's DynamoDB requests
/// to `aws`.
async fn start(
    bins: &Path,
    dir: &Path,
    data: &Path,
    n: usize,
    aws: &str,
) -> anyhow::Result<Vec<Process>> {
    let jobs = free_addr()?;
    let mut plane = vec![Process::new(
        "job-tracker",
        bins.join("job-tracker"),
        vec![(
            "TIDEMARK_DATA_DIR".to_owned(),
            dir.join(format!("jobs-{n}")).display().to_string(),
        )],
        jobs,
        dir,
    )];
    for r in 0..n {
        let name = format!("replicator-{n}-{r}");
        plane.push(Process::new(
            &name,
            bins.join("replicator"),
            vec![
                ("TIDEMARK_DATA_DIR".to_owned(), data.display().to_string()),
                (
                    "TIDEMARK_JOB_TRACKER_URL".to_owned(),
                    format!("http://{jobs}"),
                ),
                ("TIDEMARK_WORKER_ID".to_owned(), name.clone()),
                ("TIDEMARK_AWS_ENDPOINT".to_owned(), aws.to_owned()),
                (
                    "TIDEMARK_WORKER_CONCURRENCY".to_owned(),
                    UNITS_PER_REPLICA.to_string(),
                ),
            ],
            free_addr()?,
            dir,
        ));
    }
    for p in &mut plane {
        p.start()?;
    }
    for p in &plane {
        p.wait_serving(Duration::from_secs(60)).await?;
    }
    Ok(plane)
}

/// Items in the DynamoDB table `name`, read directly (not through the
/// proxy) after the timed part.
async fn count(endpoint: &str, name: &str) -> anyhow::Result<usize> {
    let table = DynamoTable::open(client_at(endpoint).await, name).await?;
    let mut request = ScanRequest::segment(0, 1);
    let mut n = 0;
    loop {
        let page = table.scan(&request).await?;
        n += page.items.len();
        match page.last_key {
            Some(k) => request.start_after = Some(k),
            None => return Ok(n),
        }
    }
}

/// Items/s of a BackfillAttribute of the whole table, every item updated.
async fn attribute_backfill(
    replicator: &mut ReplicatorServiceClient<Channel>,
    jobs: &mut JobTrackerServiceClient<Channel>,
    table: &str,
    n: usize,
    items: usize,
) -> anyhow::Result<f64> {
    let request = BackfillRequest {
        table: table_ref(table),
        attribute: &format!("replicas_{n}"),
        segments: SEGMENTS,
        rate: 0,
        in_flight: WRITES_IN_FLIGHT,
        within: RUN_WITHIN,
    };
    Ok(run_backfill(replicator, jobs, &request, items).await?.1)
}

/// Items/s of a pipeline from the embedded source into the DynamoDB table
/// `sink`: from CreatePipeline until it is STREAMING and drained.
async fn copy(
    replicator: &mut ReplicatorServiceClient<Channel>,
    name: &str,
    sink: &str,
    items: usize,
) -> anyhow::Result<f64> {
    let source = common::DataStore {
        store: Some(common::data_store::Store::SqliteTable(
            common::SqliteTableRef {
                table_name: SOURCE.to_owned(),
                database: String::new(),
                key_attribute_names: vec!["id".to_owned()],
            },
        )),
    };
    let took = copy_pipeline(
        replicator,
        name,
        source,
        table_ref(sink),
        SEGMENTS,
        WRITES_IN_FLIGHT,
    )
    .await?;
    Ok(items as f64 / took.as_secs_f64())
}
