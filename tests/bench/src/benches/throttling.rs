//! `throttling`: the attribute backfill and the stats flush against a table
//! that throttles writes beyond its capacity (a proxy answering
//! `ProvisionedThroughputExceededException` as a provisioned DynamoDB table
//! does), each set 20% below the write rate the work is configured to.
//! Figures: items/s throttled ÷ items/s unthrottled, at the same configured
//! limit, with every item written exactly once and the throttles the work
//! reported against those the proxy counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stats_aggregator::engine::Settings;
use stats_aggregator::{DynamoStatsStore, Engine, StatsStore as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::unique_name;
use tidemark_connectors::{Buffer as _, BufferEvent, BufferOp, KeySchema};

use super::replicator::{
    BackfillRequest, Plane, RUN_WITHIN, client_at, plane, run_backfill, seed_table, table_ref,
};
use crate::dynalite::Dynalite;
use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};
use crate::throttle::ThrottleProxy;

/// #16.3: throughput under 20% throttling over the unthrottled rate.
const AT_LEAST: f64 = 0.7;
/// The table's capacity over the rate the work runs at unthrottled: 20% of
/// the writes sent at that rate are throttled.
const CAPACITY_SHARE: f64 = 0.8;
/// The backfill's configured limit (writes/s over the job), and segments
/// as many as a replicator works on at once, so the limit is the rate.
const BACKFILL_RATE: u32 = 400;
const BACKFILL_SEGMENTS: u32 = 4;
/// The flush's configured limit (`flush_write_units_per_second`), below
/// what the local dynalite takes unthrottled (about 2,000 writes/s), so
/// the limit is the rate.
const FLUSH_RATE: u32 = 1_000;

pub struct Throttling;

#[async_trait::async_trait]
impl Benchmark for Throttling {
    fn name(&self) -> &'static str {
        "throttling"
    }

    fn description(&self) -> &'static str {
        "The attribute backfill (configured to 400 writes/s) and a stats flush (1,000 writes/s) against a DynamoDB table whose capacity is 20% below those rates (a proxy answering ProvisionedThroughputExceededException beyond it, on a dynalite the bench starts): items/s throttled ÷ items/s unthrottled at the same configured limit; every item written once; throttles reported by the work against those the proxy answered."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let dynalite = Dynalite::start().await?;
        let proxy = ThrottleProxy::start(&dynalite.endpoint()).await?;
        let mut report = Report::default();

        // The backfill: one table, two attributes, the same configured rate.
        let items = if ctx.quick { 400 } else { 4_000 };
        let table = seed_table(&dynalite.endpoint(), items).await?;
        let mut plane = plane(&proxy.endpoint()).await?;
        proxy.set_capacity(None);
        let free = backfill(&mut plane, &table, "free", items).await?;
        proxy.take_counts();
        proxy.set_capacity(Some(f64::from(BACKFILL_RATE) * CAPACITY_SHARE));
        let held = backfill(&mut plane, &table, "held", items).await?;
        let (passed, throttled) = proxy.take_counts();
        anyhow::ensure!(
            held.throttled == throttled,
            "the backfill reported {} throttles, the table answered {throttled}",
            held.throttled
        );
        eprintln!(
            "backfill: {} items/s unthrottled, {} throttled ({throttled} of {} writes throttled, {} write units reported)",
            fmt_num(free.rate),
            fmt_num(held.rate),
            passed + throttled,
            held.write_units
        );
        report.rows.push(
            Row::new(
                "attribute backfill, table capacity 20% below its rate ÷ unthrottled",
                "items/s",
                held.rate,
                free.rate,
            )
            .with_target(Target::RatioAtLeast(AT_LEAST)),
        );
        report.notes.push(format!(
            "backfill: {items} items, {BACKFILL_SEGMENTS} segments configured to {BACKFILL_RATE} writes/s in all, the table's capacity then {} writes/s; throttled run: {throttled} of {} write attempts throttled, {} reported by the run's counters, {} write units consumed reported (DynamoDB's ReturnConsumedCapacity), every item updated once",
            fmt_num(f64::from(BACKFILL_RATE) * CAPACITY_SHARE),
            passed + throttled,
            held.throttled,
            held.write_units
        ));
        drop(plane);

        // The flush: its rate unthrottled first, then the table at 80% of it.
        let entities = if ctx.quick { 300 } else { 3_000 };
        let stats = unique_name("bench-throttled-stats");
        DynamoTable::create(
            client_at(&dynalite.endpoint()).await,
            &stats,
            &KeySchema::new("pk", None),
            false,
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let buffer = Arc::new(EmbeddedStore::open(&dir.path().join("buffer.db"))?.buffer("stats"));
        let store = Arc::new(
            DynamoStatsStore::open(client_at(&proxy.endpoint()).await, &stats, "pk").await?,
        );
        let engine = Engine::new(
            buffer.clone(),
            store.clone(),
            None,
            Settings {
                flush_write_rate: f64::from(FLUSH_RATE),
                ..Settings::new("pk")
            },
            None,
        );
        proxy.set_capacity(None);
        let unthrottled = flush(&engine, &buffer, "free", entities).await?;
        proxy.take_counts();
        proxy.set_capacity(Some(f64::from(FLUSH_RATE) * CAPACITY_SHARE));
        let throttled_flush = flush(&engine, &buffer, "held", entities).await?;
        let (passed, throttled) = proxy.take_counts();
        let reported = throttled_flush.1.throttled;
        anyhow::ensure!(
            reported == throttled,
            "the flush reported {reported} throttles, the table answered {throttled}"
        );
        for round in ["free", "held"] {
            for i in (0..entities).step_by(97) {
                let item = store
                    .get(&entity(round, i))
                    .await?
                    .with_context(|| format!("{} missing", entity(round, i)))?;
                let views = item.metrics("pk").get("views").cloned();
                anyhow::ensure!(
                    views.as_deref() == Some("3"),
                    "{} has views {views:?}, not 3",
                    entity(round, i)
                );
            }
        }
        eprintln!(
            "flush: {} items/s unthrottled, {} throttled ({throttled} of {} writes throttled)",
            fmt_num(unthrottled.0),
            fmt_num(throttled_flush.0),
            passed + throttled
        );
        report.rows.push(
            Row::new(
                "stats flush, table capacity 20% below its rate ÷ unthrottled",
                "items/s",
                throttled_flush.0,
                unthrottled.0,
            )
            .with_target(Target::RatioAtLeast(AT_LEAST)),
        );
        report.notes.push(format!(
            "flush: {entities} entities a flush, 16 writes in flight, configured to {FLUSH_RATE} writes/s, the table's capacity then {} writes/s; {throttled} of {} write attempts throttled, {reported} reported by the flush, {:.0} write units consumed reported; every entity checked holds its 3 views once",
            fmt_num(f64::from(FLUSH_RATE) * CAPACITY_SHARE),
            passed + throttled,
            throttled_flush.1.write_units_consumed
        ));
        report.notes.push(
            "the proxy throttles as a provisioned table does: a token bucket refilled at the capacity with 0.2 s of burst, a write finding no token answered 400 ProvisionedThroughputExceededException without reaching dynalite; reads pass"
                .to_owned(),
        );
        Ok(report)
    }
}

