//! Behaviour suites run against every store (embedded SQLite and DynamoDB):
//! first the key-value contract the engine relies on, then the job-tracker's
//! own rules. Each check panics with what went wrong.

mod blocked;
mod calls;
mod caps;
mod interleave;
mod restart;
mod scale;
mod settle;
mod support;

pub use blocked::{blocked_units_do_not_stop_claims, dependency_cycles_are_refused};
pub use calls::{
    a_claim_and_a_checkpoint_make_three_store_calls, a_job_too_large_to_copy_is_read_on_its_own,
};
pub use caps::unit_sizes_are_capped;
pub use restart::{
    an_explicit_run_ends_as_its_last_unit_asked,
    an_extract_run_ends_at_the_watermark_its_units_asked,
    an_interrupted_scheduled_start_is_finished_by_the_scheduler,
    an_interrupted_start_finishes_on_its_retry,
};
pub use scale::unit_reads_follow_the_keys_asked_for;
pub use settle::a_run_ends_only_when_every_unit_is_done;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tidemark_kit::CancellationToken;

use crate::engine::{ClaimRequest, Fence, NewJob, StartRun, Tracker, UnitOutcome, UnitSpec};
use crate::error::TrackerError;
use crate::kv::{Expect, KvError, KvStore, Op, query_all};
use crate::model::{
    Change, JobKind, Progress, RouteTarget, RunStatus, RunTrigger, Schedule, UnitStatus, Watermark,
};

fn put(pk: &str, sk: &str, body: &str, expect: Expect) -> Op {
    Op::Put {
        pk: pk.into(),
        sk: sk.into(),
        body: body.into(),
        expect,
    }
}

/// The key-value contract: conditional writes, atomic transactions, prefix
/// queries in order.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn kv_contract(store: &dyn KvStore) {
    store
        .transact(vec![put("p", "a#1", "one", Expect::Absent)])
        .await
        .unwrap();
    let e = store.get("p", "a#1").await.unwrap().unwrap();
    assert_eq!((e.rev, e.body.as_str()), (1, "one"));
    assert!(matches!(
        store
            .transact(vec![put("p", "a#1", "x", Expect::Absent)])
            .await,
        Err(KvError::Conflict)
    ));
    assert!(matches!(
        store
            .transact(vec![put("p", "a#1", "x", Expect::Rev(7))])
            .await,
        Err(KvError::Conflict)
    ));
    store
        .transact(vec![put("p", "a#1", "two", Expect::Rev(1))])
        .await
        .unwrap();
    assert_eq!(store.get("p", "a#1").await.unwrap().unwrap().rev, 2);

    // All or nothing: the second op's conflict undoes the first.
    let r = store
        .transact(vec![
            put("p", "a#2", "new", Expect::Absent),
            put("p", "a#1", "bad", Expect::Rev(1)),
        ])
        .await;
    assert!(matches!(r, Err(KvError::Conflict)));
    assert_eq!(
        store.get("p", "a#2").await.unwrap(),
        None,
        "nothing of a failed transaction is kept"
    );
    let r = store
        .transact(vec![
            put("p", "a#2", "new", Expect::Absent),
            Op::Check {
                pk: "p".into(),
                sk: "a#1".into(),
                expect: Expect::Rev(2),
            },
        ])
        .await;
    assert!(r.is_ok(), "{r:?}");

    for i in 3..8 {
        store
            .transact(vec![put("p", &format!("a#{i}"), "v", Expect::Any)])
            .await
            .unwrap();
    }
    store
        .transact(vec![
            put("p", "b#1", "v", Expect::Any),
            put("q", "a#9", "v", Expect::Any),
        ])
        .await
        .unwrap();
    let all = query_all(store, "p", "a#").await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.sk.as_str()).collect::<Vec<_>>(),
        ["a#1", "a#2", "a#3", "a#4", "a#5", "a#6", "a#7"]
    );
    let page = store.query("p", "a#", Some("a#3"), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.sk.as_str()).collect::<Vec<_>>(),
        ["a#4", "a#5"]
    );

    store
        .transact(vec![Op::Delete {
            pk: "p".into(),
            sk: "a#1".into(),
            expect: Expect::Rev(2),
        }])
        .await
        .unwrap();
    assert_eq!(store.get("p", "a#1").await.unwrap(), None);
    assert!(matches!(
        store
            .transact(vec![Op::Delete {
                pk: "p".into(),
                sk: "a#2".into(),
                expect: Expect::Absent
            }])
            .await,
        Err(KvError::Conflict)
    ));
}

