//! The run's table, and its section of RELIABILITY.md.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use tidemark_connectors::testing::workspace_root;

use crate::{
    backfill, counters, cutover, extract, faults, leases, migrate, published, stream, verify,
};

pub struct Outcome {
    pub seed: u64,
    pub duration: Duration,
    /// Each process with the kills it took.
    pub services: Vec<(String, u32)>,
    pub recoveries: Vec<faults::Recovery>,
    /// (proxy, kind) of each store fault.
    pub store_faults: Vec<(String, &'static str)>,
    pub counted: counters::Ledger,
    pub lost_counts: i64,
    pub doubled_counts: i64,
    pub published: published::Outcome,
    pub streamed_writes: u64,
    pub synced: stream::Outcome,
    pub backfilled: backfill::Outcome,
    pub migrated: migrate::Outcome,
    pub extract_writes: u64,
    pub extracted: extract::Outcome,
    pub verified: verify::Outcome,
    pub cut: cutover::Outcome,
    pub leases: leases::Outcome,
    pub elapsed: Duration,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Outcome {
    /// Nothing lost, doubled, resurrected or overwritten, and every service
    /// was killed at least once.
    pub fn clean(&self) -> bool {
        self.lost_counts == 0
            && self.doubled_counts == 0
            && self.published.clean()
            && self.synced.lost == 0
            && self.synced.resurrected == 0
            && self.backfilled.missing == 0
            && self.backfilled.overwritten == 0
            && self.backfilled.rounds > 0
            && self.migrated.incomplete == 0
            && self.migrated.left_behind == 0
            && self.migrated.runs > 0
            && self.extracted.window_faults == 0
            && self.extracted.stale == 0
            && self.extracted.missing_manifests == 0
            && self.extracted.succeeded > 0
            && self.extracted.caught_up
            && self.extracted.failed == 0
            && self.verified.clean()
            && self.cut.clean()
            && self.leases.clean()
            && self.services.iter().all(|(_, k)| *k > 0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let kills: u32 = self.services.iter().map(|(_, k)| k).sum();
        let _ = writeln!(
            out,
            "{kills} kill -9 and {} store faults over {}s (seed {}), run took {}s in all.\n",
            self.store_faults.len(),
            self.duration.as_secs(),
            self.seed,
            self.elapsed.as_secs()
        );
        out.push_str("| service | kills | restart → SERVING p50 | p99 |\n|---|---:|---:|---:|\n");
        for (i, (name, k)) in self.services.iter().enumerate() {
            let mut times: Vec<Duration> = self
                .recoveries
                .iter()
                .filter(|r| r.target == i)
                .map(|r| r.to_serving)
                .collect();
            times.sort();
            let _ = writeln!(
                out,
                "| {name} | {k} | {} ms | {} ms |",
                quantile(&times, 0.5).as_millis(),
                quantile(&times, 0.99).as_millis()
            );
        }
        out.push_str("\n| store fault (through a proxy) | latency | blackhole | reset | slow-close |\n|---|---:|---:|---:|---:|\n");
        let mut proxies: Vec<&str> = self.store_faults.iter().map(|(p, _)| p.as_str()).collect();
        proxies.dedup();
        proxies.sort_unstable();
        proxies.dedup();
        for proxy in proxies {
            let n = |kind: &str| {
                self.store_faults
                    .iter()
                    .filter(|(p, k)| p == proxy && *k == kind)
                    .count()
            };
            let _ = writeln!(
                out,
                "| {proxy} | {} | {} | {} | {} |",
                n("latency"),
                n("blackhole"),
                n("reset"),
                n("slow-close")
            );
        }
        out.push_str("\n| problem | work done under faults | checked against the ledger | lost | doubled | resurrected | overwritten |\n|---|---|---|---:|---:|---:|---:|\n");
        let _ = writeln!(
            out,
            "| 1 counters (ingest → Redis → flush → DynamoDB) | {} events in {} acknowledged batches, flushed every 1 s | every counter's value equals the writer's sum | {} | {} | – | – |",
            self.counted.events, self.counted.batches, self.lost_counts, self.doubled_counts
        );
        let _ = writeln!(
            out,
            "| 1 absolute values published to Kafka after each flush | {} records{} | the topic read from its beginning, highest version per counter wins: each equals the writer's sum | {} | {} | – | – |",
            self.published.records,
            match (self.published.out_of_order, self.published.undecodable) {
                (0, 0) => String::new(),
                (o, u) => format!(" ({o} behind a higher version of their key, {u} undecodable)"),
            },
            self.published.lost,
            self.published.doubled
        );
        let _ = writeln!(
            out,
            "| 1 cut-over to a new table, a third of the way in | {} | writers running and the route where the cut-over left it; when completed, the new table's counters equal the writer's sums after a drain | {} | {} | – | {} left inconsistent |",
            match (&self.cut.aborted, self.cut.pause) {
                (Some(why), _) => format!("aborted cleanly at {why}"),
                (None, Some(p)) => format!("completed, writers paused {} ms", p.as_millis()),
                (None, None) => "completed".to_owned(),
            },
            self.cut.lost,
            self.cut.doubled,
            self.cut.left_inconsistent
        );
        let _ = writeln!(
            out,
            "| 2 Streams → Elasticsearch (2 replicas) | {} upserts and deletes | every document is the key's last image after a drain ({} ms) | {} | – | {} | – |",
            self.streamed_writes,
            self.synced.drain.as_millis(),
            self.synced.lost,
            self.synced.resurrected
        );
        let _ = writeln!(
            out,
            "| 3 unit migrations to S3 (2 replicas) | {} runs, {} units MIGRATED, {} good units out of attempts, one unit failing on purpose in each | each unit MIGRATED with every item and routed to the target, or failed with nothing left and its route unchanged | {} | – | – | {} left behind |",
            self.migrated.runs,
            self.migrated.units_migrated,
            self.migrated.failed_cleanly,
            self.migrated.incomplete,
            self.migrated.left_behind
        );
        let _ = writeln!(
            out,
            "| 4 attribute backfill (2 replicas) | {} rounds of {} items, {} writer sets meanwhile | every item has the attribute, every writer's value kept | {} | – | – | {} |",
            self.backfilled.rounds,
            backfill::ITEMS,
            self.backfilled.writer_sets,
            self.backfilled.missing,
            self.backfilled.overwritten
        );
        let _ = writeln!(
            out,
            "| 5 incremental extract every 3 s to S3 | {} changes, {} runs succeeded, {} failed ({} skipped while one ran); {} | the windows follow one another with no gap or overlap; each key's object is its last image; each succeeded run has a manifest of its window | {} stale | – | – | {} window faults, {} runs without their manifest |",
            self.extract_writes,
            self.extracted.succeeded,
            self.extracted.failed,
            self.extracted.skipped,
            if self.extracted.caught_up {
                "a run processed past the last write"
            } else {
                "**no run processed past the last write within 120 s**"
            },
            self.extracted.stale,
            self.extracted.window_faults,
            self.extracted.missing_manifests
        );
        let _ = writeln!(
            out,
            "| verifications (2 verifier replicas) | {} verifications of a pair of tables, every other one with {} planted differences | each ended within the deadline with the true verdict and exactly the planted mismatches | {} unfinished | – | – | {} wrong verdicts |",
            self.verified.runs,
            verify::PLANTED,
            self.verified.unfinished,
            self.verified.wrong
        );
        let _ = writeln!(
            out,
            "\nLeases, from the job-tracker's history of every job of the run: {} claims of {} units; {} fencing tokens not increasing, {} unit transitions accepted under a token that was no longer the latest.",
            self.leases.claims,
            self.leases.units,
            self.leases.token_regressions,
            self.leases.stale_finishes
        );
        out
    }
}

const BEGIN: &str = "<!-- tidemark-chaos: begin (rewritten by --record) -->";
const END: &str = "<!-- tidemark-chaos: end -->";

/// The commit the services were built from, marked when the tree had
/// uncommitted changes.
pub fn built_from() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    format!("{commit}{dirty}")
}

/// Rewrites the chaos section of RELIABILITY.md with `table`.
pub fn record(table: &str, command: &str, built_from: &str) -> anyhow::Result<()> {
    let path = workspace_root().join("RELIABILITY.md");
    let text = std::fs::read_to_string(&path).context("read RELIABILITY.md")?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        anyhow::bail!("RELIABILITY.md has no {BEGIN} … {END} section");
    };
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let section =
        format!("{BEGIN}\n\n`{command}` at {built_from}, on {cores} cores:\n\n{table}\n{END}");
    let updated = format!("{}{section}{}", &text[..b], &text[e + END.len()..]);
    std::fs::write(&path, updated).context("write RELIABILITY.md")?;
    Ok(())
}
