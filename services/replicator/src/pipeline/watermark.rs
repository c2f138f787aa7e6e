//! DBLog backfill (`BACKFILL_MODE_WATERMARK`): the feed unit's holder, the
//! one process reading the change feed, copies the table in chunks between
//! a low and a high watermark, interleaved with the feed and without pausing
//! writers.
//!
//! For each chunk: start noting every key the feed delivers, write the low
//! watermark item, read one page of each unfinished parallel scan segment,
//! write the high watermark item. The chunk is emitted once the feed has
//! delivered that high watermark (or, for a feed that never carries the
//! source's own writes, after [`HIGH_WAIT`]): every row whose key the feed
//! delivered since the chunk began is dropped, since the feed carries that
//! key's newer state (or its delete) itself; the rest are written to the
//! sinks. A row is thus never written over a change made after it was read,
//! and a delete during the backfill is never undone.
//!
//! Only the ordering per key matters: DynamoDB Streams orders per shard,
//! not across shards, and the rule above holds without a total order (a row
//! is written only when the feed delivered nothing for its key after the read
//! began; whatever it delivers later comes after the row). Sinks stay
//! versioned as well, rows carrying version 0 (or their version attribute),
//! below any feed record of the same key.
//!
//! Progress (each segment's last key) is checkpointed with the feed's own
//! position in the feed unit, only when a chunk is emitted: after a crash the
//! chunk in flight is read again with a new window.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_connectors::{AttrValue, ChangeRecord, Image, Item, Key, ScanRequest, ValueRef};

use super::open::{Change, Filtered, Opened};
use crate::context::UnitFailure;
use crate::dead_letters::DeadLetters;

/// The attribute of the watermark item saying `low` or `high`.
pub const KIND_ATTRIBUTE: &str = "_tidemark_watermark";
/// The attribute of the watermark item naming the chunk.
pub const CHUNK_ATTRIBUTE: &str = "_tidemark_chunk";
/// How long a chunk waits for its high watermark to come through the feed
/// before it is emitted anyway (a Kafka feed need not carry the source's
/// writes).
pub const HIGH_WAIT: Duration = Duration::from_secs(10);

/// One parallel scan segment's progress.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub start_after: Option<Key>,
    pub done: bool,
}

/// What the feed unit checkpoints of the backfill.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub cursors: Vec<Cursor>,
    /// Rows written to the sinks.
    pub copied: u64,
    /// Rows dropped because the feed carried their key inside the window.
    pub dropped: u64,
    pub chunks: u64,
    pub done: bool,
}

impl Progress {
    pub fn new(segments: u32) -> Self {
        Self {
            cursors: vec![Cursor::default(); segments as usize],
            ..Self::default()
        }
    }
}

struct Chunk {
    id: String,
    rows: Vec<(Key, Item)>,
    /// Each read segment's cursor once the chunk is emitted.
    next: Vec<(usize, Option<Key>)>,
    /// Keys the feed delivered since the chunk began.
    seen: HashSet<Key>,
    high_written: Instant,
    high_seen: bool,
}

/// The backfill as the feed holder drives it.
pub struct Backfill {
    key: Key,
    chunk_size: u32,
    in_flight: Option<Chunk>,
}

/// The watermark item's key: the reserved prefix and the pipeline's name as
/// the partition key, and a fixed sort key of the table's type.
///
/// # Errors
/// A source whose partition key is not a string.
pub fn watermark_key(opened: &Opened, pipeline: &str) -> Result<Key, String> {
    let schema = &opened.source.schema;
    let ty = |name: &str| {
        opened
            .source
            .dynamo
            .as_ref()
            .and_then(|t| t.key_type(name))
            .unwrap_or("S")
            .to_owned()
    };
    if ty(&schema.partition) != "S" {
        return Err(format!(
            "BACKFILL_MODE_WATERMARK writes watermark items under a string partition key, and {} is of type {}: use BACKFILL_MODE_TOMBSTONES",
            schema.partition,
            ty(&schema.partition)
        ));
    }
    let mut attrs = vec![(
        schema.partition.clone(),
        AttrValue::s(format!("{}{pipeline}", opened.watermark_prefix)),
    )];
    if let Some(sort) = &schema.sort {
        let value = match ty(sort).as_str() {
            "N" => AttrValue::n(0i64),
            "B" => AttrValue::B(b"watermark".to_vec()),
            _ => AttrValue::s("watermark"),
        };
        attrs.push((sort.clone(), value));
    }
    Ok(Key::new(attrs))
}

impl Backfill {
    pub fn new(key: Key, chunk_size: u32) -> Self {
        Self {
            key,
            chunk_size: chunk_size.max(1),
            in_flight: None,
        }
    }

