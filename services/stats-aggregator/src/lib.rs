//! The stats-aggregator: ingests counter events, aggregates them in Redis,
//! flushes them to DynamoDB exactly once (conditional on a flush sequence),
//! publishes absolute values to Kafka and pauses writers for a cut-over.

mod service;

use serde::{Deserialize, Serialize};
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::{CancellationToken, KitError, ServiceHost};
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_server::StatsAggregatorServiceServer;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    /// Redis holding the aggregation buffer.
    pub redis_url: String,
    /// DynamoDB table the counters are flushed to.
    pub stats_table: String,
    /// AWS endpoint override; the default chain when unset.
    pub aws_endpoint: Option<String>,
    /// Kafka bootstrap servers; absolute values are published when set.
    pub kafka_brokers: Option<String>,
    /// Topic of the absolute values.
    pub kafka_topic: String,
    /// Time between flushes, at least 100 ms.
    pub flush_interval_ms: u64,
    /// How long an event id is remembered to drop client retries.
    pub dedup_window_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            stats_table: "tidemark-stats".to_owned(),
            aws_endpoint: None,
            kafka_brokers: None,
            kafka_topic: "tidemark-stats".to_owned(),
            flush_interval_ms: 300_000,
            dedup_window_secs: 3600,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("rediss://") {
            return Err(ConfigError::invalid(
                "redis_url",
                "must be a redis:// or rediss:// URL",
            ));
        }
        if self.stats_table.trim().is_empty() {
            return Err(ConfigError::invalid("stats_table", "must not be empty"));
        }
        if self.flush_interval_ms < 100 {
            return Err(ConfigError::invalid(
                "flush_interval_ms",
                "must be at least 100",
            ));
        }
        if let Some(url) = &self.aws_endpoint {
            check_url("aws_endpoint", url)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatsAggregatorError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// The `StatsAggregatorService` implementation.
#[derive(Clone)]
pub struct StatsAggregator {}

/// Adds this service to `host`.
///
/// # Errors
/// When a backend it needs cannot be set up.
pub async fn register(
    _config: &Config,
    host: &mut ServiceHost,
) -> Result<(), StatsAggregatorError> {
    host.add_service(StatsAggregatorServiceServer::new(StatsAggregator {}));
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
) -> Result<(), StatsAggregatorError> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
