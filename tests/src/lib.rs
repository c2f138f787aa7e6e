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
    /// Where the host keeps its state: `data_dir`, or the directory given
    /// to [`spawn_plane_in`] (a restarted plane).
    root: PathBuf,
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
        root: data_dir.path().to_owned(),
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
        root: data_dir.path().to_owned(),
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

/// What a [`spawn_plane`] host is pointed at besides the defaults.
#[derive(Debug, Default, Clone)]
pub struct PlaneOptions {
    /// The stats-aggregator buffers in the local Redis (under a fresh buffer
    /// name) and flushes to this DynamoDB table (partition key `pk`, which
    /// must exist). `None`: its embedded buffer and store.
    pub stats_table: Option<String>,
    /// The stats-aggregator's flush interval (default 300 s).
    pub flush_interval_ms: Option<u64>,
    /// The replicator's `inject_unit_fault`: that unit's migration fails
    /// after half its items.
    pub inject_unit_fault: Option<String>,
}

/// Serves all four services in one host like `tidemark dev`, but pointed at
/// the real local components (DynamoDB and Streams, S3, Elasticsearch,
/// Redis) with the test credentials, on a fresh port and data directory.
/// The replicator and the verifier share `<data dir>/tables` for embedded
/// SQLite tables ([`ServerHandle::tables_dir`]).
///
/// # Panics
/// When a service cannot be set up (e.g. the components are not up).
pub async fn spawn_plane(options: PlaneOptions) -> ServerHandle {
    spawn_plane_in(None, options).await
}

/// As [`spawn_plane`], keeping the state in `dir` when given, so a plane
/// started again on the same directory (a restart, with other options)
/// sees the same jobs, runs and tables.
///
/// # Panics
/// As [`spawn_plane`].
pub async fn spawn_plane_in(dir: Option<&Path>, options: PlaneOptions) -> ServerHandle {
    let listener = bind_loopback().await;
    let addr = listener.local_addr().expect("bound address");
    let data_dir = temp_data_dir();
    let root = dir.map_or_else(|| data_dir.path().to_owned(), Path::to_owned);
    let data_path = root.clone();
    let server = test_server_config(addr);
    let shutdown = CancellationToken::new();
    let url = format!("http://{addr}");
    let aws_endpoint = local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT");
    let es = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    let aws =
        tidemark_connectors::testing::local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT").await;
    let tables = data_path.join("tables");
    std::fs::create_dir_all(&tables).expect("create the tables directory");
    let mut host = tidemark_kit::ServiceHost::new(server.clone(), shutdown.clone());

    let jobs = job_tracker::Config {
        server: server.clone(),
        data_dir: data_path.join("jobs"),
        scheduler_tick_ms: 200,
        ..job_tracker::Config::default()
    };
    std::fs::create_dir_all(&jobs.data_dir).expect("create the job-tracker directory");
    job_tracker::register(&jobs, &mut host)
        .await
        .expect("register the job-tracker");

    let replication = replicator::Config {
        server: server.clone(),
        job_tracker_url: url.clone(),
        aws_endpoint: Some(aws_endpoint.clone()),
        elasticsearch_url: Some(es.clone()),
        kafka_brokers: Some(local_env("TIDEMARK_TEST_KAFKA_BROKERS")),
        data_dir: tables.clone(),
        lease_secs: 5,
        inject_unit_fault: options.inject_unit_fault.clone(),
        ..replicator::Config::default()
    };
    replicator::register_with(&replication, &mut host, Some(aws.clone()))
        .await
        .expect("register the replicator");

    let stats = stats_aggregator::Config {
        server: server.clone(),
        data_dir: data_path.join("stats"),
        flush_interval_ms: options.flush_interval_ms.unwrap_or(300_000),
        buffer_name: unique_name("e2e"),
        ..stats_aggregator::Config::default()
    };
    let backends = match &options.stats_table {
        Some(table) => {
            // The buffer the aggregator deploys with (the id log on Redis).
            let buffer = stats_aggregator::EventLogBuffer::connect(
                &local_env("TIDEMARK_TEST_REDIS_URL"),
                tidemark_connectors::redis::RedisBuffer::prefix_for(&stats.buffer_name),
            )
            .await
            .expect("connect the Redis buffer");
            let store = stats_aggregator::DynamoStatsStore::open(
                aws_sdk_dynamodb::Client::new(&aws),
                table,
                &stats.stats_key_attribute,
            )
            .await
            .expect("open the stats table");
            stats_aggregator::Backends {
                redis: Some(buffer.redis().clone()),
                buffer: std::sync::Arc::new(buffer),
                store: std::sync::Arc::new(store),
                publisher: None,
            }
        }
        None => {
            let embedded = stats_aggregator::Config {
                buffer: stats_aggregator::BufferKind::Embedded,
                store: stats_aggregator::StoreKind::Embedded,
                ..stats.clone()
            };
            stats_aggregator::open(&embedded)
                .await
                .expect("open the embedded stats backends")
        }
    };
    stats_aggregator::register_with(&stats, backends, &mut host);

    let verification = verifier::Config {
        server,
        job_tracker_url: url.clone(),
        replicator_url: url,
        aws_endpoint: Some(aws_endpoint),
        elasticsearch_url: Some(es),
        kafka_brokers: Some(local_env("TIDEMARK_TEST_KAFKA_BROKERS")),
        data_dir: tables,
        ..verifier::Config::default()
    };
    verifier::register_with(&verification, Some(aws), &mut host)
        .await
        .expect("register the verifier");

    let task = tokio::spawn(async move { host.serve(listener).await.map_err(Into::into) });
    ServerHandle {
        addr,
        shutdown,
        task: Some(task),
        root,
        data_dir,
    }
}

