//! The in-process control plane the replicator's tests run against: the
//! job-tracker and a replicator (worker included) on one address, talking to
//! the real local DynamoDB, S3 and Elasticsearch endpoints.
#![allow(dead_code, reason = "each test binary uses part of it")]

use std::sync::Arc;
use std::time::Duration;

use tidemark_connectors::testing::{local_env, local_sdk_config};
use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::transport::Channel;

pub struct Plane {
    pub _dir: Option<tempfile::TempDir>,
    pub stop: CancellationToken,
    pub jobs: JobTrackerServiceClient<Channel>,
    pub replicator: ReplicatorServiceClient<Channel>,
    /// Where `GET /metrics` is served.
    pub metrics: std::net::SocketAddr,
}

impl Plane {
    /// The Prometheus exposition, as a scraper reads it.
    pub async fn scrape(&self) -> String {
        tidemark_kit::metrics::scrape(self.metrics).await.unwrap()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The job-tracker and a replicator (worker included) on one address.
pub async fn plane(tweak: impl FnOnce(&mut replicator::Config)) -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = plane_in(dir.path(), tweak).await;
    plane._dir = Some(dir);
    plane
}

/// Like [`plane`], keeping the job-tracker's store in `dir` so a later plane
/// (a restarted process) sees the same jobs.
pub async fn plane_in(dir: &std::path::Path, tweak: impl FnOnce(&mut replicator::Config)) -> Plane {
    capture_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = ServerConfig {
        listen: addr,
        metrics_listen: Some(metrics),
        ..ServerConfig::default()
    };
    let stop = CancellationToken::new();
    let mut host = ServiceHost::new(server.clone(), stop.clone());
    let jobs = job_tracker::Config {
        server: server.clone(),
        data_dir: dir.join("jobs"),
        scheduler_tick_ms: 200,
        ..job_tracker::Config::default()
    };
    std::fs::create_dir_all(&jobs.data_dir).unwrap();
    job_tracker::register(&jobs, &mut host).await.unwrap();
    let mut config = replicator::Config {
        server,
        job_tracker_url: format!("http://{addr}"),
        aws_endpoint: Some(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")),
        elasticsearch_url: Some(local_env("TIDEMARK_TEST_ELASTICSEARCH_URL")),
        kafka_brokers: Some(local_env("TIDEMARK_TEST_KAFKA_BROKERS")),
        data_dir: dir.join("data"),
        lease_secs: 3,
        ..replicator::Config::default()
    };
    tweak(&mut config);
    let aws = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
    replicator::register_with(&config, &mut host, Some(aws))
        .await
        .unwrap();
    tokio::spawn(async move { host.serve(listener).await });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Plane {
        _dir: None,
        stop,
        jobs: JobTrackerServiceClient::new(channel.clone()),
        replicator: ReplicatorServiceClient::new(channel),
        metrics,
    }
}

/// Sends the services' logs (`RUST_LOG`, else info) to the test's captured
/// output, so a failing test shows what its plane did; the runtime's worker
/// threads inherit the capture of the test that started them.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,aws=warn")
    });
    // Another test of the binary may have installed it first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub async fn dynamo() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await)
}

pub fn table_ref(name: &str) -> common::DataStore {
    common::DataStore {
        store: Some(common::data_store::Store::DynamodbTable(
            common::DynamoDbTableRef {
                table_name: name.to_owned(),
                ..Default::default()
            },
        )),
    }
}

pub async fn wait_run(jobs: &mut JobTrackerServiceClient<Channel>, run_id: &str) -> jt::Run {
    for _ in 0..1200 {
        let run = jobs
            .get_run(jt::GetRunRequest {
                run_id: run_id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        if !matches!(
            jt::RunStatus::try_from(run.status),
            Ok(jt::RunStatus::Running | jt::RunStatus::Queued)
        ) {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {run_id} did not finish in 2 minutes");
}

/// A TCP forwarder to the local DynamoDB that counts the requests awaiting
/// their answer at once: its endpoint URL, and the most it saw. An HTTP/1.1
/// client sends one request at a time per connection, so a connection is
/// busy from its request's first bytes to its answer's first bytes (idle
/// connections in the client's pool do not count).
pub async fn counting_proxy_to_dynamodb() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let upstream = local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let busy = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let most = Arc::clone(&peak);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (upstream, busy, most) = (upstream.clone(), Arc::clone(&busy), Arc::clone(&most));
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let waiting = Arc::new(AtomicBool::new(false));
                let (mut client_r, mut client_w) = inbound.into_split();
                let (mut server_r, mut server_w) = outbound.into_split();
                let requests = {
                    let (busy, waiting) = (Arc::clone(&busy), Arc::clone(&waiting));
                    async move {
                        let mut buf = vec![0; 64 * 1024];
                        while let Ok(n @ 1..) = client_r.read(&mut buf).await {
                            if !waiting.swap(true, Ordering::SeqCst) {
                                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                            }
                            if server_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_w.shutdown().await;
                    }
                };
                let answers = {
                    let (busy, waiting) = (Arc::clone(&busy), Arc::clone(&waiting));
                    async move {
                        let mut buf = vec![0; 64 * 1024];
                        while let Ok(n @ 1..) = server_r.read(&mut buf).await {
                            if waiting.swap(false, Ordering::SeqCst) {
                                busy.fetch_sub(1, Ordering::SeqCst);
                            }
                            if client_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = client_w.shutdown().await;
                    }
                };
                tokio::join!(requests, answers);
                if waiting.swap(false, Ordering::SeqCst) {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    (format!("http://{addr}"), peak)
}
