//! The behaviour suites run against every implementation: the embedded
//! SQLite store and the real DynamoDB (+ Streams) endpoint and Redis of
//! deploy/local.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tidemark_connectors::dynamodb::{DynamoSink, DynamoTable};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::streams::{DynamoStreamSource, ShardedFeed, StartPosition};
use tidemark_connectors::suite::{self, PK, SK};
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_connectors::{
    AttrValue, Buffer, BufferOp, ChangeFeed, Item, Key, KeySchema, Number, RecordOutcome, Sink,
    SinkOp, SinkRecord, SourceTable as _,
};

fn schema() -> KeySchema {
    KeySchema::new(PK, Some(SK))
}

#[tokio::test]
async fn embedded_source_table() {
    let store = EmbeddedStore::in_memory().unwrap();
    suite::source_table(&store.table("t", schema())).await;
}

#[tokio::test]
async fn embedded_sink() {
    let store = EmbeddedStore::in_memory().unwrap();
    suite::sink(&store.sink("a"), &store.sink("b")).await;
}

#[tokio::test]
async fn embedded_change_feed() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("feed.db")).unwrap();
    let table = store.table("t", schema());
    suite::change_feed(&table, |checkpoint| {
        Box::new(store.feed("t", &checkpoint)) as Box<dyn ChangeFeed>
    })
    .await;
}

#[tokio::test]
async fn embedded_bulk_load_writes_and_logs_every_item_or_none() {
    let store = EmbeddedStore::in_memory().unwrap();
    let table = store.table("t", schema());
    let item = |pk: &str, n: u64| -> Item {
        [
            (PK.to_owned(), AttrValue::s(pk)),
            (SK.to_owned(), AttrValue::s("s")),
            ("n".to_owned(), AttrValue::n(n)),
        ]
        .into_iter()
        .collect()
    };
    table.put(&item("a", 0), None).await.unwrap();
    let mut feed = store.feed_from_end("t").await.unwrap();
    table
        .put_all(vec![item("a", 1), item("b", 1), item("c", 1)])
        .await
        .unwrap();
    let key = |pk: &str| {
        Key::new([
            (PK.to_owned(), AttrValue::s(pk)),
            (SK.to_owned(), AttrValue::s("s")),
        ])
    };
    assert_eq!(table.get(&key("a")).await.unwrap(), Some(item("a", 1)));
    assert_eq!(table.get(&key("c")).await.unwrap(), Some(item("c", 1)));
    let records = feed.poll(10).await.unwrap();
    let kinds: Vec<_> = records
        .iter()
        .map(|r| (r.key.get(PK).cloned(), r.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                Some(AttrValue::s("a")),
                tidemark_connectors::ChangeKind::Modify
            ),
            (
                Some(AttrValue::s("b")),
                tidemark_connectors::ChangeKind::Insert
            ),
            (
                Some(AttrValue::s("c")),
                tidemark_connectors::ChangeKind::Insert
            ),
        ]
    );
    // One item without its sort key: refused, and nothing of the batch lands.
    let mut keyless = item("d", 1);
    keyless.remove(SK);
    let err = table
        .put_all(vec![item("e", 1), keyless])
        .await
        .unwrap_err();
    assert!(err.to_string().contains(SK), "{err}");
    assert_eq!(table.get(&key("e")).await.unwrap(), None);
}

