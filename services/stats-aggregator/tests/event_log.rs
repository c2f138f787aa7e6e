//! The aggregator's Redis buffer on the real local Redis: the shared buffer
//! behaviour suite, and dedup between processes sharing one buffer (another
//! replica, or this one restarted after a kill -9 or a lost reply), through
//! the id log each of them mirrors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stats_aggregator::EventLogBuffer;
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::{Buffer, BufferEvent, BufferOp};

async fn buffer(prefix: &str) -> EventLogBuffer {
    EventLogBuffer::connect(&local_env("TIDEMARK_TEST_REDIS_URL"), prefix)
        .await
        .expect("connect to the local Redis")
}

async fn cleanup(prefix: &str) {
    let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
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

fn inc(id: &str, entity: &str, delta: i64) -> BufferEvent {
    BufferEvent {
        id: id.into(),
        op: BufferOp::Increment {
            entity: entity.into(),
            metric: "n".into(),
            delta,
        },
        time_micros: 1,
    }
}

#[tokio::test]
async fn the_buffer_passes_the_shared_behaviour_suite() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-suite"));
    let b = buffer(&prefix).await;
    tidemark_connectors::suite::buffer_events(&b).await;
    cleanup(&prefix).await;
}

/// Two processes on one buffer send overlapping batches at the same time
/// (a client retrying on the other replica): every id counts once, and a
/// third process started afterwards (a restart) sees them all as seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_a_buffer_count_each_id_once() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-shared"));
    let a = Arc::new(buffer(&prefix).await);
    let b = Arc::new(buffer(&prefix).await);
    let window = Duration::from_secs(600);
    const IDS: usize = 3000;
    let events: Vec<BufferEvent> = (0..IDS)
        .map(|i| {
            inc(
                &format!("id-{i}"),
                &format!("e{}", i % 7),
                1 + (i % 3) as i64,
            )
        })
        .collect();
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for e in &events {
        if let BufferOp::Increment { entity, delta, .. } = &e.op {
            *want.entry(entity.clone()).or_default() += delta;
        }
    }
    // Each process sends every event, in batches of different sizes and
    // orders, so each batch overlaps the other process's.
    let send = |buf: Arc<EventLogBuffer>, events: Vec<BufferEvent>, size: usize| {
        tokio::spawn(async move {
            let mut accepted = 0;
            for chunk in events.chunks(size) {
                // Under contention the log may move past a batch while it
                // catches up: that answer is retryable, and a client sends
                // the same batch again (its ids must still count once).
                let mut tries = 0;
                let dups = loop {
                    match buf.apply_events(chunk, window).await {
                        Ok(dups) => break dups,
                        Err(e) if e.is_retryable() && tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("apply (after {tries} retries): {e:?}"),
                    }
                };
                accepted += chunk.len() - dups.len();
            }
            accepted
        })
    };
    let reversed: Vec<BufferEvent> = events.iter().rev().cloned().collect();
    let (x, y) = tokio::join!(
        send(a.clone(), events.clone(), 37),
        send(b.clone(), reversed, 101)
    );
    assert_eq!(x.unwrap() + y.unwrap(), IDS, "each id accepted once");
    for (entity, sum) in &want {
        let got = a.peek(entity).await.unwrap().increments["n"];
        assert_eq!(got, *sum, "{entity}");
    }
    assert_eq!(a.stats().await.unwrap().pending_events, IDS as u64);

    // A restarted process (a fresh mirror) finds every id in the log.
    let c = buffer(&prefix).await;
    let dups = c.apply_events(&events[..500], window).await.unwrap();
    assert_eq!(dups.len(), 500);
    // And what it accepts, the others see.
    assert!(
        c.apply_events(&[inc("late", "e0", 5)], window)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        a.apply_events(&[inc("late", "e0", 5)], window)
            .await
            .unwrap(),
        [0]
    );
    assert_eq!(a.peek("e0").await.unwrap().increments["n"], want["e0"] + 5);
    cleanup(&prefix).await;
}

