//! Other languages: a Python client generated from `proto/` with
//! grpcio-tools at test time (`clients/python/tidemark_check.py`) calls
//! every service of a running `tidemark dev`.

use tidemark_e2e::{local_env, spawn_dev};

#[tokio::test]
async fn a_python_client_generated_from_the_protos_calls_every_service() {
    let dev = spawn_dev().await;
    let python = local_env("TIDEMARK_PYTHON");
    let script =
        tidemark_connectors::testing::workspace_root().join("clients/python/tidemark_check.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--endpoint")
        .arg(dev.addr.to_string())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {python} {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "ok health tidemark.job_tracker.v1.JobTrackerService SERVING",
        "ok health tidemark.replicator.v1.ReplicatorService SERVING",
        "ok health tidemark.stats_aggregator.v1.StatsAggregatorService SERVING",
        "ok health tidemark.verifier.v1.VerifierService SERVING",
        "ok job-tracker CreateJob/StartRun/ListJobs",
        "ok replicator ListPipelines",
        "ok stats-aggregator IngestBatch/GetStats",
        "views=15",
        "ok verifier GetReport",
        "tidemark_check: every service answered",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