    async fn write_watermark(
        &self,
        opened: &Opened,
        kind: &str,
        chunk: &str,
    ) -> Result<(), UnitFailure> {
        let mut item = self.key.0.clone();
        item.insert(KIND_ATTRIBUTE.to_owned(), AttrValue::s(kind));
        item.insert(CHUNK_ATTRIBUTE.to_owned(), AttrValue::s(chunk));
        opened.source.table.put(&item, None).await?;
        Ok(())
    }

    /// Starts the next chunk unless one is in flight or the backfill is
    /// over: low watermark, one page of every unfinished segment, high
    /// watermark.
    ///
    /// # Errors
    /// The source refusing a watermark write or a scan.
    pub async fn select(
        &mut self,
        opened: &Opened,
        progress: &Progress,
    ) -> Result<(), UnitFailure> {
        if self.in_flight.is_some() || progress.done {
            return Ok(());
        }
        let id = uuid::Uuid::new_v4().to_string();
        // The window opens before the low watermark: from here on, every
        // key the feed delivers is noted (observe runs on every poll).
        self.in_flight = Some(Chunk {
            id: id.clone(),
            rows: Vec::new(),
            next: Vec::new(),
            seen: HashSet::new(),
            high_written: Instant::now(),
            high_seen: false,
        });
        self.write_watermark(opened, "low", &id).await?;
        let open: Vec<usize> = (0..progress.cursors.len())
            .filter(|i| !progress.cursors[*i].done)
            .collect();
        let total = u32::try_from(progress.cursors.len()).unwrap_or(u32::MAX);
        let per_segment = (self.chunk_size / u32::try_from(open.len().max(1)).unwrap_or(1)).max(25);
        let pages = futures::future::try_join_all(open.iter().map(|&i| {
            let request = ScanRequest {
                segment: u32::try_from(i).unwrap_or(0),
                total_segments: total,
                start_after: progress.cursors[i].start_after.clone(),
                limit: per_segment,
                filter: None,
                consistent: true,
            };
            let table = opened.source.table.clone();
            async move { table.scan(&request).await.map(|page| (i, page)) }
        }))
        .await?;
        self.write_watermark(opened, "high", &id).await?;
        let chunk = self.in_flight.as_mut().expect("set above");
        chunk.high_written = Instant::now();
        for (i, page) in pages {
            chunk.next.push((i, page.last_key.clone()));
            chunk.rows.extend(
                page.items
                    .into_iter()
                    .filter_map(|item| opened.source.schema.key_of(&item).ok().map(|k| (k, item)))
                    .filter(|(k, _)| !opened.reserved(k)),
            );
        }
        Ok(())
    }

    /// Notes what a poll delivered: the keys changed inside the window, and
    /// this chunk's high watermark.
    pub fn observe(&mut self, records: &[ChangeRecord]) {
        let Some(chunk) = self.in_flight.as_mut() else {
            return;
        };
        for r in records {
            if r.key == self.key {
                let image = r.new_image.as_ref();
                let attr = |name: &str| image.and_then(|i| i.get(name)).and_then(ValueRef::as_str);
                if attr(CHUNK_ATTRIBUTE) == Some(chunk.id.as_str())
                    && attr(KIND_ATTRIBUTE) == Some("high")
                {
                    chunk.high_seen = true;
                }
            } else {
                chunk.seen.insert(r.key.clone());
            }
        }
    }

    /// Whether the chunk in flight may be emitted now.
    pub fn ready(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|c| c.high_seen || c.high_written.elapsed() >= HIGH_WAIT)
    }

    /// Writes the chunk's rows the feed did not carry inside the window and
    /// advances the cursors; at the end, removes the watermark item.
    ///
    /// # Errors
    /// A sink or the dead-letter store failing.
    pub async fn emit(
        &mut self,
        opened: &Opened,
        dead: &DeadLetters,
        pipeline: &str,
        progress: &mut Progress,
    ) -> Result<(), UnitFailure> {
        let Some(chunk) = self.in_flight.take() else {
            return Ok(());
        };
        let position = format!("watermark/{}", chunk.id);
        let mut dropped = 0u64;
        let changes: Vec<Change> = chunk
            .rows
            .into_iter()
            .filter(|(k, _)| {
                let keep = !chunk.seen.contains(k);
                dropped += u64::from(!keep);
                keep
            })
            .map(|(k, item)| {
                let version = opened.version_of(&item, 0);
                (k, Some(Image::Item(item)), version, position.clone())
            })
            .collect();
        let copied = u64::try_from(changes.len()).unwrap_or(u64::MAX);
        opened
            .write(changes, dead, pipeline, Filtered::Skip)
            .await?;
        progress.copied += copied;
        progress.dropped += dropped;
        progress.chunks += 1;
        for (i, last) in chunk.next {
            let cursor = &mut progress.cursors[i];
            cursor.done = last.is_none();
            cursor.start_after = last;
        }
        if progress.cursors.iter().all(|c| c.done) {
            opened.source.table.delete(&self.key, None).await?;
            progress.done = true;
        }
        Ok(())
    }
}
