//! The HTTP client: building it, URLs under the base, and the classification
//! of failures (retryable vs terminal) at the adapter.

use std::fmt::Write as _;
use std::time::Duration;

use super::{BACKEND, ElasticsearchSink};
use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::RetryPolicy;
use crate::value::KeySchema;

impl ElasticsearchSink {
    /// The client, before anything is asked of the cluster.
    pub(super) fn unopened(
        base_url: &str,
        index: &str,
        schema: KeySchema,
    ) -> ConnectorResult<Self> {
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

    pub(super) fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http urls have paths")
            .pop_if_empty()
            .extend(segments);
        url
    }
}

pub(super) fn request_error(e: &reqwest::Error) -> ConnectorError {
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

pub(super) fn status_error(status: reqwest::StatusCode, text: &str) -> ConnectorError {
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
