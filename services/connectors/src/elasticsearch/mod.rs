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
//!   `index.gc_deletes` (60 s) and the local stand-in keeps none at all, so a
//!   delete is written as a tombstone document at the delete's version
//!   (`_tidemark_deleted: true`, no item fields) and an older upsert arriving
//!   later is still a 409. [`Sink::read`] and [`Sink::digest`] ignore
//!   tombstones; queries against the index must filter them out with
//!   [`ElasticsearchSink::live_filter`].
//! - **Values**: each attribute is also indexed as plain JSON for search
//!   (numbers as JSON numbers when an `i64` or `f64` holds them exactly,
//!   otherwise strings; binaries as base64; sets as arrays), while the exact
//!   item is kept as canonical DynamoDB JSON in `_tidemark_item`, a field
//!   that is neither indexed nor in doc values, and `read` returns that.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::{RetryPolicy, retry};
use crate::traits::{BucketDigest, RecordOutcome, Sink, SinkOp, SinkRecord, fold_digest};
use crate::transform::Template;
use crate::value::{AttrValue, Item, Key, KeySchema, Number, canonical_item};

const BACKEND: &str = "elasticsearch";

/// Exact item, canonical DynamoDB JSON text (not indexed).
pub const ITEM_FIELD: &str = "_tidemark_item";
/// The record's version (also the document's external version).
pub const VERSION_FIELD: &str = "_tidemark_version";
/// `true` on tombstones.
pub const DELETED_FIELD: &str = "_tidemark_deleted";
/// The document id as a keyword: `_id` cannot be sorted on, this can.
pub const KEY_FIELD: &str = "_tidemark_key";

/// Most actions in one `_bulk` request.
const MAX_ACTIONS: usize = 1000;
/// Most bytes in one `_bulk` body.
const MAX_BYTES: usize = 10 * 1024 * 1024;
/// Elasticsearch's limit on `_id`.
const MAX_ID_BYTES: usize = 512;
/// Page size of the digest's `search_after` walk.
const PAGE: usize = 1000;

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
    retry: RetryPolicy,
}

impl ElasticsearchSink {
    /// A sink writing to `index` at `base_url`, creating the index with the
    /// reserved fields' mapping when it is missing.
    ///
    /// # Errors
    /// When the URL is malformed or the index cannot be created.
    pub async fn connect(base_url: &str, index: &str, schema: KeySchema) -> ConnectorResult<Self> {
        Self::connect_with_mapping(base_url, index, schema, Map::new()).await
    }

    /// Like [`Self::connect`], with extra field mappings (`properties`) for
    /// the item's attributes, used only when the index is created.
    ///
    /// # Errors
    /// When the URL is malformed or the index cannot be created.
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
    /// it and must not create it).
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

    /// Whether `index` exists at `base_url`, creating nothing: a check that
    /// the cluster answers before anything is set up (a validate-only
    /// request), where a missing index is one the sink would create.
    ///
    /// # Errors
    /// A malformed URL, or a cluster that cannot be reached or refuses.
    pub async fn probe(base_url: &str, index: &str) -> ConnectorResult<bool> {
        Self::unopened(base_url, index, KeySchema::new(String::new(), None))?
            .index_exists()
            .await
    }

