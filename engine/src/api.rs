//! The HTTP API (axum): OpenAI-compatible completions, models, health and metrics.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use llama_cpp_2::token::LlamaToken;

use crate::admission::{GateError, PromptBound, WorkGate};
use crate::clock::now_ns;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::openai::{ApiError, GenerationRequest, PromptInput, parse_request};
use crate::scheduler::{Event, Job, SchedulerHandle, SubmitError, TraceIds, Usage};
use crate::telemetry::rejections::RejectionLimiter;
use crate::telemetry::{
    FinishReason, Operation, OutcomeKind, RequestOutcome, SamplingRecord, Telemetry,
};
use crate::trace_context::{TraceContext, hex};

/// What the API serves once the model is loaded.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The model (tokenizer, chat template).
    pub model: Arc<Model>,
    /// The inference thread.
    pub scheduler: SchedulerHandle,
    /// How few tokens a prompt of so many bytes can be (checked before tokenizing).
    pub prompt_bound: PromptBound,
}

/// Shared state of all handlers.
#[derive(Debug)]
pub struct AppState {
    /// Served model names; the first is the canonical one.
    pub model_names: Vec<String>,
    /// Bearer key required on /v1/*.
    pub api_key: Option<String>,
    /// Body size cap.
    pub max_request_bytes: usize,
    /// Time the whole body may take to arrive (`--body-read-timeout`).
    pub body_read_timeout: std::time::Duration,
    /// Queue bound (for messages).
    pub max_queue: usize,
    /// Counters and gauges.
    pub metrics: Arc<Metrics>,
    /// Request outcome sink.
    pub telemetry: Telemetry,
    /// Set once loading is done.
    pub ready: OnceLock<Ready>,
    /// Unix seconds at start (`created` of /v1/models).
    pub started_unix: u64,
    /// Per-cause rate limit on rejection records.
    pub rejections: Arc<RejectionLimiter>,
    /// Tokenizing off the async workers, a bounded number at once.
    pub tokenizer: WorkGate,
    /// Parsing large bodies (and rendering their chats) off the async workers, a bounded
    /// number at once.
    pub parser: WorkGate,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.get().is_some() {
        (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let name = state.model_names.first().map_or("", String::as_str);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(name, &state.rejections),
    )
        .into_response()
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = state.api_key.as_deref() else {
        return true;
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.splitn(2, ' ');
    let scheme = parts.next().unwrap_or("");
    let token = parts.next().unwrap_or("").trim();
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(token.as_bytes(), key.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return ApiError::unauthorized().into_response();
    }
    let Some(ready) = state.ready.get() else {
        return ApiError::unavailable("The model is still loading").into_response();
    };
    let data: Vec<Value> = state
        .model_names
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": state.started_unix,
                "owned_by": "ringside",
                "root": ready.model.path.display().to_string(),
                "max_model_len": ready.scheduler.n_ctx_seq,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    generate(state, Operation::Chat, request).await
}

async fn completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    generate(state, Operation::TextCompletion, request).await
}

/// What is known about a request before it is admitted, for recording a rejection.
struct Pending {
    operation: Operation,
    request_id: [u8; 16],
    trace: TraceContext,
    t_arrival_ns: u64,
    queue_depth: u16,
    stream: bool,
    model_index: u16,
    prompt_tokens: u32,
    sampling: SamplingRecord,
}

impl Pending {
    /// Answers `error`, recording it unless its cause is over the rejection-record rate.
    fn reject(&self, state: &AppState, error: ApiError) -> Response {
        let t_finished_ns = now_ns().max(self.t_arrival_ns);
        if state.rejections.admit(error.kind, t_finished_ns) {
            self.record(state, &error, t_finished_ns);
        }
        state
            .metrics
            .count_request(self.operation, error.status.as_u16());
        let queue_full = error.status == StatusCode::TOO_MANY_REQUESTS;
        let mut response = error.into_response();
        if queue_full {
            // A slot frees within a generation's time; a second is a polite first retry.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Ok(v) = HeaderValue::from_str(&hex(&self.request_id)) {
            response.headers_mut().insert("x-request-id", v);
        }
        response
    }

