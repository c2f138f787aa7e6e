//! Store connectors (DESIGN.md §2): every store sits behind one of four small
//! traits — [`SourceTable`], [`ChangeFeed`], [`Sink`], [`Buffer`] — with real
//! implementations (DynamoDB, DynamoDB Streams, Redis) and an embedded one (SQLite).

pub mod dynamodb;
pub mod elasticsearch;
pub mod error;
pub mod kafka;
pub mod memory;
pub mod predicate;
pub mod proto;
pub mod redis;
pub mod retry;
pub mod s3;
pub mod sqlite;
pub mod streams;
pub mod suite;
pub mod testing;
pub mod traits;
pub mod transform;
pub mod value;

pub use error::{ConnectorError, ConnectorResult};
pub use predicate::Predicate;
pub use traits::*;
pub use value::{AttrValue, Item, Key, KeySchema, Number};

/// The partition-key prefix of the watermark items the replicator writes into
/// a source table during a DBLog backfill (DESIGN.md §3.4). Every reader of a
/// source (the replicator's feeds, the verifier's sides) skips keys that
/// start with it; a pipeline may configure another prefix.
pub const DEFAULT_WATERMARK_PREFIX: &str = "__tidemark_watermark#";

/// Microseconds since the Unix epoch, by the wall clock (0 before 1970,
/// `i64::MAX` past year 294,247).
pub fn now_micros() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}
