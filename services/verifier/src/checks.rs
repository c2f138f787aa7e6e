//! Running the checks: counts, predicates and digests with drill-down, then
//! re-checks of every mismatch after the replication lag has passed, then
//! an optional repair through the replicator.
//!
//! Versions. A sink records the version of what it holds. The source's
//! version is its `version_attribute` when the spec names one; otherwise it
//! is unknown, and the rule is: the source item is taken to be at the
//! version the target recorded (what the replicator derived from the change
//! feed), so both sides are digested without versions and compared by
//! content. An absent target item is MISSING_IN_TARGET, an absent source item
//! EXTRA_IN_TARGET; with both versions known a lower target version is
//! STALE_VERSION; anything else that differs (content at equal versions, a
//! target ahead of its source, or content when the source version is
//! unknown) is DIFFERENT_CONTENT.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tidemark_connectors::proto::key_to_proto;
use tidemark_connectors::{AttrValue, ConnectorResult, Key};
use tidemark_proto::replicator::v1 as rpb;
use tidemark_proto::verifier::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::drill::{DrillLimits, Drilled};
use crate::replicator::Replicator;
use crate::side::{Consumer, Entry, Side, Sides};
use crate::spec::{Check, CheckKind, SideKind, Spec};

/// Point reads in flight during a re-check round.
const READS_IN_FLIGHT: usize = 16;
/// Keys per Repair call (the replicator's limit).
const REPAIR_BATCH: usize = 1000;
/// The longest a round waits for the pipeline's lag to pass.
const MAX_LAG_WAIT: Duration = Duration::from_secs(600);

/// A mismatch being followed through the rounds.
#[derive(Clone, Debug)]
pub struct Found {
    /// The key in the target's form.
    pub key: Key,
    pub kind: pb::MismatchKind,
    pub source_version: u64,
    pub target_version: u64,
    pub first_seen: SystemTime,
    pub rounds: u32,
    pub repaired: bool,
}

/// The outcome of one check: its result and every mismatch (beyond the
/// sample), remaining ones first, then repaired ones.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub result: pb::CheckResult,
    pub mismatches: Vec<pb::Mismatch>,
    pub rounds: u32,
}

/// Why a `versions_only` digest cannot run on a pair of sides.
pub const VERSIONS_ONLY_NEEDS_VERSIONS: &str = "versions_only compares versions, and one side has none: name the version_attribute of both sides, or compare contents (versions_only = false)";

/// A digest's verdict: it passes only when the digests agreed, or when the
/// drill-down named the differing keys and every one of them was resolved
/// (on re-check or by repair). Buckets that differ while the drill-down names
/// no key prove nothing either way, so they fail.
pub fn digest_verdict(differing_buckets: usize, found_any: bool, remaining: usize) -> pb::Verdict {
    if remaining > 0 || (differing_buckets > 0 && !found_any) {
        pb::Verdict::Fail
    } else {
        pb::Verdict::Pass
    }
}

/// How two entries of one key differ, or `None` when they agree.
pub fn classify(
    source: Option<&Entry>,
    target: Option<&Entry>,
    versions: bool,
    versions_only: bool,
) -> Option<pb::MismatchKind> {
    use pb::MismatchKind as K;
    match (source, target) {
        (None, None) => None,
        (Some(_), None) => Some(K::MissingInTarget),
        (None, Some(_)) => Some(K::ExtraInTarget),
        (Some(s), Some(t)) => {
            if versions && s.version != t.version {
                Some(if t.version < s.version {
                    K::StaleVersion
                } else {
                    K::DifferentContent
                })
            } else if !versions_only && s.item != t.item {
                Some(K::DifferentContent)
            } else {
                None
            }
        }
    }
}

/// One walk of a digest check: the buckets that differ, the entries seen
/// on each side, and what the drill-down found in those buckets.
struct DigestRound {
    wanted: BTreeSet<u32>,
    source_count: i64,
    target_count: i64,
    drilled: Drilled,
}

