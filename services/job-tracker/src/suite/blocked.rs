//! Dependencies between units (#19.8): units waiting for others never hide
//! a claimable unit, and a self-dependency or a cycle is refused when the
//! units are declared, before anything is created.

use std::sync::Arc;
use std::time::Duration;

use tidemark_kit::CancellationToken;

use super::support::{complete, fence_of, spec};
use super::{LEASE, claim, job, start};
use crate::engine::{ClaimRequest, StartRun, Tracker, UnitSpec};
use crate::error::TrackerError;
use crate::kv::KvStore;
use crate::model::{JobKind, RunStatus, UnitStatus};

fn start_with(job_name: &str, units: Vec<UnitSpec>) -> StartRun {
    StartRun {
        units,
        ..start(job_name, &[])
    }
}

fn named(worker: &str, run_id: &str, unit_key: &str, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        unit_key: unit_key.to_owned(),
        ..claim(worker, run_id, lease)
    }
}

/// Forty units waiting for a leased parent sort ahead of a free unit: a
/// claim gets the free one; and a parent whose holder died is reclaimed
/// although its children wait in the queue.
///
/// # Panics
/// When a claimable unit is not claimed.
pub async fn blocked_units_do_not_stop_claims(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Tracker::new(store, CancellationToken::new());
    let name = format!("{prefix}-blocked");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let mut specs: Vec<UnitSpec> = (0..40)
        .map(|i| spec(&format!("blocked-{i:02}"), &["parent"]))
        .collect();
    specs.push(spec("free", &[]));
    specs.push(spec("parent", &[]));
    let run_id = tracker
        .start_run(start_with(&name, specs))
        .await
        .unwrap()
        .run
        .run_id;
    let parent = tracker
        .claim_unit(&named("w", &run_id, "parent", LEASE))
        .await
        .unwrap()
        .expect("the parent");
    let free = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("the free unit behind 40 blocked ones is claimable");
    assert_eq!(free.unit.unit_key, "free");
    assert!(
        tracker
            .claim_unit(&claim("w", &run_id, LEASE))
            .await
            .unwrap()
            .is_none(),
        "the rest wait for the parent"
    );
    complete(&tracker, &fence_of(&parent)).await;
    let child = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("a child once its parent is done");
    assert!(child.unit.unit_key.starts_with("blocked-"));

    let name = format!("{prefix}-orphaned");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let specs = vec![
        spec("child-1", &["root"]),
        spec("child-2", &["root"]),
        spec("root", &[]),
    ];
    let run_id = tracker
        .start_run(start_with(&name, specs))
        .await
        .unwrap()
        .run
        .run_id;
    let died = tracker
        .claim_unit(&named("dead", &run_id, "root", Duration::from_millis(1)))
        .await
        .unwrap()
        .expect("the root");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let taken = tracker
        .claim_unit(&claim("w", &run_id, LEASE))
        .await
        .unwrap()
        .expect("an expired lease is reclaimed although children wait in the queue");
    assert_eq!(taken.unit.unit_key, "root");
    assert!(taken.unit.fencing_token > died.unit.fencing_token);
}

fn invalid<T: std::fmt::Debug>(r: Result<T, TrackerError>, what: &str) -> (String, String) {
    match r {
        Err(TrackerError::Invalid(f)) => (f.field, f.description),
        other => panic!("{what}: expected INVALID_ARGUMENT, got {other:?}"),
    }
}

fn names_a_dependency_field(field: &str) -> bool {
    field.starts_with("units[") && field.ends_with("].after_unit_keys")
}

/// A unit after itself, a 3-cycle and an unknown dependency are refused,
/// naming the field and the units, and the refused call creates nothing:
/// the job can start a valid run right after. AddUnits refuses the same.
///
/// # Panics
/// When a bad declaration is accepted or leaves anything behind.
pub async fn dependency_cycles_are_refused(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Tracker::new(store, CancellationToken::new());
    let name = format!("{prefix}-cycles");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let cases: Vec<(&str, Vec<UnitSpec>, &[&str])> = vec![
        ("self", vec![spec("b", &[]), spec("a", &["a"])], &["a"]),
        (
            "3-cycle",
            vec![spec("a", &["c"]), spec("b", &["a"]), spec("c", &["b"])],
            &["a", "b", "c"],
        ),
        ("unknown", vec![spec("a", &["ghost"])], &["ghost"]),
    ];
    for (what, specs, keys) in cases {
        let (field, why) = invalid(tracker.start_run(start_with(&name, specs)).await, what);
        assert!(names_a_dependency_field(&field), "{what}: {field}");
        for k in keys {
            assert!(why.contains(&format!("{k:?}")), "{what}: names {k}: {why}");
        }
        assert_eq!(
            tracker.list_runs(&name, &[]).await.unwrap(),
            vec![],
            "{what}: no run created"
        );
        let job = tracker.get_job(&name).await.unwrap();
        assert_eq!(job.active_run_id, None, "{what}: the job is free");
    }
    let (field, _) = invalid(
        tracker
            .start_run(start_with(&name, vec![spec("a", &["a"])]))
            .await,
        "self, first unit",
    );
    assert_eq!(field, "units[0].after_unit_keys");

    let chain = vec![spec("a", &[]), spec("b", &["a"]), spec("c", &["b"])];
    let run = tracker.start_run(start_with(&name, chain)).await.unwrap();
    assert_eq!((run.run.status, run.units.total), (RunStatus::Running, 3));
    let run_id = run.run.run_id;
    for (what, specs) in [
        ("self", vec![spec("d", &["d"])]),
        ("2-cycle", vec![spec("d", &["e"]), spec("e", &["d"])]),
    ] {
        let (field, why) = invalid(tracker.add_units(&run_id, &specs, "suite").await, what);
        assert!(names_a_dependency_field(&field), "AddUnits {what}: {field}");
        assert!(why.contains("\"d\""), "AddUnits {what}: {why}");
    }
    let units = tracker.list_units(&run_id).await.unwrap();
    assert_eq!(units.len(), 3, "AddUnits added nothing");
    assert!(units.iter().all(|u| u.status == UnitStatus::NotMigrated));
}
