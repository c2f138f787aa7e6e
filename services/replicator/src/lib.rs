//! The replicator: copies live tables (backfill with DBLog watermarks) and
//! follows their change streams into Elasticsearch, DynamoDB and S3,
//! idempotently and in version order; reports lag, drains, repairs.

mod backfill;
mod config;
mod context;
mod dead_letters;
mod error;
mod extract;
mod jobs;
pub mod metrics;
mod migrate;
mod pipeline;
mod schema;
mod service;
mod stores;
mod worker;

pub use config::Config;
pub use context::Replicator;
pub use error::{ReplicatorError, ReplicatorResult};

use std::sync::Arc;

use tidemark_kit::worker::WorkerOptions;
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::job_tracker::v1::JobKind;
use tidemark_proto::replicator::v1::replicator_service_server::ReplicatorServiceServer;
use tokio::net::TcpListener;

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
    let jobs = tidemark_kit::jobs::JobTracker::connect(
        &config.job_tracker_url,
        config.server.auth_token.as_deref(),
    )
    .map_err(ReplicatorError::Setup)?;
    let stores = stores::Stores::new(config, aws);
    let dead_table: Arc<dyn tidemark_connectors::SourceTable> = match &config.dead_letter_table {
        Some(name) => {
            let client = stores
                .dynamodb_client("", "")
                .await
                .map_err(|e| ReplicatorError::Setup(format!("dead_letter_table {name}: {e}")))?;
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
        metrics: metrics::ReplicatorMetrics::register(&host.metrics()),
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
    let executor = worker::executor(ctx.clone());
    host.spawn(
        "replicator-worker",
        tidemark_kit::worker::run_worker(jobs.raw(), options, executor, host.shutdown_token()),
    );
    host.add_service(ReplicatorServiceServer::new(Replicator { ctx }));
    // A drain waits for lag 0 up to its own timeout, beyond the request
    // timeout.
    host.allow_longer(
        <ReplicatorServiceServer<Replicator> as tonic::server::NamedService>::NAME,
        "Drain",
        pipeline::lag::MAX_DRAIN,
    );
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
