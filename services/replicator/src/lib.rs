//! The replicator: copies live tables (backfill with DBLog watermarks) and
//! follows their change streams into Elasticsearch, DynamoDB and S3,
//! idempotently and in version order; reports lag, drains, repairs.

mod service;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::{CancellationToken, KitError, ServiceHost};
use tidemark_proto::replicator::v1::replicator_service_server::ReplicatorServiceServer;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    /// Address of the job-tracker that holds this service's jobs and units.
    pub job_tracker_url: String,
    /// Identifies this replica in leases; unique per process.
    pub worker_id: String,
    /// AWS endpoint override (DynamoDB, Streams, S3); the default chain when unset.
    pub aws_endpoint: Option<String>,
    /// Kafka bootstrap servers for Kafka feeds, sinks and dead letters.
    pub kafka_brokers: Option<String>,
    /// Elasticsearch URL for Elasticsearch sinks.
    pub elasticsearch_url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            job_tracker_url: "http://127.0.0.1:50051".to_owned(),
            worker_id: format!("replicator-{}", std::process::id()),
            aws_endpoint: None,
            kafka_brokers: None,
            elasticsearch_url: None,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("job_tracker_url", &self.job_tracker_url)?;
        if self.worker_id.trim().is_empty() {
            return Err(ConfigError::invalid("worker_id", "must not be empty"));
        }
        for (field, url) in [
            ("aws_endpoint", &self.aws_endpoint),
            ("elasticsearch_url", &self.elasticsearch_url),
        ] {
            if let Some(url) = url {
                check_url(field, url)?;
            }
        }
        if self
            .kafka_brokers
            .as_deref()
            .is_some_and(|b| b.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "kafka_brokers",
                "must list host:port pairs when set",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// The `ReplicatorService` implementation.
#[derive(Clone)]
pub struct Replicator {}

/// Adds this service to `host`.
///
/// # Errors
/// When a backend it needs cannot be set up.
pub async fn register(_config: &Config, host: &mut ServiceHost) -> Result<(), ReplicatorError> {
    host.add_service(ReplicatorServiceServer::new(Replicator {}));
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
) -> Result<(), ReplicatorError> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
