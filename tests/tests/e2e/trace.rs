//! One trace id from the CLI through the replicator to the job-tracker:
//! `tidemark replicate ls` with a `TRACEPARENT` against `tidemark dev`
//! (a process of the real binary, JSON logs), whose replicator asks the
//! job-tracker for the pipelines' jobs over gRPC; the log lines of both
//! RPCs carry the CLI's trace id, each with a span id of its own.

use std::time::Duration;

use tidemark_e2e::start_dev_process;

const TRACE: &str = "5f2b3c4d5e6f708192a3b4c5d6e7f809";

fn lines_of(log: &str, rpc: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["rpc"] == rpc)
        .collect()
}

#[tokio::test]
async fn one_trace_id_runs_from_the_cli_through_the_replicator_to_the_job_tracker() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("dev.log");
    let mut dev = start_dev_process(
        &dir.path().join("data"),
        &[
            "--log-format",
            "json",
            "--log-level",
            "warn,tidemark_kit::metrics=debug",
        ],
        &log_path,
    )
    .await;
    let cli = |args: &[&str], traceparent: Option<String>| {
        let mut cmd = std::process::Command::new(&dev.bin);
        cmd.arg("--endpoint")
            .arg(&dev.url)
            .args(args)
            .env_remove("TIDEMARK_TOKEN");
        match traceparent {
            Some(t) => cmd.env("TRACEPARENT", t),
            None => cmd.env_remove("TRACEPARENT"),
        };
        cmd.output().expect("run tidemark")
    };

    let out = cli(
        &["replicate", "ls"],
        Some(format!("00-{TRACE}-00f067aa0ba902b7-01")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let replicator_rpc = "/tidemark.replicator.v1.ReplicatorService/ListPipelines";
    let jobs_rpc = "/tidemark.job_tracker.v1.JobTrackerService/ListJobs";
    let (mut replicator, mut jobs) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let log = std::fs::read_to_string(&log_path).unwrap();
        replicator = lines_of(&log, replicator_rpc);
        jobs = lines_of(&log, jobs_rpc);
        if !replicator.is_empty() && !jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    let traced = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["openTelemetry"]["traceId"] == TRACE)
            .map(|l| {
                l["openTelemetry"]["spanId"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    };
    let replicator_spans = traced(&replicator);
    let jobs_spans = traced(&jobs);
    assert!(
        !replicator_spans.is_empty(),
        "no {replicator_rpc} line with trace {TRACE}:\n{log}"
    );
    assert!(
        !jobs_spans.is_empty(),
        "no {jobs_rpc} line with trace {TRACE} (the replicator's call to the job-tracker):\n{log}"
    );
    assert!(
        replicator_spans
            .iter()
            .all(|s| s.len() == 16 && s != "00f067aa0ba902b7")
            && jobs_spans.iter().all(|s| !replicator_spans.contains(s)),
        "each service's RPC is a span of its own under the CLI's: {replicator_spans:?} {jobs_spans:?}"
    );
    // A command without TRACEPARENT starts its own trace.
    let out = cli(&["replicate", "ls"], None);
    assert!(out.status.success());
    let _ = dev.child.kill().await;
}
