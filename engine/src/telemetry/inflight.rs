//! The engine's side of the segment's in-flight table (ABI 1.2).
//!
//! Every admitted request holds one table entry from admission until its final record is in the
//! ring, so a request killed with the engine (SIGKILL, OOM, a fault), or stuck in a hung one, is
//! still visible to the agent and to `ringside-agent inflight`.
//!
//! * **Admission** (an HTTP worker, inside [`crate::scheduler::SchedulerHandle::submit`]):
//!   [`Tracker::admit`] claims a free entry (one pass over the table, lock-free) and writes the
//!   request's identity, arrival and prompt size. No free entry: the table counts the request as
//!   untracked; the request is served all the same.
//! * **Progress** (the inference thread, which owns the entry from then on): scheduling, each
//!   prefill chunk and each output token rewrite the entry — one double-buffered seqlock write
//!   of 15 words: no lock, allocation or syscall.
//! * **Release**: after the request's record was pushed ([`Tracked::release`]); dropping a
//!   [`Tracked`] releases too (the ABI's handle does), so an entry cannot leak while the engine
//!   runs. Only a dead engine leaves entries behind: that is what the agent reports.

use ringside_shm_protocol as shm;

use crate::telemetry::{Operation, TraceIds};

/// Where requests are tracked: the segment's in-flight table, or nowhere (tracing off at
/// admission, or no segment). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    // The telemetry's current segment: each admission claims from the current generation's
    // table (one lock-free load), so the tracker follows a re-created segment. Requests
    // admitted before a switch keep their entries in the old, unlinked table until released.
    current: Option<crate::telemetry::Current>,
}

/// What is known of a request at admission.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// 128-bit request id.
    pub request_id: [u8; 16],
    /// Trace identity.
    pub trace: TraceIds,
    /// Chat or text completion.
    pub operation: Operation,
    /// Monotonic arrival stamp.
    pub t_arrival_ns: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// The token limit the caller asked for (0: none; the scheduler writes the effective one).
    pub max_tokens: u32,
    /// Streamed response.
    pub stream: bool,
    /// Index of the served model name.
    pub model_index: u16,
}

impl Tracker {
    /// A tracker writing into the current segment's table while its tracing is on.
    #[must_use]
    pub(crate) fn new(current: crate::telemetry::Current) -> Self {
        Self {
            current: Some(current),
        }
    }

    /// A tracker that tracks nothing (no segment, or a segment without a table).
    #[must_use]
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Claims an entry for an admitted request and publishes its first state (`queued`).
    /// `None` when there is no table, tracing is off, or no entry is free (then the table
    /// counts the request as untracked).
    #[must_use]
    pub fn admit(&self, a: &Admission, t_now_ns: u64) -> Option<Tracked> {
        let inner = self.current.as_ref()?.current();
        let (table, producer) = inner.inflight_parts()?;
        if !producer.tracing_enabled() {
            return None;
        }
        let mut entry: shm::InflightEntry = bytemuck::Zeroable::zeroed();
        entry.request_id = a.request_id;
        entry.trace_id = a.trace.trace_id;
        entry.parent_span_id = a.trace.parent_span_id.unwrap_or([0; 8]);
        entry.span_id = a.trace.span_id;
        entry.trace_flags = a.trace.trace_flags;
        entry.t_arrival_ns = a.t_arrival_ns;
        entry.t_progress_ns = t_now_ns.max(a.t_arrival_ns);
        entry.prompt_tokens = a.prompt_tokens;
        entry.max_tokens = a.max_tokens;
        entry.phase = shm::InflightPhase::Queued as u8;
        entry.operation = a.operation as u8;
        entry.model_index = a.model_index;
        entry.sequence_slot = u16::MAX;
        let mut flags = 0;
        if a.stream {
            flags |= shm::FLAG_STREAM;
        }
        if a.trace.parent_span_id.is_some() {
            flags |= shm::FLAG_REMOTE_PARENT;
        }
        entry.flags = flags;
        let handle = table.claim(&entry)?;
        Some(Tracked { handle, entry })
    }
}

/// One request's entry, owned by whoever serves the request (the HTTP worker until the job is
/// handed over, then the inference thread).
#[derive(Debug)]
pub struct Tracked {
    handle: shm::InflightHandle,
    entry: shm::InflightEntry,
}

impl Tracked {
    /// The request got sequence slot `slot` at `t_ns`, with `cached` prompt tokens reused and
    /// `max_tokens` as its effective limit: it is prefilling.
    pub fn scheduled(&mut self, t_ns: u64, slot: usize, cached: u32, max_tokens: u32) {
        let e = &mut self.entry;
        e.t_scheduled_ns = t_ns;
        e.t_progress_ns = t_ns;
        e.sequence_slot = u16::try_from(slot).unwrap_or(u16::MAX - 1);
        e.cached_prompt_tokens = cached;
        e.prefilled_tokens = cached;
        e.max_tokens = max_tokens;
        e.phase = shm::InflightPhase::Prefill as u8;
        self.handle.update(&self.entry);
    }

    /// A decode step computed prompt tokens up to `prefilled` at `t_ns`.
    pub fn prefilled(&mut self, t_ns: u64, prefilled: u32) {
        let e = &mut self.entry;
        e.prefilled_tokens = prefilled.min(e.prompt_tokens);
        e.t_progress_ns = t_ns.max(e.t_progress_ns);
        self.handle.update(&self.entry);
    }

    /// Output token number `generated` was sampled at `t_ns`: the request is decoding.
    pub fn token(&mut self, t_ns: u64, generated: u32) {
        let e = &mut self.entry;
        if e.t_first_token_ns == 0 {
            e.t_first_token_ns = t_ns;
            e.prefilled_tokens = e.prompt_tokens;
            e.phase = shm::InflightPhase::Decode as u8;
        }
        e.t_last_token_ns = t_ns;
        e.t_progress_ns = t_ns.max(e.t_progress_ns);
        e.output_tokens = generated;
        self.handle.update(&self.entry);
    }

    /// Frees the entry: the request's record is in the ring (or the request was refused).
    pub fn release(self) {
        self.handle.release();
    }
}
