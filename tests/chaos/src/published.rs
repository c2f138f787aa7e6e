//! Problem 1's Kafka side under faults: the stats-aggregator publishes each
//! counter's absolute value and version after every flush, through a fault
//! proxy in front of the broker. At the end the topic is read from its
//! beginning, straight from the broker, and folded the way a consumer of
//! absolute values folds it (the highest version of a key wins): every
//! counter must then equal the writer's sum.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use tidemark_connectors::proto::decode_change;
use tidemark_connectors::{AttrValue, Position};

use crate::counters::METRIC;

/// Creates the topic the stats-aggregator publishes to (3 partitions).
pub async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("a Kafka admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("create the stats topic")?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    Ok(())
}

/// What the topic held against the writer's sums.
#[derive(Debug, Default)]
pub struct Outcome {
    pub records: u64,
    /// Total amount by which the published values fall short of the sums
    /// (a flush whose value never reached Kafka).
    pub lost: i64,
    /// Total amount by which they exceed them.
    pub doubled: i64,
    /// Records of a key that came after a record of the same key with a
    /// higher version (a consumer that folds by version ignores them).
    pub out_of_order: u64,
    /// Records that are not valid change records.
    pub undecodable: u64,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.records > 0 && self.lost == 0 && self.doubled == 0 && self.undecodable == 0
    }
}

/// Reads `topic` from the beginning until every counter of `sums` has its
/// sum, or nothing new arrived for 20 s (at most 3 minutes in all).
pub async fn check(
    brokers: &str,
    topic: &str,
    group: &str,
    sums: &BTreeMap<String, i64>,
) -> anyhow::Result<Outcome> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .context("a Kafka consumer")?;
    consumer.subscribe(&[topic]).context("subscribe")?;
    let mut outcome = Outcome::default();
    // Per key: (highest version, its value).
    let mut folded: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let (started, mut last_record) = (Instant::now(), Instant::now());
    let caught_up = |folded: &BTreeMap<String, (u64, i64)>| {
        sums.iter()
            .all(|(k, sum)| folded.get(k).is_some_and(|(_, v)| v == sum))
    };
    while !caught_up(&folded)
        && last_record.elapsed() < Duration::from_secs(20)
        && started.elapsed() < Duration::from_secs(180)
    {
        let Ok(message) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let message = message.context("read the stats topic")?;
        last_record = Instant::now();
        outcome.records += 1;
        let position = Position {
            partition: message.partition().to_string(),
            sequence: message.offset().to_string(),
        };
        let Ok(record) = decode_change(message.payload().unwrap_or_default(), position) else {
            outcome.undecodable += 1;
            continue;
        };
        let key = record
            .key
            .get("pk")
            .and_then(AttrValue::as_s)
            .unwrap_or_default()
            .to_owned();
        let value = record
            .new_image
            .as_ref()
            .and_then(|i| i.get(METRIC))
            .and_then(tidemark_connectors::ValueRef::as_number)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let entry = folded.entry(key).or_insert((0, 0));
        if record.version >= entry.0 {
            *entry = (record.version, value);
        } else {
            outcome.out_of_order += 1;
        }
    }
    consumer.unsubscribe();
    for (key, sum) in sums {
        let published = folded.get(key).map_or(0, |(_, v)| *v);
        if published < *sum {
            outcome.lost += sum - published;
        } else {
            outcome.doubled += published - sum;
        }
    }
    Ok(outcome)
}
