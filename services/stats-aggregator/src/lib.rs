//! The stats-aggregator: ingests counter events, aggregates them in Redis,
//! flushes them to DynamoDB exactly once (conditional on a flush sequence),
//! publishes absolute values to Kafka and pauses writers for a cut-over.

pub mod convert;
pub mod dead_letters;
pub mod decimal;
pub mod engine;
pub mod error;
pub mod event_log;
mod gauges;
mod lazy_redis;
pub mod publish;
mod service;
pub mod shared_pause;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dead_letters::{DeadLetters, EmbeddedDeadLetters, RedisDeadLetters};
use serde::{Deserialize, Serialize};
use tidemark_connectors::Buffer;
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_kit::config::{ConfigError, ServerConfig, ServiceConfig, check_url};
use tidemark_kit::{CancellationToken, ServiceHost};
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_server::StatsAggregatorServiceServer;
use tokio::net::TcpListener;

pub use engine::Engine;
pub use error::{StatsError, StatsResult};
pub use event_log::{EventLogBuffer, ReplicaWait, is_dedup_full};
pub use shared_pause::SharedPause;
pub use store::{DynamoStatsStore, EmbeddedStatsStore, StatsStore};

/// Where events are buffered between ingestion and flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    /// Redis at `redis_url`, shared by every replica.
    #[default]
    Redis,
    /// SQLite file under `data_dir` (one replica; `tidemark dev`).
    Embedded,
}

/// Where counters are flushed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The DynamoDB table `stats_table`, which must exist.
    #[default]
    Dynamodb,
    /// SQLite file under `data_dir` (`tidemark dev`).
    Embedded,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    pub buffer: BufferKind,
    pub store: StoreKind,
    /// Directory of the embedded buffer and store.
    pub data_dir: PathBuf,
    /// Redis holding the aggregation buffer.
    pub redis_url: String,
    /// Name of the buffer: replicas sharing it share one Redis key space
    /// (`tidemark:stats:{<name>}:`).
    pub buffer_name: String,
    /// DynamoDB table the counters are flushed to.
    pub stats_table: String,
    /// Partition key attribute of the stats table (an event's entity key).
    pub stats_key_attribute: String,
    /// AWS endpoint override; the default chain when unset.
    pub aws_endpoint: Option<String>,
    /// Kafka bootstrap servers; absolute values are published when set.
    pub kafka_brokers: Option<String>,
    /// Topic of the absolute values.
    pub kafka_topic: String,
    /// Time between flushes, at least 100 ms.
    pub flush_interval_ms: u64,
    /// Item writes of one flush in flight at once.
    pub flush_concurrency: usize,
    /// Most item writes a second a flush sends (0: no limit). Either way
    /// the flush backs off when the stats table throttles it and recovers
    /// after (AIMD), so a flush shares a provisioned table with its
    /// readers instead of exhausting it.
    pub flush_write_units_per_second: u32,
    /// How long an event id is remembered to drop client retries.
    pub dedup_window_secs: u64,
    /// Most event ids remembered at once (Redis buffer; 0: no bound). Each
    /// replica holds them all in memory (about 60 bytes plus the id's
    /// length, rounded up to 16, each), so this bounds its memory whatever
    /// the number of replicas. Ids are kept one to two windows, so
    /// ingestion sustains about `dedup_max_ids / (2 × dedup_window_secs)`
    /// events/s; past the bound a batch is refused whole with
    /// `RESOURCE_EXHAUSTED` until the window passes (never counted twice,
    /// never dropped silently) instead of the process outgrowing its
    /// memory limit.
    pub dedup_max_ids: u64,
    /// Redis replicas that must have a batch of events before it is
    /// acknowledged (Redis `WAIT`), so a failover cannot lose it; 0: no
    /// wait. Fewer in time: the ingest answers `UNAVAILABLE`, and the
    /// client's resend counts each event once (`EventLogBuffer::with_replica_wait`).
    pub redis_wait_replicas: u32,
    /// How long an ingest waits for those replicas.
    pub redis_wait_timeout_ms: u64,
    /// How long PauseWriters waits for every live replica to confirm the
    /// pause (less when the caller's deadline is sooner).
    pub pause_confirm_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            buffer: BufferKind::Redis,
            store: StoreKind::Dynamodb,
            data_dir: PathBuf::from(".tidemark"),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            buffer_name: "default".to_owned(),
            stats_table: "tidemark-stats".to_owned(),
            stats_key_attribute: "pk".to_owned(),
            aws_endpoint: None,
            kafka_brokers: None,
            kafka_topic: "tidemark-stats".to_owned(),
            flush_interval_ms: 300_000,
            flush_concurrency: 16,
            flush_write_units_per_second: 0,
            dedup_window_secs: 3600,
            dedup_max_ids: 0,
            pause_confirm_timeout_ms: 10_000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 500,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.buffer == BufferKind::Redis
            && !self.redis_url.starts_with("redis://")
            && !self.redis_url.starts_with("rediss://")
        {
            return Err(ConfigError::invalid(
                "redis_url",
                "must be a redis:// or rediss:// URL",
            ));
        }
        if self.buffer_name.trim().is_empty() {
            return Err(ConfigError::invalid("buffer_name", "must not be empty"));
        }
        if (self.buffer == BufferKind::Embedded || self.store == StoreKind::Embedded)
            && self.data_dir.as_os_str().is_empty()
        {
            return Err(ConfigError::invalid(
                "data_dir",
                "must be set for an embedded buffer or store",
            ));
        }
        if self.store == StoreKind::Dynamodb && self.stats_table.trim().is_empty() {
            return Err(ConfigError::invalid("stats_table", "must not be empty"));
        }
        if self.stats_key_attribute.trim().is_empty()
            || self.stats_key_attribute.starts_with(store::RESERVED_PREFIX)
        {
            return Err(ConfigError::invalid(
                "stats_key_attribute",
                "must be set and not start with tidemark_",
            ));
        }
        if self.flush_interval_ms < 100 {
            return Err(ConfigError::invalid(
                "flush_interval_ms",
                "must be at least 100",
            ));
        }
        if !(1..=256).contains(&self.flush_concurrency) {
            return Err(ConfigError::invalid(
                "flush_concurrency",
                "must be between 1 and 256",
            ));
        }
        if self.dedup_window_secs == 0 {
            return Err(ConfigError::invalid(
                "dedup_window_secs",
                "must be at least 1",
            ));
        }
        if self.dedup_max_ids != 0
            && usize::try_from(self.dedup_max_ids).unwrap_or(usize::MAX) < convert::MAX_EVENTS
        {
            return Err(ConfigError::invalid(
                "dedup_max_ids",
                format!(
                    "must be 0 (no bound) or at least the events of one message ({})",
                    convert::MAX_EVENTS
                ),
            ));
        }
        if self.redis_wait_replicas > 0
            && (self.redis_wait_timeout_ms == 0
                || self.redis_wait_timeout_ms >= self.server.request_timeout_ms)
        {
            return Err(ConfigError::invalid(
                "redis_wait_timeout_ms",
                "must be positive and below request_timeout_ms when redis_wait_replicas is set",
            ));
        }
        if self.pause_confirm_timeout_ms < 100
            || self.pause_confirm_timeout_ms >= self.server.request_timeout_ms
        {
            return Err(ConfigError::invalid(
                "pause_confirm_timeout_ms",
                "must be at least 100 and below request_timeout_ms (PauseWriters answers within it)",
            ));
        }
        if self.kafka_brokers.is_some() && self.kafka_topic.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka_topic",
                "must be set when kafka_brokers is",
            ));
        }
        if let Some(url) = &self.aws_endpoint {
            check_url("aws_endpoint", url)?;
        }
        Ok(())
    }
}

