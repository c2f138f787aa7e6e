//! Problem 5 under faults: an incremental extract scheduled every few
//! seconds from a table a writer keeps changing (each change stamped with
//! its time) to S3, one object per key. Each successful run must start its
//! window where the one before it processed up to (its `last_processed`,
//! the window end less the settle lag): no gap and no overlap. Once a run
//! has processed past the last write, every key's object must be its last
//! image.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rand::{Rng as _, SeedableRng as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, Sink as _, SourceTable as _};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::plane::through_restarts;

const KEYS: u32 = 100;
const PREFIX: &str = "extract/";

pub fn schema() -> KeySchema {
    KeySchema::new("id", None)
}

fn key(i: u32) -> Key {
    Key::single("id", AttrValue::s(format!("r{i:03}")))
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Creates the job, due every 3 s.
pub async fn create(
    replicator: String,
    job: &str,
    table: &str,
    bucket: &str,
) -> anyhow::Result<()> {
    let client = ReplicatorServiceClient::new(Channel::from_shared(replicator)?.connect_lazy());
    let request = pb::CreateIncrementalExtractRequest {
        job_name: job.to_owned(),
        spec: Some(pb::IncrementalExtractSpec {
            source: Some(common_pb::DataStore {
                store: Some(common_pb::data_store::Store::DynamodbTable(
                    common_pb::DynamoDbTableRef {
                        table_name: table.to_owned(),
                        ..Default::default()
                    },
                )),
            }),
            changed_at_attribute: "updated_at".to_owned(),
            changed_at_encoding: common_pb::TimeEncoding::EpochMillis as i32,
            segments: 2,
            target: Some(common_pb::DataStore {
                store: Some(common_pb::data_store::Store::S3Prefix(
                    common_pb::S3PrefixRef {
                        bucket: bucket.to_owned(),
                        prefix: PREFIX.to_owned(),
                        ..Default::default()
                    },
                )),
            }),
            settle_lag: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }),
        schedule: Some(jt::Schedule {
            cron: "*/3 * * * * *".to_owned(),
            ..Default::default()
        }),
        run_now: false,
        actor: "chaos".to_owned(),
    };
    through_restarts("CreateIncrementalExtract", Duration::from_secs(60), || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.create_incremental_extract(r).await }
    })
    .await?;
    Ok(())
}

/// Each key's last `v`, and when the last write happened.
#[derive(Default)]
pub struct Ledger {
    pub last: BTreeMap<u32, i64>,
    pub writes: u64,
    pub last_write_millis: i64,
}

/// Changes random keys, each stamped with its time, until `stop`.
pub async fn write(
    table: DynamoTable,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<Ledger> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ledger = Ledger::default();
    let mut v = 0;
    while !stop.is_cancelled() {
        let i = rng.random_range(0..KEYS);
        v += 1;
        let at = now_millis();
        let mut item: Item = key(i).0;
        item.insert("updated_at".to_owned(), AttrValue::n(at));
        item.insert("v".to_owned(), AttrValue::n(v));
        table
            .put(&item, None)
            .await
            .context("an extract writer's put")?;
        ledger.last.insert(i, v);
        ledger.writes += 1;
        ledger.last_write_millis = at;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(ledger)
}

/// What the runs did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub succeeded: u64,
    pub failed: u64,
    /// A run processed past the last write within 120 s of it.
    pub caught_up: bool,
    pub skipped: u64,
    /// Successive windows that do not meet (a gap) or overlap.
    pub window_faults: u64,
    /// Keys whose object is missing or older than the last write.
    pub stale: u64,
    /// Succeeded runs, but the newest, without a manifest for their window
    /// (the newest one's may still be on its way).
    pub missing_manifests: u64,
}

