//! Criterion benchmarks of the ring: one push as the engine does it
//! (timestamp read + record copy + commit), one step record as the engine
//! records a scheduler step (ABI 1.4: fill, stamps, encode, push into a step
//! ring; `steps` measures it in interleaved rounds for `RESULTS.md`), and
//! draining a full ring.

#![forbid(unsafe_code)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ringside_perf::{engine_like_record, machine};
use ringside_shm_protocol::{
    ControlDefaults, Ring, SlotSet, StartAt, Step, StepRing, monotonic_ns,
};
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
    // A decode step of 4 slots, one of which also computes a 64-token
    // prompt chunk, into a step ring of the engine's default capacity.
    let steps = StepRing::on_heap(4096).expect("step ring");
    let step_producer = steps.producer();
    let mut step = Step {
        slots_total: 4,
        slots_occupied: 4,
        kv_cells_total: 32768,
        ..Step::default()
    };
    group.bench_function("step_fill_encode_push", |b| {
        b.iter(|| {
            let t = monotonic_ns();
            let mut decode_slots = SlotSet::EMPTY;
            for i in 0..black_box(4) {
                decode_slots.insert(i);
            }
            let mut prefill_slots = SlotSet::EMPTY;
            prefill_slots.insert(black_box(3));
            step = Step {
                step: step.step + 1,
                t_start_ns: t,
                t_decode_end_ns: monotonic_ns(),
                t_end_ns: monotonic_ns(),
                decode_slots,
                prefill_slots,
                prefill_tokens: 64,
                decode_rows: 4,
                decode_calls: 1,
                prefill_calls: 1,
                kv_cells_used: black_box(1200),
                queue_depth: black_box(2),
                ..step
            };
            if producer.tracing_enabled() {
                black_box(step_producer.push(&step.encode()))
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
