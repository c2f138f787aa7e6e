//! BackfillAttribute (DESIGN.md problem 4): set `A = V` on every item lacking
//! it. Each unit is one parallel-scan segment. Every update is conditional on
//! the item still existing and still lacking `A`, so a concurrent writer's
//! value is never overwritten and a deleted item is never recreated. The
//! checkpoint is the segment's scan position plus the counters, so a unit
//! resumed after `kill -9` rescans at most one page, and re-updating an item
//! of that page is refused by the same condition (counted as already set,
//! never twice as updated).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::{ConnectorError, Item, Key, Predicate, ScanRequest};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease, unpack_any};
use tidemark_proto::replicator::v1::BackfillAttributeSpec;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::context::{Context, UnitFailure, segment_of};
use crate::stores::OpenTable;

pub const SPEC_TYPE: &str = <BackfillAttributeSpec as tidemark_kit::jobs::JobSpec>::TYPE;
pub const DEFAULT_SEGMENTS: u32 = 16;
/// Items examined per scan page (and per checkpoint).
const PAGE: u32 = 200;
/// Conditional updates in flight per segment.
pub const IN_FLIGHT: usize = 16;

#[derive(Default, Serialize, Deserialize)]
struct Checkpoint {
    start_after: Option<Key>,
    done: bool,
    updated: i64,
    already_set: i64,
    conflicted: i64,
    scanned: i64,
}

pub fn segments(spec: &BackfillAttributeSpec) -> u32 {
    if spec.segments == 0 {
        DEFAULT_SEGMENTS
    } else {
        spec.segments
    }
}

/// A token bucket refilled at `rate` per second (0: unlimited) whose rate
/// halves on throttling and recovers slowly (additive increase).
pub struct RateLimiter {
    state: Mutex<Bucket>,
}

struct Bucket {
    configured: f64,
    current: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64) -> Self {
        Self {
            state: Mutex::new(Bucket {
                configured: rate,
                current: rate,
                tokens: rate.min(1.0),
                last: Instant::now(),
            }),
        }
    }

    pub async fn set_rate(&self, rate: f64) {
        let mut b = self.state.lock().await;
        b.configured = rate;
        b.current = rate;
    }

    /// Takes one token, waiting for it.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = self.state.lock().await;
                if b.configured <= 0.0 {
                    return;
                }
                let now = Instant::now();
                let elapsed = now.duration_since(b.last).as_secs_f64();
                b.last = now;
                // Additive recovery towards the configured rate after a
                // throttling halved it.
                b.current = (b.current + elapsed * b.configured / 10.0).min(b.configured);
                b.tokens = (b.tokens + elapsed * b.current).min(b.current.max(1.0));
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - b.tokens) / b.current)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The store throttled us: halve the rate (never below 1/s).
    pub async fn throttled(&self) {
        let mut b = self.state.lock().await;
        if b.configured > 0.0 {
            b.current = (b.current / 2.0).max(1.0);
        }
    }
}

/// This segment's share of the job-wide write rate.
fn share(spec: &BackfillAttributeSpec) -> f64 {
    f64::from(spec.write_units_per_second) / f64::from(segments(spec))
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let mut spec: BackfillAttributeSpec =
        unpack_any(claim.job.spec.as_ref(), SPEC_TYPE).map_err(UnitFailure::terminal)?;
    let total = segments(&spec);
    let segment = segment_of(&claim.unit.unit_key, total).map_err(UnitFailure::terminal)?;
    let attribute = spec.attribute_name.clone();
    let value = spec
        .value
        .as_ref()
        .map(value_from_proto)
        .transpose()
        .map_err(|e| UnitFailure::terminal(format!("spec.value: {e}")))?
        .ok_or_else(|| UnitFailure::terminal("spec.value is required"))?;
    let table = ctx
        .stores
        .table(spec.table.as_ref().unwrap_or(&Default::default()))
        .await
        .map_err(UnitFailure::from)?;
    let mut cp: Checkpoint = if claim.unit.checkpoint.is_empty() {
        Checkpoint::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable checkpoint: {e}")))?
    };
    let limiter = Arc::new(RateLimiter::new(share(&spec)));
    let mut revision = claim.job.revision;
    let set: Arc<Item> = Arc::new([(attribute.clone(), value)].into_iter().collect());
    // The item must still exist (no resurrection of a delete) and still lack
    // the attribute (a concurrent writer's value wins).
    let condition = Arc::new(Predicate::And(vec![
        Predicate::ItemExists,
        Predicate::AttributeNotExists(attribute.clone()),
    ]));
    let lease = claim.lease.clone();
    let scan = |start_after: Option<Key>| {
        let table = Arc::clone(&table.table);
        let filter = Predicate::AttributeNotExists(attribute.clone());
        async move {
            table
                .scan(&ScanRequest {
                    segment,
                    total_segments: total,
                    start_after,
                    limit: PAGE,
                    filter: Some(filter),
                    consistent: false,
                })
                .await
                .map_err(UnitFailure::from)
        }
    };
    let mut page = if cp.done {
        None
    } else {
        Some(scan(cp.start_after.clone()).await?)
    };
    while let Some(current) = page.take() {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        if lease.job_revision() > revision {
            revision = refresh_rate(&ctx, &claim.job.name, &limiter, &mut spec).await?;
        }
        let scanned = i64::try_from(current.scanned).unwrap_or(i64::MAX);
        let candidates = i64::try_from(current.items.len()).unwrap_or(i64::MAX);
        cp.scanned += scanned;
        cp.already_set += scanned - candidates;
        let updates = update_items(current.items, &table, &limiter, &set, &condition);
        // The next page is read while this one's updates run (its keys
        // follow this page's, so neither sees the other's writes).
        let next = async {
            match &current.last_key {
                Some(last) => scan(Some(last.clone())).await.map(Some),
                None => Ok(None),
            }
        };
        let (outcomes, next) = tokio::join!(updates, next);
        for outcome in outcomes {
            match outcome {
                Ok(true) => cp.updated += 1,
                Ok(false) => cp.conflicted += 1,
                Err(e) => return Err(UnitFailure::from(e)),
            }
        }
        // Checkpointed only now that every update of the page is done.
        cp.start_after.clone_from(&current.last_key);
        cp.done = current.last_key.is_none();
        if !cp.done {
            save(&lease, &cp).await?;
        }
        page = next?;
    }
    lease.complete(&progress(&cp), None).await?;
    Ok(())
}

