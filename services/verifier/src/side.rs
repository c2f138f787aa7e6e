//! The two sides of a verification over the connector traits: a source
//! table read by parallel segmented scans, or a sink read through its
//! entries. Source items are shaped as the pipeline shapes them (transform,
//! Tidemark's own bookkeeping removed) so both sides compare in the target's
//! form, keys included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemark_connectors::dynamodb::{DynamoSink, DynamoTable};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::kafka::{KafkaFormat, KafkaSink};
use tidemark_connectors::predicate::Predicate;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ConnectorError, ConnectorResult, Item, Key, KeySchema, Number, ScanRequest, Sink,
    SourceTable, bucket_of,
};

use crate::spec::{Spec, Store};
// The replicator's watermark items (its default prefix) live in the source
// but are never replicated, so neither side counts them.
use tidemark_connectors::DEFAULT_WATERMARK_PREFIX as WATERMARK_PREFIX;
use tidemark_connectors::now_micros;

/// Attributes Tidemark itself writes into source items (the touch marker).
const BOOKKEEPING_PREFIX: &str = "_tidemark_";
/// Entries handed to a consumer at once.
const BATCH: usize = 1024;

/// One item as compared: its key and item in the target's form, and its
/// version (0 when the side does not know it).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: Key,
    pub version: u64,
    pub item: Item,
}

/// Receives batches of entries; called from several tasks at once.
pub type Consumer = Arc<dyn Fn(Vec<Entry>) + Send + Sync>;

/// Where the verifier finds stores the spec names without an endpoint.
#[derive(Default)]
pub struct Env {
    pub aws_endpoint: Option<String>,
    pub elasticsearch_url: Option<String>,
    /// Bootstrap servers for topics named without them.
    pub kafka_brokers: Option<String>,
    pub data_dir: PathBuf,
    /// AWS settings to start from instead of the default chain (tests
    /// bring their own credentials).
    pub aws_base: Option<aws_config::SdkConfig>,
    /// One handle per embedded database file, shared by every verification.
    sqlite: Mutex<HashMap<PathBuf, EmbeddedStore>>,
    /// The endpoints a spec may name (#19 security).
    pub allow: tidemark_kit::endpoints::AllowList,
}