/// Should Redis lose the log (a failover without persistence), a process
/// starts a new one instead of trusting positions of the old one.
#[tokio::test]
async fn a_lost_log_is_started_again() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-lost"));
    let a = buffer(&prefix).await;
    let window = Duration::from_secs(600);
    assert!(
        a.apply_events(&[inc("x", "e", 1)], window)
            .await
            .unwrap()
            .is_empty()
    );
    cleanup(&prefix).await;
    let b = buffer(&prefix).await;
    assert!(
        b.apply_events(&[inc("y", "e", 1)], window)
            .await
            .unwrap()
            .is_empty()
    );
    // a's mirror is of the lost log: it catches up with the new one.
    assert_eq!(
        a.apply_events(&[inc("y", "e", 1)], window).await.unwrap(),
        [0]
    );
    assert!(
        a.apply_events(&[inc("z", "e", 1)], window)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        b.apply_events(&[inc("z", "e", 1)], window).await.unwrap(),
        [0]
    );
    assert_eq!(b.peek("e").await.unwrap().increments["n"], 2);
    cleanup(&prefix).await;
}

/// Blobs whose window has passed leave the log.
#[tokio::test]
async fn the_log_forgets_what_the_window_no_longer_covers() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-trim"));
    let a = buffer(&prefix).await;
    let window = Duration::from_secs(1);
    for i in 0..3 {
        a.apply_events(&[inc(&format!("t{i}"), "e", 1)], window)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    a.apply_events(&[inc("after", "e", 1)], window)
        .await
        .unwrap();
    let client = redis::Client::open(local_env("TIDEMARK_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let len: u64 = redis::cmd("LLEN")
        .arg(format!("{prefix}idlog"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1, "only the last batch's blob is left");
    // A fresh process reads only what is left, and counts the old ids anew.
    let b = buffer(&prefix).await;
    assert!(
        b.apply_events(&[inc("t0", "e", 1)], window)
            .await
            .unwrap()
            .is_empty()
    );
    cleanup(&prefix).await;
}

/// Batches sent at once to one process: an id in two of them counts once,
/// and a batch Redis refuses (an overflow) fails alone while the others
/// land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_count_each_id_once_and_fail_alone() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-group"));
    let a = Arc::new(buffer(&prefix).await);
    let window = Duration::from_secs(600);
    a.apply_events(&[inc("big", "full", i64::MAX - 1)], window)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                let mut accepted = 0;
                let mut failed = 0;
                for round in 0..20 {
                    // Ids shared by every task: each counts once.
                    let mut batch: Vec<BufferEvent> = (0..50)
                        .map(|i| inc(&format!("r{round}-{i}"), &format!("e{}", i % 5), 1))
                        .collect();
                    if t == 3 && round % 5 == 0 {
                        batch.push(inc(&format!("over-{round}"), "full", 5));
                    }
                    match a.apply_events(&batch, window).await {
                        Ok(dups) => accepted += batch.len() - dups.len(),
                        Err(e) => {
                            assert!(!e.is_retryable(), "{e:?}");
                            assert_eq!(t, 3, "only the overflowing batch fails: {e:?}");
                            failed += 1;
                        }
                    }
                }
                (accepted, failed)
            })
        })
        .collect();
    let (mut accepted, mut failed) = (0, 0);
    for t in tasks {
        let (x, y) = t.await.unwrap();
        accepted += x;
        failed += y;
    }
    assert_eq!(failed, 4);
    // Every shared id landed once, through whichever batch carried it
    // first (a failed batch's ids are left to the others).
    assert_eq!(accepted, 20 * 50);
    let total: i64 = (0..5)
        .map(|e| format!("e{e}"))
        .map(|e| {
            let a = Arc::clone(&a);
            async move { a.peek(&e).await.unwrap().increments["n"] }
        })
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .sum();
    assert_eq!(total, 20 * 50);
    assert_eq!(
        a.peek("full").await.unwrap().increments["n"],
        i64::MAX - 1,
        "the overflowing increments left nothing behind"
    );
    cleanup(&prefix).await;
}

