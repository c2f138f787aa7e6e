//! Progress bars on stderr for long operations, fed by WatchRun and
//! WatchLag. Hidden when stderr is not a terminal or the output is JSON, so
//! scripts see only the final result.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tidemark_proto::job_tracker::v1 as jt;

use crate::output::{Output, run_status};

/// A bar for a run's items (or units when the run cannot estimate items).
pub fn bar(out: Output, message: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{spinner} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    ticking(out, style, message)
}

/// A spinner for work without a known length (lag, steps).
pub fn spinner(out: Output, message: &str) -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
        .expect("a valid template");
    ticking(out, style, message)
}

fn ticking(out: Output, style: ProgressStyle, message: &str) -> ProgressBar {
    let pb = if out == Output::Json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    };
    pb.set_style(style);
    pb.set_message(message.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Moves `pb` to a run's progress: items when estimated, else units.
pub fn show_run(pb: &ProgressBar, p: &jt::RunProgress) {
    let units = p.units.unwrap_or_default();
    if p.items_estimated > 0 {
        pb.set_length(u64::try_from(p.items_estimated.max(p.items_processed)).unwrap_or(0));
        pb.set_position(u64::try_from(p.items_processed).unwrap_or(0));
    } else {
        pb.set_length(u64::try_from(units.total).unwrap_or(0));
        pb.set_position(
            u64::try_from(units.migrated + units.failed + units.rolled_back).unwrap_or(0),
        );
    }
    let mut counters: Vec<String> = p.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    counters.sort();
    pb.set_message(format!(
        "{} units {}/{} done, {} failed; {} items {}",
        run_status(p.status),
        units.migrated,
        units.total,
        units.failed + units.rolled_back,
        p.items_processed,
        counters.join(" ")
    ));
}
