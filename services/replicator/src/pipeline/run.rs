//! Pipelines at work (DESIGN.md problems 1 and 2, invariants 1, 3, 4): a
//! pipeline is a REPLICATION job whose run has one `feed` unit (the change
//! feed, held by one replica at a time through its lease) and, while
//! backfilling, `segment-<i>` units (parallel scan segments).
//!
//! Versions (invariant 3): with a source version attribute, its value; else
//! the feed's derived version, and backfill reads carry version 0, below
//! every feed record of the same key. Sinks write conditionally on version
//! and keep tombstones, so a scan row read before a delete can never bring
//! the item back, and a replayed feed never moves a target backwards. A
//! backfilling pipeline reads its feed from the trim horizon, so no change
//! made while the scan runs is missed, whenever the feed unit is claimed.
//!
//! Nothing is acknowledged to the feed (checkpointed) before every sink
//! wrote or dead-lettered the record (invariant 1).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_connectors::{AttrValue, Image, Item, Key, Predicate, ScanRequest};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease};
use tidemark_proto::replicator::v1::{BackfillMode, Pipeline, PipelineState};

use super::feed::{
    FeedState, Polled, acknowledge, changes_of, flush, learn_peers, open_feed, report_progress,
    transactional_sink,
};
use super::open::{Change, Filtered, Opened, SINK_BATCH, SINK_CONCURRENCY, open};
use super::spec::{
    DEFAULT_TOUCH_ATTRIBUTE, FEED_UNIT, backfill_mode, chunk_size, decode, feed_units,
    is_feed_unit, segments,
};
use super::watermark;
use crate::context::{Context, UnitFailure, segment_of};
use crate::metrics::LagSeries;

/// How often a feed unit sharing its feed reads the others' progress.
const PEERS_EVERY: Duration = Duration::from_secs(2);
/// How often the feed unit publishes its lag (as unit counters).
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Re-reads the pipeline when the job changed (pause, resume).
async fn refresh(ctx: &Context, name: &str) -> Result<(Pipeline, u64), UnitFailure> {
    let job = ctx
        .jobs
        .get_job(name)
        .await
        .map_err(|e| UnitFailure::retryable(e.message()))?;
    let pipeline = decode(&job).map_err(UnitFailure::terminal)?;
    Ok((pipeline, job.revision))
}

fn paused(p: &Pipeline) -> bool {
    p.state == PipelineState::Paused as i32 || p.state == PipelineState::Failed as i32
}

