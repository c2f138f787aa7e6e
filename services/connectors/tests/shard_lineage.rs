//! Shard lineage: a child shard is read only after its parent was read and
//! committed to the end, versions continue across the split, and a resumed
//! feed picks up where the checkpoint says. The local DynamoDB stand-in has a
//! single shard, so splits are scripted in memory.

use std::time::Duration;

use tidemark_connectors::memory::ScriptedStream;
use tidemark_connectors::streams::{RawRecord, ShardedFeed, StartPosition};
use tidemark_connectors::{AttrValue, ChangeFeed, ChangeKind, FeedCheckpoint, Item, Key};

fn record(id: &str, n: i64, second: i64) -> RawRecord {
    let key = Key::single("id", AttrValue::s(id));
    let mut image: Item = key.0.clone();
    image.insert("n".into(), AttrValue::n(n));
    RawRecord {
        sequence: String::new(),
        kind: ChangeKind::Modify,
        key,
        new_image: Some(image),
        old_image: None,
        created_at_secs: second,
    }
}

fn feed(stream: &ScriptedStream, checkpoint: &FeedCheckpoint) -> ShardedFeed<ScriptedStream> {
    ShardedFeed::new(stream.clone(), StartPosition::TrimHorizon, checkpoint)
        .refresh_every(Duration::ZERO)
}

fn n_of(r: &tidemark_connectors::ChangeRecord) -> i64 {
    r.new_image
        .as_ref()
        .and_then(|i| i.get("n"))
        .and_then(tidemark_connectors::ValueRef::as_number)
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn child_waits_for_parent_and_versions_continue() {
    let stream = ScriptedStream::new();
    stream.add_shard("shard-0", None);
    stream.push("shard-0", record("k", 1, 100));
    stream.push("shard-0", record("k", 2, 100));
    stream.split("shard-0", &["shard-1", "shard-2"]);
    // The child's record is in the same second as the parent's: only the
    // lineage keeps its version above them.
    stream.push("shard-1", record("k", 3, 100));
    stream.push("shard-2", record("other", 1, 100));

    let mut feed = feed(&stream, &FeedCheckpoint::default());
    let first = feed.poll(10).await.unwrap();
    assert_eq!(
        first.iter().map(n_of).collect::<Vec<_>>(),
        vec![1, 2],
        "only the parent is read first"
    );
    assert!(
        feed.poll(10).await.unwrap().is_empty(),
        "children wait until the parent is committed"
    );

    feed.commit(&first[0].position).await.unwrap();
    assert!(
        feed.poll(10).await.unwrap().is_empty(),
        "a partly committed parent still blocks"
    );
    feed.commit(&first[1].position).await.unwrap();
    let second = feed.poll(10).await.unwrap();
    assert_eq!(
        second.len(),
        2,
        "both children are read once the parent is done"
    );
    let child = second
        .iter()
        .find(|r| r.key == Key::single("id", AttrValue::s("k")))
        .unwrap();
    assert_eq!(n_of(child), 3);
    assert!(
        child.version > first[1].version,
        "version continues across the split: {} > {}",
        child.version,
        first[1].version
    );
    assert_eq!(child.position.partition, "shard-1");
}

#[tokio::test]
async fn resumed_feed_assigns_the_same_versions() {
    let stream = ScriptedStream::new();
    stream.add_shard("shard-0", None);
    for n in 1..=5 {
        stream.push("shard-0", record("k", n, 200));
    }
    let mut original = feed(&stream, &FeedCheckpoint::default());
    let all = original.poll(10).await.unwrap();
    assert_eq!(all.len(), 5);
    original.commit(&all[1].position).await.unwrap();

    let checkpoint = original.checkpoint();
    let text = serde_json::to_string(&checkpoint).unwrap();
    let restored: FeedCheckpoint = serde_json::from_str(&text).unwrap();
    let mut resumed = feed(&stream, &restored);
    let again = resumed.poll(10).await.unwrap();
    assert_eq!(
        again.len(),
        3,
        "delivery resumes after the committed record"
    );
    for (x, y) in again.iter().zip(&all[2..]) {
        assert_eq!((x.version, &x.position), (y.version, &y.position));
    }
    assert!(all.windows(2).all(|w| w[0].version < w[1].version));
}

#[tokio::test]
async fn latest_start_skips_history_but_reads_new_shards_fully() {
    let stream = ScriptedStream::new();
    stream.add_shard("old", None);
    stream.push("old", record("k", 1, 300));
    stream.split("old", &["live"]);
    stream.push("live", record("k", 2, 300));
    let mut feed = ShardedFeed::new(
        stream.clone(),
        StartPosition::Latest,
        &FeedCheckpoint::default(),
    )
    .refresh_every(Duration::ZERO);
    assert!(
        feed.poll(10).await.unwrap().is_empty(),
        "history before the start is skipped"
    );
    stream.push("live", record("k", 3, 301));
    let got = feed.poll(10).await.unwrap();
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![3]);
    feed.commit(&got[0].position).await.unwrap();
    stream.split("live", &["next"]);
    stream.push("next", record("k", 4, 302));
    let after_split = feed.poll(10).await.unwrap();
    assert_eq!(
        after_split.iter().map(n_of).collect::<Vec<_>>(),
        vec![4],
        "a shard born after the start is read from its beginning"
    );
}

/// Two readers share one stream: each reads only the shards that hash to
/// it, and a child whose parent the other reader has waits until that
/// reader's checkpoint says the parent is done; versions still continue
/// across the split.
#[tokio::test]
async fn shared_readers_split_the_shards_and_a_child_waits_for_the_other_reader() {
    let reader_of = |id: &str| ShardedFeed::<ScriptedStream>::reader_of(id, 2);
    let parent = (0..)
        .map(|i| format!("shard-p{i}"))
        .find(|id| reader_of(id) == 0)
        .unwrap();
    let child = (0..)
        .map(|i| format!("shard-c{i}"))
        .find(|id| reader_of(id) == 1)
        .unwrap();
    let stream = ScriptedStream::new();
    stream.add_shard(&parent, None);
    stream.push(&parent, record("k", 1, 100));
    stream.push(&parent, record("k", 2, 100));
    stream.split(&parent, &[&child]);
    stream.push(&child, record("k", 3, 100));

    let mut a = feed(&stream, &FeedCheckpoint::default()).shared(0, 2);
    let mut b = feed(&stream, &FeedCheckpoint::default()).shared(1, 2);
    assert!(
        b.poll(10).await.unwrap().is_empty(),
        "the child waits for the parent's reader"
    );
    let from_a = a.poll(10).await.unwrap();
    assert_eq!(from_a.iter().map(n_of).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        a.poll(10).await.unwrap().is_empty(),
        "a reader never reads the other's shard"
    );
    b.learn_peers(&a.checkpoint());
    assert!(
        b.poll(10).await.unwrap().is_empty(),
        "delivered is not done: the parent's records are not committed yet"
    );
    for r in &from_a {
        a.commit(&r.position).await.unwrap();
    }
    b.learn_peers(&a.checkpoint());
    let from_b = b.poll(10).await.unwrap();
    assert_eq!(from_b.iter().map(n_of).collect::<Vec<_>>(), vec![3]);
    assert!(
        from_b[0].version > from_a[1].version,
        "versions continue across the readers"
    );
    assert_eq!(
        a.checkpoint().partitions.keys().collect::<Vec<_>>(),
        vec![&parent]
    );
    assert_eq!(
        b.checkpoint().partitions.keys().collect::<Vec<_>>(),
        vec![&child]
    );
    assert!(a.lag().iter().all(|l| l.partition == parent));
}
