//! Problem 3 under faults: per-unit migrations (courses) from DynamoDB to
//! S3, one run after another, each with one unit the replicators are set to
//! fail (`TIDEMARK_INJECT_UNIT_FAULT`). Every unit must end either MIGRATED
//! with the source's count under its prefix and its route on the target, or
//! FAILED / ROLLED_BACK with nothing under its prefix and its route
//! unchanged (a good unit may run out of attempts when kills keep cutting
//! them; it is counted); the faulty one always the latter.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable as _};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::plane::{ended_run, through_restarts};

/// The unit every replica fails on purpose.
pub const FAULTY: &str = "c-faulty";
const UNITS: usize = 6;
const PER_UNIT: usize = 150;

pub fn schema() -> KeySchema {
    KeySchema::new("id", None)
}

fn units() -> Vec<String> {
    (0..UNITS)
        .map(|u| format!("c{u}"))
        .chain(std::iter::once(FAULTY.to_owned()))
        .collect()
}

pub async fn seed(table: &DynamoTable) -> anyhow::Result<()> {
    let items: Vec<Item> = units()
        .into_iter()
        .flat_map(|unit| {
            (0..PER_UNIT).map(move |i| {
                [
                    ("id".to_owned(), AttrValue::s(format!("{unit}-{i:04}"))),
                    ("courseId".to_owned(), AttrValue::s(&unit)),
                    ("n".to_owned(), AttrValue::n(i64::try_from(i).unwrap_or(0))),
                ]
                .into_iter()
                .collect()
            })
        })
        .collect();
    futures::stream::iter(items.iter().map(|item| table.put(item, None)))
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("seed the units table")?;
    Ok(())
}

/// What the runs found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub runs: u32,
    pub units_migrated: u64,
    /// Good units that ran out of attempts, cleanly (nothing left, route
    /// unchanged).
    pub failed_cleanly: u64,
    /// A good unit not MIGRATED with every item, or not routed to the target.
    pub incomplete: u64,
    /// The faulty unit with objects left under its prefix, or routed to
    /// the (removed) copy.
    pub left_behind: u64,
}

pub struct Setup {
    pub replicator: String,
    pub jobs: String,
    pub table: String,
    pub bucket: String,
    pub s3: aws_sdk_s3::Client,
}

pub async fn runs(setup: Setup, seed: u64, stop: CancellationToken) -> anyhow::Result<Outcome> {
    let rep = ReplicatorServiceClient::new(
        Channel::from_shared(setup.replicator.clone())?.connect_lazy(),
    );
    let jobs =
        JobTrackerServiceClient::new(Channel::from_shared(setup.jobs.clone())?.connect_lazy());
    let mut outcome = Outcome::default();
    while !stop.is_cancelled() {
        let round = outcome.runs + 1;
        let job = format!("chaos-migrate-{seed}-{round}");
        let prefix = format!("{job}/");
        let request = pb::MigrateUnitRequest {
            job_name: job.clone(),
            spec: Some(pb::MigrateUnitSpec {
                source: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::DynamodbTable(
                        common_pb::DynamoDbTableRef {
                            table_name: setup.table.clone(),
                            ..Default::default()
                        },
                    )),
                }),
                unit_attribute: "courseId".to_owned(),
                target: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::S3Prefix(
                        common_pb::S3PrefixRef {
                            bucket: setup.bucket.clone(),
                            prefix: prefix.clone(),
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
            unit_keys: units(),
            concurrency: 3,
            actor: "chaos".to_owned(),
            correlation_id: format!("chaos-{seed}-{round}"),
            ..Default::default()
        };
        let started = through_restarts("MigrateUnit", Duration::from_secs(60), || {
            let mut c = rep.clone();
            let r = request.clone();
            async move { c.migrate_unit(r).await }
        })
        .await?;
        let deadline = std::time::Instant::now() + crate::RUN_DEADLINE;
        let what = format!("migration run {round}");
        let run = loop {
            if let Some(run) = ended_run(&jobs, &started.run_id, &what, deadline).await? {
                break run;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if run.status != jt::RunStatus::Failed as i32 {
            bail!(
                "migration run {round} ended {:?} ({}), not FAILED by its faulty unit",
                jt::RunStatus::try_from(run.status),
                run.status_reason
            );
        }
        let listed = through_restarts("ListUnits", Duration::from_secs(60), || {
            let mut c = jobs.clone();
            let r = jt::ListUnitsRequest {
                run_id: started.run_id.clone(),
                page_size: 100,
                ..Default::default()
            };
            async move { c.list_units(r).await }
        })
        .await?;
        for unit in &listed.units {
            let objects = S3Sink::new(
                setup.s3.clone(),
                &setup.bucket,
                &format!("{prefix}{}/", unit.unit_key),
            )
            .count()
            .await
            .context("count a unit's objects")?;
            let route = through_restarts("GetRoute", Duration::from_secs(60), || {
                let mut c = jobs.clone();
                let r = jt::GetRouteRequest {
                    job_name: job.clone(),
                    unit_key: unit.unit_key.clone(),
                };
                async move { c.get_route(r).await }
            })
            .await?
            .route
            .unwrap_or_default();
            let on_target = route.target == jt::RouteTarget::Target as i32;
            let ended_failed = unit.status == jt::UnitStatus::RolledBack as i32
                || unit.status == jt::UnitStatus::Failed as i32;
            if unit.unit_key == FAULTY {
                // Rolled back by a worker, or FAILED once its attempts and
                // clean-up leases all lapsed: either way nothing may be
                // left in the target, and readers stay on the source.
                if objects != 0 || on_target || !ended_failed {
                    eprintln!(
                        "chaos: faulty unit of run {round}: {objects} objects, route {:?}, {unit:?}",
                        route.target
                    );
                    outcome.left_behind += 1;
                }
            } else if objects == u64::try_from(PER_UNIT)?
                && on_target
                && unit.status == jt::UnitStatus::Migrated as i32
            {
                outcome.units_migrated += 1;
            } else if objects == 0 && !on_target && ended_failed {
                // Out of attempts (its workers killed or cut off each
                // time): failed with nothing left in the target (its copy
                // removed, or its last lease lapsed before it wrote any),
                // readers on the source.
                outcome.failed_cleanly += 1;
            } else {
                eprintln!(
                    "chaos: unit {} of run {round}: {objects} objects, route {:?}, {unit:?}",
                    unit.unit_key, route.target
                );
                outcome.incomplete += 1;
            }
        }
        if listed.units.len() != UNITS + 1 {
            bail!(
                "run {round} lists {} units, not {}",
                listed.units.len(),
                UNITS + 1
            );
        }
        outcome.runs = round;
    }
    Ok(outcome)
}
