//! An Elasticsearch index as a versioned [`Sink`], over the plain REST API.
//!
//! - **Document ids**: the key's attributes in [`KeySchema`] order (partition,
//!   then sort), each as [`AttrValue::key_text`] with `\` and `#` escaped by a
//!   backslash, joined by `#`: `{documentType}#{documentId}`. Key attribute
//!   types are fixed per table, so `N 1` and `S "1"` never meet in one index.
//! - **Versions**: every write is an `index` action with
//!   `version_type=external` and the record's version, so an older or
//!   replayed write is a per-item 409, reported as [`RecordOutcome::Stale`].
//! - **Tombstones**: Elasticsearch forgets deleted versions after
//!   `index.gc_deletes` (60 s), so a delete is written as a tombstone
//!   document at the delete's version (`_tidemark_deleted: true` and the
//!   time it was written, no item fields) and an older upsert arriving later
//!   is still a 409. [`Sink::read`] and [`Sink::digest`] ignore tombstones.
//! - **Aliases** (issue #18): the sink's index name is an alias over a
//!   backing index `<name>-tm-<n>`, the alias's write index, with a filter
//!   that excludes tombstones, so a user's plain `GET <name>/_search` or
//!   `_count` sees live documents only. Writes go through the alias into the
//!   backing index (`require_alias`, so a vanished alias is an error rather
//!   than a new plain index), where tombstones still refuse older versions;
//!   gets by id ignore alias filters and see tombstones as such. The mapping
//!   is also a composable index template (`tidemark-<name>` over
//!   `<name>-tm-*`). A name that is a plain index is refused
//!   (`Precondition`, the fix in the message) unless the sink is opened with
//!   [`ElasticsearchSink::adopt`]. Searching the backing indexes directly
//!   (`<name>-tm-*`, or a wildcard such as `content-*` that matches both)
//!   sees the tombstones: filter with [`ElasticsearchSink::live_filter`].
//! - **Purge**: tombstones written longer ago than a retention well past
//!   the change feed's are deleted by [`ElasticsearchSink::purge_tombstones`],
//!   which the replicator schedules.
//! - **Values**: each attribute is also indexed as plain JSON for search
//!   (numbers as JSON numbers when an `i64` or `f64` holds them exactly,
//!   otherwise strings; binaries as base64; sets as arrays), while the exact
//!   item is kept as canonical DynamoDB JSON in `_tidemark_item`, a field
//!   that is neither indexed nor in doc values, and `read` returns that.
//!
//! By concern: `client` (the HTTP client, URLs, error classification),
//! `index` (the mapping, the index template, index-name templates), `alias`
//! (backing indexes behind aliases, adopting a plain index), `purge` (old
//! tombstones), `ids`
//! (document ids), `document` (the `_bulk` lines of a record and reading a
//! source back), `bulk` (the writer and its response), `read` (gets,
//! searches, counts, the digest walk).
//!
//! [`AttrValue::key_text`]: crate::value::AttrValue::key_text

mod alias;
mod bulk;
mod client;
mod document;
mod ids;
mod index;
mod purge;
mod read;
mod sigv4;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::RetryPolicy;
use crate::traits::{BucketDigest, RecordOutcome, Sink, SinkRecord};
use crate::transform::Template;
use crate::value::{Item, Key, KeySchema};

pub use alias::backing_index;
pub use client::{
    API_KEY_ENV, Credentials, PASSWORD_ENV, SIGV4_ENV, SIGV4_REGION_ENV, USERNAME_ENV,
};
pub use document::{bulk_lines, bulk_lines_as, to_plain_json};
pub use ids::{check_key_template, document_id_in};

const BACKEND: &str = "elasticsearch";

/// Exact item, canonical DynamoDB JSON text (not indexed).
pub const ITEM_FIELD: &str = "_tidemark_item";
/// The record's version (also the document's external version).
pub const VERSION_FIELD: &str = "_tidemark_version";
/// `true` on tombstones.
pub const DELETED_FIELD: &str = "_tidemark_deleted";
/// On tombstones: when it was written, epoch milliseconds (the purge's clock).
pub const DELETED_AT_FIELD: &str = "_tidemark_deleted_at";
/// The document id as a keyword: `_id` cannot be sorted on, this can.
pub const KEY_FIELD: &str = "_tidemark_key";

