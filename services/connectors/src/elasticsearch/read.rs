//! Reads: a document by key, searches and counts of live documents, and the
//! `search_after` walk behind the digest and the entries.

use serde_json::{Value, json};

use super::client::{request_error, status_error};
use super::document::live_of;
use super::{BACKEND, DELETED_FIELD, ElasticsearchSink, ITEM_FIELD, KEY_FIELD, VERSION_FIELD};
use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::retry;
use crate::traits::{BucketDigest, fold_digest};
use crate::value::{Item, Key};

/// Page size of the digest's `search_after` walk.
const PAGE: usize = 1000;

impl ElasticsearchSink {
    /// A query clause that keeps live documents only: add it to every query
    /// against the index, tombstones are documents too.
    pub fn live_filter() -> Value {
        json!({"bool": {"must_not": [{"term": {DELETED_FIELD: true}}]}})
    }

    /// Makes every acknowledged write visible to search (tests, digests).
    ///
    /// # Errors
    /// When Elasticsearch cannot be reached or the index is missing.
    pub async fn refresh(&self) -> ConnectorResult<()> {
        let url = self.url(&[&self.search_target(), "_refresh"])?;
        retry(&self.retry, "refresh", || async {
            let response = self.send(self.http.post(url.clone())).await?;
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

    async fn search(&self, body: &Value) -> ConnectorResult<Value> {
        let url = self.url(&[&self.search_target(), "_search"])?;
        retry(&self.retry, "search", || async {
            let response = self.send(self.http.post(url.clone()).json(body)).await?;
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
        let url = self.url(&[&self.search_target(), "_count"])?;
        let body = json!({"query": Self::live_filter()});
        retry(&self.retry, "count", || async {
            let response = self.send(self.http.post(url.clone()).json(&body)).await?;
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

    /// The live (version, item) of the document with this key.
    pub(super) async fn get_live(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let id = self
            .document_id(key)
            .map_err(|m| ConnectorError::invalid(BACKEND, m))?;
        let index = self
            .index_of(key)
            .map_err(|m| ConnectorError::invalid(BACKEND, m))?;
        let url = self.url(&[&index, "_doc", &id])?;
        let doc: Value = retry(&self.retry, "get", || async {
            let response = self.send(self.http.get(url.clone())).await?;
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
    pub(super) async fn digest_live(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
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
    pub(super) async fn walk_live(
        &self,
        visit: &mut (dyn FnMut(Key, u64, Item) + Send),
    ) -> ConnectorResult<()> {
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
