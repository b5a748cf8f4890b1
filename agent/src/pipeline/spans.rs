//! One validated record → OTLP spans: a SERVER span per request named
//! `{gen_ai.operation.name} {gen_ai.request.model}`, and with phase detail the
//! INTERNAL children `queue`, `prefill` and `decode`.
//!
//! Timestamps are the engine's monotonic stamps converted with the segment's
//! clock pair. The trace id, the caller's parent span id and the request's
//! span id come from the record; child span ids are derived from the request
//! span id, so converting a record twice gives identical spans.
//!
//! Every span of a request carries the sampling decision (see
//! [`crate::pipeline::sampling`]): the sampled flag, the caller's random flag,
//! `ot=th:…;rv:…` in its `tracestate` (the threshold it was kept with and the
//! caller's explicit randomness; the caller's other tracestate entries are not
//! in the record and not carried) and, when a tail rule kept it rather than
//! chance, `sampling.priority` = 1.

use crate::export::wire;
use crate::pipeline::sampling::{FLAG_SAMPLED, SpanSampling};
use crate::pipeline::stalls::Stall;
use crate::pipeline::steps::RequestSteps;
use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, span, status};
use prost::Message as _;
use ringside_shm_protocol::{ClockPair, Detail, Operation, RequestRecord};
use std::fmt::Write as _;

/// `gen_ai.provider.name` of every span.
pub const PROVIDER_NAME: &str = "ringside";

/// OTLP span flag: the IS_REMOTE bit below is meaningful.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// OTLP span flag: the parent is remote.
const FLAG_IS_REMOTE: u32 = 0x200;

/// Which span attributes to emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttributeSet {
    /// The OpenTelemetry GenAI semantic conventions v1.41.
    Semconv,
    /// The attributes vLLM emits (`gen_ai.latency.*`, deprecated token names).
    Vllm,
    /// Both sets.
    #[default]
    Both,
}

impl AttributeSet {
    /// Whether the semconv set is emitted.
    pub fn semconv(self) -> bool {
        matches!(self, Self::Semconv | Self::Both)
    }
    /// Whether the vLLM set is emitted.
    pub fn vllm(self) -> bool {
        matches!(self, Self::Vllm | Self::Both)
    }
}

/// What converting one engine's records needs.
#[derive(Clone, Debug)]
pub struct SpanContext {
    /// The segment's clock pair.
    pub clock: ClockPair,
    /// The segment's model table.
    pub models: Vec<String>,
    /// Which attributes to emit.
    pub attributes: AttributeSet,
    /// `server.address`.
    pub server_address: String,
    /// `server.port`, if known.
    pub server_port: Option<u16>,
}

/// An `f32` parameter as the decimal the caller wrote (0.95, not
/// 0.949999988079071).
fn param(value: f32) -> f64 {
    let wide = f64::from(value);
    if wide.fract() == 0.0 {
        // Integers (0, 1, ...) are exact either way: skip the formatting.
        return wide;
    }
    // Requests mostly repeat a handful of values: remember recent ones
    // (direct-mapped by bit pattern) instead of formatting every time.
    thread_local! {
        static RECENT: std::cell::Cell<[(u32, f64); 16]> =
            const { std::cell::Cell::new([(0, 0.0); 16]) };
    }
    let bits = value.to_bits();
    // Fibonacci hashing: the top bits of the product mix every input bit
    // (0.7 and 0.95 differ only in their high half).
    let index = (bits.wrapping_mul(0x9E37_79B9) >> 28) as usize;
    RECENT.with(|recent| {
        let mut table = recent.get();
        let (cached_bits, cached) = table[index];
        if cached_bits == bits && bits != 0 {
            return cached;
        }
        let decimal = value.to_string().parse().unwrap_or(wide);
        table[index] = (bits, decimal);
        recent.set(table);
        decimal
    })
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A child span id derived from the request span id (never zero, distinct
/// per `index`).
pub fn child_span_id(request_span_id: [u8; 8], index: u64) -> [u8; 8] {
    // splitmix64 finaliser: a bijection, so distinct inputs stay distinct.
    let mut z =
        u64::from_be_bytes(request_span_id).wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z == 0 { index.max(1) } else { z }.to_be_bytes()
}

/// The model name of a record (its index was checked by decode).
fn model_name<'a>(ctx: &'a SpanContext, record: &RequestRecord) -> &'a str {
    ctx.models
        .get(usize::from(record.model_index))
        .map_or("unknown", String::as_str)
}

/// `ScopeSpans.spans`.
const SCOPE_SPANS_SPAN: u32 = 2;

/// Field numbers of `opentelemetry.proto.trace.v1.Span` and `Status`.
mod field {
    pub(super) const TRACE_ID: u32 = 1;
    pub(super) const SPAN_ID: u32 = 2;
    pub(super) const TRACE_STATE: u32 = 3;
    pub(super) const PARENT_SPAN_ID: u32 = 4;
    pub(super) const NAME: u32 = 5;
    pub(super) const KIND: u32 = 6;
    pub(super) const START_TIME: u32 = 7;
    pub(super) const END_TIME: u32 = 8;
    pub(super) const ATTRIBUTES: u32 = 9;
    pub(super) const EVENTS: u32 = 11;
    pub(super) const EVENT_TIME: u32 = 1;
    pub(super) const EVENT_NAME: u32 = 2;
    pub(super) const EVENT_ATTRIBUTES: u32 = 3;
    pub(super) const STATUS: u32 = 15;
    pub(super) const FLAGS: u32 = 16;
    pub(super) const STATUS_MESSAGE: u32 = 2;
    pub(super) const STATUS_CODE: u32 = 3;
}