#[tokio::test]
async fn embedded_change_feed_from_the_end_skips_earlier_changes_and_resumes_at_its_checkpoint() {
    let store = EmbeddedStore::in_memory().unwrap();
    let table = store.table("t", schema());
    let other = store.table("u", schema());
    let item = |pk: &str| -> Item {
        [
            (PK.to_owned(), AttrValue::s(pk)),
            (SK.to_owned(), AttrValue::s("s")),
        ]
        .into_iter()
        .collect()
    };
    table.put(&item("before"), None).await.unwrap();
    let mut feed = store.feed_from_end("t").await.unwrap();
    assert!(feed.poll(10).await.unwrap().is_empty(), "nothing new yet");
    // Another table's changes are not this feed's.
    other.put(&item("elsewhere"), None).await.unwrap();
    table.put(&item("after"), None).await.unwrap();
    let records = feed.poll(10).await.unwrap();
    let keys: Vec<_> = records.iter().map(|r| r.key.get(PK).cloned()).collect();
    assert_eq!(keys, vec![Some(AttrValue::s("after"))]);
    feed.commit(&records[0].position).await.unwrap();
    let checkpoint = feed.checkpoint();
    table.put(&item("later"), None).await.unwrap();
    // Resumed from its checkpoint, not from the end again.
    let mut resumed = store.feed("t", &checkpoint);
    let keys: Vec<_> = resumed
        .poll(10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.key.get(PK).cloned())
        .collect();
    assert_eq!(keys, vec![Some(AttrValue::s("later"))]);
    // An empty log: from its start.
    let mut empty = store.feed_from_end("v").await.unwrap();
    store
        .table("v", schema())
        .put(&item("first"), None)
        .await
        .unwrap();
    assert_eq!(empty.poll(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn dynamodb_source_table() {
    let (client, _) = dynamodb_clients().await;
    let table = DynamoTable::create(client, &unique_name("suite-source"), &schema(), false)
        .await
        .unwrap();
    suite::source_table(&table).await;
}

#[tokio::test]
async fn dynamodb_sink() {
    let (client, _) = dynamodb_clients().await;
    let a = DynamoTable::create(
        client.clone(),
        &unique_name("suite-sink-a"),
        &schema(),
        false,
    )
    .await
    .unwrap();
    let b = DynamoTable::create(client, &unique_name("suite-sink-b"), &schema(), false)
        .await
        .unwrap();
    suite::sink(&DynamoSink::new(a), &DynamoSink::new(b)).await;
}

#[tokio::test]
async fn dynamodb_streams_change_feed() {
    let (client, streams) = dynamodb_clients().await;
    let name = unique_name("suite-feed");
    let table = DynamoTable::create(client.clone(), &name, &schema(), true)
        .await
        .unwrap();
    let source = DynamoStreamSource::for_table(&client, streams, &name)
        .await
        .unwrap();
    suite::change_feed(&table, |checkpoint| {
        Box::new(ShardedFeed::new(
            source.clone(),
            StartPosition::TrimHorizon,
            &checkpoint,
        )) as Box<dyn ChangeFeed>
    })
    .await;
}

/// A task's meter adds the write capacity DynamoDB reports for its writes
/// (put, update, delete), and nothing for another task's.
#[tokio::test]
async fn dynamodb_writes_report_their_consumed_capacity_to_the_tasks_meter() {
    use tidemark_connectors::capacity::{CapacityMeter, metered};
    use tidemark_connectors::{AttrValue, Item, Key, SourceTable as _};
    let (client, _) = dynamodb_clients().await;
    let table = DynamoTable::create(client, &unique_name("capacity"), &schema(), false)
        .await
        .unwrap();
    let item: Item = [
        (PK.to_owned(), AttrValue::s("a")),
        (SK.to_owned(), AttrValue::s("1")),
    ]
    .into();
    let key = Key::new([
        (PK.to_owned(), AttrValue::s("a")),
        (SK.to_owned(), AttrValue::s("1")),
    ]);
    // Each write adds what DynamoDB reported for it (a whole unit per write
    // of up to 1 KB on DynamoDB; the local emulator reports less for some).
    let meter = CapacityMeter::new();
    let mut after = Vec::new();
    metered(meter.clone(), async {
        table.put(&item, None).await.unwrap();
        after.push(meter.consumed());
        let set: Item = [("n".to_owned(), AttrValue::n(1i64))].into();
        table.update(&key, &set, None).await.unwrap();
        after.push(meter.consumed());
        table.delete(&key, None).await.unwrap();
        after.push(meter.consumed());
    })
    .await;
    assert!(
        after[0] > 0.0 && after[1] > after[0] && after[2] > after[1],
        "consumed after each write: {after:?}"
    );
    assert_eq!(meter.throttled(), 0);
    // A write outside the task adds nothing to its meter.
    let before = meter.consumed();
    table.put(&item, None).await.unwrap();
    assert!((meter.consumed() - before).abs() < f64::EPSILON);
}

#[tokio::test]
async fn dynamodb_errors_are_classified() {
    let (client, _) = dynamodb_clients().await;
    let err = DynamoTable::open(client, &unique_name("no-such-table"))
        .await
        .err()
        .expect("missing table");
    assert!(
        matches!(err, tidemark_connectors::ConnectorError::NotFound { .. }),
        "{err:?}"
    );
}

/// A fresh bucket on the local S3 endpoint and two sinks on sibling unit
/// prefixes of it.
async fn s3_sinks(test: &str) -> (S3Sink, S3Sink) {
    let client = tidemark_connectors::testing::s3_client().await;
    let bucket = unique_name(test);
    S3Sink::ensure_bucket(&client, &bucket).await.unwrap();
    (
        S3Sink::new(client.clone(), &bucket, "courses/c-1/"),
        S3Sink::new(client, &bucket, "courses/c-17/"),
    )
}

#[tokio::test]
async fn s3_sink() {
    let (a, b) = s3_sinks("suite-s3").await;
    suite::sink(&a, &b).await;
}

#[tokio::test]
async fn s3_delete_prefix_removes_the_unit_and_nothing_else() {
    use tidemark_connectors::{AttrValue, Key, Sink, SinkOp, SinkRecord};
    let (unit, other) = s3_sinks("s3-rollback").await;
    // More than one DeleteObjects batch (1000 keys) and one ListObjectsV2 page.
    let records = |n: u32| -> Vec<SinkRecord> {
        (0..n)
            .map(|i| {
                let key = Key::new([
                    (PK.to_owned(), AttrValue::S("p".to_owned())),
                    (SK.to_owned(), AttrValue::S(format!("{i:05}"))),
                ]);
                let mut item = key.0.clone();
                item.insert("i".to_owned(), AttrValue::n(i64::from(i)));
                SinkRecord {
                    key,
                    version: 1,
                    op: SinkOp::Upsert(item),
                }
            })
            .collect()
    };
    for chunk in records(1100).chunks(100) {
        unit.apply(chunk).await.unwrap();
    }
    // A tombstone is an object of the unit too.
    let gone = records(1).remove(0).key;
    unit.apply(&[SinkRecord {
        key: gone,
        version: 2,
        op: SinkOp::Delete,
    }])
    .await
    .unwrap();
    other.apply(&records(20)).await.unwrap();
    assert_eq!(unit.count().await.unwrap(), 1099);
    let before = other.digest(4).await.unwrap();

    assert_eq!(unit.delete_prefix().await.unwrap(), 1100);
    assert_eq!(unit.count().await.unwrap(), 0);
    let left = unit
        .client()
        .list_objects_v2()
        .bucket(unit.bucket())
        .prefix(unit.prefix())
        .send()
        .await
        .unwrap();
    assert_eq!(left.key_count(), Some(0), "{:?}", left.contents());
    assert_eq!(
        other.count().await.unwrap(),
        20,
        "the sibling unit is untouched"
    );
    assert_eq!(other.digest(4).await.unwrap(), before);
    assert_eq!(unit.delete_prefix().await.unwrap(), 0, "idempotent");
}

#[tokio::test]
async fn s3_purge_tombstones_keeps_live_items_and_missing_buckets_are_not_found() {
    use tidemark_connectors::{AttrValue, Key, Sink, SinkOp, SinkRecord};
    let (sink, _) = s3_sinks("s3-purge").await;
    let key = |sk: &str| {
        Key::new([
            (PK.to_owned(), AttrValue::S("p".to_owned())),
            (SK.to_owned(), AttrValue::S(sk.to_owned())),
        ])
    };
    sink.apply(&[
        SinkRecord {
            key: key("live"),
            version: 1,
            op: SinkOp::Upsert(key("live").0),
        },
        SinkRecord {
            key: key("dead"),
            version: 3,
            op: SinkOp::Delete,
        },
    ])
    .await
    .unwrap();
    assert_eq!(
        sink.purge_tombstones(Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "a young tombstone stays"
    );
    assert_eq!(sink.purge_tombstones(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(sink.count().await.unwrap(), 1);
    assert_eq!(
        sink.read(&key("live")).await.unwrap().map(|(v, _)| v),
        Some(1)
    );

    let missing = S3Sink::new(
        sink.client().clone(),
        unique_name("no-such-bucket"),
        "unit/",
    );
    let err = missing.read(&key("live")).await.expect_err("no bucket");
    assert!(
        matches!(err, tidemark_connectors::ConnectorError::NotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn s3_concurrent_writers_leave_the_higher_version() {
    use tidemark_connectors::{AttrValue, Key, RecordOutcome, Sink, SinkOp, SinkRecord};
    let (sink, _) = s3_sinks("s3-race").await;
    let sink = Arc::new(sink);
    for round in 0..25u64 {
        let key = Key::new([
            (PK.to_owned(), AttrValue::S("race".to_owned())),
            (SK.to_owned(), AttrValue::S(round.to_string())),
        ]);
        let write = |version: u64, delete: bool| {
            let sink = Arc::clone(&sink);
            let key = key.clone();
            tokio::spawn(async move {
                let mut item = key.0.clone();
                item.insert("v".to_owned(), AttrValue::n(version));
                let op = if delete {
                    SinkOp::Delete
                } else {
                    SinkOp::Upsert(item)
                };
                sink.apply(&[SinkRecord { key, version, op }])
                    .await
                    .unwrap()
                    .remove(0)
            })
        };
        // Odd rounds: the newer write is a delete, which must win too.
        let delete = round % 2 == 1;
        let (low_first, high, low_second) = if round % 3 == 0 {
            (write(10, false), write(20, delete), write(15, false))
        } else {
            let high = write(20, delete);
            (write(10, false), high, write(15, false))
        };
        assert_eq!(high.await.unwrap(), RecordOutcome::Applied, "round {round}");
        for low in [low_first, low_second] {
            let outcome = low.await.unwrap();
            assert!(
                matches!(outcome, RecordOutcome::Applied | RecordOutcome::Stale),
                "round {round}: {outcome:?}"
            );
        }
        let stored = sink.read(&key).await.unwrap();
        if delete {
            assert_eq!(stored, None, "round {round}: the tombstone at 20 wins");
        } else {
            assert_eq!(stored.map(|(v, _)| v), Some(20), "round {round}");
        }
    }
}

#[tokio::test]
async fn embedded_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("buffer.db")).unwrap();
    suite::buffer(&store.buffer("stats")).await;
}

#[tokio::test]
async fn embedded_buffer_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("buffer.db")).unwrap();
    suite::buffer_events(&store.buffer("stats")).await;
}

#[tokio::test]
async fn redis_buffer_events_suite() {
    let buffer = redis_buffer("events").await;
    suite::buffer_events(&buffer).await;
    cleanup(&buffer).await;
}

/// A batch of 10000 events (the aggregator's largest message) is one
/// script call: every id is remembered, and a failure undoes all of them
/// (Lua's `unpack` would refuse more than 8000 at once).
#[tokio::test]
async fn redis_buffer_events_large_batch_is_all_or_none() {
    use tidemark_connectors::BufferEvent;
    let buffer = redis_buffer("events-large").await;
    let window = Duration::from_secs(60);
    buffer
        .apply_events(
            &[BufferEvent {
                id: "big".into(),
                op: inc("big", "n", i64::MAX),
                time_micros: 1,
            }],
            window,
        )
        .await
        .unwrap();
    let mut events: Vec<BufferEvent> = (0..10_000)
        .map(|i| BufferEvent {
            id: format!("id-{i}"),
            op: if i < 50 {
                // Undone exactly too, although its negation is no i64.
                inc(&format!("e{i}"), "m", i64::MIN)
            } else if i % 7 == 0 {
                BufferOp::Replace {
                    entity: format!("e{}", i % 50),
                    metric: "r".into(),
                    value: i.to_string(),
                }
            } else {
                inc(&format!("e{}", i % 50), "n", i)
            },
            time_micros: i,
        })
        .collect();
    events.push(BufferEvent {
        id: "overflow".into(),
        op: inc("big", "n", 1),
        time_micros: 1,
    });
    buffer
        .apply_events(&events, window)
        .await
        .expect_err("the last event overflows");
    for e in 0..50 {
        let delta = buffer.peek(&format!("e{e}")).await.unwrap();
        assert!(
            delta.increments.is_empty() && delta.replaces.is_empty(),
            "{delta:?}"
        );
    }
    events.pop();
    let dups = buffer.apply_events(&events, window).await.unwrap();
    assert!(dups.is_empty(), "no id of the failed batch was remembered");
    let dups = buffer.apply_events(&events, window).await.unwrap();
    assert_eq!(dups.len(), 10_000);
    assert_eq!(buffer.stats().await.unwrap().pending_events, 10_001);
    cleanup(&buffer).await;
}

/// A Redis buffer under a prefix unique to this test; `cleanup` removes its keys.
async fn redis_buffer(test: &str) -> RedisBuffer {
    let url = local_env("TIDEMARK_TEST_REDIS_URL");
    RedisBuffer::connect(
        &url,
        RedisBuffer::prefix_for(&unique_name(&format!("test-{test}"))),
    )
    .await
    .expect("connect to the local redis")
}

async fn cleanup(buffer: &RedisBuffer) {
    let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", buffer.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn inc(entity: &str, metric: &str, delta: i64) -> BufferOp {
    BufferOp::Increment {
        entity: entity.into(),
        metric: metric.into(),
        delta,
    }
}

#[tokio::test]
async fn redis_buffer_suite() {
    let buffer = redis_buffer("suite").await;
    buffer.ping().await.expect("ping");
    suite::buffer(&buffer).await;
    assert_eq!(buffer.last_acked().await.unwrap(), Some(2));
    cleanup(&buffer).await;
}

/// A process that dies during a flush leaves it pending in Redis: a new
/// process sees it whole, takes it again identical, and events applied
/// meanwhile land in the next flush, counted once.
#[tokio::test]
async fn redis_buffer_survives_a_crash_during_a_flush() {
    let first = redis_buffer("crash").await;
    first
        .apply(&[inc("a", "views", 3), inc("b", "views", 4)])
        .await
        .unwrap();
    first
        .apply(&[BufferOp::Replace {
            entity: "b".into(),
            metric: "score".into(),
            value: "2.5".into(),
        }])
        .await
        .unwrap();
    let taken = first.take_for_flush(7).await.unwrap();
    assert_eq!(taken.len(), 2);
    let prefix = first.prefix().to_owned();
    drop(first);

    let url = local_env("TIDEMARK_TEST_REDIS_URL");
    let second = RedisBuffer::connect(&url, prefix).await.unwrap();
    assert_eq!(
        second.pending_flush().await.unwrap(),
        Some((7, taken.clone()))
    );

    // Events keep arriving while the restarted process re-takes the flush.
    let writer = {
        let buffer = second.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                buffer.apply(&[inc("a", "views", 1)]).await.unwrap();
            }
        })
    };
    for _ in 0..20 {
        assert_eq!(second.take_for_flush(7).await.unwrap(), taken);
        let err = second.take_for_flush(8).await.expect_err("7 is pending");
        assert!(err.is_precondition(), "{err:?}");
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert_eq!(second.take_for_flush(7).await.unwrap(), taken, "unchanged");
    second.ack_flush(7).await.unwrap();
    second
        .ack_flush(7)
        .await
        .expect("a repeated ack is harmless");
    assert_eq!(second.pending_flush().await.unwrap(), None);

    let next = second.take_for_flush(8).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].entity, "a");
    assert_eq!(next[0].increments.get("views"), Some(&100));
    assert!(next[0].replaces.is_empty());
    second.ack_flush(8).await.unwrap();

    // A sequence at or below the last acknowledged one would be skipped by
    // the store as already applied: refused rather than lost.
    second.apply(&[inc("a", "views", 1)]).await.unwrap();
    for stale in [7, 8] {
        let err = second.take_for_flush(stale).await.expect_err("stale");
        assert!(err.is_precondition(), "{err:?}");
    }
    assert_eq!(second.dirty_count().await.unwrap(), 1, "nothing moved");
    cleanup(&second).await;
}

/// A batch whose increment overflows a stored value leaves nothing behind,
/// not even the operations before it.
#[tokio::test]
async fn redis_buffer_apply_is_all_or_none() {
    let buffer = redis_buffer("atomic").await;
    buffer
        .apply(&[inc("big", "n", i64::MAX - 1)])
        .await
        .unwrap();
    let err = buffer
        .apply(&[
            inc("a", "x", 1),
            BufferOp::Replace {
                entity: "a".into(),
                metric: "s".into(),
                value: "1".into(),
            },
            inc("big", "n", 5),
            inc("c", "y", 2),
        ])
        .await
        .expect_err("overflow");
    assert!(!err.is_retryable(), "{err:?}");
    for entity in ["a", "c"] {
        let delta = buffer.peek(entity).await.unwrap();
        assert!(
            delta.increments.is_empty() && delta.replaces.is_empty(),
            "{delta:?}"
        );
    }
    assert_eq!(
        buffer.peek("big").await.unwrap().increments.get("n"),
        Some(&(i64::MAX - 1))
    );
    assert_eq!(buffer.dirty_count().await.unwrap(), 1);
    cleanup(&buffer).await;
}

/// Writers on overlapping entities race a flusher that takes (sometimes
/// twice, as after a crash) and acknowledges: every increment is in exactly
/// one flush or still buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_buffer_concurrent_applies_and_flushes_count_once() {
    use rand::{Rng as _, SeedableRng as _};

    let buffer = redis_buffer("race").await;
    let done = Arc::new(AtomicBool::new(false));
    let flusher = {
        let buffer = buffer.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut flushed: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut sequence = 0;
            while !done.load(Ordering::Acquire) {
                sequence += 1;
                let taken = buffer.take_for_flush(sequence).await.unwrap();
                if sequence % 3 == 0 {
                    assert_eq!(buffer.take_for_flush(sequence).await.unwrap(), taken);
                }
                for delta in taken {
                    for (metric, n) in delta.increments {
                        *flushed.entry((delta.entity.clone(), metric)).or_default() += n;
                    }
                }
                buffer.ack_flush(sequence).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (flushed, sequence)
        })
    };
    let writers: Vec<_> = (0..8u64)
        .map(|task| {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(task);
                let mut applied: BTreeMap<(String, String), i64> = BTreeMap::new();
                for _ in 0..150 {
                    let batch: Vec<BufferOp> = (0..rng.random_range(1..6))
                        .map(|_| {
                            inc(
                                &format!("e{}", rng.random_range(0..6)),
                                &format!("m{}", rng.random_range(0..2)),
                                rng.random_range(-5..20),
                            )
                        })
                        .collect();
                    buffer.apply(&batch).await.unwrap();
                    for op in batch {
                        if let BufferOp::Increment {
                            entity,
                            metric,
                            delta,
                        } = op
                        {
                            *applied.entry((entity, metric)).or_default() += delta;
                        }
                    }
                }
                applied
            })
        })
        .collect();
    let mut applied: BTreeMap<(String, String), i64> = BTreeMap::new();
    for writer in writers {
        for (k, n) in writer.await.unwrap() {
            *applied.entry(k).or_default() += n;
        }
    }
    done.store(true, Ordering::Release);
    let (mut total, flushes) = flusher.await.unwrap();
    assert!(flushes > 1, "the flusher raced the writers");
    for e in 0..6 {
        let entity = format!("e{e}");
        for (metric, n) in buffer.peek(&entity).await.unwrap().increments {
            *total.entry((entity.clone(), metric)).or_default() += n;
        }
    }
    total.retain(|_, n| *n != 0);
    applied.retain(|_, n| *n != 0);
    assert_eq!(total, applied);
    cleanup(&buffer).await;
}

