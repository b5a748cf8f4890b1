//! The step record (ABI 1.4): what the inference thread pays per scheduler
//! step to record it, against what it pays per request to record that (the
//! request record push `hot_path` and `ring` measure), in the same rounds.
//!
//! The step subject does what `engine/src/scheduler.rs` does around a step
//! with tracing on, at `--parallel 4` (the engine's default), every slot
//! decoding in one group and one of them also computing a prompt chunk:
//! `begin_step_record` (walk the slots for occupancy and KV cells, reset the
//! record), the counts `decode_group` and `prefill_chunk` add, the two
//! stamps the step takes for its record (decode end, step end), then
//! `Telemetry::record_step`: the tracing check, `Step::encode` and one push
//! into a heap step ring of the engine's default capacity (4096). The step
//! start stamp is read too: the scheduler read it before steps were
//! recorded (for its `step` trace line), so the figure overstates.
//! `Telemetry::record_step`'s one `ArcSwap` load (the segment the heartbeat
//! may replace) is not in it: a few ns, the same load every request push
//! makes.
//!
//! Also counted per call: allocations made by the calling thread (the
//! counting allocator is this bench's global allocator), which must be 0.
//!
//! `cargo bench -p ringside-perf --bench steps`; `STEPS_ROUNDS` rounds
//! (default 8) of `STEPS_CALLS` calls per subject (default 200 000),
//! subjects interleaved with the order rotating per round.

#![forbid(unsafe_code)]

use ringside_perf::alloc::{Counting, thread_counts};
use ringside_perf::{Report, engine_like_record, env_usize, fmt_summary};
use ringside_shm_protocol::{
    ControlDefaults, Producer, Record, Ring, Step, StepProducer, StepRecord, StepRing, monotonic_ns,
};
use std::hint::black_box;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `--parallel 4`, the engine's default.
const PARALLEL: usize = 4;
/// The engine's default `--step-ring-capacity` and request ring capacity.
const STEP_RING: u32 = 4096;
const REQUEST_RING: u32 = 16384;
/// KV cells per sequence (the default model's context split over the slots).
const N_CTX_SEQ: u32 = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    /// One `CLOCK_MONOTONIC` read.
    Clock,
    /// The request record push: stamp + copy + commit (as `ring`/`hot_path`).
    RecordPush,
    /// A step built as the scheduler builds it, encoded and pushed.
    StepPush,
    /// A ready step record stamped and pushed: the step ring's share of
    /// `StepPush`, like for like with `RecordPush`.
    StepRecordPush,
}

const SUBJECTS: [Subject; 4] = [
    Subject::Clock,
    Subject::RecordPush,
    Subject::StepPush,
    Subject::StepRecordPush,
];

/// What the scheduler keeps that `begin_step_record` reads: per slot, a
/// request's KV position or, for a free slot, its kept prompt.
struct Scheduler {
    slots: Vec<Option<i32>>,
    kept: Vec<Vec<u32>>,
    pending: usize,
    current: Step,
}

