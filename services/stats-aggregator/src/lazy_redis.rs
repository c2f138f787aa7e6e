//! A Redis connection opened on first use, so a service can be assembled
//! (synchronously, before Redis answers) and connect when it needs to.

use redis::aio::ConnectionManager;
use tidemark_connectors::ConnectorResult;
use tokio::sync::OnceCell;

pub struct LazyRedis {
    url: String,
    conn: OnceCell<ConnectionManager>,
}

impl LazyRedis {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            conn: OnceCell::new(),
        }
    }

    /// The connection (reconnecting by itself once open).
    ///
    /// # Errors
    /// `InvalidInput` for a malformed URL, `Retryable` when Redis cannot be
    /// reached; the next call tries again.
    pub async fn get(&self) -> ConnectorResult<ConnectionManager> {
        self.conn
            .get_or_try_init(|| tidemark_connectors::redis::connection(&self.url))
            .await
            .cloned()
    }
}
