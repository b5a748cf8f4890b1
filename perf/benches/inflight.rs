//! Criterion benchmarks of the in-flight table (ABI 1.2): the engine's
//! per-step update of one request's entry (what every decode step adds per
//! running request), and a passive reader's snapshot of a full table (what
//! `ringside-agent inflight` and the agent's stall look cost).

#![forbid(unsafe_code)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringside_perf::machine;
use ringside_shm_protocol::{ControlDefaults, InflightEntry, InflightPhase, Ring, monotonic_ns};
use std::hint::black_box;

/// `--parallel 4 --max-queue 64`, the engine's defaults.
const TABLE: u32 = 68;

fn entry(i: u32) -> InflightEntry {
    let mut e: InflightEntry = bytemuck::Zeroable::zeroed();
    e.request_id = (u128::from(i) + 1).to_le_bytes();
    e.trace_id = [0xab; 16];
    e.span_id = (u64::from(i) + 1).to_le_bytes();
    e.t_arrival_ns = monotonic_ns();
    e.t_scheduled_ns = e.t_arrival_ns;
    e.t_progress_ns = e.t_arrival_ns;
    e.prompt_tokens = 100;
    e.prefilled_tokens = 100;
    e.phase = InflightPhase::Decode as u8;
    e.operation = 1;
    e.sequence_slot = 0;
    e
}

fn update(c: &mut Criterion) {
    eprintln!("machine: {}", machine());
    let (_ring, table) =
        Ring::on_heap_with_inflight(2, TABLE, ControlDefaults::default()).expect("ring and table");
    let mut e = entry(0);
    let mut handle = table.claim(&e).expect("a free entry");
    let mut group = c.benchmark_group("inflight");
    group.throughput(Throughput::Elements(1));
    group.bench_function("clock_read_only", |b| b.iter(|| black_box(monotonic_ns())));
    // What the inference thread does per output token: stamp, count, publish.
    group.bench_function("token_update", |b| {
        b.iter(|| {
            let t = monotonic_ns();
            e.t_first_token_ns = e.t_first_token_ns.max(1);
            e.t_last_token_ns = t;
            e.t_progress_ns = t;
            e.output_tokens = e.output_tokens.wrapping_add(1);
            handle.update(black_box(&e));
        })
    });
    group.finish();
    handle.release();
}

fn snapshot(c: &mut Criterion) {
    let (_ring, table) =
        Ring::on_heap_with_inflight(2, TABLE, ControlDefaults::default()).expect("ring and table");
    let handles: Vec<_> = (0..TABLE)
        .map(|i| table.claim(&entry(i)).expect("a free entry"))
        .collect();
    let reader = table.reader(1);
    let mut group = c.benchmark_group("inflight");
    group.throughput(Throughput::Elements(u64::from(TABLE)));
    group.bench_function("snapshot_full_table_68", |b| {
        b.iter(|| black_box(reader.snapshot().expect("snapshot").requests.len()))
    });
    group.finish();
    drop(handles);
}

criterion_group!(benches, update, snapshot);
criterion_main!(benches);
