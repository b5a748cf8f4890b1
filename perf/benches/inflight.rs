//! The in-flight table (ABI 1.2): the engine's per-step update of one
//! request's entry (what every decode step adds per running request), and a
//! passive reader's snapshot of a full table (what `ringside-agent inflight`
//! and the agent's stall look cost).
//!
//! `cargo bench -p ringside-perf --bench inflight`; `INFLIGHT_ROUNDS` rounds
//! of `INFLIGHT_CALLS` calls per subject, subjects interleaved with the order
//! rotating per round. The bare clock read is measured in the same rounds:
//! the update's own cost is the difference (the engine stamps each token
//! whether tracing is on or not).

#![forbid(unsafe_code)]

use ringside_perf::{Report, env_usize, fmt_summary};
use ringside_shm_protocol::{
    ControlDefaults, InflightEntry, InflightHandle, InflightPhase, InflightReader, Ring,
    monotonic_ns,
};
use std::hint::black_box;
use std::time::Instant;

/// `--parallel 4 --max-queue 64`, the engine's defaults.
const TABLE: u32 = 68;

fn entry(i: u32) -> InflightEntry {
    let mut e: InflightEntry = bytemuck::Zeroable::zeroed();
    e.request_id = (u128::from(i) + 1).to_le_bytes();
    e.trace_id = [0xab; 16];
    e.span_id = (u64::from(i) + 1).to_le_bytes();
    e.t_arrival_ns = monotonic_ns();
    e.t_scheduled_ns = e.t_arrival_ns;
    // A decoding request with its first token: a valid entry (the reader
    // validates each one; an invalid table would measure only rejection).
    e.t_first_token_ns = e.t_arrival_ns;
    e.t_last_token_ns = e.t_arrival_ns;
    e.t_progress_ns = e.t_arrival_ns;
    e.output_tokens = 1;
    e.prompt_tokens = 100;
    e.prefilled_tokens = 100;
    e.phase = InflightPhase::Decode as u8;
    e.operation = 1;
    e
}

#[derive(Clone, Copy)]
enum Subject {
    Clock,
    TokenUpdate,
    Snapshot,
}

struct Bench {
    update_entry: InflightEntry,
    update_handle: InflightHandle,
    reader: InflightReader,
}

impl Bench {
    /// Nanoseconds per call of `subject` over `calls` calls.
    fn run(&mut self, subject: Subject, calls: usize) -> f64 {
        let start = Instant::now();
        match subject {
            Subject::Clock => {
                for _ in 0..calls {
                    black_box(monotonic_ns());
                }
            }
            // What the inference thread does per output token: stamp,
            // count, publish.
            Subject::TokenUpdate => {
                let e = &mut self.update_entry;
                for _ in 0..calls {
                    let t = monotonic_ns();
                    e.t_first_token_ns = e.t_first_token_ns.max(1);
                    e.t_last_token_ns = t;
                    e.t_progress_ns = t;
                    e.output_tokens = e.output_tokens.wrapping_add(1);
                    self.update_handle.update(black_box(e));
                }
            }
            Subject::Snapshot => {
                for _ in 0..calls {
                    let snapshot = self.reader.snapshot().expect("snapshot");
                    assert_eq!(
                        (snapshot.requests.len(), snapshot.invalid, snapshot.torn),
                        (TABLE as usize, 0, 0),
                        "every entry is read back valid"
                    );
                    black_box(snapshot);
                }
            }
        }
        start.elapsed().as_nanos() as f64 / calls as f64
    }
}

fn main() {
    let rounds = env_usize("INFLIGHT_ROUNDS", 8).max(1);
    let calls = env_usize("INFLIGHT_CALLS", 200_000).max(1);
    // The snapshot copies the whole table: fewer calls for the same time.
    let snapshot_calls = (calls / 100).max(1);

    let (_ring, table) =
        Ring::on_heap_with_inflight(2, TABLE, ControlDefaults::default()).expect("ring and table");
    // A full table: the updated entry and TABLE - 1 others.
    let update_entry = entry(0);
    let update_handle = table.claim(&update_entry).expect("a free entry");
    let others: Vec<_> = (1..TABLE)
        .map(|i| table.claim(&entry(i)).expect("a free entry"))
        .collect();
    let mut bench = Bench {
        update_entry,
        update_handle,
        reader: table.reader(1),
    };

    // Warm up (page faults, caches).
    for subject in [Subject::Clock, Subject::TokenUpdate, Subject::Snapshot] {
        bench.run(subject, 1000);
    }
    let mut clock = Vec::new();
    let mut update = Vec::new();
    let mut net = Vec::new();
    let mut snapshot = Vec::new();
    for round in 0..rounds {
        let mut order = [Subject::Clock, Subject::TokenUpdate, Subject::Snapshot];
        order.rotate_left(round % 3);
        let mut this = [0.0f64; 3];
        for subject in order {
            let n = if matches!(subject, Subject::Snapshot) {
                snapshot_calls
            } else {
                calls
            };
            this[subject as usize] = bench.run(subject, n);
        }
        clock.push(this[0]);
        update.push(this[1]);
        net.push(this[1] - this[0]);
        snapshot.push(this[2] / 1000.0);
    }
    drop(others);
    bench.update_handle.release();

    let mut report = Report::new("inflight", "In-flight table (ABI 1.2)");
    report.line(&format!(
        "`--bench inflight`: a heap table of {TABLE} entries (`--parallel 4 --max-queue 64`), all claimed; \
         {rounds} rounds of {calls} updates / clock reads and {snapshot_calls} snapshots, order rotating per round. \
         The update is what the inference thread does per output token of a running request (stamp, count, \
         seqlock-publish one copy of its 120-byte entry); the snapshot is one passive reader's torn-free copy of \
         every claimed entry (what `ringside-agent inflight` and the agent's stall check do per poll).\n"
    ));
    report.table(
        &["figure", "median (min–max)"],
        &[
            vec![
                "clock read (CLOCK_MONOTONIC), ns".into(),
                fmt_summary(&clock, 1),
            ],
            vec![
                "token update incl. clock, ns".into(),
                fmt_summary(&update, 1),
            ],
            vec![
                "token update − clock (same round), ns".into(),
                fmt_summary(&net, 1),
            ],
            vec![
                format!("snapshot of a full table ({TABLE} entries), µs"),
                fmt_summary(&snapshot, 2),
            ],
        ],
    );
    report.finish();
}
