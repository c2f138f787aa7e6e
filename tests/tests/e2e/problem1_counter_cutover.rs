//! Problem 1: live counters moved from an old table to a new one while
//! events keep flowing, by `tidemark cutover PLAN.toml`: replicate the
//! stats-aggregator's table (values, not deltas) into the new table, verify,
//! pause writers, drain, verify again, switch the route, resume writers.
//! The final counters in the new table equal the exact sums of the events,
//! and the writer pause is measured and reported. A plan whose step misses
//! its deadline aborts cleanly: writers resumed, route unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::testing::dynamodb_clients;
use tidemark_connectors::{KeySchema, Number, ScanRequest, SourceTable as _};
use tidemark_e2e::{PlaneOptions, spawn_plane, tidemark, tidemark_json, unique_name};
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::stats_aggregator::v1 as sa;

const ENTITIES: usize = 12;

fn plan(name: &str, pipeline: &str, old: &str, new: &str, final_verify: &str) -> String {
    format!(
        r##"
name = "{name}"
actor = "e2e"

[pipeline]
name = "{pipeline}"
source = "dynamodb:{old}"
segments = 2

# The new table gets the counters only: the aggregator's bookkeeping
# (tidemark_version, tidemark_flush_seq) belongs to the old store, and the
# sink keeps its own version. Versions are derived from the stream: the
# local DynamoDB emits a key-only INSERT before the full one when UpdateItem
# creates an item, which would outrank the item's own tidemark_version.
[[pipeline.sinks]]
name = "new-table"
store = "dynamodb:{new}"
projection = ["views"]

[verify]
recheck_rounds = 5
recheck_min_wait = "1s"
segments = 2

[[verify.checks]]
name = "counts"
count = {{}}

[[verify.checks]]
name = "content"
digest = {{ buckets = 16 }}

[writers]
mode = "buffer"

[deadlines]
backfill = "3m"
verify = "3m"
pause_writers = "10s"
drain = "30s"
final_verify = "{final_verify}"
switch_route = "10s"
resume_writers = "20s"
"##
    )
}

