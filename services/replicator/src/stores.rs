//! Opens the stores a job names (`tidemark.common.v1.DataStore`) with this
//! process's defaults: AWS endpoint and region, Elasticsearch URL, Kafka
//! brokers, the data directory of embedded tables. Clients are cached per
//! endpoint so thousands of units share a handful of connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tidemark_connectors::dynamodb::{DynamoSink, DynamoTable};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::kafka::{KafkaFormat, KafkaSink};
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{ConnectorError, ConnectorResult, KeySchema, Sink, SourceTable};
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::common::v1::{DataStore, KafkaTopicRef};

use crate::config::Config;

/// A source table and what the replicator needs to know about it.
#[derive(Clone)]
pub struct OpenTable {
    pub table: Arc<dyn SourceTable>,
    pub schema: KeySchema,
    /// A DynamoDB table, for its index queries.
    pub dynamo: Option<DynamoTable>,
}

#[derive(Clone)]
pub struct Stores {
    /// The endpoints a request may name (#19 security).
    allow: tidemark_kit::endpoints::AllowList,
    aws_endpoint: Option<String>,
    elasticsearch_url: Option<String>,
    kafka_brokers: Option<String>,
    data_dir: PathBuf,
    /// Base AWS configuration; the standard chain (environment, profile,
    /// instance role) when not given.
    base: Option<aws_config::SdkConfig>,
    aws: Arc<tokio::sync::Mutex<HashMap<(String, String), aws_config::SdkConfig>>>,
    embedded: Arc<Mutex<HashMap<String, EmbeddedStore>>>,
}

fn invalid(message: String) -> ConnectorError {
    ConnectorError::invalid("datastore", message)
}

impl Stores {
    pub fn new(config: &Config, base: Option<aws_config::SdkConfig>) -> Self {
        let own = [
            config.aws_endpoint.as_deref(),
            config.elasticsearch_url.as_deref(),
            config.kafka_brokers.as_deref(),
        ];
        Self {
            allow: tidemark_kit::endpoints::AllowList::new(
                own.into_iter().flatten(),
                &config.allowed_endpoints,
            ),
            base,
            aws_endpoint: config.aws_endpoint.clone(),
            elasticsearch_url: config.elasticsearch_url.clone(),
            kafka_brokers: config.kafka_brokers.clone(),
            data_dir: config.data_dir.clone(),
            aws: Arc::default(),
            embedded: Arc::default(),
        }
    }

    /// Whether a request may name `endpoint` (AWS, Elasticsearch, Kafka).
    ///
    /// # Errors
    /// `InvalidInput` saying how to allow it.
    pub fn check_endpoint(&self, endpoint: &str) -> ConnectorResult<()> {
        self.allow.check(endpoint).map_err(invalid)
    }

    /// The bootstrap servers of `topic`: its own, or this process's.
    ///
    /// # Errors
    /// Brokers a request may not name, or none at all.
    pub fn kafka_brokers(&self, topic: &KafkaTopicRef) -> ConnectorResult<String> {
        self.check_endpoint(&topic.bootstrap_servers)?;
        if topic.bootstrap_servers.is_empty() {
            self.kafka_brokers.clone().ok_or_else(|| {
                invalid("no Kafka brokers: set the topic's bootstrap_servers or the replicator's kafka_brokers".to_owned())
            })
        } else {
            Ok(topic.bootstrap_servers.clone())
        }
    }

    /// A pipeline's Kafka sink on an existing topic.
    ///
    /// # Errors
    /// No brokers, brokers that do not answer, a topic that does not exist.
    pub async fn kafka_sink(
        &self,
        topic: &KafkaTopicRef,
        schema: &KeySchema,
        format: KafkaFormat,
    ) -> ConnectorResult<Arc<KafkaSink>> {
        let brokers = self.kafka_brokers(topic)?;
        tidemark_connectors::kafka::topic_partitions(&brokers, &topic.topic, KAFKA_METADATA)
            .await
            .map_err(no_topic)?;
        Ok(Arc::new(KafkaSink::connect(
            &brokers,
            &topic.topic,
            schema.clone(),
            format,
        )?))
    }

    /// # Errors
    /// An endpoint a request may not name.
    pub async fn aws(
        &self,
        endpoint: &str,
        region: &str,
    ) -> ConnectorResult<aws_config::SdkConfig> {
        self.check_endpoint(endpoint)?;
        let endpoint = if endpoint.is_empty() {
            self.aws_endpoint.clone().unwrap_or_default()
        } else {
            endpoint.to_owned()
        };
        let mut cache = self.aws.lock().await;
        let entry = (endpoint.clone(), region.to_owned());
        if let Some(c) = cache.get(&entry) {
            return Ok(c.clone());
        }
        let mut config = match &self.base {
            Some(base) if endpoint.is_empty() => base.clone(),
            Some(base) => base.clone().into_builder().endpoint_url(&endpoint).build(),
            None => tidemark_connectors::dynamodb::sdk_config(Some(&endpoint)).await,
        };
        if !region.is_empty() {
            config = config
                .into_builder()
                .region(aws_config::Region::new(region.to_owned()))
                .build();
        }
        cache.insert(entry, config.clone());
        Ok(config)
    }

