//! The verifier's own Prometheus metrics (beside the kit's per-RPC ones),
//! counted once a verification run's result is stored:
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `tidemark_verifier_runs_total` | `verdict` | finished verifications by verdict (`PASS`, `FAIL`, `ERROR`) |
//! | `tidemark_verifier_mismatches_total` | `kind` | confirmed mismatches by kind (`missing_in_target`, `extra_in_target`, `stale_version`, `different_content`) |
//! | `tidemark_verifier_run_duration_seconds` | — | from a run's start on this replica to its stored result |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tidemark_kit::Metrics;
use tidemark_proto::verifier::v1 as pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone)]
pub struct VerifierMetrics {
    runs: Family<VerdictLabel, Counter>,
    mismatches: Family<KindLabel, Counter>,
    duration: Histogram,
}

impl Default for VerifierMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            mismatches: Family::default(),
            // 0.1 s … ~55 min
            duration: Histogram::new(exponential_buckets(0.1, 2.0, 16)),
        }
    }
}

impl VerifierMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "verifier_runs",
            "Finished verifications by verdict",
            m.runs.clone(),
        );
        metrics.register(
            "verifier_mismatches",
            "Confirmed mismatches of finished verifications, by kind",
            m.mismatches.clone(),
        );
        metrics.register(
            "verifier_run_duration_seconds",
            "Time from a verification's start to its stored result",
            m.duration.clone(),
        );
        m
    }

    /// Counts a finished run from its summarised report.
    pub fn finished(&self, report: &pb::Report) {
        let verdict = pb::Verdict::try_from(report.verdict)
            .unwrap_or(pb::Verdict::Unspecified)
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_owned();
        self.runs.get_or_create(&VerdictLabel { verdict }).inc();
        let m = report.mismatches.unwrap_or_default();
        for (kind, n) in [
            ("missing_in_target", m.missing_in_target),
            ("extra_in_target", m.extra_in_target),
            ("stale_version", m.stale_version),
            ("different_content", m.different_content),
        ] {
            let counter = self.mismatches.get_or_create(&KindLabel { kind });
            if let Ok(n) = u64::try_from(n)
                && n > 0
            {
                counter.inc_by(n);
            }
        }
        if let (Some(start), Some(end)) = (&report.start_time, &report.finish_time) {
            let secs =
                (end.seconds - start.seconds) as f64 + f64::from(end.nanos - start.nanos) / 1e9;
            self.duration.observe(secs.max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_counts_its_verdict_mismatches_and_duration() {
        let metrics = Metrics::default();
        let m = VerifierMetrics::register(&metrics);
        m.finished(&pb::Report {
            verdict: pb::Verdict::Fail as i32,
            mismatches: Some(pb::MismatchCounts {
                missing_in_target: 2,
                different_content: 1,
                ..Default::default()
            }),
            start_time: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            finish_time: Some(prost_types::Timestamp {
                seconds: 102,
                nanos: 500_000_000,
            }),
            ..Default::default()
        });
        let text = metrics.encode();
        for line in [
            r#"tidemark_verifier_runs_total{verdict="FAIL"} 1"#,
            r#"tidemark_verifier_mismatches_total{kind="missing_in_target"} 2"#,
            r#"tidemark_verifier_mismatches_total{kind="different_content"} 1"#,
            r#"tidemark_verifier_mismatches_total{kind="stale_version"} 0"#,
            "tidemark_verifier_run_duration_seconds_sum 2.5",
            "tidemark_verifier_run_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
