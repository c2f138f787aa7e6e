//! Dependencies between the units of a run: checked when units are declared
//! (each names a unit of the same request, not the unit itself, no cycle,
//! bounded size), and looked up when claiming, where a unit waits until every
//! unit it names is MIGRATED.

use std::collections::HashMap;

use tidemark_kit::FieldError;

use serde::{Deserialize, Serialize};

use super::{Tracker, UnitSpec, to_body};
use crate::error::TrackerResult;
use crate::limits;
use crate::model::{self, Unit, UnitStatus};

/// Checks the units a StartRun or AddUnits declares, before anything is
/// written: their keys, and dependencies on units of the same request that
/// form no cycle (`units[i].after_unit_keys` names the culprit).
///
/// # Errors
/// The first violation, naming its field.
pub(super) fn check_units(units: &[UnitSpec]) -> Result<(), FieldError> {
    let index: HashMap<&str, usize> = units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.unit_key.as_str(), i))
        .collect();
    for (i, unit) in units.iter().enumerate() {
        model::valid_unit_key(&unit.unit_key)
            .map_err(|e| FieldError::new(format!("units[{i}].unit_key"), e))?;
        // The index keeps a key's last position: an earlier one is a repeat
        // (two registrations of one unit in one write would never commit).
        if index.get(unit.unit_key.as_str()) != Some(&i) {
            return Err(FieldError::new(
                format!("units[{i}].unit_key"),
                format!(
                    "unit {:?} appears more than once in this request; give each unit once",
                    unit.unit_key
                ),
            ));
        }
        let field = format!("units[{i}].after_unit_keys");
        limits::check_dependencies(&unit.after_unit_keys, &field)?;
        for dep in &unit.after_unit_keys {
            if *dep == unit.unit_key {
                return Err(FieldError::new(
                    field,
                    format!("unit {dep:?} cannot wait for itself"),
                ));
            }
            if !index.contains_key(dep.as_str()) {
                return Err(FieldError::new(
                    field,
                    format!("{dep:?} is not a unit of this run"),
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(units, &index) {
        let path: Vec<String> = cycle
            .iter()
            .chain(cycle.first())
            .map(|&i| format!("{:?}", units[i].unit_key))
            .collect();
        return Err(FieldError::new(
            format!("units[{}].after_unit_keys", cycle[0]),
            format!(
                "units {} wait for each other in a cycle: {}",
                path.len() - 1,
                path.join(" after ")
            ),
        ));
    }
    Ok(())
}

/// A cycle of "waits for" edges, as indexes into `units`, if there is one.
/// Depth-first, without recursion: a run may declare a long chain.
fn find_cycle(units: &[UnitSpec], index: &HashMap<&str, usize>) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; units.len()];
    for root in 0..units.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // Each unit on the path with the index of its next dependency.
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&(unit, next)) = path.last() {
            let Some(dep) = units[unit].after_unit_keys.get(next) else {
                mark[unit] = Mark::Done;
                path.pop();
                continue;
            };
            if let Some(top) = path.last_mut() {
                top.1 += 1;
            }
            let Some(&d) = index.get(dep.as_str()) else {
                continue;
            };
            match mark[d] {
                Mark::New => {
                    mark[d] = Mark::OnPath;
                    path.push((d, 0));
                }
                Mark::OnPath => {
                    let start = path.iter().position(|&(u, _)| u == d).unwrap_or(0);
                    return Some(path[start..].iter().map(|&(u, _)| u).collect());
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// The body of a unit's queue entry: the units it waits for, so a claim can
/// pass a blocked entry without reading its unit. Empty when none.
pub(super) fn queue_body(after: &[String]) -> TrackerResult<String> {
    if after.is_empty() {
        Ok(String::new())
    } else {
        to_body(&after)
    }
}

/// Queue entries carry a copy of their unit up to this size; a larger unit
/// (a retried one with a big checkpoint) is read by the claim instead.
const QUEUED_COPY_BYTES: usize = 4 * 1024;

/// A queue entry with a copy of its unit (#16.5); the unit names what it
/// waits for.
#[derive(Serialize)]
struct QueuedCopy<'a> {
    rev: u64,
    unit: &'a Unit,
}

#[derive(Deserialize)]
struct QueuedCopyOwned {
    rev: u64,
    unit: Unit,
}

/// The body of the queue entry of `unit`, written in the same transaction
/// as `unit` at revision `rev`: what it waits for and, when small, a copy
/// of it, so a claim writes it conditional on `rev` instead of reading it.
pub(super) fn queue_body_with(unit: &Unit, rev: u64) -> TrackerResult<String> {
    let body = to_body(&QueuedCopy { rev, unit })?;
    if body.len() <= QUEUED_COPY_BYTES {
        Ok(body)
    } else {
        queue_body(&unit.after_unit_keys)
    }
}

/// What a queue entry says: the units its unit waits for (`None` when it
/// says nothing: no dependencies, or an entry written before entries said),
/// and the copy of the unit with its revision, when it has one.
pub(super) struct Queued {
    pub after: Option<Vec<String>>,
    pub unit: Option<(Unit, u64)>,
}

pub(super) fn queued(body: &str) -> Queued {
    if body.starts_with('{') {
        if let Ok(q) = serde_json::from_str::<QueuedCopyOwned>(body) {
            return Queued {
                after: (!q.unit.after_unit_keys.is_empty()).then(|| q.unit.after_unit_keys.clone()),
                unit: Some((q.unit, q.rev)),
            };
        }
        return Queued {
            after: None,
            unit: None,
        };
    }
    Queued {
        after: queued_after(body),
        unit: None,
    }
}

/// What a queue entry without a copy of its unit says its unit waits for;
/// `None` when it says nothing (no dependencies, or an entry written before
/// entries said), and the claim reads the unit.
fn queued_after(body: &str) -> Option<Vec<String>> {
    if body.is_empty() {
        None
    } else {
        serde_json::from_str(body).ok()
    }
}

/// Which units one claim found MIGRATED or not yet. MIGRATED is final; "not
/// yet" may change, so the memo lives for one pass over the queue only.
#[derive(Default)]
pub(super) struct Migrated(HashMap<String, bool>);

impl Tracker {
    /// Whether every unit in `keys` is MIGRATED, reading each at most once
    /// per pass.
    pub(super) async fn all_migrated(
        &self,
        run_id: &str,
        keys: &[String],
        seen: &mut Migrated,
    ) -> TrackerResult<bool> {
        for key in keys {
            let done = if let Some(&done) = seen.0.get(key) {
                done
            } else {
                let (unit, _) = self.load_unit(run_id, key).await?;
                let done = unit.status == UnitStatus::Migrated;
                seen.0.insert(key.clone(), done);
                done
            };
            if !done {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str, after: &[&str]) -> UnitSpec {
        UnitSpec {
            unit_key: key.to_owned(),
            after_unit_keys: after.iter().map(|k| (*k).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn cycles_are_found_and_named() {
        let e =
            check_units(&[spec("a", &["c"]), spec("b", &["a"]), spec("c", &["b"])]).unwrap_err();
        assert_eq!(e.field, "units[0].after_unit_keys");
        assert_eq!(
            e.description,
            r#"units 3 wait for each other in a cycle: "a" after "c" after "b" after "a""#
        );
        let e = check_units(&[spec("x", &[]), spec("y", &["y"])]).unwrap_err();
        assert_eq!(e.field, "units[1].after_unit_keys");
        let e =
            check_units(&[spec("p", &[]), spec("q", &["r"]), spec("r", &["p", "q"])]).unwrap_err();
        assert_eq!(e.field, "units[1].after_unit_keys", "{}", e.description);
    }

    #[test]
    fn queue_entries_say_what_their_unit_waits_for_and_may_copy_it() {
        // Entries written before copies: empty, or the units waited for.
        assert!(queued("").after.is_none() && queued("").unit.is_none());
        let old = queued(r#"["a","b"]"#);
        assert_eq!(old.after, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert!(old.unit.is_none());
        let now = chrono::Utc::now();
        let mut unit = Unit {
            run_id: "r".to_owned(),
            job_name: "j".to_owned(),
            unit_key: "k".to_owned(),
            status: UnitStatus::NotMigrated,
            checkpoint: b"resume here".to_vec(),
            progress: model::Progress::default(),
            last_error: String::new(),
            attempts: 1,
            fencing_token: 1,
            lease: None,
            after_unit_keys: vec!["a".to_owned()],
            result: None,
            create_time: now,
            update_time: now,
            retry_time: None,
        };
        let copied = queued(&queue_body_with(&unit, 7).unwrap());
        assert_eq!(copied.after, Some(vec!["a".to_owned()]));
        assert_eq!(copied.unit, Some((unit.clone(), 7)));
        // A unit too large to copy: the entry says only what it waits for.
        unit.checkpoint = vec![7; QUEUED_COPY_BYTES];
        let large = queued(&queue_body_with(&unit, 8).unwrap());
        assert_eq!(large.after, Some(vec!["a".to_owned()]));
        assert!(large.unit.is_none());
    }

    #[test]
    fn chains_and_diamonds_are_fine() {
        check_units(&[
            spec("a", &[]),
            spec("b", &["a"]),
            spec("c", &["a"]),
            spec("d", &["b", "c"]),
        ])
        .unwrap();
        let chain: Vec<UnitSpec> = (0..10_000)
            .map(|i| {
                let after = if i == 0 {
                    vec![]
                } else {
                    vec![format!("u{}", i - 1)]
                };
                UnitSpec {
                    unit_key: format!("u{i}"),
                    after_unit_keys: after,
                    ..Default::default()
                }
            })
            .collect();
        check_units(&chain).unwrap();
        let e = check_units(&[spec("a", &["ghost"])]).unwrap_err();
        assert!(e.description.contains("\"ghost\""), "{}", e.description);
    }
}
