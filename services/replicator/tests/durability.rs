//! `kill -9` of the replicator (the real binary) in the middle of a live
//! backfill and again in the middle of streaming: another replica takes the
//! units over after their leases lapse and resumes from the checkpoints; in
//! the end the index equals the table, with no deleted item back. Also the
//! process's own environment: its Elasticsearch credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::kafka::{KafkaFormat, KafkaSink};
use tidemark_connectors::testing::{
    create_topic, local_env, read_committed, unique_name, workspace_root,
};
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, ScanRequest, Sink, SourceTable};
use tidemark_kit::config::ServerConfig;
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::transport::Channel;

mod common;
use common::{dynamo, table_ref};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A replicator process; killed on drop so a failing test leaves none behind.
struct Replica(Child);

impl Replica {
    fn kill_9(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The AWS settings of the local components (credentials, region), which
/// the child needs in its environment like any AWS program.
fn aws_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("deploy/local/.run/env"))
        .expect("deploy/local/.run/env: start the local components with deploy/local/up");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

fn replica(worker: &str, jobs: SocketAddr, data: &std::path::Path) -> (Replica, SocketAddr) {
    replica_with(worker, jobs, data, &[])
}

/// [`replica`] with more environment (`extra` last, so it wins).
fn replica_with(
    worker: &str,
    jobs: SocketAddr,
    data: &std::path::Path,
    extra: &[(&str, &str)],
) -> (Replica, SocketAddr) {
    let addr = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_replicator"));
    cmd.env("TIDEMARK_LISTEN", addr.to_string())
        .env("TIDEMARK_JOB_TRACKER_URL", format!("http://{jobs}"))
        .env("TIDEMARK_WORKER_ID", worker)
        .env("TIDEMARK_LEASE_SECS", "3")
        .env("TIDEMARK_DATA_DIR", data)
        .env(
            "TIDEMARK_AWS_ENDPOINT",
            local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT"),
        )
        .env(
            "TIDEMARK_ELASTICSEARCH_URL",
            local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        )
        .env(
            "TIDEMARK_KAFKA_BROKERS",
            local_env("TIDEMARK_TEST_KAFKA_BROKERS"),
        )
        .env("TIDEMARK_LOG_LEVEL", "warn")
        .envs(aws_env())
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    (Replica(cmd.spawn().expect("start the replicator")), addr)
}

async fn connect(addr: SocketAddr) -> ReplicatorServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return ReplicatorServiceClient::new(ch);
        }
        assert!(
            Instant::now() < deadline,
            "replicator did not come up on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn schema() -> KeySchema {
    KeySchema::new("pk", None)
}

fn row(i: u32, v: i64) -> Item {
    [
        ("pk".to_owned(), AttrValue::s(format!("k{i:04}"))),
        ("v".to_owned(), AttrValue::n(v)),
    ]
    .into_iter()
    .collect()
}

