//! Helpers shared by the aggregator's tests: a fresh stats table, a fresh
//! Kafka topic and a consumer that folds the published records, all on the
//! real local components (a missing component fails the test).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::proto::decode_change;
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_connectors::{AttrValue, KeySchema, Position};

pub const KEY: &str = "pk";

/// Creates a stats table unique to this test.
pub async fn stats_table(prefix: &str) -> String {
    let (client, _) = dynamodb_clients().await;
    let name = unique_name(prefix);
    DynamoTable::create(client, &name, &KeySchema::new(KEY, None), false)
        .await
        .expect("create the stats table on the local DynamoDB endpoint");
    name
}

/// Every item of `table`: entity → metric → decimal text, plus the version
/// under `tidemark_version`.
pub async fn table_values(table: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let (client, _) = dynamodb_clients().await;
    let mut out = BTreeMap::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan the stats table");
        for item in page.items() {
            let item = tidemark_connectors::dynamodb::item_from_ddb(item).unwrap();
            out.insert(item[KEY].as_s().unwrap().to_owned(), numbers(&item));
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            return out;
        }
    }
}

fn numbers(item: &tidemark_connectors::Item) -> BTreeMap<String, String> {
    item.iter()
        .filter_map(|(k, v)| match v {
            AttrValue::N(n) if k != "tidemark_flush_seq" && k != "tidemark_last_event_micros" => {
                Some((k.clone(), n.as_str().to_owned()))
            }
            _ => None,
        })
        .collect()
}

/// Creates a topic unique to this test.
pub async fn topic(prefix: &str) -> String {
    let name = unique_name(prefix);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set(
            "bootstrap.servers",
            local_env("TIDEMARK_TEST_KAFKA_BROKERS"),
        )
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create the topic on the local Kafka");
    for r in results {
        r.expect("topic created");
    }
    name
}

/// Reads `topic` from the beginning with a fresh consumer group until
/// `done` holds for the folded state (latest version per key wins) or
/// `timeout` passes; returns the state and the records read.
pub async fn consume(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&BTreeMap<String, (u64, BTreeMap<String, String>)>) -> bool,
) -> (BTreeMap<String, (u64, BTreeMap<String, String>)>, usize) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set(
            "bootstrap.servers",
            local_env("TIDEMARK_TEST_KAFKA_BROKERS"),
        )
        .set("group.id", unique_name("stats-test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut state: BTreeMap<String, (u64, BTreeMap<String, String>)> = BTreeMap::new();
    let mut records = 0;
    let deadline = Instant::now() + timeout;
    while !done(&state) && Instant::now() < deadline {
        let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        records += 1;
        let record = decode_change(
            message.payload().expect("payload"),
            Position {
                partition: message.partition().to_string(),
                sequence: message.offset().to_string(),
            },
        )
        .expect("a valid ChangeRecord");
        let key = record
            .key
            .get(KEY)
            .and_then(AttrValue::as_s)
            .unwrap()
            .to_owned();
        assert_eq!(
            message.key(),
            Some(key.as_bytes()),
            "the Kafka key is the entity key"
        );
        let image = record.new_image.expect("an image").into_item();
        let entry = state.entry(key).or_default();
        if record.version >= entry.0 {
            *entry = (record.version, numbers(&image));
        }
    }
    consumer.unsubscribe();
    (state, records)
}
