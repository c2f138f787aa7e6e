//! Problem 1 under faults: counter events ingested through the
//! stats-aggregator (Redis buffer, periodic flush to DynamoDB) while it is
//! killed; the writer retries each batch under the same event ids until it
//! is acknowledged, and keeps the exact sums it sent. At the end every
//! counter in DynamoDB must equal its sum: 0 lost, 0 counted twice.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rand::{Rng as _, SeedableRng as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::{AttrValue, Key, KeySchema, SourceTable as _};
use tidemark_proto::stats_aggregator::v1 as pb;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::plane::through_restarts;

pub const METRIC: &str = "views";
const ENTITIES: usize = 20;
const BATCH: usize = 50;

/// What the writer sent and had acknowledged.
#[derive(Default)]
pub struct Ledger {
    pub sums: BTreeMap<String, i64>,
    pub events: u64,
    pub batches: u64,
}

/// Runs until `stop`, then returns the ledger.
pub async fn write(
    url: String,
    run: String,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<Ledger> {
    let client = StatsAggregatorServiceClient::new(Channel::from_shared(url)?.connect_lazy());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ledger = Ledger::default();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let events: Vec<pb::Event> = (0..BATCH)
            .map(|_| {
                n += 1;
                pb::Event {
                    event_id: format!("{run}-{n}"),
                    entity_key: format!("{run}-e{}", rng.random_range(0..ENTITIES)),
                    metric: METRIC.to_owned(),
                    op: Some(pb::event::Op::Increment(pb::Increment {
                        delta: rng.random_range(1..10),
                    })),
                    event_time: None,
                }
            })
            .collect();
        let request = pb::IngestBatchRequest {
            events: events.clone(),
        };
        // The same event ids on every attempt: an attempt applied before a
        // kill is answered as duplicates by the next one.
        let answer = through_restarts("IngestBatch", Duration::from_secs(60), || {
            let mut c = client.clone();
            let r = request.clone();
            async move { c.ingest_batch(r).await }
        })
        .await?;
        if answer.rejected_count != 0
            || answer.accepted_count + answer.duplicate_count != i64::try_from(BATCH)?
        {
            bail!("IngestBatch answered {answer:?} for {BATCH} valid events");
        }
        for e in &events {
            if let Some(pb::event::Op::Increment(i)) = &e.op {
                *ledger.sums.entry(e.entity_key.clone()).or_default() += i.delta;
            }
        }
        ledger.events += u64::try_from(BATCH)?;
        ledger.batches += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(ledger)
}

/// Counters whose stored value differs from the ledger: (lost, doubled)
/// as the total amount missing and the total amount counted twice.
pub async fn check(
    url: String,
    table: &DynamoTable,
    ledger: &Ledger,
) -> anyhow::Result<(i64, i64)> {
    let client = StatsAggregatorServiceClient::new(Channel::from_shared(url)?.connect_lazy());
    through_restarts("Flush", Duration::from_secs(120), || {
        let mut c = client.clone();
        let r = pb::FlushRequest {};
        async move { c.flush(r).await }
    })
    .await?;
    compare(table, &ledger.sums).await
}

/// The counters of `table` against `sums`: (lost, doubled) as the total
/// amount missing and the total amount counted twice.
pub async fn compare(
    table: &DynamoTable,
    sums: &BTreeMap<String, i64>,
) -> anyhow::Result<(i64, i64)> {
    let (mut lost, mut doubled) = (0, 0);
    for (entity, sum) in sums {
        let key = Key::single("pk", AttrValue::s(entity));
        let item = table.get(&key).await.context("read a counter")?;
        let stored = item
            .as_ref()
            .and_then(|i| i.get(METRIC))
            .and_then(AttrValue::as_number)
            .and_then(tidemark_connectors::Number::as_i64)
            .unwrap_or(0);
        if stored < *sum {
            lost += sum - stored;
        } else {
            doubled += stored - sum;
        }
    }
    Ok((lost, doubled))
}

pub fn schema() -> KeySchema {
    KeySchema::new("pk", None)
}