#[tokio::test]
async fn redis_unreachable_is_retryable() {
    let err = RedisBuffer::connect("redis://127.0.0.1:1", "tidemark:test:")
        .await
        .err()
        .expect("nothing listens on port 1");
    assert!(err.is_retryable(), "{err:?}");
    let err = RedisBuffer::connect("not a url", "tidemark:test:")
        .await
        .err()
        .expect("bad url");
    assert!(
        matches!(
            err,
            tidemark_connectors::ConnectorError::InvalidInput { .. }
        ),
        "{err:?}"
    );
}

async fn elasticsearch_sink_at(
    prefix: &str,
    properties: serde_json::Map<String, serde_json::Value>,
) -> ElasticsearchSink {
    ElasticsearchSink::connect_with_mapping(
        &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        &unique_name(prefix),
        schema(),
        properties,
    )
    .await
    .unwrap()
}

fn es_key(pk: &str, sk: &str) -> Key {
    Key::new([
        (PK.to_owned(), AttrValue::s(pk)),
        (SK.to_owned(), AttrValue::s(sk)),
    ])
}

fn es_upsert(pk: &str, sk: &str, version: u64, extra: &[(&str, AttrValue)]) -> SinkRecord {
    let key = es_key(pk, sk);
    let mut item: Item = key.0.clone();
    for (k, v) in extra {
        item.insert((*k).to_owned(), v.clone());
    }
    SinkRecord {
        key,
        version,
        op: SinkOp::Upsert(item),
    }
}

