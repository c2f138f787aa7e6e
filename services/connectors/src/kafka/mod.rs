//! Kafka: a topic of change records as a pipeline's feed ([`KafkaFeed`],
//! read by a consumer group) and a topic as a pipeline's sink
//! ([`KafkaSink`], written by an idempotent producer and read back, latest
//! record per key, by [`TopicView`]).
//!
//! librdkafka's commit, metadata, committed-offset and watermark calls block
//! their thread until the broker answers: they run on tokio's blocking pool
//! (`spawn_blocking`), never on a runtime worker.

mod feed;
mod sink;
mod view;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;

pub use feed::KafkaFeed;
pub use sink::{KafkaFormat, KafkaSink};
pub use view::TopicView;

use crate::error::{ConnectorError, ConnectorResult};

pub(crate) const BACKEND: &str = "kafka";

/// Where a group without committed offsets starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaStart {
    Earliest,
    Latest,
}

pub(crate) fn kafka_error(e: &KafkaError) -> ConnectorError {
    // librdkafka retries transport problems itself; what reaches us after
    // that is worth another try by the caller, except configuration errors.
    match e {
        KafkaError::ClientCreation(m) => ConnectorError::invalid(BACKEND, m.clone()),
        KafkaError::Subscription(m) => ConnectorError::invalid(BACKEND, m.clone()),
        other => ConnectorError::Retryable {
            backend: BACKEND,
            message: other.to_string(),
            retry_after: None,
        },
    }
}

/// The number of partitions of `topic`, asked of the brokers without
/// joining a group or creating the topic: a check before a pipeline is set
/// up over it.
///
/// # Errors
/// Brokers that do not answer within `timeout`, or a topic that does not
/// exist (`NotFound`).
pub async fn topic_partitions(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> ConnectorResult<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| kafka_error(&e))?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), timeout)
            .map_err(|e| kafka_error(&e))?;
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().len())
            }
            _ => Err(ConnectorError::NotFound {
                backend: BACKEND,
                message: format!("topic {topic:?} does not exist"),
            }),
        }
    })
    .await
    .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))?
}