/// The `StatsAggregatorService` implementation.
#[derive(Clone)]
pub struct StatsAggregator {
    engine: Arc<Engine>,
}

/// The backends an aggregator runs on.
pub struct Backends {
    pub buffer: Arc<dyn Buffer>,
    /// The Redis buffer again, for the health probe; `None` when embedded.
    /// When set, the replicas of this buffer share the writer pause and the
    /// dead letters in the Redis at the config's `redis_url`, under this
    /// buffer's prefix; otherwise dead letters go to `data_dir`.
    pub redis: Option<RedisBuffer>,
    pub store: Arc<dyn StatsStore>,
    pub publisher: Option<publish::Publisher>,
}

/// Opens the configured buffer; the Redis one (for the health probe and
/// the state the replicas share) again beside it.
///
/// # Errors
/// When the buffer cannot be reached or opened.
pub async fn open_buffer(config: &Config) -> StatsResult<(Arc<dyn Buffer>, Option<RedisBuffer>)> {
    let startup =
        |what: &str, e: &dyn std::fmt::Display| StatsError::Startup(format!("{what}: {e}"));
    Ok(match config.buffer {
        BufferKind::Redis => {
            let buffer = EventLogBuffer::connect(
                &config.redis_url,
                RedisBuffer::prefix_for(&config.buffer_name),
            )
            .await
            .map_err(|e| startup("cannot reach the Redis buffer", &e))?
            .with_replica_wait(ReplicaWait {
                replicas: config.redis_wait_replicas,
                timeout: Duration::from_millis(config.redis_wait_timeout_ms),
            })
            .with_max_ids(usize::try_from(config.dedup_max_ids).unwrap_or(usize::MAX));
            let redis = buffer.redis().clone();
            (Arc::new(buffer), Some(redis))
        }
        BufferKind::Embedded => {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                startup(&format!("cannot create {}", config.data_dir.display()), &e)
            })?;
            let store = EmbeddedStore::open(&config.data_dir.join("stats-buffer.db"))
                .map_err(|e| startup("cannot open the embedded buffer", &e))?;
            (Arc::new(store.buffer(&config.buffer_name)), None)
        }
    })
}

