//! The services as separate processes of their real binaries, each on a
//! fixed port so clients reconnect after a restart, and their kill -9.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// One service process, started again after each kill.
pub struct Process {
    pub name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    pub addr: SocketAddr,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    pub kills: u32,
}

impl Process {
    pub fn new(
        name: &str,
        bin: PathBuf,
        env: Vec<(String, String)>,
        addr: SocketAddr,
        logs: &Path,
    ) -> Self {
        Self {
            name: name.to_owned(),
            bin,
            env,
            addr,
            log: logs.join(format!("{name}.log")),
            child: None,
            kills: 0,
        }
    }

    /// The running process's id (`None` while it is down).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the process (its output appended to its log).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = tokio::process::Command::new(&self.bin)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("TIDEMARK_LISTEN", self.addr.to_string())
            .env("TIDEMARK_LOG_FORMAT", "text")
            .env("TIDEMARK_LOG_LEVEL", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, no grace: what a crashed node or an OOM kill does.
    pub async fn kill_9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("SIGKILL")?;
            self.kills += 1;
        }
        Ok(())
    }

    /// Fails when the process exited on its own (it should only die by our
    /// hand), naming its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited by itself ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// Waits until the process answers its gRPC health check SERVING;
    /// returns how long that took.
    pub async fn wait_serving(&self, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let channel = Channel::from_shared(self.url())?.connect_lazy();
        let mut health = HealthClient::new(channel);
        loop {
            let answer = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if answer.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!(
                    "{} did not serve within {within:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A free loopback port, kept for the whole run.
/// Starts every process, then waits (up to 60 s each) until all serve.
pub async fn start_all(processes: &mut [Process]) -> anyhow::Result<()> {
    for p in processes.iter_mut() {
        p.start()?;
    }
    for p in processes.iter() {
        p.wait_serving(Duration::from_secs(60)).await?;
    }
    Ok(())
}

pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The service binaries the matrix runs.
const SERVICES: [&str; 4] = ["job-tracker", "replicator", "stats-aggregator", "verifier"];

/// Builds the service binaries in the profile and target directory of this
/// binary and copies them into `into`, so a build during the run (another
/// checkout sharing the target directory) cannot change what is restarted.
pub fn build_services(into: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().context("the binary's directory")?.to_owned();
    let target_dir = profile_dir.parent().context("the target directory")?;
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(tidemark_connectors::testing::workspace_root())
        .args(["build", "--quiet", "--bins"])
        .args(SERVICES.iter().flat_map(|s| ["-p", s]))
        .arg("--target-dir")
        .arg(target_dir)
        .stdout(Stdio::inherit())
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
    let status = cmd.status().context("run cargo build")?;
    if !status.success() {
        bail!("building the service binaries failed ({status})");
    }
    std::fs::create_dir_all(into)?;
    for bin in SERVICES {
        std::fs::copy(profile_dir.join(bin), into.join(bin))
            .with_context(|| format!("copy {bin} into {}", into.display()))?;
    }
    Ok(())
}

/// Retries a call to a service through restarts: while the process is down
/// or restarting the call fails with UNAVAILABLE (or a transport error
/// surfacing as UNKNOWN/CANCELLED); any other status is an answer.
pub async fn through_restarts<T, F, Fut>(
    what: &str,
    within: Duration,
    mut call: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    use tonic::Code;
    let started = Instant::now();
    loop {
        match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                ) && started.elapsed() < within =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => bail!("{what}: {} {}", s.code(), s.message()),
        }
    }
}

/// Whether a run's status is final.
pub fn terminal(status: i32) -> bool {
    use tidemark_proto::job_tracker::v1::RunStatus;
    [
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::FailedAcknowledged,
        RunStatus::Skipped,
    ]
    .iter()
    .any(|s| *s as i32 == status)
}

/// The run once it ended (`None` while it runs); an error naming `what`
/// once `deadline` passed with the run still going.
pub async fn ended_run(
    jobs: &tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient<
        Channel,
    >,
    run_id: &str,
    what: &str,
    deadline: Instant,
) -> anyhow::Result<Option<tidemark_proto::job_tracker::v1::Run>> {
    use tidemark_proto::job_tracker::v1::GetRunRequest;
    let run = through_restarts("GetRun", Duration::from_secs(60), || {
        let mut c = jobs.clone();
        let r = GetRunRequest {
            run_id: run_id.to_owned(),
        };
        async move { c.get_run(r).await }
    })
    .await?
    .run
    .unwrap_or_default();
    if terminal(run.status) {
        return Ok(Some(run));
    }
    if Instant::now() > deadline {
        bail!("{what} (run {run_id}) did not end in time: {:?}", run.units);
    }
    Ok(None)
}
