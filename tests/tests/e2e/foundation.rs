//! What every service answers the same way because it is served by the kit:
//! reflection, health, field violations, graceful shutdown, bearer auth,
//! exit code 64 on bad configuration, Prometheus metrics.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tidemark_e2e::{cargo_bin, channel, free_addr, spawn_dev, spawn_job_tracker, unique_name};
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::job_tracker::v1::{
    ClaimUnitRequest, CreateJobRequest, GetJobRequest, Job, JobKind,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

const TIDEMARK_SERVICES: [&str; 4] = [
    tidemark_proto::job_tracker::v1::job_tracker_service_server::SERVICE_NAME,
    tidemark_proto::replicator::v1::replicator_service_server::SERVICE_NAME,
    tidemark_proto::stats_aggregator::v1::stats_aggregator_service_server::SERVICE_NAME,
    tidemark_proto::verifier::v1::verifier_service_server::SERVICE_NAME,
];
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

async fn list_services_v1(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1 answers")
        .into_inner();
    let response: ServerReflectionResponse = responses
        .message()
        .await
        .expect("reflection v1 stream")
        .expect("one reflection v1 response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("reflection v1 answered list_services with {other:?}"),
    }
}

async fn list_services_v1alpha(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1alpha answers")
        .into_inner();
    let response: ServerReflectionResponse = responses
        .message()
        .await
        .expect("reflection v1alpha stream")
        .expect("one reflection v1alpha response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("reflection v1alpha answered list_services with {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_the_four_services_and_health_in_v1_and_v1alpha() {
    let dev = spawn_dev().await;
    let channel = dev.channel().await;
    for (version, services) in [
        ("v1", list_services_v1(channel.clone()).await),
        ("v1alpha", list_services_v1alpha(channel.clone()).await),
    ] {
        for expected in TIDEMARK_SERVICES.into_iter().chain([HEALTH_SERVICE]) {
            assert!(
                services.iter().any(|s| s == expected),
                "reflection {version} does not list {expected}: {services:?}"
            );
        }
        let tidemark: Vec<&String> = services
            .iter()
            .filter(|s| s.starts_with("tidemark."))
            .collect();
        assert_eq!(
            tidemark.len(),
            4,
            "reflection {version} lists exactly the four tidemark.*.v1 services: {services:?}"
        );
        for name in tidemark {
            let parts: Vec<&str> = name.split('.').collect();
            assert!(
                parts.len() == 4 && parts[2] == "v1" && parts[3].ends_with("Service"),
                "{name} is not tidemark.<svc>.v1.<Name>Service"
            );
        }
    }
}

#[tokio::test]
async fn health_is_serving_for_each_service_and_the_host() {
    let dev = spawn_dev().await;
    let mut health = HealthClient::new(dev.channel().await);
    for service in TIDEMARK_SERVICES.into_iter().chain([""]) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?} failed: {e}"))
            .into_inner()
            .status();
        assert_eq!(
            status,
            ServingStatus::Serving,
            "health of {service:?} is {status:?}"
        );
    }
}

#[tokio::test]
async fn malformed_request_is_invalid_argument_naming_the_field() {
    let dev = spawn_dev().await;
    let mut jobs = JobTrackerServiceClient::new(dev.channel().await);
    let status = jobs
        .create_job(CreateJobRequest {
            job: Some(Job {
                name: String::new(),
                kind: JobKind::BackfillAttribute.into(),
                description: unique_name("e2e-malformed"),
                ..Job::default()
            }),
        })
        .await
        .expect_err("a job without a name is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("INVALID_ARGUMENT carries google.rpc.BadRequest: {status:?}"));
    assert!(
        bad_request
            .field_violations
            .iter()
            .any(|v| v.field == "job.name" && !v.description.is_empty()),
        "a described violation of job.name: {bad_request:?}"
    );
}

/// Strips the `TIDEMARK_…` variables of the environment running the tests,
/// so a child service sees exactly the configuration the test gives it.
fn hermetic(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIDEMARK_") {
            cmd.env_remove(key);
        }
    }
    cmd.kill_on_drop(true)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

#[tokio::test]
async fn sigterm_completes_the_request_in_flight_and_exits_0() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let binary = cargo_bin("job-tracker", "job-tracker").await;
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let log_path = data_dir.path().join("job-tracker.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let addr = free_addr();
    let mut child = hermetic(&mut tokio::process::Command::new(&binary))
        .env("TIDEMARK_LISTEN", addr.to_string())
        .env("TIDEMARK_DATA_DIR", data_dir.path().join("store"))
        .env("TIDEMARK_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start job-tracker");

    // Ready when health says SERVING.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if let Some(status) = child.try_wait().expect("poll job-tracker") {
            panic!(
                "job-tracker exited with {status} before serving:\n{}",
                read_log(&log_path)
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job-tracker not SERVING within 30 s:\n{}",
            read_log(&log_path)
        );
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
        {
            let serving = HealthClient::new(channel.clone())
                .check(HealthCheckRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving);
            if serving {
                break channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // A long poll that finds nothing returns empty after `wait`.
    let mut jobs = JobTrackerServiceClient::new(channel);
    let claim = tokio::spawn(async move {
        jobs.claim_unit(ClaimUnitRequest {
            worker_id: "w1".to_owned(),
            kinds: vec![JobKind::BackfillAttribute.into()],
            wait: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..ClaimUnitRequest::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if claim.is_finished() {
        let early = claim.await.expect("claim task");
        panic!("ClaimUnit with wait 3 s returned before SIGTERM was sent: {early:?}");
    }
    let pid = Pid::from_raw(
        i32::try_from(child.id().expect("job-tracker is running")).expect("pid fits in i32"),
    );
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");

    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let claimed = claim.await.expect("claim task");
        let status = child.wait().await.expect("wait for job-tracker");
        (claimed, status)
    })
    .await;
    let Ok((claimed, status)) = outcome else {
        panic!(
            "job-tracker did not finish within 10 s of SIGTERM:\n{}",
            read_log(&log_path)
        );
    };
    let log = read_log(&log_path);
    if let Err(e) = claimed {
        panic!("the ClaimUnit in flight at SIGTERM failed: {e:?}\n{log}");
    }
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");
}

#[tokio::test]
async fn bearer_token_is_required_except_for_health() {
    let tracker = spawn_job_tracker(|c| c.server.auth_token = Some("s3cret".to_owned())).await;
    let channel = tracker.channel().await;
    let mut jobs = JobTrackerServiceClient::new(channel.clone());
    let name = unique_name("e2e-auth");

    let refused = jobs
        .get_job(GetJobRequest { name: name.clone() })
        .await
        .expect_err("a call without a token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let mut wrong = tonic::Request::new(GetJobRequest { name: name.clone() });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer s3cre".parse().expect("ascii"));
    let refused = jobs
        .get_job(wrong)
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let mut authorized = tonic::Request::new(GetJobRequest { name });
    authorized
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
    // Past authentication the answer depends on the job-tracker (NOT_FOUND
    // for an unknown job), never UNAUTHENTICATED.
    if let Err(status) = jobs.get_job(authorized).await {
        assert_ne!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    let health = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no token")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn bad_config_exits_64_naming_the_setting() {
    let binary = cargo_bin("job-tracker", "job-tracker").await;
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        hermetic(&mut tokio::process::Command::new(&binary))
            .env("TIDEMARK_LISTEN", free_addr().to_string())
            .env("TIDEMARK_DATA_DIR", data_dir.path())
            .env("TIDEMARK_REQUEST_TIMEOUT_MS", "0")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("job-tracker exits at once on bad configuration")
    .expect("run job-tracker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(64),
        "{}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains("request_timeout_ms"),
        "stderr names the bad setting: {stderr}"
    );
}

/// `GET path` over HTTP/1.1 on a fresh connection; returns status line and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

#[tokio::test]
async fn metrics_endpoint_counts_rpcs() {
    let metrics_addr = free_addr();
    let tracker = spawn_job_tracker(|c| c.server.metrics_listen = Some(metrics_addr)).await;
    let mut jobs = JobTrackerServiceClient::new(channel(tracker.addr).await);
    // Any answer counts, an error included.
    let _ = jobs
        .get_job(GetJobRequest {
            name: unique_name("e2e-metrics"),
        })
        .await;

    let rpc = "/tidemark.job_tracker.v1.JobTrackerService/GetJob";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The endpoint starts with the host; the first GETs may come early.
        let last = http_get(metrics_addr, "/metrics").await;
        if let Ok((status, body)) = &last
            && status.contains(" 200 ")
            && body
                .lines()
                .any(|l| l.starts_with("tidemark_rpc_requests_total{") && l.contains(rpc))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tidemark_rpc_requests_total for {rpc} at http://{metrics_addr}/metrics: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
