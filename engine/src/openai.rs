//! OpenAI request bodies: parsing, validation, and the error shape.
//!
//! Parsing never panics on input: the body is decoded with `serde_path_to_error` so a type error
//! names the field, then every parameter is range-checked into a [`GenerationRequest`].

use std::fmt;

use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::json;

use crate::chat_template::{ChatMessage, Role};
use crate::sampling::SamplingParams;
use crate::telemetry::{ErrorKind, Operation, params_set};

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;
/// Most chat messages per request.
pub const MAX_MESSAGES: usize = 4096;
/// Most content parts per message.
pub const MAX_CONTENT_PARTS: usize = 256;
/// Most token ids in a `prompt` given as ids (a prompt must also fit the context).
pub const MAX_PROMPT_TOKEN_IDS: usize = 1 << 20;

/// An error answered in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error `type`.
    pub error_type: &'static str,
    /// The offending parameter, when there is one.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Class recorded in telemetry.
    pub kind: ErrorKind,
}

impl ApiError {
    /// 400 for an invalid parameter.
    #[must_use]
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            error_type: "invalid_request_error",
            param: Some(param.to_owned()),
            code: Some("invalid_value"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 400 for a body that is not valid JSON of the right shape.
    #[must_use]
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            error_type: "invalid_request_error",
            param: None,
            code: Some("invalid_json"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 415 when the body is not declared as JSON.
    #[must_use]
    pub fn unsupported_media_type() -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "Content-Type must be application/json".to_owned(),
            error_type: "invalid_request_error",
            param: None,
            code: Some("unsupported_media_type"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 400 when the prompt does not fit the context.
    #[must_use]
    pub fn context_length(param: &str, prompt_tokens: usize, n_ctx: u32) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {n_ctx} tokens. However, your prompt has \
                 {prompt_tokens} tokens, which leaves no room for a completion. Please shorten \
                 the prompt."
            ),
            error_type: "invalid_request_error",
            param: Some(param.to_owned()),
            code: Some("context_length_exceeded"),
            kind: ErrorKind::ContextLengthExceeded,
        }
    }

