//! The agent's admin HTTP API (axum): `GET /healthz`, `GET /readyz`,
//! `GET /metrics` (Prometheus text), `GET /v1/tracing` and
//! `PUT /v1/tracing` (per engine or all: enabled, detail, sampling — in the
//! spirit of Triton's `/v2/trace/setting`).
//!
//! Loopback by default. Bound to any other address it requires a bearer
//! token; everything but the probes `/healthz` and `/readyz` then answers 401 without it.

use crate::control::control_block::{self, Change, ControlError, EngineSettings};
use crate::export::queue::ExportQueue;
use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::metrics::{ExportCounters, Metrics};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ringside_shm_protocol::Detail;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Where the admin API listens and how it authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    /// The address.
    pub listen: std::net::SocketAddr,
    /// Whether the address was given (a taken default is not fatal).
    pub explicit: bool,
    /// The bearer token (required beyond loopback).
    pub token: Option<String>,
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound.
    #[error("admin API: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// What the admin API reads.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Every attachment so far.
    pub registry: Arc<Mutex<Vec<Arc<EngineHandle>>>>,
    /// Metric state.
    pub metrics: Arc<Mutex<Metrics>>,
    /// Export counters.
    pub counters: Arc<ExportCounters>,
    /// The export queue.
    pub queue: Arc<ExportQueue>,
    /// The engines the agent was told to read (empty: all).
    pub engines: Vec<String>,
    /// Trusted segment owners.
    pub trusted_uids: Vec<u32>,
    /// The bearer token, if auth is on.
    pub token: Option<Arc<str>>,
}

/// The router of the admin API.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/tracing", get(get_tracing).put(put_tracing))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    // Probes stay open: a kubelet or systemd cannot present the token, and
    // they reveal nothing but up / attached.
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
}

/// Binds `addr` and serves the admin API until `stop` turns true.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        listen = %bound,
        auth = if state.token.is_some() { "bearer token" } else { "off (loopback only)" },
        "admin API: /healthz /readyz /metrics /v1/tracing"
    );
    let app = router(state);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "admin API stopped");
        }
    }))
}

