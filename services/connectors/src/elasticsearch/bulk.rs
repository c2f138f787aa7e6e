//! The bulk writer: records into `_bulk` bodies of bounded size, one
//! outcome per record from the response, throttled items retried.

use serde_json::Value;

use super::client::{request_error, status_error};
use super::document::bulk_lines_as;
use super::{BACKEND, ElasticsearchSink};
use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::retry;
use crate::traits::{RecordOutcome, SinkRecord};

/// Most actions in one `_bulk` request.
const MAX_ACTIONS: usize = 1000;
/// Most bytes in one `_bulk` body.
const MAX_BYTES: usize = 10 * 1024 * 1024;

impl ElasticsearchSink {
    /// Writes `batch` as `_bulk` requests: one outcome per record, in order.
    pub(super) async fn apply_bulk(
        &self,
        batch: &[SinkRecord],
    ) -> ConnectorResult<Vec<RecordOutcome>> {
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

    /// Sends one `_bulk` body; one (status, reason) per action, in order.
    async fn send_bulk(
        &self,
        body: bytes::Bytes,
        actions: usize,
    ) -> ConnectorResult<Vec<(u16, String)>> {
        let mut url = self.url(&["_bulk"])?;
        // Every name the sink writes is an alias it set up: one that
        // vanished must fail the write, not become a plain index.
        url.set_query(Some("require_alias=true"));
        let response = self
            .send(
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                    .body(body),
            )
            .await?;
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
                    404 if reason.starts_with("index_not_found_exception") => {
                        return Err(ConnectorError::NotFound {
                            backend: BACKEND,
                            message: format!(
                                "the alias the sink writes through is gone (deleted?): {reason}"
                            ),
                        });
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
