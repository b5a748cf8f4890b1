//! The engine's steps in a capture (ABI 1.4 step ring): one
//! `ringside.capture` root span per capture, in a trace of its own, with an
//! `engine_step` child per step that ended in the window (attributes
//! `ringside.step.*`, the decoded fields of its record).
//!
//! The step ring is read with a consumer of its own that never commits.

use super::CaptureReason;
use super::window::Window;
use crate::pipeline::metrics::scope;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
use ringside_shm_protocol::{AttachedSegment, ClockPair, PollError, SlotSet, StartAt, Step};

/// The root span's name.
pub const CAPTURE_SPAN: &str = "ringside.capture";
/// Each step's span name.
pub const STEP_SPAN: &str = "engine_step";

/// The steps of a window, and what reading them lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepsRead {
    /// Steps that ended within the window, oldest first.
    pub steps: Vec<Step>,
    /// Records that failed validation.
    pub invalid: u64,
    /// Records overwritten or never committed while read.
    pub lost: u64,
}

/// The steps the segment's step ring still holds that ended within
/// `window` (`None` for a segment without a step ring), read up to the
/// head as it is now.
pub fn read_steps(
    segment: &AttachedSegment,
    window: Window,
) -> Result<Option<StepsRead>, PollError> {
    let Some(ring) = segment.steps() else {
        return Ok(None);
    };
    let end = ring.counters().head;
    let mut consumer = ring.consumer(StartAt::Oldest);
    consumer.set_abandon_after_ns(100_000_000);
    let mut read = StepsRead::default();
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while consumer.cursor() < end && std::time::Instant::now() < give_up {
        let report = consumer.poll(1024, |ticket, record| {
            if ticket >= end {
                return;
            }
            match record.decode() {
                Ok(step) if (window.from_ns..=window.to_ns).contains(&step.t_end_ns) => {
                    read.steps.push(step);
                }
                Ok(_) => {}
                Err(_) => read.invalid += 1,
            }
        })?;
        read.lost += report.lost_overwritten + report.lost_abandoned;
        if report.stalled && report.delivered == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    Ok(Some(read))
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: impl Into<i64>) -> KeyValue {
    kv(key, any_value::Value::IntValue(value.into()))
}

fn slots(key: &str, set: &SlotSet) -> KeyValue {
    kv(
        key,
        any_value::Value::ArrayValue(ArrayValue {
            values: set
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::IntValue(i64::from(s))),
                })
                .collect(),
        }),
    )
}

/// A fresh random id (a capture's trace is its own).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            // getrandom(2) does not fail on Linux ≥ 3.17 once seeded; an id
            // from the clock is still unique enough for one capture.
            Err(_) => {
                let now = ringside_shm_protocol::realtime_ns().to_be_bytes();
                for (b, c) in bytes.iter_mut().zip(now.iter().cycle()) {
                    *b ^= c;
                }
                break;
            }
        }
    }
    bytes
}

