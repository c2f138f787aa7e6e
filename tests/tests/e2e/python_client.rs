//! Other languages: the Python client package (`clients/python`, the
//! `tidemark-client` distribution). Its wheel is built once per test process
//! (the stubs generated from `proto/` by the build hook), installed into a
//! directory of its own, and `python -m tidemark_client.check` run from that
//! installation against `tidemark dev` and against a lone job-tracker
//! serving TLS.

use std::path::{Path, PathBuf};
use std::process::Output;

use tidemark_e2e::{local_env, spawn_dev, spawn_job_tracker};
use tokio::process::Command;
use tokio::sync::OnceCell;

/// The installed wheel (`pip install --target`), shared by this process's
/// tests; its temporary directory is left in place.
static SITE: OnceCell<PathBuf> = OnceCell::const_new();

/// The client's settings that `connect()` reads from the environment: unset
/// in the child, so only the flags given count.
const CLIENT_ENV: [&str; 4] = [
    "TIDEMARK_ENDPOINT",
    "TIDEMARK_TOKEN",
    "TIDEMARK_TLS_CA",
    "TIDEMARK_TLS_DOMAIN",
];

/// Runs `command`, panicking with its output unless it exits 0.
async fn run_ok(command: &mut Command, what: &str) -> Output {
    let out = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the wheel (`--no-build-isolation`: the venv of `deploy/local/up`
/// has hatchling and grpcio-tools, so nothing is fetched), checks that it
/// carries the generated stubs, and installs it; returns the installation.
async fn site() -> &'static Path {
    SITE.get_or_init(|| async {
        let python = local_env("TIDEMARK_PYTHON");
        let package = tidemark_connectors::testing::workspace_root().join("clients/python");
        let dir = tempfile::Builder::new()
            .prefix("tidemark-py-")
            .tempdir()
            .expect("create a temporary directory")
            .keep();
        let wheels = dir.join("wheels");
        run_ok(
            Command::new(&python)
                .args(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation"])
                .args(["--disable-pip-version-check", "--quiet"])
                .arg(&package)
                .arg("-w")
                .arg(&wheels),
            "pip wheel clients/python",
        )
        .await;
        let wheel = std::fs::read_dir(&wheels)
            .expect("read the wheel directory")
            .map(|e| e.expect("wheel directory entry").path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .expect("pip wheel wrote a .whl");

        let listed = run_ok(
            Command::new(&python)
                .args(["-m", "zipfile", "-l"])
                .arg(&wheel),
            "list the wheel",
        )
        .await;
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        for want in [
            "tidemark/job_tracker/v1/job_tracker_pb2.py",
            "tidemark/job_tracker/v1/job_tracker_pb2_grpc.py",
            "tidemark/job_tracker/v1/job_tracker_pb2.pyi",
            "tidemark/verifier/v1/verifier_pb2_grpc.py",
            "tidemark/__init__.py",
            "tidemark_client/__init__.py",
            "tidemark_client/check.py",
            "tidemark_client/py.typed",
        ] {
            assert!(
                listed.contains(want),
                "the wheel lacks {want}:\n{listed}"
            );
        }

        let site = dir.join("site");
        run_ok(
            Command::new(&python)
                .args(["-m", "pip", "install", "--no-deps", "--disable-pip-version-check"])
                .args(["--quiet", "--target"])
                .arg(&site)
                .arg(&wheel),
            "pip install the wheel",
        )
        .await;

        // Both packages come from the installation, not from the checkout.
        let origin = run_ok(
            python_in(&site).args([
                "-c",
                "import tidemark, tidemark_client; print(tidemark.__file__); print(tidemark_client.__file__)",
            ]),
            "import tidemark_client",
        )
        .await;
        let origin = String::from_utf8_lossy(&origin.stdout).into_owned();
        for line in origin.lines() {
            assert!(
                Path::new(line).starts_with(&site),
                "imported from {line}, not from {}",
                site.display()
            );
        }
        site
    })
    .await
}

/// `$TIDEMARK_PYTHON` with only `site` on its path, run from the temporary
/// directory that holds it (`python -m` puts the working directory first).
fn python_in(site: &Path) -> Command {
    let mut command = Command::new(local_env("TIDEMARK_PYTHON"));
    command
        .env("PYTHONPATH", site)
        .current_dir(site.parent().unwrap_or(site));
    for key in CLIENT_ENV {
        command.env_remove(key);
    }
    command
}

/// `python -m tidemark_client.check ARGS` from the installed wheel.
async fn check(site: &Path, args: &[&str]) -> Output {
    python_in(site)
        .args(["-m", "tidemark_client.check"])
        .args(args)
        .output()
        .await
        .expect("run python -m tidemark_client.check")
}

#[tokio::test]
async fn the_python_client_package_calls_every_service() {
    let site = site().await;
    let dev = spawn_dev().await;
    let out = check(site, &["--endpoint", &dev.url()]).await;
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

    // host:port without a scheme is plaintext too.
    let bare = check(
        site,
        &["--endpoint", &dev.addr.to_string(), "--only", "job-tracker"],
    )
    .await;
    assert!(
        bare.status.success(),
        "host:port: {}\n{}",
        String::from_utf8_lossy(&bare.stdout),
        String::from_utf8_lossy(&bare.stderr)
    );
}

#[tokio::test]
async fn the_python_client_trusts_the_ca_it_is_given_and_no_other() {
    let site = site().await;
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = tempfile::tempdir().expect("temporary directory");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, issued.cert.pem()).expect("write the certificate");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write the key");
    let server = spawn_job_tracker(|c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    let endpoint = format!("https://{}", server.addr);
    let ca = cert.to_str().expect("a UTF-8 temporary path");

    let trusted = check(
        site,
        &[
            "--endpoint",
            &endpoint,
            "--tls-ca",
            ca,
            "--tls-domain",
            "localhost",
            "--only",
            "job-tracker",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        trusted.status.success(),
        "the Python client failed over TLS: {stdout}\n{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    for want in [
        "ok health tidemark.job_tracker.v1.JobTrackerService SERVING",
        "ok job-tracker CreateJob/StartRun/ListJobs",
        "ok job-tracker GetJob NOT_FOUND",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }

    // Without the CA the self-signed certificate is not trusted.
    let untrusted = check(
        site,
        &[
            "--endpoint",
            &endpoint,
            "--tls-domain",
            "localhost",
            "--only",
            "job-tracker",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(
        untrusted.status.code(),
        Some(1),
        "an untrusted certificate must fail the check: {}\n{stderr}",
        String::from_utf8_lossy(&untrusted.stdout)
    );
    assert!(
        stderr.contains("UNAVAILABLE"),
        "the failure names the unreachable service: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&untrusted.stdout).contains("ok "),
        "no call may succeed without trusting the certificate"
    );
}
