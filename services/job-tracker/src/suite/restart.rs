//! A StartRun interrupted between creating its run and registering the
//! run's units (the process killed, the store failing) leaves a QUEUED run
//! that holds the job; the same request again (same `correlation_id`)
//! finishes that start instead of answering with the stuck run. Found by
//! the fault matrix: a verification stayed QUEUED for good.
//!
//! Likewise a worker (or job-tracker) killed between completing the last
//! unit of an explicit-completion run and CompleteRun left the run RUNNING
//! for good (a verification, found by the 10-minute matrix run): the unit's
//! completion now carries how the run ends, and any later claim ends it.
//! An incremental extract's run ends the same way, with its watermark: the
//! 10-minute matrix left one RUNNING after its worker's CompleteRun was
//! given up while the job-tracker was cut off, and every later scheduled
//! run was SKIPPED behind it.
//!
//! A scheduled start interrupted the same way was never asked again (the
//! next due time has its own correlation id): the 10-minute matrix left an
//! extract's run QUEUED for 8 minutes, and 245 due runs were SKIPPED behind
//! it. The scheduler now finishes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use chrono::Utc;
use tidemark_kit::CancellationToken;

use super::support::{Call, Hooked};
use super::{LEASE, claim, job, precondition, start};
use crate::engine::{Fence, Tracker, UnitOutcome};
use crate::kv::{KvError, KvStore};
use crate::model::{JobKind, RunEnd, RunStatus, RunTrigger, Schedule, Spec, Watermark};

/// A tracker whose store stops answering once it has taken `writes`
/// transactions, as a job-tracker killed or cut off from its store
/// mid-request.
fn cut_after(store: Arc<dyn KvStore>, writes: usize) -> Tracker {
    let writes = AtomicUsize::new(writes);
    let hook = move |call: Call<'_>| {
        if writes.load(Ordering::SeqCst) == 0 {
            return Err(KvError::Failed("cut off".into()));
        }
        if matches!(call, Call::Transact) {
            writes.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    };
    Tracker::new(
        Arc::new(Hooked { inner: store, hook }),
        CancellationToken::new(),
    )
}

pub async fn an_interrupted_start_finishes_on_its_retry(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Tracker::new(store.clone(), CancellationToken::new());
    let name = format!("{prefix}-interrupted");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let mut request = start(&name, &["u1", "u2"]);
    request.correlation_id = "start-once".to_owned();
    // The first write (the QUEUED run) lands; the unit registration after it
    // does not.
    let cut = cut_after(store, 1);
    assert!(cut.start_run(request.clone()).await.is_err());
    let stuck = tracker.list_runs(&name, &[]).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0].status, RunStatus::Queued, "{stuck:?}");
    // Another start is refused: the QUEUED run holds the job.
    precondition(
        tracker.start_run(start(&name, &["u1"])).await,
        "a start beside the interrupted one",
    );
    // The same request again finishes the interrupted start.
    let resumed = tracker.start_run(request.clone()).await.unwrap();
    assert_eq!(resumed.run.run_id, stuck[0].run_id);
    assert_eq!(resumed.run.status, RunStatus::Running, "{resumed:?}");
    assert_eq!(resumed.units.total, 2, "{resumed:?}");
    assert_eq!(resumed.units.not_migrated, 2, "{resumed:?}");
    // And once more: the same run, nothing registered twice.
    let again = tracker.start_run(request).await.unwrap();
    assert_eq!(
        (again.run.run_id, again.units.total),
        (resumed.run.run_id, 2)
    );
}

