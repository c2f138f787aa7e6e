//! The job-tracker over gRPC, in process: bad input is INVALID_ARGUMENT
//! naming the field, unknown things are NOT_FOUND, and a full unit life
//! cycle works through the generated client.

use std::time::Duration;

use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, FieldError};
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

struct Server {
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    client: JobTrackerServiceClient<Channel>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve() -> Server {
    serve_with(|_| {}).await
}

async fn serve_with(tweak: impl FnOnce(&mut job_tracker::Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = job_tracker::Config {
        server: ServerConfig {
            listen: addr,
            ..ServerConfig::default()
        },
        data_dir: dir.path().to_owned(),
        ..job_tracker::Config::default()
    };
    tweak(&mut config);
    let stop = CancellationToken::new();
    tokio::spawn(job_tracker::run(config, listener, stop.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Server {
        _dir: dir,
        stop,
        client: JobTrackerServiceClient::new(channel),
    }
}

fn violation(status: &tonic::Status) -> FieldError {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("google.rpc.BadRequest details");
    let v = &bad.field_violations[0];
    FieldError::new(v.field.clone(), v.description.clone())
}

fn job(name: &str) -> pb::Job {
    pb::Job {
        name: name.into(),
        kind: pb::JobKind::UnitMigration as i32,
        ..pb::Job::default()
    }
}

#[tokio::test]
async fn an_unbounded_lease_is_refused_naming_the_field() {
    // A lease of i64::MAX seconds overflowed the expiry time (a panic in the
    // handler); leases are 1 s to 10 min, as the proto says.
    let mut s = serve().await;
    for seconds in [i64::MAX, 601] {
        let err = s
            .client
            .claim_unit(pb::ClaimUnitRequest {
                worker_id: "w".into(),
                lease_duration: Some(prost_types::Duration { seconds, nanos: 0 }),
                ..pb::ClaimUnitRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violation(&err).field, "lease_duration", "{err:?}");
    }
}

#[tokio::test]
async fn list_runs_without_a_job_lists_every_jobs_runs_newest_first() {
    // The proto says an empty `job_name` means every job; it was refused as
    // INVALID_ARGUMENT (found by the e2e RPC fuzzer).
    let mut s = serve().await;
    let mut started = Vec::new();
    for name in ["b", "a"] {
        s.client
            .create_job(pb::CreateJobRequest {
                job: Some(job(name)),
            })
            .await
            .unwrap();
        let run = s
            .client
            .start_run(pb::StartRunRequest {
                job_name: name.into(),
                units: vec![pb::UnitSpec {
                    unit_key: "u".into(),
                    after_unit_keys: vec![],
                    ..Default::default()
                }],
                actor: "test".into(),
                ..pb::StartRunRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        started.push(run.run_id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let listed = s
        .client
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.runs.into_iter().map(|r| r.run_id).collect();
    started.reverse();
    assert_eq!(ids, started);
    let none = s
        .client
        .list_runs(pb::ListRunsRequest {
            statuses: vec![pb::RunStatus::Succeeded as i32],
            ..pb::ListRunsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.runs.is_empty(), "{none:?}");
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let mut s = serve().await;
    bad_jobs_name_the_field(&mut s).await;
    unknown_names_are_not_found(&mut s).await;
    unit_writes_check_size_token_and_state(&mut s).await;
}

async fn bad_jobs_name_the_field(s: &mut Server) {
    let cases: Vec<(pb::Job, &str)> = vec![
        (job(""), "job.name"),
        (job("bad name"), "job.name"),
        (
            pb::Job {
                kind: 0,
                ..job("k")
            },
            "job.kind",
        ),
        (
            pb::Job {
                schedule: Some(pb::Schedule {
                    cron: "every hour".into(),
                    ..pb::Schedule::default()
                }),
                default_unit_keys: vec!["w".into()],
                ..job("c")
            },
            "job.schedule.cron",
        ),
        (
            pb::Job {
                schedule: Some(pb::Schedule {
                    cron: "0 0 * * * *".into(),
                    ..pb::Schedule::default()
                }),
                ..job("c")
            },
            "job.default_unit_keys",
        ),
    ];
    for (job, field) in cases {
        let err = s
            .client
            .create_job(pb::CreateJobRequest { job: Some(job) })
            .await
            .unwrap_err();
        assert_eq!(violation(&err).field, field, "{err:?}");
    }
}

async fn unknown_names_are_not_found(s: &mut Server) {
    let err = s
        .client
        .get_job(pb::GetJobRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .client
        .get_run(pb::GetRunRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// An oversized checkpoint names the field; a stale token or a second
/// completion is a precondition failure naming the unit's state.
async fn unit_writes_check_size_token_and_state(s: &mut Server) {
    s.client
        .create_job(pb::CreateJobRequest {
            job: Some(job("m")),
        })
        .await
        .unwrap();
    let run = s
        .client
        .start_run(pb::StartRunRequest {
            job_name: "m".into(),
            units: vec![pb::UnitSpec {
                unit_key: "u".into(),
                after_unit_keys: vec![],
                ..Default::default()
            }],
            ..pb::StartRunRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let claimed = s
        .client
        .claim_unit(pb::ClaimUnitRequest {
            worker_id: "w".into(),
            run_id: run.run_id.clone(),
            ..pb::ClaimUnitRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .unit
        .expect("a unit");
    let token = claimed.lease.unwrap().fencing_token;
    let err = s
        .client
        .checkpoint(pb::CheckpointRequest {
            run_id: run.run_id.clone(),
            unit_key: "u".into(),
            fencing_token: token,
            checkpoint: vec![0; 64 * 1024 + 1],
            ..pb::CheckpointRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violation(&err).field, "checkpoint");
    let err = s
        .client
        .complete_unit(pb::CompleteUnitRequest {
            run_id: run.run_id.clone(),
            unit_key: "u".into(),
            fencing_token: token + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    s.client
        .complete_unit(pb::CompleteUnitRequest {
            run_id: run.run_id.clone(),
            unit_key: "u".into(),
            fencing_token: token,
            ..Default::default()
        })
        .await
        .unwrap();
    // As documented: repeated with the token that completed it (the first
    // answer lost), the unit comes back unchanged.
    let again = s
        .client
        .complete_unit(pb::CompleteUnitRequest {
            run_id: run.run_id.clone(),
            unit_key: "u".into(),
            fencing_token: token,
            ..Default::default()
        })
        .await
        .expect("a repeated CompleteUnit is answered")
        .into_inner()
        .unit
        .expect("the unit");
    assert_eq!(again.status, pb::UnitStatus::Migrated as i32);
}

#[tokio::test]
async fn watch_run_reports_progress_until_done() {
    let mut s = serve().await;
    s.client
        .create_job(pb::CreateJobRequest {
            job: Some(job("w")),
        })
        .await
        .unwrap();
    let units = (0..3)
        .map(|i| pb::UnitSpec {
            unit_key: format!("u{i}"),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    let run = s
        .client
        .start_run(pb::StartRunRequest {
            job_name: "w".into(),
            units,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let mut watch = s
        .client
        .watch_run(pb::WatchRunRequest {
            run_id: run.run_id.clone(),
            min_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().progress.unwrap();
    assert_eq!(first.units.unwrap().total, 3);
    let mut worker = s.client.clone();
    let run_id = run.run_id.clone();
    tokio::spawn(async move {
        while let Some(u) = worker
            .claim_unit(pb::ClaimUnitRequest {
                worker_id: "w".into(),
                run_id: run_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .unit
        {
            tokio::time::sleep(Duration::from_millis(150)).await;
            worker
                .complete_unit(pb::CompleteUnitRequest {
                    run_id: run_id.clone(),
                    unit_key: u.unit_key,
                    fencing_token: u.lease.unwrap().fencing_token,
                    items_processed: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    let mut last = first;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
    {
        last = msg.progress.unwrap();
    }
    assert_eq!(
        last.status,
        pb::RunStatus::Succeeded as i32,
        "the stream ends with the final state"
    );
    assert_eq!(last.units.unwrap().migrated, 3);
    assert_eq!(last.items_processed, 300);
}

#[tokio::test]
async fn watch_routes_sends_a_snapshot_then_changes() {
    let mut s = serve().await;
    s.client
        .create_job(pb::CreateJobRequest {
            job: Some(job("routes")),
        })
        .await
        .unwrap();
    let set = |unit: &str, target: pb::RouteTarget| pb::SetRouteRequest {
        job_name: "routes".into(),
        unit_key: unit.into(),
        target: target as i32,
        actor: "ops".into(),
        reason: "cut-over".into(),
        expected_revision: 0,
    };
    s.client
        .set_route(set("c1", pb::RouteTarget::Target))
        .await
        .unwrap();
    let mut watch = s
        .client
        .watch_routes(pb::WatchRoutesRequest {
            job_name: "routes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.message().await.unwrap().unwrap();
    assert!(snapshot.caught_up);
    assert_eq!(snapshot.routes.len(), 1);
    assert_eq!(
        (
            snapshot.routes[0].unit_key.as_str(),
            snapshot.routes[0].target
        ),
        ("c1", pb::RouteTarget::Target as i32)
    );

    s.client
        .set_route(set("c2", pb::RouteTarget::Target))
        .await
        .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        update
            .routes
            .iter()
            .map(|r| r.unit_key.as_str())
            .collect::<Vec<_>>(),
        ["c2"],
        "only what changed"
    );

    let route = s
        .client
        .get_route(pb::GetRouteRequest {
            job_name: "routes".into(),
            unit_key: "c3".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .route
        .unwrap();
    assert_eq!(
        (route.target, route.revision),
        (pb::RouteTarget::Source as i32, 0),
        "an unrouted unit reads from the source"
    );
    let err = s
        .client
        .set_route(pb::SetRouteRequest {
            target: 0,
            ..set("c1", pb::RouteTarget::Source)
        })
        .await
        .unwrap_err();
    assert_eq!(violation(&err).field, "target");
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    tidemark_kit::metrics::scrape(addr)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn gauges_show_units_by_status_and_blocked_jobs() {
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = serve_with(|c| {
        c.server.metrics_listen = Some(metrics_addr);
        c.gauge_refresh_ms = 100;
    })
    .await;
    s.client
        .create_job(pb::CreateJobRequest {
            job: Some(job("g")),
        })
        .await
        .unwrap();
    let units = ["a", "b"]
        .iter()
        .map(|k| pb::UnitSpec {
            unit_key: (*k).into(),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    let run = s
        .client
        .start_run(pb::StartRunRequest {
            job_name: "g".into(),
            units,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(metrics_addr).await;
        if text.contains("tidemark_job_units{status=\"not_migrated\"} 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.contains("tidemark_job_units{status=\"not_migrated\"} 2"),
        "{text}"
    );
    assert!(text.contains("tidemark_job_active_runs 1"), "{text}");
    s.client
        .fail_run(pb::FailRunRequest {
            run_id: run.run_id,
            error: "boom".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..50 {
        text = scrape(metrics_addr).await;
        if text.contains("tidemark_job_blocked_jobs 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.contains("tidemark_job_blocked_jobs 1"),
        "a failed run awaiting acknowledgement shows: {text}"
    );
    assert!(text.contains("tidemark_job_active_runs 0"), "{text}");
}

#[tokio::test]
async fn a_claim_may_wait_for_work_longer_than_the_request_timeout() {
    // ClaimUnit takes a wait of up to 60 s; the server's request timeout
    // (30 s by default, here 300 ms) cancelled it at that timeout instead.
    let mut s = serve_with(|c| c.server.request_timeout_ms = 300).await;
    s.client
        .create_job(pb::CreateJobRequest {
            job: Some(job("waits")),
        })
        .await
        .unwrap();
    let run = s
        .client
        .start_run(pb::StartRunRequest {
            job_name: "waits".into(),
            units: vec![pb::UnitSpec {
                unit_key: "u".into(),
                after_unit_keys: vec![],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let claim = |wait_ms: i32| pb::ClaimUnitRequest {
        worker_id: "w".into(),
        run_id: run.run_id.clone(),
        wait: Some(prost_types::Duration {
            seconds: 0,
            nanos: wait_ms * 1_000_000,
        }),
        ..Default::default()
    };
    let first = s.client.claim_unit(claim(0)).await.unwrap().into_inner();
    assert!(first.unit.is_some(), "the one unit is claimed");
    // Nothing left: the claim waits its 800 ms and answers empty.
    let started = std::time::Instant::now();
    let second = s.client.claim_unit(claim(800)).await.unwrap().into_inner();
    assert!(second.unit.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
}
