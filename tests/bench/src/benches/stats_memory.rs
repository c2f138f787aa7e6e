//! `stats-memory`: the stats-aggregator's dedup memory at 1 and 3 replicas.
//! Each replica count on fresh processes of the release binary sharing one
//! Redis buffer with a 10-minute dedup window (30 s with `--quick`); events
//! with UUID-sized fresh ids at 100,000/s (open loop, spread over the
//! replicas) for one whole window, so every id accepted is still
//! remembered at the end. Each replica's resident memory is sampled every
//! 10 s. Figures: the rate each count sustained, each replica's peak
//! resident memory at 3 replicas against 1 (it must not grow with the
//! replicas: each mirrors the one log), the ids held against
//! `dedup_max_ids` (the configured bound), and the memory a remembered id
//! costs a replica against the previous design's mirror (the id kept as
//! bytes with its second), measured in this process on the same ids.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tidemark_chaos::plane::{Process, build_services, free_addr, start_all};
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_proto::stats_aggregator::v1 as pb;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;

use super::soak::sample::{Sample, Sampler};
use super::stats_aggregator::cleanup;
use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};

/// Events a second over all replicas.
const RATE: f64 = 100_000.0;
/// The dedup window, and how long events are sent.
const WINDOW: Duration = Duration::from_secs(600);
/// Events a stream message.
const BATCH: u64 = 2_000;
/// Streams open at once over all replicas.
const STREAMS: u64 = 6;
/// A stream is closed (and its counts checked) after this long.
const SLICE: Duration = Duration::from_secs(10);
const ENTITIES: u64 = 1_000;
/// What an operator sets for this rate: ids are kept one to two windows,
/// so the log holds at most `2 × window × rate`, with a quarter spare.
fn max_ids(window: Duration) -> u64 {
    (2.0 * window.as_secs_f64() * RATE * 1.25) as u64
}
/// Sustained rate ÷ scheduled at least this.
const SUSTAINED: f64 = 0.95;
/// A replica's peak memory at 3 replicas ÷ at 1 at most this.
const FLAT: f64 = 1.2;
/// The previous design's map is measured on this many ids.
const OLD_DESIGN_IDS: u64 = 2_000_000;

pub struct StatsMemory;

/// A fresh, UUID-sized event id (36 characters) for event `n` of a run.
fn event_id(run: u64, n: u64) -> String {
    let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ run;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (n >> 48) & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

fn event(run: u64, n: u64) -> pb::Event {
    pb::Event {
        event_id: event_id(run, n),
        entity_key: format!("content-{}", n.wrapping_mul(2_654_435_761) % ENTITIES),
        metric: ["views", "likes", "shares"][(n % 3) as usize].to_owned(),
        op: Some(pb::event::Op::Increment(pb::Increment {
            delta: 1 + (n % 7) as i64,
        })),
        event_time: None,
    }
}

/// One replica count's run.
struct Outcome {
    replicas: usize,
    accepted: u64,
    elapsed: Duration,
    /// Per replica: resident memory before the first event, and its peak.
    memory: Vec<(u64, u64)>,
    redis_bytes: u64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }

    fn peak(&self) -> u64 {
        self.memory.iter().map(|m| m.1).max().unwrap_or(0)
    }

    /// A remembered id's cost to the replica that grew most.
    fn bytes_per_id(&self) -> f64 {
        let grown = self
            .memory
            .iter()
            .map(|(start, peak)| peak.saturating_sub(*start))
            .max()
            .unwrap_or(0);
        grown as f64 / self.accepted.max(1) as f64
    }
}

#[async_trait::async_trait]
impl Benchmark for StatsMemory {
    fn name(&self) -> &'static str {
        "stats-memory"
    }

    fn description(&self) -> &'static str {
        "The stats-aggregator's dedup memory: 1 and 3 replicas (release binaries) sharing \
         one Redis buffer with a 10-minute dedup window, 100,000 events/s with fresh \
         UUID-sized ids for the whole window (every id still remembered at the end); each \
         replica's peak resident memory at 3 replicas against 1, the ids held against the \
         configured `dedup_max_ids`, and a remembered id's memory against the previous \
         design's mirror."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let window = ctx.time(WINDOW);
        let dir = tempfile::tempdir()?;
        let bins = dir.path().join("bin");
        let into = bins.clone();
        tokio::task::spawn_blocking(move || build_services(&into)).await??;
        let old_design = old_design_bytes_per_id();
        eprintln!(
            "stats-memory: the previous design's mirror holds an id in {old_design:.1} bytes"
        );
        let mut outcomes = Vec::new();
        for (run, replicas) in [1usize, 3].into_iter().enumerate() {
            outcomes.push(one_count(&bins, dir.path(), replicas, run as u64, window).await?);
        }
        Ok(report(&outcomes, window, old_design))
    }
}

