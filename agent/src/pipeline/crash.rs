//! Crash forensics: the requests a dead engine still held.
//!
//! When an engine dies (its liveness turns dead, or a new generation took its name and kept the
//! old file as a dead generation), its segment's in-flight table still holds an entry for every
//! request it had admitted and not finished. Each becomes an `engine_crashed` record: the
//! caller's trace id and parent span id, the request's own span id, the phases it reached and
//! the tokens generated so far. Its end is the engine's last sign of life: the later of the
//! request's last progress and the engine's last heartbeat (the engine died after both and
//! before the heartbeat went stale).
//!
//! The sampling parameters are not in the table; a crash span leaves them out rather than
//! showing zeros ([`RequestRecord::sampling_known`] is false for these records).

use ringside_shm_protocol::{
    ErrorType, FinishReason, InflightRequest, RecordKind, RequestRecord, Sampling, Timestamps,
};

/// The record of a request found in a dead engine's table, ended at `last_sign_of_life_ns`
/// (`CLOCK_MONOTONIC`, the engine's clock).
pub fn crash_record(request: &InflightRequest, last_sign_of_life_ns: u64) -> RequestRecord {
    let scheduled_ns = request.scheduled_ns;
    let first_token_ns = request.first_token_ns;
    let last_token_ns = request.last_token_ns.or(first_token_ns);
    let latest_stamp = [
        Some(request.arrival_ns),
        scheduled_ns,
        first_token_ns,
        last_token_ns,
        Some(request.progress_ns),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(request.arrival_ns);
    RequestRecord {
        kind: RecordKind::RequestFinished,
        operation: request.operation,
        request_id: request.request_id,
        trace_id: request.trace_id,
        parent_span_id: request.parent_span_id,
        span_id: request.span_id,
        trace_flags: request.trace_flags,
        ot: Default::default(),
        timestamps: Timestamps {
            arrival_ns: request.arrival_ns,
            scheduled_ns,
            first_token_ns,
            last_token_ns,
            finished_ns: last_sign_of_life_ns.max(latest_stamp),
        },
        prompt_tokens: request.prompt_tokens,
        completion_tokens: request.output_tokens,
        cached_prompt_tokens: request.cached_prompt_tokens.min(request.prompt_tokens),
        sampling: Sampling {
            max_tokens: request.max_tokens,
            ..Sampling::default()
        },
        params_set: 0,
        stream: request.stream,
        finish_reason: FinishReason::Error,
        // No response status was ever sent: the connection died with the engine.
        http_status: 0,
        error_type: ErrorType::EngineCrashed,
        model_index: request.model_index,
        queue_depth: 0,
        running: 0,
        sequence_slot: request.sequence_slot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringside_shm_protocol::{InflightPhase, Operation};

    pub(crate) fn request(phase: InflightPhase) -> InflightRequest {
        let decoding = phase == InflightPhase::Decode;
        let scheduled = phase != InflightPhase::Queued;
        InflightRequest {
            index: 0,
            update: 4,
            phase,
            operation: Operation::Chat,
            request_id: [1; 16],
            trace_id: [2; 16],
            parent_span_id: Some([3; 8]),
            span_id: [4; 8],
            trace_flags: 1,
            remote_parent: true,
            stream: true,
            arrival_ns: 1_000,
            scheduled_ns: scheduled.then_some(2_000),
            first_token_ns: decoding.then_some(3_000),
            last_token_ns: decoding.then_some(9_000),
            progress_ns: if decoding { 9_000 } else { 2_500 },
            prompt_tokens: 12,
            prefilled_tokens: if decoding { 12 } else { 4 },
            output_tokens: if decoding { 40 } else { 0 },
            cached_prompt_tokens: 4,
            max_tokens: 900,
            model_index: 0,
            sequence_slot: scheduled.then_some(0),
        }
    }

    #[test]
    fn a_decoding_request_ends_at_the_last_sign_of_life_with_its_tokens_so_far() {
        let r = crash_record(&request(InflightPhase::Decode), 50_000);
        assert_eq!(r.error_type, ErrorType::EngineCrashed);
        assert_eq!(r.error_type.as_str(), Some("engine_crashed"));
        assert_eq!(r.completion_tokens, 40);
        assert_eq!(r.parent_span_id, Some([3; 8]));
        assert_eq!(r.timestamps.first_token_ns, Some(3_000));
        assert_eq!(r.timestamps.last_token_ns, Some(9_000));
        assert_eq!(r.timestamps.finished_ns, 50_000);
        assert!(!r.sampling_known());
        assert!(r.is_error());
    }

    #[test]
    fn the_end_is_never_before_the_requests_own_last_stamp() {
        // A heartbeat older than the request's last token (the heartbeat beats once a second).
        let r = crash_record(&request(InflightPhase::Decode), 500);
        assert_eq!(r.timestamps.finished_ns, 9_000);
        let queued = crash_record(&request(InflightPhase::Queued), 0);
        assert_eq!(queued.timestamps.scheduled_ns, None);
        assert_eq!(queued.timestamps.finished_ns, 2_500);
    }

    #[test]
    fn a_crash_record_encodes_and_decodes_like_an_engines_record() {
        for phase in [
            InflightPhase::Queued,
            InflightPhase::Prefill,
            InflightPhase::Decode,
        ] {
            let mut r = crash_record(&request(phase), 60_000);
            // The ABI's validation wants a real status; the agent's record has none.
            r.http_status = 500;
            let decoded = r.encode().decode(1).expect("valid");
            assert_eq!(decoded.timestamps, r.timestamps, "{}", phase.as_str());
        }
    }
}
