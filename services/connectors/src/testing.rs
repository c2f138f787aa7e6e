//! Support for tests that talk to the real local components started by
//! `deploy/local/up`. A missing component is a loud failure, never a skip.

use std::collections::HashMap;
use std::path::PathBuf;

// The same type, re-exported by each SDK: take it from whichever is linked.
#[cfg(feature = "dynamodb")]
use aws_sdk_dynamodb::config::Credentials;
#[cfg(all(feature = "s3", not(feature = "dynamodb")))]
use aws_sdk_s3::config::Credentials;

/// The workspace root (this crate lives at `services/connectors`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Endpoints of the local components: the process environment first, then
/// `deploy/local/.run/env` written by `deploy/local/up`.
///
/// # Panics
/// When neither names `key`: the components are not up, and a test that
/// needs them must fail, not pass silently.
pub fn local_env(key: &str) -> String {
    if let Ok(v) = std::env::var(key)
        && !v.is_empty()
    {
        return v;
    }
    let path = workspace_root().join("deploy/local/.run/env");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .collect();
    match vars.get(key) {
        Some(v) if !v.is_empty() => (*v).to_owned(),
        _ => panic!(
            "{key} is not set and {} does not name it: start the local components with `deploy/local/up`",
            path.display()
        ),
    }
}

#[cfg(feature = "aws")]
/// SDK configuration for a local endpoint named by `endpoint_env`, with the
/// test credentials and region the local set-up uses.
pub async fn local_sdk_config(endpoint_env: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(local_env(endpoint_env))
        .region(aws_config::Region::new(
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned()),
        ))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "tidemark-tests",
        ))
        .load()
        .await
}

#[cfg(feature = "streams")]
/// A DynamoDB client for the local endpoint, with the test credentials the
/// local set-up uses.
pub async fn dynamodb_clients() -> (aws_sdk_dynamodb::Client, aws_sdk_dynamodbstreams::Client) {
    let config = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
    (
        aws_sdk_dynamodb::Client::new(&config),
        aws_sdk_dynamodbstreams::Client::new(&config),
    )
}

#[cfg(feature = "s3")]
/// An S3 client for the local endpoint (`TIDEMARK_TEST_S3_ENDPOINT`) with
/// the test credentials, using path-style addressing (the endpoint is an IP
/// address, so virtual-hosted bucket names cannot resolve).
pub async fn s3_client() -> aws_sdk_s3::Client {
    let config = local_sdk_config("TIDEMARK_TEST_S3_ENDPOINT").await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    )
}

/// A name unique to this test run, so tests can run in parallel and again.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng as _;
    format!("{prefix}-{:08x}", rand::rng().random::<u32>())
}

/// Creates `topic` with `partitions` on the local Kafka, compacted
/// (`cleanup.policy=compact`) when asked: a pipeline's sink topic must exist.
///
/// # Panics
/// When the brokers refuse: the test cannot go on.
#[cfg(feature = "kafka")]
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, compacted: bool) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("Kafka admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    if compacted {
        new = new.set("cleanup.policy", "compact");
    }
    let results = admin
        .create_topics(&[new], &AdminOptions::new())
        .await
        .expect("create the topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Every message of `topic` a `read_committed` consumer sees, as (message
/// key, `tidemark-version` header), from the start; it waits up to 30 s for
/// `expect` of them, then 3 s more for any beyond (a duplicate).
///
/// # Panics
/// A consumer that cannot be created, or a message without the header.
#[cfg(feature = "kafka")]
pub async fn read_committed(brokers: &str, topic: &str, expect: usize) -> Vec<(String, u64)> {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Headers as _, Message as _};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("a Kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut quiet = std::time::Duration::from_secs(30);
    while let Ok(Ok(m)) = tokio::time::timeout(quiet, consumer.recv()).await {
        let version = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "tidemark-version"))
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
            .expect("a tidemark-version header");
        out.push((
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            version,
        ));
        if out.len() >= expect {
            quiet = std::time::Duration::from_secs(3);
        }
    }
    out
}
