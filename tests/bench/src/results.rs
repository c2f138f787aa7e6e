//! `BENCHMARKS.md`: one section per benchmark between
//! `<!-- bench:<name>:start -->` and `<!-- bench:<name>:end -->`. A run
//! rewrites only its own section, so benchmarks run at different times (or
//! on different days) share the file without clobbering each other.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::framework::{Report, fmt_num};
use crate::machine::RunInfo;

/// The file's opening, written when it does not exist yet.
pub const HEADER: &str = "# Benchmarks

Every figure here is a **ratio against a raw baseline measured in the same
run**: the same machine, the same moment, the same local component (a bare
tonic server, a raw `_bulk`, the seed's own loop…). Absolute numbers on a
shared 2-core machine swing with whatever else runs and with the emulators'
own speed; a ratio taken side by side cancels most of that, so it is the
figure to compare across runs and machines. The absolute values are shown
for context only. Sides are measured in alternating rounds (baseline,
system, system, baseline, …) and each figure is the median over a side's
rounds, so drift during the run weighs on both sides and one round disturbed
by another process does not decide a figure; each section notes how far its
rounds spread.

Run one benchmark, or all of them:

```sh
cargo run --release -p tidemark-bench -- <name>|all
cargo run --release -p tidemark-bench -- --list
```

Each benchmark brings up what it needs itself and rewrites only its own
section below (between its `bench:<name>` markers); the rest of this file is
left as it is. Targets come from DESIGN.md §6.
";

pub fn start_marker(name: &str) -> String {
    format!("<!-- bench:{name}:start -->")
}

pub fn end_marker(name: &str) -> String {
    format!("<!-- bench:{name}:end -->")
}

/// The Markdown of one benchmark's section, markers included.
pub fn render_section(name: &str, description: &str, report: &Report, run: &RunInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", start_marker(name));
    let _ = writeln!(s, "## {name}\n\n{description}\n");
    s.push_str("| figure | system | baseline | system ÷ baseline | target |\n");
    s.push_str("|---|---:|---:|---:|---|\n");
    for row in &report.rows {
        let target = match (row.target, row.met()) {
            (Some(t), Some(met)) => {
                format!(
                    "{} {}",
                    t.display(row.unit),
                    if met { "✅ met" } else { "❌ missed" }
                )
            }
            _ => "—".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {} | {} {unit} | {} {unit} | **{}×** | {target} |",
            row.figure,
            fmt_num(row.system),
            fmt_num(row.baseline),
            fmt_num(row.ratio),
            unit = row.unit,
        );
    }
    if !report.notes.is_empty() {
        s.push('\n');
        for note in &report.notes {
            let _ = writeln!(s, "- {note}");
        }
    }
    s.push('\n');
    if !run.release {
        s.push_str("**Debug build: these figures say little; rerun with `--release`.**\n\n");
    }
    let _ = writeln!(s, "- Command: `{}`", run.command);
    let _ = writeln!(s, "- Commit: `{}`", run.commit);
    let _ = writeln!(s, "- Date: {}", run.date);
    let load = run
        .load_at_start
        .as_deref()
        .map(|l| format!(", load average {l} at start"))
        .unwrap_or_default();
    let _ = writeln!(s, "- Machine: {}{load}", run.machine);
    let _ = writeln!(s, "{}", end_marker(name));
    s
}

/// `document` with `name`'s section replaced by `section`, or with it
/// appended when the document has none yet.
///
/// # Errors
/// When the document holds a start marker without its end marker after it
/// (a hand edit gone wrong: better to stop than to eat the rest of the file).
pub fn replace_section(document: &str, name: &str, section: &str) -> io::Result<String> {
    let (start, end) = (start_marker(name), end_marker(name));
    let Some(from) = document.find(&start) else {
        let mut out = document.trim_end().to_owned();
        out.push_str("\n\n");
        out.push_str(section.trim_end());
        out.push('\n');
        return Ok(out);
    };
    let to = document[from..]
        .find(&end)
        .map(|i| from + i + end.len())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{start} has no {end} after it"),
            )
        })?;
    let mut out = String::with_capacity(document.len() + section.len());
    out.push_str(&document[..from]);
    out.push_str(section.trim_end());
    out.push_str(&document[to..]);
    Ok(out)
}