impl Env {
    pub fn new(
        aws_endpoint: Option<String>,
        elasticsearch_url: Option<String>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            aws_endpoint,
            elasticsearch_url,
            kafka_brokers: None,
            data_dir,
            aws_base: None,
            sqlite: Mutex::default(),
            allow: tidemark_kit::endpoints::AllowList::default(),
        }
    }

    /// Whether a spec may name `store`'s endpoint: the verifier reaches it
    /// with its own credentials.
    ///
    /// # Errors
    /// What to tell the caller: the endpoint and how to allow it.
    pub fn check_store(&self, store: &Store) -> Result<(), String> {
        match store {
            Store::Dynamo { endpoint, .. }
            | Store::Elasticsearch { endpoint, .. }
            | Store::S3 { endpoint, .. } => self.allow.check(endpoint.as_deref().unwrap_or("")),
            Store::Kafka { brokers, .. } => self.allow.check(brokers.as_deref().unwrap_or("")),
            Store::Sqlite { .. } => Ok(()),
        }
    }

    fn sqlite(&self, database: Option<&str>) -> ConnectorResult<EmbeddedStore> {
        let path = sqlite_path(&self.data_dir, database);
        let mut stores = self
            .sqlite
            .lock()
            .map_err(|_| ConnectorError::terminal("sqlite", "store cache lock poisoned"))?;
        if let Some(s) = stores.get(&path) {
            return Ok(s.clone());
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            ConnectorError::terminal("sqlite", format!("{}: {e}", self.data_dir.display()))
        })?;
        let store = EmbeddedStore::open(&path)?;
        stores.insert(path, store.clone());
        Ok(store)
    }

    async fn aws(&self, endpoint: Option<&str>, region: Option<&str>) -> aws_config::SdkConfig {
        let base = match &self.aws_base {
            Some(b) => b.clone(),
            None => {
                aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .load()
                    .await
            }
        };
        let mut builder = base.to_builder();
        if let Some(url) = endpoint.or(self.aws_endpoint.as_deref()) {
            builder.set_endpoint_url(Some(url.to_owned()));
        }
        if let Some(r) = region {
            builder.set_region(Some(aws_config::Region::new(r.to_owned())));
        }
        builder.build()
    }

    /// A DynamoDB table on the verifier's own endpoint and region.
    ///
    /// # Errors
    /// When the table cannot be opened.
    pub async fn own_dynamo(&self, table: &str) -> ConnectorResult<DynamoTable> {
        self.dynamo(table, None, None).await
    }

    async fn dynamo(
        &self,
        table: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> ConnectorResult<DynamoTable> {
        let config = self.aws(endpoint, region).await;
        DynamoTable::open(aws_sdk_dynamodb::Client::new(&config), table).await
    }

    async fn s3(
        &self,
        bucket: &str,
        prefix: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> ConnectorResult<S3Sink> {
        let config = self.aws(endpoint, region).await;
        // An explicit endpoint (a VPC endpoint, a compatible store) is
        // addressed path-style, as the proto says.
        let path_style = endpoint.or(self.aws_endpoint.as_deref()).is_some();
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&config)
                .force_path_style(path_style)
                .build(),
        );
        if let Err(e) = client.head_bucket().bucket(bucket).send().await {
            let not_found = e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
            return Err(if not_found {
                ConnectorError::NotFound {
                    backend: "s3",
                    message: format!("bucket {bucket} does not exist"),
                }
            } else {
                tidemark_connectors::s3::classify(&e)
            });
        }
        Ok(S3Sink::new(client, bucket, prefix))
    }
}

/// How a source item becomes what the target should hold.
struct Shaper {
    transform: Transform,
    /// The transform changes nothing: items are used as read.
    identity: bool,
    schema: KeySchema,
    version_attribute: Option<String>,
    now_micros: i64,
}

impl Shaper {
    fn shape(&self, key: &Key, version: u64, mut item: Item) -> Option<Entry> {
        if matches!(key.get(&self.schema.partition), Some(AttrValue::S(p)) if p.starts_with(WATERMARK_PREFIX))
        {
            return None;
        }
        if !self.transform.passes(&item, self.now_micros) {
            return None;
        }
        let version = match &self.version_attribute {
            Some(a) => item
                .get(a)
                .and_then(AttrValue::as_number)
                .and_then(Number::as_u64)
                .unwrap_or(0),
            None => version,
        };
        item.retain(|name, _| !name.starts_with(BOOKKEEPING_PREFIX));
        if self.identity {
            return Some(Entry {
                key: key.clone(),
                version,
                item,
            });
        }
        Some(Entry {
            key: self.transform.shape_key(key),
            version,
            item: self.transform.shape(&item, &self.schema),
        })
    }
}

enum Backend {
    Table {
        table: Arc<dyn SourceTable>,
        segments: u32,
        /// Set for DynamoDB: predicates run there as given.
        dynamo: Option<DynamoTable>,
    },
    Sink {
        sink: Arc<dyn Sink>,
        /// Set for a DynamoDB target: predicates run there as given.
        dynamo: Option<DynamoTable>,
        segments: u32,
    },
}

struct Inner {
    backend: Backend,
    /// Set on the source side.
    shaper: Option<Shaper>,
    /// The side knows item versions (a sink's recorded ones, or the source's
    /// version attribute).
    versions_known: bool,
    /// The spec's version attribute, left out of the compared content.
    version_attribute: Option<String>,
    /// Source side only: target attribute name → source attribute name.
    reverse_renames: BTreeMap<String, String>,
    /// Key renames change key hashes, so a source sink cannot pick buckets
    /// by its own keys.
    renames_keys: bool,
}

/// One side of a verification. Cheap to clone.
#[derive(Clone)]
pub struct Side(Arc<Inner>);

