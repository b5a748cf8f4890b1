//! The in-flight table (ABI 1.2): the requests the engine holds right now.
//!
//! See the crate documentation for the layout, the claim / update / release /
//! read protocol and the reasons for each memory ordering; the comments here
//! point back to those steps.

use crate::layout::{
    ControlBlock, Counters, FLAG_REMOTE_PARENT, FLAG_STREAM, INFLIGHT_WORDS, InflightEntry,
    InflightPhase, InflightSlot, Operation,
};
use crate::ring::Backing;
#[cfg(not(loom))]
use crate::ring::PollError;
use crate::sync::{Ordering, fence};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64 as IdCounter;

/// How many times a reader re-reads one copy that is being written before it
/// gives up on that copy (the other copy then answers, or the entry is
/// counted torn). Bounded, so a snapshot ends in bounded steps whatever the
/// writer does.
#[cfg(not(loom))]
pub const INFLIGHT_READ_RETRIES: usize = 4;
/// Under loom every retry multiplies the explored interleavings.
#[cfg(loom)]
pub const INFLIGHT_READ_RETRIES: usize = 2;

/// Where a segment's in-flight table is, as its (validated) header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InflightLayout {
    /// Byte offset of entry 0 in the segment.
    pub offset: u64,
    /// Number of entries (1 to [`MAX_INFLIGHT`](crate::MAX_INFLIGHT)).
    pub capacity: u32,
}

/// Pointers into a table's memory, valid while the `Backing` that produced
/// them is alive; every copy of a view travels with an `Arc` of it.
#[derive(Clone, Copy)]
pub(crate) struct TableView {
    pub(crate) control: NonNull<ControlBlock>,
    pub(crate) counters: NonNull<Counters>,
    pub(crate) entries: NonNull<InflightSlot>,
    pub(crate) capacity: u32,
}

impl TableView {
    fn control(&self) -> &ControlBlock {
        // SAFETY: `control` points to an aligned `ControlBlock` (atomics only,
        // valid for any bytes) kept alive by the Backing every holder keeps.
        unsafe { self.control.as_ref() }
    }

    fn counters(&self) -> &Counters {
        // SAFETY: as for `control`.
        unsafe { self.counters.as_ref() }
    }

    pub(crate) fn entries(&self) -> &[InflightSlot] {
        // SAFETY: `entries` points to `capacity` contiguous, aligned entries
        // (atomics and padding only, valid for any bytes), inside the memory
        // the Backing keeps alive; whoever built the view checked that they
        // fit (the header validation, or the heap allocation's size).
        unsafe { std::slice::from_raw_parts(self.entries.as_ptr(), self.capacity as usize) }
    }
}

/// Copy `n % 2` of an entry holds its update `n`; its seq word is `2n` when
/// complete and `2n - 1` while being written.
#[inline]
fn copy_of(update: u64) -> usize {
    (update & 1) as usize
}

/// The latest update number an entry's copies record (0 = never written);
/// an odd (interrupted) seq counts as its update.
fn latest_update(slot: &InflightSlot) -> u64 {
    slot.copies
        .iter()
        .map(|c| {
            let seq = c.seq.load(Ordering::Relaxed);
            seq / 2 + (seq & 1)
        })
        .max()
        .unwrap_or(0)
}

/// Update step: the double-buffered seqlock write of update `n`.
#[inline]
fn write_copy(slot: &InflightSlot, update: u64, words: &[u64; INFLIGHT_WORDS]) {
    let copy = &slot.copies[copy_of(update)];
    let seq = update.wrapping_mul(2);
    copy.seq.store(seq.wrapping_sub(1), Ordering::Relaxed);
    // Orders the odd seq before every payload store: a reader whose copy saw
    // any of these words sees the odd seq (or later) when it re-checks.
    fence(Ordering::Release);
    for (dst, &src) in copy.payload.iter().zip(words) {
        dst.store(src, Ordering::Relaxed);
    }
    // Release: the payload stores happen before a reader's Acquire load of
    // this seq.
    copy.seq.store(seq, Ordering::Release);
}

/// A complete copy of one update, read out of shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StableCopy {
    pub(crate) update: u64,
    pub(crate) words: [u64; INFLIGHT_WORDS],
}

enum CopyRead {
    /// seq 0: this copy was never written.
    Never,
    /// Still odd, or changed under the reader, after every retry.
    Unstable,
    /// Stable, but its seq names an update that belongs in the other copy:
    /// no engine writes that.
    Misplaced,
    Stable(StableCopy),
}

