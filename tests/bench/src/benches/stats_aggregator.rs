//! `stats-aggregator`: (a) ingest events/s over client-streaming `Ingest`
//! with dedup on, into the Redis buffer, next to the same buffer's
//! `apply_events` called directly (the same dedup against the id log, the
//! same folding and the same script; no gRPC, no decoding, no validation) at
//! the same batch size and concurrency, and next to the previous design's
//! script (ids checked and remembered one by one in Redis sets) called
//! directly; (b) flush items/s next to raw conditional `UpdateItem`s of the
//! same shape at the same concurrency on the same DynamoDB endpoint, all
//! measured in this run.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;
use futures::StreamExt as _;
use stats_aggregator::{Backends, DynamoStatsStore, EventLogBuffer};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_connectors::{Buffer, BufferEvent, BufferOp, KeySchema};
use tidemark_kit::{CancellationToken, ServerConfig};
use tidemark_proto::stats_aggregator::v1 as pb;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::framework::{Benchmark, Context, Report, Row, Side, Target, fmt_num, interleaved};

/// DESIGN.md §6: aggregator ingest on this 2-core machine, dedup on.
const INGEST_TARGET: f64 = 200_000.0;
const ROUNDS: usize = 3;
const ROUND: Duration = Duration::from_secs(3);
/// Events per stream message (and per direct script call).
const BATCH: usize = 5_000;
const STREAMS: usize = 4;
const ENTITIES: u64 = 1_000;
/// Short, so the benchmark's ids expire soon after it.
const DEDUP_WINDOW: Duration = Duration::from_secs(60);
/// Items of one measured flush; the endpoint serves a few hundred a second.
const FLUSH_ITEMS: u64 = 400;
const FLUSH_CONCURRENCY: usize = 16;
const FLUSH_ROUNDS: usize = 2;

pub struct StatsAggregatorBench;

/// The `n`-th event of a stream: a fresh id (dedup has work to do), one of
/// `ENTITIES` entities, mostly increments, one replace in fifty.
fn event_parts(stream: usize, n: u64) -> (String, String, &'static str, bool, i64) {
    let entity = n.wrapping_mul(2_654_435_761) % ENTITIES;
    let metric = ["views", "likes", "shares"][usize::try_from(n % 3).unwrap_or(0)];
    (
        format!("s{stream}-{n}"),
        format!("content-{entity}"),
        metric,
        n.is_multiple_of(50),
        i64::try_from(n % 7).unwrap_or(0),
    )
}

fn proto_event(stream: usize, n: u64) -> pb::Event {
    let (id, entity, metric, replace, delta) = event_parts(stream, n);
    pb::Event {
        event_id: id,
        entity_key: entity,
        metric: metric.to_owned(),
        op: Some(if replace {
            pb::event::Op::Replace(pb::Replace {
                value: format!("{delta}.5"),
            })
        } else {
            pb::event::Op::Increment(pb::Increment { delta })
        }),
        event_time: None,
    }
}

fn buffer_event(stream: usize, n: u64) -> BufferEvent {
    let (id, entity, metric, replace, delta) = event_parts(stream, n);
    BufferEvent {
        id,
        op: if replace {
            BufferOp::Replace {
                entity,
                metric: metric.to_owned(),
                value: format!("{delta}.5"),
            }
        } else {
            BufferOp::Increment {
                entity,
                metric: metric.to_owned(),
                delta,
            }
        },
        time_micros: 1,
    }
}

/// Removes every key under `prefix` (SCAN + UNLINK: the buffer holds
/// millions of dedup ids after a run).
pub(crate) async fn cleanup(prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

struct Aggregator {
    clients: Vec<StatsAggregatorServiceClient<Channel>>,
    stop: CancellationToken,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(buffer: Arc<EventLogBuffer>, table: &str) -> anyhow::Result<Aggregator> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = stats_aggregator::Config {
        server: ServerConfig {
            listen: addr,
            ..ServerConfig::default()
        },
        // Flushes are measured on their own: none runs by itself here.
        flush_interval_ms: 3_600_000,
        flush_concurrency: FLUSH_CONCURRENCY,
        dedup_window_secs: DEDUP_WINDOW.as_secs(),
        ..stats_aggregator::Config::default()
    };
    let (client, _) = dynamodb_clients().await;
    let store = DynamoStatsStore::open(client, table, "pk").await?;
    let backends = Backends {
        redis: Some(buffer.redis().clone()),
        buffer,
        store: Arc::new(store),
        publisher: None,
    };
    let stop = CancellationToken::new();
    tokio::spawn(stats_aggregator::run_with(
        config,
        backends,
        listener,
        stop.clone(),
    ));
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_lazy();
        clients.push(
            StatsAggregatorServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        );
    }
    // Ready once it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients[0]
        .clone()
        .get_buffer_state(pb::GetBufferStateRequest {})
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "the aggregator did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Aggregator { clients, stop })
}

