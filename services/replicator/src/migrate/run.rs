//! MigrateUnit (DESIGN.md problem 3, invariant 6): every item of one unit
//! (a course, a tenant) copied to the target as one transaction. The unit's
//! state lives in the job-tracker. A worker streams the unit from the source
//! a page at a time (never the whole unit in memory, only its keys): each
//! page's earlier partial copy (a failed or killed attempt's) is removed,
//! the page written and read back; then the target's count is checked
//! against the source's, the unit completed and its route switched to
//! TARGET. Any failure removes the partial copy before the unit is failed,
//! so a unit is either complete in the target or absent from it. Every
//! removal first proves the lease is still held (`UnitLease::hold`): a
//! worker whose unit was taken over never removes the new holder's copy.
//! MIGRATED units are never handed out again (the job-tracker registers
//! them MIGRATED in later runs unless `force_remigrate`).

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ConnectorError, Item, Key, KeySchema, Number, Predicate, RecordOutcome, ScanRequest,
    SinkOp, SinkRecord,
};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease, unpack_any};
use tidemark_proto::job_tracker::v1::{RouteTarget, SetRouteRequest};
use tidemark_proto::replicator::v1::{MigrateUnitSpec, UnitKeyType};

use crate::context::{Context, UnitFailure};
use crate::schema::target_schema;
use crate::stores::SinkHandle;

pub const SPEC_TYPE: &str = <MigrateUnitSpec as tidemark_kit::jobs::JobSpec>::TYPE;
/// Parallel scan segments used to find one unit's items without an index.
const SCAN_SEGMENTS: u32 = 4;
/// Items written (and their earlier copies purged) per sink call.
const BATCH: usize = 100;
/// Attempts at removing a failed unit's partial copy (backing off from
/// 200 ms: about 6 s in all) before the unit is failed with it in place.
const ROLLBACK_ATTEMPTS: u32 = 6;
/// Items read per source page; the unit is never held whole.
const PAGE: u32 = 1000;

/// The unit attribute's value for a unit key.
///
/// # Errors
/// A NUMBER unit key that is not a number.
pub fn unit_value(spec: &MigrateUnitSpec, unit_key: &str) -> Result<AttrValue, String> {
    match UnitKeyType::try_from(spec.unit_key_type).unwrap_or(UnitKeyType::Unspecified) {
        UnitKeyType::Number => Number::parse(unit_key)
            .map(AttrValue::N)
            .map_err(|e| format!("unit key {unit_key:?} is not a number: {e}")),
        _ => Ok(AttrValue::s(unit_key)),
    }
}

fn micros_now() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1)
}

struct Unit<'a> {
    ctx: &'a Context,
    spec: &'a MigrateUnitSpec,
    unit_key: &'a str,
    transform: Transform,
    target: SinkHandle,
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let spec: MigrateUnitSpec =
        unpack_any(claim.job.spec.as_ref(), SPEC_TYPE).map_err(UnitFailure::terminal)?;
    let unit_key = claim.unit.unit_key.clone();
    let transform = Transform::from_proto(&spec.transform.clone().unwrap_or_default())
        .map_err(|e| UnitFailure::terminal(format!("spec.transform.{e}")))?;
    let source = ctx
        .stores
        .table(spec.source.as_ref().unwrap_or(&Default::default()))
        .await?;
    let schema = target_schema(&source.schema, &transform);
    let target = ctx
        .stores
        .sink(
            spec.target.as_ref().unwrap_or(&Default::default()),
            &schema,
            &format!("{unit_key}/"),
            &transform,
        )
        .await?;
    let unit = Unit {
        ctx: &ctx,
        spec: &spec,
        unit_key: &unit_key,
        transform,
        target,
    };
    let lease = claim.lease.clone();
    let mut progress = Progress::default();
    unit.readers_off_the_copy(&claim, &lease).await?;
    // Out of attempts (the job-tracker leases such a unit once more): remove
    // what earlier attempts left in the target and fail it rolled back.
    let max_attempts = claim.max_attempts();
    if claim.unit.attempts > max_attempts {
        return unit
            .clean_up(&source, &lease, max_attempts, &claim.unit.last_error)
            .await;
    }
    let mut copied = BTreeSet::new();
    let failure = match unit.copy(&source, &lease, &mut progress, &mut copied).await {
        Ok(source_count) => unit.validate(source_count, &mut progress).await.err(),
        Err(e) => Some(e),
    };
    if let Some((message, retryable)) = failure {
        if lease.lost().is_cancelled() {
            // Another worker owns the unit now and will clean up itself.
            return Err(UnitFailure::LeaseLost);
        }
        let rolled_back = match unit.roll_back(&copied, &lease).await {
            Ok(removed) => {
                progress.add(
                    "rolled_back_items",
                    i64::try_from(removed).unwrap_or(i64::MAX),
                );
                true
            }
            Err(UnitFailure::LeaseLost) => return Err(UnitFailure::LeaseLost),
            Err(e) => {
                tracing::error!(unit = %unit_key, error = %e, "could not remove the partial copy; the next attempt removes it");
                false
            }
        };
        return Err(UnitFailure::Failed {
            message,
            retryable,
            rolled_back,
            progress,
        });
    }
    // The unit is committed and its readers switched in one write: were the
    // route switched first, a refused CompleteUnit would send the unit back
    // to the queue, and its retry would delete the copy readers already use;
    // were it switched after, a worker killed in between would leave the
    // unit MIGRATED with its readers on the source.
    lease.complete_and_route(&progress).await?;
    Ok(())
}

