//! Incremental extract (DESIGN.md problem 5): each run reads the items
//! changed in its window [previous successful run's last processed time, run
//! start) — the job-tracker hands the window to the run — and writes the
//! latest version of each to an S3 prefix (one object per key, replaced only
//! by a newer version), then a manifest `<prefix>_manifests/<run id>.json`
//! (count, window, checksum). A failed run writes no manifest and fails the
//! run, which blocks the next one until acknowledged (the job-tracker's
//! failure gate).
//!
//! Units are parallel scan segments; each keeps its scan position, counts and
//! an order-independent checksum in its checkpoint. Each segment completes
//! with how the run ends (SUCCEEDED, last processed at the window end), so
//! the job-tracker ends the run with the last one's write, whatever happens
//! to the worker after it. The worker that sees the run end writes the
//! manifest from the units' records; one killed before it leaves the
//! manifest to the next run's first segment, which writes any manifest its
//! window's predecessor (`window_start_run_id`) lacks.

use serde::{Deserialize, Serialize};
use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::transform::{TimeEncoding, Transform};
use tidemark_connectors::{
    AttrValue, Item, Key, Number, RecordOutcome, ScanPage, ScanRequest, Sink, SinkOp, SinkRecord,
};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease, unpack_any};
use tidemark_proto::common::v1::S3PrefixRef;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{FailRunRequest, Run, RunEnd, RunStatus, Watermark};
use tidemark_proto::replicator::v1::{ChangedItemsIndex, IncrementalExtractSpec};

use crate::context::{Context, UnitFailure, segment_of};
use crate::stores::OpenTable;

pub const SPEC_TYPE: &str = <IncrementalExtractSpec as tidemark_kit::jobs::JobSpec>::TYPE;
pub const DEFAULT_SEGMENTS: u32 = 8;

/// Units of a run: one per partition value of the index, else scan segments.
pub fn segments(spec: &IncrementalExtractSpec) -> u32 {
    if let Some(index) = &spec.index {
        return u32::try_from(index.partition_values.len()).unwrap_or(u32::MAX);
    }
    if spec.segments == 0 {
        DEFAULT_SEGMENTS
    } else {
        spec.segments
    }
}

#[derive(Default, Serialize, Deserialize)]
struct SegmentState {
    start_after: Option<Key>,
    scanned: u64,
    extracted: u64,
    skipped_older: u64,
    /// XOR of SHA-256 over (key, version) of the items written.
    checksum: [u8; 32],
}

/// The settle lag when the spec leaves it unset.
const DEFAULT_SETTLE_LAG_MICROS: i64 = 2_000_000;
/// The longest settle lag a spec may ask for.
pub const MAX_SETTLE_LAG_MICROS: i64 = 3_600_000_000;

/// The spec's settle lag in microseconds (unset: the default).
pub fn settle_lag_micros(spec: &IncrementalExtractSpec) -> i64 {
    spec.settle_lag
        .as_ref()
        .map_or(DEFAULT_SETTLE_LAG_MICROS, |d| {
            // Saturating: the RPC checks the range only after computing it.
            d.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(d.nanos) / 1000)
        })
}

/// Where a run's extract ends: its window end less the settle lag (never
/// before its start), so a change not yet visible when the run reads lies
/// in the next run's window instead of behind both.
pub fn window_end(start: i64, end: i64, settle_lag_micros: i64) -> i64 {
    if end == i64::MAX {
        return end;
    }
    end.saturating_sub(settle_lag_micros).max(start)
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn micros(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| {
        t.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(t.nanos) / 1000)
    })
}

fn fold(checksum: &mut [u8; 32], key: &Key, version: u64) {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key.canonical().as_bytes());
    h.update(version.to_be_bytes());
    for (c, x) in checksum.iter_mut().zip(h.finalize()) {
        *c ^= x;
    }
}

fn progress(s: &SegmentState) -> Progress {
    let mut p = Progress {
        items_processed: i64::try_from(s.extracted).unwrap_or(i64::MAX),
        ..Progress::default()
    };
    p.add("scanned", i64::try_from(s.scanned).unwrap_or(i64::MAX));
    p.add("extracted", i64::try_from(s.extracted).unwrap_or(i64::MAX));
    p.add(
        "skipped_older",
        i64::try_from(s.skipped_older).unwrap_or(i64::MAX),
    );
    p
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let Err(failure) = extract_segment(&ctx, &claim).await else {
        return Ok(());
    };
    // A segment that failed for good fails its run at once: no manifest,
    // and the job's next run waits for an acknowledgement. One that failed
    // retryably with attempts left goes back to the queue and resumes from
    // its checkpoint: the run goes on (a store's blip must not block the
    // job until an operator acknowledges a failure).
    if let UnitFailure::Failed { retryable, .. } = &failure
        && claim.failure_is_final(*retryable)
    {
        let _ = ctx
            .jobs
            .fail_run(FailRunRequest {
                run_id: claim.run.run_id.clone(),
                error: format!("unit {}: {failure}", claim.unit.unit_key),
                result: None,
                actor: ctx.config.worker_id.clone(),
            })
            .await;
    }
    Err(failure)
}

