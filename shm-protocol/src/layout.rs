//! The byte layout of a segment: header, control block, counters and slots.
//!
//! The diagram, invariants and orderings are in the crate documentation; this
//! module holds the types and the constants, and the tests at the bottom freeze
//! every size and offset.

use crate::sync::{AtomicU32, AtomicU64};
use bytemuck::{Pod, Zeroable};

/// `b"RINGSIDE"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RINGSIDE");
/// Incompatible layout changes bump the major version; readers refuse other majors.
pub const ABI_MAJOR: u16 = 1;
/// Additive changes (new fields carved out of reserved bytes) bump the minor version.
pub const ABI_MINOR: u16 = 4;

/// Size of the header region at offset 0.
pub const HEADER_SIZE: usize = 1024;
/// Offset of the [`ControlBlock`].
pub const CONTROL_OFFSET: usize = 1024;
/// Size reserved for the control block.
pub const CONTROL_SIZE: usize = 512;
/// Offset of the counters (`Counters`, crate-private).
pub const COUNTERS_OFFSET: usize = 1536;
/// Size reserved for the counters.
pub const COUNTERS_SIZE: usize = 512;
/// Offset of the first slot; page-aligned.
pub const RING_OFFSET: usize = 4096;
/// Size of one slot: the commit word followed by one [`Record`].
pub const SLOT_SIZE: usize = 256;
/// Size of a [`Record`], the payload of a slot.
pub const RECORD_SIZE: usize = SLOT_SIZE - 8;
/// Number of 64-bit words a slot's payload is copied as.
#[cfg(not(loom))]
pub(crate) const PAYLOAD_WORDS: usize = RECORD_SIZE / 8;
/// Under loom every atomic access is a scheduling point: two words keep the
/// model small while still letting a reader observe a half-written payload.
#[cfg(loom)]
pub(crate) const PAYLOAD_WORDS: usize = 2;
/// Smallest ring a segment may hold.
pub const MIN_CAPACITY: u32 = 2;
/// Largest ring a segment may hold (2^24 slots = 4 GiB); bounds what a forged
/// header can make a reader map or walk.
pub const MAX_CAPACITY: u32 = 1 << 24;
/// Length of the instance name field, NUL padded.
pub const NAME_LEN: usize = 64;
/// Number of entries in the served-model table.
pub const MAX_MODELS: usize = 8;

/// Total segment size for a ring of `capacity` slots and no in-flight table
/// (a 1.1-shaped segment; see [`segment_size_with_inflight`]).
pub const fn segment_size(capacity: u32) -> usize {
    RING_OFFSET + capacity as usize * SLOT_SIZE
}

/// Size of one in-flight table entry: a claim line and two 128-byte copies.
pub const INFLIGHT_ENTRY_SIZE: usize = 320;
/// Size of an [`InflightEntry`], the payload of one copy.
pub const INFLIGHT_PAYLOAD_SIZE: usize = 120;
/// Largest in-flight table a segment may hold; bounds what a forged header can
/// make a reader walk or allocate.
pub const MAX_INFLIGHT: u32 = 4096;
/// Number of 64-bit words an in-flight copy's payload is stored as.
#[cfg(not(loom))]
pub(crate) const INFLIGHT_WORDS: usize = INFLIGHT_PAYLOAD_SIZE / 8;
/// Under loom, two words (as for ring slots) keep the model small while still
/// letting a reader observe a half-written copy.
#[cfg(loom)]
pub(crate) const INFLIGHT_WORDS: usize = 2;

/// Offset of the in-flight table behind a ring of `ring_capacity` slots: the
/// first page boundary after the last slot.
pub const fn inflight_offset_for(ring_capacity: u32) -> usize {
    let end = segment_size(ring_capacity);
    (end + 4095) & !4095
}

/// Total segment size for a ring of `ring_capacity` slots followed by an
/// in-flight table of `inflight_capacity` entries (0 = no table: then this is
/// [`segment_size`]).
pub const fn segment_size_with_inflight(ring_capacity: u32, inflight_capacity: u32) -> usize {
    if inflight_capacity == 0 {
        segment_size(ring_capacity)
    } else {
        inflight_offset_for(ring_capacity) + inflight_capacity as usize * INFLIGHT_ENTRY_SIZE
    }
}

/// Offset, inside the step ring region, of its [`ControlBlock`] (of which
/// only `read_cursor` is used: tracing is switched by the request ring's
/// control block, and the step ring always overwrites).
pub const STEP_CONTROL_OFFSET: usize = 0;
/// Offset, inside the step ring region, of its counters.
pub const STEP_COUNTERS_OFFSET: usize = CONTROL_SIZE;
/// Offset, inside the step ring region, of its first slot.
pub const STEP_SLOTS_OFFSET: usize = CONTROL_SIZE + COUNTERS_SIZE;
/// Sequence slots a [`StepRecord`]'s slot sets can name (the engine's
/// `--parallel` is at most this).
pub const MAX_STEP_SLOTS: usize = 256;

/// Offset of the step ring region behind a ring of `ring_capacity` slots and
/// an in-flight table of `inflight_capacity` entries: the first page boundary
/// after them.
pub const fn step_ring_offset_for(ring_capacity: u32, inflight_capacity: u32) -> usize {
    let end = segment_size_with_inflight(ring_capacity, inflight_capacity);
    (end + 4095) & !4095
}

/// Total segment size with a step ring of `step_capacity` slots (0 = none:
/// then this is [`segment_size_with_inflight`]).
pub const fn segment_size_with_steps(
    ring_capacity: u32,
    inflight_capacity: u32,
    step_capacity: u32,
) -> usize {
    if step_capacity == 0 {
        segment_size_with_inflight(ring_capacity, inflight_capacity)
    } else {
        step_ring_offset_for(ring_capacity, inflight_capacity)
            + STEP_SLOTS_OFFSET
            + step_capacity as usize * SLOT_SIZE
    }
}

