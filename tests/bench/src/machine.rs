//! Where and when a run happened: machine, date, command, git commit. Ratios
//! travel between machines better than absolute figures, but not perfectly,
//! so every section says what it was measured on.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The facts printed under every section.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// e.g. `2 cores (Intel(R) Xeon(R) …), 23.4 GiB memory`.
    pub machine: String,
    /// Load average over the last minute when the benchmark started: a busy
    /// machine (another build) is worth knowing about even for ratios.
    pub load_at_start: Option<String>,
    /// UTC, minute precision.
    pub date: String,
    pub command: String,
    /// Short commit, with the files changed since when the tree is dirty.
    pub commit: String,
    /// False for a debug build, whose figures say little.
    pub release: bool,
}

impl RunInfo {
    pub fn detect(workspace_root: &Path, command: String) -> Self {
        Self {
            machine: machine(),
            load_at_start: load_average(),
            date: utc_now(),
            command,
            commit: git_commit(workspace_root),
            release: !cfg!(debug_assertions),
        }
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let listed = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    // What this process may use (cgroup quota, affinity), which may be fewer
    // than the CPUs listed.
    let usable = std::thread::available_parallelism().map_or(listed, usize::from);
    let cores = if listed == 0 || listed == usable {
        format!("{usable} cores")
    } else {
        format!("{usable} usable cores of {listed}")
    };
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB memory", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown memory".to_owned());
    format!("{cores} ({model}), {memory}")
}

fn load_average() -> Option<String> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    loadavg.split_whitespace().next().map(str::to_owned)
}

fn git(workspace_root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn git_commit(workspace_root: &Path) -> String {
    let Some(commit) = git(workspace_root, &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // BENCHMARKS.md itself is rewritten by every run: not a code change.
    let dirty: Vec<String> = git(
        workspace_root,
        &[
            "diff",
            "--name-only",
            "HEAD",
            "--",
            ".",
            ":(exclude)BENCHMARKS.md",
        ],
    )
    .unwrap_or_default()
    .lines()
    .map(str::to_owned)
    .collect();
    match dirty.as_slice() {
        [] => commit,
        // Named, so a reader can tell whether they could matter here.
        few if few.len() <= 3 => {
            format!("{commit} + uncommitted changes to {}", few.join(", "))
        }
        many => format!("{commit} + uncommitted changes to {} files", many.len()),
    }
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds, without a date crate.
fn format_utc(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Howard Hinnant's `civil_from_days`: proleptic Gregorian date of a day
/// count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn names_the_commit() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let commit = git_commit(root);
        // Outside a git checkout (a source tarball) it says so instead.
        assert!(commit == "unknown" || commit.len() >= 12, "{commit}");
    }

    #[test]
    fn describes_this_machine() {
        let m = machine();
        assert!(m.contains("core"), "{m}");
        assert!(m.contains("memory"), "{m}");
    }
}