async fn extract_segment(ctx: &Context, claim: &Claim) -> Result<(), UnitFailure> {
    let spec: IncrementalExtractSpec =
        unpack_any(claim.job.spec.as_ref(), SPEC_TYPE).map_err(UnitFailure::terminal)?;
    let total = segments(&spec);
    let segment = segment_of(&claim.unit.unit_key, total).map_err(UnitFailure::terminal)?;
    let encoding = TimeEncoding::from_proto(spec.changed_at_encoding, "changed_at_encoding")
        .map_err(|e| UnitFailure::terminal(e.to_string()))?;
    let transform = Transform::from_proto(&spec.transform.clone().unwrap_or_default())
        .map_err(|e| UnitFailure::terminal(format!("transform.{e}")))?;
    let start = micros(claim.run.window_start.as_ref()).unwrap_or(i64::MIN);
    let end = window_end(
        start,
        micros(claim.run.window_end.as_ref()).unwrap_or(i64::MAX),
        settle_lag_micros(&spec),
    );
    let source = ctx
        .stores
        .table(spec.source.as_ref().unwrap_or(&Default::default()))
        .await?;
    let schema = crate::schema::target_schema(&source.schema, &transform);
    let target = ctx
        .stores
        .sink(
            spec.target.as_ref().unwrap_or(&Default::default()),
            &schema,
            "",
            &transform,
        )
        .await?
        .sink();
    if segment == 0 {
        write_missing_manifest(ctx, claim, &spec).await;
    }
    let lease = claim.lease.clone();
    let mut state: SegmentState = if claim.unit.checkpoint.is_empty() {
        SegmentState::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable checkpoint: {e}")))?
    };
    loop {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        let page = match &spec.index {
            Some(index) => {
                query_window(
                    &source,
                    index,
                    segment,
                    encoding,
                    &spec.changed_at_attribute,
                    start,
                    end,
                )
                .await?
            }
            None => {
                source
                    .table
                    .scan(&ScanRequest {
                        segment,
                        total_segments: total,
                        start_after: state.start_after.clone(),
                        limit: 500,
                        filter: None,
                        consistent: false,
                    })
                    .await?
            }
        };
        state.scanned += page.scanned;
        let batch = changed_records(
            &spec,
            encoding,
            &transform,
            &source,
            &page.items,
            (start, end),
        )?;
        if !batch.is_empty() {
            write_batch(target.as_ref(), &batch, &mut state).await?;
        }
        state.start_after.clone_from(&page.last_key);
        if page.last_key.is_some() {
            let bytes = serde_json::to_vec(&state).expect("extract state serialises");
            match lease.checkpoint(bytes, &progress(&state)).await {
                Ok(()) => continue,
                Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
                Err(LeaseError::Rpc(s)) => {
                    tracing::warn!(error = %s, "extract checkpoint failed");
                    continue;
                }
            }
        }
        return finish_segment(ctx, claim, &spec, &lease, &state, (start, end)).await;
    }
}

/// The page's items changed inside the window `[start, end)`, as sink
/// records carrying their version.
fn changed_records(
    spec: &IncrementalExtractSpec,
    encoding: TimeEncoding,
    transform: &Transform,
    source: &OpenTable,
    items: &[Item],
    (start, end): (i64, i64),
) -> Result<Vec<SinkRecord>, UnitFailure> {
    let mut batch = Vec::new();
    for item in items {
        let Some(changed) = item
            .get(&spec.changed_at_attribute)
            .and_then(|v| encoding.micros(v))
        else {
            continue;
        };
        if changed < start || changed >= end {
            continue;
        }
        let key = source.schema.key_of(item).map_err(UnitFailure::terminal)?;
        let version = if spec.version_attribute.is_empty() {
            u64::try_from(changed).unwrap_or(0)
        } else {
            item.get(&spec.version_attribute)
                .and_then(AttrValue::as_number)
                .and_then(Number::as_u64)
                .unwrap_or_else(|| u64::try_from(changed).unwrap_or(0))
        };
        batch.push(SinkRecord {
            key: transform.shape_key(&key),
            version,
            op: SinkOp::Upsert(transform.shape(item, &source.schema)),
        });
    }
    Ok(batch)
}

