//! The engine's steps in a capture (ABI 1.4 step ring): one
//! `ringside.capture` root span per capture, in a trace of its own, with an
//! `engine_step` child per step that ended in the window (attributes
//! `ringside.step.*`, the decoded fields of its record).
//!
//! The step ring is read with a consumer of its own that never commits
//! ([`StepReader`]), and a capture's steps are cut into parts of at most
//! [`STEPS_PER_PART`] ([`StepCapture`]), each one export request through the
//! export queue (`ringside-agent snapshot` and the daemon alike), counted
//! per engine (`capture_steps_exported`, `_failed`, `_dropped`).

use super::CaptureReason;
use super::window::Window;
use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::metrics::scope;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
use ringside_shm_protocol::{
    AttachedSegment, ClockPair, PollError, SlotSet, StartAt, Step, StepConsumer,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The root span's name.
pub const CAPTURE_SPAN: &str = "ringside.capture";
/// Each step's span name.
pub const STEP_SPAN: &str = "engine_step";

/// Steps per [`StepPart`]: one export request each (about 230 KB of spans),
/// well below a collector's usual 4 MiB message limit whatever the window.
pub const STEPS_PER_PART: usize = 512;

/// What reading a window of steps lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepsRead {
    /// Steps that ended within the window.
    pub kept: u64,
    /// Records that failed validation.
    pub invalid: u64,
    /// Records overwritten or never committed while read.
    pub lost: u64,
}

/// Reads the steps of a window from a segment's step ring, in chunks, with a
/// consumer of its own started at the oldest step, never committing, up to
/// the head as it was when it started (bounded work however fast the engine
/// writes; after 2 s without progress the rest is given up and counted lost).
pub struct StepReader {
    consumer: StepConsumer,
    end: u64,
    window: Window,
    give_up: Instant,
    read: StepsRead,
}

/// The longest a read waits without progress for records a producer left
/// uncommitted (the inference thread's writes take nanoseconds).
const GIVE_UP: Duration = Duration::from_secs(2);

impl std::fmt::Debug for StepReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepReader")
            .field("cursor", &self.consumer.cursor())
            .field("end", &self.end)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl StepReader {
    /// A reader of `segment`'s steps that ended within `window` (`None` for
    /// a segment without a step ring).
    pub fn new(segment: &AttachedSegment, window: Window) -> Option<Self> {
        let ring = segment.steps()?;
        let end = ring.counters().head;
        let mut consumer = ring.consumer(StartAt::Oldest);
        consumer.set_abandon_after_ns(100_000_000);
        Some(Self {
            consumer,
            end,
            window,
            give_up: Instant::now() + GIVE_UP,
            read: StepsRead::default(),
        })
    }

    /// What was read so far.
    pub fn totals(&self) -> StepsRead {
        self.read
    }

    /// The next steps of the window, oldest first (at most `max`, at least
    /// one); `None` once the end is reached.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<Step>>, PollError> {
        let mut out = Vec::new();
        let (end, window) = (self.end, self.window);
        while out.len() < max && self.consumer.cursor() < end {
            if Instant::now() >= self.give_up {
                // Stuck: what is left of the window is counted, not waited for.
                self.read.lost += end - self.consumer.cursor();
                self.end = self.consumer.cursor();
                break;
            }
            let mut invalid = 0;
            let want = (max - out.len()).min(1024);
            let report = self.consumer.poll(want, |ticket, record| {
                if ticket >= end {
                    return;
                }
                match record.decode() {
                    Ok(step) if (window.from_ns..=window.to_ns).contains(&step.t_end_ns) => {
                        out.push(step);
                    }
                    Ok(_) => {}
                    Err(_) => invalid += 1,
                }
            })?;
            self.read.invalid += invalid;
            self.read.lost += report.lost_overwritten + report.lost_abandoned;
            if report.delivered + report.lost_overwritten + report.lost_abandoned > 0 {
                self.give_up = Instant::now() + GIVE_UP;
            }
            if report.stalled && report.delivered == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.read.kept += out.len() as u64;
        Ok((!out.is_empty()).then_some(out))
    }
}

/// The ids of one capture's trace: a trace of its own, its root span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureIds {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The `ringside.capture` root span.
    pub root_id: [u8; 8],
}

impl CaptureIds {
    /// Fresh random ids.
    pub fn random() -> Self {
        Self {
            trace_id: random_bytes(),
            root_id: random_bytes(),
        }
    }
}

/// Part of one capture's steps, exported as one request ([`encode_part`]):
/// up to [`STEPS_PER_PART`] `engine_step` spans, and in the capture's last
/// part its `ringside.capture` root span.
#[derive(Debug)]
pub struct StepPart {
    /// The engine (its resource; its counters of captured steps).
    pub engine: Arc<EngineHandle>,
    /// The engine's clock pair (stamps to wall-clock time).
    pub clock: ClockPair,
    /// Why.
    pub reason: CaptureReason,
    /// The capture's window.
    pub window: Window,
    /// The capture's trace.
    pub ids: CaptureIds,
    /// The child index (from 1) of its first step in the capture.
    pub first: u64,
    /// The steps.
    pub steps: Vec<Step>,
    /// `Some(steps in the capture)` when it carries the root span.
    pub root: Option<u64>,
    /// Memory held (estimate).
    pub bytes: usize,
}

