//! Prometheus metrics: per-RPC request counts and latency histograms recorded
//! by a tower layer, plus a registry where each service adds its own gauges
//! (lag, dead letters, buffered keys, units by status).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// `/package.Service/Method`.
    rpc: String,
    /// gRPC status code name, e.g. `OK`, `INVALID_ARGUMENT`.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcMethod {
    rpc: String,
}

type LatencyFamily = Family<RpcMethod, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms … ~3.3 s
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// The host's metric registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RpcLabels, Counter>,
    latency: LatencyFamily,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tidemark");
        let requests = Family::<RpcLabels, Counter>::default();
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "rpc_requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency to the response headers, by method",
            latency.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
        }
    }
}

impl Metrics {
    /// Registers a service's own metric (a gauge, counter or family).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .expect("metrics lock")
            .register(name, help, metric);
    }

    /// Registers and returns a plain gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        let gauge = Gauge::default();
        self.register(name, help, gauge.clone());
        gauge
    }

    /// Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding to a String cannot fail");
        out
    }

    fn record(&self, rpc: &str, code: &str, seconds: f64) {
        // In the RPC's span: with its trace id in a JSON log.
        tracing::debug!(rpc, code, seconds, "rpc answered");
        self.requests
            .get_or_create(&RpcLabels {
                rpc: rpc.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&RpcMethod {
                rpc: rpc.to_owned(),
            })
            .observe(seconds);
    }

    /// Serves `GET /metrics` on `addr` until `shutdown`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve(self, addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

/// Reads `GET /metrics` from `addr` as a scraper does (the raw HTTP/1.1
/// response, headers included): for tests and tools checking what a
/// service exposes.
///
/// # Errors
/// When the endpoint cannot be reached or the read fails.
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// Tower layer recording every RPC into [`Metrics`].
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError> + 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Recorded however the call ends: answered, refused by a layer
        // inside (shed, unauthenticated), or dropped unanswered (the
        // client cancelled, or the server's timeout fired outside).
        let mut pending = Pending {
            metrics: Some(self.metrics.clone()),
            rpc: req.uri().path().to_owned(),
            start: Instant::now(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await.map_err(Into::into);
            let code = match &result {
                // Errors travel as trailers-only responses whose headers
                // carry grpc-status; without it, a (streaming) OK.
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                // What tonic answers the client for this error.
                Err(e) => error_code(e.as_ref()),
            };
            pending.finish(code);
            result
        })
    }
}

/// The code tonic sends for an error a layer returned: RESOURCE_EXHAUSTED
/// for a shed request, CANCELLED for a timeout, else what the error is.
fn error_code(e: &(dyn std::error::Error + Send + Sync + 'static)) -> tonic::Code {
    if e.is::<tower::load_shed::error::Overloaded>() {
        tonic::Code::ResourceExhausted
    } else if e.is::<tonic::TimeoutExpired>() || e.is::<tower::timeout::error::Elapsed>() {
        tonic::Code::Cancelled
    } else if let Some(status) = e.downcast_ref::<tonic::Status>() {
        status.code()
    } else {
        tonic::Code::Unknown
    }
}

/// An RPC not yet recorded; counted as CANCELLED if dropped unanswered.
struct Pending {
    metrics: Option<Metrics>,
    rpc: String,
    start: Instant,
}

impl Pending {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.record(
                &self.rpc,
                code_name(code),
                self.start.elapsed().as_secs_f64(),
            );
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// The gRPC name of a status code, as the gRPC spec and other
/// implementations' metrics spell it (`OK`, `RESOURCE_EXHAUSTED`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{Service as _, ServiceBuilder, ServiceExt as _};

    use super::*;

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    /// The server's order (server.rs): metrics outside load shedding over
    /// the concurrency limit. A shed call counts as RESOURCE_EXHAUSTED (what
    /// tonic answers), one dropped unanswered (a timeout outside, a client
    /// that went away) as CANCELLED, and codes carry their gRPC names.
    #[tokio::test]
    async fn shed_cancelled_and_refused_calls_are_counted_by_grpc_name() {
        let metrics = Metrics::default();
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone()))
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1))
            .service_fn(|req: http::Request<()>| async move {
                match req.uri().path() {
                    "/slow" => tokio::time::sleep(Duration::from_secs(3600)).await,
                    "/bad" => {
                        return Ok::<_, tower::BoxError>(
                            http::Response::builder()
                                .header("grpc-status", "3")
                                .body(())
                                .unwrap(),
                        );
                    }
                    _ => {}
                }
                Ok(http::Response::new(()))
            });
        // The slow call takes the only permit (when its service is ready)…
        let mut holder = svc.clone();
        let slow = holder.ready().await.unwrap().call(request("/slow"));
        // …so the next one is shed.
        let shed = svc.clone().oneshot(request("/shed")).await;
        assert!(shed.is_err());
        // The slow one never answers: a timeout drops it.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), slow)
                .await
                .is_err()
        );
        drop(holder);
        svc.clone().oneshot(request("/bad")).await.unwrap();
        svc.clone().oneshot(request("/fine")).await.unwrap();
        let text = metrics.encode();
        for (rpc, code) in [
            ("/shed", "RESOURCE_EXHAUSTED"),
            ("/slow", "CANCELLED"),
            ("/bad", "INVALID_ARGUMENT"),
            ("/fine", "OK"),
        ] {
            assert!(
                text.contains(&format!(
                    "tidemark_rpc_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} 1"
                )),
                "{rpc} as {code}: {text}"
            );
        }
    }

    #[test]
    fn encodes_rpc_and_service_metrics() {
        let metrics = Metrics::default();
        metrics.record("/tidemark.x.v1.XService/Do", "OK", 0.002);
        metrics
            .gauge("replication_lag_records", "records behind the source")
            .set(42);
        let text = metrics.encode();
        assert!(
            text.contains(
                "tidemark_rpc_requests_total{rpc=\"/tidemark.x.v1.XService/Do\",code=\"OK\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("tidemark_replication_lag_records 42"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_rpc_duration_seconds_bucket"),
            "{text}"
        );
    }
}
