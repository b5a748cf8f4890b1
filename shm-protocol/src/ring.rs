//! The commit protocol: wait-free producers, one consumer.
//!
//! See the crate documentation for the protocol step by step and the reasons
//! for each memory ordering; the comments here point back to those steps.

use crate::layout::{ControlBlock, Counters, Detail, OverflowMode, PAYLOAD_WORDS, Slot};
use crate::sync::{Ordering, fence};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Discard mode takes a ticket with compare-exchange; after this many failed
/// attempts (each one means another producer succeeded) the record is dropped
/// and counted in `dropped_contended`, so a push always ends in bounded steps.
pub const DISCARD_CLAIM_ATTEMPTS: usize = 8;

/// Default time a consumer waits for a slot whose producer has a ticket but
/// has not committed, before it skips the slot as abandoned.
pub const DEFAULT_ABANDON_AFTER_NS: u64 = 200_000_000;

const CLAIMED: u64 = 1;

/// Commit word of a slot holding the complete record of ticket `t`.
#[inline]
pub(crate) const fn committed(t: u64) -> u64 {
    t.wrapping_add(1) << 1
}

/// Commit word of a slot being written for ticket `t`.
#[inline]
pub(crate) const fn claimed(t: u64) -> u64 {
    committed(t) | CLAIMED
}

/// The ticket a non-zero commit word refers to.
#[inline]
pub(crate) const fn ticket_of(word: u64) -> u64 {
    (word >> 1).wrapping_sub(1)
}

/// Keeps the memory behind a ring alive; implemented by the shared-memory
/// mapping and by the heap region used in tests.
pub(crate) trait Backing: Send + Sync + 'static {
    /// Checks, before the consumer touches the ring, that the memory is still
    /// fully backed (a shared-memory file may have been truncated).
    fn verify(&self) -> Result<(), PollError> {
        Ok(())
    }
}

/// Pointers into a ring's memory. Valid as long as the `Backing` that
/// produced them is alive; every copy of a view travels with an `Arc` of it.
#[derive(Clone, Copy)]
pub(crate) struct RingView {
    pub(crate) control: NonNull<ControlBlock>,
    pub(crate) counters: NonNull<Counters>,
    pub(crate) slots: NonNull<Slot>,
    pub(crate) capacity: u64,
}

impl RingView {
    #[inline]
    pub(crate) fn control(&self) -> &ControlBlock {
        // SAFETY: `control` points to a properly aligned `ControlBlock` (made
        // of atomics, valid for any bytes) kept alive by the Backing that every
        // holder of this view also holds.
        unsafe { self.control.as_ref() }
    }

    #[inline]
    pub(crate) fn counters(&self) -> &Counters {
        // SAFETY: as for `control`.
        unsafe { self.counters.as_ref() }
    }

    #[inline]
    pub(crate) fn slot(&self, ticket: u64) -> &Slot {
        let index = (ticket & (self.capacity - 1)) as usize;
        // SAFETY: `capacity` is a power of two and `slots` points to
        // `capacity` contiguous, aligned slots kept alive by the Backing; the
        // mask keeps `index < capacity`.
        unsafe { &*self.slots.as_ptr().add(index) }
    }
}

/// A handle to a ring: creates producers and consumers and gives access to
/// the control block and counters.
#[derive(Clone)]
pub struct Ring {
    pub(crate) view: RingView,
    pub(crate) backing: Arc<dyn Backing>,
}

// SAFETY: the view's pointers target atomics only (control block, counters,
// slots), which are safe to share between threads; the Backing is Send + Sync
// and keeps the memory alive for as long as any clone of the Ring exists.
unsafe impl Send for Ring {}
// SAFETY: see `Send`; all access through `&Ring` is through atomics.
unsafe impl Sync for Ring {}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.view.capacity)
            .finish_non_exhaustive()
    }
}

