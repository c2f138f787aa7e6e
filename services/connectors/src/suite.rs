//! Behaviour suites: one per trait, run by the tests against every
//! implementation (the embedded store and the real local components), so
//! they all mean the same thing. Each check panics with what went wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::error::ConnectorError;
use crate::image::ValueRef;
use crate::predicate::Predicate;
use crate::traits::{
    Buffer, BufferEvent, BufferOp, ChangeFeed, ChangeKind, ChangeRecord, EntityDelta,
    FeedCheckpoint, RecordOutcome, ScanRequest, Sink, SinkOp, SinkRecord, SourceTable,
};
use crate::value::{AttrValue, Item, Key, Number};

/// Key schema the suites expect of the tables they are given.
pub const PK: &str = "pk";
pub const SK: &str = "sk";

fn key(pk: &str, sk: &str) -> Key {
    Key::new([
        (PK.to_owned(), AttrValue::s(pk)),
        (SK.to_owned(), AttrValue::s(sk)),
    ])
}

fn item(pk: &str, sk: &str, extra: &[(&str, AttrValue)]) -> Item {
    let mut item: Item = key(pk, sk).0;
    for (k, v) in extra {
        item.insert((*k).to_owned(), v.clone());
    }
    item
}

fn every_type() -> Item {
    let mut nested = BTreeMap::new();
    nested.insert(
        "inner".to_owned(),
        AttrValue::L(vec![AttrValue::s("x"), AttrValue::n(3i64)]),
    );
    item(
        "types",
        "1",
        &[
            ("s", AttrValue::s("text ✓")),
            (
                "n_big",
                AttrValue::N(
                    Number::parse("12345678901234567890123456789.123456789").expect("number"),
                ),
            ),
            (
                "n_neg",
                AttrValue::N(Number::parse("-0.000125").expect("number")),
            ),
            ("b", AttrValue::B(vec![0, 159, 255])),
            ("t", AttrValue::Bool(true)),
            ("z", AttrValue::Null(true)),
            ("ss", AttrValue::Ss(["a".to_owned(), "b".to_owned()].into())),
            (
                "ns",
                AttrValue::Ns([Number::from(1i64), Number::parse("2.5").expect("number")].into()),
            ),
            ("bs", AttrValue::Bs([vec![1u8], vec![2u8, 3]].into())),
            ("m", AttrValue::M(nested)),
        ],
    )
}

