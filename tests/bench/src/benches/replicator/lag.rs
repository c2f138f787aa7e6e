//! End-to-end lag of a pipeline under an open-loop writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tidemark_connectors::elasticsearch::document_id_in;
use tidemark_connectors::{AttrValue, KeySchema, SourceTable};
use tidemark_kit::CancellationToken;

use crate::framework::Context;
use crate::load::OpenLoop;
use tidemark_connectors::Key;
use tidemark_connectors::sqlite::EmbeddedTable;

use super::replication::doc;
use super::{LAG_PROBE_EVERY, LAG_PROBE_MAX, LAG_SAMPLE_EVERY, LAG_WARMUP, LAG_WINDOW, median};

pub(super) struct Lag {
    pub(super) rate: f64,
    pub(super) written: u64,
    pub(super) write_errors: u64,
    pub(super) samples: usize,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// Median lag of the items written in the first and the last second.
    pub(super) first_second_ms: f64,
    pub(super) last_second_ms: f64,
    pub(super) missing: usize,
}

/// Per sampled item: when its put returned, and when it was first found.
type Stamps = Arc<Mutex<Vec<Option<Instant>>>>;

/// Per-record end-to-end lag with an open-loop writer at `rate` items/s
/// into the pipeline's source: from the moment the source's put returned
/// (the change is committed) to the first real-time `_mget` by id that finds
/// the document in the index, for every `LAG_SAMPLE_EVERY`-th item.
pub(super) async fn lag_at(
    ctx: &Context,
    es: &str,
    index: &str,
    source: &Arc<EmbeddedTable>,
    rate: f64,
    tag: &'static str,
) -> anyhow::Result<Lag> {
    let duration = ctx.time(LAG_WINDOW);
    let warmup = ctx.time(LAG_WARMUP);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count of seconds times a rate"
    )]
    let total = ((duration + warmup).as_secs_f64() * rate).ceil() as u64 + 1;
    let samples = usize::try_from(total / LAG_SAMPLE_EVERY + 1)?;
    let written: Stamps = Arc::new(Mutex::new(vec![None; samples]));
    let seen: Stamps = Arc::new(Mutex::new(vec![None; samples]));
    let stop = CancellationToken::new();
    let id_of = move |i: u64| format!("{tag}-{i:09}");
    let mut probe = tokio::spawn(probe(
        Probe {
            es: es.to_owned(),
            index: index.to_owned(),
            written: Arc::clone(&written),
            seen: Arc::clone(&seen),
            stop: stop.clone(),
        },
        id_of,
    ));
    let writer = OpenLoop {
        rate,
        warmup,
        duration,
        // Puts share one SQLite connection: more in flight only queue
        // threads on its lock, and that contention took the cores from the
        // pipeline (with 8: p99 1.6 s at half the rate, 0.34 s with 2, every
        // put on schedule either way).
        max_in_flight: 2,
    };
    let result = {
        let (source, written) = (Arc::clone(source), Arc::clone(&written));
        writer
            .run(move |i| {
                let (source, written) = (Arc::clone(&source), Arc::clone(&written));
                async move {
                    #[allow(clippy::cast_possible_truncation, reason = "a test index")]
                    let item = doc(&id_of(i), i as usize);
                    source.put(&item, None).await?;
                    if i % LAG_SAMPLE_EVERY == 0 {
                        let slot = usize::try_from(i / LAG_SAMPLE_EVERY)?;
                        if let Some(w) = written.lock().expect("lock").get_mut(slot) {
                            *w = Some(Instant::now());
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                }
            })
            .await?
    };
    stop.cancel();
    // Whatever is not found 30 s after the last write counts as missing.
    match tokio::time::timeout(Duration::from_secs(30), &mut probe).await {
        Ok(done) => done.context("lag probe panicked")??,
        Err(_) => probe.abort(),
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "seconds of warm-up times a rate"
    )]
    let first = ((warmup.as_secs_f64() * rate) as u64).div_ceil(LAG_SAMPLE_EVERY);
    let written = written.lock().expect("lock").clone();
    let seen = seen.lock().expect("lock").clone();
    let mut lag = summarise(&written, &seen, usize::try_from(first)?);
    lag.rate = rate;
    lag.written = result.ok;
    lag.write_errors = result.errors;
    Ok(lag)
}

