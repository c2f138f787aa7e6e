//! The aggregator over gRPC, in process, on the real Redis, DynamoDB
//! endpoint and Kafka of deploy/local (and once on the embedded backends):
//! bad events are rejected one by one while the rest is accepted, resent
//! events are duplicates, flushes write each change once, the pause stops
//! every DynamoDB write, and absolute values reach Kafka.

mod common;

use std::sync::Arc;
use std::time::Duration;

use stats_aggregator::{Backends, BufferKind, Config, DynamoStatsStore, EventLogBuffer, StoreKind};
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{dynamodb_clients, local_env, unique_name};
use tidemark_connectors::{Buffer, BufferEvent, BufferOp};
use tidemark_kit::CancellationToken;
use tidemark_kit::config::ServerConfig;
use tidemark_proto::stats_aggregator::v1 as pb;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use common::{KEY, consume, stats_table, table_values, topic};

type Client = StatsAggregatorServiceClient<Channel>;

struct Server {
    stop: CancellationToken,
    client: Client,
    table: String,
    redis: Option<Arc<EventLogBuffer>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    /// Removes the test's Redis keys.
    async fn cleanup(&self) {
        if let Some(redis) = &self.redis {
            cleanup_prefix(redis.prefix()).await;
        }
    }
}

async fn cleanup_prefix(prefix: &str) {
    let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for chunk in keys.chunks(1000) {
        let () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// An aggregator on a fresh Redis prefix and a fresh stats table.
async fn serve(tweak: impl FnOnce(&mut Config)) -> Server {
    let table = stats_table("stats-api").await;
    let mut config = Config {
        buffer_name: unique_name("api"),
        stats_table: table.clone(),
        redis_url: local_env("TIDEMARK_TEST_REDIS_URL"),
        // Flushes in these tests are explicit unless a test shortens it.
        flush_interval_ms: 600_000,
        ..Config::default()
    };
    tweak(&mut config);
    let redis = Arc::new(
        EventLogBuffer::connect(
            &config.redis_url,
            RedisBuffer::prefix_for(&config.buffer_name),
        )
        .await
        .expect("connect to the local Redis"),
    );
    let (dynamo, _) = dynamodb_clients().await;
    let store = DynamoStatsStore::open(dynamo, &table, KEY)
        .await
        .expect("the stats table");
    let publisher = config
        .kafka_brokers
        .as_ref()
        .map(|b| stats_aggregator::publish::Publisher::new(b, &config.kafka_topic, KEY).unwrap());
    let backends = Backends {
        buffer: redis.clone(),
        redis: Some(redis.redis().clone()),
        store: Arc::new(store),
        publisher,
    };
    start(
        config,
        backends,
        table,
        Some(redis),
        tempfile::tempdir().unwrap(),
    )
    .await
}

async fn start(
    mut config: Config,
    backends: Backends,
    table: String,
    redis: Option<Arc<EventLogBuffer>>,
    dir: tempfile::TempDir,
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    config.server = ServerConfig {
        listen: addr,
        ..ServerConfig::default()
    };
    let stop = CancellationToken::new();
    tokio::spawn(stats_aggregator::run_with(
        config,
        backends,
        listener,
        stop.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Server {
        stop,
        client: StatsAggregatorServiceClient::new(channel),
        table,
        redis,
        _dir: dir,
    }
}

fn inc(id: &str, entity: &str, metric: &str, delta: i64) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        entity_key: entity.into(),
        metric: metric.into(),
        op: Some(pb::event::Op::Increment(pb::Increment { delta })),
        event_time: None,
    }
}

fn replace(id: &str, entity: &str, metric: &str, value: &str) -> pb::Event {
    pb::Event {
        op: Some(pb::event::Op::Replace(pb::Replace {
            value: value.into(),
        })),
        ..inc(id, entity, metric, 0)
    }
}

async fn batch(client: &mut Client, events: Vec<pb::Event>) -> pb::IngestBatchResponse {
    client
        .ingest_batch(pb::IngestBatchRequest { events })
        .await
        .expect("ingest")
        .into_inner()
}

async fn state(client: &mut Client) -> pb::BufferState {
    client
        .get_buffer_state(pb::GetBufferStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap()
}

async fn stats(client: &mut Client, entity: &str) -> pb::GetStatsResponse {
    client
        .get_stats(pb::GetStatsRequest {
            entity_key: entity.into(),
            metrics: vec![],
        })
        .await
        .expect("get stats")
        .into_inner()
}

async fn flush(client: &mut Client) -> pb::FlushResponse {
    client
        .flush(pb::FlushRequest {})
        .await
        .expect("flush")
        .into_inner()
}

#[tokio::test]
async fn bad_events_are_rejected_one_by_one_and_the_rest_accepted() {
    let mut s = serve(|_| {}).await;
    let mut no_op = inc("e4", "a", "views", 1);
    no_op.op = None;
    let mut future = inc("e6", "a", "views", 1);
    future.event_time = Some(prost_types::Timestamp {
        seconds: 4_102_444_800, // 2100-01-01
        nanos: 0,
    });
    let events = vec![
        inc("e0", "a", "views", 2),
        inc("", "a", "views", 1),
        inc("e2", "", "views", 1),
        inc("e3", "a", "tidemark_version", 1),
        no_op,
        replace("e5", "a", "score", "NaN"),
        future,
        replace("e7", "a", "score", "Infinity"),
        inc("e8", "a", "bad metric", 1),
        replace("e9", "a", "score", "4.5"),
        inc(&"x".repeat(129), "a", "views", 1),
    ];
    let r = batch(&mut s.client, events).await;
    assert_eq!(
        (r.accepted_count, r.rejected_count, r.duplicate_count),
        (2, 9, 0)
    );
    let got: Vec<(u64, &str, &str)> = r
        .rejections
        .iter()
        .map(|r| (r.event_index, r.field.as_str(), r.event_id.as_str()))
        .collect();
    let long = "x".repeat(129);
    assert_eq!(
        got,
        [
            (1, "events[1].event_id", ""),
            (2, "events[2].entity_key", "e2"),
            (3, "events[3].metric", "e3"),
            (4, "events[4].op", "e4"),
            (5, "events[5].replace.value", "e5"),
            (6, "events[6].event_time", "e6"),
            (7, "events[7].replace.value", "e7"),
            (8, "events[8].metric", "e8"),
            (10, "events[10].event_id", long.as_str()),
        ]
    );
    let a = stats(&mut s.client, "a").await;
    assert_eq!(a.metrics["views"].pending_delta, 2);
    assert_eq!(a.metrics["score"].pending_replace.as_deref(), Some("4.5"));

    // Over 10000 events in one message is refused whole.
    let many: Vec<pb::Event> = (0..10_001)
        .map(|i| inc(&format!("m{i}"), "a", "views", 1))
        .collect();
    let err = s
        .client
        .ingest_batch(pb::IngestBatchRequest { events: many })
        .await
        .expect_err("too many");
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = err.get_details_bad_request().expect("BadRequest details");
    assert_eq!(bad.field_violations[0].field, "events");

    // A stream counts event indexes over all its messages.
    let stream = tokio_stream::iter(vec![
        pb::IngestRequest {
            events: vec![inc("s0", "b", "n", 1), inc("s1", "b", "n", 1)],
        },
        pb::IngestRequest {
            events: vec![inc("s2", "b", "n", 1), inc("s3", "", "n", 1)],
        },
    ]);
    let r = s.client.ingest(stream).await.unwrap().into_inner();
    assert_eq!((r.accepted_count, r.rejected_count), (3, 1));
    assert_eq!(
        (r.rejections[0].event_index, r.rejections[0].field.as_str()),
        (3, "events[1].entity_key")
    );
    s.cleanup().await;
}

#[tokio::test]
async fn resent_events_are_duplicates_and_count_once() {
    let mut s = serve(|_| {}).await;
    let events = vec![
        inc("d1", "a", "views", 5),
        inc("d2", "a", "views", 7),
        inc("d1", "a", "views", 5),
    ];
    let r = batch(&mut s.client, events.clone()).await;
    assert_eq!((r.accepted_count, r.duplicate_count), (2, 1));
    // The client retries after a lost reply: nothing counts twice, whether
    // as a batch or over a stream.
    let r = batch(&mut s.client, events.clone()).await;
    assert_eq!((r.accepted_count, r.duplicate_count), (0, 3));
    let r = s
        .client
        .ingest(tokio_stream::iter(vec![
            pb::IngestRequest {
                events: events.clone(),
            },
            pb::IngestRequest {
                events: vec![inc("d3", "a", "views", 1)],
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted_count, r.duplicate_count), (1, 3));
    assert_eq!(
        stats(&mut s.client, "a").await.metrics["views"].pending_delta,
        13
    );
    let f = flush(&mut s.client).await;
    assert_eq!((f.items_written, f.items_already_applied), (1, 0));
    // Still duplicates after the flush: the window, not the buffer, decides.
    let r = batch(&mut s.client, events).await;
    assert_eq!(r.duplicate_count, 3);
    assert_eq!(
        table_values(&s.table).await["a"]["views"],
        "13",
        "each event counted once"
    );
    s.cleanup().await;
}

#[tokio::test]
async fn flush_writes_each_change_once_and_get_stats_adds_the_buffer() {
    let mut s = serve(|_| {}).await;
    let err = s
        .client
        .get_stats(pb::GetStatsRequest {
            entity_key: "nobody".into(),
            metrics: vec![],
        })
        .await
        .expect_err("unknown entity");
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .expect_err("empty key");
    assert_eq!(err.code(), Code::InvalidArgument);

    batch(
        &mut s.client,
        vec![
            inc("f1", "a", "views", 3),
            inc("f2", "a", "views", 4),
            replace("f3", "a", "score", "1.5"),
            inc("f4", "a", "score", 2),
            inc("f5", "b", "views", -1),
        ],
    )
    .await;
    let st = state(&mut s.client).await;
    assert_eq!((st.dirty_keys, st.pending_events), (2, 5));
    let a = stats(&mut s.client, "a").await;
    assert_eq!(a.version, 0);
    assert_eq!(a.metrics["score"].effective_value, "3.5");
    assert_eq!(a.metrics["views"].stored_value, "");
    assert!(a.last_event_time.is_some());

    let first = flush(&mut s.client).await;
    assert!(first.flush_sequence > 0);
    assert_eq!((first.items_written, first.items_already_applied), (2, 0));
    let st = state(&mut s.client).await;
    assert_eq!((st.dirty_keys, st.pending_events), (0, 0));
    assert_eq!(st.last_flush_sequence, first.flush_sequence);
    assert!(st.last_flush_time.is_some() && st.next_flush_time.is_some());

    batch(
        &mut s.client,
        vec![inc("f6", "a", "views", 10), inc("f7", "a", "score", -4)],
    )
    .await;
    let a = stats(&mut s.client, "a").await;
    assert_eq!(a.version, 1);
    assert_eq!(a.last_flush_sequence, first.flush_sequence);
    let views = &a.metrics["views"];
    assert_eq!(
        (
            views.stored_value.as_str(),
            views.pending_delta,
            views.effective_value.as_str()
        ),
        ("7", 10, "17")
    );
    assert_eq!(a.metrics["score"].effective_value, "-0.5");
    let only = s
        .client
        .get_stats(pb::GetStatsRequest {
            entity_key: "a".into(),
            metrics: vec!["score".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.metrics.keys().collect::<Vec<_>>(), ["score"]);

    let second = flush(&mut s.client).await;
    assert!(
        second.flush_sequence > first.flush_sequence,
        "strictly increasing"
    );
    assert_eq!(second.items_written, 1);
    let values = table_values(&s.table).await;
    assert_eq!(values["a"]["views"], "17");
    assert_eq!(values["a"]["score"], "-0.5");
    assert_eq!(values["a"]["tidemark_version"], "2");
    assert_eq!(values["b"]["views"], "-1");

    let empty = flush(&mut s.client).await;
    assert_eq!((empty.flush_sequence, empty.items_written), (0, 0));
    s.cleanup().await;
}

/// A process that died after writing some items of a flush and before
/// publishing or acknowledging it: the next flush completes it, counts the
/// written items as already applied, still publishes them, and applies the
/// rest; every value ends up counted once.
#[tokio::test]
async fn an_interrupted_flush_is_completed_once_and_still_published() {
    let kafka_topic = topic("stats-resume").await;
    let mut s = serve(|c| {
        c.kafka_brokers = Some(local_env("TIDEMARK_TEST_KAFKA_BROKERS"));
        c.kafka_topic = kafka_topic.clone();
    })
    .await;
    let redis = s.redis.clone().unwrap();
    let window = Duration::from_secs(3600);
    let ev = |id: &str, entity: &str, delta| BufferEvent {
        id: id.into(),
        op: BufferOp::Increment {
            entity: entity.into(),
            metric: "views".into(),
            delta,
        },
        time_micros: 1,
    };
    redis
        .apply_events(&[ev("r1", "a", 5), ev("r2", "b", 6)], window)
        .await
        .unwrap();
    // The crashed process took flush 7 out and wrote entity a only.
    let taken = redis.take_for_flush(7).await.unwrap();
    let (dynamo, _) = dynamodb_clients().await;
    let store = DynamoStatsStore::open(dynamo, &s.table, KEY).await.unwrap();
    let a = taken.iter().find(|d| d.entity == "a").unwrap();
    stats_aggregator::StatsStore::apply_part(&store, a, 7, stats_aggregator::store::Part::WHOLE)
        .await
        .unwrap();
    // Events after the crash belong to a later flush.
    redis
        .apply_events(&[ev("r3", "a", 1)], window)
        .await
        .unwrap();

    let a = stats(&mut s.client, "a").await;
    assert_eq!(
        a.metrics["views"].effective_value, "6",
        "the applied part of the pending flush is not added twice"
    );
    let b = stats(&mut s.client, "b").await;
    assert_eq!(
        b.metrics["views"].effective_value, "6",
        "the pending part is"
    );

    let f = flush(&mut s.client).await;
    assert!(f.flush_sequence > 7);
    // Flush 7: a already applied, b written; then the new flush writes a.
    assert_eq!((f.items_written, f.items_already_applied), (2, 1));
    assert_eq!(f.records_published, 3);
    let values = table_values(&s.table).await;
    assert_eq!(values["a"]["views"], "6");
    assert_eq!(values["b"]["views"], "6");
    let (published, _) = consume(&kafka_topic, Duration::from_secs(60), |st| {
        st.get("a").is_some_and(|(v, _)| *v == 2) && st.contains_key("b")
    })
    .await;
    assert_eq!(published["a"].1, values["a"]);
    assert_eq!(published["b"].1, values["b"]);
    s.cleanup().await;
}

#[tokio::test]
async fn pause_in_buffer_mode_stops_every_dynamodb_write_until_resumed() {
    let mut s = serve(|c| c.flush_interval_ms = 100).await;
    batch(&mut s.client, vec![inc("p1", "a", "views", 1)]).await;
    let err = s
        .client
        .pause_writers(pb::PauseWritersRequest {
            mode: pb::PauseMode::Unspecified as i32,
            ..Default::default()
        })
        .await
        .expect_err("mode is required");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .pause_writers(pb::PauseWritersRequest {
            mode: pb::PauseMode::Buffer as i32,
            max_pause: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("over 1 h");
    assert_eq!(err.code(), Code::InvalidArgument);

    let paused = s
        .client
        .pause_writers(pb::PauseWritersRequest {
            mode: pb::PauseMode::Buffer as i32,
            reason: "cut-over test".into(),
            max_pause: None,
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert!(paused.paused && paused.quiesced && !paused.flush_in_progress);
    assert_eq!(paused.pause_mode, pb::PauseMode::Buffer as i32);
    assert_eq!(paused.pause_reason, "cut-over test");
    assert!(paused.pause_time.is_some() && paused.next_flush_time.is_none());
    let before = table_values(&s.table).await;

    // Events are still accepted; neither the periodic flush nor Flush writes.
    let r = batch(&mut s.client, vec![inc("p2", "a", "views", 2)]).await;
    assert_eq!(r.accepted_count, 1);
    let err = s
        .client
        .flush(pb::FlushRequest {})
        .await
        .expect_err("flushes are stopped");
    assert_eq!(err.code(), Code::FailedPrecondition);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        table_values(&s.table).await,
        before,
        "no DynamoDB write while paused"
    );
    let st = state(&mut s.client).await;
    assert!(st.quiesced && st.pending_events >= 1);

    let resumed = s
        .client
        .resume_writers(pb::ResumeWritersRequest { flush_now: true })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert!(!resumed.paused && !resumed.quiesced);
    assert_eq!(resumed.pause_mode, pb::PauseMode::Unspecified as i32);
    assert_eq!((resumed.dirty_keys, resumed.pending_events), (0, 0));
    assert_eq!(table_values(&s.table).await["a"]["views"], "3");
    // Resuming again is a no-op.
    s.client
        .resume_writers(pb::ResumeWritersRequest::default())
        .await
        .unwrap();
    s.cleanup().await;
}

#[tokio::test]
async fn pause_in_reject_mode_answers_unavailable_with_retry_info() {
    let mut s = serve(|_| {}).await;
    batch(&mut s.client, vec![inc("q1", "a", "views", 1)]).await;
    let paused = s
        .client
        .pause_writers(pb::PauseWritersRequest {
            mode: pb::PauseMode::Reject as i32,
            reason: "cut-over".into(),
            max_pause: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert!(paused.quiesced && paused.auto_resume_time.is_some());
    let err = s
        .client
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![inc("q2", "a", "views", 1)],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
    let err = s
        .client
        .ingest(tokio_stream::iter(vec![pb::IngestRequest {
            events: vec![inc("q3", "a", "views", 1)],
        }]))
        .await
        .expect_err("refused on a stream too");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.get_details_retry_info().is_some());

    s.client
        .resume_writers(pb::ResumeWritersRequest::default())
        .await
        .unwrap();
    let r = batch(&mut s.client, vec![inc("q2", "a", "views", 1)]).await;
    assert_eq!(r.accepted_count, 1, "the refused event was not remembered");
    assert_eq!(
        stats(&mut s.client, "a").await.metrics["views"].pending_delta,
        2
    );
    s.cleanup().await;
}

#[tokio::test]
async fn a_pause_ends_by_itself_after_max_pause() {
    let mut s = serve(|_| {}).await;
    s.client
        .pause_writers(pb::PauseWritersRequest {
            mode: pb::PauseMode::Reject as i32,
            reason: "dies mid cut-over".into(),
            max_pause: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await
        .unwrap();
    assert!(state(&mut s.client).await.paused);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = state(&mut s.client).await;
    assert!(!st.paused && st.auto_resume_time.is_none());
    assert_eq!(
        batch(&mut s.client, vec![inc("m1", "a", "views", 1)])
            .await
            .accepted_count,
        1
    );
    s.cleanup().await;
}

/// With `redis_wait_replicas` 1 on the local Redis, which has no replica:
/// the ingest answers UNAVAILABLE (with a retry hint) once the WAIT timeout
/// passed, and so does the resend; on an aggregator that waits for no
/// replica the resend is all duplicates (the batch did land on the
/// primary) and new events are accepted: each event counts once.
#[tokio::test]
async fn an_ingest_short_of_its_redis_replicas_is_unavailable_and_its_resend_counts_once() {
    let table = stats_table("stats-wait").await;
    let buffer_name = unique_name("api-wait");
    let config = |replicas| Config {
        buffer_name: buffer_name.clone(),
        stats_table: table.clone(),
        redis_url: local_env("TIDEMARK_TEST_REDIS_URL"),
        flush_interval_ms: 600_000,
        redis_wait_replicas: replicas,
        redis_wait_timeout_ms: 200,
        ..Config::default()
    };
    let serve_waiting_for = |replicas| {
        let (config, table) = (config(replicas), table.clone());
        async move {
            let (buffer, redis) = stats_aggregator::open_buffer(&config)
                .await
                .expect("the Redis buffer");
            let (dynamo, _) = dynamodb_clients().await;
            let store = DynamoStatsStore::open(dynamo, &table, KEY).await.unwrap();
            let backends = Backends {
                buffer,
                redis,
                store: Arc::new(store),
                publisher: None,
            };
            start(config, backends, table, None, tempfile::tempdir().unwrap()).await
        }
    };
    let mut strict = serve_waiting_for(1).await;
    let events = vec![inc("w1", "a", "views", 2), inc("w2", "a", "views", 3)];
    for attempt in ["first", "resend"] {
        let started = std::time::Instant::now();
        let err = strict
            .client
            .ingest_batch(pb::IngestBatchRequest {
                events: events.clone(),
            })
            .await
            .expect_err("no replica acknowledges");
        assert_eq!(err.code(), Code::Unavailable, "{attempt}: {err:?}");
        assert!(err.get_details_retry_info().is_some(), "{attempt}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{attempt}: bounded by the WAIT timeout, not retried inside: {took:?}"
        );
    }

    let mut relaxed = serve_waiting_for(0).await;
    let r = batch(&mut relaxed.client, events).await;
    assert_eq!((r.accepted_count, r.duplicate_count), (0, 2));
    let r = batch(&mut relaxed.client, vec![inc("w3", "a", "views", 4)]).await;
    assert_eq!(r.accepted_count, 1);
    assert_eq!(
        stats(&mut relaxed.client, "a").await.metrics["views"].pending_delta,
        9,
        "each event counted once"
    );
    cleanup_prefix(&RedisBuffer::prefix_for(&buffer_name)).await;
}

/// `tidemark dev`'s backends: no Redis, no AWS.
#[tokio::test]
async fn embedded_buffer_and_store_need_no_redis_or_aws() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        buffer: BufferKind::Embedded,
        store: StoreKind::Embedded,
        data_dir: dir.path().to_owned(),
        redis_url: "redis://127.0.0.1:1".into(),
        aws_endpoint: Some("http://127.0.0.1:1".into()),
        flush_interval_ms: 600_000,
        ..Config::default()
    };
    let backends = stats_aggregator::open(&config)
        .await
        .expect("embedded backends");
    let mut s = start(config, backends, String::new(), None, dir).await;
    let events = vec![
        inc("x1", "a", "views", 2),
        replace("x2", "a", "score", "0.1"),
        inc("x3", "a", "score", 1),
    ];
    let r = batch(&mut s.client, events.clone()).await;
    assert_eq!(r.accepted_count, 3);
    assert_eq!(batch(&mut s.client, events).await.duplicate_count, 3);
    let f = flush(&mut s.client).await;
    assert_eq!(f.items_written, 1);
    let a = stats(&mut s.client, "a").await;
    assert_eq!(a.metrics["score"].stored_value, "1.1");
    assert_eq!(a.metrics["views"].effective_value, "2");
    assert_eq!(a.version, 1);
}

#[tokio::test]
async fn a_missing_stats_table_fails_start_up_clearly() {
    let config = Config {
        buffer_name: unique_name("api-missing"),
        redis_url: local_env("TIDEMARK_TEST_REDIS_URL"),
        stats_table: unique_name("no-such-table"),
        aws_endpoint: Some(local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT")),
        ..Config::default()
    };
    let (dynamo, _) = dynamodb_clients().await;
    let err = DynamoStatsStore::open(dynamo, &config.stats_table, KEY)
        .await
        .err()
        .expect("no such table");
    assert!(
        matches!(err, tidemark_connectors::ConnectorError::NotFound { .. }),
        "{err:?}"
    );
}