    fn record(&self, state: &AppState, error: &ApiError, t_finished_ns: u64) {
        let outcome = RequestOutcome {
            kind: OutcomeKind::Rejected,
            operation: self.operation,
            request_id: self.request_id,
            trace_id: self.trace.trace_id,
            parent_span_id: self.trace.parent_span_id,
            trace_flags: self.trace.trace_flags,
            ot: self.trace.ot,
            span_id: self.trace.span_id,
            t_arrival_ns: self.t_arrival_ns,
            t_scheduled_ns: 0,
            t_first_token_ns: 0,
            t_last_token_ns: 0,
            t_finished_ns,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            sampling: self.sampling,
            stream: self.stream,
            finish_reason: FinishReason::None,
            http_status: error.status.as_u16(),
            error: error.kind,
            model_index: self.model_index,
            queue_depth: self.queue_depth,
            running: 0,
            sequence_slot: None,
        };
        state.telemetry.record(&outcome);
    }
}

fn new_request_id() -> [u8; 16] {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn saturate_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

enum BodyError {
    TooLarge,
    Read(String),
}

async fn read_body(body: Body, limit: usize, declared: usize) -> Result<Vec<u8>, BodyError> {
    // Sized once from content-length (at most the limit): no copies as it grows.
    let mut out = Vec::with_capacity(declared.min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn sampling_of(req: &GenerationRequest) -> SamplingRecord {
    SamplingRecord {
        max_tokens: req.max_tokens.unwrap_or(0),
        temperature: req.sampling.temperature,
        top_p: req.sampling.top_p,
        top_k: req.sampling.top_k,
        seed: req.sampling.seed.unwrap_or(0),
        frequency_penalty: req.sampling.frequency_penalty,
        presence_penalty: req.sampling.presence_penalty,
        params_set: req.params_set,
    }
}

async fn generate(state: Arc<AppState>, operation: Operation, request: Request) -> Response {
    let t_arrival_ns = now_ns();
    let (parts, body) = request.into_parts();
    let queue_depth = state
        .ready
        .get()
        .map_or(0, |r| saturate_u16(r.scheduler.queue_depth()));
    let mut pending = Pending {
        operation,
        request_id: new_request_id(),
        // Only an authenticated caller's traceparent is adopted: an unauthenticated one must
        // not put error spans into traces it names.
        trace: TraceContext::new_root(),
        t_arrival_ns,
        queue_depth,
        stream: false,
        model_index: 0,
        prompt_tokens: 0,
        sampling: SamplingRecord::default(),
    };

    if !authorized(&state, &parts.headers) {
        return pending.reject(&state, ApiError::unauthorized());
    }
    pending.trace = TraceContext::from_headers(&parts.headers);
    let Some(ready) = state.ready.get() else {
        return pending.reject(&state, ApiError::unavailable("The model is still loading"));
    };
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_len.is_some_and(|n| n > state.max_request_bytes) {
        return pending.reject(&state, ApiError::payload_too_large(state.max_request_bytes));
    }
    // A slow upload holds a connection as a slow head does: bounded the same way.
    let read = tokio::time::timeout(
        state.body_read_timeout,
        read_body(body, state.max_request_bytes, declared_len.unwrap_or(0)),
    );
    let Ok(read) = read.await else {
        return pending.reject(&state, ApiError::body_timeout(state.body_read_timeout));
    };
    let bytes = match read {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return pending.reject(&state, ApiError::payload_too_large(state.max_request_bytes));
        }
        Err(BodyError::Read(e)) => {
            return pending.reject(
                &state,
                ApiError::invalid_body(format!("Could not read the body: {e}")),
            );
        }
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let large = bytes.len() > INLINE_WORK_BYTES;
    // The raw body goes with the parse: it is not kept while the prompt waits for the
    // tokenizer or a slot.
    let parsed = off_the_workers(&state.parser, large, move || {
        parse_request(operation, content_type.as_deref(), &bytes)
    })
    .await;
    let mut req = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err((e, view))) => {
            pending.stream = view.stream;
            return pending.reject(&state, e);
        }
        Err(e) => return pending.reject(&state, e),
    };
    pending.stream = req.stream;
    pending.sampling = sampling_of(&req);

    let model_index = match req.model.as_deref() {
        None | Some("") => 0,
        Some(name) => match state.model_names.iter().position(|n| n == name) {
            Some(i) => i,
            None => return pending.reject(&state, ApiError::model_not_found(name)),
        },
    };
    pending.model_index = saturate_u16(model_index);
    let model_name = state
        .model_names
        .get(model_index)
        .cloned()
        .unwrap_or_default();

    let prompt_param = match req.prompt {
        PromptInput::Chat(_) => "messages",
        PromptInput::Text(_) | PromptInput::Tokens(_) => "prompt",
    };
    let prompt = std::mem::replace(&mut req.prompt, PromptInput::Tokens(Vec::new()));
    let tokens = match prompt_tokens(&state, ready, prompt, prompt_param, large).await {
        Ok(t) => t,
        Err(e) => return pending.reject(&state, e),
    };
    pending.prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    let n_ctx = ready.scheduler.n_ctx_seq;
    if tokens.is_empty() {
        return pending.reject(
            &state,
            ApiError::invalid_param(prompt_param, "The prompt is empty"),
        );
    }
    if tokens.len() >= n_ctx as usize {
        return pending.reject(
            &state,
            ApiError::context_length(prompt_param, tokens.len(), n_ctx),
        );
    }

    let (tx, rx) = unbounded_channel();
    let job = Job {
        request_id: pending.request_id,
        operation,
        trace: TraceIds {
            trace_id: pending.trace.trace_id,
            parent_span_id: pending.trace.parent_span_id,
            trace_flags: pending.trace.trace_flags,
            span_id: pending.trace.span_id,
            ot: pending.trace.ot,
        },
        t_arrival_ns,
        queue_depth_at_arrival: queue_depth,
        prompt: tokens,
        sampling: req.sampling,
        max_tokens: req.max_tokens,
        params_set: req.params_set,
        stop: req.stop.clone(),
        stream: req.stream,
        model_index: pending.model_index,
        events: tx,
        inflight: None,
    };
    match ready.scheduler.submit(job) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => {
            return pending.reject(&state, ApiError::queue_full(state.max_queue));
        }
        Err(SubmitError::Stopped) => {
            return pending.reject(&state, ApiError::unavailable("The engine is shutting down"));
        }
    }

    let meta = ResponseMeta {
        operation,
        id: format!(
            "{}-{}",
            match operation {
                Operation::Chat => "chatcmpl",
                Operation::TextCompletion => "cmpl",
            },
            hex(&pending.request_id)
        ),
        created: unix_now(),
        model: model_name,
        include_usage: req.include_usage,
    };
    let mut response = if req.stream {
        stream_response(meta, rx)
    } else {
        full_response(meta, rx).await
    };
    if let Ok(v) = HeaderValue::from_str(&hex(&pending.request_id)) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Bodies up to this size are parsed (and their chats rendered) on the async worker: well
/// under a millisecond. Larger ones go to the blocking pool, so that a few 4 MiB bodies cannot
/// hold the workers, and `/health` with them, for their parse.
const INLINE_WORK_BYTES: usize = 64 * 1024;

/// Runs `work` in place, or through `gate` on the blocking pool when it is `large`.
async fn off_the_workers<T, F>(gate: &WorkGate, large: bool, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if large {
        gate.run(work).await.map_err(gate_error)
    } else {
        Ok(work())
    }
}

fn gate_error(e: GateError) -> ApiError {
    match e {
        GateError::Busy { waiting } => ApiError::busy(waiting),
        GateError::Failed(message) => ApiError::internal(message),
    }
}

/// The prompt's tokens, with the work before admission bounded: token ids are only
/// range-checked (their count is capped when parsed); a text or rendered chat whose byte length
/// cannot fit the context is refused before it is tokenized; the rest is tokenized through the
/// [`WorkGate`], off the async workers.
async fn prompt_tokens(
    state: &AppState,
    ready: &Ready,
    prompt: PromptInput,
    param: &'static str,
    large: bool,
) -> Result<Vec<LlamaToken>, ApiError> {
    let text = match prompt {
        PromptInput::Tokens(ids) => {
            return ready
                .model
                .checked_tokens(&ids)
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string()));
        }
        PromptInput::Text(text) => text,
        // Linear in the body (at most --max-request-bytes): cheap next to tokenizing.
        PromptInput::Chat(messages) => {
            let model = Arc::clone(&ready.model);
            off_the_workers(&state.parser, large, move || {
                model.template.render(&model.llama, &messages)
            })
            .await?
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?
        }
    };
    let n_ctx = ready.scheduler.n_ctx_seq;
    if let Some(min_tokens) = ready.prompt_bound.min_tokens(text.len())
        && min_tokens >= n_ctx as usize
    {
        return Err(ApiError::context_length_from_bytes(
            param,
            text.len(),
            min_tokens,
            n_ctx,
        ));
    }
    let model = Arc::clone(&ready.model);
    state
        .tokenizer
        .run(move || model.tokenize_text(&text))
        .await
        .map_err(gate_error)
}