    /// 400 when the prompt's byte length alone shows it cannot fit the context: it has at
    /// least `min_tokens` tokens (it was not tokenized).
    #[must_use]
    pub fn context_length_from_bytes(
        param: &str,
        prompt_bytes: usize,
        min_tokens: usize,
        n_ctx: u32,
    ) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {n_ctx} tokens. However, your prompt is \
                 {prompt_bytes} bytes long, which is at least {min_tokens} tokens and leaves no \
                 room for a completion. Please shorten the prompt."
            ),
            error_type: "invalid_request_error",
            param: Some(param.to_owned()),
            code: Some("context_length_exceeded"),
            kind: ErrorKind::ContextLengthExceeded,
        }
    }

    /// 429 when the parse or tokenizer pool is busy and `waiting` requests already wait for it.
    #[must_use]
    pub fn busy(waiting: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "The server is busy: {waiting} requests are already waiting to be parsed or \
                 tokenized. Retry later."
            ),
            error_type: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            kind: ErrorKind::QueueFull,
        }
    }

    /// 401.
    #[must_use]
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>`.".to_owned(),
            error_type: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            kind: ErrorKind::Unauthorized,
        }
    }

    /// 404 for an unknown model.
    #[must_use]
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            error_type: "invalid_request_error",
            param: Some("model".to_owned()),
            code: Some("model_not_found"),
            kind: ErrorKind::ModelNotFound,
        }
    }

    /// 404 for an unknown route.
    #[must_use]
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("No route for {method} {path}"),
            error_type: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 405 for a known route with the wrong method.
    #[must_use]
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("Method {method} is not allowed for {path}"),
            error_type: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 413.
    #[must_use]
    pub fn payload_too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("Request body is larger than the limit of {limit} bytes."),
            error_type: "invalid_request_error",
            param: None,
            code: Some("payload_too_large"),
            kind: ErrorKind::PayloadTooLarge,
        }
    }

    /// 408: the body did not arrive within `--body-read-timeout`.
    #[must_use]
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs_f32()
            ),
            error_type: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            kind: ErrorKind::InvalidRequest,
        }
    }

    /// 429.
    #[must_use]
    pub fn queue_full(max_queue: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "The server is busy: all sequence slots are taken and {max_queue} requests are \
                 already waiting. Retry later."
            ),
            error_type: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            kind: ErrorKind::QueueFull,
        }
    }

    /// 503.
    #[must_use]
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            error_type: "service_unavailable_error",
            param: None,
            code: Some("unavailable"),
            kind: ErrorKind::Unavailable,
        }
    }

    /// 500.
    #[must_use]
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            error_type: "server_error",
            param: None,
            code: Some("internal_error"),
            kind: ErrorKind::Internal,
        }
    }

    /// The JSON body.
    #[must_use]
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list (at most [`MAX_STOP_STRINGS`]).
#[derive(Debug)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StopVisitor;
        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a string or a list of at most {MAX_STOP_STRINGS} strings"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stop, E> {
                Ok(Stop::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Stop, A::Error> {
                bounded_seq(seq, MAX_STOP_STRINGS, "stop strings").map(Stop::Many)
            }
        }
        deserializer.deserialize_any(StopVisitor)
    }
}

/// Message `content`: a string or a list of parts (at most [`MAX_CONTENT_PARTS`]).
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a string or a list of at most {MAX_CONTENT_PARTS} content parts"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Content, A::Error> {
                bounded_seq(seq, MAX_CONTENT_PARTS, "content parts").map(Content::Parts)
            }
        }
        deserializer.deserialize_any(ContentVisitor)
    }
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    content: Option<Content>,
}

/// `messages`: at most [`MAX_MESSAGES`].
#[derive(Debug)]
struct Messages(Vec<RawMessage>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MessagesVisitor;
        impl<'de> Visitor<'de> for MessagesVisitor {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_MESSAGES} messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Messages, A::Error> {
                bounded_seq(seq, MAX_MESSAGES, "messages").map(Messages)
            }
        }
        deserializer.deserialize_seq(MessagesVisitor)
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// `prompt` of `/v1/completions`: a string, token ids (at most [`MAX_PROMPT_TOKEN_IDS`]), or a
/// list holding one of those (a second prompt is refused as soon as it starts).
#[derive(Debug)]
enum RawPrompt {
    Text(String),
    Tokens(Vec<i64>),
}

impl<'de> Deserialize<'de> for RawPrompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = RawPrompt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of token ids, or a list holding one of those")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPrompt, E> {
                Ok(RawPrompt::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawPrompt, E> {
                Ok(RawPrompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawPrompt, A::Error> {
                let prompt = match seq.next_element::<PromptItem>()? {
                    None => return Ok(RawPrompt::Tokens(Vec::new())),
                    Some(PromptItem::Token(first)) => {
                        let mut ids = vec![first];
                        while let Some(id) = seq.next_element::<TokenId>()? {
                            if ids.len() == MAX_PROMPT_TOKEN_IDS {
                                return Err(de::Error::custom(format_args!(
                                    "more than {MAX_PROMPT_TOKEN_IDS} token ids"
                                )));
                            }
                            ids.push(id.0);
                        }
                        return Ok(RawPrompt::Tokens(ids));
                    }
                    Some(PromptItem::Text(t)) => RawPrompt::Text(t),
                    Some(PromptItem::Tokens(ids)) => RawPrompt::Tokens(ids),
                };
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "exactly one prompt per request is supported",
                    ));
                }
                Ok(prompt)
            }
        }
        deserializer.deserialize_any(PromptVisitor)
    }
}

/// One element of a `prompt` list: a token id, a text, or a list of token ids.
enum PromptItem {
    Token(i64),
    Text(String),
    Tokens(Vec<i64>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token id, a string or a list of token ids")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                Ok(PromptItem::Token(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                TokenIdVisitor.visit_u64(v).map(PromptItem::Token)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
                let ids: Vec<TokenId> = bounded_seq(seq, MAX_PROMPT_TOKEN_IDS, "token ids")?;
                Ok(PromptItem::Tokens(ids.into_iter().map(|t| t.0).collect()))
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

/// A token id as sent: any integer (range-checked against the vocabulary later).
struct TokenId(i64);

struct TokenIdVisitor;

impl Visitor<'_> for TokenIdVisitor {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token id")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v)
            .map_err(|_| E::custom(format_args!("token id {v} is outside the vocabulary")))
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_i64(TokenIdVisitor).map(TokenId)
    }
}

/// Reads a list of at most `max` items: a longer one fails at its first extra item, before
/// anything more is allocated.
fn bounded_seq<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
    mut seq: A,
    max: usize,
    what: &str,
) -> Result<Vec<T>, A::Error> {
    // A JSON reader gives no length hint; the cap bounds the first allocation anyway.
    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max).min(4096));
    while let Some(item) = seq.next_element()? {
        if out.len() == max {
            return Err(de::Error::custom(format_args!(
                "more than {max} {what} (the most accepted)"
            )));
        }
        out.push(item);
    }
    Ok(out)
}

/// A field that is only checked for being set: whatever it holds is skipped, not built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Null,
    Flag(bool),
    Number(Option<i64>),
    Other,
}

impl<'de> Deserialize<'de> for Presence {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PresenceVisitor;
        impl<'de> Visitor<'de> for PresenceVisitor {
            type Value = Presence;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Presence, E> {
                Ok(Presence::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Presence, E> {
                Ok(Presence::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Presence, E> {
                Ok(Presence::Flag(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Presence, E> {
                Ok(Presence::Number(Some(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Presence, E> {
                Ok(Presence::Number(i64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Presence, E> {
                Ok(Presence::Number(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Presence, E> {
                Ok(Presence::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Presence, A::Error> {
                de::IgnoredAny.visit_seq(seq).map(|_| Presence::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Presence, A::Error> {
                de::IgnoredAny.visit_map(map).map(|_| Presence::Other)
            }
        }
        deserializer.deserialize_any(PresenceVisitor)
    }
}

/// `response_format`: only its `type` is read.
#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The union of both endpoints' fields; each endpoint checks which ones it allows. Fields not
/// named here are skipped without being built.
#[derive(Debug, Deserialize)]
struct RawRequest {
    model: Option<String>,
    messages: Option<Messages>,
    prompt: Option<RawPrompt>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    stop: Option<Stop>,
    n: Option<i64>,
    best_of: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Presence>,
    top_logprobs: Option<Presence>,
    echo: Option<bool>,
    suffix: Option<String>,
    tools: Option<Presence>,
    response_format: Option<ResponseFormat>,
}

/// The body: a JSON object (a list would otherwise fill the struct's fields in order).
struct RequestObject(RawRequest);

impl<'de> Deserialize<'de> for RequestObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RequestObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RequestObject, A::Error> {
                RawRequest::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RequestObject)
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// The prompt of a validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Chat messages, rendered with the chat template.
    Chat(Vec<ChatMessage>),
    /// Completion prompt text.
    Text(String),
    /// Completion prompt given as token ids (range-checked against the vocabulary later).
    Tokens(Vec<i64>),
}

/// A validated generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Chat or text completion.
    pub operation: Operation,
    /// Requested model name, if any.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptInput,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Token limit, when the caller set one.
    pub max_tokens: Option<u32>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream the answer as server-sent events.
    pub stream: bool,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// Which sampling parameters the caller set (bits of [`params_set`]).
    pub params_set: u16,
}

/// Best-effort view of a body that failed validation, so a rejection can still be recorded with
/// the parameters the caller sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartialView {
    /// `stream` if it parsed.
    pub stream: bool,
}

fn in_range(param: &str, value: f64, lo: f64, hi: f64) -> Result<f32, ApiError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        #[allow(clippy::cast_possible_truncation)]
        Ok(value as f32)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {value}"),
        ))
    }
}

fn check_content_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let Some(ct) = content_type else {
        return Err(ApiError::unsupported_media_type());
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type())
    }
}

/// Parses and validates a body for `operation`.
///
/// # Errors
/// 415 without a JSON content type; 400 naming the field for anything invalid.
pub fn parse_request(
    operation: Operation,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<GenerationRequest, (ApiError, PartialView)> {
    let failed = |e| {
        (
            e,
            PartialView {
                stream: skim_stream(body),
            },
        )
    };
    check_content_type(content_type).map_err(failed)?;
    let raw = parse_body(body).map_err(failed)?;
    let view = PartialView {
        stream: raw.stream.unwrap_or(false),
    };
    validate(operation, raw).map_err(|e| (e, view))
}

/// The body, read once straight into the typed request: no `serde_json::Value` tree, lists
/// capped while they are read, unknown fields skipped.
fn parse_body(body: &[u8]) -> Result<RawRequest, ApiError> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    let raw = serde_path_to_error::deserialize::<_, RequestObject>(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.classify() != serde_json::error::Category::Data {
            ApiError::invalid_body(format!("Request body is not valid JSON: {inner}"))
        } else if path.is_empty() || path == "." {
            ApiError::invalid_body(format!("Invalid request body: {inner}"))
        } else {
            ApiError::invalid_param(&path, format!("Invalid value for `{path}`: {inner}"))
        }
    })?;
    reader
        .end()
        .map_err(|e| ApiError::invalid_body(format!("Request body is not valid JSON: {e}")))?;
    Ok(raw.0)
}

/// `stream` of a body that failed to parse, for its rejection record: a second pass that only
/// skips (it builds nothing), taken on the error path alone.
fn skim_stream(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct StreamOnly {
        stream: Option<bool>,
    }
    serde_json::from_slice::<StreamOnly>(body)
        .ok()
        .and_then(|s| s.stream)
        .unwrap_or(false)
}

fn validate(operation: Operation, raw: RawRequest) -> Result<GenerationRequest, ApiError> {
    let mut set = 0u16;
    if let Some(n) = raw.n
        && n != 1
    {
        return Err(ApiError::invalid_param(
            "n",
            format!("Only `n` = 1 is supported, got {n}"),
        ));
    }
    if let Some(best_of) = raw.best_of
        && best_of != 1
    {
        return Err(ApiError::invalid_param(
            "best_of",
            format!("Only `best_of` = 1 is supported, got {best_of}"),
        ));
    }
    let logprobs_requested = !matches!(
        raw.logprobs,
        None | Some(Presence::Null | Presence::Flag(false) | Presence::Number(Some(0)))
    );
    if logprobs_requested || raw.top_logprobs.is_some_and(|v| v != Presence::Null) {
        return Err(ApiError::invalid_param(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if raw.tools.is_some_and(|v| v != Presence::Null) {
        return Err(ApiError::invalid_param(
            "tools",
            "`tools` are not supported",
        ));
    }
    if let Some(rf) = &raw.response_format
        && rf.kind.as_deref() != Some("text")
    {
        return Err(ApiError::invalid_param(
            "response_format",
            "Only `response_format` {\"type\": \"text\"} is supported",
        ));
    }

    let prompt = match operation {
        Operation::Chat => {
            if raw.prompt.is_some() {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "`prompt` belongs to /v1/completions; chat requests take `messages`",
                ));
            }
            let messages = raw
                .messages
                .map(|m| m.0)
                .ok_or_else(|| ApiError::invalid_param("messages", "`messages` is required"))?;
            if messages.is_empty() {
                return Err(ApiError::invalid_param(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
            let mut out = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                let role = Role::parse(&m.role).ok_or_else(|| {
                    ApiError::invalid_param(
                        &format!("messages[{i}].role"),
                        format!(
                            "Unsupported role `{}` in messages[{i}]; expected system, developer, \
                             user or assistant",
                            m.role
                        ),
                    )
                })?;
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.into_iter().enumerate() {
                            match (part.kind.as_str(), part.text) {
                                ("text", Some(t)) => text.push_str(&t),
                                _ => {
                                    return Err(ApiError::invalid_param(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!(
                                            "Only text content parts are supported \
                                             (messages[{i}].content[{j}])"
                                        ),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                out.push(ChatMessage { role, content });
            }
            PromptInput::Chat(out)
        }
        Operation::TextCompletion => {
            if raw.messages.is_some() {
                return Err(ApiError::invalid_param(
                    "messages",
                    "`messages` belongs to /v1/chat/completions; completions take `prompt`",
                ));
            }
            if raw.echo == Some(true) {
                return Err(ApiError::invalid_param("echo", "`echo` is not supported"));
            }
            if raw.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(ApiError::invalid_param(
                    "suffix",
                    "`suffix` is not supported",
                ));
            }
            match raw.prompt {
                None => return Err(ApiError::invalid_param("prompt", "`prompt` is required")),
                Some(RawPrompt::Text(t)) => PromptInput::Text(t),
                Some(RawPrompt::Tokens(t)) if t.is_empty() => {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        "`prompt` must not be empty",
                    ));
                }
                Some(RawPrompt::Tokens(t)) => PromptInput::Tokens(t),
            }
        }
    };

    let (max_param, max_value) = match (raw.max_completion_tokens, raw.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, v) => ("max_tokens", v),
    };
    let max_tokens = match max_value {
        None => None,
        Some(v) if v < 1 => {
            return Err(ApiError::invalid_param(
                max_param,
                format!("`{max_param}` must be at least 1, got {v}"),
            ));
        }
        Some(v) => {
            set |= params_set::MAX_TOKENS;
            Some(u32::try_from(v).unwrap_or(u32::MAX))
        }
    };

    let mut sampling = SamplingParams::default();
    if let Some(t) = raw.temperature {
        sampling.temperature = in_range("temperature", t, 0.0, 2.0)?;
        set |= params_set::TEMPERATURE;
    }
    if let Some(p) = raw.top_p {
        let p32 = in_range("top_p", p, 0.0, 1.0)?;
        if p <= 0.0 {
            return Err(ApiError::invalid_param(
                "top_p",
                "`top_p` must be greater than 0",
            ));
        }
        sampling.top_p = p32;
        set |= params_set::TOP_P;
    }
    if let Some(k) = raw.top_k {
        // vLLM convention: -1 (or 0) disables top-k.
        sampling.top_k = match k {
            -1 | 0 => 0,
            k if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
            k => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("`top_k` must be -1 (disabled) or at least 1, got {k}"),
                ));
            }
        };
        set |= params_set::TOP_K;
    }
    if let Some(seed) = raw.seed {
        sampling.seed = Some(u64::from_ne_bytes(seed.to_ne_bytes()));
        set |= params_set::SEED;
    }
    if let Some(f) = raw.frequency_penalty {
        sampling.frequency_penalty = in_range("frequency_penalty", f, -2.0, 2.0)?;
        set |= params_set::FREQUENCY_PENALTY;
    }
    if let Some(p) = raw.presence_penalty {
        sampling.presence_penalty = in_range("presence_penalty", p, -2.0, 2.0)?;
        set |= params_set::PRESENCE_PENALTY;
    }

    let stop = match raw.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_STRINGS} stop strings are supported, got {}",
                stop.len()
            ),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "Stop strings must be at most {MAX_STOP_LEN} bytes, got {}",
                s.len()
            ),
        ));
    }
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();

    let stream = raw.stream.unwrap_or(false);
    let include_usage = raw
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if include_usage && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }

    Ok(GenerationRequest {
        operation,
        model: raw.model,
        prompt,
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
        params_set: set,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn chat(body: &str) -> Result<GenerationRequest, ApiError> {
        parse_request(Operation::Chat, JSON, body.as_bytes()).map_err(|(e, _)| e)
    }

    fn completion(body: &str) -> Result<GenerationRequest, ApiError> {
        parse_request(Operation::TextCompletion, JSON, body.as_bytes()).map_err(|(e, _)| e)
    }

    fn param_of(r: Result<GenerationRequest, ApiError>) -> (u16, Option<String>) {
        let e = r.unwrap_err();
        (e.status.as_u16(), e.param)
    }

    #[test]
    fn minimal_chat() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(
            r.prompt,
            PromptInput::Chat(vec![ChatMessage {
                role: Role::User,
                content: "hi".into()
            }])
        );
        assert_eq!(r.sampling, SamplingParams::default());
        assert_eq!(r.params_set, 0);
        assert!(!r.stream);
    }

    #[test]
    fn full_chat_parameters() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"s"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "max_completion_tokens":5,"max_tokens":9,"temperature":0,"top_p":0.5,"top_k":-1,
                "seed":-1,"frequency_penalty":1.5,"presence_penalty":-2,"stop":"x","n":1,
                "stream":true,"stream_options":{"include_usage":true},"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_p, 0.5);
        assert_eq!(r.sampling.top_k, 0);
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        assert_eq!(r.stop, ["x"]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.params_set, 0x7f);
        let PromptInput::Chat(m) = r.prompt else {
            panic!()
        };
        assert_eq!(m[1].content, "ab");
    }

    #[test]
    fn rejections_name_the_field() {
        let cases: &[(&str, u16, Option<&str>)] = &[
            (r#"{"messages":[]}"#, 400, Some("messages")),
            (r#"{"model":"m"}"#, 400, Some("messages")),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#,
                400,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                400,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"a"}"#,
                400,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":2.5}"#,
                400,
                Some("temperature"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":-0.1}"#,
                400,
                Some("temperature"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                400,
                Some("top_p"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":1.1}"#,
                400,
                Some("top_p"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_k":-2}"#,
                400,
                Some("top_k"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                400,
                Some("n"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"frequency_penalty":3}"#,
                400,
                Some("frequency_penalty"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":-3}"#,
                400,
                Some("presence_penalty"),
            ),
            (
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
                400,
                Some("messages[0].role"),
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                400,
                Some("messages[0].content[0]"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                400,
                Some("stream_options"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                400,
                Some("logprobs"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}"#,
                400,
                Some("stop"),
            ),
            (
                r#"{"messages":[{"content":"x"}]}"#,
                400,
                Some("messages[0]"),
            ),
            ("[1,2]", 400, None),
            ("{not json", 400, None),
        ];
        for (body, status, param) in cases {
            let (s, p) = param_of(chat(body));
            assert_eq!(s, *status, "{body}");
            assert_eq!(p.as_deref(), *param, "{body}");
        }
    }

    #[test]
    fn every_list_is_capped_while_it_is_read_with_a_400_naming_the_field() {
        let user = r#"{"role":"user","content":"x"}"#;
        let messages = vec![user; MAX_MESSAGES + 1].join(",");
        assert_eq!(
            param_of(chat(&format!(r#"{{"messages":[{messages}]}}"#))),
            (400, Some("messages".into()))
        );
        let messages = vec![user; MAX_MESSAGES].join(",");
        assert!(chat(&format!(r#"{{"messages":[{messages}]}}"#)).is_ok());

        let part = r#"{"type":"text","text":"a"}"#;
        let parts = vec![part; MAX_CONTENT_PARTS + 1].join(",");
        let body = format!(r#"{{"messages":[{{"role":"user","content":[{parts}]}}]}}"#);
        assert_eq!(
            param_of(chat(&body)),
            (400, Some("messages[0].content".into()))
        );

        let ids = vec!["1"; MAX_PROMPT_TOKEN_IDS + 1].join(",");
        let e = completion(&format!(r#"{{"prompt":[{ids}]}}"#)).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (400, Some("prompt"))
        );
        assert!(e.message.contains("token ids"), "{}", e.message);
        assert_eq!(
            param_of(completion(&format!(r#"{{"prompt":[[{ids}]]}}"#))),
            (400, Some("prompt[0]".into()))
        );
        let ids = vec!["1"; MAX_PROMPT_TOKEN_IDS].join(",");
        let PromptInput::Tokens(t) = completion(&format!(r#"{{"prompt":[{ids}]}}"#))
            .unwrap()
            .prompt
        else {
            panic!("token ids")
        };
        assert_eq!(t.len(), MAX_PROMPT_TOKEN_IDS);

        let stops = vec![r#""s""#; 100_000].join(",");
        let e = chat(&format!(r#"{{"messages":[{user}],"stop":[{stops}]}}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        assert!(e.message.contains("16 stop strings"), "{}", e.message);
    }

    #[test]
    fn prompt_shapes_are_read_without_buffering() {
        assert_eq!(
            completion(r#"{"prompt":[[5,6]]}"#).unwrap().prompt,
            PromptInput::Tokens(vec![5, 6])
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":[[1],[2]]}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":[[]]}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":[1,"a"]}"#)),
            (400, Some("prompt[1]".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":[18446744073709551615]}"#)),
            (400, Some("prompt[0]".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":1.5}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":"a","stop":5}"#)),
            (400, Some("stop".into()))
        );
        // Fields that are only checked for being set are skipped, whatever they hold.
        let r = completion(
            r#"{"prompt":"a","tools":null,"logprobs":0,"top_logprobs":null,
                "response_format":{"type":"text","extra":[1,2]},"metadata":{"k":[1,{"x":2}]}}"#,
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            param_of(completion(
                r#"{"prompt":"a","tools":[{"type":"function"}]}"#
            )),
            (400, Some("tools".into()))
        );
        assert_eq!(
            param_of(completion(
                r#"{"prompt":"a","response_format":{"type":"json_object"}}"#
            )),
            (400, Some("response_format".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":"a","top_logprobs":2}"#)),
            (400, Some("logprobs".into()))
        );
        // Not an object, or more after it: the body, not a field.
        assert_eq!(param_of(completion(r#"{"prompt":"a"} x"#)), (400, None));
        assert_eq!(param_of(completion(r#""prompt""#)), (400, None));
    }

    #[test]
    fn a_body_that_fails_to_parse_still_tells_its_stream_flag() {
        let (_, view) = parse_request(
            Operation::TextCompletion,
            JSON,
            br#"{"stream":true,"prompt":"a","temperature":"hot"}"#,
        )
        .unwrap_err();
        assert!(view.stream);
        let (_, view) =
            parse_request(Operation::TextCompletion, JSON, br#"{"stream":true,"#).unwrap_err();
        assert!(!view.stream);
    }

    #[test]
    fn content_type_is_checked() {
        let body = br#"{"messages":[{"role":"user","content":"x"}]}"#;
        let e = parse_request(Operation::Chat, Some("text/plain"), body)
            .unwrap_err()
            .0;
        assert_eq!(e.status.as_u16(), 415);
        let e = parse_request(Operation::Chat, None, body).unwrap_err().0;
        assert_eq!(e.status.as_u16(), 415);
        assert!(
            parse_request(
                Operation::Chat,
                Some("application/json; charset=utf-8"),
                body
            )
            .is_ok()
        );
    }

    #[test]
    fn completion_prompts() {
        assert_eq!(
            completion(r#"{"prompt":"a"}"#).unwrap().prompt,
            PromptInput::Text("a".into())
        );
        assert_eq!(
            completion(r#"{"prompt":["a"]}"#).unwrap().prompt,
            PromptInput::Text("a".into())
        );
        assert_eq!(
            completion(r#"{"prompt":[1,2]}"#).unwrap().prompt,
            PromptInput::Tokens(vec![1, 2])
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":["a","b"]}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(param_of(completion(r#"{}"#)), (400, Some("prompt".into())));
        assert_eq!(
            param_of(completion(r#"{"prompt":"a","echo":true}"#)),
            (400, Some("echo".into()))
        );
        assert_eq!(
            param_of(completion(r#"{"prompt":"a","messages":[]}"#)),
            (400, Some("messages".into()))
        );
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::invalid_param("temperature", "bad");
        assert_eq!(
            e.body(),
            json!({"error":{"message":"bad","type":"invalid_request_error","param":"temperature","code":"invalid_value"}})
        );
        assert_eq!(ApiError::unauthorized().status.as_u16(), 401);
        assert_eq!(ApiError::queue_full(1).status.as_u16(), 429);
        assert_eq!(ApiError::payload_too_large(1).status.as_u16(), 413);
        assert_eq!(ApiError::model_not_found("x").status.as_u16(), 404);
        assert_eq!(ApiError::unavailable("x").status.as_u16(), 503);
    }

    #[test]
    fn partial_view_sees_stream() {
        let (_, view) =
            parse_request(Operation::Chat, JSON, br#"{"messages":[],"stream":true}"#).unwrap_err();
        assert!(view.stream);
    }
}
