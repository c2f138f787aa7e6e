//! The replicator: copies live tables (backfill with DBLog watermarks) and
//! follows their change streams into Elasticsearch, DynamoDB and S3,
//! idempotently and in version order; reports lag, drains, repairs.

mod backfill;
mod context;
mod dead_letters;
mod extract;
mod jobs;
mod migrate;
mod pipeline;
mod pipelines;
mod service;
mod stores;
mod watermark;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::worker::WorkerOptions;
use tidemark_kit::{CancellationToken, KitError, ServiceHost};
use tidemark_proto::job_tracker::v1::JobKind;
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
    /// Directory of embedded (SQLite) tables named by jobs.
    pub data_dir: PathBuf,
    /// Units this process works on at once.
    pub worker_concurrency: usize,
    /// Length of unit leases; a killed replica's units are taken over after it.
    pub lease_secs: u64,
    /// DynamoDB table of the dead letters, keyed by `pipeline` (S) and `id`
    /// (S), shared by the replicas; unset: a table in `data_dir`.
    pub dead_letter_table: Option<String>,
    /// Fault injection for drills and tests: the unit migration of this unit
    /// key fails after copying half of its items (and is rolled back).
    pub inject_unit_fault: Option<String>,
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
            data_dir: PathBuf::from("./.tidemark"),
            worker_concurrency: 4,
            lease_secs: 15,
            inject_unit_fault: None,
            dead_letter_table: None,
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
        if self.worker_concurrency == 0 || self.worker_concurrency > 256 {
            return Err(ConfigError::invalid(
                "worker_concurrency",
                "must be 1 to 256",
            ));
        }
        if !(3..=600).contains(&self.lease_secs) {
            return Err(ConfigError::invalid("lease_secs", "must be 3 to 600"));
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
    #[error("{0}")]
    Setup(String),
}

/// The `ReplicatorService` implementation.
#[derive(Clone)]
pub struct Replicator {
    ctx: context::Context,
}

/// Adds this service to `host` and starts its worker loop, which claims the
/// units of the job kinds the replicator executes.
///
/// # Errors
/// When a backend it needs cannot be set up.
pub async fn register(config: &Config, host: &mut ServiceHost) -> Result<(), ReplicatorError> {
    register_with(config, host, None).await
}

/// Like [`register`], with an explicit base AWS configuration (credentials
/// and region) instead of the standard provider chain.
///
/// # Errors
/// When a backend it needs cannot be set up.
pub async fn register_with(
    config: &Config,
    host: &mut ServiceHost,
    aws: Option<aws_config::SdkConfig>,
) -> Result<(), ReplicatorError> {
    let jobs = tidemark_kit::worker::job_tracker_client(
        &config.job_tracker_url,
        config.server.auth_token.as_deref(),
    )
    .map_err(ReplicatorError::Setup)?;
    let stores = stores::Stores::new(config, aws);
    let dead_table: Arc<dyn tidemark_connectors::SourceTable> = match &config.dead_letter_table {
        Some(name) => {
            let client = stores.dynamodb_client("", "").await;
            Arc::new(
                tidemark_connectors::dynamodb::DynamoTable::open(client, name)
                    .await
                    .map_err(|e| {
                        ReplicatorError::Setup(format!("dead_letter_table {name}: {e}"))
                    })?,
            )
        }
        None => Arc::new(
            stores
                .embedded("replicator")
                .map_err(|e| ReplicatorError::Setup(format!("dead-letter store: {e}")))?
                .table(
                    "tidemark_dead_letters",
                    tidemark_connectors::KeySchema::new("pipeline", Some("id")),
                ),
        ),
    };
    let ctx = context::Context {
        config: Arc::new(config.clone()),
        stores,
        jobs: jobs.clone(),
        dead_letters: dead_letters::DeadLetters::new(dead_table),
    };
    let mut options = WorkerOptions::new(
        config.worker_id.clone(),
        vec![
            JobKind::BackfillAttribute,
            JobKind::UnitMigration,
            JobKind::IncrementalExtract,
            JobKind::Replication,
        ],
    );
    options.concurrency = config.worker_concurrency;
    options.lease = std::time::Duration::from_secs(config.lease_secs);
    let executor = context::executor(ctx.clone());
    host.spawn(
        "replicator-worker",
        tidemark_kit::worker::run_worker(jobs, options, executor, host.shutdown_token()),
    );
    host.add_service(ReplicatorServiceServer::new(Replicator { ctx }));
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
