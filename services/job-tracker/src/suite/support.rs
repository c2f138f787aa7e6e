//! Helpers the suite's newer checks share.

use crate::engine::{Claimed, Fence, Tracker, UnitOutcome, UnitSpec};
use crate::model::RunStatus;

pub fn fence_of(c: &Claimed) -> Fence {
    Fence {
        run_id: c.unit.run_id.clone(),
        unit_key: c.unit.unit_key.clone(),
        fencing_token: c.unit.fencing_token,
    }
}

pub fn spec(key: &str, after: &[&str]) -> UnitSpec {
    UnitSpec {
        unit_key: key.to_owned(),
        after_unit_keys: after.iter().map(|k| (*k).to_owned()).collect(),
    }
}

pub async fn complete(tracker: &Tracker, fence: &Fence) {
    tracker
        .finish_unit(fence, UnitOutcome::done(), None, "suite")
        .await
        .unwrap();
}

/// Panics when the run SUCCEEDED although some unit is not MIGRATED.
pub async fn no_unit_undone_if_succeeded(tracker: &Tracker, run_id: &str, when: &str) {
    let view = tracker.get_run(run_id).await.unwrap();
    if view.run.status == RunStatus::Succeeded {
        assert_eq!(
            view.units.migrated, view.units.total,
            "{when}: the run SUCCEEDED with units not done: {:?} ({})",
            view.units, view.run.status_reason
        );
    }
}
