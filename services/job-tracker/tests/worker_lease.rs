//! The kit's worker loop against a real job-tracker (in process): a unit's
//! lease lives exactly as long as a worker really works on it. When the
//! executor ends without finishing the unit (a panic, a lost answer), the
//! heartbeats stop so another worker takes it over; when the job-tracker
//! stops answering, the worker gives the unit up before its lease can lapse
//! there, so two workers never write for one unit.

use std::sync::Arc;
use std::time::Duration;

use tidemark_kit::CancellationToken;
use tidemark_kit::config::ServerConfig;
use tidemark_kit::worker::{Claim, Executor, WorkerOptions, job_tracker_client, run_worker};
use tidemark_proto::job_tracker::v1 as pb;
use tokio::sync::mpsc;

const LEASE: Duration = Duration::from_secs(2);

struct Tracker {
    _dir: tempfile::TempDir,
    url: String,
    stop: CancellationToken,
}

async fn serve() -> Tracker {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = job_tracker::Config {
        server: ServerConfig {
            listen: addr,
            ..ServerConfig::default()
        },
        data_dir: dir.path().to_owned(),
        ..job_tracker::Config::default()
    };
    let stop = CancellationToken::new();
    tokio::spawn(job_tracker::run(config, listener, stop.clone()));
    Tracker {
        _dir: dir,
        url: format!("http://{addr}"),
        stop,
    }
}

/// A job with one unit `u` in a started run; returns the run id.
async fn one_unit_run(url: &str, job: &str) -> String {
    let mut client = job_tracker_client(url, None).unwrap();
    client
        .create_job(pb::CreateJobRequest {
            job: Some(pb::Job {
                name: job.into(),
                kind: pb::JobKind::UnitMigration as i32,
                ..pb::Job::default()
            }),
        })
        .await
        .unwrap();
    client
        .start_run(pb::StartRunRequest {
            job_name: job.into(),
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
        .unwrap()
        .run_id
}

fn options(worker: &str) -> WorkerOptions {
    let mut options = WorkerOptions::new(worker, vec![pb::JobKind::UnitMigration]);
    options.lease = LEASE;
    options.poll_wait = Duration::from_millis(200);
    options.concurrency = 1;
    options
}

/// Claims `run_id`'s unit as another worker, retrying until `within`.
async fn claim_as_other(url: &str, run_id: &str, within: Duration) -> Option<pb::Unit> {
    let mut client = job_tracker_client(url, None).unwrap();
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let claimed = client
            .claim_unit(pb::ClaimUnitRequest {
                worker_id: "other".into(),
                run_id: run_id.to_owned(),
                lease_duration: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..pb::ClaimUnitRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(unit) = claimed.unit {
            return Some(unit);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn a_panicked_executor_stops_heartbeating_its_unit() {
    let tracker = serve().await;
    let run_id = one_unit_run(&tracker.url, "panics").await;
    let (claimed_tx, mut claimed_rx) = mpsc::unbounded_channel();
    let executor: Executor = Arc::new(move |claim: Claim| {
        let claimed_tx = claimed_tx.clone();
        Box::pin(async move {
            claimed_tx.send(claim.unit.unit_key.clone()).unwrap();
            panic!("executor bug (expected by this test)");
        })
    });
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        job_tracker_client(&tracker.url, None).unwrap(),
        options("crashes"),
        executor,
        shutdown.clone(),
    ));
    let unit = tokio::time::timeout(Duration::from_secs(10), claimed_rx.recv())
        .await
        .expect("the worker claims the unit")
        .unwrap();
    assert_eq!(unit, "u");
    // Heartbeats every third of the lease would keep it forever; without
    // them it lapses after LEASE and the other worker gets the unit.
    let taken = claim_as_other(&tracker.url, &run_id, LEASE * 3).await;
    let taken = taken.expect("the unit is claimable once its executor ended");
    assert_eq!(taken.lease.unwrap().owner, "other");
    shutdown.cancel();
    worker.await.unwrap();
    tracker.stop.cancel();
}

#[tokio::test]
async fn a_worker_cut_off_from_the_job_tracker_gives_its_unit_up_in_time() {
    let tracker = serve().await;
    one_unit_run(&tracker.url, "cut-off").await;
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let (claimed_tx, mut claimed_rx) = mpsc::unbounded_channel();
    let executor: Executor = Arc::new(move |claim: Claim| {
        let lost_tx = lost_tx.clone();
        let claimed_tx = claimed_tx.clone();
        Box::pin(async move {
            claimed_tx.send(()).unwrap();
            // Works until told the lease may be gone, like every executor.
            claim.lease.lost().cancelled().await;
            lost_tx.send(tokio::time::Instant::now()).unwrap();
        })
    });
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        job_tracker_client(&tracker.url, None).unwrap(),
        options("cut-off"),
        executor,
        shutdown.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(10), claimed_rx.recv())
        .await
        .expect("the worker claims the unit")
        .unwrap();
    // Let a heartbeat or two through, then take the job-tracker away.
    tokio::time::sleep(LEASE).await;
    let cut = tokio::time::Instant::now();
    tracker.stop.cancel();
    let lost = tokio::time::timeout(LEASE * 3, lost_rx.recv())
        .await
        .expect("the executor is told to stop while the job-tracker is gone")
        .unwrap();
    // The job-tracker extended the lease for LEASE at the last beat before
    // the cut; the worker gives it up a fifth of a lease before that
    // extension can run out, so well within LEASE after the cut.
    let after = lost.duration_since(cut);
    assert!(
        after < LEASE * 4 / 5 + Duration::from_millis(200),
        "the worker kept the unit {after:?} after losing the job-tracker"
    );
    shutdown.cancel();
    worker.await.unwrap();
}

/// A job-tracker on a runtime of its own, so that it keeps answering while
/// the test's runtime (the worker's) is frozen.
fn serve_on_own_thread() -> (String, std::thread::JoinHandle<()>, CancellationToken) {
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let tracker = serve().await;
            url_tx.send(tracker.url.clone()).unwrap();
            stopped.cancelled().await;
            tracker.stop.cancel();
        });
    });
    (url_rx.recv().unwrap(), thread, stop)
}

