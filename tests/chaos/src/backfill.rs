//! Problem 4 under faults: attribute backfills, one round after another on
//! one live table, while writers set the same attribute to their own values
//! and the replicators and the job-tracker are killed. Each round must end
//! SUCCEEDED with every item carrying the attribute and every writer's value
//! intact (the backfill's conditional writes never overwrite a writer).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use rand::{Rng as _, SeedableRng as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, ScanRequest, SourceTable as _};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::plane::{ended_run, through_restarts};

pub const ITEMS: u32 = 2_000;
const BACKFILLED: &str = "backfill";

pub fn schema() -> KeySchema {
    KeySchema::new("pk", None)
}

fn key(i: u32) -> Key {
    Key::single("pk", AttrValue::s(format!("b{i:05}")))
}

pub async fn seed(table: &DynamoTable) -> anyhow::Result<()> {
    let puts = (0..ITEMS).map(|i| async move {
        let mut item: Item = key(i).0;
        item.insert("n".to_owned(), AttrValue::n(i64::from(i)));
        table.put(&item, None).await
    });
    futures::stream::iter(puts)
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("seed the backfill table")?;
    Ok(())
}

/// What the rounds found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rounds: u32,
    /// Items left without the attribute by a SUCCEEDED round.
    pub missing: u64,
    /// Items whose writer's value the backfill replaced.
    pub overwritten: u64,
    pub writer_sets: u64,
}

/// Backfill rounds (attribute `tag<round>`) until `stop`; each round's
/// writer sets the attribute on random items while the run goes on.
pub async fn rounds(
    replicator: String,
    jobs: String,
    table: DynamoTable,
    table_name: String,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    let rep = ReplicatorServiceClient::new(Channel::from_shared(replicator)?.connect_lazy());
    let jt_client = JobTrackerServiceClient::new(Channel::from_shared(jobs)?.connect_lazy());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut outcome = Outcome::default();
    while !stop.is_cancelled() {
        let round = outcome.rounds + 1;
        let attribute = format!("tag{round}");
        let request = pb::BackfillAttributeRequest {
            job_name: format!("chaos-backfill-{seed}-{round}"),
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::DynamodbTable(
                        common_pb::DynamoDbTableRef {
                            table_name: table_name.clone(),
                            ..Default::default()
                        },
                    )),
                }),
                attribute_name: attribute.clone(),
                value: Some(common_pb::AttributeValue {
                    value: Some(common_pb::attribute_value::Value::S(BACKFILLED.to_owned())),
                }),
                segments: 8,
                write_units_per_second: 100,
                writes_in_flight: 0,
            }),
            actor: "chaos".to_owned(),
            // Fixed: a retried start after a kill returns the same run.
            correlation_id: format!("chaos-{seed}-{round}"),
        };
        let started = through_restarts("BackfillAttribute", Duration::from_secs(60), || {
            let mut c = rep.clone();
            let r = request.clone();
            async move { c.backfill_attribute(r).await }
        })
        .await?;
        // The writer works while the run does.
        let mut mine: BTreeMap<u32, String> = BTreeMap::new();
        let deadline = std::time::Instant::now() + crate::RUN_DEADLINE;
        let status = loop {
            for _ in 0..5 {
                let i = rng.random_range(0..ITEMS);
                let value = format!("writer-{round}-{}", outcome.writer_sets);
                let mut item = table
                    .get(&key(i))
                    .await
                    .context("read an item")?
                    .context("a seeded item is gone")?;
                item.insert(attribute.clone(), AttrValue::s(&value));
                table.put(&item, None).await.context("a writer's put")?;
                mine.insert(i, value);
                outcome.writer_sets += 1;
            }
            let what = format!("backfill round {round}");
            if let Some(run) = ended_run(&jt_client, &started.run_id, &what, deadline).await? {
                break run;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if status.status != jt::RunStatus::Succeeded as i32 {
            bail!(
                "backfill round {round} ended {:?}: {}",
                jt::RunStatus::try_from(status.status),
                status.status_reason
            );
        }
        let (missing, overwritten) = check_round(&table, &attribute, &mine).await?;
        outcome.missing += missing;
        outcome.overwritten += overwritten;
        outcome.rounds = round;
    }
    Ok(outcome)
}

async fn check_round(
    table: &DynamoTable,
    attribute: &str,
    mine: &BTreeMap<u32, String>,
) -> anyhow::Result<(u64, u64)> {
    let (mut missing, mut overwritten, mut seen) = (0, 0, 0u32);
    let mut start_after = None;
    loop {
        let page = table
            .scan(&ScanRequest {
                start_after,
                consistent: true,
                ..ScanRequest::segment(0, 1)
            })
            .await
            .context("scan the backfilled table")?;
        for item in page.items {
            seen += 1;
            let id = match item.get("pk") {
                Some(AttrValue::S(s)) => s.trim_start_matches('b').parse::<u32>().ok(),
                _ => None,
            };
            let have = match item.get(attribute) {
                Some(AttrValue::S(s)) => Some(s.as_str()),
                _ => None,
            };
            match (id.and_then(|i| mine.get(&i)), have) {
                (_, None) => missing += 1,
                (Some(want), Some(have)) if want != have => overwritten += 1,
                _ => {}
            }
        }
        match page.last_key {
            Some(k) => start_after = Some(k),
            None => break,
        }
    }
    if seen != ITEMS {
        bail!("the backfill table holds {seen} items, not {ITEMS}");
    }
    Ok((missing, overwritten))
}