fn millis(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// How far a run processed (0 before it completed).
fn processed(run: &jt::Run) -> i64 {
    millis(run.last_processed.as_ref().and_then(|w| w.time.as_ref()))
}

/// Waits for a run whose window passed the last write, then checks the
/// windows and the objects.
pub async fn check(
    jobs: String,
    job: &str,
    bucket: &str,
    s3: aws_sdk_s3::Client,
    ledger: &Ledger,
) -> anyhow::Result<Outcome> {
    let client = JobTrackerServiceClient::new(Channel::from_shared(jobs)?.connect_lazy());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (runs, caught_up) = loop {
        let mut runs = Vec::new();
        let mut page_token = String::new();
        loop {
            // Small pages, retried for long: each run listed costs the
            // job-tracker a few reads, and after a long run the local
            // DynamoDB (one request at a time) answers them slowly.
            let page = through_restarts("ListRuns", Duration::from_secs(300), || {
                let mut c = client.clone();
                let r = jt::ListRunsRequest {
                    job_name: job.to_owned(),
                    page_size: 25,
                    page_token: page_token.clone(),
                    ..Default::default()
                };
                async move { c.list_runs(r).await }
            })
            .await?;
            runs.extend(page.runs);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let caught_up = runs.iter().any(|r| {
            r.status == jt::RunStatus::Succeeded as i32 && processed(r) > ledger.last_write_millis
        });
        let failed = runs
            .iter()
            .any(|r| r.status == jt::RunStatus::Failed as i32);
        if caught_up || failed || std::time::Instant::now() > deadline {
            if !caught_up {
                let mut by_status = BTreeMap::new();
                for r in &runs {
                    *by_status.entry(r.status).or_insert(0) += 1;
                }
                eprintln!(
                    "chaos: no extract run processed past the last write ({}) within 120 s: runs by status {by_status:?}, furthest processed {}",
                    ledger.last_write_millis,
                    runs.iter().map(processed).max().unwrap_or(0)
                );
            }
            break (runs, caught_up);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let mut outcome = Outcome {
        caught_up,
        failed: u64::try_from(
            runs.iter()
                .filter(|r| r.status == jt::RunStatus::Failed as i32)
                .count(),
        )?,
        ..Outcome::default()
    };
    let mut done: Vec<&jt::Run> = runs
        .iter()
        .filter(|r| r.status == jt::RunStatus::Succeeded as i32)
        .collect();
    outcome.skipped = u64::try_from(
        runs.iter()
            .filter(|r| r.status == jt::RunStatus::Skipped as i32)
            .count(),
    )?;
    done.sort_by_key(|r| processed(r));
    outcome.succeeded = u64::try_from(done.len())?;
    for pair in done.windows(2) {
        if millis(pair[1].window_start.as_ref()) != processed(pair[0]) {
            eprintln!(
                "chaos: extract windows do not meet: {:?} processed to {:?}, then {:?} from {:?}",
                pair[0].run_id, pair[0].last_processed, pair[1].run_id, pair[1].window_start
            );
            outcome.window_faults += 1;
        }
    }
    // Each succeeded run's manifest, written by its worker or, if that one
    // died first, by the next run's first segment.
    for run in done.iter().rev().skip(1) {
        let manifest = s3
            .get_object()
            .bucket(bucket)
            .key(format!("{PREFIX}_manifests/{}.json", run.run_id))
            .send()
            .await;
        let Ok(manifest) = manifest else {
            eprintln!("chaos: extract run {} has no manifest", run.run_id);
            outcome.missing_manifests += 1;
            continue;
        };
        let body = manifest.body.collect().await?.into_bytes();
        let manifest: serde_json::Value = serde_json::from_slice(&body)?;
        let end = manifest["window_end"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        if end != Some(processed(run)) {
            eprintln!(
                "chaos: extract run {}'s manifest ends at {end:?}, the run at {}",
                run.run_id,
                processed(run)
            );
            outcome.missing_manifests += 1;
        }
    }
    let objects = S3Sink::new(s3, bucket, PREFIX);
    for (i, v) in &ledger.last {
        let have = objects
            .read(&key(*i))
            .await
            .context("read an extracted object")?
            .and_then(|(_, item)| {
                item.get("v")
                    .and_then(AttrValue::as_number)
                    .and_then(tidemark_connectors::Number::as_i64)
            });
        if have != Some(*v) {
            outcome.stale += 1;
        }
    }
    Ok(outcome)
}
