//! `scale`: how the cost grows with the work. At 10k, 100k, 1M and 5M
//! items on the embedded store, with the services as separate processes of
//! their release binaries: an attribute backfill of the whole table, a
//! pipeline's initial backfill of it into an embedded sink, and a
//! verification (count + digest) of the table against that sink. Figures:
//! seconds per million items at each size against the same at 10k (linear:
//! within 1.3×), and each service process's peak resident memory at each
//! size against the same at 100k (flat: within 1.5×). The 100k size again
//! on the local DynamoDB endpoint, the pipeline fed by the table's stream,
//! against the embedded store at that size.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use tidemark_chaos::plane::{Process, build_services, free_addr, start_all};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::{AttrValue, Item, KeySchema};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tidemark_proto::verifier::v1 as vf;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::transport::Channel;

use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};

const SIZES: [usize; 4] = [10_000, 100_000, 1_000_000, 5_000_000];
/// The size also measured on the local DynamoDB endpoint (its stand-in
/// serves a few hundred writes a second: larger sizes would take hours),
/// against the embedded store at the same size.
const DYNAMODB_SIZE: usize = 100_000;
/// Items a seeding BatchWriteItem carries (DynamoDB's limit), and how many
/// are in flight.
const DYNAMODB_BATCH: usize = 25;
const DYNAMODB_SEEDERS: usize = 8;
/// Time per item at any size over the same at the smallest: at most this.
const LINEAR: f64 = 1.3;
/// Peak resident memory at any size over the same at 100k: at most this.
const FLAT: f64 = 1.5;
/// Scan segments of each operation (units of its run).
const SEGMENTS: u32 = 4;
/// Items per bulk-load transaction while seeding.
const SEED_BATCH: usize = 10_000;
const SOURCE: &str = "scale_src";
const SINK: &str = "scale_dst";
const OPERATIONS: [&str; 3] = [
    "attribute backfill",
    "pipeline initial backfill",
    "verification (count + digest)",
];

pub struct Scale;

/// One size's measurements.
struct Point {
    items: usize,
    seed: Duration,
    /// Per operation, in the order of [`OPERATIONS`].
    took: [Duration; 3],
    /// Peak resident memory (VmHWM) of each service process, bytes.
    peak: Vec<(String, u64)>,
}

impl Point {
    fn secs_per_million(&self, op: usize) -> f64 {
        self.took[op].as_secs_f64() * 1e6 / self.items as f64
    }

    /// "N items: seeded in S s".
    fn seeded(&self) -> String {
        format!(
            "{} items: seeded in {} s",
            fmt_num(self.items as f64),
            fmt_num(self.seed.as_secs_f64())
        )
    }

