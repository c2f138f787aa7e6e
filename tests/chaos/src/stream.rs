//! Problem 2 under faults: a DynamoDB table's stream replicated into
//! Elasticsearch by two replicator replicas sharing the pipeline's units
//! through the job-tracker, while any of them (and the job-tracker) is
//! killed. The writer upserts and deletes keys straight in the table and
//! remembers each key's last image; at the end, after a drain, every
//! document must be that image and no deleted key may be back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rand::{Rng as _, SeedableRng as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, Sink as _, SourceTable as _};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::plane::through_restarts;

const KEYS: u32 = 300;
const SEEDED: u32 = 200;

pub fn schema() -> KeySchema {
    KeySchema::new("pk", None)
}

fn key(i: u32) -> Key {
    Key::single("pk", AttrValue::s(format!("k{i:04}")))
}

fn row(i: u32, v: i64) -> Item {
    let mut item = key(i).0;
    item.insert("v".to_owned(), AttrValue::n(v));
    item
}

/// Each key's last image as the writer left it (`None`: deleted).
#[derive(Default)]
pub struct Ledger {
    pub last: BTreeMap<u32, Option<i64>>,
    pub writes: u64,
}

/// Seeds the table (the pipeline's backfill copies these).
pub async fn seed(table: &DynamoTable) -> anyhow::Result<Ledger> {
    let mut ledger = Ledger::default();
    for i in 0..SEEDED {
        table
            .put(&row(i, 0), None)
            .await
            .context("seed the table")?;
        ledger.last.insert(i, Some(0));
    }
    Ok(ledger)
}

/// Creates the pipeline through whichever replica answers.
pub async fn create(url: String, name: &str, table: &str, index: &str) -> anyhow::Result<()> {
    let client = ReplicatorServiceClient::new(Channel::from_shared(url)?.connect_lazy());
    let request = pb::CreatePipelineRequest {
        name: name.to_owned(),
        spec: Some(pb::PipelineSpec {
            source: Some(common_pb::DataStore {
                store: Some(common_pb::data_store::Store::DynamodbTable(
                    common_pb::DynamoDbTableRef {
                        table_name: table.to_owned(),
                        ..Default::default()
                    },
                )),
            }),
            feed: Some(pb::ChangeFeed {
                feed: Some(pb::change_feed::Feed::DynamodbStreams(
                    pb::DynamoDbStreamsFeed::default(),
                )),
            }),
            sinks: vec![pb::Sink {
                name: "search".to_owned(),
                store: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::ElasticsearchIndex(
                        common_pb::ElasticsearchIndexRef {
                            index: index.to_owned(),
                            endpoint: String::new(),
                        },
                    )),
                }),
                ..Default::default()
            }],
            backfill: Some(pb::BackfillOptions {
                segments: 2,
                chunk_size: 25,
                ..Default::default()
            }),
            ..Default::default()
        }),
        actor: "chaos".to_owned(),
        validate_only: false,
    };
    through_restarts("CreatePipeline", Duration::from_secs(60), || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.create_pipeline(r).await }
    })
    .await?;
    Ok(())
}

/// Upserts (4 in 5) and deletes random keys until `stop`.
pub async fn write(
    table: DynamoTable,
    mut ledger: Ledger,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<Ledger> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut version = 0i64;
    while !stop.is_cancelled() {
        let i = rng.random_range(0..KEYS);
        version += 1;
        if rng.random_range(0..5) == 0 {
            table.delete(&key(i), None).await.context("delete")?;
            ledger.last.insert(i, None);
        } else {
            table.put(&row(i, version), None).await.context("put")?;
            ledger.last.insert(i, Some(version));
        }
        ledger.writes += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(ledger)
}

/// What the index holds against the ledger after a drain.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A key the table has whose document is missing or older.
    pub lost: u64,
    /// A deleted key whose document is back (or never went).
    pub resurrected: u64,
    pub drain: Duration,
}

pub async fn check(
    url: String,
    name: &str,
    index: &str,
    ledger: &Ledger,
) -> anyhow::Result<Outcome> {
    let client = ReplicatorServiceClient::new(Channel::from_shared(url)?.connect_lazy());
    let request = pb::DrainRequest {
        name: name.to_owned(),
        timeout: Some(prost_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
    };
    let started = std::time::Instant::now();
    through_restarts("Drain", Duration::from_secs(180), || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.drain(r).await }
    })
    .await?;
    let drain = started.elapsed();
    let reader = ElasticsearchSink::connect(
        &tidemark_connectors::testing::local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        index,
        schema(),
    )
    .await
    .context("connect to the index")?;
    let mut outcome = Outcome {
        drain,
        ..Outcome::default()
    };
    for (i, last) in &ledger.last {
        let got = reader
            .read(&key(*i))
            .await
            .context("read a document")?
            .and_then(|(_, item)| {
                item.get("v")
                    .and_then(AttrValue::as_number)
                    .and_then(tidemark_connectors::Number::as_i64)
            });
        match (last, got) {
            (Some(want), Some(have)) if *want == have => {}
            (Some(_), _) => outcome.lost += 1,
            (None, Some(_)) => outcome.resurrected += 1,
            (None, None) => {}
        }
    }
    Ok(outcome)
}
