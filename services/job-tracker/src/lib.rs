//! The job-tracker: durable state of every migration, backfill, extract and
//! verification run — jobs, runs, units, leases with fencing tokens,
//! checkpoints, the failure gate, schedules and per-unit routes. It never
//! calls out; workers pull units from it (DESIGN.md §2, "How work flows").

pub mod calendar;
pub mod convert;
pub mod engine;
pub mod error;
mod gauges;
pub mod kv;
pub mod limits;
pub mod model;
pub mod schedule;
mod service;
/// Behaviour suites for the stores; test code, so only built on request.
#[cfg(feature = "testsuite")]
pub mod suite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engine::Tracker;
use kv::{DynamoKv, KvStore, SqliteKv};

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
    /// How often the scheduler looks for due runs.
    pub scheduler_tick_ms: u64,
    /// How often the gauges (units by status, blocked jobs) are recomputed.
    pub gauge_refresh_ms: u64,
    /// How often the health check reads the store (a DynamoDB
    /// DescribeTable per replica each time); NOT_SERVING when it fails.
    pub store_probe_ms: u64,
    /// The first wait before a unit that failed retryably may be claimed
    /// again; doubled per attempt (at most 5 min) and jittered down to half.
    /// 0: at once.
    pub unit_retry_delay_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            store: StoreKind::Embedded,
            data_dir: PathBuf::from(".tidemark"),
            dynamodb_table: "tidemark-jobs".to_owned(),
            aws_endpoint: None,
            scheduler_tick_ms: 1000,
            gauge_refresh_ms: 15_000,
            store_probe_ms: 5_000,
            unit_retry_delay_ms: 5_000,
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
        if self.gauge_refresh_ms < 100 {
            return Err(ConfigError::invalid(
                "gauge_refresh_ms",
                "must be at least 100",
            ));
        }
        if !(100..=3_600_000).contains(&self.store_probe_ms) {
            return Err(ConfigError::invalid(
                "store_probe_ms",
                "must be between 100 and 3600000 (1 h)",
            ));
        }
        if self.unit_retry_delay_ms > 300_000 {
            return Err(ConfigError::invalid(
                "unit_retry_delay_ms",
                "must be at most 300000 (5 min, the longest wait between attempts)",
            ));
        }
        if !(10..=60_000).contains(&self.scheduler_tick_ms) {
            return Err(ConfigError::invalid(
                "scheduler_tick_ms",
                "must be between 10 and 60000",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobTrackerError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("cannot open the {store:?} store: {source}")]
    Store {
        store: StoreKind,
        source: kv::KvError,
    },
}

/// The `JobTrackerService` implementation.
#[derive(Clone)]
pub struct JobTracker {
    tracker: Arc<Tracker>,
}

/// Opens the configured store.
///
/// # Errors
/// When the embedded file or the DynamoDB table cannot be reached.
pub async fn open_store(config: &Config) -> Result<Arc<dyn KvStore>, JobTrackerError> {
    let store_err = |source| JobTrackerError::Store {
        store: config.store,
        source,
    };
    Ok(match config.store {
        StoreKind::Embedded => Arc::new(SqliteKv::open(&config.data_dir).map_err(store_err)?),
        StoreKind::Dynamodb => {
            let sdk =
                tidemark_connectors::dynamodb::sdk_config(config.aws_endpoint.as_deref()).await;
            let kv = DynamoKv::new(
                tidemark_connectors::dynamodb::bounded(&aws_sdk_dynamodb::Client::new(&sdk)),
                &config.dynamodb_table,
            );
            kv.ensure_table().await.map_err(store_err)?;
            Arc::new(kv)
        }
    })
}

/// Adds the job-tracker's service, its scheduler and a health probe of its
/// store to `host`.
///
/// # Errors
/// When its store cannot be opened.
pub async fn register(config: &Config, host: &mut ServiceHost) -> Result<(), JobTrackerError> {
    let store = open_store(config).await?;
    register_with_store(config, store, host);
    Ok(())
}

/// As [`register`], over a store the caller opened (tests and benchmarks
/// that bring their own client).
pub fn register_with_store(config: &Config, store: Arc<dyn KvStore>, host: &mut ServiceHost) {
    let tracker = Arc::new(
        Tracker::new(store.clone(), host.shutdown_token())
            .with_retry_delay(Duration::from_millis(config.unit_retry_delay_ms)),
    );
    host.add_service(JobTrackerServiceServer::new(JobTracker {
        tracker: tracker.clone(),
    }));
    // A claim may wait for work longer than the request timeout.
    host.allow_longer(
        <JobTrackerServiceServer<JobTracker> as tonic::server::NamedService>::NAME,
        "ClaimUnit",
        service::MAX_WAIT,
    );
    host.spawn(
        "scheduler",
        schedule::run(
            tracker.clone(),
            Duration::from_millis(config.scheduler_tick_ms),
            host.shutdown_token(),
        ),
    );
    let gauges = gauges::Gauges::register(&host.metrics());
    host.spawn(
        "gauges",
        gauges.run(
            tracker,
            Duration::from_millis(config.gauge_refresh_ms),
            host.shutdown_token(),
        ),
    );
    host.watch_backend(
        <JobTrackerServiceServer<JobTracker> as tonic::server::NamedService>::NAME,
        Duration::from_millis(config.store_probe_ms),
        move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }
        },
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_probe_interval_is_bounded() {
        let with = |ms| {
            Config {
                store_probe_ms: ms,
                ..Config::default()
            }
            .validate()
        };
        assert!(with(5_000).is_ok());
        assert!(with(3_600_000).is_ok());
        for bad in [0, 99, 3_600_001] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("store_probe_ms"), "{bad}: {e}");
        }
    }
}
