//! `hot-path`: change record → transform → Elasticsearch bulk line, items/s
//! per core without I/O (DESIGN.md §6), over the functions the pipeline
//! calls ([`crate::hot_path`]). The raw baseline is the protobuf decode of
//! the same payloads into the generated message type alone: the floor of
//! any consumer of the feed. The criterion bench `hot_path` times the same
//! stages for `cargo bench`.

use std::time::{Duration, Instant};

use prost::Message as _;
use tidemark_proto::common::v1 as common;

use crate::framework::{Benchmark, Context, Report, Row, Target, fmt_num};
use crate::hot_path::{Fixture, RECORDS};

pub struct HotPath;

const TARGET: f64 = 500_000.0;

/// CPU time of the calling thread.
fn thread_cpu() -> anyhow::Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    use nix::sys::time::TimeValLike as _;
    let usage = getrusage(UsageWho::RUSAGE_THREAD)?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(u64::try_from(micros)?))
}

/// Rounds per figure: the figures take turns, so a slow stretch of the
/// machine (a neighbour on the same host) lands in one round of each
/// rather than in all of one figure.
const ROUNDS: usize = 7;

/// Items per CPU second of `f` (called with `from`, `from + 1`…) on this
/// thread for about `budget` of wall time; the next index is returned too.
fn per_core(
    budget: Duration,
    from: usize,
    f: &mut dyn FnMut(usize),
) -> anyhow::Result<(f64, usize)> {
    let cpu = thread_cpu()?;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < budget {
        for _ in 0..1024 {
            f(from + n);
            n += 1;
        }
    }
    let used = thread_cpu()?.saturating_sub(cpu).as_secs_f64();
    anyhow::ensure!(used > 0.0, "no CPU time measured");
    #[allow(clippy::cast_precision_loss)]
    Ok((n as f64 / used, from + n))
}

/// A figure's median and range over its rounds.
struct Figure {
    median: f64,
    low: f64,
    high: f64,
}

impl Figure {
    fn of(mut rounds: Vec<f64>) -> Self {
        rounds.sort_by(f64::total_cmp);
        Self {
            median: rounds[rounds.len() / 2],
            low: rounds[0],
            high: rounds[rounds.len() - 1],
        }
    }

    fn spread(&self) -> String {
        format!("{}–{}", fmt_num(self.low), fmt_num(self.high))
    }
}

struct Figures {
    raw_decode: Figure,
    decode: Figure,
    transform: Figure,
    full: Figure,
    line_bytes: usize,
}

/// The four figures, each over [`ROUNDS`] rounds of `budget / ROUNDS`,
/// their order turning round to round (ABCD, DCBA, …) after a warm-up
/// pass of each.
fn measure(budget: Duration) -> anyhow::Result<Figures> {
    let fixture = Fixture::new();
    let mut out = Vec::with_capacity(1 << 20);
    fixture.one(0, &mut out).map_err(anyhow::Error::msg)?;
    let line_bytes = out.len();
    let mut raw_decode = |i: usize| {
        let record = common::ChangeRecord::decode(fixture.payloads[i % RECORDS].as_slice());
        std::hint::black_box(record.expect("the fixture decodes"));
    };
    let mut decode = |i: usize| {
        std::hint::black_box(fixture.decode(i).expect("the fixture decodes"));
    };
    let mut transform = |i: usize| {
        let change = fixture.decode(i).expect("the fixture decodes");
        std::hint::black_box(fixture.transform(change).expect("the fixture passes"));
    };
    let mut full = |i: usize| {
        if out.len() > 1 << 20 {
            out.clear();
        }
        fixture.one(i, &mut out).expect("the fixture is sent");
        std::hint::black_box(&out);
    };
    let mut figures: [&mut dyn FnMut(usize); 4] =
        [&mut raw_decode, &mut decode, &mut transform, &mut full];
    for f in &mut figures {
        for i in 0..RECORDS {
            f(i);
        }
    }
    let slice = budget / u32::try_from(ROUNDS)?;
    let mut rounds: [Vec<f64>; 4] = Default::default();
    let mut next = 0;
    for round in 0..ROUNDS {
        for k in 0..figures.len() {
            let which = if round % 2 == 0 {
                k
            } else {
                figures.len() - 1 - k
            };
            let (rate, after) = per_core(slice, next, &mut *figures[which])?;
            rounds[which].push(rate);
            next = after;
        }
    }
    let [raw_decode, decode, transform, full] = rounds.map(Figure::of);
    Ok(Figures {
        raw_decode,
        decode,
        transform,
        full,
        line_bytes,
    })
}

#[async_trait::async_trait]
impl Benchmark for HotPath {
    fn name(&self) -> &'static str {
        "hot-path"
    }

    fn description(&self) -> &'static str {
        "The replicator's per-record path without I/O on one thread: a Kafka change record's protobuf, copied from the consumer's buffer → `decode_change_encoded` (key decoded, image checked and read in place) → the sink's `Transform` (recency filter, projection, rename) → the Elasticsearch sink's `bulk_lines` written from the encoding, items/s per core (CPU time of the thread) ÷ the protobuf decode of the same payloads alone."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let budget = ctx.time(Duration::from_secs(3));
        let f = tokio::task::spawn_blocking(move || measure(budget)).await??;
        let row =
            |figure: &str, v: &Figure| Row::new(figure, "items/s", v.median, f.raw_decode.median);
        Ok(Report {
            rows: vec![
                row("record → transform → bulk line, per core", &f.full)
                    .with_target(Target::SystemAtLeast(TARGET)),
                row("stage: decode_change_encoded", &f.decode),
                row("stage: decode_change_encoded + transform", &f.transform),
            ],
            notes: vec![
                format!(
                    "fixture: {RECORDS} upserts of a 12-attribute content item (strings, integer and decimal numbers, a boolean, a string set, a list, a map; composite key); the transform keeps items changed in the last day, projects 9 attributes and renames one; one record's bulk lines are {} bytes",
                    f.line_bytes
                ),
                format!(
                    "items per second of the measuring thread's CPU time (getrusage), about {} s per figure after a warm-up pass, in {ROUNDS} rounds that take turns with the other figures' (order reversed every other round); medians; baseline: `prost` decode of the same payloads into `tidemark.common.v1.ChangeRecord`, nothing else",
                    fmt_num(budget.as_secs_f64())
                ),
                format!(
                    "spread of the rounds (items/s): full path {}, decode_change_encoded {}, decode_change_encoded + transform {}, baseline {}",
                    f.full.spread(),
                    f.decode.spread(),
                    f.transform.spread(),
                    f.raw_decode.spread()
                ),
                "per-stage costs by difference: bulk lines ≈ 1/full − 1/(decode + transform); `cargo bench -p tidemark-bench --bench hot_path` times the stages with criterion".to_owned(),
            ],
        })
    }
}
