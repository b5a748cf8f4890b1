//! A [`Record`] and its validated form, [`RequestRecord`], both ways.
//!
//! * Writing: [`RequestRecord::encode`] is the one way a record is built (the
//!   engine, the tests and the benchmarks all go through it). It sets the
//!   flags ([`FLAG_STREAM`], [`FLAG_REMOTE_PARENT`] from `parent_span_id`,
//!   [`FLAG_OT_RANDOMNESS`] / [`FLAG_OT_THRESHOLD`] from [`OtState`]),
//!   the kind and the enums, writes 0 for a stamp that did not happen and
//!   leaves the reserved bytes zero.
//! * Reading: [`Record::decode`] checks a record copied out of the ring. A
//!   record's bytes come from another process and may be anything. Decoding
//!   works on a private copy, converts every enum with `TryFrom`, and checks
//!   the invariants the engine promises; a record that breaks one is rejected
//!   with a [`RecordError`] naming the field, and the reader skips and counts
//!   it.
//!
//! The two are inverses: `r.encode().decode(n) == Ok(r)` for every valid `r`,
//! and a decoded record re-encodes to the bytes it came from (reserved bytes,
//! unknown flag bits, a parent span id without [`FLAG_REMOTE_PARENT`] and
//! `ot_*` bytes without their flag aside, which decoding ignores and encoding
//! writes as zero).

use crate::layout::{
    ErrorType, FLAG_OT_RANDOMNESS, FLAG_OT_THRESHOLD, FLAG_REMOTE_PARENT, FLAG_SEQUENCE_SLOT,
    FLAG_STREAM, FinishReason, MAX_STEP_SLOTS, Operation, Record, RecordKind,
};

/// One past the largest 56-bit value: the bound of an `rv` or a `th`.
pub const OT_VALUE_LIMIT: u64 = 1 << 56;

/// The sampling values of the caller's OpenTelemetry `tracestate` entry
/// (`ot=th:…;rv:…`, ABI 1.3), both 56-bit: what consistent probability
/// sampling downstream of the engine needs from the caller's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct OtState {
    /// The explicit randomness value (`rv`), used instead of the trace id's
    /// low 56 bits.
    pub randomness: Option<u64>,
    /// The rejection threshold (`th`) the caller's trace was sampled with.
    pub threshold: Option<u64>,
}

/// A validated record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestRecord {
    /// Finished or rejected.
    pub kind: RecordKind,
    /// Chat or text completion.
    pub operation: Operation,
    /// 128-bit request id.
    pub request_id: [u8; 16],
    /// W3C trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The caller's span id, when it sent a valid `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    /// The engine's span id for this request (never all zeros).
    pub span_id: [u8; 8],
    /// W3C trace flags.
    pub trace_flags: u8,
    /// The caller's `ot` tracestate sampling values (each below [`OT_VALUE_LIMIT`]).
    pub ot: OtState,
    /// Monotonic stamps, ordered `arrival <= scheduled <= first_token <= last_token <= finished`.
    pub timestamps: Timestamps,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from cache (never more than `prompt_tokens`).
    pub cached_prompt_tokens: u32,
    /// Effective sampling parameters.
    pub sampling: Sampling,
    /// Bits of [`crate::params`]: which parameters the caller set.
    pub params_set: u16,
    /// The response was streamed.
    pub stream: bool,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// HTTP status, 100..=599.
    pub http_status: u16,
    /// Failure class.
    pub error_type: ErrorType,
    /// Index into the segment's model table (checked against its length).
    pub model_index: u16,
    /// Queue depth when the request arrived.
    pub queue_depth: u16,
    /// Running sequences when it was scheduled.
    pub running: u16,
    /// The batch slot it was served in (ABI 1.4; below [`MAX_STEP_SLOTS`]),
    /// when it was scheduled by a 1.4 engine: what joins it to step records.
    pub sequence_slot: Option<u16>,
}

/// Monotonic nanosecond stamps of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Timestamps {
    /// Accepted by the HTTP layer.
    pub arrival_ns: u64,
    /// Got a sequence slot.
    pub scheduled_ns: Option<u64>,
    /// First output token.
    pub first_token_ns: Option<u64>,
    /// Last output token.
    pub last_token_ns: Option<u64>,
    /// Response complete.
    pub finished_ns: u64,
}