/// One export request: the capture's root span over `window` and a child
/// per step, under `resource` (the engine's).
pub fn encode(
    resource: &Resource,
    clock: &ClockPair,
    reason: CaptureReason,
    window: Window,
    steps: &[Step],
) -> ExportTraceServiceRequest {
    let trace_id: [u8; 16] = random_bytes();
    let root_id: [u8; 8] = random_bytes();
    let mut spans = Vec::with_capacity(steps.len() + 1);
    spans.push(Span {
        trace_id: trace_id.to_vec(),
        span_id: root_id.to_vec(),
        name: CAPTURE_SPAN.to_owned(),
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: clock.to_unix_ns(window.from_ns),
        end_time_unix_nano: clock.to_unix_ns(window.to_ns),
        attributes: vec![
            kv(
                super::CAPTURE_REASON,
                any_value::Value::StringValue(reason.as_str().to_owned()),
            ),
            int(
                "ringside.capture.steps",
                i64::try_from(steps.len()).unwrap_or(i64::MAX),
            ),
        ],
        flags: 1 | 0x100,
        ..Span::default()
    });
    for (i, step) in (1u64..).zip(steps) {
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id: crate::pipeline::spans::child_span_id(root_id, i).to_vec(),
            parent_span_id: root_id.to_vec(),
            name: STEP_SPAN.to_owned(),
            kind: span::SpanKind::Internal as i32,
            start_time_unix_nano: clock.to_unix_ns(step.t_start_ns),
            end_time_unix_nano: clock.to_unix_ns(step.t_end_ns),
            attributes: vec![
                int(
                    "ringside.step.number",
                    i64::try_from(step.step).unwrap_or(i64::MAX),
                ),
                kv(
                    "ringside.step.decode.duration",
                    any_value::Value::DoubleValue(
                        (step.t_decode_end_ns - step.t_start_ns) as f64 / 1e9,
                    ),
                ),
                slots("ringside.step.decode_slots", &step.decode_slots),
                slots("ringside.step.prefill_slots", &step.prefill_slots),
                int("ringside.step.prefill_tokens", step.prefill_tokens),
                int("ringside.step.decode_rows", step.decode_rows),
                int("ringside.step.decode_calls", step.decode_calls),
                int("ringside.step.prefill_calls", step.prefill_calls),
                int("ringside.step.slots_occupied", step.slots_occupied),
                int("ringside.step.slots_total", step.slots_total),
                int("ringside.step.kv_cells_used", step.kv_cells_used),
                int("ringside.step.kv_cells_total", step.kv_cells_total),
                int("ringside.step.queue_depth", step.queue_depth),
                kv(
                    "ringside.step.failed",
                    any_value::Value::BoolValue(step.failed),
                ),
                kv(
                    super::CAPTURE_REASON,
                    any_value::Value::StringValue(reason.as_str().to_owned()),
                ),
            ],
            flags: 1 | 0x100,
            ..Span::default()
        });
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_root_per_capture_and_a_child_per_step_in_a_trace_of_its_own() {
        let clock = ClockPair {
            realtime_ns: 1_700_000_000_000_000_000,
            monotonic_ns: 1_000,
        };
        let mut decode = [0u64; 4];
        decode[0] = 0b101;
        let step = |n: u64| Step {
            step: n,
            t_start_ns: 2_000 + n * 100,
            t_decode_end_ns: 2_050 + n * 100,
            t_end_ns: 2_080 + n * 100,
            decode_slots: SlotSet::from_words(decode),
            slots_total: 4,
            slots_occupied: 2,
            decode_rows: 2,
            decode_calls: 1,
            ..Step::default()
        };
        let window = Window {
            from_ns: 1_000,
            to_ns: 9_000,
        };
        let request = encode(
            &Resource::default(),
            &clock,
            CaptureReason::Signal,
            window,
            &[step(1), step(2)],
        );
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 3);
        let root = &spans[0];
        assert_eq!(root.name, CAPTURE_SPAN);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.start_time_unix_nano, 1_700_000_000_000_000_000);
        for (child, n) in spans[1..].iter().zip(1..) {
            assert_eq!(child.name, STEP_SPAN);
            assert_eq!(child.trace_id, root.trace_id);
            assert_eq!(child.parent_span_id, root.span_id);
            assert_eq!(
                child.start_time_unix_nano,
                1_700_000_000_000_000_000 + 1_000 + n * 100
            );
            let slots = child
                .attributes
                .iter()
                .find(|a| a.key == "ringside.step.decode_slots")
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value);
            let Some(any_value::Value::ArrayValue(a)) = slots else {
                panic!("decode slots {slots:?}");
            };
            let ids: Vec<_> = a.values.iter().filter_map(|v| v.value.clone()).collect();
            assert_eq!(
                ids,
                [any_value::Value::IntValue(0), any_value::Value::IntValue(2)]
            );
        }
        assert_ne!(spans[1].span_id, spans[2].span_id);
    }
}
