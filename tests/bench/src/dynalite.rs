//! A `dynalite` server (npm; DynamoDB's API without Streams) started by the
//! bench on a free loopback port, for figures that need no Streams: it
//! serves several times moto's UpdateItem rate on these cores (DESIGN.md §6),
//! so a backfill's ratio measures the backfill rather than the emulator.
//!
//! It is installed with the machine's `npm` into a cache directory
//! (`TIDEMARK_DYNALITE_DIR`, default `~/.cache/tidemark/dynalite`) when
//! missing. Nothing else depends on it: CI never runs benchmarks.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// A running server; killed when dropped.
pub struct Dynalite {
    addr: SocketAddr,
    _child: Child,
}

fn install_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TIDEMARK_DYNALITE_DIR")
        && !dir.is_empty()
    {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".to_owned());
    Path::new(&home).join(".cache/tidemark/dynalite")
}

/// The server's entry point, installing the package first when missing.
async fn entry_point() -> anyhow::Result<PathBuf> {
    let dir = install_dir();
    let cli = dir.join("node_modules/dynalite/cli.js");
    if cli.exists() {
        return Ok(cli);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!("installing dynalite into {} (npm)", dir.display());
    let out = Command::new("npm")
        .arg("install")
        .arg("--prefix")
        .arg(&dir)
        .args(["--no-audit", "--no-fund", "dynalite"])
        .output()
        .await
        .context("cannot run npm: install Node.js and npm, or set TIDEMARK_DYNALITE_DIR to a directory with node_modules/dynalite")?;
    anyhow::ensure!(
        out.status.success() && cli.exists(),
        "npm install dynalite failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(cli)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

impl Dynalite {
    /// Installs (when missing) and starts the server, in memory, on a free
    /// loopback port; returns once it answers.
    ///
    /// # Errors
    /// When it cannot be installed, started, or does not answer in 30 s.
    pub async fn start() -> anyhow::Result<Self> {
        let cli = entry_point().await?;
        let port = free_port()?;
        let mut child = Command::new("node")
            .arg(&cli)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // Tables are ACTIVE at once: the bench measures items, not
            // the emulator's simulated table creation.
            .args(["--createTableMs", "0", "--deleteTableMs", "0"])
            .args(["--updateTableMs", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {}", cli.display()))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt as _;
                    let _ = e.read_to_string(&mut stderr).await;
                }
                anyhow::bail!("dynalite exited at start ({status}): {stderr}");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                // Drain its messages so a full pipe never stalls it.
                if let Some(mut e) = child.stderr.take() {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut e, &mut tokio::io::sink()).await;
                    });
                }
                return Ok(Self {
                    addr,
                    _child: child,
                });
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "dynalite did not listen on {addr} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}
