//! A run ends only when every unit is done, whatever moves between the
//! reads its end is decided on (#19.7): the check runs the move after each
//! store call in turn until the call under test makes no more calls.

use std::collections::HashMap;
use std::sync::Arc;

use tidemark_kit::CancellationToken;

use super::interleave::Interleaved;
use super::support::{complete, fence_of, no_unit_undone_if_succeeded};
use super::{LEASE, claim, job, start, units};
use crate::engine::{Fence, Tracker, UnitOutcome};
use crate::kv::KvStore;
use crate::model::{JobKind, RunStatus};

/// What changes under the decision.
#[derive(Clone, Copy, Debug)]
enum Move {
    /// The run's other leased unit fails and goes back to the queue.
    Requeue,
    /// A new unit is registered in the run.
    Register,
}

fn the_move(
    tracker: &Arc<Tracker>,
    kind: Move,
    run_id: &str,
    other: Fence,
) -> impl Future<Output = ()> + Send + 'static {
    let tracker = tracker.clone();
    let run_id = run_id.to_owned();
    async move {
        match kind {
            Move::Requeue => {
                let failed = UnitOutcome::Failed {
                    error: "throttled".into(),
                    retryable: true,
                    rolled_back: false,
                };
                tracker
                    .finish_unit(&other, failed, None, "mover")
                    .await
                    .unwrap();
            }
            // Refused once the run ended: then nothing moved.
            Move::Register => drop(tracker.add_units(&run_id, &units(&["late"]), "mover").await),
        }
    }
}

/// Completing the last unit but one, with the other unit moving after any
/// store call, never ends the run; completing the last one does.
///
/// # Panics
/// When the run ends with a unit not done, or does not end at all.
pub async fn a_run_ends_only_when_every_unit_is_done(store: Arc<dyn KvStore>, prefix: &str) {
    let store = Arc::new(Interleaved::new(store));
    let tracker = Arc::new(Tracker::new(store.clone(), CancellationToken::new()));
    for kind in [Move::Requeue, Move::Register] {
        for n in 1.. {
            assert!(n < 200, "the call never stops making store calls");
            let name = format!("{prefix}-settle-{kind:?}-{n}");
            tracker
                .create_job(job(&name, JobKind::BackfillAttribute), "suite")
                .await
                .unwrap();
            let run = tracker.start_run(start(&name, &["a", "x"])).await.unwrap();
            let run_id = run.run.run_id;
            let mut fences = HashMap::new();
            for _ in 0..2 {
                let c = tracker
                    .claim_unit(&claim("w", &run_id, LEASE))
                    .await
                    .unwrap()
                    .expect("two claimable units");
                fences.insert(c.unit.unit_key.clone(), fence_of(&c));
            }
            store.after_calls(n, the_move(&tracker, kind, &run_id, fences["x"].clone()));
            complete(&tracker, &fences["a"]).await;
            let moved = store.disarm();
            let when = format!("{kind:?} after store call {n}");
            no_unit_undone_if_succeeded(&tracker, &run_id, &when).await;
            let view = tracker.get_run(&run_id).await.unwrap();
            assert_eq!(
                view.run.status,
                RunStatus::Running,
                "{when}: unit x is not done ({:?}): {}",
                view.units,
                view.run.status_reason
            );
            if !moved {
                // Past the last call: x is still leased; completing it ends the run.
                complete(&tracker, &fences["x"]).await;
                let view = tracker.get_run(&run_id).await.unwrap();
                assert_eq!(view.run.status, RunStatus::Succeeded, "{when}");
                break;
            }
        }
    }
    Box::pin(complete_run_waits_for_late_units(&tracker, &store, prefix)).await;
}

/// CompleteRun (explicit completion) with a unit registered after any store
/// call: the run never SUCCEEDS with that unit not done.
async fn complete_run_waits_for_late_units(
    tracker: &Arc<Tracker>,
    store: &Interleaved,
    prefix: &str,
) {
    for n in 1.. {
        assert!(n < 200, "CompleteRun never stops making store calls");
        let name = format!("{prefix}-explicit-{n}");
        let mut explicit = job(&name, JobKind::IncrementalExtract);
        explicit.explicit_completion = true;
        tracker.create_job(explicit, "suite").await.unwrap();
        let run_id = tracker
            .start_run(start(&name, &["a"]))
            .await
            .unwrap()
            .run
            .run_id;
        let c = tracker
            .claim_unit(&claim("w", &run_id, LEASE))
            .await
            .unwrap()
            .unwrap();
        complete(tracker, &fence_of(&c)).await;
        let other = fence_of(&c);
        store.after_calls(n, the_move(tracker, Move::Register, &run_id, other));
        let r = tracker.complete_run(&run_id, None, None, "suite").await;
        let moved = store.disarm();
        no_unit_undone_if_succeeded(tracker, &run_id, &format!("CompleteRun, call {n}")).await;
        if !moved {
            r.expect("CompleteRun with every unit done");
            break;
        }
    }
}
