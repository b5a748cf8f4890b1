//! Engine steps (ABI 1.4): a [`StepRecord`] and its validated form, [`Step`],
//! both ways, and the [`StepRing`] they travel in.
//!
//! The step ring is a second ring of the same 256-byte slots, in a region of
//! its own after the in-flight table: its own control block (only
//! `read_cursor` is used) and counters, then the slots, written and read with
//! exactly the request ring's commit protocol ([`crate::Producer`],
//! [`crate::Consumer`]). It always overwrites: it is a flight recorder of the
//! last `capacity` steps, and a reader that falls behind counts what it lost.
//! Steps are written only while tracing is on (the request ring's switch).
//!
//! * Writing: [`Step::encode`] is the one way a step record is built.
//! * Reading: [`StepRecord::decode`] checks a record copied out of the ring;
//!   a record that breaks an invariant is rejected with a [`StepError`]
//!   naming it. `s.encode().decode() == Ok(s)` for every valid `s`.

use crate::layout::{MAX_STEP_SLOTS, STEP_FLAG_FAILED, StepRecord};
use crate::ring::{
    Consumer, ConsumerTotals, CounterSnapshot, PollError, PollReport, Producer, PushOutcome, Ring,
    StartAt,
};

const SLOT_WORDS: usize = MAX_STEP_SLOTS / 64;

/// A set of sequence slots (`0..MAX_STEP_SLOTS`), as a step record stores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotSet([u64; SLOT_WORDS]);

impl SlotSet {
    /// The empty set.
    pub const EMPTY: Self = Self([0; SLOT_WORDS]);

    /// Adds `slot`; a slot past [`MAX_STEP_SLOTS`] is ignored (the engine's
    /// `--parallel` cannot name one).
    #[inline]
    pub fn insert(&mut self, slot: usize) {
        if slot < MAX_STEP_SLOTS {
            self.0[slot / 64] |= 1 << (slot % 64);
        }
    }

    /// Whether `slot` is in the set.
    #[inline]
    pub fn contains(&self, slot: u16) -> bool {
        let slot = usize::from(slot);
        slot < MAX_STEP_SLOTS && self.0[slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Number of slots in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; SLOT_WORDS]
    }

    /// The slots, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..MAX_STEP_SLOTS as u16).filter(|&s| self.contains(s))
    }

    /// One past the highest slot in the set (0 when empty).
    fn end(&self) -> usize {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map_or(0, |(i, w)| i * 64 + 64 - w.leading_zeros() as usize)
    }

    /// The stored words.
    pub const fn words(&self) -> [u64; SLOT_WORDS] {
        self.0
    }

    /// A set from stored words.
    pub const fn from_words(words: [u64; SLOT_WORDS]) -> Self {
        Self(words)
    }
}

/// A validated step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Step number since the engine started (from 1).
    pub step: u64,
    /// Before the first `llama_decode` (monotonic ns).
    pub t_start_ns: u64,
    /// After the decode calls and their sampling: when the decoded tokens
    /// were emitted. `t_start_ns <= t_decode_end_ns <= t_end_ns`.
    pub t_decode_end_ns: u64,
    /// After the last prompt chunk.
    pub t_end_ns: u64,
    /// Slots that decoded a token.
    pub decode_slots: SlotSet,
    /// Slots that computed prompt tokens.
    pub prefill_slots: SlotSet,
    /// Prompt tokens computed.
    pub prefill_tokens: u32,
    /// Rows the decode calls carried (placeholders included; at least one per
    /// decoding slot).
    pub decode_rows: u16,
    /// `llama_decode` calls for decode groups.
    pub decode_calls: u16,
    /// `llama_decode` calls for prompt chunks.
    pub prefill_calls: u16,
    /// Slots holding a request at the start.
    pub slots_occupied: u16,
    /// Slots in all (1..=[`MAX_STEP_SLOTS`]).
    pub slots_total: u16,
    /// KV cells holding tokens at the start.
    pub kv_cells_used: u32,
    /// KV cells in all.
    pub kv_cells_total: u32,
    /// Requests waiting for a slot at the start.
    pub queue_depth: u32,
    /// A `llama_decode` call failed.
    pub failed: bool,
}