/// A snapshot of a ring's producer counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Tickets issued: records written (or, rarely, dropped as busy).
    pub head: u64,
    /// Discard mode: dropped because the ring was full.
    pub dropped_full: u64,
    /// Discard mode: dropped after [`DISCARD_CLAIM_ATTEMPTS`] lost races.
    pub dropped_contended: u64,
    /// Dropped because the slot was still held by a producer a lap behind;
    /// also counted by the consumer as abandoned.
    pub dropped_busy: u64,
    /// The engine's last heartbeat (`CLOCK_MONOTONIC` ns), 0 if none yet.
    pub engine_heartbeat_ns: u64,
}

impl CounterSnapshot {
    /// Records the producers dropped before they took a ticket.
    pub fn dropped_before_ticket(&self) -> u64 {
        self.dropped_full.saturating_add(self.dropped_contended)
    }
}

impl Ring {
    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.view.capacity
    }

    /// A producer; clone it freely, one per thread or shared.
    pub fn producer(&self) -> Producer {
        Producer {
            view: self.view,
            _backing: Arc::clone(&self.backing),
        }
    }

    /// The consumer. The protocol has one consumer per ring: the caller (the
    /// agent) guarantees it does not run two at once on the same segment.
    pub fn consumer(&self, start: StartAt) -> Consumer {
        let head = self.view.counters().head.load(Ordering::Acquire);
        let capacity = self.view.capacity;
        let oldest = head.saturating_sub(capacity);
        let (cursor, clamped) = match start {
            StartAt::Newest => (head, false),
            StartAt::Oldest => (oldest, false),
            // A stored cursor beyond the head was forged or belongs to an
            // earlier generation: start at the head and say so.
            StartAt::Ticket(t) if t > head => (head, true),
            StartAt::Ticket(t) => (t, false),
        };
        Consumer {
            view: self.view,
            backing: Arc::clone(&self.backing),
            cursor,
            stall: None,
            abandon_after_ns: DEFAULT_ABANDON_AFTER_NS,
            totals: ConsumerTotals {
                cursor_clamped: clamped,
                ..ConsumerTotals::default()
            },
        }
    }

    /// The control block.
    pub fn control(&self) -> &ControlBlock {
        self.view.control()
    }

    /// Current producer counters.
    pub fn counters(&self) -> CounterSnapshot {
        let c = self.view.counters();
        CounterSnapshot {
            head: c.head.load(Ordering::Relaxed),
            dropped_full: c.dropped_full.load(Ordering::Relaxed),
            dropped_contended: c.dropped_contended.load(Ordering::Relaxed),
            dropped_busy: c.dropped_busy.load(Ordering::Relaxed),
            engine_heartbeat_ns: c.engine_heartbeat_ns.load(Ordering::Relaxed),
        }
    }

    /// Stamps the engine heartbeat. Call it off the hot path (a timer, about
    /// once a second).
    pub fn beat_engine_heartbeat(&self, monotonic_ns: u64) {
        self.view
            .counters()
            .engine_heartbeat_ns
            .store(monotonic_ns, Ordering::Relaxed);
    }
}

/// Where a new consumer starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// At the head: only records written from now on.
    Newest,
    /// At the oldest record the ring still holds (the flight recorder).
    Oldest,
    /// At a stored cursor (a restarted agent): no duplicates, and whatever was
    /// overwritten since is counted as lost.
    Ticket(u64),
}

/// What a push did with the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a dropped record is already counted, but callers may want to know"]
pub enum PushOutcome {
    /// Committed as ticket `0`.
    Written(u64),
    /// Discard mode, ring full: dropped and counted.
    DroppedFull,
    /// Discard mode, lost the ticket race too often: dropped and counted.
    DroppedContended,
    /// The slot was still being written a lap earlier: dropped and counted.
    DroppedBusy,
}

/// Writes records into the ring. Wait-free: every push ends in a bounded
/// number of steps, with no lock, no syscall and no allocation, whatever the
/// consumer does.
#[derive(Clone)]
pub struct Producer {
    view: RingView,
    _backing: Arc<dyn Backing>,
}