    /// The client, before anything is asked of the cluster.
    fn unopened(base_url: &str, index: &str, schema: KeySchema) -> ConnectorResult<Self> {
        let base = reqwest::Url::parse(base_url)
            .map_err(|e| ConnectorError::invalid(BACKEND, format!("bad url {base_url:?}: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))?;
        Ok(Self {
            http,
            base,
            index: index.to_owned(),
            schema,
            ids: None,
            indexes: None,
            ensured: std::sync::Arc::default(),
            retry: RetryPolicy::default(),
        })
    }

    async fn index_exists(&self) -> ConnectorResult<bool> {
        let url = self.url(&[&self.index]);
        retry(&self.retry, "head index", || async {
            let response = self
                .http
                .head(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            match response.status() {
                s if s.is_success() => Ok(true),
                reqwest::StatusCode::NOT_FOUND => Ok(false),
                s => Err(status_error(s, "")),
            }
        })
        .await
    }

    /// A query clause that keeps live documents only: add it to every query
    /// against the index, tombstones are documents too.
    pub fn live_filter() -> Value {
        json!({"bool": {"must_not": [{"term": {DELETED_FIELD: true}}]}})
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http urls have paths")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Creates the index with the reserved fields' mapping plus
    /// `properties`, unless it exists already (its mapping is left alone).
    ///
    /// # Errors
    /// When Elasticsearch refuses the index or cannot be reached.
    #[tracing::instrument(skip_all, fields(index = %self.index))]
    pub async fn ensure_index(&self, properties: Map<String, Value>) -> ConnectorResult<()> {
        self.create_index(&self.index, properties).await
    }

    async fn create_index(
        &self,
        name: &str,
        mut properties: Map<String, Value>,
    ) -> ConnectorResult<()> {
        properties.insert(
            ITEM_FIELD.to_owned(),
            json!({"type": "keyword", "index": false, "doc_values": false}),
        );
        properties.insert(VERSION_FIELD.to_owned(), json!({"type": "long"}));
        properties.insert(DELETED_FIELD.to_owned(), json!({"type": "boolean"}));
        properties.insert(KEY_FIELD.to_owned(), json!({"type": "keyword"}));
        let body = json!({"mappings": {"properties": properties}});
        let url = self.url(&[name]);
        retry(&self.retry, "create index", || async {
            let response = self
                .http
                .put(url.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let text = response.text().await.unwrap_or_default();
            if text.contains("resource_already_exists_exception") {
                return Ok(());
            }
            Err(status_error(status, &text))
        })
        .await
    }

    /// Makes every acknowledged write visible to search (tests, digests).
    ///
    /// # Errors
    /// When Elasticsearch cannot be reached or the index is missing.
    pub async fn refresh(&self) -> ConnectorResult<()> {
        let url = self.url(&[&self.search_target(), "_refresh"]);
        retry(&self.retry, "refresh", || async {
            let response = self
                .http
                .post(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(status_error(
                    status,
                    &response.text().await.unwrap_or_default(),
                ))
            }
        })
        .await
    }

    /// The document id of `key`: key texts in schema order, `#`-joined.
    ///
    /// # Errors
    /// When the key does not match the schema.
    pub fn document_id(&self, key: &Key) -> Result<String, String> {
        match &self.ids {
            None => document_id_in(&self.schema, key),
            Some(template) => {
                let id = template.render(&key.0)?;
                if id.is_empty() || id.len() > MAX_ID_BYTES {
                    return Err(format!(
                        "document id {id:.64?} must be 1 to {MAX_ID_BYTES} bytes"
                    ));
                }
                Ok(id)
            }
        }
    }

    /// Puts each document in the index `template` names from its key
    /// attributes (only those: a delete or read knows only the key). The
    /// sink's own index stays the fallback and is searched with the rest.
    ///
    /// # Errors
    /// A template naming an attribute that is not part of the key.
    pub fn with_index_name(mut self, template: Template) -> Result<Self, String> {
        let key: std::collections::BTreeSet<&str> = self.schema.names().collect();
        if let Some(a) = template.attributes().find(|a| !key.contains(a)) {
            return Err(format!(
                "an index name template may name only key attributes {key:?}, not {a:?}: a delete knows only the key"
            ));
        }
        self.indexes = Some(template);
        Ok(self)
    }

    /// The index of the document with this key.
    ///
    /// # Errors
    /// A rendered name Elasticsearch would refuse.
    pub fn index_of(&self, key: &Key) -> Result<std::borrow::Cow<'_, str>, String> {
        let Some(t) = &self.indexes else {
            return Ok(std::borrow::Cow::Borrowed(&self.index));
        };
        let name = t.render(&key.0)?;
        let bad = name.is_empty()
            || name.len() > 255
            || name.starts_with(['-', '_', '+', '.'])
            || name.chars().any(|c| {
                c.is_uppercase()
                    || matches!(
                        c,
                        '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
                    )
            });
        if bad {
            return Err(format!(
                "index name {name:?} is not valid in Elasticsearch (lowercase, no spaces or \\/*?\"<>|,#:)"
            ));
        }
        Ok(std::borrow::Cow::Owned(name))
    }

    /// What searches of the whole sink name: its index, and the pattern of
    /// the templated ones.
    fn search_target(&self) -> String {
        match &self.indexes {
            None => self.index.clone(),
            Some(t) => format!("{},{}", t.pattern(), self.index),
        }
    }

    /// Creates a templated index the first time this sink writes to it.
    async fn ensure_named(&self, name: &str) -> ConnectorResult<()> {
        if name == self.index
            || self
                .ensured
                .lock()
                .expect("ensured indexes lock")
                .contains(name)
        {
            return Ok(());
        }
        self.create_index(name, Map::new()).await?;
        self.ensured
            .lock()
            .expect("ensured indexes lock")
            .insert(name.to_owned());
        Ok(())
    }

    /// Names documents by `template` over the key attributes (each must be
    /// named, so two items never share a document) instead of the key texts.
    ///
    /// # Errors
    /// A template naming an attribute that is not part of the key, or
    /// leaving one out.
    pub fn with_document_id(mut self, template: Template) -> Result<Self, String> {
        check_key_template(&template, &self.schema)?;
        self.ids = Some(template);
        Ok(self)
    }

    /// Sends one `_bulk` body; one (status, reason) per action, in order.
    async fn send_bulk(
        &self,
        body: bytes::Bytes,
        actions: usize,
    ) -> ConnectorResult<Vec<(u16, String)>> {
        let url = self.url(&["_bulk"]);
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| request_error(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| request_error(&e))?;
        if !status.is_success() {
            return Err(status_error(status, &String::from_utf8_lossy(&bytes)));
        }
        bulk_outcomes(&bytes, actions)
    }

    /// Applies one chunk (its body, and each record's index and byte range
    /// in it) as one request, retrying items that were throttled or failed
    /// on the server side.
    async fn apply_chunk(
        &self,
        body: &[u8],
        entries: &[(usize, std::ops::Range<usize>)],
        outcomes: &mut [Option<RecordOutcome>],
    ) -> ConnectorResult<()> {
        let mut pending: Vec<&(usize, std::ops::Range<usize>)> = entries.iter().collect();
        // The first attempt sends the chunk as built; retries only the items
        // still failing.
        let mut request = bytes::Bytes::copy_from_slice(body);
        let mut attempt = 0;
        loop {
            let results = retry(&self.retry, "bulk", || {
                self.send_bulk(request.clone(), pending.len())
            })
            .await?;
            let mut again = Vec::new();
            let mut last_reason = String::new();
            for (entry, (status, reason)) in pending.iter().zip(results) {
                outcomes[entry.0] = match status {
                    200..=299 => Some(RecordOutcome::Applied),
                    409 => Some(RecordOutcome::Stale),
                    429 | 500..=599 => {
                        last_reason = reason;
                        again.push(*entry);
                        None
                    }
                    _ => Some(RecordOutcome::Rejected(reason)),
                };
            }
            if again.is_empty() {
                return Ok(());
            }
            attempt += 1;
            if attempt >= self.retry.max_attempts {
                return Err(ConnectorError::Retryable {
                    backend: BACKEND,
                    message: format!("{} bulk items still failing: {last_reason}", again.len()),
                    retry_after: None,
                });
            }
            tracing::debug!(items = again.len(), attempt, "retrying bulk items");
            tokio::time::sleep(self.retry.delay(attempt)).await;
            let mut retried = Vec::with_capacity(again.iter().map(|(_, r)| r.len()).sum());
            for (_, range) in &again {
                retried.extend_from_slice(&body[range.clone()]);
            }
            request = bytes::Bytes::from(retried);
            pending = again;
        }
    }

    async fn search(&self, body: &Value) -> ConnectorResult<Value> {
        let url = self.url(&[&self.search_target(), "_search"]);
        retry(&self.retry, "search", || async {
            let response = self
                .http
                .post(url.clone())
                .json(body)
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| request_error(&e))?;
            if !status.is_success() {
                return Err(status_error(status, &text));
            }
            serde_json::from_str(&text).map_err(|e| {
                ConnectorError::terminal(BACKEND, format!("bad _search response: {e}"))
            })
        })
        .await
    }

    /// Live documents, tombstones excluded (refreshes first).
    ///
    /// # Errors
    /// When Elasticsearch cannot be reached or the index is missing.
    pub async fn count(&self) -> ConnectorResult<u64> {
        self.refresh().await?;
        let url = self.url(&[&self.search_target(), "_count"]);
        let body = json!({"query": Self::live_filter()});
        retry(&self.retry, "count", || async {
            let response = self
                .http
                .post(url.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| request_error(&e))?;
            if !status.is_success() {
                return Err(status_error(status, &text));
            }
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("count").and_then(Value::as_u64))
                .ok_or_else(|| {
                    ConnectorError::terminal(BACKEND, format!("bad _count response: {text:.200}"))
                })
        })
        .await
    }
}

fn is_reserved(name: &str) -> bool {
    name.starts_with("_tidemark_")
}

/// The document id of `key` under `schema`: key texts in schema order,
/// `#`-joined, `#` and `\` escaped by a backslash.
///
/// # Errors
/// When the key does not match the schema or the id is too long.
pub fn document_id_in(schema: &KeySchema, key: &Key) -> Result<String, String> {
    if key.0.len() != schema.names().count() {
        return Err(format!("key {key} does not match the key schema"));
    }
    let mut id = String::new();
    for (i, name) in schema.names().enumerate() {
        let text = key
            .get(name)
            .and_then(AttrValue::key_text)
            .ok_or_else(|| format!("key {key} lacks a scalar {name:?}"))?;
        if i > 0 {
            id.push('#');
        }
        for c in text.chars() {
            if c == '#' || c == '\\' {
                id.push('\\');
            }
            id.push(c);
        }
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "document id of {} bytes exceeds Elasticsearch's {MAX_ID_BYTES}",
            id.len()
        ));
    }
    Ok(id)
}

/// Checks that a document-id template names every key attribute of
/// `schema` and nothing else.
///
/// # Errors
/// What is missing or extra.
pub fn check_key_template(template: &Template, schema: &KeySchema) -> Result<(), String> {
    let named: std::collections::BTreeSet<&str> = template.attributes().collect();
    let key: std::collections::BTreeSet<&str> = schema.names().collect();
    if named == key {
        Ok(())
    } else {
        Err(format!(
            "a document id template must name exactly the key attributes {key:?} (it names {named:?}): reads and deletes know only the key, and two items must never share a document"
        ))
    }
}

/// Appends to `out` the `_bulk` action and source lines that the sink sends
/// for `record` into `index`: an `index` action at the record's external
/// version, and the item as plain JSON plus the reserved fields (a
/// tombstone for a delete). Appends nothing when the record cannot be sent.
///
/// # Errors
/// Why the record cannot be sent (a key off the schema, a version above a
/// long, an attribute under the reserved prefix).
pub fn bulk_lines(
    index: &str,
    schema: &KeySchema,
    record: &SinkRecord,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let id = document_id_in(schema, &record.key)?;
    bulk_lines_as(index, &id, record, out)
}

/// Like [`bulk_lines`] for a document id computed by the caller.
///
/// # Errors
/// A version above a long, an attribute under the reserved prefix.
pub fn bulk_lines_as(
    index: &str,
    id: &str,
    record: &SinkRecord,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    use std::io::Write as _;
    let version = i64::try_from(record.version)
        .map_err(|_| format!("version {} exceeds a long", record.version))?;
    if let SinkOp::Upsert(item) = &record.op
        && let Some(name) = item.keys().find(|n| is_reserved(n))
    {
        return Err(format!(
            "attribute {name:?} uses the reserved prefix _tidemark_"
        ));
    }
    out.extend_from_slice(b"{\"index\":{\"_index\":");
    json(out, index);
    out.extend_from_slice(b",\"_id\":");
    json(out, id);
    let _ = write!(
        out,
        ",\"version\":{version},\"version_type\":\"external\"}}}}\n{{"
    );
    match &record.op {
        SinkOp::Upsert(item) => {
            for (name, value) in item {
                json(out, name.as_str());
                out.push(b':');
                json(out, &Plain(value));
                out.push(b',');
            }
            json(out, ITEM_FIELD);
            out.push(b':');
            json(out, canonical_item(item).as_str());
        }
        SinkOp::Delete => {
            json(out, DELETED_FIELD);
            out.extend_from_slice(b":true");
        }
    }
    out.push(b',');
    json(out, VERSION_FIELD);
    let _ = write!(out, ":{version},");
    json(out, KEY_FIELD);
    out.push(b':');
    json(out, id);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// `v` as JSON, appended to `out` (writing into a `Vec` cannot fail, and
/// these values always serialise).
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("plain values always serialise");
}

/// An attribute value serialised as [`to_plain_json`] renders it, without
/// building the intermediate [`Value`].
struct Plain<'a>(&'a AttrValue);

