//! The engine's single telemetry integration point.
//!
//! At the end of every request — success, failure, client abort and rejection alike — the engine
//! builds one [`RequestOutcome`] (numbers and identifiers only, never prompt or completion text)
//! and hands it to [`Telemetry::record`]. That call is on the request path, so it takes no lock,
//! allocates nothing and makes no syscall.
//!
//! [`Telemetry`] writes each outcome as one [`shm::Record`] (built by the protocol crate's one
//! record builder, [`shm::RequestRecord::encode`], via [`to_record`]) into the engine's shared-memory ring
//! (`ringside-shm-protocol`), created at start-up with the `--instance` name, the served model
//! names as its model table, `--ring-capacity` slots and `--tracing` as the initial control
//! word. When the agent or CLI switches tracing off, `record` does one relaxed load and returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use ringside_shm_protocol as shm;

pub mod inflight;
pub mod rejections;

/// Trace identity of a request, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    /// W3C trace id.
    pub trace_id: [u8; 16],
    /// Caller's span id.
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C trace flags.
    pub trace_flags: u8,
    /// This request's span id.
    pub span_id: [u8; 8],
    /// The sampling values of the caller's `ot` tracestate entry.
    pub ot: shm::OtState,
}

/// Whether the request reached the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Admitted and ended: completed, failed or aborted.
    Finished,
    /// Refused before reaching the scheduler (400, 401, 404, 413, 415, 429, 503).
    Rejected,
}

/// The OpenAI operation, the reason generation ended and the class of failure are the ring
/// ABI's own types: the record stores them as they are.
pub use shm::{ErrorType as ErrorKind, FinishReason, Operation};

/// Effective sampling parameters as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingRecord {
    /// Token limit in effect.
    pub max_tokens: u32,
    /// Temperature (0 = greedy).
    pub temperature: f32,
    /// Nucleus threshold.
    pub top_p: f32,
    /// Top-k, 0 = disabled.
    pub top_k: u32,
    /// Seed in effect.
    pub seed: u64,
    /// Frequency penalty.
    pub frequency_penalty: f32,
    /// Presence penalty.
    pub presence_penalty: f32,
    /// Which parameters the caller set explicitly (bits of [`params_set`]).
    pub params_set: u16,
}

/// Bits of [`SamplingRecord::params_set`]: the ring ABI's.
pub use shm::params as params_set;

/// Everything the engine knows about one request when it ends. Plain data, `Copy`.
/// Timestamps are `CLOCK_MONOTONIC` nanoseconds; 0 means "did not happen".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestOutcome {
    /// Finished or rejected.
    pub kind: OutcomeKind,
    /// Chat or text completion.
    pub operation: Operation,
    /// 128-bit request id (the response `id` carries it in hex).
    pub request_id: [u8; 16],
    /// W3C trace id (the caller's or a new one; never zero).
    pub trace_id: [u8; 16],
    /// The caller's span id, when its `traceparent` was valid.
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C trace flags.
    pub trace_flags: u8,
    /// The sampling values of the caller's `ot` tracestate entry.
    pub ot: shm::OtState,
    /// The span id the engine assigned to the request.
    pub span_id: [u8; 8],
    /// Accepted by the HTTP layer.
    pub t_arrival_ns: u64,
    /// Got a sequence slot.
    pub t_scheduled_ns: u64,
    /// First output token sampled.
    pub t_first_token_ns: u64,
    /// Last output token sampled.
    pub t_last_token_ns: u64,
    /// Response complete, failed or rejected.
    pub t_finished_ns: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the KV cache.
    pub cached_prompt_tokens: u32,
    /// Effective sampling parameters.
    pub sampling: SamplingRecord,
    /// The response was streamed.
    pub stream: bool,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// HTTP status of the response (499 when the client went away first).
    pub http_status: u16,
    /// Failure class.
    pub error: ErrorKind,
    /// Index of the served model name used.
    pub model_index: u16,
    /// Requests waiting in the queue when this one arrived.
    pub queue_depth: u16,
    /// Sequences running when this one was scheduled (itself included).
    pub running: u16,
    /// The batch slot it was served in (`None` when never scheduled): joins it to the steps.
    pub sequence_slot: Option<u16>,
}

/// Why the telemetry segment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The shared-memory segment could not be created (name in use, capacity, /dev/shm…).
    #[error("cannot create the telemetry segment for instance {instance:?}: {source}")]
    Create {
        /// `--instance`.
        instance: String,
        /// The protocol crate's error.
        source: shm::CreateError,
    },
}

