//! The daemon's automatic triggers: a condition per engine (an error burst,
//! a TTFT p99 breach), and a [`Trigger`] that fires once per incident.
//!
//! A trigger fires when its condition starts to hold. It re-arms only after
//! the condition has cleared and stayed cleared for the cool-down: a
//! condition that holds again during the cool-down is the same incident
//! and fires nothing (and the cool-down starts over when it clears again).

use ringside_shm_protocol::RequestRecord;
use std::collections::VecDeque;

/// Where a trigger is in its incident cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Ready to fire.
    Armed,
    /// Fired; the condition still holds.
    Holding,
    /// Fired; the condition has cleared since `since_ns`.
    Clearing { since_ns: u64 },
}

/// Fires once per incident (see the module docs).
#[derive(Clone, Debug)]
pub struct Trigger {
    state: State,
    cooldown_ns: u64,
}

impl Trigger {
    /// An armed trigger with a cool-down of `cooldown_ns`.
    pub fn new(cooldown_ns: u64) -> Self {
        Self {
            state: State::Armed,
            cooldown_ns,
        }
    }

    /// Takes the condition's value at `now_ns`; true when the trigger fires.
    pub fn update(&mut self, condition: bool, now_ns: u64) -> bool {
        match self.state {
            State::Armed if condition => {
                self.state = State::Holding;
                return true;
            }
            State::Armed => {}
            State::Holding if !condition => self.state = State::Clearing { since_ns: now_ns },
            State::Holding => {}
            State::Clearing { .. } if condition => self.state = State::Holding,
            State::Clearing { since_ns } => {
                if now_ns.saturating_sub(since_ns) >= self.cooldown_ns {
                    self.state = State::Armed;
                }
            }
        }
        false
    }

    /// Whether it would fire on the condition's next start.
    pub fn armed(&self) -> bool {
        self.state == State::Armed
    }
}

/// N error requests (`RequestRecord::is_error`: an error class or an HTTP
/// status of 400 or more, so rejected and invalid requests count) within a
/// window: only the last N end stamps are kept.
#[derive(Clone, Debug)]
pub struct ErrorBurst {
    errors: usize,
    window_ns: u64,
    /// End stamps of the last `errors` error requests.
    recent: VecDeque<u64>,
}

impl ErrorBurst {
    /// `errors` (at least 1) within `window_ns`.
    pub fn new(errors: u32, window_ns: u64) -> Self {
        let errors = usize::try_from(errors.max(1)).unwrap_or(usize::MAX);
        Self {
            errors,
            window_ns,
            recent: VecDeque::with_capacity(errors.min(1024)),
        }
    }

    /// Takes one finished request.
    pub fn observe(&mut self, record: &RequestRecord) {
        if record.is_error() {
            if self.recent.len() == self.errors {
                self.recent.pop_front();
            }
            self.recent.push_back(record.timestamps.finished_ns);
        }
    }

    /// Whether N errors ended within the window before `now_ns`.
    pub fn holds(&self, now_ns: u64) -> bool {
        self.recent.len() == self.errors
            && self
                .recent
                .front()
                .is_some_and(|&oldest| now_ns.saturating_sub(oldest) <= self.window_ns)
    }
}

/// Samples the TTFT window holds at most (the oldest go first): bounds
/// memory and the p99's cost at any request rate.
const TTFT_SAMPLES_MAX: usize = 65_536;

/// The p99 of the time to first token of the requests that ended within a
/// window, against a threshold.
#[derive(Clone, Debug)]
pub struct TtftP99 {
    threshold_ns: u64,
    window_ns: u64,
    min_requests: usize,
    /// (end stamp, ttft), oldest first.
    samples: VecDeque<(u64, u64)>,
    scratch: Vec<u64>,
}

impl TtftP99 {
    /// Fires above `threshold_ns` over `window_ns`, given `min_requests`.
    pub fn new(threshold_ns: u64, window_ns: u64, min_requests: u32) -> Self {
        Self {
            threshold_ns,
            window_ns,
            min_requests: usize::try_from(min_requests.max(1)).unwrap_or(usize::MAX),
            samples: VecDeque::new(),
            scratch: Vec::new(),
        }
    }

    /// Takes one finished request (those without a first token have no TTFT).
    pub fn observe(&mut self, record: &RequestRecord) {
        if let Some(ttft) = record.ttft_ns() {
            if self.samples.len() == TTFT_SAMPLES_MAX {
                self.samples.pop_front();
            }
            self.samples
                .push_back((record.timestamps.finished_ns, ttft));
        }
    }

