//! The verifier: proves that source and target agree — counts, predicates,
//! digest trees with drill-down, re-checked after the replication lag —
//! before a job is called done (DESIGN.md invariant 7).
//!
//! A verification is a run of a VERIFICATION job in the job-tracker with one
//! unit, `verify`. `StartVerification` creates the job and starts the run;
//! any verifier process claims the unit (work by pull), runs the checks and
//! finishes the run with the `Report` as its result: SUCCEEDED when every
//! check passes, FAILED otherwise, so a failed proof blocks the job's next
//! run until acknowledged. Every mismatch (beyond the report's samples) is
//! kept as the unit's result, a `Report` whose samples are complete, for
//! `StreamMismatches`.

mod checks;
pub mod drill;
mod executor;
pub mod metrics;
pub mod mismatches;
mod replicator;
mod service;
pub mod side;
mod spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::jobs::{JobSpec as _, JobTracker};
use tidemark_kit::worker::{WorkerOptions, run_worker};
use tidemark_kit::{CancellationToken, FieldError, KitError, ServiceError, ServiceHost};
use tidemark_proto::job_tracker::v1::JobKind;
use tidemark_proto::verifier::v1 as pb;
use tidemark_proto::verifier::v1::verifier_service_server::VerifierServiceServer;
use tokio::net::TcpListener;
use tonic::Status;

pub use checks::classify;
pub use spec::Spec;

/// Type name of the job spec in `google.protobuf.Any`.
pub const SPEC_TYPE: &str = pb::VerificationSpec::TYPE;
/// Type name of the run and unit results.
pub const REPORT_TYPE: &str = pb::Report::TYPE;
/// The one unit of a verification run.
pub const UNIT_KEY: &str = "verify";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    /// Address of the job-tracker that holds this service's jobs and units.
    pub job_tracker_url: String,
    /// Address of the replicator, asked for lag and for repairs.
    pub replicator_url: String,
    /// AWS endpoint override (DynamoDB, S3); the default chain when unset.
    pub aws_endpoint: Option<String>,
    /// Elasticsearch URL for indexes named without an endpoint.
    pub elasticsearch_url: Option<String>,
    /// Kafka bootstrap servers for topics named without them.
    pub kafka_brokers: Option<String>,
    /// Directory of the embedded (SQLite) databases.
    pub data_dir: PathBuf,
    /// Identifies this replica in leases; unique per process.
    pub worker_id: String,
    /// Verifications this process runs at once.
    pub concurrency: usize,
    /// A digest's drill-down reads the differing buckets this many entries
    /// (source and target together) at a time.
    pub drill_batch_entries: u64,
    /// Mismatches kept per check (re-check, repair, StreamMismatches); the
    /// drill-down stops there and the check fails saying what it did not read.
    pub max_mismatches_kept: usize,
    /// DynamoDB table of finished verifications' mismatches, keyed by `run`
    /// (S) and `seq` (S), shared by the replicas; unset: a table in
    /// `data_dir`.
    pub mismatch_table: Option<String>,
    /// Endpoints a spec may name for its stores besides the ones above
    /// (comma-separated URLs or host:port; `*`: any). The verifier reads
    /// them with its own credentials, so the default allows only its own.
    pub allowed_endpoints: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            job_tracker_url: "http://127.0.0.1:50051".to_owned(),
            replicator_url: "http://127.0.0.1:50051".to_owned(),
            aws_endpoint: None,
            elasticsearch_url: None,
            kafka_brokers: None,
            data_dir: PathBuf::from(".tidemark"),
            worker_id: format!("verifier-{}", std::process::id()),
            concurrency: 2,
            drill_batch_entries: drill::DrillLimits::default().batch_entries,
            max_mismatches_kept: drill::DrillLimits::default().max_kept,
            mismatch_table: None,
            allowed_endpoints: String::new(),
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("job_tracker_url", &self.job_tracker_url)?;
        // Read from the environment when an index is opened; a bad pair
        // stops the process at start rather than failing every sink.
        tidemark_connectors::elasticsearch::Credentials::from_env()
            .map_err(|e| ConfigError::invalid("elasticsearch credentials", e.to_string()))?;
        check_url("replicator_url", &self.replicator_url)?;
        for (field, url) in [
            ("aws_endpoint", &self.aws_endpoint),
            ("elasticsearch_url", &self.elasticsearch_url),
        ] {
            if let Some(url) = url {
                check_url(field, url)?;
            }
        }
        if self.worker_id.trim().is_empty() {
            return Err(ConfigError::invalid("worker_id", "must not be empty"));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(ConfigError::invalid(
                "concurrency",
                "must be between 1 and 64",
            ));
        }
        if self.drill_batch_entries == 0 {
            return Err(ConfigError::invalid(
                "drill_batch_entries",
                "must be at least 1",
            ));
        }
        if self.max_mismatches_kept == 0 {
            return Err(ConfigError::invalid(
                "max_mismatches_kept",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("{0}")]
    Config(String),
    /// Bad request fields.
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backend (the replicator) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A store fault or a job-tracker answer, already classified by the
    /// kit's error table.
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0}")]
    Internal(String),
}

