//! The RPC metrics as Prometheus scrapes them from a real `ServiceHost`:
//! a call shed over the concurrency limit counts as RESOURCE_EXHAUSTED, one
//! past the request timeout as DEADLINE_EXCEEDED, one its client gave up on
//! as CANCELLED, each under its method, read from `GET /metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, ServiceHost};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::Channel;

/// A gRPC service whose one method answers after the time its path names
/// (`/tidemark.test.v1.SlowService/Sleep<millis>`), with an empty message.
#[derive(Clone)]
struct Slow;

impl NamedService for Slow {
    const NAME: &'static str = "tidemark.test.v1.SlowService";
}

impl tower::Service<http::Request<Body>> for Slow {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let millis: u64 = req
            .uri()
            .path()
            .rsplit("Sleep")
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "0")
                .body(Body::empty())
                .expect("a valid response"))
        })
    }
}

async fn call(channel: Channel, millis: u64) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let path = PathAndQuery::try_from(format!("/{}/Sleep{millis}", Slow::NAME)).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn shed_timed_out_and_cancelled_calls_are_scraped_by_grpc_code() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics_addr = free_addr();
    let config = ServerConfig {
        listen: addr,
        metrics_listen: Some(metrics_addr),
        request_timeout_ms: 300,
        concurrency_limit: 1,
        ..ServerConfig::default()
    };
    let stop = CancellationToken::new();
    let mut host = ServiceHost::new(config, stop.clone());
    host.add_service(Slow);
    let server = tokio::spawn(host.serve(listener));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();

    // Past the request timeout: the server answers DEADLINE_EXCEEDED. While
    // it holds the only permit, the next call is shed.
    let slow = tokio::spawn(call(channel.clone(), 10_000));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        call(channel.clone(), 0).await,
        tonic::Code::ResourceExhausted,
        "a call over the concurrency limit is shed"
    );
    assert_eq!(slow.await.unwrap(), tonic::Code::DeadlineExceeded);
    // A client that gives up: the server counts it as CANCELLED.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), call(channel.clone(), 200)).await;
    assert!(gave_up.is_err(), "the client gave up first");
    // A call that completes, once the abandoned one let go of the permit.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fine = call(channel.clone(), 0).await;
    assert_ne!(fine, tonic::Code::ResourceExhausted, "the permit came back");

    let mut text = String::new();
    for _ in 0..50 {
        text = tidemark_kit::metrics::scrape(metrics_addr).await.unwrap();
        if text.contains("CANCELLED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rpc = |millis: u64| format!("/{}/Sleep{millis}", Slow::NAME);
    for (rpc, code) in [
        (rpc(10_000), "DEADLINE_EXCEEDED"),
        (rpc(0), "RESOURCE_EXHAUSTED"),
        (rpc(200), "CANCELLED"),
        (rpc(0), "OK"),
    ] {
        let line = format!("tidemark_rpc_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} 1");
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    assert!(
        text.contains("tidemark_rpc_duration_seconds_count"),
        "latency histogram missing:\n{text}"
    );
    stop.cancel();
    let _ = server.await;
}