    /// The p99 (nearest rank) of the window before `now_ns`, if it holds
    /// enough requests.
    pub fn p99(&mut self, now_ns: u64) -> Option<u64> {
        let from = now_ns.saturating_sub(self.window_ns);
        while self.samples.front().is_some_and(|&(end, _)| end < from) {
            self.samples.pop_front();
        }
        if self.samples.len() < self.min_requests {
            return None;
        }
        self.scratch.clear();
        self.scratch.extend(self.samples.iter().map(|&(_, t)| t));
        let rank = crate::pipeline::steps::nearest_rank_index(self.scratch.len(), 99);
        Some(*self.scratch.select_nth_unstable(rank).1)
    }

    /// Whether the p99 is above the threshold.
    pub fn holds(&mut self, now_ns: u64) -> bool {
        self.p99(now_ns).is_some_and(|p| p > self.threshold_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringside_shm_protocol::{
        ErrorType, FinishReason, Operation, RecordKind, Sampling, Timestamps,
    };

    const S: u64 = 1_000_000_000;

    fn record(end_ns: u64, ttft_ns: u64, error: bool) -> RequestRecord {
        RequestRecord {
            kind: RecordKind::RequestFinished,
            operation: Operation::Chat,
            request_id: [1; 16],
            trace_id: [2; 16],
            parent_span_id: None,
            span_id: [3; 8],
            trace_flags: 0,
            ot: Default::default(),
            timestamps: Timestamps {
                arrival_ns: end_ns - ttft_ns - 1,
                scheduled_ns: Some(end_ns - ttft_ns - 1),
                first_token_ns: Some(end_ns - 1),
                last_token_ns: Some(end_ns - 1),
                finished_ns: end_ns,
            },
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: 0,
            sampling: Sampling::default(),
            params_set: 0,
            stream: false,
            finish_reason: if error {
                FinishReason::Error
            } else {
                FinishReason::Stop
            },
            http_status: if error { 400 } else { 200 },
            error_type: if error {
                ErrorType::InvalidRequest
            } else {
                ErrorType::None
            },
            model_index: 0,
            queue_depth: 0,
            running: 0,
            sequence_slot: None,
        }
    }

    #[test]
    fn a_trigger_fires_once_while_the_condition_holds() {
        let mut t = Trigger::new(10 * S);
        assert!(!t.update(false, S));
        assert!(t.update(true, 2 * S));
        for now in 3..20 {
            assert!(!t.update(true, now * S), "fired again at {now} s");
        }
    }

    #[test]
    fn a_trigger_rearms_only_after_the_condition_cleared_for_the_cooldown() {
        let mut t = Trigger::new(10 * S);
        assert!(t.update(true, 0));
        // Cleared at 5 s; back at 8 s, within the cool-down: the same incident.
        assert!(!t.update(false, 5 * S));
        assert!(!t.update(true, 8 * S));
        // Cleared again at 9 s: the cool-down starts over.
        assert!(!t.update(false, 9 * S));
        assert!(!t.update(false, 18 * S));
        assert!(!t.armed());
        assert!(!t.update(true, 18 * S + 1), "inside the new cool-down");
        assert!(!t.update(false, 19 * S));
        assert!(!t.update(false, 29 * S));
        assert!(t.armed(), "cleared for the whole cool-down");
        assert!(t.update(true, 30 * S), "a new incident fires");
    }

    #[test]
    fn an_error_burst_needs_n_errors_within_the_window() {
        let mut b = ErrorBurst::new(3, 10 * S);
        b.observe(&record(S, 1, true));
        b.observe(&record(2 * S, 1, false));
        b.observe(&record(3 * S, 1, true));
        assert!(!b.holds(3 * S), "two errors");
        b.observe(&record(12 * S, 1, true));
        assert!(!b.holds(12 * S), "the first is out of the window");
        b.observe(&record(13 * S, 1, true));
        assert!(b.holds(13 * S), "3, 12 and 13 s");
        assert!(!b.holds(24 * S), "cleared as time passes");
    }

    #[test]
    fn the_ttft_p99_is_the_nearest_rank_over_the_window() {
        let mut p = TtftP99::new(500_000_000, 60 * S, 10);
        for i in 0..9 {
            p.observe(&record(100 * S + i, 1_000_000_000, false));
        }
        assert_eq!(p.p99(100 * S + 9), None, "fewer than min_requests");
        for i in 0..191 {
            p.observe(&record(101 * S + i, 10_000_000, false));
        }
        // 200 requests: the p99 is the 198th smallest, one of the nine slow ones.
        assert_eq!(p.p99(102 * S), Some(1_000_000_000));
        assert!(p.holds(102 * S));
        // The slow ones leave the window: the p99 falls to 10 ms.
        assert_eq!(p.p99(160 * S + 50), Some(10_000_000));
        assert!(!p.holds(160 * S + 50));
        assert_eq!(p.p99(200 * S), None, "an empty window");
    }
}