/// Constant-time comparison of a presented token with the expected one.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn auth(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if token_matches(p.trim().as_bytes(), token.as_bytes()) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid bearer token is required\n",
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let attached = state.registry.lock().map_or(0, |r| r.len());
    if attached > 0 {
        (
            StatusCode::OK,
            format!("ready: {attached} engine attachment(s)\n"),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no engine attached yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let request = {
        let metrics = state
            .metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        metrics.to_request(
            crate::pipeline::metrics::unix_now_ns(),
            state.queue.len() as u64,
            &state.counters,
        )
    };
    (
        [(
            header::CONTENT_TYPE,
            crate::control::prometheus::CONTENT_TYPE,
        )],
        crate::control::prometheus::render(&request),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn control_error(e: ControlError) -> Response {
    match e {
        ControlError::Open { .. } | ControlError::NoEngines => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        ControlError::Invalid { .. } => error(StatusCode::BAD_REQUEST, e.to_string()),
        ControlError::List(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn settings_of(names: &[String], state: &AdminState) -> Result<Vec<EngineSettings>, ControlError> {
    let names = if names.is_empty() {
        &state.engines
    } else {
        names
    };
    let opened = control_block::open_engines(names, &state.trusted_uids)?;
    Ok(opened
        .engines
        .iter()
        .map(control_block::read_settings)
        .collect())
}

async fn get_tracing(State(state): State<AdminState>) -> Response {
    match settings_of(&[], &state) {
        Ok(s) => axum::Json(json!({ "engines": s })).into_response(),
        Err(ControlError::NoEngines) => axum::Json(json!({ "engines": [] })).into_response(),
        Err(e) => control_error(e),
    }
}

/// A PUT body: the engines (`engine`: a name, or `engines`: names;
/// default the agent's engines) and the settings to change.
#[derive(Debug, PartialEq)]
pub struct TracingUpdate {
    /// Engines to change; empty: all.
    pub engines: Vec<String>,
    /// The change.
    pub change: Change,
}

fn bad(field: &str, expected: &str) -> String {
    format!("{field}: expected {expected}")
}

fn ratio(v: &Value, field: &str) -> Result<f64, String> {
    v.as_f64()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| bad(field, "a number in [0, 1]"))
}

fn millis(v: &Value, field: &str) -> Result<f64, String> {
    v.as_f64()
        .filter(|r| (0.0..=3_600_000.0).contains(r))
        .ok_or_else(|| bad(field, "milliseconds in [0, 3600000]"))
}

/// Parses and validates a PUT /v1/tracing body; the error names the field.
pub fn parse_update(body: &[u8]) -> Result<TracingUpdate, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("body: not JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("body: expected a JSON object".to_owned());
    };
    let mut update = TracingUpdate {
        engines: Vec::new(),
        change: Change::default(),
    };
    for (key, v) in &map {
        let c = &mut update.change;
        match key.as_str() {
            "engine" => update.engines.push(
                v.as_str()
                    .ok_or_else(|| bad("engine", "an engine name"))?
                    .to_owned(),
            ),
            "engines" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| bad("engines", "a list of names"))?;
                for name in list {
                    update.engines.push(
                        name.as_str()
                            .ok_or_else(|| bad("engines", "a list of names"))?
                            .to_owned(),
                    );
                }
            }
            "enabled" => {
                c.enabled = Some(v.as_bool().ok_or_else(|| bad("enabled", "true or false"))?)
            }
            "detail" => {
                c.detail = Some(match v.as_str() {
                    Some("request") => Detail::Request,
                    Some("phases") => Detail::Phases,
                    _ => return Err(bad("detail", "\"request\" or \"phases\"")),
                });
            }
            "head_sample_ratio" => c.head_sample_ratio = Some(ratio(v, "head_sample_ratio")?),
            "tail" => {
                let Value::Object(tail) = v else {
                    return Err(bad("tail", "an object"));
                };
                for (k, v) in tail {
                    match k.as_str() {
                        "keep_errors" => {
                            c.tail_keep_errors = Some(
                                v.as_bool()
                                    .ok_or_else(|| bad("tail.keep_errors", "true or false"))?,
                            );
                        }
                        "sample_ratio" => {
                            c.tail_sample_ratio = Some(ratio(v, "tail.sample_ratio")?)
                        }
                        "ttft_threshold_ms" => {
                            c.tail_ttft_threshold_ms = Some(millis(v, "tail.ttft_threshold_ms")?);
                        }
                        "e2e_threshold_ms" => {
                            c.tail_e2e_threshold_ms = Some(millis(v, "tail.e2e_threshold_ms")?);
                        }
                        other => return Err(format!("tail.{other}: unknown field")),
                    }
                }
            }
            other => return Err(format!("{other}: unknown field")),
        }
    }
    if update.change.is_empty() {
        return Err(
            "body: nothing to change (enabled, detail, head_sample_ratio, tail)".to_owned(),
        );
    }
    Ok(update)
}

async fn put_tracing(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !json_body {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "body: expected application/json",
        );
    }
    let update = match parse_update(&body) {
        Ok(u) => u,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let names = if update.engines.is_empty() {
        &state.engines
    } else {
        &update.engines
    };
    let opened = match control_block::open_engines(names, &state.trusted_uids) {
        Ok(o) => o,
        Err(e) => return control_error(e),
    };
    let mut changed = Vec::new();
    for segment in &opened.engines {
        if let Err(e) = update.change.apply(segment) {
            return control_error(e);
        }
        changed.push(control_block::read_settings(segment));
    }
    tracing::info!(engines = ?changed.iter().map(|s| s.engine.as_str()).collect::<Vec<_>>(), change = ?update.change, "admin API: tracing settings changed");
    axum::Json(json!({ "engines": changed })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_parse_and_bad_fields_are_named() {
        let u = parse_update(
            br#"{"engine":"a","enabled":false,"tail":{"keep_errors":true,"sample_ratio":0}}"#,
        )
        .unwrap();
        assert_eq!(u.engines, ["a"]);
        assert_eq!(u.change.enabled, Some(false));
        assert_eq!(u.change.tail_keep_errors, Some(true));
        assert_eq!(u.change.tail_sample_ratio, Some(0.0));
        for (body, field) in [
            (r#"{"enabled":"yes"}"#, "enabled:"),
            (r#"{"detail":"all"}"#, "detail:"),
            (r#"{"head_sample_ratio":2}"#, "head_sample_ratio:"),
            (
                r#"{"tail":{"ttft_threshold_ms":-1}}"#,
                "tail.ttft_threshold_ms:",
            ),
            (r#"{"tail":{"bogus":1}}"#, "tail.bogus:"),
            (r#"{"enabeld":true}"#, "enabeld:"),
            (r#"{}"#, "nothing to change"),
            ("[", "not JSON"),
        ] {
            let e = parse_update(body.as_bytes()).unwrap_err();
            assert!(e.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
    }
}