/// SetBackfillRate changed the spec: picks up the new rate. Returns the
/// job's revision now.
async fn refresh_rate(
    ctx: &Context,
    job_name: &str,
    limiter: &RateLimiter,
    spec: &mut BackfillAttributeSpec,
) -> Result<u64, UnitFailure> {
    let job = ctx
        .jobs
        .get_job(job_name)
        .await
        .map_err(|e| UnitFailure::retryable(e.message()))?;
    if let Ok(new) = unpack_any::<BackfillAttributeSpec>(job.spec.as_ref(), SPEC_TYPE) {
        *spec = new;
        limiter.set_rate(share(spec)).await;
        tracing::info!(job = %job.name, rate = spec.write_units_per_second, "backfill rate changed");
    }
    Ok(job.revision)
}

/// Updates one page's items, [`IN_FLIGHT`] at a time, each conditional:
/// `Ok(true)` updated, `Ok(false)` refused by the condition.
async fn update_items(
    items: Vec<Item>,
    table: &OpenTable,
    limiter: &Arc<RateLimiter>,
    set: &Arc<Item>,
    condition: &Arc<Predicate>,
) -> Vec<Result<bool, ConnectorError>> {
    futures::stream::iter(items)
        .map(|item| {
            let limiter = Arc::clone(limiter);
            let source = Arc::clone(&table.table);
            let key = table.schema.key_of(&item);
            let set = Arc::clone(set);
            let condition = Arc::clone(condition);
            async move {
                let key = key.map_err(|e| ConnectorError::invalid("backfill", e))?;
                loop {
                    limiter.acquire().await;
                    match source.update(&key, &set, Some(&condition)).await {
                        Ok(_) => return Ok(true),
                        Err(ConnectorError::Precondition(_)) => return Ok(false),
                        Err(ConnectorError::Retryable { .. }) => {
                            // The connector's own retries ran out: the
                            // table is throttling; slow the whole segment.
                            limiter.throttled().await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}

/// Checkpoints the segment; a failed checkpoint only costs a longer rescan.
async fn save(lease: &UnitLease, cp: &Checkpoint) -> Result<(), UnitFailure> {
    let bytes = serde_json::to_vec(cp).expect("checkpoint serialises");
    match lease.checkpoint(bytes, &progress(cp)).await {
        Ok(()) => {}
        Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
        Err(LeaseError::Rpc(s)) => {
            tracing::warn!(error = %s, "checkpoint failed; continuing");
        }
    }
    Ok(())
}

fn progress(cp: &Checkpoint) -> Progress {
    let mut p = Progress {
        items_processed: cp.scanned,
        ..Progress::default()
    };
    p.add("updated", cp.updated);
    p.add("already_set", cp.already_set);
    p.add("conflicted", cp.conflicted);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limiter_holds_the_rate_and_backs_off() {
        let limiter = RateLimiter::new(10.0);
        let start = Instant::now();
        for _ in 0..21 {
            limiter.acquire().await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            (1.9..2.2).contains(&elapsed),
            "21 tokens at 10/s took {elapsed}s"
        );
        limiter.throttled().await;
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert!(start.elapsed().as_secs_f64() > 0.7, "halved rate is slower");
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let limiter = RateLimiter::new(0.0);
        for _ in 0..10_000 {
            limiter.acquire().await;
        }
    }
}
