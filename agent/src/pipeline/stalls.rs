//! Stall detection over an engine's in-flight table.
//!
//! A request is stalled when its entry's progress stamp (admission, scheduling, a prefill
//! chunk, a token) is older than the threshold. The tracker sees the table a few times a
//! second; it logs each stall once, keeps the stalled count per engine for the gauge, and
//! measures each stall from the engine's own stamps: from the last progress before it to the
//! first progress after it (or to the request's end). The request's span then carries one
//! `ringside.stalled` event per stall.
//!
//! Bounded: one state per request the table holds, plus requests that left the table less
//! than [`FORGET_AFTER_NS`] ago (their record may still be on its way); at most
//! [`MAX_STALLS_PER_REQUEST`] stalls are kept per request.

use std::collections::HashMap;

/// A request that left the table is forgotten after this long (its record, if it had one,
/// was read long before).
pub const FORGET_AFTER_NS: u64 = 60_000_000_000;
/// Stalls remembered per request; later ones are counted, not kept.
pub const MAX_STALLS_PER_REQUEST: usize = 8;

/// One stall: its start (the engine's last progress stamp before it, `CLOCK_MONOTONIC` ns)
/// and how long it lasted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Last progress before the stall.
    pub start_ns: u64,
    /// Until the next progress (or the end of the request).
    pub duration_ns: u64,
}

/// What the tracker saw of one request in one look at the table.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    /// The request id.
    pub request_id: [u8; 16],
    /// The entry's last progress stamp.
    pub progress_ns: u64,
}

#[derive(Debug)]
struct RequestState {
    progress_ns: u64,
    /// Start of the stall in progress, if any.
    stalled_since: Option<u64>,
    stalls: Vec<Stall>,
    /// When the request was last seen in the table (0 while it is there).
    left_at_ns: u64,
}

/// A stall that began in the last look, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewStall {
    /// The request id.
    pub request_id: [u8; 16],
    /// How long it has made no progress so far.
    pub for_ns: u64,
}

/// Stall state of one engine's requests.
#[derive(Debug, Default)]
pub struct StallTracker {
    requests: HashMap<[u8; 16], RequestState>,
    stalled_now: usize,
}

impl StallTracker {
    /// Takes one look at the table: `observed` is every request it holds, `now_ns` the
    /// reader's `CLOCK_MONOTONIC`, `threshold_ns` the stall threshold. Returns the stalls that
    /// began since the last look (to log once each).
    pub fn observe(
        &mut self,
        observed: &[Observed],
        now_ns: u64,
        threshold_ns: u64,
    ) -> Vec<NewStall> {
        let mut new = Vec::new();
        for state in self.requests.values_mut() {
            if state.left_at_ns == 0 {
                state.left_at_ns = now_ns;
            }
        }
        for o in observed {
            let state = self.requests.entry(o.request_id).or_insert(RequestState {
                progress_ns: o.progress_ns,
                stalled_since: None,
                stalls: Vec::new(),
                left_at_ns: 0,
            });
            state.left_at_ns = 0;
            if o.progress_ns > state.progress_ns {
                // Progress again: a stall in progress ended at this stamp.
                if let Some(start) = state.stalled_since.take()
                    && state.stalls.len() < MAX_STALLS_PER_REQUEST
                {
                    state.stalls.push(Stall {
                        start_ns: start,
                        duration_ns: o.progress_ns - start,
                    });
                }
                state.progress_ns = o.progress_ns;
            }
            let quiet = now_ns.saturating_sub(state.progress_ns);
            if state.stalled_since.is_none() && quiet >= threshold_ns {
                state.stalled_since = Some(state.progress_ns);
                new.push(NewStall {
                    request_id: o.request_id,
                    for_ns: quiet,
                });
            }
        }
        self.requests.retain(|_, s| {
            s.left_at_ns == 0 || now_ns.saturating_sub(s.left_at_ns) < FORGET_AFTER_NS
        });
        self.stalled_now = self
            .requests
            .values()
            .filter(|s| s.left_at_ns == 0 && s.stalled_since.is_some())
            .count();
        new
    }

    /// Requests stalled at the last look.
    pub fn stalled_now(&self) -> usize {
        self.stalled_now
    }

