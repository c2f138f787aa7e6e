//! The job-tracker's behaviour suite on both stores: the embedded SQLite
//! store and a DynamoDB table on the real local endpoint.

use std::sync::Arc;

use async_trait::async_trait;
use job_tracker::kv::{DynamoKv, Entry, KvResult, KvStore, Op, SqliteKv};
use job_tracker::suite;
use tidemark_connectors::testing::{dynamodb_clients, unique_name};

fn sqlite() -> (tempfile::TempDir, Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let kv = SqliteKv::open(dir.path()).unwrap();
    (dir, Arc::new(kv))
}

/// Test-setup workaround for the local DynamoDB stand-in: it does not
/// isolate concurrent `TransactWriteItems` requests — two transactions whose
/// `ConditionExpression` (`rev = :expected`) targets the same item at the
/// same revision can both commit (seen in about 1 of 40 six-way races).
/// DynamoDB itself serialises conflicting transactions, so only the tests
/// serialise this process's transactions; reads and the engine's own
/// retry-on-conflict logic are untouched.
struct SerializedTransactions {
    inner: DynamoKv,
    lock: tokio::sync::Mutex<()>,
}

#[async_trait]
impl KvStore for SerializedTransactions {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        self.inner.get(pk, sk).await
    }
    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        self.inner.query(pk, prefix, after, limit).await
    }
    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        let _guard = self.lock.lock().await;
        self.inner.transact(ops).await
    }
    async fn ping(&self) -> KvResult<()> {
        self.inner.ping().await
    }
}

async fn dynamodb() -> Arc<dyn KvStore> {
    let (client, _) = dynamodb_clients().await;
    let kv = DynamoKv::new(client, &unique_name("jobs"));
    kv.ensure_table().await.unwrap();
    Arc::new(SerializedTransactions {
        inner: kv,
        lock: tokio::sync::Mutex::new(()),
    })
}

#[tokio::test]
async fn sqlite_kv_contract() {
    let (_dir, kv) = sqlite();
    suite::kv_contract(kv.as_ref()).await;
}