impl From<tidemark_connectors::ConnectorError> for VerifierError {
    fn from(e: tidemark_connectors::ConnectorError) -> Self {
        Self::Service(e.into())
    }
}

impl From<VerifierError> for ServiceError {
    fn from(e: VerifierError) -> Self {
        match e {
            VerifierError::Invalid(v) => Self::invalid(v),
            VerifierError::NotFound(m) => Self::not_found(m),
            VerifierError::AlreadyExists(m) => Self::already_exists(m),
            VerifierError::FailedPrecondition(m) => Self::precondition(m),
            VerifierError::Unavailable(m) => Self::unavailable(m),
            VerifierError::Service(s) => s,
            e @ (VerifierError::Kit(_) | VerifierError::Config(_) | VerifierError::Internal(_)) => {
                Self::internal(e.to_string())
            }
        }
    }
}

impl From<VerifierError> for Status {
    fn from(e: VerifierError) -> Self {
        ServiceError::from(e).into()
    }
}

/// What a verification looks like while this process runs it.
pub(crate) struct Live {
    pub report: pb::Report,
    /// Confirmed mismatches so far, per check in spec order.
    pub mismatches: Vec<pb::Mismatch>,
}

/// Everything the RPCs and the worker share.
pub(crate) struct State {
    pub jobs: JobTracker,
    pub replicator: replicator::Replicator,
    pub env: side::Env,
    pub live: Mutex<HashMap<String, Arc<Mutex<Live>>>>,
    pub limits: drill::DrillLimits,
    pub mismatches: mismatches::MismatchStore,
    pub metrics: metrics::VerifierMetrics,
}

/// The `VerifierService` implementation.
#[derive(Clone)]
pub struct Verifier {
    state: Arc<State>,
}

/// Adds this service and its worker (claiming VERIFICATION units) to `host`.
///
/// # Errors
/// When a client cannot be built from the configuration.
pub async fn register(config: &Config, host: &mut ServiceHost) -> Result<(), VerifierError> {
    register_with(config, None, host).await
}

/// As [`register`], with AWS settings (credentials, region) to start from
/// instead of the default chain; tests and benchmarks bring their own.
///
/// # Errors
/// When a client cannot be built from the configuration.
pub async fn register_with(
    config: &Config,
    aws: Option<aws_config::SdkConfig>,
    host: &mut ServiceHost,
) -> Result<(), VerifierError> {
    let token = config.server.auth_token.as_deref();
    let jobs =
        JobTracker::connect(&config.job_tracker_url, token).map_err(VerifierError::Config)?;
    let replicator = replicator::Replicator::connect(&config.replicator_url, token)
        .map_err(VerifierError::Config)?;
    let mut env = side::Env::new(
        config.aws_endpoint.clone(),
        config.elasticsearch_url.clone(),
        config.data_dir.clone(),
    );
    env.aws_base = aws;
    env.kafka_brokers.clone_from(&config.kafka_brokers);
    env.allow = tidemark_kit::endpoints::AllowList::new(
        [
            config.aws_endpoint.as_deref(),
            config.elasticsearch_url.as_deref(),
            config.kafka_brokers.as_deref(),
        ]
        .into_iter()
        .flatten(),
        &config.allowed_endpoints,
    );
    let mismatch_table: Arc<dyn tidemark_connectors::SourceTable> = match &config.mismatch_table {
        Some(name) => Arc::new(
            env.own_dynamo(name)
                .await
                .map_err(|e| VerifierError::Config(format!("mismatch_table {name}: {e}")))?,
        ),
        None => Arc::new(
            tidemark_connectors::sqlite::EmbeddedStore::open(&config.data_dir.join("verifier.db"))
                .map_err(|e| VerifierError::Config(format!("mismatch store: {e}")))?
                .table(
                    "tidemark_mismatches",
                    tidemark_connectors::KeySchema::new("run", Some("seq")),
                ),
        ),
    };
    let state = Arc::new(State {
        jobs: jobs.clone(),
        replicator,
        env,
        live: Mutex::default(),
        limits: drill::DrillLimits {
            batch_entries: config.drill_batch_entries,
            max_kept: config.max_mismatches_kept,
        },
        mismatches: mismatches::MismatchStore::new(mismatch_table),
        metrics: metrics::VerifierMetrics::register(&host.metrics()),
    });
    host.add_service(VerifierServiceServer::new(Verifier {
        state: state.clone(),
    }));
    let mut options = WorkerOptions::new(config.worker_id.clone(), vec![JobKind::Verification]);
    options.concurrency = config.concurrency;
    let executor = executor::executor(state);
    host.spawn(
        "verification-worker",
        run_worker(jobs.raw(), options, executor, host.shutdown_token()),
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
) -> Result<(), VerifierError> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
