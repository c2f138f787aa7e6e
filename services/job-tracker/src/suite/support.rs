//! Helpers the suite's newer checks share.

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{Claimed, Fence, Tracker, UnitOutcome, UnitSpec};
use crate::kv::{Entry, KvResult, KvStore, Op};
use crate::model::RunStatus;

/// A store call, as a [`Hooked`] store's hook sees it.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    Get,
    Query { prefix: &'a str },
    Transact,
    Ping,
}

/// A store that asks its hook before every call of the store it wraps (to
/// count calls, or to fail them); an error from the hook is the answer.
pub struct Hooked<F> {
    pub inner: Arc<dyn KvStore>,
    pub hook: F,
}

#[async_trait]
impl<F> KvStore for Hooked<F>
where
    F: Fn(Call<'_>) -> KvResult<()> + Send + Sync,
{
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        (self.hook)(Call::Get)?;
        self.inner.get(pk, sk).await
    }

    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        (self.hook)(Call::Query { prefix })?;
        self.inner.query(pk, prefix, after, limit).await
    }

    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        (self.hook)(Call::Transact)?;
        self.inner.transact(ops).await
    }

    async fn ping(&self) -> KvResult<()> {
        (self.hook)(Call::Ping)?;
        self.inner.ping().await
    }
}

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
        ..Default::default()
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
