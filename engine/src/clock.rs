//! The engine's one clock: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! Every request timestamp (arrival, scheduled, first token, last token, finished) comes from
//! [`now_ns`], so they are mutually comparable and comparable with other processes on the host
//! (the agent reads the same clock). `0` is reserved for "did not happen".

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds on `CLOCK_MONOTONIC` (vDSO call: no syscall, no allocation, no lock).
#[must_use]
pub fn now_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    // Monotonic time is non-negative and far below u64::MAX nanoseconds (584 years).
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_nonzero() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 0);
        assert!(b >= a);
    }
}
