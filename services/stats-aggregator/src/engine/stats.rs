//! GetStats: an entity's stored values plus what is still buffered for it.

use std::collections::{BTreeMap, BTreeSet};

use tidemark_connectors::EntityDelta;
use tidemark_kit::FieldError;
use tidemark_proto::stats_aggregator::v1 as pb;

use super::Engine;
use super::flush::merged;
use crate::convert;
use crate::decimal;
use crate::error::{StatsError, StatsResult};

impl Engine {
    /// An entity's stored values and what is still buffered for it.
    ///
    /// # Errors
    /// `Invalid` for an empty key, `NotFound` when neither stored nor
    /// buffered, a backend's failure.
    pub async fn get_stats(
        &self,
        entity: &str,
        metrics: &[String],
    ) -> StatsResult<pb::GetStatsResponse> {
        if entity.is_empty() {
            return Err(FieldError::required("entity_key").into());
        }
        let (stored, pending, live) = tokio::try_join!(
            self.store.get(entity),
            self.buffer.peek_pending(entity),
            self.buffer.peek(entity),
        )?;
        // What of a pending flush is applied to the item is in its stored
        // values: all of it, or its parts up to the item's last one.
        let pending = pending.and_then(|(sequence, delta)| match stored.as_ref() {
            Some(s) if s.last_flush_sequence > sequence => None,
            Some(s) if s.last_flush_sequence == sequence => {
                let applied = usize::try_from(s.last_flush_part?).unwrap_or(usize::MAX);
                let parts = self.store.split(&delta);
                Some((sequence, merged(&delta.entity, parts.get(applied..))))
            }
            _ => Some((sequence, delta)),
        });
        let live_empty = live.increments.is_empty() && live.replaces.is_empty();
        if stored.is_none() && pending.is_none() && live_empty {
            return Err(StatsError::NotFound(format!(
                "entity {entity:?} is neither stored nor buffered"
            )));
        }
        let mut buffered: BTreeMap<String, Buffered> = BTreeMap::new();
        if let Some((_, delta)) = &pending {
            fold(&mut buffered, delta);
        }
        fold(&mut buffered, &live);
        let stored_values = stored
            .as_ref()
            .map(|s| s.metrics(&self.settings.key_attribute))
            .unwrap_or_default();
        let wanted: BTreeSet<&str> = metrics.iter().map(String::as_str).collect();
        let names: BTreeSet<&str> = stored_values
            .keys()
            .chain(buffered.keys())
            .map(String::as_str)
            .filter(|m| wanted.is_empty() || wanted.contains(m))
            .collect();
        let mut out = BTreeMap::new();
        for name in names {
            let stored_value = stored_values.get(name).cloned().unwrap_or_default();
            let b = buffered.get(name).cloned().unwrap_or_default();
            let base = b
                .replace
                .clone()
                .or_else(|| (!stored_value.is_empty()).then(|| stored_value.clone()))
                .unwrap_or_else(|| "0".to_owned());
            let effective = decimal::add(&base, b.delta).map_err(|e| {
                StatsError::Backend(tidemark_connectors::ConnectorError::terminal("stats", e))
            })?;
            out.insert(
                name.to_owned(),
                pb::MetricValue {
                    stored_value,
                    pending_delta: i64::try_from(b.delta).unwrap_or(if b.delta < 0 {
                        i64::MIN
                    } else {
                        i64::MAX
                    }),
                    pending_replace: b.replace,
                    effective_value: effective,
                },
            );
        }
        let last_event = [
            stored.as_ref().and_then(|s| s.last_event_micros),
            pending.as_ref().and_then(|(_, d)| d.last_event_micros),
            live.last_event_micros,
        ]
        .into_iter()
        .flatten()
        .max();
        Ok(pb::GetStatsResponse {
            entity_key: entity.to_owned(),
            metrics: out.into_iter().collect(),
            version: stored.as_ref().map_or(0, |s| s.version),
            last_flush_sequence: stored.as_ref().map_or(0, |s| s.last_flush_sequence),
            last_event_time: last_event.map(convert::timestamp_micros),
        })
    }
}

/// A metric's buffered change: a replacement (or none) and the increments
/// after it.
#[derive(Clone, Debug, Default)]
struct Buffered {
    replace: Option<String>,
    delta: i128,
}

/// Folds a later delta onto earlier buffered changes.
fn fold(into: &mut BTreeMap<String, Buffered>, delta: &EntityDelta) {
    for (metric, value) in &delta.replaces {
        into.insert(
            metric.clone(),
            Buffered {
                replace: Some(value.clone()),
                delta: i128::from(delta.increments.get(metric).copied().unwrap_or(0)),
            },
        );
    }
    for (metric, n) in &delta.increments {
        if !delta.replaces.contains_key(metric) {
            into.entry(metric.clone()).or_default().delta += i128::from(*n);
        }
    }
}
