//! The ABI between `ringside-engine` (writer) and `ringside-agent` (reader).
//!
//! The engine writes one fixed-size record per request into a ring in POSIX
//! shared memory; the agent reads it from another process. Everything
//! `unsafe` about that memory lives in this crate.
//!
//! # Segment layout (`/dev/shm/ringside.<instance>`, ABI 1.1)
//!
//! ```text
//! offset  size                 region            written by            read by
//! ------  -------------------  ----------------  --------------------  -----------------
//!      0  1024                 Header            engine, once          agent (copied once)
//!                               0 magic "RINGSIDE"     8 abi_version (major<<16|minor, LAST)
//!                              12 header_size         16 segment_size
//!                              24 control_offset      28 counters_offset   32 ring_offset
//!                              40 slot_size           44 ring_capacity     48 engine_pid
//!                              52 model_count         56 engine_start_time 64 generation
//!                              72 created_realtime_ns 80 created_monotonic_ns
//!                              88 engine_uid          96 instance[64]     160 models[8][64]
//!                             672 listen_port (u16, 1.1; 0 = unknown)
//!                             680 reserved (zero)
//!   1024  512                  ControlBlock      agent / CLI           engine, agent
//!                               0 tracing_enabled     4 overflow_mode      8 detail
//!                              12 head_sample_ppm    16 settings_epoch        (line 0: hot)
//!                              64 tail_keep_errors   68 tail_sample_ppm
//!                              72 tail_ttft_us       80 tail_e2e_us
//!                             128 agent_pid         136 agent_heartbeat_ns
//!                             192 read_cursor                                  (own line)
//!   1536  512                  Counters          engine                agent
//!                               0 head (next ticket)                           (own line)
//!                              64 dropped_full       72 dropped_contended
//!                              80 dropped_busy       88 engine_heartbeat_ns
//!   4096  capacity x 256       Slots             engine                agent
//!                               0 commit word         8 Record (248 bytes)
//! ```
//!
//! `capacity` is a power of two; ticket `t` lives in slot `t & (capacity-1)`.
//! A slot's commit word is `0` (never written), `(t+1) << 1` (holds the
//! complete record of ticket `t`) or `((t+1) << 1) | 1` (being written for `t`).
//! All multi-byte fields are native-endian (both processes share a host).
//!
//! # The commit protocol
//!
//! Producer (wait-free; [`Producer::push`]):
//! 1. **Ticket.** Overwrite mode: `t = head.fetch_add(1, Relaxed)`. Discard
//!    mode: up to [`DISCARD_CLAIM_ATTEMPTS`] tries of "if
//!    `head - read_cursor >= capacity` drop as full, else
//!    `compare_exchange(head, head+1)`"; then drop as contended. Either way a
//!    bounded number of steps.
//! 2. **Claim.** Load the slot's commit word `w`. The slot is free for `t` when
//!    `w` is not a claim and refers to an earlier ticket (or is 0). Then
//!    `compare_exchange(w, claimed(t), Acquire, Relaxed)`; if the slot is not
//!    free or the exchange fails, drop the record as busy (a producer a whole
//!    lap behind is still writing it, or a later lap took it). Then
//!    `fence(Release)`.
//! 3. **Fill.** Store the payload words with `Relaxed`.
//! 4. **Publish.** `commit.store(committed(t), Release)`.
//!
//! Consumer (one per segment; [`Consumer::poll`]), at cursor `c`:
//! 1. Load the commit word with `Acquire`. If it is `committed(c)`:
//! 2. copy every payload word once (`Relaxed`) into private memory;
//! 3. `fence(Acquire)`, load the commit word again; deliver the copy only if it
//!    is unchanged, else count it overwritten. Validation ([`Record::decode`])
//!    runs on the copy, never on shared memory.
//! 4. Otherwise, if the slot belongs to a later lap (or `head - c > capacity`),
//!    skip to the oldest ticket that can still be in the ring and count every
//!    skipped ticket as overwritten.
//! 5. Otherwise ticket `c` was issued but not committed: a producer is writing
//!    it, died mid-write, or dropped it as busy. Wait (return to the caller),
//!    and once the same ticket has been stuck for the abandon timeout
//!    ([`DEFAULT_ABANDON_AFTER_NS`], 200 ms), skip it and count it abandoned.
//!
//! # Memory orderings, and why
//!
//! * Publish `Release` / read-step-1 `Acquire`: a reader that sees
//!   `committed(t)` sees every payload word of `t`.
//! * Claim, `fence(Release)`, payload stores / payload loads, `fence(Acquire)`,
//!   re-check: the seqlock rule. If the reader copied any word written by a
//!   later producer, that producer's release fence synchronises with the
//!   reader's acquire fence, so the re-check observes the later claim and the
//!   torn copy is discarded. Payload words are atomics so that this race is
//!   defined behaviour, not a data race.
//! * Claim `Acquire` (success): the previous lap's payload stores, released by
//!   its publish, happen before this lap's, so an old store can never land
//!   over a newer one.
//! * Only one producer can own a slot at a time (the claim is a
//!   compare-exchange from a non-claimed state), so two writers never
//!   interleave inside one slot.
//! * `read_cursor`: the consumer stores it `Release` after copying; a
//!   discard-mode producer loads it `Acquire` before reusing a slot.
//! * `head` and the drop counters are `Relaxed`: they are counts, not
//!   synchronisation; the commit words carry the synchronisation.
//! * The header is written with plain stores before `abi_version` is stored
//!   with `Release`; readers load `abi_version` with `Acquire` and then copy the
//!   header once. A zero version means "not initialised yet".
//!
//! # Accounting
//!
//! Every record the engine attempts to write ends in exactly one place:
//! `attempts = dropped_full + dropped_contended + head`, and every ticket
//! below the consumer's cursor is `delivered + lost_overwritten +
//! lost_abandoned` ([`ConsumerTotals`]). `dropped_busy` tickets are among the
//! abandoned ones (the producer counts them for diagnosis only).
//!
//! # Versioning
//!
//! * **Minor** (`1.x`): additive only. New fields are carved out of reserved
//!   bytes (header, control block, counters, record), which older writers
//!   leave zero; readers ignore reserved bytes and unknown flag bits.
//! * **Major**: anything else (sizes, offsets, meanings). A reader refuses a
//!   segment of another major version, naming both versions.
//!
//! # Security model
//!
//! * The engine creates its segment with `O_CREAT|O_EXCL`, mode 0660 (exactly,
//!   whatever the umask), optionally giving it to a group the agent is in. A
//!   name held by another user is refused (never reused); a name held by a live
//!   engine is refused; a dead engine's segment is replaced.
//! * The reader opens only segments owned by itself, root, or uids it was told
//!   to trust, never world-writable ones; checks magic and major version; and
//!   checks that every size and offset the header claims fits the real file
//!   before touching the ring. It never trusts a value twice: the header and
//!   each record are copied out once and validated on the copy. Enums are
//!   decoded with `TryFrom`, never transmuted. Counters and cursors are
//!   handled with wrapping / saturating arithmetic, so forged values cannot
//!   cause a panic or an out-of-bounds access (slot indices are masked).
//! * The reader checks before each poll that the file was not truncated
//!   below the mapping. Only the segment's owner can truncate it; a truncation
//!   racing with a poll can still fault, which is why the owner is trusted.
//! * No prompt or completion text is ever written: a [`Record`] has no field
//!   that could hold it.