/// Resident memory of this process (VmRSS), in bytes.
fn own_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Bytes a remembered id took in the previous design's mirror (the id's
/// bytes boxed, with its second, in a `HashMap`): built here from the
/// same ids as the run's.
fn old_design_bytes_per_id() -> f64 {
    let before = own_rss();
    let mut seen: HashMap<Box<[u8]>, u64> = HashMap::new();
    for n in 0..OLD_DESIGN_IDS {
        seen.insert(event_id(u64::MAX, n).into_bytes().into_boxed_slice(), n);
    }
    let after = own_rss();
    let per_id = after.saturating_sub(before) as f64 / seen.len() as f64;
    drop(seen);
    per_id
}

async fn one_count(
    bins: &Path,
    dir: &Path,
    replicas: usize,
    run: u64,
    window: Duration,
) -> anyhow::Result<Outcome> {
    let name = unique_name("stats-memory");
    let redis_url = local_env("TIDEMARK_TEST_REDIS_URL");
    let prefix = RedisBuffer::prefix_for(&name);
    let mut plane = Vec::new();
    for r in 0..replicas {
        let data = dir.join(format!("{name}-{r}"));
        std::fs::create_dir_all(&data)?;
        let env = [
            ("TIDEMARK_DATA_DIR", data.display().to_string()),
            ("TIDEMARK_STORE", "embedded".to_owned()),
            ("TIDEMARK_BUFFER", "redis".to_owned()),
            ("TIDEMARK_REDIS_URL", redis_url.clone()),
            ("TIDEMARK_BUFFER_NAME", name.clone()),
            ("TIDEMARK_DEDUP_WINDOW_SECS", window.as_secs().to_string()),
            ("TIDEMARK_DEDUP_MAX_IDS", max_ids(window).to_string()),
            // One flush at the end of the run's time at most: the buffer's
            // entities are few, the id log is what grows.
            ("TIDEMARK_FLUSH_INTERVAL_MS", "300000".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        plane.push(Process::new(
            &format!("stats-aggregator-{r}"),
            bins.join("stats-aggregator"),
            env,
            free_addr()?,
            dir,
        ));
    }
    start_all(&mut plane).await?;
    let pids = plane
        .iter()
        .map(|p| Ok((p.name.clone(), p.pid().context("a replica is down")?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let every = (window / 60).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let sampler = Sampler::spawn(format!("stats-memory {replicas}r"), pids, every);
    // Let the first sample (before any event) land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut clients = Vec::new();
    for p in &plane {
        clients.push(StatsAggregatorServiceClient::connect(p.url()).await?);
    }
    let started = Instant::now();
    let sent = send(&clients, run, window).await;
    let elapsed = started.elapsed();
    let series = sampler.stop().await?;
    for p in &mut plane {
        p.check_alive()?;
    }
    let accepted = sent?;
    let memory = series
        .iter()
        .map(|(_, samples)| {
            let start = samples.first().map_or(0, |s: &Sample| s.rss_bytes);
            let peak = samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
            (start, peak)
        })
        .collect();
    let redis_bytes = redis_log_bytes(&redis_url, &prefix).await?;
    drop(plane);
    cleanup(&prefix).await?;
    Ok(Outcome {
        replicas,
        accepted,
        elapsed,
        memory,
        redis_bytes,
    })
}

/// `MEMORY USAGE` of the id log's list: what Redis holds for it.
async fn redis_log_bytes(url: &str, prefix: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("{prefix}idlog"))
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut conn)
        .await?;
    Ok(bytes.unwrap_or(0))
}

/// Sends `RATE` events/s for `window` over `STREAMS` streams spread over
/// the replicas, open loop (a late batch goes at once); every event is
/// fresh. Returns the events accepted; a stream refused (a batch over
/// `dedup_max_ids` among others) fails the run.
async fn send(
    clients: &[StatsAggregatorServiceClient<tonic::transport::Channel>],
    run: u64,
    window: Duration,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let per_batch = Duration::from_secs_f64(BATCH as f64 * STREAMS as f64 / RATE);
    let tasks: Vec<_> = (0..STREAMS)
        .map(|stream| {
            let client = clients[(stream as usize) % clients.len()].clone();
            tokio::spawn(async move {
                let mut accepted = 0u64;
                let mut batch = 0u64;
                let offset = per_batch.mul_f64(stream as f64 / STREAMS as f64);
                while start.elapsed() < window {
                    let (tx, rx) = tokio::sync::mpsc::channel::<pb::IngestRequest>(2);
                    let call = {
                        let mut client = client.clone();
                        tokio::spawn(async move {
                            client
                                .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                                .await
                        })
                    };
                    let slice_end = start.elapsed() + SLICE;
                    let mut sent = 0u64;
                    loop {
                        let due = offset + per_batch * u32::try_from(batch)?;
                        if due >= window || due >= slice_end {
                            break;
                        }
                        tokio::time::sleep_until((start + due).into()).await;
                        let first = (batch * STREAMS + stream) * BATCH;
                        let events = (first..first + BATCH).map(|n| event(run, n)).collect();
                        if tx.send(pb::IngestRequest { events }).await.is_err() {
                            break;
                        }
                        sent += BATCH;
                        batch += 1;
                    }
                    drop(tx);
                    let reply = call.await?.map_err(|s| {
                        anyhow::anyhow!("stream {stream}: {}: {}", s.code(), s.message())
                    })?;
                    let reply = reply.into_inner();
                    anyhow::ensure!(
                        reply.accepted_count == i64::try_from(sent)? && reply.rejected_count == 0,
                        "stream {stream}: sent {sent}, got {reply:?}"
                    );
                    accepted += sent;
                }
                Ok::<_, anyhow::Error>(accepted)
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await??;
    }
    Ok(accepted)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn report(outcomes: &[Outcome], window: Duration, old_design: f64) -> Report {
    let mut report = Report::default();
    let [one, three] = outcomes else {
        return report;
    };
    for o in outcomes {
        report.rows.push(
            Row::new(
                format!(
                    "{} replica(s): events/s sustained (vs scheduled)",
                    o.replicas
                ),
                "events/s",
                o.rate(),
                RATE,
            )
            .with_target(Target::RatioAtLeast(SUSTAINED)),
        );
    }
    report.rows.push(
        Row::new(
            "a replica's peak resident memory at 3 replicas (vs at 1)",
            "MiB",
            mib(three.peak()),
            mib(one.peak()),
        )
        .with_target(Target::RatioAtMost(FLAT)),
    );
    for o in outcomes {
        report.rows.push(
            Row::new(
                format!(
                    "{} replica(s): ids held at the end (vs dedup_max_ids)",
                    o.replicas
                ),
                "ids",
                o.accepted as f64,
                max_ids(window) as f64,
            )
            .with_target(Target::RatioAtMost(1.0)),
        );
    }
    report.rows.push(Row::new(
        "a remembered id's resident memory in a replica (vs the previous design's mirror)",
        "bytes",
        one.bytes_per_id().max(three.bytes_per_id()),
        old_design,
    ));
    for o in outcomes {
        let replicas = o
            .memory
            .iter()
            .map(|(start, peak)| format!("{:.0} → {:.0} MiB", mib(*start), mib(*peak)))
            .collect::<Vec<_>>()
            .join(", ");
        report.notes.push(format!(
            "{} replica(s): {} events accepted in {:.0} s, every one fresh, so every id is remembered at the end; resident memory before the first \
             event → peak: {replicas}; the id log in Redis: {:.0} MiB ({:.1} bytes an id)",
            o.replicas,
            fmt_num(o.accepted as f64),
            o.elapsed.as_secs_f64(),
            mib(o.redis_bytes),
            o.redis_bytes as f64 / o.accepted.max(1) as f64,
        ));
    }
    report.notes.push(format!(
        "dedup window {} s, `dedup_max_ids` {} (2 windows at the rate, a quarter spare); \
         {STREAMS} client streams of {BATCH}-event messages spread over the replicas, each \
         closed and its counts checked every {} s; ids 36 characters (UUID-shaped), one of \
         {ENTITIES} entities × 3 metrics each; buffer in the local Redis, counters flushed to \
         the embedded store",
        window.as_secs(),
        fmt_num(max_ids(window) as f64),
        SLICE.as_secs(),
    ));
    report.notes.push(format!(
        "each replica mirrors the whole id log (it decides duplicates for the batches it \
         serves), so a replica's memory follows the log's size, which `dedup_max_ids` \
         bounds, and not the number of replicas; a remembered id is a 128-bit keyed \
         fingerprint and its second in a table (20 bytes a slot, the table between 44% and \
         88% full); the previous design kept the id's bytes and its second: {old_design:.1} \
         bytes an id, measured in this process on {} of the same ids",
        fmt_num(OLD_DESIGN_IDS as f64),
    ));
    report
}
