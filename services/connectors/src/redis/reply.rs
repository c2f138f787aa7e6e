//! Decoding the replies of the buffer's scripts and commands.

use redis::Value;

use super::BACKEND;
use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::EntityDelta;

pub(super) fn corrupt(what: &str) -> ConnectorError {
    ConnectorError::terminal(BACKEND, format!("corrupt buffer: {what}"))
}

pub(super) fn text(value: Value) -> ConnectorResult<String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| corrupt(&format!("non-UTF-8 text: {e}")))
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(corrupt(&format!("expected text, got {other:?}"))),
    }
}

pub(super) fn array(value: Value) -> ConnectorResult<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(&format!("expected an array, got {other:?}"))),
    }
}

/// Builds an entity's delta from a flat `field, value, ...` hash reply.
pub(super) fn delta_from_fields(
    entity: String,
    fields: Vec<Value>,
) -> ConnectorResult<EntityDelta> {
    let mut delta = EntityDelta {
        entity,
        ..EntityDelta::default()
    };
    let mut it = fields.into_iter();
    while let (Some(field), Some(value)) = (it.next(), it.next()) {
        let (field, value) = (text(field)?, text(value)?);
        if field == "t" {
            let micros = value
                .parse()
                .map_err(|_| corrupt(&format!("event time {value:?}")))?;
            delta.last_event_micros = Some(micros);
        } else if let Some(metric) = field.strip_prefix("i:") {
            let n = value
                .parse()
                .map_err(|_| corrupt(&format!("increment {field}={value:?}")))?;
            delta.increments.insert(metric.to_owned(), n);
        } else if let Some(metric) = field.strip_prefix("r:") {
            delta.replaces.insert(metric.to_owned(), value);
        } else {
            return Err(corrupt(&format!("unknown field {field:?}")));
        }
    }
    Ok(delta)
}

/// An event time score (ZSCORE: integral microseconds, exact in a double),
/// or `None` for an empty reply.
pub(super) fn event_time(value: Value) -> ConnectorResult<Option<i64>> {
    let s = match value {
        Value::Nil => return Ok(None),
        Value::Double(d) => return Ok(Some(micros_of(d))),
        other => text(other)?,
    };
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<f64>()
        .map(|d| Some(micros_of(d)))
        .map_err(|_| corrupt(&format!("event time {s:?}")))
}

#[allow(clippy::cast_possible_truncation)]
fn micros_of(score: f64) -> i64 {
    // Scores are integral microseconds below 2^53: the cast is exact.
    score as i64
}

/// Decodes `{entity, {field, value, ...}, time, ...}` into deltas sorted by
/// entity.
pub(super) fn flush_content(value: Value) -> ConnectorResult<Vec<EntityDelta>> {
    let mut it = array(value)?.into_iter();
    let mut out = Vec::new();
    while let Some(entity) = it.next() {
        let (Some(fields), Some(time)) = (it.next(), it.next()) else {
            return Err(corrupt("flush content without fields"));
        };
        let mut delta = delta_from_fields(text(entity)?, array(fields)?)?;
        delta.last_event_micros = event_time(time)?;
        out.push(delta);
    }
    out.sort_by(|a, b| a.entity.cmp(&b.entity));
    Ok(out)
}

pub(super) fn parse_sequence(s: &str) -> ConnectorResult<u64> {
    s.parse()
        .map_err(|_| corrupt(&format!("flush sequence {s:?}")))
}
