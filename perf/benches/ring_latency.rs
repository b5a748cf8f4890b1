//! Tail latency of one push. Criterion reports central figures; this times
//! every push of a long run into an HDR histogram, next to a baseline of the
//! same timer around nothing, so the timer's own cost can be read off.
//!
//! `cargo bench -p ringside-perf --bench ring_latency`

#![forbid(unsafe_code)]

use hdrhistogram::Histogram;
use ringside_perf::{engine_like_record, machine};
use ringside_shm_protocol::{ControlDefaults, Ring, monotonic_ns};
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: usize = 5;
const PUSHES_PER_ROUND: usize = 1_000_000;

fn percentiles(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<28} p50 {:>5} ns  p90 {:>5} ns  p99 {:>5} ns  p99.9 {:>6} ns  max {:>8} ns",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

fn main() {
    println!("machine: {}", machine());
    let ring = Ring::on_heap(4096, ControlDefaults::default()).expect("ring");
    let producer = ring.producer();
    let mut record = engine_like_record(1);
    let mut timer_only = Histogram::<u64>::new(3).expect("histogram");
    let mut push = Histogram::<u64>::new(3).expect("histogram");
    // Interleave the baseline and the measurement in rounds so that both see
    // the same machine noise.
    for _ in 0..ROUNDS {
        for _ in 0..PUSHES_PER_ROUND {
            let start = Instant::now();
            black_box(&record);
            let ns = start.elapsed().as_nanos() as u64;
            let _ = timer_only.record(ns);
        }
        for _ in 0..PUSHES_PER_ROUND {
            let start = Instant::now();
            if producer.tracing_enabled() {
                record.t_finished_ns = monotonic_ns();
                let _ = black_box(producer.push(black_box(&record)));
            }
            let ns = start.elapsed().as_nanos() as u64;
            let _ = push.record(ns);
        }
    }
    println!(
        "{} pushes per histogram, single producer, ring of 4096",
        ROUNDS * PUSHES_PER_ROUND
    );
    percentiles("timer around nothing", &timer_only);
    percentiles("timer around one push", &push);
    println!(
        "push p50 net of timer: {} ns",
        push.value_at_quantile(0.5)
            .saturating_sub(timer_only.value_at_quantile(0.5))
    );
}
