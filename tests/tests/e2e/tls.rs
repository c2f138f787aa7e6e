//! TLS (rustls): with `tls_cert` and `tls_key` set, a service answers TLS
//! clients that trust its certificate and nothing in plaintext.

use std::time::Duration;

use tidemark_e2e::spawn_job_tracker;
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[tokio::test]
async fn tls_serves_only_clients_that_speak_it() {
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let server = spawn_job_tracker(|c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(issued.cert.pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("a TLS client that trusts the certificate connects");
    let jobs = JobTrackerServiceClient::new(channel)
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert!(jobs.is_ok(), "{jobs:?}");

    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        JobTrackerServiceClient::new(plain).list_jobs(pb::ListJobsRequest::default()),
    )
    .await
    .expect("a plaintext call fails rather than hangs");
    assert!(
        refused.is_err(),
        "plaintext must not be served: {refused:?}"
    );
}

#[tokio::test]
async fn the_client_crate_trusts_a_private_ca_given_in_its_options() {
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let server = spawn_job_tracker(|c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    let client = tidemark_client::Tidemark::connect(tidemark_client::Options {
        endpoint: format!("https://{}", server.addr),
        tls_ca_pem: Some(issued.cert.pem()),
        tls_domain: Some("localhost".to_owned()),
        ..tidemark_client::Options::default()
    })
    .expect("valid options");
    let jobs = client
        .jobs()
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert!(jobs.is_ok(), "{jobs:?}");

    let refused = tidemark_client::Tidemark::connect(tidemark_client::Options {
        endpoint: format!("http://{}", server.addr),
        tls_ca_pem: Some(issued.cert.pem()),
        ..tidemark_client::Options::default()
    });
    assert!(
        matches!(refused, Err(tidemark_client::ClientError::Endpoint { .. })),
        "a CA for a plaintext endpoint is a configuration error"
    );
}
