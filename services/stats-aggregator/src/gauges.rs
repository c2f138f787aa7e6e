//! The aggregator's gauges on /metrics: what a cut-over dashboard watches
//! (buffered work, paused) and what to alert on (flushes that stopped).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tidemark_connectors::BufferStats;
use tidemark_kit::Metrics;

use crate::engine::FlushReport;

pub struct Gauges {
    dirty_keys: Gauge,
    pending_events: Gauge,
    paused: Gauge,
    last_flush_sequence: Gauge,
    last_flush_duration_ms: Gauge,
    last_flush_items: Gauge,
    last_flush_unix_seconds: Gauge,
    dead_lettered: Gauge,
    flush_throttled: Counter,
    flush_write_units: Counter<f64, AtomicU64>,
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Gauges {
    pub fn register(metrics: &Metrics) -> Self {
        Self {
            dirty_keys: metrics.gauge(
                "stats_dirty_keys",
                "entities with buffered changes not yet flushed",
            ),
            pending_events: metrics.gauge(
                "stats_pending_events",
                "events accepted and not yet flushed",
            ),
            paused: metrics.gauge(
                "stats_writers_paused",
                "1 while writers are paused for a cut-over",
            ),
            last_flush_sequence: metrics.gauge(
                "stats_last_flush_sequence",
                "sequence of the last completed flush",
            ),
            last_flush_duration_ms: metrics.gauge(
                "stats_last_flush_duration_ms",
                "duration of the last flush in milliseconds",
            ),
            last_flush_items: metrics.gauge(
                "stats_last_flush_items",
                "items written or found already applied by the last flush",
            ),
            last_flush_unix_seconds: metrics.gauge(
                "stats_last_flush_unix_seconds",
                "when the last flush completed (alert when it falls far behind the flush interval)",
            ),
            dead_lettered: metrics.gauge(
                "stats_dead_lettered_entities",
                "entity changes the stats table or Kafka refused for good, kept as dead letters (alert when above 0)",
            ),
            flush_throttled: {
                let c = Counter::default();
                metrics.register(
                    "stats_flush_throttled",
                    "flush writes the stats table throttled (each retried; the flush's write rate backs off)",
                    c.clone(),
                );
                c
            },
            flush_write_units: {
                let c = Counter::<f64, AtomicU64>::default();
                metrics.register(
                    "stats_flush_write_units",
                    "write capacity units the stats table reported consumed by flushes",
                    c.clone(),
                );
                c
            },
        }
    }

    pub fn buffer(&self, stats: &BufferStats, paused: bool) {
        self.dirty_keys.set(clamp(stats.dirty_keys));
        self.pending_events.set(clamp(stats.pending_events));
        self.paused.set(i64::from(paused));
    }

    pub fn dead_letters(&self, count: u64) {
        self.dead_lettered.set(clamp(count));
    }

    pub fn flushed(&self, report: &FlushReport) {
        if report.sequence > 0 {
            self.last_flush_sequence.set(clamp(report.sequence));
            self.last_flush_items
                .set(report.items_written + report.items_already_applied);
        }
        self.last_flush_duration_ms
            .set(i64::try_from(report.duration.as_millis()).unwrap_or(i64::MAX));
        self.last_flush_unix_seconds
            .set(crate::engine::now_micros() / 1_000_000);
        self.flush_throttled.inc_by(report.throttled);
        self.flush_write_units.inc_by(report.write_units_consumed);
    }
}
