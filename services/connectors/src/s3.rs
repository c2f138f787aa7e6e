//! S3: a versioned [`Sink`] that keeps one object per item under a unit
//! prefix (DESIGN.md §1 problem 3, per-unit migration).
//!
//! **Object key**: `prefix` + `k-` + unpadded URL-safe base64 (RFC 4648 §5)
//! of the key's canonical JSON ([`Key::canonical`]) + `.json`. The encoding
//! is stable (the canonical text is the same whatever store the key came
//! from), uses only `[A-Za-z0-9_-]`, and is reversible ([`key_from_object`]);
//! the key is also stored in the object itself.
//!
//! **Body**: a JSON envelope `{"version": N, "deleted": false, "key": {...},
//! "item": {...}}` where `key` and `item` are the canonical DynamoDB-JSON of
//! [`crate::value`]; a delete writes a tombstone `{"version": N, "deleted":
//! true, "key": {...}, "item": null}`. The version (and the deleted flag)
//! are also object metadata (`x-amz-meta-tidemark-version`,
//! `x-amz-meta-tidemark-deleted`), so a HEAD suffices to decide.
//!
//! **Conditional writes**: HEAD the object, then PUT with `If-Match: <etag>`
//! when it exists or `If-None-Match: *` when it does not, so no writer can
//! slip in between. A 412 (or AWS's 409 `ConditionalRequestConflict`, or a
//! `NoSuchKey` when the object vanished) means someone else wrote: HEAD again
//! and decide again, a few times. A stored version `>=` the record's is
//! [`RecordOutcome::Stale`]. Every body carries its version, and versions only
//! grow, so an ETag never comes back (no ABA). A delete never removes the
//! object (a plain DeleteObject would let an older upsert resurrect it); it
//! writes a tombstone at its version. [`S3Sink::purge_tombstones`] removes
//! old tombstones once no older write can still arrive.
//!
//! **Errors** ([`classify`]): 412 / 409 conditional conflicts →
//! `Precondition`; `NoSuchBucket` → `NotFound`; `SlowDown`, 5xx, timeouts and
//! dispatch failures → `Retryable`; the rest as in [`crate::aws::classify`].

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use base64::Engine as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::{RetryPolicy, retry};
use crate::traits::{BucketDigest, RecordOutcome, Sink, SinkRecord, bucket_of, fold_digest};
use crate::value::{Item, Key};

const BACKEND: &str = "s3";
/// Object metadata holding the item's source version.
pub const VERSION_METADATA: &str = "tidemark-version";
/// Object metadata marking a tombstone (`"true"`).
pub const DELETED_METADATA: &str = "tidemark-deleted";
/// S3's limit on the length of an object key, in bytes.
const MAX_OBJECT_KEY: usize = 1024;
/// The longest one attempt of an S3 call may take (the SDK sets none; see
/// [`crate::aws::ATTEMPT_TIMEOUT`]): longer than a table's, since an
/// object's upload is in the attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Rounds of read-and-decide after a lost conditional write.
const CONDITIONAL_ATTEMPTS: usize = 16;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `client` without the SDK's own retries: the sink's calls retry in
/// [`retry`], the only loop, so a call makes at most its policy's attempts
/// (with the SDK's three inside each of eight, it made 24).
pub fn own_retries(client: &Client) -> Client {
    let config = client.config();
    Client::from_conf(
        config
            .to_builder()
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .timeout_config(crate::aws::bounded_attempts(
                config.timeout_config(),
                ATTEMPT_TIMEOUT,
            ))
            .build(),
    )
}

/// Maps an S3 SDK error to a [`ConnectorError`]: S3's own codes first, then
/// the shared AWS classification.
pub fn classify<E>(err: &SdkError<E, HttpResponse>) -> ConnectorError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(service) = err {
        let e = service.err();
        let code = e.code().unwrap_or_default();
        let status = service.raw().status().as_u16();
        let message = format!("{code} ({status}): {}", e.message().unwrap_or_default());
        match (code, status) {
            ("PreconditionFailed" | "ConditionalRequestConflict", _) | (_, 412) => {
                return ConnectorError::Precondition(message);
            }
            ("NoSuchBucket", _) => {
                return ConnectorError::NotFound {
                    backend: BACKEND,
                    message,
                };
            }
            ("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable", _) => {
                return ConnectorError::Retryable {
                    backend: BACKEND,
                    message,
                    retry_after: None,
                };
            }
            ("InvalidArgument" | "KeyTooLongError" | "EntityTooLarge" | "InvalidRequest", _) => {
                return ConnectorError::invalid(BACKEND, message);
            }
            _ => {}
        }
    }
    crate::aws::classify(BACKEND, err)
}

