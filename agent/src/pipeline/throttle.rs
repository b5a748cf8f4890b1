//! Rate-limited warnings for what can repeat every poll (losses in the ring,
//! invalid records): a hostile or broken writer must not flood the log. The
//! counters stay exact; only the log lines are folded.

use std::time::{Duration, Instant};

/// At most one line per this long per attachment and kind.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Sums of `N` amounts noted since the last line.
#[derive(Debug)]
pub struct Throttled<const N: usize> {
    last_line: Option<Instant>,
    pending: [u64; N],
    /// Notes folded into `pending` (each was one poll that found some).
    folded: u64,
}

/// A line to log: the amounts since the previous line, and how many polls
/// they came from.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<const N: usize> {
    /// The summed amounts.
    pub amounts: [u64; N],
    /// Polls that found some.
    pub polls: u64,
}

impl<const N: usize> Default for Throttled<N> {
    fn default() -> Self {
        Self {
            last_line: None,
            pending: [0; N],
            folded: 0,
        }
    }
}

impl<const N: usize> Throttled<N> {
    /// Notes `amounts` seen at `now`: a line to log now (the first one at
    /// once, then at most one per [`WARN_EVERY`], carrying what was folded
    /// meanwhile), or `None` while the window is open.
    pub fn note(&mut self, now: Instant, amounts: [u64; N]) -> Option<Line<N>> {
        for (sum, add) in self.pending.iter_mut().zip(amounts) {
            *sum = sum.saturating_add(add);
        }
        self.folded += 1;
        let due = self
            .last_line
            .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        let line = Line {
            amounts: self.pending,
            polls: self.folded,
        };
        self.pending = [0; N];
        self.folded = 0;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_every_poll_gives_one_line_per_window_with_the_sums() {
        let start = Instant::now();
        let mut t = Throttled::<2>::default();
        assert_eq!(
            t.note(start, [3, 1]),
            Some(Line {
                amounts: [3, 1],
                polls: 1
            })
        );
        // 100 polls a second for 10 s: folded, not logged.
        let mut lines = 0;
        for i in 1..1000u64 {
            let now = start + Duration::from_millis(i * 10);
            if t.note(now, [1, 0]).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 0);
        let line = t.note(start + WARN_EVERY, [1, 2]).unwrap();
        assert_eq!(
            line,
            Line {
                amounts: [1000, 2],
                polls: 1000
            }
        );
    }
}
