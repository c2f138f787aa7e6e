//! End-to-end harness: the services served as they are deployed (the full
//! kit stack, on loopback), each test on its own port and data directory
//! with unique resource names, so tests run in parallel and can run again.
//!
//! The tests themselves live in `tests/e2e/`, one module per problem.

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

pub use tidemark_connectors::testing::{local_env, unique_name};
pub use tidemark_kit::CancellationToken;
use tidemark_kit::config::{LogFormat, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// What a served host returns when it stops.
pub type ServeResult = Result<(), Box<dyn Error + Send + Sync>>;

/// A host serving on loopback in this process. Dropping it cancels the host
/// (it then shuts down in the background); [`ServerHandle::stop`] also waits.
pub struct ServerHandle {
    /// The address the host answers on.
    pub addr: SocketAddr,
    /// Cancel to shut the host down (what SIGTERM does to a service binary).
    pub shutdown: CancellationToken,
    /// The serving task; `None` once [`ServerHandle::stop`] has joined it.
    pub task: Option<JoinHandle<ServeResult>>,
    data_dir: tempfile::TempDir,
}

/// The handle of [`spawn_dev`]: all four services on one address.
pub type DevHandle = ServerHandle;

impl ServerHandle {
    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel to the host.
    pub async fn channel(&self) -> Channel {
        channel(self.addr).await
    }

    /// The host's private data directory (removed when the handle drops).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Cancels the host and waits for it to finish shutting down.
    ///
    /// # Panics
    /// When the host does not stop within 30 s or its task panicked.
    pub async fn stop(mut self) -> ServeResult {
        self.shutdown.cancel();
        let task = self.task.take().expect("stop is called once");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("host did not stop within 30 s of cancellation")
            .expect("host task panicked")
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Server settings for a test host on `addr`: text logs (readable in test
/// output), a short grace period so a failing test does not hang.
pub fn test_server_config(addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        listen: addr,
        log_format: LogFormat::Text,
        shutdown_grace_ms: 5_000,
        ..ServerConfig::default()
    }
}

async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

fn temp_data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tidemark-e2e-")
        .tempdir()
        .expect("create a temporary data directory")
}

/// Serves all four services in one host, as `tidemark dev` does, on a fresh
/// port and a fresh data directory.
///
/// # Panics
/// When the host cannot be built.
pub async fn spawn_dev() -> DevHandle {
    spawn_dev_with(|_| {}).await
}

/// As [`spawn_dev`], with the server settings adjusted by `tweak` (the
/// listen address is the bound one; changing it has no effect).
///
/// # Panics
/// When the host cannot be built.
pub async fn spawn_dev_with(tweak: impl FnOnce(&mut ServerConfig)) -> DevHandle {
    let listener = bind_loopback().await;
    let addr = listener.local_addr().expect("bound address");
    let data_dir = temp_data_dir();
    let mut server = test_server_config(addr);
    tweak(&mut server);
    server.listen = addr;
    let shutdown = CancellationToken::new();
    let host = tidemark_cli::dev::build_host(server, data_dir.path(), shutdown.clone())
        .await
        .expect("build the dev host");
    let task = tokio::spawn(async move { host.serve(listener).await.map_err(Into::into) });
    ServerHandle {
        addr,
        shutdown,
        task: Some(task),
        data_dir,
    }
}

/// Serves the job-tracker alone, through its own `run`, on a fresh port and
/// a fresh embedded store; `tweak` adjusts the configuration first.
///
/// # Panics
/// When the adjusted configuration is invalid.
pub async fn spawn_job_tracker(tweak: impl FnOnce(&mut job_tracker::Config)) -> ServerHandle {
    use tidemark_kit::ServiceConfig as _;

    let listener = bind_loopback().await;
    let addr = listener.local_addr().expect("bound address");
    let data_dir = temp_data_dir();
    let mut config = job_tracker::Config {
        server: test_server_config(addr),
        data_dir: data_dir.path().to_owned(),
        ..job_tracker::Config::default()
    };
    tweak(&mut config);
    config.server.listen = addr;
    config
        .server
        .validate()
        .and_then(|()| config.validate())
        .expect("test configuration is valid");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        job_tracker::run(config, listener, token)
            .await
            .map_err(Into::into)
    });
    ServerHandle {
        addr,
        shutdown,
        task: Some(task),
        data_dir,
    }
}

/// A plaintext channel to `addr`, connected.
///
/// # Panics
/// When nothing answers within 10 s.
pub async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// A loopback address that was free a moment ago, for processes that bind
/// by themselves (a service binary, the metrics endpoint).
///
/// # Panics
/// When no port can be bound.
pub fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    probe.local_addr().expect("bound address")
}

/// Builds binary `bin` of workspace package `package` (same profile and
/// target directory as the running test) and returns its path. Built once
/// per test process.
///
/// # Panics
/// When the build fails.
pub async fn cargo_bin(package: &'static str, bin: &'static str) -> PathBuf {
    tokio::task::spawn_blocking(move || cargo_bin_blocking(package, bin))
        .await
        .expect("cargo build task panicked")
}

fn cargo_bin_blocking(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    // Held across the build: concurrent tests wait for one build.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = format!("{package}/{bin}");
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(&key) {
        return path.clone();
    }

    // This test runs from <target>/<profile>/deps/<name>: build into the same
    // target directory and profile so nothing is rebuilt twice.
    let exe = std::env::current_exe().expect("path of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(tidemark_connectors::testing::workspace_root())
        .args([
            "build",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ])
        .args(["--package", package, "--bin", bin])
        .arg("--target-dir")
        .arg(target_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let output = cmd.output().expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build --package {package} --bin {bin} failed ({})",
        output.status
    );
    let path = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo build did not report an executable for {bin}"));
    built
        .get_or_insert_with(HashMap::new)
        .insert(key, path.clone());
    path
}
