//! The Kafka change feed against the local Kafka endpoint: records come back
//! in order per key, only committed offsets survive a new consumer of the
//! group, lag counts what is not committed, and a message that is not a
//! change record is skipped without blocking its partition.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tidemark_connectors::kafka::{KafkaFeed, KafkaStart};
use tidemark_connectors::proto::{encode_change, kafka_key};
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::{AttrValue, ChangeFeed, ChangeRecord, Item, Key};

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
