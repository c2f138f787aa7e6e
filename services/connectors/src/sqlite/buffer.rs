//! The aggregation buffer in the embedded store, as a [`Buffer`].

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::EmbeddedStore;
use crate::error::{ConnectorError, ConnectorResult};
use crate::now_micros;
use crate::traits::{Buffer, BufferEvent, BufferOp, BufferStats, EntityDelta};

/// The aggregation buffer in the embedded store. Live rows have flush 0; a
/// flush moves them to its sequence in one statement, so an event arriving
/// meanwhile lands in flush 0 and belongs to the next flush. Besides the
/// `inc` and `set` rows of its metrics, an entity has a `time` row (latest
/// event time) and an `events` row (events applied) under the metric `''`.
#[derive(Clone)]
pub struct EmbeddedBuffer {
    store: EmbeddedStore,
    name: String,
}

impl EmbeddedStore {
    pub fn buffer(&self, name: &str) -> EmbeddedBuffer {
        EmbeddedBuffer {
            store: self.clone(),
            name: name.to_owned(),
        }
    }
}

/// Forgets the event ids whose dedup window has passed. Run by every flush
/// through the index on expiry: scanning every id of the window cost
/// 150 ms a flush at 2M ids, holding the connection from every ingest
/// meanwhile, and grows with the window times the event rate.
const EXPIRE_DEDUP: &str = "DELETE FROM tm_buffer_dedup WHERE buf = ?1 AND expires_micros <= ?2";

fn read_deltas(
    conn: &Connection,
    buf: &str,
    flush: i64,
    entity: Option<&str>,
) -> ConnectorResult<Vec<EntityDelta>> {
    let mut stmt = conn.prepare_cached(
        "SELECT entity, metric, kind, value FROM tm_buffer WHERE buf = ?1 AND flush = ?2
         AND (?3 IS NULL OR entity = ?3) ORDER BY entity, metric, kind",
    )?;
    let mut rows = stmt.query(params![buf, flush, entity])?;
    let mut out: Vec<EntityDelta> = Vec::new();
    while let Some(row) = rows.next()? {
        let (e, metric, kind, value): (String, String, String, String) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        if out.last().is_none_or(|d| d.entity != e) {
            out.push(EntityDelta {
                entity: e,
                ..EntityDelta::default()
            });
        }
        let delta = out.last_mut().expect("pushed above");
        if kind == "events" {
            continue;
        }
        if kind == "time" {
            delta.last_event_micros = value.parse().ok();
        } else if kind == "inc" {
            let n = value.parse().map_err(|_| {
                ConnectorError::terminal("sqlite", format!("corrupt increment {value:?}"))
            })?;
            delta.increments.insert(metric, n);
        } else {
            delta.replaces.insert(metric, value);
        }
    }
    Ok(out)
}

fn pending(conn: &Connection, buf: &str) -> ConnectorResult<Option<i64>> {
    Ok(conn.query_row(
        "SELECT MIN(flush) FROM tm_buffer WHERE buf = ?1 AND flush <> 0",
        params![buf],
        |r| r.get::<_, Option<i64>>(0),
    )?)
}

fn last_acked(conn: &Connection, buf: &str) -> ConnectorResult<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT acked FROM tm_buffer_acked WHERE buf = ?1",
            params![buf],
            |r| r.get::<_, i64>(0),
        )
        .optional()?)
}

/// Adds `delta` to a live counter row, refusing an `i64` overflow (SQLite
/// would silently turn the sum into a float).
fn add_to_row(
    tx: &Connection,
    buf: &str,
    entity: &str,
    metric: &str,
    kind: &str,
    delta: i64,
) -> ConnectorResult<()> {
    let current: Option<String> = tx
        .query_row(
            "SELECT value FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = ?4",
            params![buf, entity, metric, kind],
            |r| r.get(0),
        )
        .optional()?;
    let current: i64 = match current {
        Some(v) => v
            .parse()
            .map_err(|_| ConnectorError::terminal("sqlite", format!("corrupt increment {v:?}")))?,
        None => 0,
    };
    let sum = current.checked_add(delta).ok_or_else(|| {
        ConnectorError::invalid(
            "sqlite",
            format!("increments of {entity}/{metric} overflow i64"),
        )
    })?;
    tx.execute(
        "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, ?4, ?5)
         ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
        params![buf, entity, metric, kind, sum.to_string()],
    )?;
    Ok(())
}

