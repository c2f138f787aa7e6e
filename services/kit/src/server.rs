//! [`ServiceHost`]: the one way every Tidemark service is served.
//!
//! It adds `grpc.health.v1` and server reflection (v1 and v1alpha, since
//! common tools still speak only v1alpha), wraps every RPC in the shared tower
//! stack (metrics, bearer auth, load shedding over a global concurrency
//! limit, per-request timeout, a tracing span) and shuts down in order:
//! health NOT_SERVING → drain delay → stop accepting and finish in-flight
//! requests → cancel and join background tasks, all under one grace deadline.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;

use crate::auth::AuthLayer;
use crate::config::ServerConfig;
use crate::error::{KitError, KitResult};
use crate::health::Health;
use crate::metrics::{Metrics, MetricsLayer};
use crate::timeout::TimeoutLayer;

/// Builder and runner for a gRPC server hosting one or more Tidemark services.
pub struct ServiceHost {
    config: ServerConfig,
    routes: RoutesBuilder,
    health: Health,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    metrics: Metrics,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// RPCs bounded by more than the request timeout (see `allow_longer`).
    longer: std::collections::HashMap<String, Duration>,
}

impl ServiceHost {
    /// A host that stops when `shutdown` is cancelled.
    pub fn new(config: ServerConfig, shutdown: CancellationToken) -> Self {
        let reporter = tonic_health::server::HealthReporter::new();
        let health_service =
            tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        Self {
            config,
            routes: RoutesBuilder::default(),
            health: Health::new(reporter),
            health_service: tonic_health::pb::health_server::HealthServer::new(health_service),
            metrics: Metrics::default(),
            tasks: TaskTracker::new(),
            shutdown,
            longer: std::collections::HashMap::new(),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The token that stops this host; background tasks select on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Adds a gRPC service; it reports SERVING until a backend probe or
    /// shutdown says otherwise.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.register(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Spawns a background task that the host cancels (through its token)
    /// and joins on shutdown.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(async move {
            task.await;
            tracing::debug!(task = name, "background task finished");
        });
    }

    /// Keeps `service`'s health in step with `probe` (see [`Health::watch_backend`]).
    pub fn watch_backend<F, Fut>(&self, service: &str, interval: Duration, probe: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let health = self.health.clone();
        let shutdown = self.shutdown.clone();
        let service = service.to_owned();
        self.spawn(
            "backend-probe",
            health.watch_backend(service, interval, shutdown, probe),
        );
    }

    /// Bounds the RPC `method` of `service` (a generated server's `NAME`) by
    /// `bound` plus the request timeout instead of the request timeout
    /// alone: for the RPCs that wait by design, each up to a limit of its
    /// own (a drain's `timeout`, a claim's `wait`).
    pub fn allow_longer(&mut self, service: &str, method: &str, bound: Duration) -> &mut Self {
        let path = format!("/{service}/{method}");
        self.longer
            .insert(path, bound + self.config.request_timeout());
        self
    }

    /// Serves on `listener` until the shutdown token is cancelled, then
    /// shuts down in order and returns once everything has stopped or the
    /// grace deadline has passed.
    ///
    /// # Errors
    /// When TLS material cannot be read, reflection cannot be built, or the
    /// transport fails.
    pub async fn serve(mut self, listener: TcpListener) -> KitResult<()> {
        let addr = listener.local_addr()?;
        for service in self.health.services() {
            self.health.set(&service, true).await;
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidemark_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidemark_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        self.routes
            .add_service(self.health_service.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        if let Some(metrics_addr) = self.config.metrics_listen {
            let metrics = self.metrics.clone();
            let token = self.shutdown.clone();
            self.tasks.spawn(async move {
                if let Err(e) = metrics.serve(metrics_addr, token).await {
                    tracing::error!(error = %e, addr = %metrics_addr, "metrics endpoint failed");
                }
            });
        }

        // The request timeout is the stack's (below), which knows the RPCs
        // allowed longer; tonic's own would cut those too. A client's
        // `grpc-timeout` is still honoured by tonic.
        // Each RPC's span continues the caller's trace (`traceparent`).
        let mut builder = Server::builder().trace_fn(|req| {
            let span = tracing::info_span!("rpc", rpc = %req.uri().path());
            crate::trace_context::adopt_parent(&span, req.headers());
            span
        });
        if let (Some(cert), Some(key)) = (&self.config.tls_cert, &self.config.tls_key) {
            install_crypto_provider();
            let identity =
                Identity::from_pem(tokio::fs::read(cert).await?, tokio::fs::read(key).await?);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .map_err(|e| KitError::Tls(e.to_string()))?;
        }
        let stack = ServiceBuilder::new()
            .map_response(undecodable_is_invalid_argument)
            .layer(MetricsLayer::new(self.metrics.clone()))
            .layer(TimeoutLayer::new(
                self.config.request_timeout(),
                std::mem::take(&mut self.longer),
            ))
            .layer(AuthLayer::new(self.config.auth_token.as_deref()))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(
                self.config.concurrency_limit,
            ))
            .into_inner();

        let health = self.health.clone();
        let drain_delay = self.config.drain_delay();
        let token = self.shutdown.clone();
        let stop_accepting = async move {
            token.cancelled().await;
            health.set_all_not_serving().await;
            tokio::time::sleep(drain_delay).await;
        };
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tracing::info!(%addr, services = ?self.health.services(), "serving");
        let server = builder
            .layer(stack)
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, stop_accepting);

        let grace = self.config.shutdown_grace();
        let token = self.shutdown.clone();
        let result = tokio::select! {
            r = server => r.map_err(KitError::from),
            () = async { token.cancelled().await; tokio::time::sleep(drain_delay + grace).await } => {
                tracing::warn!(grace_ms = grace.as_millis(), "in-flight requests outlived the grace period");
                Ok(())
            }
        };
        // A transport error ends serving without a signal: stop the tasks too.
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis(),
                "background tasks outlived the grace period"
            );
        }
        tracing::info!(%addr, "stopped");
        result
    }
}