/// Feeds serialised bytes straight into the hash, without a string.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Per-bucket count and XOR of entry hashes: order-independent, so
/// segments and pages may arrive in any order.
struct Digests {
    buckets: Mutex<Vec<(u64, [u8; 32])>>,
    entries: AtomicU64,
}

impl Digests {
    fn new(buckets: u32) -> Arc<Self> {
        Arc::new(Self {
            buckets: Mutex::new(vec![(0, [0; 32]); buckets as usize]),
            entries: AtomicU64::new(0),
        })
    }

    /// A consumer folding entries in; hashing happens outside the lock.
    fn consumer(
        self: &Arc<Self>,
        versions: bool,
        versions_only: bool,
        progress: Option<Arc<AtomicI64>>,
    ) -> Consumer {
        let this = self.clone();
        Arc::new(move |batch: Vec<Entry>| {
            let n = this.buckets.lock().expect("digest lock").len() as u64;
            let hashed: Vec<(usize, [u8; 32])> = batch
                .iter()
                .map(|e| {
                    // One pass over the key serves the bucket (the same
                    // `key_hash` the stores' drill-down uses) and the digest.
                    let mut h = Sha256::new();
                    serde_json::to_writer(HashWriter(&mut h), &e.key.0)
                        .expect("attribute values always serialise");
                    let key_digest = h.clone().finalize();
                    let key_hash = u64::from_be_bytes(key_digest[..8].try_into().expect("8 bytes"));
                    h.update(if versions { e.version } else { 0 }.to_be_bytes());
                    if !versions_only {
                        serde_json::to_writer(HashWriter(&mut h), &e.item)
                            .expect("attribute values always serialise");
                    }
                    ((key_hash % n) as usize, h.finalize().into())
                })
                .collect();
            let mut buckets = this.buckets.lock().expect("digest lock");
            for (i, h) in &hashed {
                let b = &mut buckets[*i];
                b.0 += 1;
                for (d, x) in b.1.iter_mut().zip(h) {
                    *d ^= x;
                }
            }
            drop(buckets);
            this.entries
                .fetch_add(hashed.len() as u64, Ordering::Relaxed);
            if let Some(p) = &progress {
                p.fetch_add(i64::try_from(hashed.len()).unwrap_or(0), Ordering::Relaxed);
            }
        })
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(t.seconds).unwrap_or(0),
            u32::try_from(t.nanos).unwrap_or(0),
        )
}

/// Runs the checks of one verification.
pub struct Runner<'a> {
    pub spec: &'a Spec,
    pub sides: &'a Sides,
    pub replicator: Option<Replicator>,
    /// Items compared so far, for checkpoints.
    pub progress: Arc<AtomicI64>,
    /// Cancelled when the lease is lost or the worker stops.
    pub cancel: CancellationToken,
    /// How much of the differing buckets a drill-down holds.
    pub limits: DrillLimits,
}