fn saturate_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn saturate_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Scheduler {
    /// `Engine::begin_step_record`, field for field.
    fn begin_step_record(&mut self, t_start: u64) {
        let mut occupied = 0;
        let mut kv_used = 0usize;
        for (slot, kept) in self.slots.iter().zip(&self.kept) {
            match slot {
                Some(n_past) => {
                    occupied += 1;
                    kv_used += usize::try_from(*n_past).unwrap_or(0);
                }
                None => kv_used += kept.len(),
            }
        }
        let number = self.current.step.wrapping_add(1).max(1);
        self.current = Step {
            step: number,
            t_start_ns: t_start,
            t_decode_end_ns: t_start,
            t_end_ns: t_start,
            slots_occupied: saturate_u16(occupied),
            slots_total: saturate_u16(self.slots.len()),
            kv_cells_used: saturate_u32(kv_used),
            kv_cells_total: N_CTX_SEQ.saturating_mul(saturate_u32(self.slots.len())),
            queue_depth: saturate_u32(self.pending),
            ..Step::default()
        };
    }

    /// One step's recording: the scheduler's `step` with the decode and
    /// prefill calls taken out, leaving what it does for the record.
    fn step(&mut self, steps: &StepProducer, requests: &Producer) {
        let t_step = monotonic_ns();
        self.begin_step_record(t_step);
        // `decode_group`: one call for the group, a row per slot.
        let rows = black_box(self.slots.len());
        self.current.decode_calls = self.current.decode_calls.saturating_add(1);
        self.current.decode_rows = self.current.decode_rows.saturating_add(saturate_u16(rows));
        for i in 0..self.slots.len() {
            if black_box(self.slots[i].is_some()) {
                self.current.decode_slots.insert(i);
            }
        }
        self.current.t_decode_end_ns = if self.current.decode_calls > 0 {
            monotonic_ns()
        } else {
            t_step
        };
        // `prefill_chunk`: slot 3 computes a 64-token chunk.
        self.current.prefill_calls = self.current.prefill_calls.saturating_add(1);
        self.current.prefill_slots.insert(black_box(3));
        self.current.prefill_tokens = self
            .current
            .prefill_tokens
            .saturating_add(saturate_u32(black_box(64)));
        let t_end = monotonic_ns();
        if self.current.decode_calls > 0 || self.current.prefill_calls > 0 {
            self.current.t_end_ns = t_end.max(self.current.t_decode_end_ns);
            // `Telemetry::record_step`: steps are written while tracing is on.
            if requests.tracing_enabled() {
                let _ = black_box(steps.push(&self.current.encode()));
            }
        }
    }
}

struct Bench {
    requests: Producer,
    steps: StepProducer,
    record: Record,
    step_record: StepRecord,
    scheduler: Scheduler,
}

