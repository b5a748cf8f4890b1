//! Criterion benchmarks of the ring: one push as the engine does it
//! (timestamp read + record copy + commit), and draining a full ring.

#![forbid(unsafe_code)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ringside_perf::{engine_like_record, machine};
use ringside_shm_protocol::{ControlDefaults, Ring, StartAt, monotonic_ns};
use std::hint::black_box;

const CAPACITY: u32 = 4096;

fn push(c: &mut Criterion) {
    eprintln!("machine: {}", machine());
    let ring = Ring::on_heap(CAPACITY, ControlDefaults::default()).expect("ring");
    let producer = ring.producer();
    let mut record = engine_like_record(1);
    let mut group = c.benchmark_group("push");
    group.throughput(Throughput::Elements(1));
    // Baseline in the same run: the clock read alone.
    group.bench_function("clock_read_only", |b| b.iter(|| black_box(monotonic_ns())));
    group.bench_function("stamp_copy_commit", |b| {
        b.iter(|| {
            if producer.tracing_enabled() {
                record.t_finished_ns = monotonic_ns();
                black_box(producer.push(black_box(&record)))
            } else {
                unreachable!("tracing is on")
            }
        })
    });
    ring.control().set_tracing_enabled(false);
    group.bench_function("tracing_off_check", |b| {
        b.iter(|| black_box(producer.tracing_enabled()))
    });
    group.finish();
}

fn drain(c: &mut Criterion) {
    let ring = Ring::on_heap(CAPACITY, ControlDefaults::default()).expect("ring");
    let producer = ring.producer();
    let record = engine_like_record(1);
    let mut group = c.benchmark_group("drain");
    group.throughput(Throughput::Elements(u64::from(CAPACITY)));
    group.bench_function("full_ring_copied_out", |b| {
        b.iter_batched(
            || {
                let consumer = ring.consumer(StartAt::Newest);
                for _ in 0..CAPACITY {
                    let _ = producer.push(&record);
                }
                consumer
            },
            |mut consumer| {
                let mut sum = 0u64;
                let report = consumer
                    .poll_at(0, usize::MAX, |_, r| {
                        sum = sum.wrapping_add(r.t_finished_ns)
                    })
                    .expect("heap ring");
                assert_eq!(report.delivered, u64::from(CAPACITY));
                black_box(sum)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, push, drain);
criterion_main!(benches);
