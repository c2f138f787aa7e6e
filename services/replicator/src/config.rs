//! The replicator's configuration: defaults, then file, `TIDEMARK_…`
//! environment and flags (the kit's loader), checked by `validate()`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};

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
    /// Endpoints a request may name for its stores besides the ones above
    /// (comma-separated URLs or host:port; `*`: any). The replicator calls
    /// them with its own credentials, so the default allows only its own.
    pub allowed_endpoints: String,
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
    /// key fails after copying its first batch of items (and is rolled back).
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
            allowed_endpoints: String::new(),
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
        // Read from the environment when an index is opened; a bad pair
        // stops the process at start rather than failing every sink.
        tidemark_connectors::elasticsearch::Credentials::from_env()
            .map_err(|e| ConfigError::invalid("elasticsearch credentials", e.to_string()))?;
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