/// Both sides of a spec, opened.
pub struct Sides {
    pub source: Side,
    pub target: Option<Side>,
}

fn schema_of(names: &[String]) -> KeySchema {
    KeySchema::new(names[0].clone(), names.get(1).map(String::as_str))
}

fn rename_schema(schema: &KeySchema, renames: &BTreeMap<String, String>) -> KeySchema {
    let r = |n: &str| renames.get(n).cloned().unwrap_or_else(|| n.to_owned());
    KeySchema::new(
        r(&schema.partition),
        schema.sort.as_deref().map(r).as_deref(),
    )
}

impl Sides {
    /// Opens the spec's stores, checking that they exist.
    ///
    /// # Errors
    /// `NotFound` naming a missing store; what the store fails with.
    pub async fn open(spec: &Spec, env: &Env) -> ConnectorResult<Self> {
        for store in std::iter::once(&spec.source).chain(&spec.target) {
            env.check_store(store)
                .map_err(|e| ConnectorError::invalid("verifier", e))?;
        }
        let reverse: BTreeMap<String, String> = spec
            .renames
            .iter()
            .map(|(from, to)| (to.clone(), from.clone()))
            .collect();
        // The key schema: from whichever side declares it.
        let mut source_dynamo = None;
        let source_schema = match &spec.source {
            Store::Dynamo {
                table,
                endpoint,
                region,
            } => {
                let t = env
                    .dynamo(table, endpoint.as_deref(), region.as_deref())
                    .await?;
                let schema = t.key_schema().clone();
                source_dynamo = Some(t);
                schema
            }
            Store::Sqlite { key_names, .. } if !key_names.is_empty() => schema_of(key_names),
            _ => match &spec.target {
                Some(Store::Dynamo {
                    table,
                    endpoint,
                    region,
                }) => rename_schema(
                    env.dynamo(table, endpoint.as_deref(), region.as_deref())
                        .await?
                        .key_schema(),
                    &reverse,
                ),
                Some(Store::Sqlite { key_names, .. }) if !key_names.is_empty() => {
                    rename_schema(&schema_of(key_names), &reverse)
                }
                _ => {
                    return Err(ConnectorError::invalid(
                        "verifier",
                        "no side declares the key schema",
                    ));
                }
            },
        };
        let target_schema = rename_schema(&source_schema, &spec.renames);
        let shaper = Shaper {
            identity: spec.transform == Transform::default(),
            transform: spec.transform.clone(),
            schema: source_schema.clone(),
            version_attribute: spec.version_attribute.clone(),
            now_micros: now_micros(),
        };
        let source_backend = match &spec.source {
            Store::Dynamo { .. } => {
                let t = source_dynamo.expect("opened above");
                Backend::Table {
                    table: Arc::new(t.clone()),
                    segments: spec.segments,
                    dynamo: Some(t),
                }
            }
            Store::Sqlite {
                table, database, ..
            } => Backend::Table {
                table: Arc::new(
                    env.sqlite(database.as_deref())?
                        .table(table, source_schema.clone()),
                ),
                // Every embedded segment reads the whole table and keeps its
                // share, so one segment is the fastest there.
                segments: 1,
                dynamo: None,
            },
            other => open_sink(other, &source_schema, spec.segments, None, env).await?,
        };
        let source = Side(Arc::new(Inner {
            backend: source_backend,
            versions_known: spec.version_attribute.is_some()
                || !matches!(spec.source, Store::Dynamo { .. } | Store::Sqlite { .. }),
            version_attribute: spec.version_attribute.clone(),
            shaper: Some(shaper),
            renames_keys: source_schema.names().any(|n| spec.renames.contains_key(n)),
            reverse_renames: reverse,
        }));
        let target = match &spec.target {
            None => None,
            Some(store) => Some(Side(Arc::new(Inner {
                // The target's documents are named as the pipeline names them.
                backend: open_sink(
                    store,
                    &target_schema,
                    spec.segments,
                    Some(&spec.transform),
                    env,
                )
                .await?,
                versions_known: true,
                version_attribute: spec.version_attribute.clone(),
                shaper: None,
                reverse_renames: BTreeMap::new(),
                renames_keys: false,
            }))),
        };
        Ok(Self { source, target })
    }
}