/// `abi_version` word value for a major/minor pair.
pub const fn pack_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// The segment header, written once by the engine before it publishes
/// `abi_version`; never written afterwards. Readers copy it out once and
/// validate the copy, never trusting a field twice.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct Header {
    /// [`MAGIC`]; written first.
    pub magic: u64,
    /// `(major << 16) | minor`; zero while the segment is being initialised,
    /// stored last with `Release` (readers load it with `Acquire`).
    pub abi_version: u32,
    /// [`HEADER_SIZE`].
    pub header_size: u32,
    /// Size of the whole segment in bytes, as the engine sized the file.
    pub segment_size: u64,
    /// Offset of the control block.
    pub control_offset: u32,
    /// Offset of the counters.
    pub counters_offset: u32,
    /// Offset of slot 0.
    pub ring_offset: u64,
    /// Bytes per slot ([`SLOT_SIZE`]).
    pub slot_size: u32,
    /// Number of slots, a power of two.
    pub ring_capacity: u32,
    /// Process id of the engine that created the segment.
    pub engine_pid: u32,
    /// Number of valid entries in `models`.
    pub model_count: u32,
    /// Start time of the engine process (field 22 of `/proc/<pid>/stat`, clock
    /// ticks since boot): a reused pid has a different start time.
    pub engine_start_time: u64,
    /// Incremented each time an engine replaces a stale segment of the same name.
    pub generation: u64,
    /// `CLOCK_REALTIME` at creation, in nanoseconds since the Unix epoch.
    pub created_realtime_ns: u64,
    /// `CLOCK_MONOTONIC` read right after `created_realtime_ns`: a record stamp
    /// `m` happened at `created_realtime_ns + (m - created_monotonic_ns)`.
    pub created_monotonic_ns: u64,
    /// Effective uid of the engine.
    pub engine_uid: u32,
    /// Zero.
    pub _pad0: u32,
    /// Instance name, UTF-8, NUL padded; equals the `<instance>` in the segment's name.
    pub instance: [u8; NAME_LEN],
    /// Served model names, UTF-8, NUL padded; a record's `model_index` points here.
    pub models: [[u8; NAME_LEN]; MAX_MODELS],
    /// Since 1.1: the TCP port the engine serves its API on (`server.port`);
    /// zero when unknown (and in 1.0 segments, where these bytes were reserved).
    pub listen_port: u16,
    /// Zero.
    pub _pad1: [u8; 6],
    /// Since 1.2: offset of the in-flight table (64-aligned, after the ring;
    /// the engine puts it at [`inflight_offset_for`]`(ring_capacity)`); 0 = no
    /// table. Readers look at it (and the next two fields) only when the
    /// minor version is at least 2: these bytes were reserved before.
    pub inflight_offset: u64,
    /// Since 1.2: number of in-flight entries (at most [`MAX_INFLIGHT`]).
    pub inflight_capacity: u32,
    /// Since 1.2: bytes per in-flight entry ([`INFLIGHT_ENTRY_SIZE`]).
    pub inflight_entry_size: u32,
    /// Since 1.2: [`ENGINE_FLAG_LIVENESS_LOCK`] and future capability bits
    /// (readers ignore unknown ones).
    pub engine_flags: u32,
    /// Zero.
    pub _pad2: u32,
    /// Since 1.4: offset of the step ring region (page-aligned, after the
    /// in-flight table; [`step_ring_offset_for`]); 0 = no step ring. Readers
    /// look at it (and the next two fields) only when the minor version is at
    /// least 4.
    pub step_ring_offset: u64,
    /// Since 1.4: slots in the step ring, a power of two.
    pub step_ring_capacity: u32,
    /// Since 1.4: bytes per step slot ([`SLOT_SIZE`]).
    pub step_slot_size: u32,
    /// Zero; room for minor versions.
    pub reserved: [u8; 304],
}

/// [`Header::engine_flags`] bit: the engine holds an exclusive `flock` on
/// the segment file for as long as it runs (taken before the header is
/// published). The kernel drops it when the process dies, in any pid
/// namespace, so a reader that can take a shared lock knows the engine is
/// gone; without the bit, readers fall back to the pid and heartbeat.
pub const ENGINE_FLAG_LIVENESS_LOCK: u32 = 1;

/// Offset of [`Header::abi_version`], the word published last.
pub const ABI_VERSION_OFFSET: usize = 8;

/// What the engine does when a push finds no free slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OverflowMode {
    /// Overwrite the oldest record: the ring always holds the most recent
    /// records (a flight recorder); a reader that falls behind is lapped and
    /// counts exactly what it lost.
    #[default]
    Overwrite = 0,
    /// Drop the newest record and count it in `dropped_full`; nothing unread
    /// is ever overwritten.
    Discard = 1,
}

impl TryFrom<u32> for OverflowMode {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(Self::Overwrite),
            1 => Ok(Self::Discard),
            other => Err(other),
        }
    }
}

/// How much of a request the agent turns into spans.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Detail {
    /// One span per request.
    Request = 0,
    /// A request span with `queue`, `prefill` and `decode` children.
    #[default]
    Phases = 1,
}

impl TryFrom<u32> for Detail {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(Self::Request),
            1 => Ok(Self::Phases),
            other => Err(other),
        }
    }
}

