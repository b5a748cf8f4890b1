//! Helpers shared by the cross-process and end-to-end tests in `tests/`.

#![forbid(unsafe_code)]

pub mod harness;

use ringside_shm_protocol::{
    ErrorType, FinishReason, Operation, Record, RecordKind, RequestRecord, Sampling, Timestamps,
};

/// A well-formed record whose fields all derive from `seq`, so a reader can
/// check it arrived whole ([`record_matches`]).
pub fn numbered_record(seq: u64) -> Record {
    let mut trace_id = [0x5a; 16];
    trace_id[..8].copy_from_slice(&seq.to_le_bytes());
    RequestRecord {
        kind: RecordKind::RequestFinished,
        operation: Operation::Chat,
        request_id: u128::from(seq).wrapping_add(1).to_le_bytes(),
        trace_id,
        parent_span_id: Some((seq ^ 0xffff).to_le_bytes()),
        span_id: (seq | 1 << 63).to_le_bytes(),
        trace_flags: 0,
        ot: Default::default(),
        timestamps: Timestamps {
            arrival_ns: 1_000_000 + seq,
            scheduled_ns: Some(2_000_000 + seq),
            first_token_ns: Some(3_000_000 + seq),
            last_token_ns: Some(4_000_000 + seq),
            finished_ns: 5_000_000 + seq,
        },
        prompt_tokens: (seq % 1000) as u32,
        completion_tokens: (seq % 7) as u32 + 1,
        cached_prompt_tokens: 0,
        sampling: Sampling {
            max_tokens: 64,
            top_p: 1.0,
            seed: seq,
            ..Sampling::default()
        },
        params_set: 0,
        stream: false,
        finish_reason: FinishReason::Stop,
        http_status: 200,
        error_type: ErrorType::None,
        model_index: 0,
        queue_depth: 0,
        running: 0,
        sequence_slot: Some(0),
    }
    .encode()
}

/// A typical finished chat request (12 prompt tokens, 7 completion tokens,
/// sampled trace with a remote parent) arriving at `now` and finishing 4 µs
/// later; ids derive from `seq`. What the benchmarks feed the agent.
pub fn finished_chat_record(seq: u64, now: u64) -> Record {
    let mut trace_id = [0; 16];
    trace_id[0..8].copy_from_slice(&(seq + 1).to_be_bytes());
    trace_id[8] = 1;
    RequestRecord {
        kind: RecordKind::RequestFinished,
        operation: Operation::Chat,
        request_id: u128::from(seq + 1).to_be_bytes(),
        trace_id,
        parent_span_id: Some([0x11; 8]),
        span_id: (seq + 1).to_be_bytes(),
        trace_flags: 1,
        ot: Default::default(),
        timestamps: Timestamps {
            arrival_ns: now,
            scheduled_ns: Some(now + 1_000),
            first_token_ns: Some(now + 2_000),
            last_token_ns: Some(now + 3_000),
            finished_ns: now + 4_000,
        },
        prompt_tokens: 12,
        completion_tokens: 7,
        cached_prompt_tokens: 0,
        sampling: Sampling {
            max_tokens: 16,
            temperature: 0.7,
            top_p: 0.95,
            ..Sampling::default()
        },
        params_set: 0,
        stream: false,
        finish_reason: FinishReason::Stop,
        http_status: 200,
        error_type: ErrorType::None,
        model_index: 0,
        queue_depth: 0,
        running: 0,
        sequence_slot: Some(0),
    }
    .encode()
}

/// Whether `record` is exactly `numbered_record(seq)` for the seq it carries.
pub fn record_matches(record: &Record) -> Option<u64> {
    let seq = record.seed;
    (*record == numbered_record(seq)).then_some(seq)
}
