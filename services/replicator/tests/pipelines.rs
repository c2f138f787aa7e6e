//! Pipelines against the real local DynamoDB (with Streams) and
//! Elasticsearch endpoints: a live backfill with concurrent inserts, updates
//! and deletes ends with the index equal to the table and no deleted item
//! back; a delete (a TTL expiry stands in) removes the document; a document
//! the index rejects lands in the dead-letter store; replaying the whole
//! stream changes nothing; pause stops writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::proto::key_to_proto;
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::transform::Template;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, ScanRequest, Sink, SourceTable};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::replicator::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt as _;

mod common;
use common::{Plane, counting_proxy_to_dynamodb, dynamo, plane, table_ref};
use tidemark_proto::job_tracker::v1 as jt;

fn schema() -> KeySchema {
    KeySchema::new("documentType", Some("documentId"))
}

fn key(t: &str, id: &str) -> Key {
    Key::new([
        ("documentType".to_owned(), AttrValue::s(t)),
        ("documentId".to_owned(), AttrValue::s(id)),
    ])
}

fn doc(t: &str, id: &str, n: AttrValue) -> Item {
    let mut item = key(t, id).0;
    item.insert("n".to_owned(), n);
    item.insert("title".to_owned(), AttrValue::s(format!("{t} {id}")));
    item
}

fn index_ref(index: &str) -> common_pb::DataStore {
    common_pb::DataStore {
        store: Some(common_pb::data_store::Store::ElasticsearchIndex(
            common_pb::ElasticsearchIndexRef {
                index: index.to_owned(),
                endpoint: String::new(),
            },
        )),
    }
}