/// Events/s of `STREAMS` client streams sending `BATCH`-event messages for
/// `round`; every event is fresh, so all must be accepted.
async fn ingest_round(
    agg: &Aggregator,
    round: Duration,
    next: &Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + round;
    let tasks: Vec<_> = agg
        .clients
        .iter()
        .enumerate()
        .map(|(stream, client)| {
            let mut client = client.clone();
            let next = Arc::clone(next);
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::IngestRequest>(2);
                let call = tokio::spawn(async move {
                    client
                        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                });
                let mut sent = 0i64;
                while Instant::now() < deadline {
                    let first = next.fetch_add(BATCH as u64, Ordering::Relaxed);
                    let events = (first..first + BATCH as u64)
                        .map(|n| proto_event(stream, n))
                        .collect();
                    if tx.send(pb::IngestRequest { events }).await.is_err() {
                        break;
                    }
                    sent += BATCH as i64;
                }
                drop(tx);
                let response = call.await??.into_inner();
                anyhow::ensure!(
                    response.accepted_count == sent && response.rejected_count == 0,
                    "sent {sent}, got {response:?}"
                );
                Ok::<_, anyhow::Error>(sent)
            })
        })
        .collect();
    let mut total = 0i64;
    for t in tasks {
        total += t.await??;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Events/s of the same buffer calls made directly (or, with the previous
/// design's buffer, of its script).
async fn raw_round<B: Buffer + ?Sized + 'static>(
    buffer: &Arc<B>,
    round: Duration,
    next: &Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + round;
    let tasks: Vec<_> = (0..STREAMS)
        .map(|stream| {
            let buffer = Arc::clone(buffer);
            let next = Arc::clone(next);
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    let first = next.fetch_add(BATCH as u64, Ordering::Relaxed);
                    let events: Vec<BufferEvent> = (first..first + BATCH as u64)
                        .map(|n| buffer_event(stream, n))
                        .collect();
                    let dups = buffer.apply_events(&events, DEDUP_WINDOW).await?;
                    anyhow::ensure!(dups.is_empty(), "fresh ids reported as duplicates");
                    sent += BATCH as u64;
                }
                Ok::<_, anyhow::Error>(sent)
            })
        })
        .collect();
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// CPU seconds used so far: this process (client, aggregator and the direct
/// calls) and Redis (its `INFO cpu`, every client's commands included).
struct Cpu {
    conn: redis::aio::MultiplexedConnection,
}

impl Cpu {
    async fn now(&mut self) -> anyhow::Result<(f64, f64)> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.conn)
            .await?;
        let redis: f64 = info
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k == "used_cpu_sys" || k == "used_cpu_user")
                    .then(|| v.trim().parse::<f64>().ok())
                    .flatten()
            })
            .sum();
        let own = crate::load::process_cpu_time()
            .context("getrusage")?
            .as_secs_f64();
        Ok((own, redis))
    }
}

/// Totals of one side's rounds: events, and CPU seconds of this process and
/// of Redis.
#[derive(Default)]
struct Spent {
    events: u64,
    own: f64,
    redis: f64,
}

impl Spent {
    fn per_event(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
        let n = self.events.max(1) as f64;
        format!(
            "{:.2} µs here + {:.2} µs in Redis",
            self.own * 1e6 / n,
            self.redis * 1e6 / n
        )
    }
}

