//! The job-tracker: durable state of every migration, backfill, extract and
//! verification run — jobs, runs, units, leases with fencing tokens,
//! checkpoints, the failure gate, schedules and per-unit routes. It never
//! calls out; workers pull units from it (DESIGN.md §2, "How work flows").

mod service;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig};
use tidemark_kit::{CancellationToken, KitError, ServiceHost};
use tidemark_proto::job_tracker::v1::job_tracker_service_server::JobTrackerServiceServer;
use tokio::net::TcpListener;

/// Where the job-tracker keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite file under `data_dir` (one replica).
    #[default]
    Embedded,
    /// A DynamoDB table shared by several replicas.
    Dynamodb,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    pub store: StoreKind,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// Table of the DynamoDB store (`store = "dynamodb"`).
    pub dynamodb_table: String,
    /// DynamoDB endpoint override; the AWS default chain when unset.
    pub aws_endpoint: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            store: StoreKind::Embedded,
            data_dir: PathBuf::from(".tidemark"),
            dynamodb_table: "tidemark-jobs".to_owned(),
            aws_endpoint: None,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.store == StoreKind::Dynamodb && self.dynamodb_table.trim().is_empty() {
            return Err(ConfigError::invalid(
                "dynamodb_table",
                "must be set when store = \"dynamodb\"",
            ));
        }
        if self.store == StoreKind::Embedded && self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "data_dir",
                "must be set when store = \"embedded\"",
            ));
        }
        if let Some(url) = &self.aws_endpoint {
            tidemark_kit::config::check_url("aws_endpoint", url)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobTrackerError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// The `JobTrackerService` implementation.
#[derive(Clone)]
pub struct JobTracker {}

/// Adds the job-tracker's services to `host`.
///
/// # Errors
/// When its store cannot be opened.
pub async fn register(_config: &Config, host: &mut ServiceHost) -> Result<(), JobTrackerError> {
    host.add_service(JobTrackerServiceServer::new(JobTracker {}));
    Ok(())
}

/// Serves the job-tracker on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// When start-up or the transport fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), JobTrackerError> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