/// Why a step record was rejected. It is skipped and counted; reading goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Step number 0, which no engine writes.
    #[error("step number 0")]
    ZeroStep,
    /// A stamp is missing or out of order.
    #[error("step stamps out of order or missing")]
    Timestamps,
    /// `slots_total` is 0 or over the limit, or a slot set names a slot past it.
    #[error("slot counts are impossible: {0}")]
    Slots(&'static str),
    /// Counts contradict each other.
    #[error("step counts are inconsistent: {0}")]
    Counts(&'static str),
}

impl StepRecord {
    /// Validates this (privately copied) step record.
    pub fn decode(&self) -> Result<Step, StepError> {
        if self.step == 0 {
            return Err(StepError::ZeroStep);
        }
        if self.t_start_ns == 0
            || self.t_decode_end_ns < self.t_start_ns
            || self.t_end_ns < self.t_decode_end_ns
        {
            return Err(StepError::Timestamps);
        }
        let total = usize::from(self.slots_total);
        if total == 0 || total > MAX_STEP_SLOTS {
            return Err(StepError::Slots("slots_total"));
        }
        let decode_slots = SlotSet(self.decode_slots);
        let prefill_slots = SlotSet(self.prefill_slots);
        if decode_slots.end() > total || prefill_slots.end() > total {
            return Err(StepError::Slots("a slot past slots_total"));
        }
        if self.slots_occupied > self.slots_total {
            return Err(StepError::Slots("more slots occupied than exist"));
        }
        if decode_slots.len() != u32::from(self.decode_sequences)
            || prefill_slots.len() != u32::from(self.prefill_sequences)
        {
            return Err(StepError::Counts(
                "sequence counts differ from the slot sets",
            ));
        }
        if u32::from(self.decode_rows) < decode_slots.len()
            || (self.decode_rows > 0) != (self.decode_calls > 0)
        {
            return Err(StepError::Counts("decode rows"));
        }
        if (self.prefill_tokens > 0) != (self.prefill_calls > 0)
            || u32::from(self.prefill_calls) < prefill_slots.len()
        {
            return Err(StepError::Counts("prefill tokens and calls"));
        }
        if self.kv_cells_used > self.kv_cells_total {
            return Err(StepError::Counts("more KV cells used than exist"));
        }
        Ok(Step {
            step: self.step,
            t_start_ns: self.t_start_ns,
            t_decode_end_ns: self.t_decode_end_ns,
            t_end_ns: self.t_end_ns,
            decode_slots,
            prefill_slots,
            prefill_tokens: self.prefill_tokens,
            decode_rows: self.decode_rows,
            decode_calls: self.decode_calls,
            prefill_calls: self.prefill_calls,
            slots_occupied: self.slots_occupied,
            slots_total: self.slots_total,
            kv_cells_used: self.kv_cells_used,
            kv_cells_total: self.kv_cells_total,
            queue_depth: self.queue_depth,
            failed: self.flags & STEP_FLAG_FAILED != 0,
        })
    }
}

impl Step {
    /// The ABI record for this step: the inverse of [`StepRecord::decode`].
    /// Checks nothing; plain copies, no allocation (the inference thread calls
    /// it once per step).
    #[inline]
    #[must_use]
    pub fn encode(&self) -> StepRecord {
        StepRecord {
            step: self.step,
            t_start_ns: self.t_start_ns,
            t_decode_end_ns: self.t_decode_end_ns,
            t_end_ns: self.t_end_ns,
            prefill_tokens: self.prefill_tokens,
            kv_cells_used: self.kv_cells_used,
            kv_cells_total: self.kv_cells_total,
            queue_depth: self.queue_depth,
            decode_sequences: u16::try_from(self.decode_slots.len()).unwrap_or(u16::MAX),
            prefill_sequences: u16::try_from(self.prefill_slots.len()).unwrap_or(u16::MAX),
            slots_occupied: self.slots_occupied,
            slots_total: self.slots_total,
            decode_calls: self.decode_calls,
            prefill_calls: self.prefill_calls,
            decode_rows: self.decode_rows,
            flags: if self.failed { STEP_FLAG_FAILED } else { 0 },
            decode_slots: self.decode_slots.0,
            prefill_slots: self.prefill_slots.0,
            reserved: [0; 120],
        }
    }

    /// Step duration.
    pub fn duration_ns(&self) -> u64 {
        self.t_end_ns - self.t_start_ns
    }

    /// Sequences the step worked on (decoding or prefilling).
    pub fn batch_sequences(&self) -> u32 {
        self.decode_slots.len() + self.prefill_slots.len()
    }
}

/// The step ring of a segment: a [`Ring`] of [`StepRecord`]s.
#[derive(Clone, Debug)]
pub struct StepRing {
    pub(crate) ring: Ring,
}

impl StepRing {
    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
    }

    /// The producer (the engine's inference thread).
    pub fn producer(&self) -> StepProducer {
        StepProducer {
            inner: self.ring.producer(),
        }
    }

    /// A consumer. Unlike the request ring, several readers may read the step
    /// ring (the agent's join and a capture); only one should commit a cursor.
    pub fn consumer(&self, start: StartAt) -> StepConsumer {
        StepConsumer {
            inner: self.ring.consumer(start),
        }
    }

    /// Current producer counters (`head` = steps written).
    pub fn counters(&self) -> CounterSnapshot {
        self.ring.counters()
    }

    /// The step ring's own resume point (its control block's `read_cursor`).
    pub fn read_cursor(&self) -> u64 {
        self.ring.control().read_cursor()
    }
}

/// Writes step records; wait-free like [`Producer`].
#[derive(Clone, Debug)]
pub struct StepProducer {
    inner: Producer,
}

impl StepProducer {
    /// Writes one step record.
    #[inline]
    pub fn push(&self, record: &StepRecord) -> PushOutcome {
        self.inner.push_words(bytemuck::cast_ref(record))
    }
}