struct ResponseMeta {
    operation: Operation,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

async fn full_response(meta: ResponseMeta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                usage,
            } => {
                let reason = finish_reason.as_str();
                let choice = match meta.operation {
                    Operation::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": reason,
                    }),
                    Operation::TextCompletion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": null,
                        "finish_reason": reason,
                    }),
                };
                let object = match meta.operation {
                    Operation::Chat => "chat.completion",
                    Operation::TextCompletion => "text_completion",
                };
                return axum::Json(json!({
                    "id": meta.id,
                    "object": object,
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [choice],
                    "usage": usage_json(usage),
                }))
                .into_response();
            }
            Event::Failed(message) => return ApiError::internal(message).into_response(),
            Event::Aborted(message) => return ApiError::unavailable(message).into_response(),
        }
    }
    ApiError::internal("The inference thread dropped the request").into_response()
}

fn chunk(meta: &ResponseMeta, delta_text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
    match meta.operation {
        Operation::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
                delta.insert("content".into(), json!(""));
            }
            if let Some(t) = delta_text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": meta.id,
                "object": "chat.completion.chunk",
                "created": meta.created,
                "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
        Operation::TextCompletion => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": delta_text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }],
        }),
    }
}

enum StreamPhase {
    Start,
    Tokens,
    Done,
}

