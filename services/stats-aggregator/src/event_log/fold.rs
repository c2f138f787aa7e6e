//! A batch's fresh events folded per entity and metric for the script.

use std::collections::HashMap;

use tidemark_connectors::{BufferEvent, BufferOp};

/// One metric's change in a batch, folded in order.
#[derive(Default)]
pub(super) struct Change<'a> {
    pub(super) replace: Option<&'a str>,
    /// Sum of the increments after the last replace (of all of them when
    /// there is none).
    pub(super) increment: i128,
}

/// The fresh events of a batch folded for the script.
pub(super) struct Folded<'a> {
    /// Entities in order of first appearance, with their latest event time.
    pub(super) entities: Vec<(&'a str, i64)>,
    /// (entity slot, metric) → change, in order of first appearance.
    pub(super) changes: Vec<(usize, &'a str, Change<'a>)>,
    pub(super) fresh: usize,
}

pub(super) fn fold<'a>(events: &'a [BufferEvent], dups: &[usize]) -> Folded<'a> {
    let mut entities: Vec<(&str, i64)> = Vec::new();
    let mut entity_slot: HashMap<&str, usize> = HashMap::new();
    let mut changes: Vec<(usize, &str, Change<'_>)> = Vec::new();
    let mut change_slot: HashMap<(usize, &str), usize> = HashMap::new();
    let mut dups = dups.iter().peekable();
    let mut fresh = 0;
    for (i, event) in events.iter().enumerate() {
        if dups.next_if_eq(&&i).is_some() {
            continue;
        }
        fresh += 1;
        let (entity, metric) = match &event.op {
            BufferOp::Increment { entity, metric, .. }
            | BufferOp::Replace { entity, metric, .. } => (entity.as_str(), metric.as_str()),
        };
        let e = *entity_slot.entry(entity).or_insert_with(|| {
            entities.push((entity, event.time_micros));
            entities.len() - 1
        });
        entities[e].1 = entities[e].1.max(event.time_micros);
        let c = *change_slot.entry((e, metric)).or_insert_with(|| {
            changes.push((e, metric, Change::default()));
            changes.len() - 1
        });
        let change = &mut changes[c].2;
        match &event.op {
            BufferOp::Increment { delta, .. } => change.increment += i128::from(*delta),
            BufferOp::Replace { value, .. } => {
                change.replace = Some(value);
                change.increment = 0;
            }
        }
    }
    Folded {
        entities,
        changes,
        fresh,
    }
}

/// Splits a folded sum into HINCRBY arguments within i64, all of one sign
/// (so, applied in turn, none overflows unless the total does).
pub(super) fn increments(mut sum: i128) -> Vec<i64> {
    let mut out = Vec::new();
    loop {
        let part = i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX });
        out.push(part);
        sum -= i128::from(part);
        if sum == 0 {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_sums_split_within_i64_of_one_sign() {
        assert_eq!(increments(5), [5]);
        assert_eq!(increments(0), [0]);
        let big = i128::from(i64::MAX) * 2 + 3;
        let parts = increments(big);
        assert_eq!(parts.iter().map(|p| i128::from(*p)).sum::<i128>(), big);
        assert!(parts.iter().all(|p| *p > 0));
        let parts = increments(i128::from(i64::MIN) - 1);
        assert_eq!(parts, [i64::MIN, -1]);
    }

    #[test]
    fn a_batch_folds_per_entity_metric_skipping_duplicates() {
        let ev = |id: &str, op: BufferOp, t| BufferEvent {
            id: id.into(),
            op,
            time_micros: t,
        };
        let inc = |e: &str, m: &str, d| BufferOp::Increment {
            entity: e.into(),
            metric: m.into(),
            delta: d,
        };
        let rep = |e: &str, m: &str, v: &str| BufferOp::Replace {
            entity: e.into(),
            metric: m.into(),
            value: v.into(),
        };
        let events = [
            ev("1", inc("a", "n", 2), 5),
            ev("2", inc("a", "n", 3), 9),
            ev("3", rep("b", "n", "7"), 1),
            ev("4", inc("b", "n", 1), 2),
            ev("5", inc("a", "n", 100), 50),
            ev("6", inc("c", "n", 4), 3),
            ev("7", rep("c", "n", "9"), 4),
        ];
        let f = fold(&events, &[4]);
        assert_eq!(f.fresh, 6);
        assert_eq!(f.entities, [("a", 9), ("b", 2), ("c", 4)]);
        let got: Vec<_> = f
            .changes
            .iter()
            .map(|(e, m, c)| (*e, *m, c.replace, c.increment))
            .collect();
        assert_eq!(
            got,
            [
                (0, "n", None, 5),
                (1, "n", Some("7"), 1),
                (2, "n", Some("9"), 0)
            ]
        );
    }
}