/// Makes ring rustls' process-wide crypto provider. tonic's TLS uses ring;
/// the AWS SDK links aws-lc-rs as well, and with two providers compiled in
/// rustls will not pick one, so the first handshake would fail. Installing
/// twice is harmless (the first one stays).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// tonic answers a request body that does not decode (malformed bytes, or
/// messages nested deeper than prost's limit of 100, e.g. a deep attribute
/// value) with INTERNAL; the fault is the caller's, so it becomes
/// INVALID_ARGUMENT (found by the e2e RPC fuzzer). Such an answer carries
/// its status in the headers (trailers-only), before any handler ran.
fn undecodable_is_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    const DECODE_FAILURE: &str = "failed to decode Protobuf message";
    let headers = response.headers_mut();
    let undecodable = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers.get("grpc-message").is_some_and(|m| {
            m.to_str()
                .is_ok_and(|m| m.replace("%20", " ").starts_with(DECODE_FAILURE))
        });
    if undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        let message = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or_default();
        let message = format!("the%20request%20could%20not%20be%20decoded%3A%20{message}");
        if let Ok(value) = http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
    }
    response
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    fn trailers_only(status: &str, message: &str) -> http::Response<()> {
        http::Response::builder()
            .header("grpc-status", status)
            .header("grpc-message", message)
            .body(())
            .unwrap()
    }

    #[test]
    fn an_undecodable_request_is_invalid_argument_not_internal() {
        let out = undecodable_is_invalid_argument(trailers_only(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20recursion%20limit%20reached",
        ));
        assert_eq!(out.headers()["grpc-status"], "3");
        let message = out.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.starts_with("the%20request%20could%20not%20be%20decoded"),
            "{message}"
        );
        assert!(message.contains("recursion"), "{message}");
        // Other internal errors stay what they are.
        let other = undecodable_is_invalid_argument(trailers_only("13", "internal%20error"));
        assert_eq!(other.headers()["grpc-status"], "13");
    }
}