/// Where request outcomes go: the engine's shared-memory ring. Cheap to clone (shared by the
/// HTTP layer and the inference thread).
///
/// The current segment sits behind an [`ArcSwap`]: the request path loads it (a few ns, no
/// lock, no allocation); the heartbeat tick ([`Telemetry::heartbeat`]) checks that the name
/// still refers to the mapped file and, when it was removed (`rm`, systemd `RemoveIPC=`) or
/// replaced, creates the next generation with the same instance, models, capacities and the
/// current control settings, and swaps it in. Requests admitted before the swap keep their
/// in-flight entries in the old (unlinked) table; their final records go to the new segment.
/// Records pushed into the unlinked ring between the removal and the swap are counted as lost
/// ([`Telemetry::records_lost_segment_removed`]).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    current: ArcSwap<Inner>,
    options: shm::CreateOptions,
    // The current ring's head at the last tick that found its name in place.
    verified_head: AtomicU64,
    // Records pushed into rings whose name was gone (the window before the switch).
    lost_segment_removed: AtomicU64,
}

/// One generation of the segment: its producers and the mapping.
#[derive(Debug)]
pub(crate) struct Inner {
    producer: shm::Producer,
    steps: Option<shm::StepProducer>,
    // Keeps the mapping alive and removes the segment's name on drop (if still its own).
    segment: shm::EngineSegment,
}

impl Inner {
    fn new(segment: shm::EngineSegment) -> Self {
        Self {
            producer: segment.ring().producer(),
            steps: segment.steps().map(|s| s.producer()),
            segment,
        }
    }

    /// The in-flight table and a producer (for its tracing switch), when the segment has one.
    pub(crate) fn inflight_parts(&self) -> Option<(shm::InflightTable, &shm::Producer)> {
        self.segment.inflight().map(|t| (t, &self.producer))
    }
}

/// The current source of in-flight tables: shared with [`inflight::Tracker`], which
/// loads the current generation at each admission.
pub(crate) type Current = Arc<Shared>;

impl Telemetry {
    /// Telemetry that records nothing (tests, tools).
    #[must_use]
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Creates `/dev/shm/ringside.<instance>` with the served model names as its model table,
    /// `capacity` slots, an in-flight table of `inflight_capacity` entries (the engine passes
    /// `--parallel + --max-queue`: one per request it can hold), a step ring of `step_capacity`
    /// slots (0 = none), the tracing control word initialised to `tracing` and the API's
    /// `listen_port` (the agent's `server.port`).
    ///
    /// # Errors
    /// [`TelemetryError::Create`] (bad name or capacity, live engine on that name, no room).
    pub fn create(
        instance: &str,
        models: &[String],
        capacity: u32,
        inflight_capacity: u32,
        step_capacity: u32,
        tracing: bool,
        listen_port: u16,
    ) -> Result<Self, TelemetryError> {
        let mut options = shm::CreateOptions::new(instance, models.to_vec());
        options.capacity = capacity;
        options.inflight_capacity = inflight_capacity;
        options.step_capacity = step_capacity;
        options.listen_port = Some(listen_port);
        options.control.tracing_enabled = tracing;
        let segment =
            shm::EngineSegment::create(&options).map_err(|source| TelemetryError::Create {
                instance: instance.to_owned(),
                source,
            })?;
        Ok(Self {
            shared: Some(Arc::new(Shared {
                current: ArcSwap::from_pointee(Inner::new(segment)),
                options,
                verified_head: AtomicU64::new(0),
                lost_segment_removed: AtomicU64::new(0),
            })),
        })
    }

    /// Records one request outcome when tracing is on. Wait-free: one load of the current
    /// segment, one relaxed load, then (if on) one ring push: no lock, no allocation, no syscall.
    #[inline]
    pub fn record(&self, outcome: &RequestOutcome) {
        if let Some(shared) = &self.shared {
            let inner = shared.current.load();
            if inner.producer.tracing_enabled() {
                let _ = inner.producer.push(&to_record(outcome));
            }
        }
    }

