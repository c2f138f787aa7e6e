//! Flushes of entities DynamoDB cannot take in one write, on the real
//! local Redis and DynamoDB endpoint: an entity with hundreds of metrics is
//! written in parts, each exactly once (also when a flush stopped between
//! two parts), and an entity the table refuses for good is set aside as a
//! dead letter while the rest of the flush goes on.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use stats_aggregator::dead_letters::{DeadLetters, RedisDeadLetters, Stage};
use stats_aggregator::engine::Settings;
use stats_aggregator::store::Part;
use stats_aggregator::{DynamoStatsStore, Engine, EventLogBuffer, StatsStore};
use tidemark_connectors::Buffer;
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_proto::stats_aggregator::v1 as pb;

use common::{KEY, stats_table, table_values};

struct Setup {
    prefix: String,
    table: String,
    buffer: Arc<EventLogBuffer>,
    store: Arc<DynamoStatsStore>,
    engine: Engine,
}

impl Setup {
    async fn new(name: &str) -> Self {
        let url = local_env("TIDEMARK_TEST_REDIS_URL");
        let prefix = RedisBuffer::prefix_for(&unique_name(name));
        let table = stats_table("stats-flush").await;
        let buffer = Arc::new(
            EventLogBuffer::connect(&url, prefix.clone())
                .await
                .expect("connect to the local Redis"),
        );
        let (dynamo, _) = dynamodb_clients().await;
        let store = Arc::new(
            DynamoStatsStore::open(dynamo, &table, KEY)
                .await
                .expect("the stats table"),
        );
        let engine = Engine::new(
            buffer.clone(),
            store.clone(),
            None,
            Settings::new(KEY),
            None,
        )
        .with_dead_letters(Arc::new(RedisDeadLetters::new(&url, &prefix)));
        Self {
            prefix,
            table,
            buffer,
            store,
            engine,
        }
    }

    async fn cleanup(&self) {
        let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
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
}

fn inc(id: &str, entity: &str, metric: &str, delta: i64) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        entity_key: entity.into(),
        metric: metric.into(),
        op: Some(pb::event::Op::Increment(pb::Increment { delta })),
        event_time: None,
    }
}

fn replace(id: &str, entity: &str, metric: &str, value: &str) -> pb::Event {
    pb::Event {
        op: Some(pb::event::Op::Replace(pb::Replace {
            value: value.into(),
        })),
        ..inc(id, entity, metric, 0)
    }
}

#[tokio::test]
async fn an_entity_with_300_metrics_is_written_in_parts_to_its_exact_sums() {
    let s = Setup::new("flush-wide").await;
    let mut events = Vec::new();
    let mut want = BTreeMap::new();
    for m in 0..300i64 {
        let metric = format!("m{m:03}");
        if m % 30 == 0 {
            events.push(replace(&format!("r{m}"), "wide", &metric, "0.5"));
            events.push(inc(&format!("a{m}"), "wide", &metric, m));
            want.insert(metric, format!("{m}.5"));
        } else {
            events.push(inc(&format!("a{m}"), "wide", &metric, m));
            events.push(inc(&format!("b{m}"), "wide", &metric, 1000));
            want.insert(metric, (m + 1000).to_string());
        }
    }
    assert_eq!(s.engine.ingest(events, 0).await.unwrap().accepted, 600);
    let report = s.engine.flush().await.expect("the wide entity is written");
    assert_eq!((report.items_written, report.items_dead_lettered), (1, 0));
    let mut stored = table_values(&s.table).await.remove("wide").unwrap();
    assert_eq!(
        stored.remove("tidemark_version").as_deref(),
        Some("3"),
        "three parts of at most 100 metrics"
    );
    assert_eq!(stored, want, "every metric is its exact sum, once");
    s.cleanup().await;
}

