//! MigrateUnit (DESIGN.md problem 3, invariant 6): every item of one unit
//! (a course, a tenant) copied to the target as one transaction. The unit's
//! state lives in the job-tracker; a worker first removes any partial copy a
//! failed or killed attempt left, copies, checks the target's count against
//! the source's, switches the unit's route to TARGET and completes the unit.
//! Any failure removes the partial copy before the unit is failed, so a unit
//! is either complete in the target or absent from it. MIGRATED units are
//! never handed out again (the job-tracker registers them MIGRATED in later
//! runs unless `force_remigrate`).

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ConnectorError, Item, Key, KeySchema, Number, Predicate, RecordOutcome, ScanRequest,
    SinkOp, SinkRecord,
};
use tidemark_kit::worker::{Claim, LeaseError, Progress, unpack_any};
use tidemark_proto::job_tracker::v1::{RouteTarget, SetRouteRequest};
use tidemark_proto::replicator::v1::{MigrateUnitSpec, UnitKeyType};

use crate::context::{Context, UnitFailure};
use crate::schema::target_schema;
use crate::stores::SinkHandle;

pub const SPEC_TYPE: &str = <MigrateUnitSpec as tidemark_kit::jobs::JobSpec>::TYPE;
/// Parallel scan segments used to find one unit's items without an index.
const SCAN_SEGMENTS: u32 = 4;
const BATCH: usize = 100;

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
    // A previous attempt may have died halfway: start from a clean target.
    let items = match unit.read_source(&source).await {
        Ok(items) => items,
        Err(e) => return Err(e.into()),
    };
    let keys: BTreeSet<Key> = items
        .iter()
        .map(|(k, _)| unit.transform.shape_key(k))
        .collect();
    let leftovers = unit.remove_copy(&keys).await?;
    if leftovers > 0 {
        tracing::info!(unit = %unit_key, removed = leftovers, "removed the partial copy of an earlier attempt");
    }
    let outcome = unit.copy(&items, &mut progress, &lease).await;
    let failure = match outcome {
        Ok(()) => unit.validate(&keys, &mut progress).await.err(),
        Err(e) => Some(e),
    };
    if let Some((message, retryable)) = failure {
        if lease.lost().is_cancelled() {
            // Another worker owns the unit now and will clean up itself.
            return Err(UnitFailure::LeaseLost);
        }
        let rolled_back = match unit.remove_copy(&keys).await {
            Ok(removed) => {
                progress.add(
                    "rolled_back_items",
                    i64::try_from(removed).unwrap_or(i64::MAX),
                );
                true
            }
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
    // The unit is committed first and its readers switched after: were the
    // route switched first, a refused CompleteUnit would send the unit back
    // to the queue, and its retry would delete the copy readers already use.
    match lease.complete(&progress, None).await {
        Ok(_) => {}
        Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
        Err(LeaseError::Rpc(s)) => return Err(UnitFailure::retryable(s.message())),
    }
    let switched = ctx
        .jobs
        .set_route(SetRouteRequest {
            job_name: claim.job.name.clone(),
            unit_key: unit_key.clone(),
            target: RouteTarget::Target as i32,
            actor: ctx.config.worker_id.clone(),
            reason: format!("unit migrated in run {}", claim.run.run_id),
            expected_revision: 0,
        })
        .await;
    if let Err(e) = switched {
        // MIGRATED with readers still on the source: both copies are
        // complete, so nothing is lost; the operator switches the route.
        tracing::error!(job = %claim.job.name, unit = %unit_key, error = %e, "unit migrated but its route was not switched; set it with SetRoute");
    }
    Ok(())
}

impl Unit<'_> {
    /// Every item of the unit, with its key (as the source names it).
    async fn read_source(
        &self,
        source: &crate::stores::OpenTable,
    ) -> Result<Vec<(Key, Item)>, ConnectorError> {
        let (table, schema) = (&source.table, &source.schema);
        let value = unit_value(self.spec, self.unit_key)
            .map_err(|e| ConnectorError::invalid("migration", e))?;
        if !self.spec.index_name.is_empty() {
            let dynamo = source.dynamo.as_ref().ok_or_else(|| {
                ConnectorError::invalid("migration", "index_name needs a DynamoDB source")
            })?;
            let keys = dynamo
                .query_index_keys(&self.spec.index_name, &self.spec.unit_attribute, &value)
                .await?;
            // The index is eventually consistent and may not project every
            // attribute: read each item itself, strongly consistent.
            let read: Vec<Result<Option<Item>, ConnectorError>> = futures::stream::iter(keys)
                .map(|k| {
                    let table = Arc::clone(table);
                    async move { table.get(&k).await }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let now = chrono::Utc::now().timestamp_micros();
            let mut items = Vec::new();
            for item in read {
                // Gone since the index answered, or moved to another unit.
                if let Some(item) = item?
                    && item.get(&self.spec.unit_attribute) == Some(&value)
                    && self.transform.passes(&item, now)
                {
                    let key = schema
                        .key_of(&item)
                        .map_err(|e| ConnectorError::invalid("migration", e))?;
                    items.push((key, item));
                }
            }
            return Ok(items);
        }
        let filter = Predicate::Equals(self.spec.unit_attribute.clone(), value);
        let pages = futures::future::try_join_all((0..SCAN_SEGMENTS).map(|segment| {
            let filter = filter.clone();
            async move {
                let mut items = Vec::new();
                let mut start_after = None;
                loop {
                    let page = table
                        .scan(&ScanRequest {
                            segment,
                            total_segments: SCAN_SEGMENTS,
                            start_after,
                            limit: 1000,
                            filter: Some(filter.clone()),
                            consistent: true,
                        })
                        .await?;
                    items.extend(page.items);
                    match page.last_key {
                        Some(k) => start_after = Some(k),
                        None => return Ok::<_, ConnectorError>(items),
                    }
                }
            }
        }))
        .await?;
        let now = chrono::Utc::now().timestamp_micros();
        pages
            .into_iter()
            .flatten()
            .filter(|item| self.transform.passes(item, now))
            .map(|item| {
                schema
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

    async fn copy(
        &self,
        items: &[(Key, Item)],
        progress: &mut Progress,
        lease: &tidemark_kit::worker::UnitLease,
    ) -> Result<(), (String, bool)> {
        let read_micros = micros_now();
        let sink = self.target.sink();
        let schema_free = |e: ConnectorError| {
            let retryable = matches!(e, ConnectorError::Retryable { .. });
            (e.to_string(), retryable)
        };
        let fault_after = (self.ctx.config.inject_unit_fault.as_deref() == Some(self.unit_key))
            .then_some(items.len() / 2);
        for (n, chunk) in items.chunks(BATCH).enumerate() {
            if lease.lost().is_cancelled() {
                return Err(("lease lost".to_owned(), true));
            }
            let batch: Vec<SinkRecord> = chunk
                .iter()
                .map(|(key, item)| {
                    let shaped = self.transform.shape(item, &KeySchema::new("", None));
                    SinkRecord {
                        key: self.transform.shape_key(key),
                        version: self.version(item, read_micros),
                        op: SinkOp::Upsert(shaped),
                    }
                })
                .collect();
            let outcomes = sink.apply(&batch).await.map_err(schema_free)?;
            for (record, outcome) in batch.iter().zip(outcomes) {
                if let RecordOutcome::Rejected(reason) = outcome {
                    return Err((
                        format!("the target refused item {}: {reason}", record.key),
                        false,
                    ));
                }
            }
            progress.items_processed += i64::try_from(batch.len()).unwrap_or(i64::MAX);
            progress
                .counters
                .insert("copied".to_owned(), progress.items_processed);
            if fault_after.is_some_and(|after| (n + 1) * BATCH > after) {
                return Err((
                    format!(
                        "injected fault after {} of {} items (inject_unit_fault)",
                        progress.items_processed,
                        items.len()
                    ),
                    false,
                ));
            }
        }
        Ok(())
    }

    /// Compares the target's count of the unit with the source's.
    async fn validate(
        &self,
        keys: &BTreeSet<Key>,
        progress: &mut Progress,
    ) -> Result<(), (String, bool)> {
        let source_count = u64::try_from(keys.len()).unwrap_or(u64::MAX);
        let target_count = self
            .target_count(keys)
            .await
            .map_err(|e| (e.to_string(), true))?;
        progress.add(
            "source_count",
            i64::try_from(source_count).unwrap_or(i64::MAX),
        );
        progress.add(
            "target_count",
            i64::try_from(target_count).unwrap_or(i64::MAX),
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

    async fn target_count(&self, keys: &BTreeSet<Key>) -> Result<u64, ConnectorError> {
        if let SinkHandle::S3(s3) = &self.target {
            return s3.count().await;
        }
        let sink = self.target.sink();
        let found: Vec<bool> = futures::stream::iter(keys.iter().cloned().collect::<Vec<_>>())
            .map(|k| {
                let sink = Arc::clone(&sink);
                async move { sink.read(&k).await.map(|r| r.is_some()) }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(u64::try_from(found.into_iter().filter(|f| *f).count()).unwrap_or(u64::MAX))
    }

    /// Removes the unit's copy from the target: the whole unit prefix for S3,
    /// the unit's keys purged (tombstones included) elsewhere. Returns how
    /// many objects or items were removed.
    async fn remove_copy(&self, keys: &BTreeSet<Key>) -> Result<u64, UnitFailure> {
        if let SinkHandle::S3(s3) = &self.target {
            return s3.delete_prefix().await.map_err(UnitFailure::from);
        }
        // Purged, not deleted: a tombstone at any version could outrank the
        // items' own versions (with `version_attribute`) and refuse every
        // later attempt's copy as stale (#19.10).
        let sink = self.target.sink();
        let keys: Vec<Key> = keys.iter().cloned().collect();
        let mut removed = 0;
        for chunk in keys.chunks(BATCH) {
            removed += sink.purge(chunk).await?;
        }
        Ok(removed)
    }
}
