//! One validated record → OTLP spans: a SERVER span per request named
//! `{gen_ai.operation.name} {gen_ai.request.model}`, and with phase detail the
//! INTERNAL children `queue`, `prefill` and `decode`.
//!
//! Timestamps are the engine's monotonic stamps converted with the segment's
//! clock pair. The trace id, the caller's parent span id and the request's
//! span id come from the record; child span ids are derived from the request
//! span id, so converting a record twice gives identical spans.

use crate::config::AttributeSet;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};
use ringside_shm_protocol::{ClockPair, Detail, Operation, RequestRecord};
use std::fmt::Write as _;

/// `gen_ai.provider.name` of every span.
pub const PROVIDER_NAME: &str = "ringside";

/// OTLP span flag: the IS_REMOTE bit below is meaningful.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// OTLP span flag: the parent is remote.
const FLAG_IS_REMOTE: u32 = 0x200;

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
    let index = ((bits ^ (bits >> 16)) & 15) as usize;
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

/// The response id the engine returned to the client (`chatcmpl-<hex>` or
/// `cmpl-<hex>`).
pub fn response_id(record: &RequestRecord) -> String {
    let mut id = String::with_capacity(41);
    push_response_id(&mut id, record);
    id
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

/// Spans handed back by the exporter after sending, reused by the converter
/// so that a steady stream of requests converts without allocating: the
/// attribute keys and string buffers of a recycled span are overwritten in
/// place. Bounded; spans beyond the bound are freed.
#[derive(Debug)]
pub struct SpanPool {
    spans: std::sync::Mutex<Vec<Span>>,
    max: usize,
}

impl SpanPool {
    /// A pool keeping at most `max` spans.
    pub fn new(max: usize) -> Self {
        Self {
            spans: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Span>> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes up to `n` recycled spans into `out`.
    pub fn take_into(&self, n: usize, out: &mut Vec<Span>) {
        let mut spans = self.lock();
        let keep = spans.len().saturating_sub(n);
        out.extend(spans.drain(keep..));
    }

    /// Gives spans back (beyond the bound they are dropped).
    pub fn give(&self, spans: impl IntoIterator<Item = Span>) {
        let mut pool = self.lock();
        let room = self.max.saturating_sub(pool.len());
        pool.extend(spans.into_iter().take(room));
    }

    /// Spans held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes attributes into a (possibly recycled) vector in order, reusing
/// keys and string buffers that are already there.
struct Attrs<'a> {
    attrs: &'a mut Vec<KeyValue>,
    n: usize,
}

impl<'a> Attrs<'a> {
    fn new(attrs: &'a mut Vec<KeyValue>) -> Self {
        Self { attrs, n: 0 }
    }

    fn slot(&mut self, key: &str) -> &mut Option<any_value::Value> {
        if self.n == self.attrs.len() {
            self.attrs.push(KeyValue {
                key: key.to_owned(),
                value: Some(AnyValue { value: None }),
                ..KeyValue::default()
            });
        }
        let kv = &mut self.attrs[self.n];
        self.n += 1;
        if kv.key != key {
            kv.key.clear();
            kv.key.push_str(key);
        }
        &mut kv.value.get_or_insert(AnyValue { value: None }).value
    }

    /// Sets a string attribute, written by `fill` into a cleared buffer
    /// (the recycled one when there is one).
    fn string_with(&mut self, key: &str, fill: impl FnOnce(&mut String)) {
        let slot = self.slot(key);
        let mut buf = match slot.take() {
            Some(any_value::Value::StringValue(s)) => s,
            _ => String::new(),
        };
        buf.clear();
        fill(&mut buf);
        *slot = Some(any_value::Value::StringValue(buf));
    }

    fn str(&mut self, key: &str, value: &str) {
        self.string_with(key, |s| s.push_str(value));
    }

    fn int(&mut self, key: &str, value: i64) {
        *self.slot(key) = Some(any_value::Value::IntValue(value));
    }

    fn f64(&mut self, key: &str, value: f64) {
        *self.slot(key) = Some(any_value::Value::DoubleValue(value));
    }

    fn str_array(&mut self, key: &str, values: &[&str]) {
        let slot = self.slot(key);
        if !matches!(slot, Some(any_value::Value::ArrayValue(_))) {
            *slot = Some(any_value::Value::ArrayValue(ArrayValue {
                values: Vec::new(),
            }));
        }
        if let Some(any_value::Value::ArrayValue(arr)) = slot {
            arr.values.truncate(values.len());
            for (i, v) in values.iter().enumerate() {
                if i == arr.values.len() {
                    arr.values.push(AnyValue { value: None });
                }
                match &mut arr.values[i].value {
                    Some(any_value::Value::StringValue(s)) => {
                        s.clear();
                        s.push_str(v);
                    }
                    other => *other = Some(any_value::Value::StringValue((*v).to_owned())),
                }
            }
        }
    }

    fn finish(self) {
        self.attrs.truncate(self.n);
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

fn push_response_id(out: &mut String, record: &RequestRecord) {
    out.push_str(match record.operation {
        Operation::Chat => "chatcmpl-",
        Operation::TextCompletion => "cmpl-",
    });
    push_hex(out, &record.request_id);
}

/// The request span's attributes.
pub fn request_attributes(ctx: &SpanContext, record: &RequestRecord) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(40);
    write_request_attributes(ctx, record, &mut attrs);
    attrs
}

/// Writes the request span's attributes into `attrs`, reusing what it holds.
fn write_request_attributes(ctx: &SpanContext, record: &RequestRecord, attrs: &mut Vec<KeyValue>) {
    let model = model_name(ctx, record);
    let s = &record.sampling;
    let mut a = Attrs::new(attrs);
    let shared = |a: &mut Attrs<'_>| {
        a.str("gen_ai.request.model", model);
        a.int("gen_ai.request.max_tokens", i64::from(s.max_tokens));
        a.f64("gen_ai.request.temperature", param(s.temperature));
        a.f64("gen_ai.request.top_p", param(s.top_p));
    };
    if ctx.attributes.semconv() {
        a.str("gen_ai.operation.name", record.operation.as_str());
        a.str("gen_ai.provider.name", PROVIDER_NAME);
        shared(&mut a);
        a.int("gen_ai.request.top_k", i64::from(s.top_k));
        // The seed is an opaque 64-bit value: keep its bits.
        a.int(
            "gen_ai.request.seed",
            i64::from_ne_bytes(s.seed.to_ne_bytes()),
        );
        a.f64(
            "gen_ai.request.frequency_penalty",
            param(s.frequency_penalty),
        );
        a.f64("gen_ai.request.presence_penalty", param(s.presence_penalty));
        a.string_with("gen_ai.response.id", |s| push_response_id(s, record));
        a.str("gen_ai.response.model", model);
        match record.finish_reason.as_str() {
            Some(r) => a.str_array("gen_ai.response.finish_reasons", &[r]),
            None => a.str_array("gen_ai.response.finish_reasons", &[]),
        }
        a.int("gen_ai.usage.input_tokens", i64::from(record.prompt_tokens));
        a.int(
            "gen_ai.usage.output_tokens",
            i64::from(record.completion_tokens),
        );
        a.int(
            "gen_ai.usage.cache_read.input_tokens",
            i64::from(record.cached_prompt_tokens),
        );
        a.str("server.address", &ctx.server_address);
        if let Some(port) = ctx.server_port {
            a.int("server.port", i64::from(port));
        }
    }
    if ctx.attributes.vllm() {
        a.string_with("gen_ai.request.id", |s| push_response_id(s, record));
        if !ctx.attributes.semconv() {
            shared(&mut a);
        }
        a.int(
            "gen_ai.usage.prompt_tokens",
            i64::from(record.prompt_tokens),
        );
        a.int(
            "gen_ai.usage.completion_tokens",
            i64::from(record.completion_tokens),
        );
        // Each latency only when its phase happened: a rejected request has no
        // queue time and a request aborted in prefill no time to first token;
        // a 0 there would pull every percentile down.
        a.f64("gen_ai.latency.e2e", secs(record.e2e_ns()));
        if let Some(ttft) = record.ttft_ns() {
            a.f64("gen_ai.latency.time_to_first_token", secs(ttft));
        }
        if let Some(queue) = record.queue_ns() {
            a.f64("gen_ai.latency.time_in_queue", secs(queue));
        }
        if let Some(prefill) = record.prefill_ns() {
            a.f64("gen_ai.latency.time_in_model_prefill", secs(prefill));
        }
        if let Some(decode) = record.decode_ns() {
            a.f64("gen_ai.latency.time_in_model_decode", secs(decode));
        }
        if let (Some(start), Some(end)) = (
            record.timestamps.scheduled_ns,
            record.timestamps.last_token_ns,
        ) {
            a.f64("gen_ai.latency.time_in_model_inference", secs(end - start));
        }
    }
    if let Some(class) = record.error_type.as_str() {
        a.str("error.type", class);
    } else if record.http_status >= 400 {
        a.string_with("error.type", |s| {
            let _ = write!(s, "{}", record.http_status);
        });
    }
    a.finish();
}

/// The `error.type` of a failed, aborted or rejected request.
pub fn error_type(record: &RequestRecord) -> Option<String> {
    if let Some(e) = record.error_type.as_str() {
        return Some(e.to_owned());
    }
    // An error status without a class: the status code is the type.
    (record.http_status >= 400).then(|| record.http_status.to_string())
}

fn set_bytes(dst: &mut Vec<u8>, src: &[u8]) {
    dst.clear();
    dst.extend_from_slice(src);
}

fn fill_span(
    span: &mut Span,
    trace_id: &[u8; 16],
    span_id: &[u8],
    parent: &[u8],
    flags: u32,
    kind: span::SpanKind,
    start_end: (u64, u64),
) {
    set_bytes(&mut span.trace_id, trace_id);
    set_bytes(&mut span.span_id, span_id);
    set_bytes(&mut span.parent_span_id, parent);
    span.trace_state.clear();
    span.flags = flags;
    span.kind = kind as i32;
    span.start_time_unix_nano = start_end.0;
    span.end_time_unix_nano = start_end.1;
    span.dropped_attributes_count = 0;
    span.events.clear();
    span.dropped_events_count = 0;
    span.links.clear();
    span.dropped_links_count = 0;
}

/// Converts one record into its spans (request span first), appended to `out`.
pub fn convert(ctx: &SpanContext, record: &RequestRecord, detail: Detail, out: &mut Vec<Span>) {
    convert_reusing(ctx, record, detail, &mut Vec::new(), out);
}

/// [`convert`], taking spans to overwrite from `spare` (recycled ones) before
/// allocating new ones.
pub fn convert_reusing(
    ctx: &SpanContext,
    record: &RequestRecord,
    detail: Detail,
    spare: &mut Vec<Span>,
    out: &mut Vec<Span>,
) {
    let t = &record.timestamps;
    let trace_flags = u32::from(record.trace_flags);
    let (parent, remote): (&[u8], u32) = match &record.parent_span_id {
        Some(p) => (p, FLAG_IS_REMOTE),
        None => (&[], 0),
    };
    let model = model_name(ctx, record);
    let mut root = spare.pop().unwrap_or_default();
    fill_span(
        &mut root,
        &record.trace_id,
        &record.span_id,
        parent,
        trace_flags | FLAG_HAS_IS_REMOTE | remote,
        span::SpanKind::Server,
        (
            ctx.clock.to_unix_ns(t.arrival_ns),
            ctx.clock.to_unix_ns(t.finished_ns),
        ),
    );
    root.name.clear();
    root.name.push_str(record.operation.as_str());
    root.name.push(' ');
    root.name.push_str(model);
    write_request_attributes(ctx, record, &mut root.attributes);
    let status = root.status.get_or_insert_with(Status::default);
    status.message.clear();
    if let Some(class) = record.error_type.as_str() {
        status.message.push_str(class);
        status.code = status::StatusCode::Error as i32;
    } else if record.http_status >= 400 {
        let _ = write!(status.message, "{}", record.http_status);
        status.code = status::StatusCode::Error as i32;
    } else {
        status.code = status::StatusCode::Unset as i32;
    }
    out.push(root);
    if detail != Detail::Phases {
        return;
    }
    let mut child = |index: u64, name: &str, start: u64, end: u64| {
        let mut span = spare.pop().unwrap_or_default();
        fill_span(
            &mut span,
            &record.trace_id,
            &child_span_id(record.span_id, index),
            &record.span_id,
            trace_flags | FLAG_HAS_IS_REMOTE,
            span::SpanKind::Internal,
            (ctx.clock.to_unix_ns(start), ctx.clock.to_unix_ns(end)),
        );
        span.name.clear();
        span.name.push_str(name);
        span.attributes.clear();
        let status = span.status.get_or_insert_with(Status::default);
        status.message.clear();
        status.code = status::StatusCode::Unset as i32;
        out.push(span);
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::resource::tests::attr;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use ringside_shm_protocol::{
        ErrorType, FLAG_REMOTE_PARENT, FLAG_STREAM, FinishReason, Record, RecordKind, params,
    };

    /// A well-formed record, as the engine writes one.
    pub(crate) fn raw_record(seq: u64) -> Record {
        let mut r: Record = bytemuck::Zeroable::zeroed();
        r.request_id = (u128::from(seq) + 1).to_be_bytes();
        r.trace_id = [0xab; 16];
        r.trace_id[0..8].copy_from_slice(&seq.to_be_bytes());
        r.parent_span_id = [0x11; 8];
        r.span_id = [0x22; 8];
        r.span_id[0..8].copy_from_slice(&(seq + 1).to_be_bytes());
        r.t_arrival_ns = 1_000_000_000;
        r.t_scheduled_ns = 1_250_000_000;
        r.t_first_token_ns = 1_500_000_000;
        r.t_last_token_ns = 2_500_000_000;
        r.t_finished_ns = 2_600_000_000;
        r.seed = 7;
        r.prompt_tokens = 12;
        r.completion_tokens = 11;
        r.cached_prompt_tokens = 4;
        r.max_tokens = 16;
        r.temperature = 0.0;
        r.top_p = 0.9;
        r.top_k = 40;
        r.frequency_penalty = 0.5;
        r.presence_penalty = -0.5;
        r.http_status = 200;
        r.kind = RecordKind::RequestFinished as u8;
        r.operation = Operation::Chat as u8;
        r.finish_reason = FinishReason::Length as u8;
        r.trace_flags = 1;
        r.flags = FLAG_STREAM | FLAG_REMOTE_PARENT;
        r.params_set = params::TEMPERATURE | params::MAX_TOKENS;
        r
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
        let mut out = Vec::new();
        convert(&ctx(set), &record.decode(1).unwrap(), detail, &mut out);
        out
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
        let mut out = Vec::new();
        convert(
            &c,
            &raw_record(0).decode(1).unwrap(),
            Detail::Request,
            &mut out,
        );
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
    fn converting_into_recycled_spans_equals_converting_fresh() {
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
        let records = [raw_record(1), rejected, status_only, text];
        let sets = [
            AttributeSet::Both,
            AttributeSet::Vllm,
            AttributeSet::Semconv,
        ];
        let details = [Detail::Phases, Detail::Request];
        // Every conversion's spans are recycled into the next one.
        let mut spare = Vec::new();
        for set in sets {
            for detail in details {
                for record in &records {
                    let decoded = record.decode(1).unwrap();
                    let mut fresh = Vec::new();
                    convert(&ctx(set), &decoded, detail, &mut fresh);
                    let mut reused = Vec::new();
                    convert_reusing(&ctx(set), &decoded, detail, &mut spare, &mut reused);
                    assert_eq!(reused, fresh, "{set:?} {detail:?} {record:?}");
                    spare.extend(reused);
                    spare.reverse();
                }
            }
        }
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
    fn the_pool_is_bounded() {
        let pool = SpanPool::new(3);
        pool.give((0..10).map(|_| Span::default()));
        assert_eq!(pool.len(), 3);
        let mut out = Vec::new();
        pool.take_into(2, &mut out);
        assert_eq!((out.len(), pool.len()), (2, 1));
        pool.take_into(5, &mut out);
        assert!(pool.is_empty());
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