/// A process that died after the first of three parts of an entity: the
/// resumed flush skips that part and applies the others, and meanwhile
/// GetStats counts the applied part once.
#[tokio::test]
async fn a_flush_stopped_between_two_parts_of_an_entity_is_completed_exactly_once() {
    let s = Setup::new("flush-parts").await;
    let events: Vec<pb::Event> = (0..250)
        .map(|m| inc(&format!("e{m}"), "wide", &format!("m{m:03}"), 1))
        .collect();
    s.engine.ingest(events, 0).await.unwrap();
    let taken = s.buffer.take_for_flush(7).await.unwrap();
    let parts = s.store.split(&taken[0]);
    assert_eq!(parts.len(), 3);
    s.store
        .apply_part(&parts[0], 7, Part { index: 1, count: 3 })
        .await
        .unwrap();

    let seen = s.engine.get_stats("wide", &[]).await.unwrap();
    assert_eq!(seen.metrics.len(), 250);
    assert!(
        seen.metrics.values().all(|m| m.effective_value == "1"),
        "the applied part is not counted twice, the others are counted"
    );

    let report = s.engine.flush().await.expect("the flush is completed");
    assert_eq!(report.sequence, 7);
    assert_eq!(report.items_written, 1);
    let mut stored = table_values(&s.table).await.remove("wide").unwrap();
    assert_eq!(stored.remove("tidemark_version").as_deref(), Some("3"));
    assert!(!stored.contains_key("tidemark_flush_part"), "marked whole");
    assert_eq!(stored.len(), 250);
    assert!(stored.values().all(|v| v == "1"), "{stored:?}");
    // A replay of any part changes nothing.
    for (index, part) in (1..).zip(&parts) {
        let again = s
            .store
            .apply_part(part, 7, Part { index, count: 3 })
            .await
            .unwrap();
        assert!(matches!(
            again,
            stats_aggregator::store::WriteOutcome::AlreadyApplied(_)
        ));
    }
    s.cleanup().await;
}

#[tokio::test]
async fn an_entity_the_table_refuses_is_dead_lettered_and_the_others_are_flushed() {
    let s = Setup::new("flush-poison").await;
    // `views` is a string on this item: DynamoDB refuses to add to it.
    let (dynamo, _) = dynamodb_clients().await;
    dynamo
        .put_item()
        .table_name(&s.table)
        .item(KEY, AttributeValue::S("bad".into()))
        .item("views", AttributeValue::S("oops".into()))
        .send()
        .await
        .unwrap();
    let events = vec![
        inc("1", "bad", "views", 1),
        inc("2", "good1", "views", 2),
        inc("3", "good2", "views", 3),
        // 38 significant digits, 39 once 10 is added: beyond DynamoDB.
        replace(
            "4",
            "huge",
            "score",
            "1.2345678901234567890123456789012345678",
        ),
        inc("5", "huge", "score", 10),
    ];
    s.engine.ingest(events, 0).await.unwrap();
    let report = s.engine.flush().await.expect("the flush goes on");
    assert_eq!((report.items_written, report.items_dead_lettered), (2, 2));
    let values = table_values(&s.table).await;
    assert_eq!(values["good1"]["views"], "2");
    assert_eq!(values["good2"]["views"], "3");
    assert!(!values.contains_key("huge"));
    let state = s.engine.state().await.unwrap();
    assert_eq!((state.dirty_keys, state.pending_events), (0, 0));

    // Kept durably in Redis, with the change and the reason.
    let letters = RedisDeadLetters::new(&local_env("TIDEMARK_TEST_REDIS_URL"), &s.prefix);
    let mut kept = letters.list().await.unwrap();
    kept.sort_by(|a, b| a.entity.cmp(&b.entity));
    assert_eq!(kept.len(), 2);
    let (bad, huge) = (&kept[0], &kept[1]);
    assert_eq!((bad.entity.as_str(), bad.stage), ("bad", Stage::Write));
    assert_eq!(bad.delta.increments["views"], 1);
    assert!(bad.reason.contains("ValidationException"), "{}", bad.reason);
    assert_eq!(huge.entity, "huge");
    assert!(huge.reason.contains("score"), "{}", huge.reason);
    assert_eq!(bad.sequence, report.sequence);

    // Later flushes are not held up by it.
    s.engine
        .ingest(
            vec![inc("6", "good1", "views", 5), inc("7", "bad", "views", 1)],
            0,
        )
        .await
        .unwrap();
    let next = s.engine.flush().await.expect("not blocked");
    assert_eq!((next.items_written, next.items_dead_lettered), (1, 1));
    assert_eq!(table_values(&s.table).await["good1"]["views"], "7");
    assert_eq!(letters.count().await.unwrap(), 3);
    s.cleanup().await;
}
