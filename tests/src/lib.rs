//! Helpers shared by the cross-process and end-to-end tests in `tests/`.

pub mod harness;

use ringside_shm_protocol::{FLAG_REMOTE_PARENT, FinishReason, Operation, Record, RecordKind};

/// A well-formed record whose fields all derive from `seq`, so a reader can
/// check it arrived whole ([`record_matches`]).
pub fn numbered_record(seq: u64) -> Record {
    let mut r: Record = bytemuck::Zeroable::zeroed();
    r.request_id = u128::from(seq).wrapping_add(1).to_le_bytes();
    r.trace_id = [0x5a; 16];
    r.trace_id[..8].copy_from_slice(&seq.to_le_bytes());
    r.span_id = (seq | 1 << 63).to_le_bytes();
    r.parent_span_id = (seq ^ 0xffff).to_le_bytes();
    r.flags = FLAG_REMOTE_PARENT;
    r.t_arrival_ns = 1_000_000 + seq;
    r.t_scheduled_ns = 2_000_000 + seq;
    r.t_first_token_ns = 3_000_000 + seq;
    r.t_last_token_ns = 4_000_000 + seq;
    r.t_finished_ns = 5_000_000 + seq;
    r.seed = seq;
    r.prompt_tokens = (seq % 1000) as u32;
    r.completion_tokens = (seq % 7) as u32 + 1;
    r.max_tokens = 64;
    r.top_p = 1.0;
    r.http_status = 200;
    r.kind = RecordKind::RequestFinished as u8;
    r.operation = Operation::Chat as u8;
    r.finish_reason = FinishReason::Stop as u8;
    r
}

/// A typical finished chat request (12 prompt tokens, 7 completion tokens,
/// sampled trace with a remote parent) arriving at `now` and finishing 4 µs
/// later; ids derive from `seq`. What the benchmarks feed the agent.
pub fn finished_chat_record(seq: u64, now: u64) -> Record {
    let mut r: Record = bytemuck::Zeroable::zeroed();
    r.request_id = u128::from(seq + 1).to_be_bytes();
    r.trace_id[0..8].copy_from_slice(&(seq + 1).to_be_bytes());
    r.trace_id[8] = 1;
    r.parent_span_id = [0x11; 8];
    r.span_id = (seq + 1).to_be_bytes();
    r.t_arrival_ns = now;
    r.t_scheduled_ns = now + 1_000;
    r.t_first_token_ns = now + 2_000;
    r.t_last_token_ns = now + 3_000;
    r.t_finished_ns = now + 4_000;
    r.prompt_tokens = 12;
    r.completion_tokens = 7;
    r.max_tokens = 16;
    r.temperature = 0.7;
    r.top_p = 0.95;
    r.http_status = 200;
    r.kind = RecordKind::RequestFinished as u8;
    r.operation = Operation::Chat as u8;
    r.finish_reason = FinishReason::Stop as u8;
    r.trace_flags = 1;
    r.flags = FLAG_REMOTE_PARENT;
    r
}

/// Whether `record` is exactly `numbered_record(seq)` for the seq it carries.
pub fn record_matches(record: &Record) -> Option<u64> {
    let seq = record.seed;
    (*record == numbered_record(seq)).then_some(seq)
}