/// The control block: written by the agent or the CLI, read by the engine.
/// Every field is an atomic, so any process may read or write it at any time;
/// a value outside its enum's range is read as "invalid", never trusted.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ControlBlock {
    // Cache line 0: read by the engine on every request.
    /// 1 = the engine writes records, 0 = it writes nothing. One relaxed load
    /// per request; a change takes effect on the engine's next request.
    pub(crate) tracing_enabled: AtomicU32,
    /// [`OverflowMode`]; read by the producer on every push.
    pub(crate) overflow_mode: AtomicU32,
    /// [`Detail`]; read by the agent.
    pub(crate) detail: AtomicU32,
    /// Head sampling ratio in parts per million (1_000_000 = keep all); read by
    /// the agent.
    pub(crate) head_sample_ppm: AtomicU32,
    /// Incremented by whoever changes a setting, so a watcher can notice.
    pub(crate) settings_epoch: AtomicU64,
    _line0: [u8; 40],
    // Cache line 1: tail sampling settings, read by the agent.
    /// Non-zero: always keep spans of failed, aborted and rejected requests.
    pub(crate) tail_keep_errors: AtomicU32,
    /// Tail-sampling ratio for requests no rule keeps, in parts per million.
    pub(crate) tail_sample_ppm: AtomicU32,
    /// Keep every request whose time to first token is at least this (µs); 0 = off.
    pub(crate) tail_ttft_us: AtomicU64,
    /// Keep every request whose end-to-end latency is at least this (µs); 0 = off.
    pub(crate) tail_e2e_us: AtomicU64,
    _line1: [u8; 40],
    // Cache line 2: the agent's liveness.
    /// Process id of the attached agent, 0 when none claims the segment.
    pub(crate) agent_pid: AtomicU32,
    _pad2: u32,
    /// `CLOCK_MONOTONIC` nanoseconds of the agent's last heartbeat.
    pub(crate) agent_heartbeat_ns: AtomicU64,
    _line2: [u8; 48],
    // Cache line 3: the consumer's cursor, written often by the agent, read by
    // producers only in discard mode: kept apart from the hot line 0.
    /// Ticket of the next record the agent has not yet consumed. Stored with
    /// `Release` after the slots below it were copied out; a restarted agent
    /// resumes here, and discard-mode producers never overwrite at or above it.
    pub(crate) read_cursor: AtomicU64,
    _line3: [u8; 56],
    // Cache line 4 (1.2): written once per dead segment, by an agent.
    /// The generation whose in-flight table (and ring backlog) an agent has
    /// exported, after the engine died; 0 = not reported. Written only by an
    /// agent (never the engine), with a compare-exchange, once its crash spans
    /// are handed on; read by other agents (not to report twice) and by the
    /// next engine of the instance (a reported segment is not retained).
    pub(crate) inflight_reported: AtomicU64,
    _line4: [u8; 56],
    _reserved: [u8; CONTROL_SIZE - 320],
}

/// Counters written by the engine.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct Counters {
    /// Next ticket. A producer takes ticket `t` with `fetch_add` (overwrite
    /// mode) or a bounded compare-exchange loop (discard mode); ticket `t`
    /// lives in slot `t & (capacity - 1)`. Tickets issued = records written.
    pub(crate) head: AtomicU64,
    _line0: [u8; 56],
    /// Discard mode: the ring held `capacity` unconsumed records; newest dropped.
    pub(crate) dropped_full: AtomicU64,
    /// Discard mode: the ticket counter kept moving under the producer for
    /// [`DISCARD_CLAIM_ATTEMPTS`](crate::ring::DISCARD_CLAIM_ATTEMPTS) tries;
    /// dropped to stay wait-free.
    pub(crate) dropped_contended: AtomicU64,
    /// The ticket's slot was still being written by a producer a whole lap
    /// behind; the record was dropped. The ticket stays empty, so the reader
    /// also counts it as abandoned: this counter is a diagnostic subset of
    /// that, not a separate loss.
    pub(crate) dropped_busy: AtomicU64,
    /// `CLOCK_MONOTONIC` nanoseconds of the engine's last heartbeat, written
    /// off the hot path about once a second; how a reader in another pid
    /// namespace tells that the engine is alive.
    pub(crate) engine_heartbeat_ns: AtomicU64,
    /// Since 1.2: requests admitted while every in-flight entry was claimed;
    /// they run untracked (counted, never silently lost). Written by the
    /// engine's HTTP threads, `Relaxed`.
    pub(crate) inflight_untracked: AtomicU64,
    _line1: [u8; 24],
    _reserved: [u8; COUNTERS_SIZE - 128],
}

/// One ring slot: a commit word and the payload words of a [`Record`].
///
/// Commit word: `0` = never written; `(t + 1) << 1` = holds the complete
/// record of ticket `t`; `((t + 1) << 1) | 1` = being written for ticket `t`.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) commit: AtomicU64,
    pub(crate) payload: [AtomicU64; PAYLOAD_WORDS],
}

/// One copy of an in-flight entry: a seqlock word and the payload words of an
/// [`InflightEntry`]. `seq` is `2n` once update `n` of the entry is complete
/// in this copy and `2n - 1` while it is being written (copy `n % 2` holds
/// update `n`); 0 = never written.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct InflightCopy {
    pub(crate) seq: AtomicU64,
    pub(crate) payload: [AtomicU64; INFLIGHT_WORDS],
}

/// One in-flight table entry: the claim word on its own cache line, then two
/// copies (double buffering: a writer killed mid-update tears at most one).
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct InflightSlot {
    /// 0 = free; otherwise the owner's non-zero claim id.
    pub(crate) claim: AtomicU64,
    _line0: [u8; 56],
    pub(crate) copies: [InflightCopy; 2],
}

/// Phase of an in-flight request ([`InflightEntry::phase`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InflightPhase {
    /// The entry is free (written by a release); readers skip it.
    Free = 0,
    /// Admitted, waiting for a sequence slot.
    Queued = 1,
    /// Scheduled; prompt tokens are being computed.
    Prefill = 2,
    /// Generating output tokens.
    Decode = 3,
}