/// Read step for one copy: the seqlock read, retried a bounded number of times.
fn read_copy(copy: &crate::layout::InflightCopy, index: usize) -> CopyRead {
    for _ in 0..INFLIGHT_READ_RETRIES {
        // Acquire pairs with the writer's final Release store of the seq.
        let before = copy.seq.load(Ordering::Acquire);
        if before == 0 {
            return CopyRead::Never;
        }
        if before & 1 == 1 {
            crate::sync::spin_loop();
            continue;
        }
        let mut words = [0u64; INFLIGHT_WORDS];
        for (dst, src) in words.iter_mut().zip(&copy.payload) {
            *dst = src.load(Ordering::Relaxed);
        }
        // If any word came from a later update, that writer's Release fence
        // (after its odd seq) synchronises with this fence, so the re-load
        // sees the odd seq (or later) and the copy is discarded.
        fence(Ordering::Acquire);
        let after = copy.seq.load(Ordering::Relaxed);
        if after != before {
            continue;
        }
        let update = before / 2;
        if copy_of(update) != index {
            return CopyRead::Misplaced;
        }
        return CopyRead::Stable(StableCopy { update, words });
    }
    CopyRead::Unstable
}

/// What a reader found in one entry (returned by value: no allocation).
#[allow(clippy::large_enum_variant)]
pub(crate) enum SlotRead {
    /// The claim word is 0: the entry is free.
    Unclaimed,
    /// Claimed, but neither copy was ever written (the claimer has not filled
    /// it yet, or died first).
    Unwritten,
    /// Claimed, no copy stable within the retries.
    Torn,
    /// Claimed, but the only stable copies are misplaced (forged).
    Misplaced,
    /// The stable copies, newest first.
    Stable {
        newest: StableCopy,
        older: Option<StableCopy>,
    },
}

/// Read step for one entry: skip it if unclaimed, else read both copies.
pub(crate) fn read_slot(slot: &InflightSlot) -> SlotRead {
    // Relaxed: the claim word only filters; what a copy holds is vouched for
    // by its own seqlock, and a released entry's newest copy is a free one.
    if slot.claim.load(Ordering::Relaxed) == 0 {
        return SlotRead::Unclaimed;
    }
    let reads = [read_copy(&slot.copies[0], 0), read_copy(&slot.copies[1], 1)];
    let (mut newest, mut older): (Option<StableCopy>, Option<StableCopy>) = (None, None);
    let (mut unstable, mut misplaced) = (false, false);
    for read in reads {
        match read {
            CopyRead::Never => {}
            CopyRead::Unstable => unstable = true,
            CopyRead::Misplaced => misplaced = true,
            CopyRead::Stable(copy) => match newest {
                Some(n) if n.update >= copy.update => older = Some(copy),
                _ => {
                    older = newest;
                    newest = Some(copy);
                }
            },
        }
    }
    match newest {
        Some(newest) => SlotRead::Stable { newest, older },
        None if unstable => SlotRead::Torn,
        None if misplaced => SlotRead::Misplaced,
        None => SlotRead::Unwritten,
    }
}

/// The engine's side of a segment's in-flight table: claims entries for the
/// requests it admits. Clone it freely (one per HTTP thread, or shared).
#[derive(Clone)]
pub struct InflightTable {
    view: TableView,
    backing: Arc<dyn Backing>,
    /// Claim ids, process-local: an id only needs to be non-zero.
    ids: Arc<IdCounter>,
}

// SAFETY: the view's pointers target atomics only, kept alive by the Backing
// (Send + Sync); all access through `&InflightTable` is through atomics.
unsafe impl Send for InflightTable {}
// SAFETY: as above.
unsafe impl Sync for InflightTable {}

impl fmt::Debug for InflightTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InflightTable")
            .field("capacity", &self.view.capacity)
            .finish_non_exhaustive()
    }
}

impl InflightTable {
    pub(crate) fn new(view: TableView, backing: Arc<dyn Backing>) -> Self {
        Self {
            view,
            backing,
            ids: Arc::new(IdCounter::new(1)),
        }
    }

    /// Number of entries.
    pub fn capacity(&self) -> u32 {
        self.view.capacity
    }

    #[cfg(all(test, loom))]
    pub(crate) fn view_for_tests(&self) -> TableView {
        self.view
    }

    /// Requests admitted while no entry was free (they run untracked).
    pub fn untracked(&self) -> u64 {
        self.view
            .counters()
            .inflight_untracked
            .load(Ordering::Relaxed)
    }

    /// A reader over the same memory (tests, benchmarks; the agent reads
    /// through [`AttachedSegment::inflight`](crate::AttachedSegment::inflight)).
    /// `model_count` bounds a valid entry's `model_index`.
    pub fn reader(&self, model_count: u16) -> InflightReader {
        InflightReader {
            view: self.view,
            backing: Arc::clone(&self.backing),
            model_count,
        }
    }

    /// Claims a free entry for a request being admitted and fills it with
    /// `entry` (its first update). Lock-free and bounded: one pass over the
    /// entries. `None` when every entry is claimed: the request is counted in
    /// [`untracked`](Self::untracked) and runs untracked.
    #[cfg(not(loom))]
    pub fn claim(&self, entry: &InflightEntry) -> Option<InflightHandle> {
        self.claim_words(bytemuck::cast_ref(entry))
    }