fn apply_event(tx: &Connection, buf: &str, event: &BufferEvent) -> ConnectorResult<()> {
    let entity = event.op.entity();
    match &event.op {
        BufferOp::Increment { metric, delta, .. } => {
            add_to_row(tx, buf, entity, metric, "inc", *delta)?;
        }
        BufferOp::Replace { metric, value, .. } => {
            tx.execute(
                "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = 'inc'",
                params![buf, entity, metric],
            )?;
            tx.execute(
                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'set', ?4)
                 ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
                params![buf, entity, metric, value],
            )?;
        }
    }
    add_to_row(tx, buf, entity, "", "events", 1)?;
    tx.execute(
        "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, '', 'time', ?3)
         ON CONFLICT (buf, flush, entity, metric, kind)
         DO UPDATE SET value = CAST(MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
        params![buf, entity, event.time_micros.to_string()],
    )?;
    Ok(())
}

#[async_trait]
impl Buffer for EmbeddedBuffer {
    async fn apply(&self, ops: &[BufferOp]) -> ConnectorResult<()> {
        let buf = self.name.clone();
        let ops = ops.to_vec();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                for op in &ops {
                    match op {
                        BufferOp::Increment { entity, metric, delta } => {
                            tx.execute(
                                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'inc', ?4)
                                 ON CONFLICT (buf, flush, entity, metric, kind)
                                 DO UPDATE SET value = CAST(CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
                                params![buf, entity, metric, delta.to_string()],
                            )?;
                        }
                        BufferOp::Replace { entity, metric, value } => {
                            // A replace resets the metric: earlier increments are void.
                            tx.execute(
                                "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = 'inc'",
                                params![buf, entity, metric],
                            )?;
                            tx.execute(
                                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'set', ?4)
                                 ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
                                params![buf, entity, metric, value],
                            )?;
                        }
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn take_for_flush(&self, sequence: u64) -> ConnectorResult<Vec<EntityDelta>> {
        let seq = i64::try_from(sequence)
            .map_err(|_| ConnectorError::invalid("sqlite", "flush sequence exceeds i64"))?;
        if seq <= 0 {
            return Err(ConnectorError::invalid(
                "sqlite",
                "flush sequence must be positive",
            ));
        }
        let buf = self.name.clone();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                match pending(&tx, &buf)? {
                    Some(p) if p == seq => return read_deltas(&tx, &buf, seq, None),
                    Some(p) => {
                        return Err(ConnectorError::Precondition(format!(
                            "flush {p} is still pending; complete and acknowledge it before flush {seq}"
                        )));
                    }
                    None => {}
                }
                // The store would skip a flush at or below the last
                // acknowledged one as already applied: refused, not lost.
                if let Some(acked) = last_acked(&tx, &buf)?
                    && acked >= seq
                {
                    return Err(ConnectorError::Precondition(format!(
                        "flush {seq} is not after the last acknowledged flush {acked}"
                    )));
                }
                tx.execute(EXPIRE_DEDUP, params![buf, now_micros()])?;
                tx.execute("UPDATE tm_buffer SET flush = ?2 WHERE buf = ?1 AND flush = 0", params![buf, seq])?;
                let out = read_deltas(&tx, &buf, seq, None)?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    async fn ack_flush(&self, sequence: u64) -> ConnectorResult<()> {
        let seq = i64::try_from(sequence)
            .map_err(|_| ConnectorError::invalid("sqlite", "flush sequence exceeds i64"))?;
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let tx = conn.transaction()?;
                // Acknowledging a flush that is not the pending one does
                // nothing (a repeated ack is harmless).
                if pending(&tx, &buf)? == Some(seq) {
                    tx.execute(
                        "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = ?2",
                        params![buf, seq],
                    )?;
                    tx.execute(
                        "INSERT INTO tm_buffer_acked (buf, acked) VALUES (?1, ?2)
                         ON CONFLICT (buf) DO UPDATE SET acked = MAX(acked, excluded.acked)",
                        params![buf, seq],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn pending_flush(&self) -> ConnectorResult<Option<(u64, Vec<EntityDelta>)>> {
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| match pending(conn, &buf)? {
                Some(seq) => Ok(Some((
                    u64::try_from(seq).unwrap_or(0),
                    read_deltas(conn, &buf, seq, None)?,
                ))),
                None => Ok(None),
            })
            .await
    }

    async fn peek(&self, entity: &str) -> ConnectorResult<EntityDelta> {
        let buf = self.name.clone();
        let entity = entity.to_owned();
        self.store
            .conn
            .run(move |conn| {
                Ok(read_deltas(conn, &buf, 0, Some(&entity))?
                    .pop()
                    .unwrap_or(EntityDelta {
                        entity,
                        ..EntityDelta::default()
                    }))
            })
            .await
    }

    async fn dirty_count(&self) -> ConnectorResult<u64> {
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let n: i64 = conn.query_row(
                    "SELECT COUNT(DISTINCT entity) FROM tm_buffer WHERE buf = ?1 AND flush = 0",
                    params![buf],
                    |r| r.get(0),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn apply_events(
        &self,
        events: &[BufferEvent],
        dedup_window: Duration,
    ) -> ConnectorResult<Vec<usize>> {
        let buf = self.name.clone();
        let events = events.to_vec();
        let window = i64::try_from(dedup_window.as_micros()).unwrap_or(i64::MAX);
        self.store
            .conn.run(move |conn| {
                let now = now_micros();
                let tx = conn.transaction()?;
                let mut dups = Vec::new();
                for (position, event) in events.iter().enumerate() {
                    let expires: Option<i64> = tx
                        .query_row(
                            "SELECT expires_micros FROM tm_buffer_dedup WHERE buf = ?1 AND id = ?2",
                            params![buf, event.id],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if expires.is_some_and(|e| e > now) {
                        dups.push(position);
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO tm_buffer_dedup (buf, id, expires_micros) VALUES (?1, ?2, ?3)
                         ON CONFLICT (buf, id) DO UPDATE SET expires_micros = excluded.expires_micros",
                        params![buf, event.id, now.saturating_add(window)],
                    )?;
                    apply_event(&tx, &buf, event)?;
                }
                tx.commit()?;
                Ok(dups)
            })
            .await
    }

    async fn peek_pending(&self, entity: &str) -> ConnectorResult<Option<(u64, EntityDelta)>> {
        let buf = self.name.clone();
        let entity = entity.to_owned();
        self.store
            .conn
            .run(move |conn| {
                let Some(seq) = pending(conn, &buf)? else {
                    return Ok(None);
                };
                Ok(read_deltas(conn, &buf, seq, Some(&entity))?
                    .pop()
                    .map(|d| (u64::try_from(seq).unwrap_or(0), d)))
            })
            .await
    }

    async fn stats(&self) -> ConnectorResult<BufferStats> {
        let buf = self.name.clone();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                let pending_flush = pending(&tx, &buf)?;
                let (dirty, events): (i64, i64) = tx.query_row(
                    "SELECT COUNT(DISTINCT flush || ':' || entity),
                            COALESCE(SUM(CASE WHEN kind = 'events' THEN CAST(value AS INTEGER) END), 0)
                     FROM tm_buffer WHERE buf = ?1 AND (flush = 0 OR flush = ?2)",
                    params![buf, pending_flush.unwrap_or(0)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let acked = last_acked(&tx, &buf)?;
                Ok(BufferStats {
                    dirty_keys: u64::try_from(dirty).unwrap_or(0),
                    pending_events: u64::try_from(events).unwrap_or(0),
                    pending_flush: pending_flush.and_then(|p| u64::try_from(p).ok()),
                    last_acked: acked.and_then(|a| u64::try_from(a).ok()),
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_event_ids_reads_only_the_expired_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("buffer.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {EXPIRE_DEDUP}"))
            .unwrap()
            .query_map(params!["b", 0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("tm_buffer_dedup_expiry")
                    && step.contains("expires_micros<?")),
            "the delete must seek the expiry index, not scan every id: {plan:?}"
        );
    }
}