impl InflightPhase {
    /// How operators read it (`ringside-agent inflight`, logs).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Queued => "queued",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// The payload of an in-flight entry: what the engine knows about a request it
/// holds (queued or running). Numbers and identifiers only, never text.
///
/// The engine's HTTP thread fills it at admission ([`claim`]); from then on
/// only the request's current owner (the HTTP thread, then the inference
/// thread it hands the request to) writes it, with [`update`]. Timestamps are
/// `CLOCK_MONOTONIC` nanoseconds; 0 means "not yet".
///
/// [`claim`]: crate::InflightTable::claim
/// [`update`]: crate::InflightHandle::update
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct InflightEntry {
    /// 128-bit request id, as in the request's final [`Record`]. Set at admission.
    pub request_id: [u8; 16],
    /// W3C trace id (the caller's, or a new one). Set at admission; never zero.
    pub trace_id: [u8; 16],
    /// The caller's span id; zero = none. Set at admission.
    pub parent_span_id: [u8; 8],
    /// The span id the engine assigned to this request (the final record's
    /// span id). Set at admission; never zero.
    pub span_id: [u8; 8],
    /// Request accepted by the HTTP layer. Set at admission; never zero.
    pub t_arrival_ns: u64,
    /// Left the queue and got a sequence slot; set by the inference thread.
    pub t_scheduled_ns: u64,
    /// First output token sampled; set by the inference thread.
    pub t_first_token_ns: u64,
    /// Latest output token sampled; set by the inference thread with each token.
    pub t_last_token_ns: u64,
    /// Last time anything advanced (admission, scheduling, a prefill chunk, a
    /// token): what stall detection uses. Set by every update; never zero and
    /// never earlier than any other stamp.
    pub t_progress_ns: u64,
    /// Prompt tokens (after tokenisation, at admission).
    pub prompt_tokens: u32,
    /// Prompt tokens computed so far (prefill progress); at most `prompt_tokens`.
    pub prefilled_tokens: u32,
    /// Output tokens generated so far.
    pub output_tokens: u32,
    /// Prompt tokens served from the KV cache; at most `prompt_tokens`. Set
    /// when the request is scheduled.
    pub cached_prompt_tokens: u32,
    /// Effective token limit (0 = none). Set at admission.
    pub max_tokens: u32,
    /// [`InflightPhase`]: 1 queued at admission, 2 once scheduled, 3 after the
    /// first token; 0 is written only by a release.
    pub phase: u8,
    /// [`Operation`]. Set at admission.
    pub operation: u8,
    /// W3C trace flags (0x01 = sampled). Set at admission.
    pub trace_flags: u8,
    /// [`FLAG_STREAM`], [`FLAG_REMOTE_PARENT`], as in records; unknown bits
    /// are ignored. Set at admission.
    pub flags: u8,
    /// Index into the header's model table. Set at admission.
    pub model_index: u16,
    /// The engine's batch (sequence) slot; `u16::MAX` while queued. Set when
    /// the request is scheduled.
    pub sequence_slot: u16,
    /// Zero; room for minor versions (readers ignore what they do not know).
    pub reserved: [u8; 4],
}

/// What happened to a request.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// The request was admitted and ended: completed, failed or aborted.
    RequestFinished = 1,
    /// The request was refused before it reached the scheduler (400, 401,
    /// 404, 413, 429, 503).
    RequestRejected = 2,
}

/// The OpenAI operation, mapped to `gen_ai.operation.name`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /v1/chat/completions` (`chat`).
    Chat = 1,
    /// `POST /v1/completions` (`text_completion`).
    TextCompletion = 2,
}

impl Operation {
    /// The `gen_ai.operation.name` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::TextCompletion => "text_completion",
        }
    }
}

/// Why generation stopped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// No generation took place (rejected, or failed before the first token).
    None = 0,
    /// End of sequence or a stop string.
    Stop = 1,
    /// `max_tokens` or the context was exhausted.
    Length = 2,
    /// The client went away.
    Abort = 3,
    /// The engine failed the request.
    Error = 4,
}

impl FinishReason {
    /// The OpenAI / `gen_ai.response.finish_reasons` spelling, if any.
    pub const fn as_str(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Stop => Some("stop"),
            Self::Length => Some("length"),
            Self::Abort => Some("abort"),
            Self::Error => Some("error"),
        }
    }
}

/// The class of failure, mapped to `error.type`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The request succeeded.
    None = 0,
    /// 400: malformed body or an invalid parameter.
    InvalidRequest = 1,
    /// 401: missing or wrong API key.
    Unauthorized = 2,
    /// 404: unknown model.
    ModelNotFound = 3,
    /// 413: body over the size cap.
    PayloadTooLarge = 4,
    /// 429: the queue was full.
    QueueFull = 5,
    /// 400: the prompt does not fit the context.
    ContextLengthExceeded = 6,
    /// The client disconnected before the response was complete.
    ClientDisconnected = 7,
    /// 500: the engine failed.
    Internal = 8,
    /// 503: the model is still loading or the engine is shutting down.
    Unavailable = 9,
    /// Since 1.2. Never written by an engine: the class an agent gives a
    /// request it found in the in-flight table of an engine that died.
    EngineCrashed = 10,
}

impl ErrorType {
    /// The `error.type` value, if the request failed.
    pub const fn as_str(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::InvalidRequest => Some("invalid_request"),
            Self::Unauthorized => Some("unauthorized"),
            Self::ModelNotFound => Some("model_not_found"),
            Self::PayloadTooLarge => Some("payload_too_large"),
            Self::QueueFull => Some("queue_full"),
            Self::ContextLengthExceeded => Some("context_length_exceeded"),
            Self::ClientDisconnected => Some("client_disconnected"),
            Self::Internal => Some("internal"),
            Self::Unavailable => Some("unavailable"),
            Self::EngineCrashed => Some("engine_crashed"),
        }
    }
}

macro_rules! u8_enum_try_from {
    ($t:ty { $($v:ident),* $(,)? }) => {
        impl TryFrom<u8> for $t {
            type Error = u8;
            fn try_from(raw: u8) -> Result<Self, u8> {
                $(if raw == <$t>::$v as u8 { return Ok(<$t>::$v); })*
                Err(raw)
            }
        }
    };
}
u8_enum_try_from!(RecordKind {
    RequestFinished,
    RequestRejected
});
u8_enum_try_from!(Operation {
    Chat,
    TextCompletion
});
u8_enum_try_from!(InflightPhase {
    Free,
    Queued,
    Prefill,
    Decode
});
u8_enum_try_from!(FinishReason {
    None,
    Stop,
    Length,
    Abort,
    Error
});
u8_enum_try_from!(ErrorType {
    None,
    InvalidRequest,
    Unauthorized,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    ContextLengthExceeded,
    ClientDisconnected,
    Internal,
    Unavailable,
    EngineCrashed,
});

/// [`Record::flags`]: the response was streamed.
pub const FLAG_STREAM: u8 = 1 << 0;
/// [`Record::flags`]: `parent_span_id` came from a valid caller `traceparent`.
pub const FLAG_REMOTE_PARENT: u8 = 1 << 1;
/// [`Record::flags`] (1.3): `ot_randomness` holds the caller's explicit
/// randomness value (`rv` of the `ot` tracestate entry).
pub const FLAG_OT_RANDOMNESS: u8 = 1 << 2;
/// [`Record::flags`] (1.3): `ot_threshold` holds the caller's sampling
/// threshold (`th` of the `ot` tracestate entry).
pub const FLAG_OT_THRESHOLD: u8 = 1 << 3;
/// [`Record::flags`] (1.4): `sequence_slot` holds the batch slot the request
/// was served in (a request that was never scheduled has none).
pub const FLAG_SEQUENCE_SLOT: u8 = 1 << 4;