/// Checks a [`SourceTable`] whose key schema is (`pk` S, `sk` S) and which
/// starts empty.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn source_table(table: &dyn SourceTable) {
    // Round trip of every value type without loss of number precision.
    let all = every_type();
    table.put(&all, None).await.expect("put");
    assert_eq!(
        table.get(&key("types", "1")).await.expect("get"),
        Some(all.clone()),
        "round trip of every type"
    );
    assert_eq!(
        table
            .get(&key("types", "missing"))
            .await
            .expect("get missing"),
        None
    );

    // A failed condition is a precondition error and changes nothing.
    let err = table
        .put(&item("types", "1", &[]), Some(&Predicate::ItemNotExists))
        .await
        .expect_err("put over an existing item with ItemNotExists");
    assert!(
        matches!(err, ConnectorError::Precondition(_)),
        "expected precondition, got {err:?}"
    );
    assert_eq!(table.get(&key("types", "1")).await.expect("get"), Some(all));

    // Conditional update in the style of the attribute backfill.
    let set: Item = [("test".to_owned(), AttrValue::n(1i64))].into();
    let not_set = Predicate::And(vec![
        Predicate::ItemExists,
        Predicate::AttributeNotExists("test".to_owned()),
    ]);
    table
        .put(&item("u", "1", &[("other", AttrValue::s("kept"))]), None)
        .await
        .expect("put");
    let updated = table
        .update(&key("u", "1"), &set, Some(&not_set))
        .await
        .expect("update");
    assert_eq!(updated.get("test"), Some(&AttrValue::n(1i64)));
    assert_eq!(
        updated.get("other"),
        Some(&AttrValue::s("kept")),
        "update keeps other attributes"
    );
    table
        .update(
            &key("u", "2"),
            &[("test".to_owned(), AttrValue::n(2i64))].into(),
            None,
        )
        .await
        .expect("writer sets test = 2");
    let err = table
        .update(&key("u", "2"), &set, Some(&not_set))
        .await
        .expect_err("must not clobber");
    assert!(err.is_precondition(), "{err:?}");
    assert_eq!(
        table
            .get(&key("u", "2"))
            .await
            .expect("get")
            .and_then(|i| i.get("test").cloned()),
        Some(AttrValue::n(2i64)),
        "a concurrent writer's value survives"
    );
    let err = table
        .update(&key("u", "absent"), &set, Some(&not_set))
        .await
        .expect_err("no upsert of absent items");
    assert!(err.is_precondition(), "{err:?}");
    assert_eq!(table.get(&key("u", "absent")).await.expect("get"), None);

    // Conditional delete.
    let err = table
        .delete(
            &key("u", "1"),
            Some(&Predicate::Equals("other".to_owned(), AttrValue::s("nope"))),
        )
        .await
        .expect_err("conditional delete");
    assert!(err.is_precondition());
    table.delete(&key("u", "1"), None).await.expect("delete");
    assert_eq!(table.get(&key("u", "1")).await.expect("get"), None);

    // Segmented scan: segments partition the table, pages resume.
    for i in 0..60 {
        let extra: Vec<(&str, AttrValue)> = if i % 3 == 0 {
            vec![("test", AttrValue::n(1i64))]
        } else {
            vec![]
        };
        table
            .put(&item("scan", &format!("{i:03}"), &extra), None)
            .await
            .expect("put");
    }
    let mut seen = BTreeSet::new();
    let mut matching = BTreeSet::new();
    let filter = Predicate::AttributeNotExists("test".to_owned());
    for segment in 0..4 {
        for filtered in [false, true] {
            let mut request = ScanRequest::segment(segment, 4);
            request.limit = 7;
            request.filter = filtered.then(|| filter.clone());
            loop {
                let page = table.scan(&request).await.expect("scan");
                for found in page.items {
                    let k = (found[PK].clone(), found[SK].clone());
                    if filtered {
                        assert!(
                            !found.contains_key("test"),
                            "filter returned an item with test"
                        );
                        assert!(
                            matching.insert(k),
                            "an item appeared twice in filtered scans"
                        );
                    } else {
                        assert!(seen.insert(k), "an item appeared in two segments or pages");
                    }
                }
                match page.last_key {
                    Some(k) => request.start_after = Some(k),
                    None => break,
                }
            }
        }
    }
    let scan_items = seen
        .iter()
        .filter(|(pk, _)| pk == &AttrValue::s("scan"))
        .count();
    assert_eq!(scan_items, 60, "segments together cover every item");
    let scan_matching = matching
        .iter()
        .filter(|(pk, _)| pk == &AttrValue::s("scan"))
        .count();
    assert_eq!(
        scan_matching, 40,
        "filter keeps exactly the items lacking the attribute"
    );

    let err = table
        .scan(&ScanRequest::segment(4, 4))
        .await
        .expect_err("segment out of range");
    assert!(
        matches!(err, ConnectorError::InvalidInput { .. }),
        "{err:?}"
    );
}