impl ServerHandle {
    /// Where a [`spawn_plane`] host keeps embedded SQLite tables
    /// (`sqlite:NAME` stores live in `<this>/default.db`).
    pub fn tables_dir(&self) -> PathBuf {
        self.root.join("tables")
    }

    /// A `tidemark-client` connection to the host.
    ///
    /// # Panics
    /// Never for a running host (the URL is well formed).
    pub fn client(&self) -> tidemark_client::Tidemark {
        tidemark_client::Tidemark::connect(tidemark_client::Options {
            endpoint: self.url(),
            ..tidemark_client::Options::default()
        })
        .expect("a well-formed endpoint")
    }
}

/// Runs the `tidemark` binary against `endpoint` with `args` (no token,
/// per-service URL or context from the environment, no config file) and
/// returns what it printed and its exit status.
///
/// # Panics
/// When the binary cannot be built or started.
pub async fn tidemark(endpoint: &str, args: &[&str]) -> std::process::Output {
    let bin = cargo_bin("tidemark-cli", "tidemark").await;
    tokio::process::Command::new(bin)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("TIDEMARK_TOKEN")
        .env_remove("TIDEMARK_CONTEXT")
        .env("TIDEMARK_CONFIG", "/nonexistent/tidemark/config.toml")
        .output()
        .await
        .expect("run tidemark")
}

/// Runs `tidemark --output json ...` and parses its standard output,
/// asserting the exit code.
///
/// # Panics
/// On another exit code or output that is not JSON.
pub async fn tidemark_json(endpoint: &str, args: &[&str], code: i32) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = tidemark(endpoint, &all).await;
    assert_eq!(
        out.status.code(),
        Some(code),
        "tidemark {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tidemark {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A `tidemark dev` process of the real binary, killed when dropped.
pub struct DevProcess {
    pub child: tokio::process::Child,
    /// `http://ADDR`, where it serves all four services.
    pub url: String,
    /// The `tidemark` binary, for the commands a test runs against it.
    pub bin: PathBuf,
}

/// Starts `tidemark dev` on a free port with its data in `data_dir` and
/// `extra` arguments, its output to `log`, and waits until `tidemark
/// health` finds every service SERVING.
///
/// # Panics
/// When it exits or is not SERVING within a minute (the log is shown).
pub async fn start_dev_process(data_dir: &Path, extra: &[&str], log: &Path) -> DevProcess {
    let bin = cargo_bin("tidemark-cli", "tidemark").await;
    let addr = free_addr();
    let url = format!("http://{addr}");
    let file = std::fs::File::create(log).expect("create the dev log");
    let mut child = tokio::process::Command::new(&bin)
        .args(["dev", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("TIDEMARK_TOKEN")
        .stdout(file.try_clone().expect("dev log"))
        .stderr(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidemark dev");
    let started = std::time::Instant::now();
    loop {
        let health = tokio::process::Command::new(&bin)
            .args(["--endpoint", &url, "health"])
            .env_remove("TIDEMARK_TOKEN")
            .output()
            .await
            .expect("run tidemark health");
        if health.status.success() {
            break;
        }
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "tidemark dev did not become SERVING: {}",
            log_text()
        );
        assert!(
            child.try_wait().expect("dev status").is_none(),
            "tidemark dev exited: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    DevProcess { child, url, bin }
}