pub async fn an_interrupted_scheduled_start_is_finished_by_the_scheduler(
    store: Arc<dyn KvStore>,
    prefix: &str,
) {
    let tracker = Tracker::new(store.clone(), CancellationToken::new());
    let name = format!("{prefix}-scheduled-start");
    let mut every_second = job(&name, JobKind::IncrementalExtract);
    every_second.explicit_completion = true;
    every_second.default_unit_keys = vec!["window".into()];
    every_second.schedule = Some(Schedule {
        cron: "* * * * * *".into(),
        time_zone: String::new(),
        max_wait_ms: 600_000,
        start_time: None,
        end_time: None,
    });
    tracker.create_job(every_second, "suite").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The scheduler's start: the QUEUED run lands, its unit does not.
    let cut = cut_after(store, 1);
    let _ = crate::schedule::tick(&cut, Utc::now()).await;
    let stuck = tracker.list_runs(&name, &[]).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(
        (stuck[0].status, stuck[0].trigger),
        (RunStatus::Queued, RunTrigger::Schedule),
        "{stuck:?}"
    );
    // At the next due time the scheduler finishes that start (with the
    // job's units) instead of waiting behind it and skipping.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crate::schedule::tick(&tracker, Utc::now()).await.unwrap();
    let runs = tracker.list_runs(&name, &[]).await.unwrap();
    assert_eq!(runs.len(), 1, "no other run, none skipped: {runs:?}");
    let finished = tracker.get_run(&stuck[0].run_id).await.unwrap();
    assert_eq!(finished.run.status, RunStatus::Running, "{finished:?}");
    assert_eq!(finished.units.total, 1, "{finished:?}");
    assert_eq!(finished.units.not_migrated, 1, "{finished:?}");
    // A run started by a client is left to its client's retry (only it
    // knows the units): the scheduler does not touch it.
    assert!(
        !tracker
            .finish_scheduled_start(&stuck[0].run_id)
            .await
            .unwrap()
    );
}

/// Claims the unit `key` of `run_id` and completes it with `end_run`
/// through `via`.
async fn complete(
    tracker: &Tracker,
    via: &Tracker,
    run_id: &str,
    key: &str,
    end_run: Option<RunEnd>,
) -> Result<(), crate::error::TrackerError> {
    let claimed = tracker
        .claim_unit(&crate::engine::ClaimRequest {
            unit_key: key.to_owned(),
            ..claim("verifier-1", run_id, LEASE)
        })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("unit {key} of {run_id} to claim"));
    assert_eq!(claimed.unit.unit_key, key);
    let report = Spec {
        type_url: "type.example/Report".to_owned(),
        value: key.as_bytes().to_vec(),
    };
    via.finish_unit(
        &Fence {
            run_id: run_id.to_owned(),
            unit_key: key.to_owned(),
            fencing_token: claimed.unit.fencing_token,
        },
        UnitOutcome::Completed {
            result: Some(report),
            route_to_target: false,
            end_run,
        },
        None,
        "verifier-1",
    )
    .await
    .map(drop)
}

/// A run of a new explicit-completion verification job `name` over `keys`.
async fn explicit_run(tracker: &Tracker, name: &str, keys: &[&str]) -> String {
    let mut explicit = job(name, JobKind::Verification);
    explicit.explicit_completion = true;
    tracker.create_job(explicit, "suite").await.unwrap();
    tracker
        .start_run(start(name, keys))
        .await
        .unwrap()
        .run
        .run_id
}

pub async fn an_explicit_run_ends_as_its_last_unit_asked(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Tracker::new(store.clone(), CancellationToken::new());
    let status = |run_id: String| {
        let tracker = &tracker;
        async move { tracker.get_run(&run_id).await.unwrap().run }
    };
    // Without an end asked, an explicit run waits for CompleteRun.
    let run = explicit_run(&tracker, &format!("{prefix}-explicit-waits"), &["all"]).await;
    complete(&tracker, &tracker, &run, "all", None)
        .await
        .unwrap();
    assert_eq!(status(run.clone()).await.status, RunStatus::Running);

    // Asked to succeed: SUCCEEDED in the same call, with the unit's result.
    let run = explicit_run(&tracker, &format!("{prefix}-explicit-passes"), &["all"]).await;
    complete(
        &tracker,
        &tracker,
        &run,
        "all",
        Some(RunEnd {
            error: None,
            last_processed: None,
        }),
    )
    .await
    .unwrap();
    let ended = status(run.clone()).await;
    assert_eq!(ended.status, RunStatus::Succeeded, "{ended:?}");
    assert_eq!(ended.result.map(|r| r.value), Some(b"all".to_vec()));

    // Asked to fail, by the last of two units, and the job-tracker cut off
    // right after the unit's write: the run is left RUNNING, and the next
    // claim of any worker ends it FAILED with the unit's error.
    let name = format!("{prefix}-explicit-fails");
    let run = explicit_run(&tracker, &name, &["a", "b"]).await;
    complete(&tracker, &tracker, &run, "a", None).await.unwrap();
    assert_eq!(status(run.clone()).await.status, RunStatus::Running);
    let failed = Some(RunEnd {
        error: Some("2 mismatches".to_owned()),
        last_processed: None,
    });
    let cut = cut_after(store, 1);
    assert!(complete(&tracker, &cut, &run, "b", failed).await.is_err());
    assert_eq!(status(run.clone()).await.status, RunStatus::Running);
    let nothing = tracker
        .claim_unit(&crate::engine::ClaimRequest {
            worker_id: "verifier-2".to_owned(),
            lease: LEASE,
            kinds: vec![JobKind::Verification],
            job_name: name.clone(),
            ..crate::engine::ClaimRequest::default()
        })
        .await
        .unwrap();
    assert!(nothing.is_none(), "{nothing:?}");
    let ended = status(run).await;
    assert_eq!(ended.status, RunStatus::Failed, "{ended:?}");
    assert_eq!(ended.status_reason, "2 mismatches");
    assert_eq!(ended.result.map(|r| r.value), Some(b"b".to_vec()));
    // The job is blocked by the failure, as after FailRun.
    precondition(
        tracker.start_run(start(&name, &["a"])).await,
        "a start after the failed run",
    );
}