/// [`Record::params_set`] bits: which sampling parameters the caller set
/// explicitly (the record always carries the effective values).
pub mod params {
    /// `max_tokens` / `max_completion_tokens`.
    pub const MAX_TOKENS: u16 = 1 << 0;
    /// `temperature`.
    pub const TEMPERATURE: u16 = 1 << 1;
    /// `top_p`.
    pub const TOP_P: u16 = 1 << 2;
    /// `top_k`.
    pub const TOP_K: u16 = 1 << 3;
    /// `seed`.
    pub const SEED: u16 = 1 << 4;
    /// `frequency_penalty`.
    pub const FREQUENCY_PENALTY: u16 = 1 << 5;
    /// `presence_penalty`.
    pub const PRESENCE_PENALTY: u16 = 1 << 6;
}

/// One request, as the engine writes it: numbers and identifiers only, never
/// prompt or completion text. Timestamps are `CLOCK_MONOTONIC` nanoseconds
/// (convert with the header's clock pair); 0 means "did not happen".
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct Record {
    /// 128-bit request id (the response `id` carries it in hex).
    pub request_id: [u8; 16],
    /// W3C trace id: the caller's, or a new one.
    pub trace_id: [u8; 16],
    /// The caller's span id; zero without a valid `traceparent`.
    pub parent_span_id: [u8; 8],
    /// The span id the engine assigned to this request.
    pub span_id: [u8; 8],
    /// Request accepted by the HTTP layer.
    pub t_arrival_ns: u64,
    /// Left the queue and got a sequence slot; 0 if never scheduled.
    pub t_scheduled_ns: u64,
    /// First output token sampled; 0 if none.
    pub t_first_token_ns: u64,
    /// Last output token sampled; 0 if none.
    pub t_last_token_ns: u64,
    /// Response complete (or the request failed / was rejected).
    pub t_finished_ns: u64,
    /// Effective sampling seed.
    pub seed: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the KV cache instead of being computed.
    pub cached_prompt_tokens: u32,
    /// Effective token limit.
    pub max_tokens: u32,
    /// Effective temperature (0 = greedy).
    pub temperature: f32,
    /// Effective nucleus sampling threshold.
    pub top_p: f32,
    /// Effective frequency penalty.
    pub frequency_penalty: f32,
    /// Effective presence penalty.
    pub presence_penalty: f32,
    /// Effective top-k (0 = disabled).
    pub top_k: u32,
    /// HTTP status of the response.
    pub http_status: u16,
    /// Index into the header's model table.
    pub model_index: u16,
    /// Requests waiting in the queue when this one arrived.
    pub queue_depth: u16,
    /// Sequences running when this one was scheduled.
    pub running: u16,
    /// [`RecordKind`].
    pub kind: u8,
    /// [`Operation`].
    pub operation: u8,
    /// [`FinishReason`].
    pub finish_reason: u8,
    /// [`ErrorType`].
    pub error_type: u8,
    /// W3C trace flags (0x01 = sampled).
    pub trace_flags: u8,
    /// [`FLAG_STREAM`], [`FLAG_REMOTE_PARENT`], [`FLAG_OT_RANDOMNESS`],
    /// [`FLAG_OT_THRESHOLD`]; unknown bits are ignored.
    pub flags: u8,
    /// Bits of [`params`].
    pub params_set: u16,
    /// 1.3: the caller's explicit randomness (`ot=rv:`), a 56-bit value as a
    /// native-endian u64 (bytes, so the record keeps its alignment); meaningful
    /// only with [`FLAG_OT_RANDOMNESS`].
    pub ot_randomness: [u8; 8],
    /// 1.3: the caller's rejection threshold (`ot=th:`), a 56-bit value as a
    /// native-endian u64; meaningful only with [`FLAG_OT_THRESHOLD`].
    pub ot_threshold: [u8; 8],
    /// 1.4: the engine's batch (sequence) slot the request was served in;
    /// meaningful only with [`FLAG_SEQUENCE_SLOT`]. With the stamps it joins
    /// the request to the step records that carried it.
    pub sequence_slot: u16,
    /// Zero; room for minor versions (readers ignore what they do not know).
    pub reserved: [u8; 82],
}

/// One engine step (ABI 1.4), the payload of a step ring slot: one pass of
/// the scheduler, which runs every decoding sequence's next token (one
/// `llama_decode` per decode group) and then prompt chunks of prefilling
/// sequences (one call per chunk). Counts and stamps only, never text.
/// Stamps are `CLOCK_MONOTONIC` nanoseconds, taken on the inference thread.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct StepRecord {
    /// Step number since the engine started, from 1; consecutive records of
    /// one engine differ by one (a gap means steps were not recorded).
    pub step: u64,
    /// Before the step's first `llama_decode`.
    pub t_start_ns: u64,
    /// After the decode calls and the sampling of their tokens (equal to
    /// `t_start_ns` when nothing decoded): when those tokens were emitted.
    pub t_decode_end_ns: u64,
    /// After the step's last prompt chunk.
    pub t_end_ns: u64,
    /// Prompt tokens computed in the step.
    pub prefill_tokens: u32,
    /// KV cells holding tokens at the step's start (running sequences and
    /// prompts kept for reuse).
    pub kv_cells_used: u32,
    /// KV cells in all (`ctx-size × parallel`).
    pub kv_cells_total: u32,
    /// Requests waiting for a slot at the step's start.
    pub queue_depth: u32,
    /// Sequences that decoded a token (the bits of `decode_slots`).
    pub decode_sequences: u16,
    /// Sequences that computed prompt tokens (the bits of `prefill_slots`).
    pub prefill_sequences: u16,
    /// Slots holding a request at the step's start.
    pub slots_occupied: u16,
    /// Slots in all (`--parallel`, at most [`MAX_STEP_SLOTS`]).
    pub slots_total: u16,
    /// `llama_decode` calls for decode groups.
    pub decode_calls: u16,
    /// `llama_decode` calls for prompt chunks.
    pub prefill_calls: u16,
    /// Rows the decode calls carried, idle slots' placeholder rows included.
    pub decode_rows: u16,
    /// [`STEP_FLAG_FAILED`]; unknown bits are ignored.
    pub flags: u16,
    /// Bit `s` (word `s / 64`, bit `s % 64`): slot `s` decoded a token.
    pub decode_slots: [u64; 4],
    /// Bit `s`: slot `s` computed prompt tokens.
    pub prefill_slots: [u64; 4],
    /// Zero; room for minor versions.
    pub reserved: [u8; 120],
}

