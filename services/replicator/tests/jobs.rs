//! One-shot replicator jobs against the real local DynamoDB and S3
//! endpoints, with the job-tracker and the replicator's worker in process:
//! BackfillAttribute never overwrites a concurrent writer's value and leaves
//! no item without the attribute; MigrateUnit copies units atomically, rolls
//! back the one that fails and completes it on a rerun without touching the
//! others.

use futures::{StreamExt as _, TryStreamExt as _};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::proto::value_to_proto;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::testing::{s3_client, unique_name};
use tidemark_connectors::{AttrValue, Item, KeySchema, Predicate, Sink, SourceTable};
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tonic::Code;

mod common;
use common::{counting_proxy_to_dynamodb, dynamo, plane, plane_in, table_ref, wait_run};
use tidemark_proto::common::v1 as common_pb;
use tonic::transport::Channel;

fn item(pairs: &[(&str, AttrValue)]) -> Item {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_sets_every_missing_attribute_and_never_overwrites_a_writer() {
    let name = unique_name("backfill");
    let schema = KeySchema::new("id", None);
    let table = Arc::new(
        DynamoTable::create(dynamo().await, &name, &schema, false)
            .await
            .unwrap(),
    );
    const N: usize = 240;
    futures::future::try_join_all((0..N).map(|i| {
        let table = Arc::clone(&table);
        async move {
            let mut it = item(&[("id", AttrValue::s(format!("i{i:04}")))]);
            if i % 10 == 0 {
                // Already set before the backfill: must be left alone.
                it.insert("test".to_owned(), AttrValue::n(7i64));
            }
            table.put(&it, None).await
        }
    }))
    .await
    .unwrap();
    let mut plane = plane(|_| {}).await;
    // A concurrent writer sets test = 2 on some items while the backfill runs.
    let writer = {
        let table = Arc::clone(&table);
        tokio::spawn(async move {
            let mut written = Vec::new();
            for i in (3..N).step_by(7) {
                let key = schema_key(&format!("i{i:04}"));
                let set = item(&[("test", AttrValue::n(2i64))]);
                table
                    .update(&key, &set, Some(&Predicate::ItemExists))
                    .await
                    .unwrap();
                written.push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        })
    };
    let started = plane
        .replicator
        .backfill_attribute(pb::BackfillAttributeRequest {
            job_name: String::new(),
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(table_ref(&name)),
                attribute_name: "test".to_owned(),
                value: Some(value_to_proto(&AttrValue::n(1i64))),
                segments: 4,
                write_units_per_second: 0,
                writes_in_flight: 0,
            }),
            actor: "test".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let written = writer.await.unwrap();
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    let all = scan_all(&table).await;
    assert_eq!(all.len(), N);
    let mut holding_one = 0;
    for (i, it) in all.iter().enumerate() {
        let v = it
            .get("test")
            .and_then(AttrValue::as_number)
            .map(|n| n.as_str().to_owned());
        let want = if written.contains(&i) {
            "2"
        } else if i % 10 == 0 {
            "7"
        } else {
            holding_one += 1;
            "1"
        };
        assert_eq!(v.as_deref(), Some(want), "item {i}: {it:?}");
    }
    let names = [("#a".to_owned(), "test".to_owned())].into_iter().collect();
    let missing = table
        .count_where(
            "attribute_not_exists(#a)",
            &names,
            &Default::default(),
            0,
            1,
        )
        .await
        .unwrap();
    assert_eq!(missing, 0, "no item may lack the attribute");
    let counters = &run.counters;
    // Items the writer overwrote after the backfill set them count as
    // updated too; every item holding 1 was set by the backfill.
    assert!(
        counters.get("updated").copied().unwrap_or(0) >= holding_one,
        "{counters:?}"
    );
    assert!(
        counters.get("already_set").copied().unwrap_or(0) >= 24,
        "{counters:?}"
    );
    assert_eq!(
        counters.get("updated").copied().unwrap_or(0)
            + counters.get("already_set").copied().unwrap_or(0)
            + counters.get("conflicted").copied().unwrap_or(0),
        i64::try_from(N).unwrap(),
        "{counters:?}"
    );
}

// `writes_in_flight` bounds the conditional updates a segment has in
// flight: with 2, a worker holding one segment never has more than 2
// updates and its next page's scan open against the table; with the
// default (16) it has more, which shows the count can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_keeps_writes_in_flight_to_what_its_spec_says() {
    let name = unique_name("in-flight");
    let table = DynamoTable::create(dynamo().await, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    const N: usize = 300;
    futures::stream::iter(0..N)
        .map(|i| {
            let it = item(&[("id", AttrValue::s(format!("i{i:04}")))]);
            let table = &table;
            async move { table.put(&it, None).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let (endpoint, peak) = counting_proxy_to_dynamodb().await;
    let allowed = endpoint.clone();
    // One unit at a time: one segment's updates are all the table sees.
    let mut plane = plane(move |c| {
        c.allowed_endpoints = allowed;
        c.worker_concurrency = 1;
    })
    .await;
    let mut table_at = table_ref(&name);
    if let Some(common_pb::data_store::Store::DynamodbTable(t)) = &mut table_at.store {
        t.endpoint.clone_from(&endpoint);
    }
    let mut backfill = async |attribute: &str, writes_in_flight: u32| {
        let started = plane
            .replicator
            .backfill_attribute(pb::BackfillAttributeRequest {
                spec: Some(pb::BackfillAttributeSpec {
                    table: Some(table_at.clone()),
                    attribute_name: attribute.to_owned(),
                    value: Some(value_to_proto(&AttrValue::n(1i64))),
                    segments: 1,
                    writes_in_flight,
                    ..Default::default()
                }),
                actor: "test".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let run = wait_run(&mut plane.jobs, &started.run_id).await;
        assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
        assert_eq!(
            run.counters.get("updated").copied(),
            Some(i64::try_from(N).unwrap()),
            "{run:?}"
        );
    };
    backfill("two", 2).await;
    // 2 updates and the next page's scan (measured: 3 here, and 17 for the
    // default 16).
    let limited = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=5).contains(&limited),
        "2 updates and a scan in flight at most, saw {limited} connections"
    );
    // The pool keeps what it opened: the second run can only add to it.
    backfill("sixteen", 0).await;
    let default = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        default >= limited + 10,
        "16 updates in flight (the default) open more connections, saw {default}"
    );
}

fn schema_key(id: &str) -> tidemark_connectors::Key {
    tidemark_connectors::Key::single("id", AttrValue::s(id))
}

async fn scan_all(table: &DynamoTable) -> Vec<Item> {
    let mut out = Vec::new();
    let mut start_after = None;
    loop {
        let page = table
            .scan(&tidemark_connectors::ScanRequest {
                start_after,
                consistent: true,
                ..tidemark_connectors::ScanRequest::segment(0, 1)
            })
            .await
            .unwrap();
        out.extend(page.items);
        match page.last_key {
            Some(k) => start_after = Some(k),
            None => break,
        }
    }
    out.sort_by_key(|i| {
        i.get("id")
            .and_then(AttrValue::as_s)
            .unwrap_or_default()
            .to_owned()
    });
    out
}

#[tokio::test]
async fn backfill_rejects_bad_specs_naming_the_field() {
    let mut plane = plane(|_| {}).await;
    let status = plane
        .replicator
        .backfill_attribute(pb::BackfillAttributeRequest {
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(table_ref("")),
                attribute_name: String::new(),
                writes_in_flight: 257,
                ..Default::default()
            }),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for field in [
        "spec.table.dynamodb_table.table_name",
        "spec.attribute_name",
        "spec.value",
        "spec.writes_in_flight",
    ] {
        assert!(
            status.message().contains(field) || format!("{status:?}").contains(field),
            "{field}: {status:?}"
        );
    }
    let status = plane
        .replicator
        .backfill_attribute(pb::BackfillAttributeRequest {
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(table_ref(&unique_name("missing"))),
                attribute_name: "a".to_owned(),
                value: Some(value_to_proto(&AttrValue::n(1i64))),
                ..Default::default()
            }),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

async fn seed_units(table: &DynamoTable, units: &[(&str, usize)]) {
    let mut puts = Vec::new();
    for (unit, n) in units {
        for i in 0..*n {
            puts.push(item(&[
                ("id", AttrValue::s(format!("{unit}-{i:03}"))),
                ("courseId", AttrValue::s(*unit)),
                ("payload", AttrValue::n(i64::try_from(i).unwrap())),
            ]));
        }
    }
    futures::future::try_join_all(puts.iter().map(|it| table.put(it, None)))
        .await
        .unwrap();
}

async fn unit_statuses(
    jobs: &mut JobTrackerServiceClient<Channel>,
    run_id: &str,
) -> BTreeMap<String, i32> {
    jobs.list_units(jt::ListUnitsRequest {
        run_id: run_id.to_owned(),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .units
    .into_iter()
    .map(|u| (u.unit_key, u.status))
    .collect()
}

async fn route(jobs: &mut JobTrackerServiceClient<Channel>, job: &str, unit: &str) -> i32 {
    jobs.get_route(jt::GetRouteRequest {
        job_name: job.to_owned(),
        unit_key: unit.to_owned(),
    })
    .await
    .map(|r| r.into_inner().route.map_or(0, |r| r.target))
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_switch_to_a_unit_only_once_it_is_committed() {
    // Were the route switched before CompleteUnit, a refused complete would
    // send the unit back to the queue while readers already use its copy.
    let name = unique_name("routes");
    let table = DynamoTable::create(dynamo().await, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    let units: Vec<(String, usize)> = (0..6).map(|i| (format!("r{i}"), 15)).collect();
    let refs: Vec<(&str, usize)> = units.iter().map(|(u, n)| (u.as_str(), *n)).collect();
    seed_units(&table, &refs).await;
    let s3 = s3_client().await;
    let bucket = unique_name("routes");
    S3Sink::ensure_bucket(&s3, &bucket).await.unwrap();
    let job = unique_name("migrate");
    let dir = tempfile::tempdir().unwrap();
    let mut plane = plane_in(dir.path(), |_| {}).await;
    let started = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: job.clone(),
            spec: Some(pb::MigrateUnitSpec {
                source: Some(table_ref(&name)),
                unit_attribute: "courseId".to_owned(),
                target: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::S3Prefix(
                        common_pb::S3PrefixRef {
                            bucket: bucket.clone(),
                            prefix: "courses/".to_owned(),
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
            unit_keys: units.iter().map(|(u, _)| u.clone()).collect(),
            concurrency: 3,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A snapshot of the routes first (some may be switched already), then
    // every change.
    let mut routes = plane
        .jobs
        .watch_routes(jt::WatchRoutesRequest {
            job_name: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut switched = 0;
    while switched < units.len() {
        let message = tokio::time::timeout(Duration::from_secs(120), routes.message())
            .await
            .expect("every unit's route switches")
            .unwrap()
            .expect("the route stream stays open");
        for r in message.routes {
            if r.target != jt::RouteTarget::Target as i32 {
                continue;
            }
            // Read as soon as the switch is seen: the unit must already be
            // committed.
            let statuses = unit_statuses(&mut plane.jobs, &started.run_id).await;
            assert_eq!(
                statuses[&r.unit_key],
                jt::UnitStatus::Migrated as i32,
                "readers were switched to {} before it was committed: {statuses:?}",
                r.unit_key
            );
            switched += 1;
        }
    }
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unit_is_rolled_back_alone_and_a_rerun_completes_it() {
    let name = unique_name("units");
    let table = DynamoTable::create(dynamo().await, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    seed_units(&table, &[("c1", 30), ("c2", 250), ("c3", 20)]).await;
    let s3 = s3_client().await;
    let bucket = unique_name("units");
    S3Sink::ensure_bucket(&s3, &bucket).await.unwrap();
    let spec = pb::MigrateUnitSpec {
        source: Some(table_ref(&name)),
        unit_attribute: "courseId".to_owned(),
        target: Some(common_pb::DataStore {
            store: Some(common_pb::data_store::Store::S3Prefix(
                common_pb::S3PrefixRef {
                    bucket: bucket.clone(),
                    prefix: "courses/".to_owned(),
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    };
    let job = unique_name("migrate");
    let units = ["c1", "c2", "c3"].map(str::to_owned).to_vec();
    let dir = tempfile::tempdir().unwrap();
    let first_run = {
        let mut plane = plane_in(dir.path(), |c| c.inject_unit_fault = Some("c2".to_owned())).await;
        let started = plane
            .replicator
            .migrate_unit(pb::MigrateUnitRequest {
                job_name: job.clone(),
                spec: Some(spec.clone()),
                unit_keys: units.clone(),
                concurrency: 2,
                actor: "test".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let run = wait_run(&mut plane.jobs, &started.run_id).await;
        assert_eq!(run.status, jt::RunStatus::Failed as i32, "{run:?}");
        let statuses = unit_statuses(&mut plane.jobs, &started.run_id).await;
        assert_eq!(statuses["c1"], jt::UnitStatus::Migrated as i32);
        assert_eq!(statuses["c3"], jt::UnitStatus::Migrated as i32);
        assert_eq!(
            statuses["c2"],
            jt::UnitStatus::RolledBack as i32,
            "{statuses:?}"
        );
        assert_eq!(
            route(&mut plane.jobs, &job, "c1").await,
            jt::RouteTarget::Target as i32
        );
        assert_ne!(
            route(&mut plane.jobs, &job, "c2").await,
            jt::RouteTarget::Target as i32
        );
        plane.stop.cancel();
        started.run_id
    };
    let prefix_count = |unit: &str| S3Sink::new(s3.clone(), &bucket, &format!("courses/{unit}/"));
    assert_eq!(prefix_count("c1").count().await.unwrap(), 30);
    assert_eq!(
        prefix_count("c2").count().await.unwrap(),
        0,
        "the failed unit left no copy"
    );
    assert_eq!(prefix_count("c3").count().await.unwrap(), 20);
    // The next run is refused until the failure is acknowledged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut plane = plane_in(dir.path(), |_| {}).await;
    let refused = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: job.clone(),
            unit_keys: units.clone(),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    plane
        .jobs
        .acknowledge_failure(jt::AcknowledgeFailureRequest {
            job_name: job.clone(),
            run_id: first_run,
            actor: "test".to_owned(),
            reason: "fault was injected".to_owned(),
        })
        .await
        .unwrap();
    let c1_before = object_times(&s3, &bucket, "courses/c1/").await;
    let started = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: job.clone(),
            unit_keys: units,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        started.already_migrated_unit_keys,
        vec!["c1".to_owned(), "c3".to_owned()]
    );
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    assert_eq!(prefix_count("c2").count().await.unwrap(), 250);
    assert_eq!(
        route(&mut plane.jobs, &job, "c2").await,
        jt::RouteTarget::Target as i32
    );
    assert_eq!(
        object_times(&s3, &bucket, "courses/c1/").await,
        c1_before,
        "a MIGRATED unit is not copied again"
    );
    plane.stop.cancel();
    // Migrated again by force, c1 fails: its readers were sent back to the
    // source before its copy was removed, and stay there (#19.4). Before,
    // the route kept pointing at a copy the rollback had deleted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut plane = plane_in(dir.path(), |c| c.inject_unit_fault = Some("c1".to_owned())).await;
    let started = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: job.clone(),
            unit_keys: vec!["c1".to_owned()],
            force_remigrate: true,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Failed as i32, "{run:?}");
    assert_eq!(prefix_count("c1").count().await.unwrap(), 0);
    assert_eq!(
        route(&mut plane.jobs, &job, "c1").await,
        jt::RouteTarget::Source as i32,
        "readers must not follow a removed copy"
    );
}

async fn object_times(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Vec<(String, String)> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
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

fn millis_ago(ms: i64) -> AttrValue {
    AttrValue::n(chrono::Utc::now().timestamp_millis() - ms)
}

async fn start(
    jobs: &mut JobTrackerServiceClient<Channel>,
    job: &str,
) -> Result<String, tonic::Status> {
    jobs.start_run(jt::StartRunRequest {
        job_name: job.to_owned(),
        actor: "test".to_owned(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().run.unwrap().run_id)
}

async fn manifest(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    run_id: &str,
) -> Option<serde_json::Value> {
    let out = s3
        .get_object()
        .bucket(bucket)
        .key(format!("out/_manifests/{run_id}.json"))
        .send()
        .await
        .ok()?;
    let bytes = out.body.collect().await.unwrap().into_bytes();
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// The run's manifest, waited for: the worker that sees the run end writes
/// it right after.
async fn manifest_of_ended(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    run_id: &str,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(m) = manifest(s3, bucket, run_id).await {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no manifest for run {run_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An extract of `table` by `updated_at` (epoch milliseconds), in two
/// segments, into `bucket` under `out/` at `endpoint` (empty: the
/// replicator's own S3 endpoint).
fn extract_spec(table: &str, bucket: &str, endpoint: &str) -> pb::IncrementalExtractSpec {
    pb::IncrementalExtractSpec {
        source: Some(table_ref(table)),
        changed_at_attribute: "updated_at".to_owned(),
        changed_at_encoding: common_pb::TimeEncoding::EpochMillis as i32,
        segments: 2,
        target: Some(common_pb::DataStore {
            store: Some(common_pb::data_store::Store::S3Prefix(
                common_pb::S3PrefixRef {
                    bucket: bucket.to_owned(),
                    prefix: "out/".to_owned(),
                    endpoint: endpoint.to_owned(),
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    }
}

/// Puts rows `r{i:02}` for `ids`, changed `age_ms` ago, at value `v`.
async fn put_rows(table: &DynamoTable, ids: std::ops::Range<u32>, age_ms: i64, v: i64) {
    for i in ids {
        let it = item(&[
            ("id", AttrValue::s(format!("r{i:02}"))),
            ("updated_at", millis_ago(age_ms)),
            ("v", AttrValue::n(v)),
        ]);
        table.put(&it, None).await.unwrap();
    }
}

/// A table named after `prefix` holding 20 items (`r00`…`r19`, `v` 1)
/// changed an hour ago, and an empty bucket for their extracts.
async fn extract_fixture(prefix: &str) -> (String, DynamoTable, aws_sdk_s3::Client, String) {
    let name = unique_name(prefix);
    let table = DynamoTable::create(dynamo().await, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    put_rows(&table, 0..20, 3_600_000, 1).await;
    let s3 = s3_client().await;
    let bucket = unique_name(prefix);
    S3Sink::ensure_bucket(&s3, &bucket).await.unwrap();
    (name, table, s3, bucket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_extracts_follow_the_window_and_a_failed_run_blocks_the_next() {
    let (name, table, s3, bucket) = extract_fixture("extract").await;
    let spec = |bucket: &str| extract_spec(&name, bucket, "");
    let mut plane = plane(|_| {}).await;
    let job = unique_name("hourly");
    let first = plane
        .replicator
        .create_incremental_extract(pb::CreateIncrementalExtractRequest {
            job_name: job.clone(),
            spec: Some(spec(&bucket)),
            run_now: true,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run1 = wait_run(&mut plane.jobs, &first.run_id).await;
    assert_eq!(run1.status, jt::RunStatus::Succeeded as i32, "{run1:?}");
    assert_eq!(
        run1.counters.get("extracted"),
        Some(&20),
        "{:?}",
        run1.counters
    );
    let m1 = manifest_of_ended(&s3, &bucket, &first.run_id).await;
    assert_eq!(m1["count"], 20);
    // A worker killed between the run's end and its manifest: the manifest
    // is missing, and the next run's first segment writes it.
    s3.delete_object()
        .bucket(&bucket)
        .key(format!("out/_manifests/{}.json", first.run_id))
        .send()
        .await
        .unwrap();
    // A write stamped just before run 1's trigger but visible only after
    // run 1 read (an eventually consistent scan or index): run 1 ended its
    // extract a settle lag before its trigger, so run 2 still takes it.
    let trigger_millis = run1.window_end.as_ref().map_or(0, |t| t.seconds * 1000)
        + i64::from(run1.window_end.as_ref().map_or(0, |t| t.nanos)) / 1_000_000;
    table
        .put(
            &item(&[
                ("id", AttrValue::s("late")),
                ("updated_at", AttrValue::n(trigger_millis - 500)),
                ("v", AttrValue::n(1i64)),
            ]),
            None,
        )
        .await
        .unwrap();
    // Changes after run 1's window end belong to run 2 only (once they are
    // older than the settle lag, 2 s by default).
    tokio::time::sleep(Duration::from_millis(20)).await;
    put_rows(&table, 0..5, 0, 2).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = start(&mut plane.jobs, &job).await.unwrap();
    let run2 = wait_run(&mut plane.jobs, &second).await;
    assert_eq!(run2.status, jt::RunStatus::Succeeded as i32, "{run2:?}");
    assert_eq!(
        run2.window_start,
        run1.last_processed.as_ref().unwrap().time,
        "run 2 starts where run 1 ended"
    );
    assert_eq!(run2.window_start_run_id, first.run_id);
    assert_eq!(
        manifest_of_ended(&s3, &bucket, &first.run_id).await,
        m1,
        "run 1's lost manifest written again, the same"
    );
    assert_eq!(
        run2.counters.get("extracted"),
        Some(&6),
        "the 5 changes and the late-visible write: {:?}",
        run2.counters
    );
    assert_eq!(manifest_of_ended(&s3, &bucket, &second).await["count"], 6);
    let objects = S3Sink::new(s3.clone(), &bucket, "out/");
    assert_eq!(objects.count().await.unwrap(), 21, "one object per key");
    let r00 = objects.read(&schema_key("r00")).await.unwrap().unwrap();
    assert_eq!(
        r00.1.get("v"),
        Some(&AttrValue::n(2i64)),
        "the latest version replaced the older"
    );

    // A job whose target is missing fails its run, writes no manifest and
    // blocks the next run until the failure is acknowledged.
    let missing = unique_name("missing");
    let broken = unique_name("broken");
    let failed = plane
        .replicator
        .create_incremental_extract(pb::CreateIncrementalExtractRequest {
            job_name: broken.clone(),
            spec: Some(spec(&missing)),
            run_now: true,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run = wait_run(&mut plane.jobs, &failed.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Failed as i32, "{run:?}");
    S3Sink::ensure_bucket(&s3, &missing).await.unwrap();
    assert!(
        manifest(&s3, &missing, &failed.run_id).await.is_none(),
        "a failed run writes no manifest"
    );
    let refused = start(&mut plane.jobs, &broken).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    plane
        .jobs
        .acknowledge_failure(jt::AcknowledgeFailureRequest {
            job_name: broken.clone(),
            run_id: failed.run_id.clone(),
            actor: "test".to_owned(),
            reason: "bucket created".to_owned(),
        })
        .await
        .unwrap();
    let retry = start(&mut plane.jobs, &broken).await.unwrap();
    let run = wait_run(&mut plane.jobs, &retry).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    assert_eq!(
        run.window_start, None,
        "no run succeeded before: from the beginning"
    );
    // A unit of the failed run may still have written some objects after the
    // bucket appeared (its writes are versioned, so the retry skips those).
    let c = |k: &str| run.counters.get(k).copied().unwrap_or_default();
    assert_eq!(
        c("extracted") + c("skipped_older"),
        21,
        "{:?}",
        run.counters
    );
    assert_eq!(
        S3Sink::new(s3.clone(), &missing, "out/")
            .count()
            .await
            .unwrap(),
        21
    );
}

/// A TCP forwarder to `upstream` (host:port) that, while the flag it
/// returns is set, takes each connection and closes it at once: a store
/// that resets every request, until it is switched back on.
async fn switchable_proxy(upstream: String) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = Arc::clone(&down);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (format!("http://{addr}"), down)
}

// A segment that fails retryably (its target unreachable for a while) is
// attempted again from its checkpoint; it does not fail its run, which
// would block the job's schedule until an operator acknowledged it (found
// by the 10-minute fault matrix: a store fault failed an extract run and
// every later due run was skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extract_segment_that_fails_retryably_is_retried_without_failing_its_run() {
    let (name, _table, s3, bucket) = extract_fixture("extract-blip").await;
    let upstream = tidemark_connectors::testing::local_env("TIDEMARK_TEST_S3_ENDPOINT");
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (endpoint, down) = switchable_proxy(upstream).await;
    let allowed = endpoint.clone();
    let mut plane = plane(move |c| c.allowed_endpoints = allowed).await;
    let created = plane
        .replicator
        .create_incremental_extract(pb::CreateIncrementalExtractRequest {
            job_name: unique_name("blip"),
            spec: Some(extract_spec(&name, &bucket, &endpoint)),
            run_now: true,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Wait for a segment's first attempt to fail (the S3 client gives up
    // after its own retries, some seconds) and go back to the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let failed = loop {
        let units = plane
            .jobs
            .list_units(jt::ListUnitsRequest {
                run_id: created.run_id.clone(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .units;
        if let Some(u) = units.into_iter().find(|u| !u.last_error.is_empty()) {
            break u;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no segment failed with its target unreachable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        failed.status,
        jt::UnitStatus::NotMigrated as i32,
        "a retryable failure puts the segment back: {failed:?}"
    );
    let run = plane
        .jobs
        .get_run(jt::GetRunRequest {
            run_id: created.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(
        run.status,
        jt::RunStatus::Running as i32,
        "the run goes on after a retryable failure: {run:?}"
    );
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let run = wait_run(&mut plane.jobs, &created.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    let objects = S3Sink::new(s3.clone(), &bucket, "out/");
    assert_eq!(objects.count().await.unwrap(), 20, "every item extracted");
    assert!(
        manifest(&s3, &bucket, &created.run_id).await.is_some(),
        "the run's manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_is_read_through_its_index_when_one_is_named() {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType,
    };
    let client = dynamo().await;
    let name = unique_name("indexed");
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .unwrap()
    };
    client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("id"))
        .attribute_definitions(attr("courseId"))
        .key_schema(key("id", KeyType::Hash))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("byCourse")
                .key_schema(key("courseId", KeyType::Hash))
                // Keys only: the worker must read the items themselves.
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let table = DynamoTable::open(client, &name).await.unwrap();
    seed_units(&table, &[("c1", 40), ("c2", 15)]).await;
    let s3 = s3_client().await;
    let bucket = unique_name("indexed");
    S3Sink::ensure_bucket(&s3, &bucket).await.unwrap();
    let mut plane = plane(|_| {}).await;
    let started = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: unique_name("by-index"),
            spec: Some(pb::MigrateUnitSpec {
                source: Some(table_ref(&name)),
                unit_attribute: "courseId".to_owned(),
                index_name: "byCourse".to_owned(),
                target: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::S3Prefix(
                        common_pb::S3PrefixRef {
                            bucket: bucket.clone(),
                            prefix: "u/".to_owned(),
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
            unit_keys: vec!["c1".to_owned(), "c2".to_owned()],
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    let c1 = S3Sink::new(s3.clone(), &bucket, "u/c1/");
    assert_eq!(c1.count().await.unwrap(), 40);
    let (_, copied) = c1.read(&schema_key("c1-007")).await.unwrap().unwrap();
    assert_eq!(
        copied.get("payload"),
        Some(&AttrValue::n(7i64)),
        "whole items, not the index projection"
    );
    assert_eq!(S3Sink::new(s3, &bucket, "u/c2/").count().await.unwrap(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extract_queries_its_changed_items_index_per_partition_value() {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType,
    };
    let client = dynamo().await;
    let name = unique_name("by-time");
    let attr = |n: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(t)
            .build()
            .unwrap()
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .unwrap()
    };
    client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("id", ScalarAttributeType::S))
        .attribute_definitions(attr("shard", ScalarAttributeType::S))
        .attribute_definitions(attr("updated_at", ScalarAttributeType::N))
        .key_schema(key("id", KeyType::Hash))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("byTime")
                .key_schema(key("shard", KeyType::Hash))
                .key_schema(key("updated_at", KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let table = DynamoTable::open(client, &name).await.unwrap();
    let put = |i: u32, age_ms: i64, v: i64| {
        item(&[
            ("id", AttrValue::s(format!("r{i:02}"))),
            ("shard", AttrValue::s((i % 2).to_string())),
            ("updated_at", millis_ago(age_ms)),
            ("v", AttrValue::n(v)),
        ])
    };
    for i in 0..20 {
        table.put(&put(i, 3_600_000, 1), None).await.unwrap();
    }
    let s3 = s3_client().await;
    let bucket = unique_name("by-time");
    S3Sink::ensure_bucket(&s3, &bucket).await.unwrap();
    let mut plane = plane(|_| {}).await;
    let job = unique_name("indexed-extract");
    let first = plane
        .replicator
        .create_incremental_extract(pb::CreateIncrementalExtractRequest {
            job_name: job.clone(),
            spec: Some(pb::IncrementalExtractSpec {
                source: Some(table_ref(&name)),
                changed_at_attribute: "updated_at".to_owned(),
                changed_at_encoding: common_pb::TimeEncoding::EpochMillis as i32,
                index: Some(pb::ChangedItemsIndex {
                    index_name: "byTime".to_owned(),
                    partition_attribute: "shard".to_owned(),
                    partition_values: ["0", "1"]
                        .iter()
                        .map(|v| value_to_proto(&AttrValue::s(*v)))
                        .collect(),
                }),
                target: Some(common_pb::DataStore {
                    store: Some(common_pb::data_store::Store::S3Prefix(
                        common_pb::S3PrefixRef {
                            bucket: bucket.clone(),
                            prefix: "out/".to_owned(),
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
            run_now: true,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run1 = wait_run(&mut plane.jobs, &first.run_id).await;
    assert_eq!(run1.status, jt::RunStatus::Succeeded as i32, "{run1:?}");
    assert_eq!(
        run1.counters.get("extracted"),
        Some(&20),
        "{:?}",
        run1.counters
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in [1, 2, 3] {
        table.put(&put(i, 0, 2), None).await.unwrap();
    }
    // Past the default settle lag (2 s), so run 2's window holds them.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = start(&mut plane.jobs, &job).await.unwrap();
    let run2 = wait_run(&mut plane.jobs, &second).await;
    assert_eq!(run2.status, jt::RunStatus::Succeeded as i32, "{run2:?}");
    assert_eq!(
        run2.counters.get("extracted"),
        Some(&3),
        "{:?}",
        run2.counters
    );
    assert_eq!(manifest_of_ended(&s3, &bucket, &second).await["count"], 3);
}

/// A unit with a version attribute (items at version 3) into Elasticsearch,
/// streamed in pages, fails once and is rolled back; the rerun migrates it whole at the items'
/// own versions. A rollback that left tombstones at a time-derived version
/// made every later copy stale, so the unit could never migrate (#19.10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_versioned_unit_migrates_on_the_rerun() {
    const UNIT: u64 = 4_500;
    let name = unique_name("vunits");
    let table = DynamoTable::create(dynamo().await, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    // More than one source page per scan segment: the unit is streamed
    // page by page, and the rollback removes every page it wrote.
    let puts: Vec<Item> = (0..UNIT)
        .map(|i| {
            item(&[
                ("id", AttrValue::s(format!("v1-{i:04}"))),
                ("courseId", AttrValue::s("v1")),
                ("v", AttrValue::n(3i64)),
            ])
        })
        .collect();
    futures::stream::iter(puts.iter().map(|it| table.put(it, None)))
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let index = unique_name("vunits");
    let spec = pb::MigrateUnitSpec {
        source: Some(table_ref(&name)),
        unit_attribute: "courseId".to_owned(),
        version_attribute: "v".to_owned(),
        target: Some(common_pb::DataStore {
            store: Some(common_pb::data_store::Store::ElasticsearchIndex(
                common_pb::ElasticsearchIndexRef {
                    index: index.clone(),
                    endpoint: String::new(),
                },
            )),
        }),
        ..Default::default()
    };
    let job = unique_name("vmigrate");
    let units = vec!["v1".to_owned()];
    let dir = tempfile::tempdir().unwrap();
    let first_run = {
        let mut plane = plane_in(dir.path(), |c| c.inject_unit_fault = Some("v1".to_owned())).await;
        let started = plane
            .replicator
            .migrate_unit(pb::MigrateUnitRequest {
                job_name: job.clone(),
                spec: Some(spec.clone()),
                unit_keys: units.clone(),
                actor: "test".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let run = wait_run(&mut plane.jobs, &started.run_id).await;
        assert_eq!(run.status, jt::RunStatus::Failed as i32, "{run:?}");
        plane.stop.cancel();
        started.run_id
    };
    let es = tidemark_connectors::testing::local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let reader = tidemark_connectors::elasticsearch::ElasticsearchSink::connect(
        &es,
        &index,
        KeySchema::new("id", None),
    )
    .await
    .unwrap();
    let live = || async {
        reader
            .digest(1)
            .await
            .unwrap()
            .iter()
            .map(|d| d.count)
            .sum::<u64>()
    };
    assert_eq!(live().await, 0, "the failed unit left no copy");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut plane = plane_in(dir.path(), |_| {}).await;
    plane
        .jobs
        .acknowledge_failure(jt::AcknowledgeFailureRequest {
            job_name: job.clone(),
            run_id: first_run,
            actor: "test".to_owned(),
            reason: "fault was injected".to_owned(),
        })
        .await
        .unwrap();
    let started = plane
        .replicator
        .migrate_unit(pb::MigrateUnitRequest {
            job_name: job.clone(),
            unit_keys: units,
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let run = wait_run(&mut plane.jobs, &started.run_id).await;
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    assert_eq!(live().await, UNIT, "the rerun copied the whole unit");
    let key = tidemark_connectors::Key::single("id", AttrValue::s("v1-4007"));
    assert_eq!(reader.read(&key).await.unwrap().map(|(v, _)| v), Some(3));
}
