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

/// Whether `record` is exactly `numbered_record(seq)` for the seq it carries.
pub fn record_matches(record: &Record) -> Option<u64> {
    let seq = record.seed;
    (*record == numbered_record(seq)).then_some(seq)
}