    /// Whether steps are recorded now: the segment has a step ring and tracing is on (one
    /// load of the current segment, one relaxed load). The inference thread asks once per step.
    #[inline]
    #[must_use]
    pub fn records_steps(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let inner = s.current.load();
            inner.steps.is_some() && inner.producer.tracing_enabled()
        })
    }

    /// Records one engine step when tracing is on; wait-free like [`Self::record`]. Called by
    /// the inference thread once per scheduler step.
    #[inline]
    pub fn record_step(&self, step: &shm::Step) {
        if let Some(shared) = &self.shared {
            let inner = shared.current.load();
            if let Some(steps) = &inner.steps
                && inner.producer.tracing_enabled()
            {
                let _ = steps.push(&step.encode());
            }
        }
    }

    /// The in-flight table's writer for the HTTP layer and the inference thread. It follows
    /// the segment when the heartbeat replaces it.
    #[must_use]
    pub fn tracker(&self) -> inflight::Tracker {
        match &self.shared {
            Some(shared) if shared.current.load().segment.inflight().is_some() => {
                inflight::Tracker::new(Arc::clone(shared))
            }
            _ => inflight::Tracker::disabled(),
        }
    }

    /// Stamps the engine heartbeat the agent uses to tell a live engine from a dead one, and
    /// replaces the segment when its name was removed or now refers to another file (see
    /// [`Telemetry`]); a failed re-creation is logged and retried at the next call.
    /// Call about once a second, off the request path.
    pub fn heartbeat(&self) {
        let Some(shared) = &self.shared else { return };
        let inner = shared.current.load_full();
        inner
            .segment
            .ring()
            .beat_engine_heartbeat(crate::clock::now_ns());
        if inner.segment.name_still_mapped() {
            shared
                .verified_head
                .store(inner.segment.ring().counters().head, Ordering::Relaxed);
            return;
        }
        let path = shm::segment_path(&inner.segment.info().instance);
        let generation = inner.segment.info().identity.generation;
        tracing::error!(%path, generation,
            "the telemetry segment's name was removed or replaced; creating the next generation");
        let mut options = shared.options.clone();
        options.replaces_generation = generation;
        options.control = current_control(inner.segment.ring().control(), options.control);
        let segment = match shm::EngineSegment::create(&options) {
            Ok(segment) => segment,
            Err(error) => {
                tracing::error!(%path, %error,
                    "cannot re-create the telemetry segment; retrying at the next heartbeat");
                return;
            }
        };
        let control = inner.segment.ring().control();
        let next = segment.ring().control();
        next.set_head_sample_ppm(control.head_sample_ppm());
        next.set_tail_sampling(control.tail_sampling());
        let new_generation = segment.info().identity.generation;
        // The agent's committed cursor: records it read from the old mapping were not lost.
        let verified = shared
            .verified_head
            .swap(0, Ordering::Relaxed)
            .max(inner.segment.ring().control().read_cursor());
        shared.current.store(Arc::new(Inner::new(segment)));
        // Pushes that loaded the old segment before the store have finished or finish now:
        // what the old ring got since its name was last seen in place (at most one tick's
        // worth; an upper bound, as the removal itself is not observable) and that the agent
        // has not read is lost to every reader that opens the name.
        let lost = inner
            .segment
            .ring()
            .counters()
            .head
            .saturating_sub(verified);
        shared
            .lost_segment_removed
            .fetch_add(lost, Ordering::Relaxed);
        tracing::error!(%path, generation = new_generation, records_lost = lost,
            "telemetry switched to a new segment generation");
    }

    /// Records pushed into a segment after its name was removed, before the heartbeat replaced
    /// it: no reader that opens the name sees them (`ringside_records_lost_segment_removed_total`).
    #[must_use]
    pub fn records_lost_segment_removed(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.lost_segment_removed.load(Ordering::Relaxed))
    }

    /// The segment's path, when there is one.
    #[must_use]
    pub fn segment_path(&self) -> Option<String> {
        self.shared
            .as_ref()
            .map(|s| shm::segment_path(&s.options.instance))
    }
}

impl Shared {
    /// The current generation (for the in-flight tracker).
    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<Inner>> {
        self.current.load()
    }
}

/// The control block's settings now, to carry over to the next generation (unknown values keep
/// the start-up defaults).
fn current_control(
    control: &shm::ControlBlock,
    defaults: shm::ControlDefaults,
) -> shm::ControlDefaults {
    shm::ControlDefaults {
        tracing_enabled: control.tracing_enabled(),
        overflow_mode: control.overflow_mode().unwrap_or(defaults.overflow_mode),
        detail: control.detail().unwrap_or(defaults.detail),
    }
}

impl RequestOutcome {
    /// The outcome as the ring ABI's [`shm::RequestRecord`]: a stamp of 0 ("did not happen")
    /// becomes `None`. Plain copies, no allocation.
    #[must_use]
    pub fn request_record(&self) -> shm::RequestRecord {
        let stamp = |ns: u64| (ns != 0).then_some(ns);
        let s = &self.sampling;
        shm::RequestRecord {
            kind: match self.kind {
                OutcomeKind::Finished => shm::RecordKind::RequestFinished,
                OutcomeKind::Rejected => shm::RecordKind::RequestRejected,
            },
            operation: self.operation,
            request_id: self.request_id,
            trace_id: self.trace_id,
            parent_span_id: self.parent_span_id,
            span_id: self.span_id,
            trace_flags: self.trace_flags,
            ot: self.ot,
            timestamps: shm::Timestamps {
                arrival_ns: self.t_arrival_ns,
                scheduled_ns: stamp(self.t_scheduled_ns),
                first_token_ns: stamp(self.t_first_token_ns),
                last_token_ns: stamp(self.t_last_token_ns),
                finished_ns: self.t_finished_ns,
            },
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            sampling: shm::Sampling {
                max_tokens: s.max_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                seed: s.seed,
                frequency_penalty: s.frequency_penalty,
                presence_penalty: s.presence_penalty,
            },
            params_set: s.params_set,
            stream: self.stream,
            finish_reason: self.finish_reason,
            http_status: self.http_status,
            error_type: self.error,
            model_index: self.model_index,
            queue_depth: self.queue_depth,
            running: self.running,
            sequence_slot: self.sequence_slot,
        }
    }
}

