//! Problem 5: an hourly incremental extract. A failed run (its bucket
//! missing) blocks the next run until `tidemark jobs ack`; the next
//! successful run then starts its window from the last processed timestamp
//! and extracts only what changed since.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::testing::{dynamodb_clients, s3_client};
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable as _};
use tidemark_e2e::{PlaneOptions, spawn_plane, tidemark, unique_name};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;

fn now_millis() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn record(i: usize, updated_at: i64, v: i64) -> Item {
    let mut item = Item::new();
    item.insert("id".to_owned(), AttrValue::s(format!("r{i:02}")));
    item.insert("updated_at".to_owned(), AttrValue::n(updated_at));
    item.insert("v".to_owned(), AttrValue::n(v));
    item
}

async fn start(client: &tidemark_client::Tidemark, job: &str) -> Result<String, tonic::Status> {
    client
        .jobs()
        .start_run(jt::StartRunRequest {
            job_name: job.to_owned(),
            actor: "e2e".to_owned(),
            trigger: jt::RunTrigger::Manual as i32,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().run.unwrap_or_default().run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_extract_blocks_until_acknowledged_and_the_next_starts_where_the_last_ended() {
    let (dynamo, _) = dynamodb_clients().await;
    let table_name = unique_name("orders");
    let table = DynamoTable::create(dynamo, &table_name, &KeySchema::new("id", None), false)
        .await
        .expect("create the source table");
    let hour_ago = now_millis() - 3_600_000;
    for i in 0..20 {
        table.put(&record(i, hour_ago, 1), None).await.unwrap();
    }
    let s3 = s3_client().await;
    // Not created yet: the first run fails on it.
    let bucket = unique_name("exports");
    let plane = spawn_plane(PlaneOptions::default()).await;
    let url = plane.url();
    let client = plane.client();
    let job = unique_name("orders-hourly");
    let tomorrow =
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(86_400);
    let created = client
        .replicator()
        .create_incremental_extract(rp::CreateIncrementalExtractRequest {
            job_name: job.clone(),
            spec: Some(rp::IncrementalExtractSpec {
                source: Some(common::DataStore {
                    store: Some(common::data_store::Store::DynamodbTable(
                        common::DynamoDbTableRef {
                            table_name: table_name.clone(),
                            ..Default::default()
                        },
                    )),
                }),
                changed_at_attribute: "updated_at".to_owned(),
                changed_at_encoding: common::TimeEncoding::EpochMillis as i32,
                segments: 2,
                target: Some(common::DataStore {
                    store: Some(common::data_store::Store::S3Prefix(common::S3PrefixRef {
                        bucket: bucket.clone(),
                        prefix: "orders/".to_owned(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            // Hourly, from tomorrow: the scheduler stays out of the test's
            // way, the runs here are started by hand.
            schedule: Some(jt::Schedule {
                cron: "0 0 * * * *".to_owned(),
                start_time: Some(prost_types::Timestamp {
                    seconds: i64::try_from(tomorrow.as_secs()).unwrap(),
                    nanos: 0,
                }),
                ..Default::default()
            }),
            run_now: true,
            actor: "e2e".to_owned(),
        })
        .await
        .expect("create the extract")
        .into_inner();
    let first = client
        .wait_run(&created.run_id, Duration::from_secs(120), |_| {})
        .await
        .expect("follow run 1");
    assert_eq!(
        first.run.status,
        jt::RunStatus::Failed as i32,
        "{:?}",
        first.run
    );

    // Blocked: the next run is refused, and the CLI says why and what to do.
    let refused = start(&client, &job).await.expect_err("the gate is closed");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let shown = tidemark(&url, &["jobs", "show", &job]).await;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("BLOCKED")
            && shown.contains(&created.run_id)
            && shown.contains("tidemark jobs ack"),
        "{shown}"
    );
    S3Sink::ensure_bucket(&s3, &bucket)
        .await
        .expect("create the bucket");
    let ack = tidemark(
        &url,
        &[
            "jobs",
            "ack",
            &job,
            "--reason",
            "bucket created",
            "--actor",
            "e2e",
        ],
    )
    .await;
    assert!(ack.status.success(), "{ack:?}");

    let second_id = start(&client, &job).await.expect("the gate is open");
    let second = client
        .wait_run(&second_id, Duration::from_secs(120), |_| {})
        .await
        .expect("follow run 2");
    assert_eq!(
        second.run.status,
        jt::RunStatus::Succeeded as i32,
        "{:?}",
        second.run
    );
    assert_eq!(second.run.window_start, None, "no run succeeded before it");
    let c = |run: &jt::Run, k: &str| run.counters.get(k).copied().unwrap_or_default();
    assert_eq!(
        c(&second.run, "extracted") + c(&second.run, "skipped_older"),
        20,
        "{:?}",
        second.run.counters
    );
    let last = second
        .run
        .last_processed
        .as_ref()
        .and_then(|w| w.time)
        .expect("run 2 records its last processed time");

    // Changes after run 2: the third run's window starts at run 2's last
    // processed time and holds only them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        table.put(&record(i, now_millis(), 2), None).await.unwrap();
    }
    let third_id = start(&client, &job).await.expect("run 3 starts");
    let third = client
        .wait_run(&third_id, Duration::from_secs(120), |_| {})
        .await
        .expect("follow run 3");
    assert_eq!(
        third.run.status,
        jt::RunStatus::Succeeded as i32,
        "{:?}",
        third.run
    );
    assert_eq!(
        third.run.window_start,
        Some(last),
        "run 3 starts where run 2 ended"
    );
    assert_eq!(c(&third.run, "extracted"), 5, "{:?}", third.run.counters);
    let history = tidemark(&url, &["jobs", "history", &job]).await;
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    assert!(
        history.contains("run failed → failed-acknowledged") && history.contains("bucket created"),
        "{history}"
    );
}
