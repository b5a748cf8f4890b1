//! The daemon's captures, per attached engine: it notes what its sampling
//! dropped and what its triggers watch as the reader decides each record
//! ([`EngineCapture::decided`]), looks at the triggers now and then
//! ([`EngineCapture::due`]), and on a trigger, a death or SIGUSR1 reads the
//! window with a consumer of its own and hands the sampled-out records, and
//! the steps of the window, to the export queue ([`EngineCapture::capture`]).

use super::dropped::DroppedTickets;
use super::steps::{StepCapture, StepsRead};
use super::trigger::{ErrorBurst, Trigger, TtftP99};
use super::window::{Window, WindowReader};
use super::{CaptureReason, CaptureSettings};
use crate::export::ExportQueue;
use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::spans::SpanContext;
use crate::pipeline::steps::StepWindow;
use ringside_shm_protocol::{AttachedSegment, RequestRecord};
use std::sync::Arc;

/// Records handed to the queue per push.
const CHUNK: usize = 1024;

fn ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One engine's capture state.
#[derive(Clone, Debug)]
pub struct EngineCapture {
    settings: CaptureSettings,
    dropped: DroppedTickets,
    error_burst: Option<(ErrorBurst, Trigger)>,
    ttft_p99: Option<(TtftP99, Trigger)>,
}

/// What one capture handed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Requests queued for export.
    pub requests: u64,
    /// Records of the window that sampling did not drop (the daemon
    /// exported them, or they came before it attached): not repeated.
    pub not_dropped: u64,
    /// Steps of the window queued for export.
    pub steps: u64,
}

/// What a capture reads: one attached engine.
#[derive(Debug)]
pub struct Source<'a> {
    /// Its segment.
    pub segment: &'a AttachedSegment,
    /// Its handle (the steps' counters).
    pub engine: &'a Arc<EngineHandle>,
    /// How its records become spans.
    pub ctx: &'a Arc<SpanContext>,
    /// Its recent steps, joined to each captured request.
    pub steps: Option<&'a mut StepWindow>,
    /// The daemon's consumer's cursor: the records below it were decided.
    pub decided_below: u64,
}

impl EngineCapture {
    /// For a ring of `capacity` slots.
    pub fn new(settings: &CaptureSettings, capacity: u64) -> Self {
        let cooldown = ns(settings.cooldown);
        Self {
            settings: settings.clone(),
            dropped: DroppedTickets::new(capacity),
            error_burst: settings.error_burst.map(|b| {
                (
                    ErrorBurst::new(b.errors, ns(b.window)),
                    Trigger::new(cooldown),
                )
            }),
            ttft_p99: settings.ttft_p99.map(|t| {
                (
                    TtftP99::new(ns(t.threshold), ns(t.window), t.min_requests),
                    Trigger::new(cooldown),
                )
            }),
        }
    }

    /// The reader decided `record` (ticket `ticket`): exported or, when
    /// `sampled_out`, left out.
    pub fn decided(&mut self, ticket: u64, record: &RequestRecord, sampled_out: bool) {
        if sampled_out {
            self.dropped.note(ticket);
        }
        if let Some((burst, _)) = &mut self.error_burst {
            burst.observe(record);
        }
        if let Some((p99, _)) = &mut self.ttft_p99 {
            p99.observe(record);
        }
    }

    /// The trigger that fires at `now_ns` (monotonic), if any: each fires
    /// once per incident.
    pub fn due(&mut self, now_ns: u64) -> Option<CaptureReason> {
        let mut reason = None;
        if let Some((burst, trigger)) = &mut self.error_burst
            && trigger.update(burst.holds(now_ns), now_ns)
        {
            reason = Some(CaptureReason::ErrorBurst);
        }
        if let Some((p99, trigger)) = &mut self.ttft_p99
            && trigger.update(p99.holds(now_ns), now_ns)
        {
            reason.get_or_insert(CaptureReason::TtftP99);
        }
        reason
    }

    /// Whether a death is captured.
    pub fn on_crash(&self) -> bool {
        self.settings.on_crash
    }

    /// The capture window (`--capture-window`) before `end_ns`.
    pub fn window_before(&self, end_ns: u64) -> Window {
        Window::before(end_ns, self.settings.window)
    }