/// Checks a [`Sink`] that starts empty. `other` is a second, empty sink of
/// the same kind, used to compare digests.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn sink(sink: &dyn Sink, other: &dyn Sink) {
    let k = key("doc", "1");
    let v = |n: i64| item("doc", "1", &[("n", AttrValue::n(n))]);
    let upsert = |version: u64, n: i64| SinkRecord {
        key: k.clone(),
        version,
        op: SinkOp::Upsert(v(n)),
    };

    assert_eq!(
        sink.apply(&[upsert(5, 5)]).await.expect("apply"),
        vec![RecordOutcome::Applied]
    );
    assert_eq!(sink.read(&k).await.expect("read"), Some((5, v(5))));
    assert_eq!(
        sink.apply(&[upsert(3, 3)]).await.expect("apply"),
        vec![RecordOutcome::Stale],
        "older version is stale"
    );
    assert_eq!(
        sink.apply(&[upsert(5, 5)]).await.expect("apply"),
        vec![RecordOutcome::Stale],
        "replay is a no-op"
    );
    assert_eq!(
        sink.read(&k).await.expect("read"),
        Some((5, v(5))),
        "target never moves backwards"
    );

    let delete = SinkRecord {
        key: k.clone(),
        version: 7,
        op: SinkOp::Delete,
    };
    assert_eq!(
        sink.apply(&[delete]).await.expect("apply"),
        vec![RecordOutcome::Applied]
    );
    assert_eq!(sink.read(&k).await.expect("read"), None, "deleted");
    assert_eq!(
        sink.apply(&[upsert(6, 6)]).await.expect("apply"),
        vec![RecordOutcome::Stale],
        "no resurrection by an older upsert"
    );
    assert_eq!(sink.read(&k).await.expect("read"), None);
    assert_eq!(
        sink.apply(&[upsert(8, 8)]).await.expect("apply"),
        vec![RecordOutcome::Applied],
        "newer upsert recreates"
    );

    // A batch: outcomes in order, one per record.
    let batch: Vec<SinkRecord> = (0..30)
        .map(|i| SinkRecord {
            key: key("batch", &i.to_string()),
            version: 10,
            op: SinkOp::Upsert(item(
                "batch",
                &i.to_string(),
                &[("i", AttrValue::n(i64::from(i)))],
            )),
        })
        .collect();
    let outcomes = sink.apply(&batch).await.expect("apply batch");
    assert_eq!(outcomes, vec![RecordOutcome::Applied; 30]);

    // Digests: equal content digests equal, whatever the write order.
    let mut reversed = batch.clone();
    reversed.reverse();
    reversed.push(upsert(8, 8));
    other.apply(&reversed).await.expect("apply to other");
    let a = sink.digest(8).await.expect("digest");
    let b = other.digest(8).await.expect("digest");
    assert_eq!(a.iter().map(|d| d.count).sum::<u64>(), 31);
    assert_eq!(a, b, "same content, same digests");
    other
        .apply(&[SinkRecord {
            key: key("batch", "3"),
            version: 11,
            op: SinkOp::Upsert(item("batch", "3", &[("i", AttrValue::n(-1i64))])),
        }])
        .await
        .expect("apply");
    let c = other.digest(8).await.expect("digest");
    assert_eq!(
        a.iter().zip(&c).filter(|(x, y)| x != y).count(),
        1,
        "one changed item changes one bucket"
    );

    // A purge removes keys outright, tombstones included: a rolled-back
    // unit copies again at its items' own (lower) versions.
    let (live, gone) = (key("purge", "live"), key("purge", "gone"));
    let at = |k: &Key, version: u64, op: SinkOp| SinkRecord {
        key: k.clone(),
        version,
        op,
    };
    let live_item = |n: i64| item("purge", "live", &[("n", AttrValue::n(n))]);
    sink.apply(&[
        at(&live, 5, SinkOp::Upsert(live_item(5))),
        at(&gone, 1_700_000_000_000_000, SinkOp::Delete),
    ])
    .await
    .expect("apply");
    let purged = sink
        .purge(&[live.clone(), gone.clone()])
        .await
        .expect("purge");
    assert!(purged >= 2, "both went, the tombstone too: {purged}");
    assert_eq!(sink.read(&live).await.expect("read"), None);
    let again = sink
        .apply(&[
            at(&live, 1, SinkOp::Upsert(live_item(1))),
            at(&gone, 1, SinkOp::Upsert(item("purge", "gone", &[]))),
        ])
        .await
        .expect("apply");
    assert_eq!(
        again,
        vec![RecordOutcome::Applied; 2],
        "nothing of a purged key outranks a later write"
    );
    assert_eq!(
        sink.read(&live).await.expect("read"),
        Some((1, live_item(1)))
    );
    assert!(
        sink.read(&key("batch", "0")).await.expect("read").is_some(),
        "a purge removes only its keys"
    );
}

