//! The Kafka change feed against the local Kafka endpoint: records come back
//! in order per key, only committed offsets survive a new consumer of the
//! group, lag counts what is not committed, and a message that is not a
//! change record is skipped without blocking its partition. The Kafka sink
//! against the same endpoint: the sink behaviour suite as readers see it,
//! the messages consumers get, and a ChangeRecord topic as the next feed.
//! A feed keeping images encoded into the local Elasticsearch: the path of
//! a pipeline from a topic into an index.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::kafka::{KafkaFeed, KafkaFormat, KafkaSink, KafkaStart};
use tidemark_connectors::proto::{encode_change, kafka_key};
use tidemark_connectors::suite;
use tidemark_connectors::testing::{create_topic, local_env, read_committed, unique_name};
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ChangeFeed, ChangeKind, ChangeRecord, Image, Item, Key, KeySchema, RecordOutcome,
    Sink as _, SinkOp, SinkRecord,
};

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set(
            "bootstrap.servers",
            local_env("TIDEMARK_TEST_KAFKA_BROKERS"),
        )
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

fn key(i: u32) -> Key {
    Key::single("pk", AttrValue::s(format!("k{}", i % 5)))
}

async fn produce(topic: &str, from: u32, to: u32) {
    let p = producer();
    for i in from..to {
        let k = key(i);
        let image: Item = [
            ("pk".to_owned(), k.get("pk").unwrap().clone()),
            ("n".to_owned(), AttrValue::n(u64::from(i))),
        ]
        .into_iter()
        .collect();
        let payload = encode_change(&k, Some(&image), u64::from(i) + 1, 1_700_000_000_000_000);
        let message_key = kafka_key(&k, "pk");
        p.send(
            FutureRecord::to(topic).key(&message_key).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
    }
}

async fn poll_n(feed: &mut KafkaFeed, n: usize) -> Vec<ChangeRecord> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(feed.poll(100).await.expect("poll"));
        assert!(
            Instant::now() < deadline,
            "got {} of {n} records",
            out.len()
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_are_the_checkpoint_and_order_holds_per_key() {
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("changes");
    let group = unique_name("group");
    produce(&topic, 0, 20).await;
    let mut feed = KafkaFeed::subscribe(&brokers, &topic, &group, KafkaStart::Earliest).unwrap();
    let records = poll_n(&mut feed, 20).await;
    // Per key, versions arrive in increasing order.
    let mut last: BTreeMap<Key, u64> = BTreeMap::new();
    for r in &records {
        let prev = last.insert(r.key.clone(), r.version).unwrap_or(0);
        assert!(r.version > prev, "{r:?} after version {prev}");
    }
    let behind: u64 = feed.lag().iter().map(|l| l.records).sum();
    assert!(behind > 0, "nothing committed yet: {:?}", feed.lag());
    // Commit only the first 10 (per partition: the last of those).
    let mut upto: BTreeMap<String, &ChangeRecord> = BTreeMap::new();
    for r in &records[..10] {
        upto.insert(r.position.partition.clone(), r);
    }
    for r in upto.values() {
        feed.commit(&r.position).await.unwrap();
    }
    drop(feed);
    let mut again = KafkaFeed::subscribe(&brokers, &topic, &group, KafkaStart::Earliest).unwrap();
    let rest = poll_n(&mut again, 10).await;
    let mut redelivered: Vec<u64> = rest.iter().map(|r| r.version).collect();
    redelivered.sort_unstable();
    let mut expected: Vec<u64> = records[10..].iter().map(|r| r.version).collect();
    expected.sort_unstable();
    assert_eq!(
        redelivered, expected,
        "exactly the uncommitted records come back"
    );
    let mut upto: BTreeMap<String, &ChangeRecord> = BTreeMap::new();
    for r in &rest {
        upto.insert(r.position.partition.clone(), r);
    }
    for r in upto.values() {
        again.commit(&r.position).await.unwrap();
    }
    // A message that is not a change record is skipped, not fatal.
    producer()
        .send(
            FutureRecord::to(&topic)
                .key("k0")
                .payload(b"not protobuf".as_slice()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    produce(&topic, 20, 21).await;
    let next = poll_n(&mut again, 1).await;
    assert_eq!(next[0].version, 21);
    assert_eq!(again.undecodable(), 1);
    again.commit(&next[0].position).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    again.poll(10).await.unwrap();
    let behind: u64 = again.lag().iter().map(|l| l.records).sum();
    assert_eq!(behind, 0, "all committed: {:?}", again.lag());
}

/// The sink behaviour suite on real topics: what a reader applying "newer
/// wins" sees (the sink's own view, the verifier's) moves only forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_sink_keeps_the_sink_behaviour_for_readers() {
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let (a, b) = (unique_name("sink-a"), unique_name("sink-b"));
    create_topic(&brokers, &a, 3, true).await;
    create_topic(&brokers, &b, 2, true).await;
    let schema = KeySchema::new(suite::PK, Some(suite::SK));
    let sink = KafkaSink::connect(&brokers, &a, schema.clone(), KafkaFormat::Json).unwrap();
    let other = KafkaSink::connect(&brokers, &b, schema, KafkaFormat::ChangeRecord).unwrap();
    suite::sink(&sink, &other).await;
}

/// Messages as a consumer sees them: keyed by the item key, the version in
/// a header, JSON with DynamoDB-typed values, a delete as a tombstone; a
/// fresh sink (another process) replays, and readers still see the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_messages_carry_key_version_and_tombstones() {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Headers as _, Message as _};
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("json");
    create_topic(&brokers, &topic, 1, true).await;
    let schema = KeySchema::new("pk", None);
    let k = Key::single("pk", AttrValue::s("a"));
    let item = |n: u32| -> Item {
        [
            ("pk".to_owned(), AttrValue::s("a")),
            ("n".to_owned(), AttrValue::n(u64::from(n))),
        ]
        .into_iter()
        .collect()
    };
    let record = |version: u64, op: SinkOp| SinkRecord {
        key: k.clone(),
        version,
        op,
    };
    let sink = KafkaSink::connect(&brokers, &topic, schema.clone(), KafkaFormat::Json).unwrap();
    let out = sink
        .apply(&[
            record(2, SinkOp::Upsert(item(2))),
            record(1, SinkOp::Upsert(item(1))),
            record(3, SinkOp::Delete),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            RecordOutcome::Applied,
            RecordOutcome::Stale,
            RecordOutcome::Applied
        ]
    );
    // Another process knows nothing of what was sent: it sends an older
    // record again, and readers keep the delete.
    let restarted = KafkaSink::connect(&brokers, &topic, schema, KafkaFormat::Json).unwrap();
    let out = restarted
        .apply(&[record(2, SinkOp::Upsert(item(2)))])
        .await
        .unwrap();
    assert_eq!(out, [RecordOutcome::Applied]);
    assert_eq!(restarted.read(&k).await.unwrap(), None);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("three messages")
            .unwrap();
        let headers: BTreeMap<String, String> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(m.key(), Some(b"a".as_slice()));
        seen.push((
            headers["tidemark-version"].clone(),
            headers["tidemark-op"].clone(),
            m.payload()
                .map(|p| serde_json::from_slice::<serde_json::Value>(p).unwrap()),
        ));
    }
    assert_eq!(seen[0].0, "2");
    assert_eq!(
        seen[0].2,
        Some(serde_json::json!({
            "key": {"pk": {"S": "a"}},
            "version": "2",
            "item": {"pk": {"S": "a"}, "n": {"N": "2"}},
        }))
    );
    assert_eq!((seen[1].0.as_str(), seen[1].1.as_str()), ("3", "delete"));
    assert_eq!(seen[1].2, None, "a delete is a tombstone");
    assert_eq!((seen[2].0.as_str(), seen[2].1.as_str()), ("2", "upsert"));
}

/// A sink writing ChangeRecords feeds the next pipeline: a Kafka feed reads
/// them, deletes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_record_messages_are_a_feed() {
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("chain");
    create_topic(&brokers, &topic, 2, false).await;
    let sink = KafkaSink::connect(
        &brokers,
        &topic,
        KeySchema::new("pk", None),
        KafkaFormat::ChangeRecord,
    )
    .unwrap();
    let batch: Vec<SinkRecord> = (0..10u32)
        .map(|i| SinkRecord {
            key: key(i),
            version: u64::from(i) + 1,
            op: if i == 9 {
                SinkOp::Delete
            } else {
                SinkOp::Upsert(
                    [
                        ("pk".to_owned(), key(i).get("pk").unwrap().clone()),
                        ("n".to_owned(), AttrValue::n(u64::from(i))),
                    ]
                    .into_iter()
                    .collect(),
                )
            },
        })
        .collect();
    assert_eq!(
        sink.apply(&batch).await.unwrap(),
        vec![RecordOutcome::Applied; 10]
    );
    let mut feed =
        KafkaFeed::subscribe(&brokers, &topic, &unique_name("g"), KafkaStart::Earliest).unwrap();
    let records = poll_n(&mut feed, 10).await;
    assert_eq!(feed.undecodable(), 0);
    let last = records.iter().find(|r| r.version == 10).unwrap();
    assert_eq!(last.kind, ChangeKind::Remove);
    assert_eq!(last.key, key(9));
}