async fn open_sink(
    store: &Store,
    schema: &KeySchema,
    segments: u32,
    transform: Option<&Transform>,
    env: &Env,
) -> ConnectorResult<Backend> {
    Ok(match store {
        Store::Dynamo {
            table,
            endpoint,
            region,
        } => {
            let t = env
                .dynamo(table, endpoint.as_deref(), region.as_deref())
                .await?;
            Backend::Sink {
                sink: Arc::new(DynamoSink::new(t.clone())),
                dynamo: Some(t),
                segments,
            }
        }
        Store::Elasticsearch { index, endpoint } => {
            let url = endpoint
                .as_deref()
                .or(env.elasticsearch_url.as_deref())
                .ok_or_else(|| {
                    ConnectorError::invalid(
                        "elasticsearch",
                        "the store names no endpoint and none is configured (elasticsearch_url)",
                    )
                })?;
            let mut sink = ElasticsearchSink::open(url, index, schema.clone()).await?;
            let invalid = |m: String| ConnectorError::invalid("elasticsearch", m);
            if let Some(t) = transform.and_then(Transform::document_id_template) {
                sink = sink.with_document_id(t.clone()).map_err(invalid)?;
            }
            if let Some(t) = transform.and_then(Transform::index_name_template) {
                sink = sink.with_index_name(t.clone()).map_err(invalid)?;
            }
            Backend::Sink {
                sink: Arc::new(sink),
                dynamo: None,
                segments,
            }
        }
        Store::S3 {
            bucket,
            prefix,
            endpoint,
            region,
        } => Backend::Sink {
            sink: Arc::new(
                env.s3(bucket, prefix, endpoint.as_deref(), region.as_deref())
                    .await?,
            ),
            dynamo: None,
            segments,
        },
        Store::Sqlite {
            table, database, ..
        } => Backend::Sink {
            sink: Arc::new(env.sqlite(database.as_deref())?.sink(table)),
            dynamo: None,
            segments,
        },
        Store::Kafka { topic, brokers } => {
            let brokers = brokers
                .as_deref()
                .or(env.kafka_brokers.as_deref())
                .ok_or_else(|| {
                    ConnectorError::invalid(
                        "kafka",
                        "the topic names no bootstrap_servers and none are configured (kafka_brokers)",
                    )
                })?;
            tidemark_connectors::kafka::topic_partitions(brokers, topic, Duration::from_secs(10))
                .await?;
            // Read only: the format matters to writing, not to reading.
            Backend::Sink {
                sink: Arc::new(KafkaSink::connect(
                    brokers,
                    topic,
                    schema.clone(),
                    KafkaFormat::default(),
                )?),
                dynamo: None,
                segments,
            }
        }
    })
}

impl Side {
    pub fn versions_known(&self) -> bool {
        self.0.versions_known
    }

    fn entry(&self, key: Key, version: u64, item: Item) -> Option<Entry> {
        let mut entry = match &self.0.shaper {
            Some(s) => s.shape(&key, version, item)?,
            None => Entry { key, version, item },
        };
        // The version attribute is compared as the version; some sinks keep
        // it in the item and some (DynamoDB) store it as their own version.
        if let Some(a) = &self.0.version_attribute {
            entry.item.remove(a);
        }
        Some(entry)
    }

    /// The key this side stores for a key in the target's form.
    fn own_key(&self, key: &Key) -> Key {
        if self.0.reverse_renames.is_empty() {
            return key.clone();
        }
        Key(key
            .0
            .iter()
            .map(|(n, v)| {
                (
                    self.0.reverse_renames.get(n).unwrap_or(n).clone(),
                    v.clone(),
                )
            })
            .collect())
    }

