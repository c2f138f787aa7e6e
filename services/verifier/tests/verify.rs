//! The verifier over gRPC, in process with a real job-tracker, against the
//! real local components (DynamoDB and S3 endpoint, Elasticsearch) and the
//! embedded store. A component that is not up fails the test loudly.
//!
//! Every pair is seeded directly through the connectors, the way the
//! replicator writes a target (versioned sink writes), then divergences of
//! each kind are planted and must all be found, with none on an identical
//! pair.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_connectors::dynamodb::{DynamoSink, DynamoTable};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::s3::S3Sink;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::{dynamodb_clients, local_env, s3_client, unique_name};
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, Sink, SinkOp, SinkRecord, SourceTable};
use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::common::v1 as common;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1 as jpb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::verifier::v1 as pb;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

struct Harness {
    dir: tempfile::TempDir,
    stop: CancellationToken,
    client: VerifierServiceClient<Channel>,
    jobs: JobTrackerServiceClient<Channel>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The local test credentials and endpoint, as the other connector tests use.
async fn aws_base() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT"))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "verifier-tests",
        ))
        .load()
        .await
}

async fn listener() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn server(addr: std::net::SocketAddr) -> ServerConfig {
    ServerConfig {
        listen: addr,
        shutdown_grace_ms: 2000,
        ..ServerConfig::default()
    }
}

/// A job-tracker and a verifier, each on its own port, sharing a data dir.
async fn harness() -> Harness {
    harness_with(|_| {}).await
}