/// What the probe shares with the writer.
struct Probe {
    es: String,
    index: String,
    written: Stamps,
    seen: Stamps,
    stop: CancellationToken,
}

impl Probe {
    /// The sampled slots written and not yet found, the oldest first.
    fn pending(&self) -> Vec<usize> {
        let written = self.written.lock().expect("lock");
        let seen = self.seen.lock().expect("lock");
        (0..written.len())
            .filter(|&s| written[s].is_some() && seen[s].is_none())
            .take(LAG_PROBE_MAX)
            .collect()
    }

    fn all_found(&self) -> bool {
        let written = self.written.lock().expect("lock");
        let seen = self.seen.lock().expect("lock");
        seen.iter()
            .zip(written.iter())
            .all(|(s, w)| w.is_none() || s.is_some())
    }
}

/// Asks the index every `LAG_PROBE_EVERY` for the pending samples, until
/// stopped with nothing pending.
async fn probe(p: Probe, id_of: impl Fn(u64) -> String) -> anyhow::Result<()> {
    let schema = KeySchema::new("id", None);
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(LAG_PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pending = p.pending();
        if pending.is_empty() {
            if p.stop.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        let mut ids = HashMap::new();
        for &s in &pending {
            let key = Key::single("id", AttrValue::s(id_of(s as u64 * LAG_SAMPLE_EVERY)));
            ids.insert(
                document_id_in(&schema, &key).map_err(anyhow::Error::msg)?,
                s,
            );
        }
        let body = serde_json::json!({ "ids": ids.keys().collect::<Vec<_>>() });
        let response: serde_json::Value = http
            .post(format!("{}/{}/_mget?_source=false", p.es, p.index))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let now = Instant::now();
        {
            let mut seen = p.seen.lock().expect("lock");
            for d in response["docs"].as_array().into_iter().flatten() {
                if d["found"].as_bool() == Some(true)
                    && let Some(&s) = d["_id"].as_str().and_then(|id| ids.get(id))
                {
                    seen[s].get_or_insert(now);
                }
            }
        }
        if p.stop.is_cancelled() && p.all_found() {
            return Ok(());
        }
    }
}

/// The lag percentiles of the samples from `first` on (those written
/// after the warm-up); the writer's figures are the caller's to fill.
fn summarise(written: &[Option<Instant>], seen: &[Option<Instant>], first: usize) -> Lag {
    let mut lags: Vec<f64> = Vec::new();
    let mut missing = 0;
    for (w, f) in written.iter().zip(seen).skip(first) {
        match (w, f) {
            (Some(w), Some(f)) => lags.push(f.saturating_duration_since(*w).as_secs_f64() * 1e3),
            (Some(_), None) => missing += 1,
            _ => {}
        }
    }
    // Whether the pipeline kept up: lags of the items written in the first
    // and in the last second of the window (growing: it fell behind).
    let window: Vec<(f64, f64)> = written
        .iter()
        .zip(seen)
        .skip(first)
        .filter_map(|(w, f)| Some((*w.as_ref()?, *f.as_ref()?)))
        .map(|(w, f)| (w, f.saturating_duration_since(w).as_secs_f64() * 1e3))
        .scan(None, |t0: &mut Option<Instant>, (w, lag)| {
            let t0 = *t0.get_or_insert(w);
            Some((w.saturating_duration_since(t0).as_secs_f64(), lag))
        })
        .collect();
    let end = window.last().map_or(0.0, |(t, _)| *t);
    let lags_where = |keep: &dyn Fn(f64) -> bool| -> Vec<f64> {
        window
            .iter()
            .filter(|(t, _)| keep(*t))
            .map(|(_, l)| *l)
            .collect()
    };
    let first_second = lags_where(&|t| t < 1.0);
    let last_second = lags_where(&|t| t >= end - 1.0);
    lags.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        if lags.is_empty() {
            f64::NAN
        } else {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into the sorted samples"
            )]
            let at = ((q * lags.len() as f64).ceil() as usize).clamp(1, lags.len()) - 1;
            lags[at]
        }
    };
    Lag {
        rate: f64::NAN,
        written: 0,
        write_errors: 0,
        samples: lags.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lags.last().copied().unwrap_or(f64::NAN),
        first_second_ms: median(&first_second),
        last_second_ms: median(&last_second),
        missing,
    }
}
