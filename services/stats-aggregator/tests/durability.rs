//! `kill -9` of the aggregator binary at random points, several of them in
//! the middle of a flush, while a client sends events with duplicates
//! (retries) over a few entities: after a last restart and a Flush the
//! DynamoDB counters equal the exact sums computed here, and the absolute
//! values published to Kafka, replayed latest-version-wins, equal the table.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_proto::stats_aggregator::v1 as pb;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tonic::transport::Channel;

use common::{consume, stats_table, table_values, topic};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Server(Child);

impl Server {
    fn kill_9(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The AWS SDK's settings for the local endpoint, passed to the child.
fn aws_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        (
            "TIDEMARK_AWS_ENDPOINT",
            local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT"),
        ),
    ]
}

fn command(addr: SocketAddr, env: &[(&'static str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stats-aggregator"));
    cmd.env("TIDEMARK_LISTEN", addr.to_string())
        .env("TIDEMARK_LOG_LEVEL", "warn")
        .stdout(Stdio::null());
    for (k, v) in aws_env().iter().chain(env) {
        cmd.env(k, v);
    }
    cmd
}

fn start(addr: SocketAddr, env: &[(&'static str, String)]) -> Server {
    let mut cmd = command(addr, env);
    cmd.stderr(Stdio::inherit());
    Server(cmd.spawn().expect("start stats-aggregator"))
}

async fn connect(addr: SocketAddr) -> StatsAggregatorServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut c = StatsAggregatorServiceClient::new(ch);
            if c.get_buffer_state(pb::GetBufferStateRequest {})
                .await
                .is_ok()
            {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "stats-aggregator did not come up on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const EVENTS: usize = 4000;
const ENTITIES: usize = 12;
const KILLS: usize = 8;
const KILLS_DURING_FLUSH: usize = 3;

/// The events, in the order the client sends them; each id is unique.
fn events(seed: u64) -> Vec<pb::Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..EVENTS)
        .map(|i| {
            let entity = format!("content-{}", rng.random_range(0..ENTITIES));
            let op = if rng.random_range(0..20) == 0 {
                pb::event::Op::Replace(pb::Replace {
                    value: format!("{}.5", rng.random_range(0..1000)),
                })
            } else {
                pb::event::Op::Increment(pb::Increment {
                    delta: rng.random_range(-5..20),
                })
            };
            let metric = if matches!(op, pb::event::Op::Replace(_)) || rng.random_bool(0.2) {
                "score"
            } else {
                "views"
            };
            pb::Event {
                event_id: format!("ev-{seed}-{i}"),
                entity_key: entity,
                metric: metric.into(),
                op: Some(op),
                event_time: None,
            }
        })
        .collect()
}

/// The exact values the events make, folded in order.
fn expected(events: &[pb::Event]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for e in events {
        let value = out
            .entry(e.entity_key.clone())
            .or_default()
            .entry(e.metric.clone())
            .or_insert_with(|| "0".to_owned());
        *value = match e.op.as_ref().unwrap() {
            pb::event::Op::Increment(i) => {
                stats_aggregator::decimal::add(value, i128::from(i.delta)).unwrap()
            }
            pb::event::Op::Replace(r) => stats_aggregator::decimal::add(&r.value, 0).unwrap(),
        };
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingestion_and_flushes_counts_every_event_once() {
    let table = stats_table("stats-durable").await;
    let kafka_topic = topic("stats-durable").await;
    let addr = free_port();
    let env: Vec<(&'static str, String)> = vec![
        ("TIDEMARK_REDIS_URL", local_env("TIDEMARK_TEST_REDIS_URL")),
        ("TIDEMARK_BUFFER_NAME", unique_name("durable")),
        ("TIDEMARK_STATS_TABLE", table.clone()),
        (
            "TIDEMARK_KAFKA_BROKERS",
            local_env("TIDEMARK_TEST_KAFKA_BROKERS"),
        ),
        ("TIDEMARK_KAFKA_TOPIC", kafka_topic.clone()),
        ("TIDEMARK_FLUSH_INTERVAL_MS", "100".into()),
        ("TIDEMARK_FLUSH_CONCURRENCY", "4".into()),
    ];
    let seed = rand::rng().random::<u64>();
    let all = events(seed);
    let want = expected(&all);

    let server = start(addr, &env);
    let mut client = connect(addr).await;
    let sending = Arc::new(AtomicBool::new(true));

    // The killer: SIGKILL at random moments, half of them as soon as a
    // flush is seen running, and start the binary again.
    let killer = {
        let sending = Arc::clone(&sending);
        let env = env.clone();
        tokio::spawn(async move {
            let mut server = server;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            let (mut kills, mut during_flush) = (0, 0);
            while sending.load(Ordering::Acquire) && kills < KILLS {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
                let mut client = connect(addr).await;
                let mut in_flush = false;
                if kills % 2 == 0 {
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < deadline {
                        let state = client
                            .get_buffer_state(pb::GetBufferStateRequest {})
                            .await
                            .map(|r| r.into_inner().state.unwrap());
                        if state.is_ok_and(|s| s.flush_in_progress) {
                            in_flush = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                server.kill_9();
                kills += 1;
                during_flush += usize::from(in_flush);
                server = start(addr, &env);
            }
            (server, kills, during_flush)
        })
    };

    // The client: sequential batches, each resent until it is answered
    // (as after a lost reply), some carrying events sent before (retries).
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xc11e);
    let (mut sent, mut accepted, mut duplicates, mut resends) = (0, 0i64, 0i64, 0);
    while sent < all.len() {
        let n = rng.random_range(1..60).min(all.len() - sent);
        let mut batch: Vec<pb::Event> = all[sent..sent + n].to_vec();
        let mut repeated = 0i64;
        if sent > 0 && rng.random_bool(0.3) {
            for _ in 0..rng.random_range(1..5) {
                batch.push(all[rng.random_range(0..sent)].clone());
                repeated += 1;
            }
        }
        loop {
            match client
                .ingest_batch(pb::IngestBatchRequest {
                    events: batch.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.rejected_count, 0, "{r:?}");
                    accepted += r.accepted_count;
                    duplicates += r.duplicate_count;
                    assert!(r.duplicate_count >= repeated);
                    break;
                }
                Err(_) => {
                    resends += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    client = connect(addr).await;
                }
            }
        }
        sent += n;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    sending.store(false, Ordering::Release);
    let (mut server, kills, during_flush) = killer.await.unwrap();
    assert!(
        accepted <= i64::try_from(EVENTS).unwrap(),
        "accepted {accepted} > {EVENTS}: an event counted twice"
    );
    eprintln!(
        "seed {seed}: {kills} kills ({during_flush} during a flush), {resends} resent batches, {accepted} accepted on the first answer, {duplicates} duplicates"
    );
    assert!(kills >= KILLS / 2, "only {kills} kills");
    assert!(
        during_flush >= KILLS_DURING_FLUSH.min(kills / 2),
        "only {during_flush} kills during a flush"
    );

    // A last restart (kill -9 included), then Flush until it answers.
    server.kill_9();
    let _server = start(addr, &env);
    let mut client = connect(addr).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.flush(pb::FlushRequest {}).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "flush never succeeded: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let state = client
        .get_buffer_state(pb::GetBufferStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(
        (state.dirty_keys, state.pending_events),
        (0, 0),
        "{state:?}"
    );

    let mut stored = table_values(&table).await;
    let versions: BTreeMap<String, String> = stored
        .iter_mut()
        .map(|(k, m)| (k.clone(), m.remove("tidemark_version").unwrap()))
        .collect();
    assert_eq!(stored, want, "DynamoDB equals the exact sums (seed {seed})");

    // Replaying the published absolute values gives the same table.
    let (published, records) = consume(&kafka_topic, Duration::from_secs(120), |st| {
        versions
            .iter()
            .all(|(k, v)| st.get(k).is_some_and(|(pv, _)| pv.to_string() == *v))
    })
    .await;
    let replayed: BTreeMap<String, BTreeMap<String, String>> = published
        .into_iter()
        .map(|(k, (_, mut m))| {
            m.remove("tidemark_version");
            (k, m)
        })
        .collect();
    assert_eq!(
        replayed, want,
        "Kafka replayed latest-version-wins equals the table ({records} records, seed {seed})"
    );
}

/// The aggregator never creates its table: a missing one stops start-up
/// with a message that says so.
#[tokio::test]
async fn a_missing_stats_table_stops_start_up_with_a_clear_error() {
    let addr = free_port();
    let output = command(
        addr,
        &[
            ("TIDEMARK_REDIS_URL", local_env("TIDEMARK_TEST_REDIS_URL")),
            ("TIDEMARK_BUFFER_NAME", unique_name("missing")),
            ("TIDEMARK_STATS_TABLE", unique_name("no-such-table")),
            ("TIDEMARK_LOG_FORMAT", "text".into()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .output()
    .expect("run stats-aggregator");
    assert!(!output.status.success());
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        logs.contains("never creates it"),
        "start-up error names the missing table: {logs}"
    );
}