fn spec(
    table: &str,
    index: &str,
    mode: pb::BackfillMode,
    start: pb::StartPosition,
) -> pb::PipelineSpec {
    pb::PipelineSpec {
        source: Some(table_ref(table)),
        feed: Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::DynamodbStreams(
                pb::DynamoDbStreamsFeed {
                    start_position: start as i32,
                    readers: 1,
                },
            )),
        }),
        sinks: vec![pb::Sink {
            name: "search".to_owned(),
            store: Some(index_ref(index)),
            ..Default::default()
        }],
        backfill: Some(pb::BackfillOptions {
            mode: mode as i32,
            segments: 3,
            chunk_size: 40,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn scan_all(table: &DynamoTable) -> BTreeMap<Key, Item> {
    let mut out = BTreeMap::new();
    let mut start_after = None;
    loop {
        let page = table
            .scan(&ScanRequest {
                start_after,
                consistent: true,
                ..ScanRequest::segment(0, 1)
            })
            .await
            .unwrap();
        for item in page.items {
            out.insert(schema().key_of(&item).unwrap(), item);
        }
        match page.last_key {
            Some(k) => start_after = Some(k),
            None => return out,
        }
    }
}

async fn drain(plane: &mut Plane, name: &str) -> pb::PipelineLag {
    plane
        .replicator
        .drain(pb::DrainRequest {
            name: name.to_owned(),
            timeout: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("drain {name}: {s:?}"))
        .into_inner()
        .lag
        .unwrap()
}

/// Creates pipeline `name`; it must be accepted.
async fn create(plane: &mut Plane, name: &str, spec: pb::PipelineSpec) {
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.to_owned(),
            spec: Some(spec),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("create pipeline {name}: {s:?}"));
}

async fn wait_streaming(plane: &mut Plane, name: &str) {
    let mut tries = 0;
    let p = loop {
        let p = plane
            .replicator
            .get_pipeline(pb::GetPipelineRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .pipeline
            .unwrap();
        if p.state == pb::PipelineState::Streaming as i32 {
            return;
        }
        assert_ne!(p.state, pb::PipelineState::Failed as i32, "{p:?}");
        tries += 1;
        if tries == 900 {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let units = plane
        .jobs
        .list_units(jt::ListUnitsRequest {
            run_id: p.run_id.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().units);
    panic!("pipeline {name} never finished its backfill: {p:?}\nunits: {units:#?}");
}

/// A reader of `index` on the local Elasticsearch.
async fn index_reader(index: &str) -> ElasticsearchSink {
    ElasticsearchSink::connect(
        &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        index,
        schema(),
    )
    .await
    .unwrap()
}

/// The embedded store of a plane started in `dir` (`plane_in`): the
/// database its pipelines' `sqlite:` sources name by default.
fn embedded_source(dir: &std::path::Path) -> tidemark_connectors::sqlite::EmbeddedStore {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    tidemark_connectors::sqlite::EmbeddedStore::open(&dir.join("data/default.db")).unwrap()
}

/// Every live document of the index: key → (version, item).
async fn index_contents(
    sink: &ElasticsearchSink,
    keys: impl Iterator<Item = Key>,
) -> BTreeMap<Key, (u64, Item)> {
    let mut out = BTreeMap::new();
    for k in keys {
        if let Some(v) = sink.read(&k).await.unwrap() {
            out.insert(k, v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_backfill_and_stream_into_elasticsearch_lose_nothing_and_resurrect_nothing() {
    let table_name = unique_name("docs");
    let table = Arc::new(
        DynamoTable::create(dynamo().await, &table_name, &schema(), true)
            .await
            .unwrap(),
    );
    // Seed before the pipeline exists: these come from the backfill.
    futures::future::try_join_all((0..90).map(|i| {
        let table = Arc::clone(&table);
        async move {
            table
                .put(
                    &doc(
                        if i % 2 == 0 { "post" } else { "page" },
                        &format!("d{i:03}"),
                        AttrValue::n(i64::from(i)),
                    ),
                    None,
                )
                .await
        }
    }))
    .await
    .unwrap();
    let index = unique_name("docs");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let mut mapping = serde_json::Map::new();
    mapping.insert("n".to_owned(), serde_json::json!({"type": "integer"}));
    let reader = ElasticsearchSink::connect_with_mapping(&es, &index, schema(), mapping)
        .await
        .unwrap();
    let mut plane = plane(|_| {}).await;
    let name = unique_name("sync");
    let created = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec(
                &table_name,
                &index,
                pb::BackfillMode::Tombstones,
                pb::StartPosition::Latest,
            )),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(created.job_name, format!("pipeline/{name}"));
    // Concurrent writers while the backfill runs: updates, deletes, inserts.
    let writer = {
        let table = Arc::clone(&table);
        tokio::spawn(async move {
            for i in 0..30 {
                let t = if i % 2 == 0 { "post" } else { "page" };
                table
                    .put(
                        &doc(t, &format!("d{i:03}"), AttrValue::n(1000 + i64::from(i))),
                        None,
                    )
                    .await
                    .unwrap();
                table
                    .delete(
                        &key(
                            if (i + 30) % 2 == 0 { "post" } else { "page" },
                            &format!("d{:03}", i + 30),
                        ),
                        None,
                    )
                    .await
                    .unwrap();
                table
                    .put(
                        &doc("post", &format!("n{i:03}"), AttrValue::n(i64::from(i))),
                        None,
                    )
                    .await
                    .unwrap();
            }
            // The index refuses this one (n is mapped as an integer).
            table
                .put(&doc("post", "bad", AttrValue::s("not a number")), None)
                .await
                .unwrap();
        })
    };
    writer.await.unwrap();
    wait_streaming(&mut plane, &name).await;
    let lag = drain(&mut plane, &name).await;
    assert!(lag.caught_up, "{lag:?}");
    let source = scan_all(&table).await;
    let mut all_keys: Vec<Key> = source.keys().cloned().collect();
    for i in 30..60 {
        all_keys.push(key(
            if i % 2 == 0 { "post" } else { "page" },
            &format!("d{i:03}"),
        ));
    }
    let target = index_contents(&reader, all_keys.iter().cloned()).await;
    for (k, item) in &source {
        if k == &key("post", "bad") {
            assert!(
                !target.contains_key(k),
                "a rejected document is not in the index"
            );
            continue;
        }
        let (_, got) = target
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the index"));
        assert_eq!(got, item, "{k}");
    }
    for i in 30..60 {
        let k = key(
            if i % 2 == 0 { "post" } else { "page" },
            &format!("d{i:03}"),
        );
        assert!(!target.contains_key(&k), "deleted {k} came back");
    }
    assert_eq!(target.len(), source.len() - 1);
    // The rejected record is a dead letter with the index's reason.
    let dead = plane
        .replicator
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert!(!dead.is_empty());
    assert!(
        dead.iter()
            .all(|d| d.key == Some(key_to_proto(&key("post", "bad")))),
        "{dead:?}"
    );
    assert!(!dead[0].reason.is_empty() && dead[0].sink_name == "search");
    // The metrics a scraper reads say the same: the dead letter, what the
    // sink applied (and its bytes), and the lag of the shards followed.
    let text = plane.scrape().await;
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line_start} missing from:\n{text}"))
    };
    let labels = format!("pipeline=\"{name}\",sink=\"search\"");
    assert_eq!(
        value(&format!(
            "tidemark_replicator_dead_letters_total{{{labels}}}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "tidemark_replicator_records_total{{{labels},outcome=\"dead_lettered\"}}"
        )),
        1.0
    );
    let applied = value(&format!(
        "tidemark_replicator_records_total{{{labels},outcome=\"applied\"}}"
    ));
    assert!(
        applied >= (source.len() - 1) as f64,
        "{applied} applied, {} documents in the index",
        source.len() - 1
    );
    assert!(value(&format!("tidemark_replicator_bytes_total{{{labels}}}")) > applied * 10.0);
    assert!(
        text.lines().any(|l| l.starts_with(&format!(
            "tidemark_replicator_lag_seconds{{pipeline=\"{name}\",shard="
        ))),
        "no lag series for {name}:\n{text}"
    );
    // A delete after the backfill (a TTL expiry) removes the document.
    table.delete(&key("post", "d000"), None).await.unwrap();
    drain(&mut plane, &name).await;
    assert!(
        reader.read(&key("post", "d000")).await.unwrap().is_none(),
        "the deleted document is gone"
    );
    // Replaying the whole stream into the same index changes nothing.
    let before = index_contents(&reader, all_keys.iter().cloned()).await;
    let replay = unique_name("replay");
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: replay.clone(),
            spec: Some(spec(
                &table_name,
                &index,
                pb::BackfillMode::None,
                pb::StartPosition::TrimHorizon,
            )),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    drain(&mut plane, &replay).await;
    let after = index_contents(&reader, all_keys.iter().cloned()).await;
    assert_eq!(before, after, "a replayed stream moved the index");
}

#[tokio::test]
async fn bad_pipelines_are_refused_with_what_to_fix() {
    let mut plane = plane(|_| {}).await;
    let status = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: "bad name!".to_owned(),
            spec: Some(pb::PipelineSpec {
                source: Some(table_ref("t")),
                feed: Some(pb::ChangeFeed {
                    feed: Some(pb::change_feed::Feed::EmbeddedChangeLog(
                        pb::EmbeddedChangeLogFeed::default(),
                    )),
                }),
                sinks: vec![
                    pb::Sink {
                        name: "a".to_owned(),
                        store: Some(index_ref("i")),
                        ..Default::default()
                    },
                    pb::Sink {
                        name: "a".to_owned(),
                        store: Some(index_ref("j")),
                        ..Default::default()
                    },
                    pb::Sink {
                        name: "b".to_owned(),
                        store: Some(table_ref("copy")),
                        writes_in_flight: 1000,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for want in [
        "name",
        "spec.feed",
        "spec.sinks[1].name",
        "spec.sinks[2].writes_in_flight",
    ] {
        assert!(fields.iter().any(|f| f == want), "{want} in {fields:?}");
    }
    let status = plane
        .replicator
        .get_pipeline(pb::GetPipelineRequest {
            name: unique_name("none"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // A table without a stream cannot feed a pipeline.
    let table_name = unique_name("nostream");
    DynamoTable::create(dynamo().await, &table_name, &schema(), false)
        .await
        .unwrap();
    let status = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: unique_name("p"),
            spec: Some(spec(
                &table_name,
                &unique_name("i"),
                pb::BackfillMode::None,
                pb::StartPosition::Latest,
            )),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

/// BACKFILL_MODE_WATERMARK (DBLog): items that predate the stream come
/// from chunks read between watermarks in the feed unit, while writers
/// update, delete and insert; the index ends equal to the table, no deleted
/// item comes back, and the watermark item is gone afterwards.
/// A request may point the replicator only at its own endpoints and those
/// its configuration allows: it calls them with its own credentials.
#[tokio::test]
async fn endpoints_a_request_names_must_be_allowed() {
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    // The same Elasticsearch under another name: not the configured one.
    let other = es.replace("127.0.0.1", "localhost");
    let with_endpoint = |endpoint: &str| {
        let mut s = kafka_spec("unused", &unique_name("allowed"), 1);
        s.feed = Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::EmbeddedChangeLog(
                pb::EmbeddedChangeLogFeed {
                    start_position: pb::StartPosition::Latest as i32,
                },
            )),
        });
        s.sinks[0].store = Some(common_pb::DataStore {
            store: Some(common_pb::data_store::Store::ElasticsearchIndex(
                common_pb::ElasticsearchIndexRef {
                    index: unique_name("allowed"),
                    endpoint: endpoint.to_owned(),
                },
            )),
        });
        s
    };
    let validate = |spec: pb::PipelineSpec| pb::CreatePipelineRequest {
        name: unique_name("allowed"),
        spec: Some(spec),
        validate_only: true,
        ..Default::default()
    };
    let mut plane = plane(|_| {}).await;
    for refused in [other.as_str(), "http://169.254.169.254"] {
        let status = plane
            .replicator
            .create_pipeline(validate(with_endpoint(refused)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("spec.sinks[0].store")
                && status.message().contains("allowed_endpoints"),
            "{status:?}"
        );
    }
    // A Kafka feed's brokers are endpoints too.
    let mut kafka = with_endpoint("");
    kafka.feed = kafka_spec("unused", "unused", 1).feed;
    if let Some(pb::change_feed::Feed::Kafka(k)) = kafka.feed.as_mut().and_then(|f| f.feed.as_mut())
    {
        k.topic.as_mut().unwrap().bootstrap_servers = "evil.example:9092".to_owned();
    }
    let status = plane
        .replicator
        .create_pipeline(validate(kafka))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("bootstrap_servers"), "{status:?}");
    // Its own endpoint, named or not, passes.
    for own in ["", es.as_str()] {
        plane
            .replicator
            .create_pipeline(validate(with_endpoint(own)))
            .await
            .unwrap_or_else(|s| panic!("{own:?}: {s:?}"));
    }
    // Allowed by configuration.
    let mut allowing = plane_with_allowed(&other).await;
    allowing
        .replicator
        .create_pipeline(validate(with_endpoint(&other)))
        .await
        .unwrap();
}

async fn plane_with_allowed(endpoint: &str) -> Plane {
    let endpoint = endpoint.to_owned();
    plane(move |c| c.allowed_endpoints = endpoint).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_backfill_copies_a_live_table_and_resurrects_nothing() {
    use aws_sdk_dynamodb::types::{StreamSpecification, StreamViewType};
    let table_name = unique_name("dblog");
    let client = dynamo().await;
    let table = Arc::new(
        DynamoTable::create(client.clone(), &table_name, &schema(), false)
            .await
            .unwrap(),
    );
    // Older than the stream: only the backfill can bring these.
    futures::future::try_join_all((0..240).map(|i| {
        let table = Arc::clone(&table);
        async move {
            table
                .put(
                    &doc("post", &format!("d{i:03}"), AttrValue::n(i64::from(i))),
                    None,
                )
                .await
        }
    }))
    .await
    .unwrap();
    client
        .update_table()
        .table_name(&table_name)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let index = unique_name("dblog");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let reader = ElasticsearchSink::connect(&es, &index, schema())
        .await
        .unwrap();
    let mut plane = plane(|_| {}).await;
    let name = unique_name("dblog");
    let mut spec = spec(
        &table_name,
        &index,
        pb::BackfillMode::Watermark,
        pb::StartPosition::Latest,
    );
    spec.backfill.as_mut().unwrap().chunk_size = 60;
    let created = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(
        created.state,
        pb::PipelineState::Backfilling as i32,
        "{created:?}"
    );
    let writer = {
        let table = Arc::clone(&table);
        tokio::spawn(async move {
            for i in 0..40 {
                table
                    .put(
                        &doc(
                            "post",
                            &format!("d{:03}", i * 3),
                            AttrValue::n(5000 + i64::from(i)),
                        ),
                        None,
                    )
                    .await
                    .unwrap();
                table
                    .delete(&key("post", &format!("d{:03}", i * 3 + 1)), None)
                    .await
                    .unwrap();
                table
                    .put(
                        &doc("page", &format!("n{i:03}"), AttrValue::n(i64::from(i))),
                        None,
                    )
                    .await
                    .unwrap();
            }
        })
    };
    writer.await.unwrap();
    wait_streaming(&mut plane, &name).await;
    let lag = drain(&mut plane, &name).await;
    assert!(lag.caught_up, "{lag:?}");

    let source = scan_all(&table).await;
    assert!(
        source
            .keys()
            .all(|k| !k.to_string().contains("__tidemark_watermark")),
        "the watermark item is removed when the backfill ends"
    );
    assert_eq!(source.len(), 240 - 40 + 40);
    let mut all_keys: Vec<Key> = source.keys().cloned().collect();
    all_keys.extend((0..40).map(|i| key("post", &format!("d{:03}", i * 3 + 1))));
    let target = index_contents(&reader, all_keys.iter().cloned()).await;
    for (k, item) in &source {
        let (_, got) = target
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the index"));
        assert_eq!(got, item, "{k}");
    }
    assert_eq!(target.len(), source.len(), "no deleted item came back");

    // The chunks ran in the feed unit (no segment units), several of them.
    let units = plane
        .jobs
        .list_units(tidemark_proto::job_tracker::v1::ListUnitsRequest {
            run_id: created.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    assert_eq!(units.len(), 1, "{units:?}");
    let c = |k: &str| units[0].counters.get(k).copied().unwrap_or(-1);
    eprintln!("feed unit counters: {:?}", units[0].counters);
    assert_eq!(c("backfill_pending"), 0, "{:?}", units[0].counters);
    assert!(c("backfill_chunks") >= 4, "{:?}", units[0].counters);
    assert!(
        c("backfill_copied") + c("backfill_dropped") >= 200,
        "{:?}",
        units[0].counters
    );
}

/// A new table with a stream holding `n` post documents, ids from `id`,
/// `n` equal to their number.
async fn posts_table(prefix: &str, id: impl Fn(u32) -> String, n: u32) -> (String, DynamoTable) {
    let table_name = unique_name(prefix);
    let table = DynamoTable::create(dynamo().await, &table_name, &schema(), true)
        .await
        .unwrap();
    for i in 0..n {
        table
            .put(&doc("post", &id(i), AttrValue::n(i64::from(i))), None)
            .await
            .unwrap();
    }
    (table_name, table)
}

/// DynamoDB Streams read by two feed units: each reads the shards that hash
/// to it (the local stream has one shard, so one of them idles), lag and
/// drain cover both, and the index ends equal to the table. The shard split
/// across readers is tested on a scripted stream in the connectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_shared_by_two_readers_replicates_everything() {
    let (table_name, table) = posts_table("readers", |i| format!("r{i:02}"), 20).await;
    let index = unique_name("readers");
    let reader = index_reader(&index).await;
    let mut plane = plane(|_| {}).await;
    let name = unique_name("readers");
    let mut spec = spec(
        &table_name,
        &index,
        pb::BackfillMode::Tombstones,
        pb::StartPosition::Latest,
    );
    if let Some(pb::change_feed::Feed::DynamodbStreams(d)) =
        spec.feed.as_mut().and_then(|f| f.feed.as_mut())
    {
        d.readers = 2;
    }
    let created = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    for i in 0..10 {
        table
            .put(
                &doc(
                    "post",
                    &format!("r{i:02}"),
                    AttrValue::n(100 + i64::from(i)),
                ),
                None,
            )
            .await
            .unwrap();
        table
            .delete(&key("post", &format!("r{:02}", i + 10)), None)
            .await
            .unwrap();
    }
    wait_streaming(&mut plane, &name).await;
    let lag = drain(&mut plane, &name).await;
    assert!(lag.caught_up, "{lag:?}");
    // The shard, read by one reader with its position, and the other
    // reader, which has no shard of this one-shard stream.
    assert_eq!(lag.partitions.len(), 2, "{lag:?}");
    let owners: BTreeSet<&str> = lag.partitions.iter().map(|p| p.owner.as_str()).collect();
    assert!(!owners.contains(""), "every entry has its reader: {lag:?}");
    assert!(
        lag.partitions
            .iter()
            .any(|p| p.partition != "feed" && p.partition != "feed-1" && !p.position.is_empty()),
        "{lag:?}"
    );
    let source = scan_all(&table).await;
    assert_eq!(source.len(), 10);
    for i in 0..20 {
        let k = key("post", &format!("r{i:02}"));
        let got = reader.read(&k).await.unwrap().map(|(_, item)| item);
        assert_eq!(got.as_ref(), source.get(&k), "{k}");
    }
    let units = plane
        .jobs
        .list_units(tidemark_proto::job_tracker::v1::ListUnitsRequest {
            run_id: created.run_id,
            unit_keys: vec!["feed".to_owned(), "feed-1".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    assert_eq!(units.len(), 2, "{units:?}");
    let applied: i64 = units
        .iter()
        .map(|u| u.counters.get("applied").copied().unwrap_or_default())
        .sum();
    assert!(
        applied >= 20,
        "the stream's records were applied: {applied}"
    );
}

/// A sink's document-id template names the Elasticsearch documents (from
/// the key attributes, so a delete finds its document); a template naming
/// anything but the key, or one on an S3 sink, is refused with the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_id_template_names_the_documents() {
    let (table_name, table) = posts_table("ids", |i| format!("i{i}"), 6).await;
    let index = unique_name("ids");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let mut plane = plane(|_| {}).await;
    let with_template = |template: &str, store: common_pb::DataStore| {
        let mut spec = spec(
            &table_name,
            &index,
            pb::BackfillMode::Tombstones,
            pb::StartPosition::Latest,
        );
        spec.sinks[0].store = Some(store);
        spec.sinks[0].transform = Some(common_pb::Transform {
            document_id_template: template.to_owned(),
            ..Default::default()
        });
        spec
    };
    for (template, store, why) in [
        (
            "{documentType}:{title}",
            index_ref(&index),
            "exactly the key attributes",
        ),
        (
            "{documentId}",
            index_ref(&index),
            "exactly the key attributes",
        ),
        (
            "{documentType}:{documentId}",
            common_pb::DataStore {
                store: Some(common_pb::data_store::Store::S3Prefix(
                    common_pb::S3PrefixRef {
                        bucket: "any".to_owned(),
                        ..Default::default()
                    },
                )),
            },
            "not supported for s3_prefix",
        ),
    ] {
        let status = plane
            .replicator
            .create_pipeline(pb::CreatePipelineRequest {
                name: unique_name("ids-bad"),
                spec: Some(with_template(template, store)),
                actor: "t".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{template}: {status:?}"
        );
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert!(
            violations.iter().any(
                |v| v.field == "spec.sinks[0].transform.document_id_template"
                    && v.description.contains(why)
            ),
            "{template}: {violations:?}"
        );
    }

    let name = unique_name("ids");
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(with_template(
                "{documentType}:{documentId}",
                index_ref(&index),
            )),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    table.delete(&key("post", "i5"), None).await.unwrap();
    wait_streaming(&mut plane, &name).await;
    drain(&mut plane, &name).await;
    // Read by the same template: every live item, the deleted one gone.
    let named = ElasticsearchSink::connect(&es, &index, schema())
        .await
        .unwrap()
        .with_document_id(Template::parse("{documentType}:{documentId}").unwrap())
        .unwrap();
    assert_eq!(named.document_id(&key("post", "i0")).unwrap(), "post:i0");
    for i in 0..6 {
        let got = named.read(&key("post", &format!("i{i}"))).await.unwrap();
        assert_eq!(got.is_some(), i != 5, "post:i{i}: {got:?}");
    }
    // Nothing under the default names.
    let default = ElasticsearchSink::open(&es, &index, schema())
        .await
        .unwrap();
    assert!(default.read(&key("post", "i0")).await.unwrap().is_none());
}

/// An index-name template puts each document in the index its key names
/// (`<prefix>-{documentType}`); deletes find it there, and the sink read as a
/// whole (digest, count) covers every such index. A template naming an
/// attribute outside the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_name_template_spreads_documents_over_indexes() {
    let table_name = unique_name("perindex");
    let table = DynamoTable::create(dynamo().await, &table_name, &schema(), true)
        .await
        .unwrap();
    for (t, id) in [("post", "a"), ("post", "b"), ("page", "c"), ("page", "d")] {
        table
            .put(&doc(t, id, AttrValue::n(1i64)), None)
            .await
            .unwrap();
    }
    let index = unique_name("perindex");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let mut plane = plane(|_| {}).await;
    let with_template = |template: String| {
        let mut spec = spec(
            &table_name,
            &index,
            pb::BackfillMode::Tombstones,
            pb::StartPosition::Latest,
        );
        spec.sinks[0].transform = Some(common_pb::Transform {
            index_name_template: template,
            ..Default::default()
        });
        spec
    };
    let status = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: unique_name("perindex-bad"),
            spec: Some(with_template(format!("{index}-{{title}}"))),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let name = unique_name("perindex");
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(with_template(format!("{index}-{{documentType}}"))),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    table.delete(&key("page", "d"), None).await.unwrap();
    wait_streaming(&mut plane, &name).await;
    drain(&mut plane, &name).await;
    // Each type in its own index, under the default document ids.
    for (t, ids) in [("post", ["a", "b"]), ("page", ["c", "d"])] {
        let one = ElasticsearchSink::open(&es, &format!("{index}-{t}"), schema())
            .await
            .unwrap();
        for id in ids {
            let got = one.read(&key(t, id)).await.unwrap();
            assert_eq!(got.is_some(), id != "d", "{t}/{id}: {got:?}");
        }
    }
    // The sink as a whole covers every templated index.
    let all = ElasticsearchSink::open(&es, &index, schema())
        .await
        .unwrap()
        .with_index_name(Template::parse(&format!("{index}-{{documentType}}")).unwrap())
        .unwrap();
    assert_eq!(all.count().await.unwrap(), 3);
    assert!(all.read(&key("page", "c")).await.unwrap().is_some());
}

/// A validate-only CreatePipeline checks the source, its stream and every
/// sink as a real one would, says what it found, and creates nothing.
#[tokio::test]
async fn validate_only_checks_every_store_and_creates_nothing() {
    let mut plane = plane(|_| {}).await;
    let table_name = unique_name("validate");
    DynamoTable::create(dynamo().await, &table_name, &schema(), true)
        .await
        .unwrap();
    let copy_name = unique_name("validate-copy");
    DynamoTable::create(dynamo().await, &copy_name, &schema(), false)
        .await
        .unwrap();
    let index = unique_name("validate-i");
    let name = unique_name("validate-p");
    let mut good = spec(
        &table_name,
        &index,
        pb::BackfillMode::Tombstones,
        pb::StartPosition::TrimHorizon,
    );
    good.sinks.push(pb::Sink {
        name: "copy".to_owned(),
        store: Some(table_ref(&copy_name)),
        ..Default::default()
    });
    let validate = |spec: pb::PipelineSpec| pb::CreatePipelineRequest {
        name: name.clone(),
        spec: Some(spec),
        actor: "t".to_owned(),
        validate_only: true,
    };

    let checked = plane
        .replicator
        .create_pipeline(validate(good.clone()))
        .await
        .unwrap()
        .into_inner();
    let p = checked.pipeline.unwrap();
    assert_eq!(p.state, pb::PipelineState::Creating as i32, "{p:?}");
    let lines = checked.checks.join("\n");
    for want in [
        format!("table {table_name} exists"),
        "has a stream".to_owned(),
        format!("index {index} will be created"),
        format!("DynamoDB table {copy_name} exists"),
    ] {
        assert!(lines.contains(&want), "{want:?} in\n{lines}");
    }
    // Nothing was created: no pipeline, no index.
    let status = plane
        .replicator
        .get_pipeline(pb::GetPipelineRequest { name: name.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    assert!(!ElasticsearchSink::probe(&es, &index).await.unwrap());

    // A missing sink table, a missing bucket: refused, naming the sink.
    let mut missing_table = good.clone();
    missing_table.sinks[1].store = Some(table_ref(&unique_name("absent")));
    let status = plane
        .replicator
        .create_pipeline(validate(missing_table))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("spec.sinks[1].store"),
        "{status:?}"
    );
    let mut missing_bucket = good.clone();
    missing_bucket.sinks[1].store = Some(common_pb::DataStore {
        store: Some(common_pb::data_store::Store::S3Prefix(
            common_pb::S3PrefixRef {
                bucket: unique_name("absent-bucket"),
                prefix: "docs/".to_owned(),
                ..Default::default()
            },
        )),
    });
    for validate_only in [true, false] {
        let status = plane
            .replicator
            .create_pipeline(pb::CreatePipelineRequest {
                validate_only,
                ..validate(missing_bucket.clone())
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("spec.sinks[1].store") && status.message().contains("bucket"),
            "{status:?}"
        );
    }

    // Once it exists, validating the same spec answers the pipeline as it
    // is; another spec under its name is refused.
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            validate_only: false,
            ..validate(good.clone())
        })
        .await
        .unwrap();
    let again = plane
        .replicator
        .create_pipeline(validate(good.clone()))
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_ne!(again.state, pb::PipelineState::Creating as i32, "{again:?}");
    assert!(!again.run_id.is_empty(), "{again:?}");
    let mut other = good.clone();
    other.sinks.truncate(1);
    let status = plane
        .replicator
        .create_pipeline(validate(other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_pipeline_writes_nothing_until_resumed() {
    let table_name = unique_name("pause");
    let table = DynamoTable::create(dynamo().await, &table_name, &schema(), true)
        .await
        .unwrap();
    let index = unique_name("pause");
    let reader = index_reader(&index).await;
    let mut plane = plane(|_| {}).await;
    let name = unique_name("pause");
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec(
                &table_name,
                &index,
                pb::BackfillMode::None,
                pb::StartPosition::TrimHorizon,
            )),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    table
        .put(&doc("post", "a", AttrValue::n(1i64)), None)
        .await
        .unwrap();
    drain(&mut plane, &name).await;
    assert!(reader.read(&key("post", "a")).await.unwrap().is_some());
    let paused = plane
        .replicator
        .pause_pipeline(pb::PausePipelineRequest {
            name: name.clone(),
            actor: "t".to_owned(),
            reason: "cut-over".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(paused.state, pb::PipelineState::Paused as i32);
    assert_eq!(paused.state_reason, "cut-over");
    table
        .put(&doc("post", "b", AttrValue::n(2i64)), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        reader.read(&key("post", "b")).await.unwrap().is_none(),
        "written while paused"
    );
    let status = plane
        .replicator
        .drain(pb::DrainRequest {
            name: name.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    plane
        .replicator
        .resume_pipeline(pb::ResumePipelineRequest {
            name: name.clone(),
            actor: "t".to_owned(),
        })
        .await
        .unwrap();
    drain(&mut plane, &name).await;
    assert!(reader.read(&key("post", "b")).await.unwrap().is_some());
    // The lag stream answers at once.
    let mut lag = plane
        .replicator
        .watch_lag(pb::WatchLagRequest {
            name: name.clone(),
            interval: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = lag.message().await.unwrap().unwrap().lag.unwrap();
    assert_eq!(first.pipeline_name, name);
}

/// An embedded change log read from its end: items written before the
/// pipeline existed are not replicated (no backfill asked), later ones are.
/// A sink's `tombstone_retention` is the pipeline's own: with 1 s, the
/// tombstone a delete left in the backing index is purged while the feed
/// unit runs, and the live document stays.
#[tokio::test]
async fn a_sinks_tombstone_retention_purges_its_old_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = common::plane_in(dir.path(), |_| {}).await;
    let store = embedded_source(dir.path());
    let table = store.table("docs", schema());
    let index = unique_name("purged");
    let mut spec = embedded_spec(&index);
    spec.sinks[0].tombstone_retention = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let name = unique_name("purged");
    create(&mut plane, &name, spec).await;
    wait_streaming(&mut plane, &name).await;
    drain(&mut plane, &name).await;
    for id in ["gone", "kept"] {
        table
            .put(&doc("post", id, AttrValue::n(1i64)), None)
            .await
            .unwrap();
    }
    table.delete(&key("post", "gone"), None).await.unwrap();
    drain(&mut plane, &name).await;
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let http = reqwest::Client::new();
    let tombstones = || async {
        http.post(format!("{es}/{index}-tm-*/_refresh"))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = http
            .post(format!("{es}/{index}-tm-*/_count"))
            .json(&serde_json::json!({"query": {"term": {"_tidemark_deleted": true}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["count"].as_u64().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut saw_tombstone = false;
    loop {
        match tombstones().await {
            0 if saw_tombstone || std::time::Instant::now() > deadline => break,
            0 => {}
            _ => saw_tombstone = true,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tombstone was never purged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        tombstones().await,
        0,
        "the tombstone outlived its retention"
    );
    let reader = ElasticsearchSink::connect(&es, &index, schema())
        .await
        .unwrap();
    assert!(reader.read(&key("post", "kept")).await.unwrap().is_some());
    assert!(reader.read(&key("post", "gone")).await.unwrap().is_none());
}

/// A worker of one place runs two pipelines: each pipeline's change-feed
/// follower runs for as long as its pipeline and gives its place back, so
/// the backfill segments of both (claimed after the followers) still run,
/// and both pipelines reach STREAMING with every document copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_do_not_hold_a_workers_places_from_the_backfills() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = common::plane_in(dir.path(), |c| c.worker_concurrency = 1).await;
    let store = embedded_source(dir.path());
    let table = store.table("docs", schema());
    for i in 0..40 {
        table
            .put(
                &doc("post", &format!("p{i:02}"), AttrValue::n(i64::from(i))),
                None,
            )
            .await
            .unwrap();
    }
    let mut pipelines = Vec::new();
    for _ in 0..2 {
        let index = unique_name("one-place");
        let mut spec = embedded_spec(&index);
        spec.backfill = Some(pb::BackfillOptions {
            mode: pb::BackfillMode::Tombstones as i32,
            segments: 4,
            ..Default::default()
        });
        let name = unique_name("one-place");
        create(&mut plane, &name, spec).await;
        pipelines.push((name, index));
    }
    for (name, index) in &pipelines {
        wait_streaming(&mut plane, name).await;
        drain(&mut plane, name).await;
        let reader = ElasticsearchSink::connect(
            &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
            index,
            schema(),
        )
        .await
        .unwrap();
        for i in [0, 17, 39] {
            assert!(
                reader
                    .read(&key("post", &format!("p{i:02}")))
                    .await
                    .unwrap()
                    .is_some(),
                "p{i:02} missing from {index}"
            );
        }
    }
}

#[tokio::test]
async fn an_embedded_change_log_from_latest_replicates_only_later_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = common::plane_in(dir.path(), |_| {}).await;
    let store = embedded_source(dir.path());
    let table = store.table("docs", schema());
    table
        .put(&doc("post", "before", AttrValue::n(1i64)), None)
        .await
        .unwrap();
    let index = unique_name("latest");
    let spec = embedded_spec(&index);
    let name = unique_name("latest");
    create(&mut plane, &name, spec).await;
    wait_streaming(&mut plane, &name).await;
    drain(&mut plane, &name).await;
    table
        .put(&doc("post", "after", AttrValue::n(2i64)), None)
        .await
        .unwrap();
    drain(&mut plane, &name).await;
    let reader = index_reader(&index).await;
    assert!(reader.read(&key("post", "after")).await.unwrap().is_some());
    assert!(
        reader.read(&key("post", "before")).await.unwrap().is_none(),
        "a change from before the pipeline was replicated"
    );
}

/// A backfilling pipeline from an embedded table with a history: its feed
/// starts where the change log ended when the pipeline was created, so the
/// feed unit applies only the changes made from then on (not the 650 the
/// scans copy anyway), and every one of them, made while the segments scan,
/// reaches the index: it ends equal to the table, deleted items absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfilling_pipeline_feed_starts_at_the_logs_end_and_misses_nothing() {
    const ITEMS: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut plane = common::plane_in(dir.path(), |_| {}).await;
    let store = embedded_source(dir.path());
    let table = Arc::new(store.table("docs", schema()));
    let id = |i: u32| format!("p{i}");
    // The history: every item written twice, one in six deleted.
    for round in 0..2 {
        for i in 0..ITEMS {
            let n = AttrValue::n(i64::from(round * 1000 + i));
            table.put(&doc("post", &id(i), n), None).await.unwrap();
        }
    }
    for i in (0..ITEMS).step_by(6) {
        table.delete(&key("post", &id(i)), None).await.unwrap();
    }
    let log_end = || async {
        let end = store.log_end("docs").await.unwrap();
        end.partitions["0"]
            .sequence
            .as_deref()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    let history = log_end().await;
    assert_eq!(history, 650, "the history the scans copy");
    let index = unique_name("from-end");
    let name = unique_name("from-end");
    let spec = pb::PipelineSpec {
        feed: Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::EmbeddedChangeLog(
                pb::EmbeddedChangeLogFeed {
                    start_position: pb::StartPosition::TrimHorizon as i32,
                },
            )),
        }),
        backfill: Some(pb::BackfillOptions {
            mode: pb::BackfillMode::Tombstones as i32,
            segments: 4,
            chunk_size: 25,
            ..Default::default()
        }),
        ..kafka_spec("unused", &index, 1)
    };
    create(&mut plane, &name, spec).await;
    // Changes while the segments scan: updates, new items, deletes (of
    // items alive and already deleted), and an item deleted then put back.
    let writer = {
        let table = table.clone();
        tokio::spawn(async move {
            for i in 0..ITEMS {
                let k = i * 7 % (ITEMS + 60);
                match i % 5 {
                    0..=2 => {
                        let n = AttrValue::n(i64::from(5000 + i));
                        table.put(&doc("post", &id(k), n), None).await.unwrap();
                    }
                    3 => table.delete(&key("post", &id(k)), None).await.unwrap(),
                    _ => {
                        table.delete(&key("post", &id(k)), None).await.unwrap();
                        table
                            .put(&doc("post", &id(k), AttrValue::n(9000i64)), None)
                            .await
                            .unwrap();
                    }
                }
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    wait_streaming(&mut plane, &name).await;
    writer.await.unwrap();
    let changes = log_end().await - history;
    drain(&mut plane, &name).await;

    let reader = index_reader(&index).await;
    let keys = || (0..ITEMS + 60).map(|i| key("post", &id(i)));
    let mut expected = BTreeMap::new();
    for k in keys() {
        if let Some(item) = table.get(&k).await.unwrap() {
            expected.insert(k, item);
        }
    }
    let indexed: BTreeMap<Key, Item> = index_contents(&reader, keys())
        .await
        .into_iter()
        .map(|(k, (_, item))| (k, item))
        .collect();
    assert_eq!(
        indexed.len(),
        expected.len(),
        "live documents against live items"
    );
    assert_eq!(indexed, expected, "the index equals the table");

    let run_id = plane
        .replicator
        .get_pipeline(pb::GetPipelineRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap()
        .run_id;
    let units = plane
        .jobs
        .list_units(jt::ListUnitsRequest {
            run_id,
            unit_keys: vec!["feed".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    let applied = units[0].items_processed;
    assert!(changes > 0, "the writer changed the table");
    assert_eq!(
        applied, changes,
        "the feed unit applied exactly the {changes} changes made after CreatePipeline \
         (the {history} before it are the scans' to copy)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_leaving_a_sinks_filter_leaves_the_target() {
    // Only items touched in the last hour go to the index; an update that
    // moves an item out of that window must take it out of the index too.
    let dir = tempfile::tempdir().unwrap();
    let mut plane = common::plane_in(dir.path(), |_| {}).await;
    let store = embedded_source(dir.path());
    let table = store.table("docs", schema());
    let now = chrono::Utc::now().timestamp();
    let touched = |id: &str, at: i64| {
        let mut item = doc("post", id, AttrValue::n(1i64));
        item.insert("touchedAt".to_owned(), AttrValue::n(at));
        item
    };
    let index = unique_name("filtered");
    let mut spec = embedded_spec(&index);
    spec.sinks[0].transform = Some(common_pb::Transform {
        filter: Some(common_pb::RecencyFilter {
            attribute_name: "touchedAt".to_owned(),
            encoding: common_pb::TimeEncoding::EpochSeconds as i32,
            max_age: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        }),
        ..Default::default()
    });
    let name = unique_name("filtered");
    create(&mut plane, &name, spec).await;
    wait_streaming(&mut plane, &name).await;
    // The feed reads from the log's end: let it take its position first.
    drain(&mut plane, &name).await;
    for id in ["stays", "leaves"] {
        table.put(&touched(id, now), None).await.unwrap();
    }
    drain(&mut plane, &name).await;
    let reader = index_reader(&index).await;
    assert!(reader.read(&key("post", "leaves")).await.unwrap().is_some());
    // A day old now: outside the filter.
    table
        .put(&touched("leaves", now - 86_400), None)
        .await
        .unwrap();
    drain(&mut plane, &name).await;
    assert!(
        reader.read(&key("post", "leaves")).await.unwrap().is_none(),
        "an item that left the filter kept its old image in the target"
    );
    assert!(reader.read(&key("post", "stays")).await.unwrap().is_some());
}

/// Waits up to a minute for `key` to be in the index at `version`, failing
/// with `what` otherwise.
async fn await_version(reader: &ElasticsearchSink, key: &Key, version: Option<u64>, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while reader.read(key).await.unwrap().map(|(v, _)| v) != version {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn producer(brokers: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Sends one change record keyed by the item key, as a change-data producer
/// would.
async fn send(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    k: &Key,
    image: Option<&Item>,
    version: u64,
) {
    use tidemark_connectors::proto::{encode_change, kafka_key};
    let payload = encode_change(k, image, version, 1_700_000_000_000_000);
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .key(&kafka_key(k, "documentType"))
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// A pipeline from a Kafka topic (an embedded source table names the key)
/// into an index, with `consumers` in the group, no backfill.
/// [`kafka_spec`] fed by the embedded source's change log from its latest
/// change instead.
/// A DynamoDB sink's `writes_in_flight` bounds its writes at once: a
/// pipeline's one-segment backfill of 300 items with 2 opens no more than a
/// few connections to the table, one with the default 16 many more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamodb_sink_keeps_writes_in_flight_to_what_its_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, peak) = counting_proxy_to_dynamodb().await;
    let allowed = endpoint.clone();
    let mut plane = common::plane_in(dir.path(), move |c| c.allowed_endpoints = allowed).await;
    let table = embedded_source(dir.path()).table("docs", schema());
    const N: u32 = 300;
    table
        .put_all(
            (0..N)
                .map(|i| doc("post", &format!("p{i:04}"), AttrValue::n(i64::from(i))))
                .collect(),
        )
        .await
        .unwrap();
    let mut copy = async |writes_in_flight: u32| {
        let target = unique_name("in-flight");
        let target_table = DynamoTable::create(dynamo().await, &target, &schema(), false)
            .await
            .unwrap();
        let mut store = table_ref(&target);
        if let Some(common_pb::data_store::Store::DynamodbTable(t)) = &mut store.store {
            t.endpoint.clone_from(&endpoint);
        }
        let spec = pb::PipelineSpec {
            sinks: vec![pb::Sink {
                name: "copy".to_owned(),
                store: Some(store),
                writes_in_flight,
                ..Default::default()
            }],
            backfill: Some(pb::BackfillOptions {
                mode: pb::BackfillMode::Tombstones as i32,
                segments: 1,
                ..Default::default()
            }),
            ..embedded_spec("unused")
        };
        let name = unique_name("in-flight");
        create(&mut plane, &name, spec).await;
        wait_streaming(&mut plane, &name).await;
        drain(&mut plane, &name).await;
        assert_eq!(scan_all(&target_table).await.len(), N as usize);
    };
    copy(2).await;
    // 2 writes, and the table's description when a unit of the pipeline
    // opens the sink (measured: 2 here, and 16 for the default 16).
    let limited = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=5).contains(&limited),
        "2 writes in flight at most, saw {limited} connections"
    );
    // The pool keeps what it opened: the second copy can only add to it.
    copy(0).await;
    let default = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        default >= limited + 10,
        "16 writes in flight (the default) open more connections, saw {default}"
    );
}

fn embedded_spec(index: &str) -> pb::PipelineSpec {
    pb::PipelineSpec {
        feed: Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::EmbeddedChangeLog(
                pb::EmbeddedChangeLogFeed {
                    start_position: pb::StartPosition::Latest as i32,
                },
            )),
        }),
        ..kafka_spec("unused", index, 1)
    }
}

fn kafka_spec(topic: &str, index: &str, consumers: u32) -> pb::PipelineSpec {
    pb::PipelineSpec {
        source: Some(common_pb::DataStore {
            store: Some(common_pb::data_store::Store::SqliteTable(
                common_pb::SqliteTableRef {
                    table_name: "docs".to_owned(),
                    database: String::new(),
                    key_attribute_names: vec!["documentType".to_owned(), "documentId".to_owned()],
                },
            )),
        }),
        feed: Some(pb::ChangeFeed {
            feed: Some(pb::change_feed::Feed::Kafka(pb::KafkaFeed {
                topic: Some(common_pb::KafkaTopicRef {
                    topic: topic.to_owned(),
                    bootstrap_servers: String::new(),
                }),
                consumer_group: unique_name("group"),
                start_position: pb::StartPosition::TrimHorizon as i32,
                consumers,
            })),
        }),
        sinks: vec![pb::Sink {
            name: "search".to_owned(),
            store: Some(index_ref(index)),
            ..Default::default()
        }],
        backfill: Some(pb::BackfillOptions {
            mode: pb::BackfillMode::None as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Kafka feed with two consumers: two feed units, each a member of the
/// pipeline's group; the group splits the topic's partitions between them,
/// both apply records, and the index ends with every key's latest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_feed_is_shared_by_the_consumers_of_its_group() {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("shared");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer = producer(&brokers);
    for version in 1..=2u64 {
        for i in 0..60 {
            let k = key("post", &format!("k{i:02}"));
            let image = doc("post", &format!("k{i:02}"), AttrValue::n(version));
            send(&producer, &topic, &k, Some(&image), version).await;
        }
    }
    let index = unique_name("shared");
    let reader = index_reader(&index).await;
    let mut plane = plane(|_| {}).await;
    let name = unique_name("shared");
    let created = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(kafka_spec(&topic, &index, 2)),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    // Every key at its last version, then a drain over both units.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut done = 0;
        for i in 0..60 {
            if let Some((v, _)) = reader
                .read(&key("post", &format!("k{i:02}")))
                .await
                .unwrap()
                && v == 2
            {
                done += 1;
            }
        }
        if done == 60 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{done} of 60 keys at version 2"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let lag = drain(&mut plane, &name).await;
    assert!(lag.caught_up, "{lag:?}");
    // One entry per partition of the topic, each with its committed offset.
    let names: Vec<String> = lag.partitions.iter().map(|p| p.partition.clone()).collect();
    assert_eq!(
        names,
        (0..4).map(|p| format!("{topic}/{p}")).collect::<Vec<_>>(),
        "{lag:?}"
    );
    assert!(
        lag.partitions.iter().all(|p| p.records_behind == Some(0)),
        "{lag:?}"
    );
    let units = plane
        .jobs
        .list_units(tidemark_proto::job_tracker::v1::ListUnitsRequest {
            run_id: created.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    let mut keys: Vec<&str> = units.iter().map(|u| u.unit_key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["feed", "feed-1"]);
    let applied: Vec<i64> = units
        .iter()
        .map(|u| u.counters.get("applied").copied().unwrap_or_default())
        .collect();
    assert!(
        applied.iter().all(|a| *a > 0),
        "both consumers applied records: {applied:?}"
    );
    assert_eq!(applied.iter().sum::<i64>(), 120, "{applied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_feed_applies_latest_values_and_deletes() {
    let topic = unique_name("changes");
    let producer = producer(&local_env("TIDEMARK_TEST_KAFKA_BROKERS"));
    // Three versions of each of ten keys, and the last three keys deleted.
    for version in 1..=3u64 {
        for i in 0..10 {
            let k = key("post", &format!("k{i}"));
            let image = doc("post", &format!("k{i}"), AttrValue::n(version));
            let deleted = version == 3 && i >= 7;
            send(&producer, &topic, &k, (!deleted).then_some(&image), version).await;
        }
    }
    let index = unique_name("kafka");
    let reader = index_reader(&index).await;
    let mut plane = plane(|_| {}).await;
    let name = unique_name("kafka");
    let spec = kafka_spec(&topic, &index, 1);
    // Checked first: a topic that does not exist is refused with what to
    // fix, the real one is found with its partitions.
    let mut absent = spec.clone();
    if let Some(pb::change_feed::Feed::Kafka(k)) =
        absent.feed.as_mut().and_then(|f| f.feed.as_mut())
    {
        k.topic.as_mut().unwrap().topic = unique_name("absent-topic");
    }
    let status = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(absent),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("spec.feed.kafka.topic"),
        "{status:?}"
    );
    let checks = plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec.clone()),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .checks;
    assert!(
        checks
            .iter()
            .any(|c| c.contains(&format!("Kafka topic {topic} has"))),
        "{checks:?}"
    );
    create(&mut plane, &name, spec).await;
    // Drain may see an empty partition list before the group is joined:
    // wait for the documents themselves, then drain.
    await_version(
        &reader,
        &key("post", "k0"),
        Some(3),
        "the Kafka feed delivered nothing",
    )
    .await;
    drain(&mut plane, &name).await;
    for i in 0..10 {
        let got = reader.read(&key("post", &format!("k{i}"))).await.unwrap();
        if i >= 7 {
            assert!(got.is_none(), "k{i} was deleted");
        } else {
            let (version, item) = got.unwrap_or_else(|| panic!("k{i} missing"));
            assert_eq!(version, 3);
            assert_eq!(item.get("n"), Some(&AttrValue::n(3u64)));
        }
    }
}

/// A pipeline with two sinks gives each its own shape of every change:
/// the first sink's records are copies, the last sink's take the decoded
/// keys and images over (moved, not copied), so neither may see the
/// other's transform or an image already taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sink_of_a_pipeline_gets_its_own_shape_of_every_change() {
    let topic = unique_name("changes");
    let producer = producer(&local_env("TIDEMARK_TEST_KAFKA_BROKERS"));
    for i in 0..20 {
        let k = key("post", &format!("k{i}"));
        let mut image = doc("post", &format!("k{i}"), AttrValue::n(i64::from(i)));
        image.insert("body".to_owned(), AttrValue::s(format!("body {i}")));
        let deleted = i >= 17;
        send(&producer, &topic, &k, (!deleted).then_some(&image), 1).await;
    }
    let (whole, shaped) = (unique_name("whole"), unique_name("shaped"));
    let mut spec = kafka_spec(&topic, &whole, 1);
    // The last sink keeps the title (and the key), renamed.
    spec.sinks.push(pb::Sink {
        name: "shaped".to_owned(),
        store: Some(index_ref(&shaped)),
        transform: Some(common_pb::Transform {
            projection: vec!["title".to_owned()],
            renames: [("title".to_owned(), "heading".to_owned())].into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut plane = plane(|_| {}).await;
    let name = unique_name("two-sinks");
    create(&mut plane, &name, spec).await;
    let (whole, shaped) = (index_reader(&whole).await, index_reader(&shaped).await);
    let last = key("post", "k16");
    await_version(&shaped, &last, Some(1), "the Kafka feed delivered nothing").await;
    drain(&mut plane, &name).await;
    for i in 0..20 {
        let k = key("post", &format!("k{i}"));
        let (w, s) = (
            whole.read(&k).await.unwrap(),
            shaped.read(&k).await.unwrap(),
        );
        if i >= 17 {
            assert!(w.is_none() && s.is_none(), "k{i} was deleted");
            continue;
        }
        let mut want = doc("post", &format!("k{i}"), AttrValue::n(i64::from(i)));
        want.insert("body".to_owned(), AttrValue::s(format!("body {i}")));
        assert_eq!(w, Some((1, want)), "k{i} whole");
        let mut want = k.0.clone();
        want.insert("heading".to_owned(), AttrValue::s(format!("post k{i}")));
        assert_eq!(s, Some((1, want)), "k{i} shaped");
    }
}

/// Messages of a Kafka feed that are not change records (bytes that do not
/// decode, a message without payload) are kept as dead letters with their
/// position, not dropped; the records around them are applied, and their
/// offsets are committed (the lag ends at 0 with one of them last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_kafka_messages_are_dead_lettered_and_committed() {
    let topic = unique_name("changes");
    let producer = producer(&local_env("TIDEMARK_TEST_KAFKA_BROKERS"));
    let image = |id: &str| doc("post", id, AttrValue::n(1u64));
    send(&producer, &topic, &key("post", "k0"), Some(&image("k0")), 1).await;
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&topic)
                .key("garbage")
                .payload(&b"\xff\xfenot a change record"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    send(&producer, &topic, &key("post", "k1"), Some(&image("k1")), 1).await;
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic).key("empty"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let index = unique_name("kafka-dead");
    let reader = index_reader(&index).await;
    let mut plane = plane(|_| {}).await;
    let name = unique_name("kafka-dead");
    plane
        .replicator
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(kafka_spec(&topic, &index, 1)),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    await_version(
        &reader,
        &key("post", "k1"),
        Some(1),
        "the record after the undecodable message never arrived",
    )
    .await;
    assert!(reader.read(&key("post", "k0")).await.unwrap().is_some());
    // The last message of the partition is an undecodable one: once its
    // offset is committed the lag is 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lag = drain(&mut plane, &name).await;
        if lag.caught_up && lag.records_behind == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the undecodable message's offset was never committed: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let letters = plane
        .replicator
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: name.clone(),
            // More than the maximum is lowered to it (AIP-158), not refused.
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.sink_name, "", "{letter:?}");
        assert!(
            letter.record_position.starts_with(&format!("{topic}/")),
            "{letter:?}"
        );
        assert!(letter.reason.contains("not a change record"), "{letter:?}");
    }
    assert!(
        letters.iter().any(|l| l.reason.contains("\"garbage\"")),
        "the message key is in the reason: {letters:?}"
    );
    assert!(
        letters.iter().any(|l| l.reason.contains("without payload")),
        "{letters:?}"
    );
}