/// Polls `feed` until `want` records arrived or `timeout` passed.
///
/// # Panics
/// When the feed fails.
pub async fn poll_until(
    feed: &mut dyn ChangeFeed,
    want: usize,
    timeout: Duration,
) -> Vec<ChangeRecord> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < want && start.elapsed() < timeout {
        let batch = feed.poll(100).await.expect("poll");
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.extend(batch);
    }
    out
}

/// Checks a [`ChangeFeed`] over `table` (schema `pk`, `sk`; empty, with its
/// feed starting at the beginning). `open` opens the feed from a checkpoint.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn change_feed<F>(table: &dyn SourceTable, mut open: F)
where
    F: FnMut(FeedCheckpoint) -> Box<dyn ChangeFeed>,
{
    let a = key("feed", "a");
    table
        .put(&item("feed", "a", &[("n", AttrValue::n(1i64))]), None)
        .await
        .expect("put");
    table
        .put(&item("feed", "a", &[("n", AttrValue::n(2i64))]), None)
        .await
        .expect("put");
    table
        .put(&item("feed", "b", &[("n", AttrValue::n(1i64))]), None)
        .await
        .expect("put");
    table.delete(&a, None).await.expect("delete");

    let mut feed = open(FeedCheckpoint::default());
    let records = poll_until(feed.as_mut(), 4, Duration::from_secs(30)).await;
    assert!(
        records.len() >= 4,
        "expected 4 records, got {}",
        records.len()
    );
    let of_a: Vec<&ChangeRecord> = records.iter().filter(|r| r.key == a).collect();
    assert_eq!(of_a.len(), 3, "three changes of a: {of_a:?}");
    assert_eq!(of_a[0].kind, ChangeKind::Insert);
    assert_eq!(of_a[1].kind, ChangeKind::Modify);
    assert_eq!(
        of_a[1]
            .new_image
            .as_ref()
            .and_then(|i| i.get("n").map(ValueRef::to_owned)),
        Some(AttrValue::n(2i64))
    );
    assert_eq!(
        of_a[1].old_image.as_ref().and_then(|i| i.get("n")),
        Some(&AttrValue::n(1i64))
    );
    assert_eq!(of_a[2].kind, ChangeKind::Remove);
    assert!(of_a[2].new_image.is_none());
    assert!(
        of_a.windows(2).all(|w| w[0].version < w[1].version),
        "versions increase per key"
    );

    // Commit the first two; a feed resumed from the checkpoint delivers the
    // rest again, with the same versions.
    feed.commit(&records[1].position).await.expect("commit");
    let checkpoint = feed.checkpoint();
    let mut resumed = open(checkpoint);
    let again = poll_until(resumed.as_mut(), records.len() - 2, Duration::from_secs(30)).await;
    assert_eq!(
        again.len(),
        records.len() - 2,
        "uncommitted records are delivered again"
    );
    for (x, y) in again.iter().zip(&records[2..]) {
        assert_eq!(
            (&x.key, x.kind, x.version),
            (&y.key, y.kind, y.version),
            "same record, same version"
        );
    }
    let last = again.last().expect("records").position.clone();
    resumed.commit(&last).await.expect("commit");
    assert!(
        resumed.lag().iter().all(|l| l.records == 0),
        "nothing uncommitted: {:?}",
        resumed.lag()
    );

    // A new write reaches a running feed.
    table.put(&item("feed", "c", &[]), None).await.expect("put");
    let later = poll_until(resumed.as_mut(), 1, Duration::from_secs(30)).await;
    assert!(
        later
            .iter()
            .any(|r| r.key == key("feed", "c") && r.kind == ChangeKind::Insert),
        "{later:?}"
    );
    assert!(later.iter().all(|r| r.version > last_version(&records)));
}

fn last_version(records: &[ChangeRecord]) -> u64 {
    records.iter().map(|r| r.version).max().unwrap_or(0)
}

