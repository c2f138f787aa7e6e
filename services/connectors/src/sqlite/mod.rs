//! The embedded store: one SQLite file holding tables, their change log (the
//! embedded change feed) and sinks. It is what `tidemark dev` and fast tests
//! run on; it implements the same traits, checked by the same suites, as the
//! real stores.
//!
//! By concern: `connection` (opening a file, the shared connection every
//! embedded store of Tidemark uses), `table` (a [`SourceTable`]),
//! `changelog` (the change log its writes append to, read as a
//! [`ChangeFeed`]), `sink` (a versioned [`Sink`]) and `buffer` (a
//! [`Buffer`]). Each module adds to [`EmbeddedStore`] the constructor of the
//! handle it defines.
//!
//! [`SourceTable`]: crate::traits::SourceTable
//! [`ChangeFeed`]: crate::traits::ChangeFeed
//! [`Sink`]: crate::traits::Sink
//! [`Buffer`]: crate::traits::Buffer

mod buffer;
mod changelog;
mod connection;
mod sink;
mod table;

use std::path::Path;

use crate::error::{ConnectorError, ConnectorResult};
use crate::value::Item;

pub use buffer::EmbeddedBuffer;
pub use changelog::EmbeddedFeed;
pub use connection::{BUSY_TIMEOUT, SharedConnection, open_file};
pub use sink::EmbeddedSink;
pub use table::EmbeddedTable;

const SCHEMA: &str = "
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS tm_items (
    tbl TEXT NOT NULL, k TEXT NOT NULL, item TEXT NOT NULL,
    PRIMARY KEY (tbl, k)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, k TEXT NOT NULL, kind TEXT NOT NULL,
    new_image TEXT, old_image TEXT, created_micros INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tm_changes_tbl ON tm_changes (tbl, seq);
CREATE TABLE IF NOT EXISTS tm_buffer (
    buf TEXT NOT NULL, flush INTEGER NOT NULL, entity TEXT NOT NULL, metric TEXT NOT NULL,
    kind TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (buf, flush, entity, metric, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_buffer_dedup (
    buf TEXT NOT NULL, id TEXT NOT NULL, expires_micros INTEGER NOT NULL,
    PRIMARY KEY (buf, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tm_buffer_dedup_expiry ON tm_buffer_dedup (buf, expires_micros);
CREATE TABLE IF NOT EXISTS tm_buffer_acked (
    buf TEXT NOT NULL PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_sink (
    sink TEXT NOT NULL, k TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL, item TEXT,
    PRIMARY KEY (sink, k)) WITHOUT ROWID;
";

/// A handle on one embedded database file. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    conn: SharedConnection,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or the schema not created.
    pub fn open(path: &Path) -> ConnectorResult<Self> {
        let conn = open_file(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: SharedConnection::new(conn),
        })
    }

    /// A private in-memory database (tests).
    #[cfg(feature = "testsuite")]
    ///
    /// # Errors
    /// When SQLite cannot allocate it.
    pub fn in_memory() -> ConnectorResult<Self> {
        let conn = rusqlite::Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: SharedConnection::new(conn),
        })
    }
}

fn to_json(item: &Item) -> String {
    crate::value::canonical_item(item)
}

/// Reads an item stored as [`canonical_item`](crate::value::canonical_item) JSON.
///
/// # Errors
/// A terminal error when the text is no item.
pub fn item_from_json(text: &str) -> ConnectorResult<Item> {
    serde_json::from_str(text)
        .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt item: {e}")))
}