/// Runs one round, adding its events and CPU to `spent`.
async fn metered(
    cpu: &mut Cpu,
    spent: &mut Spent,
    next: &Arc<AtomicU64>,
    round: impl Future<Output = anyhow::Result<f64>>,
) -> anyhow::Result<f64> {
    let (own, redis) = cpu.now().await?;
    let first = next.load(Ordering::Relaxed);
    let rate = round.await?;
    let (own_after, redis_after) = cpu.now().await?;
    spent.events += next.load(Ordering::Relaxed) - first;
    spent.own += own_after - own;
    spent.redis += redis_after - redis;
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Items/s of `FLUSH_ITEMS` raw conditional UpdateItems of the flush's shape
/// at the flush's concurrency.
async fn raw_updates(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    sequence: u64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..FLUSH_ITEMS)
        .map(|i| {
            let client = client.clone();
            async move {
                client
                    .update_item()
                    .table_name(table)
                    .key("pk", AttributeValue::S(format!("content-{i}")))
                    .update_expression("SET #s = :s ADD #v :one, #a0 :a0, #a1 :a1")
                    .condition_expression("attribute_not_exists(#s) OR #s < :s")
                    .expression_attribute_names("#s", "tidemark_flush_seq")
                    .expression_attribute_names("#v", "tidemark_version")
                    .expression_attribute_names("#a0", "views")
                    .expression_attribute_names("#a1", "likes")
                    .expression_attribute_values(":s", AttributeValue::N(sequence.to_string()))
                    .expression_attribute_values(":one", AttributeValue::N("1".into()))
                    .expression_attribute_values(":a0", AttributeValue::N("3".into()))
                    .expression_attribute_values(":a1", AttributeValue::N("1".into()))
                    .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                    .send()
                    .await
            }
        })
        .buffer_unordered(FLUSH_CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r.context("raw UpdateItem")?;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(FLUSH_ITEMS as f64 / started.elapsed().as_secs_f64())
}

/// Items/s of one Flush of `FLUSH_ITEMS` entities buffered beforehand.
async fn flush_round(agg: &Aggregator, buffer: &EventLogBuffer, round: u64) -> anyhow::Result<f64> {
    let events: Vec<BufferEvent> = (0..FLUSH_ITEMS)
        .flat_map(|i| {
            ["views", "likes"]
                .into_iter()
                .map(move |metric| BufferEvent {
                    id: format!("flush-{round}-{i}-{metric}"),
                    op: BufferOp::Increment {
                        entity: format!("content-{i}"),
                        metric: metric.to_owned(),
                        delta: 2,
                    },
                    time_micros: 1,
                })
        })
        .collect();
    buffer.apply_events(&events, DEDUP_WINDOW).await?;
    let started = Instant::now();
    let response = agg.clients[0]
        .clone()
        .flush(pb::FlushRequest {})
        .await?
        .into_inner();
    let elapsed = started.elapsed();
    anyhow::ensure!(
        u64::try_from(response.items_written)? == FLUSH_ITEMS,
        "flush wrote {response:?}"
    );
    #[allow(clippy::cast_precision_loss)]
    Ok(FLUSH_ITEMS as f64 / elapsed.as_secs_f64())
}

#[async_trait::async_trait]
impl Benchmark for StatsAggregatorBench {
    fn name(&self) -> &'static str {
        "stats-aggregator"
    }

    fn description(&self) -> &'static str {
        "Ingest events/s over client-streaming `Ingest` (4 streams, 5,000 events a message over 1,000 entities × 3 metrics, every id fresh, dedup on, Redis buffer) next to the same buffer's `apply_events` called directly at the same batch size and concurrency, and next to the previous design's script called directly; flush items/s (one Flush of 400 buffered entities, 16 writes in flight, no Kafka) next to raw conditional `UpdateItem`s of the same shape at the same concurrency on the same DynamoDB endpoint, measured in the same run."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let url = local_env("TIDEMARK_TEST_REDIS_URL");
        let name = unique_name("bench-stats");
        let prefix = RedisBuffer::prefix_for(&name);
        let buffer = Arc::new(EventLogBuffer::connect(&url, prefix.clone()).await?);
        // The previous design (ids checked and remembered one by one in
        // window-long Redis sets by the script), under a prefix of its own.
        let old_name = unique_name("bench-stats-sets");
        let old = Arc::new(RedisBuffer::connect(&url, RedisBuffer::prefix_for(&old_name)).await?);
        let (dynamo, _) = dynamodb_clients().await;
        let table = unique_name("bench-stats");
        DynamoTable::create(dynamo.clone(), &table, &KeySchema::new("pk", None), false).await?;
        let agg = serve(Arc::clone(&buffer), &table).await?;
        let next = Arc::new(AtomicU64::new(0));
        let round = ctx.time(ROUND);

        // Warm every path (connections, script cache, allocator).
        raw_round(&buffer, round / 4, &next).await?;
        raw_round(&old, round / 4, &next).await?;
        ingest_round(&agg, round / 4, &next).await?;
        let mut cpu = Cpu {
            conn: redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        };
        let (mut raw, mut system, mut previous) = (Vec::new(), Vec::new(), Vec::new());
        let (mut raw_cpu, mut system_cpu, mut previous_cpu) =
            (Spent::default(), Spent::default(), Spent::default());
        for side in interleaved(ROUNDS) {
            match side {
                Side::Baseline => raw.push(
                    metered(
                        &mut cpu,
                        &mut raw_cpu,
                        &next,
                        raw_round(&buffer, round, &next),
                    )
                    .await?,
                ),
                Side::System => {
                    system.push(
                        metered(
                            &mut cpu,
                            &mut system_cpu,
                            &next,
                            ingest_round(&agg, round, &next),
                        )
                        .await?,
                    );
                    previous.push(
                        metered(
                            &mut cpu,
                            &mut previous_cpu,
                            &next,
                            raw_round(&old, round, &next),
                        )
                        .await?,
                    );
                }
            }
        }
        let ingested = next.load(Ordering::Relaxed);
        // Empty the buffer so the flush rounds measure only their own items.
        let stats = buffer.stats().await?;
        let sequence = stats.last_acked.unwrap_or(0) + 1;
        buffer.take_for_flush(sequence).await?;
        buffer.ack_flush(sequence).await?;

        let (mut raw_flush, mut flush) = (Vec::new(), Vec::new());
        let raw_table = unique_name("bench-stats-raw");
        DynamoTable::create(
            dynamo.clone(),
            &raw_table,
            &KeySchema::new("pk", None),
            false,
        )
        .await?;
        for (i, side) in interleaved(FLUSH_ROUNDS).into_iter().enumerate() {
            let i = u64::try_from(i)?;
            match side {
                Side::Baseline => raw_flush.push(raw_updates(&dynamo, &raw_table, i + 1).await?),
                Side::System => flush.push(flush_round(&agg, &buffer, i).await?),
            }
        }
        drop(agg);
        cleanup(&prefix).await?;
        cleanup(old.prefix()).await?;
        for t in [&table, &raw_table] {
            let _ = dynamo.delete_table().table_name(t).send().await;
        }

        Ok(report(
            Rounds {
                raw,
                system,
                previous,
            },
            &Spent3 {
                raw: raw_cpu,
                system: system_cpu,
                previous: previous_cpu,
            },
            (raw_flush, flush),
            round,
            ingested,
        ))
    }
}