impl StepPart {
    /// Spans it becomes.
    pub fn spans(&self) -> usize {
        self.steps.len() + usize::from(self.root.is_some())
    }
}

/// One capture's steps, cut into [`StepPart`]s as they are read: the root
/// span goes with the last part, so that it carries the capture's step
/// count (and outlives the older parts if the export queue must drop some).
#[derive(Debug)]
pub struct StepCapture {
    reader: StepReader,
    engine: Arc<EngineHandle>,
    clock: ClockPair,
    reason: CaptureReason,
    ids: CaptureIds,
    /// The chunk read last, not handed out yet (it may be the last).
    pending: Option<Vec<Step>>,
    /// Steps handed out.
    next_index: u64,
    done: bool,
}

impl StepCapture {
    /// The capture of `segment`'s steps that ended within `window` (`None`
    /// for a segment without a step ring); `engine` is the attached engine
    /// (its resource, and its counters of captured steps).
    pub fn new(
        segment: &AttachedSegment,
        engine: &Arc<EngineHandle>,
        reason: CaptureReason,
        window: Window,
    ) -> Option<Self> {
        Some(Self {
            reader: StepReader::new(segment, window)?,
            engine: Arc::clone(engine),
            clock: segment.info().clock,
            reason,
            ids: CaptureIds::random(),
            pending: None,
            next_index: 1,
            done: false,
        })
    }

    /// The capture's trace.
    pub fn ids(&self) -> CaptureIds {
        self.ids
    }

    /// What reading lost so far (`kept`: the steps of the window).
    pub fn totals(&self) -> StepsRead {
        self.reader.totals()
    }

    fn part(&mut self, steps: Vec<Step>, root: Option<u64>) -> StepPart {
        let first = self.next_index;
        self.next_index += steps.len() as u64;
        StepPart {
            engine: Arc::clone(&self.engine),
            clock: self.clock,
            reason: self.reason,
            window: self.reader.window,
            ids: self.ids,
            first,
            bytes: std::mem::size_of::<StepPart>() + steps.len() * std::mem::size_of::<Step>(),
            steps,
            root,
        }
    }