pub async fn an_extract_run_ends_at_the_watermark_its_units_asked(
    store: Arc<dyn KvStore>,
    prefix: &str,
) {
    let tracker = Tracker::new(store.clone(), CancellationToken::new());
    let name = format!("{prefix}-extract-ends");
    let mut extract = job(&name, JobKind::IncrementalExtract);
    extract.explicit_completion = true;
    tracker.create_job(extract, "suite").await.unwrap();
    let first = tracker
        .start_run(start(&name, &["s0", "s1"]))
        .await
        .unwrap()
        .run;
    assert_eq!(first.window_start_run_id, None, "{first:?}");
    let until = first.window_end.expect("an extract run has a window end");
    let asked = || {
        Some(RunEnd {
            error: None,
            last_processed: Some(Watermark {
                time: Some(until),
                position: String::new(),
            }),
        })
    };
    // Both segments ask the end; the job-tracker is cut off right after
    // the second one's write, before it could end the run.
    complete(&tracker, &tracker, &first.run_id, "s0", asked())
        .await
        .unwrap();
    let cut = cut_after(store, 1);
    assert!(
        complete(&tracker, &cut, &first.run_id, "s1", asked())
            .await
            .is_err()
    );
    let running = tracker.get_run(&first.run_id).await.unwrap().run;
    assert_eq!(running.status, RunStatus::Running, "{running:?}");
    // The next claim of any worker ends it SUCCEEDED at the watermark.
    let nothing = tracker
        .claim_unit(&crate::engine::ClaimRequest {
            worker_id: "replicator-2".to_owned(),
            lease: LEASE,
            kinds: vec![JobKind::IncrementalExtract],
            job_name: name.clone(),
            ..crate::engine::ClaimRequest::default()
        })
        .await
        .unwrap();
    assert!(nothing.is_none(), "{nothing:?}");
    let ended = tracker.get_run(&first.run_id).await.unwrap().run;
    assert_eq!(ended.status, RunStatus::Succeeded, "{ended:?}");
    assert_eq!(
        ended.last_processed.and_then(|w| w.time),
        Some(until),
        "the run keeps the watermark its units asked"
    );
    // The next run's window starts there, and names the run that set it.
    let second = tracker
        .start_run(start(&name, &["s0", "s1"]))
        .await
        .unwrap()
        .run;
    assert_eq!(second.window_start, Some(until), "{second:?}");
    assert_eq!(
        second.window_start_run_id.as_deref(),
        Some(first.run_id.as_str())
    );
    // A CompleteRun sent late by the first run's worker is answered with
    // the ended run, not refused.
    let late = tracker
        .complete_run(
            &first.run_id,
            Some(Watermark {
                time: Some(until),
                position: String::new(),
            }),
            None,
            "replicator-1",
        )
        .await
        .unwrap();
    assert_eq!(late.status, RunStatus::Succeeded);
}
