//! Size caps (#19): every part of a unit a request can grow is capped, so a
//! unit at every cap at once is still written by the store (on DynamoDB one
//! item of at most 400 KB), and a request over a cap is refused as
//! INVALID_ARGUMENT naming the field and the limit, changing nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidemark_kit::CancellationToken;

use super::support::{complete, fence_of, spec};
use super::{LEASE, claim, job, start};
use crate::engine::{ClaimRequest, Fence, StartRun, Tracker, UnitOutcome, UnitSpec};
use crate::error::TrackerError;
use crate::kv::KvStore;
use crate::limits::{
    MAX_CHECKPOINT_BYTES, MAX_COUNTERS_BYTES, MAX_DEPENDENCY_BYTES, MAX_ERROR_BYTES,
    MAX_RESULT_BYTES, MAX_UNIT_KEY_BYTES, MAX_WORKER_ID_BYTES, TRUNCATED,
};
use crate::model::{JobKind, Progress, RunStatus, Spec, UnitStatus};

/// Six bytes once escaped in JSON: the most a character of text can grow.
const CONTROL: &str = "\u{1}";

fn refused<T: std::fmt::Debug>(r: Result<T, TrackerError>, field: &str, limit: usize) {
    match r {
        Err(TrackerError::Invalid(f)) => {
            assert_eq!(f.field, field, "{}", f.description);
            assert!(
                f.description.contains(&limit.to_string()),
                "{field}: names the limit {limit}: {}",
                f.description
            );
        }
        other => panic!("{field}: expected INVALID_ARGUMENT, got {other:?}"),
    }
}

/// Progress whose counters serialize to exactly `size` bytes.
fn counters_of(size: usize) -> Progress {
    // {"<name>":-9223372036854775808} is the name plus 25 bytes.
    Progress {
        counters: BTreeMap::from([("c".repeat(size - 25), i64::MIN)]),
        ..Progress::default()
    }
}

/// A result that serializes to at most `size` bytes, within 4: values
/// take the most room per byte as 255.
fn result_of(size: usize) -> Spec {
    // {"type_url":"t","value":[255,...,255]} is 27 bytes and 4 a byte.
    Spec {
        type_url: "t".into(),
        value: vec![0xff; (size - 27) / 4],
    }
}

/// Error text as stored, without its quotes.
fn stored_len(text: &str) -> usize {
    serde_json::to_string(text).unwrap().len() - 2
}

/// Unit keys at their cap that escape the most (`"` doubles), as many as
/// the dependency cap takes, and one more.
fn long_keys() -> (Vec<String>, String) {
    let key = |i: usize| format!("{i:03}{}", "\"".repeat(MAX_UNIT_KEY_BYTES - 3));
    let mut keys: Vec<String> = Vec::new();
    while serde_json::to_string(&keys).unwrap().len() <= MAX_DEPENDENCY_BYTES {
        keys.push(key(keys.len()));
    }
    let extra = keys.pop().unwrap();
    (keys, extra)
}

fn run_of(job_name: &str, deps: &[String], big: &str) -> StartRun {
    let mut units: Vec<UnitSpec> = deps.iter().map(|k| spec(k, &[])).collect();
    units.push(UnitSpec {
        unit_key: big.to_owned(),
        after_unit_keys: deps.to_vec(),
        ..Default::default()
    });
    StartRun {
        units,
        ..start(job_name, &[])
    }
}

fn named(worker: &str, run_id: &str, unit_key: &str) -> ClaimRequest {
    ClaimRequest {
        unit_key: unit_key.to_owned(),
        ..claim(worker, run_id, LEASE)
    }
}

/// A unit with every part at its cap is claimed, checkpointed, failed,
/// claimed again and completed; each part one byte over is refused.
///
/// # Panics
/// When a write at the caps fails or one over them is accepted.
pub async fn unit_sizes_are_capped(store: Arc<dyn KvStore>, prefix: &str) {
    let tracker = Tracker::new(store, CancellationToken::new());
    let name = format!("{prefix}-caps");
    tracker
        .create_job(job(&name, JobKind::BackfillAttribute), "suite")
        .await
        .unwrap();
    let big = "\"".repeat(MAX_UNIT_KEY_BYTES);
    refused(
        tracker
            .start_run(run_of(&name, &[], &format!("{big}x")))
            .await,
        "units[0].unit_key",
        MAX_UNIT_KEY_BYTES,
    );
    let (deps, extra) = long_keys();
    let mut over = deps.clone();
    over.push(extra);
    let field = format!("units[{}].after_unit_keys", over.len());
    refused(
        tracker.start_run(run_of(&name, &over, &big)).await,
        &field,
        MAX_DEPENDENCY_BYTES,
    );
    assert_eq!(tracker.list_runs(&name, &[]).await.unwrap(), vec![]);
    let run_id = tracker
        .start_run(run_of(&name, &deps, &big))
        .await
        .unwrap()
        .run
        .run_id;
    for _ in &deps {
        let c = tracker
            .claim_unit(&claim("w", &run_id, LEASE))
            .await
            .unwrap()
            .expect("a dependency");
        complete(&tracker, &fence_of(&c)).await;
    }
    let worker = CONTROL.repeat(MAX_WORKER_ID_BYTES);
    refused(
        tracker
            .claim_unit(&named(&format!("{worker}x"), &run_id, &big))
            .await,
        "worker_id",
        MAX_WORKER_ID_BYTES,
    );
    let c = tracker
        .claim_unit(&named(&worker, &run_id, &big))
        .await
        .unwrap()
        .expect("the unit at the caps");
    let fence = fail_at_the_caps(&tracker, &fence_of(&c), &worker).await;
    complete_at_the_caps(&tracker, &fence).await;
    let view = tracker.get_run(&run_id).await.unwrap();
    assert_eq!(view.run.status, RunStatus::Succeeded, "{view:?}");
    run_caps(&tracker, prefix).await;
}

