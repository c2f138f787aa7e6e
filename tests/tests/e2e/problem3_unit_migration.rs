//! Problem 3: per-unit atomic migration to S3, driven by `tidemark
//! migrate-units`. One unit fails by an injected fault: it is rolled back
//! (no partial copy) while the others are MIGRATED and routed to TARGET;
//! the failed run blocks the job until `tidemark jobs ack`, and the rerun
//! completes the failed unit without touching the others.

use std::collections::BTreeMap;

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::testing::{dynamodb_clients, s3_client};
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable as _};
use tidemark_e2e::{PlaneOptions, spawn_plane_in, tidemark, tidemark_json, unique_name};
use tidemark_proto::job_tracker::v1 as jt;

fn item(id: String, unit: &str, i: usize) -> Item {
    let mut item = Item::new();
    item.insert("id".to_owned(), AttrValue::s(id));
    item.insert("courseId".to_owned(), AttrValue::s(unit));
    item.insert(
        "payload".to_owned(),
        AttrValue::n(i64::try_from(i).expect("small")),
    );
    item
}

async fn objects(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> BTreeMap<String, String> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .expect("list objects");
    out.contents()
        .iter()
        .map(|o| {
            (
                o.key().unwrap_or_default().to_owned(),
                o.e_tag().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn unit_statuses(v: &serde_json::Value) -> BTreeMap<String, String> {
    v["unit_results"]
        .as_array()
        .expect("unit results")
        .iter()
        .map(|u| {
            (
                u["unit"].as_str().unwrap_or_default().to_owned(),
                u["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_unit_rolls_back_alone_and_the_acknowledged_rerun_completes_it() {
    let (dynamo, _) = dynamodb_clients().await;
    let table_name = unique_name("courses");
    let table = DynamoTable::create(dynamo, &table_name, &KeySchema::new("id", None), false)
        .await
        .expect("create the source table");
    let units = [("c1", 30), ("c2", 120), ("c3", 20)];
    let puts: Vec<Item> = units
        .iter()
        .flat_map(|(unit, n)| (0..*n).map(move |i| item(format!("{unit}-{i:03}"), unit, i)))
        .collect();
    futures::future::try_join_all(puts.iter().map(|it| table.put(it, None)))
        .await
        .expect("seed the units");
    let s3 = s3_client().await;
    let bucket = unique_name("media");
    S3Sink::ensure_bucket(&s3, &bucket)
        .await
        .expect("create the bucket");
    let job = unique_name("course-media");
    let source = format!("dynamodb:{table_name}");
    let target = format!("s3://{bucket}/courses/");
    let migrate = [
        "migrate-units",
        "--job",
        &job,
        "--source",
        &source,
        "--target",
        &target,
        "--unit-attribute",
        "courseId",
        "--unit",
        "c1,c2,c3",
        "--concurrency",
        "2",
        "--actor",
        "e2e",
    ];

    let dir = tempfile::tempdir().expect("plane directory");
    let first_run = {
        let plane = spawn_plane_in(
            Some(dir.path()),
            PlaneOptions {
                inject_unit_fault: Some("c2".to_owned()),
                ..PlaneOptions::default()
            },
        )
        .await;
        let url = plane.url();
        // The run ends FAILED: exit 6, with the per-unit outcome on stdout.
        let out = tidemark_json(&url, &migrate, 6).await;
        assert_eq!(out["status"], "failed", "{out}");
        let statuses = unit_statuses(&out);
        assert_eq!(statuses["c1"], "migrated", "{out}");
        assert_eq!(statuses["c3"], "migrated", "{out}");
        assert_eq!(statuses["c2"], "rolled-back", "{out}");
        let client = plane.client();
        for (unit, target) in [
            ("c1", jt::RouteTarget::Target),
            ("c3", jt::RouteTarget::Target),
        ] {
            let route = client.get_route(&job, unit).await.expect("route");
            assert_eq!(route.target, target as i32, "{unit}: {route:?}");
        }
        let route = client.get_route(&job, "c2").await.expect("route");
        assert_ne!(
            route.target,
            jt::RouteTarget::Target as i32,
            "the failed unit's readers stay on the source"
        );
        let run_id = out["run_id"].as_str().expect("run id").to_owned();
        plane.stop().await.expect("the plane stops cleanly");
        run_id
    };
    assert_eq!(objects(&s3, &bucket, "courses/c1/").await.len(), 30);
    assert_eq!(
        objects(&s3, &bucket, "courses/c2/").await.len(),
        0,
        "the failed unit left no partial copy"
    );
    assert_eq!(objects(&s3, &bucket, "courses/c3/").await.len(), 20);
    let c1_before = objects(&s3, &bucket, "courses/c1/").await;

    // The same plane without the fault (the operator fixed the cause).
    let plane = spawn_plane_in(Some(dir.path()), PlaneOptions::default()).await;
    let url = plane.url();
    let rerun = [
        "migrate-units",
        "--job",
        &job,
        "--unit",
        "c1,c2,c3",
        "--actor",
        "e2e",
    ];
    let blocked = tidemark(&url, &rerun).await;
    assert_eq!(
        blocked.status.code(),
        Some(4),
        "a failed run blocks the next until acknowledged: {blocked:?}"
    );
    assert!(
        String::from_utf8_lossy(&blocked.stderr).contains(&first_run),
        "the refusal names the blocking run: {}",
        String::from_utf8_lossy(&blocked.stderr)
    );
    let shown = tidemark(&url, &["jobs", "show", &job]).await;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("BLOCKED") && shown.contains("unit c2 rolled-back"),
        "{shown}"
    );
    let ack = tidemark(
        &url,
        &[
            "jobs",
            "ack",
            &job,
            "--reason",
            "fault injected for the drill",
            "--actor",
            "e2e",
        ],
    )
    .await;
    assert!(ack.status.success(), "{ack:?}");

    let out = tidemark_json(&url, &rerun, 0).await;
    assert_eq!(out["status"], "succeeded", "{out}");
    assert_eq!(
        out["already_migrated"],
        serde_json::json!(["c1", "c3"]),
        "{out}"
    );
    assert_eq!(unit_statuses(&out)["c2"], "migrated", "{out}");
    assert_eq!(objects(&s3, &bucket, "courses/c2/").await.len(), 120);
    assert_eq!(
        objects(&s3, &bucket, "courses/c1/").await,
        c1_before,
        "a MIGRATED unit is not copied again"
    );
    let route = plane.client().get_route(&job, "c2").await.expect("route");
    assert_eq!(route.target, jt::RouteTarget::Target as i32, "{route:?}");
}