/// Writes a batch to the target and counts it into the segment's state.
async fn write_batch(
    target: &dyn Sink,
    batch: &[SinkRecord],
    state: &mut SegmentState,
) -> Result<(), UnitFailure> {
    let outcomes = target.apply(batch).await?;
    for (record, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            RecordOutcome::Applied => {
                state.extracted += 1;
                fold(&mut state.checksum, &record.key, record.version);
            }
            RecordOutcome::Stale => state.skipped_older += 1,
            RecordOutcome::Rejected(reason) => {
                return Err(UnitFailure::terminal(format!(
                    "the target refused item {}: {reason}",
                    record.key
                )));
            }
        }
    }
    Ok(())
}

/// Completes the segment, asking the run to end SUCCEEDED at the window
/// end once no segment is left; the worker that sees the run end writes its
/// manifest.
async fn finish_segment(
    ctx: &Context,
    claim: &Claim,
    spec: &IncrementalExtractSpec,
    lease: &UnitLease,
    state: &SegmentState,
    (start, end): (i64, i64),
) -> Result<(), UnitFailure> {
    let bytes = serde_json::to_vec(state).expect("extract state serialises");
    // The final state must be readable by whoever writes the manifest.
    lease.checkpoint(bytes, &progress(state)).await?;
    let end_run = RunEnd {
        failed: false,
        error: String::new(),
        // Where this run's extract ended (the window end less the settle
        // lag): the next run starts there.
        last_processed: Some(Watermark {
            time: (end != i64::MAX).then(|| timestamp(end)),
            position: String::new(),
        }),
    };
    let run_progress = match lease
        .complete_and_end_run(&progress(state), None, end_run)
        .await
    {
        Ok(p) => p,
        // Unanswered: the segment may have completed (then the job-tracker
        // ends the run by itself) or not (then its lease lapses and another
        // worker does it again). Neither fails the run.
        Err(LeaseError::Rpc(s)) => {
            tracing::warn!(error = %s, "the extract segment's completion went unanswered");
            return Err(UnitFailure::LeaseLost);
        }
        Err(lost) => return Err(lost.into()),
    };
    let ended = run_progress.as_ref().is_some_and(|p| {
        let u = p.units.unwrap_or_default();
        u.migrated == u.total && p.status != RunStatus::Failed as i32
    });
    if ended {
        // The run has ended (or ends at the next claim), so a failure here
        // fails nothing: the next run's first segment writes the manifest.
        let target = s3_target(spec)?;
        let written = write_manifest(
            ctx,
            target,
            &claim.run.run_id,
            &claim.job.name,
            (start, end),
        )
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "the run's manifest is left to the next run");
        }
    }
    Ok(())
}

/// The items of one partition value of the index changed in the window,
/// read by key (the index may project only keys), as one page.
async fn query_window(
    source: &OpenTable,
    index: &ChangedItemsIndex,
    unit: u32,
    encoding: TimeEncoding,
    changed_at: &str,
    start: i64,
    end: i64,
) -> Result<ScanPage, UnitFailure> {
    let dynamo = source
        .dynamo
        .as_ref()
        .ok_or_else(|| UnitFailure::terminal("an index needs a DynamoDB source"))?;
    let value = index
        .partition_values
        .get(usize::try_from(unit).unwrap_or(usize::MAX))
        .ok_or_else(|| UnitFailure::terminal("no such partition value"))?;
    let value = value_from_proto(value).map_err(|e| UnitFailure::terminal(e.to_string()))?;
    let from = encoding.value(start.max(0));
    let to = encoding.value(end);
    let keys = dynamo
        .query_index_range_keys(
            &index.index_name,
            &index.partition_attribute,
            &value,
            Some((changed_at, &from, &to)),
        )
        .await?;
    let mut items = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(item) = source.table.get(&key).await? {
            items.push(item);
        }
    }
    Ok(ScanPage {
        scanned: u64::try_from(items.len()).unwrap_or(u64::MAX),
        items,
        last_key: None,
    })
}

#[derive(Serialize)]
struct Manifest<'a> {
    run_id: &'a str,
    job_name: &'a str,
    window_start: Option<String>,
    window_end: String,
    count: u64,
    skipped_older: u64,
    scanned: u64,
    checksum: String,
}

