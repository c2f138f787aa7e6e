//! A scripted in-memory [`ShardSource`] for tests: shards are created,
//! filled and split on command, so shard lineage can be tested where a local
//! stand-in has a single shard.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::error::{ConnectorError, ConnectorResult};
use crate::streams::{IteratorStart, RawRecord, ShardInfo, ShardPage, ShardSource};

#[derive(Default)]
struct Shard {
    parent: Option<String>,
    records: Vec<RawRecord>,
    closed: bool,
}

#[derive(Default)]
struct State {
    shards: BTreeMap<String, Shard>,
    next_sequence: u64,
}

/// Cheap to clone; clones share the script.
#[derive(Clone, Default)]
pub struct ScriptedStream {
    state: Arc<Mutex<State>>,
}

impl ScriptedStream {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("scripted stream lock")
    }

    /// Adds an open shard.
    pub fn add_shard(&self, id: &str, parent: Option<&str>) {
        self.lock().shards.insert(
            id.to_owned(),
            Shard {
                parent: parent.map(str::to_owned),
                ..Shard::default()
            },
        );
    }

    /// Appends a record to an open shard, assigning the next sequence number.
    ///
    /// # Panics
    /// When the shard does not exist or is closed (a broken script).
    pub fn push(&self, shard: &str, mut record: RawRecord) -> String {
        let mut state = self.lock();
        state.next_sequence += 1;
        record.sequence = format!("{:021}", state.next_sequence);
        let sequence = record.sequence.clone();
        let s = state.shards.get_mut(shard).expect("scripted shard exists");
        assert!(!s.closed, "push to closed shard {shard}");
        s.records.push(record);
        sequence
    }

    /// Closes `shard` and opens `children` with it as parent.
    pub fn split(&self, shard: &str, children: &[&str]) {
        self.lock()
            .shards
            .get_mut(shard)
            .expect("scripted shard exists")
            .closed = true;
        for child in children {
            self.add_shard(child, Some(shard));
        }
    }
}

#[async_trait]
impl ShardSource for ScriptedStream {
    async fn list_shards(&self) -> ConnectorResult<Vec<ShardInfo>> {
        Ok(self
            .lock()
            .shards
            .iter()
            .map(|(id, s)| ShardInfo {
                id: id.clone(),
                parent: s.parent.clone(),
                closed: s.closed,
            })
            .collect())
    }

    async fn iterator(&self, shard: &str, start: &IteratorStart) -> ConnectorResult<String> {
        let state = self.lock();
        let s = state
            .shards
            .get(shard)
            .ok_or_else(|| ConnectorError::NotFound {
                backend: "scripted",
                message: shard.to_owned(),
            })?;
        let index = match start {
            IteratorStart::TrimHorizon => 0,
            IteratorStart::Latest => s.records.len(),
            IteratorStart::AfterSequence(seq) => s
                .records
                .iter()
                .position(|r| &r.sequence == seq)
                .map_or(0, |i| i + 1),
        };
        Ok(format!("{shard}@{index}"))
    }

    async fn read(&self, iterator: &str, limit: usize) -> ConnectorResult<ShardPage> {
        let (shard, index) = iterator
            .rsplit_once('@')
            .ok_or_else(|| ConnectorError::invalid("scripted", "bad iterator"))?;
        let index: usize = index
            .parse()
            .map_err(|_| ConnectorError::invalid("scripted", "bad iterator"))?;
        let state = self.lock();
        let s = state
            .shards
            .get(shard)
            .ok_or_else(|| ConnectorError::NotFound {
                backend: "scripted",
                message: shard.to_owned(),
            })?;
        let end = (index + limit).min(s.records.len());
        let records = s.records[index..end].to_vec();
        let next_iterator =
            (!(s.closed && end == s.records.len())).then(|| format!("{shard}@{end}"));
        Ok(ShardPage {
            records,
            next_iterator,
        })
    }
}
