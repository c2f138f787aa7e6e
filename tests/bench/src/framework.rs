//! What a benchmark is and what it returns.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::load::LoadResult;

/// One benchmark: a name for the command line and the `BENCHMARKS.md`
/// markers, a description for its section, and a run that measures the raw
/// baseline and the system in the same process and returns the figures.
#[async_trait::async_trait]
pub trait Benchmark: Send + Sync {
    /// Lowercase, dash-separated; used as `<name>` on the command line and in
    /// `<!-- bench:<name>:start -->`.
    fn name(&self) -> &'static str;

    /// One or two sentences: what is compared with what.
    fn description(&self) -> &'static str;

    /// Brings up what the benchmark needs, measures, tears it down.
    ///
    /// # Errors
    /// When a component cannot be started or a run fails outright; a run
    /// whose requests partly fail reports the errors in its notes instead.
    async fn run(&self, ctx: &Context) -> anyhow::Result<Report>;
}

/// What the harness passes to every benchmark.
#[derive(Debug, Clone)]
pub struct Context {
    /// Smoke run: every duration is cut twenty-fold, figures are not written.
    pub quick: bool,
    /// The workspace root (where `BENCHMARKS.md` and `deploy/local` live).
    pub workspace_root: PathBuf,
    /// Where a benchmark writes the pictures its section links to
    /// (`benchmarks/` beside the results file); `None` when nothing is
    /// written.
    pub figures: Option<PathBuf>,
}

impl Context {
    /// `full`, or a twentieth of it in a quick run.
    pub fn time(&self, full: Duration) -> Duration {
        if self.quick { full / 20 } else { full }
    }
}

/// The figures of one benchmark run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Setup and caveats worth printing next to the figures (client
    /// settings, error counts, which side was the bottleneck…).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether every row with a target meets it.
    pub fn targets_met(&self) -> bool {
        self.rows.iter().all(|r| r.met() != Some(false))
    }
}

/// One figure: the system, its raw baseline, and their ratio.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured, e.g. `closed loop, 64 concurrent: throughput`.
    pub figure: String,
    pub system: f64,
    pub baseline: f64,
    /// `system / baseline`, whatever the unit: above 1 means more
    /// throughput, or more latency.
    pub ratio: f64,
    pub target: Option<Target>,
    /// Unit of `system` and `baseline`, e.g. `req/s`, `µs`.
    pub unit: &'static str,
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: &'static str, system: f64, baseline: f64) -> Self {
        let ratio = if baseline == 0.0 {
            f64::NAN
        } else {
            system / baseline
        };
        Self {
            figure: figure.into(),
            system,
            baseline,
            ratio,
            target: None,
            unit,
        }
    }

    #[must_use]
    pub fn with_target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// `None` without a target.
    pub fn met(&self) -> Option<bool> {
        self.target.map(|t| t.met(self))
    }
}

/// A goal from DESIGN.md §6: most bound the ratio, a few (a p99 in ms, an
/// absolute rate on this machine) bound the system's own figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    SystemAtLeast(f64),
    SystemBelow(f64),
    SystemAtMost(f64),
}

impl Target {
    pub fn met(self, row: &Row) -> bool {
        match self {
            Self::RatioAtLeast(t) => row.ratio >= t,
            Self::RatioAtMost(t) => row.ratio <= t,
            Self::SystemAtLeast(t) => row.system >= t,
            Self::SystemBelow(t) => row.system < t,
            Self::SystemAtMost(t) => row.system <= t,
        }
    }

    /// Rendered with the row's unit for absolute targets.
    pub fn display(self, unit: &str) -> String {
        match self {
            Self::RatioAtLeast(t) => format!("ratio ≥ {}×", fmt_num(t)),
            Self::RatioAtMost(t) => format!("ratio ≤ {}×", fmt_num(t)),
            Self::SystemAtLeast(t) => format!("≥ {} {unit}", fmt_num(t)),
            Self::SystemBelow(t) => format!("< {} {unit}", fmt_num(t)),
            Self::SystemAtMost(t) => format!("≤ {} {unit}", fmt_num(t)),
        }
    }
}

/// Which side of a comparison a measurement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Baseline,
    System,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Baseline => "baseline",
            Self::System => "system",
        })
    }
}

/// A value per side (clients, servers, merged results).
#[derive(Debug, Clone, Default)]
pub struct Sides<T> {
    pub baseline: T,
    pub system: T,
}

impl<T> Sides<T> {
    pub fn get(&self, side: Side) -> &T {
        match side {
            Side::Baseline => &self.baseline,
            Side::System => &self.system,
        }
    }

    pub fn get_mut(&mut self, side: Side) -> &mut T {
        match side {
            Side::Baseline => &mut self.baseline,
            Side::System => &mut self.system,
        }
    }
}

/// Load results per side, one per round, and the figures taken from them.
///
/// Figures are medians over a side's rounds, not pooled counts: on a shared
/// machine another process may take the cores for a second, and one
/// disturbed round should move the figure no more than one sample does.
#[derive(Debug, Clone, Default)]
pub struct Rounds {
    results: Sides<Vec<LoadResult>>,
}

impl Rounds {
    pub fn push(&mut self, side: Side, result: LoadResult) {
        self.results.get_mut(side).push(result);
    }

    pub fn rounds(&self, side: Side) -> &[LoadResult] {
        self.results.get(side)
    }