fn is_no_such_key<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(service) => {
            matches!(service.err().code(), Some("NoSuchKey" | "NotFound"))
                || (service.raw().status().as_u16() == 404
                    && service.err().code() != Some("NoSuchBucket"))
        }
        _ => false,
    }
}

/// The stored form of one item or tombstone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u64,
    pub deleted: bool,
    pub key: Item,
    pub item: Option<Item>,
}

/// Object key of `key` under `prefix` (see the module documentation).
pub fn object_key(prefix: &str, key: &Key) -> String {
    format!("{prefix}k-{}.json", B64.encode(key.canonical()))
}

/// The item key an object key under `prefix` encodes, or `None` when the
/// object was not written by [`S3Sink`].
pub fn key_from_object(prefix: &str, object: &str) -> Option<Key> {
    let encoded = object
        .strip_prefix(prefix)?
        .strip_prefix("k-")?
        .strip_suffix(".json")?;
    let text = B64.decode(encoded).ok()?;
    serde_json::from_slice::<Item>(&text).ok().map(Key)
}

/// What a HEAD found: the ETag to write against and the stored version.
struct Current {
    etag: String,
    version: u64,
}

/// One object per item under a unit prefix, written conditionally on the
/// stored version.
#[derive(Clone)]
pub struct S3Sink {
    client: Client,
    bucket: String,
    prefix: String,
    concurrency: usize,
    retry: RetryPolicy,
}