impl Unit<'_> {
    /// The unit's items, a page at a time (as the source names their keys):
    /// never the whole unit in memory.
    fn source_pages<'s>(
        &'s self,
        source: &'s crate::stores::OpenTable,
    ) -> BoxStream<'s, Result<Vec<(Key, Item)>, ConnectorError>> {
        let value = match unit_value(self.spec, self.unit_key) {
            Ok(v) => v,
            Err(e) => {
                let e = ConnectorError::invalid("migration", e);
                return futures::stream::once(async { Err(e) }).boxed();
            }
        };
        if self.spec.index_name.is_empty() {
            self.scanned_pages(source, value).boxed()
        } else {
            self.indexed_pages(source, value).boxed()
        }
    }

    /// Without an index: parallel scan segments filtered on the unit
    /// attribute, their pages interleaved as they come.
    fn scanned_pages<'s>(
        &'s self,
        source: &'s crate::stores::OpenTable,
        value: AttrValue,
    ) -> impl futures::Stream<Item = Result<Vec<(Key, Item)>, ConnectorError>> + 's {
        let filter = Predicate::Equals(self.spec.unit_attribute.clone(), value);
        let segments = (0..SCAN_SEGMENTS).map(move |segment| {
            let filter = filter.clone();
            futures::stream::try_unfold(Some(None), move |next| {
                let filter = filter.clone();
                async move {
                    let Some(start_after) = next else {
                        return Ok(None);
                    };
                    let page = source
                        .table
                        .scan(&ScanRequest {
                            segment,
                            total_segments: SCAN_SEGMENTS,
                            start_after,
                            limit: PAGE,
                            filter: Some(filter),
                            consistent: true,
                        })
                        .await?;
                    let items = self.keyed(source, page.items)?;
                    Ok(Some((items, page.last_key.map(Some))))
                }
            })
            .boxed()
        });
        futures::stream::select_all(segments)
    }

    /// With an index: its keys (only keys), then each item read itself,
    /// strongly consistent, a page at a time (the index is eventually
    /// consistent and may not project every attribute).
    fn indexed_pages<'s>(
        &'s self,
        source: &'s crate::stores::OpenTable,
        value: AttrValue,
    ) -> impl futures::Stream<Item = Result<Vec<(Key, Item)>, ConnectorError>> + 's {
        let keys = async move {
            let dynamo = source.dynamo.as_ref().ok_or_else(|| {
                ConnectorError::invalid("migration", "index_name needs a DynamoDB source")
            })?;
            let keys = dynamo
                .query_index_keys(&self.spec.index_name, &self.spec.unit_attribute, &value)
                .await?;
            let pages: Vec<Vec<Key>> = keys.chunks(BATCH).map(<[Key]>::to_vec).collect();
            Ok::<_, ConnectorError>((pages, value))
        };
        futures::stream::once(keys)
            .map_ok(move |(pages, value)| {
                futures::stream::iter(pages).then(move |keys| {
                    let value = value.clone();
                    async move {
                        let read: Vec<Option<Item>> = futures::stream::iter(keys)
                            .map(|k| {
                                let table = Arc::clone(&source.table);
                                async move { table.get(&k).await }
                            })
                            .buffer_unordered(16)
                            .try_collect()
                            .await?;
                        // Gone since the index answered, or moved to another unit.
                        let items = read
                            .into_iter()
                            .flatten()
                            .filter(|item| item.get(&self.spec.unit_attribute) == Some(&value))
                            .collect();
                        self.keyed(source, items)
                    }
                })
            })
            .try_flatten()
    }

    /// The items the transform passes, with their keys.
    fn keyed(
        &self,
        source: &crate::stores::OpenTable,
        items: Vec<Item>,
    ) -> Result<Vec<(Key, Item)>, ConnectorError> {
        let now = chrono::Utc::now().timestamp_micros();
        items
            .into_iter()
            .filter(|item| self.transform.passes(item, now))
            .map(|item| {
                source
                    .schema
                    .key_of(&item)
                    .map(|k| (k, item))
                    .map_err(|e| ConnectorError::invalid("migration", e))
            })
            .collect()
    }

    fn version(&self, item: &Item, read_micros: u64) -> u64 {
        if self.spec.version_attribute.is_empty() {
            return read_micros;
        }
        item.get(&self.spec.version_attribute)
            .and_then(AttrValue::as_number)
            .and_then(Number::as_u64)
            .unwrap_or(read_micros)
    }

    /// Copies the unit page by page, each page first cleared of what an
    /// earlier, failed or killed attempt left (for S3, the whole unit prefix
    /// before the first page), then written and read back. `copied` collects
    /// the target keys written (keys only, for a rollback). Returns the
    /// source's count of the unit.
    async fn copy(
        &self,
        source: &crate::stores::OpenTable,
        lease: &UnitLease,
        progress: &mut Progress,
        copied: &mut BTreeSet<Key>,
    ) -> Result<u64, (String, bool)> {
        let read_micros = micros_now();
        let failed = |e: ConnectorError| {
            let retryable = matches!(e, ConnectorError::Retryable { .. });
            (e.to_string(), retryable)
        };
        let fenced = |e: LeaseError| (e.to_string(), !matches!(e, LeaseError::Lost(_)));
        if let SinkHandle::S3(s3) = &self.target {
            lease.hold().await.map_err(fenced)?;
            let removed = s3.delete_prefix().await.map_err(failed)?;
            if removed > 0 {
                tracing::info!(unit = %self.unit_key, removed, "removed the partial copy of an earlier attempt");
            }
        }
        let inject_fault = self.ctx.config.inject_unit_fault.as_deref() == Some(self.unit_key);
        let mut pages = self.source_pages(source);
        let mut source_count = 0u64;
        let mut target_count = 0u64;
        while let Some(page) = pages.next().await {
            let page = page.map_err(failed)?;
            for chunk in page.chunks(BATCH) {
                if lease.lost().is_cancelled() {
                    return Err(("lease lost".to_owned(), true));
                }
                let batch: Vec<SinkRecord> = chunk
                    .iter()
                    .map(|(key, item)| SinkRecord {
                        key: self.transform.shape_key(key),
                        version: self.version(item, read_micros),
                        op: SinkOp::Upsert(self.transform.shape(item, &KeySchema::new("", None))),
                    })
                    .collect();
                let keys: Vec<Key> = batch.iter().map(|r| r.key.clone()).collect();
                copied.extend(keys.iter().cloned());
                let sink = self.target.sink();
                if !matches!(self.target, SinkHandle::S3(_)) {
                    lease.hold().await.map_err(fenced)?;
                    // Purged, not deleted: a tombstone at any version could
                    // outrank the items' own versions (with
                    // `version_attribute`) and refuse this copy as stale
                    // (#19.10).
                    sink.purge(&keys).await.map_err(failed)?;
                }
                let outcomes = sink.apply(&batch).await.map_err(failed)?;
                for (record, outcome) in batch.iter().zip(outcomes) {
                    if let RecordOutcome::Rejected(reason) = outcome {
                        return Err((
                            format!("the target refused item {}: {reason}", record.key),
                            false,
                        ));
                    }
                }
                source_count += u64::try_from(batch.len()).unwrap_or(u64::MAX);
                if !matches!(self.target, SinkHandle::S3(_)) {
                    target_count += self.found(&keys).await.map_err(failed)?;
                }
                progress.items_processed = i64::try_from(source_count).unwrap_or(i64::MAX);
                progress
                    .counters
                    .insert("copied".to_owned(), progress.items_processed);
                if inject_fault {
                    return Err((
                        format!("injected fault after {source_count} items (inject_unit_fault)"),
                        false,
                    ));
                }
            }
        }
        if let SinkHandle::S3(s3) = &self.target {
            target_count = s3.count().await.map_err(failed)?;
        }
        progress.add(
            "target_count",
            i64::try_from(target_count).unwrap_or(i64::MAX),
        );
        Ok(source_count)
    }

    /// Compares the target's count of the unit (read back as it was copied)
    /// with the source's.
    async fn validate(
        &self,
        source_count: u64,
        progress: &mut Progress,
    ) -> Result<(), (String, bool)> {
        let target_count = u64::try_from(progress.counter("target_count")).unwrap_or(0);
        progress.add(
            "source_count",
            i64::try_from(source_count).unwrap_or(i64::MAX),
        );
        if source_count == target_count {
            Ok(())
        } else {
            Err((
                format!("count mismatch after copy: source {source_count}, target {target_count}"),
                false,
            ))
        }
    }

    /// How many of `keys` the target holds.
    async fn found(&self, keys: &[Key]) -> Result<u64, ConnectorError> {
        let sink = self.target.sink();
        let found: Vec<bool> = futures::stream::iter(keys.iter().cloned())
            .map(|k| {
                let sink = Arc::clone(&sink);
                async move { sink.read(&k).await.map(|r| r.is_some()) }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        Ok(u64::try_from(found.into_iter().filter(|f| *f).count()).unwrap_or(u64::MAX))
    }

    /// A unit migrated before (a `force_remigrate` run) has its readers on
    /// the copy this attempt rebuilds: they go back to the source, which is
    /// complete, before any of the copy is removed, and come back to the
    /// target once the unit is committed again.
    async fn readers_off_the_copy(
        &self,
        claim: &Claim,
        lease: &UnitLease,
    ) -> Result<(), UnitFailure> {
        let jobs = &self.ctx.jobs;
        let route = jobs
            .get_route(&claim.job.name, self.unit_key)
            .await
            .map_err(|e| UnitFailure::retryable(e.to_string()))?;
        if route.target != RouteTarget::Target as i32 {
            return Ok(());
        }
        lease.hold().await?;
        jobs.set_route(SetRouteRequest {
            job_name: claim.job.name.clone(),
            unit_key: self.unit_key.to_owned(),
            target: RouteTarget::Source as i32,
            actor: self.ctx.config.worker_id.clone(),
            reason: format!(
                "unit migrated again in run {}: readers on the source while its copy is rebuilt",
                claim.run.run_id
            ),
            expected_revision: route.revision,
        })
        .await
        .map_err(|e| UnitFailure::retryable(e.to_string()))?;
        tracing::info!(job = %claim.job.name, unit = %self.unit_key, "readers sent back to the source while the unit is migrated again");
        Ok(())
    }

    /// A unit out of attempts, leased again to clean up: the copy earlier attempts
    /// may have left (the whole unit prefix for S3, else every key of the
    /// unit in the source) is removed and the unit failed, rolled back.
    async fn clean_up(
        &self,
        source: &crate::stores::OpenTable,
        lease: &UnitLease,
        max_attempts: u32,
        last_error: &str,
    ) -> Result<(), UnitFailure> {
        let mut keys = BTreeSet::new();
        if !matches!(self.target, SinkHandle::S3(_)) {
            let mut pages = self.source_pages(source);
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| UnitFailure::retryable(e.to_string()))?;
                keys.extend(page.iter().map(|(k, _)| self.transform.shape_key(k)));
            }
        }
        let removed = self.roll_back(&keys, lease).await?;
        tracing::warn!(unit = %self.unit_key, removed, "unit out of attempts: its partial copy was removed");
        let mut progress = Progress::default();
        progress.add(
            "rolled_back_items",
            i64::try_from(removed).unwrap_or(i64::MAX),
        );
        let why = if last_error.is_empty() {
            "each attempt's lease lapsed before its worker finished"
        } else {
            last_error
        };
        Err(UnitFailure::Failed {
            message: format!(
                "gave up after {max_attempts} attempts ({why}); its partial copy was removed"
            ),
            retryable: false,
            rolled_back: true,
            progress,
        })
    }

    /// [`Self::remove_copy`], tried again while its failures are transient
    /// (a store restarting, a connection reset) and the lease holds: a unit
    /// failed for good must not leave a partial copy behind.
    async fn roll_back(&self, keys: &BTreeSet<Key>, lease: &UnitLease) -> Result<u64, UnitFailure> {
        let mut delay = std::time::Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.remove_copy(keys, lease).await {
                Err(UnitFailure::Failed {
                    retryable: true,
                    message,
                    ..
                }) if attempt < ROLLBACK_ATTEMPTS => {
                    tracing::warn!(unit = %self.unit_key, attempt, error = %message, "removing the partial copy failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Removes the unit's copy from the target, once the lease is confirmed
    /// (a worker whose unit was taken over must not remove the new holder's
    /// copy): the whole unit prefix for S3, the copied keys purged
    /// (tombstones included) elsewhere. Returns how many objects or items
    /// were removed.
    async fn remove_copy(
        &self,
        keys: &BTreeSet<Key>,
        lease: &UnitLease,
    ) -> Result<u64, UnitFailure> {
        let hold = || async { lease.hold().await.map_err(UnitFailure::from) };
        hold().await?;
        if let SinkHandle::S3(s3) = &self.target {
            return s3.delete_prefix().await.map_err(UnitFailure::from);
        }
        let sink = self.target.sink();
        let keys: Vec<Key> = keys.iter().cloned().collect();
        let mut removed = 0;
        for chunk in keys.chunks(BATCH) {
            hold().await?;
            removed += sink.purge(chunk).await?;
        }
        Ok(removed)
    }
}