    /// Whether the request was stalled at the last look.
    pub fn is_stalled(&self, request_id: &[u8; 16]) -> bool {
        self.requests
            .get(request_id)
            .is_some_and(|s| s.stalled_since.is_some())
    }

    /// The request ended at `end_ns` (its record was read, or the engine died): its stalls,
    /// a stall still in progress ending at `end_ns`. Forgets the request.
    pub fn finish(&mut self, request_id: &[u8; 16], end_ns: u64) -> Vec<Stall> {
        let Some(mut state) = self.requests.remove(request_id) else {
            return Vec::new();
        };
        if let Some(start) = state.stalled_since.take()
            && state.stalls.len() < MAX_STALLS_PER_REQUEST
        {
            state.stalls.push(Stall {
                start_ns: start,
                duration_ns: end_ns.saturating_sub(start),
            });
        }
        state.stalls
    }

    /// Requests tracked (in the table or recently left).
    pub fn tracked(&self) -> usize {
        self.requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn seen(id: u8, progress: u64) -> Observed {
        Observed {
            request_id: [id; 16],
            progress_ns: progress,
        }
    }

    #[test]
    fn a_request_without_progress_for_the_threshold_is_stalled_once_and_measured_from_engine_stamps()
     {
        let mut t = StallTracker::default();
        assert!(t.observe(&[seen(1, 10 * S)], 11 * S, 5 * S).is_empty());
        let new = t.observe(&[seen(1, 10 * S)], 16 * S, 5 * S);
        assert_eq!(
            new,
            vec![NewStall {
                request_id: [1; 16],
                for_ns: 6 * S
            }]
        );
        assert_eq!(t.stalled_now(), 1);
        // Still stalled: not reported again.
        assert!(t.observe(&[seen(1, 10 * S)], 20 * S, 5 * S).is_empty());
        // Progress at 21 s ends it: 11 s long, from the engine's stamps.
        t.observe(&[seen(1, 21 * S)], 21 * S + 1, 5 * S);
        assert_eq!(t.stalled_now(), 0);
        let stalls = t.finish(&[1; 16], 22 * S);
        assert_eq!(
            stalls,
            vec![Stall {
                start_ns: 10 * S,
                duration_ns: 11 * S
            }]
        );
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_stall_still_running_at_the_end_lasts_until_the_end() {
        let mut t = StallTracker::default();
        t.observe(&[seen(2, S)], 20 * S, 5 * S);
        assert!(t.is_stalled(&[2; 16]));
        assert_eq!(
            t.finish(&[2; 16], 30 * S),
            vec![Stall {
                start_ns: S,
                duration_ns: 29 * S
            }]
        );
    }

    #[test]
    fn a_request_that_keeps_progressing_is_never_stalled() {
        let mut t = StallTracker::default();
        for step in 0..100 {
            let now = step * S;
            assert!(t.observe(&[seen(3, now)], now + S / 2, 5 * S).is_empty());
        }
        assert!(t.finish(&[3; 16], 200 * S).is_empty());
    }

    #[test]
    fn requests_that_left_the_table_are_forgotten_and_memory_stays_bounded() {
        let mut t = StallTracker::default();
        for id in 0..200u8 {
            t.observe(&[seen(id, 0)], u64::from(id) * S, 5 * S);
        }
        // Each is marked gone at the next look, and forgotten a minute later.
        t.observe(&[], 201 * S, 5 * S);
        // Those gone for a minute already are forgotten; about a minute's worth remain.
        assert!(t.tracked() <= 61, "{}", t.tracked());
        t.observe(&[], 201 * S + FORGET_AFTER_NS, 5 * S);
        assert_eq!(t.tracked(), 0);
        assert_eq!(t.stalled_now(), 0);
    }

    #[test]
    fn stalls_per_request_are_capped() {
        let mut t = StallTracker::default();
        let mut now = 0;
        for _ in 0..(MAX_STALLS_PER_REQUEST + 5) {
            t.observe(&[seen(4, now)], now + 10 * S, 5 * S);
            now += 11 * S;
            t.observe(&[seen(4, now)], now, 5 * S);
        }
        assert_eq!(t.finish(&[4; 16], now).len(), MAX_STALLS_PER_REQUEST);
    }
}
