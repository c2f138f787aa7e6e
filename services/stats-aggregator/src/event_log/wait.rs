//! Redis `WAIT` before a batch is acknowledged, so a failover to a replica
//! cannot lose an ingest the client was told is accepted.

use std::time::Duration;

use redis::{Script, Value};
use tidemark_connectors::{ConnectorError, ConnectorResult};

use super::{EventLogBuffer, Mirror, corrupt};

/// The backend a batch short of its replicas fails with: told apart from
/// Redis's other retryable faults, which are worth retrying at once, while
/// this one already waited its timeout.
pub const REPLICATION: &str = "redis replication";

/// How many Redis replicas must have a batch before it is acknowledged,
/// and how long to wait for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

/// Whether `e` is a batch that fewer replicas than configured acknowledged.
pub fn is_replica_shortfall(e: &ConnectorError) -> bool {
    matches!(e, ConnectorError::Retryable { backend, .. } if *backend == REPLICATION)
}

impl ReplicaWait {
    /// The error when only `acked` replicas acknowledged in time.
    fn shortfall(self, acked: i64) -> Option<ConnectorError> {
        (acked < i64::from(self.replicas)).then(|| ConnectorError::Retryable {
            backend: REPLICATION,
            message: format!(
                "{acked} of {} replicas acknowledged the batch within {:?}",
                self.replicas, self.timeout
            ),
            retry_after: Some(self.timeout.max(Duration::from_millis(100))),
        })
    }

    fn timeout_ms(self) -> u64 {
        // WAIT 0 would block for ever.
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl EventLogBuffer {
    /// Acknowledges a batch only once `wait.replicas` Redis replicas have
    /// it (`WAIT`), within `wait.timeout`; otherwise the batch fails with a
    /// retryable error of backend [`REPLICATION`] (`UNAVAILABLE` to the
    /// client). No replicas asked for: no `WAIT`.
    ///
    /// Why the client may resend such a batch: the script that applied it
    /// appended its ids to the id log in the same atomic step. If the
    /// primary keeps it, the resend finds every id and is all duplicates,
    /// and those are acknowledged only after a `WAIT` too (behind a write
    /// that checks the log still holds them), so by then the batch is on the
    /// replicas. If a failover loses it, it loses its ids with it (a script
    /// replicates as one transaction), and the resend applies it once.
    /// Either way each event counts once. This process does not remember
    /// the ids of a batch short of its replicas: it learns them from the log
    /// as the primary holds it, when it next catches up.
    #[must_use]
    pub fn with_replica_wait(mut self, wait: ReplicaWait) -> Self {
        self.wait = (wait.replicas > 0).then_some(wait);
        self
    }

    /// Sends `cmd` (a call of `script`, loaded first if Redis lost it), and
    /// `WAIT` when configured: the script's reply, and the replicas that
    /// acknowledged. `WAIT` counts the replicas that have this connection's
    /// writes, so it goes in one pipeline after the script: a reconnect
    /// between the two would leave it nothing to count.
    pub(super) async fn send(
        &self,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> ConnectorResult<(Value, Option<i64>)> {
        let mut conn = self.conn.clone();
        let mut loaded = false;
        loop {
            let (reply, acked) = match self.wait {
                None => (cmd.query_async::<Value>(&mut conn).await, None),
                Some(wait) => {
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors()
                        .add_command(cmd.clone())
                        .cmd("WAIT")
                        .arg(wait.replicas)
                        .arg(wait.timeout_ms());
                    let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
                    let mut it = replies.into_iter();
                    let (Some(reply), Some(Value::Int(acked))) = (it.next(), it.next()) else {
                        return Err(corrupt("script and WAIT reply"));
                    };
                    (reply.extract_error(), Some(acked))
                }
            };
            match reply {
                Err(e)
                    if !loaded
                        && e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(&mut conn).await?;
                    loaded = true;
                }
                other => return Ok((other?, acked)),
            }
        }
    }

    /// The error of a batch the script applied but too few replicas
    /// acknowledged.
    pub(super) fn shortfall(&self, acked: Option<i64>) -> Option<ConnectorError> {
        self.wait?.shortfall(acked?)
    }

    /// Before a batch of duplicates only is acknowledged: whether the log
    /// still holds what the mirror decided from (false: catch up and decide
    /// again), and, with `WAIT`, that the replicas have it.
    pub(super) async fn confirm(&self, mirror: &Mirror) -> ConnectorResult<bool> {
        if self.wait.is_none() {
            return Ok(true);
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.confirm.get_hash())
            .arg(2)
            .arg(self.key("idlog"))
            .arg(self.key("idlog:meta"))
            .arg(&mirror.epoch)
            .arg(mirror.position);
        let (reply, acked) = self.send(&self.confirm, &cmd).await?;
        if reply != Value::Int(1) {
            return Ok(false);
        }
        match self.shortfall(acked) {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortfall_is_told_apart_and_hints_a_retry() {
        let wait = ReplicaWait {
            replicas: 2,
            timeout: Duration::from_millis(50),
        };
        assert!(wait.shortfall(2).is_none());
        let e = wait.shortfall(1).expect("one short");
        assert!(is_replica_shortfall(&e) && e.is_retryable());
        assert!(matches!(
            e,
            ConnectorError::Retryable { retry_after: Some(d), .. } if d == Duration::from_millis(100)
        ));
        assert!(!is_replica_shortfall(&ConnectorError::Retryable {
            backend: "redis",
            message: String::new(),
            retry_after: None,
        }));
        assert_eq!(
            ReplicaWait {
                replicas: 1,
                timeout: Duration::ZERO
            }
            .timeout_ms(),
            1
        );
    }
}
