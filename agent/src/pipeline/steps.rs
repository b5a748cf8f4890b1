//! Engine steps joined to requests: each request's inter-token gaps and the
//! batch it shared.
//!
//! An engine with a step ring (ABI 1.4) writes one [`Step`] per scheduler
//! step, and each request record names the sequence slot it was served in.
//! The engine pushes a step's record before the records of the requests that
//! ended in it, so once the reader has a request's record, polling the step
//! ring gives every step that carried it.
//!
//! The join: the steps that carried request `r` after its first token are
//! those whose `decode_slots` hold `r`'s slot and that started between its
//! first and last token (a slot is reused only after its request ended, and
//! every stamp comes from the one inference thread, so the window is exact).
//! Each produced one output token, emitted at the step's `t_decode_end_ns`;
//! the first token's time is the record's own stamp. So a request with `n`
//! tokens has `n - 1` gaps, and when the window holds fewer than `n - 1` such
//! steps (the ring overwrote them, or the agent attached late) the request
//! gets no gap statistics, and is counted (`steps_unjoined`): never a guess.

use crate::pipeline::accounting::EngineStats;
use ringside_shm_protocol::{
    PollError, RequestRecord, StartAt, Step, StepConsumer, StepError, StepRing,
};
use std::collections::VecDeque;

/// Steps kept per engine for joining (about 2.3 MB): a request whose first
/// token is older than the last this many steps gets no gap statistics.
pub const WINDOW_STEPS: usize = 16_384;
/// Step records taken from the ring per poll call.
const POLL_STEPS: usize = 4096;

/// What the steps say about one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestSteps {
    /// The largest of its `completion_tokens - 1` gaps (ns).
    pub gap_max_ns: u64,
    /// The median gap, nearest rank (ns).
    pub gap_p50_ns: u64,
    /// The 99th percentile gap, nearest rank (ns).
    pub gap_p99_ns: u64,
    /// Steps that decoded one of its tokens and also computed prompt tokens of
    /// other requests (the prefill that delayed its next token).
    pub prefill_steps: u32,
    /// Prompt tokens those steps computed.
    pub prefill_tokens: u64,
}

/// Where the nearest-rank percentile `p` (1..=100) of `len` (> 0) sorted
/// values stands: the ceil(p·len/100)-th smallest, as an index.
pub(crate) fn nearest_rank_index(len: usize, p: usize) -> usize {
    (len * p).div_ceil(100).clamp(1, len.max(1)) - 1
}

/// The nearest-rank percentile `p` of ascending `sorted` (not empty).
fn nearest_rank(sorted: &[u64], p: usize) -> u64 {
    sorted[nearest_rank_index(sorted.len(), p)]
}

/// The recent steps of one engine, read from its step ring.
#[derive(Debug)]
pub struct StepWindow {
    consumer: StepConsumer,
    /// Slots of the step ring: the most one poll reads.
    capacity: u64,
    steps: VecDeque<Step>,
    /// Scratch: the gaps of the request being joined.
    gaps: Vec<u64>,
    /// The first invalid step of the last poll, for the log.
    pub last_error: Option<StepError>,
}

impl StepWindow {
    /// A window over `ring`, starting at `start`.
    pub fn new(ring: &StepRing, start: StartAt) -> Self {
        Self {
            consumer: ring.consumer(start),
            capacity: ring.capacity(),
            steps: VecDeque::with_capacity(1024),
            gaps: Vec::new(),
            last_error: None,
        }
    }