fn inc(entity: &str, metric: &str, delta: i64) -> BufferOp {
    BufferOp::Increment {
        entity: entity.to_owned(),
        metric: metric.to_owned(),
        delta,
    }
}

/// Checks a [`Buffer`] that starts empty: atomic increments and replaces,
/// a flush that takes out exactly what was there, events during a flush
/// belonging to the next one, and a crashed flush taken out again whole.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn buffer(buffer: &dyn Buffer) {
    buffer
        .apply(&[
            inc("a", "views", 2),
            inc("a", "views", 3),
            inc("b", "likes", 1),
            inc("a", "likes", -1),
        ])
        .await
        .expect("apply");
    buffer
        .apply(&[BufferOp::Replace {
            entity: "b".into(),
            metric: "score".into(),
            value: "4.5".into(),
        }])
        .await
        .expect("apply");
    assert_eq!(buffer.dirty_count().await.expect("dirty"), 2);
    let a = buffer.peek("a").await.expect("peek");
    assert_eq!(a.increments.get("views"), Some(&5));
    assert_eq!(a.increments.get("likes"), Some(&-1));
    assert_eq!(
        buffer.peek("nobody").await.expect("peek"),
        EntityDelta {
            entity: "nobody".into(),
            ..EntityDelta::default()
        }
    );

    // A replace resets the metric: increments before it are void, after it they add up.
    buffer.apply(&[inc("c", "n", 7)]).await.expect("apply");
    buffer
        .apply(&[BufferOp::Replace {
            entity: "c".into(),
            metric: "n".into(),
            value: "100".into(),
        }])
        .await
        .expect("apply");
    buffer.apply(&[inc("c", "n", 1)]).await.expect("apply");
    let c = buffer.peek("c").await.expect("peek");
    assert_eq!(
        (
            c.replaces.get("n").map(String::as_str),
            c.increments.get("n")
        ),
        (Some("100"), Some(&1))
    );

    assert_eq!(buffer.pending_flush().await.expect("pending"), None);
    let taken = buffer.take_for_flush(1).await.expect("take");
    assert_eq!(
        taken.iter().map(|d| d.entity.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(
        buffer.dirty_count().await.expect("dirty"),
        0,
        "taken out whole"
    );

    // Events during the flush belong to the next one.
    buffer.apply(&[inc("a", "views", 10)]).await.expect("apply");
    assert_eq!(
        buffer
            .peek("a")
            .await
            .expect("peek")
            .increments
            .get("views"),
        Some(&10)
    );
    let err = buffer
        .take_for_flush(2)
        .await
        .expect_err("a second flush while one is pending");
    assert!(err.is_precondition(), "{err:?}");
    // The crashed flush is taken out again, identical.
    assert_eq!(buffer.take_for_flush(1).await.expect("retake"), taken);
    assert_eq!(
        buffer
            .pending_flush()
            .await
            .expect("pending")
            .map(|(s, d)| (s, d.len())),
        Some((1, 3))
    );
    buffer.ack_flush(1).await.expect("ack");
    assert_eq!(buffer.pending_flush().await.expect("pending"), None);
    let next = buffer.take_for_flush(2).await.expect("take");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].increments.get("views"), Some(&10));
    buffer.ack_flush(2).await.expect("ack");
}

fn event(id: &str, op: BufferOp, time_micros: i64) -> BufferEvent {
    BufferEvent {
        id: id.to_owned(),
        op,
        time_micros,
    }
}