// SAFETY: as for `Ring`: the pointers target atomics kept alive by the Arc.
unsafe impl Send for Producer {}
// SAFETY: as for `Ring`.
unsafe impl Sync for Producer {}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.view.capacity)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// Whether tracing is on: one relaxed load, for the engine to check before
    /// it builds a record.
    #[inline]
    pub fn tracing_enabled(&self) -> bool {
        self.view.control().tracing_enabled.load(Ordering::Relaxed) != 0
    }

    /// Writes one record.
    #[cfg(not(loom))]
    #[inline]
    pub fn push(&self, record: &crate::layout::Record) -> PushOutcome {
        let words: &[u64; PAYLOAD_WORDS] = bytemuck::cast_ref(record);
        self.push_words(words)
    }

    /// Writes one payload given as words (the loom model pushes two-word payloads).
    #[inline]
    pub(crate) fn push_words(&self, words: &[u64; PAYLOAD_WORDS]) -> PushOutcome {
        match self.take_ticket() {
            Ok(ticket) => match self.claim(ticket) {
                Some(slot) => {
                    Self::fill(slot, words);
                    Self::publish(slot, ticket);
                    PushOutcome::Written(ticket)
                }
                None => PushOutcome::DroppedBusy,
            },
            Err(outcome) => outcome,
        }
    }

    /// Step 1: take a ticket.
    #[inline]
    fn take_ticket(&self) -> Result<u64, PushOutcome> {
        let control = self.view.control();
        let counters = self.view.counters();
        let mode = control.overflow_mode.load(Ordering::Relaxed);
        if mode != OverflowMode::Discard as u32 {
            // Overwrite (and any invalid mode word): always take the next ticket.
            return Ok(counters.head.fetch_add(1, Ordering::Relaxed));
        }
        for _ in 0..DISCARD_CLAIM_ATTEMPTS {
            let head = counters.head.load(Ordering::Relaxed);
            // Acquire pairs with the consumer's Release store of the cursor:
            // its copies out of the slots below the cursor happen before our
            // writes into them.
            let cursor = control.read_cursor.load(Ordering::Acquire);
            if head.wrapping_sub(cursor) >= self.view.capacity {
                counters.dropped_full.fetch_add(1, Ordering::Relaxed);
                return Err(PushOutcome::DroppedFull);
            }
            if counters
                .head
                .compare_exchange(
                    head,
                    head.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return Ok(head);
            }
        }
        counters.dropped_contended.fetch_add(1, Ordering::Relaxed);
        Err(PushOutcome::DroppedContended)
    }

    /// Step 2: claim the ticket's slot, unless a producer of an earlier lap is
    /// still writing it or a later lap already took it.
    #[inline]
    fn claim(&self, ticket: u64) -> Option<&Slot> {
        let slot = self.view.slot(ticket);
        let word = slot.commit.load(Ordering::Relaxed);
        let free = word & CLAIMED == 0 && (word == 0 || ticket_of(word) < ticket);
        // Acquire on success: the previous lap's payload stores (released by
        // its commit) happen before ours, so they can never land after them.
        if !free
            || slot
                .commit
                .compare_exchange(word, claimed(ticket), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            self.view
                .counters()
                .dropped_busy
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Orders the claim before every payload store: a reader whose copy
        // saw any of our payload words then sees the claim (or later) when it
        // re-checks the commit word, and discards its copy.
        fence(Ordering::Release);
        Some(slot)
    }

    /// Step 3: write the payload.
    #[inline]
    fn fill(slot: &Slot, words: &[u64; PAYLOAD_WORDS]) {
        for (dst, &src) in slot.payload.iter().zip(words) {
            dst.store(src, Ordering::Relaxed);
        }
    }

    /// Step 4: publish. Release: the payload stores happen before a reader's
    /// Acquire load that sees this word.
    #[inline]
    fn publish(slot: &Slot, ticket: u64) {
        slot.commit.store(committed(ticket), Ordering::Release);
    }

    /// Test hook for fault injection: claims a slot and writes the first
    /// `words_written` payload words of `record`, then stops, as a producer
    /// killed mid-write would. Returns the ticket, or `None` if it was dropped.
    #[cfg(all(feature = "fault-injection", not(loom)))]
    #[doc(hidden)]
    pub fn push_and_stop_midway(
        &self,
        record: &crate::layout::Record,
        words_written: usize,
    ) -> Option<u64> {
        let words: &[u64; PAYLOAD_WORDS] = bytemuck::cast_ref(record);
        let ticket = self.take_ticket().ok()?;
        let slot = self.claim(ticket)?;
        for (dst, &src) in slot.payload.iter().zip(words).take(words_written) {
            dst.store(src, Ordering::Relaxed);
        }
        Some(ticket)
    }
}

