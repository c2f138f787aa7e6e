//! An HTTP proxy in front of a DynamoDB endpoint that throttles writes as a
//! provisioned table does: writes (`PutItem`, `UpdateItem`, `DeleteItem`,
//! `BatchWriteItem`, `TransactWriteItems`) take a token from a bucket
//! refilled at the table's capacity, and a write finding none is answered
//! `400 ProvisionedThroughputExceededException` without reaching the
//! endpoint. Reads and everything else pass. It counts what it passed and
//! what it throttled.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many seconds of capacity the bucket holds (DynamoDB keeps up to
/// five minutes of unused capacity as burst; a short burst here, so a run
/// of seconds meets the limit rather than the burst).
const BURST_SECS: f64 = 0.2;

const WRITES: [&str; 5] = [
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "BatchWriteItem",
    "TransactWriteItems",
];

const THROTTLED_BODY: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded. Consider increasing your provisioning level with the UpdateTable API."}"#;

struct Shared {
    upstream: String,
    http: reqwest::Client,
    /// Writes per second the table takes; `None`: unthrottled.
    capacity: Mutex<(Option<f64>, f64, Instant)>,
    passed: AtomicU64,
    throttled: AtomicU64,
}

/// A running throttling proxy on `127.0.0.1:0`; stops when dropped.
pub struct ThrottleProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ThrottleProxy {
    /// Proxies to `upstream` (`http://host:port`), unthrottled until
    /// [`Self::set_capacity`].
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().build()?,
            capacity: Mutex::new((None, 0.0, Instant::now())),
            passed: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "throttle proxy stopped");
            }
        });
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// Where clients send their requests instead of the endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes per second the table takes from now on (`None`: all).
    pub fn set_capacity(&self, per_second: Option<f64>) {
        let mut c = self
            .shared
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *c = (per_second, 0.0, Instant::now());
    }

    /// Writes passed and writes throttled since the last call.
    pub fn take_counts(&self) -> (u64, u64) {
        (
            self.shared.passed.swap(0, Ordering::Relaxed),
            self.shared.throttled.swap(0, Ordering::Relaxed),
        )
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Shared {
    /// Takes a write token; `false`: the write is throttled.
    fn admit(&self) -> bool {
        let mut c = self
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (capacity, tokens, last) = &mut *c;
        let Some(rate) = *capacity else {
            return true;
        };
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate)
            .min((rate * BURST_SECS).max(1.0));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let write = WRITES.iter().any(|w| target.rsplit('.').next() == Some(*w));
    if write {
        if shared.admit() {
            shared.passed.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.throttled.fetch_add(1, Ordering::Relaxed);
            return reply(
                StatusCode::BAD_REQUEST,
                "application/x-amz-json-1.0",
                Bytes::from_static(THROTTLED_BODY.as_bytes()),
            );
        }
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = shared
        .http
        .request(method, format!("{}{path}", shared.upstream))
        .body(body);
    for (name, value) in &headers {
        if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let kind = response
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/x-amz-json-1.0")
                .to_owned();
            match response.bytes().await {
                Ok(bytes) => reply(status, &kind, bytes),
                Err(e) => bad_gateway(&e),
            }
        }
        Err(e) => bad_gateway(&e),
    }
}

fn reply(status: StatusCode, kind: &str, body: Bytes) -> Response {
    Response::builder()
        .status(status)
        .header(axum::http::header::CONTENT_TYPE, kind)
        .body(Body::from(body))
        .unwrap_or_default()
}

fn bad_gateway(e: &reqwest::Error) -> Response {
    reply(
        StatusCode::BAD_GATEWAY,
        "text/plain",
        Bytes::from(e.to_string()),
    )
}
