//! The server's per-request timeout as a tower layer, with a longer bound
//! for the RPCs that wait by design: a `Drain` takes a timeout of up to an
//! hour and a `ClaimUnit` may wait a minute for work, and tonic's
//! server-wide timeout cancelled both after `request_timeout_ms` (30 s).
//! A client's own deadline (`grpc-timeout`) still applies to every RPC.
//!
//! The sooner of the two is the RPC's deadline, set around its handler
//! ([`tidemark_connectors::deadline`]): the calls it makes downstream carry
//! what is left of it, and its retries stop before it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Bounds every request by `default`, or by the bound its path was given.
#[derive(Clone)]
pub struct TimeoutLayer {
    default: Duration,
    longer: Arc<HashMap<String, Duration>>,
}

impl TimeoutLayer {
    /// `longer` maps full method paths (`/package.Service/Method`) to their
    /// own bound.
    pub fn new(default: Duration, longer: HashMap<String, Duration>) -> Self {
        Self {
            default,
            longer: Arc::new(longer),
        }
    }

    fn limit(&self, path: &str) -> Duration {
        self.longer.get(path).copied().unwrap_or(self.default)
    }
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TimeoutService<S> {
    inner: S,
    layer: TimeoutLayer,
}

impl<S, B, RB> tower::Service<http::Request<B>> for TimeoutService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = self.layer.limit(req.uri().path());
        let deadline = tokio::time::Instant::now()
            + grpc_timeout(req.headers()).map_or(limit, |asked| asked.min(limit));
        let call = tidemark_connectors::deadline::within(deadline, self.inner.call(req));
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the server gave up on the request after {} ms (its request timeout); retry, or raise TIDEMARK_REQUEST_TIMEOUT_MS",
                    limit.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// The caller's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit
/// of `H`, `M`, `S`, `m`, `u` or `n`); `None` when absent or malformed.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, ServiceExt as _};

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn status(response: &http::Response<()>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn a_request_past_the_default_is_deadline_exceeded_and_a_longer_bound_lets_its_rpc_finish()
     {
        let layer = TimeoutLayer::new(
            Duration::from_millis(100),
            [("/p.S/Drain".to_owned(), Duration::from_secs(5))].into(),
        );
        let service = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let cut = service.clone().oneshot(request("/p.S/Get")).await.unwrap();
        assert_eq!(status(&cut), Some("4"), "DEADLINE_EXCEEDED");
        let message = cut.headers().get("grpc-message").unwrap().to_str().unwrap();
        assert!(message.contains("100"), "{message}");
        let waited = service.oneshot(request("/p.S/Drain")).await.unwrap();
        assert_eq!(status(&waited), None, "answered by the service itself");
    }

    #[tokio::test]
    async fn the_handler_sees_the_sooner_of_the_callers_deadline_and_the_servers() {
        let layer = TimeoutLayer::new(Duration::from_secs(30), HashMap::new());
        let service = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            let left = tidemark_connectors::deadline::remaining().expect("a deadline is set");
            let mut response = http::Response::new(());
            response
                .headers_mut()
                .insert("left-ms", left.as_millis().to_string().parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        }));
        let left = |response: http::Response<()>| -> u128 {
            response.headers()["left-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        };
        let mut asked = request("/p.S/Get");
        asked
            .headers_mut()
            .insert("grpc-timeout", "500m".parse().unwrap());
        let answered = left(service.clone().oneshot(asked).await.unwrap());
        assert!((400..=500).contains(&answered), "{answered} ms");
        let answered = left(service.oneshot(request("/p.S/Get")).await.unwrap());
        assert!((29_000..=30_000).contains(&answered), "{answered} ms");
    }

    #[test]
    fn grpc_timeout_values_parse_as_the_spec_writes_them() {
        let parse = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