    /// Reads the steps the ring holds past the cursor into the window (at
    /// most one ring's worth per call, so a writer that never stops cannot
    /// hold the reader), counting what was read, lost and invalid in
    /// `stats`, and hands each valid step to `on_step` (the metrics).
    /// Returns the steps read.
    pub fn poll(
        &mut self,
        stats: &EngineStats,
        mut on_step: impl FnMut(&Step),
    ) -> Result<u64, PollError> {
        let mut read = 0;
        self.last_error = None;
        let most = usize::try_from(self.capacity).unwrap_or(usize::MAX);
        while read < self.capacity {
            let mut invalid = 0;
            let steps = &mut self.steps;
            let last_error = &mut self.last_error;
            let batch = POLL_STEPS.min(most);
            let report = self.consumer.poll(batch, |_, raw| match raw.decode() {
                Ok(step) => {
                    // One inference thread writes them in order. A step out of
                    // order (a forged one, ahead of the real clock) would break
                    // the join's binary search: the window starts again from
                    // this step, so one forged step costs the joins of the
                    // requests running then, not every later one.
                    if steps.back().is_some_and(|b| b.t_start_ns > step.t_start_ns) {
                        invalid += 1;
                        steps.clear();
                    }
                    on_step(&step);
                    if steps.len() == WINDOW_STEPS {
                        steps.pop_front();
                    }
                    steps.push_back(step);
                }
                Err(e) => {
                    invalid += 1;
                    last_error.get_or_insert(e);
                }
            })?;
            EngineStats::add(&stats.steps_read, report.delivered);
            EngineStats::add(&stats.steps_overwritten, report.lost_overwritten);
            EngineStats::add(&stats.steps_abandoned, report.lost_abandoned);
            EngineStats::add(&stats.steps_invalid, invalid);
            read += report.delivered;
            if report.delivered < batch as u64 {
                break;
            }
        }
        Ok(read)
    }