/// Effective sampling parameters of one request.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Sampling {
    /// Token limit.
    pub max_tokens: u32,
    /// Temperature (finite, >= 0).
    pub temperature: f32,
    /// Nucleus threshold (finite).
    pub top_p: f32,
    /// Top-k, 0 = disabled.
    pub top_k: u32,
    /// Seed.
    pub seed: u64,
    /// Frequency penalty (finite).
    pub frequency_penalty: f32,
    /// Presence penalty (finite).
    pub presence_penalty: f32,
}

/// Why a record was rejected. The record is skipped and counted; reading goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// `kind` is not a known [`RecordKind`].
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// `operation` is not a known [`Operation`].
    #[error("unknown operation {0}")]
    Operation(u8),
    /// `finish_reason` is not a known [`FinishReason`].
    #[error("unknown finish reason {0}")]
    FinishReason(u8),
    /// `error_type` is not a known [`ErrorType`].
    #[error("unknown error type {0}")]
    ErrorType(u8),
    /// The trace id or the span id is all zeros.
    #[error("all-zero {0}")]
    ZeroId(&'static str),
    /// A timestamp is missing or out of order.
    #[error("timestamps out of order or missing: {0}")]
    Timestamps(&'static str),
    /// A sampling parameter is NaN, infinite or negative where it cannot be.
    #[error("sampling parameter {0} is not a valid number")]
    Sampling(&'static str),
    /// Token counts contradict each other.
    #[error("token counts are inconsistent: {0}")]
    Tokens(&'static str),
    /// `http_status` is not an HTTP status code.
    #[error("http status {0} is out of range")]
    HttpStatus(u16),
    /// An `ot` sampling value is wider than 56 bits.
    #[error("{0} is not a 56-bit value")]
    OtValue(&'static str),
    /// A sequence slot on a request never scheduled, or past the slot limit.
    #[error("sequence slot {0} is impossible for this request")]
    SequenceSlot(u16),
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

impl Record {
    /// Validates this (privately copied) record. `model_count` is the number of
    /// entries in the segment's model table.
    pub fn decode(&self, model_count: u16) -> Result<RequestRecord, RecordError> {
        let kind = RecordKind::try_from(self.kind).map_err(RecordError::Kind)?;
        let operation = Operation::try_from(self.operation).map_err(RecordError::Operation)?;
        let finish_reason =
            FinishReason::try_from(self.finish_reason).map_err(RecordError::FinishReason)?;
        let error_type = ErrorType::try_from(self.error_type).map_err(RecordError::ErrorType)?;
        if self.trace_id == [0; 16] {
            return Err(RecordError::ZeroId("trace_id"));
        }
        if self.span_id == [0; 8] {
            return Err(RecordError::ZeroId("span_id"));
        }
        let remote_parent = self.flags & FLAG_REMOTE_PARENT != 0;
        if remote_parent && self.parent_span_id == [0; 8] {
            return Err(RecordError::ZeroId("parent_span_id"));
        }
        let ot = self.ot_state()?;
        let timestamps = self.timestamps()?;
        if kind == RecordKind::RequestRejected && timestamps.scheduled_ns.is_some() {
            return Err(RecordError::Timestamps("a rejected request was scheduled"));
        }
        let sampling = Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
        };
        if !sampling.temperature.is_finite() || sampling.temperature < 0.0 {
            return Err(RecordError::Sampling("temperature"));
        }
        if !sampling.top_p.is_finite() || sampling.top_p < 0.0 {
            return Err(RecordError::Sampling("top_p"));
        }
        if !sampling.frequency_penalty.is_finite() {
            return Err(RecordError::Sampling("frequency_penalty"));
        }
        if !sampling.presence_penalty.is_finite() {
            return Err(RecordError::Sampling("presence_penalty"));
        }
        if self.cached_prompt_tokens > self.prompt_tokens {
            return Err(RecordError::Tokens(
                "more cached prompt tokens than prompt tokens",
            ));
        }
        if self.completion_tokens > 0 && timestamps.first_token_ns.is_none() {
            return Err(RecordError::Tokens(
                "completion tokens without a first-token stamp",
            ));
        }
        if !(100..=599).contains(&self.http_status) {
            return Err(RecordError::HttpStatus(self.http_status));
        }
        if self.model_index >= model_count {
            return Err(RecordError::ModelIndex {
                index: self.model_index,
                count: model_count,
            });
        }
        let sequence_slot = (self.flags & FLAG_SEQUENCE_SLOT != 0).then_some(self.sequence_slot);
        if let Some(slot) = sequence_slot
            && (usize::from(slot) >= MAX_STEP_SLOTS || timestamps.scheduled_ns.is_none())
        {
            return Err(RecordError::SequenceSlot(slot));
        }
        Ok(RequestRecord {
            kind,
            operation,
            request_id: self.request_id,
            trace_id: self.trace_id,
            parent_span_id: remote_parent.then_some(self.parent_span_id),
            span_id: self.span_id,
            trace_flags: self.trace_flags,
            ot,
            timestamps,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            sampling,
            params_set: self.params_set,
            stream: self.flags & FLAG_STREAM != 0,
            finish_reason,
            http_status: self.http_status,
            error_type,
            model_index: self.model_index,
            queue_depth: self.queue_depth,
            running: self.running,
            sequence_slot,
        })
    }

    fn ot_state(&self) -> Result<OtState, RecordError> {
        let value = |flag: u8, bytes: [u8; 8], name| {
            if self.flags & flag == 0 {
                return Ok(None);
            }
            let v = u64::from_ne_bytes(bytes);
            if v >= OT_VALUE_LIMIT {
                return Err(RecordError::OtValue(name));
            }
            Ok(Some(v))
        };
        Ok(OtState {
            randomness: value(FLAG_OT_RANDOMNESS, self.ot_randomness, "ot_randomness")?,
            threshold: value(FLAG_OT_THRESHOLD, self.ot_threshold, "ot_threshold")?,
        })
    }

    fn timestamps(&self) -> Result<Timestamps, RecordError> {
        let t = Timestamps {
            arrival_ns: self.t_arrival_ns,
            scheduled_ns: opt(self.t_scheduled_ns),
            first_token_ns: opt(self.t_first_token_ns),
            last_token_ns: opt(self.t_last_token_ns),
            finished_ns: self.t_finished_ns,
        };
        if t.arrival_ns == 0 {
            return Err(RecordError::Timestamps("no arrival stamp"));
        }
        if t.finished_ns < t.arrival_ns {
            return Err(RecordError::Timestamps("finished before arrival"));
        }
        // Each present stamp must be no earlier than the previous present one
        // and no later than `finished`.
        let mut previous = t.arrival_ns;
        for (name, stamp) in [
            ("scheduled", t.scheduled_ns),
            ("first_token", t.first_token_ns),
            ("last_token", t.last_token_ns),
        ] {
            if let Some(ns) = stamp {
                if ns < previous || ns > t.finished_ns {
                    return Err(RecordError::Timestamps(name));
                }
                previous = ns;
            }
        }
        if t.first_token_ns.is_some() && t.scheduled_ns.is_none() {
            return Err(RecordError::Timestamps(
                "first token without being scheduled",
            ));
        }
        if t.first_token_ns.is_some() != t.last_token_ns.is_some() {
            return Err(RecordError::Timestamps(
                "first and last token stamps must come together",
            ));
        }
        Ok(t)
    }
}

impl RequestRecord {
    /// The ABI record for this request: the inverse of [`Record::decode`].
    ///
    /// Sets [`FLAG_STREAM`] from `stream`, [`FLAG_REMOTE_PARENT`] (with the
    /// parent span id) from `parent_span_id` and [`FLAG_OT_RANDOMNESS`] /
    /// [`FLAG_OT_THRESHOLD`] (with their values) from `ot`, writes 0 for a
    /// `None` stamp or `ot` value and zero reserved bytes. It checks nothing: encoding an invalid record gives
    /// a record [`Record::decode`] rejects. Plain copies, no allocation.
    #[must_use]
    pub fn encode(&self) -> Record {
        let mut flags = 0;
        if self.stream {
            flags |= FLAG_STREAM;
        }
        if self.parent_span_id.is_some() {
            flags |= FLAG_REMOTE_PARENT;
        }
        if self.ot.randomness.is_some() {
            flags |= FLAG_OT_RANDOMNESS;
        }
        if self.ot.threshold.is_some() {
            flags |= FLAG_OT_THRESHOLD;
        }
        if self.sequence_slot.is_some() {
            flags |= FLAG_SEQUENCE_SLOT;
        }
        let t = &self.timestamps;
        let s = &self.sampling;
        Record {
            request_id: self.request_id,
            trace_id: self.trace_id,
            parent_span_id: self.parent_span_id.unwrap_or([0; 8]),
            span_id: self.span_id,
            t_arrival_ns: t.arrival_ns,
            t_scheduled_ns: t.scheduled_ns.unwrap_or(0),
            t_first_token_ns: t.first_token_ns.unwrap_or(0),
            t_last_token_ns: t.last_token_ns.unwrap_or(0),
            t_finished_ns: t.finished_ns,
            seed: s.seed,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            top_k: s.top_k,
            http_status: self.http_status,
            model_index: self.model_index,
            queue_depth: self.queue_depth,
            running: self.running,
            kind: self.kind as u8,
            operation: self.operation as u8,
            finish_reason: self.finish_reason as u8,
            error_type: self.error_type as u8,
            trace_flags: self.trace_flags,
            flags,
            params_set: self.params_set,
            ot_randomness: self.ot.randomness.unwrap_or(0).to_ne_bytes(),
            ot_threshold: self.ot.threshold.unwrap_or(0).to_ne_bytes(),
            sequence_slot: self.sequence_slot.unwrap_or(0),
            reserved: [0; 82],
        }
    }

    /// Time in queue (arrival → scheduled), if scheduled.
    pub fn queue_ns(&self) -> Option<u64> {
        Some(self.timestamps.scheduled_ns? - self.timestamps.arrival_ns)
    }
    /// Time to first token measured from arrival, as clients see it.
    pub fn ttft_ns(&self) -> Option<u64> {
        Some(self.timestamps.first_token_ns? - self.timestamps.arrival_ns)
    }
    /// Prefill (scheduled → first token).
    pub fn prefill_ns(&self) -> Option<u64> {
        Some(self.timestamps.first_token_ns? - self.timestamps.scheduled_ns?)
    }
    /// Decode (first token → last token).
    pub fn decode_ns(&self) -> Option<u64> {
        Some(self.timestamps.last_token_ns? - self.timestamps.first_token_ns?)
    }
    /// End to end (arrival → finished).
    pub fn e2e_ns(&self) -> u64 {
        self.timestamps.finished_ns - self.timestamps.arrival_ns
    }
    /// Time per output token after the first, if more than one was generated.
    pub fn tpot_ns(&self) -> Option<u64> {
        let decode = self.decode_ns()?;
        let steps = u64::from(self.completion_tokens.checked_sub(1).filter(|s| *s > 0)?);
        Some(decode / steps)
    }
    /// Whether [`Self::sampling`] holds the request's real parameters: false for the
    /// records an agent makes of the requests a dead engine held
    /// ([`ErrorType::EngineCrashed`]), whose parameters the in-flight table does not carry.
    pub fn sampling_known(&self) -> bool {
        self.error_type != ErrorType::EngineCrashed
    }
    /// Whether the request failed, was aborted or was rejected: any of its
    /// kind, error class, status or finish reason says so (an engine's
    /// records agree on all four; a forged one is an error if any does).
    pub fn is_error(&self) -> bool {
        self.kind == RecordKind::RequestRejected
            || self.error_type != ErrorType::None
            || self.http_status >= 400
            || matches!(
                self.finish_reason,
                FinishReason::Abort | FinishReason::Error
            )
    }
}

impl From<&RequestRecord> for Record {
    /// [`RequestRecord::encode`].
    fn from(record: &RequestRecord) -> Self {
        record.encode()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::{FLAG_STREAM, params};

    /// A well-formed finished chat record with distinct, ordered stamps.
    pub(crate) fn sample_record(seq: u64) -> Record {
        let mut trace_id = [0xab; 16];
        trace_id[0..8].copy_from_slice(&seq.to_le_bytes());
        RequestRecord {
            kind: RecordKind::RequestFinished,
            operation: Operation::Chat,
            request_id: (u128::from(seq) + 1).to_le_bytes(),
            trace_id,
            parent_span_id: Some([0x11; 8]),
            span_id: [0x22; 8],
            trace_flags: 1,
            ot: OtState::default(),
            timestamps: Timestamps {
                arrival_ns: 1_000 + seq,
                scheduled_ns: Some(2_000 + seq),
                first_token_ns: Some(3_000 + seq),
                last_token_ns: Some(4_000 + seq),
                finished_ns: 5_000 + seq,
            },
            prompt_tokens: 12,
            completion_tokens: 7,
            cached_prompt_tokens: 0,
            sampling: Sampling {
                max_tokens: 16,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: seq,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            params_set: params::TEMPERATURE | params::MAX_TOKENS,
            stream: true,
            finish_reason: FinishReason::Stop,
            http_status: 200,
            error_type: ErrorType::None,
            model_index: 0,
            queue_depth: 0,
            running: 0,
            sequence_slot: Some(3),
        }
        .encode()
    }

    #[test]
    fn sample_record_sets_the_flags_and_leaves_reserved_zero() {
        let r = sample_record(5);
        assert_eq!(
            r.flags,
            FLAG_STREAM | FLAG_REMOTE_PARENT | FLAG_SEQUENCE_SLOT
        );
        assert_eq!(r.parent_span_id, [0x11; 8]);
        assert_eq!(r.sequence_slot, 3);
        assert_eq!(r.reserved, [0; 82]);
        assert_eq!((r.ot_randomness, r.ot_threshold), ([0; 8], [0; 8]));
        assert_eq!(r.kind, RecordKind::RequestFinished as u8);
        assert_eq!(Record::from(&r.decode(1).unwrap()), r);
    }

    #[test]
    fn none_stamps_and_no_parent_encode_as_zero() {
        let mut d = sample_record(0).decode(1).unwrap();
        d.kind = RecordKind::RequestRejected;
        d.parent_span_id = None;
        d.stream = false;
        d.timestamps.scheduled_ns = None;
        d.timestamps.first_token_ns = None;
        d.timestamps.last_token_ns = None;
        d.completion_tokens = 0;
        d.sequence_slot = None;
        let r = d.encode();
        assert_eq!(r.flags, 0);
        assert_eq!(r.parent_span_id, [0; 8]);
        assert_eq!(
            (r.t_scheduled_ns, r.t_first_token_ns, r.t_last_token_ns),
            (0, 0, 0)
        );
        assert_eq!(r.kind, RecordKind::RequestRejected as u8);
        assert_eq!(r.decode(1), Ok(d));
    }

    #[test]
    fn well_formed_record_decodes_with_zero_temperature_kept() {
        let d = sample_record(3).decode(1).unwrap();
        assert_eq!(d.kind, RecordKind::RequestFinished);
        assert_eq!(d.sampling.temperature, 0.0);
        assert_eq!(d.parent_span_id, Some([0x11; 8]));
        assert!(d.stream);
        assert_eq!(d.queue_ns(), Some(1_000));
        assert_eq!(d.ttft_ns(), Some(2_000));
        assert_eq!(d.prefill_ns(), Some(1_000));
        assert_eq!(d.decode_ns(), Some(1_000));
        assert_eq!(d.e2e_ns(), 4_000);
        assert_eq!(d.tpot_ns(), Some(1_000 / 6));
        assert!(!d.is_error());
    }

    #[test]
    fn rejected_record_without_generation_decodes() {
        let mut r = sample_record(0);
        r.kind = RecordKind::RequestRejected as u8;
        r.t_scheduled_ns = 0;
        r.t_first_token_ns = 0;
        r.t_last_token_ns = 0;
        r.completion_tokens = 0;
        r.http_status = 429;
        r.error_type = ErrorType::QueueFull as u8;
        r.finish_reason = FinishReason::None as u8;
        r.flags = 0;
        let d = r.decode(1).unwrap();
        assert_eq!(d.parent_span_id, None);
        assert!(d.is_error());
        assert_eq!(d.queue_ns(), None);
        assert_eq!(d.tpot_ns(), None);
    }

    #[test]
    fn every_invalid_field_is_named() {
        type Mutation = fn(&mut Record);
        let cases: &[(Mutation, RecordError)] = &[
            (|r| r.kind = 9, RecordError::Kind(9)),
            (|r| r.operation = 0, RecordError::Operation(0)),
            (|r| r.finish_reason = 77, RecordError::FinishReason(77)),
            (|r| r.error_type = 200, RecordError::ErrorType(200)),
            (|r| r.trace_id = [0; 16], RecordError::ZeroId("trace_id")),
            (|r| r.span_id = [0; 8], RecordError::ZeroId("span_id")),
            (
                |r| r.parent_span_id = [0; 8],
                RecordError::ZeroId("parent_span_id"),
            ),
            (
                |r| r.t_arrival_ns = 0,
                RecordError::Timestamps("no arrival stamp"),
            ),
            (
                |r| r.t_finished_ns = 10,
                RecordError::Timestamps("finished before arrival"),
            ),
            (
                |r| r.t_scheduled_ns = 10,
                RecordError::Timestamps("scheduled"),
            ),
            (
                |r| r.t_first_token_ns = 1_500,
                RecordError::Timestamps("first_token"),
            ),
            (
                |r| r.t_last_token_ns = 9_999,
                RecordError::Timestamps("last_token"),
            ),
            (
                |r| r.temperature = f32::NAN,
                RecordError::Sampling("temperature"),
            ),
            (
                |r| r.temperature = -1.0,
                RecordError::Sampling("temperature"),
            ),
            (|r| r.top_p = f32::INFINITY, RecordError::Sampling("top_p")),
            (
                |r| r.frequency_penalty = f32::NAN,
                RecordError::Sampling("frequency_penalty"),
            ),
            (
                |r| r.presence_penalty = f32::NEG_INFINITY,
                RecordError::Sampling("presence_penalty"),
            ),
            (
                |r| r.cached_prompt_tokens = 13,
                RecordError::Tokens("more cached prompt tokens than prompt tokens"),
            ),
            (|r| r.http_status = 42, RecordError::HttpStatus(42)),
            (
                |r| r.model_index = 1,
                RecordError::ModelIndex { index: 1, count: 1 },
            ),
            (
                |r| {
                    r.t_first_token_ns = 0;
                    r.t_last_token_ns = 0;
                },
                RecordError::Tokens("completion tokens without a first-token stamp"),
            ),
            (
                |r| r.t_last_token_ns = 0,
                RecordError::Timestamps("first and last token stamps must come together"),
            ),
            (
                |r| r.kind = RecordKind::RequestRejected as u8,
                RecordError::Timestamps("a rejected request was scheduled"),
            ),
        ];
        for (mutate, expected) in cases {
            let mut r = sample_record(0);
            mutate(&mut r);
            assert_eq!(r.decode(1).as_ref().err(), Some(expected), "{expected}");
        }
    }

    #[test]
    fn unknown_flag_bits_and_reserved_bytes_are_ignored_for_minor_versions() {
        let mut r = sample_record(1);
        r.flags |= 0b1100_0000;
        r.reserved = [0x5a; 82];
        assert!(r.decode(1).is_ok());
    }

    #[test]
    fn ot_values_round_trip_and_a_1_2_record_has_none() {
        let mut d = sample_record(2).decode(1).unwrap();
        assert_eq!(d.ot, OtState::default());
        d.ot = OtState {
            randomness: Some(0x6e6d1a75832a2f),
            threshold: Some(OT_VALUE_LIMIT - 1),
        };
        let r = d.encode();
        assert_eq!(
            r.flags & (FLAG_OT_RANDOMNESS | FLAG_OT_THRESHOLD),
            FLAG_OT_RANDOMNESS | FLAG_OT_THRESHOLD
        );
        assert_eq!(r.decode(1), Ok(d));
    }

    #[test]
    fn a_forged_ot_value_wider_than_56_bits_is_rejected() {
        let mut r = sample_record(2);
        r.flags |= FLAG_OT_RANDOMNESS;
        r.ot_randomness = OT_VALUE_LIMIT.to_ne_bytes();
        assert_eq!(r.decode(1), Err(RecordError::OtValue("ot_randomness")));
        let mut r = sample_record(2);
        r.flags |= FLAG_OT_THRESHOLD;
        r.ot_threshold = u64::MAX.to_ne_bytes();
        assert_eq!(r.decode(1), Err(RecordError::OtValue("ot_threshold")));
        // Without its flag the same bytes mean nothing.
        r.flags &= !FLAG_OT_THRESHOLD;
        assert_eq!(r.decode(1).map(|d| d.ot), Ok(OtState::default()));
    }

    mod round_trip {
        use super::*;
        use proptest::prelude::*;

        const KINDS: [RecordKind; 2] = [RecordKind::RequestFinished, RecordKind::RequestRejected];
        const OPERATIONS: [Operation; 2] = [Operation::Chat, Operation::TextCompletion];
        const FINISH_REASONS: [FinishReason; 5] = [
            FinishReason::None,
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Abort,
            FinishReason::Error,
        ];
        const ERROR_TYPES: [ErrorType; 11] = [
            ErrorType::None,
            ErrorType::InvalidRequest,
            ErrorType::Unauthorized,
            ErrorType::ModelNotFound,
            ErrorType::PayloadTooLarge,
            ErrorType::QueueFull,
            ErrorType::ContextLengthExceeded,
            ErrorType::ClientDisconnected,
            ErrorType::Internal,
            ErrorType::Unavailable,
            ErrorType::EngineCrashed,
        ];

        fn nonzero_id<const N: usize>() -> impl Strategy<Value = [u8; N]> {
            any::<[u8; N]>().prop_filter("all-zero id", |id| id.iter().any(|b| *b != 0))
        }

        /// Ordered stamps: a rejected request is never scheduled, and the first
        /// and last token stamps come together, only after scheduling.
        fn timestamps(rejected: bool) -> impl Strategy<Value = Timestamps> {
            (
                1..=u64::MAX / 2,
                proptest::option::of(0..=u64::from(u32::MAX)),
                proptest::option::of((0..=u64::from(u32::MAX), 0..=u64::from(u32::MAX))),
                0..=u64::from(u32::MAX),
            )
                .prop_map(move |(arrival, scheduled, tokens, tail)| {
                    let scheduled = if rejected { None } else { scheduled };
                    let scheduled_ns = scheduled.map(|d| arrival + d);
                    let (first_token_ns, last_token_ns) = match (scheduled_ns, tokens) {
                        (Some(s), Some((to_first, to_last))) => {
                            (Some(s + to_first), Some(s + to_first + to_last))
                        }
                        _ => (None, None),
                    };
                    let latest = last_token_ns.or(scheduled_ns).unwrap_or(arrival);
                    Timestamps {
                        arrival_ns: arrival,
                        scheduled_ns,
                        first_token_ns,
                        last_token_ns,
                        finished_ns: latest + tail,
                    }
                })
        }

        fn sampling() -> impl Strategy<Value = Sampling> {
            (
                any::<u32>(),
                0.0f32..1.0e6,
                0.0f32..1.0e6,
                any::<u32>(),
                any::<u64>(),
                -1.0e6f32..1.0e6,
                -1.0e6f32..1.0e6,
            )
                .prop_map(
                    |(max_tokens, temperature, top_p, top_k, seed, frequency, presence)| Sampling {
                        max_tokens,
                        temperature,
                        top_p,
                        top_k,
                        seed,
                        frequency_penalty: frequency,
                        presence_penalty: presence,
                    },
                )
        }

        /// Any record [`Record::decode`] accepts with a model table of `models`.
        fn valid_record(models: u16) -> impl Strategy<Value = RequestRecord> {
            (0..KINDS.len()).prop_flat_map(move |kind| {
                let kind = KINDS[kind];
                (
                    (
                        prop::sample::select(&OPERATIONS[..]),
                        any::<[u8; 16]>(),
                        nonzero_id::<16>(),
                        proptest::option::of(nonzero_id::<8>()),
                        nonzero_id::<8>(),
                        any::<u8>(),
                        timestamps(kind == RecordKind::RequestRejected),
                    ),
                    (
                        any::<u32>(),
                        any::<u32>(),
                        any::<u32>(),
                        sampling(),
                        any::<u16>(),
                        any::<bool>(),
                        prop::sample::select(&FINISH_REASONS[..]),
                    ),
                    (
                        100u16..=599,
                        prop::sample::select(&ERROR_TYPES[..]),
                        0..models,
                        any::<u16>(),
                        any::<u16>(),
                        proptest::option::of(0..OT_VALUE_LIMIT),
                        proptest::option::of(0..OT_VALUE_LIMIT),
                        proptest::option::of(0..crate::layout::MAX_STEP_SLOTS as u16),
                    ),
                )
                    .prop_map(
                        move |(
                            (
                                operation,
                                request_id,
                                trace_id,
                                parent_span_id,
                                span_id,
                                trace_flags,
                                timestamps,
                            ),
                            (
                                prompt,
                                completion,
                                cached,
                                sampling,
                                params_set,
                                stream,
                                finish_reason,
                            ),
                            (
                                http_status,
                                error_type,
                                model_index,
                                queue_depth,
                                running,
                                randomness,
                                threshold,
                                slot,
                            ),
                        )| {
                            let completion_tokens = if timestamps.first_token_ns.is_some() {
                                completion
                            } else {
                                0
                            };
                            RequestRecord {
                                kind,
                                operation,
                                request_id,
                                trace_id,
                                parent_span_id,
                                span_id,
                                trace_flags,
                                ot: OtState {
                                    randomness,
                                    threshold,
                                },
                                timestamps,
                                prompt_tokens: prompt,
                                completion_tokens,
                                cached_prompt_tokens: cached.min(prompt),
                                sampling,
                                params_set,
                                stream,
                                finish_reason,
                                http_status,
                                error_type,
                                model_index,
                                queue_depth,
                                running,
                                sequence_slot: slot.filter(|_| timestamps.scheduled_ns.is_some()),
                            }
                        },
                    )
            })
        }

        proptest! {
            // Miri runs these too (scripts/test.sh): a few cases there.
            #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 4 } else { 256 }, ..ProptestConfig::default() })]

            #[test]
            fn encode_then_decode_gives_the_record_back(
                (models, record) in (1..=u16::MAX)
                    .prop_flat_map(|n| (Just(n), valid_record(n)))
            ) {
                prop_assert_eq!(record.encode().decode(models), Ok(record));
            }

            #[test]
            fn a_valid_raw_record_survives_decode_then_encode_byte_for_byte(
                record in valid_record(1)
            ) {
                let raw = record.encode();
                let again = raw.decode(1).map(|d| d.encode());
                prop_assert_eq!(again.map(|r| bytemuck::bytes_of(&r).to_vec()),
                    Ok(bytemuck::bytes_of(&raw).to_vec()));
            }

            #[test]
            fn what_decode_ignores_is_written_as_zero(
                record in valid_record(1),
                reserved in any::<[u8; 82]>(),
                unknown_flags in any::<u8>(),
                stray_parent in nonzero_id::<8>(),
                stray_ot in any::<([u8; 8], [u8; 8])>(),
                stray_slot in any::<u16>(),
            ) {
                let canonical = record.encode();
                let mut raw = canonical;
                raw.reserved = reserved;
                raw.flags |= unknown_flags
                    & !(FLAG_STREAM
                        | FLAG_REMOTE_PARENT
                        | FLAG_OT_RANDOMNESS
                        | FLAG_OT_THRESHOLD
                        | FLAG_SEQUENCE_SLOT);
                if record.parent_span_id.is_none() {
                    raw.parent_span_id = stray_parent;
                }
                if record.ot.randomness.is_none() {
                    raw.ot_randomness = stray_ot.0;
                }
                if record.ot.threshold.is_none() {
                    raw.ot_threshold = stray_ot.1;
                }
                if record.sequence_slot.is_none() {
                    raw.sequence_slot = stray_slot;
                }
                let again = raw.decode(1).map(|d| d.encode());
                prop_assert_eq!(again.map(|r| bytemuck::bytes_of(&r).to_vec()),
                    Ok(bytemuck::bytes_of(&canonical).to_vec()));
            }
        }
    }

    #[test]
    fn a_sequence_slot_needs_its_flag_a_schedule_and_a_slot_below_the_limit() {
        let mut r = sample_record(1);
        // A 1.3 writer leaves the flag clear: the bytes mean nothing.
        r.flags &= !FLAG_SEQUENCE_SLOT;
        assert_eq!(r.decode(1).unwrap().sequence_slot, None);
        let mut r = sample_record(1);
        r.sequence_slot = 256;
        assert_eq!(r.decode(1), Err(RecordError::SequenceSlot(256)));
        let mut d = sample_record(1).decode(1).unwrap();
        d.kind = RecordKind::RequestRejected;
        d.timestamps.scheduled_ns = None;
        d.timestamps.first_token_ns = None;
        d.timestamps.last_token_ns = None;
        d.completion_tokens = 0;
        assert_eq!(d.encode().decode(1), Err(RecordError::SequenceSlot(3)));
    }
}