    /// The claim step on raw payload words (the loom model uses two-word payloads).
    pub(crate) fn claim_words(&self, words: &[u64; INFLIGHT_WORDS]) -> Option<InflightHandle> {
        let entries = self.view.entries();
        let capacity = entries.len();
        let id = self
            .ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .max(1);
        if capacity > 0 {
            // Start where the id points, so concurrent claimers spread out.
            let start = (id % capacity as u64) as usize;
            for k in 0..capacity {
                let index = (start + k) % capacity;
                let slot = &entries[index];
                if slot.claim.load(Ordering::Relaxed) != 0 {
                    continue;
                }
                // Acquire on success: the previous owner's stores (released by
                // its `claim.store(0, Release)`) happen before ours, so we see
                // its seq words and continue its update numbering.
                if slot
                    .claim
                    .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    let mut handle = InflightHandle {
                        view: self.view,
                        _backing: Arc::clone(&self.backing),
                        index: index as u32,
                        claim_id: id,
                        next_update: latest_update(slot).wrapping_add(1),
                        released: false,
                    };
                    handle.update_words(words);
                    return Some(handle);
                }
            }
        }
        self.view
            .counters()
            .inflight_untracked
            .fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Ownership of one claimed entry: the only writer of that entry while it
/// exists. Hand it to the inference thread through the engine's own channel
/// (that hand-off orders the previous owner's writes before the next one's).
/// Dropping it releases the entry, as [`release`](Self::release) does.
pub struct InflightHandle {
    view: TableView,
    _backing: Arc<dyn Backing>,
    index: u32,
    claim_id: u64,
    next_update: u64,
    released: bool,
}

// SAFETY: the pointers target atomics kept alive by the Arc; the handle is
// moved between threads (never shared: `update` takes `&mut self`).
unsafe impl Send for InflightHandle {}

impl fmt::Debug for InflightHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InflightHandle")
            .field("index", &self.index)
            .field("claim_id", &self.claim_id)
            .field("next_update", &self.next_update)
            .finish_non_exhaustive()
    }
}

impl InflightHandle {
    /// Index of the entry in the table.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The non-zero id stored in the entry's claim word.
    pub fn claim_id(&self) -> u64 {
        self.claim_id
    }

    fn slot(&self) -> &InflightSlot {
        &self.view.entries()[self.index as usize]
    }

    /// Publishes the request's new state. Wait-free: a handful of relaxed
    /// stores, two fences' worth of ordering, no syscall, lock or allocation.
    #[cfg(not(loom))]
    #[inline]
    pub fn update(&mut self, entry: &InflightEntry) {
        self.update_words(bytemuck::cast_ref(entry));
    }

    /// The update step on raw payload words.
    #[inline]
    pub(crate) fn update_words(&mut self, words: &[u64; INFLIGHT_WORDS]) {
        let update = self.next_update;
        write_copy(self.slot(), update, words);
        self.next_update = update.wrapping_add(1);
    }

    /// Frees the entry: call it once the request's final record was pushed.
    pub fn release(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        // A free copy (phase 0) becomes the newest, so a reader that still
        // sees the claim skips the entry instead of reporting the old state.
        self.update_words(&[0; INFLIGHT_WORDS]);
        // Release: our stores happen before the next claimer's (Acquire CAS).
        self.slot().claim.store(0, Ordering::Release);
    }

    /// Test hook for fault injection: starts an update (odd seq, then the
    /// first `words_written` payload words) and stops there, leaving the entry
    /// claimed, as an engine killed mid-write would.
    #[cfg(all(any(test, feature = "fault-injection"), not(loom)))]
    #[doc(hidden)]
    pub fn update_and_stop_midway(mut self, entry: &InflightEntry, words_written: usize) {
        let words: &[u64; INFLIGHT_WORDS] = bytemuck::cast_ref(entry);
        let update = self.next_update;
        let copy = &self.slot().copies[copy_of(update)];
        copy.seq
            .store(update.wrapping_mul(2).wrapping_sub(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (dst, &src) in copy.payload.iter().zip(words).take(words_written) {
            dst.store(src, Ordering::Relaxed);
        }
        self.released = true;
    }

    /// Test hook for fault injection: forgets the handle and leaves the entry
    /// claimed with its last complete update, as a killed engine would.
    #[cfg(any(test, feature = "fault-injection"))]
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.released = true;
    }
}

impl Drop for InflightHandle {
    fn drop(&mut self) {
        self.release_now();
    }
}

/// A passive reader of an in-flight table: never writes an entry. Any number
/// may read at once, while the engine runs or after it died.
#[derive(Clone)]
pub struct InflightReader {
    view: TableView,
    #[cfg_attr(loom, allow(dead_code))]
    backing: Arc<dyn Backing>,
    model_count: u16,
}

// SAFETY: as for `InflightTable`: atomics only, kept alive by the Arc.
unsafe impl Send for InflightReader {}
// SAFETY: as above; the reader only loads.
unsafe impl Sync for InflightReader {}

impl fmt::Debug for InflightReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InflightReader")
            .field("capacity", &self.view.capacity)
            .field("model_count", &self.model_count)
            .finish_non_exhaustive()
    }
}