impl S3Sink {
    /// A sink over `bucket` under the unit prefix `prefix` (e.g.
    /// `courses/c-17/`). A non-empty prefix not ending in `/` gets one, so
    /// unit `c-1` never covers the objects of unit `c-17`.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the sink takes the client as the other sinks do; it keeps a copy without the SDK's retries"
    )]
    pub fn new(client: Client, bucket: impl Into<String>, prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self {
            client: own_retries(&client),
            bucket: bucket.into(),
            prefix,
            concurrency: 16,
            // Its only retries, the SDK's being off: as patient as theirs.
            retry: RetryPolicy::AWS,
        }
    }

    /// The sink with `policy` for its calls' retries instead of the default.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether `bucket` exists and these credentials may use it (HeadBucket):
    /// checked before a pipeline or job is set up over it, so a typo is an
    /// error at once instead of a failing unit later.
    ///
    /// # Errors
    /// When S3 cannot be reached or refuses for another reason.
    pub async fn bucket_exists(client: &Client, bucket: &str) -> ConnectorResult<bool> {
        match client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
            Err(e) => Err(classify(&e)),
        }
    }

    /// Creates `bucket` unless this account already owns it. For tests and
    /// local set-up.
    ///
    /// # Errors
    /// When creation fails for any other reason.
    pub async fn ensure_bucket(client: &Client, bucket: &str) -> ConnectorResult<()> {
        let mut request = client.create_bucket().bucket(bucket);
        if let Some(region) = client.config().region().map(ToString::to_string)
            && region != "us-east-1"
        {
            request = request.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                        region.as_str(),
                    ))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => Err(classify(&e)),
        }
    }

    /// HEADs the object: its ETag and version, or `None` when absent.
    async fn head(&self, object: &str) -> ConnectorResult<Option<Current>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(object)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_no_such_key(&e) => return Ok(None),
            Err(e) => return Err(classify(&e)),
        };
        let etag = out
            .e_tag()
            .ok_or_else(|| ConnectorError::terminal(BACKEND, "HeadObject returned no ETag"))?
            .to_owned();
        let version = match out
            .metadata()
            .and_then(|m| m.get(VERSION_METADATA))
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(v) => v,
            // Metadata lost (copied without it): the body is authoritative.
            None => self.get(object).await?.map_or(0, |(_, env)| env.version),
        };
        Ok(Some(Current { etag, version }))
    }

    /// GETs and parses one object: its ETag and envelope, or `None` when absent.
    async fn get(&self, object: &str) -> ConnectorResult<Option<(String, Envelope)>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_no_such_key(&e) => return Ok(None),
            Err(e) => return Err(classify(&e)),
        };
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| ConnectorError::Retryable {
                backend: BACKEND,
                message: format!("reading object body: {e}"),
                retry_after: None,
            })?;
        let envelope: Envelope = serde_json::from_slice(&body.into_bytes()).map_err(|e| {
            ConnectorError::terminal(BACKEND, format!("object {object} is not an envelope: {e}"))
        })?;
        Ok(Some((etag, envelope)))
    }

    /// One conditional PUT: `If-Match` the ETag read, or `If-None-Match: *`.
    async fn put(
        &self,
        object: &str,
        envelope: &Envelope,
        current: Option<&Current>,
    ) -> ConnectorResult<()> {
        let body = serde_json::to_vec(envelope)
            .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object)
            .content_type("application/json")
            .metadata(VERSION_METADATA, envelope.version.to_string())
            .body(ByteStream::from(body));
        if envelope.deleted {
            request = request.metadata(DELETED_METADATA, "true");
        }
        request = match current {
            Some(c) => request.if_match(&c.etag),
            None => request.if_none_match("*"),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            // If-Match on an object that vanished (a purged tombstone): the
            // state changed under us, decide again.
            Err(e) if current.is_some() && is_no_such_key(&e) => Err(ConnectorError::Precondition(
                "object vanished before the conditional write".to_owned(),
            )),
            Err(e) => Err(classify(&e)),
        }
    }

    async fn apply_one(&self, record: &SinkRecord) -> ConnectorResult<RecordOutcome> {
        let object = object_key(&self.prefix, &record.key);
        if object.len() > MAX_OBJECT_KEY {
            return Ok(RecordOutcome::Rejected(format!(
                "object key of {} bytes exceeds S3's {MAX_OBJECT_KEY}",
                object.len()
            )));
        }
        let envelope = match record.op.item() {
            Some(item) => {
                let mut item = item.into_owned();
                item.extend(record.key.0.clone());
                Envelope {
                    version: record.version,
                    deleted: false,
                    key: record.key.0.clone(),
                    item: Some(item),
                }
            }
            None => Envelope {
                version: record.version,
                deleted: true,
                key: record.key.0.clone(),
                item: None,
            },
        };
        for _ in 0..CONDITIONAL_ATTEMPTS {
            let current = retry(&self.retry, "head", || self.head(&object)).await?;
            if let Some(c) = &current
                && c.version >= record.version
            {
                return Ok(RecordOutcome::Stale);
            }
            match retry(&self.retry, "put", || {
                self.put(&object, &envelope, current.as_ref())
            })
            .await
            {
                Ok(()) => return Ok(RecordOutcome::Applied),
                Err(ConnectorError::Precondition(_)) => {}
                Err(ConnectorError::InvalidInput { message, .. }) => {
                    return Ok(RecordOutcome::Rejected(message));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ConnectorError::Retryable {
            backend: BACKEND,
            message: format!("{object}: lost {CONDITIONAL_ATTEMPTS} conditional writes in a row"),
            retry_after: None,
        })
    }

    /// Every object under the prefix, page by page (ListObjectsV2, up to
    /// 1000 per page), as (key, last modified).
    async fn list_page(
        &self,
        token: Option<String>,
    ) -> ConnectorResult<(Vec<(String, Option<SystemTime>)>, Option<String>)> {
        retry(&self.retry, "list", || async {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| classify(&e))?;
            let objects = out
                .contents()
                .iter()
                .filter_map(|o| {
                    let modified = o
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok());
                    o.key().map(|k| (k.to_owned(), modified))
                })
                .collect();
            let next = if out.is_truncated() == Some(true) {
                out.next_continuation_token().map(str::to_owned)
            } else {
                None
            };
            Ok((objects, next))
        })
        .await
    }

    /// Calls `f` with every envelope under the prefix (and its object key,
    /// ETag and last-modified time), reading up to `concurrency` at once.
    async fn for_each_envelope<F>(&self, mut f: F) -> ConnectorResult<()>
    where
        F: FnMut(&str, &str, Option<SystemTime>, Envelope),
    {
        let mut token = None;
        loop {
            let (objects, next) = self.list_page(token.take()).await?;
            // Objects this sink did not write (a run manifest, say) share
            // the prefix; they are neither items nor tombstones.
            let objects: Vec<_> = objects
                .into_iter()
                .filter(|(object, _)| {
                    let name = object.rsplit('/').next().unwrap_or_default();
                    name.starts_with("k-") && name.ends_with(".json")
                })
                .collect();
            let reads: Vec<_> = objects
                .iter()
                .map(|(object, _)| retry(&self.retry, "get", || self.get(object)))
                .collect();
            let results: Vec<_> = futures::stream::iter(reads)
                .buffered(self.concurrency)
                .collect()
                .await;
            for ((object, modified), result) in objects.iter().zip(results) {
                if let Some((etag, envelope)) = result? {
                    f(object, &etag, *modified, envelope);
                }
            }
            match next {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }

    /// Number of live (not deleted) items under the prefix.
    ///
    /// # Errors
    /// When listing or reading fails.
    pub async fn count(&self) -> ConnectorResult<u64> {
        let mut count = 0;
        self.for_each_envelope(|_, _, _, envelope| {
            if !envelope.deleted {
                count += 1;
            }
        })
        .await?;
        Ok(count)
    }

    /// Removes every object under the prefix, items and tombstones alike
    /// (the rollback of a unit: "remove the partial copy"), in DeleteObjects
    /// batches of at most 1000 keys. Returns how many objects were removed.
    ///
    /// # Errors
    /// When the prefix is empty (that would be the whole bucket), or listing
    /// or deleting fails; a partial failure is reported, and running it again
    /// finishes the job.
    pub async fn delete_prefix(&self) -> ConnectorResult<u64> {
        if self.prefix.is_empty() {
            return Err(ConnectorError::invalid(
                BACKEND,
                "refusing to delete an empty prefix (the whole bucket)",
            ));
        }
        let mut removed = 0u64;
        loop {
            // Always the first page: what was deleted is no longer listed.
            let (objects, _) = self.list_page(None).await?;
            if objects.is_empty() {
                return Ok(removed);
            }
            let keys: Vec<String> = objects.into_iter().map(|(k, _)| k).collect();
            removed += self.delete_batch(&keys).await?;
        }
    }

    /// One DeleteObjects request (at most 1000 keys).
    async fn delete_batch(&self, keys: &[String]) -> ConnectorResult<u64> {
        debug_assert!(keys.len() <= 1000);
        let identifiers = keys
            .iter()
            .map(|k| {
                ObjectIdentifier::builder()
                    .key(k)
                    .build()
                    .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))
            })
            .collect::<ConnectorResult<Vec<_>>>()?;
        let delete = Delete::builder()
            .set_objects(Some(identifiers))
            .quiet(true)
            .build()
            .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?;
        let out = retry(&self.retry, "delete_objects", || async {
            self.client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete.clone())
                .send()
                .await
                .map_err(|e| classify(&e))
        })
        .await?;
        if let Some(first) = out.errors().first() {
            return Err(ConnectorError::Retryable {
                backend: BACKEND,
                message: format!(
                    "DeleteObjects failed for {} of {} keys, first {:?}: {:?} {:?}",
                    out.errors().len(),
                    keys.len(),
                    first.key(),
                    first.code(),
                    first.message()
                ),
                retry_after: None,
            });
        }
        Ok(u64::try_from(keys.len()).unwrap_or(u64::MAX))
    }

    /// Removes tombstones last written more than `older_than` ago, each with
    /// `If-Match` on the ETag read, so a tombstone replaced by a newer upsert
    /// in the meantime stays. Only safe once no write older than the
    /// tombstone can still arrive (the replicator's lag is below
    /// `older_than`). Returns how many were removed.
    ///
    /// # Errors
    /// When listing, reading or deleting fails.
    pub async fn purge_tombstones(&self, older_than: Duration) -> ConnectorResult<u64> {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut candidates = Vec::new();
        self.for_each_envelope(|object, etag, modified, envelope| {
            if envelope.deleted && modified.is_some_and(|m| m <= cutoff) {
                candidates.push((object.to_owned(), etag.to_owned()));
            }
        })
        .await?;
        let mut removed = 0;
        for (object, etag) in candidates {
            let result = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&object)
                .if_match(&etag)
                .send()
                .await;
            match result {
                Ok(_) => removed += 1,
                Err(e) if is_no_such_key(&e) => {}
                Err(e) => match classify(&e) {
                    // Rewritten since it was read: no longer this tombstone.
                    ConnectorError::Precondition(_) => {}
                    other => return Err(other),
                },
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl Sink for S3Sink {
    fn name(&self) -> String {
        format!("s3:{}/{}", self.bucket, self.prefix)
    }

    #[tracing::instrument(skip_all, fields(sink = %self.name(), records = batch.len()))]
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        // Futures collected first: a closure in `map` trips the async-trait
        // lifetime inference.
        let writes: Vec<_> = batch.iter().map(|record| self.apply_one(record)).collect();
        crate::traits::apply_in_order(writes, self.concurrency).await
    }

    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64> {
        let objects: Vec<String> = keys.iter().map(|k| object_key(&self.prefix, k)).collect();
        let mut removed = 0;
        for chunk in objects.chunks(1000) {
            removed += self.delete_batch(chunk).await?;
        }
        Ok(removed)
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let object = object_key(&self.prefix, key);
        let found = retry(&self.retry, "get", || self.get(&object)).await?;
        Ok(found.and_then(|(_, envelope)| match envelope {
            Envelope {
                deleted: false,
                item: Some(item),
                version,
                ..
            } => Some((version, item)),
            _ => None,
        }))
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        if buckets == 0 {
            return Err(ConnectorError::invalid(
                BACKEND,
                "buckets must be at least 1",
            ));
        }
        let mut out = vec![BucketDigest::default(); buckets as usize];
        self.for_each_envelope(|_, _, _, envelope| {
            if let Envelope {
                deleted: false,
                item: Some(item),
                version,
                key,
            } = envelope
            {
                fold_digest(&mut out, &Key(key), version, &item);
            }
        })
        .await?;
        Ok(out)
    }

    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        self.for_each_envelope(|_, _, _, envelope| {
            if let Envelope {
                deleted: false,
                item: Some(item),
                version,
                key,
            } = envelope
            {
                visit(Key(key), version, item);
            }
        })
        .await
    }

    /// The object name encodes the key, so only objects in a wanted bucket
    /// are read: the drill-down costs listings plus one GET per candidate.
    async fn bucket_entries(
        &self,
        buckets: u32,
        wanted: &BTreeSet<u32>,
    ) -> ConnectorResult<Vec<(Key, u64, Item)>> {
        let n = u64::from(buckets.max(1));
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let (objects, next) = self.list_page(token.take()).await?;
            let candidates: Vec<&String> = objects
                .iter()
                .map(|(object, _)| object)
                .filter(|object| {
                    // Objects this sink did not write are read, and skipped below.
                    key_from_object(&self.prefix, object)
                        .is_none_or(|key| wanted.contains(&bucket_of(&key, n)))
                })
                .collect();
            let reads: Vec<_> = candidates
                .iter()
                .map(|object| retry(&self.retry, "get", || self.get(object)))
                .collect();
            let results: Vec<_> = futures::stream::iter(reads)
                .buffered(self.concurrency)
                .collect()
                .await;
            for result in results {
                if let Some((
                    _,
                    Envelope {
                        deleted: false,
                        item: Some(item),
                        version,
                        key,
                    },
                )) = result?
                {
                    let key = Key(key);
                    if wanted.contains(&bucket_of(&key, n)) {
                        out.push((key, version, item));
                    }
                }
            }
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::value::AttrValue;

    /// An S3 endpoint that answers every request `503 SlowDown`, counting
    /// them.
    async fn slow_down_endpoint() -> (String, Arc<AtomicU32>) {
        let seen = Arc::new(AtomicU32::new(0));
        let counter = seen.clone();
        let app = axum::Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    [("content-type", "application/xml")],
                    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    #[tokio::test]
    async fn a_call_makes_its_policys_attempts_not_the_sdks_inside_each() {
        let (endpoint, seen) = slow_down_endpoint().await;
        // A client as an application would build it: the SDK's standard
        // retries (three attempts) on.
        let client = Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .endpoint_url(&endpoint)
                .force_path_style(true)
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "test", "test", None, None, "test",
                ))
                .retry_config(aws_smithy_types::retry::RetryConfig::standard().with_max_attempts(3))
                .build(),
        );
        let sink = S3Sink::new(client, "bucket", "p/").with_retry(RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        });
        let err = sink.count().await.unwrap_err();
        assert!(err.is_retryable(), "SlowDown is retryable: {err}");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            8,
            "one request per attempt of the policy"
        );
    }

    #[test]
    fn object_keys_are_url_safe_and_reversible() {
        let key = Key::new([
            ("pk".to_owned(), AttrValue::S("a/b?c d+é".to_owned())),
            ("sk".to_owned(), AttrValue::n(17i64)),
        ]);
        let object = object_key("courses/c-17/", &key);
        let name = object.strip_prefix("courses/c-17/").unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{name}"
        );
        assert_eq!(key_from_object("courses/c-17/", &object), Some(key));
        assert_eq!(key_from_object("courses/c-1/", &object), None);
    }
}
