//! The replicator's own Prometheus metrics (beside the kit's per-RPC
//! ones): what each pipeline wrote to each sink, its dead letters, and the
//! lag of each shard or partition this replica reads.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `tidemark_replicator_records_total` | `pipeline`, `sink`, `outcome` | records handed to a sink: `applied`, `stale` (a newer version was there) or `dead_lettered` |
//! | `tidemark_replicator_bytes_total` | `pipeline`, `sink` | bytes of the records applied, counted as DynamoDB counts an item's size |
//! | `tidemark_replicator_dead_letters_total` | `pipeline`, `sink` | records the sink rejected, kept in the dead-letter table |
//! | `tidemark_replicator_lag_seconds` | `pipeline`, `shard` | age of the oldest change not yet written, per shard or partition this replica follows |
//! | `tidemark_replicator_lag_records` | `pipeline`, `shard` | changes delivered or known waiting, not yet written |
//!
//! Lag is reported by the replica that holds the feed unit; a shard's
//! series goes away when its unit stops here (another replica reports it).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tidemark_connectors::{PartitionLag, SinkOp, SinkRecord, ValueRef};
use tidemark_kit::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    pipeline: String,
    sink: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    pipeline: String,
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    pipeline: String,
    shard: String,
}

/// Cheap to clone; a default one counts into a registry nobody serves.
#[derive(Clone, Default)]
pub struct ReplicatorMetrics {
    records: Family<Outcome, Counter>,
    bytes: Family<SinkLabels, Counter>,
    dead_letters: Family<SinkLabels, Counter>,
    lag_seconds: Family<ShardLabels, Gauge<f64, AtomicU64>>,
    lag_records: Family<ShardLabels, Gauge>,
}

/// What one sink did with one batch of a pipeline.
#[derive(Default)]
pub struct SinkTotals {
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub bytes: u64,
}

impl ReplicatorMetrics {
    /// Registers the metrics with the host's registry.
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "replicator_records",
            "Records handed to a sink, by pipeline, sink and outcome (applied, stale, dead_lettered)",
            m.records.clone(),
        );
        metrics.register(
            "replicator_bytes",
            "Bytes of the records applied to a sink (DynamoDB item size), by pipeline and sink",
            m.bytes.clone(),
        );
        metrics.register(
            "replicator_dead_letters",
            "Records a sink rejected, kept in the dead-letter table, by pipeline and sink",
            m.dead_letters.clone(),
        );
        metrics.register(
            "replicator_lag_seconds",
            "Age of the oldest change not yet written, per shard or partition this replica follows",
            m.lag_seconds.clone(),
        );
        metrics.register(
            "replicator_lag_records",
            "Changes delivered or known waiting and not yet written, per shard or partition this replica follows",
            m.lag_records.clone(),
        );
        m
    }

    pub fn wrote(&self, pipeline: &str, sink: &str, t: &SinkTotals) {
        for (outcome, n) in [
            ("applied", t.applied),
            ("stale", t.stale),
            ("dead_lettered", t.dead_lettered),
        ] {
            if n > 0 {
                self.records
                    .get_or_create(&Outcome {
                        pipeline: pipeline.to_owned(),
                        sink: sink.to_owned(),
                        outcome,
                    })
                    .inc_by(n);
            }
        }
        let labels = SinkLabels {
            pipeline: pipeline.to_owned(),
            sink: sink.to_owned(),
        };
        if t.bytes > 0 {
            self.bytes.get_or_create(&labels).inc_by(t.bytes);
        }
        if t.dead_lettered > 0 {
            self.dead_letters
                .get_or_create(&labels)
                .inc_by(t.dead_lettered);
        }
    }

    /// The lag of the shards a feed unit of `pipeline` reads; `previous`
    /// are the shards it reported last time, whose series are removed if
    /// they are gone (a closed shard). Returns the shards reported now.
    pub fn lag(&self, pipeline: &str, lag: &[PartitionLag], previous: &[String]) -> Vec<String> {
        let now: Vec<String> = lag.iter().map(|l| l.partition.clone()).collect();
        for gone in previous.iter().filter(|p| !now.contains(p)) {
            self.forget_shard(pipeline, gone);
        }
        for l in lag {
            let labels = ShardLabels {
                pipeline: pipeline.to_owned(),
                shard: l.partition.clone(),
            };
            self.lag_seconds.get_or_create(&labels).set(l.seconds);
            self.lag_records
                .get_or_create(&labels)
                .set(i64::try_from(l.records).unwrap_or(i64::MAX));
        }
        now
    }

    /// Removes the lag series of `shards` (the feed unit stopped here).
    pub fn forget_lag(&self, pipeline: &str, shards: &[String]) {
        for shard in shards {
            self.forget_shard(pipeline, shard);
        }
    }

    fn forget_shard(&self, pipeline: &str, shard: &str) {
        let labels = ShardLabels {
            pipeline: pipeline.to_owned(),
            shard: shard.to_owned(),
        };
        self.lag_seconds.remove(&labels);
        self.lag_records.remove(&labels);
    }
}