    /// Captures `window` for `reason`: the records below
    /// `source.decided_below` (the daemon's consumer's cursor: every one of
    /// those was exported, sampled out, invalid or lost) that sampling
    /// dropped go to `queue`, marked, under a handle of their own, each
    /// joined to the engine's recent steps like a normal export; then the
    /// steps the step ring still holds from the window, in parts.
    pub fn capture(
        &mut self,
        source: Source<'_>,
        reason: CaptureReason,
        window: Window,
        queue: &ExportQueue,
    ) -> Captured {
        let Source {
            segment,
            engine,
            ctx,
            mut steps,
            decided_below,
        } = source;
        let oldest = segment
            .ring()
            .counters()
            .head
            .saturating_sub(segment.ring().capacity());
        self.dropped.forget_below(oldest);
        let handle = super::capture_handle(engine);
        let mut reader = WindowReader::new(segment, window, Some(decided_below));
        let mut captured = Captured::default();
        let dropped = &self.dropped;
        // What this capture exports, not to be exported by the next one.
        let mut taken = Vec::new();
        let mut in_window_kept = 0u64;
        loop {
            // Every record of the window is decoded (to count what the
            // daemon exported itself); only the dropped ones go out.
            let chunk = match reader.next_chunk(CHUNK, |_| true) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(engine = %engine.instance, error = %e, "capture: cannot read the ring");
                    break;
                }
            };
            in_window_kept += chunk.len() as u64;
            let items: Vec<_> = chunk
                .into_iter()
                .filter(|(ticket, _)| dropped.contains(*ticket))
                .map(|(ticket, record)| {
                    taken.push(ticket);
                    let mut item = super::item(&handle, ctx, record, reason);
                    // The join again, without the metrics: the reader
                    // recorded this request's gaps when it read it.
                    item.steps = super::join(steps.as_deref_mut(), &record);
                    item
                })
                .collect();
            captured.requests += items.len() as u64;
            queue.push_all(items);
        }
        self.dropped.forget(&taken);
        captured.not_dropped = in_window_kept - captured.requests;
        let totals = reader.totals();
        let steps_read = capture_steps(segment, engine, reason, window, queue, &mut captured);
        tracing::warn!(
            engine = %engine.instance,
            reason = %reason,
            window_s = self.settings.window.as_secs_f64(),
            requests = captured.requests,
            not_dropped = captured.not_dropped,
            invalid = totals.invalid,
            lost = totals.lost,
            steps = captured.steps,
            steps_invalid = steps_read.invalid,
            steps_lost = steps_read.lost,
            "capture: the window's sampled-out requests and steps are exported"
        );
        captured
    }
}

/// Queues the steps of `window` the segment's step ring still holds, part
/// by part (the queue bounds what waits); returns what reading them lost.
fn capture_steps(
    segment: &AttachedSegment,
    engine: &Arc<EngineHandle>,
    reason: CaptureReason,
    window: Window,
    queue: &ExportQueue,
    captured: &mut Captured,
) -> StepsRead {
    let Some(mut capture) = StepCapture::new(segment, engine, reason, window) else {
        return StepsRead::default();
    };
    loop {
        match capture.next_part() {
            Ok(Some(part)) => {
                captured.steps += part.steps.len() as u64;
                queue.push_steps(part);
            }
            Ok(None) => break,
            Err(e) => {
                // The parts queued so far go out; the root span with them
                // only if the last part was reached.
                tracing::warn!(engine = %engine.instance, error = %e, "capture: cannot read the step ring");
                break;
            }
        }
    }
    capture.totals()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;
    use crate::pipeline::capture::steps::tests::engine;
    use crate::pipeline::spans::AttributeSet;
    use crate::pipeline::spans::tests::{ctx, raw_record};
    use ringside_shm_protocol::{CreateOptions, EngineSegment, OpenOptions};

    #[test]
    fn a_second_capture_never_repeats_what_the_first_exported() {
        let name = format!("capture-twice-{}", std::process::id());
        let mut options = CreateOptions::new(name.clone(), vec!["m".to_owned()]);
        options.capacity = 64;
        options.step_capacity = 0;
        let writer = EngineSegment::create(&options).unwrap();
        let now = ringside_shm_protocol::monotonic_ns();
        let mut records = Vec::new();
        for n in 0..3 {
            let mut record = raw_record(n).decode(1).unwrap();
            let t = &mut record.timestamps;
            let shift = now - t.finished_ns;
            t.arrival_ns += shift;
            t.scheduled_ns = t.scheduled_ns.map(|s| s + shift);
            t.first_token_ns = t.first_token_ns.map(|s| s + shift);
            t.last_token_ns = t.last_token_ns.map(|s| s + shift);
            t.finished_ns = now;
            let _ = writer.ring().producer().push(&record.encode());
            records.push(record);
        }
        let segment = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
        let settings = CaptureSettings::default();
        let mut capture = EngineCapture::new(&settings, 64);
        for (ticket, record) in records.iter().enumerate() {
            capture.decided(ticket as u64, record, true);
        }
        let handle = engine("e");
        let ctx = Arc::new(ctx(AttributeSet::Both));
        let queue = ExportQueue::new(100, 1 << 20, 100);
        let window = capture.window_before(now + 1);
        let source = || Source {
            segment: &segment,
            engine: &handle,
            ctx: &ctx,
            steps: None,
            decided_below: 3,
        };
        let first = capture.capture(source(), CaptureReason::ErrorBurst, window, &queue);
        assert_eq!(first.requests, 3);
        let second = capture.capture(source(), CaptureReason::Signal, window, &queue);
        assert_eq!((second.requests, second.not_dropped), (0, 3));
        assert_eq!(queue.len(), 3);
        // Counted on the engine's one capture handle, apart from its own
        // accounting: what a full queue drops shows as a dropped capture.
        let counted_on = handle.capture.get().expect("the capture handle");
        assert!(
            queue
                .take(100)
                .iter()
                .all(|i| Arc::ptr_eq(&i.engine, counted_on))
        );
        assert_eq!(handle.stats.snapshot(), Default::default());
    }
}
