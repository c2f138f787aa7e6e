//! Bearer-token authentication of the four service binaries, each a process
//! of its own with `auth_token` set (the deployed shape): every RPC but
//! `grpc.health.v1` answers UNAUTHENTICATED without the token and with a
//! wrong one, streams included, and the token appears in no log line and no
//! status the services send.
//!
//! The RPCs are read from the protos' descriptor set, not listed here, so a
//! new RPC is covered the day it is added; each is called with an empty
//! message through a generic client, so no generated client is needed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use prost::Message as _;
use prost_types::FileDescriptorSet;
use tidemark_e2e::{cargo_bin, free_addr};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_prost::ProstCodec;

/// Distinctive, so a search of the logs cannot match anything else.
const TOKEN: &str = "tm-e2e-secret-7c41d9a0b2";
/// One character off: a mistyped real token is a secret too.
const WRONG: &str = "tm-e2e-secret-7c41d9a0b3";
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stream may take to send its first message or end.
const FIRST_MESSAGE: Duration = Duration::from_secs(2);

/// Reflection is served by every binary next to its own service; it is
/// not in the tidemark descriptor set but needs the token all the same.
const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// One RPC as the descriptor set describes it.
#[derive(Debug, Clone)]
struct Method {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every method of every service in proto package `package`.
fn methods_of(package: &str) -> Vec<Method> {
    let set = FileDescriptorSet::decode(tidemark_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    let mut methods = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == package) {
        for service in &file.service {
            for method in &service.method {
                methods.push(Method {
                    path: format!("/{package}.{}/{}", service.name(), method.name()),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    methods
}

fn reflection_methods() -> Vec<Method> {
    REFLECTION
        .iter()
        .map(|path| Method {
            path: (*path).to_owned(),
            client_streaming: true,
            server_streaming: true,
        })
        .collect()
}

/// A service binary, run as deployed, its output in a log file.
struct Process {
    package: &'static str,
    addr: std::net::SocketAddr,
    log: PathBuf,
    _child: tokio::process::Child,
}

impl Process {
    async fn start(
        package: &'static str,
        proto: &'static str,
        env: &[(&str, String)],
        dir: &Path,
    ) -> Self {
        let binary = cargo_bin(package, package).await;
        let addr = free_addr();
        let log = dir.join(format!("{package}.log"));
        let out = std::fs::File::create(&log).expect("create the log");
        let mut cmd = tokio::process::Command::new(binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TIDEMARK_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("TIDEMARK_LISTEN", addr.to_string())
            .env("TIDEMARK_AUTH_TOKEN", TOKEN)
            // As verbose as an operator chasing a problem would set it.
            .env("TIDEMARK_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {package}: {e}"));
        let process = Self {
            package: proto,
            addr,
            log,
            _child: child,
        };
        process.wait_serving().await;
        process
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("valid endpoint")
            .connect_lazy()
    }

    /// Health needs no token: it is also the readiness probe.
    async fn wait_serving(&self) {
        let mut health = HealthClient::new(self.channel());
        let started = Instant::now();
        loop {
            let answer = health.check(HealthCheckRequest::default()).await;
            if answer.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} did not serve; log:\n{}",
                self.package,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The four services as separate processes on their embedded stores, all
/// with the same token (the workers send it to the job-tracker).
async fn spawn_services(dir: &Path) -> Vec<Process> {
    let tracker = Process::start(
        "job-tracker",
        "tidemark.job_tracker.v1",
        &[("TIDEMARK_DATA_DIR", dir.join("jobs").display().to_string())],
        dir,
    )
    .await;
    let tables = dir.join("tables").display().to_string();
    let replicator = Process::start(
        "replicator",
        "tidemark.replicator.v1",
        &[
            ("TIDEMARK_JOB_TRACKER_URL", tracker.url()),
            ("TIDEMARK_DATA_DIR", tables.clone()),
        ],
        dir,
    )
    .await;
    let verifier = Process::start(
        "verifier",
        "tidemark.verifier.v1",
        &[
            ("TIDEMARK_JOB_TRACKER_URL", tracker.url()),
            ("TIDEMARK_REPLICATOR_URL", replicator.url()),
            ("TIDEMARK_DATA_DIR", tables),
        ],
        dir,
    )
    .await;
    let stats = Process::start(
        "stats-aggregator",
        "tidemark.stats_aggregator.v1",
        &[
            ("TIDEMARK_BUFFER", "embedded".to_owned()),
            ("TIDEMARK_STORE", "embedded".to_owned()),
            ("TIDEMARK_DATA_DIR", dir.join("stats").display().to_string()),
        ],
        dir,
    )
    .await;
    vec![tracker, replicator, verifier, stats]
}

fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The first message of a stream, or its end, or nothing in time (a watch
/// that is waiting for changes has answered too).
async fn first_message(
    stream: Result<tonic::Response<tonic::Streaming<()>>, Status>,
) -> Result<(), Status> {
    let mut stream = stream?.into_inner();
    match tokio::time::timeout(FIRST_MESSAGE, stream.message()).await {
        Ok(message) => message.map(drop),
        Err(_) => Ok(()),
    }
}

/// Calls `method` with an empty message (one, for a client stream) through
/// a generic client: `()` is the empty protobuf message, and decoding into
/// it skips every field of the answer.
async fn call(channel: Channel, method: &Method, token: Option<&str>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::try_from(method.path.clone()).expect("a valid path");
    let codec = ProstCodec::<(), ()>::default();
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let one = || request(tokio_stream::iter([()]), token);
        match (method.client_streaming, method.server_streaming) {
            (false, false) => grpc.unary(request((), token), path, codec).await.map(drop),
            (false, true) => {
                first_message(grpc.server_streaming(request((), token), path, codec).await).await
            }
            (true, false) => grpc.client_streaming(one(), path, codec).await.map(drop),
            (true, true) => first_message(grpc.streaming(one(), path, codec).await).await,
        }
    };
    tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
}

/// Everything a status carries to the client, as text to search.
fn status_text(status: &Status) -> String {
    format!(
        "{:?} {} {} {:?}",
        status.code(),
        status.message(),
        String::from_utf8_lossy(status.details()),
        status.metadata()
    )
}

#[tokio::test]
async fn every_rpc_of_every_service_needs_the_bearer_token() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let services = spawn_services(dir.path()).await;
    let mut breaches = Vec::new();
    for service in &services {
        let methods = methods_of(service.package);
        assert!(
            methods.len() >= 3,
            "{}: the descriptor set lists {} methods",
            service.package,
            methods.len()
        );
        assert!(
            methods
                .iter()
                .any(|m| m.server_streaming || m.client_streaming),
            "{}: streaming RPCs are enumerated too",
            service.package
        );
        for method in methods.iter().chain(&reflection_methods()) {
            for token in [None, Some(WRONG)] {
                match call(service.channel(), method, token).await {
                    Err(status) if status.code() == Code::Unauthenticated => {}
                    other => breaches.push(format!(
                        "{} with {}: {other:?}",
                        method.path,
                        token.map_or("no token", |_| "a wrong token")
                    )),
                }
            }
            // Past authentication the answer is the service's (mostly
            // INVALID_ARGUMENT for an empty message), never UNAUTHENTICATED.
            if let Err(status) = call(service.channel(), method, Some(TOKEN)).await
                && status.code() == Code::Unauthenticated
            {
                breaches.push(format!(
                    "{} refused the right token: {status:?}",
                    method.path
                ));
            }
        }
        let health = HealthClient::new(service.channel())
            .check(HealthCheckRequest::default())
            .await
            .expect("health needs no token")
            .into_inner();
        assert_eq!(
            health.status(),
            ServingStatus::Serving,
            "{}",
            service.package
        );
    }
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

#[tokio::test]
async fn the_token_is_in_no_log_line_and_no_status() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let services = spawn_services(dir.path()).await;
    let mut answers = Vec::new();
    for service in &services {
        for method in methods_of(service.package)
            .iter()
            .chain(&reflection_methods())
        {
            for token in [None, Some(WRONG), Some(TOKEN)] {
                if let Err(status) = call(service.channel(), method, token).await {
                    answers.push((method.path.clone(), status_text(&status)));
                }
            }
        }
    }
    // Statuses of calls that got past authentication are there too: the
    // services' own errors must not echo a credential either.
    assert!(
        answers.iter().any(|(_, a)| !a.contains("Unauthenticated")),
        "some calls got past authentication"
    );
    for (path, answer) in &answers {
        for secret in [TOKEN, WRONG] {
            assert!(
                !answer.contains(secret),
                "{path} answered with a token: {answer}"
            );
        }
    }
    // The workers have polled the job-tracker with the token meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for service in &services {
        let log = std::fs::read_to_string(&service.log).expect("read the log");
        assert!(
            !log.trim().is_empty(),
            "{} logged nothing at debug",
            service.package
        );
        for (n, line) in log.lines().enumerate() {
            for secret in [TOKEN, WRONG] {
                assert!(
                    !line.contains(secret),
                    "{} log line {} holds a token: {line}",
                    service.package,
                    n + 1
                );
            }
        }
    }
}