/// Checkpoints and fails (retryably) a unit at the caps; claims it again.
async fn fail_at_the_caps(tracker: &Tracker, fence: &Fence, worker: &str) -> Fence {
    let at_cap = counters_of(MAX_COUNTERS_BYTES);
    tracker
        .checkpoint(
            fence,
            vec![0xff; MAX_CHECKPOINT_BYTES],
            at_cap.clone(),
            None,
        )
        .await
        .expect("a checkpoint at the caps is stored");
    refused(
        tracker
            .checkpoint(
                fence,
                vec![0; MAX_CHECKPOINT_BYTES + 1],
                Progress::default(),
                None,
            )
            .await,
        "checkpoint",
        MAX_CHECKPOINT_BYTES,
    );
    refused(
        tracker
            .checkpoint(fence, Vec::new(), counters_of(MAX_COUNTERS_BYTES + 1), None)
            .await,
        "counters",
        MAX_COUNTERS_BYTES,
    );
    let failed = UnitOutcome::Failed {
        error: CONTROL.repeat(1 << 20),
        retryable: true,
        rolled_back: false,
    };
    let (unit, _) = tracker
        .finish_unit(fence, failed, Some(at_cap), "suite")
        .await
        .expect("a 1 MiB error is kept, truncated");
    assert_eq!(unit.status, UnitStatus::NotMigrated);
    assert!(unit.last_error.ends_with(TRUNCATED), "marked as truncated");
    assert!(stored_len(&unit.last_error) <= MAX_ERROR_BYTES + TRUNCATED.len());
    let again = tracker
        .claim_unit(&named(worker, &fence.run_id, &fence.unit_key))
        .await
        .unwrap()
        .expect("claimable again after a retryable failure");
    assert!(again.unit.checkpoint.len() == MAX_CHECKPOINT_BYTES);
    fence_of(&again)
}

/// Completes a unit at the caps after refusing a result and counters over.
async fn complete_at_the_caps(tracker: &Tracker, fence: &Fence) {
    let over = result_of(MAX_RESULT_BYTES + 4);
    let completed = |result: Spec| UnitOutcome::Completed {
        result: Some(result),
        route_to_target: false,
        end_run: None,
    };
    refused(
        tracker
            .finish_unit(fence, completed(over), None, "suite")
            .await,
        "result",
        MAX_RESULT_BYTES,
    );
    refused(
        tracker
            .finish_unit(
                fence,
                UnitOutcome::done(),
                Some(counters_of(MAX_COUNTERS_BYTES + 1)),
                "suite",
            )
            .await,
        "counters",
        MAX_COUNTERS_BYTES,
    );
    tracker
        .heartbeat(fence, LEASE)
        .await
        .expect("a refused completion leaves the unit leased");
    let at_cap = result_of(MAX_RESULT_BYTES);
    let (unit, _) = tracker
        .finish_unit(
            fence,
            completed(at_cap.clone()),
            Some(counters_of(MAX_COUNTERS_BYTES)),
            "suite",
        )
        .await
        .expect("a completion at the caps is stored");
    assert_eq!(
        (unit.status, unit.result.as_ref()),
        (UnitStatus::Migrated, Some(&at_cap))
    );
}

/// A run's result takes the unit's cap; a FailRun error is truncated.
async fn run_caps(tracker: &Tracker, prefix: &str) {
    let name = format!("{prefix}-caps-run");
    let mut explicit = job(&name, JobKind::IncrementalExtract);
    explicit.explicit_completion = true;
    tracker.create_job(explicit, "suite").await.unwrap();
    let run_id = tracker
        .start_run(start(&name, &["a"]))
        .await
        .unwrap()
        .run
        .run_id;
    let over = result_of(MAX_RESULT_BYTES + 4);
    refused(
        tracker
            .complete_run(&run_id, None, Some(over.clone()), "suite")
            .await,
        "result",
        MAX_RESULT_BYTES,
    );
    refused(
        tracker.fail_run(&run_id, "boom", Some(over), "suite").await,
        "result",
        MAX_RESULT_BYTES,
    );
    let at_cap = result_of(MAX_RESULT_BYTES);
    let run = tracker
        .fail_run(&run_id, &CONTROL.repeat(1 << 20), Some(at_cap), "suite")
        .await
        .expect("a FailRun at the caps is stored");
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.status_reason.ends_with(TRUNCATED));
    assert!(stored_len(&run.status_reason) <= MAX_ERROR_BYTES + TRUNCATED.len());
}
