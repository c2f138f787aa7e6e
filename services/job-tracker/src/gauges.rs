//! The job-tracker's own gauges, refreshed from the store: what to alert on
//! (failed runs awaiting acknowledgement) and what a dashboard shows (units
//! of active runs by status).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tidemark_kit::{CancellationToken, Metrics};

use crate::engine::{Tracker, TrackerStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

pub struct Gauges {
    units: Family<StatusLabel, Gauge>,
    active_runs: Gauge,
    blocked_jobs: Gauge,
}

impl Gauges {
    pub fn register(metrics: &Metrics) -> Self {
        let units = Family::<StatusLabel, Gauge>::default();
        metrics.register("job_units", "units of active runs by status", units.clone());
        Self {
            units,
            active_runs: metrics.gauge("job_active_runs", "runs queued or running"),
            blocked_jobs: metrics.gauge(
                "job_blocked_jobs",
                "jobs whose last run FAILED and awaits AcknowledgeFailure (alert on > 0)",
            ),
        }
    }

    fn set(&self, stats: &TrackerStats) {
        let u = &stats.units;
        for (status, n) in [
            ("not_migrated", u.not_migrated),
            ("in_progress", u.in_progress),
            ("migrated", u.migrated),
            ("failed", u.failed),
            ("rolled_back", u.rolled_back),
        ] {
            self.units.get_or_create(&StatusLabel { status }).set(n);
        }
        self.active_runs
            .set(i64::try_from(stats.active_runs).unwrap_or(i64::MAX));
        self.blocked_jobs
            .set(i64::try_from(stats.blocked_jobs).unwrap_or(i64::MAX));
    }

    /// Refreshes every `every` until `shutdown`.
    pub async fn run(self, tracker: Arc<Tracker>, every: Duration, shutdown: CancellationToken) {
        loop {
            match tracker.stats().await {
                Ok(stats) => self.set(&stats),
                Err(e) => tracing::warn!(error = %e, "gauge refresh failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
