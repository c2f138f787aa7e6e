//! Problem 5: an hourly incremental extract, driven by the CLI (`tidemark
//! extract`, `jobs run`, `jobs show`, `jobs ack`, `jobs history`). A failed
//! run (its bucket missing) blocks the next run until `tidemark jobs ack`;
//! the next successful run then starts its window from the last processed
//! timestamp and extracts only what changed since.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::testing::{dynamodb_clients, s3_client};
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable as _};
use tidemark_e2e::{PlaneOptions, spawn_plane, tidemark, tidemark_json, unique_name};
use tidemark_proto::job_tracker::v1 as jt;

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

/// `tidemark jobs run JOB` to the end; the finished run as the job-tracker
/// has it.
async fn run(client: &tidemark_client::Tidemark, url: &str, job: &str) -> jt::Run {
    let out = tidemark_json(url, &["jobs", "run", job, "--actor", "e2e"], 0).await;
    assert_eq!(out["status"], "succeeded", "{out}");
    client
        .get_run(out["run_id"].as_str().unwrap())
        .await
        .expect("the run")
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
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
    // Hourly, from tomorrow: the scheduler stays out of the test's way, the
    // runs here are started by hand (`tidemark jobs run`).
    let source = format!("dynamodb:{table_name}");
    let target = format!("s3://{bucket}/orders/");
    let start_time = tomorrow.to_rfc3339();
    let extract: Vec<&str> = vec![
        "extract",
        &job,
        "--source",
        &source,
        "--target",
        &target,
        "--changed-at",
        "updated_at",
        "--encoding",
        "epoch-millis",
        "--segments",
        "2",
        "--cron",
        "0 0 * * * *",
        "--start-time",
        &start_time,
        "--actor",
        "e2e",
    ];
    let created = tidemark_json(&url, &extract, 0).await;
    assert_eq!(created["job"], job.as_str(), "{created}");
    let job_shown = client
        .jobs()
        .get_job(jt::GetJobRequest { name: job.clone() })
        .await
        .expect("the job exists")
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        job_shown.schedule.as_ref().map(|s| s.cron.as_str()),
        Some("0 0 * * * *")
    );
    assert!(
        job_shown
            .next_run_time
            .is_some_and(|t| t.seconds >= tomorrow.timestamp() - 1),
        "{job_shown:?}"
    );

    // Run 1 (the same command with --run-now keeps the job): the bucket is
    // missing, the run fails and the CLI says so with exit code 6.
    let mut run_now = extract.clone();
    run_now.push("--run-now");
    let first = tidemark_json(&url, &run_now, 6).await;
    assert_eq!(first["status"], "failed", "{first}");
    let first_id = first["run_id"].as_str().unwrap().to_owned();

    // Blocked: the next run is refused, and the CLI says why and what to do.
    let refused = tidemark(&url, &["jobs", "run", &job, "--actor", "e2e"]).await;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let shown = tidemark(&url, &["jobs", "show", &job]).await;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("BLOCKED")
            && shown.contains(&first_id)
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

    let second = run(&client, &url, &job).await;
    assert_eq!(second.status, jt::RunStatus::Succeeded as i32, "{second:?}");
    assert_eq!(second.window_start, None, "no run succeeded before it");
    let c = |run: &jt::Run, k: &str| run.counters.get(k).copied().unwrap_or_default();
    assert_eq!(
        c(&second, "extracted") + c(&second, "skipped_older"),
        20,
        "{:?}",
        second.counters
    );
    let last = second
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
    // A run extracts up to its trigger less the settle lag (2 s by default):
    // writes not yet visible at the trigger are left to the next run.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let third = run(&client, &url, &job).await;
    assert_eq!(third.status, jt::RunStatus::Succeeded as i32, "{third:?}");
    assert_eq!(
        third.window_start,
        Some(last),
        "run 3 starts where run 2 ended"
    );
    assert_eq!(c(&third, "extracted"), 5, "{:?}", third.counters);
    let history = tidemark(&url, &["jobs", "history", &job]).await;
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    assert!(
        history.contains("run failed → failed-acknowledged") && history.contains("bucket created"),
        "{history}"
    );
}