#[derive(Clone)]
pub struct ElasticsearchSink {
    http: reqwest::Client,
    base: reqwest::Url,
    index: String,
    schema: KeySchema,
    /// Names documents instead of the key texts (`{documentType}#{documentId}`):
    /// a template over the key attributes only, so deletes and reads by key
    /// find the same document.
    ids: Option<Template>,
    /// Names each document's index from its key (`content-{documentType}`);
    /// `index` is then the fallback, and reads of the whole sink cover every
    /// index the template can name.
    indexes: Option<Template>,
    /// Indexes this sink has made sure of (created with the mapping).
    ensured: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Extra field mappings for the backing indexes it creates.
    properties: std::sync::Arc<std::sync::Mutex<Map<String, Value>>>,
    retry: RetryPolicy,
    /// Signs each request (AWS SigV4) for managed OpenSearch.
    signer: Option<std::sync::Arc<sigv4::Signer>>,
}

impl ElasticsearchSink {
    /// A sink writing to `index` at `base_url`, creating the alias and its
    /// backing index with the reserved fields' mapping when missing.
    ///
    /// # Errors
    /// `InvalidInput` for an endpoint that is not an http(s) URL;
    /// `Precondition` when `index` is a plain index; the index refused.
    pub async fn connect(base_url: &str, index: &str, schema: KeySchema) -> ConnectorResult<Self> {
        Self::connect_with_mapping(base_url, index, schema, Map::new()).await
    }

    /// Like [`Self::connect`], signing every request with AWS SigV4 for
    /// `service` (`es`: an Amazon OpenSearch Service domain, `aoss`:
    /// OpenSearch Serverless) in `region` with `credentials`, whatever the
    /// environment says ([`SIGV4_ENV`] signs with the SDK's default chain).
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_sigv4(
        base_url: &str,
        index: &str,
        schema: KeySchema,
        service: &str,
        region: &str,
        credentials: aws_credential_types::provider::SharedCredentialsProvider,
    ) -> ConnectorResult<Self> {
        let mut sink = Self::unopened_as(base_url, index, schema, &Credentials::None)?;
        sink.signer = Some(std::sync::Arc::new(sigv4::Signer::with_credentials(
            service,
            region,
            credentials,
        )));
        sink.ensure_index(Map::new()).await?;
        Ok(sink)
    }

    /// Like [`Self::connect`], with extra field mappings (`properties`) for
    /// the item's attributes, used only when a backing index is created.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_with_mapping(
        base_url: &str,
        index: &str,
        schema: KeySchema,
        properties: Map<String, Value>,
    ) -> ConnectorResult<Self> {
        let sink = Self::unopened(base_url, index, schema)?;
        sink.ensure_index(properties).await?;
        Ok(sink)
    }

    pub fn index(&self) -> &str {
        &self.index
    }

    /// A sink over an index that must exist already (a verification reads
    /// it and must not create it): an alias, or a plain index another
    /// writer filled (reads filter tombstones themselves).
    ///
    /// # Errors
    /// `NotFound` when the index does not exist; a malformed URL.
    pub async fn open(base_url: &str, index: &str, schema: KeySchema) -> ConnectorResult<Self> {
        let sink = Self::unopened(base_url, index, schema)?;
        if sink.index_exists().await? {
            Ok(sink)
        } else {
            Err(ConnectorError::NotFound {
                backend: BACKEND,
                message: format!("index {} does not exist", sink.index),
            })
        }
    }

    /// Whether `index` exists at `base_url` as the sink's alias, creating
    /// nothing: a check that the cluster answers before anything is set up
    /// (a validate-only request), where a missing index is one the sink
    /// would create.
    ///
    /// # Errors
    /// `Precondition` when `index` is a plain index ([`Self::connect`]
    /// would refuse it); a malformed URL; a cluster that cannot be reached
    /// or refuses.
    pub async fn probe(base_url: &str, index: &str) -> ConnectorResult<bool> {
        Self::unopened(base_url, index, KeySchema::new(String::new(), None))?
            .probe_alias()
            .await
    }
}

#[async_trait]
impl Sink for ElasticsearchSink {
    fn name(&self) -> String {
        format!("elasticsearch:{}", self.index)
    }

    #[tracing::instrument(skip_all, fields(sink = %self.index, records = batch.len()))]
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        self.apply_bulk(batch).await
    }

    /// Documents are written from the image's encoding.
    fn writes_encoded(&self) -> bool {
        true
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        self.get_live(key).await
    }

    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64> {
        self.purge_keys(keys).await
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        self.digest_live(buckets).await
    }

    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        self.walk_live(visit).await
    }
}
