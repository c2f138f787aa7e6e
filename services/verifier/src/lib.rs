//! The verifier: proves that source and target agree — counts, predicates,
//! digest trees with drill-down, re-checked after the replication lag —
//! before a job is called done (DESIGN.md invariant 7).

mod service;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::{CancellationToken, KitError, ServiceHost};
use tidemark_proto::verifier::v1::verifier_service_server::VerifierServiceServer;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    /// Address of the job-tracker that holds this service's jobs and units.
    pub job_tracker_url: String,
    /// Address of the replicator, asked for lag and for repairs.
    pub replicator_url: String,
    /// AWS endpoint override; the default chain when unset.
    pub aws_endpoint: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            job_tracker_url: "http://127.0.0.1:50051".to_owned(),
            replicator_url: "http://127.0.0.1:50051".to_owned(),
            aws_endpoint: None,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("job_tracker_url", &self.job_tracker_url)?;
        check_url("replicator_url", &self.replicator_url)?;
        if let Some(url) = &self.aws_endpoint {
            check_url("aws_endpoint", url)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// The `VerifierService` implementation.
#[derive(Clone)]
pub struct Verifier {}

/// Adds this service to `host`.
///
/// # Errors
/// When a backend it needs cannot be set up.
pub async fn register(_config: &Config, host: &mut ServiceHost) -> Result<(), VerifierError> {
    host.add_service(VerifierServiceServer::new(Verifier {}));
    Ok(())
}

/// Serves on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// When start-up or the transport fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), VerifierError> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
