//! Incident capture: every request record an engine's ring still holds from
//! a window of time, exported at full detail (phases) whatever the sampling
//! said, each span marked `ringside.capture.reason`.
//!
//! Two readers use it:
//! * `ringside-agent snapshot` ([`snapshot`]): a one-shot CLI. It cannot know
//!   what a daemon exported, so it exports every record of the window, with
//!   the span ids a normal export carries (derived from the record, see
//!   [`crate::pipeline::spans`]): a copy of a span the daemon already
//!   exported has the same trace and span ids and differs by the
//!   `ringside.capture.reason` attribute.
//! * the daemon (`run`), on its own ([`daemon`]): when an engine dies
//!   (`engine_crashed`), on an error burst or a TTFT p99 breach
//!   ([`trigger`]), and on SIGUSR1 (`signal`). It knows what it exported, so
//!   it exports only what sampling dropped ([`dropped::DroppedTickets`]).
//!
//! Both read the ring with a consumer of their own
//! ([`window::WindowReader`]) that never commits a cursor: the daemon's
//! cursor, and so its delivery guarantee, is untouched.

pub mod daemon;
pub mod dropped;
pub mod snapshot;
pub mod steps;
pub mod trigger;
pub mod window;

use crate::export::Item;
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::sampling::SpanSampling;
use crate::pipeline::spans::{self, SpanContext};
use ringside_shm_protocol::{Detail, RequestRecord};
use std::sync::Arc;
use std::time::Duration;

/// The attribute every captured span carries.
pub use crate::pipeline::spans::CAPTURE_REASON;

/// Why a capture was taken: the value of `ringside.capture.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaptureReason {
    /// `ringside-agent snapshot`.
    Manual,
    /// The engine died.
    EngineCrashed,
    /// N error requests within the error window.
    ErrorBurst,
    /// The TTFT p99 over the TTFT window went above its threshold.
    TtftP99,
    /// SIGUSR1 to the daemon.
    Signal,
}

impl CaptureReason {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::EngineCrashed => "engine_crashed",
            Self::ErrorBurst => "error_burst",
            Self::TtftP99 => "ttft_p99",
            Self::Signal => "signal",
        }
    }
}

impl std::fmt::Display for CaptureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's capture settings (`run --capture-*`), resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureSettings {
    /// How far back a capture reaches.
    pub window: Duration,
    /// How long a trigger's condition must stay cleared before it can fire
    /// again.
    pub cooldown: Duration,
    /// Capture when an engine dies.
    pub on_crash: bool,
    /// The error-burst trigger, if on.
    pub error_burst: Option<ErrorBurstSettings>,
    /// The TTFT p99 trigger, if on.
    pub ttft_p99: Option<TtftP99Settings>,
}

/// `--capture-error-burst N` within `--capture-error-window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorBurstSettings {
    /// Error requests (at least 1).
    pub errors: u32,
    /// Within this long.
    pub window: Duration,
}

/// `--capture-ttft-p99 DURATION` over `--capture-ttft-window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtftP99Settings {
    /// The p99 above which the trigger fires.
    pub threshold: Duration,
    /// Over the requests finished this long back.
    pub window: Duration,
    /// Fewer requests with a first token in the window never fire (a p99 of
    /// three requests is their maximum).
    pub min_requests: u32,
}

/// Default `--capture-window`.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// Default `--capture-cooldown`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(300);

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            cooldown: DEFAULT_COOLDOWN,
            on_crash: true,
            error_burst: None,
            ttft_p99: None,
        }
    }
}

/// A handle for the captured requests of `engine`: the same id and resource
/// (its spans are grouped with the engine's), counters of its own, so that
/// the engine's exact accounting (`read = exported + sampled out + …`)
/// never counts a record twice.
pub fn capture_handle(engine: &EngineHandle) -> Arc<EngineHandle> {
    Arc::new(EngineHandle {
        id: engine.id,
        instance: engine.instance.clone(),
        pid: engine.pid,
        resource: engine.resource.clone(),
        stats: EngineStats::default(),
    })
}

/// One captured request as an export item: phases detail, kept by rule
/// (`sampling.priority` = 1, no `ot=th`: no probability kept it), marked
/// with `reason`.
pub fn item(
    handle: &Arc<EngineHandle>,
    ctx: &Arc<SpanContext>,
    record: RequestRecord,
    reason: CaptureReason,
) -> Item {
    let sampling = SpanSampling {
        priority: true,
        ..SpanSampling::default()
    };
    Item::new(Arc::clone(handle), Arc::clone(ctx), record, Detail::Phases)
        .with_sampling(sampling)
        .with_capture(reason)
}

/// Encodes a captured request: the spans a normal export writes, each
/// with the `ringside.capture.reason` attribute.
pub fn encode(item: &Item, reason: CaptureReason, out: &mut Vec<u8>) -> usize {
    let extras = spans::SpanExtras {
        stalls: &item.stalls,
        sampling: item.sampling,
        steps: item.steps.as_ref(),
        capture_reason: Some(reason.as_str()),
    };
    spans::encode_with(&item.ctx, &item.record, item.detail, &extras, out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;
    use crate::pipeline::spans::tests::{ctx, raw_record};
    use crate::pipeline::spans::{AttributeSet, convert};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::ScopeSpans;
    use prost::Message as _;

    fn handle() -> Arc<EngineHandle> {
        Arc::new(EngineHandle {
            id: 3,
            instance: "e".into(),
            pid: 1,
            resource: Default::default(),
            stats: EngineStats::default(),
        })
    }

    #[test]
    fn a_captured_request_has_the_normal_spans_plus_the_reason_on_each() {
        let ctx = Arc::new(ctx(AttributeSet::Both));
        let record = raw_record(5).decode(1).unwrap();
        let item = item(&handle(), &ctx, record, CaptureReason::ErrorBurst);
        let mut out = Vec::new();
        let n = encode(&item, CaptureReason::ErrorBurst, &mut out);
        let captured = ScopeSpans::decode(out.as_slice()).unwrap().spans;
        let normal = convert(&ctx, &record, Detail::Phases);
        assert_eq!(n, 4);
        assert_eq!(captured.len(), normal.len());
        for (c, s) in captured.iter().zip(&normal) {
            assert_eq!(
                (&c.trace_id, &c.span_id, &c.parent_span_id, &c.name),
                (&s.trace_id, &s.span_id, &s.parent_span_id, &s.name)
            );
            let reason = c
                .attributes
                .iter()
                .find(|a| a.key == CAPTURE_REASON)
                .and_then(|a| a.value.as_ref())
                .and_then(|v| v.value.clone());
            assert_eq!(reason, Some(Value::StringValue("error_burst".into())));
            // Every attribute of the normal span is there too.
            for a in &s.attributes {
                assert!(c.attributes.contains(a), "{}", a.key);
            }
            assert!(
                c.attributes
                    .iter()
                    .any(|a| a.key == spans::SAMPLING_PRIORITY),
                "kept by rule: sampling.priority"
            );
        }
    }
}
