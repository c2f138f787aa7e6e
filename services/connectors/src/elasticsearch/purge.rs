//! Purging old tombstones. A tombstone only has to outlive every record
//! older than its delete that could still arrive; past the change feed's
//! retention none can, so tombstones written longer ago than a retention
//! chosen well past the feed's are deleted by a `_delete_by_query`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::client::{request_error, status_error};
use super::{BACKEND, DELETED_AT_FIELD, DELETED_FIELD, ElasticsearchSink};
use crate::error::{ConnectorError, ConnectorResult};
use crate::value::Key;

/// Backing indexes named in one `_delete_by_query` (its URL stays short).
const INDEXES_PER_REQUEST: usize = 50;
/// How long one `_delete_by_query` may run before the request gives up
/// (the task goes on in the cluster; the next purge finds the rest).
const PURGE_TIMEOUT: Duration = Duration::from_secs(600);

/// Milliseconds since the Unix epoch, as tombstones record their write.
pub(super) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The query matching tombstones written before `cutoff_millis`.
pub(super) fn expired_tombstones(cutoff_millis: i64) -> Value {
    json!({"bool": {"filter": [
        {"term": {DELETED_FIELD: true}},
        {"range": {DELETED_AT_FIELD: {"lt": cutoff_millis}}},
    ]}})
}

impl ElasticsearchSink {
    /// Deletes the tombstones written more than `retention` ago from the
    /// sink's backing indexes (never from an index outside the alias
    /// layout), and returns how many. A tombstone overwritten meanwhile is
    /// a version conflict the purge skips. Tombstones without a write time
    /// (from before it was recorded) are kept.
    ///
    /// # Errors
    /// Elasticsearch unreachable or refusing the query.
    #[tracing::instrument(skip_all, fields(sink = %self.index, retention_s = retention.as_secs()))]
    pub async fn purge_tombstones(&self, retention: Duration) -> ConnectorResult<u64> {
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_millis().saturating_sub(retention_ms);
        let body = json!({"query": expired_tombstones(cutoff)});
        // The query sees what is searchable: a cluster whose refresh is
        // slow or off would otherwise keep old tombstones past retention.
        self.refresh().await?;
        let mut deleted = 0;
        for chunk in self.backing_indices().await?.chunks(INDEXES_PER_REQUEST) {
            deleted += self.delete_by_query(&chunk.join(","), &body).await?;
        }
        if deleted > 0 {
            tracing::info!(deleted, "purged expired tombstones");
        }
        Ok(deleted)
    }

    /// Removes the documents of these keys, tombstones included, from every
    /// backing index (a templated sink's key may be in any of them), after a
    /// refresh so the query sees every acknowledged write. Returns how many
    /// documents went.
    ///
    /// # Errors
    /// A key without a document id, or Elasticsearch refusing the query.
    pub(super) async fn purge_keys(&self, keys: &[Key]) -> ConnectorResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let ids = keys
            .iter()
            .map(|k| {
                self.document_id(k)
                    .map_err(|m| ConnectorError::invalid(BACKEND, m))
            })
            .collect::<ConnectorResult<Vec<String>>>()?;
        self.refresh().await?;
        let indexes = self.backing_indices().await?;
        let mut deleted = 0;
        for chunk in ids.chunks(1000) {
            let body = json!({"query": {"ids": {"values": chunk}}});
            for group in indexes.chunks(INDEXES_PER_REQUEST) {
                deleted += self.delete_by_query(&group.join(","), &body).await?;
            }
        }
        Ok(deleted)
    }

    /// One `_delete_by_query`, not retried: a timed-out one still runs in
    /// the cluster, and the next scheduled purge takes what is left.
    async fn delete_by_query(&self, indexes: &str, body: &Value) -> ConnectorResult<u64> {
        let mut url = self.url(&[indexes, "_delete_by_query"])?;
        url.set_query(Some(
            "conflicts=proceed&refresh=true&ignore_unavailable=true&allow_no_indices=true",
        ));
        let response = self
            .send(self.http.post(url).timeout(PURGE_TIMEOUT).json(body))
            .await?;
        let status = response.status();
        let text = response.text().await.map_err(|e| request_error(&e))?;
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        let answer: Value = serde_json::from_str(&text).map_err(|e| {
            ConnectorError::terminal(BACKEND, format!("bad _delete_by_query response: {e}"))
        })?;
        if let Some(failures) = answer
            .get("failures")
            .and_then(Value::as_array)
            .filter(|f| !f.is_empty())
        {
            return Err(ConnectorError::Retryable {
                backend: BACKEND,
                message: format!(
                    "_delete_by_query failed for {} tombstones: {:.300}",
                    failures.len(),
                    Value::Array(failures.clone())
                ),
                retry_after: None,
            });
        }
        Ok(answer.get("deleted").and_then(Value::as_u64).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_matches_only_tombstones_written_before_the_cutoff() {
        assert_eq!(
            expired_tombstones(1_000),
            json!({"bool": {"filter": [
                {"term": {"_tidemark_deleted": true}},
                {"range": {"_tidemark_deleted_at": {"lt": 1_000}}},
            ]}})
        );
        let now = now_millis();
        assert!(now > 1_700_000_000_000, "{now}");
    }
}