/// Counts kept by a consumer since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerTotals {
    /// Records delivered.
    pub delivered: u64,
    /// Records overwritten before they were read (the consumer was lapped).
    pub lost_overwritten: u64,
    /// Tickets whose producer never committed within the abandon timeout (it
    /// died mid-write, or dropped the record as busy).
    pub lost_abandoned: u64,
    /// A `StartAt::Ticket` beyond the head was clamped to the head.
    pub cursor_clamped: bool,
}

impl ConsumerTotals {
    /// Every ticket the consumer has moved past.
    pub fn consumed(&self) -> u64 {
        self.delivered + self.lost_overwritten + self.lost_abandoned
    }
}

/// What one poll did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Records delivered to the sink.
    pub delivered: u64,
    /// Records lost to overwriting in this poll.
    pub lost_overwritten: u64,
    /// Tickets skipped as abandoned in this poll.
    pub lost_abandoned: u64,
    /// The consumer is waiting on a ticket whose producer has not committed.
    pub stalled: bool,
}

/// Why a poll could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The segment file is now smaller than the mapping: touching the ring
    /// would fault. The consumer reads nothing until it is re-attached.
    #[error("segment was truncated to {actual} bytes while mapped ({mapped} bytes mapped)")]
    Truncated {
        /// Bytes mapped.
        mapped: u64,
        /// Current file size.
        actual: u64,
    },
    /// The segment file could not be checked.
    #[error("could not check the segment's size: {0}")]
    Stat(String),
}

#[derive(Clone, Copy, Debug)]
struct Stall {
    ticket: u64,
    since_ns: u64,
}

/// Reads records in ticket order, reporting exactly what it lost.
pub struct Consumer {
    view: RingView,
    backing: Arc<dyn Backing>,
    cursor: u64,
    stall: Option<Stall>,
    abandon_after_ns: u64,
    totals: ConsumerTotals,
}

