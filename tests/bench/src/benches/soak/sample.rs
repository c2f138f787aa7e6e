//! Resident memory and open descriptors of each process, read from /proc
//! at a fixed interval and printed as they come.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tidemark_kit::CancellationToken;
use tokio::task::JoinHandle;

/// One reading of one process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Since sampling started.
    pub at: Duration,
    pub rss_bytes: u64,
    pub fds: u64,
}

/// Samples per process name.
pub type Series = Vec<(String, Vec<Sample>)>;

pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<Series>>,
}

impl Sampler {
    /// Samples `pids` every `every`, each line printed under `label`.
    pub fn spawn(label: String, pids: Vec<(String, u32)>, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(sample_until(label, pids, every, stop.clone()));
        Self { stop, task }
    }

    pub async fn stop(self) -> anyhow::Result<Series> {
        self.stop.cancel();
        self.task.await?
    }
}

async fn sample_until(
    label: String,
    pids: Vec<(String, u32)>,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<Series> {
    let started = Instant::now();
    let mut series: Series = pids.iter().map(|(n, _)| (n.clone(), Vec::new())).collect();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(series),
            _ = tick.tick() => {}
        }
        let at = started.elapsed();
        let mut line = format!("{label} {:>4} s:", at.as_secs());
        for ((name, pid), (_, samples)) in pids.iter().zip(&mut series) {
            let s = read(*pid, at).with_context(|| format!("sample {name} (pid {pid})"))?;
            line.push_str(&format!(
                "  {name} {:.1} MiB {} fds",
                s.rss_bytes as f64 / (1024.0 * 1024.0),
                s.fds
            ));
            samples.push(s);
        }
        eprintln!("{line}");
    }
}

/// VmRSS of /proc/<pid>/status and the entries of /proc/<pid>/fd.
fn read(pid: u32, at: Duration) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample {
        at,
        rss_bytes: kib * 1024,
        fds,
    })
}
