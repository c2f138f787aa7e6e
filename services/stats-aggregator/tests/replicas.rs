//! Several replicas on one buffer, as Kubernetes runs them: engines of one
//! process sharing the real local Redis and DynamoDB endpoint. A pause set
//! through one replica stops the flushes of all of them, PauseWriters
//! returns only once every live replica confirmed it (after its running
//! flush ended), and ResumeWriters through any replica resumes them all.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stats_aggregator::engine::{PauseMode, Settings};
use stats_aggregator::store::{Part, StoredItem, WriteOutcome};
use stats_aggregator::{
    DynamoStatsStore, Engine, EventLogBuffer, SharedPause, StatsError, StatsStore,
};
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_connectors::{ConnectorResult, EntityDelta};
use tidemark_kit::CancellationToken;
use tidemark_proto::stats_aggregator::v1 as pb;

use common::{KEY, stats_table, table_values};

/// A store whose writes take `delay`: a flush that is surely running while
/// the test pauses.
struct Slow {
    inner: DynamoStatsStore,
    delay: Duration,
}

#[async_trait]
impl StatsStore for Slow {
    async fn apply_part(
        &self,
        delta: &EntityDelta,
        sequence: u64,
        part: Part,
    ) -> ConnectorResult<WriteOutcome> {
        tokio::time::sleep(self.delay).await;
        self.inner.apply_part(delta, sequence, part).await
    }
    async fn get(&self, entity: &str) -> ConnectorResult<Option<StoredItem>> {
        self.inner.get(entity).await
    }
    async fn ping(&self) -> ConnectorResult<()> {
        self.inner.ping().await
    }
}

