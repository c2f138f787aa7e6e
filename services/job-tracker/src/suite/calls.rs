//! #16.5: on the hot path a claim is one query and one write (the query
//! reads the run and its job as well as its queue), and the
//! holder's checkpoint one write. What they no longer read first is still
//! checked: a claim writes the unit it found in the queue only at the
//! revision the queue entry copied, a checkpoint writes only on the revision
//! this replica last wrote; a lease taken over through another replica is
//! refused as before, and a run ended through another replica is not
//! claimed from.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemark_kit::CancellationToken;

use super::support::{Call, Hooked, fence_of};
use super::{LEASE, claim, job, precondition, start};
use crate::engine::{ClaimRequest, Claimed, NewJob, Tracker, UnitOutcome};
use crate::kv::KvStore;
use crate::model::{JobKind, Progress};

/// Panics unless the unit stored is the unit `claimed` answered with.
async fn stored_as_claimed(other: &Tracker, claimed: &Claimed) {
    let units = other.list_units(&claimed.unit.run_id).await.unwrap();
    let stored = units
        .iter()
        .find(|u| u.unit_key == claimed.unit.unit_key)
        .expect("the claimed unit");
    assert_eq!(
        stored, &claimed.unit,
        "the claim answered the unit it stored"
    );
}

/// A tracker on `store` whose store calls are listed, by kind, in the list
/// returned with it.
fn recording(store: &Arc<dyn KvStore>) -> (Tracker, Arc<Mutex<Vec<&'static str>>>) {
    let calls: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let seen = Arc::clone(&calls);
    let hook = move |call: Call<'_>| {
        seen.lock().expect("calls lock").push(match call {
            Call::Get => "get",
            Call::Query { .. } => "query",
            Call::Transact => "transact",
            Call::Ping => "ping",
        });
        Ok(())
    };
    let tracker = Tracker::new(
        Arc::new(Hooked {
            inner: Arc::clone(store),
            hook,
        }),
        CancellationToken::new(),
    );
    (tracker, calls)
}

fn retryable() -> UnitOutcome {
    UnitOutcome::Failed {
        error: "throttled".into(),
        retryable: true,
        rolled_back: false,
    }
}

