//! The daemon's captures, per attached engine: it notes what its sampling
//! dropped and what its triggers watch as the reader decides each record
//! ([`EngineCapture::decided`]), looks at the triggers now and then
//! ([`EngineCapture::due`]), and on a trigger, a death or SIGUSR1 reads the
//! window with a consumer of its own and hands the sampled-out records to
//! the export queue ([`EngineCapture::capture`]).

use super::dropped::DroppedTickets;
use super::trigger::{ErrorBurst, Trigger, TtftP99};
use super::window::{Window, WindowReader};
use super::{CaptureReason, CaptureSettings};
use crate::export::ExportQueue;
use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::spans::SpanContext;
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

    /// Captures `window` for `reason`: the records below `decided_below` (the daemon's consumer's cursor:
    /// every one of those was exported, sampled out, invalid or lost) that
    /// sampling dropped go to `queue`, marked, under a handle of their own.
    #[allow(clippy::too_many_arguments)]
    pub fn capture(
        &mut self,
        segment: &AttachedSegment,
        engine: &EngineHandle,
        ctx: &Arc<SpanContext>,
        decided_below: u64,
        reason: CaptureReason,
        window: Window,
        queue: &ExportQueue,
    ) -> Captured {
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
                .map(|(_, record)| super::item(&handle, ctx, record, reason))
                .collect();
            captured.requests += items.len() as u64;
            queue.push_all(items);
        }
        captured.not_dropped = in_window_kept - captured.requests;
        let totals = reader.totals();
        tracing::warn!(
            engine = %engine.instance,
            reason = %reason,
            window_s = self.settings.window.as_secs_f64(),
            requests = captured.requests,
            not_dropped = captured.not_dropped,
            invalid = totals.invalid,
            lost = totals.lost,
            "capture: the window's sampled-out requests are exported"
        );
        captured
    }
}