    /// # Errors
    /// An endpoint a request may not name.
    pub async fn dynamodb_client(
        &self,
        endpoint: &str,
        region: &str,
    ) -> ConnectorResult<aws_sdk_dynamodb::Client> {
        Ok(aws_sdk_dynamodb::Client::new(
            &self.aws(endpoint, region).await?,
        ))
    }

    /// # Errors
    /// An endpoint a request may not name.
    pub async fn streams_client(
        &self,
        endpoint: &str,
        region: &str,
    ) -> ConnectorResult<aws_sdk_dynamodbstreams::Client> {
        Ok(aws_sdk_dynamodbstreams::Client::new(
            &self.aws(endpoint, region).await?,
        ))
    }

    /// # Errors
    /// An endpoint a request may not name.
    pub async fn s3_client(
        &self,
        endpoint: &str,
        region: &str,
    ) -> ConnectorResult<aws_sdk_s3::Client> {
        let config = self.aws(endpoint, region).await?;
        let s3 = aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(!endpoint.is_empty() || self.aws_endpoint.is_some())
            .build();
        Ok(aws_sdk_s3::Client::from_conf(s3))
    }

    /// The embedded database `name` (empty: "default") under the data dir.
    ///
    /// # Errors
    /// A name with a path separator, or a file that cannot be opened.
    pub fn embedded(&self, name: &str) -> ConnectorResult<EmbeddedStore> {
        let name = if name.is_empty() { "default" } else { name };
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(invalid(format!(
                "database {name:?} must be a plain name, not a path"
            )));
        }
        let mut cache = self.embedded.lock().expect("embedded store cache lock");
        if let Some(s) = cache.get(name) {
            return Ok(s.clone());
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            ConnectorError::terminal(
                "sqlite",
                format!("cannot create {}: {e}", self.data_dir.display()),
            )
        })?;
        let store = EmbeddedStore::open(&self.data_dir.join(format!("{name}.db")))?;
        cache.insert(name.to_owned(), store.clone());
        Ok(store)
    }

    /// Opens a source table (DynamoDB or embedded).
    ///
    /// # Errors
    /// `NotFound` for a missing DynamoDB table; `InvalidInput` for other kinds.
    pub async fn table(&self, store: &DataStore) -> ConnectorResult<OpenTable> {
        match &store.store {
            Some(Store::DynamodbTable(t)) => {
                let client = self.dynamodb_client(&t.endpoint, &t.region).await?;
                let table = DynamoTable::open(client, &t.table_name).await?;
                let schema = table.key_schema().clone();
                Ok(OpenTable {
                    table: Arc::new(table.clone()),
                    schema,
                    dynamo: Some(table),
                })
            }
            Some(Store::SqliteTable(t)) => {
                let schema = sqlite_schema(&t.key_attribute_names)?;
                let table = self
                    .embedded(&t.database)?
                    .table(&t.table_name, schema.clone());
                Ok(OpenTable {
                    table: Arc::new(table),
                    schema,
                    dynamo: None,
                })
            }
            _ => Err(invalid(
                "a source must be a dynamodb_table or a sqlite_table".to_owned(),
            )),
        }
    }

    /// Opens a sink; `schema` is the source's key schema (as the target names
    /// it), `prefix_suffix` is appended to an S3 prefix (a unit's folder).
    ///
    /// # Errors
    /// Unsupported kinds; stores that cannot be reached or created.
    fn elasticsearch_endpoint(&self, endpoint: &str) -> ConnectorResult<String> {
        self.check_endpoint(endpoint)?;
        if endpoint.is_empty() {
            self.elasticsearch_url.clone().ok_or_else(|| {
                invalid("no Elasticsearch endpoint: set the index's endpoint or the replicator's elasticsearch_url".to_owned())
            })
        } else {
            Ok(endpoint.to_owned())
        }
    }

    /// Checks that a sink could be opened, creating nothing (no index, no
    /// table, no bucket): a line saying what was found.
    ///
    /// # Errors
    /// What [`Self::sink`] would fail with: a missing table or bucket, an
    /// unreachable endpoint, a store kind that cannot be a sink.
    pub async fn check_sink(&self, store: &DataStore) -> ConnectorResult<String> {
        match &store.store {
            Some(Store::DynamodbTable(t)) => {
                let client = self.dynamodb_client(&t.endpoint, &t.region).await?;
                DynamoTable::open(client, &t.table_name).await?;
                Ok(format!("DynamoDB table {} exists", t.table_name))
            }
            Some(Store::ElasticsearchIndex(i)) => {
                let url = self.elasticsearch_endpoint(&i.endpoint)?;
                Ok(if ElasticsearchSink::probe(&url, &i.index).await? {
                    format!("Elasticsearch index {} exists at {url}", i.index)
                } else {
                    format!(
                        "Elasticsearch at {url} answers; index {} will be created",
                        i.index
                    )
                })
            }
            Some(Store::S3Prefix(p)) => {
                let client = self.s3_client(&p.endpoint, &p.region).await?;
                if S3Sink::bucket_exists(&client, &p.bucket).await? {
                    Ok(format!("S3 bucket {} exists", p.bucket))
                } else {
                    Err(no_bucket(&p.bucket))
                }
            }
            Some(Store::SqliteTable(t)) => {
                self.embedded(&t.database)?;
                Ok(format!(
                    "embedded table {} (created on first write)",
                    t.table_name
                ))
            }
            Some(Store::KafkaTopic(t)) => {
                let brokers = self.kafka_brokers(t)?;
                let n = tidemark_connectors::kafka::topic_partitions(
                    &brokers,
                    &t.topic,
                    KAFKA_METADATA,
                )
                .await
                .map_err(no_topic)?;
                Ok(format!("Kafka topic {} exists ({n} partitions)", t.topic))
            }
            None => Err(invalid("exactly one store kind must be set".to_owned())),
        }
    }

    pub async fn sink(
        &self,
        store: &DataStore,
        schema: &KeySchema,
        prefix_suffix: &str,
        transform: &Transform,
    ) -> ConnectorResult<SinkHandle> {
        if transform.document_id_template().is_some()
            && matches!(store.store, Some(Store::S3Prefix(_)))
        {
            return Err(invalid(S3_TEMPLATE.to_owned()));
        }
        match &store.store {
            Some(Store::DynamodbTable(t)) => {
                let client = self.dynamodb_client(&t.endpoint, &t.region).await?;
                let table = DynamoTable::open(client, &t.table_name).await?;
                Ok(SinkHandle::Dynamo(Arc::new(DynamoSink::new(table))))
            }
            Some(Store::ElasticsearchIndex(i)) => {
                let url = self.elasticsearch_endpoint(&i.endpoint)?;
                let mut sink = ElasticsearchSink::connect(&url, &i.index, schema.clone()).await?;
                if let Some(t) = transform.document_id_template() {
                    sink = sink.with_document_id(t.clone()).map_err(invalid)?;
                }
                if let Some(t) = transform.index_name_template() {
                    sink = sink.with_index_name(t.clone()).map_err(invalid)?;
                }
                Ok(SinkHandle::Elasticsearch(Arc::new(sink)))
            }
            Some(Store::S3Prefix(p)) => {
                let client = self.s3_client(&p.endpoint, &p.region).await?;
                if !S3Sink::bucket_exists(&client, &p.bucket).await? {
                    return Err(no_bucket(&p.bucket));
                }
                let sink = S3Sink::new(client, &p.bucket, &format!("{}{prefix_suffix}", p.prefix));
                Ok(SinkHandle::S3(Arc::new(sink)))
            }
            Some(Store::SqliteTable(t)) => {
                let store = self.embedded(&t.database)?;
                Ok(SinkHandle::Embedded(Arc::new(store.sink(&t.table_name))))
            }
            Some(Store::KafkaTopic(_)) => Err(invalid(
                "Kafka topics are not accepted as a sink of this job".to_owned(),
            )),
            None => Err(invalid("exactly one store kind must be set".to_owned())),
        }
    }
}