/// Rewrites `name`'s section of the file at `path`, creating the file with
/// [`HEADER`] first if needed.
///
/// # Errors
/// When the file cannot be read or written, or its markers are broken.
pub fn write_section(path: &Path, name: &str, section: &str) -> io::Result<()> {
    let document = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => HEADER.to_owned(),
        Err(e) => return Err(e),
    };
    let updated = replace_section(&document, name, section)?;
    // Written beside and renamed, so an interrupted run never leaves half a file.
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, updated)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::{Row, Target};

    fn section(name: &str, body: &str) -> String {
        format!("{}\n{body}\n{}\n", start_marker(name), end_marker(name))
    }

    #[test]
    fn appends_a_new_section_and_replaces_only_its_own() {
        let doc = format!("{HEADER}\n{}", section("a", "old a"));
        let doc = replace_section(&doc, "b", &section("b", "first b")).unwrap();
        assert!(doc.starts_with(HEADER));
        assert!(doc.contains("old a") && doc.contains("first b"));

        let doc = replace_section(&doc, "a", &section("a", "new a")).unwrap();
        assert!(!doc.contains("old a"));
        assert!(doc.contains("new a") && doc.contains("first b"));
        // a stays before b, where it was.
        assert!(doc.find("new a") < doc.find("first b"));
        assert_eq!(doc.matches(&start_marker("a")).count(), 1);

        // Text after the last section survives too.
        let doc = format!("{doc}\ntrailer\n");
        let doc = replace_section(&doc, "b", &section("b", "second b")).unwrap();
        assert!(doc.contains("second b") && !doc.contains("first b"));
        assert!(doc.ends_with("trailer\n"));
    }

    #[test]
    fn a_name_that_is_a_prefix_of_another_is_not_confused_with_it() {
        let doc = format!("{HEADER}\n{}", section("noop-rpc-2", "other"));
        let doc = replace_section(&doc, "noop-rpc", &section("noop-rpc", "mine")).unwrap();
        assert!(doc.contains("other") && doc.contains("mine"));
    }

    #[test]
    fn a_missing_end_marker_is_an_error() {
        let doc = format!("{HEADER}\n{}\nrest", start_marker("a"));
        assert!(replace_section(&doc, "a", &section("a", "x")).is_err());
    }

    #[test]
    fn creates_the_file_with_its_header() {
        let dir = std::env::temp_dir().join(format!("tidemark-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("BENCHMARKS.md");
        let _ = std::fs::remove_file(&path);
        write_section(&path, "a", &section("a", "x")).unwrap();
        write_section(&path, "a", &section("a", "y")).unwrap();
        let doc = std::fs::read_to_string(&path).unwrap();
        assert!(doc.starts_with("# Benchmarks"));
        assert!(doc.contains('y') && !doc.contains("\nx\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn renders_figures_targets_and_run_facts() {
        let report = Report {
            rows: vec![
                Row::new("throughput", "req/s", 9_000.0, 10_000.0)
                    .with_target(Target::RatioAtLeast(0.8)),
                Row::new("p99", "µs", 300.0, 200.0),
            ],
            notes: vec!["one channel per worker".to_owned()],
        };
        let run = RunInfo {
            machine: "2 cores (X), 1.0 GiB memory".to_owned(),
            load_at_start: Some("0.10".to_owned()),
            date: "2026-01-01 00:00 UTC".to_owned(),
            command: "cargo run --release -p tidemark-bench -- x".to_owned(),
            commit: "abc".to_owned(),
            release: true,
        };
        let s = render_section("x", "What it compares.", &report, &run);
        assert!(s.starts_with(&start_marker("x")));
        assert!(s.trim_end().ends_with(&end_marker("x")));
        assert!(s.contains(
            "| throughput | 9,000 req/s | 10,000 req/s | **0.90×** | ratio ≥ 0.80× ✅ met |"
        ));
        assert!(s.contains("| p99 | 300 µs | 200 µs | **1.50×** | — |"));
        assert!(s.contains("- one channel per worker"));
        assert!(s.contains("load average 0.10"));
    }
}
