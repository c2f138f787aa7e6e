//! Requests about a few units of a large run read those units, not the
//! run: AddUnits answered with the units it added by reading every unit of
//! the run, and ListUnits filtered by keys did the same, so their cost grew
//! with the run (found by the soak, whose unit cycle adds a unit at a time
//! to a run that keeps growing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tidemark_kit::CancellationToken;

use super::support::{Call, Hooked};
use super::{job, start, units};
use crate::engine::Tracker;
use crate::error::TrackerError;
use crate::kv::KvStore;
use crate::model::{JobKind, UnitStatus};

pub async fn unit_reads_follow_the_keys_asked_for(store: Arc<dyn KvStore>, prefix: &str) {
    // Counts the store's queries over units (`unit#…`).
    let unit_queries = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&unit_queries);
    let hook = move |call: Call<'_>| {
        if let Call::Query { prefix } = call
            && prefix.starts_with("unit#")
        {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    };
    let tracker = Tracker::new(
        Arc::new(Hooked { inner: store, hook }),
        CancellationToken::new(),
    );
    let name = format!("{prefix}-many-units");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let keys: Vec<String> = (0..120).map(|i| format!("u{i:03}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let run_id = tracker
        .start_run(start(&name, &key_refs))
        .await
        .unwrap()
        .run
        .run_id;
    let before = unit_queries.load(Ordering::SeqCst);

    // A unit given twice in one request is refused, naming it (its two
    // registrations in one write could never commit: the call answered
    // UNAVAILABLE after every retry, and a client retried it forever).
    match tracker
        .add_units(&run_id, &units(&["z-new", "a-new", "z-new"]), "suite")
        .await
    {
        Err(TrackerError::Invalid(e)) => {
            assert!(e.to_string().contains("units[0].unit_key"), "{e}");
        }
        other => panic!("a repeated unit key: expected INVALID_ARGUMENT, got {other:?}"),
    }
    // Added: the new units and an existing one, in key order.
    let added = tracker
        .add_units(&run_id, &units(&["z-new", "a-new", "u007"]), "suite")
        .await
        .unwrap();
    let added: Vec<&str> = added.iter().map(|u| u.unit_key.as_str()).collect();
    assert_eq!(added, ["a-new", "u007", "z-new"]);

    // Listed by keys: those that exist, filtered by status, in key order.
    let listed = tracker
        .list_units_filtered(
            &run_id,
            &[],
            &["u100".to_owned(), "missing".to_owned(), "a-new".to_owned()],
        )
        .await
        .unwrap();
    let listed: Vec<&str> = listed.iter().map(|u| u.unit_key.as_str()).collect();
    assert_eq!(listed, ["a-new", "u100"]);
    let none = tracker
        .list_units_filtered(&run_id, &[UnitStatus::Migrated], &["u100".to_owned()])
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");

    assert_eq!(
        unit_queries.load(Ordering::SeqCst) - before,
        0,
        "AddUnits and ListUnits by key read every unit of the run"
    );
    // Without keys, ListUnits still lists the whole run.
    let all = tracker
        .list_units_filtered(&run_id, &[], &[])
        .await
        .unwrap();
    assert_eq!(all.len(), 122);
}