struct Backfilled {
    rate: f64,
    throttled: u64,
    write_units: i64,
}

async fn backfill(
    plane: &mut Plane,
    table: &str,
    attribute: &str,
    items: usize,
) -> anyhow::Result<Backfilled> {
    let request = BackfillRequest {
        table: table_ref(table),
        attribute,
        segments: BACKFILL_SEGMENTS,
        rate: BACKFILL_RATE,
        in_flight: 0,
        within: RUN_WITHIN,
    };
    let (run, rate) = run_backfill(&mut plane.replicator, &mut plane.jobs, &request, items).await?;
    let counter = |name: &str| run.counters.get(name).copied().unwrap_or_default();
    Ok(Backfilled {
        rate,
        throttled: u64::try_from(counter("throttled"))?,
        write_units: counter("write_units_consumed"),
    })
}

fn entity(round: &str, i: usize) -> String {
    format!("throttled-{round}-{i}")
}

/// Buffers 3 views on each of `entities` entities and flushes them:
/// entities/s and the flush's report.
async fn flush(
    engine: &Engine,
    buffer: &Arc<tidemark_connectors::sqlite::EmbeddedBuffer>,
    round: &str,
    entities: usize,
) -> anyhow::Result<(f64, stats_aggregator::engine::FlushReport)> {
    let events: Vec<BufferEvent> = (0..entities)
        .flat_map(|i| {
            (0..3).map(move |n| BufferEvent {
                id: format!("{round}-{i}-{n}"),
                op: BufferOp::Increment {
                    entity: entity(round, i),
                    metric: "views".to_owned(),
                    delta: 1,
                },
                time_micros: 1,
            })
        })
        .collect();
    buffer
        .apply_events(&events, Duration::from_secs(3600))
        .await?;
    let started = Instant::now();
    let report = engine.flush().await?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        usize::try_from(report.items_written)? == entities,
        "the flush wrote {} of {entities} entities",
        report.items_written
    );
    Ok((entities as f64 / took, report))
}