/// Kafka into Kafka in transactions: what a crashed writer left open is
/// never seen, the feed delivers it again from the offsets committed with
/// the last transaction, and a `read_committed` reader sees each record
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_sink_commits_records_with_the_feed_offsets() {
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let (src, dst) = (unique_name("tx-src"), unique_name("tx-dst"));
    create_topic(&brokers, &src, 1, false).await;
    create_topic(&brokers, &dst, 1, false).await;
    produce(&src, 0, 20).await;
    let group = unique_name("tx-group");
    let id = unique_name("tx-id");
    let schema = KeySchema::new("pk", None);
    let to_sink = |records: &[ChangeRecord]| -> Vec<SinkRecord> {
        records
            .iter()
            .map(|r| SinkRecord {
                key: r.key.clone(),
                version: r.version,
                op: SinkOp::Upsert(r.new_image.clone().unwrap().into_item()),
            })
            .collect()
    };
    let open = || async {
        let sink = std::sync::Arc::new(
            KafkaSink::connect_transactional(
                &brokers,
                &dst,
                schema.clone(),
                KafkaFormat::Json,
                &id,
            )
            .await
            .expect("a transactional sink"),
        );
        let mut feed = KafkaFeed::subscribe(&brokers, &src, &group, KafkaStart::Earliest).unwrap();
        feed.commit_through(sink.clone());
        (sink, feed)
    };
    // The first ten committed with their offsets.
    let (sink, mut feed) = open().await;
    let first = poll_n(&mut feed, 20).await;
    sink.apply(&to_sink(&first[..10])).await.unwrap();
    feed.commit_all(std::slice::from_ref(&first[9].position))
        .await
        .unwrap();
    // The rest written, and the writer dies before its commit.
    sink.apply(&to_sink(&first[10..])).await.unwrap();
    drop(feed);
    drop(sink);
    // The next holder of the id aborts what was left open, and reads the
    // rest again from the committed offset.
    let (sink, mut feed) = open().await;
    let rest = poll_n(&mut feed, 10).await;
    assert_eq!(
        rest.iter().map(|r| r.version).collect::<Vec<_>>(),
        first[10..].iter().map(|r| r.version).collect::<Vec<_>>()
    );
    sink.apply(&to_sink(&rest)).await.unwrap();
    feed.commit_all(std::slice::from_ref(&rest[9].position))
        .await
        .unwrap();
    let mut seen = read_committed(&brokers, &dst, 20).await;
    seen.sort();
    let mut want: Vec<(String, u64)> = first
        .iter()
        .map(|r| (kafka_key(&r.key, "pk"), r.version))
        .collect();
    want.sort();
    assert_eq!(seen, want, "each record once");
}