/// One subject's pass: ns per call and allocations per call.
fn run(bench: &mut Bench, subject: Subject, calls: usize) -> (f64, f64) {
    let before = thread_counts();
    let start = Instant::now();
    match subject {
        Subject::Clock => {
            for _ in 0..calls {
                black_box(monotonic_ns());
            }
        }
        Subject::RecordPush => {
            for _ in 0..calls {
                bench.record.t_finished_ns = monotonic_ns();
                let _ = black_box(bench.requests.push(black_box(&bench.record)));
            }
        }
        Subject::StepPush => {
            for _ in 0..calls {
                bench.scheduler.step(&bench.steps, &bench.requests);
            }
        }
        Subject::StepRecordPush => {
            for _ in 0..calls {
                bench.step_record.t_end_ns = monotonic_ns();
                let _ = black_box(bench.steps.push(black_box(&bench.step_record)));
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / calls as f64;
    let allocs = thread_counts().since(before).allocs as f64 / calls as f64;
    (ns, allocs)
}

fn main() {
    let rounds = env_usize("STEPS_ROUNDS", 8).max(1);
    let calls = env_usize("STEPS_CALLS", 200_000).max(1);

    let request_ring = Ring::on_heap(REQUEST_RING, ControlDefaults::default()).expect("ring");
    let step_ring = StepRing::on_heap(STEP_RING).expect("step ring");
    let mut bench = Bench {
        requests: request_ring.producer(),
        steps: step_ring.producer(),
        record: engine_like_record(1),
        step_record: Step {
            step: 1,
            t_start_ns: 1,
            t_decode_end_ns: 1,
            t_end_ns: 1,
            slots_total: PARALLEL as u16,
            ..Step::default()
        }
        .encode(),
        scheduler: Scheduler {
            // Four requests 300 tokens in; the kept prompts are for free slots.
            slots: vec![Some(300); PARALLEL],
            kept: vec![vec![0; 40]; PARALLEL],
            pending: 2,
            current: Step::default(),
        },
    };
    assert!(bench.requests.tracing_enabled(), "tracing is on by default");

    // Warm up (page faults over both rings, caches).
    for subject in SUBJECTS {
        run(&mut bench, subject, 2 * STEP_RING as usize);
    }
    let steps_before = step_ring.counters().head;

    let mut ns: [Vec<f64>; 4] = Default::default();
    let mut allocs: [Vec<f64>; 4] = Default::default();
    let mut step_over_record = Vec::new();
    let mut step_push_over_record = Vec::new();
    let mut step_net = Vec::new();
    let mut record_net = Vec::new();
    for round in 0..rounds {
        let mut order = SUBJECTS;
        order.rotate_left(round % SUBJECTS.len());
        if (round / SUBJECTS.len()) % 2 == 1 {
            order.reverse();
        }
        let mut this = [0.0f64; 4];
        for subject in order {
            let (t, a) = run(&mut bench, subject, calls);
            this[subject as usize] = t;
            allocs[subject as usize].push(a);
        }
        for (i, t) in this.iter().enumerate() {
            ns[i].push(*t);
        }
        step_over_record.push(this[2] / this[1]);
        step_push_over_record.push(this[3] / this[1]);
        // The step reads the clock three times, the request push once.
        step_net.push(this[2] - 3.0 * this[0]);
        record_net.push(this[1] - this[0]);
    }
    let written = step_ring.counters().head - steps_before;
    assert_eq!(
        written,
        2 * (rounds * calls) as u64,
        "every step was pushed (tracing on)"
    );
    // Whatever the ring still holds reads back valid (the check the agent
    // makes): the bench pushed real step records.
    let (valid, invalid) = {
        let mut consumer = step_ring.consumer(ringside_shm_protocol::StartAt::Oldest);
        let (mut valid, mut invalid) = (0u64, 0u64);
        consumer
            .poll(usize::MAX, |_, r| match r.decode() {
                Ok(_) => valid += 1,
                Err(_) => invalid += 1,
            })
            .expect("heap step ring");
        (valid, invalid)
    };
    assert!(
        valid == u64::from(STEP_RING) && invalid == 0,
        "{valid} valid and {invalid} invalid step records read back"
    );

    let mut report = Report::new("steps", "Step record push (ABI 1.4)");
    report.line(&format!(
        "`--bench steps`: {rounds} rounds of {calls} calls per subject, order rotating per round (and reversed every \
         other cycle). Step: what the scheduler does to record one step at `--parallel {PARALLEL}` with tracing on — \
         `begin_step_record` (slot walk, record reset), the decode and prefill counts, the step's three stamps \
         (start, decode end, end; the start stamp predates step records), the tracing check, `Step::encode` and one \
         push into a heap step ring of {STEP_RING} slots (the default `--step-ring-capacity`); the `llama_decode` \
         calls themselves are left out. Request record: stamp + copy of the 256-byte record + commit into a heap \
         request ring of {REQUEST_RING} (as `ring` and `hot_path` measure it). Ready step record: a built step record \
         stamped and pushed (the ring's share, like for like with the request record push, which also pushes a \
         ready record). Every record pushed: {written} steps; the {valid} still in the ring read back and decoded valid. Allocations: counted by this bench's global allocator on the \
         calling thread.\n"
    ));
    report.table(
        &["figure", "median (min–max)"],
        &[
            vec![
                "clock read (CLOCK_MONOTONIC), ns".into(),
                fmt_summary(&ns[0], 1),
            ],
            vec![
                "request record push incl. 1 clock read, ns".into(),
                fmt_summary(&ns[1], 1),
            ],
            vec![
                "**step build + encode + push** incl. 3 clock reads, ns".into(),
                fmt_summary(&ns[2], 1),
            ],
            vec![
                "ready step record push incl. 1 clock read, ns".into(),
                fmt_summary(&ns[3], 1),
            ],
            vec![
                "step ÷ request record push (same round)".into(),
                fmt_summary(&step_over_record, 2),
            ],
            vec![
                "ready step record push ÷ request record push (same round)".into(),
                fmt_summary(&step_push_over_record, 2),
            ],
            vec![
                "request record push − 1 clock read (same round), ns".into(),
                fmt_summary(&record_net, 1),
            ],
            vec![
                "step − 3 clock reads (same round), ns".into(),
                fmt_summary(&step_net, 1),
            ],
            vec![
                "allocations per request record push".into(),
                fmt_summary(&allocs[1], 3),
            ],
            vec![
                "allocations per step recorded".into(),
                fmt_summary(&allocs[2], 3),
            ],
        ],
    );
    report.finish();
}
