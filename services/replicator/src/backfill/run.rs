//! BackfillAttribute (DESIGN.md problem 4): set `A = V` on every item lacking
//! it. Each unit is one parallel-scan segment. Every update is conditional on
//! the item still existing and still lacking `A`, so a concurrent writer's
//! value is never overwritten and a deleted item is never recreated. The
//! checkpoint is the segment's scan position plus the counters, so a unit
//! resumed after `kill -9` rescans at most one page, and re-updating an item
//! of that page is refused by the same condition (counted as already set,
//! never twice as updated).

use std::sync::Arc;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tidemark_connectors::capacity::{AdaptiveRate, CapacityMeter, metered};
use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::{ConnectorError, Item, Key, Predicate, ScanRequest};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease, unpack_any};
use tidemark_proto::replicator::v1::BackfillAttributeSpec;

use crate::context::{Context, MAX_WRITES_IN_FLIGHT, UnitFailure, segment_of};
use crate::stores::OpenTable;

pub const SPEC_TYPE: &str = <BackfillAttributeSpec as tidemark_kit::jobs::JobSpec>::TYPE;
pub const DEFAULT_SEGMENTS: u32 = 16;
/// Items examined per scan page (and per checkpoint).
const PAGE: u32 = 200;
/// Conditional updates in flight per segment, unless the spec says.
pub const IN_FLIGHT: usize = 16;

#[derive(Default, Serialize, Deserialize)]
struct Checkpoint {
    start_after: Option<Key>,
    done: bool,
    updated: i64,
    already_set: i64,
    conflicted: i64,
    scanned: i64,
    /// Write capacity units consumed and attempts throttled, by the
    /// segment's earlier leases (this lease's are on its meter).
    #[serde(default)]
    write_units: f64,
    #[serde(default)]
    throttled: u64,
}

pub fn segments(spec: &BackfillAttributeSpec) -> u32 {
    if spec.segments == 0 {
        DEFAULT_SEGMENTS
    } else {
        spec.segments
    }
}

/// Conditional updates in flight per segment.
pub fn in_flight(spec: &BackfillAttributeSpec) -> usize {
    match spec.writes_in_flight {
        0 => IN_FLIGHT,
        n => n.min(MAX_WRITES_IN_FLIGHT) as usize,
    }
}

/// This segment's share of the job-wide write rate.
fn share(spec: &BackfillAttributeSpec) -> f64 {
    f64::from(spec.write_units_per_second) / f64::from(segments(spec))
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let meter = CapacityMeter::new();
    Box::pin(metered(Arc::clone(&meter), run_unit(ctx, claim, meter))).await
}

async fn run_unit(
    ctx: Context,
    claim: Claim,
    meter: Arc<CapacityMeter>,
) -> Result<(), UnitFailure> {
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
    let limiter = Arc::new(AdaptiveRate::new(share(&spec), meter));
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
        let updates = update_items(
            current.items,
            in_flight(&spec),
            &table,
            &limiter,
            &set,
            &condition,
        );
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
            save(&lease, &cp, &limiter).await?;
        }
        page = next?;
    }
    lease.complete(&progress(&cp, &limiter), None).await?;
    Ok(())
}

/// SetBackfillRate changed the spec: picks up the new rate. Returns the
/// job's revision now.
async fn refresh_rate(
    ctx: &Context,
    job_name: &str,
    limiter: &AdaptiveRate,
    spec: &mut BackfillAttributeSpec,
) -> Result<u64, UnitFailure> {
    let job = ctx
        .jobs
        .get_job(job_name)
        .await
        .map_err(|e| UnitFailure::retryable(e.message()))?;
    if let Ok(new) = unpack_any::<BackfillAttributeSpec>(job.spec.as_ref(), SPEC_TYPE) {
        *spec = new;
        limiter.set_rate(share(spec));
        tracing::info!(job = %job.name, rate = spec.write_units_per_second, "backfill rate changed");
    }
    Ok(job.revision)
}

/// Updates one page's items, `in_flight` at a time, each conditional:
/// `Ok(true)` updated, `Ok(false)` refused by the condition.
async fn update_items(
    items: Vec<Item>,
    in_flight: usize,
    table: &OpenTable,
    limiter: &Arc<AdaptiveRate>,
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
                        // The connector's retries ran out (each throttled
                        // attempt has already slowed the segment's rate):
                        // try again at that rate.
                        Err(ConnectorError::Retryable { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

/// Checkpoints the segment; a failed checkpoint only costs a longer rescan.
async fn save(lease: &UnitLease, cp: &Checkpoint, rate: &AdaptiveRate) -> Result<(), UnitFailure> {
    let now = with_capacity(cp, rate);
    let bytes = serde_json::to_vec(&now).expect("checkpoint serialises");
    match lease.checkpoint(bytes, &progress(cp, rate)).await {
        Ok(()) => {}
        Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
        Err(LeaseError::Rpc(s)) => {
            tracing::warn!(error = %s, "checkpoint failed; continuing");
        }
    }
    Ok(())
}

/// The checkpoint with this lease's consumed capacity and throttles added.
fn with_capacity(cp: &Checkpoint, rate: &AdaptiveRate) -> Checkpoint {
    Checkpoint {
        start_after: cp.start_after.clone(),
        write_units: cp.write_units + rate.meter().consumed(),
        throttled: cp.throttled + rate.meter().throttled(),
        ..*cp
    }
}

/// The segment's counters; `write_units_consumed` and `throttled` tell how
/// hard the table was pushed (DynamoDB's consumed capacity, attempts it
/// throttled).
fn progress(cp: &Checkpoint, rate: &AdaptiveRate) -> Progress {
    let now = with_capacity(cp, rate);
    let mut p = Progress {
        items_processed: cp.scanned,
        ..Progress::default()
    };
    p.add("updated", cp.updated);
    p.add("already_set", cp.already_set);
    p.add("conflicted", cp.conflicted);
    #[allow(clippy::cast_possible_truncation)]
    p.add("write_units_consumed", now.write_units.round() as i64);
    p.add(
        "throttled",
        i64::try_from(now.throttled).unwrap_or(i64::MAX),
    );
    p
}
