//! The digest's drill-down in bounded memory (#19.14): the differing
//! buckets are read in batches of at most [`DrillLimits::batch_entries`]
//! entries (both sides, counted by the digest walk), and at most
//! [`DrillLimits::max_kept`] mismatches are kept. A check past that many
//! mismatches fails whatever the rest holds, so the drill-down stops there
//! and says how many differing buckets it did not read, instead of loading a
//! whole table (an empty target differs in every bucket).

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use tidemark_connectors::{ConnectorResult, Key};

use crate::checks::{Found, Runner, classify};
use crate::side::Entry;

/// How much of the differing buckets one drill-down holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrillLimits {
    /// Entries (source and target together) read into memory at once.
    pub batch_entries: u64,
    /// Mismatches kept per check (for re-check, repair and
    /// StreamMismatches); the drill-down stops once it has this many.
    pub max_kept: usize,
}

impl Default for DrillLimits {
    fn default() -> Self {
        Self {
            batch_entries: 100_000,
            max_kept: 10_000,
        }
    }
}

/// What a drill-down found.
#[derive(Debug, Default)]
pub struct Drilled {
    /// The mismatches, in key order; at most `max_kept`.
    pub found: Vec<Found>,
    /// Differing buckets left unread once `max_kept` was reached, and the
    /// entries they hold (source, target).
    pub unread_buckets: usize,
    pub unread_entries: (u64, u64),
}

/// The wanted buckets in batches whose entries (source + target counts)
/// stay within `max`; a bucket over `max` on its own is a batch by itself.
pub fn batches(wanted: &BTreeSet<u32>, counts: &[(u64, u64)], max: u64) -> Vec<BTreeSet<u32>> {
    let mut out = Vec::new();
    let mut batch = BTreeSet::new();
    let mut size = 0u64;
    for &b in wanted {
        let (s, t) = counts.get(b as usize).copied().unwrap_or_default();
        let n = s + t;
        if !batch.is_empty() && size + n > max {
            out.push(std::mem::take(&mut batch));
            size = 0;
        }
        batch.insert(b);
        size += n;
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

impl Runner<'_> {
    /// The differing keys of the buckets whose digests differ, read from
    /// both sides a batch at a time and classified, in key order.
    pub(crate) async fn drill_down(
        &self,
        buckets: u32,
        wanted: &BTreeSet<u32>,
        counts: &[(u64, u64)],
        (versions, versions_only): (bool, bool),
    ) -> ConnectorResult<Drilled> {
        let source = &self.sides.source;
        let target = self.target()?;
        let limits = self.limits;
        let mut drilled = Drilled::default();
        if wanted.is_empty() {
            return Ok(drilled);
        }
        let batches = batches(wanted, counts, limits.batch_entries);
        tracing::info!(
            buckets = wanted.len(),
            batches = batches.len(),
            "drilling down into mismatching buckets"
        );
        for (i, batch) in batches.iter().enumerate() {
            if drilled.found.len() >= limits.max_kept {
                for b in batches[i..].iter().flatten() {
                    let (s, t) = counts.get(*b as usize).copied().unwrap_or_default();
                    drilled.unread_buckets += 1;
                    drilled.unread_entries.0 += s;
                    drilled.unread_entries.1 += t;
                }
                break;
            }
            let (se, te) = tokio::try_join!(
                source.bucket_entries(buckets, batch),
                target.bucket_entries(buckets, batch)
            )?;
            let room = limits.max_kept - drilled.found.len();
            let mut found = compare(se, te, versions, versions_only);
            // Which of a batch's mismatches are kept must not depend on the
            // order the stores returned them in.
            found.sort_by(|x, y| x.key.cmp(&y.key));
            found.truncate(room);
            drilled.found.append(&mut found);
        }
        // Stable order for reports and streams.
        drilled.found.sort_by(|x, y| x.key.cmp(&y.key));
        Ok(drilled)
    }
}

/// The mismatches between one batch's source and target entries.
fn compare(
    source: Vec<Entry>,
    target: Vec<Entry>,
    versions: bool,
    versions_only: bool,
) -> Vec<Found> {
    let now = SystemTime::now();
    let mut by_key: HashMap<Key, (Option<Entry>, Option<Entry>)> = HashMap::new();
    for e in source {
        let key = e.key.clone();
        by_key.entry(key).or_default().0 = Some(e);
    }
    for e in target {
        let key = e.key.clone();
        by_key.entry(key).or_default().1 = Some(e);
    }
    by_key
        .into_iter()
        .filter_map(|(key, (a, b))| {
            let kind = classify(a.as_ref(), b.as_ref(), versions, versions_only)?;
            Some(Found {
                key,
                kind,
                source_version: a.as_ref().map_or(0, |e| e.version),
                target_version: b.as_ref().map_or(0, |e| e.version),
                first_seen: now,
                rounds: 0,
                repaired: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_within_the_budget_and_keep_every_bucket_once() {
        let counts = vec![(40, 0), (30, 30), (10, 0), (500, 0), (0, 20), (5, 5)];
        let wanted: BTreeSet<u32> = (0..6).collect();
        let got = batches(&wanted, &counts, 100);
        assert_eq!(
            got,
            vec![
                BTreeSet::from([0, 1]),
                BTreeSet::from([2]),
                BTreeSet::from([3]),
                BTreeSet::from([4, 5]),
            ]
        );
        let all: Vec<u32> = got.iter().flatten().copied().collect();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
        for b in &got {
            let size: u64 = b
                .iter()
                .map(|i| counts[*i as usize].0 + counts[*i as usize].1)
                .sum();
            assert!(size <= 100 || b.len() == 1, "{b:?} holds {size}");
        }
    }

    #[test]
    fn only_wanted_buckets_are_batched() {
        let counts = vec![(1, 1); 8];
        let wanted = BTreeSet::from([1, 6]);
        assert_eq!(
            batches(&wanted, &counts, 3),
            vec![BTreeSet::from([1]), BTreeSet::from([6])]
        );
        assert_eq!(
            batches(&BTreeSet::new(), &counts, 3),
            Vec::<BTreeSet<u32>>::new()
        );
    }
}
