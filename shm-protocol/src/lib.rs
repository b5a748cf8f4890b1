//! The ABI between `ringside-engine` (writer) and `ringside-agent` (reader).
//!
//! The engine writes one fixed-size record per request into a ring in POSIX
//! shared memory; the agent reads it from another process. Everything
//! `unsafe` about that memory lives in this crate.
//!
//! # Segment layout (`/dev/shm/ringside.<instance>`, ABI 1.4)
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
//!                             680 inflight_offset (u64, 1.2; 0 = no table)
//!                             688 inflight_capacity   692 inflight_entry_size
//!                             696 engine_flags (1.2; bit 0 = liveness lock)
//!                             704 step_ring_offset (u64, 1.4; 0 = no step ring)
//!                             712 step_ring_capacity  716 step_slot_size
//!                             720 reserved (zero)
//!   1024  512                  ControlBlock      agent / CLI           engine, agent
//!                               0 tracing_enabled     4 overflow_mode      8 detail
//!                              12 head_sample_ppm    16 settings_epoch        (line 0: hot)
//!                              64 tail_keep_errors   68 tail_sample_ppm
//!                              72 tail_ttft_us       80 tail_e2e_us
//!                             128 agent_pid         136 agent_heartbeat_ns
//!                             192 read_cursor                                  (own line)
//!                             256 inflight_reported (1.2, agent)               (own line)
//!   1536  512                  Counters          engine                agent
//!                               0 head (next ticket)                           (own line)
//!                              64 dropped_full       72 dropped_contended
//!                              80 dropped_busy       88 engine_heartbeat_ns
//!                              96 inflight_untracked (1.2)
//!   4096  capacity x 256       Slots             engine                agent
//!                               0 commit word         8 Record (248 bytes)
//!      T  inflight_capacity    In-flight table   engine (entry owner)  any reader
//!          x 320 (1.2)          0 claim (own line)
//!                              64 copy A: 64 seq  72 InflightEntry (120 bytes)
//!                             192 copy B: 192 seq 200 InflightEntry (120 bytes)
//!      S  1024 + step_capacity  Step ring (1.4)   engine (inference     agent, captures
//!          x 256                                   thread)
//!                               0 ControlBlock (only read_cursor used)
//!                             512 Counters (head, drops, as above)
//!                            1024 slots: 0 commit word  8 StepRecord (248 bytes)
//! ```
//!
//! `S = step_ring_offset = align_up(end of the in-flight table, 4096)`
//! ([`step_ring_offset_for`]); with a step ring the file ends with it
//! ([`segment_size_with_steps`]). A [`StepRecord`] (frozen by the layout
//! tests; see the `step` module for what each field means): `0 step  8 t_start
//! 16 t_decode_end  24 t_end  32 prefill_tokens  36 kv_cells_used
//! 40 kv_cells_total  44 queue_depth  48 decode_sequences  50 prefill_sequences
//! 52 slots_occupied  54 slots_total  56 decode_calls  58 prefill_calls
//! 60 decode_rows  62 flags  64 decode_slots[4 x u64]  96 prefill_slots[4 x u64]
//! 128 reserved[120]`. Invariants a reader checks ([`StepRecord::decode`]):
//! `step >= 1`; `0 < t_start <= t_decode_end <= t_end`; `1 <= slots_total <=
//! 256`, no slot bit at or past `slots_total`, `slots_occupied <=
//! slots_total`; the sequence counts equal the popcounts of their slot sets;
//! `decode_rows >= decode_sequences` and rows iff decode calls; prefill tokens
//! iff prefill calls, and at least one call per prefilling slot; `kv_cells_used
//! <= kv_cells_total`. The step ring uses the request ring's commit protocol
//! and orderings unchanged (the engine's one inference thread is its only
//! producer; it always overwrites).
//!
//! `T = inflight_offset = align_up(4096 + capacity * 256, 4096)`
//! ([`inflight_offset_for`]); the file ends with the table
//! ([`segment_size_with_inflight`]). An [`InflightEntry`] (frozen by the
//! layout tests): `0 request_id[16]  16 trace_id[16]  32 parent_span_id[8]
//! 40 span_id[8]  48 t_arrival  56 t_scheduled  64 t_first_token
//! 72 t_last_token  80 t_progress  88 prompt_tokens  92 prefilled_tokens
//! 96 output_tokens  100 cached_prompt_tokens  104 max_tokens  108 phase
//! 109 operation  110 trace_flags  111 flags  112 model_index
//! 114 sequence_slot  116 reserved[4]`. A [`Record`] (frozen likewise):
//! `0 request_id[16]  16 trace_id[16]  32 parent_span_id[8]  40 span_id[8]
//! 48 t_arrival  56 t_scheduled  64 t_first_token  72 t_last_token
//! 80 t_finished  88 seed  96 prompt_tokens  100 completion_tokens
//! 104 cached_prompt_tokens  108 max_tokens  112 temperature  116 top_p
//! 120 frequency_penalty  124 presence_penalty  128 top_k  132 http_status
//! 134 model_index  136 queue_depth  138 running  140 kind  141 operation
//! 142 finish_reason  143 error_type  144 trace_flags  145 flags
//! 146 params_set  148 ot_randomness[8] (1.3)  156 ot_threshold[8] (1.3)
//! 164 sequence_slot (u16, 1.4)  166 reserved[82]`. `sequence_slot` is the
//! batch slot the request was served in, meaningful only with
//! [`FLAG_SEQUENCE_SLOT`] (a reader rejects it on a request never scheduled,
//! or at 256 or more); with the stamps it joins a request to the steps that
//! carried it. The 1.3 fields hold the caller's `ot=rv:` / `th:`
//! tracestate values (56-bit, native-endian), each meaningful only with its
//! flag bit ([`FLAG_OT_RANDOMNESS`], [`FLAG_OT_THRESHOLD`]); a reader rejects
//! a flagged value of 57 bits or more.
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
//! # The in-flight table (ABI 1.2)
//!
//! A record is written only when a request ends; the table shows the
//! requests the engine holds *now* (queued and running), so that an agent can
//! still report them after the engine was killed. An entry is free when its
//! claim word is 0. Each entry has two copies; update `n` of an entry (`n`
//! counts every update of the entry since the segment was created, across
//! claims, starting at 1) is written into copy `n % 2`, whose `seq` is then
//! `2n` (complete) or `2n - 1` (being written); 0 = never written. `seq`
//! values only grow, and the larger stable `seq` of the two copies is the
//! newer state. A writer killed mid-update tears at most the copy it was
//! writing; the other copy holds the previous complete update.
//!
//! Claim ([`InflightTable::claim`], the engine's HTTP thread at admission;
//! lock-free, bounded: one pass over the entries, starting at a rotating
//! index):
//! 1. For each entry whose claim word is 0:
//!    `claim.compare_exchange(0, id, Acquire, Relaxed)` with a non-zero id.
//! 2. On success, read both copies' `seq` (`Relaxed`) to learn the entry's
//!    last update number `m`, and write update `m + 1` (the request's first
//!    state). If no entry could be claimed, `inflight_untracked += 1`
//!    (`Relaxed`) and the request runs untracked: counted, never silently lost.
//! 3. The [`InflightHandle`] is the entry's only writer. The engine moves it
//!    to the inference thread through its own channel, which orders the
//!    previous owner's stores before the next owner's: one writer at a time.
//!
//! Update ([`InflightHandle::update`], the owner; wait-free: no syscall, lock
//! or allocation), update `n` into copy `c = n % 2`:
//! `c.seq.store(2n - 1, Relaxed); fence(Release); 15 payload stores
//! (Relaxed); c.seq.store(2n, Release)`.
//!
//! Release ([`InflightHandle::release`], or dropping the handle; the owner,
//! after the request's final record was pushed): write an update whose
//! payload is all zero (phase 0, free), then `claim.store(0, Release)`.
//!
//! Read ([`InflightReader::snapshot`]; any number of passive readers, which
//! never write an entry), for each of the `inflight_capacity` entries:
//! 1. Load `claim` (`Relaxed`); skip the entry if it is 0.
//! 2. For each copy, up to [`INFLIGHT_READ_RETRIES`] times: load `seq`
//!    (`Acquire`); 0 = never written; odd = being written, retry; else copy
//!    the payload words (`Relaxed`) into private memory, `fence(Acquire)`,
//!    load `seq` again (`Relaxed`); keep the copy if it is unchanged and its
//!    update number belongs in that copy (`(seq / 2) % 2` is its index).
//! 3. Validate the newest stable copy on the private copy
//!    ([`InflightEntry::decode`]: enums with `TryFrom`, non-zero ids, stamps
//!    ordered, token counts and the batch slot consistent with the phase,
//!    `model_index` in the model table). Phase 0 means free (being released
//!    or just claimed): skip. If it fails validation, the older stable copy
//!    is tried. An entry with no stable copy is counted `torn`, one whose
//!    stable copies all fail `invalid`; never a panic. Memory is bounded by
//!    `inflight_capacity <= MAX_INFLIGHT`.
//!
//! Orderings, and why:
//! * Final `seq` store `Release` / read-step-2 `Acquire`: a reader that sees
//!   `2n` sees every payload word of update `n`.
//! * Odd `seq`, `fence(Release)`, payload stores / payload loads,
//!   `fence(Acquire)`, re-load: the seqlock rule, as in the ring. If the
//!   reader copied any word of a later update of the same copy, that writer's
//!   release fence synchronises with the reader's acquire fence, so the
//!   re-load sees the odd `seq` (or a later one) and the copy is discarded.
//!   Payload words are atomics so that this race is defined behaviour.
//! * Claim `Acquire` (success) / release `claim.store(0, Release)`: the
//!   previous owner's stores happen before the new owner's, so the new owner
//!   reads the true last update number, its writes can never be overtaken by
//!   older ones, and `seq` keeps growing across owners (no ABA for readers).
//! * The reader's claim load is `Relaxed`: the claim word only filters; the
//!   per-copy seqlock vouches for the data, and the release protocol makes a
//!   freed entry's newest copy a free one, so a stale claim is harmless.
//! * `inflight_untracked` is `Relaxed`: a count, not synchronisation.
//!
//! ## Dead generations, and who reports them
//!
//! When an engine takes over the name of a dead engine's segment of this ABI
//! major that still holds unreported data (a claimed in-flight entry, or
//! records past the read cursor: `head > read_cursor`) and whose
//! `inflight_reported` is not its generation, it renames the file to
//! `ringside.<instance>~dead.<generation>` ([`dead_segment_path`]; `~` is not
//! in the instance alphabet, so [`list_segments`] never lists it) instead of
//! unlinking it, and keeps at most [`MAX_DEAD_GENERATIONS`] per instance
//! (unlinking the oldest). [`list_dead_generations`] finds them,
//! [`AttachedSegment::open_dead`] opens one with the same ownership, mode and
//! layout checks as `open`, and [`AttachedSegment::release_dead`] /
//! [`remove_dead_generation`] unlink one once it was reported.
//!
//! `inflight_reported` (control block, offset 256) is written only by agents:
//! after an agent exported the crash spans of a dead segment's table (and
//! drained its ring), it stores the segment's generation with a
//! compare-exchange ([`ControlBlock::mark_inflight_reported`]), which returns
//! `false` to a second agent. Races:
//! * *Agent reading while the engine restarts:* the rename keeps the inode,
//!   so the agent's mapping stays valid; it sees [`AttachedSegment::replaced`],
//!   finds its file with [`AttachedSegment::dead_generation`], drains the
//!   ring, snapshots the table, marks it reported and releases it.
//! * *Two agents reporting:* an agent checks `inflight_reported()` before it
//!   exports and marks after; two agents exporting the same dead segment at
//!   the very same time can both export (one consumer per segment is the
//!   deployment rule already), but a later agent never does.
//! * *An agent started later (`--backfill`):* it finds the dead files, or the
//!   original name not yet replaced (the engine has not restarted: it is
//!   [`Liveness::Dead`]), and reports what is not marked.
//! * *Two engines starting at once for one instance:* as before 1.2, the
//!   stale check and the rename (like the unlink) are by name; only one of
//!   them wins the exclusive create of the new segment.
//!
//! ## Liveness
//!
//! A 1.2 engine takes an exclusive `flock` on its segment file before it
//! publishes the header and sets [`ENGINE_FLAG_LIVENESS_LOCK`] in
//! `engine_flags`; the lock lives as long as the engine's open file, so the
//! kernel drops it the moment the process dies (SIGKILL, OOM kill, abort),
//! before any zombie is reaped, and the test works across pid namespaces on
//! the same tmpfs. [`AttachedSegment::liveness`] and a starting engine's
//! take-over probe it with a non-blocking *shared* lock on their own file
//! handle (taken and dropped at once): refused means alive, granted means
//! dead. So an engine restarted by systemd within [`HEARTBEAT_STALE_NS`] of a
//! crash takes the name over at once, and the dead generation is retained as
//! above. `shm_open` descriptors are close-on-exec, so a child the engine
//! execs cannot keep a dead engine "alive". Segments without the flag (older
//! writers) and a failed probe fall back to the recorded pid with its start
//! time, then to the heartbeat.
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
//! * Every open of a segment name (engine and reader) is `O_NOFOLLOW |
//!   O_NONBLOCK` and checked to be a regular file: a symbolic link, FIFO or
//!   device planted under a name is refused, never followed, blocked on or
//!   removed. (rustix's `shm_open` adds no `O_NOFOLLOW`, so the crate opens
//!   `/dev/shm/<name>` itself.)
//! * The reader opens only segments owned by itself, root, or uids it was told
//!   to trust, never ones other users may read or write (the engine refuses
//!   to create such a mode too: request timings are not for every local
//!   user); checks magic and major version; and
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
//!   that could hold it, nor has an [`InflightEntry`].
//! * The in-flight table's offset, capacity (at most [`MAX_INFLIGHT`]) and
//!   entry size are read only from 1.2+ headers and checked against the file
//!   like the ring's; entries are copied out once and validated on the copy.
//!   A dead-generation file is opened with the same flags and owner
//!   and mode checks as a live one, and its header must name the generation
//!   its file name claims.