fn rfc3339(m: i64) -> String {
    chrono::DateTime::from_timestamp_micros(m)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn s3_target(spec: &IncrementalExtractSpec) -> Result<&S3PrefixRef, UnitFailure> {
    match spec.target.as_ref().and_then(|t| t.store.as_ref()) {
        Some(Store::S3Prefix(p)) => Ok(p),
        _ => Err(UnitFailure::terminal("the target must be an s3_prefix")),
    }
}

fn manifest_key(target: &S3PrefixRef, run_id: &str) -> String {
    format!("{}_manifests/{run_id}.json", target.prefix)
}

/// Writes the manifest of the run `run_id` over the window `(start, end)`
/// from its units' final checkpoints. Writing it again writes the same.
async fn write_manifest(
    ctx: &Context,
    target: &S3PrefixRef,
    run_id: &str,
    job_name: &str,
    (start, end): (i64, i64),
) -> Result<(), String> {
    let units = ctx
        .jobs
        .list_units(run_id, &[], &[])
        .await
        .map_err(|e| e.message().to_owned())?;
    let mut total = SegmentState::default();
    for unit in &units {
        let s: SegmentState = serde_json::from_slice(&unit.checkpoint).unwrap_or_default();
        total.extracted += s.extracted;
        total.skipped_older += s.skipped_older;
        total.scanned += s.scanned;
        for (c, x) in total.checksum.iter_mut().zip(s.checksum) {
            *c ^= x;
        }
    }
    let manifest = Manifest {
        run_id,
        job_name,
        window_start: (start != i64::MIN).then(|| rfc3339(start)),
        window_end: rfc3339(end),
        count: total.extracted,
        skipped_older: total.skipped_older,
        scanned: total.scanned,
        checksum: hex::encode(total.checksum),
    };
    let client = ctx
        .stores
        .s3_client(&target.endpoint, &target.region)
        .await
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    client
        .put_object()
        .bucket(&target.bucket)
        .key(manifest_key(target, run_id))
        .content_type("application/json")
        .body(body.into())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes the manifest of the run this run's window starts after, if that
/// run's worker died between the run's end and its manifest. Best effort:
/// a failure is logged and the next run tries again.
async fn write_missing_manifest(ctx: &Context, claim: &Claim, spec: &IncrementalExtractSpec) {
    let previous = &claim.run.window_start_run_id;
    if previous.is_empty() {
        return;
    }
    let Ok(target) = s3_target(spec) else {
        return;
    };
    if let Err(e) = write_manifest_if_missing(ctx, target, previous).await {
        tracing::warn!(run_id = %previous, error = %e, "could not check the previous run's manifest");
    }
}

async fn write_manifest_if_missing(
    ctx: &Context,
    target: &S3PrefixRef,
    run_id: &str,
) -> Result<(), String> {
    let client = ctx
        .stores
        .s3_client(&target.endpoint, &target.region)
        .await
        .map_err(|e| e.to_string())?;
    match client
        .head_object()
        .bucket(&target.bucket)
        .key(manifest_key(target, run_id))
        .send()
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => {}
        Err(e) => return Err(e.to_string()),
    }
    let run: Run = ctx
        .jobs
        .get_run(run_id)
        .await
        .map_err(|e| e.message().to_owned())?;
    if run.status != RunStatus::Succeeded as i32 {
        return Ok(());
    }
    let start = micros(run.window_start.as_ref()).unwrap_or(i64::MIN);
    let end = micros(run.last_processed.as_ref().and_then(|w| w.time.as_ref())).unwrap_or(i64::MAX);
    tracing::info!(
        run_id,
        "writing the manifest the run's worker left unwritten"
    );
    write_manifest(ctx, target, run_id, &run.job_name, (start, end)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extreme_settle_lag_saturates_so_the_rpc_can_refuse_it() {
        // i64::MAX seconds plus the nanos overflowed before the RPC's range
        // check (a panic in CreateIncrementalExtract, found by the e2e RPC
        // fuzzer).
        let spec = |seconds, nanos| IncrementalExtractSpec {
            settle_lag: Some(prost_types::Duration { seconds, nanos }),
            ..IncrementalExtractSpec::default()
        };
        assert_eq!(settle_lag_micros(&spec(i64::MAX, 999_999_999)), i64::MAX);
        assert_eq!(settle_lag_micros(&spec(i64::MIN, -999_999_999)), i64::MIN);
        let edge = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 999_999_999,
        };
        assert_eq!(micros(Some(&edge)), Some(i64::MAX));
    }
}