// SAFETY: as for `Ring`; a consumer is moved between threads, never shared.
unsafe impl Send for Consumer {}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("cursor", &self.cursor)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Sets how long a ticket whose producer has not committed is waited for.
    pub fn set_abandon_after_ns(&mut self, ns: u64) {
        self.abandon_after_ns = ns;
    }

    /// The next ticket to read.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Totals since creation.
    pub fn totals(&self) -> ConsumerTotals {
        self.totals
    }

    /// Records written but not yet consumed.
    pub fn backlog(&self) -> u64 {
        self.view
            .counters()
            .head
            .load(Ordering::Relaxed)
            .saturating_sub(self.cursor)
    }

    /// Publishes `ticket` as the resume point in the control block: a restarted
    /// agent starts there, and discard-mode producers may reuse slots below
    /// it. Call it once the records below `ticket` are safely handed on.
    pub fn commit_cursor(&self, ticket: u64) {
        let ticket = ticket.min(self.cursor);
        // Release: our copies out of slots below `ticket` happen before a
        // discard-mode producer's writes into them (it loads with Acquire).
        self.view
            .control()
            .read_cursor
            .store(ticket, Ordering::Release);
    }

    /// Polls with the system's monotonic clock.
    #[cfg(not(loom))]
    pub fn poll(
        &mut self,
        max: usize,
        sink: impl FnMut(u64, &crate::layout::Record),
    ) -> Result<PollReport, PollError> {
        self.poll_at(crate::clock::monotonic_ns(), max, sink)
    }

    /// Delivers up to `max` records to `sink` as `(ticket, record)`, given the
    /// current monotonic time (which decides when a stuck slot is abandoned).
    #[cfg(not(loom))]
    pub fn poll_at(
        &mut self,
        now_ns: u64,
        max: usize,
        mut sink: impl FnMut(u64, &crate::layout::Record),
    ) -> Result<PollReport, PollError> {
        self.backing.verify()?;
        Ok(self.poll_words(now_ns, max, |ticket, words| {
            sink(ticket, bytemuck::cast_ref(words))
        }))
    }

    /// The protocol's read side, on raw payload words.
    pub(crate) fn poll_words(
        &mut self,
        now_ns: u64,
        max: usize,
        mut sink: impl FnMut(u64, &[u64; PAYLOAD_WORDS]),
    ) -> PollReport {
        let mut report = PollReport::default();
        let capacity = self.view.capacity;
        let head = self.view.counters().head.load(Ordering::Acquire);
        let mut copy = [0u64; PAYLOAD_WORDS];
        while self.cursor < head {
            let ticket = self.cursor;
            let slot = self.view.slot(ticket);
            // Read step 1: Acquire pairs with the producer's Release publish.
            let before = slot.commit.load(Ordering::Acquire);
            if before == committed(ticket) {
                if report.delivered >= max as u64 {
                    break;
                }
                // Read step 2: copy every word once into private memory.
                for (dst, src) in copy.iter_mut().zip(&slot.payload) {
                    *dst = src.load(Ordering::Relaxed);
                }
                // Read step 3: Acquire fence, then re-check. If any word we
                // copied came from a later producer, its Release fence
                // (after its claim) synchronises with this fence, so the
                // re-check sees that claim and the copy is discarded.
                fence(Ordering::Acquire);
                let after = slot.commit.load(Ordering::Relaxed);
                self.cursor = ticket.wrapping_add(1);
                self.stall = None;
                if after == before {
                    sink(ticket, &copy);
                    report.delivered += 1;
                } else {
                    report.lost_overwritten += 1;
                }
                continue;
            }
            let later_lap = if before != 0 && ticket_of(before) > ticket {
                // The slot belongs to a later ticket, perhaps issued after
                // `head` was loaded: the head is at least one past it. A
                // forged word cannot push the cursor past the real head.
                let head_now = self.view.counters().head.load(Ordering::Acquire);
                Some(ticket_of(before).saturating_add(1).min(head_now))
            } else if head.wrapping_sub(ticket) > capacity {
                Some(head)
            } else {
                None
            };
            if let Some(newest) = later_lap {
                // The slot was handed to a later lap: everything older than
                // the oldest ticket that can still be in the ring is gone.
                let next = newest.saturating_sub(capacity).max(ticket.wrapping_add(1));
                report.lost_overwritten += next.wrapping_sub(ticket);
                self.cursor = next;
                self.stall = None;
                continue;
            }
            // The ticket was issued but its record is not committed: a
            // producer is writing it, is about to claim it, died, or dropped
            // it as busy. Wait, but never longer than the abandon timeout.
            match self.stall {
                Some(stall) if stall.ticket == ticket => {
                    if now_ns.saturating_sub(stall.since_ns) >= self.abandon_after_ns {
                        report.lost_abandoned += 1;
                        self.cursor = ticket.wrapping_add(1);
                        self.stall = None;
                        continue;
                    }
                }
                _ => {
                    self.stall = Some(Stall {
                        ticket,
                        since_ns: now_ns,
                    })
                }
            }
            report.stalled = true;
            break;
        }
        self.totals.delivered += report.delivered;
        self.totals.lost_overwritten += report.lost_overwritten;
        self.totals.lost_abandoned += report.lost_abandoned;
        report
    }
}

