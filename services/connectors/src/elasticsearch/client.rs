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
        Self::unopened_as(base_url, index, schema, &Credentials::from_env()?)
    }

    /// [`Self::unopened`] with `credentials` instead of the environment's.
    pub(super) fn unopened_as(
        base_url: &str,
        index: &str,
        schema: KeySchema,
        credentials: &Credentials,
    ) -> ConnectorResult<Self> {
        let base = endpoint_url(base_url)?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(auth) = credentials.header() {
            headers.insert(reqwest::header::AUTHORIZATION, auth);
        }
        let signer = match credentials {
            Credentials::AwsSigV4 { service, region } => Some(std::sync::Arc::new(
                super::sigv4::Signer::new(service, region.as_deref()),
            )),
            _ => None,
        };
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
            signer,
        })
    }

    /// Sends `request` once, signed first when the sink signs (SigV4).
    ///
    /// # Errors
    /// The request could not be built, signed or sent.
    pub(super) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> ConnectorResult<reqwest::Response> {
        let mut request = request.build().map_err(|e| request_error(&e))?;
        if let Some(signer) = &self.signer {
            signer.sign(&mut request).await?;
        }
        self.http
            .execute(request)
            .await
            .map_err(|e| request_error(&e))
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
            let response = self.send(request).await?;
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
/// Sign every request with AWS SigV4 for this service: `es` for an Amazon
/// OpenSearch Service domain, `aoss` for OpenSearch Serverless. The
/// credentials are the AWS SDK's default chain.
pub const SIGV4_ENV: &str = "TIDEMARK_ELASTICSEARCH_AWS_SIGV4";
/// The region to sign for; unset: the SDK's (`AWS_REGION`).
pub const SIGV4_REGION_ENV: &str = "TIDEMARK_ELASTICSEARCH_AWS_REGION";

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
    /// AWS SigV4 for `service` (`es` or `aoss`) in `region` (`None`: the
    /// SDK's).
    AwsSigV4 {
        service: String,
        region: Option<String>,
    },
}

impl Credentials {
    /// The process's credentials: [`API_KEY_ENV`], or [`USERNAME_ENV`]
    /// and [`PASSWORD_ENV`], or [`SIGV4_ENV`] (with [`SIGV4_REGION_ENV`]),
    /// or none.
    ///
    /// # Errors
    /// Two kinds set, a user without a password (or the reverse), an
    /// unknown SigV4 service.
    pub fn from_env() -> ConnectorResult<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let basic_or_key =
            Self::from_values(var(API_KEY_ENV), var(USERNAME_ENV), var(PASSWORD_ENV))
                .map_err(|m| ConnectorError::invalid(BACKEND, m))?;
        Self::with_sigv4(basic_or_key, var(SIGV4_ENV), var(SIGV4_REGION_ENV))
            .map_err(|m| ConnectorError::invalid(BACKEND, m))
    }

    /// `credentials`, or SigV4 for `service` when one is given (and then
    /// `credentials` must be none).
    ///
    /// # Errors
    /// SigV4 together with a key or a password; a service other than `es`
    /// or `aoss`; a region without a service.
    pub fn with_sigv4(
        credentials: Self,
        service: Option<String>,
        region: Option<String>,
    ) -> Result<Self, String> {
        match (credentials, service, region) {
            (credentials, None, None) => Ok(credentials),
            (_, None, Some(_)) => Err(format!(
                "{SIGV4_REGION_ENV} is only used with {SIGV4_ENV}: set that too (es or aoss), or unset the region"
            )),
            (Self::None, Some(service), region) => {
                if matches!(service.as_str(), "es" | "aoss") {
                    Ok(Self::AwsSigV4 { service, region })
                } else {
                    Err(format!(
                        "{SIGV4_ENV}={service:?}: the service to sign for is es (an Amazon OpenSearch Service domain) or aoss (OpenSearch Serverless)"
                    ))
                }
            }
            (_, Some(_), _) => Err(format!(
                "set {SIGV4_ENV} or an API key or a user and password, not both"
            )),
        }
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
            Self::None | Self::AwsSigV4 { .. } => return None,
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

    #[test]
    fn sigv4_is_for_es_or_aoss_and_alone() {
        let some = |s: &str| Some(s.to_owned());
        let signed = Credentials::with_sigv4(Credentials::None, some("es"), some("eu-west-1"));
        assert_eq!(
            signed,
            Ok(Credentials::AwsSigV4 {
                service: "es".to_owned(),
                region: some("eu-west-1"),
            })
        );
        assert_eq!(
            signed.unwrap().header(),
            None,
            "the signature is per request"
        );
        assert!(Credentials::with_sigv4(Credentials::None, some("aoss"), None).is_ok());
        let other = Credentials::with_sigv4(Credentials::None, some("s3"), None).unwrap_err();
        assert!(
            other.contains("es (an Amazon OpenSearch Service domain) or aoss"),
            "{other}"
        );
        let both =
            Credentials::with_sigv4(Credentials::ApiKey("k".into()), some("es"), None).unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let region_only =
            Credentials::with_sigv4(Credentials::None, None, some("us-east-1")).unwrap_err();
        assert!(region_only.contains("only used with"), "{region_only}");
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