#[cfg(not(loom))]
mod clock;
mod inflight;
mod layout;
mod record;
mod region;
mod ring;
#[cfg(not(loom))]
mod segment;
mod step;
mod sync;

#[cfg(not(loom))]
pub use clock::{ClockPair, monotonic_ns, realtime_ns};
pub use inflight::{
    INFLIGHT_READ_RETRIES, InflightError, InflightHandle, InflightLayout, InflightReader,
    InflightRequest, InflightSnapshot, InflightTable,
};
pub use layout::{
    ABI_MAJOR, ABI_MINOR, ABI_VERSION_OFFSET, CONTROL_OFFSET, CONTROL_SIZE, COUNTERS_OFFSET,
    COUNTERS_SIZE, ControlBlock, Detail, ENGINE_FLAG_LIVENESS_LOCK, ErrorType, FLAG_OT_RANDOMNESS,
    FLAG_OT_THRESHOLD, FLAG_REMOTE_PARENT, FLAG_SEQUENCE_SLOT, FLAG_STREAM, FinishReason,
    HEADER_SIZE, Header, INFLIGHT_ENTRY_SIZE, INFLIGHT_PAYLOAD_SIZE, InflightEntry, InflightPhase,
    MAGIC, MAX_CAPACITY, MAX_INFLIGHT, MAX_MODELS, MAX_STEP_SLOTS, MIN_CAPACITY, NAME_LEN,
    Operation, OverflowMode, RECORD_SIZE, RING_OFFSET, Record, RecordKind, SLOT_SIZE,
    STEP_CONTROL_OFFSET, STEP_COUNTERS_OFFSET, STEP_FLAG_FAILED, STEP_SLOTS_OFFSET, StepRecord,
    inflight_offset_for, pack_version, params, segment_size, segment_size_with_inflight,
    segment_size_with_steps, step_ring_offset_for,
};
pub use record::{OT_VALUE_LIMIT, OtState, RecordError, RequestRecord, Sampling, Timestamps};
pub use region::{CapacityError, ControlDefaults};
pub use ring::{
    Consumer, ConsumerTotals, CounterSnapshot, DEFAULT_ABANDON_AFTER_NS, DISCARD_CLAIM_ATTEMPTS,
    PollError, PollReport, Producer, PushOutcome, Ring, StartAt, TailSampling,
};
#[cfg(all(feature = "fuzzing", not(loom)))]
pub use segment::fuzzing;
#[cfg(not(loom))]
pub use segment::{
    AttachedSegment, CreateError, CreateOptions, DEAD_MARKER, DEFAULT_INFLIGHT_CAPACITY,
    DEFAULT_MODE, DEFAULT_STEP_CAPACITY, DeadSegment, EngineIdentity, EngineSegment,
    HEARTBEAT_STALE_NS, ListError, Liveness, MAX_DEAD_GENERATIONS, NameError, OpenError,
    OpenOptions, PREFIX, SHM_DIR, SegmentInfo, StepLayout, dead_segment_path,
    list_dead_generations, list_segments, process_start_time, remove_dead_generation, segment_path,
    validate_instance,
};
pub use step::{SlotSet, Step, StepConsumer, StepError, StepProducer, StepRing};

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod ring_tests;
#[cfg(all(test, not(loom)))]
mod segment_tests;
