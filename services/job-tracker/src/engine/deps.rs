//! Dependencies between the units of a run: checked when units are declared
//! (each names a unit of the same request, not the unit itself, no cycle,
//! bounded size), and looked up when claiming, where a unit waits until every
//! unit it names is MIGRATED.

use std::collections::HashMap;

use tidemark_kit::FieldError;

use super::{Tracker, UnitSpec, to_body};
use crate::error::TrackerResult;
use crate::limits;
use crate::model::{self, UnitStatus};

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

/// What a queue entry says its unit waits for; `None` when it says nothing
/// (no dependencies, or an entry written before entries said), and the
/// claim reads the unit.
pub(super) fn queued_after(body: &str) -> Option<Vec<String>> {
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
                }
            })
            .collect();
        check_units(&chain).unwrap();
        let e = check_units(&[spec("a", &["ghost"])]).unwrap_err();
        assert!(e.description.contains("\"ghost\""), "{}", e.description);
    }
}