    /// Each operation's time, then each process's peak memory.
    fn ran(&self) -> String {
        format!(
            "{}; peak resident memory {}",
            OPERATIONS
                .iter()
                .zip(&self.took)
                .map(|(op, t)| format!("{op} {} s", fmt_num(t.as_secs_f64())))
                .collect::<Vec<_>>()
                .join(", "),
            self.peak
                .iter()
                .map(|(name, _)| format!("{name} {} MiB", fmt_num(self.peak_mib(name))))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn peak_mib(&self, process: &str) -> f64 {
        self.peak
            .iter()
            .find(|(p, _)| p == process)
            .map_or(f64::NAN, |(_, b)| *b as f64 / (1024.0 * 1024.0))
    }
}

#[async_trait::async_trait]
impl Benchmark for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn description(&self) -> &'static str {
        "How the cost grows with the work: an attribute backfill, a pipeline's initial \
         backfill into an embedded sink and a verification (count + digest) at 10k, 100k, \
         1M and 5M items on the embedded store, the services as separate processes of \
         their release binaries; seconds per million items against the same at 10k \
         (linear), and each process's peak resident memory against the same at 100k (flat); \
         100k again on the local DynamoDB endpoint, against the embedded store."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let scale = if ctx.quick { 20 } else { 1 };
        let bins = tempfile::tempdir()?;
        let into = bins.path().to_owned();
        tokio::task::spawn_blocking(move || build_services(&into)).await??;
        let mut points = Vec::new();
        // TIDEMARK_SCALE_SIZES=1000000,5000000 measures only those sizes
        // (the first is the reference of the rest): for a look at one size.
        let sizes: Vec<usize> = match std::env::var("TIDEMARK_SCALE_SIZES") {
            Ok(list) => list
                .split(',')
                .map(|n| n.trim().parse())
                .collect::<Result<_, _>>()
                .context("TIDEMARK_SCALE_SIZES must be a comma-separated list of item counts")?,
            Err(_) => SIZES.iter().map(|n| n / scale).collect(),
        };
        anyhow::ensure!(
            sizes.len() >= 2,
            "at least two sizes: the first is the reference"
        );
        for n in sizes {
            let point = one_size(bins.path(), n)
                .await
                .with_context(|| format!("at {n} items"))?;
            eprintln!("scale: {}; {}", point.seeded(), point.ran());
            points.push(point);
        }
        // The DynamoDB point, unless sizes were picked by hand.
        let dynamodb = if std::env::var("TIDEMARK_SCALE_SIZES").is_ok() {
            None
        } else {
            let n = DYNAMODB_SIZE / scale;
            let endpoint =
                tidemark_connectors::testing::local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT");
            let point = one_size_dynamodb(bins.path(), &endpoint, n)
                .await
                .with_context(|| format!("on the local DynamoDB at {n} items"))?;
            eprintln!("scale on DynamoDB: {}; {}", point.seeded(), point.ran());
            Some(point)
        };
        let mut report = report(&points, dynamodb.as_ref());
        if let Some(dir) = &ctx.figures {
            std::fs::create_dir_all(dir)?;
            plot(&points, &dir.join(PICTURE))?;
            report.notes.push(format!(
                "the curves: ![seconds per million items and peak resident memory by size](benchmarks/{PICTURE})"
            ));
        }
        Ok(report)
    }
}