    /// Steps held.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether no step is held.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Joins `record` to the steps that carried it: `None` when it has fewer
    /// than two tokens, no slot (an older engine, never scheduled) or when
    /// the window lacks some of its steps. With it, the request's gaps in
    /// ascending order (ns), for the inter-token histogram.
    pub fn join(&mut self, record: &RequestRecord) -> Option<(RequestSteps, &[u64])> {
        let slot = record.sequence_slot?;
        let t = &record.timestamps;
        let (first, last) = (t.first_token_ns?, t.last_token_ns?);
        let expected = record.completion_tokens.checked_sub(1).filter(|n| *n > 0)?;
        let from = self.steps.partition_point(|s| s.t_start_ns < first);
        self.gaps.clear();
        let mut out = RequestSteps::default();
        let mut previous = first;
        for step in self.steps.range(from..) {
            if step.t_start_ns > last {
                break;
            }
            if !step.decode_slots.contains(slot) {
                continue;
            }
            self.gaps
                .push(step.t_decode_end_ns.saturating_sub(previous));
            previous = step.t_decode_end_ns;
            if !step.prefill_slots.is_empty() {
                out.prefill_steps += 1;
                out.prefill_tokens += u64::from(step.prefill_tokens);
            }
        }
        if self.gaps.len() != expected as usize {
            return None;
        }
        self.gaps.sort_unstable();
        out.gap_max_ns = *self.gaps.last()?;
        out.gap_p50_ns = nearest_rank(&self.gaps, 50);
        out.gap_p99_ns = nearest_rank(&self.gaps, 99);
        Some((out, &self.gaps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringside_shm_protocol::{SlotSet, Step, StepRing};

    fn step(n: u64, t: u64, decode: &[usize], prefill: &[(usize, u32)]) -> Step {
        let mut decode_slots = SlotSet::EMPTY;
        for &s in decode {
            decode_slots.insert(s);
        }
        let mut prefill_slots = SlotSet::EMPTY;
        let mut prefill_tokens = 0;
        for &(s, n) in prefill {
            prefill_slots.insert(s);
            prefill_tokens += n;
        }
        Step {
            step: n,
            t_start_ns: t,
            t_decode_end_ns: t + 10,
            t_end_ns: t + 10 + u64::from(prefill_tokens),
            decode_slots,
            prefill_slots,
            prefill_tokens,
            decode_rows: if decode.is_empty() { 0 } else { 4 },
            decode_calls: u16::from(!decode.is_empty()),
            prefill_calls: u16::try_from(prefill.len()).unwrap(),
            slots_total: 4,
            slots_occupied: 2,
            kv_cells_total: 100,
            ..Step::default()
        }
    }

    fn window(steps: &[Step]) -> StepWindow {
        let ring = StepRing::on_heap(64).unwrap();
        let producer = ring.producer();
        for s in steps {
            let _ = producer.push(&s.encode());
        }
        let mut w = StepWindow::new(&ring, StartAt::Oldest);
        let stats = EngineStats::default();
        w.poll(&stats, |_| {}).unwrap();
        w
    }

    fn request(slot: u16, first: u64, last: u64, tokens: u32) -> RequestRecord {
        let mut r = crate::pipeline::spans::tests::raw_record(1)
            .decode(8)
            .unwrap();
        r.sequence_slot = Some(slot);
        r.timestamps.first_token_ns = Some(first);
        r.timestamps.last_token_ns = Some(last);
        r.completion_tokens = tokens;
        r
    }

    #[test]
    fn the_gaps_are_the_decode_steps_of_the_slot_between_first_and_last_token() {
        // Slot 1: first token at 105 (prefill), decodes at 200, 300 and a slow 900
        // (a 500-token prefill of slot 2 ran in the step before), EOG at 1000.
        let w = &mut window(&[
            step(1, 100, &[0], &[(1, 64)]),
            step(2, 190, &[0, 1], &[]),
            step(3, 290, &[1], &[(2, 500)]),
            step(4, 890, &[1, 2], &[]),
            step(5, 990, &[1], &[]),
        ]);
        let r = request(1, 105, 900, 4);
        let (s, gaps) = w.join(&r).unwrap();
        assert_eq!(gaps, [95, 100, 600]);
        assert_eq!((s.gap_max_ns, s.gap_p50_ns, s.gap_p99_ns), (600, 100, 600));
        assert_eq!((s.prefill_steps, s.prefill_tokens), (1, 500));
    }

    #[test]
    fn a_request_whose_steps_are_missing_gets_no_gaps() {
        let w = &mut window(&[step(2, 190, &[1], &[]), step(3, 290, &[1], &[])]);
        // Three gaps expected, two steps present.
        assert!(w.join(&request(1, 105, 300, 4)).is_none());
        // One token: no gap at all.
        assert!(w.join(&request(1, 105, 105, 1)).is_none());
        let mut no_slot = request(1, 105, 300, 3);
        no_slot.sequence_slot = None;
        assert!(w.join(&no_slot).is_none());
        assert!(w.join(&request(1, 105, 300, 3)).is_some());
    }

    #[test]
    fn a_forged_step_ahead_of_the_clock_costs_the_window_once_not_every_later_join() {
        let forged = step(9, u64::MAX / 2, &[1], &[]);
        let w = &mut window(&[
            step(1, 100, &[1], &[]),
            forged,
            step(2, 190, &[1], &[]),
            step(3, 290, &[1], &[]),
        ]);
        // The real steps after the forged one are joined again.
        assert_eq!(w.len(), 2);
        assert!(w.join(&request(1, 105, 300, 3)).is_some());
    }

    #[test]
    fn one_poll_reads_at_most_one_ring_of_steps() {
        let ring = StepRing::on_heap(8).unwrap();
        let producer = ring.producer();
        let mut w = StepWindow::new(&ring, StartAt::Oldest);
        for n in 1..=8 {
            let _ = producer.push(&step(n, n * 100, &[0], &[]).encode());
        }
        let stats = EngineStats::default();
        // The writer keeps writing while the reader reads: one ring at most.
        let read = w.poll(&stats, |s| {
            let _ = producer.push(&step(s.step + 8, (s.step + 8) * 100, &[0], &[]).encode());
        });
        assert_eq!(read.unwrap(), 8);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=200).collect();
        assert_eq!(nearest_rank(&v, 50), 100);
        assert_eq!(nearest_rank(&v, 99), 198);
        assert_eq!(nearest_rank(&[7], 99), 7);
    }
}