/// [`StepRecord::flags`]: a `llama_decode` call of the step failed.
pub const STEP_FLAG_FAILED: u16 = 1;

/// A lock-free way to read the version word a creator publishes last.
///
/// # Safety
/// `base` must point to at least [`HEADER_SIZE`] readable bytes that stay
/// mapped for the duration of the call, aligned to 8.
#[cfg(not(loom))]
pub(crate) unsafe fn load_abi_version(base: *const u8) -> u32 {
    // SAFETY: the caller guarantees `base..base+HEADER_SIZE` is mapped and
    // 8-aligned, so offset 8 is a 4-aligned u32 inside it; an `AtomicU32` is
    // valid for any bit pattern and may be shared with other processes.
    let word = unsafe { AtomicU32::from_ptr(base.add(ABI_VERSION_OFFSET) as *mut u32) };
    word.load(crate::sync::Ordering::Acquire)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn header_layout_is_frozen() {
        assert_eq!(size_of::<Header>(), HEADER_SIZE);
        assert_eq!(offset_of!(Header, magic), 0);
        assert_eq!(offset_of!(Header, abi_version), ABI_VERSION_OFFSET);
        assert_eq!(offset_of!(Header, header_size), 12);
        assert_eq!(offset_of!(Header, segment_size), 16);
        assert_eq!(offset_of!(Header, control_offset), 24);
        assert_eq!(offset_of!(Header, counters_offset), 28);
        assert_eq!(offset_of!(Header, ring_offset), 32);
        assert_eq!(offset_of!(Header, slot_size), 40);
        assert_eq!(offset_of!(Header, ring_capacity), 44);
        assert_eq!(offset_of!(Header, engine_pid), 48);
        assert_eq!(offset_of!(Header, model_count), 52);
        assert_eq!(offset_of!(Header, engine_start_time), 56);
        assert_eq!(offset_of!(Header, generation), 64);
        assert_eq!(offset_of!(Header, created_realtime_ns), 72);
        assert_eq!(offset_of!(Header, created_monotonic_ns), 80);
        assert_eq!(offset_of!(Header, engine_uid), 88);
        assert_eq!(offset_of!(Header, instance), 96);
        assert_eq!(offset_of!(Header, models), 160);
        assert_eq!(offset_of!(Header, listen_port), 672);
        assert_eq!(offset_of!(Header, inflight_offset), 680);
        assert_eq!(offset_of!(Header, inflight_capacity), 688);
        assert_eq!(offset_of!(Header, inflight_entry_size), 692);
        assert_eq!(offset_of!(Header, engine_flags), 696);
        assert_eq!(offset_of!(Header, _pad2), 700);
        assert_eq!(offset_of!(Header, step_ring_offset), 704);
        assert_eq!(offset_of!(Header, step_ring_capacity), 712);
        assert_eq!(offset_of!(Header, step_slot_size), 716);
        assert_eq!(offset_of!(Header, reserved), 720);
        assert_eq!(MAGIC.to_le_bytes(), *b"RINGSIDE");
    }

    #[test]
    fn control_block_layout_is_frozen() {
        assert_eq!(size_of::<ControlBlock>(), CONTROL_SIZE);
        assert_eq!(align_of::<ControlBlock>(), 64);
        assert_eq!(offset_of!(ControlBlock, tracing_enabled), 0);
        assert_eq!(offset_of!(ControlBlock, overflow_mode), 4);
        assert_eq!(offset_of!(ControlBlock, detail), 8);
        assert_eq!(offset_of!(ControlBlock, head_sample_ppm), 12);
        assert_eq!(offset_of!(ControlBlock, settings_epoch), 16);
        assert_eq!(offset_of!(ControlBlock, tail_keep_errors), 64);
        assert_eq!(offset_of!(ControlBlock, tail_sample_ppm), 68);
        assert_eq!(offset_of!(ControlBlock, tail_ttft_us), 72);
        assert_eq!(offset_of!(ControlBlock, tail_e2e_us), 80);
        assert_eq!(offset_of!(ControlBlock, agent_pid), 128);
        assert_eq!(offset_of!(ControlBlock, agent_heartbeat_ns), 136);
        assert_eq!(offset_of!(ControlBlock, read_cursor), 192);
        assert_eq!(offset_of!(ControlBlock, inflight_reported), 256);
        assert_eq!(offset_of!(ControlBlock, _reserved), 320);
    }

    #[test]
    fn counters_layout_is_frozen() {
        assert_eq!(size_of::<Counters>(), COUNTERS_SIZE);
        assert_eq!(align_of::<Counters>(), 64);
        assert_eq!(offset_of!(Counters, head), 0);
        assert_eq!(offset_of!(Counters, dropped_full), 64);
        assert_eq!(offset_of!(Counters, dropped_contended), 72);
        assert_eq!(offset_of!(Counters, dropped_busy), 80);
        assert_eq!(offset_of!(Counters, engine_heartbeat_ns), 88);
        assert_eq!(offset_of!(Counters, inflight_untracked), 96);
        assert_eq!(offset_of!(Counters, _reserved), 128);
    }

    #[test]
    fn inflight_entry_layout_is_frozen() {
        assert_eq!(size_of::<InflightSlot>(), INFLIGHT_ENTRY_SIZE);
        assert_eq!(align_of::<InflightSlot>(), 64);
        assert_eq!(offset_of!(InflightSlot, claim), 0);
        assert_eq!(offset_of!(InflightSlot, copies), 64);
        assert_eq!(size_of::<InflightCopy>(), 128);
        assert_eq!(offset_of!(InflightCopy, seq), 0);
        assert_eq!(offset_of!(InflightCopy, payload), 8);
        assert_eq!(size_of::<InflightEntry>(), INFLIGHT_PAYLOAD_SIZE);
        assert_eq!(size_of::<InflightEntry>(), INFLIGHT_WORDS * 8);
        assert_eq!(align_of::<InflightEntry>(), 8);
        assert_eq!(offset_of!(InflightEntry, request_id), 0);
        assert_eq!(offset_of!(InflightEntry, trace_id), 16);
        assert_eq!(offset_of!(InflightEntry, parent_span_id), 32);
        assert_eq!(offset_of!(InflightEntry, span_id), 40);
        assert_eq!(offset_of!(InflightEntry, t_arrival_ns), 48);
        assert_eq!(offset_of!(InflightEntry, t_scheduled_ns), 56);
        assert_eq!(offset_of!(InflightEntry, t_first_token_ns), 64);
        assert_eq!(offset_of!(InflightEntry, t_last_token_ns), 72);
        assert_eq!(offset_of!(InflightEntry, t_progress_ns), 80);
        assert_eq!(offset_of!(InflightEntry, prompt_tokens), 88);
        assert_eq!(offset_of!(InflightEntry, prefilled_tokens), 92);
        assert_eq!(offset_of!(InflightEntry, output_tokens), 96);
        assert_eq!(offset_of!(InflightEntry, cached_prompt_tokens), 100);
        assert_eq!(offset_of!(InflightEntry, max_tokens), 104);
        assert_eq!(offset_of!(InflightEntry, phase), 108);
        assert_eq!(offset_of!(InflightEntry, operation), 109);
        assert_eq!(offset_of!(InflightEntry, trace_flags), 110);
        assert_eq!(offset_of!(InflightEntry, flags), 111);
        assert_eq!(offset_of!(InflightEntry, model_index), 112);
        assert_eq!(offset_of!(InflightEntry, sequence_slot), 114);
        assert_eq!(offset_of!(InflightEntry, reserved), 116);
        assert_eq!(InflightPhase::Free as u8, 0);
        assert_eq!(InflightPhase::Queued as u8, 1);
        assert_eq!(InflightPhase::Prefill as u8, 2);
        assert_eq!(InflightPhase::Decode as u8, 3);
        assert_eq!(InflightPhase::try_from(4), Err(4));
    }

    #[test]
    fn the_inflight_table_follows_the_ring_on_a_page_boundary() {
        assert_eq!(inflight_offset_for(2), 8192);
        assert_eq!(inflight_offset_for(16), 8192);
        assert_eq!(inflight_offset_for(1024), 4096 + 256 * 1024);
        assert_eq!(segment_size_with_inflight(16, 0), segment_size(16));
        assert_eq!(segment_size_with_inflight(16, 64), 8192 + 64 * 320);
        assert_eq!(inflight_offset_for(MAX_CAPACITY) % 4096, 0);
    }

    #[test]
    fn regions_do_not_overlap_and_are_aligned() {
        const { assert!(HEADER_SIZE <= CONTROL_OFFSET) };
        const { assert!(CONTROL_OFFSET + CONTROL_SIZE <= COUNTERS_OFFSET) };
        const { assert!(COUNTERS_OFFSET + COUNTERS_SIZE <= RING_OFFSET) };
        assert_eq!(CONTROL_OFFSET % 64, 0);
        assert_eq!(COUNTERS_OFFSET % 64, 0);
        assert_eq!(RING_OFFSET % 4096, 0);
        assert_eq!(segment_size(1024), 4096 + 256 * 1024);
    }

    #[test]
    fn slot_and_record_layout_is_frozen() {
        assert_eq!(size_of::<Slot>(), SLOT_SIZE);
        assert_eq!(align_of::<Slot>(), 64);
        assert_eq!(offset_of!(Slot, commit), 0);
        assert_eq!(offset_of!(Slot, payload), 8);
        assert_eq!(SLOT_SIZE % 64, 0);
        assert_eq!(size_of::<Record>(), RECORD_SIZE);
        assert_eq!(size_of::<Record>(), PAYLOAD_WORDS * 8);
        assert_eq!(align_of::<Record>(), 8);
        assert_eq!(offset_of!(Record, request_id), 0);
        assert_eq!(offset_of!(Record, trace_id), 16);
        assert_eq!(offset_of!(Record, parent_span_id), 32);
        assert_eq!(offset_of!(Record, span_id), 40);
        assert_eq!(offset_of!(Record, t_arrival_ns), 48);
        assert_eq!(offset_of!(Record, t_scheduled_ns), 56);
        assert_eq!(offset_of!(Record, t_first_token_ns), 64);
        assert_eq!(offset_of!(Record, t_last_token_ns), 72);
        assert_eq!(offset_of!(Record, t_finished_ns), 80);
        assert_eq!(offset_of!(Record, seed), 88);
        assert_eq!(offset_of!(Record, prompt_tokens), 96);
        assert_eq!(offset_of!(Record, completion_tokens), 100);
        assert_eq!(offset_of!(Record, cached_prompt_tokens), 104);
        assert_eq!(offset_of!(Record, max_tokens), 108);
        assert_eq!(offset_of!(Record, temperature), 112);
        assert_eq!(offset_of!(Record, top_p), 116);
        assert_eq!(offset_of!(Record, frequency_penalty), 120);
        assert_eq!(offset_of!(Record, presence_penalty), 124);
        assert_eq!(offset_of!(Record, top_k), 128);
        assert_eq!(offset_of!(Record, http_status), 132);
        assert_eq!(offset_of!(Record, model_index), 134);
        assert_eq!(offset_of!(Record, queue_depth), 136);
        assert_eq!(offset_of!(Record, running), 138);
        assert_eq!(offset_of!(Record, kind), 140);
        assert_eq!(offset_of!(Record, operation), 141);
        assert_eq!(offset_of!(Record, finish_reason), 142);
        assert_eq!(offset_of!(Record, error_type), 143);
        assert_eq!(offset_of!(Record, trace_flags), 144);
        assert_eq!(offset_of!(Record, flags), 145);
        assert_eq!(offset_of!(Record, params_set), 146);
        assert_eq!(offset_of!(Record, ot_randomness), 148);
        assert_eq!(offset_of!(Record, ot_threshold), 156);
        assert_eq!(offset_of!(Record, sequence_slot), 164);
        assert_eq!(offset_of!(Record, reserved), 166);
    }

    #[test]
    fn step_record_layout_is_frozen() {
        assert_eq!(size_of::<StepRecord>(), RECORD_SIZE);
        assert_eq!(align_of::<StepRecord>(), 8);
        assert_eq!(offset_of!(StepRecord, step), 0);
        assert_eq!(offset_of!(StepRecord, t_start_ns), 8);
        assert_eq!(offset_of!(StepRecord, t_decode_end_ns), 16);
        assert_eq!(offset_of!(StepRecord, t_end_ns), 24);
        assert_eq!(offset_of!(StepRecord, prefill_tokens), 32);
        assert_eq!(offset_of!(StepRecord, kv_cells_used), 36);
        assert_eq!(offset_of!(StepRecord, kv_cells_total), 40);
        assert_eq!(offset_of!(StepRecord, queue_depth), 44);
        assert_eq!(offset_of!(StepRecord, decode_sequences), 48);
        assert_eq!(offset_of!(StepRecord, prefill_sequences), 50);
        assert_eq!(offset_of!(StepRecord, slots_occupied), 52);
        assert_eq!(offset_of!(StepRecord, slots_total), 54);
        assert_eq!(offset_of!(StepRecord, decode_calls), 56);
        assert_eq!(offset_of!(StepRecord, prefill_calls), 58);
        assert_eq!(offset_of!(StepRecord, decode_rows), 60);
        assert_eq!(offset_of!(StepRecord, flags), 62);
        assert_eq!(offset_of!(StepRecord, decode_slots), 64);
        assert_eq!(offset_of!(StepRecord, prefill_slots), 96);
        assert_eq!(offset_of!(StepRecord, reserved), 128);
        assert_eq!(MAX_STEP_SLOTS, 4 * 64);
    }

    #[test]
    fn the_step_ring_follows_the_inflight_table_on_a_page_boundary() {
        assert_eq!(step_ring_offset_for(16, 0), 8192);
        assert_eq!(step_ring_offset_for(16, 64), 8192 + 64 * 320);
        assert_eq!(
            step_ring_offset_for(16, 65),
            8192 + 65 * 320 + 4096 - (65 * 320) % 4096
        );
        assert_eq!(step_ring_offset_for(1024, 64) % 4096, 0);
        assert!(step_ring_offset_for(1024, 64) >= segment_size_with_inflight(1024, 64));
        assert_eq!(
            segment_size_with_steps(16, 64, 0),
            segment_size_with_inflight(16, 64)
        );
        assert_eq!(
            segment_size_with_steps(16, 64, 32),
            step_ring_offset_for(16, 64) + 1024 + 32 * 256
        );
        assert_eq!(STEP_SLOTS_OFFSET % 64, 0);
    }

    #[test]
    fn enum_discriminants_are_frozen() {
        assert_eq!(RecordKind::RequestFinished as u8, 1);
        assert_eq!(RecordKind::RequestRejected as u8, 2);
        assert_eq!(Operation::Chat as u8, 1);
        assert_eq!(Operation::TextCompletion as u8, 2);
        assert_eq!(FinishReason::Error as u8, 4);
        assert_eq!(ErrorType::Unavailable as u8, 9);
        assert_eq!(ErrorType::EngineCrashed as u8, 10);
        assert_eq!(OverflowMode::Discard as u32, 1);
        assert_eq!(Detail::Phases as u32, 1);
        for raw in 0..=u8::MAX {
            if let Ok(e) = ErrorType::try_from(raw) {
                assert_eq!(e as u8, raw);
            }
            if let Ok(f) = FinishReason::try_from(raw) {
                assert_eq!(f as u8, raw);
            }
        }
        assert_eq!(ErrorType::try_from(11), Err(11));
        assert_eq!(RecordKind::try_from(0), Err(0));
    }
}