/// Waits while the pipeline is paused, holding the unit's lease; returns
/// the pipeline once resumed.
async fn wait_while_paused(
    ctx: &Context,
    lease: &UnitLease,
    job: &str,
    mut pipeline: Pipeline,
    revision: &mut u64,
) -> Result<Pipeline, UnitFailure> {
    while paused(&pipeline) {
        tokio::select! {
            () = lease.lost().cancelled() => return Err(UnitFailure::LeaseLost),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if lease.job_revision() > *revision {
            let (p, r) = refresh(ctx, job).await?;
            pipeline = p;
            *revision = r;
        }
    }
    Ok(pipeline)
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let pipeline = decode(&claim.job).map_err(UnitFailure::terminal)?;
    if is_feed_unit(&claim.unit.unit_key) {
        // A follower runs as long as the pipeline: it does not hold one of
        // the worker's places, or the pipeline's own backfill segments
        // (and every other job's units) could wait for ever behind it.
        claim.slot.release();
        Box::pin(follow(ctx, claim, pipeline)).await
    } else {
        Box::pin(backfill_segment(ctx, claim, pipeline)).await
    }
}

async fn follow(ctx: Context, claim: Claim, mut pipeline: Pipeline) -> Result<(), UnitFailure> {
    let job = claim.job.name.clone();
    let lease = claim.lease.clone();
    let mut revision = claim.job.revision;
    let mut state: FeedState = if claim.unit.checkpoint.is_empty() {
        FeedState::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable feed checkpoint: {e}")))?
    };
    let mut opened = open(&ctx, &pipeline).await?;
    // Kafka into Kafka: writes and offsets in one transaction.
    let transactional = transactional_sink(&ctx, &pipeline, &claim.unit.unit_key, &opened).await?;
    if let Some(sink) = &transactional {
        opened.sinks[0].sink = sink.clone();
    }
    // Old tombstones are purged while this unit runs (stops on drop).
    let _purge = super::purge::start(&ctx, &claim.unit.unit_key, &pipeline, &opened).await;
    let dead = ctx.dead_letters.clone();
    let mut feed = open_feed(
        &ctx,
        &pipeline,
        &claim.unit.unit_key,
        &state.feed,
        transactional,
        &opened,
    )
    .await?;
    let peers: Vec<String> = feed_units(&pipeline)
        .into_iter()
        .filter(|u| u != &claim.unit.unit_key)
        .collect();
    let mut peers_read = Instant::now() - PEERS_EVERY;
    let mut backfill = watermark_backfill(&claim, &pipeline, &opened, &mut state)?;
    let mut last_report = Instant::now() - REPORT_EVERY;
    let mut dirty = true;
    let mut was_caught_up = false;
    // Polled, not yet written: written while the next poll is read, so the
    // source's read time hides behind the sink's write time. One batch is
    // written at a time, and acknowledged only once every sink has it.
    let mut pending = Polled::default();
    let mut lag_series = LagSeries::new(&opened.metrics, &pipeline.name);
    loop {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        if lease.job_revision() > revision {
            let (p, r) = refresh(&ctx, &job).await?;
            pipeline = p;
            revision = r;
        }
        if paused(&pipeline) {
            flush(
                &opened,
                &dead,
                &pipeline.name,
                feed.as_mut(),
                &mut state,
                &mut pending,
            )
            .await?;
            pipeline = wait_while_paused(&ctx, &lease, &job, pipeline, &mut revision).await?;
        }
        if let (Some(b), Some(p)) = (backfill.as_mut(), state.watermark.as_ref()) {
            b.select(&opened, p).await?;
        }
        if !peers.is_empty() && peers_read.elapsed() >= PEERS_EVERY {
            peers_read = Instant::now();
            learn_peers(&ctx, &claim.unit.run_id, &peers, feed.as_mut()).await;
        }
        let changes = changes_of(&opened, &mut pending.records);
        let (polled, written) = tokio::join!(
            feed.poll(SINK_BATCH * SINK_CONCURRENCY),
            opened.write(changes, &dead, &pipeline.name, Filtered::Delete),
        );
        // A failed poll leaves the written batch unacknowledged: it is
        // delivered again, and the sinks' version checks make that a no-op.
        let records = polled?;
        let polled =
            Polled::take(records, feed.as_mut(), &dead, &pipeline.name, &mut state).await?;
        if !pending.is_empty() {
            acknowledge(feed.as_mut(), &mut state, written?, &pending).await?;
            dirty = true;
        }
        pending = polled;
        let caught_up = pending.is_empty();
        if let Some(b) = backfill.as_mut() {
            b.observe(&pending.records);
        }
        // A chunk goes out once the feed records polled with its high
        // watermark are written.
        if let Some(b) = backfill.as_mut()
            && b.ready()
        {
            flush(
                &opened,
                &dead,
                &pipeline.name,
                feed.as_mut(),
                &mut state,
                &mut pending,
            )
            .await?;
            let p = state
                .watermark
                .as_mut()
                .expect("a watermark backfill keeps its progress");
            b.emit(&opened, &dead, &pipeline.name, p).await?;
            // A transactional sink's chunk commits now, not with the next
            // feed records (which may be long in coming).
            feed.commit_all(&[]).await?;
            if p.done {
                backfill = None;
            }
            dirty = true;
        }
        // Report on catching up (Drain waits for it), then every
        // REPORT_EVERY, busy or idle (Drain wants fresh observations).
        let report = (caught_up && !was_caught_up) || last_report.elapsed() >= REPORT_EVERY;
        was_caught_up = caught_up;
        if report {
            lag_series.update(&feed.lag());
        }
        if dirty && report {
            report_progress(&lease, feed.as_mut(), &mut state, caught_up).await?;
            last_report = Instant::now();
            // Keep reporting while idle so Drain sees fresh observations.
            dirty = caught_up;
        }
        if caught_up {
            tokio::select! {
                () = lease.lost().cancelled() => return Err(UnitFailure::LeaseLost),
                () = tokio::time::sleep(feed.idle_wait()) => {}
            }
        }
    }
}

/// The DBLog backfill the `feed` unit drives, unless the pipeline backfills
/// otherwise or it is done; its progress starts in `state`.
fn watermark_backfill(
    claim: &Claim,
    pipeline: &Pipeline,
    opened: &Opened,
    state: &mut FeedState,
) -> Result<Option<watermark::Backfill>, UnitFailure> {
    if backfill_mode(pipeline) != BackfillMode::Watermark
        || claim.unit.unit_key != FEED_UNIT
        || state.watermark.as_ref().is_some_and(|p| p.done)
    {
        return Ok(None);
    }
    let key = watermark::watermark_key(opened, &pipeline.name).map_err(UnitFailure::terminal)?;
    state
        .watermark
        .get_or_insert_with(|| watermark::Progress::new(segments(pipeline)));
    Ok(Some(watermark::Backfill::new(key, chunk_size(pipeline))))
}

#[derive(Default, Serialize, Deserialize)]
struct SegmentState {
    start_after: Option<Key>,
    copied: u64,
    scanned: u64,
}

async fn backfill_segment(
    ctx: Context,
    claim: Claim,
    pipeline: Pipeline,
) -> Result<(), UnitFailure> {
    let total = segments(&pipeline);
    let segment = segment_of(&claim.unit.unit_key, total).map_err(UnitFailure::terminal)?;
    let lease = claim.lease.clone();
    let job = claim.job.name.clone();
    let mut revision = claim.job.revision;
    let mut pipeline = pipeline;
    let opened = open(&ctx, &pipeline).await?;
    let dead = ctx.dead_letters.clone();
    let mode = backfill_mode(&pipeline);
    let touch_attribute = pipeline
        .spec
        .as_ref()
        .and_then(|s| s.backfill.as_ref())
        .map(|b| b.touch_attribute.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| DEFAULT_TOUCH_ATTRIBUTE.to_owned());
    let chunk = chunk_size(&pipeline);
    let mut state: SegmentState = if claim.unit.checkpoint.is_empty() {
        SegmentState::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable segment checkpoint: {e}")))?
    };
    loop {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        if lease.job_revision() > revision {
            let (p, r) = refresh(&ctx, &job).await?;
            pipeline = p;
            revision = r;
        }
        if paused(&pipeline) {
            pipeline = wait_while_paused(&ctx, &lease, &job, pipeline, &mut revision).await?;
        }
        let page = opened
            .source
            .table
            .scan(&ScanRequest {
                segment,
                total_segments: total,
                start_after: state.start_after.clone(),
                limit: chunk,
                filter: None,
                consistent: true,
            })
            .await?;
        state.scanned += page.scanned;
        let rows: Vec<(Key, Item)> = page
            .items
            .into_iter()
            .filter_map(|item| opened.source.schema.key_of(&item).ok().map(|k| (k, item)))
            .filter(|(k, _)| !opened.reserved(k))
            .collect();
        let copied = u64::try_from(rows.len()).unwrap_or(u64::MAX);
        match mode {
            BackfillMode::Touch => {
                // The feed carries every touched item to the sinks.
                touch(&opened, &touch_attribute, &rows).await?;
            }
            _ => {
                // Another pipeline's tombstones are not items to copy.
                let changes: Vec<Change> = rows
                    .into_iter()
                    .filter_map(|(k, item)| {
                        let version = opened.version_of(&item, 0);
                        Some((
                            k,
                            Some(Image::Item(opened.application_image(Some(item))?)),
                            version,
                            format!("backfill/{segment}"),
                        ))
                    })
                    .collect();
                opened
                    .write(changes, &dead, &pipeline.name, Filtered::Skip)
                    .await?;
            }
        }
        state.copied += copied;
        state.start_after.clone_from(&page.last_key);
        let mut p = Progress {
            items_processed: i64::try_from(state.copied).unwrap_or(i64::MAX),
            ..Progress::default()
        };
        p.add("scanned", i64::try_from(state.scanned).unwrap_or(i64::MAX));
        if page.last_key.is_none() {
            lease.complete(&p, None).await?;
            return Ok(());
        }
        let bytes = serde_json::to_vec(&state).expect("segment state serialises");
        match lease.checkpoint(bytes, &p).await {
            Ok(()) => {}
            Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
            Err(LeaseError::Rpc(s)) => tracing::warn!(error = %s, "segment checkpoint failed"),
        }
    }
}

/// Sets the touch attribute on every row that still exists, so the feed
/// carries it to the sinks.
async fn touch(opened: &Opened, attribute: &str, rows: &[(Key, Item)]) -> Result<(), UnitFailure> {
    for (key, _) in rows {
        let set: Item = [(
            attribute.to_owned(),
            AttrValue::n(u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0)),
        )]
        .into_iter()
        .collect();
        match opened
            .source
            .table
            .update(key, &set, Some(&Predicate::ItemExists))
            .await
        {
            Ok(_) | Err(tidemark_connectors::ConnectorError::Precondition(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
