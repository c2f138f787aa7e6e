//! Re-checks that follow a real pipeline's lag and repairs through the real
//! replicator: a job-tracker and a replicator (worker included) on one
//! address, the verifier on another, all in process, sharing the embedded
//! store's directory.

use std::time::{Duration, Instant};

use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::{local_env, local_sdk_config, unique_name};
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable};
use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::common::v1 as common;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::replicator::v1 as rpb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tidemark_proto::verifier::v1 as pb;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::transport::Channel;

struct Plane {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    stop: CancellationToken,
    replicator: ReplicatorServiceClient<Channel>,
    verifier: VerifierServiceClient<Channel>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn plane() -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ServerConfig {
        listen: addr,
        shutdown_grace_ms: 2000,
        ..ServerConfig::default()
    };
    let mut host = ServiceHost::new(server.clone(), stop.clone());
    let jobs = job_tracker::Config {
        server: server.clone(),
        data_dir: dir.path().join("jobs"),
        ..job_tracker::Config::default()
    };
    job_tracker::register(&jobs, &mut host).await.unwrap();
    let config = replicator::Config {
        server,
        job_tracker_url: format!("http://{addr}"),
        aws_endpoint: Some(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")),
        elasticsearch_url: Some(local_env("TIDEMARK_TEST_ELASTICSEARCH_URL")),
        data_dir: data.clone(),
        lease_secs: 3,
        ..replicator::Config::default()
    };
    let aws = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
    replicator::register_with(&config, &mut host, Some(aws.clone()))
        .await
        .unwrap();
    tokio::spawn(host.serve(listener));

    let vl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let va = vl.local_addr().unwrap();
    let vconfig = verifier::Config {
        server: ServerConfig {
            listen: va,
            shutdown_grace_ms: 2000,
            ..ServerConfig::default()
        },
        job_tracker_url: format!("http://{addr}"),
        replicator_url: format!("http://{addr}"),
        aws_endpoint: Some(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")),
        elasticsearch_url: Some(local_env("TIDEMARK_TEST_ELASTICSEARCH_URL")),
        data_dir: data.clone(),
        worker_id: unique_name("verifier"),
        concurrency: 2,
        ..verifier::Config::default()
    };
    let mut vhost = ServiceHost::new(vconfig.server.clone(), stop.clone());
    verifier::register_with(&vconfig, Some(aws), &mut vhost)
        .await
        .unwrap();
    tokio::spawn(vhost.serve(vl));
    let channel = |a| {
        Channel::from_shared(format!("http://{a}"))
            .unwrap()
            .connect_lazy()
    };
    Plane {
        _dir: dir,
        data,
        stop,
        replicator: ReplicatorServiceClient::new(channel(addr)),
        verifier: VerifierServiceClient::new(channel(va)),
    }
}

fn sqlite(table: &str, keys: &[&str]) -> common::DataStore {
    common::DataStore {
        store: Some(Store::SqliteTable(common::SqliteTableRef {
            table_name: table.to_owned(),
            database: String::new(),
            key_attribute_names: keys.iter().map(|k| (*k).to_owned()).collect(),
        })),
    }
}

fn item(id: &str, body: &str) -> Item {
    [
        ("id".to_owned(), AttrValue::s(id)),
        ("body".to_owned(), AttrValue::s(body)),
        ("n".to_owned(), AttrValue::n(7i64)),
    ]
    .into()
}

async fn report(p: &mut Plane, id: &str) -> pb::Report {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = p
            .verifier
            .get_report(pb::GetReportRequest {
                verification_id: id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .report
            .unwrap();
        if r.status == pb::VerificationStatus::Completed as i32
            || r.status == pb::VerificationStatus::Failed as i32
        {
            return r;
        }
        assert!(Instant::now() < deadline, "never finished: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn repair_fixes_seeded_divergences_through_the_replicator() {
    let mut p = plane().await;
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    std::fs::create_dir_all(&p.data).unwrap();
    let path = verifier::side::sqlite_path(&p.data, None);
    let store = EmbeddedStore::open(&path).unwrap();
    let source = store.table(&src, KeySchema::new("id", None));
    for i in 0..40 {
        source
            .put(&item(&format!("r-{i:03}"), "v1"), None)
            .await
            .unwrap();
    }
    let name = unique_name("verify-repair");
    p.replicator
        .create_pipeline(rpb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(rpb::PipelineSpec {
                source: Some(sqlite(&src, &["id"])),
                feed: Some(rpb::ChangeFeed {
                    feed: Some(rpb::change_feed::Feed::EmbeddedChangeLog(
                        rpb::EmbeddedChangeLogFeed {
                            start_position: rpb::StartPosition::TrimHorizon as i32,
                        },
                    )),
                }),
                sinks: vec![rpb::Sink {
                    name: "copy".to_owned(),
                    store: Some(sqlite(&dst, &["id"])),
                    ..Default::default()
                }],
                backfill: Some(rpb::BackfillOptions {
                    mode: rpb::BackfillMode::None as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Streaming, then caught up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let drained = p
            .replicator
            .drain(rpb::DrainRequest {
                name: name.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            })
            .await;
        match drained {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("drain: {s:?}"),
        }
    }
    // Damage the copy behind the replicator's back: a lost write, a foreign
    // edit, a resurrected item.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(Duration::from_secs(5)).unwrap();
    let k = |id: &str| tidemark_connectors::Key::single("id", AttrValue::s(id)).canonical();
    assert_eq!(
        raw.execute(
            "DELETE FROM tm_sink WHERE sink = ?1 AND k = ?2",
            rusqlite::params![dst, k("r-001")],
        )
        .unwrap(),
        1
    );
    raw.execute(
        "UPDATE tm_sink SET item = ?3 WHERE sink = ?1 AND k = ?2",
        rusqlite::params![
            dst,
            k("r-002"),
            tidemark_connectors::value::canonical_item(&item("r-002", "edited"))
        ],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO tm_sink (sink, k, version, deleted, item) VALUES (?1, ?2, 1, 0, ?3)",
        rusqlite::params![
            dst,
            k("ghost"),
            tidemark_connectors::value::canonical_item(&item("ghost", "gone"))
        ],
    )
    .unwrap();

    let spec = |repair: bool| pb::VerificationSpec {
        source: Some(sqlite(&src, &["id"])),
        target: Some(sqlite(&dst, &[])),
        checks: vec![pb::Check {
            name: "digest".to_owned(),
            kind: Some(pb::check::Kind::Digest(pb::DigestCheck::default())),
        }],
        recheck: Some(pb::RecheckPolicy {
            rounds: 1,
            min_wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            pipeline_name: name.clone(),
        }),
        repair,
        ..Default::default()
    };
    let start = |repair: bool| pb::StartVerificationRequest {
        job_name: unique_name("verify"),
        spec: Some(spec(repair)),
        actor: "test".to_owned(),
        ..Default::default()
    };
    // Without repair: found after the lag has passed, and reported.
    let id = p
        .verifier
        .start_verification(start(false))
        .await
        .unwrap()
        .into_inner()
        .verification_id;
    let r = report(&mut p, &id).await;
    let d = &r.checks[0];
    assert_eq!(d.verdict, pb::Verdict::Fail as i32, "{d:?}");
    assert_eq!(
        d.mismatches,
        Some(pb::MismatchCounts {
            missing_in_target: 1,
            extra_in_target: 1,
            stale_version: 0,
            different_content: 1,
        }),
        "{d:?}"
    );
    // With repair: the replicator rewrites the keys, and they then match.
    let id = p
        .verifier
        .start_verification(start(true))
        .await
        .unwrap()
        .into_inner()
        .verification_id;
    let r = report(&mut p, &id).await;
    let d = &r.checks[0];
    assert_eq!(d.verdict, pb::Verdict::Pass as i32, "{d:?}");
    assert_eq!(d.repaired, 3, "{d:?}");
    assert_eq!(d.mismatches, Some(pb::MismatchCounts::default()));
    assert!(d.sample_mismatches.iter().all(|m| m.repaired), "{d:?}");
    assert_eq!(r.verdict, pb::Verdict::Pass as i32);
    // And the copy agrees with its source now.
    let id = p
        .verifier
        .start_verification(start(false))
        .await
        .unwrap()
        .into_inner()
        .verification_id;
    let r = report(&mut p, &id).await;
    assert_eq!(r.verdict, pb::Verdict::Pass as i32, "{r:?}");
    assert_eq!(r.checks[0].repaired, 0);
}