/// The ABI record for an outcome, written by the protocol crate's one record builder
/// ([`shm::RequestRecord::encode`]).
#[must_use]
pub fn to_record(o: &RequestOutcome) -> shm::Record {
    o.request_record().encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> RequestOutcome {
        RequestOutcome {
            kind: OutcomeKind::Finished,
            operation: Operation::Chat,
            request_id: [1; 16],
            trace_id: [2; 16],
            parent_span_id: Some([3; 8]),
            trace_flags: 1,
            ot: shm::OtState {
                randomness: Some(0x6e6d1a75832a2f),
                threshold: Some(0xc0_0000_0000_0000),
            },
            span_id: [4; 8],
            t_arrival_ns: 10,
            t_scheduled_ns: 20,
            t_first_token_ns: 30,
            t_last_token_ns: 40,
            t_finished_ns: 50,
            prompt_tokens: 7,
            completion_tokens: 3,
            cached_prompt_tokens: 0,
            sampling: SamplingRecord {
                max_tokens: 16,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 42,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
                params_set: params_set::TEMPERATURE | params_set::SEED,
            },
            stream: true,
            finish_reason: FinishReason::Length,
            http_status: 200,
            error: ErrorKind::None,
            model_index: 0,
            queue_depth: 2,
            running: 3,
            sequence_slot: Some(2),
        }
    }

    #[test]
    fn record_round_trips_through_the_abi_decoder() {
        let decoded = to_record(&outcome()).decode(1).unwrap();
        assert_eq!(decoded.kind, shm::RecordKind::RequestFinished);
        assert_eq!(decoded.operation, shm::Operation::Chat);
        assert_eq!(decoded.parent_span_id, Some([3; 8]));
        assert!(decoded.stream);
        assert_eq!(decoded.finish_reason, shm::FinishReason::Length);
        assert_eq!(decoded.completion_tokens, 3);
        assert_eq!(decoded.sampling.seed, 42);
        assert_eq!(
            decoded.params_set,
            params_set::TEMPERATURE | params_set::SEED
        );
        assert_eq!(decoded.timestamps.first_token_ns, Some(30));
    }

    #[test]
    fn rejection_without_parent_decodes() {
        let mut o = outcome();
        o.kind = OutcomeKind::Rejected;
        o.parent_span_id = None;
        o.t_scheduled_ns = 0;
        o.t_first_token_ns = 0;
        o.t_last_token_ns = 0;
        o.sequence_slot = None;
        o.completion_tokens = 0;
        o.http_status = 429;
        o.error = ErrorKind::QueueFull;
        o.finish_reason = FinishReason::None;
        let decoded = to_record(&o).decode(1).unwrap();
        assert_eq!(decoded.parent_span_id, None);
        assert_eq!(decoded.error_type, shm::ErrorType::QueueFull);
    }

    #[test]
    fn the_record_decodes_to_the_outcome_it_was_built_from() {
        let o = outcome();
        assert_eq!(to_record(&o).decode(1), Ok(o.request_record()));
        assert_eq!(to_record(&o).reserved, [0; 82]);
        assert_eq!(to_record(&o).sequence_slot, 2);
        assert_eq!(o.request_record().ot.threshold, Some(0xc0_0000_0000_0000));
    }

    #[test]
    fn params_bits_match_the_abi() {
        assert_eq!(params_set::MAX_TOKENS, shm::params::MAX_TOKENS);
        assert_eq!(params_set::TEMPERATURE, shm::params::TEMPERATURE);
        assert_eq!(params_set::TOP_P, shm::params::TOP_P);
        assert_eq!(params_set::TOP_K, shm::params::TOP_K);
        assert_eq!(params_set::SEED, shm::params::SEED);
        assert_eq!(
            params_set::FREQUENCY_PENALTY,
            shm::params::FREQUENCY_PENALTY
        );
        assert_eq!(params_set::PRESENCE_PENALTY, shm::params::PRESENCE_PENALTY);
    }
}
