//! Replication into Elasticsearch ÷ raw `_bulk` of the same lines.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt as _;
use tidemark_connectors::elasticsearch::{ElasticsearchSink, bulk_lines};
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::{AttrValue, Item, KeySchema, SinkOp, SinkRecord, SourceTable};
use tidemark_proto::common::v1 as common;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::transport::Channel;

use super::lag::{Lag, lag_at};
use super::{SINK_BATCH, SINK_CONCURRENCY, median, plane};
use crate::framework::{Context, Side, interleaved};

/// One document of the replication source.
pub(super) fn doc(id: &str, i: usize) -> Item {
    [
        ("id".to_owned(), AttrValue::s(id)),
        (
            "title".to_owned(),
            AttrValue::s(format!("document number {i}")),
        ),
        (
            "views".to_owned(),
            AttrValue::n(u64::try_from(i).unwrap_or(0)),
        ),
    ]
    .into_iter()
    .collect()
}

pub(super) struct Replication {
    pub(super) docs: usize,
    /// Docs/s per round, in the order run.
    pub(super) pipeline: Vec<f64>,
    pub(super) raw: Vec<f64>,
    /// At half and at a quarter of the sustained rate.
    pub(super) lag: Option<(Lag, Lag)>,
}

/// Docs/s of a new pipeline over the whole change log: from CreatePipeline
/// until Drain reports it caught up.
async fn run_pipeline(
    replicator: &mut ReplicatorServiceClient<Channel>,
    name: &str,
    index: &str,
    docs: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.to_owned(),
            spec: Some(pipeline_spec(index, pb::StartPosition::TrimHorizon)),
            actor: "bench".to_owned(),
            ..Default::default()
        })
        .await?;
    drain(replicator, name).await?;
    #[allow(clippy::cast_precision_loss)]
    Ok(docs as f64 / started.elapsed().as_secs_f64())
}