struct PlainNumber<'a>(&'a Number);

struct Base64<'a>(&'a [u8]);

impl serde::Serialize for Plain<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            AttrValue::S(v) => s.serialize_str(v),
            AttrValue::N(n) => PlainNumber(n).serialize(s),
            AttrValue::B(b) => Base64(b).serialize(s),
            AttrValue::Bool(b) => s.serialize_bool(*b),
            AttrValue::Null(_) => s.serialize_unit(),
            AttrValue::Ss(set) => s.collect_seq(set),
            AttrValue::Ns(set) => s.collect_seq(set.iter().map(PlainNumber)),
            AttrValue::Bs(set) => s.collect_seq(set.iter().map(|b| Base64(b))),
            AttrValue::L(list) => s.collect_seq(list.iter().map(Plain)),
            AttrValue::M(map) => s.collect_map(map.iter().map(|(k, v)| (k, Plain(v)))),
        }
    }
}

impl serde::Serialize for PlainNumber<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match number_json(self.0) {
            Value::Number(n) => n.serialize(s),
            other => other.serialize(s),
        }
    }
}

impl serde::Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

/// One (status, reason) per action of a `_bulk` response, in order.
///
/// # Errors
/// A response that is not a `_bulk` answer to `actions` actions.
fn bulk_outcomes(body: &[u8], actions: usize) -> ConnectorResult<Vec<(u16, String)>> {
    #[derive(serde::Deserialize)]
    struct Response {
        items: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(alias = "create", alias = "update", alias = "delete")]
        index: Outcome,
    }
    #[derive(serde::Deserialize)]
    struct Outcome {
        status: Option<u64>,
        error: Option<Value>,
    }
    let bad = || {
        ConnectorError::terminal(
            BACKEND,
            format!(
                "_bulk answered {actions} actions with {:.200}",
                String::from_utf8_lossy(body)
            ),
        )
    };
    let parsed: Response = serde_json::from_slice(body)
        .map_err(|e| ConnectorError::terminal(BACKEND, format!("bad _bulk response: {e}")))?;
    if parsed.items.len() != actions {
        return Err(bad());
    }
    Ok(parsed
        .items
        .into_iter()
        .map(|entry| {
            let status = entry
                .index
                .status
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(500);
            let reason = entry
                .index
                .error
                .map(|e| {
                    let kind = e.get("type").and_then(Value::as_str).unwrap_or("error");
                    let why = e.get("reason").and_then(Value::as_str).unwrap_or_default();
                    format!("{kind}: {why}")
                })
                .unwrap_or_default();
            (status, reason)
        })
        .collect())
}