/// A short string built on the stack (response ids, status codes), so that
/// encoding a record allocates nothing but its output.
struct Short {
    buf: [u8; 48],
    len: usize,
}

impl Short {
    fn new() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for Short {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Lowercase hex of an id, as the engine prints ids.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut impl std::fmt::Write, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        let _ = out.write_char(char::from(DIGITS[usize::from(b >> 4)]));
        let _ = out.write_char(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

fn push_response_id(out: &mut impl std::fmt::Write, record: &RequestRecord) {
    let _ = out.write_str(match record.operation {
        Operation::Chat => "chatcmpl-",
        Operation::TextCompletion => "cmpl-",
    });
    push_hex(out, &record.request_id);
}

/// The `error.type` of a failed request whose record has no error class:
/// its HTTP status code.
fn status_code_text(record: &RequestRecord) -> Option<Short> {
    (record.error_type.as_str().is_none() && record.http_status >= 400).then(|| {
        let mut s = Short::new();
        let _ = write!(s, "{}", record.http_status);
        s
    })
}

/// Writes the request span's attributes (`Span.attributes`).
fn write_request_attributes(ctx: &SpanContext, record: &RequestRecord, buf: &mut Vec<u8>) {
    use wire::Value::{Double, Int, Str, StrArray};
    let mut a = |key: &str, value: wire::Value<'_>| {
        wire::key_value(buf, field::ATTRIBUTES, key, value);
    };
    let model = model_name(ctx, record);
    let s = &record.sampling;
    let mut response_id = Short::new();
    push_response_id(&mut response_id, record);
    // A crash record knows the token limit but not the sampling parameters:
    // those are left out rather than shown as zeros.
    let known = record.sampling_known();
    let shared = |a: &mut dyn FnMut(&str, wire::Value<'_>)| {
        a("gen_ai.request.model", Str(model));
        if known || s.max_tokens != 0 {
            a("gen_ai.request.max_tokens", Int(i64::from(s.max_tokens)));
        }
        if known {
            a("gen_ai.request.temperature", Double(param(s.temperature)));
            a("gen_ai.request.top_p", Double(param(s.top_p)));
        }
    };
    if ctx.attributes.semconv() {
        a("gen_ai.operation.name", Str(record.operation.as_str()));
        a("gen_ai.provider.name", Str(PROVIDER_NAME));
        shared(&mut a);
    }
    if ctx.attributes.semconv() && known {
        a("gen_ai.request.top_k", Int(i64::from(s.top_k)));
        // The seed is an opaque 64-bit value: keep its bits.
        a(
            "gen_ai.request.seed",
            Int(i64::from_ne_bytes(s.seed.to_ne_bytes())),
        );
        a(
            "gen_ai.request.frequency_penalty",
            Double(param(s.frequency_penalty)),
        );
        a(
            "gen_ai.request.presence_penalty",
            Double(param(s.presence_penalty)),
        );
    }
    if ctx.attributes.semconv() {
        a("gen_ai.response.id", Str(response_id.as_str()));
        a("gen_ai.response.model", Str(model));
        match record.finish_reason.as_str() {
            Some(r) => a("gen_ai.response.finish_reasons", StrArray(&[r])),
            None => a("gen_ai.response.finish_reasons", StrArray(&[])),
        }
        a(
            "gen_ai.usage.input_tokens",
            Int(i64::from(record.prompt_tokens)),
        );
        a(
            "gen_ai.usage.output_tokens",
            Int(i64::from(record.completion_tokens)),
        );
        a(
            "gen_ai.usage.cache_read.input_tokens",
            Int(i64::from(record.cached_prompt_tokens)),
        );
        a("server.address", Str(&ctx.server_address));
        if let Some(port) = ctx.server_port {
            a("server.port", Int(i64::from(port)));
        }
    }
    if ctx.attributes.vllm() {
        a("gen_ai.request.id", Str(response_id.as_str()));
        if !ctx.attributes.semconv() {
            shared(&mut a);
        }
        a(
            "gen_ai.usage.prompt_tokens",
            Int(i64::from(record.prompt_tokens)),
        );
        a(
            "gen_ai.usage.completion_tokens",
            Int(i64::from(record.completion_tokens)),
        );
        // Each latency only when its phase happened: a rejected request has no
        // queue time and a request aborted in prefill no time to first token;
        // a 0 there would pull every percentile down.
        a("gen_ai.latency.e2e", Double(secs(record.e2e_ns())));
        if let Some(ttft) = record.ttft_ns() {
            a("gen_ai.latency.time_to_first_token", Double(secs(ttft)));
        }
        if let Some(queue) = record.queue_ns() {
            a("gen_ai.latency.time_in_queue", Double(secs(queue)));
        }
        if let Some(prefill) = record.prefill_ns() {
            a(
                "gen_ai.latency.time_in_model_prefill",
                Double(secs(prefill)),
            );
        }
        if let Some(decode) = record.decode_ns() {
            a("gen_ai.latency.time_in_model_decode", Double(secs(decode)));
        }
        if let (Some(start), Some(end)) = (
            record.timestamps.scheduled_ns,
            record.timestamps.last_token_ns,
        ) {
            a(
                "gen_ai.latency.time_in_model_inference",
                Double(secs(end - start)),
            );
        }
    }
    if let Some(class) = record.error_type.as_str() {
        a("error.type", Str(class));
    } else if let Some(code) = status_code_text(record) {
        a("error.type", Str(code.as_str()));
    }
}

/// The `error.type` of a failed, aborted or rejected request.
pub fn error_type(record: &RequestRecord) -> Option<String> {
    if let Some(e) = record.error_type.as_str() {
        return Some(e.to_owned());
    }
    // An error status without a class: the status code is the type.
    (record.http_status >= 400).then(|| record.http_status.to_string())
}

/// The fields every span starts with, in tag order up to the name.
fn span_ids(
    buf: &mut Vec<u8>,
    trace_id: &[u8; 16],
    span_id: &[u8],
    trace_state: &str,
    parent: &[u8],
) {
    wire::bytes_field(buf, field::TRACE_ID, trace_id);
    wire::bytes_field(buf, field::SPAN_ID, span_id);
    wire::bytes_field(buf, field::TRACE_STATE, trace_state.as_bytes());
    wire::bytes_field(buf, field::PARENT_SPAN_ID, parent);
}

/// The span's `tracestate`: the OpenTelemetry entry with the threshold and
/// the caller's explicit randomness, or `None` when there is neither. At
/// most `ot=th:` + 14 + `;rv:` + 14 = 38 bytes, on the stack.
fn ot_tracestate(sampling: &SpanSampling, record: &RequestRecord) -> Option<Short> {
    let rv = record.ot.randomness;
    if sampling.threshold.is_none() && rv.is_none() {
        return None;
    }
    let mut s = Short::new();
    let mut separator = "ot=";
    if let Some(th) = sampling.threshold {
        let _ = write!(s, "{separator}th:{th}");
        separator = ";";
    }
    if let Some(rv) = rv {
        let _ = write!(s, "{separator}rv:{rv:014x}");
    }
    Some(s)
}

/// `sampling.priority`: a downstream sampler keeps spans that carry a
/// positive one.
pub const SAMPLING_PRIORITY: &str = "sampling.priority";

fn span_kind_and_times(buf: &mut Vec<u8>, kind: span::SpanKind, start: u64, end: u64) {
    wire::varint_field(buf, field::KIND, kind as u64);
    wire::fixed64_field(buf, field::START_TIME, start);
    wire::fixed64_field(buf, field::END_TIME, end);
}

/// `Span.status`, always present (an unset status is an empty message).
fn span_status(buf: &mut Vec<u8>, message: &str, code: status::StatusCode) {
    let code = code as u64;
    let len = if message.is_empty() {
        0
    } else {
        wire::field_len(message.len())
    } + if code == 0 {
        0
    } else {
        1 + wire::varint_len(code)
    };
    wire::len_prefix(buf, field::STATUS, len);
    wire::bytes_field(buf, field::STATUS_MESSAGE, message.as_bytes());
    wire::varint_field(buf, field::STATUS_CODE, code);
}

/// The number of spans [`encode`] writes for `record`.
pub fn span_count(record: &RequestRecord, detail: Detail) -> usize {
    let t = &record.timestamps;
    let phases = if detail == Detail::Phases {
        2 * usize::from(t.scheduled_ns.is_some())
            + usize::from(t.first_token_ns.is_some() && t.last_token_ns.is_some())
    } else {
        0
    };
    1 + phases
}

/// One span, written by `write` as the body of a `Span` message, appended to
/// `out` as a `ScopeSpans.spans` field.
fn span(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    wire::message(out, SCOPE_SPANS_SPAN, write);
}

/// Encodes one record's spans (request span first) onto `out`, each as a
/// `ScopeSpans.spans` field (so `out` may be the body of a `ScopeSpans`
/// being written); returns how many ([`span_count`]). The spans carry no
/// sampling marks but the sampled flag ([`encode_with`] has them).
pub fn encode(
    ctx: &SpanContext,
    record: &RequestRecord,
    detail: Detail,
    out: &mut Vec<u8>,
) -> usize {
    encode_with(ctx, record, detail, &SpanExtras::default(), out)
}

/// What the agent learnt about a request besides its record, for its spans.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpanExtras<'a> {
    /// Stalls seen in the in-flight table: `ringside.stalled` events.
    pub stalls: &'a [Stall],
    /// The sampling decision's marks.
    pub sampling: SpanSampling,
    /// Inter-token gaps and batch context from the engine's steps.
    pub steps: Option<&'a RequestSteps>,
    /// Why an incident capture exported it (`ringside.capture.reason`).
    pub capture_reason: Option<&'a str>,
}

/// `ringside.inter_token.max`: the request's largest gap between two output
/// tokens (seconds); with `.p50` and `.p99` (nearest rank).
pub const INTER_TOKEN_MAX: &str = "ringside.inter_token.max";
/// See [`INTER_TOKEN_MAX`].
pub const INTER_TOKEN_P50: &str = "ringside.inter_token.p50";
/// See [`INTER_TOKEN_MAX`].
pub const INTER_TOKEN_P99: &str = "ringside.inter_token.p99";
/// Steps that decoded one of the request's tokens and also computed other
/// requests' prompt tokens.
pub const BATCH_PREFILL_STEPS: &str = "ringside.batch.prefill_steps";
/// The prompt tokens those steps computed.
pub const BATCH_PREFILL_TOKENS: &str = "ringside.batch.prefill_tokens";
/// The span event at the moment the request got its sequence slot.
pub const SCHEDULED_EVENT: &str = "scheduled";
/// The span event at the moment its first output token was sampled.
pub const FIRST_TOKEN_EVENT: &str = "first_token";

fn write_step_attributes(steps: &RequestSteps, b: &mut Vec<u8>) {
    for (key, ns) in [
        (INTER_TOKEN_MAX, steps.gap_max_ns),
        (INTER_TOKEN_P50, steps.gap_p50_ns),
        (INTER_TOKEN_P99, steps.gap_p99_ns),
    ] {
        wire::key_value(b, field::ATTRIBUTES, key, wire::Value::Double(secs(ns)));
    }
    wire::key_value(
        b,
        field::ATTRIBUTES,
        BATCH_PREFILL_STEPS,
        wire::Value::Int(i64::from(steps.prefill_steps)),
    );
    wire::key_value(
        b,
        field::ATTRIBUTES,
        BATCH_PREFILL_TOKENS,
        wire::Value::Int(i64::try_from(steps.prefill_tokens).unwrap_or(i64::MAX)),
    );
}

fn write_phase_events(ctx: &SpanContext, record: &RequestRecord, b: &mut Vec<u8>) {
    let t = &record.timestamps;
    for (name, stamp) in [
        (SCHEDULED_EVENT, t.scheduled_ns),
        (FIRST_TOKEN_EVENT, t.first_token_ns),
    ] {
        if let Some(ns) = stamp {
            wire::message(b, field::EVENTS, |e| {
                wire::fixed64_field(e, field::EVENT_TIME, ctx.clock.to_unix_ns(ns));
                wire::bytes_field(e, field::EVENT_NAME, name.as_bytes());
            });
        }
    }
}

/// `ringside.capture.reason`: the span was exported by an incident capture
/// (`manual`, `engine_crashed`, `error_burst`, `ttft_p99`, `signal`).
pub const CAPTURE_REASON: &str = "ringside.capture.reason";

/// The `ringside.stalled` span event: when the stall began and how long it
/// lasted (`ringside.stall.duration`, seconds).
pub const STALLED_EVENT: &str = "ringside.stalled";

fn write_stall_events(ctx: &SpanContext, stalls: &[Stall], b: &mut Vec<u8>) {
    for stall in stalls {
        wire::message(b, field::EVENTS, |e| {
            wire::fixed64_field(e, field::EVENT_TIME, ctx.clock.to_unix_ns(stall.start_ns));
            wire::bytes_field(e, field::EVENT_NAME, STALLED_EVENT.as_bytes());
            wire::key_value(
                e,
                field::EVENT_ATTRIBUTES,
                "ringside.stall.duration",
                wire::Value::Double(secs(stall.duration_ns)),
            );
        });
    }
}

/// [`encode`], with what the agent adds ([`SpanExtras`]): a
/// `ringside.stalled` event on the request span for each stall, the
/// inter-token and batch attributes, the capture reason and the sampling
/// marks.
pub fn encode_with(
    ctx: &SpanContext,
    record: &RequestRecord,
    detail: Detail,
    extras: &SpanExtras<'_>,
    out: &mut Vec<u8>,
) -> usize {
    let sampling = &extras.sampling;
    let t = &record.timestamps;
    // Exported means sampled; the caller's other flags (random) go on.
    let trace_flags = u32::from(record.trace_flags | FLAG_SAMPLED);
    let trace_state = ot_tracestate(sampling, record);
    let trace_state = trace_state.as_ref().map_or("", Short::as_str);
    let priority = |b: &mut Vec<u8>| {
        if sampling.priority {
            wire::key_value(b, field::ATTRIBUTES, SAMPLING_PRIORITY, wire::Value::Int(1));
        }
    };
    let (parent, remote): (&[u8], u32) = match &record.parent_span_id {
        Some(p) => (p, FLAG_IS_REMOTE),
        None => (&[], 0),
    };
    let model = model_name(ctx, record);
    let mut count = 1;
    span(out, |b| {
        span_ids(b, &record.trace_id, &record.span_id, trace_state, parent);
        let operation = record.operation.as_str();
        wire::len_prefix(b, field::NAME, operation.len() + 1 + model.len());
        b.extend_from_slice(operation.as_bytes());
        b.push(b' ');
        b.extend_from_slice(model.as_bytes());
        span_kind_and_times(
            b,
            span::SpanKind::Server,
            ctx.clock.to_unix_ns(t.arrival_ns),
            ctx.clock.to_unix_ns(t.finished_ns),
        );
        write_request_attributes(ctx, record, b);
        if let Some(steps) = extras.steps {
            write_step_attributes(steps, b);
        }
        if let Some(reason) = extras.capture_reason {
            wire::key_value(
                b,
                field::ATTRIBUTES,
                CAPTURE_REASON,
                wire::Value::Str(reason),
            );
        }
        priority(b);
        write_phase_events(ctx, record, b);
        write_stall_events(ctx, extras.stalls, b);
        if let Some(class) = record.error_type.as_str() {
            span_status(b, class, status::StatusCode::Error);
        } else if let Some(code) = status_code_text(record) {
            span_status(b, code.as_str(), status::StatusCode::Error);
        } else {
            span_status(b, "", status::StatusCode::Unset);
        }
        wire::fixed32_field(b, field::FLAGS, trace_flags | FLAG_HAS_IS_REMOTE | remote);
    });
    if detail != Detail::Phases {
        return count;
    }
    let mut child = |index: u64, name: &str, start: u64, end: u64| {
        count += 1;
        span(out, |b| {
            span_ids(
                b,
                &record.trace_id,
                &child_span_id(record.span_id, index),
                trace_state,
                &record.span_id,
            );
            wire::bytes_field(b, field::NAME, name.as_bytes());
            span_kind_and_times(
                b,
                span::SpanKind::Internal,
                ctx.clock.to_unix_ns(start),
                ctx.clock.to_unix_ns(end),
            );
            if let Some(reason) = extras.capture_reason {
                wire::key_value(
                    b,
                    field::ATTRIBUTES,
                    CAPTURE_REASON,
                    wire::Value::Str(reason),
                );
            }
            priority(b);
            span_status(b, "", status::StatusCode::Unset);
            wire::fixed32_field(b, field::FLAGS, trace_flags | FLAG_HAS_IS_REMOTE);
        });
    };
    if let Some(scheduled) = t.scheduled_ns {
        child(1, "queue", t.arrival_ns, scheduled);
        child(
            2,
            "prefill",
            scheduled,
            t.first_token_ns.unwrap_or(t.finished_ns),
        );
    }
    if let (Some(first), Some(last)) = (t.first_token_ns, t.last_token_ns) {
        child(3, "decode", first, last);
    }
    count
}

/// One record's spans as `opentelemetry-proto` structs: [`encode`], decoded.
pub fn convert(ctx: &SpanContext, record: &RequestRecord, detail: Detail) -> Vec<Span> {
    let mut out = Vec::with_capacity(2048);
    encode(ctx, record, detail, &mut out);
    // What `encode` writes always decodes; an empty result would fail every
    // test (and console tree) that looks at it.
    ScopeSpans::decode(out.as_slice())
        .map(|s| s.spans)
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pipeline::resource::tests::attr;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use ringside_shm_protocol::{
        ErrorType, FinishReason, Record, RecordKind, Sampling, Timestamps, params,
    };

    /// A well-formed record, as the engine writes one.
    pub(crate) fn raw_record(seq: u64) -> Record {
        let mut trace_id = [0xab; 16];
        trace_id[0..8].copy_from_slice(&seq.to_be_bytes());
        let mut span_id = [0x22; 8];
        span_id[0..8].copy_from_slice(&(seq + 1).to_be_bytes());
        RequestRecord {
            kind: RecordKind::RequestFinished,
            operation: Operation::Chat,
            request_id: (u128::from(seq) + 1).to_be_bytes(),
            trace_id,
            parent_span_id: Some([0x11; 8]),
            span_id,
            trace_flags: 1,
            ot: Default::default(),
            timestamps: Timestamps {
                arrival_ns: 1_000_000_000,
                scheduled_ns: Some(1_250_000_000),
                first_token_ns: Some(1_500_000_000),
                last_token_ns: Some(2_500_000_000),
                finished_ns: 2_600_000_000,
            },
            prompt_tokens: 12,
            completion_tokens: 11,
            cached_prompt_tokens: 4,
            sampling: Sampling {
                max_tokens: 16,
                temperature: 0.0,
                top_p: 0.9,
                top_k: 40,
                seed: 7,
                frequency_penalty: 0.5,
                presence_penalty: -0.5,
            },
            params_set: params::TEMPERATURE | params::MAX_TOKENS,
            stream: true,
            finish_reason: FinishReason::Length,
            http_status: 200,
            error_type: ErrorType::None,
            model_index: 0,
            queue_depth: 0,
            running: 0,
            sequence_slot: Some(0),
        }
        .encode()
    }

    pub(crate) fn ctx(attributes: AttributeSet) -> SpanContext {
        SpanContext {
            clock: ClockPair {
                realtime_ns: 1_700_000_000_000_000_000,
                monotonic_ns: 1_000_000_000,
            },
            models: vec!["gemma".into()],
            attributes,
            server_address: "box".into(),
            server_port: Some(8080),
        }
    }

    fn spans_of(record: &Record, set: AttributeSet, detail: Detail) -> Vec<Span> {
        convert(&ctx(set), &record.decode(1).unwrap(), detail)
    }

    fn lower_hex(bytes: &[u8]) -> String {
        let mut s = String::new();
        push_hex(&mut s, bytes);
        s
    }

    #[test]
    fn request_span_carries_ids_name_kind_and_converted_times() {
        let spans = spans_of(&raw_record(5), AttributeSet::Both, Detail::Phases);
        let s = &spans[0];
        assert_eq!(s.name, "chat gemma");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        let mut trace = [0xab; 16];
        trace[0..8].copy_from_slice(&5u64.to_be_bytes());
        assert_eq!(s.trace_id, trace);
        assert_eq!(s.parent_span_id, [0x11; 8]);
        assert_eq!(s.span_id, 6u64.to_be_bytes());
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(s.end_time_unix_nano, 1_700_000_001_600_000_000);
        assert_eq!(s.flags, 1 | FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE);
        assert_eq!(
            s.status.as_ref().unwrap().code,
            status::StatusCode::Unset as i32
        );
    }

    #[test]
    fn phases_are_children_with_fresh_deterministic_ids() {
        let spans = spans_of(&raw_record(5), AttributeSet::Both, Detail::Phases);
        let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["chat gemma", "queue", "prefill", "decode"]);
        let base = 1_700_000_000_000_000_000u64;
        let bounds: Vec<_> = spans[1..]
            .iter()
            .map(|s| (s.start_time_unix_nano - base, s.end_time_unix_nano - base))
            .collect();
        assert_eq!(
            bounds,
            [
                (0, 250_000_000),
                (250_000_000, 500_000_000),
                (500_000_000, 1_500_000_000)
            ]
        );
        for child in &spans[1..] {
            assert_eq!(child.parent_span_id, spans[0].span_id);
            assert_eq!(child.trace_id, spans[0].trace_id);
            assert_eq!(child.kind, span::SpanKind::Internal as i32);
            assert_ne!(child.span_id, [0; 8]);
        }
        let mut ids: Vec<_> = spans.iter().map(|s| s.span_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            spans,
            spans_of(&raw_record(5), AttributeSet::Both, Detail::Phases)
        );
        assert_eq!(
            spans_of(&raw_record(5), AttributeSet::Both, Detail::Request).len(),
            1
        );
    }