/// What one snapshot of the table found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InflightSnapshot {
    /// The requests in flight, validated, in entry order.
    pub requests: Vec<InflightRequest>,
    /// Claimed entries with no stable copy within the retries (a writer was
    /// mid-update the whole time, or died mid-way through its first update).
    pub torn: u32,
    /// Claimed entries whose stable copies all failed validation.
    pub invalid: u32,
    /// The segment's `inflight_untracked` counter.
    pub untracked: u64,
}

impl InflightReader {
    /// Number of entries.
    pub fn capacity(&self) -> u32 {
        self.view.capacity
    }

    /// Requests admitted while no entry was free.
    pub fn untracked(&self) -> u64 {
        self.view
            .counters()
            .inflight_untracked
            .load(Ordering::Relaxed)
    }

    /// The generation an agent marked reported, if any (see
    /// [`ControlBlock::inflight_reported`]).
    pub fn reported(&self) -> Option<u64> {
        self.view.control().inflight_reported()
    }

    /// Marks `generation` reported (see [`ControlBlock::mark_inflight_reported`]).
    pub fn mark_reported(&self, generation: u64) -> bool {
        self.view.control().mark_inflight_reported(generation)
    }

    /// Reads every entry once and returns the validated requests and the
    /// counts of what could not be read. Bounded: at most `capacity` entries
    /// (itself at most [`MAX_INFLIGHT`](crate::MAX_INFLIGHT)), each copy
    /// retried at most [`INFLIGHT_READ_RETRIES`] times. Fails only if the
    /// segment was truncated below the mapping.
    #[cfg(not(loom))]
    pub fn snapshot(&self) -> Result<InflightSnapshot, PollError> {
        self.backing.verify()?;
        let mut snapshot = InflightSnapshot {
            untracked: self.untracked(),
            ..InflightSnapshot::default()
        };
        for (index, slot) in self.view.entries().iter().enumerate() {
            let decode = |copy: &StableCopy| {
                let entry: &InflightEntry = bytemuck::cast_ref(&copy.words);
                entry.decode(self.model_count).map(|r| {
                    r.map(|mut r| {
                        r.index = index as u32;
                        r.update = copy.update;
                        r
                    })
                })
            };
            match read_slot(slot) {
                SlotRead::Unclaimed | SlotRead::Unwritten => {}
                SlotRead::Torn => snapshot.torn += 1,
                SlotRead::Misplaced => snapshot.invalid += 1,
                SlotRead::Stable { newest, older } => match decode(&newest) {
                    Ok(Some(request)) => snapshot.requests.push(request),
                    // The newest copy is a release's: the entry is free.
                    Ok(None) => {}
                    // An engine writes valid entries; a forged or damaged
                    // newest copy falls back to the previous update.
                    Err(_) => match older.as_ref().map(decode) {
                        Some(Ok(Some(request))) => snapshot.requests.push(request),
                        _ => snapshot.invalid += 1,
                    },
                },
            }
        }
        Ok(snapshot)
    }
}

impl ControlBlock {
    /// The generation whose in-flight table (and ring backlog) an agent has
    /// already exported after its engine died, if any. Read by agents before
    /// they report a dead segment, and by the next engine of the instance
    /// (a reported segment is unlinked, not retained).
    pub fn inflight_reported(&self) -> Option<u64> {
        let v = self.inflight_reported.load(Ordering::Acquire);
        (v != 0).then_some(v)
    }