#[tokio::test]
async fn a_worker_paused_past_its_lease_is_refused_its_destructive_step() {
    let (url, tracker, stop_tracker) = serve_on_own_thread();
    let run_id = one_unit_run(&url, "paused").await;
    let (claimed_tx, claimed_rx) = std::sync::mpsc::channel();
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let executor: Executor = Arc::new(move |claim: Claim| {
        let claimed_tx = claimed_tx.clone();
        let held_tx = held_tx.clone();
        Box::pin(async move {
            claimed_tx.send(()).unwrap();
            // The whole process stops for two leases (a GC pause, a
            // stopped VM): this blocks the runtime its heartbeats run on.
            std::thread::sleep(LEASE * 2);
            let believed_lost = claim.lease.lost().is_cancelled();
            let held = claim.lease.hold().await;
            held_tx.send((believed_lost, held)).unwrap();
        })
    });
    // Another worker takes the unit over while the first is frozen.
    let other = {
        let (url, run_id) = (url.clone(), run_id.clone());
        std::thread::spawn(move || {
            claimed_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the first worker claims the unit");
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(claim_as_other(&url, &run_id, LEASE * 2))
        })
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        job_tracker_client(&url, None).unwrap(),
        options("paused"),
        executor,
        shutdown.clone(),
    ));
    let (believed_lost, held) = tokio::time::timeout(Duration::from_secs(20), held_rx.recv())
        .await
        .expect("the executor wakes up")
        .unwrap();
    let taken = other.join().unwrap();
    assert_eq!(
        taken
            .expect("the unit is taken over while its worker is frozen")
            .lease
            .unwrap()
            .owner,
        "other"
    );
    // Nothing told the frozen worker: only asking the job-tracker does.
    assert!(!believed_lost, "the frozen worker could not have known");
    assert!(
        matches!(held, Err(tidemark_kit::worker::LeaseError::Lost(_))),
        "a worker whose unit was taken over must not remove the new holder's copy: {held:?}"
    );
    shutdown.cancel();
    worker.await.unwrap();
    stop_tracker.cancel();
    tracker.join().unwrap();
}