impl ControlBlock {
    /// Whether the engine writes records.
    pub fn tracing_enabled(&self) -> bool {
        self.tracing_enabled.load(Ordering::Relaxed) != 0
    }
    /// Switches tracing; the engine sees it on its next request.
    pub fn set_tracing_enabled(&self, on: bool) {
        self.tracing_enabled.store(u32::from(on), Ordering::Relaxed);
        self.bump_epoch();
    }
    /// The overflow mode, or the raw word if it is not a valid mode (producers
    /// then behave as in overwrite mode).
    pub fn overflow_mode(&self) -> Result<OverflowMode, u32> {
        OverflowMode::try_from(self.overflow_mode.load(Ordering::Relaxed))
    }
    /// Sets the overflow mode.
    pub fn set_overflow_mode(&self, mode: OverflowMode) {
        self.overflow_mode.store(mode as u32, Ordering::Relaxed);
        self.bump_epoch();
    }
    /// Span detail, or the raw word if invalid.
    pub fn detail(&self) -> Result<Detail, u32> {
        Detail::try_from(self.detail.load(Ordering::Relaxed))
    }
    /// Sets span detail.
    pub fn set_detail(&self, detail: Detail) {
        self.detail.store(detail as u32, Ordering::Relaxed);
        self.bump_epoch();
    }
    /// Head sampling ratio in parts per million, clamped to 1_000_000.
    pub fn head_sample_ppm(&self) -> u32 {
        self.head_sample_ppm.load(Ordering::Relaxed).min(1_000_000)
    }
    /// Sets the head sampling ratio (parts per million, clamped).
    pub fn set_head_sample_ppm(&self, ppm: u32) {
        self.head_sample_ppm
            .store(ppm.min(1_000_000), Ordering::Relaxed);
        self.bump_epoch();
    }
    /// Tail sampling settings.
    pub fn tail_sampling(&self) -> TailSampling {
        TailSampling {
            keep_errors: self.tail_keep_errors.load(Ordering::Relaxed) != 0,
            sample_ppm: self.tail_sample_ppm.load(Ordering::Relaxed).min(1_000_000),
            ttft_threshold_us: self.tail_ttft_us.load(Ordering::Relaxed),
            e2e_threshold_us: self.tail_e2e_us.load(Ordering::Relaxed),
        }
    }
    /// Sets tail sampling settings.
    pub fn set_tail_sampling(&self, tail: TailSampling) {
        self.tail_keep_errors
            .store(u32::from(tail.keep_errors), Ordering::Relaxed);
        self.tail_sample_ppm
            .store(tail.sample_ppm.min(1_000_000), Ordering::Relaxed);
        self.tail_ttft_us
            .store(tail.ttft_threshold_us, Ordering::Relaxed);
        self.tail_e2e_us
            .store(tail.e2e_threshold_us, Ordering::Relaxed);
        self.bump_epoch();
    }
    /// Incremented on every settings change.
    pub fn settings_epoch(&self) -> u64 {
        self.settings_epoch.load(Ordering::Relaxed)
    }
    /// The agent's stored resume cursor.
    pub fn read_cursor(&self) -> u64 {
        self.read_cursor.load(Ordering::Acquire)
    }
    /// The attached agent's pid and last heartbeat (`CLOCK_MONOTONIC` ns).
    pub fn agent(&self) -> (u32, u64) {
        (
            self.agent_pid.load(Ordering::Relaxed),
            self.agent_heartbeat_ns.load(Ordering::Relaxed),
        )
    }
    /// Records the agent's pid and heartbeat.
    pub fn set_agent(&self, pid: u32, heartbeat_ns: u64) {
        self.agent_pid.store(pid, Ordering::Relaxed);
        self.agent_heartbeat_ns
            .store(heartbeat_ns, Ordering::Relaxed);
    }
    fn bump_epoch(&self) {
        self.settings_epoch.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tail sampling settings kept in the control block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TailSampling {
    /// Always keep failed, aborted and rejected requests.
    pub keep_errors: bool,
    /// Ratio for the rest, parts per million.
    pub sample_ppm: u32,
    /// Keep requests with a time to first token at least this long (µs); 0 = off.
    pub ttft_threshold_us: u64,
    /// Keep requests with an end-to-end latency at least this long (µs); 0 = off.
    pub e2e_threshold_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_words_encode_ticket_and_state() {
        assert_eq!(committed(0), 2);
        assert_eq!(claimed(0), 3);
        assert_eq!(ticket_of(committed(41)), 41);
        assert_eq!(ticket_of(claimed(41)), 41);
        assert_eq!(committed(u64::MAX - 1) & CLAIMED, 0);
    }
}