    /// A key in the form this side stores it (the source's names for the
    /// source), for the replicator's Repair.
    pub fn stored_key(&self, key: &Key) -> Key {
        self.own_key(key)
    }

    /// Hands every entry to `consumer`, in batches, segments in parallel.
    ///
    /// # Errors
    /// The first scan or read that failed.
    pub async fn walk(&self, consumer: Consumer) -> ConnectorResult<()> {
        match &self.0.backend {
            Backend::Table {
                table, segments, ..
            } => self.scan_segments(table, *segments, false, consumer).await,
            // A DynamoDB sink is a table with Tidemark's version attribute
            // and tombstones: scanned in parallel segments like a source.
            Backend::Sink {
                dynamo: Some(t),
                segments,
                ..
            } => {
                let table: Arc<dyn SourceTable> = Arc::new(t.clone());
                self.scan_segments(&table, *segments, true, consumer).await
            }
            Backend::Sink { sink, .. } => {
                let mut batch = Vec::with_capacity(BATCH);
                sink.entries(&mut |key, version, item| {
                    if let Some(e) = self.entry(key, version, item) {
                        batch.push(e);
                        if batch.len() >= BATCH {
                            consumer(std::mem::take(&mut batch));
                        }
                    }
                })
                .await?;
                consumer(batch);
                Ok(())
            }
        }
    }

