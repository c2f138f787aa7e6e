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