async fn units(jobs: &mut JobTrackerServiceClient<Channel>, run_id: &str) -> Vec<jt::Unit> {
    jobs.list_units(jt::ListUnitsRequest {
        run_id: run_id.to_owned(),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .units
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backfill_and_mid_stream_loses_nothing() {
    kill_9_mid_backfill_and_mid_stream(pb::BackfillMode::Tombstones, Target::Elasticsearch).await;
}

/// DynamoDB Streams into a compacted Kafka topic, the replicator killed
/// mid-backfill and mid-stream: no key's latest record (newer wins, as a
/// consumer applies them) is older than the source, and no deleted key is
/// live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_into_a_kafka_topic_leaves_no_key_behind() {
    kill_9_mid_backfill_and_mid_stream(pb::BackfillMode::Tombstones, Target::Kafka).await;
}

/// Where the pipeline of a kill test writes.
#[derive(Clone, Copy)]
enum Target {
    Elasticsearch,
    Kafka,
}

impl Target {
    /// The sink's store, created where it must exist, and a reader of it.
    async fn open(self, name: &str) -> (common_pb::DataStore, Box<dyn Sink>) {
        use common_pb::data_store::Store;
        match self {
            Self::Elasticsearch => (
                common_pb::DataStore {
                    store: Some(Store::ElasticsearchIndex(
                        common_pb::ElasticsearchIndexRef {
                            index: name.to_owned(),
                            endpoint: String::new(),
                        },
                    )),
                },
                Box::new(
                    ElasticsearchSink::connect(
                        &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
                        name,
                        schema(),
                    )
                    .await
                    .unwrap(),
                ),
            ),
            Self::Kafka => {
                let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
                create_topic(&brokers, name, 3, true).await;
                (
                    common_pb::DataStore {
                        store: Some(Store::KafkaTopic(common_pb::KafkaTopicRef {
                            topic: name.to_owned(),
                            bootstrap_servers: String::new(),
                        })),
                    },
                    Box::new(
                        KafkaSink::connect(&brokers, name, schema(), KafkaFormat::Json).unwrap(),
                    ),
                )
            }
        }
    }
}

/// The same with a DBLog backfill, whose progress the feed unit checkpoints
/// with its feed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_watermark_backfill_and_mid_stream_loses_nothing() {
    kill_9_mid_backfill_and_mid_stream(pb::BackfillMode::Watermark, Target::Elasticsearch).await;
}

/// The job-tracker in this process, storing in `dir` (replicas run as real
/// processes); it stops when the token is cancelled.
async fn job_tracker(
    dir: &std::path::Path,
) -> (
    SocketAddr,
    JobTrackerServiceClient<Channel>,
    CancellationToken,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jobs_addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = ServerConfig {
        listen: jobs_addr,
        ..ServerConfig::default()
    };
    let mut host = ServiceHost::new(server.clone(), stop.clone());
    job_tracker::register(
        &job_tracker::Config {
            server,
            data_dir: dir.to_owned(),
            ..job_tracker::Config::default()
        },
        &mut host,
    )
    .await
    .unwrap();
    tokio::spawn(async move { host.serve(listener).await });
    let jobs = JobTrackerServiceClient::new(
        Channel::from_shared(format!("http://{jobs_addr}"))
            .unwrap()
            .connect_lazy(),
    );
    (jobs_addr, jobs, stop)
}

/// BackfillAttribute (problem 4) killed with `kill -9` once a segment has
/// checkpointed a page: another replica finishes the run from the
/// checkpoints, and every item ends with the attribute, each page's work
/// done once (a restart from scratch would count the first pages' items
/// again, as already set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_attribute_backfill_resumes_from_the_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs_addr, mut jobs, stop) = job_tracker(dir.path()).await;
    let table_name = unique_name("durable-attr");
    let table = Arc::new(
        DynamoTable::create(dynamo().await, &table_name, &schema(), false)
            .await
            .unwrap(),
    );
    // Two segments of about two pages (200 items) each.
    const N: u32 = 800;
    futures::future::try_join_all((0..N).map(|i| {
        let table = Arc::clone(&table);
        async move { table.put(&row(i, 0), None).await }
    }))
    .await
    .unwrap();
    let (mut first, addr) = replica("replica-a", jobs_addr, &dir.path().join("a"));
    let started = connect(addr)
        .await
        .backfill_attribute(pb::BackfillAttributeRequest {
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(table_ref(&table_name)),
                attribute_name: "migrated".to_owned(),
                value: Some(tidemark_connectors::proto::value_to_proto(&AttrValue::n(
                    1i64,
                ))),
                segments: 2,
                // Slow enough to be killed between pages.
                write_units_per_second: 100,
                writes_in_flight: 0,
            }),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    let checkpointed = loop {
        let units = units(&mut jobs, &started.run_id).await;
        let done = units
            .iter()
            .filter(|u| u.status == jt::UnitStatus::Migrated as i32)
            .count();
        let updated: i64 = units
            .iter()
            .filter(|u| !u.checkpoint.is_empty())
            .map(|u| u.counters.get("updated").copied().unwrap_or(0))
            .sum();
        assert_eq!(done, 0, "a segment finished before the kill: slow it down");
        if updated > 0 {
            break updated;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {units:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.kill_9();
    let (_second, _) = replica("replica-b", jobs_addr, &dir.path().join("b"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let run = jobs
            .get_run(jt::GetRunRequest {
                run_id: started.run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        if run.status != jt::RunStatus::Running as i32 && run.status != jt::RunStatus::Queued as i32
        {
            break run;
        }
        assert!(Instant::now() < deadline, "never finished: {run:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(run.status, jt::RunStatus::Succeeded as i32, "{run:?}");
    let rows = scan(&table).await;
    assert_eq!(rows.len(), N as usize);
    for (key, item) in &rows {
        assert_eq!(
            item.get("migrated"),
            Some(&AttrValue::n(1i64)),
            "{key:?} lacks the attribute"
        );
    }
    let units = units(&mut jobs, &started.run_id).await;
    let count = |name: &str| -> i64 {
        units
            .iter()
            .map(|u| u.counters.get(name).copied().unwrap_or(0))
            .sum()
    };
    assert!(
        units.iter().any(|u| u.attempts >= 2),
        "no unit was taken over: {units:?}"
    );
    // Every item counted once: updated by one replica or the other, or
    // found already set when the uncheckpointed page was read again.
    assert_eq!(count("updated") + count("already_set"), i64::from(N));
    assert!(
        count("updated") >= checkpointed,
        "checkpointed work was forgotten"
    );
    // Only pages after the last checkpoints are read again: fewer items
    // than one page per segment.
    assert!(
        count("already_set") < 2 * 200,
        "the backfill started over: {} items found already set",
        count("already_set")
    );
    stop.cancel();
}

async fn kill_9_mid_backfill_and_mid_stream(mode: pb::BackfillMode, target: Target) {
    // The job-tracker in this process; replicas as real processes.
    let dir = tempfile::tempdir().unwrap();
    let (jobs_addr, mut jobs, stop) = job_tracker(dir.path()).await;

    let table_name = unique_name("durable");
    let table = Arc::new(
        DynamoTable::create(dynamo().await, &table_name, &schema(), true)
            .await
            .unwrap(),
    );
    const N: u32 = 400;
    futures::future::try_join_all((0..N).map(|i| {
        let table = Arc::clone(&table);
        async move { table.put(&row(i, 0), None).await }
    }))
    .await
    .unwrap();
    let (store, reader) = target.open(&unique_name("durable")).await;

    let (mut first, addr) = replica("replica-a", jobs_addr, &dir.path().join("a"));
    let mut client = connect(addr).await;
    let name = unique_name("durable");
    let pipeline = client
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(pb::PipelineSpec {
                source: Some(table_ref(&table_name)),
                feed: Some(pb::ChangeFeed {
                    feed: Some(pb::change_feed::Feed::DynamodbStreams(
                        pb::DynamoDbStreamsFeed::default(),
                    )),
                }),
                sinks: vec![pb::Sink {
                    name: "target".to_owned(),
                    store: Some(store),
                    ..Default::default()
                }],
                backfill: Some(pb::BackfillOptions {
                    mode: mode as i32,
                    segments: 2,
                    chunk_size: 25,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    // Kill as soon as the backfill has checkpointed but not finished: a
    // segment unit, or the feed unit's watermark chunks.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let u = units(&mut jobs, &pipeline.run_id).await;
        let mid = u.iter().any(|u| {
            let c = |k: &str| u.counters.get(k).copied().unwrap_or_default();
            match mode {
                pb::BackfillMode::Watermark => {
                    u.unit_key == "feed" && c("backfill_chunks") >= 1 && c("backfill_pending") == 1
                }
                _ => {
                    u.unit_key.starts_with("segment-")
                        && !u.checkpoint.is_empty()
                        && u.status == jt::UnitStatus::InProgress as i32
                }
            }
        });
        if mid {
            break;
        }
        assert!(Instant::now() < deadline, "no segment checkpointed: {u:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill_9();
    // Changes while no replica runs: updates and deletes.
    for i in (0..N).step_by(5) {
        table.put(&row(i, 1), None).await.unwrap();
    }
    for i in (1..N).step_by(7) {
        table
            .delete(&Key::single("pk", AttrValue::s(format!("k{i:04}"))), None)
            .await
            .unwrap();
    }
    let (mut second, addr) = replica("replica-b", jobs_addr, &dir.path().join("b"));
    let mut client = connect(addr).await;
    // Streaming, then killed mid-stream while writes continue.
    wait_streaming(&mut client, &name).await;
    let writer = {
        let table = Arc::clone(&table);
        tokio::spawn(async move {
            for i in (2..N).step_by(3) {
                table.put(&row(i, 2), None).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    second.kill_9();
    writer.await.unwrap();
    let (_third, addr) = replica("replica-c", jobs_addr, &dir.path().join("c"));
    let mut client = connect(addr).await;
    drain(&mut client, &name).await;
    // The target equals the table, and no deleted item came back.
    let source = scan(&table).await;
    let mut target = BTreeMap::new();
    reader
        .entries(&mut |key, _, item| {
            target.insert(key, item);
        })
        .await
        .unwrap();
    for i in 0..N {
        let key = Key::single("pk", AttrValue::s(format!("k{i:04}")));
        assert_eq!(target.get(&key), source.get(&key), "key {key}");
    }
    assert_eq!(target.len(), source.len());
    stop.cancel();
}

/// Drains the pipeline, within 2 minutes.
async fn drain(client: &mut ReplicatorServiceClient<Channel>, name: &str) {
    client
        .drain(pb::DrainRequest {
            name: name.to_owned(),
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
}

async fn wait_streaming(client: &mut ReplicatorServiceClient<Channel>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = client
            .get_pipeline(pb::GetPipelineRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .pipeline
            .unwrap();
        if p.state == pb::PipelineState::Streaming as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backfill did not finish after the takeover: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scan(table: &DynamoTable) -> BTreeMap<Key, Item> {
    let mut out = BTreeMap::new();
    let mut start_after = None;
    loop {
        let page = table
            .scan(&ScanRequest {
                start_after,
                consistent: true,
                ..ScanRequest::segment(0, 1)
            })
            .await
            .unwrap();
        for item in page.items {
            out.insert(schema().key_of(&item).unwrap(), item);
        }
        match page.last_key {
            Some(k) => start_after = Some(k),
            None => return out,
        }
    }
}

/// Kafka into Kafka, the replicator killed mid-stream: the records written
/// and the consumer offsets commit in one transaction, so a
/// `read_committed` reader of the target sees every source record exactly
/// once, whatever the kill left open (read-process-write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_from_kafka_into_kafka_writes_each_record_once() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tidemark_connectors::proto::{encode_change, kafka_key};

    let dir = tempfile::tempdir().unwrap();
    let (jobs_addr, _jobs, stop) = job_tracker(dir.path()).await;
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let (src, dst) = (unique_name("eos-src"), unique_name("eos-dst"));
    create_topic(&brokers, &src, 3, false).await;
    create_topic(&brokers, &dst, 3, false).await;
    // The source table serves repair reads only: nothing to backfill.
    let table_name = unique_name("eos");
    DynamoTable::create(dynamo().await, &table_name, &schema(), false)
        .await
        .unwrap();
    const KEYS: u32 = 40;
    const VERSIONS: u64 = 15;
    let producer = {
        let brokers = brokers.clone();
        let src = src.clone();
        tokio::spawn(async move {
            let p: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "0")
                .create()
                .unwrap();
            for v in 1..=VERSIONS {
                for k in 0..KEYS {
                    let key = Key::single("pk", AttrValue::s(format!("k{k:04}")));
                    let payload = encode_change(
                        &key,
                        Some(&row(k, i64::try_from(v).unwrap())),
                        v,
                        1_700_000_000_000_000,
                    );
                    p.send(
                        FutureRecord::to(&src)
                            .key(&kafka_key(&key, "pk"))
                            .payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let (mut first, addr) = replica("replica-a", jobs_addr, &dir.path().join("a"));
    let mut client = connect(addr).await;
    let name = unique_name("eos");
    let topic = |t: &str| common_pb::DataStore {
        store: Some(common_pb::data_store::Store::KafkaTopic(
            common_pb::KafkaTopicRef {
                topic: t.to_owned(),
                bootstrap_servers: String::new(),
            },
        )),
    };
    client
        .create_pipeline(pb::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(pb::PipelineSpec {
                source: Some(table_ref(&table_name)),
                feed: Some(pb::ChangeFeed {
                    feed: Some(pb::change_feed::Feed::Kafka(pb::KafkaFeed {
                        topic: match topic(&src).store {
                            Some(common_pb::data_store::Store::KafkaTopic(t)) => Some(t),
                            _ => None,
                        },
                        start_position: pb::StartPosition::TrimHorizon as i32,
                        ..Default::default()
                    })),
                }),
                sinks: vec![pb::Sink {
                    name: "copy".to_owned(),
                    store: Some(topic(&dst)),
                    ..Default::default()
                }],
                backfill: Some(pb::BackfillOptions {
                    mode: pb::BackfillMode::None as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            actor: "test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Killed while records flow, then taken over.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    first.kill_9();
    let (_second, addr) = replica("replica-b", jobs_addr, &dir.path().join("b"));
    let mut client = connect(addr).await;
    producer.await.unwrap();
    drain(&mut client, &name).await;

    let want = usize::try_from(u64::from(KEYS) * VERSIONS).unwrap();
    let mut seen: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for record in read_committed(&brokers, &dst, want).await {
        *seen.entry(record).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records written twice: {twice:?}");
    assert_eq!(seen.len(), want, "every record once");
    stop.cancel();
}

/// The replicator reaches Elasticsearch with the credentials of its
/// environment (an API key here), never with any from a request: the
/// Authorization header arrives on the wire, on the index probe of a
/// validate-only CreatePipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_credentials_come_from_the_environment() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // A stand-in cluster that keeps the headers of what it is asked and
    // answers that no index exists.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let es = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let heard = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let heard = Arc::clone(&heard);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                heard
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (jobs_addr, _jobs, stop) = job_tracker(dir.path()).await;
    let table_name = unique_name("es-auth");
    DynamoTable::create(dynamo().await, &table_name, &schema(), true)
        .await
        .unwrap();
    let (_replica, addr) = replica_with(
        "replica-auth",
        jobs_addr,
        &dir.path().join("a"),
        &[
            ("TIDEMARK_ELASTICSEARCH_URL", es.as_str()),
            ("TIDEMARK_ELASTICSEARCH_API_KEY", "aWQ6c2VjcmV0"),
        ],
    );
    let mut client = connect(addr).await;
    let checked = client
        .create_pipeline(pb::CreatePipelineRequest {
            name: unique_name("es-auth"),
            spec: Some(pb::PipelineSpec {
                source: Some(table_ref(&table_name)),
                feed: Some(pb::ChangeFeed {
                    feed: Some(pb::change_feed::Feed::DynamodbStreams(
                        pb::DynamoDbStreamsFeed::default(),
                    )),
                }),
                sinks: vec![pb::Sink {
                    name: "search".to_owned(),
                    store: Some(common_pb::DataStore {
                        store: Some(common_pb::data_store::Store::ElasticsearchIndex(
                            common_pb::ElasticsearchIndexRef {
                                index: "docs".to_owned(),
                                endpoint: String::new(),
                            },
                        )),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            actor: "test".to_owned(),
            validate_only: true,
        })
        .await;
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty(), "the index was probed: {checked:?}");
    // Half a pair is bad configuration: the process does not start.
    let status = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .env("TIDEMARK_LISTEN", free_port().to_string())
        .env("TIDEMARK_JOB_TRACKER_URL", format!("http://{jobs_addr}"))
        .env("TIDEMARK_ELASTICSEARCH_USERNAME", "elastic")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(64), "{status:?}");
    for r in &requests {
        assert!(
            r.lines()
                .any(|l| l.eq_ignore_ascii_case("authorization: ApiKey aWQ6c2VjcmV0")),
            "{r}"
        );
    }
    stop.cancel();
}