    /// The next part; `None` after the last (the one with the root span,
    /// always handed out, with no steps if the window has none).
    pub fn next_part(&mut self) -> Result<Option<StepPart>, PollError> {
        while !self.done {
            match self.reader.next_chunk(STEPS_PER_PART)? {
                Some(chunk) => {
                    if let Some(previous) = self.pending.replace(chunk) {
                        return Ok(Some(self.part(previous, None)));
                    }
                }
                None => {
                    self.done = true;
                    let last = self.pending.take().unwrap_or_default();
                    let total = self.reader.totals().kept;
                    return Ok(Some(self.part(last, Some(total))));
                }
            }
        }
        Ok(None)
    }
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

/// One export request for `part`.
pub fn encode_part(part: &StepPart) -> ExportTraceServiceRequest {
    encode_spans(
        &part.engine.resource,
        &part.clock,
        part.reason,
        part.window,
        part.ids,
        part.first,
        &part.steps,
        part.root,
    )
}

/// The spans of `steps` (child indices from `first`) and, with
/// `root: Some(total)`, the root span, in the trace of `ids`.
#[allow(clippy::too_many_arguments)]
fn encode_spans(
    resource: &Resource,
    clock: &ClockPair,
    reason: CaptureReason,
    window: Window,
    ids: CaptureIds,
    first: u64,
    steps: &[Step],
    root: Option<u64>,
) -> ExportTraceServiceRequest {
    let CaptureIds { trace_id, root_id } = ids;
    let mut spans = Vec::with_capacity(steps.len() + 1);
    if let Some(total) = root {
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
                    i64::try_from(total).unwrap_or(i64::MAX),
                ),
            ],
            flags: 1 | 0x100,
            ..Span::default()
        });
    }
    for (i, step) in (first..).zip(steps) {
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
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;
    use crate::pipeline::accounting::EngineStats;
    use ringside_shm_protocol::{CreateOptions, EngineSegment, OpenOptions};

    /// A valid step `n` (slots 0 and 2 decoding), ending at `end_ns`.
    pub(crate) fn step(n: u64, end_ns: u64) -> Step {
        let mut decode = [0u64; 4];
        decode[0] = 0b101;
        Step {
            step: n,
            t_start_ns: end_ns - 80,
            t_decode_end_ns: end_ns - 30,
            t_end_ns: end_ns,
            decode_slots: SlotSet::from_words(decode),
            slots_total: 4,
            slots_occupied: 2,
            decode_rows: 2,
            decode_calls: 1,
            ..Step::default()
        }
    }

    pub(crate) fn engine(name: &str) -> Arc<EngineHandle> {
        Arc::new(EngineHandle {
            id: 0,
            instance: name.into(),
            pid: 1,
            resource: Resource::default(),
            stats: EngineStats::default(),
            capture: Default::default(),
        })
    }

    /// A part of `n` steps, the root's when `root`.
    pub(crate) fn part(engine: &Arc<EngineHandle>, n: u64, root: Option<u64>) -> StepPart {
        let steps: Vec<Step> = (1..=n).map(|i| step(i, 2_080 + i * 100)).collect();
        StepPart {
            engine: Arc::clone(engine),
            clock: ClockPair {
                realtime_ns: 1_700_000_000_000_000_000,
                monotonic_ns: 1_000,
            },
            reason: CaptureReason::Signal,
            window: Window {
                from_ns: 1_000,
                to_ns: 9_000_000,
            },
            ids: CaptureIds::random(),
            first: 1,
            bytes: std::mem::size_of::<StepPart>() + steps.len() * std::mem::size_of::<Step>(),
            steps,
            root,
        }
    }

    #[test]
    fn one_root_per_capture_and_a_child_per_step_in_a_trace_of_its_own() {
        let request = encode_part(&part(&engine("e"), 2, Some(2)));
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

    /// A segment of this process with a step ring of 2048 slots holding
    /// `before` steps that ended before the window and `inside` within it.
    fn segment_with_steps(tag: &str, before: u64, inside: u64) -> (EngineSegment, Window) {
        let name = format!("capture-steps-{}-{tag}", std::process::id());
        let mut options = CreateOptions::new(name, vec!["m".to_owned()]);
        options.capacity = 64;
        options.step_capacity = 2048;
        let segment = EngineSegment::create(&options).unwrap();
        let producer = segment.steps().unwrap().producer();
        let base = ringside_shm_protocol::monotonic_ns();
        for n in 1..=before + inside {
            let _ = producer.push(&step(n, base + n * 1_000).encode());
        }
        let window = Window {
            from_ns: base + (before + 1) * 1_000,
            to_ns: base + (before + inside) * 1_000,
        };
        (segment, window)
    }

    #[test]
    fn a_capture_is_cut_into_parts_with_the_root_in_the_last_and_every_step_of_the_window_once() {
        let (segment, window) = segment_with_steps("parts", 100, 1_100);
        let attached =
            AttachedSegment::open(&segment.info().instance, &OpenOptions::default()).unwrap();
        let engine = engine("e");
        let mut capture =
            StepCapture::new(&attached, &engine, CaptureReason::ErrorBurst, window).unwrap();
        let ids = capture.ids();
        let mut parts = Vec::new();
        while let Some(part) = capture.next_part().unwrap() {
            parts.push(part);
        }
        // 1100 steps: 512 + 512 + 76 with the root.
        let sizes: Vec<_> = parts.iter().map(|p| (p.steps.len(), p.root)).collect();
        assert_eq!(sizes, [(512, None), (512, None), (76, Some(1_100))]);
        assert_eq!(
            capture.totals(),
            StepsRead {
                kept: 1_100,
                invalid: 0,
                lost: 0
            }
        );
        let mut numbers = Vec::new();
        let mut span_ids = std::collections::HashSet::new();
        let mut roots = 0;
        for part in &parts {
            let request = encode_part(part);
            for span in &request.resource_spans[0].scope_spans[0].spans {
                assert_eq!(span.trace_id, ids.trace_id);
                assert!(span_ids.insert(span.span_id.clone()), "a span id twice");
                if span.name == CAPTURE_SPAN {
                    roots += 1;
                    assert_eq!(span.span_id, ids.root_id);
                } else {
                    assert_eq!(span.parent_span_id, ids.root_id);
                }
            }
            numbers.extend(part.steps.iter().map(|s| s.step));
        }
        assert_eq!(roots, 1);
        assert_eq!(numbers, (101..=1_200).collect::<Vec<u64>>());
        // A consumer of its own: nothing committed.
        assert_eq!(attached.steps().unwrap().read_cursor(), 0);
    }

    #[test]
    fn a_window_without_steps_still_sends_its_root() {
        let (segment, window) = segment_with_steps("empty", 10, 0);
        let attached =
            AttachedSegment::open(&segment.info().instance, &OpenOptions::default()).unwrap();
        let window = Window {
            from_ns: window.to_ns + 1,
            to_ns: window.to_ns + 2,
        };
        let mut capture =
            StepCapture::new(&attached, &engine("e"), CaptureReason::Signal, window).unwrap();
        let part = capture.next_part().unwrap().unwrap();
        assert_eq!((part.steps.len(), part.root), (0, Some(0)));
        assert!(capture.next_part().unwrap().is_none());
    }
}