fn pipeline_spec(index: &str, start: pb::StartPosition) -> pb::PipelineSpec {
    pb::PipelineSpec {
        source: Some(common::DataStore {
            store: Some(common::data_store::Store::SqliteTable(
                common::SqliteTableRef {
                    table_name: "bench_docs".to_owned(),
                    database: String::new(),
                    key_attribute_names: vec!["id".to_owned()],
                },
            )),
        }),
        feed: Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::EmbeddedChangeLog(
                pb::EmbeddedChangeLogFeed {
                    start_position: start as i32,
                },
            )),
        }),
        sinks: vec![pb::Sink {
            name: "search".to_owned(),
            store: Some(common::DataStore {
                store: Some(common::data_store::Store::ElasticsearchIndex(
                    common::ElasticsearchIndexRef {
                        index: index.to_owned(),
                        endpoint: String::new(),
                    },
                )),
            }),
            ..Default::default()
        }],
        backfill: Some(pb::BackfillOptions {
            mode: pb::BackfillMode::None as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Raw `_bulk` of the documents the pipeline will send: the sink's own
/// lines (external versions = the change log's sequence numbers, as the
/// feed gives them), `SINK_BATCH` per request, `SINK_CONCURRENCY` in
/// flight, into `index` created by the sink's own code (same mapping).
/// Returns docs/s, index creation included (the pipeline creates its index
/// too).
async fn raw_bulk(
    es: &str,
    index: &str,
    items: &Arc<Vec<Item>>,
    first_seq: u64,
) -> anyhow::Result<f64> {
    let schema = KeySchema::new("id", None);
    let http = reqwest::Client::new();
    let url = format!("{es}/_bulk");
    let started = Instant::now();
    ElasticsearchSink::connect(es, index, schema.clone()).await?;
    let chunks = items.len().div_ceil(SINK_BATCH);
    // Each request's body is built when a slot frees, as the sink does.
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..chunks)
        .map(|n| {
            let (items, schema, http) = (Arc::clone(items), schema.clone(), http.clone());
            let (url, index) = (url.clone(), index.to_owned());
            async move {
                let mut body = Vec::new();
                let first = n * SINK_BATCH;
                for (i, item) in items.iter().enumerate().skip(first).take(SINK_BATCH) {
                    let record = SinkRecord {
                        key: schema.key_of(item).map_err(anyhow::Error::msg)?,
                        version: first_seq + i as u64,
                        op: SinkOp::Upsert(item.clone()),
                    };
                    bulk_lines(&index, &schema, &record, &mut body).map_err(anyhow::Error::msg)?;
                }
                let response = http
                    .post(url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(response.status().is_success(), "raw _bulk failed");
                let text = response.bytes().await?;
                anyhow::ensure!(
                    !text.windows(13).any(|w| w == b"\"errors\":true"),
                    "raw _bulk refused items"
                );
                Ok(())
            }
        })
        .buffer_unordered(SINK_CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r?;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(items.len() as f64 / started.elapsed().as_secs_f64())
}

async fn delete_index(es: &str, index: &str) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .delete(format!("{es}/{index}"))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "cannot delete index {index}: {}",
        response.status()
    );
    Ok(())
}

/// Docs/s of raw `_bulk` and of a pipeline over the same documents into the
/// same index, then the pipeline's end-to-end lag at half its rate.
pub(super) async fn replication(ctx: &Context, docs: usize) -> anyhow::Result<Replication> {
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let plane = plane(&local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")).await?;
    // The replicator's embedded tables live in <plane data>/data; write the
    // source there through the same database file.
    let data = plane._dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let store = EmbeddedStore::open(&data.join("default.db"))?;
    let schema = KeySchema::new("id", None);
    let source = Arc::new(store.table("bench_docs", schema.clone()));
    let items: Arc<Vec<Item>> =
        Arc::new((0..docs).map(|i| doc(&format!("doc-{i:07}"), i)).collect());
    for item in items.iter() {
        source.put(item, None).await?;
    }
    // ABBA rounds, each into a fresh index with the sink's mapping (created
    // inside the timed part on both sides); each pipeline reads the whole
    // change log from its trim horizon. The change log numbers this fresh
    // database's changes from 1: the raw side uses those as versions.
    let mut replicator = plane.replicator.clone();
    let mut raw = Vec::new();
    let mut pipeline = Vec::new();
    let mut live: Option<(String, String)> = None;
    for side in interleaved(2) {
        let index = unique_name("bench-replication");
        match side {
            Side::Baseline => {
                raw.push(raw_bulk(&es, &index, &items, 1).await?);
                delete_index(&es, &index).await?;
            }
            Side::System => {
                if let Some((name, index)) = live.take() {
                    // One pipeline at a time: the earlier one stops and its
                    // index goes.
                    replicator
                        .pause_pipeline(pb::PausePipelineRequest {
                            name,
                            actor: "bench".to_owned(),
                            reason: "next round".to_owned(),
                        })
                        .await?;
                    delete_index(&es, &index).await?;
                }
                let name = unique_name("bench");
                pipeline.push(run_pipeline(&mut replicator, &name, &index, docs).await?);
                live = Some((name, index));
            }
        }
    }
    let (name, index) = live.context("no pipeline round")?;
    replicator
        .pause_pipeline(pb::PausePipelineRequest {
            name,
            actor: "bench".to_owned(),
            reason: "rounds done".to_owned(),
        })
        .await?;
    delete_index(&es, &index).await?;
    let sustained = median(&pipeline);
    let lag = if ctx.quick && docs < 1000 {
        None
    } else {
        // A pipeline of its own from the change log's end, into a fresh
        // index like each round's.
        let index = unique_name("bench-lag");
        let name = unique_name("bench-lag");
        replicator
            .create_pipeline(pb::CreatePipelineRequest {
                name: name.clone(),
                spec: Some(pipeline_spec(&index, pb::StartPosition::Latest)),
                actor: "bench".to_owned(),
                ..Default::default()
            })
            .await?;
        drain(&mut replicator, &name).await?;
        let half = lag_at(ctx, &es, &index, &source, sustained / 2.0, "half").await?;
        // Start the second from a drained pipeline.
        drain(&mut replicator, &name).await?;
        let quarter = lag_at(ctx, &es, &index, &source, sustained / 4.0, "quarter").await?;
        delete_index(&es, &index).await?;
        Some((half, quarter))
    };
    drop(plane);
    Ok(Replication {
        docs,
        pipeline,
        raw,
        lag,
    })
}

/// A pipeline `name` copying `source` into `sink`: an embedded change-log
/// feed from its latest change, a tombstone backfill in `segments`
/// segments, from CreatePipeline until it is STREAMING and drained. How long
/// that took. `writes_in_flight`: the sink's (0: the replicator's default).
pub(crate) async fn copy_pipeline(
    replicator: &mut ReplicatorServiceClient<Channel>,
    name: &str,
    source: common::DataStore,
    sink: common::DataStore,
    segments: u32,
    writes_in_flight: u32,
) -> anyhow::Result<std::time::Duration> {
    let feed = pb::change_feed::Feed::EmbeddedChangeLog(pb::EmbeddedChangeLogFeed {
        start_position: pb::StartPosition::Latest as i32,
    });
    copy_pipeline_fed(
        replicator,
        name,
        source,
        feed,
        sink,
        segments,
        writes_in_flight,
    )
    .await
}

/// [`copy_pipeline`] with the source's changes read from `feed`.
pub(crate) async fn copy_pipeline_fed(
    replicator: &mut ReplicatorServiceClient<Channel>,
    name: &str,
    source: common::DataStore,
    feed: pb::change_feed::Feed,
    sink: common::DataStore,
    segments: u32,
    writes_in_flight: u32,
) -> anyhow::Result<std::time::Duration> {
    let started = Instant::now();
    replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.to_owned(),
            spec: Some(pb::PipelineSpec {
                source: Some(source),
                feed: Some(pb::ChangeFeed { feed: Some(feed) }),
                sinks: vec![pb::Sink {
                    name: "copy".to_owned(),
                    store: Some(sink),
                    writes_in_flight,
                    ..Default::default()
                }],
                backfill: Some(pb::BackfillOptions {
                    mode: pb::BackfillMode::Tombstones as i32,
                    segments,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            actor: "bench".to_owned(),
            ..Default::default()
        })
        .await?;
    // Drain answers only once the backfill is done (STREAMING).
    loop {
        let pipeline = replicator
            .get_pipeline(pb::GetPipelineRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner()
            .pipeline
            .context("no pipeline")?;
        anyhow::ensure!(
            pipeline.state != pb::PipelineState::Failed as i32,
            "the pipeline failed: {}",
            pipeline.state_reason
        );
        if pipeline.state == pb::PipelineState::Streaming as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drain(replicator, name).await?;
    Ok(started.elapsed())
}

pub(crate) async fn drain(
    replicator: &mut ReplicatorServiceClient<Channel>,
    name: &str,
) -> anyhow::Result<()> {
    let drained = replicator
        .drain(pb::DrainRequest {
            name: name.to_owned(),
            timeout: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        drained.lag.is_some_and(|l| l.caught_up),
        "pipeline {name} did not catch up"
    );
    Ok(())
}