/// Opens the configured buffer, store and publisher.
///
/// # Errors
/// When a backend cannot be reached or the stats table does not exist.
pub async fn open(config: &Config) -> StatsResult<Backends> {
    let startup =
        |what: &str, e: &dyn std::fmt::Display| StatsError::Startup(format!("{what}: {e}"));
    if config.buffer == BufferKind::Embedded || config.store == StoreKind::Embedded {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| startup(&format!("cannot create {}", config.data_dir.display()), &e))?;
    }
    let (buffer, redis) = open_buffer(config).await?;
    let store: Arc<dyn StatsStore> = match config.store {
        StoreKind::Dynamodb => {
            let sdk =
                tidemark_connectors::dynamodb::sdk_config(config.aws_endpoint.as_deref()).await;
            let client = aws_sdk_dynamodb::Client::new(&sdk);
            Arc::new(
                DynamoStatsStore::open(client, &config.stats_table, &config.stats_key_attribute)
                    .await
                    .map_err(|e| {
                        startup(
                            &format!(
                                "stats table {:?} is not usable (the aggregator never creates it; see deploy/cloudformation)",
                                config.stats_table
                            ),
                            &e,
                        )
                    })?,
            )
        }
        StoreKind::Embedded => Arc::new(
            EmbeddedStatsStore::open(
                &config.data_dir.join("stats.db"),
                &config.stats_key_attribute,
            )
            .map_err(|e| startup("cannot open the embedded stats store", &e))?,
        ),
    };
    let publisher = match &config.kafka_brokers {
        Some(brokers) if !brokers.trim().is_empty() => Some(
            publish::Publisher::new(brokers, &config.kafka_topic, &config.stats_key_attribute)
                .map_err(|e| startup("cannot configure the Kafka producer", &e))?,
        ),
        _ => None,
    };
    Ok(Backends {
        buffer,
        redis,
        store,
        publisher,
    })
}

/// Adds the aggregator's service, its periodic flusher, its gauges and a
/// health probe of its backends to `host`.
///
/// # Errors
/// When a backend cannot be reached or the stats table does not exist.
pub async fn register(config: &Config, host: &mut ServiceHost) -> StatsResult<()> {
    let backends = open(config).await?;
    register_with(config, backends, host);
    Ok(())
}

/// As [`register`], over backends the caller opened (tests and benchmarks
/// that bring their own clients).
pub fn register_with(config: &Config, backends: Backends, host: &mut ServiceHost) {
    let Backends {
        buffer,
        redis,
        store,
        publisher,
    } = backends;
    let settings = engine::Settings {
        dedup_window: Duration::from_secs(config.dedup_window_secs),
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        flush_concurrency: config.flush_concurrency,
        flush_write_rate: f64::from(config.flush_write_units_per_second),
        pause_confirm_timeout: Duration::from_millis(config.pause_confirm_timeout_ms),
        ..engine::Settings::new(&config.stats_key_attribute)
    };
    let gauges = gauges::Gauges::register(&host.metrics());
    let mut engine = Engine::new(buffer, store, publisher, settings, Some(gauges));
    if let Some(redis) = &redis {
        // Replicas share the buffer, so they share the pause beside it.
        engine = engine.with_shared_pause(SharedPause::new(
            &config.redis_url,
            redis.prefix(),
            SharedPause::replica_name(),
        ));
    }
    let letters: Arc<dyn DeadLetters> = match &redis {
        Some(redis) => Arc::new(RedisDeadLetters::new(&config.redis_url, redis.prefix())),
        None => Arc::new(EmbeddedDeadLetters::new(
            &config.data_dir.join("stats-dead-letters.db"),
        )),
    };
    let engine = Arc::new(engine.with_dead_letters(letters));
    host.add_service(StatsAggregatorServiceServer::new(StatsAggregator {
        engine: engine.clone(),
    }));
    host.spawn("flusher", engine.clone().run_flusher(host.shutdown_token()));
    host.spawn("replica", engine.clone().run_replica(host.shutdown_token()));
    host.spawn(
        "gauges",
        engine
            .clone()
            .run_gauges(Duration::from_secs(5), host.shutdown_token()),
    );
    host.watch_backend(
        <StatsAggregatorServiceServer<StatsAggregator> as tonic::server::NamedService>::NAME,
        Duration::from_secs(5),
        move || {
            let redis = redis.clone();
            let engine = engine.clone();
            async move {
                if let Some(redis) = &redis {
                    redis.ping().await.map_err(|e| e.to_string())?;
                }
                engine.ping_store().await.map_err(|e| e.to_string())
            }
        },
    );
}

/// As [`run`], over backends the caller opened.
///
/// # Errors
/// When the transport fails.
pub async fn run_with(
    config: Config,
    backends: Backends,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> StatsResult<()> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register_with(&config, backends, &mut host);
    host.serve(listener).await?;
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
) -> StatsResult<()> {
    let mut host = ServiceHost::new(config.server.clone(), shutdown);
    register(&config, &mut host).await?;
    host.serve(listener).await?;
    Ok(())
}
