//! `cargo bench -p tidemark-bench --bench hot_path`: the replicator's
//! per-record path without I/O, per stage, with criterion. The figure of
//! record (items/s per core, target ≥ 500k) is the `hot-path` benchmark of
//! `tidemark-bench`, over the same fixture and functions.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tidemark_bench::hot_path::{Fixture, RECORDS};

fn hot_path(c: &mut Criterion) {
    let fixture = Fixture::new();
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("decode_change_encoded", |b| {
        b.iter(|| {
            i += 1;
            black_box(fixture.decode(i).expect("the fixture decodes"))
        });
    });
    let changes: Vec<_> = (0..RECORDS)
        .map(|i| fixture.decode(i).expect("the fixture decodes"))
        .collect();
    group.bench_function("transform", |b| {
        b.iter_batched(
            || {
                i += 1;
                changes[i % RECORDS].clone()
            },
            |change| black_box(fixture.transform(change)),
            BatchSize::SmallInput,
        );
    });
    let records: Vec<_> = changes
        .into_iter()
        .map(|c| fixture.transform(c).expect("the fixture passes"))
        .collect();
    let mut out = Vec::with_capacity(1 << 20);
    group.bench_function("bulk_lines", |b| {
        b.iter(|| {
            i += 1;
            if out.len() > 1 << 20 {
                out.clear();
            }
            fixture
                .bulk(&records[i % RECORDS], &mut out)
                .expect("the fixture is sent");
            black_box(&out);
        });
    });
    group.bench_function("record_to_bulk_line", |b| {
        b.iter(|| {
            i += 1;
            if out.len() > 1 << 20 {
                out.clear();
            }
            fixture.one(i, &mut out).expect("the fixture is sent");
            black_box(&out);
        });
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