/// # Panics
/// When a claim and a checkpoint make other store calls, or a check they
/// no longer read for lets a stale lease or an ended run through.
pub async fn a_claim_and_a_checkpoint_make_three_store_calls(
    store: Arc<dyn KvStore>,
    prefix: &str,
) {
    let (tracker, calls) = recording(&store);
    // Another replica on the same store.
    let other = Tracker::new(store, CancellationToken::new());
    let name = format!("{prefix}-hot-path");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let run_id = tracker
        .start_run(start(&name, &["a", "b", "c"]))
        .await
        .unwrap()
        .run
        .run_id;
    // Even the first claim reads the job with its run and queue: the run's
    // partition holds a copy of it.
    calls.lock().expect("calls lock").clear();
    let first = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("a unit");
    let made = std::mem::take(&mut *calls.lock().expect("calls lock"));
    assert_eq!(made, ["query", "transact"], "the first claim");
    let second = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("a unit");
    let progress = Progress {
        items_processed: 1,
        ..Progress::default()
    };
    tracker
        .checkpoint(&fence_of(&second), b"at 1".to_vec(), progress, None)
        .await
        .unwrap();
    let made = std::mem::take(&mut *calls.lock().expect("calls lock"));
    assert_eq!(
        made,
        ["query", "transact", "transact"],
        "claim + checkpoint"
    );
    let units = other.list_units(&run_id).await.unwrap();
    let stored = units
        .iter()
        .find(|u| u.unit_key == second.unit.unit_key)
        .expect("the second unit");
    assert_eq!(
        (
            stored.checkpoint.as_slice(),
            stored.progress.items_processed
        ),
        (&b"at 1"[..], 1),
        "the checkpoint is stored"
    );
    assert_eq!(stored.fencing_token, second.unit.fencing_token);

    // The job changes through the other replica while this one holds it
    // as its claims read it: the next claim here answers the new revision
    // at once (not a second later), still without reading the job alone,
    // and so does the checkpoint after it.
    let updated = other
        .update_job(
            NewJob {
                description: "changed".to_owned(),
                ..job(&name, JobKind::BackfillAttribute)
            },
            &["description".to_owned()],
            0,
            "suite",
        )
        .await
        .unwrap();
    assert!(updated.revision > first.job.revision);

    // Put back in the queue through the other replica: claimed again here
    // from the entry's copy, as it is stored.
    other
        .finish_unit(&fence_of(&second), retryable(), None, "suite")
        .await
        .unwrap();
    calls.lock().expect("calls lock").clear();
    for _ in 0..2 {
        let again = tracker
            .claim_unit(&claim("w", &run_id, LEASE))
            .await
            .unwrap()
            .expect("the requeued unit and the third");
        stored_as_claimed(&other, &again).await;
        assert_eq!(
            (again.job.revision, again.job.description.as_str()),
            (updated.revision, "changed"),
            "a claim answers the job as it stands"
        );
        let (_, revision) = tracker
            .checkpoint(
                &fence_of(&again),
                b"at 2".to_vec(),
                Progress::default(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(revision, updated.revision, "the checkpoint's job revision");
    }
    let made = std::mem::take(&mut *calls.lock().expect("calls lock"));
    assert!(
        !made.contains(&"get"),
        "claims and checkpoints read no job or unit alone: {made:?}"
    );

    // The first lease lapses and the other replica hands the unit out
    // again: its old holder's checkpoint and heartbeat here are refused,
    // naming the new holder, though this replica wrote that lease itself.
    tracker
        .checkpoint(
            &fence_of(&first),
            b"x".to_vec(),
            Progress::default(),
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let taken = other
        .claim_unit(&ClaimRequest {
            unit_key: first.unit.unit_key.clone(),
            ..claim("w-new", &run_id, LEASE)
        })
        .await
        .unwrap()
        .expect("an expired lease is reclaimable");
    assert!(taken.unit.fencing_token > first.unit.fencing_token);
    let m = precondition(
        tracker
            .checkpoint(
                &fence_of(&first),
                b"late".to_vec(),
                Progress::default(),
                None,
            )
            .await,
        "a checkpoint under a lease taken over",
    );
    assert!(
        m.contains("stale fencing token") && m.contains("w-new"),
        "{m}"
    );
    let m = precondition(
        tracker.heartbeat(&fence_of(&first), LEASE).await,
        "a heartbeat under a lease taken over",
    );
    assert!(
        m.contains("stale fencing token") && m.contains("w-new"),
        "{m}"
    );

    // A run failed through the other replica is not claimed from here,
    // although a unit waits in its queue.
    other
        .finish_unit(&fence_of(&taken), retryable(), None, "suite")
        .await
        .unwrap();
    other
        .fail_run(&run_id, "stopped by an operator", None, "suite")
        .await
        .unwrap();
    let m = precondition(
        tracker.claim_unit(&claim("w", &run_id, LEASE)).await,
        "a claim in a failed run",
    );
    assert!(m.contains("nothing to claim"), "{m}");
}

/// # Panics
/// When a job too large to copy into its run's partition is not read on
/// its own, or a claim answers the copy the job outgrew.
pub async fn a_job_too_large_to_copy_is_read_on_its_own(store: Arc<dyn KvStore>, prefix: &str) {
    let (tracker, calls) = recording(&store);
    let other = Tracker::new(store, CancellationToken::new());
    let name = format!("{prefix}-large-job");
    other
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let run_id = other
        .start_run(start(&name, &["a", "b"]))
        .await
        .unwrap()
        .run
        .run_id;
    // The run's partition holds a copy of the small job; the job then grows
    // past what is copied (its spec stored as ~12 KB of JSON).
    let grown = other
        .update_job(
            NewJob {
                spec: Some(crate::model::Spec {
                    type_url: "type.googleapis.com/tidemark.test.Large".to_owned(),
                    value: vec![200; 3000],
                }),
                ..job(&name, JobKind::BackfillAttribute)
            },
            &["spec".to_owned()],
            0,
            "suite",
        )
        .await
        .unwrap();
    let claimed = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("a unit");
    assert_eq!(
        (claimed.job.revision, claimed.job.spec.as_ref()),
        (grown.revision, grown.spec.as_ref()),
        "the claim answers the job as it stands, not the copy it outgrew"
    );
    assert_eq!(
        std::mem::take(&mut *calls.lock().expect("calls lock")),
        ["query", "get", "transact"],
        "a job too large to copy is read on its own"
    );
}