    /// Scans `table` in `segments` parallel segments, each page's entries
    /// handed to `consumer`. `sink_items`: the items carry a DynamoDB sink's
    /// version attribute and tombstone marker.
    async fn scan_segments(
        &self,
        table: &Arc<dyn SourceTable>,
        segments: u32,
        sink_items: bool,
        consumer: Consumer,
    ) -> ConnectorResult<()> {
        use tidemark_connectors::dynamodb::{DELETED_ATTRIBUTE, VERSION_ATTRIBUTE};
        let mut tasks = tokio::task::JoinSet::new();
        for segment in 0..segments {
            let table = table.clone();
            let side = self.clone();
            let consumer = consumer.clone();
            tasks.spawn(async move {
                let schema = table.key_schema().clone();
                let mut request = ScanRequest::segment(segment, segments);
                // A sink's items must be read as written, like its `read`.
                request.consistent = sink_items;
                loop {
                    let page = table.scan(&request).await?;
                    let mut batch = Vec::with_capacity(page.items.len());
                    for mut item in page.items {
                        let key = schema
                            .key_of(&item)
                            .map_err(|m| ConnectorError::terminal("verifier", m))?;
                        let mut version = 0;
                        if sink_items {
                            version = item
                                .remove(VERSION_ATTRIBUTE)
                                .and_then(|v| v.as_number().and_then(Number::as_u64))
                                .unwrap_or(0);
                            if item.remove(DELETED_ATTRIBUTE).is_some() {
                                continue;
                            }
                        }
                        batch.extend(side.entry(key, version, item));
                    }
                    consumer(batch);
                    match page.last_key {
                        Some(k) => request.start_after = Some(k),
                        None => return Ok::<(), ConnectorError>(()),
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| ConnectorError::terminal("verifier", e.to_string()))??;
        }
        Ok(())
    }

    /// The entries whose key (in the target's form) falls in a wanted bucket.
    ///
    /// # Errors
    /// The first scan or read that failed.
    pub async fn bucket_entries(
        &self,
        buckets: u32,
        wanted: &BTreeSet<u32>,
    ) -> ConnectorResult<Vec<Entry>> {
        let n = u64::from(buckets);
        if let Backend::Sink {
            sink, dynamo: None, ..
        } = &self.0.backend
            && !self.0.renames_keys
        {
            return Ok(sink
                .bucket_entries(buckets, wanted)
                .await?
                .into_iter()
                .filter_map(|(k, v, i)| self.entry(k, v, i))
                .collect());
        }
        let found = Arc::new(Mutex::new(Vec::new()));
        let wanted = Arc::new(wanted.clone());
        let sink = found.clone();
        self.walk(Arc::new(move |batch: Vec<Entry>| {
            let mut keep: Vec<Entry> = batch
                .into_iter()
                .filter(|e| wanted.contains(&bucket_of(&e.key, n)))
                .collect();
            if !keep.is_empty() {
                sink.lock().expect("bucket entries lock").append(&mut keep);
            }
        }))
        .await?;
        let out = std::mem::take(&mut *found.lock().expect("bucket entries lock"));
        Ok(out)
    }

    /// The current entry of one key (in the target's form), read strongly
    /// consistent where the store offers it.
    ///
    /// # Errors
    /// What the read fails with.
    pub async fn read(&self, key: &Key) -> ConnectorResult<Option<Entry>> {
        let own = self.own_key(key);
        Ok(match &self.0.backend {
            Backend::Table { table, .. } => table
                .get(&own)
                .await?
                .and_then(|item| self.entry(own, 0, item)),
            Backend::Sink { sink, .. } => sink
                .read(&own)
                .await?
                .and_then(|(version, item)| self.entry(own, version, item)),
        })
    }

    /// Items of this side matching a predicate, counted where they live:
    /// DynamoDB evaluates the expression as given, the embedded store
    /// evaluates its parsed form. Counts raw items, not shaped ones.
    ///
    /// # Errors
    /// `InvalidInput` for a side that cannot evaluate predicates; what the
    /// scan fails with.
    pub async fn count_matching(
        &self,
        expression: &str,
        names: &HashMap<String, String>,
        values: &HashMap<String, AttrValue>,
        parsed: &Predicate,
    ) -> ConnectorResult<u64> {
        match &self.0.backend {
            Backend::Table {
                dynamo: Some(t),
                segments,
                ..
            } => count_dynamo(t, expression, names, values, *segments).await,
            Backend::Sink {
                dynamo: Some(t),
                segments,
                ..
            } => {
                // Tombstones are items of a DynamoDB sink too.
                let mut names = names.clone();
                names.insert(
                    "#tidemark_deleted".to_owned(),
                    tidemark_connectors::dynamodb::DELETED_ATTRIBUTE.to_owned(),
                );
                let expression =
                    format!("({expression}) AND attribute_not_exists(#tidemark_deleted)");
                count_dynamo(t, &expression, &names, values, *segments).await
            }
            Backend::Table { table, .. } => {
                let schema = table.key_schema().clone();
                let mut request = ScanRequest::segment(0, 1);
                request.filter = Some(parsed.clone());
                let mut count = 0;
                loop {
                    let page = table.scan(&request).await?;
                    count += page
                        .items
                        .iter()
                        .filter(|item| {
                            !matches!(item.get(&schema.partition), Some(AttrValue::S(p)) if p.starts_with(WATERMARK_PREFIX))
                        })
                        .count() as u64;
                    match page.last_key {
                        Some(k) => request.start_after = Some(k),
                        None => return Ok(count),
                    }
                }
            }
            Backend::Sink { sink, .. } => {
                let mut count = 0u64;
                sink.entries(&mut |_, _, item| {
                    if parsed.matches(Some(&item)) {
                        count += 1;
                    }
                })
                .await?;
                Ok(count)
            }
        }
    }
}

async fn count_dynamo(
    table: &DynamoTable,
    expression: &str,
    names: &HashMap<String, String>,
    values: &HashMap<String, AttrValue>,
    segments: u32,
) -> ConnectorResult<u64> {
    let counts = futures::future::try_join_all(
        (0..segments).map(|s| table.count_where(expression, names, values, s, segments)),
    )
    .await?;
    Ok(counts.into_iter().sum())
}

/// The embedded database file of `database` under `data_dir` (for tests
/// that write where the verifier reads).
pub fn sqlite_path(data_dir: &Path, database: Option<&str>) -> PathBuf {
    data_dir.join(format!(
        "{}.db",
        database.filter(|d| !d.is_empty()).unwrap_or("default")
    ))
}
