//! A stand-in engine for the cross-process ring tests: creates a segment,
//! writes numbered records, and can stop midway through a write and wait to
//! be killed, as an engine that dies mid-write would.
//!
//! `ring-writer <instance> <before> <stop-after-words|none> <after>`
//! (ring capacity from `RING_WRITER_CAPACITY`, default 64)

#![forbid(unsafe_code)]

use ringside_shm_protocol::{CreateOptions, EngineSegment};
use ringside_tests::numbered_record;
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, instance, before, stop, after] = &args[..] else {
        eprintln!("usage: ring-writer <instance> <before> <stop-after-words|none> <after>");
        std::process::exit(2);
    };
    let (Ok(before), Ok(after)) = (before.parse::<u64>(), after.parse::<u64>()) else {
        eprintln!("counts must be numbers");
        std::process::exit(2);
    };
    let mut options = CreateOptions::new(instance.as_str(), vec!["model".into()]);
    options.capacity = std::env::var("RING_WRITER_CAPACITY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    options.unlink_on_drop = false;
    let segment = match EngineSegment::create(&options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ring-writer: {e}");
            std::process::exit(1);
        }
    };
    let producer = segment.ring().producer();
    let mut seq = 0;
    for _ in 0..before {
        let _ = producer.push(&numbered_record(seq));
        seq += 1;
    }
    if let Ok(words) = stop.parse::<usize>() {
        // Claim a slot, write part of the record, and never commit it.
        let ticket = producer.push_and_stop_midway(&numbered_record(u64::MAX >> 8), words);
        println!("stalled {}", ticket.map_or(-1, |t| t as i64));
    }
    for _ in 0..after {
        let _ = producer.push(&numbered_record(seq));
        seq += 1;
    }
    println!("ready {seq}");
    let _ = std::io::stdout().flush();
    // Wait to be killed (or for stdin to close).
    let _ = std::io::stdin().read_line(&mut String::new());
    std::mem::forget(segment);
}