    /// Records that the crash spans of `generation` (this segment's) were
    /// exported. Only agents call it, after the export. Returns `false` if
    /// that generation was already marked (another agent reported it first).
    pub fn mark_inflight_reported(&self, generation: u64) -> bool {
        let mut current = self.inflight_reported.load(Ordering::Relaxed);
        loop {
            if current == generation {
                return false;
            }
            match self.inflight_reported.compare_exchange_weak(
                current,
                generation,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }
}

/// A validated in-flight request, decoded from a private copy of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightRequest {
    /// Index of the entry in the table.
    pub index: u32,
    /// The entry's update number of this state (grows with every update).
    pub update: u64,
    /// Queued, prefill or decode (never free).
    pub phase: InflightPhase,
    /// The OpenAI operation.
    pub operation: Operation,
    /// 128-bit request id.
    pub request_id: [u8; 16],
    /// W3C trace id (non-zero).
    pub trace_id: [u8; 16],
    /// The caller's span id, if any.
    pub parent_span_id: Option<[u8; 8]>,
    /// The request's span id (non-zero).
    pub span_id: [u8; 8],
    /// W3C trace flags.
    pub trace_flags: u8,
    /// The parent came from a valid caller `traceparent`.
    pub remote_parent: bool,
    /// The response is streamed.
    pub stream: bool,
    /// Admission (`CLOCK_MONOTONIC` ns).
    pub arrival_ns: u64,
    /// Scheduled, if it was.
    pub scheduled_ns: Option<u64>,
    /// First output token, if any.
    pub first_token_ns: Option<u64>,
    /// Latest output token, if any.
    pub last_token_ns: Option<u64>,
    /// Last progress of any kind.
    pub progress_ns: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens computed so far.
    pub prefilled_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
    /// Prompt tokens served from the KV cache.
    pub cached_prompt_tokens: u32,
    /// Effective token limit (0 = none).
    pub max_tokens: u32,
    /// Index into the header's model table.
    pub model_index: u16,
    /// The engine's batch slot, once scheduled.
    pub sequence_slot: Option<u16>,
}

/// Why a (privately copied) in-flight entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    /// `phase` is not a known [`InflightPhase`](crate::InflightPhase).
    #[error("unknown in-flight phase {0}")]
    Phase(u8),
    /// `operation` is not a known [`Operation`](crate::Operation).
    #[error("unknown operation {0}")]
    Operation(u8),
    /// An id that must be set is all zeros.
    #[error("all-zero {0}")]
    ZeroId(&'static str),
    /// A timestamp is missing, out of order, or contradicts the phase.
    #[error("timestamps out of order or missing: {0}")]
    Timestamps(&'static str),
    /// Token counts contradict each other or the phase.
    #[error("token counts are inconsistent: {0}")]
    Tokens(&'static str),
    /// The batch slot contradicts the phase.
    #[error("sequence slot: {0}")]
    SequenceSlot(&'static str),
    /// `model_index` points past the segment's model table.
    #[error("model index {index} but the segment lists {count} models")]
    ModelIndex {
        /// The index found.
        index: u16,
        /// The number of models in the header.
        count: u16,
    },
}

fn opt(ns: u64) -> Option<u64> {
    (ns != 0).then_some(ns)
}

impl InflightEntry {
    /// Validates this (privately copied) entry. `Ok(None)` for a free entry
    /// (phase 0); `model_count` is the number of models in the header.
    pub fn decode(&self, model_count: u16) -> Result<Option<InflightRequest>, InflightError> {
        use InflightError as E;
        let phase = InflightPhase::try_from(self.phase).map_err(E::Phase)?;
        if phase == InflightPhase::Free {
            return Ok(None);
        }
        let operation = Operation::try_from(self.operation).map_err(E::Operation)?;
        if self.trace_id == [0; 16] {
            return Err(E::ZeroId("trace_id"));
        }
        if self.span_id == [0; 8] {
            return Err(E::ZeroId("span_id"));
        }
        let remote_parent = self.flags & FLAG_REMOTE_PARENT != 0;
        if remote_parent && self.parent_span_id == [0; 8] {
            return Err(E::ZeroId("parent_span_id"));
        }
        if self.t_arrival_ns == 0 {
            return Err(E::Timestamps("no arrival stamp"));
        }
        // Each set stamp is no earlier than the previous set one, and the
        // progress stamp is no earlier than any of them.
        let mut previous = self.t_arrival_ns;
        for (name, ns) in [
            ("scheduled", self.t_scheduled_ns),
            ("first_token", self.t_first_token_ns),
            ("last_token", self.t_last_token_ns),
        ] {
            if ns != 0 {
                if ns < previous {
                    return Err(E::Timestamps(name));
                }
                previous = ns;
            }
        }
        if self.t_progress_ns < previous {
            return Err(E::Timestamps("progress before an earlier stamp"));
        }
        let scheduled = self.t_scheduled_ns != 0;
        let first = self.t_first_token_ns != 0;
        let last = self.t_last_token_ns != 0;
        let queued_slot = self.sequence_slot == u16::MAX;
        match phase {
            InflightPhase::Queued => {
                if scheduled || first || last {
                    return Err(E::Timestamps("a queued request has later stamps"));
                }
                if self.prefilled_tokens != 0 || self.output_tokens != 0 {
                    return Err(E::Tokens("a queued request has computed tokens"));
                }
                if !queued_slot {
                    return Err(E::SequenceSlot("a queued request holds a batch slot"));
                }
            }
            InflightPhase::Prefill => {
                if !scheduled || first || last {
                    return Err(E::Timestamps(
                        "a prefilling request is unscheduled or has tokens",
                    ));
                }
                if self.output_tokens != 0 {
                    return Err(E::Tokens("a prefilling request has output tokens"));
                }
                if queued_slot {
                    return Err(E::SequenceSlot("a scheduled request has no batch slot"));
                }
            }
            InflightPhase::Decode | InflightPhase::Free => {
                if !scheduled || !first || !last {
                    return Err(E::Timestamps("a decoding request lacks a stamp"));
                }
                if self.output_tokens == 0 {
                    return Err(E::Tokens("a decoding request has no output token"));
                }
                if queued_slot {
                    return Err(E::SequenceSlot("a scheduled request has no batch slot"));
                }
            }
        }
        if self.prefilled_tokens > self.prompt_tokens {
            return Err(E::Tokens("more prefilled tokens than prompt tokens"));
        }
        if self.cached_prompt_tokens > self.prompt_tokens {
            return Err(E::Tokens("more cached prompt tokens than prompt tokens"));
        }
        if self.max_tokens != 0 && self.output_tokens > self.max_tokens {
            return Err(E::Tokens("more output tokens than max_tokens"));
        }
        if self.model_index >= model_count {
            return Err(E::ModelIndex {
                index: self.model_index,
                count: model_count,
            });
        }
        Ok(Some(InflightRequest {
            index: 0,
            update: 0,
            phase,
            operation,
            request_id: self.request_id,
            trace_id: self.trace_id,
            parent_span_id: (self.parent_span_id != [0; 8]).then_some(self.parent_span_id),
            span_id: self.span_id,
            trace_flags: self.trace_flags,
            remote_parent,
            stream: self.flags & FLAG_STREAM != 0,
            arrival_ns: self.t_arrival_ns,
            scheduled_ns: opt(self.t_scheduled_ns),
            first_token_ns: opt(self.t_first_token_ns),
            last_token_ns: opt(self.t_last_token_ns),
            progress_ns: self.t_progress_ns,
            prompt_tokens: self.prompt_tokens,
            prefilled_tokens: self.prefilled_tokens,
            output_tokens: self.output_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            max_tokens: self.max_tokens,
            model_index: self.model_index,
            sequence_slot: (!queued_slot).then_some(self.sequence_slot),
        }))
    }
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;
    use crate::layout::INFLIGHT_PAYLOAD_SIZE;
    use crate::region::ControlDefaults;
    use crate::ring::Ring;

    fn table(capacity: u32) -> InflightTable {
        Ring::on_heap_with_inflight(2, capacity, ControlDefaults::default())
            .unwrap()
            .1
    }

    /// A queued request whose ids derive from `seq`.
    pub(crate) fn queued(seq: u64) -> InflightEntry {
        let mut e: InflightEntry = bytemuck::Zeroable::zeroed();
        e.request_id = (u128::from(seq) + 1).to_le_bytes();
        e.trace_id = (u128::from(seq) + 0x100).to_le_bytes();
        e.span_id = (seq + 0x200).to_le_bytes();
        e.t_arrival_ns = 1_000 + seq;
        e.t_progress_ns = 1_000 + seq;
        e.prompt_tokens = 12;
        e.max_tokens = 64;
        e.phase = InflightPhase::Queued as u8;
        e.operation = Operation::Chat as u8;
        e.trace_flags = 1;
        e.sequence_slot = u16::MAX;
        e
    }

    /// `e` after `step` updates of a request that is decoding: every u32 token
    /// field equals `step` (a checksum a torn read would break).
    fn decoding(mut e: InflightEntry, step: u32) -> InflightEntry {
        let t = e.t_arrival_ns + u64::from(step);
        e.phase = InflightPhase::Decode as u8;
        e.t_scheduled_ns = e.t_arrival_ns;
        e.t_first_token_ns = e.t_arrival_ns;
        e.t_last_token_ns = t;
        e.t_progress_ns = t;
        e.prompt_tokens = step;
        e.prefilled_tokens = step;
        e.output_tokens = step;
        e.cached_prompt_tokens = step;
        e.max_tokens = step;
        e.sequence_slot = 3;
        e
    }

    #[test]
    fn claims_fill_the_table_then_requests_are_counted_untracked() {
        let table = table(3);
        let handles: Vec<_> = (0..3).map(|i| table.claim(&queued(i)).unwrap()).collect();
        let mut indices: Vec<_> = handles.iter().map(InflightHandle::index).collect();
        indices.sort_unstable();
        assert_eq!(indices, vec![0, 1, 2]);
        assert!(table.claim(&queued(9)).is_none());
        assert!(table.claim(&queued(10)).is_none());
        assert_eq!(table.untracked(), 2);
        let snapshot = table.reader(1).snapshot().unwrap();
        assert_eq!(snapshot.requests.len(), 3);
        assert_eq!(snapshot.untracked, 2);
        assert_eq!((snapshot.torn, snapshot.invalid), (0, 0));
    }

    #[test]
    fn an_update_is_read_back_validated() {
        let table = table(4);
        let reader = table.reader(1);
        let mut entry = queued(7);
        entry.flags = crate::layout::FLAG_STREAM | crate::layout::FLAG_REMOTE_PARENT;
        entry.parent_span_id = [9; 8];
        let mut handle = table.claim(&entry).unwrap();
        let got = reader.snapshot().unwrap().requests;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].phase, InflightPhase::Queued);
        assert_eq!(got[0].update, 1);
        assert_eq!(got[0].sequence_slot, None);
        assert!(got[0].stream && got[0].remote_parent);
        assert_eq!(got[0].parent_span_id, Some([9; 8]));

        entry.phase = InflightPhase::Prefill as u8;
        entry.t_scheduled_ns = entry.t_arrival_ns + 5;
        entry.t_progress_ns = entry.t_scheduled_ns + 1;
        entry.prefilled_tokens = 4;
        entry.cached_prompt_tokens = 2;
        entry.sequence_slot = 0;
        handle.update(&entry);
        let got = reader.snapshot().unwrap().requests;
        assert_eq!(got[0].phase, InflightPhase::Prefill);
        assert_eq!(got[0].update, 2);
        assert_eq!(got[0].index, handle.index());
        assert_eq!(got[0].scheduled_ns, Some(entry.t_arrival_ns + 5));
        assert_eq!(
            (got[0].prefilled_tokens, got[0].sequence_slot),
            (4, Some(0))
        );
        assert_eq!(got[0].request_id, entry.request_id);

        let entry = decoding(entry, 5);
        handle.update(&entry);
        let got = reader.snapshot().unwrap().requests;
        assert_eq!(
            (got[0].phase, got[0].output_tokens, got[0].update),
            (InflightPhase::Decode, 5, 3)
        );
    }

    #[test]
    fn a_release_frees_the_entry_for_the_next_claim() {
        let table = table(1);
        let reader = table.reader(1);
        let handle = table.claim(&queued(1)).unwrap();
        handle.release();
        assert!(reader.snapshot().unwrap().requests.is_empty());
        // The next claim continues the entry's update numbering.
        let handle = table.claim(&queued(2)).unwrap();
        let got = reader.snapshot().unwrap().requests;
        assert_eq!((got.len(), got[0].update), (1, 3));
        assert_eq!(got[0].request_id, queued(2).request_id);
        drop(handle); // dropping releases too
        assert!(reader.snapshot().unwrap().requests.is_empty());
        assert!(table.claim(&queued(3)).is_some());
        assert_eq!(table.untracked(), 0);
    }

    #[test]
    fn readers_never_see_a_torn_entry() {
        let (updates, readers, capacity) = if cfg!(miri) {
            (30, 1, 2)
        } else {
            (20_000, 3, 4)
        };
        let table = table(capacity);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::scope(|scope| {
            for w in 0..capacity {
                let table = table.clone();
                scope.spawn(move || {
                    let base = queued(u64::from(w));
                    let mut handle = table.claim(&base).unwrap();
                    for step in 1..=updates {
                        handle.update(&decoding(base, step));
                    }
                    handle.release();
                });
            }
            for _ in 0..readers {
                let reader = table.reader(1);
                let stop = std::sync::Arc::clone(&stop);
                scope.spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let snapshot = reader.snapshot().unwrap();
                        assert_eq!(snapshot.invalid, 0, "a torn copy passed the seqlock");
                        for r in &snapshot.requests {
                            if r.phase == InflightPhase::Decode {
                                let step = r.output_tokens;
                                assert_eq!(
                                    [r.prompt_tokens, r.prefilled_tokens, r.cached_prompt_tokens],
                                    [step; 3]
                                );
                                assert_eq!(r.last_token_ns, Some(r.arrival_ns + u64::from(step)));
                                // Update 1 is the queued claim; step k is update k + 1.
                                assert_eq!(r.update, u64::from(step) + 1);
                            }
                            seen += 1;
                        }
                        if cfg!(miri) && seen > 10 {
                            break;
                        }
                    }
                });
            }
            // Writers first, then let the readers go.
            std::thread::sleep(std::time::Duration::from_millis(if cfg!(miri) {
                0
            } else {
                200
            }));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn an_owner_killed_mid_update_leaves_the_previous_state_readable() {
        let cuts = [0, 1, 8, INFLIGHT_PAYLOAD_SIZE / 8];
        let table = table(cuts.len() as u32 + 1);
        let reader = table.reader(1);
        let base = queued(4);
        let mut survivor = table.claim(&base).unwrap();
        survivor.update(&decoding(base, 7));
        for (i, &words) in cuts.iter().enumerate() {
            let e = queued(100 + i as u64);
            let mut h = table.claim(&e).unwrap();
            h.update(&decoding(e, 2));
            // Killed while writing update 3 (the copy holding update 1).
            h.update_and_stop_midway(&decoding(e, 3), words);
        }
        let snapshot = reader.snapshot().unwrap();
        assert_eq!((snapshot.torn, snapshot.invalid), (0, 0));
        assert_eq!(snapshot.requests.len(), cuts.len() + 1);
        for (i, _) in cuts.iter().enumerate() {
            let id = queued(100 + i as u64).request_id;
            let r = snapshot
                .requests
                .iter()
                .find(|r| r.request_id == id)
                .unwrap();
            assert_eq!(
                (r.output_tokens, r.update),
                (2, 2),
                "the previous complete update"
            );
        }
        let r = snapshot
            .requests
            .iter()
            .find(|r| r.request_id == base.request_id)
            .unwrap();
        assert_eq!(r.output_tokens, 7);
        survivor.release();
    }

    #[test]
    fn a_first_update_cut_short_is_counted_torn() {
        let table = table(1);
        let reader = table.reader(1);
        // Claim by hand and stop inside the very first write.
        let slot = &table.view.entries()[0];
        slot.claim.store(5, Ordering::Relaxed);
        slot.copies[1].seq.store(1, Ordering::Relaxed);
        let snapshot = reader.snapshot().unwrap();
        assert_eq!((snapshot.requests.len(), snapshot.torn), (0, 1));
    }

    #[test]
    fn forged_entries_never_panic_and_are_counted() {
        let rounds = if cfg!(miri) { 3 } else { 300 };
        let table = table(8);
        let reader = table.reader(2);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..rounds {
            for e in reader.view.entries() {
                let r = next();
                e.claim.store(r & 1, Ordering::Relaxed);
                for (i, copy) in e.copies.iter().enumerate() {
                    // Mostly even, plausible seq words; sometimes anything.
                    let seq = if round % 2 == 0 {
                        next()
                    } else {
                        (next() % 8) * 4 + 2 * i as u64
                    };
                    copy.seq.store(seq, Ordering::Relaxed);
                    for w in &copy.payload {
                        w.store(
                            if r & 2 == 0 { next() } else { next() & 0x3 },
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            let snapshot = reader.snapshot().unwrap();
            let claimed = reader
                .view
                .entries()
                .iter()
                .filter(|e| e.claim.load(Ordering::Relaxed) != 0)
                .count();
            assert!(
                snapshot.requests.len() + (snapshot.torn + snapshot.invalid) as usize <= claimed
            );
            // The engine side copes with forged memory too.
            if let Some(mut h) = table.claim(&queued(round)) {
                h.update(&queued(round));
                h.release();
            }
        }
        // Random words essentially never validate.
        let mut e: InflightEntry = bytemuck::Zeroable::zeroed();
        e.phase = 9;
        assert_eq!(e.decode(1), Err(InflightError::Phase(9)));
    }

    #[test]
    fn validation_refuses_inconsistent_entries() {
        let ok = queued(1);
        assert!(ok.decode(1).unwrap().is_some());
        type Forge = Box<dyn Fn(&mut InflightEntry)>;
        let cases: Vec<(&str, Forge)> = vec![
            ("operation", Box::new(|e| e.operation = 0)),
            ("trace", Box::new(|e| e.trace_id = [0; 16])),
            ("span", Box::new(|e| e.span_id = [0; 8])),
            ("parent", Box::new(|e| e.flags = FLAG_REMOTE_PARENT)),
            ("arrival", Box::new(|e| e.t_arrival_ns = 0)),
            ("progress", Box::new(|e| e.t_progress_ns = 1)),
            (
                "queued-sched",
                Box::new(|e| e.t_scheduled_ns = e.t_arrival_ns),
            ),
            ("queued-slot", Box::new(|e| e.sequence_slot = 0)),
            (
                "prefill-unsched",
                Box::new(|e| {
                    e.phase = 2;
                    e.sequence_slot = 0;
                }),
            ),
            (
                "decode-no-token",
                Box::new(|e| {
                    e.phase = 3;
                    e.sequence_slot = 0;
                    e.t_scheduled_ns = e.t_arrival_ns;
                }),
            ),
            ("prefilled", Box::new(|e| e.prefilled_tokens = 13)),
            ("cached", Box::new(|e| e.cached_prompt_tokens = 13)),
            ("model", Box::new(|e| e.model_index = 1)),
            (
                "order",
                Box::new(|e| {
                    *e = decoding(*e, 3);
                    e.t_first_token_ns = e.t_last_token_ns + 1;
                }),
            ),
        ];
        for (tag, forge) in cases {
            let mut e = ok;
            forge(&mut e);
            assert!(e.decode(1).is_err(), "{tag}: {e:?}");
        }
        assert!(decoding(ok, 3).decode(1).unwrap().is_some());
    }
}