fn job(name: &str, kind: JobKind) -> NewJob {
    NewJob {
        name: name.to_owned(),
        kind,
        description: "suite".to_owned(),
        spec: None,
        schedule: None,
        default_unit_keys: Vec::new(),
        explicit_completion: false,
        max_attempts: 3,
        max_concurrent_units: 0,
    }
}

fn units(keys: &[&str]) -> Vec<UnitSpec> {
    keys.iter()
        .map(|k| UnitSpec {
            unit_key: (*k).to_owned(),
            after_unit_keys: Vec::new(),
            ..Default::default()
        })
        .collect()
}

fn start(job: &str, keys: &[&str]) -> StartRun {
    StartRun {
        job_name: job.to_owned(),
        units: units(keys),
        trigger: RunTrigger::Api,
        correlation_id: String::new(),
        actor: "suite".to_owned(),
        reason: "test".to_owned(),
        force_remigrate: false,
        window_start: None,
        scheduled_time: None,
    }
}

fn claim(worker: &str, run_id: &str, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.to_owned(),
        run_id: run_id.to_owned(),
        lease,
        ..ClaimRequest::default()
    }
}

fn precondition<T: std::fmt::Debug>(r: Result<T, TrackerError>, what: &str) -> String {
    match r {
        Err(TrackerError::Precondition(m)) => m,
        other => panic!("{what}: expected FAILED_PRECONDITION, got {other:?}"),
    }
}

/// How long the suite's claims lease a unit: longer than any check takes.
const LEASE: Duration = Duration::from_secs(30);

/// The job-tracker's rules on `store`. `prefix` keeps job names unique when
/// stores are shared between test runs.
///
/// # Panics
/// On the first rule that does not hold.
pub async fn tracker_rules(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Arc::new(Tracker::new(store.clone(), CancellationToken::new()));
    let name = |n: &str| format!("{prefix}-{n}");
    a_retryable_failure_waits_before_its_next_attempt(store, &name("backoff")).await;
    creating_a_job_is_idempotent(&tracker, &name("race"), &name("missing")).await;
    a_unit_starts_from_the_checkpoint_it_was_registered_with(&tracker, &name("feed")).await;
    let (run_id, claimed) = each_unit_is_claimed_once(&tracker, &name("race")).await;
    lost_races_read_the_queue_again(&tracker, &name("burst")).await;
    let new_fence = stale_tokens_are_refused(&tracker, &run_id, &claimed).await;
    completing_every_unit_ends_the_run(&tracker, &run_id, &claimed, &new_fence).await;
    let (migrated, failed) = a_failure_blocks_until_acknowledged(&tracker, &name("courses")).await;
    migrated_units_are_not_claimed_again(&tracker, &name("courses"), &migrated, &failed).await;
    force_remigrate_claims_again(&tracker, &name("courses")).await;
    retries_stop_at_max_attempts(&tracker, &name("flaky")).await;
    extracts_resume_at_the_watermark(&tracker, &name("extract")).await;
    routes_fall_back_to_the_job(&tracker, &name("race")).await;
    schedules_start_or_skip_due_runs(&tracker, &name("hourly")).await;
}

