//! Deadlines propagate: a call to the job-tracker made while an RPC is
//! being served carries what is left of that RPC's deadline as its own
//! `grpc-timeout`, and gives up with it, instead of a fixed bound of its own.

use std::time::Duration;

use tidemark_connectors::deadline;
use tidemark_e2e::spawn_job_tracker;
use tidemark_kit::jobs::JobTracker;
use tidemark_proto::job_tracker::v1 as pb;
use tonic::Code;

fn claim_waiting(wait: Duration) -> pb::ClaimUnitRequest {
    pb::ClaimUnitRequest {
        worker_id: "deadline-test".to_owned(),
        kinds: vec![pb::JobKind::UnitMigration as i32],
        lease_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        wait: Some(prost_types::Duration {
            seconds: i64::try_from(wait.as_secs()).unwrap(),
            nanos: 0,
        }),
        ..pb::ClaimUnitRequest::default()
    }
}

#[tokio::test]
async fn a_downstream_call_ends_with_the_deadline_of_the_rpc_it_serves() {
    let server = spawn_job_tracker(|_| {}).await;
    let jobs = JobTracker::connect(&format!("http://{}", server.addr), None).unwrap();
    // Nothing to claim: the job-tracker would hold the claim for its whole
    // 20 s wait.
    let started = tokio::time::Instant::now();
    let answer = deadline::within(started + Duration::from_millis(800), async {
        jobs.raw()
            .claim_unit(claim_waiting(Duration::from_secs(20)))
            .await
    })
    .await;
    let took = started.elapsed();
    let status = answer.expect_err("the claim cannot outlive its caller's deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "ended after {took:?}"
    );

    // Outside any RPC, the same claim runs its course: the job-tracker
    // answers "nothing to claim" when its wait is over.
    let started = tokio::time::Instant::now();
    let idle = jobs
        .raw()
        .claim_unit(claim_waiting(Duration::from_secs(1)))
        .await
        .expect("an idle claim answers");
    assert!(idle.into_inner().unit.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // A deadline already past is refused before anything is sent.
    let past = deadline::within(tokio::time::Instant::now(), async {
        jobs.raw().list_jobs(pb::ListJobsRequest::default()).await
    })
    .await
    .expect_err("no time left");
    assert_eq!(past.code(), Code::DeadlineExceeded, "{past:?}");
    assert!(
        past.message().contains("deadline of the RPC being served"),
        "{past:?}"
    );
}