/// `WAIT` for one replica on the local Redis, which has none: the batch
/// fails retryably, as a replica shortfall, within about the timeout, and
/// so does its resend (duplicates are acknowledged only once replicated
/// too); a buffer that waits for no replica finds the batch landed: all
/// duplicates, counted once.
#[tokio::test]
async fn a_batch_short_of_its_replicas_fails_retryably_and_its_resend_counts_once() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-wait"));
    let window = Duration::from_secs(3600);
    let strict = buffer(&prefix)
        .await
        .with_replica_wait(stats_aggregator::ReplicaWait {
            replicas: 1,
            timeout: Duration::from_millis(150),
        });
    let batch = [inc("w1", "a", 2), inc("w2", "a", 3)];
    for attempt in ["first", "resend"] {
        let started = std::time::Instant::now();
        let err = strict
            .apply_events(&batch, window)
            .await
            .expect_err("no replica");
        assert!(
            stats_aggregator::event_log::is_replica_shortfall(&err),
            "{attempt}: {err:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(150), "{attempt}");
        assert!(started.elapsed() < Duration::from_secs(2), "{attempt}");
    }
    let relaxed = buffer(&prefix).await;
    assert_eq!(relaxed.apply_events(&batch, window).await.unwrap(), [0, 1]);
    assert_eq!(relaxed.peek("a").await.unwrap().increments["n"], 5);
    // Waiting for no replica is no WAIT at all.
    let none = buffer(&prefix)
        .await
        .with_replica_wait(stats_aggregator::ReplicaWait {
            replicas: 0,
            timeout: Duration::from_millis(150),
        });
    assert!(
        none.apply_events(&[inc("w3", "a", 1)], window)
            .await
            .unwrap()
            .is_empty()
    );
    cleanup(&prefix).await;
}

/// A buffer bounded to 5 ids (two replicas, so the bound is the log's, not
/// one process's): a batch whose fresh ids would pass it is refused whole
/// with a retry-after, nothing of it applied; duplicates of remembered ids
/// still pass (they add no id), and so do fresh ids within the bound.
#[tokio::test]
async fn a_bounded_id_log_refuses_what_would_pass_its_bound_and_applies_nothing_of_it() {
    let prefix = RedisBuffer::prefix_for(&unique_name("evlog-bound"));
    let a = buffer(&prefix).await.with_max_ids(5);
    let b = buffer(&prefix).await.with_max_ids(5);
    let window = Duration::from_secs(600);
    let first: Vec<BufferEvent> = (0..3).map(|i| inc(&format!("id-{i}"), "e", 1)).collect();
    assert!(a.apply_events(&first, window).await.unwrap().is_empty());
    // Three fresh ids on the other replica: 6 > 5, refused whole.
    let over: Vec<BufferEvent> = (3..6).map(|i| inc(&format!("id-{i}"), "e", 10)).collect();
    let err = b
        .apply_events(&over, window)
        .await
        .expect_err("over the bound");
    assert!(stats_aggregator::is_dedup_full(&err), "{err:?}");
    match &err {
        tidemark_connectors::ConnectorError::Retryable { retry_after, .. } => {
            assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
        }
        other => panic!("{other:?}"),
    }
    // A resend of the first batch: all duplicates, accepted, nothing added.
    let dups = b.apply_events(&first, window).await.unwrap();
    assert_eq!(dups, vec![0, 1, 2]);
    // Two fresh ids fit exactly.
    assert!(b.apply_events(&over[..2], window).await.unwrap().is_empty());
    // The refused batch applied nothing: e holds 3 + 2 × 10.
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.pending_events, 5, "{stats:?}");
    let sequence = stats.last_acked.unwrap_or(0) + 1;
    let content = a.take_for_flush(sequence).await.unwrap();
    let e = content.iter().find(|d| d.entity == "e").expect("entity e");
    assert_eq!(e.increments.get("n"), Some(&23));
    cleanup(&prefix).await;
}