/// Creating the same job twice is idempotent; a different one conflicts.
async fn creating_a_job_is_idempotent(tracker: &Arc<Tracker>, job_name: &str, missing: &str) {
    let created = tracker
        .create_job(job(job_name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let again = tracker
        .create_job(job(job_name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    assert_eq!(created.create_time, again.create_time);
    let mut other = job(job_name, JobKind::BackfillAttribute);
    other.description = "different".into();
    assert!(matches!(
        tracker.create_job(other, "suite").await,
        Err(TrackerError::AlreadyExists(_))
    ));
    assert!(matches!(
        tracker.get_job(missing).await,
        Err(TrackerError::NotFound(_))
    ));
}

/// N concurrent claimers racing for M units: each unit claimed exactly once.
/// Returns the run and the `(unit key, fencing token)` of every claim.
async fn each_unit_is_claimed_once(
    tracker: &Arc<Tracker>,
    job_name: &str,
) -> (String, Vec<(String, u64)>) {
    let keys: Vec<String> = (0..24).map(|i| format!("segment-{i:02}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let run = tracker.start_run(start(job_name, &key_refs)).await.unwrap();
    assert_eq!(run.run.status, RunStatus::Running);
    assert_eq!(run.units.total, 24);
    let mut workers = Vec::new();
    for w in 0..6 {
        let tracker = tracker.clone();
        let run_id = run.run.run_id.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(c) = tracker
                .claim_unit(&claim(&format!("w{w}"), &run_id, LEASE))
                .await
                .unwrap()
            {
                mine.push((
                    c.unit.unit_key.clone(),
                    c.unit.lease.as_ref().unwrap().fencing_token,
                ));
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for w in workers {
        claimed.extend(w.await.unwrap());
    }
    let distinct: HashSet<&String> = claimed.iter().map(|(k, _)| k).collect();
    assert_eq!(claimed.len(), 24, "every unit claimed once: {claimed:?}");
    assert_eq!(distinct.len(), 24, "no unit claimed twice");

    (run.run.run_id, claimed)
}

/// Claimers that lose a race read the queue again: N one-shot claims on
/// N waiting units all succeed (none reports "nothing to claim").
async fn lost_races_read_the_queue_again(tracker: &Arc<Tracker>, job_name: &str) {
    tracker
        .create_job(job(job_name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let burst_keys: Vec<String> = (0..24).map(|i| format!("b{i:02}")).collect();
    let burst_refs: Vec<&str> = burst_keys.iter().map(String::as_str).collect();
    let burst = tracker
        .start_run(start(job_name, &burst_refs))
        .await
        .unwrap();
    let mut shots = Vec::new();
    for w in 0..24 {
        let tracker = tracker.clone();
        let run_id = burst.run.run_id.clone();
        shots.push(tokio::spawn(async move {
            tracker
                .claim_unit(&claim(&format!("b{w}"), &run_id, LEASE))
                .await
                .unwrap()
        }));
    }
    let mut got = HashSet::new();
    for shot in shots {
        let claimed = shot
            .await
            .unwrap()
            .expect("every one-shot claim gets a unit while units wait");
        assert!(got.insert(claimed.unit.unit_key), "no unit twice");
    }
}

/// A stale fencing token is refused, an expired lease can be reclaimed.
/// Returns the fence of the unit's new holder.
async fn stale_tokens_are_refused(
    tracker: &Arc<Tracker>,
    run_id: &str,
    claimed: &[(String, u64)],
) -> Fence {
    let (key, token) = claimed[0].clone();
    let fence = Fence {
        run_id: run_id.to_owned(),
        unit_key: key.clone(),
        fencing_token: token,
    };
    let stale = Fence {
        fencing_token: token + 7,
        ..fence.clone()
    };
    let m = precondition(
        tracker
            .checkpoint(&stale, b"x".to_vec(), Progress::default(), None)
            .await,
        "stale checkpoint",
    );
    assert!(m.contains("stale fencing token"), "{m}");
    tracker
        .checkpoint(
            &fence,
            b"lek-1".to_vec(),
            Progress {
                items_processed: 10,
                ..Progress::default()
            },
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let taken = tracker
        .claim_unit(&claim("w-new", run_id, LEASE))
        .await
        .unwrap()
        .expect("expired lease is reclaimable");
    assert_eq!(taken.unit.unit_key, key);
    assert_eq!(
        taken.unit.checkpoint, b"lek-1",
        "the new holder resumes from the checkpoint"
    );
    assert!(taken.unit.lease.as_ref().unwrap().fencing_token > token);
    let m = precondition(
        tracker
            .finish_unit(&fence, UnitOutcome::done(), None, "old")
            .await,
        "old holder completes",
    );
    assert!(m.contains("w-new"), "names the new holder: {m}");
    Fence {
        fencing_token: taken.unit.lease.unwrap().fencing_token,
        ..fence
    }
}

/// Completing every unit ends the run SUCCEEDED; completing twice with the
/// same token is answered with the unit unchanged.
async fn completing_every_unit_ends_the_run(
    tracker: &Arc<Tracker>,
    run_id: &str,
    claimed: &[(String, u64)],
    new_fence: &Fence,
) {
    for (k, t) in claimed {
        let f = if *k == new_fence.unit_key {
            new_fence.clone()
        } else {
            Fence {
                run_id: run_id.to_owned(),
                unit_key: k.clone(),
                fencing_token: *t,
            }
        };
        tracker
            .finish_unit(&f, UnitOutcome::done(), None, "suite")
            .await
            .unwrap();
    }
    // As documented: repeating the call with the token that completed the
    // unit (its answer lost) returns it unchanged.
    let (again, _) = tracker
        .finish_unit(new_fence, UnitOutcome::done(), None, "suite")
        .await
        .expect("complete twice with the same token");
    assert_eq!(
        (again.status, again.fencing_token),
        (UnitStatus::Migrated, new_fence.fencing_token)
    );
    let done = tracker.get_run(run_id).await.unwrap();
    assert_eq!(
        done.run.status,
        RunStatus::Succeeded,
        "{:?}",
        done.run.status_reason
    );
    assert_eq!(done.units.migrated, 24);
    assert_eq!(done.totals.items_processed, 10, "progress of units adds up");
}

/// Unit migration: a failed unit fails the run, and the failure blocks the
/// job until acknowledged. Returns the keys of the MIGRATED and the failed unit.
async fn a_failure_blocks_until_acknowledged(
    tracker: &Arc<Tracker>,
    job_name: &str,
) -> (String, String) {
    tracker
        .create_job(job(job_name, JobKind::UnitMigration), "suite")
        .await
        .unwrap();
    let first = tracker
        .start_run(start(job_name, &["c1", "c2"]))
        .await
        .unwrap();
    let a = tracker
        .claim_unit(&claim("w", &first.run.run_id, LEASE))
        .await
        .unwrap()
        .unwrap();
    let b = tracker
        .claim_unit(&claim("w", &first.run.run_id, LEASE))
        .await
        .unwrap()
        .unwrap();
    let fa = Fence {
        run_id: first.run.run_id.clone(),
        unit_key: a.unit.unit_key.clone(),
        fencing_token: a.unit.fencing_token,
    };
    let fb = Fence {
        run_id: first.run.run_id.clone(),
        unit_key: b.unit.unit_key.clone(),
        fencing_token: b.unit.fencing_token,
    };
    tracker
        .finish_unit(&fa, UnitOutcome::done(), None, "w")
        .await
        .unwrap();
    let (failed, _) = tracker
        .finish_unit(
            &fb,
            UnitOutcome::Failed {
                error: "injected fault".into(),
                retryable: false,
                rolled_back: true,
            },
            None,
            "w",
        )
        .await
        .unwrap();
    assert_eq!(failed.status, UnitStatus::RolledBack);
    let ended = tracker.get_run(&first.run.run_id).await.unwrap();
    assert_eq!(ended.run.status, RunStatus::Failed);
    let m = precondition(
        tracker.start_run(start(job_name, &["c1", "c2"])).await,
        "gate",
    );
    assert!(
        m.contains(&first.run.run_id) && m.contains("1 of 2 units failed"),
        "names the run and its error: {m}"
    );
    let m = precondition(
        tracker
            .acknowledge_failure(job_name, "not-the-run", "ops", "seen")
            .await,
        "wrong run",
    );
    assert!(m.contains(&first.run.run_id));
    let acked = tracker
        .acknowledge_failure(job_name, "", "ops", "fault understood")
        .await
        .unwrap();
    assert_eq!(acked.status, RunStatus::FailedAcknowledged);
    (a.unit.unit_key, b.unit.unit_key)
}

/// A MIGRATED unit is never migrated again by a later run.
async fn migrated_units_are_not_claimed_again(
    tracker: &Arc<Tracker>,
    job_name: &str,
    migrated: &str,
    failed: &str,
) {
    let second = tracker
        .start_run(start(job_name, &["c1", "c2"]))
        .await
        .unwrap();
    let units = tracker.list_units(&second.run.run_id).await.unwrap();
    let status_of = |k: &str| units.iter().find(|u| u.unit_key == k).unwrap().status;
    assert_eq!(
        status_of(migrated),
        UnitStatus::Migrated,
        "a MIGRATED unit is not claimed again"
    );
    assert_eq!(status_of(failed), UnitStatus::NotMigrated);
    let c = tracker
        .claim_unit(&claim("w", &second.run.run_id, LEASE))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.unit.unit_key, failed);
    assert!(
        tracker
            .claim_unit(&claim("w", &second.run.run_id, LEASE))
            .await
            .unwrap()
            .is_none()
    );
    let fc = Fence {
        run_id: second.run.run_id.clone(),
        unit_key: c.unit.unit_key.clone(),
        fencing_token: c.unit.fencing_token,
    };
    tracker
        .finish_unit(&fc, UnitOutcome::done(), None, "w")
        .await
        .unwrap();
    assert_eq!(
        tracker
            .get_run(&second.run.run_id)
            .await
            .unwrap()
            .run
            .status,
        RunStatus::Succeeded
    );
}

/// A run with `force_remigrate` migrates a MIGRATED unit again, and the
/// history says so.
async fn force_remigrate_claims_again(tracker: &Arc<Tracker>, job_name: &str) {
    let mut forced = start(job_name, &["c1"]);
    forced.force_remigrate = true;
    let third = tracker.start_run(forced).await.unwrap();
    assert_eq!(
        third.units.not_migrated, 1,
        "force_remigrate makes it claimable"
    );
    let history = tracker
        .list_transitions("", &third.run.run_id, "c1")
        .await
        .unwrap();
    assert!(
        history.iter().any(|t| t.reason.contains("force_remigrate")),
        "recorded in the history: {history:?}"
    );
    let x = tracker
        .claim_unit(&claim("w-remigrate", &third.run.run_id, LEASE))
        .await
        .unwrap()
        .unwrap();
    let route_before = tracker.get_route(job_name, "c1").await.unwrap();
    tracker
        .finish_unit(
            &Fence {
                run_id: third.run.run_id.clone(),
                unit_key: "c1".into(),
                fencing_token: x.unit.fencing_token,
            },
            UnitOutcome::Completed {
                result: None,
                route_to_target: true,
                end_run: None,
            },
            None,
            "worker",
        )
        .await
        .unwrap();
    // The route switched in the same write: readers are on the copy the
    // moment the unit is MIGRATED, with no step left for a dying worker.
    let route = tracker.get_route(job_name, "c1").await.unwrap();
    assert_eq!(
        (route.target, route.revision, route.actor.as_str()),
        (
            RouteTarget::Target,
            route_before.revision + 1,
            "w-remigrate"
        ),
        "{route:?}"
    );
    // The history names the lease holder that finished the unit, with its
    // token, as it names the claimer: who held a lease when is readable.
    let history = tracker
        .list_transitions("", &third.run.run_id, "c1")
        .await
        .unwrap();
    let finished = history
        .iter()
        .find(|t| t.reason == "completed")
        .expect("the completion is recorded");
    assert_eq!(
        (finished.actor.as_str(), finished.fencing_token),
        ("w-remigrate", x.unit.fencing_token),
        "{history:?}"
    );
    // Its answer lost, the worker completes again under the same token: the
    // same answer, and nothing more in the history.
    let fence = Fence {
        run_id: third.run.run_id.clone(),
        unit_key: "c1".into(),
        fencing_token: x.unit.fencing_token,
    };
    let (again, _) = tracker
        .finish_unit(&fence, UnitOutcome::done(), None, "worker")
        .await
        .expect("a repeated CompleteUnit is answered");
    assert_eq!(again.status, UnitStatus::Migrated);
    let after = tracker
        .list_transitions("", &third.run.run_id, "c1")
        .await
        .unwrap();
    assert_eq!(after.len(), history.len(), "{after:?}");
    // An older token is still refused.
    precondition(
        tracker
            .finish_unit(
                &Fence {
                    fencing_token: x.unit.fencing_token - 1,
                    ..fence
                },
                UnitOutcome::done(),
                None,
                "worker",
            )
            .await,
        "a completion under an older token",
    );
}

/// A unit registered with a checkpoint is first claimed with it (a change
/// feed's start position, read before the run existed); registering the
/// key again does not replace it; a unit registered without one has none.
async fn a_unit_starts_from_the_checkpoint_it_was_registered_with(
    tracker: &Arc<Tracker>,
    job_name: &str,
) {
    tracker
        .create_job(job(job_name, JobKind::Replication), "suite")
        .await
        .unwrap();
    let mut first = start(job_name, &["feed", "segment-0"]);
    first.units[0].checkpoint = b"{\"sequence\":\"42\"}".to_vec();
    let run_id = tracker.start_run(first).await.unwrap().run.run_id;
    let mut again = units(&["feed"]);
    again[0].checkpoint = b"{\"sequence\":\"99\"}".to_vec();
    tracker.add_units(&run_id, &again, "suite").await.unwrap();
    for (key, expected) in [
        ("feed", &b"{\"sequence\":\"42\"}"[..]),
        ("segment-0", &b""[..]),
    ] {
        let claimed = tracker
            .claim_unit(&ClaimRequest {
                unit_key: key.into(),
                ..claim("w", &run_id, LEASE)
            })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key} is claimable"));
        assert_eq!(
            claimed.unit.checkpoint,
            expected,
            "{key}'s first claim reads {:?}",
            String::from_utf8_lossy(expected)
        );
    }
}

/// A unit that failed retryably waits before it may be claimed again (the
/// first delay doubled per attempt made, jittered down to half), so a
/// store's outage of a few seconds does not use up its attempts; a claim
/// naming it takes it at once.
async fn a_retryable_failure_waits_before_its_next_attempt(
    store: Arc<dyn KvStore>,
    job_name: &str,
) {
    let first = Duration::from_millis(600);
    let tracker = Tracker::new(store, CancellationToken::new()).with_retry_delay(first);
    let mut flaky = job(job_name, JobKind::BackfillAttribute);
    flaky.max_attempts = 3;
    tracker.create_job(flaky, "suite").await.unwrap();
    let run_id = tracker
        .start_run(start(job_name, &["s0"]))
        .await
        .unwrap()
        .run
        .run_id;
    let fail = |token: u64| {
        let fence = Fence {
            run_id: run_id.clone(),
            unit_key: "s0".into(),
            fencing_token: token,
        };
        let tracker = &tracker;
        async move {
            let failed = UnitOutcome::Failed {
                error: "the store is unreachable".into(),
                retryable: true,
                rolled_back: false,
            };
            // Before the call: its `update_time` is no earlier, whatever
            // the store's round trip (a slow answer made the wait look
            // short when timed from after it).
            let sent = tokio::time::Instant::now();
            let (unit, _) = tracker
                .finish_unit(&fence, failed, None, "w")
                .await
                .unwrap();
            (unit, sent)
        }
    };
    let mut token = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("claimable")
        .unit
        .fencing_token;
    for (attempt, full) in [(1_u32, first), (2, first * 2)] {
        let (unit, failed_at) = fail(token).await;
        assert_eq!(unit.status, UnitStatus::NotMigrated);
        let wait = (unit.retry_time.expect("a retry time") - unit.update_time)
            .to_std()
            .unwrap();
        assert!(
            wait + Duration::from_millis(10) >= full / 2 && wait <= full,
            "attempt {attempt}: waits {wait:?}, expected {:?}..={full:?}",
            full / 2
        );
        let listed = tracker.list_units(&run_id).await.unwrap();
        assert_eq!(listed[0].retry_time, unit.retry_time, "shown to readers");
        if attempt == 2 {
            // Named, it is claimed at once (an operator running it now).
            let named = tracker
                .claim_unit(&ClaimRequest {
                    unit_key: "s0".into(),
                    ..claim("w", &run_id, LEASE)
                })
                .await
                .unwrap()
                .expect("a named unit is claimed without waiting");
            assert_eq!(named.unit.attempts, 3);
            assert!(named.unit.retry_time.is_none());
            return;
        }
        let claimed = loop {
            if let Some(c) = tracker
                .claim_unit(&claim("w", &run_id, LEASE))
                .await
                .unwrap()
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let waited = failed_at.elapsed();
        assert!(
            waited >= wait.saturating_sub(Duration::from_millis(50)),
            "claimed after {waited:?}, before its retry time ({wait:?})"
        );
        assert_eq!(claimed.unit.attempts, attempt + 1);
        assert!(claimed.unit.retry_time.is_none(), "cleared by the claim");
        token = claimed.unit.fencing_token;
    }
}

/// Retryable failures go back to the queue until max attempts, rolled back
/// or not.
async fn retries_stop_at_max_attempts(tracker: &Arc<Tracker>, job_name: &str) {
    let mut flaky = job(job_name, JobKind::BackfillAttribute);
    flaky.max_attempts = 2;
    tracker.create_job(flaky, "suite").await.unwrap();
    let r = tracker.start_run(start(job_name, &["s0"])).await.unwrap();
    for attempt in 1..=2 {
        let u = tracker
            .claim_unit(&claim("w", &r.run.run_id, LEASE))
            .await
            .unwrap()
            .expect("claimable again");
        assert_eq!(u.unit.attempts, attempt);
        let f = Fence {
            run_id: r.run.run_id.clone(),
            unit_key: "s0".into(),
            fencing_token: u.unit.fencing_token,
        };
        tracker
            .finish_unit(
                &f,
                UnitOutcome::Failed {
                    error: "throttled".into(),
                    retryable: true,
                    // A rolled-back retryable failure is retried too: the
                    // unit starts clean (it ended ROLLED_BACK at once).
                    rolled_back: attempt == 1,
                },
                None,
                "w",
            )
            .await
            .unwrap();
    }
    let r = tracker.get_run(&r.run.run_id).await.unwrap();
    assert_eq!(
        (r.run.status, r.units.failed),
        (RunStatus::Failed, 1),
        "gives up after max attempts"
    );
    a_migration_unit_out_of_attempts_is_leased_to_clean_up(tracker, &format!("{job_name}-copy"))
        .await;
}

/// A migration unit whose leases lapsed `max_attempts` times may hold a
/// partial copy: it is leased again (up to `max_attempts` more times) for a
/// worker to remove the copy and fail it rolled back; if those leases lapse
/// too, it is failed as it stands, its error saying what may be left.
async fn a_migration_unit_out_of_attempts_is_leased_to_clean_up(
    tracker: &Arc<Tracker>,
    job_name: &str,
) {
    let mut copying = job(job_name, JobKind::UnitMigration);
    copying.max_attempts = 2;
    tracker.create_job(copying, "suite").await.unwrap();
    let lapse = Duration::from_millis(1);
    for keys in [["cleaned"], ["abandoned"]] {
        let r = tracker.start_run(start(job_name, &keys)).await.unwrap();
        let run_id = r.run.run_id.clone();
        for attempt in 1..=2 {
            let u = tracker
                .claim_unit(&claim("w", &run_id, lapse))
                .await
                .unwrap()
                .expect("claimable after its lease lapsed");
            assert_eq!(u.unit.attempts, attempt);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cleaned = keys[0] == "cleaned";
        // The first clean-up lease lapses (its worker killed); the second
        // one removes the copy, or lapses as well.
        let first = tracker
            .claim_unit(&claim("w-clean", &run_id, lapse))
            .await
            .unwrap()
            .expect("leased once more, to remove its copy");
        assert_eq!(first.unit.attempts, 3);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let last = tracker
            .claim_unit(&claim(
                "w-clean",
                &run_id,
                if cleaned { LEASE } else { lapse },
            ))
            .await
            .unwrap()
            .expect("leased again after the clean-up lease lapsed");
        assert_eq!(last.unit.attempts, 4);
        if cleaned {
            let (unit, _) = tracker
                .finish_unit(
                    &Fence {
                        run_id: run_id.clone(),
                        unit_key: "cleaned".into(),
                        fencing_token: last.unit.fencing_token,
                    },
                    UnitOutcome::Failed {
                        error: "gave up after 2 attempts; its partial copy was removed".into(),
                        retryable: true,
                        rolled_back: true,
                    },
                    None,
                    "w-clean",
                )
                .await
                .unwrap();
            assert_eq!(unit.status, UnitStatus::RolledBack, "not retried again");
        } else {
            // The clean-up lease lapses as well: failed as it stands.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let gone = tracker
                .claim_unit(&claim("w", &run_id, LEASE))
                .await
                .unwrap();
            assert!(gone.is_none(), "nothing more to claim: {gone:?}");
            let view = tracker.get_run(&run_id).await.unwrap();
            assert_eq!(
                (view.run.status, view.units.failed),
                (RunStatus::Failed, 1),
                "{view:?}"
            );
            let units = tracker.list_units(&run_id).await.unwrap();
            assert!(
                units[0]
                    .last_error
                    .contains("may still hold part of the unit"),
                "{:?}",
                units[0].last_error
            );
        }
        let view = tracker.get_run(&run_id).await.unwrap();
        if cleaned {
            assert_eq!(
                (view.run.status, view.units.rolled_back),
                (RunStatus::Failed, 1),
                "{view:?}"
            );
            let acked = tracker
                .acknowledge_failure(job_name, &run_id, "suite", "cleaned up")
                .await;
            assert!(acked.is_ok(), "{acked:?}");
        }
    }
}

/// Incremental extract: explicit completion with a watermark; the next
/// run starts where the last successful one stopped.
async fn extracts_resume_at_the_watermark(tracker: &Arc<Tracker>, job_name: &str) {
    let mut extract = job(job_name, JobKind::IncrementalExtract);
    extract.explicit_completion = true;
    tracker.create_job(extract, "suite").await.unwrap();
    let e1 = tracker
        .start_run(start(job_name, &["window"]))
        .await
        .unwrap();
    assert_eq!(
        e1.run.window_start, None,
        "the first run has no previous watermark"
    );
    let u = tracker
        .claim_unit(&claim("w", &e1.run.run_id, LEASE))
        .await
        .unwrap()
        .unwrap();
    tracker
        .finish_unit(
            &Fence {
                run_id: e1.run.run_id.clone(),
                unit_key: "window".into(),
                fencing_token: u.unit.fencing_token,
            },
            UnitOutcome::done(),
            None,
            "w",
        )
        .await
        .unwrap();
    assert_eq!(
        tracker.get_run(&e1.run.run_id).await.unwrap().run.status,
        RunStatus::Running,
        "explicit completion waits for CompleteRun"
    );
    let mark = Utc::now() - chrono::Duration::minutes(5);
    let watermark = Watermark {
        time: Some(mark),
        position: "p".into(),
    };
    tracker
        .complete_run(&e1.run.run_id, Some(watermark.clone()), None, "w")
        .await
        .unwrap();
    // The same CompleteRun again (its answer was lost): the same answer,
    // not a refusal that would fail the worker's unit.
    let again = tracker
        .complete_run(&e1.run.run_id, Some(watermark), None, "w")
        .await
        .expect("a repeated CompleteRun is answered like the first");
    assert_eq!(again.status, RunStatus::Succeeded);
    let other = Watermark {
        time: Some(mark + chrono::Duration::seconds(1)),
        position: "p".into(),
    };
    precondition(
        tracker
            .complete_run(&e1.run.run_id, Some(other), None, "w")
            .await
            .map(drop),
        "completing an ended run at another watermark",
    );
    let e2 = tracker
        .start_run(start(job_name, &["window"]))
        .await
        .unwrap();
    let got = e2.run.window_start.expect("window start");
    assert!(
        (got - mark).num_milliseconds().abs() < 2,
        "starts from the last processed timestamp"
    );
    let m = precondition(
        tracker.start_run(start(job_name, &["window"])).await,
        "second active run",
    );
    assert!(m.contains("active run"), "{m}");
    tracker
        .fail_run(&e2.run.run_id, "source unreachable", None, "w")
        .await
        .unwrap();
    precondition(
        tracker.start_run(start(job_name, &["window"])).await,
        "gate after FailRun",
    );
}

/// Routes: per unit, job-wide fallback, revisions.
async fn routes_fall_back_to_the_job(tracker: &Arc<Tracker>, rj: &str) {
    assert_eq!(
        tracker.get_route(rj, "u1").await.unwrap().target,
        RouteTarget::Source
    );
    tracker
        .set_route(rj, "", RouteTarget::Target, 0, "ops", "all moved")
        .await
        .unwrap();
    let r1 = tracker
        .set_route(rj, "u1", RouteTarget::Source, 0, "ops", "pin")
        .await
        .unwrap();
    assert_eq!(r1.revision, 1);
    assert_eq!(
        tracker.get_route(rj, "u1").await.unwrap().target,
        RouteTarget::Source
    );
    assert_eq!(
        tracker.get_route(rj, "u2").await.unwrap().target,
        RouteTarget::Target,
        "job-wide route"
    );
    precondition(
        tracker
            .set_route(rj, "u1", RouteTarget::Target, 5, "ops", "stale")
            .await,
        "route revision",
    );
    let h = tracker.list_transitions(rj, "", "u1").await.unwrap();
    assert!(h.iter().any(|t| matches!(
        t.change,
        Change::Route {
            to: RouteTarget::Source,
            ..
        }
    ) && t.actor == "ops"
        && t.reason == "pin"));
}

/// Schedules: a due run starts; a blocked job's due run is skipped after
/// max wait.
async fn schedules_start_or_skip_due_runs(tracker: &Arc<Tracker>, job_name: &str) {
    let mut hourly = job(job_name, JobKind::IncrementalExtract);
    hourly.explicit_completion = true;
    hourly.default_unit_keys = vec!["window".into()];
    hourly.schedule = Some(Schedule {
        cron: "* * * * * *".into(),
        time_zone: String::new(),
        max_wait_ms: 0,
        start_time: None,
        end_time: None,
    });
    tracker.create_job(hourly, "suite").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crate::schedule::tick(tracker, Utc::now()).await.unwrap();
    let runs = tracker.list_runs(job_name, &[]).await.unwrap();
    assert_eq!(runs.len(), 1, "one scheduled run: {runs:?}");
    assert_eq!(
        (runs[0].status, runs[0].trigger),
        (RunStatus::Running, RunTrigger::Schedule)
    );
    tracker
        .fail_run(&runs[0].run_id, "boom", None, "w")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crate::schedule::tick(tracker, Utc::now()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    crate::schedule::tick(tracker, Utc::now()).await.unwrap();
    let runs = tracker.list_runs(job_name, &[]).await.unwrap();
    let skipped = runs
        .iter()
        .find(|r| r.status == RunStatus::Skipped)
        .expect("a skipped run");
    assert!(
        skipped.status_reason.contains("blocked"),
        "{}",
        skipped.status_reason
    );
    assert_eq!(
        runs.iter()
            .filter(|r| r.status == RunStatus::Running)
            .count(),
        0,
        "no run starts while blocked"
    );
}