/// The lag series of one feed unit running here, removed when it stops
/// (dropped: lease lost, paused for good, failed), so a shard that moved
/// to another replica is not reported twice.
pub struct LagSeries {
    metrics: ReplicatorMetrics,
    pipeline: String,
    shards: Vec<String>,
}

impl LagSeries {
    pub fn new(metrics: &ReplicatorMetrics, pipeline: &str) -> Self {
        Self {
            metrics: metrics.clone(),
            pipeline: pipeline.to_owned(),
            shards: Vec::new(),
        }
    }

    pub fn update(&mut self, lag: &[PartitionLag]) {
        self.shards = self.metrics.lag(&self.pipeline, lag, &self.shards);
    }
}

impl Drop for LagSeries {
    fn drop(&mut self) {
        self.metrics.forget_lag(&self.pipeline, &self.shards);
    }
}

/// A record's size as DynamoDB counts an item's: attribute names and values
/// in bytes (numbers about one byte per two digits, plus one), a delete its
/// key's.
pub fn record_bytes(record: &SinkRecord) -> u64 {
    let sum = |attributes: &mut dyn Iterator<Item = (&[u8], ValueRef<'_>)>| {
        attributes
            .map(|(name, v)| name.len() as u64 + value_bytes(v))
            .sum()
    };
    let of_item = |item: &tidemark_connectors::Item| {
        sum(&mut item.iter().map(|(n, v)| (n.as_bytes(), v.into())))
    };
    match &record.op {
        SinkOp::Upsert(item) => of_item(item),
        SinkOp::UpsertEncoded(item) => sum(&mut item.attributes()),
        SinkOp::Delete => of_item(&record.key.0),
    }
}

fn value_bytes(v: ValueRef<'_>) -> u64 {
    let number = |n: &[u8]| (n.len() as u64).div_ceil(2) + 1;
    match v {
        ValueRef::S(s) | ValueRef::B(s) => s.len() as u64,
        ValueRef::N(n) => number(n),
        ValueRef::Bool(_) | ValueRef::Null(_) => 1,
        ValueRef::Ss(set) | ValueRef::Bs(set) => set.iter().map(|s| s.len() as u64).sum(),
        ValueRef::Ns(set) => set.iter().map(number).sum(),
        ValueRef::L(list) => 3 + list.iter().map(|v| 1 + value_bytes(v)).sum::<u64>(),
        ValueRef::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| 1 + k.len() as u64 + value_bytes(v))
                .sum::<u64>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_connectors::{AttrValue, Item, Key};

    #[test]
    fn sizes_follow_dynamodb_item_size() {
        let mut item = Item::new();
        item.insert("id".into(), AttrValue::s("abc"));
        item.insert("n".into(), AttrValue::n(12345i64));
        item.insert("ok".into(), AttrValue::Bool(true));
        let upsert = SinkRecord {
            key: Key(std::collections::BTreeMap::new()),
            version: 1,
            op: SinkOp::Upsert(item),
        };
        // id: 2 + 3; n: 1 + (5 digits → 3 + 1); ok: 2 + 1
        assert_eq!(record_bytes(&upsert), 5 + 5 + 3);
    }

    #[test]
    fn counts_and_lag_appear_in_the_exposition() {
        let metrics = Metrics::default();
        let m = ReplicatorMetrics::register(&metrics);
        m.wrote(
            "p",
            "es",
            &SinkTotals {
                applied: 3,
                stale: 1,
                dead_lettered: 2,
                bytes: 120,
            },
        );
        let shards = m.lag(
            "p",
            &[PartitionLag {
                partition: "shard-1".into(),
                records: 7,
                seconds: 1.5,
            }],
            &[],
        );
        let text = metrics.encode();
        for line in [
            r#"tidemark_replicator_records_total{pipeline="p",sink="es",outcome="applied"} 3"#,
            r#"tidemark_replicator_records_total{pipeline="p",sink="es",outcome="dead_lettered"} 2"#,
            r#"tidemark_replicator_bytes_total{pipeline="p",sink="es"} 120"#,
            r#"tidemark_replicator_dead_letters_total{pipeline="p",sink="es"} 2"#,
            r#"tidemark_replicator_lag_seconds{pipeline="p",shard="shard-1"} 1.5"#,
            r#"tidemark_replicator_lag_records{pipeline="p",shard="shard-1"} 7"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        m.forget_lag("p", &shards);
        assert!(!metrics.encode().contains("shard-1"));
    }
}