#[cfg(not(loom))]
mod clock;
mod layout;
mod record;
mod region;
mod ring;
#[cfg(not(loom))]
mod segment;
mod sync;

#[cfg(not(loom))]
pub use clock::{ClockPair, monotonic_ns, realtime_ns};
pub use layout::{
    ABI_MAJOR, ABI_MINOR, ABI_VERSION_OFFSET, CONTROL_OFFSET, CONTROL_SIZE, COUNTERS_OFFSET,
    COUNTERS_SIZE, ControlBlock, Detail, ErrorType, FLAG_REMOTE_PARENT, FLAG_STREAM, FinishReason,
    HEADER_SIZE, Header, MAGIC, MAX_CAPACITY, MAX_MODELS, MIN_CAPACITY, NAME_LEN, Operation,
    OverflowMode, RECORD_SIZE, RING_OFFSET, Record, RecordKind, SLOT_SIZE, pack_version, params,
    segment_size,
};
pub use record::{RecordError, RequestRecord, Sampling, Timestamps};
pub use region::{CapacityError, ControlDefaults};
pub use ring::{
    Consumer, ConsumerTotals, CounterSnapshot, DEFAULT_ABANDON_AFTER_NS, DISCARD_CLAIM_ATTEMPTS,
    PollError, PollReport, Producer, PushOutcome, Ring, StartAt, TailSampling,
};
#[cfg(all(feature = "fuzzing", not(loom)))]
pub use segment::fuzzing;
#[cfg(not(loom))]
pub use segment::{
    AttachedSegment, CreateError, CreateOptions, DEFAULT_MODE, EngineIdentity, EngineSegment,
    HEARTBEAT_STALE_NS, ListError, Liveness, NameError, OpenError, OpenOptions, PREFIX, SHM_DIR,
    SegmentInfo, list_segments, process_start_time, segment_path, validate_instance,
};

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod ring_tests;
#[cfg(all(test, not(loom)))]
mod segment_tests;