    fn values(&self, side: Side, f: impl Fn(&LoadResult) -> f64) -> Vec<f64> {
        let mut v: Vec<f64> = self.rounds(side).iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Median over `side`'s rounds of `f` (mean of the middle two for an
    /// even count); NaN without rounds.
    pub fn median(&self, side: Side, f: impl Fn(&LoadResult) -> f64) -> f64 {
        let v = self.values(side, f);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
        }
    }

    /// Lowest and highest over `side`'s rounds of `f`.
    pub fn range(&self, side: Side, f: impl Fn(&LoadResult) -> f64) -> (f64, f64) {
        let v = self.values(side, f);
        (
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN),
        )
    }

    /// All of `side`'s rounds merged (for counts: requests, errors).
    pub fn pooled(&self, side: Side) -> LoadResult {
        let mut total = LoadResult::default();
        for r in self.rounds(side) {
            total.merge(r);
        }
        total
    }

    /// A row of medians: `f` of the system ÷ `f` of the baseline.
    pub fn row(
        &self,
        figure: impl Into<String>,
        unit: &'static str,
        f: impl Fn(&LoadResult) -> f64 + Copy,
    ) -> Row {
        Row::new(
            figure,
            unit,
            self.median(Side::System, f),
            self.median(Side::Baseline, f),
        )
    }

    /// Whether the two sides' ranges of `f` overlap: then the difference
    /// between their medians is within this run's noise.
    pub fn overlap(&self, f: impl Fn(&LoadResult) -> f64 + Copy) -> bool {
        let (s_lo, s_hi) = self.range(Side::System, f);
        let (b_lo, b_hi) = self.range(Side::Baseline, f);
        s_lo <= b_hi && b_lo <= s_hi
    }

    /// How far rounds spread, for a note: `system a–b, baseline c–d unit over
    /// n rounds each`.
    pub fn spread(&self, unit: &str, f: impl Fn(&LoadResult) -> f64 + Copy) -> String {
        let (s_lo, s_hi) = self.range(Side::System, f);
        let (b_lo, b_hi) = self.range(Side::Baseline, f);
        format!(
            "system {}–{}, baseline {}–{} {unit} over {} / {} rounds",
            fmt_num(s_lo),
            fmt_num(s_hi),
            fmt_num(b_lo),
            fmt_num(b_hi),
            self.rounds(Side::System).len(),
            self.rounds(Side::Baseline).len(),
        )
    }
}

/// The order of `pairs` rounds per side: baseline, system, system, baseline,
/// … (ABBA), so a slow drift of the machine (another build starting, CPU
/// frequency) weighs on both sides alike instead of on whichever ran last.
pub fn interleaved(pairs: usize) -> Vec<Side> {
    (0..pairs)
        .flat_map(|i| {
            if i.is_multiple_of(2) {
                [Side::Baseline, Side::System]
            } else {
                [Side::System, Side::Baseline]
            }
        })
        .collect()
}

/// A figure for a table: integers grouped by thousands from 100 up, else 3 significant
/// digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    if v.abs() >= 100.0 {
        #[allow(clippy::cast_possible_truncation)]
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_is_abba() {
        use Side::{Baseline as B, System as S};
        assert_eq!(interleaved(2), vec![B, S, S, B]);
        assert_eq!(interleaved(3), vec![B, S, S, B, B, S]);
    }

    #[test]
    fn targets_bound_the_ratio_or_the_system() {
        let row = Row::new("x", "req/s", 90.0, 100.0);
        assert!((row.ratio - 0.9).abs() < 1e-9);
        assert!(Target::RatioAtLeast(0.9).met(&row));
        assert!(!Target::RatioAtLeast(0.95).met(&row));
        assert!(Target::SystemBelow(91.0).met(&row));
        assert!(!Target::SystemAtLeast(91.0).met(&row));
        let report = Report {
            rows: vec![row.with_target(Target::RatioAtMost(0.5))],
            notes: vec![],
        };
        assert!(!report.targets_met());
    }

    #[test]
    fn rounds_give_medians_so_one_disturbed_round_does_not_decide() {
        let round = |ok: u64| LoadResult {
            ok,
            measured: Duration::from_secs(1),
            ..LoadResult::default()
        };
        let mut rounds = Rounds::default();
        for ok in [100, 10, 110] {
            rounds.push(Side::Baseline, round(ok));
        }
        for ok in [90, 95] {
            rounds.push(Side::System, round(ok));
        }
        let tput = |r: &LoadResult| r.throughput();
        assert!((rounds.median(Side::Baseline, tput) - 100.0).abs() < 1e-9);
        assert!((rounds.median(Side::System, tput) - 92.5).abs() < 1e-9);
        assert_eq!(rounds.range(Side::Baseline, tput), (10.0, 110.0));
        assert_eq!(rounds.pooled(Side::Baseline).ok, 220);
        let row = rounds.row("throughput", "req/s", tput);
        assert!((row.ratio - 0.925).abs() < 1e-9);
        assert!(rounds.overlap(tput));
        rounds.push(Side::Baseline, round(5));
        assert!(rounds.overlap(tput), "10–110 still covers 90–95");
        let mut apart = Rounds::default();
        apart.push(Side::Baseline, round(100));
        apart.push(Side::System, round(90));
        assert!(!apart.overlap(tput));
        rounds.results.baseline.pop();
        assert_eq!(
            rounds.spread("req/s", tput),
            "system 90.0–95.0, baseline 10.0–110 req/s over 2 / 3 rounds"
        );
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(fmt_num(1_234_567.4), "1,234,567");
        assert_eq!(fmt_num(123.0), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(0.934), "0.93");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }
}