impl Runner<'_> {
    /// Runs `check`; a store that fails makes it ERROR, never the whole run.
    #[tracing::instrument(skip_all, fields(check = %check.name))]
    pub async fn run(&self, check: &Check) -> Outcome {
        let mut outcome = match &check.kind {
            CheckKind::Count {
                unit_attribute,
                unit_keys,
            } => self.count(unit_attribute.as_deref(), unit_keys).await,
            CheckKind::Predicate {
                side,
                expression,
                names,
                values,
                parsed,
                expected,
            } => {
                let store = match side {
                    SideKind::Source => Some(&self.sides.source),
                    SideKind::Target => self.sides.target.as_ref(),
                };
                match store {
                    Some(s) => {
                        self.predicate(s, *side, expression, names, values, parsed, *expected)
                            .await
                    }
                    None => Err(tidemark_connectors::ConnectorError::invalid(
                        "verifier",
                        "the spec has no target",
                    )),
                }
            }
            CheckKind::Digest {
                buckets,
                versions_only,
            } => self.digest(*buckets, *versions_only).await,
        }
        .unwrap_or_else(|e| Outcome {
            result: pb::CheckResult {
                verdict: pb::Verdict::Error as i32,
                error: e.to_string(),
                detail: format!("error: {e}"),
                ..pb::CheckResult::default()
            },
            ..Outcome::default()
        });
        outcome.result.name.clone_from(&check.name);
        for m in &mut outcome.mismatches {
            m.check_name.clone_from(&check.name);
        }
        let sample = self.spec.sample_size;
        outcome.result.sample_mismatches =
            outcome.mismatches.iter().take(sample).cloned().collect();
        outcome
    }

    pub(crate) fn target(&self) -> ConnectorResult<&Side> {
        self.sides.target.as_ref().ok_or_else(|| {
            tidemark_connectors::ConnectorError::invalid("verifier", "the spec has no target")
        })
    }

    /// Waits out one round: `min_wait` since `since`, then, with a
    /// pipeline, until its lag has passed `seen` (the latest first-seen time
    /// of what is re-checked).
    async fn wait(&self, since: Instant, seen: SystemTime) {
        let until = since + self.spec.recheck.min_wait;
        tokio::select! {
            () = self.cancel.cancelled() => return,
            () = tokio::time::sleep_until(until.into()) => {}
        }
        let (Some(replicator), Some(pipeline)) = (&self.replicator, &self.spec.recheck.pipeline)
        else {
            return;
        };
        let passed = |lag: &rpb::PipelineLag| {
            lag.caught_up
                || lag.observe_time.as_ref().is_some_and(|t| {
                    let behind = lag.max_time_behind.as_ref().map_or(Duration::ZERO, |d| {
                        Duration::new(
                            u64::try_from(d.seconds).unwrap_or(0),
                            u32::try_from(d.nanos).unwrap_or(0),
                        )
                    });
                    system_time(t)
                        .checked_sub(behind)
                        .is_some_and(|applied| applied >= seen)
                })
        };
        tokio::select! {
            () = self.cancel.cancelled() => {}
            r = tokio::time::timeout(MAX_LAG_WAIT, replicator.wait_for_lag(pipeline, passed)) => {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(pipeline = %pipeline, error = %e, "cannot follow the pipeline's lag; re-checking after min_wait only"),
                    Err(_) => tracing::warn!(pipeline = %pipeline, "the pipeline's lag did not pass the mismatches within the wait limit"),
                }
            }
        }
    }

    async fn count(
        &self,
        unit_attribute: Option<&str>,
        unit_keys: &[String],
    ) -> ConnectorResult<Outcome> {
        let target = self.target()?;
        // Units are read from shaped items, where the attribute may be renamed.
        let attribute = unit_attribute.map(|a| {
            self.spec
                .renames
                .get(a)
                .cloned()
                .unwrap_or_else(|| a.to_owned())
        });
        let units: Arc<BTreeSet<String>> = Arc::new(unit_keys.iter().cloned().collect());
        let count_side = |side: Side, progress: Option<Arc<AtomicI64>>| {
            let attribute = attribute.clone();
            let units = units.clone();
            async move {
                let counts: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
                let sink = counts.clone();
                side.walk(Arc::new(move |batch: Vec<Entry>| {
                    let mut local: HashMap<String, i64> = HashMap::new();
                    for e in &batch {
                        let unit = match &attribute {
                            None => Some(String::new()),
                            Some(a) => match e.item.get(a) {
                                Some(AttrValue::S(s)) if units.contains(s) => Some(s.clone()),
                                Some(AttrValue::N(n)) if units.contains(n.as_str()) => {
                                    Some(n.as_str().to_owned())
                                }
                                _ => None,
                            },
                        };
                        if let Some(u) = unit {
                            *local.entry(u).or_default() += 1;
                        }
                    }
                    if let Some(p) = &progress {
                        p.fetch_add(i64::try_from(batch.len()).unwrap_or(0), Ordering::Relaxed);
                    }
                    let mut all = sink.lock().expect("count lock");
                    for (u, n) in local {
                        *all.entry(u).or_default() += n;
                    }
                }))
                .await?;
                let out = std::mem::take(&mut *counts.lock().expect("count lock"));
                Ok::<_, tidemark_connectors::ConnectorError>(out)
            }
        };
        let keys: Vec<String> = if attribute.is_some() {
            unit_keys.to_vec()
        } else {
            vec![String::new()]
        };
        let mut rounds = 0;
        let mut since = Instant::now();
        let first_seen = SystemTime::now();
        loop {
            let (s, t) = tokio::try_join!(
                count_side(self.sides.source.clone(), Some(self.progress.clone())),
                count_side(target.clone(), None)
            )?;
            let get = |m: &HashMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0);
            let differing: Vec<&String> =
                keys.iter().filter(|k| get(&s, k) != get(&t, k)).collect();
            let source_count: i64 = keys.iter().map(|k| get(&s, k)).sum();
            let target_count: i64 = keys.iter().map(|k| get(&t, k)).sum();
            if differing.is_empty()
                || rounds >= self.spec.recheck.rounds
                || self.cancel.is_cancelled()
            {
                let detail = if attribute.is_none() || differing.is_empty() {
                    format!("source {source_count}, target {target_count}")
                } else {
                    differing
                        .iter()
                        .take(20)
                        .map(|k| format!("unit {k}: source {}, target {}", get(&s, k), get(&t, k)))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                return Ok(Outcome {
                    result: pb::CheckResult {
                        verdict: if differing.is_empty() {
                            pb::Verdict::Pass
                        } else {
                            pb::Verdict::Fail
                        } as i32,
                        detail,
                        source_count,
                        target_count,
                        ..pb::CheckResult::default()
                    },
                    mismatches: Vec::new(),
                    rounds,
                });
            }
            rounds += 1;
            self.wait(since, first_seen).await;
            since = Instant::now();
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn predicate(
        &self,
        side: &Side,
        kind: SideKind,
        expression: &str,
        names: &HashMap<String, String>,
        values: &HashMap<String, AttrValue>,
        parsed: &tidemark_connectors::Predicate,
        expected: i64,
    ) -> ConnectorResult<Outcome> {
        let mut rounds = 0;
        let mut since = Instant::now();
        let first_seen = SystemTime::now();
        loop {
            let count = i64::try_from(
                side.count_matching(expression, names, values, parsed)
                    .await?,
            )
            .unwrap_or(i64::MAX);
            if count == expected || rounds >= self.spec.recheck.rounds || self.cancel.is_cancelled()
            {
                let (source_count, target_count) = match kind {
                    SideKind::Source => (count, 0),
                    SideKind::Target => (0, count),
                };
                return Ok(Outcome {
                    result: pb::CheckResult {
                        verdict: if count == expected {
                            pb::Verdict::Pass
                        } else {
                            pb::Verdict::Fail
                        } as i32,
                        detail: format!("{count} items match, expected {expected}"),
                        source_count,
                        target_count,
                        ..pb::CheckResult::default()
                    },
                    mismatches: Vec::new(),
                    rounds,
                });
            }
            rounds += 1;
            self.wait(since, first_seen).await;
            since = Instant::now();
        }
    }

    async fn digest(&self, buckets: u32, versions_only: bool) -> ConnectorResult<Outcome> {
        let source = &self.sides.source;
        let target = self.target()?;
        let versions = source.versions_known() && target.versions_known();
        if versions_only && !versions {
            // Comparing versions that one side does not have would compare
            // nothing and pass whatever the stores hold.
            return Err(tidemark_connectors::ConnectorError::invalid(
                "verifier",
                VERSIONS_ONLY_NEEDS_VERSIONS,
            ));
        }
        // A round whose differing buckets hold no differing key saw the data
        // change between the walk and the drill-down: walk again after the
        // re-check wait, up to the re-check rounds, before calling it
        // inconclusive.
        let mut walks = 0;
        let round = loop {
            let round = self.digest_round(buckets, versions, versions_only).await?;
            let inconclusive = !round.wanted.is_empty() && round.drilled.found.is_empty();
            if !inconclusive || walks >= self.spec.recheck.rounds || self.cancel.is_cancelled() {
                break round;
            }
            walks += 1;
            tracing::info!(
                differing_buckets = round.wanted.len(),
                walk = walks,
                "the digest's differing buckets held no differing key: walking again"
            );
            self.wait(Instant::now(), SystemTime::now()).await;
        };
        let DigestRound {
            wanted,
            source_count,
            target_count,
            drilled,
        } = round;
        let found = drilled.found;
        let found_any = !found.is_empty();
        let (mut remaining, resolved, rounds) =
            self.recheck(found, versions, versions_only).await?;
        let mut detail = String::new();
        if walks > 0 {
            detail.push_str(&format!(
                "; walked again {walks} time(s): the data changed between the walk and the drill-down"
            ));
        }
        let mut repaired = Vec::new();
        if self.spec.repair && !remaining.is_empty() {
            match self.repair(remaining, versions, versions_only).await {
                Ok((left, fixed)) => {
                    remaining = left;
                    repaired = fixed;
                }
                Err((left, e)) => {
                    remaining = left;
                    detail = format!("; repair failed: {e}");
                }
            }
        }
        let mut counts = pb::MismatchCounts::default();
        for f in &remaining {
            match f.kind {
                pb::MismatchKind::MissingInTarget => counts.missing_in_target += 1,
                pb::MismatchKind::ExtraInTarget => counts.extra_in_target += 1,
                pb::MismatchKind::StaleVersion => counts.stale_version += 1,
                pb::MismatchKind::DifferentContent | pb::MismatchKind::Unspecified => {
                    counts.different_content += 1;
                }
            }
        }
        let verdict = if drilled.unread_buckets > 0 {
            pb::Verdict::Fail
        } else {
            digest_verdict(wanted.len(), found_any, remaining.len())
        };
        if drilled.unread_buckets > 0 {
            detail.push_str(&format!(
                "; the drill-down stopped at {} mismatches (max_mismatches_kept): {} more differing buckets holding {} source and {} target entries were not read, and their mismatches are not counted; repair or fix these, then verify again",
                self.limits.max_kept,
                drilled.unread_buckets,
                drilled.unread_entries.0,
                drilled.unread_entries.1,
            ));
        }
        if !found_any && !wanted.is_empty() {
            detail.push_str(
                "; the drill-down found no differing key in the differing buckets (did the data change between the reads?): inconclusive, run the check again",
            );
        }
        let detail = format!(
            "source {source_count}, target {target_count}, {} of {buckets} buckets differ, {} mismatches, {resolved} resolved on re-check, {} repaired{detail}",
            wanted.len(),
            remaining.len(),
            repaired.len(),
        );
        let mismatches = remaining
            .iter()
            .chain(&repaired)
            .map(|f| pb::Mismatch {
                key: Some(key_to_proto(&f.key)),
                kind: f.kind as i32,
                source_version: f.source_version,
                target_version: f.target_version,
                check_name: String::new(),
                rounds: f.rounds,
                first_seen_time: Some(timestamp(f.first_seen)),
                repaired: f.repaired,
            })
            .collect();
        Ok(Outcome {
            result: pb::CheckResult {
                verdict: verdict as i32,
                detail,
                source_count,
                target_count,
                mismatches: Some(counts),
                resolved_on_recheck: resolved,
                repaired: i64::try_from(repaired.len()).unwrap_or(i64::MAX),
                ..pb::CheckResult::default()
            },
            mismatches,
            rounds: rounds + walks,
        })
    }

    /// One walk of both sides into bucket digests, and the drill-down of
    /// the buckets that differ.
    async fn digest_round(
        &self,
        buckets: u32,
        versions: bool,
        versions_only: bool,
    ) -> ConnectorResult<DigestRound> {
        let source = &self.sides.source;
        let target = self.target()?;
        let (s, t) = (Digests::new(buckets), Digests::new(buckets));
        tokio::try_join!(
            source.walk(s.consumer(versions, versions_only, Some(self.progress.clone()))),
            target.walk(t.consumer(versions, versions_only, None)),
        )?;
        let (wanted, counts): (BTreeSet<u32>, Vec<(u64, u64)>) = {
            let (a, b) = (
                s.buckets.lock().expect("digest lock"),
                t.buckets.lock().expect("digest lock"),
            );
            (
                (0..buckets)
                    .filter(|&i| a[i as usize] != b[i as usize])
                    .collect(),
                a.iter().zip(b.iter()).map(|(x, y)| (x.0, y.0)).collect(),
            )
        };
        let drilled = self
            .drill_down(buckets, &wanted, &counts, (versions, versions_only))
            .await?;
        Ok(DigestRound {
            wanted,
            source_count: i64::try_from(s.entries.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            target_count: i64::try_from(t.entries.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            drilled,
        })
    }

    /// Re-reads one mismatch on both sides; `None` when it now agrees.
    async fn reread(
        &self,
        mut f: Found,
        versions: bool,
        versions_only: bool,
    ) -> ConnectorResult<Option<Found>> {
        let target = self.target()?;
        let (a, b) = tokio::try_join!(self.sides.source.read(&f.key), target.read(&f.key))?;
        Ok(
            classify(a.as_ref(), b.as_ref(), versions, versions_only).map(|kind| {
                f.kind = kind;
                f.source_version = a.as_ref().map_or(0, |e| e.version);
                f.target_version = b.as_ref().map_or(0, |e| e.version);
                f
            }),
        )
    }

    /// Re-reads `pending` after each wait, for up to `rounds` rounds; returns
    /// what remains, how many resolved, and the rounds run.
    async fn recheck(
        &self,
        mut pending: Vec<Found>,
        versions: bool,
        versions_only: bool,
    ) -> ConnectorResult<(Vec<Found>, i64, u32)> {
        let mut resolved = 0;
        let mut rounds = 0;
        let mut since = Instant::now();
        while !pending.is_empty()
            && rounds < self.spec.recheck.rounds
            && !self.cancel.is_cancelled()
        {
            let seen = pending
                .iter()
                .map(|f| f.first_seen)
                .max()
                .unwrap_or_else(SystemTime::now);
            self.wait(since, seen).await;
            rounds += 1;
            let results: Vec<ConnectorResult<Option<Found>>> = futures::stream::iter(pending)
                .map(|f| self.reread(f, versions, versions_only))
                .buffered(READS_IN_FLIGHT)
                .collect()
                .await;
            pending = Vec::new();
            for r in results {
                match r? {
                    Some(mut f) => {
                        f.rounds += 1;
                        pending.push(f);
                    }
                    None => resolved += 1,
                }
            }
            since = Instant::now();
        }
        Ok((pending, resolved, rounds))
    }

    /// Asks the replicator to rewrite `remaining`, then re-reads them once
    /// the lag has passed; returns (still differing, repaired).
    async fn repair(
        &self,
        remaining: Vec<Found>,
        versions: bool,
        versions_only: bool,
    ) -> Result<(Vec<Found>, Vec<Found>), (Vec<Found>, String)> {
        let (Some(replicator), Some(pipeline)) = (&self.replicator, &self.spec.recheck.pipeline)
        else {
            return Err((remaining, "no pipeline to repair through".to_owned()));
        };
        let requested = SystemTime::now();
        for chunk in remaining.chunks(REPAIR_BATCH) {
            let keys = chunk
                .iter()
                .map(|f| key_to_proto(&self.sides.source.stored_key(&f.key)))
                .collect();
            if let Err(e) = replicator.repair(pipeline, keys).await {
                return Err((remaining, e.to_string()));
            }
        }
        self.wait(Instant::now(), requested).await;
        let mut left = Vec::new();
        let mut fixed = Vec::new();
        for f in remaining {
            let copy = f.clone();
            match self.reread(f, versions, versions_only).await {
                Ok(Some(f)) => left.push(f),
                Ok(None) => fixed.push(Found {
                    repaired: true,
                    ..copy
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "re-read after repair failed");
                    left.push(copy);
                }
            }
        }
        Ok((left, fixed))
    }
}

#[cfg(test)]
mod tests {
    use tidemark_connectors::Item;

    use super::*;

    fn entry(version: u64, body: &str) -> Entry {
        let item: Item = [("body".to_owned(), AttrValue::s(body))].into();
        Entry {
            key: Key::single("id", AttrValue::s("a")),
            version,
            item,
        }
    }

    #[test]
    fn classification_follows_the_documented_rule() {
        use pb::MismatchKind as K;
        let (s, t) = (entry(5, "x"), entry(5, "x"));
        assert_eq!(classify(Some(&s), Some(&t), true, false), None);
        assert_eq!(
            classify(Some(&s), None, true, false),
            Some(K::MissingInTarget)
        );
        assert_eq!(
            classify(None, Some(&t), true, false),
            Some(K::ExtraInTarget)
        );
        assert_eq!(
            classify(Some(&s), Some(&entry(4, "old")), true, false),
            Some(K::StaleVersion)
        );
        assert_eq!(
            classify(Some(&s), Some(&entry(6, "x")), true, false),
            Some(K::DifferentContent)
        );
        assert_eq!(
            classify(Some(&s), Some(&entry(5, "y")), true, false),
            Some(K::DifferentContent)
        );
        // Versions only: content is not compared.
        assert_eq!(classify(Some(&s), Some(&entry(5, "y")), true, true), None);
        // Unknown source versions: the target's version is taken, content decides.
        assert_eq!(
            classify(Some(&entry(0, "x")), Some(&entry(9, "x")), false, false),
            None
        );
        assert_eq!(
            classify(Some(&entry(0, "x")), Some(&entry(9, "y")), false, false),
            Some(K::DifferentContent)
        );
    }

    #[test]
    fn differing_buckets_without_a_differing_key_do_not_pass() {
        assert_eq!(digest_verdict(0, false, 0), pb::Verdict::Pass);
        assert_eq!(digest_verdict(3, true, 0), pb::Verdict::Pass);
        assert_eq!(digest_verdict(3, true, 1), pb::Verdict::Fail);
        assert_eq!(digest_verdict(3, false, 0), pb::Verdict::Fail);
    }

    #[test]
    fn digests_ignore_order_and_see_every_difference() {
        let digest = |entries: Vec<Entry>| {
            let d = Digests::new(8);
            let consume = d.consumer(true, false, None);
            for e in entries {
                consume(vec![e]);
            }
            d.buckets.lock().unwrap().clone()
        };
        let e = |id: &str, v: u64| Entry {
            key: Key::single("id", AttrValue::s(id)),
            ..entry(v, "x")
        };
        let forward = digest(vec![e("a", 1), e("b", 2), e("c", 3)]);
        assert_eq!(forward, digest(vec![e("c", 3), e("a", 1), e("b", 2)]));
        assert_ne!(forward, digest(vec![e("a", 1), e("b", 2), e("c", 4)]));
        assert_ne!(forward, digest(vec![e("a", 1), e("b", 2)]));
        // The bucket is the stores' own: drill-down reads the same buckets.
        let d = Digests::new(8);
        (d.consumer(true, false, None))(vec![e("a", 1)]);
        let key = Key::single("id", AttrValue::s("a"));
        let bucket = tidemark_connectors::bucket_of(&key, 8) as usize;
        assert_eq!(d.buckets.lock().unwrap()[bucket].0, 1);
    }
}