/// Checks [`Buffer::apply_events`] on a buffer that starts empty: ids seen
/// within the window are duplicates (within a batch and across batches), a
/// resent batch changes nothing, a failed batch remembers no id, and the
/// counts of [`Buffer::stats`] follow events through a flush.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn buffer_events(buffer: &dyn Buffer) {
    let window = Duration::from_secs(3600);
    let batch = [
        event("e1", inc("a", "views", 2), 10),
        event("e2", inc("a", "views", 3), 30),
        event("e1", inc("a", "views", 100), 10),
        event(
            "e3",
            BufferOp::Replace {
                entity: "b".into(),
                metric: "score".into(),
                value: "4.5".into(),
            },
            20,
        ),
        event("e4", inc("b", "score", 1), 5),
    ];
    assert_eq!(
        buffer.apply_events(&batch, window).await.expect("apply"),
        [2],
        "an id repeated within a batch is a duplicate"
    );
    assert_eq!(
        buffer.apply_events(&batch, window).await.expect("resend"),
        [0, 1, 2, 3, 4],
        "a resent batch is all duplicates"
    );
    let a = buffer.peek("a").await.expect("peek");
    assert_eq!(a.increments.get("views"), Some(&5));
    assert_eq!(a.last_event_micros, Some(30));
    let b = buffer.peek("b").await.expect("peek");
    assert_eq!(
        (
            b.replaces.get("score").map(String::as_str),
            b.increments.get("score")
        ),
        (Some("4.5"), Some(&1))
    );
    assert_eq!(b.last_event_micros, Some(20));
    let stats = buffer.stats().await.expect("stats");
    assert_eq!(
        (stats.dirty_keys, stats.pending_events, stats.pending_flush),
        (2, 4, None)
    );

    // A batch that fails (an increment overflows) applies nothing and
    // remembers no id: sent again without the bad event it is accepted.
    buffer
        .apply_events(&[event("big", inc("c", "n", i64::MAX - 1), 1)], window)
        .await
        .expect("apply");
    let err = buffer
        .apply_events(
            &[
                event("x1", inc("a", "views", 1), 50),
                event("x2", inc("c", "n", 5), 50),
            ],
            window,
        )
        .await
        .expect_err("overflow");
    assert!(!err.is_retryable(), "{err:?}");
    assert_eq!(
        buffer
            .peek("a")
            .await
            .expect("peek")
            .increments
            .get("views"),
        Some(&5)
    );
    assert_eq!(
        buffer
            .apply_events(&[event("x1", inc("a", "views", 1), 50)], window)
            .await
            .expect("apply"),
        Vec::<usize>::new()
    );

    // Counts follow the events into a flush and out with its acknowledgement.
    let taken = buffer.take_for_flush(1).await.expect("take");
    assert_eq!(taken.len(), 3);
    buffer
        .apply_events(&[event("e5", inc("a", "views", 7), 60)], window)
        .await
        .expect("apply");
    let stats = buffer.stats().await.expect("stats");
    assert_eq!(
        (stats.dirty_keys, stats.pending_events, stats.pending_flush),
        (4, 7, Some(1)),
        "three entities and six events pending, one entity and one event live"
    );
    let (sequence, pending_a) = buffer
        .peek_pending("a")
        .await
        .expect("peek pending")
        .expect("a is in the pending flush");
    assert_eq!(sequence, 1);
    assert_eq!(pending_a.increments.get("views"), Some(&6));
    assert_eq!(
        buffer.peek_pending("nobody").await.expect("peek pending"),
        None
    );
    buffer.ack_flush(1).await.expect("ack");
    let stats = buffer.stats().await.expect("stats");
    assert_eq!(
        (
            stats.dirty_keys,
            stats.pending_events,
            stats.pending_flush,
            stats.last_acked
        ),
        (1, 1, None, Some(1))
    );
    assert_eq!(buffer.peek_pending("a").await.expect("peek pending"), None);
    // Ids stay remembered after their flush.
    assert_eq!(
        buffer
            .apply_events(&[event("e5", inc("a", "views", 7), 60)], window)
            .await
            .expect("apply"),
        [0]
    );

    // An id is forgotten once its window has passed.
    let short = Duration::from_secs(1);
    buffer
        .apply_events(&[event("brief", inc("d", "n", 1), 1)], short)
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        buffer
            .apply_events(&[event("brief", inc("d", "n", 1), 1)], short)
            .await
            .expect("apply"),
        Vec::<usize>::new()
    );
    assert_eq!(
        buffer.peek("d").await.expect("peek").increments.get("n"),
        Some(&2)
    );
}
