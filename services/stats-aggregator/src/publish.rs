//! Publication of absolute values: after each item update, the item's new
//! image and version go to Kafka as a `tidemark.common.v1.ChangeRecord`
//! keyed by the entity key (DESIGN.md invariant 3). Absolute values with a
//! version are safe to publish twice, so a resumed flush republishes.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tidemark_connectors::proto::encode_change;
use tidemark_connectors::{AttrValue, ConnectorError, ConnectorResult, Key};

use crate::store::StoredItem;

const BACKEND: &str = "kafka";

/// A producer of one topic.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    key_attribute: String,
}

impl Publisher {
    /// A producer for `brokers` (comma-separated bootstrap servers).
    ///
    /// # Errors
    /// `InvalidInput` when the client cannot be configured.
    pub fn new(brokers: &str, topic: &str, key_attribute: &str) -> ConnectorResult<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // Every replica must have it: a record published is a record
            // the flush may forget.
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .create()
            .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            key_attribute: key_attribute.to_owned(),
        })
    }

    /// Publishes `item` of `entity` and waits for the broker's
    /// acknowledgement.
    ///
    /// # Errors
    /// `Retryable` when the record could not be delivered in time.
    #[tracing::instrument(skip_all, fields(topic = %self.topic, entity, version = item.version))]
    pub async fn publish(&self, entity: &str, item: &StoredItem) -> ConnectorResult<()> {
        let key = Key::single(&self.key_attribute, AttrValue::s(entity));
        let payload = encode_change(
            &key,
            Some(&item.image),
            item.version,
            crate::engine::now_micros(),
        );
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(entity).payload(&payload),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .map_err(|(e, _)| classify(&e))?;
        Ok(())
    }
}

fn classify(err: &KafkaError) -> ConnectorError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::MessageSizeTooLarge
            | C::InvalidRecord,
        ) => ConnectorError::terminal(BACKEND, err.to_string()),
        _ => ConnectorError::Retryable {
            backend: BACKEND,
            message: err.to_string(),
            retry_after: None,
        },
    }
}