/// The picture beside the section, in `benchmarks/`.
const PICTURE: &str = "scale.png";
/// The TTF the picture's text is drawn with (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Seconds per million items by size, one line per operation, and peak
/// resident memory by size, one line per process, side by side.
fn plot(points: &[Point], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| {
        format!("read {FONT} for the picture's text (apt-get install fonts-dejavu-core)")
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can draw with"))?;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    let xs = points.iter().map(|p| p.items as f64);
    let x_range = (xs.clone().fold(f64::MAX, f64::min) * 0.7)..(xs.fold(0.0, f64::max) * 1.4);
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let panels = [
        (
            &left,
            "time per item (linear: a flat line)",
            "seconds per million items",
            OPERATIONS
                .iter()
                .enumerate()
                .map(|(op, name)| {
                    let line = points
                        .iter()
                        .map(|p| (p.items as f64, p.secs_per_million(op)))
                        .collect();
                    ((*name).to_owned(), line)
                })
                .collect(),
        ),
        (
            &right,
            "peak resident memory (flat: nothing held per item)",
            "MiB",
            points[0]
                .peak
                .iter()
                .map(|(name, _)| {
                    let line = points
                        .iter()
                        .map(|p| (p.items as f64, p.peak_mib(name)))
                        .collect();
                    (name.clone(), line)
                })
                .collect(),
        ),
    ];
    for (area, caption, y_desc, lines) in panels {
        let lines: Vec<(String, Vec<(f64, f64)>)> = lines;
        let y_max = lines
            .iter()
            .flat_map(|(_, l)| l.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max)
            * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.clone().log_scale(), 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("items (log scale)")
            .y_desc(y_desc)
            .x_label_formatter(&|x| fmt_num(*x))
            .draw()?;
        for (i, (name, line)) in lines.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn report(points: &[Point], dynamodb: Option<&Point>) -> Report {
    let mut report = Report::default();
    let first = &points[0];
    for (op, name) in OPERATIONS.iter().enumerate() {
        for p in &points[1..] {
            report.rows.push(
                Row::new(
                    format!(
                        "{name}: s per million items at {} (vs at {})",
                        fmt_num(p.items as f64),
                        fmt_num(first.items as f64)
                    ),
                    "s",
                    p.secs_per_million(op),
                    first.secs_per_million(op),
                )
                .with_target(Target::RatioAtMost(LINEAR)),
            );
        }
    }
    let base = &points[1.min(points.len() - 1)];
    for (process, _) in &base.peak {
        for p in points.iter().skip(2) {
            report.rows.push(
                Row::new(
                    format!(
                        "{process} peak resident memory at {} (vs at {})",
                        fmt_num(p.items as f64),
                        fmt_num(base.items as f64)
                    ),
                    "MiB",
                    p.peak_mib(process),
                    base.peak_mib(process),
                )
                .with_target(Target::RatioAtMost(FLAT)),
            );
        }
    }
    if let Some(d) = dynamodb {
        let embedded = points.iter().find(|p| p.items == d.items);
        for (op, name) in OPERATIONS.iter().enumerate() {
            report.rows.push(Row::new(
                format!(
                    "{name} on the local DynamoDB: s per million items at {} (vs the embedded store{})",
                    fmt_num(d.items as f64),
                    if embedded.is_some() { " at the same size" } else { ": no point of that size" }
                ),
                "s",
                d.secs_per_million(op),
                embedded.map_or(f64::NAN, |e| e.secs_per_million(op)),
            ));
        }
        report.notes.push(format!(
            "local DynamoDB, {} (BatchWriteItem, {DYNAMODB_BATCH} items each, {DYNAMODB_SEEDERS} in flight); {}. Its stand-in (moto, one lock around every read and write) serves a few hundred conditional writes a second on this machine: these figures are the stand-in's rate, not Tidemark's, and against AWS DynamoDB the writes scale with segments. The pipeline reads the table's DynamoDB Stream; the verification compares the table with the pipeline's embedded sink.",
            d.seeded(),
            d.ran()
        ));
    }
    for p in points {
        report.notes.push(format!("{}; {}", p.seeded(), p.ran()));
    }
    report.notes.push(format!(
        "each size on fresh processes and a fresh data directory: the job-tracker, and a \
         replicator and a verifier sharing one embedded database (the replicator's \
         attribute backfill and pipeline, then the verifier reading both sides); the \
         table is bulk-loaded first ({SEED_BATCH} items a transaction, every change \
         logged); {SEGMENTS} segments per operation; items of ~230 bytes with 5 \
         attributes; peak resident memory is each process's VmHWM after the three \
         operations (the replicator's covers both of its operations)"
    ));
    report
}

fn item(i: usize) -> Item {
    [
        ("id".to_owned(), AttrValue::s(format!("k-{i:08}"))),
        ("v".to_owned(), AttrValue::n(1 + (i as u64 % 50))),
        (
            "title".to_owned(),
            AttrValue::s(format!("an item of the scale benchmark, number {i}")),
        ),
        (
            "score".to_owned(),
            AttrValue::n(i64::try_from(i).unwrap_or(0)),
        ),
        (
            "tags".to_owned(),
            AttrValue::Ss(["a".to_owned(), "b".to_owned()].into()),
        ),
    ]
    .into()
}

fn sqlite(name: &str, keys: &[&str]) -> common::DataStore {
    common::DataStore {
        store: Some(common::data_store::Store::SqliteTable(
            common::SqliteTableRef {
                table_name: name.to_owned(),
                database: String::new(),
                key_attribute_names: keys.iter().map(|k| (*k).to_owned()).collect(),
            },
        )),
    }
}

async fn one_size(bins: &Path, n: usize) -> anyhow::Result<Point> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let started = Instant::now();
    {
        let store = EmbeddedStore::open(&data.join("default.db"))?;
        let table = store.table(SOURCE, KeySchema::new("id", None));
        let mut next = 0;
        while next < n {
            let end = (next + SEED_BATCH).min(n);
            table.put_all((next..end).map(item).collect()).await?;
            next = end;
        }
    }
    let seed = started.elapsed();
    let feed = pb::change_feed::Feed::EmbeddedChangeLog(pb::EmbeddedChangeLogFeed {
        start_position: pb::StartPosition::Latest as i32,
    });
    measure(bins, dir.path(), n, seed, sqlite(SOURCE, &["id"]), feed).await
}

/// The same operations on a table of the DynamoDB endpoint (with a
/// stream), the pipeline fed by its DynamoDB Stream.
async fn one_size_dynamodb(bins: &Path, endpoint: &str, n: usize) -> anyhow::Result<Point> {
    let dir = tempfile::tempdir()?;
    let client = super::replicator::client_at(endpoint).await;
    let name = tidemark_connectors::testing::unique_name("bench-scale");
    DynamoTable::create(client.clone(), &name, &KeySchema::new("id", None), true).await?;
    let started = Instant::now();
    let batches: Vec<Vec<usize>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(DYNAMODB_BATCH)
        .map(<[usize]>::to_vec)
        .collect();
    let written: Vec<anyhow::Result<()>> = futures::stream::iter(batches)
        .map(|batch| batch_write(&client, &name, batch))
        .buffer_unordered(DYNAMODB_SEEDERS)
        .collect()
        .await;
    for w in written {
        w?;
    }
    let seed = started.elapsed();
    let feed = pb::change_feed::Feed::DynamodbStreams(pb::DynamoDbStreamsFeed {
        start_position: pb::StartPosition::Latest as i32,
        readers: 1,
    });
    let source = super::replicator::table_ref(&name);
    let point = measure(bins, dir.path(), n, seed, source, feed).await;
    let _ = client.delete_table().table_name(&name).send().await;
    point
}

/// Writes the items numbered `batch` in BatchWriteItems, again with what
/// each left unprocessed.
async fn batch_write(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    batch: Vec<usize>,
) -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    let mut requests: Vec<WriteRequest> = batch
        .into_iter()
        .map(|i| {
            let put = PutRequest::builder()
                .set_item(Some(tidemark_connectors::dynamodb::item_to_ddb(&item(i))))
                .build()?;
            Ok(WriteRequest::builder().put_request(put).build())
        })
        .collect::<anyhow::Result<_>>()?;
    for _ in 0..20 {
        let out = client
            .batch_write_item()
            .request_items(table, requests)
            .send()
            .await?;
        requests = out
            .unprocessed_items
            .and_then(|mut u| u.remove(table))
            .unwrap_or_default();
        if requests.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("BatchWriteItem left items unprocessed 20 times")
}

/// The three operations on `source` (read through `feed` by the pipeline)
/// by fresh processes in `dir`; each process's peak memory after them.
async fn measure(
    bins: &Path,
    dir: &Path,
    n: usize,
    seed: Duration,
    source: common::DataStore,
    feed: pb::change_feed::Feed,
) -> anyhow::Result<Point> {
    let data = dir.join("data");
    let mut plane = start(bins, dir, &data).await?;
    let channel = |p: &Process| Channel::from_shared(p.url()).map(|c| c.connect_lazy());
    let mut jobs = JobTrackerServiceClient::new(channel(&plane[0])?);
    let mut replicator = ReplicatorServiceClient::new(channel(&plane[1])?);
    let mut verifier = VerifierServiceClient::new(channel(&plane[2])?);
    let operations = async {
        Ok::<_, anyhow::Error>([
            attribute_backfill(&mut replicator, &mut jobs, source.clone(), n)
                .await
                .context(OPERATIONS[0])?,
            pipeline(&mut replicator, source.clone(), feed)
                .await
                .context(OPERATIONS[1])?,
            verification(&mut verifier, source)
                .await
                .context(OPERATIONS[2])?,
        ])
    };
    let took = match operations.await {
        Ok(took) => took,
        Err(e) => {
            // The processes' own account of it, before their directory goes.
            for p in &plane {
                let log = dir.join(format!("{}.log", p.name));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last lines of {}:", p.name);
                for line in &lines[lines.len().saturating_sub(20)..] {
                    eprintln!("{line}");
                }
            }
            return Err(e);
        }
    };
    let mut peak = Vec::new();
    for p in &mut plane {
        p.check_alive()?;
        let pid = p.pid().context("a process is down")?;
        peak.push((p.name.clone(), peak_rss(pid)?));
    }
    Ok(Point {
        items: n,
        seed,
        took,
        peak,
    })
}

/// The job-tracker (its own data directory), the replicator and the
/// verifier (one embedded database, `data/default.db`, for both).
async fn start(bins: &Path, dir: &Path, data: &Path) -> anyhow::Result<Vec<Process>> {
    let data_dir = |path: &Path| ("TIDEMARK_DATA_DIR".to_owned(), path.display().to_string());
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
            vec![data_dir(&dir.join("jobs"))],
            jobs,
            dir,
        ),
        Process::new(
            "replicator",
            bins.join("replicator"),
            vec![data_dir(data), jobs_url.clone(), worker("scale-replicator")],
            replicator,
            dir,
        ),
        Process::new(
            "verifier",
            bins.join("verifier"),
            vec![
                data_dir(data),
                jobs_url,
                worker("scale-verifier"),
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

/// VmHWM of /proc/<pid>/status: the process's peak resident memory.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// BackfillAttribute of the whole table, from the request to the run's
/// end; every item updated.
async fn attribute_backfill(
    replicator: &mut ReplicatorServiceClient<Channel>,
    jobs: &mut JobTrackerServiceClient<Channel>,
    table: common::DataStore,
    n: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let request = super::replicator::BackfillRequest {
        table,
        attribute: "migrated",
        segments: SEGMENTS,
        rate: 0,
        in_flight: 0,
        // 5M items take minutes; an hour means it stalled.
        within: Duration::from_secs(3600),
    };
    super::replicator::run_backfill(replicator, jobs, &request, n).await?;
    Ok(started.elapsed())
}

/// A pipeline from the table into an embedded sink, from CreatePipeline
/// until Drain reports its initial backfill done and the feed caught up.
async fn pipeline(
    replicator: &mut ReplicatorServiceClient<Channel>,
    source: common::DataStore,
    feed: pb::change_feed::Feed,
) -> anyhow::Result<Duration> {
    super::replicator::copy_pipeline_fed(
        replicator,
        "scale",
        source,
        feed,
        sqlite(SINK, &[]),
        SEGMENTS,
        0,
    )
    .await
}

/// A count and a digest check of the table against the pipeline's sink,
/// from StartVerification to the stored report; it must pass.
async fn verification(
    verifier: &mut VerifierServiceClient<Channel>,
    source: common::DataStore,
) -> anyhow::Result<Duration> {
    let spec = vf::VerificationSpec {
        source: Some(source),
        target: Some(sqlite(SINK, &[])),
        checks: vec![
            vf::Check {
                name: "count".to_owned(),
                kind: Some(vf::check::Kind::Count(vf::CountCheck::default())),
            },
            vf::Check {
                name: "digest".to_owned(),
                kind: Some(vf::check::Kind::Digest(vf::DigestCheck::default())),
            },
        ],
        segments: SEGMENTS,
        ..Default::default()
    };
    super::verifier::verify(verifier, spec).await
}