#[cfg(loom)]
impl ControlBlock {
    pub(crate) fn new_for_loom() -> Self {
        Self {
            tracing_enabled: AtomicU32::new(0),
            overflow_mode: AtomicU32::new(0),
            detail: AtomicU32::new(0),
            head_sample_ppm: AtomicU32::new(0),
            settings_epoch: AtomicU64::new(0),
            _line0: [0; 40],
            tail_keep_errors: AtomicU32::new(0),
            tail_sample_ppm: AtomicU32::new(0),
            tail_ttft_us: AtomicU64::new(0),
            tail_e2e_us: AtomicU64::new(0),
            _line1: [0; 40],
            agent_pid: AtomicU32::new(0),
            _pad2: 0,
            agent_heartbeat_ns: AtomicU64::new(0),
            _line2: [0; 48],
            read_cursor: AtomicU64::new(0),
            _line3: [0; 56],
            inflight_reported: AtomicU64::new(0),
            _line4: [0; 56],
            _reserved: [0; CONTROL_SIZE - 320],
        }
    }
}

#[cfg(loom)]
impl Counters {
    pub(crate) fn new_for_loom() -> Self {
        Self {
            head: AtomicU64::new(0),
            _line0: [0; 56],
            dropped_full: AtomicU64::new(0),
            dropped_contended: AtomicU64::new(0),
            dropped_busy: AtomicU64::new(0),
            engine_heartbeat_ns: AtomicU64::new(0),
            inflight_untracked: AtomicU64::new(0),
            _line1: [0; 24],
            _reserved: [0; COUNTERS_SIZE - 128],
        }
    }
}

#[cfg(loom)]
impl Slot {
    pub(crate) fn new_for_loom() -> Self {
        Self {
            commit: AtomicU64::new(0),
            payload: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

#[cfg(loom)]
impl InflightSlot {
    pub(crate) fn new_for_loom() -> Self {
        let copy = || InflightCopy {
            seq: AtomicU64::new(0),
            payload: std::array::from_fn(|_| AtomicU64::new(0)),
        };
        Self {
            claim: AtomicU64::new(0),
            _line0: [0; 56],
            copies: [copy(), copy()],
        }
    }
}
