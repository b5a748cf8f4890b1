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

use ringside_shm_protocol as shm;

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
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    producer: shm::Producer,
    // Keeps the mapping alive and removes the segment's name on drop.
    segment: shm::EngineSegment,
}

impl Telemetry {
    /// Telemetry that records nothing (tests, tools).
    #[must_use]
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Creates `/dev/shm/ringside.<instance>` with the served model names as its model table,
    /// `capacity` slots, an in-flight table of `inflight_capacity` entries (the engine passes
    /// `--parallel + --max-queue`: one per request it can hold), the tracing control word
    /// initialised to `tracing` and the API's `listen_port` (the agent's `server.port`).
    ///
    /// # Errors
    /// [`TelemetryError::Create`] (bad name or capacity, live engine on that name, no room).
    pub fn create(
        instance: &str,
        models: &[String],
        capacity: u32,
        inflight_capacity: u32,
        tracing: bool,
        listen_port: u16,
    ) -> Result<Self, TelemetryError> {
        let mut options = shm::CreateOptions::new(instance, models.to_vec());
        options.capacity = capacity;
        options.inflight_capacity = inflight_capacity;
        options.listen_port = Some(listen_port);
        options.control.tracing_enabled = tracing;
        let segment =
            shm::EngineSegment::create(&options).map_err(|source| TelemetryError::Create {
                instance: instance.to_owned(),
                source,
            })?;
        let producer = segment.ring().producer();
        Ok(Self {
            inner: Some(Arc::new(Inner { producer, segment })),
        })
    }

    /// Records one request outcome when tracing is on. Wait-free: one relaxed load, then (if on)
    /// one ring push: no lock, no allocation, no syscall.
    #[inline]
    pub fn record(&self, outcome: &RequestOutcome) {
        if let Some(inner) = &self.inner
            && inner.producer.tracing_enabled()
        {
            let _ = inner.producer.push(&to_record(outcome));
        }
    }

    /// The in-flight table's writer for the HTTP layer and the inference thread.
    #[must_use]
    pub fn tracker(&self) -> crate::inflight::Tracker {
        match &self.inner {
            Some(inner) => match inner.segment.inflight() {
                Some(table) => crate::inflight::Tracker::new(table, inner.producer.clone()),
                None => crate::inflight::Tracker::disabled(),
            },
            None => crate::inflight::Tracker::disabled(),
        }
    }

    /// Stamps the engine heartbeat the agent uses to tell a live engine from a dead one.
    /// Call about once a second, off the request path.
    pub fn heartbeat(&self) {
        if let Some(inner) = &self.inner {
            inner
                .segment
                .ring()
                .beat_engine_heartbeat(crate::clock::now_ns());
        }
    }

    /// The segment's path, when there is one.
    #[must_use]
    pub fn segment_path(&self) -> Option<String> {
        self.inner
            .as_ref()
            .map(|i| shm::segment_path(&i.segment.info().instance))
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
        assert_eq!(to_record(&o).reserved, [0; 100]);
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
