//! Drain + convert throughput: records/s from a segment's ring through
//! validation, metrics, sampling and the export queue (the reader thread),
//! then encoding into OTLP export requests of 128 requests (the exporter's
//! share), on one thread.
//!
//! Two runs: a pre-filled ring drained in batches, and a producer thread
//! writing at full speed while the reader keeps up.
//!
//! `cargo bench -p ringside-agent --bench drain_convert`

use clap::Parser;
use ringside_agent::{
    Cli, Command, ExportQueue, Metrics, Reader, ResourceEnv, Settings, encode_trace_request,
};
use ringside_shm_protocol::{CreateOptions, EngineSegment, OverflowMode, monotonic_ns};
use ringside_tests::finished_chat_record;
use ringside_tests::harness::cpu_time;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CAPACITY: u32 = 1 << 16;

fn reader(name: &str) -> (Reader, Arc<ExportQueue>) {
    let cli = Cli::try_parse_from([
        "ringside-agent",
        "run",
        "--exporter",
        "console",
        "--engine",
        name,
        "--queue-max-items",
        "10000000",
        "--queue-max-mib",
        "65536",
    ])
    .expect("bench flags");
    let Command::Run(args) = cli.command else {
        unreachable!("parsed as run")
    };
    let settings = Settings::resolve(&args, &|_| None).expect("bench settings");
    let queue = Arc::new(ExportQueue::new(10_000_000, 1 << 36, 512));
    let r = Reader::new(
        settings.reader(),
        ResourceEnv::from_env(&|_| None, "bench".into()),
        Arc::clone(&queue),
        Arc::new(Mutex::new(Metrics::new(0))),
        Arc::default(),
    );
    (r, queue)
}

fn main() {
    let name = format!("agent-bench-{}", std::process::id());
    let mut options = CreateOptions::new(name.clone(), vec!["bench-model".into()]);
    options.capacity = CAPACITY;
    options.control.overflow_mode = OverflowMode::Discard;
    let segment = EngineSegment::create(&options).expect("create the bench segment");
    let producer = segment.ring().producer();
    let (mut reader, queue) = reader(&name);
    // The exporter's side: take what is queued and encode it into export
    // requests (the spans are built there, at send time).
    let export = |queue: &ExportQueue| {
        let items = queue.take(usize::MAX);
        for batch in items.chunks(128) {
            std::hint::black_box(encode_trace_request(batch));
        }
        items.len() as u64
    };
    reader.scan();
    assert_eq!(
        reader.attached(),
        1,
        "the reader attaches to the bench segment"
    );

    // 1. Pre-filled ring, drained by the reader alone.
    let rounds = 20u64;
    let mut drained = 0u64;
    let mut busy = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    let mut seq = 0u64;
    for _ in 0..rounds {
        let now = monotonic_ns();
        for _ in 0..CAPACITY {
            let _ = producer.push(&finished_chat_record(seq, now));
            seq += 1;
        }
        // The exporter takes what is queued after every poll, as in the
        // agent; dropping the taken spans is part of the measured cost.
        let start = Instant::now();
        let cpu_start = cpu_time("self");
        loop {
            let more = reader.poll_all();
            drained += export(&queue);
            if !more {
                break;
            }
        }
        busy += start.elapsed();
        cpu += cpu_time("self").saturating_sub(cpu_start);
    }
    let rate = drained as f64 / busy.as_secs_f64();
    println!(
        "drain+convert (pre-filled ring): {drained} records in {:.3} s = {:.0} records/s ({:.0} ns/record)",
        busy.as_secs_f64(),
        rate,
        busy.as_nanos() as f64 / drained as f64
    );
    println!(
        "  per CPU second (one thread; the wall figure above suffers from other load): {:.0} records/s",
        drained as f64 / cpu.as_secs_f64().max(1e-3)
    );

    // 2. A producer at full speed (discard mode: it never overwrites unread
    // records; what it cannot place is counted as dropped_full).
    let stop = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let stop = Arc::clone(&stop);
        let producer = segment.ring().producer();
        std::thread::spawn(move || {
            let mut seq = 1u64 << 40;
            while !stop.load(Ordering::Relaxed) {
                let now = monotonic_ns();
                for _ in 0..256 {
                    let _ = producer.push(&finished_chat_record(seq, now));
                    seq += 1;
                }
            }
        })
    };
    let start = Instant::now();
    let mut delivered = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        if !reader.poll_all() {
            std::thread::yield_now();
        }
        delivered += export(&queue);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = producer_thread.join();
    let elapsed = start.elapsed().as_secs_f64();
    let counters = segment.ring().counters();
    println!(
        "drain+convert (live producer): {delivered} records in {elapsed:.3} s = {:.0} records/s; producer dropped_full {}",
        delivered as f64 / elapsed,
        counters.dropped_full
    );
}
