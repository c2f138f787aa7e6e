//! The service kit every Tidemark service is built on: one [`ServiceHost`]
//! that serves gRPC with health, reflection and the shared tower stack;
//! layered configuration; telemetry; graceful shutdown; and the mapping of
//! domain errors to `tonic::Status`.

pub mod auth;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod jobs;
pub mod main_support;
pub mod metrics;
pub mod rpc;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod timeout;
pub mod trace_context;
pub mod worker;

pub use config::{ConfigError, ServerConfig, ServerFlags, ServiceConfig};
pub use error::{ErrorKind, FieldError, KitError, KitResult, ServiceError};
pub use health::Health;
pub use metrics::Metrics;
pub use server::ServiceHost;
pub use tokio_util::sync::CancellationToken;