/// Why an S3 sink takes no document-id template.
pub const S3_TEMPLATE: &str = "document_id_template is not supported for s3_prefix sinks: objects are named by the item key (k-<key>.json), which reads and deletes rely on";

fn no_bucket(bucket: &str) -> ConnectorError {
    ConnectorError::Precondition(format!(
        "bucket {bucket:?} does not exist (or these credentials cannot see it): create it first"
    ))
}

/// How long a topic's metadata may take to come back.
const KAFKA_METADATA: std::time::Duration = std::time::Duration::from_secs(10);

/// A sink topic must exist: the producer never creates one (its partition
/// count and compaction are the operator's choice).
fn no_topic(e: ConnectorError) -> ConnectorError {
    match e {
        ConnectorError::NotFound { message, .. } => ConnectorError::Precondition(format!(
            "{message}: create it first (compacted, cleanup.policy=compact, to keep each key's latest record)"
        )),
        other => other,
    }
}

fn sqlite_schema(names: &[String]) -> ConnectorResult<KeySchema> {
    match names {
        [p] if !p.is_empty() => Ok(KeySchema::new(p.clone(), None)),
        [p, s] if !p.is_empty() && !s.is_empty() => Ok(KeySchema::new(p.clone(), Some(s))),
        _ => Err(invalid(
            "sqlite_table.key_attribute_names must name the partition key and optionally the sort key".to_owned(),
        )),
    }
}

/// A sink with the store-specific operations unit migration needs.
#[derive(Clone)]
pub enum SinkHandle {
    Dynamo(Arc<DynamoSink>),
    Elasticsearch(Arc<ElasticsearchSink>),
    S3(Arc<S3Sink>),
    Embedded(Arc<tidemark_connectors::sqlite::EmbeddedSink>),
}

impl SinkHandle {
    pub fn sink(&self) -> Arc<dyn Sink> {
        match self {
            Self::Dynamo(s) => s.clone(),
            Self::Elasticsearch(s) => s.clone(),
            Self::S3(s) => s.clone(),
            Self::Embedded(s) => s.clone(),
        }
    }
}
