//! A StartRun interrupted between creating its run and registering the
//! run's units (the process killed, the store failing) leaves a QUEUED run
//! that holds the job; the same request again (same `correlation_id`)
//! finishes that start instead of answering with the stuck run. Found by
//! the fault matrix: a verification stayed QUEUED for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tidemark_kit::CancellationToken;

use super::{job, precondition, start};
use crate::engine::Tracker;
use crate::kv::{Entry, KvError, KvResult, KvStore, Op};
use crate::model::{JobKind, RunStatus};

/// A store that stops answering once it has taken `writes` transactions,
/// as a job-tracker killed or cut off from its store mid-request.
struct CutOff {
    inner: Arc<dyn KvStore>,
    writes: AtomicUsize,
}

impl CutOff {
    fn check(&self) -> KvResult<()> {
        if self.writes.load(Ordering::SeqCst) == 0 {
            return Err(KvError::Failed("cut off".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl KvStore for CutOff {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        self.check()?;
        self.inner.get(pk, sk).await
    }

    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        self.check()?;
        self.inner.query(pk, prefix, after, limit).await
    }

    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        self.check()?;
        self.writes.fetch_sub(1, Ordering::SeqCst);
        self.inner.transact(ops).await
    }

    async fn ping(&self) -> KvResult<()> {
        self.check()?;
        self.inner.ping().await
    }
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
    let cut = Tracker::new(
        Arc::new(CutOff {
            inner: store,
            writes: AtomicUsize::new(1),
        }),
        CancellationToken::new(),
    );
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
