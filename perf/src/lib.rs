//! Shared pieces of the benchmarks: a record like the engine writes, and a
//! description of the machine the figures come from.

use ringside_shm_protocol::{FinishReason, Operation, Record, RecordKind};

/// A record with every field set, as the engine fills it at the end of a request.
pub fn engine_like_record(seq: u64) -> Record {
    let mut r: Record = bytemuck::Zeroable::zeroed();
    r.request_id = u128::from(seq).to_le_bytes();
    r.trace_id = [7; 16];
    r.span_id = [9; 8];
    r.t_arrival_ns = 1;
    r.t_scheduled_ns = 2;
    r.t_first_token_ns = 3;
    r.t_last_token_ns = 4;
    r.t_finished_ns = 5;
    r.prompt_tokens = 100;
    r.completion_tokens = 50;
    r.max_tokens = 256;
    r.temperature = 0.7;
    r.top_p = 0.95;
    r.http_status = 200;
    r.kind = RecordKind::RequestFinished as u8;
    r.operation = Operation::Chat as u8;
    r.finish_reason = FinishReason::Stop as u8;
    r
}

/// CPU model and core count, for the header of every benchmark report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{model}, {cores} cores available")
}