/// The live (version, item) of a document source, `None` for a tombstone.
fn live_of(source: &Value) -> ConnectorResult<Option<(u64, Item)>> {
    if source.get(DELETED_FIELD).and_then(Value::as_bool) == Some(true) {
        return Ok(None);
    }
    let bad = |what: &str| {
        ConnectorError::terminal(
            BACKEND,
            format!("document without {what}: not written by this sink"),
        )
    };
    let version = source
        .get(VERSION_FIELD)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(VERSION_FIELD))?;
    let text = source
        .get(ITEM_FIELD)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(ITEM_FIELD))?;
    let item: Item = serde_json::from_str(text)
        .map_err(|e| ConnectorError::terminal(BACKEND, format!("bad {ITEM_FIELD}: {e}")))?;
    Ok(Some((version, item)))
}

/// Plain JSON for search: numbers as numbers when exact, otherwise strings.
pub fn to_plain_json(value: &AttrValue) -> Value {
    use base64::Engine as _;
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    match value {
        AttrValue::S(s) => Value::String(s.clone()),
        AttrValue::N(n) => number_json(n),
        AttrValue::B(b) => b64(b),
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Null(_) => Value::Null,
        AttrValue::Ss(set) => set.iter().cloned().map(Value::String).collect(),
        AttrValue::Ns(set) => set.iter().map(number_json).collect(),
        AttrValue::Bs(set) => set.iter().map(|b| b64(b)).collect(),
        AttrValue::L(list) => list.iter().map(to_plain_json).collect(),
        AttrValue::M(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_plain_json(v)))
                .collect(),
        ),
    }
}

