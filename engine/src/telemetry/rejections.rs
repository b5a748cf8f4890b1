//! A per-cause rate limit on rejection records, so that a flood of refused requests (401s
//! from anyone who can reach the port) cannot lap the ring and push real requests out.
//!
//! Each cause (the record's error type) may write `per_second` records per wall-clock second;
//! the rest are counted as suppressed (`ringside_rejection_records_suppressed_total` and a
//! periodic log line, see [`RejectionLimiter::take_suppressed_report`]). Lock-free: two
//! relaxed atomics per cause.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::ErrorKind;

/// Causes tracked: every `ErrorType` value the ABI defines fits.
pub const CAUSES: usize = 16;

/// The `error.type` name of a cause index, for metrics and logs.
#[must_use]
pub fn cause_name(cause: usize) -> Option<&'static str> {
    let raw = u8::try_from(cause).ok()?;
    ErrorKind::try_from(raw).ok()?.as_str()
}

/// The rate limit, shared by the HTTP handlers.
#[derive(Debug)]
pub struct RejectionLimiter {
    per_second: u32,
    /// Per cause: the second (monotonic, from [`crate::clock::now_ns`]) the count is for.
    window: [AtomicU64; CAUSES],
    count: [AtomicU32; CAUSES],
    /// Suppressed since start, per cause.
    suppressed: [AtomicU64; CAUSES],
    /// Suppressed at the last report, per cause.
    reported: [AtomicU64; CAUSES],
}

impl RejectionLimiter {
    /// A limit of `per_second` records per cause; 0 writes none.
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Default::default(),
            count: Default::default(),
            suppressed: Default::default(),
            reported: Default::default(),
        }
    }

    /// The limit per cause and second.
    #[must_use]
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether a rejection of `cause` seen at `now_ns` may write its record; counts it as
    /// suppressed when not.
    pub fn admit(&self, cause: ErrorKind, now_ns: u64) -> bool {
        let i = usize::from(cause as u8).min(CAUSES - 1);
        let second = now_ns / 1_000_000_000 + 1;
        let window = self.window[i].load(Ordering::Relaxed);
        // The first caller in a new second resets the count; a lost race only lets a few
        // more through in that second.
        if window != second
            && self.window[i]
                .compare_exchange(window, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count[i].store(0, Ordering::Relaxed);
        }
        if self.count[i].fetch_add(1, Ordering::Relaxed) < self.per_second {
            true
        } else {
            self.suppressed[i].fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Suppressed records since start, for `cause`.
    #[must_use]
    pub fn suppressed(&self, cause: usize) -> u64 {
        self.suppressed
            .get(cause)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// What was suppressed since the last call, by cause name (empty when nothing was).
    pub fn take_suppressed_report(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for (i, (total, reported)) in self.suppressed.iter().zip(&self.reported).enumerate() {
            let now = total.load(Ordering::Relaxed);
            let before = reported.swap(now, Ordering::Relaxed);
            if now > before {
                out.push((cause_name(i).unwrap_or("other"), now - before));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn each_cause_gets_its_own_budget_per_second() {
        let limiter = RejectionLimiter::new(3);
        let t = 5 * SECOND;
        let admitted = (0..10)
            .filter(|_| limiter.admit(ErrorKind::Unauthorized, t))
            .count();
        assert_eq!(admitted, 3);
        assert!(
            limiter.admit(ErrorKind::QueueFull, t),
            "another cause is not starved"
        );
        assert_eq!(limiter.suppressed(ErrorKind::Unauthorized as usize), 7);
        assert!(limiter.admit(ErrorKind::Unauthorized, t + SECOND));
    }

    #[test]
    fn the_report_names_what_was_suppressed_since_the_last_one() {
        let limiter = RejectionLimiter::new(1);
        for _ in 0..4 {
            limiter.admit(ErrorKind::Unauthorized, 0);
        }
        assert_eq!(limiter.take_suppressed_report(), [("unauthorized", 3)]);
        assert!(limiter.take_suppressed_report().is_empty());
        limiter.admit(ErrorKind::Unauthorized, 0);
        assert_eq!(limiter.take_suppressed_report(), [("unauthorized", 1)]);
    }

    #[test]
    fn every_abi_error_type_has_a_slot() {
        for raw in 0..=u8::MAX {
            if ErrorKind::try_from(raw).is_ok() {
                assert!(usize::from(raw) < CAUSES);
            }
        }
        assert_eq!(
            cause_name(ErrorKind::QueueFull as usize),
            Some("queue_full")
        );
    }
}