#[tokio::test]
async fn elasticsearch_sink() {
    let a = elasticsearch_sink_at("suite-sink-a", serde_json::Map::new()).await;
    let b = elasticsearch_sink_at("suite-sink-b", serde_json::Map::new()).await;
    suite::sink(&a, &b).await;
}

#[tokio::test]
async fn elasticsearch_rejected_documents_do_not_fail_the_batch() {
    let mut properties = serde_json::Map::new();
    properties.insert("n".to_owned(), serde_json::json!({"type": "integer"}));
    let sink = elasticsearch_sink_at("es-rejects", properties).await;
    let batch = vec![
        es_upsert("doc", "ok-1", 1, &[("n", AttrValue::n(1i64))]),
        es_upsert("doc", "bad", 1, &[("n", AttrValue::s("not a number"))]),
        es_upsert("doc", "ok-2", 1, &[("n", AttrValue::n(2i64))]),
    ];
    let outcomes = sink.apply(&batch).await.unwrap();
    assert_eq!(outcomes[0], RecordOutcome::Applied);
    assert_eq!(outcomes[2], RecordOutcome::Applied);
    match &outcomes[1] {
        RecordOutcome::Rejected(reason) => assert!(!reason.is_empty(), "a reason"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(sink.read(&es_key("doc", "bad")).await.unwrap().is_none());
    assert_eq!(sink.count().await.unwrap(), 2);
}

#[tokio::test]
async fn elasticsearch_replaying_a_batch_changes_nothing() {
    let sink = elasticsearch_sink_at("es-replay", serde_json::Map::new()).await;
    let mut batch: Vec<SinkRecord> = (0..50u64)
        .map(|i| {
            es_upsert(
                "replay",
                &format!("k#{i}"),
                100 + i,
                &[
                    ("i", AttrValue::n(i)),
                    (
                        "big",
                        AttrValue::n(Number::parse("123456789012345678901234.5").unwrap()),
                    ),
                    (
                        "tags",
                        AttrValue::Ss(["x".to_owned(), "y".to_owned()].into()),
                    ),
                ],
            )
        })
        .collect();
    for i in (0..50u64).step_by(5) {
        batch.push(SinkRecord {
            key: es_key("replay", &format!("k#{i}")),
            version: 200 + i,
            op: SinkOp::Delete,
        });
    }
    let first = sink.apply(&batch).await.unwrap();
    assert!(
        first.iter().all(|o| *o == RecordOutcome::Applied),
        "{first:?}"
    );
    let before = sink.digest(4).await.unwrap();
    assert_eq!(before.iter().map(|d| d.count).sum::<u64>(), 40);

    let again = sink.apply(&batch).await.unwrap();
    assert!(
        again.iter().all(|o| *o == RecordOutcome::Stale),
        "{again:?}"
    );
    assert_eq!(
        sink.digest(4).await.unwrap(),
        before,
        "replay leaves the index unchanged"
    );
    assert_eq!(sink.count().await.unwrap(), 40);
    assert_eq!(sink.read(&es_key("replay", "k#0")).await.unwrap(), None);
    let (version, item) = sink.read(&es_key("replay", "k#1")).await.unwrap().unwrap();
    assert_eq!(version, 101);
    assert_eq!(
        item,
        match &batch[1].op {
            SinkOp::Upsert(item) => item.clone(),
            SinkOp::UpsertEncoded(_) | SinkOp::Delete => unreachable!(),
        }
    );
}