#[tokio::test]
async fn dynamodb_kv_contract() {
    suite::kv_contract(dynamodb().await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_tracker_rules() {
    let (_dir, kv) = sqlite();
    Box::pin(suite::tracker_rules(kv, "t")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_tracker_rules() {
    Box::pin(suite::tracker_rules(dynamodb().await, &unique_name("t"))).await;
}

// Found by the soak: requests about a few units read the whole run.
#[tokio::test]
async fn sqlite_unit_reads_follow_the_keys_asked_for() {
    let (_dir, kv) = sqlite();
    suite::unit_reads_follow_the_keys_asked_for(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_unit_reads_follow_the_keys_asked_for() {
    suite::unit_reads_follow_the_keys_asked_for(dynamodb().await, &unique_name("t")).await;
}

// #19.7: a run's end is decided from one consistent view of its units.
#[tokio::test]
async fn sqlite_an_interrupted_start_finishes_on_its_retry() {
    let (_dir, kv) = sqlite();
    suite::an_interrupted_start_finishes_on_its_retry(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_an_interrupted_start_finishes_on_its_retry() {
    suite::an_interrupted_start_finishes_on_its_retry(dynamodb().await, &unique_name("t")).await;
}

// The 10-minute fault matrix: an extract's scheduled start, interrupted,
// held its job QUEUED while every later due run was skipped.
#[tokio::test]
async fn sqlite_an_interrupted_scheduled_start_is_finished_by_the_scheduler() {
    let (_dir, kv) = sqlite();
    suite::an_interrupted_scheduled_start_is_finished_by_the_scheduler(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_an_interrupted_scheduled_start_is_finished_by_the_scheduler() {
    suite::an_interrupted_scheduled_start_is_finished_by_the_scheduler(
        dynamodb().await,
        &unique_name("t"),
    )
    .await;
}

// The 10-minute fault matrix: a verification left RUNNING by a worker
// killed between its last CompleteUnit and CompleteRun.
#[tokio::test]
async fn sqlite_an_explicit_run_ends_as_its_last_unit_asked() {
    let (_dir, kv) = sqlite();
    suite::an_explicit_run_ends_as_its_last_unit_asked(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_an_explicit_run_ends_as_its_last_unit_asked() {
    suite::an_explicit_run_ends_as_its_last_unit_asked(dynamodb().await, &unique_name("t")).await;
}

// The 10-minute fault matrix: an extract run left RUNNING when its worker's
// CompleteRun was given up, every later scheduled run SKIPPED behind it.
#[tokio::test]
async fn sqlite_an_extract_run_ends_at_the_watermark_its_units_asked() {
    let (_dir, kv) = sqlite();
    suite::an_extract_run_ends_at_the_watermark_its_units_asked(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_an_extract_run_ends_at_the_watermark_its_units_asked() {
    suite::an_extract_run_ends_at_the_watermark_its_units_asked(
        dynamodb().await,
        &unique_name("t"),
    )
    .await;
}

#[tokio::test]
async fn sqlite_a_run_ends_only_when_every_unit_is_done() {
    let (_dir, kv) = sqlite();
    Box::pin(suite::a_run_ends_only_when_every_unit_is_done(kv, "t")).await;
}

#[tokio::test]
async fn dynamodb_a_run_ends_only_when_every_unit_is_done() {
    let prefix = unique_name("t");
    Box::pin(suite::a_run_ends_only_when_every_unit_is_done(
        dynamodb().await,
        &prefix,
    ))
    .await;
}

// #19.8: blocked units do not hide claimable ones; cycles are refused.
#[tokio::test]
async fn sqlite_blocked_units_do_not_stop_claims() {
    let (_dir, kv) = sqlite();
    suite::blocked_units_do_not_stop_claims(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_blocked_units_do_not_stop_claims() {
    suite::blocked_units_do_not_stop_claims(dynamodb().await, &unique_name("t")).await;
}

#[tokio::test]
async fn sqlite_dependency_cycles_are_refused() {
    let (_dir, kv) = sqlite();
    suite::dependency_cycles_are_refused(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_dependency_cycles_are_refused() {
    suite::dependency_cycles_are_refused(dynamodb().await, &unique_name("t")).await;
}

// #16.5: a claim is one query and one write, a checkpoint one write.
#[tokio::test]
async fn sqlite_a_claim_and_a_checkpoint_make_three_store_calls() {
    let (_dir, kv) = sqlite();
    Box::pin(suite::a_claim_and_a_checkpoint_make_three_store_calls(
        kv, "t",
    ))
    .await;
}

#[tokio::test]
async fn dynamodb_a_claim_and_a_checkpoint_make_three_store_calls() {
    Box::pin(suite::a_claim_and_a_checkpoint_make_three_store_calls(
        dynamodb().await,
        &unique_name("t"),
    ))
    .await;
}

// A job over the copy's size limit is read on its own, never from a copy it
// outgrew.
#[tokio::test]
async fn sqlite_a_job_too_large_to_copy_is_read_on_its_own() {
    let (_dir, kv) = sqlite();
    suite::a_job_too_large_to_copy_is_read_on_its_own(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_a_job_too_large_to_copy_is_read_on_its_own() {
    suite::a_job_too_large_to_copy_is_read_on_its_own(dynamodb().await, &unique_name("t")).await;
}

// #19: a unit at every size cap still fits one DynamoDB item.
#[tokio::test]
async fn sqlite_unit_sizes_are_capped() {
    let (_dir, kv) = sqlite();
    suite::unit_sizes_are_capped(kv, "t").await;
}

#[tokio::test]
async fn dynamodb_unit_sizes_are_capped() {
    suite::unit_sizes_are_capped(dynamodb().await, &unique_name("t")).await;
}