/// Sends increments over the entities until `stop`, returning the exact
/// sums sent (each batch retried until accepted; ids make resends safe).
async fn produce(
    client: tidemark_client::Tidemark,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, i64> {
    let mut sums = BTreeMap::new();
    let mut stats = client.stats();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut events = Vec::new();
        for i in 0..20u64 {
            let entity = format!("{prefix}-{}", (n + i) % ENTITIES as u64);
            let delta = i64::try_from((n + i) % 5 + 1).unwrap();
            *sums.entry(entity.clone()).or_insert(0) += delta;
            events.push(sa::Event {
                event_id: format!("{prefix}-ev-{}", n + i),
                entity_key: entity,
                metric: "views".to_owned(),
                op: Some(sa::event::Op::Increment(sa::Increment { delta })),
                event_time: None,
            });
        }
        n += 20;
        loop {
            match stats
                .ingest_batch(sa::IngestBatchRequest {
                    events: events.clone(),
                })
                .await
            {
                Ok(r) => {
                    assert_eq!(r.into_inner().rejected_count, 0);
                    break;
                }
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sums
}

async fn counters(table: &DynamoTable) -> BTreeMap<String, i64> {
    let page = table
        .scan(&ScanRequest {
            consistent: true,
            ..ScanRequest::segment(0, 1)
        })
        .await
        .expect("scan");
    assert!(page.last_key.is_none(), "one page holds every entity");
    page.items
        .iter()
        .map(|it| {
            (
                it["pk"].as_s().unwrap_or_default().to_owned(),
                it.get("views")
                    .and_then(|v| v.as_number())
                    .and_then(Number::as_i64)
                    .unwrap_or(-1),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counters_cut_over_exactly_with_a_measured_writer_pause() {
    let (dynamo, _) = dynamodb_clients().await;
    let schema = KeySchema::new("pk", None);
    let old_name = unique_name("stats-old");
    let new_name = unique_name("stats-new");
    DynamoTable::create(dynamo.clone(), &old_name, &schema, true)
        .await
        .expect("create the old table (with its stream)");
    let new_table = DynamoTable::create(dynamo, &new_name, &schema, false)
        .await
        .expect("create the new table");
    let plane = spawn_plane(PlaneOptions {
        stats_table: Some(old_name.clone()),
        flush_interval_ms: Some(1_000),
        ..PlaneOptions::default()
    })
    .await;
    let url = plane.url();
    let pipeline = unique_name("counters");
    let dir = tempfile::tempdir().unwrap();

    // Dry run before anything exists: every precondition holds.
    let good = dir.path().join("cutover.toml");
    let plan_name = unique_name("counters-v2");
    std::fs::write(
        &good,
        plan(&plan_name, &pipeline, &old_name, &new_name, "1m"),
    )
    .unwrap();
    let dry = tidemark_json(&url, &["cutover", good.to_str().unwrap(), "--dry-run"], 0).await;
    assert_eq!(dry["ok"], true, "{dry}");
    assert_eq!(dry["steps"].as_array().unwrap().len(), 8, "{dry}");
    assert!(
        tidemark_json(&url, &["replicate", "ls"], 0)
            .await
            .as_array()
            .unwrap()
            .is_empty(),
        "a dry run creates nothing"
    );
    let checks = dry["preconditions"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["ok"] == true
            && c["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("DynamoDB table {new_name} exists")))),
        "the replicator checked the sink table: {dry}"
    );
    // A sink table that does not exist fails the dry run, naming it.
    let typo = dir.path().join("typo.toml");
    let absent = unique_name("stats-absent");
    std::fs::write(
        &typo,
        plan(&unique_name("typo"), &pipeline, &old_name, &absent, "1m"),
    )
    .unwrap();
    let dry = tidemark_json(&url, &["cutover", typo.to_str().unwrap(), "--dry-run"], 6).await;
    assert_eq!(dry["ok"], false, "{dry}");
    assert!(
        dry["preconditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["ok"] == false
                && c["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("spec.sinks[0].store"))),
        "{dry}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(plane.client(), unique_name("c"), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A final verification that cannot meet its deadline: the cut-over
    // aborts after the pause, resumes writers and leaves the route alone.
    let doomed = dir.path().join("doomed.toml");
    std::fs::write(
        &doomed,
        plan(
            &unique_name("doomed"),
            &pipeline,
            &old_name,
            &new_name,
            "1ms",
        ),
    )
    .unwrap();
    let aborted = tidemark_json(&url, &["cutover", doomed.to_str().unwrap()], 6).await;
    assert_eq!(aborted["failed_step"], "final-verify", "{aborted}");
    assert!(
        aborted["reason"].as_str().unwrap().contains("deadline"),
        "{aborted}"
    );
    assert_eq!(aborted["report"]["writers_resumed"], true, "{aborted}");
    assert_eq!(aborted["report"]["route_unchanged"], true, "{aborted}");
    let state = tidemark_json(&url, &["stats", "state"], 0).await;
    assert_eq!(state["paused"], false, "{state}");
    let client = plane.client();
    let route = client
        .get_route(&format!("pipeline/{pipeline}"), "")
        .await
        .expect("route");
    assert_ne!(route.target, jt::RouteTarget::Target as i32, "{route:?}");

    // The real cut-over, events still flowing.
    let done = tidemark_json(&url, &["cutover", good.to_str().unwrap()], 0).await;
    assert_eq!(done["ok"], true, "{done}");
    let report = &done["report"];
    let steps: Vec<(&str, &str)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("start-replication", "done"),
            ("wait-backfill", "done"),
            ("verify", "done"),
            ("pause-writers", "done"),
            ("drain", "done"),
            ("final-verify", "done"),
            ("switch-route", "done"),
            ("resume-writers", "done"),
        ],
        "{report}"
    );
    let pause = report["writer_pause"]
        .as_f64()
        .expect("the pause is reported");
    println!("problem 1: writers paused for {pause:.2} s during the cut-over (target < 5 s)");
    // Bounded by the plan: pause + drain + final verify + switch + resume.
    assert!(
        pause > 0.0 && pause < 10.0 + 30.0 + 60.0 + 10.0 + 20.0,
        "{report}"
    );
    let route = client
        .get_route(&format!("pipeline/{pipeline}"), "")
        .await
        .expect("route");
    assert_eq!(route.target, jt::RouteTarget::Target as i32, "{route:?}");

    // Events keep flowing after the switch; then they stop, the last ones
    // are flushed and replicated, and the new table holds the exact sums.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sums = producer.await.expect("producer");
    let flushed = tidemark(&url, &["stats", "flush"]).await;
    assert!(flushed.status.success(), "{flushed:?}");
    tidemark_json(
        &url,
        &["replicate", "drain", &pipeline, "--timeout", "60s"],
        0,
    )
    .await;
    assert_eq!(
        counters(&new_table).await,
        sums,
        "the new table's counters are exact"
    );
    let one = sums.keys().next().unwrap();
    let got = tidemark_json(&url, &["stats", "get", one], 0).await;
    assert_eq!(
        got["metrics"]["views"]["effective"],
        sums[one].to_string(),
        "{got}"
    );

    // Done means done: a second dry run refuses (the route already switched).
    let again = tidemark_json(&url, &["cutover", good.to_str().unwrap(), "--dry-run"], 6).await;
    assert_eq!(again["ok"], false, "{again}");
}
