//! Store connectors (DESIGN.md §2): every store sits behind one of four small
//! traits — [`SourceTable`], [`ChangeFeed`], [`Sink`], [`Buffer`] — with real
//! implementations (DynamoDB, DynamoDB Streams, Redis) and an embedded one (SQLite).
//!
//! Each backend is a Cargo feature of the same name (`dynamodb`, `streams`,
//! `kafka`, `elasticsearch`, `s3`, `redis`, `sqlite`; all by default), so a
//! service links only the clients it uses. The behaviour suites, the
//! scripted stream and the local-component helpers are behind `testsuite`.

#[cfg(feature = "aws")]
pub mod aws;
pub mod capacity;
pub mod deadline;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "elasticsearch")]
pub mod elasticsearch;
pub mod error;
pub mod image;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(all(feature = "testsuite", feature = "streams"))]
pub mod memory;
pub mod predicate;
pub mod proto;
#[cfg(feature = "redis")]
pub mod redis;
pub mod retry;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "streams")]
pub mod streams;
#[cfg(feature = "testsuite")]
pub mod suite;
#[cfg(feature = "testsuite")]
pub mod testing;
pub mod traits;
pub mod transform;
pub mod value;

pub use error::{ConnectorError, ConnectorResult};
pub use image::{EncodedItem, Image, ValueRef};
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