/// The last events of a stream that failed: the error, then `[DONE]`.
fn error_events(error: &ApiError) -> Vec<SseEvent> {
    vec![
        SseEvent::default().data(error.body().to_string()),
        SseEvent::default().data("[DONE]"),
    ]
}

fn stream_response(meta: ResponseMeta, rx: UnboundedReceiver<Event>) -> Response {
    let state = (meta, rx, StreamPhase::Start);
    let stream = futures::stream::unfold(state, |(meta, mut rx, phase)| async move {
        let events: Vec<SseEvent> = match phase {
            StreamPhase::Done => return None,
            StreamPhase::Start if meta.operation == Operation::Chat => {
                let e = SseEvent::default().data(chunk(&meta, None, true, None).to_string());
                return Some((vec![e], (meta, rx, StreamPhase::Tokens)));
            }
            StreamPhase::Start | StreamPhase::Tokens => match rx.recv().await {
                Some(Event::Text(t)) => {
                    vec![SseEvent::default().data(chunk(&meta, Some(&t), false, None).to_string())]
                }
                Some(Event::Done {
                    finish_reason,
                    usage,
                }) => {
                    let mut v = vec![
                        SseEvent::default()
                            .data(chunk(&meta, None, false, finish_reason.as_str()).to_string()),
                    ];
                    if meta.include_usage {
                        let object = match meta.operation {
                            Operation::Chat => "chat.completion.chunk",
                            Operation::TextCompletion => "text_completion",
                        };
                        v.push(
                            SseEvent::default().data(
                                json!({
                                    "id": meta.id,
                                    "object": object,
                                    "created": meta.created,
                                    "model": meta.model,
                                    "choices": [],
                                    "usage": usage_json(usage),
                                })
                                .to_string(),
                            ),
                        );
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    return Some((v, (meta, rx, StreamPhase::Done)));
                }
                Some(Event::Failed(message)) => {
                    let v = error_events(&ApiError::internal(message));
                    return Some((v, (meta, rx, StreamPhase::Done)));
                }
                Some(Event::Aborted(message)) => {
                    let v = error_events(&ApiError::unavailable(message));
                    return Some((v, (meta, rx, StreamPhase::Done)));
                }
                None => {
                    let error = ApiError::internal("The inference thread dropped the request");
                    return Some((error_events(&error), (meta, rx, StreamPhase::Done)));
                }
            },
        };
        Some((events, (meta, rx, StreamPhase::Tokens)))
    })
    .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(stream).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(key: Option<&str>) -> AppState {
        AppState {
            model_names: vec!["m".into()],
            api_key: key.map(str::to_owned),
            max_request_bytes: 10,
            body_read_timeout: std::time::Duration::from_secs(1),
            max_queue: 1,
            metrics: Arc::new(Metrics::default()),
            telemetry: Telemetry::disabled(),
            ready: OnceLock::new(),
            started_unix: 0,
            rejections: Arc::new(RejectionLimiter::new(1)),
            tokenizer: WorkGate::new(1, 1),
            parser: WorkGate::new(1, 1),
        }
    }

    #[test]
    fn bearer_auth() {
        let mut h = HeaderMap::new();
        assert!(authorized(&state(None), &h));
        assert!(!authorized(&state(Some("k")), &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        assert!(authorized(&state(Some("k")), &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  k"));
        assert!(authorized(&state(Some("k")), &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kk"));
        assert!(!authorized(&state(Some("k")), &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k"));
        assert!(!authorized(&state(Some("k")), &h));
    }

    #[test]
    fn chunk_shapes() {
        let meta = ResponseMeta {
            operation: Operation::Chat,
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            include_usage: false,
        };
        let c = chunk(&meta, None, true, None);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        let c = chunk(&meta, Some("hi"), false, None);
        assert_eq!(c["choices"][0]["delta"]["content"], "hi");
        assert!(c["choices"][0]["finish_reason"].is_null());
        let c = chunk(&meta, None, false, Some("stop"));
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(c["choices"][0]["delta"], json!({}));
    }
}