/// The per-round figures of one run.
struct Rounds {
    raw: Vec<f64>,
    system: Vec<f64>,
    previous: Vec<f64>,
}

/// Where the CPU went, per side.
struct Spent3 {
    raw: Spent,
    system: Spent,
    previous: Spent,
}

/// The rows and notes of a run.
fn report(
    rounds: Rounds,
    cpu: &Spent3,
    (raw_flush, flush): (Vec<f64>, Vec<f64>),
    round: Duration,
    ingested: u64,
) -> Report {
    let Rounds {
        raw,
        system,
        previous,
    } = rounds;
    let (raw_cpu, system_cpu, previous_cpu) = (&cpu.raw, &cpu.system, &cpu.previous);
    let (raw, system, previous) = (median(raw), median(system), median(previous));
    let (raw_flush, flush) = (median(raw_flush), median(flush));
    Report {
        rows: vec![
            Row::new("ingest, client streaming, dedup on", "events/s", system, raw)
                .with_target(Target::SystemAtLeast(INGEST_TARGET)),
            Row::new(
                "ingest ÷ the previous design's script straight to Redis",
                "events/s",
                system,
                previous,
            ),
            Row::new("flush ÷ raw UpdateItem, 16 in flight", "items/s", flush, raw_flush),
        ],
        notes: vec![
            format!(
                "ingest: medians of {ROUNDS} interleaved rounds of {} s; {} events in all. The baseline of the first row is the aggregator's own buffer called directly: the same dedup (ids looked up in the process's mirror of the Redis id log), the same folding per entity field and the same one script per batch (HINCRBY per entity field, SADD + ZADD GT of the batch's entities, RPUSH of the packed ids, conditional on the log's position); what it leaves out is gRPC, protobuf decoding and validation, so the ratio is what they cost",
                round.as_secs_f64(),
                fmt_num(f64::from(u32::try_from(ingested).unwrap_or(u32::MAX)))
            ),
            "the second row's baseline is the design this one replaced, called directly in the same rounds: its script looks every id up (SMISMEMBER over the window's sets) and remembers it (SADD) in Redis".to_owned(),
            format!(
                "where the CPU goes, per event (this process's getrusage and Redis's `INFO cpu` around each round ÷ its events; Redis's figure counts any other client of that Redis too): gRPC ingest {}; the buffer called directly {}; the previous design's script called directly {}",
                system_cpu.per_event(),
                raw_cpu.per_event(),
                previous_cpu.per_event()
            ),
            "client, aggregator and Redis share the machine's 2 cores: the event generator of the client is part of both sides".to_owned(),
            format!(
                "flush: medians of {FLUSH_ROUNDS} rounds of {FLUSH_ITEMS} items; the local DynamoDB endpoint is an emulator bound to one core, so both sides measure mostly the emulator"
            ),
        ],
    }
}