fn number_json(n: &Number) -> Value {
    if let Some(i) = n.as_i64() {
        return json!(i);
    }
    // Exact only when the f64 prints back to the same normalised decimal.
    if let Ok(f) = n.as_str().parse::<f64>()
        && f.is_finite()
        && Number::parse(&f.to_string()).is_ok_and(|back| &back == n)
        && let Some(num) = serde_json::Number::from_f64(f)
    {
        return Value::Number(num);
    }
    Value::String(n.as_str().to_owned())
}

fn request_error(e: &reqwest::Error) -> ConnectorError {
    if e.is_timeout() || e.is_connect() || e.is_request() || e.is_body() {
        ConnectorError::Retryable {
            backend: BACKEND,
            message: e.to_string(),
            retry_after: None,
        }
    } else {
        ConnectorError::terminal(BACKEND, e.to_string())
    }
}

fn status_error(status: reqwest::StatusCode, text: &str) -> ConnectorError {
    let mut message = format!("{status}");
    let _ = write!(message, ": {text:.500}");
    match status.as_u16() {
        429 | 500..=599 => ConnectorError::Retryable {
            backend: BACKEND,
            message,
            retry_after: None,
        },
        404 => ConnectorError::NotFound {
            backend: BACKEND,
            message,
        },
        400 => ConnectorError::invalid(BACKEND, message),
        _ => ConnectorError::terminal(BACKEND, message),
    }
}