/// A feed told to keep images encoded hands them over read in place, and
/// an Elasticsearch sink writes its documents straight from them (shaped
/// by a transform): they read back as the items produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_images_go_from_a_topic_into_an_index() {
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("encoded");
    create_topic(&brokers, &topic, 1, false).await;
    // Ten records of five keys: the second of each key is the newer.
    produce(&topic, 0, 10).await;
    let mut feed =
        KafkaFeed::subscribe(&brokers, &topic, &unique_name("g"), KafkaStart::Earliest).unwrap();
    feed.keep_images_encoded();
    let records = poll_n(&mut feed, 10).await;
    assert!(
        records
            .iter()
            .all(|r| matches!(r.new_image, Some(Image::Encoded(_)))),
        "images stay encoded"
    );
    let schema = KeySchema::new("pk", None);
    let sink = ElasticsearchSink::connect(
        &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        &unique_name("encoded"),
        schema.clone(),
    )
    .await
    .unwrap();
    let transform = Transform::from_proto(&tidemark_proto::common::v1::Transform {
        renames: [("n".to_owned(), "count".to_owned())].into(),
        ..Default::default()
    })
    .unwrap();
    let batch: Vec<SinkRecord> = records
        .iter()
        .map(|r| SinkRecord {
            key: r.key.clone(),
            version: r.version,
            op: transform.upsert(r.new_image.as_ref().unwrap(), &schema),
        })
        .collect();
    assert!(
        batch
            .iter()
            .all(|r| matches!(r.op, SinkOp::UpsertEncoded(_)))
    );
    assert_eq!(
        sink.apply(&batch).await.unwrap(),
        vec![RecordOutcome::Applied; 10]
    );
    for i in 5..10u32 {
        let want: Item = [
            ("pk".to_owned(), key(i).get("pk").unwrap().clone()),
            ("count".to_owned(), AttrValue::n(u64::from(i))),
        ]
        .into();
        assert_eq!(
            sink.read(&key(i)).await.unwrap(),
            Some((u64::from(i) + 1, want)),
            "key {}",
            key(i)
        );
    }
}
