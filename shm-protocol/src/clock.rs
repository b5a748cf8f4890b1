//! The clocks records are stamped with.

use rustix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of every record stamp. A vDSO
/// call, not a syscall.
#[inline]
pub fn monotonic_ns() -> u64 {
    to_ns(clock_gettime(ClockId::Monotonic))
}

/// `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
#[inline]
pub fn realtime_ns() -> u64 {
    to_ns(clock_gettime(ClockId::Realtime))
}

fn to_ns(ts: rustix::time::Timespec) -> u64 {
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Converts monotonic stamps to wall-clock time with the pair of readings a
/// segment's creator took together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockPair {
    /// `CLOCK_REALTIME` ns at the reference instant.
    pub realtime_ns: u64,
    /// `CLOCK_MONOTONIC` ns at the same instant.
    pub monotonic_ns: u64,
}

impl ClockPair {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let realtime_ns = realtime_ns();
        let monotonic_ns = monotonic_ns();
        Self {
            realtime_ns,
            monotonic_ns,
        }
    }

    /// Wall-clock nanoseconds since the Unix epoch of a monotonic stamp;
    /// saturates instead of overflowing on forged stamps.
    pub fn to_unix_ns(&self, monotonic_stamp_ns: u64) -> u64 {
        if monotonic_stamp_ns >= self.monotonic_ns {
            self.realtime_ns
                .saturating_add(monotonic_stamp_ns - self.monotonic_ns)
        } else {
            self.realtime_ns
                .saturating_sub(self.monotonic_ns - monotonic_stamp_ns)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_convert_both_ways_and_saturate() {
        let pair = ClockPair {
            realtime_ns: 1_000_000,
            monotonic_ns: 500,
        };
        assert_eq!(pair.to_unix_ns(600), 1_000_100);
        assert_eq!(pair.to_unix_ns(400), 999_900);
        assert_eq!(pair.to_unix_ns(u64::MAX), u64::MAX);
        let early = ClockPair {
            realtime_ns: 5,
            monotonic_ns: 1_000,
        };
        assert_eq!(early.to_unix_ns(0), 0);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