async fn harness_with(tweak: impl FnOnce(&mut verifier::Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (jl, ja) = listener().await;
    let jobs_config = job_tracker::Config {
        server: server(ja),
        data_dir: dir.path().join("jobs"),
        ..job_tracker::Config::default()
    };
    tokio::spawn(job_tracker::run(jobs_config, jl, stop.clone()));
    let (vl, va) = listener().await;
    let config = verifier::Config {
        server: server(va),
        job_tracker_url: format!("http://{ja}"),
        // Nothing answers here: these tests use no pipeline.
        replicator_url: "http://127.0.0.1:9".to_owned(),
        aws_endpoint: Some(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")),
        elasticsearch_url: Some(local_env("TIDEMARK_TEST_ELASTICSEARCH_URL")),
        data_dir: dir.path().to_owned(),
        worker_id: unique_name("verifier"),
        concurrency: 2,
        ..verifier::Config::default()
    };
    let mut config = config;
    tweak(&mut config);
    let mut host = ServiceHost::new(config.server.clone(), stop.clone());
    verifier::register_with(&config, Some(aws_base().await), &mut host)
        .await
        .unwrap();
    tokio::spawn(host.serve(vl));
    let channel = |a| {
        Channel::from_shared(format!("http://{a}"))
            .unwrap()
            .connect_lazy()
    };
    Harness {
        dir,
        stop,
        client: VerifierServiceClient::new(channel(va)),
        jobs: JobTrackerServiceClient::new(channel(ja)),
    }
}

fn sqlite_store(h: &Harness) -> EmbeddedStore {
    EmbeddedStore::open(&verifier::side::sqlite_path(h.dir.path(), None)).unwrap()
}

fn item(id: &str, v: u64, body: &str) -> Item {
    [
        ("id".to_owned(), AttrValue::s(id)),
        ("v".to_owned(), AttrValue::n(v)),
        ("body".to_owned(), AttrValue::s(body)),
        (
            "score".to_owned(),
            AttrValue::n(i64::try_from(v).unwrap() * 3),
        ),
        (
            "tags".to_owned(),
            AttrValue::Ss(["a".to_owned(), "b".to_owned()].into()),
        ),
        (
            "meta".to_owned(),
            AttrValue::M(BTreeMap::from([
                ("x".to_owned(), AttrValue::Bool(true)),
                ("bin".to_owned(), AttrValue::B(vec![0, 1, 2])),
            ])),
        ),
    ]
    .into()
}

fn key(id: &str) -> Key {
    Key::single("id", AttrValue::s(id))
}

fn upsert(item: &Item) -> SinkRecord {
    let version = item["v"].as_number().unwrap().as_u64().unwrap();
    SinkRecord {
        key: key(item["id"].as_s().unwrap()),
        version,
        op: SinkOp::Upsert(item.clone()),
    }
}

/// What was planted in a target: one key per kind.
struct Seeded {
    missing: Key,
    extra: Key,
    stale: Key,
    different: Key,
}

/// Writes `n` items to `source` and the same to `target` through its sink
/// writes, except for one divergence of each kind when `diverge`.
async fn seed(source: &dyn SourceTable, target: &dyn Sink, n: usize, diverge: bool) -> Seeded {
    let items: Vec<Item> = (0..n)
        .map(|i| item(&format!("item-{i:05}"), 5 + (i as u64 % 7), "hello"))
        .collect();
    futures::future::try_join_all(items.iter().map(|it| source.put(it, None)))
        .await
        .unwrap();
    let seeded = Seeded {
        missing: key("item-00001"),
        extra: key("extra-1"),
        stale: key("item-00002"),
        different: key("item-00003"),
    };
    let mut records = Vec::new();
    for it in &items {
        let k = key(it["id"].as_s().unwrap());
        if diverge && k == seeded.missing {
            continue;
        }
        if diverge && k == seeded.stale {
            let mut old = it.clone();
            let v = old["v"].as_number().unwrap().as_u64().unwrap() - 1;
            old.insert("v".to_owned(), AttrValue::n(v));
            old.insert("body".to_owned(), AttrValue::s("older"));
            records.push(upsert(&old));
            continue;
        }
        if diverge && k == seeded.different {
            let mut other = it.clone();
            other.insert("body".to_owned(), AttrValue::s("changed behind our back"));
            records.push(upsert(&other));
            continue;
        }
        records.push(upsert(it));
    }
    if diverge {
        records.push(upsert(&item("extra-1", 9, "resurrected")));
    }
    for chunk in records.chunks(500) {
        target.apply(chunk).await.unwrap();
    }
    seeded
}

fn dynamo_store(table: &str) -> common::DataStore {
    common::DataStore {
        store: Some(Store::DynamodbTable(common::DynamoDbTableRef {
            table_name: table.to_owned(),
            ..Default::default()
        })),
    }
}

fn sqlite_ref(table: &str, keys: &[&str]) -> common::DataStore {
    common::DataStore {
        store: Some(Store::SqliteTable(common::SqliteTableRef {
            table_name: table.to_owned(),
            database: String::new(),
            key_attribute_names: keys.iter().map(|k| (*k).to_owned()).collect(),
        })),
    }
}

fn es_store(index: &str) -> common::DataStore {
    common::DataStore {
        store: Some(Store::ElasticsearchIndex(common::ElasticsearchIndexRef {
            index: index.to_owned(),
            endpoint: String::new(),
        })),
    }
}

fn s3_store(bucket: &str, prefix: &str) -> common::DataStore {
    common::DataStore {
        store: Some(Store::S3Prefix(common::S3PrefixRef {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            ..Default::default()
        })),
    }
}

fn digest(name: &str, buckets: u32) -> pb::Check {
    pb::Check {
        name: name.to_owned(),
        kind: Some(pb::check::Kind::Digest(pb::DigestCheck {
            buckets,
            versions_only: false,
        })),
    }
}

fn count(name: &str) -> pb::Check {
    pb::Check {
        name: name.to_owned(),
        kind: Some(pb::check::Kind::Count(pb::CountCheck::default())),
    }
}

fn predicate(name: &str, side: pb::Side, expr: &str, attr: &str, expected: i64) -> pb::Check {
    pb::Check {
        name: name.to_owned(),
        kind: Some(pb::check::Kind::Predicate(pb::PredicateCheck {
            side: side as i32,
            filter_expression: expr.to_owned(),
            expression_attribute_names: [("#a".to_owned(), attr.to_owned())].into(),
            expression_attribute_values: Default::default(),
            expected_count: expected,
        })),
    }
}

/// Quick re-checks: one round after 200 ms (nothing is catching up).
fn quick() -> Option<pb::RecheckPolicy> {
    Some(pb::RecheckPolicy {
        rounds: 1,
        min_wait: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        pipeline_name: String::new(),
    })
}

fn spec(
    source: common::DataStore,
    target: Option<common::DataStore>,
    checks: Vec<pb::Check>,
) -> pb::VerificationSpec {
    pb::VerificationSpec {
        source: Some(source),
        target,
        version_attribute: "v".to_owned(),
        checks,
        recheck: quick(),
        segments: 4,
        sample_size: 2,
        ..Default::default()
    }
}

async fn start(h: &mut Harness, spec: pb::VerificationSpec) -> String {
    h.client
        .start_verification(pb::StartVerificationRequest {
            job_name: unique_name("verify"),
            spec: Some(spec),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .verification_id
}

/// Polls GetReport until the verification has finished.
async fn finished(h: &mut Harness, id: &str) -> pb::Report {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let report = h
            .client
            .get_report(pb::GetReportRequest {
                verification_id: id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .report
            .unwrap();
        if report.status == pb::VerificationStatus::Completed as i32
            || report.status == pb::VerificationStatus::Failed as i32
        {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "verification {id} did not finish: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn verify(h: &mut Harness, spec: pb::VerificationSpec) -> pb::Report {
    let id = start(h, spec).await;
    finished(h, &id).await
}

fn check<'a>(report: &'a pb::Report, name: &str) -> &'a pb::CheckResult {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:?}"))
}

async fn all_mismatches(
    h: &mut Harness,
    id: &str,
    kinds: Vec<pb::MismatchKind>,
) -> Vec<pb::Mismatch> {
    let mut stream = h
        .client
        .stream_mismatches(pb::StreamMismatchesRequest {
            verification_id: id.to_owned(),
            kinds: kinds.into_iter().map(|k| k as i32).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend(m.mismatches);
    }
    out
}

fn key_id(m: &pb::Mismatch) -> String {
    match &m.key.as_ref().unwrap().attributes["id"].value {
        Some(common::attribute_value::Value::S(s)) => s.clone(),
        other => panic!("unexpected key {other:?}"),
    }
}

/// Every planted divergence, each with its kind; nothing else.
fn assert_found(report: &pb::Report, mismatches: &[pb::Mismatch], seeded: &Seeded, n: i64) {
    let d = check(report, "digest");
    assert_eq!(d.verdict, pb::Verdict::Fail as i32, "{d:?}");
    assert_eq!(
        d.mismatches,
        Some(pb::MismatchCounts {
            missing_in_target: 1,
            extra_in_target: 1,
            stale_version: 1,
            different_content: 1,
        }),
        "{d:?}"
    );
    assert_eq!(d.source_count, n);
    assert_eq!(d.target_count, n);
    assert_eq!(
        d.sample_mismatches.len(),
        2,
        "samples are capped at sample_size"
    );
    let mut kinds: Vec<(String, i32)> = mismatches
        .iter()
        .filter(|m| m.check_name == "digest")
        .map(|m| (key_id(m), m.kind))
        .collect();
    kinds.sort();
    let id = |k: &Key| k.get("id").unwrap().as_s().unwrap().to_owned();
    let mut want = vec![
        (
            id(&seeded.missing),
            pb::MismatchKind::MissingInTarget as i32,
        ),
        (id(&seeded.extra), pb::MismatchKind::ExtraInTarget as i32),
        (id(&seeded.stale), pb::MismatchKind::StaleVersion as i32),
        (
            id(&seeded.different),
            pb::MismatchKind::DifferentContent as i32,
        ),
    ];
    want.sort();
    assert_eq!(kinds, want);
    assert_eq!(report.verdict, pb::Verdict::Fail as i32);
}

#[tokio::test]
async fn sqlite_pair_every_divergence_found_and_identical_pair_passes() {
    let mut h = harness().await;
    let store = sqlite_store(&h);
    let schema = KeySchema::new("id", None);
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    let seeded = seed(
        &store.table(&src, schema.clone()),
        &store.sink(&dst),
        300,
        true,
    )
    .await;
    let id = start(
        &mut h,
        spec(
            sqlite_ref(&src, &["id"]),
            Some(sqlite_ref(&dst, &[])),
            vec![digest("digest", 64), count("count")],
        ),
    )
    .await;
    let report = finished(&mut h, &id).await;
    let all = all_mismatches(&mut h, &id, vec![]).await;
    assert_found(&report, &all, &seeded, 300);
    // Counts agree: one missing and one extra cancel out.
    assert_eq!(check(&report, "count").verdict, pb::Verdict::Pass as i32);
    let stale = all_mismatches(&mut h, &id, vec![pb::MismatchKind::StaleVersion]).await;
    assert_eq!(stale.len(), 1);
    assert_eq!((stale[0].source_version, stale[0].target_version), (7, 6));

    // Kept in the job-tracker: the run FAILED with the report as its result.
    let run = h
        .jobs
        .get_run(jpb::GetRunRequest { run_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.status, jpb::RunStatus::Failed as i32);
    let stored: pb::Report =
        tidemark_kit::worker::unpack_any(run.result.as_ref(), verifier::REPORT_TYPE).unwrap();
    assert_eq!(stored.verification_id, id);
    assert_eq!(stored.checks.len(), 2);

    let (src2, dst2) = (unique_name("src"), unique_name("dst"));
    seed(&store.table(&src2, schema), &store.sink(&dst2), 300, false).await;
    let id = start(
        &mut h,
        spec(
            sqlite_ref(&src2, &["id"]),
            Some(sqlite_ref(&dst2, &[])),
            vec![digest("digest", 64), count("count")],
        ),
    )
    .await;
    let report = finished(&mut h, &id).await;
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
    assert_eq!(report.mismatches, Some(pb::MismatchCounts::default()));
    // Summed over the two checks.
    assert_eq!(report.items_compared, 600);
    assert!(all_mismatches(&mut h, &id, vec![]).await.is_empty());
    let run = h
        .jobs
        .get_run(jpb::GetRunRequest { run_id: id })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.status, jpb::RunStatus::Succeeded as i32);
}

#[tokio::test]
async fn stream_returns_every_mismatch_beyond_the_sample() {
    let mut h = harness().await;
    let store = sqlite_store(&h);
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    let source = store.table(&src, KeySchema::new("id", None));
    // 2500 items, none in the target: more than two stream messages.
    let items: Vec<Item> = (0..2500)
        .map(|i| item(&format!("m-{i:05}"), 1, "x"))
        .collect();
    for it in &items {
        source.put(it, None).await.unwrap();
    }
    store
        .sink(&dst)
        .apply(&[upsert(&item("m-00000", 1, "x"))])
        .await
        .unwrap();
    let mut s = spec(
        sqlite_ref(&src, &["id"]),
        Some(sqlite_ref(&dst, &[])),
        vec![digest("digest", 16)],
    );
    s.sample_size = 10;
    let id = start(&mut h, s).await;
    let report = finished(&mut h, &id).await;
    let d = check(&report, "digest");
    assert_eq!(d.mismatches.as_ref().unwrap().missing_in_target, 2499);
    assert_eq!(d.sample_mismatches.len(), 10);
    let all = all_mismatches(&mut h, &id, vec![]).await;
    assert_eq!(all.len(), 2499);
    let distinct: std::collections::BTreeSet<String> = all.iter().map(key_id).collect();
    assert_eq!(distinct.len(), 2499);
    // Filtering by a kind that did not occur yields nothing.
    assert!(
        all_mismatches(&mut h, &id, vec![pb::MismatchKind::ExtraInTarget])
            .await
            .is_empty()
    );
    // An unknown check name is refused.
    let err = h
        .client
        .stream_mismatches(pb::StreamMismatchesRequest {
            verification_id: id,
            check_name: "nope".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// An empty target differs in every bucket: the drill-down reads the
/// differing buckets a batch at a time and stops at `drill.max_kept`
/// mismatches instead of loading the whole source; the check fails and
/// says how much it did not read.
#[tokio::test]
async fn a_drill_down_into_an_empty_target_keeps_a_bounded_number_of_mismatches() {
    let mut h = harness_with(|c| {
        c.drill_batch_entries = 200;
        c.max_mismatches_kept = 150;
    })
    .await;
    let store = sqlite_store(&h);
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    let source = store.table(&src, KeySchema::new("id", None));
    for i in 0..2000 {
        source
            .put(&item(&format!("m-{i:05}"), 1, "x"), None)
            .await
            .unwrap();
    }
    store
        .sink(&dst)
        .apply(&[upsert(&item("m-00000", 1, "x"))])
        .await
        .unwrap();
    let id = start(
        &mut h,
        spec(
            sqlite_ref(&src, &["id"]),
            Some(sqlite_ref(&dst, &[])),
            vec![digest("digest", 64)],
        ),
    )
    .await;
    let report = finished(&mut h, &id).await;
    let d = check(&report, "digest");
    assert_eq!(d.verdict, pb::Verdict::Fail as i32, "{d:?}");
    assert_eq!(
        d.mismatches.as_ref().unwrap().missing_in_target,
        150,
        "{d:?}"
    );
    assert!(d.detail.contains("were not read"), "{}", d.detail);
    let all = all_mismatches(&mut h, &id, vec![]).await;
    assert_eq!(all.len(), 150);
    // The kept ones are real: every one is missing from the target.
    assert!(
        all.iter()
            .all(|m| m.kind == pb::MismatchKind::MissingInTarget as i32 && key_id(m) != "m-00000")
    );
}

#[tokio::test]
async fn sqlite_identical_100k_pair_reports_zero_mismatches() {
    let mut h = harness().await;
    let store = sqlite_store(&h);
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    let source = store.table(&src, KeySchema::new("id", None));
    let sink = store.sink(&dst);
    let n = 100_000;
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        let it = item(
            &format!("k-{i:06}"),
            1 + (i as u64 % 100),
            "the same on both sides",
        );
        source.put(&it, None).await.unwrap();
        batch.push(upsert(&it));
        if batch.len() == 5000 {
            sink.apply(&batch).await.unwrap();
            batch.clear();
        }
    }
    let started = Instant::now();
    let report = verify(
        &mut h,
        spec(
            sqlite_ref(&src, &["id"]),
            Some(sqlite_ref(&dst, &[])),
            vec![digest("digest", 0), count("count")],
        ),
    )
    .await;
    eprintln!("100k identical items verified in {:?}", started.elapsed());
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
    assert_eq!(check(&report, "digest").source_count, n);
    assert_eq!(check(&report, "digest").target_count, n);
    assert_eq!(report.mismatches, Some(pb::MismatchCounts::default()));
}

async fn dynamo_source() -> (DynamoTable, String) {
    let (client, _) = dynamodb_clients().await;
    let name = unique_name("verify-src");
    let table = DynamoTable::create(client, &name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    (table, name)
}

#[tokio::test]
async fn dynamodb_to_elasticsearch_every_divergence_found() {
    let mut h = harness().await;
    let (table, name) = dynamo_source().await;
    let url = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let schema = KeySchema::new("id", None);
    let bad = unique_name("verify-es");
    let good = unique_name("verify-es");
    let bad_sink = ElasticsearchSink::connect(&url, &bad, schema.clone())
        .await
        .unwrap();
    let seeded = seed(&table, &bad_sink, 60, true).await;
    // The identical index holds what the source holds.
    let good_sink = ElasticsearchSink::connect(&url, &good, schema)
        .await
        .unwrap();
    let mut records = Vec::new();
    let mut start = None;
    loop {
        let mut r = tidemark_connectors::ScanRequest::segment(0, 1);
        r.start_after = start;
        let page = table.scan(&r).await.unwrap();
        records.extend(page.items.iter().map(upsert));
        match page.last_key {
            Some(k) => start = Some(k),
            None => break,
        }
    }
    good_sink.apply(&records).await.unwrap();

    let id = start_spec(
        &mut h,
        spec(
            dynamo_store(&name),
            Some(es_store(&bad)),
            vec![digest("digest", 8), count("count")],
        ),
    )
    .await;
    let report = finished(&mut h, &id).await;
    let all = all_mismatches(&mut h, &id, vec![]).await;
    assert_found(&report, &all, &seeded, 60);

    let report = verify(
        &mut h,
        spec(
            dynamo_store(&name),
            Some(es_store(&good)),
            vec![digest("digest", 8), count("count")],
        ),
    )
    .await;
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
    assert_eq!(report.mismatches, Some(pb::MismatchCounts::default()));
}

async fn start_spec(h: &mut Harness, s: pb::VerificationSpec) -> String {
    start(h, s).await
}

#[tokio::test]
async fn dynamodb_to_s3_every_divergence_found_and_identical_passes() {
    let mut h = harness().await;
    let (table, name) = dynamo_source().await;
    let client = s3_client().await;
    let bucket = unique_name("verify-bucket");
    S3Sink::ensure_bucket(&client, &bucket).await.unwrap();
    let bad = S3Sink::new(client.clone(), &bucket, "bad/");
    let seeded = seed(&table, &bad, 40, true).await;
    let id = start(
        &mut h,
        spec(
            dynamo_store(&name),
            Some(s3_store(&bucket, "bad/")),
            vec![digest("digest", 8)],
        ),
    )
    .await;
    let report = finished(&mut h, &id).await;
    let all = all_mismatches(&mut h, &id, vec![]).await;
    assert_found(&report, &all, &seeded, 40);

    // Same source, a faithful copy under another prefix.
    let good = S3Sink::new(client, &bucket, "good/");
    let mut records = Vec::new();
    for i in 0..40 {
        records.push(upsert(
            &table
                .get(&key(&format!("item-{i:05}")))
                .await
                .unwrap()
                .unwrap(),
        ));
    }
    good.apply(&records).await.unwrap();
    let report = verify(
        &mut h,
        spec(
            dynamo_store(&name),
            Some(s3_store(&bucket, "good/")),
            vec![digest("digest", 8), count("count")],
        ),
    )
    .await;
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
}

#[tokio::test]
async fn dynamodb_target_without_source_versions_compares_content() {
    // No version attribute: versions are the target's own; content decides.
    let mut h = harness().await;
    let (table, name) = dynamo_source().await;
    let (client, _) = dynamodb_clients().await;
    let target_name = unique_name("verify-dst");
    let target = DynamoTable::create(client, &target_name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    let seeded = seed(&table, &DynamoSink::new(target), 30, true).await;
    let mut s = spec(
        dynamo_store(&name),
        Some(dynamo_store(&target_name)),
        vec![digest("digest", 8)],
    );
    s.version_attribute = String::new();
    let report = verify(&mut h, s).await;
    let d = check(&report, "digest");
    // The stale item differs in content; without source versions it cannot
    // be told apart from a foreign write.
    assert_eq!(
        d.mismatches,
        Some(pb::MismatchCounts {
            missing_in_target: 1,
            extra_in_target: 1,
            stale_version: 0,
            different_content: 2,
        }),
        "{d:?}"
    );
    let _ = seeded;
}

#[tokio::test]
async fn versions_only_without_versions_is_refused_not_passed() {
    // Without a version attribute on the source there are no versions to
    // compare: a versions-only digest would compare nothing and pass.
    let mut h = harness().await;
    let (table, name) = dynamo_source().await;
    let (client, _) = dynamodb_clients().await;
    let target_name = unique_name("verify-dst");
    let target = DynamoTable::create(client, &target_name, &KeySchema::new("id", None), false)
        .await
        .unwrap();
    seed(&table, &DynamoSink::new(target), 10, true).await;
    let mut check = digest("digest", 8);
    if let Some(pb::check::Kind::Digest(d)) = &mut check.kind {
        d.versions_only = true;
    }
    let mut s = spec(
        dynamo_store(&name),
        Some(dynamo_store(&target_name)),
        vec![count("count"), check],
    );
    s.version_attribute = String::new();
    let refused = h
        .client
        .start_verification(pb::StartVerificationRequest {
            job_name: unique_name("verify"),
            spec: Some(s),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("spec.checks[1].digest.versions_only"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn predicates_on_dynamodb_and_sqlite() {
    let mut h = harness().await;
    let (table, name) = dynamo_source().await;
    for i in 0..20 {
        let mut it = item(&format!("p-{i}"), 1, "x");
        it.insert("test".to_owned(), AttrValue::n(1i64));
        table.put(&it, None).await.unwrap();
    }
    let checks = || {
        vec![predicate(
            "no-item-without-test",
            pb::Side::Source,
            "attribute_not_exists(#a)",
            "test",
            0,
        )]
    };
    let report = verify(&mut h, spec(dynamo_store(&name), None, checks())).await;
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
    assert_eq!(check(&report, "no-item-without-test").source_count, 0);
    // Two items lack it: the backfill is not complete.
    table.put(&item("p-late-1", 1, "x"), None).await.unwrap();
    table.put(&item("p-late-2", 1, "x"), None).await.unwrap();
    let report = verify(&mut h, spec(dynamo_store(&name), None, checks())).await;
    let c = check(&report, "no-item-without-test");
    assert_eq!(c.verdict, pb::Verdict::Fail as i32, "{c:?}");
    assert_eq!(c.source_count, 2);

    let store = sqlite_store(&h);
    let src = unique_name("pred");
    let source = store.table(&src, KeySchema::new("id", None));
    for i in 0..10 {
        let mut it = item(&format!("s-{i}"), 1, "x");
        if i % 3 != 0 {
            it.insert("test".to_owned(), AttrValue::n(1i64));
        }
        source.put(&it, None).await.unwrap();
    }
    let report = verify(
        &mut h,
        spec(
            sqlite_ref(&src, &["id"]),
            None,
            vec![
                predicate(
                    "missing-test",
                    pb::Side::Source,
                    "attribute_not_exists(#a)",
                    "test",
                    4,
                ),
                predicate(
                    "begins",
                    pb::Side::Source,
                    "begins_with(#a, :p) AND NOT attribute_exists(test)",
                    "id",
                    4,
                )
                .with_value(":p", "s-"),
            ],
        ),
    )
    .await;
    assert_eq!(report.verdict, pb::Verdict::Pass as i32, "{report:?}");
}

trait WithValue {
    fn with_value(self, name: &str, s: &str) -> Self;
}

impl WithValue for pb::Check {
    fn with_value(mut self, name: &str, s: &str) -> Self {
        if let Some(pb::check::Kind::Predicate(p)) = &mut self.kind {
            p.expression_attribute_values.insert(
                name.to_owned(),
                common::AttributeValue {
                    value: Some(common::attribute_value::Value::S(s.to_owned())),
                },
            );
        }
        self
    }
}

#[tokio::test]
async fn a_target_catching_up_resolves_on_recheck() {
    let mut h = harness().await;
    let store = Arc::new(sqlite_store(&h));
    let (src, dst) = (unique_name("src"), unique_name("dst"));
    let source = store.table(&src, KeySchema::new("id", None));
    let sink = store.sink(&dst);
    let items: Vec<Item> = (0..500)
        .map(|i| item(&format!("c-{i:04}"), 3, "x"))
        .collect();
    for it in &items {
        source.put(it, None).await.unwrap();
    }
    // Five items have not reached the target yet.
    let (late, early) = items.split_at(5);
    sink.apply(&early.iter().map(upsert).collect::<Vec<_>>())
        .await
        .unwrap();
    let mut s = spec(
        sqlite_ref(&src, &["id"]),
        Some(sqlite_ref(&dst, &[])),
        vec![digest("digest", 32)],
    );
    s.recheck = Some(pb::RecheckPolicy {
        rounds: 3,
        min_wait: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        pipeline_name: String::new(),
    });
    let id = start(&mut h, s).await;
    // Once the first pass has run (the verification is RUNNING, and 500
    // embedded items take milliseconds), the replication catches up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = h
            .client
            .get_report(pb::GetReportRequest {
                verification_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .report
            .unwrap();
        if r.status == pb::VerificationStatus::Running as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never running: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    sink.apply(&late.iter().map(upsert).collect::<Vec<_>>())
        .await
        .unwrap();
    let report = finished(&mut h, &id).await;
    let d = check(&report, "digest");
    assert_eq!(d.verdict, pb::Verdict::Pass as i32, "{d:?}");
    assert_eq!(d.resolved_on_recheck, 5, "{d:?}");
    assert_eq!(d.mismatches, Some(pb::MismatchCounts::default()));
    assert!(report.rounds >= 1);
}

fn violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("google.rpc.BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn bad_specs_are_invalid_argument_naming_the_field() {
    let mut h = harness().await;
    let base = || {
        spec(
            sqlite_ref("t", &["id"]),
            Some(es_store("i")),
            vec![digest("d", 0)],
        )
    };
    let cases: Vec<(pb::VerificationSpec, &str)> = vec![
        (
            pb::VerificationSpec {
                checks: vec![],
                ..base()
            },
            "spec.checks",
        ),
        (
            pb::VerificationSpec {
                checks: vec![digest("d", 0), count("d")],
                ..base()
            },
            "spec.checks[1].name",
        ),
        (
            pb::VerificationSpec {
                checks: vec![predicate(
                    "p",
                    pb::Side::Target,
                    "attribute_exists(#a)",
                    "x",
                    0,
                )],
                ..base()
            },
            "spec.checks[0].predicate.side",
        ),
        (
            pb::VerificationSpec {
                checks: vec![predicate(
                    "p",
                    pb::Side::Source,
                    "attribute_exists(#b)",
                    "x",
                    0,
                )],
                ..base()
            },
            "spec.checks[0].predicate.filter_expression",
        ),
        (
            pb::VerificationSpec {
                repair: true,
                ..base()
            },
            "spec.repair",
        ),
        (
            pb::VerificationSpec {
                checks: vec![digest("d", 2_000_000)],
                ..base()
            },
            "spec.checks[0].digest.buckets",
        ),
        (
            pb::VerificationSpec {
                segments: 1001,
                ..base()
            },
            "spec.segments",
        ),
        (
            pb::VerificationSpec {
                target: None,
                ..base()
            },
            "spec.target",
        ),
        (
            pb::VerificationSpec {
                source: None,
                ..base()
            },
            "spec.source",
        ),
        (
            pb::VerificationSpec {
                checks: vec![pb::Check {
                    name: "c".into(),
                    kind: None,
                }],
                ..base()
            },
            "spec.checks[0]",
        ),
    ];
    for (spec, field) in cases {
        let err = h
            .client
            .start_verification(pb::StartVerificationRequest {
                spec: Some(spec),
                actor: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            violations(&err).iter().any(|f| f == field),
            "{field}: {err:?}"
        );
    }
    let err = h
        .client
        .start_verification(pb::StartVerificationRequest {
            spec: Some(base()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["actor".to_owned()]);
    // A store that does not exist, an unknown verification.
    let err = h
        .client
        .start_verification(pb::StartVerificationRequest {
            spec: Some(spec(
                dynamo_store(&unique_name("absent")),
                Some(es_store("i")),
                vec![digest("d", 0)],
            )),
            actor: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = h
        .client
        .get_report(pb::GetReportRequest {
            verification_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

/// A spec may name only the verifier's own endpoints and those its
/// configuration allows: it reads them with its own credentials. A refused
/// spec creates nothing.
#[tokio::test]
async fn endpoints_a_spec_names_must_be_allowed() {
    let mut h = harness().await;
    let mut source = dynamo_store("items");
    if let Some(Store::DynamodbTable(t)) = source.store.as_mut() {
        t.endpoint = "http://169.254.169.254".to_owned();
    }
    let job_name = unique_name("verify-endpoint");
    let status = h
        .client
        .start_verification(pb::StartVerificationRequest {
            job_name: job_name.clone(),
            spec: Some(spec(source, Some(es_store("items")), vec![count("count")])),
            actor: "t".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("spec.source") && status.message().contains("allowed_endpoints"),
        "{status:?}"
    );
    let job = h.jobs.get_job(jpb::GetJobRequest { name: job_name }).await;
    assert_eq!(
        job.unwrap_err().code(),
        Code::NotFound,
        "a refused spec created its job"
    );
}