#[async_trait]
impl Sink for ElasticsearchSink {
    fn name(&self) -> String {
        format!("elasticsearch:{}", self.index)
    }

    #[tracing::instrument(skip_all, fields(sink = %self.index, records = batch.len()))]
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        // One body per chunk, each record's lines a range of it.
        let mut body: Vec<u8> = Vec::new();
        let mut entries: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, record) in batch.iter().enumerate() {
            let start = body.len();
            let index = match self.index_of(&record.key) {
                Ok(index) => index,
                Err(reason) => {
                    outcomes[i] = Some(RecordOutcome::Rejected(reason));
                    continue;
                }
            };
            self.ensure_named(&index).await?;
            let lines = self
                .document_id(&record.key)
                .and_then(|id| bulk_lines_as(&index, &id, record, &mut body));
            if let Err(reason) = lines {
                body.truncate(start);
                outcomes[i] = Some(RecordOutcome::Rejected(reason));
                continue;
            }
            let len = body.len() - start;
            if !entries.is_empty() && (entries.len() >= MAX_ACTIONS || body.len() > MAX_BYTES) {
                // This record starts the next chunk.
                let lines = body.split_off(start);
                self.apply_chunk(&body, &entries, &mut outcomes).await?;
                body = lines;
                entries.clear();
            }
            entries.push((i, body.len() - len..body.len()));
        }
        if !entries.is_empty() {
            self.apply_chunk(&body, &entries, &mut outcomes).await?;
        }
        let stale = outcomes
            .iter()
            .filter(|o| matches!(o, Some(RecordOutcome::Stale)))
            .count();
        tracing::debug!(stale, "bulk applied");
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every record has an outcome"))
            .collect())
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let id = self
            .document_id(key)
            .map_err(|m| ConnectorError::invalid(BACKEND, m))?;
        let index = self
            .index_of(key)
            .map_err(|m| ConnectorError::invalid(BACKEND, m))?;
        let url = self.url(&[&index, "_doc", &id]);
        let doc: Value = retry(&self.retry, "get", || async {
            let response = self
                .http
                .get(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| request_error(&e))?;
            let parsed: Option<Value> = serde_json::from_str(&text).ok();
            // A missing document is a 404 with `found: false`; a missing index is an error.
            if status.is_success()
                || parsed
                    .as_ref()
                    .is_some_and(|v| v.get("found").and_then(Value::as_bool) == Some(false))
            {
                return parsed.ok_or_else(|| {
                    ConnectorError::terminal(BACKEND, format!("bad _doc response: {text:.200}"))
                });
            }
            Err(status_error(status, &text))
        })
        .await?;
        if doc.get("found").and_then(Value::as_bool) != Some(true) {
            return Ok(None);
        }
        live_of(doc.get("_source").unwrap_or(&Value::Null))
    }

    /// Walks the live documents sorted by [`KEY_FIELD`] with `search_after`,
    /// after a refresh so every acknowledged write is seen.
    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        if buckets == 0 {
            return Err(ConnectorError::invalid(
                BACKEND,
                "buckets must be at least 1",
            ));
        }
        self.refresh().await?;
        let mut out = vec![BucketDigest::default(); buckets as usize];
        let mut after: Option<Value> = None;
        loop {
            let mut body = json!({
                "size": PAGE,
                "query": Self::live_filter(),
                "sort": [{KEY_FIELD: "asc"}],
                "_source": [ITEM_FIELD, VERSION_FIELD, DELETED_FIELD],
            });
            if let Some(a) = &after {
                body["search_after"] = a.clone();
            }
            let page = self.search(&body).await?;
            let hits = page
                .pointer("/hits/hits")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for hit in &hits {
                if let Some((version, item)) = live_of(hit.get("_source").unwrap_or(&Value::Null))?
                {
                    let key = self
                        .schema
                        .key_of(&item)
                        .map_err(|m| ConnectorError::terminal(BACKEND, m))?;
                    fold_digest(&mut out, &key, version, &item);
                }
            }
            if hits.len() < PAGE {
                return Ok(out);
            }
            after = hits.last().and_then(|h| h.get("sort")).cloned();
            if after.is_none() {
                return Err(ConnectorError::terminal(
                    BACKEND,
                    "search hits without sort values",
                ));
            }
        }
    }

    /// The digest's walk: live documents by [`KEY_FIELD`] with
    /// `search_after`, after a refresh.
    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        self.refresh().await?;
        let mut after: Option<Value> = None;
        loop {
            let mut body = json!({
                "size": PAGE,
                "query": Self::live_filter(),
                "sort": [{KEY_FIELD: "asc"}],
                "_source": [ITEM_FIELD, VERSION_FIELD, DELETED_FIELD],
            });
            if let Some(a) = &after {
                body["search_after"] = a.clone();
            }
            let mut page = self.search(&body).await?;
            let hits = match page.pointer_mut("/hits/hits").map(Value::take) {
                Some(Value::Array(hits)) => hits,
                _ => Vec::new(),
            };
            for hit in &hits {
                if let Some((version, item)) = live_of(hit.get("_source").unwrap_or(&Value::Null))?
                {
                    let key = self
                        .schema
                        .key_of(&item)
                        .map_err(|m| ConnectorError::terminal(BACKEND, m))?;
                    visit(key, version, item);
                }
            }
            if hits.len() < PAGE {
                return Ok(());
            }
            after = hits.last().and_then(|h| h.get("sort")).cloned();
            if after.is_none() {
                return Err(ConnectorError::terminal(
                    BACKEND,
                    "search hits without sort values",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> ElasticsearchSink {
        ElasticsearchSink::unopened("http://127.0.0.1:9", "i", KeySchema::new("pk", Some("sk")))
            .unwrap()
    }

    #[test]
    fn a_document_id_template_names_exactly_the_key() {
        let t = |text: &str| Template::parse(text).unwrap();
        let s = sink().with_document_id(t("{pk}/{sk}")).unwrap();
        let key = Key::new([
            ("pk".to_owned(), AttrValue::s("a#b")),
            ("sk".to_owned(), AttrValue::n(7i64)),
        ]);
        assert_eq!(s.document_id(&key).unwrap(), "a#b/7");
        assert!(
            sink().with_document_id(t("{pk}")).is_err(),
            "a key attribute left out"
        );
        assert!(
            sink().with_document_id(t("{pk}/{sk}/{title}")).is_err(),
            "an attribute outside the key"
        );
    }

    #[test]
    fn document_ids_escape_the_separator() {
        let key = |p: &str, s: &str| {
            Key::new([
                ("pk".to_owned(), AttrValue::s(p)),
                ("sk".to_owned(), AttrValue::s(s)),
            ])
        };
        let s = sink();
        assert_eq!(s.document_id(&key("doc", "1")).unwrap(), "doc#1");
        assert_eq!(s.document_id(&key("a#b", "c")).unwrap(), r"a\#b#c");
        assert_ne!(
            s.document_id(&key("a#b", "c")).unwrap(),
            s.document_id(&key("a", "b#c")).unwrap()
        );
        assert_eq!(s.document_id(&key(r"a\", "#")).unwrap(), r"a\\#\#");
        assert!(
            s.document_id(&Key::single("pk", AttrValue::s("x")))
                .is_err()
        );
    }

    #[test]
    fn bulk_lines_are_the_action_and_the_plain_item_with_reserved_fields() {
        let s = sink();
        let item: Item = [
            ("pk", AttrValue::s("a#b")),
            ("sk", AttrValue::s("1")),
            ("n", AttrValue::n(42i64)),
            ("d", AttrValue::N(Number::parse("0.1").unwrap())),
            (
                "big",
                AttrValue::N(Number::parse("12345678901234567890123").unwrap()),
            ),
            ("b", AttrValue::B(vec![1, 2, 255])),
            ("t", AttrValue::Bool(true)),
            ("z", AttrValue::Null(true)),
            (
                "ss",
                AttrValue::Ss(["x".to_owned(), "y\"".to_owned()].into()),
            ),
            (
                "ns",
                AttrValue::Ns([Number::parse("1").unwrap(), Number::parse("2.5").unwrap()].into()),
            ),
            ("bs", AttrValue::Bs([vec![0u8], vec![9u8]].into())),
            (
                "l",
                AttrValue::L(vec![AttrValue::s("\u{e9}\n"), AttrValue::n(-7i64)]),
            ),
            (
                "m",
                AttrValue::M([("k".to_owned(), AttrValue::Bool(false))].into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let key = s.schema.key_of(&item).unwrap();
        let record = |op| SinkRecord {
            key: key.clone(),
            version: 7,
            op,
        };
        let mut out = Vec::new();
        bulk_lines(
            "i",
            &s.schema,
            &record(SinkOp::Upsert(item.clone())),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let id = r"a\#b#1";
        let action = json!({"index": {
            "_index": "i", "_id": id, "version": 7, "version_type": "external",
        }});
        let mut source: Map<String, Value> = item
            .iter()
            .map(|(k, v)| (k.clone(), to_plain_json(v)))
            .collect();
        source.insert(ITEM_FIELD.into(), Value::String(canonical_item(&item)));
        source.insert(VERSION_FIELD.into(), json!(7));
        source.insert(KEY_FIELD.into(), json!(id));
        assert_eq!(lines, vec![action.clone(), Value::Object(source)]);
        assert!(text.ends_with('\n') && text.lines().count() == 2);

        let mut out = Vec::new();
        bulk_lines("i", &s.schema, &record(SinkOp::Delete), &mut out).unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let tombstone = json!({DELETED_FIELD: true, VERSION_FIELD: 7, KEY_FIELD: id});
        assert_eq!(lines, vec![action, tombstone]);

        let mut reserved = item;
        reserved.insert("_tidemark_x".into(), AttrValue::s("no"));
        let mut out = b"kept".to_vec();
        assert!(bulk_lines("i", &s.schema, &record(SinkOp::Upsert(reserved)), &mut out).is_err());
        assert_eq!(out, b"kept");
    }

    #[test]
    fn bulk_responses_give_one_outcome_per_action() {
        let body = br#"{"took":1,"errors":true,"items":[
            {"index":{"_id":"a","status":201}},
            {"index":{"_id":"b","status":409,"error":{"type":"version_conflict_engine_exception","reason":"old"}}},
            {"create":{"_id":"c","status":429,"error":{"type":"es_rejected_execution_exception"}}}
        ]}"#;
        assert_eq!(
            bulk_outcomes(body, 3).unwrap(),
            vec![
                (201, String::new()),
                (409, "version_conflict_engine_exception: old".to_owned()),
                (429, "es_rejected_execution_exception: ".to_owned()),
            ]
        );
        assert!(bulk_outcomes(body, 2).is_err());
        assert!(bulk_outcomes(b"not json", 1).is_err());
    }

    #[test]
    fn numbers_are_json_numbers_only_when_exact() {
        let n = |t: &str| number_json(&Number::parse(t).unwrap());
        assert_eq!(n("42"), json!(42));
        assert_eq!(n("-7"), json!(-7));
        assert_eq!(n("1.5"), json!(1.5));
        assert_eq!(n("0.1"), json!(0.1));
        assert_eq!(
            n("12345678901234567890123"),
            json!("12345678901234567890123")
        );
        assert_eq!(
            n("0.12345678901234567890123"),
            json!("0.12345678901234567890123")
        );
    }
}