/// Reads step records in order, counting what it lost, like [`Consumer`].
#[derive(Debug)]
pub struct StepConsumer {
    inner: Consumer,
}

impl StepConsumer {
    /// The next ticket to read.
    pub fn cursor(&self) -> u64 {
        self.inner.cursor()
    }

    /// Totals since creation.
    pub fn totals(&self) -> ConsumerTotals {
        self.inner.totals()
    }

    /// Sets how long a ticket whose producer has not committed is waited for.
    pub fn set_abandon_after_ns(&mut self, ns: u64) {
        self.inner.set_abandon_after_ns(ns);
    }

    /// Publishes `ticket` as the step ring's resume point.
    pub fn commit_cursor(&self, ticket: u64) {
        self.inner.commit_cursor(ticket);
    }

    /// Delivers up to `max` step records to `sink` as `(ticket, record)`.
    #[cfg(not(loom))]
    pub fn poll(
        &mut self,
        max: usize,
        sink: impl FnMut(u64, &StepRecord),
    ) -> Result<PollReport, PollError> {
        self.poll_at(crate::clock::monotonic_ns(), max, sink)
    }

    /// [`poll`](Self::poll) given the current monotonic time.
    #[cfg(not(loom))]
    pub fn poll_at(
        &mut self,
        now_ns: u64,
        max: usize,
        mut sink: impl FnMut(u64, &StepRecord),
    ) -> Result<PollReport, PollError> {
        self.inner.poll_at(now_ns, max, |ticket, record| {
            sink(ticket, bytemuck::cast_ref(record));
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    pub(crate) fn sample_step(n: u64) -> Step {
        let mut decode_slots = SlotSet::EMPTY;
        decode_slots.insert(0);
        decode_slots.insert(2);
        let mut prefill_slots = SlotSet::EMPTY;
        prefill_slots.insert(255);
        Step {
            step: n,
            t_start_ns: 1_000 * n,
            t_decode_end_ns: 1_000 * n + 400,
            t_end_ns: 1_000 * n + 900,
            decode_slots,
            prefill_slots,
            prefill_tokens: 64,
            decode_rows: 4,
            decode_calls: 1,
            prefill_calls: 1,
            slots_occupied: 3,
            slots_total: 256,
            kv_cells_used: 500,
            kv_cells_total: 1_000,
            queue_depth: 2,
            failed: false,
        }
    }

    #[test]
    fn a_step_round_trips_through_its_record() {
        let step = sample_step(7);
        let record = step.encode();
        assert_eq!(record.decode_sequences, 2);
        assert_eq!(record.prefill_sequences, 1);
        assert_eq!(record.reserved, [0; 120]);
        assert_eq!(record.decode(), Ok(step));
        assert_eq!(step.decode_slots.iter().collect::<Vec<_>>(), [0, 2]);
        assert!(step.prefill_slots.contains(255) && !step.prefill_slots.contains(254));
    }

    #[test]
    fn forged_step_records_are_rejected_by_name() {
        let good = sample_step(3).encode();
        let mut r = good;
        r.step = 0;
        assert_eq!(r.decode(), Err(StepError::ZeroStep));
        let mut r = good;
        r.t_end_ns = r.t_decode_end_ns - 1;
        assert_eq!(r.decode(), Err(StepError::Timestamps));
        let mut r = good;
        r.slots_total = 255;
        assert_eq!(r.decode(), Err(StepError::Slots("a slot past slots_total")));
        let mut r = good;
        r.slots_total = 0;
        assert_eq!(r.decode(), Err(StepError::Slots("slots_total")));
        let mut r = good;
        r.decode_sequences = 3;
        assert!(matches!(r.decode(), Err(StepError::Counts(_))));
        let mut r = good;
        r.decode_rows = 1;
        assert!(matches!(r.decode(), Err(StepError::Counts(_))));
        let mut r = good;
        r.prefill_calls = 0;
        assert!(matches!(r.decode(), Err(StepError::Counts(_))));
        let mut r = good;
        r.kv_cells_used = r.kv_cells_total + 1;
        assert!(matches!(r.decode(), Err(StepError::Counts(_))));
        let mut r = good;
        r.slots_occupied = 257;
        assert!(matches!(r.decode(), Err(StepError::Slots(_))));
    }

    #[test]
    fn a_heap_step_ring_delivers_in_order_and_counts_what_it_overwrote() {
        let steps = StepRing::on_heap(8).unwrap();
        let producer = steps.producer();
        for n in 1..=20 {
            assert!(matches!(
                producer.push(&sample_step(n).encode()),
                PushOutcome::Written(_)
            ));
        }
        let mut consumer = steps.consumer(StartAt::Ticket(0));
        let mut seen = Vec::new();
        consumer
            .poll(usize::MAX, |_, r| seen.push(r.decode().unwrap().step))
            .unwrap();
        assert_eq!(seen, (13..=20).collect::<Vec<_>>());
        assert_eq!(consumer.totals().lost_overwritten, 12);
        assert_eq!(steps.counters().head, 20);
    }
}
