//! The agent's admin HTTP API (axum): `GET /healthz`, `GET /readyz`,
//! `GET /metrics` (Prometheus text), `GET /v1/tracing` and
//! `PUT /v1/tracing` (per engine or all: enabled, detail, sampling — in the
//! spirit of Triton's `/v2/trace/setting`).
//!
//! Loopback by default, and authenticated there too: every path but the
//! probes `/healthz` and `/readyz` needs a bearer token, the operator's
//! (`--admin-token-file`, `RINGSIDE_ADMIN_TOKEN`) or one the agent generates
//! at start into a file beside its state file (any local user can reach
//! loopback; only the agent's user, root and members of the `ringside`
//! group can read that file). On loopback
//! the `Host` header must name loopback (a DNS-rebinding page cannot use a
//! browser as a proxy), and a `PUT` may only name engines this agent serves.

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
    /// The operator's bearer token; `None`: generate one (the agent refuses
    /// to start beyond loopback without one).
    pub token: Option<String>,
}

/// The generated token's file: beside the state file, `<stem>.admin-token`.
pub fn generated_token_path(state_file: &std::path::Path) -> std::path::PathBuf {
    state_file.with_extension("admin-token")
}

/// A fresh random token: 32 bytes from the kernel, in hex.
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(std::io::Error::from)?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The group whose members may read the generated token: `ringside` (the
/// engines' segment group), when it exists and this process is in it.
pub const TOKEN_GROUP: &str = "ringside";

/// The gid of `group` from `/etc/group` if this process has it as its
/// group or a supplementary one; `None` otherwise.
pub fn own_group_gid(group: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    let gid: u32 = text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })?;
    let mine = rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups()
            .is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid));
    mine.then_some(gid)
}

/// Writes a generated token to `path`, replacing whatever is there (a link
/// itself, never its target) and never following a link: mode 0600, or
/// 0640 owned by `group` so that its members can read it.
pub fn write_token_file(
    path: &std::path::Path,
    token: &str,
    group: Option<u32>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if let Some(gid) = group {
        // A new file takes the process's group: the unit's (Group=ringside)
        // needs no chown, which its seccomp filter (~@privileged) refuses.
        if rustix::fs::fstat(&file)?.st_gid != gid {
            rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(gid)))?;
        }
        rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(0o640))?;
    }
    file.write_all(format!("{token}\n").as_bytes())
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
    /// The generated token could not be written.
    #[error("admin API: cannot write its token to {path}: {source}")]
    TokenFile {
        /// The token file.
        path: std::path::PathBuf,
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
    /// The bearer token every protected path requires.
    pub token: Arc<str>,
    /// The API listens on loopback only: check the `Host` header.
    pub loopback: bool,
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            host_check,
        ))
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
        auth = "bearer token",
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

/// The credentials of an `Authorization: Bearer <token>` header; the scheme
/// is case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Whether a `Host` header's value names loopback: `localhost` or a
/// loopback address, with any port.
fn host_is_loopback(host: &str) -> bool {
    // A bare IPv6 address ("::1") has colons but no port.
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = match host.strip_prefix('[') {
        // "[::1]:9464"
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn host_check(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if state.loopback {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        if !host.is_some_and(host_is_loopback) {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "Host must name loopback (localhost, 127.0.0.1 or [::1]): this API listens on loopback only",
            );
        }
    }
    next.run(request).await
}

async fn auth(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match presented {
        Some(p) if token_matches(p.as_bytes(), state.token.as_bytes()) => next.run(request).await,
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

/// Whether this agent serves `name`: one of its `--engine`s, or, when it
/// reads every engine, one it has attached.
fn serves(state: &AdminState, name: &str) -> bool {
    if !state.engines.is_empty() {
        return state.engines.iter().any(|e| e == name);
    }
    state
        .registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .any(|handle| handle.instance == name)
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
    if let Some(foreign) = update.engines.iter().find(|name| !serves(&state, name)) {
        return error(
            StatusCode::FORBIDDEN,
            format!("engine {foreign:?} is not one this agent serves"),
        );
    }
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
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_not_bearer() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("BEARER  abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn only_loopback_hosts_pass_the_host_check() {
        for host in [
            "localhost",
            "localhost:9464",
            "LOCALHOST:1",
            "127.0.0.1:9464",
            "127.1.2.3",
            "[::1]:9464",
            "[::1]",
            "::1",
        ] {
            assert!(host_is_loopback(host), "{host}");
        }
        for host in [
            "evil.example:9464",
            "localhost.evil.example",
            "10.0.0.1:9464",
            "[::2]:1",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!host_is_loopback(host), "{host}");
        }
    }

    #[test]
    fn generated_tokens_are_random_hex_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let dir = std::env::temp_dir().join(format!("ringside-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.join("agent-1.admin-token");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_token_file(&path, &a, None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), a);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // For a group: 0640 and that group (our own gid, which we are in).
        let gid = rustix::process::getegid().as_raw();
        write_token_file(&path, &b, Some(gid)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
    }
}