struct Cluster {
    prefix: String,
    table: String,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cluster {
    async fn new(name: &str) -> Self {
        Self {
            prefix: RedisBuffer::prefix_for(&unique_name(name)),
            table: stats_table("stats-replicas").await,
            stop: CancellationToken::new(),
        }
    }

    /// A replica with its heartbeat and pause watch running; its writes
    /// each take `delay`.
    async fn replica(&self, delay: Duration) -> Arc<Engine> {
        let url = local_env("TIDEMARK_TEST_REDIS_URL");
        let buffer = EventLogBuffer::connect(&url, self.prefix.clone())
            .await
            .expect("connect to the local Redis");
        let (dynamo, _) = dynamodb_clients().await;
        let inner = DynamoStatsStore::open(dynamo, &self.table, KEY)
            .await
            .expect("the stats table");
        let engine = Arc::new(
            Engine::new(
                Arc::new(buffer),
                Arc::new(Slow { inner, delay }),
                None,
                Settings::new(KEY),
                None,
            )
            .with_shared_pause(SharedPause::new(
                &url,
                &self.prefix,
                SharedPause::replica_name(),
            )),
        );
        tokio::spawn(engine.clone().run_replica(self.stop.clone()));
        engine
    }

    /// A replica that registers but never confirms anything (stuck).
    fn stuck(&self, name: &str) -> SharedPause {
        SharedPause::new(&local_env("TIDEMARK_TEST_REDIS_URL"), &self.prefix, name)
    }

    /// Waits until `n` replicas are live.
    async fn live(&self, n: usize) {
        let probe = self.stuck("probe");
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe.confirmations().await.unwrap().live.len() < n {
            assert!(Instant::now() < deadline, "{n} replicas never became live");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn cleanup(&self) {
        let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

fn inc(id: &str, entity: &str, delta: i64) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        entity_key: entity.into(),
        metric: "views".into(),
        op: Some(pb::event::Op::Increment(pb::Increment { delta })),
        event_time: None,
    }
}

#[tokio::test]
async fn a_pause_through_one_replica_stops_every_replica_until_resumed_through_another() {
    let c = Cluster::new("replicas-pause").await;
    let (a, b) = (
        c.replica(Duration::ZERO).await,
        c.replica(Duration::ZERO).await,
    );
    c.live(2).await;
    a.ingest(vec![inc("1", "x", 1)], 0).await.unwrap();
    b.ingest(vec![inc("2", "x", 2)], 0).await.unwrap();

    let paused = a
        .pause(PauseMode::Buffer, "cut-over".into(), None, None)
        .await
        .expect("every replica confirms");
    assert!(paused.paused && paused.quiesced);
    let err = b
        .flush()
        .await
        .expect_err("the other replica is paused too");
    assert!(
        matches!(err, StatsError::Paused(ref r) if r == "cut-over"),
        "{err:?}"
    );
    let seen = b.state().await.unwrap();
    assert!(seen.paused && seen.quiesced && seen.pause_reason == "cut-over");
    // BUFFER mode: events are still accepted, by either replica.
    b.ingest(vec![inc("3", "x", 4)], 0).await.unwrap();
    assert!(
        table_values(&c.table).await.is_empty(),
        "no write while paused"
    );

    b.resume(false).await.unwrap();
    assert!(!a.state().await.unwrap().paused);
    let first = a.flush().await.expect("resumed through the other replica");
    assert_eq!(first.items_written, 1);
    b.ingest(vec![inc("4", "x", 8)], 0).await.unwrap();
    let second = b.flush().await.expect("both replicas flush again");
    assert_eq!(second.items_written, 1);
    assert_eq!(table_values(&c.table).await["x"]["views"], "15");

    // REJECT mode refuses events on every replica, and a resume anywhere
    // lets them in at once.
    a.pause(PauseMode::Reject, "cut-over 2".into(), None, None)
        .await
        .unwrap();
    let err = b
        .ingest(vec![inc("5", "x", 1)], 0)
        .await
        .expect_err("rejected");
    assert!(matches!(err, StatsError::Rejecting { .. }), "{err:?}");
    b.resume(false).await.unwrap();
    let ok = a.ingest(vec![inc("5", "x", 1)], 0).await.unwrap();
    assert_eq!(ok.accepted, 1);
    c.cleanup().await;
}

#[tokio::test]
async fn pause_writers_returns_only_after_a_flush_running_on_another_replica_ended() {
    let c = Cluster::new("replicas-running").await;
    let a = c.replica(Duration::ZERO).await;
    let b = c.replica(Duration::from_millis(1500)).await;
    c.live(2).await;
    b.ingest(vec![inc("1", "x", 5)], 0).await.unwrap();
    let flushing = tokio::spawn({
        let b = b.clone();
        async move { b.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.state().await.unwrap().flush_in_progress);

    a.pause(PauseMode::Buffer, "cut-over".into(), None, None)
        .await
        .expect("confirmed once the flush ended");
    assert!(
        flushing.is_finished(),
        "PauseWriters returned while another replica was still writing"
    );
    assert_eq!(flushing.await.unwrap().unwrap().items_written, 1);
    assert_eq!(table_values(&c.table).await["x"]["views"], "5");
    a.resume(false).await.unwrap();
    c.cleanup().await;
}

#[tokio::test]
async fn pause_writers_names_the_live_replicas_that_did_not_confirm() {
    let c = Cluster::new("replicas-stuck").await;
    let a = c.replica(Duration::ZERO).await;
    let stuck = c.stuck("stuck-replica-7");
    stuck.heartbeat(Duration::from_secs(30)).await.unwrap();
    c.live(2).await;
    let started = Instant::now();
    let err = a
        .pause(
            PauseMode::Buffer,
            "cut-over".into(),
            None,
            Some(Duration::from_millis(600)),
        )
        .await
        .expect_err("one replica never confirms");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the deadline"
    );
    match &err {
        StatsError::PauseUnconfirmed { replicas, .. } => {
            assert_eq!(replicas, &["stuck-replica-7".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(status.message().contains("stuck-replica-7"));
    // The pause holds (it is not half-lifted), and a replica that left is
    // no longer waited for.
    assert!(!a.state().await.unwrap().quiesced);
    stuck.leave().await.unwrap();
    a.pause(PauseMode::Buffer, "cut-over".into(), None, None)
        .await
        .expect("only live replicas are waited for");
    a.resume(false).await.unwrap();
    c.cleanup().await;
}