    #[test]
    fn every_attribute_of_both_sets_with_zero_temperature() {
        let spans = spans_of(&raw_record(5), AttributeSet::Both, Detail::Request);
        let a = &spans[0].attributes;
        let s = |v: &str| Some(Value::StringValue(v.to_owned()));
        let id = format!("chatcmpl-{}", lower_hex(&6u128.to_be_bytes()));
        let expected: Vec<(&str, Option<Value>)> = vec![
            ("gen_ai.operation.name", s("chat")),
            ("gen_ai.provider.name", s("ringside")),
            ("gen_ai.request.model", s("gemma")),
            ("gen_ai.request.max_tokens", Some(Value::IntValue(16))),
            ("gen_ai.request.temperature", Some(Value::DoubleValue(0.0))),
            ("gen_ai.request.top_p", Some(Value::DoubleValue(0.9))),
            ("gen_ai.request.top_k", Some(Value::IntValue(40))),
            ("gen_ai.request.seed", Some(Value::IntValue(7))),
            (
                "gen_ai.request.frequency_penalty",
                Some(Value::DoubleValue(0.5)),
            ),
            (
                "gen_ai.request.presence_penalty",
                Some(Value::DoubleValue(-0.5)),
            ),
            ("gen_ai.response.id", s(&id)),
            ("gen_ai.response.model", s("gemma")),
            ("gen_ai.usage.input_tokens", Some(Value::IntValue(12))),
            ("gen_ai.usage.output_tokens", Some(Value::IntValue(11))),
            (
                "gen_ai.usage.cache_read.input_tokens",
                Some(Value::IntValue(4)),
            ),
            ("server.address", s("box")),
            ("server.port", Some(Value::IntValue(8080))),
            ("gen_ai.request.id", s(&id)),
            ("gen_ai.usage.prompt_tokens", Some(Value::IntValue(12))),
            ("gen_ai.usage.completion_tokens", Some(Value::IntValue(11))),
            ("gen_ai.latency.e2e", Some(Value::DoubleValue(1.6))),
            (
                "gen_ai.latency.time_to_first_token",
                Some(Value::DoubleValue(0.5)),
            ),
            (
                "gen_ai.latency.time_in_queue",
                Some(Value::DoubleValue(0.25)),
            ),
            (
                "gen_ai.latency.time_in_model_prefill",
                Some(Value::DoubleValue(0.25)),
            ),
            (
                "gen_ai.latency.time_in_model_decode",
                Some(Value::DoubleValue(1.0)),
            ),
            (
                "gen_ai.latency.time_in_model_inference",
                Some(Value::DoubleValue(1.25)),
            ),
        ];
        for (key, value) in &expected {
            assert_eq!(attr(a, key), value.as_ref(), "{key}");
        }
        match attr(a, "gen_ai.response.finish_reasons") {
            Some(Value::ArrayValue(arr)) => {
                assert_eq!(arr.values.len(), 1);
                assert_eq!(arr.values[0].value, s("length"));
            }
            other => panic!("finish_reasons: {other:?}"),
        }
        // Every key once, nothing unexpected (no error.type on success).
        assert_eq!(a.len(), expected.len() + 1);
        let mut keys: Vec<_> = a.iter().map(|kv| kv.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), a.len());
    }

    #[test]
    fn attribute_sets_are_selectable() {
        let semconv = &spans_of(&raw_record(1), AttributeSet::Semconv, Detail::Request)[0];
        assert!(attr(&semconv.attributes, "gen_ai.usage.input_tokens").is_some());
        assert!(attr(&semconv.attributes, "gen_ai.usage.prompt_tokens").is_none());
        assert!(attr(&semconv.attributes, "gen_ai.latency.e2e").is_none());
        let vllm = &spans_of(&raw_record(1), AttributeSet::Vllm, Detail::Request)[0];
        assert!(attr(&vllm.attributes, "gen_ai.usage.input_tokens").is_none());
        assert!(attr(&vllm.attributes, "gen_ai.provider.name").is_none());
        for key in [
            "gen_ai.request.model",
            "gen_ai.request.max_tokens",
            "gen_ai.request.temperature",
            "gen_ai.request.top_p",
            "gen_ai.usage.prompt_tokens",
            "gen_ai.latency.e2e",
        ] {
            assert!(attr(&vllm.attributes, key).is_some(), "{key}");
        }
        assert_eq!(
            attr(&vllm.attributes, "gen_ai.request.temperature"),
            Some(&Value::DoubleValue(0.0))
        );
    }

    #[test]
    fn a_rejected_request_is_an_error_span_with_error_type_and_no_children() {
        let mut r = raw_record(2);
        r.kind = RecordKind::RequestRejected as u8;
        r.error_type = ErrorType::QueueFull as u8;
        r.http_status = 429;
        r.t_scheduled_ns = 0;
        r.t_first_token_ns = 0;
        r.t_last_token_ns = 0;
        r.completion_tokens = 0;
        r.finish_reason = FinishReason::None as u8;
        r.flags = 0;
        let spans = spans_of(&r, AttributeSet::Both, Detail::Phases);
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        let status = s.status.as_ref().unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "queue_full");
        assert_eq!(
            attr(&s.attributes, "error.type"),
            Some(&Value::StringValue("queue_full".into()))
        );
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, 1 | FLAG_HAS_IS_REMOTE);
        // Phases that never happened get no latency (a 0 would skew percentiles).
        assert!(attr(&s.attributes, "gen_ai.latency.e2e").is_some());
        for phase in [
            "gen_ai.latency.time_in_queue",
            "gen_ai.latency.time_to_first_token",
            "gen_ai.latency.time_in_model_prefill",
            "gen_ai.latency.time_in_model_decode",
            "gen_ai.latency.time_in_model_inference",
        ] {
            assert_eq!(attr(&s.attributes, phase), None, "{phase}");
        }
        match attr(&s.attributes, "gen_ai.response.finish_reasons") {
            Some(Value::ArrayValue(arr)) => assert!(arr.values.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_request_without_error_class_uses_its_status_code() {
        let mut r = raw_record(3);
        r.http_status = 500;
        r.finish_reason = FinishReason::Error as u8;
        let spans = spans_of(&r, AttributeSet::Semconv, Detail::Phases);
        assert_eq!(
            attr(&spans[0].attributes, "error.type"),
            Some(&Value::StringValue("500".into()))
        );
        r.http_status = 200;
        r.error_type = ErrorType::ClientDisconnected as u8;
        r.finish_reason = FinishReason::Abort as u8;
        let spans = spans_of(&r, AttributeSet::Semconv, Detail::Phases);
        assert_eq!(
            spans[0].status.as_ref().unwrap().message,
            "client_disconnected"
        );
    }

    #[test]
    fn failed_before_first_token_has_prefill_to_finish_and_no_decode() {
        let mut r = raw_record(4);
        r.t_first_token_ns = 0;
        r.t_last_token_ns = 0;
        r.completion_tokens = 0;
        r.error_type = ErrorType::Internal as u8;
        r.http_status = 500;
        let spans = spans_of(&r, AttributeSet::Both, Detail::Phases);
        let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["chat gemma", "queue", "prefill"]);
        assert_eq!(spans[2].end_time_unix_nano, spans[0].end_time_unix_nano);
    }

    #[test]
    fn clock_conversion_uses_the_segment_pair() {
        let mut c = ctx(AttributeSet::Both);
        c.clock = ClockPair {
            realtime_ns: 5_000_000_000,
            monotonic_ns: 2_000_000_000,
        };
        let out = convert(&c, &raw_record(0).decode(1).unwrap(), Detail::Request);
        assert_eq!(out[0].start_time_unix_nano, 4_000_000_000);
        assert_eq!(out[0].end_time_unix_nano, 5_600_000_000);
    }

    #[test]
    fn text_completion_ids_and_names() {
        let mut r = raw_record(9);
        r.operation = Operation::TextCompletion as u8;
        let spans = spans_of(&r, AttributeSet::Both, Detail::Request);
        assert_eq!(spans[0].name, "text_completion gemma");
        assert_eq!(
            attr(&spans[0].attributes, "gen_ai.response.id"),
            Some(&Value::StringValue(format!(
                "cmpl-{}",
                lower_hex(&10u128.to_be_bytes())
            )))
        );
    }

    #[test]
    fn the_encoding_is_canonical_protobuf_for_every_kind_of_record() {
        let mut rejected = raw_record(2);
        rejected.kind = RecordKind::RequestRejected as u8;
        rejected.error_type = ErrorType::QueueFull as u8;
        rejected.http_status = 429;
        rejected.t_scheduled_ns = 0;
        rejected.t_first_token_ns = 0;
        rejected.t_last_token_ns = 0;
        rejected.completion_tokens = 0;
        rejected.finish_reason = FinishReason::None as u8;
        rejected.flags = 0;
        let mut status_only = raw_record(3);
        status_only.http_status = 500;
        let mut text = raw_record(4);
        text.operation = Operation::TextCompletion as u8;
        text.temperature = 0.7;
        text.seed = u64::MAX;
        let records = [raw_record(1), rejected, status_only, text];
        let mut long_name = ctx(AttributeSet::Both);
        long_name.models = vec!["m".repeat(200)];
        long_name.server_address = "a".repeat(300);
        long_name.server_port = None;
        let contexts = [
            ctx(AttributeSet::Both),
            ctx(AttributeSet::Vllm),
            ctx(AttributeSet::Semconv),
            long_name,
        ];
        let marks = [SpanSampling::default(), marked()];
        for (c, sampling) in contexts
            .iter()
            .flat_map(|c| marks.iter().map(move |m| (c, m)))
        {
            for detail in [Detail::Phases, Detail::Request] {
                // Several records in one buffer, as a batch holds them.
                let mut out = Vec::new();
                let (mut written, mut counted) = (0, 0);
                for record in &records {
                    let mut record = record.decode(1).unwrap();
                    if sampling.priority {
                        record.ot.randomness = Some(0x6e_6d1a_7583_2a2f);
                    }
                    written += encode_with(
                        c,
                        &record,
                        detail,
                        &SpanExtras {
                            sampling: *sampling,
                            ..SpanExtras::default()
                        },
                        &mut out,
                    );
                    counted += span_count(&record, detail);
                }
                let spans = ScopeSpans::decode(out.as_slice()).unwrap().spans;
                assert_eq!((spans.len(), written), (counted, counted));
                // prost writes fields in tag order, omits proto3 defaults and
                // uses the shortest varints: the same bytes mean we do too.
                let reencoded = ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }
                .encode_to_vec();
                assert_eq!(reencoded, out, "{:?} {detail:?}", c.attributes);
            }
        }
    }

    /// Kept at 25% by a caller with an explicit rv, then by a tail rule.
    fn marked() -> SpanSampling {
        use crate::pipeline::sampling::Threshold;
        SpanSampling {
            threshold: Threshold::from_value(0xc0_0000_0000_0000),
            priority: true,
        }
    }

    #[test]
    fn every_span_carries_the_sampling_marks_and_the_sampled_flag() {
        let mut record = raw_record(1).decode(1).unwrap();
        // The caller's random flag, not sampled (a traceidratio keep), and
        // its explicit randomness.
        record.trace_flags = 0x02;
        record.ot.randomness = Some(0x6e_6d1a_7583_2a2f);
        let c = ctx(AttributeSet::Both);
        let mut out = Vec::new();
        encode_with(
            &c,
            &record,
            Detail::Phases,
            &SpanExtras {
                sampling: marked(),
                ..SpanExtras::default()
            },
            &mut out,
        );
        let spans = ScopeSpans::decode(out.as_slice()).unwrap().spans;
        assert_eq!(spans.len(), 4);
        for span in &spans {
            assert_eq!(
                span.trace_state, "ot=th:c;rv:6e6d1a75832a2f",
                "{}",
                span.name
            );
            assert_eq!(span.flags & 0xff, 0x03, "{}", span.name);
            let priority = span
                .attributes
                .iter()
                .find(|kv| kv.key == SAMPLING_PRIORITY);
            assert_eq!(
                priority
                    .and_then(|kv| kv.value.clone())
                    .and_then(|v| v.value),
                Some(Value::IntValue(1)),
                "{}",
                span.name
            );
        }
        // th:0 alone, no rv, no priority.
        record.ot.randomness = None;
        let kept_all = SpanSampling {
            threshold: Some(crate::pipeline::sampling::Threshold::ALWAYS),
            ..SpanSampling::default()
        };
        let mut out = Vec::new();
        encode_with(
            &c,
            &record,
            Detail::Request,
            &SpanExtras {
                sampling: kept_all,
                ..SpanExtras::default()
            },
            &mut out,
        );
        let span = &ScopeSpans::decode(out.as_slice()).unwrap().spans[0];
        assert_eq!(span.trace_state, "ot=th:0");
        assert!(span.attributes.iter().all(|kv| kv.key != SAMPLING_PRIORITY));
        // The caller's rv goes out whatever the marks.
        record.ot.randomness = Some(0x6e_6d1a_7583_2a2f);
        let mut out = Vec::new();
        encode(&c, &record, Detail::Request, &mut out);
        let span = &ScopeSpans::decode(out.as_slice()).unwrap().spans[0];
        assert_eq!(span.trace_state, "ot=rv:6e6d1a75832a2f");
        // Nothing known: no tracestate at all.
        record.ot.randomness = None;
        let mut out = Vec::new();
        encode(&c, &record, Detail::Request, &mut out);
        assert_eq!(
            ScopeSpans::decode(out.as_slice()).unwrap().spans[0].trace_state,
            ""
        );
    }

    #[test]
    fn parameters_keep_the_decimal_the_caller_wrote() {
        for _ in 0..3 {
            assert_eq!(param(0.95), 0.95);
            assert_eq!(param(0.7), 0.7);
            assert_eq!(param(-0.5), -0.5);
            assert_eq!(param(0.0), 0.0);
            assert_eq!(param(2.0), 2.0);
            assert_eq!(param(1e-7), 1e-7);
        }
    }

    #[test]
    fn child_ids_differ_from_each_other_and_are_never_zero() {
        for id in [[0u8; 8], [0xff; 8], 1u64.to_be_bytes()] {
            let ids: Vec<_> = (1..=3).map(|i| child_span_id(id, i)).collect();
            assert!(ids.iter().all(|i| *i != [0; 8]));
            assert_ne!(ids[0], ids[1]);
            assert_ne!(ids[1], ids[2]);
        }
    }
}
