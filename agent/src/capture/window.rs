//! Reading one window of a ring: a consumer of its own, started at the
//! oldest record, that never commits a cursor (so the daemon's, in the
//! control block, never moves), read up to a ticket fixed when it starts
//! (bounded work however fast the engine writes), keeping the valid records
//! that finished within the window.

use ringside_shm_protocol::{AttachedSegment, Consumer, PollError, Record, RequestRecord, StartAt};
use std::time::{Duration, Instant};

/// A ticket whose producer has not committed is waited for this long, then
/// skipped (the engine's own writes take microseconds; a producer that died
/// mid-write never commits).
const ABANDON_AFTER: Duration = Duration::from_millis(100);

/// Records decoded per poll.
const POLL_BATCH: usize = 1024;

/// The window: records with `from_ns <= t_finished <= to_ns`
/// (`CLOCK_MONOTONIC`, the engine's record stamps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Earliest end stamp kept.
    pub from_ns: u64,
    /// Latest end stamp kept.
    pub to_ns: u64,
}

impl Window {
    /// The `length` before `end_ns`.
    pub fn before(end_ns: u64, length: Duration) -> Self {
        let length = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
        Self {
            from_ns: end_ns.saturating_sub(length),
            to_ns: end_ns,
        }
    }

    /// Whether `record` finished within it.
    pub fn contains(&self, record: &RequestRecord) -> bool {
        (self.from_ns..=self.to_ns).contains(&record.timestamps.finished_ns)
    }
}

/// What a whole read saw, besides the records it returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowTotals {
    /// Records read (any time).
    pub read: u64,
    /// Records in the window handed out.
    pub kept: u64,
    /// Records that failed validation.
    pub invalid: u64,
    /// Records overwritten while being read, or never committed.
    pub lost: u64,
}

/// Reads a ring's records of a window, in chunks.
pub struct WindowReader<'a> {
    segment: &'a AttachedSegment,
    consumer: Consumer,
    /// Read up to (not including) this ticket.
    end: u64,
    window: Window,
    totals: WindowTotals,
}

impl std::fmt::Debug for WindowReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowReader")
            .field("cursor", &self.consumer.cursor())
            .field("end", &self.end)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<'a> WindowReader<'a> {
    /// A reader of `segment`'s records in `window`, below ticket `end`
    /// (`None`: the ring's head now).
    pub fn new(segment: &'a AttachedSegment, window: Window, end: Option<u64>) -> Self {
        let ring = segment.ring();
        let mut consumer = ring.consumer(StartAt::Oldest);
        consumer.set_abandon_after_ns(u64::try_from(ABANDON_AFTER.as_nanos()).unwrap_or(u64::MAX));
        let head = ring.counters().head;
        Self {
            segment,
            consumer,
            end: end.map_or(head, |e| e.min(head)),
            window,
            totals: WindowTotals::default(),
        }
    }

    /// What was read so far.
    pub fn totals(&self) -> WindowTotals {
        self.totals
    }

    /// The next records of the window (at most `max`, at least one unless
    /// the read is over) with their tickets, those `keep` accepts; `None`
    /// once the end ticket is reached.
    pub fn next_chunk(
        &mut self,
        max: usize,
        mut keep: impl FnMut(u64) -> bool,
    ) -> Result<Option<Vec<(u64, RequestRecord)>>, PollError> {
        let model_count = self.segment.info().model_count();
        let mut out = Vec::new();
        let mut raw: Vec<(u64, Record)> = Vec::with_capacity(POLL_BATCH);
        // A stalled ticket is waited for at most ABANDON_AFTER; this bounds
        // the whole call even if every ticket left stalls.
        let give_up = Instant::now() + ABANDON_AFTER * 4;
        while out.len() < max && self.consumer.cursor() < self.end {
            raw.clear();
            let want = POLL_BATCH
                .min(max - out.len())
                .min(usize::try_from(self.end - self.consumer.cursor()).unwrap_or(POLL_BATCH));
            let end = self.end;
            let report = self.consumer.poll(want, |ticket, record| {
                if ticket < end {
                    raw.push((ticket, *record));
                }
            })?;
            self.totals.read += raw.len() as u64;
            self.totals.lost += report.lost_overwritten + report.lost_abandoned;
            for (ticket, record) in &raw {
                if !keep(*ticket) {
                    continue;
                }
                match record.decode(model_count) {
                    Ok(r) if self.window.contains(&r) => out.push((*ticket, r)),
                    Ok(_) => {}
                    Err(_) => self.totals.invalid += 1,
                }
            }
            if report.stalled && report.delivered == 0 {
                if Instant::now() >= give_up {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.totals.kept += out.len() as u64;
        if out.is_empty() && self.consumer.cursor() >= self.end {
            return Ok(None);
        }
        Ok(Some(out))
    }
}
