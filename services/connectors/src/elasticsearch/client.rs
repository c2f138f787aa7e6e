//! The HTTP client: building it, URLs under the base, and the classification
//! of failures (retryable vs terminal) at the adapter.

use std::fmt::Write as _;
use std::time::Duration;

use super::{BACKEND, ElasticsearchSink};
use crate::error::{ConnectorError, ConnectorResult};
use crate::retry::{RetryPolicy, retry};
use crate::value::KeySchema;

impl ElasticsearchSink {
    /// The client, before anything is asked of the cluster.
    pub(super) fn unopened(
        base_url: &str,
        index: &str,
        schema: KeySchema,
    ) -> ConnectorResult<Self> {
        let base = endpoint_url(base_url)?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(auth) = Credentials::from_env()?.header() {
            headers.insert(reqwest::header::AUTHORIZATION, auth);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .default_headers(headers)
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
            properties: std::sync::Arc::default(),
            retry: RetryPolicy::default(),
        })
    }

    /// Sends a request (a JSON body when given) under the retry policy:
    /// connection failures, 429 and 5xx are retried; any other answer is
    /// returned as its status and body for the caller to judge.
    pub(super) async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&serde_json::Value>,
    ) -> ConnectorResult<(reqwest::StatusCode, String)> {
        retry(&self.retry, what, || async {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| request_error(&e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| request_error(&e))?;
            if status.as_u16() == 429 || status.is_server_error() {
                return Err(status_error(status, &text));
            }
            Ok((status, text))
        })
        .await
    }

    /// `segments` below the base URL, each percent-encoded as one segment.
    ///
    /// # Errors
    /// A base URL without a path (only when built around [`endpoint_url`]).
    pub(super) fn url(&self, segments: &[&str]) -> ConnectorResult<reqwest::Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| not_a_base(self.base.as_str()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }
}

/// The API key of the cluster, as Elasticsearch returns it (the `encoded`
/// field: base64 of `id:api_key`), sent as `Authorization: ApiKey ...`.
pub const API_KEY_ENV: &str = "TIDEMARK_ELASTICSEARCH_API_KEY";
/// A user and password for basic authentication (both, or neither).
pub const USERNAME_ENV: &str = "TIDEMARK_ELASTICSEARCH_USERNAME";
pub const PASSWORD_ENV: &str = "TIDEMARK_ELASTICSEARCH_PASSWORD";

/// How a process authenticates to Elasticsearch: from its environment,
/// never from a request (credentials are not part of the API).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    None,
    ApiKey(String),
    Basic {
        username: String,
        password: String,
    },
}

impl Credentials {
    /// The process's credentials: [`API_KEY_ENV`], or [`USERNAME_ENV`]
    /// and [`PASSWORD_ENV`], or none.
    ///
    /// # Errors
    /// Both kinds set, or a user without a password (or the reverse).
    pub fn from_env() -> ConnectorResult<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_values(var(API_KEY_ENV), var(USERNAME_ENV), var(PASSWORD_ENV))
            .map_err(|m| ConnectorError::invalid(BACKEND, m))
    }

    /// [`Self::from_env`] over given values.
    ///
    /// # Errors
    /// What is wrong with the combination, naming the variables.
    pub fn from_values(
        api_key: Option<String>,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, String> {
        match (api_key, username, password) {
            (None, None, None) => Ok(Self::None),
            (Some(key), None, None) => Ok(Self::ApiKey(key)),
            (None, Some(username), Some(password)) => Ok(Self::Basic { username, password }),
            (Some(_), _, _) => Err(format!(
                "set either {API_KEY_ENV} or {USERNAME_ENV} and {PASSWORD_ENV}, not both"
            )),
            (None, _, _) => Err(format!(
                "{USERNAME_ENV} and {PASSWORD_ENV} go together: set both or neither"
            )),
        }
    }

    /// The `Authorization` header, marked sensitive (kept out of logs).
    pub fn header(&self) -> Option<reqwest::header::HeaderValue> {
        use base64::Engine as _;
        let text = match self {
            Self::None => return None,
            Self::ApiKey(key) => format!("ApiKey {key}"),
            Self::Basic { username, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
        };
        let mut value = reqwest::header::HeaderValue::from_str(&text).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// The endpoint as a base URL: `http` or `https`, with a host, so that
/// paths can be put below it. A configuration error, named as such: it
/// reaches the client as `INVALID_ARGUMENT` on the field holding it.
///
/// # Errors
/// A malformed URL, another scheme, or a URL that cannot be a base.
pub(super) fn endpoint_url(base_url: &str) -> ConnectorResult<reqwest::Url> {
    let base = reqwest::Url::parse(base_url).map_err(|e| {
        ConnectorError::invalid(BACKEND, format!("endpoint {base_url:?} is not a URL: {e}"))
    })?;
    if !matches!(base.scheme(), "http" | "https")
        || base.cannot_be_a_base()
        || base.host_str().is_none_or(str::is_empty)
    {
        return Err(not_a_base(base_url));
    }
    Ok(base)
}

fn not_a_base(base_url: &str) -> ConnectorError {
    ConnectorError::invalid(
        BACKEND,
        format!(
            "endpoint {base_url:?} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:9200"
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_an_api_key_or_a_user_and_password() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            Credentials::from_values(None, None, None),
            Ok(Credentials::None)
        );
        assert_eq!(Credentials::None.header(), None);
        let key = Credentials::from_values(some("aWQ6a2V5"), None, None).unwrap();
        let header = key.header().unwrap();
        assert_eq!(header.to_str().unwrap(), "ApiKey aWQ6a2V5");
        assert!(header.is_sensitive(), "kept out of logs");
        let basic = Credentials::from_values(None, some("elastic"), some("s3cret")).unwrap();
        // base64("elastic:s3cret")
        assert_eq!(
            basic.header().unwrap().to_str().unwrap(),
            "Basic ZWxhc3RpYzpzM2NyZXQ="
        );
        let both = Credentials::from_values(some("k"), some("u"), some("p")).unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let half = Credentials::from_values(None, some("u"), None).unwrap_err();
        assert!(half.contains("go together"), "{half}");
    }

    /// A URL that parses but has no path to put `_bulk` below (`mailto:`,
    /// `data:`) used to panic in `url`; it is now invalid input naming the
    /// endpoint, which the error table turns into `INVALID_ARGUMENT`.
    #[test]
    fn an_endpoint_that_is_not_an_http_base_url_is_invalid_input() {
        let schema = || KeySchema::new("pk", None);
        for bad in [
            "mailto:ops@example.com",
            "data:text/plain,x",
            "unix:/var/run/es.sock",
            "ftp://127.0.0.1:9200",
            "http://",
            "not a url",
        ] {
            match ElasticsearchSink::unopened(bad, "i", schema()) {
                Err(ConnectorError::InvalidInput { message, .. }) => {
                    assert!(message.starts_with("endpoint "), "{bad}: {message}");
                    assert!(message.contains(bad), "{bad}: {message}");
                }
                Err(other) => panic!("{bad}: expected invalid input, got {other:?}"),
                Ok(_) => panic!("{bad}: accepted"),
            }
        }
        let sink = ElasticsearchSink::unopened("https://es.example:9243/prefix/", "i", schema())
            .expect("an https base with a path");
        assert_eq!(
            sink.url(&["a b", "_doc", "x#1"]).unwrap().as_str(),
            "https://es.example:9243/prefix/a%20b/_doc/x%231"
        );
    }
}
