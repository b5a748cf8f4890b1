//! OTLP/HTTP over reqwest: protobuf or JSON bodies, optional gzip, the
//! headers on every request; the status code and `Retry-After` are
//! classified by [`crate::export::retry`], the partial success read
//! out of the response body. One POST path for both signals (`trace.rs`,
//! `metrics.rs`).

mod metrics;
mod trace;

use super::retry::{self, Verdict};
use super::transport::{Attempt, ExportSetupError};
use super::{Compression, OtlpSettings, Protocol};
use prost::Message;
use std::io::Write;

/// OTLP/HTTP state.
#[derive(Debug)]
pub struct HttpTransport {
    client: reqwest::Client,
    traces_url: String,
    metrics_url: String,
    json: bool,
    gzip: bool,
    headers: reqwest::header::HeaderMap,
}

impl HttpTransport {
    /// A client for the traces and metrics URLs (checked here).
    pub(crate) fn new(o: &OtlpSettings) -> Result<Self, ExportSetupError> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (key, value) in &o.headers {
            let k = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| ExportSetupError::Header(key.clone()))?;
            let v = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| ExportSetupError::Header(key.clone()))?;
            headers.insert(k, v);
        }
        let client = reqwest::Client::builder()
            .timeout(o.timeout)
            .user_agent(concat!("ringside-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ExportSetupError::Http(e.to_string()))?;
        for url in [&o.traces_endpoint, &o.metrics_endpoint] {
            reqwest::Url::parse(url).map_err(|e| ExportSetupError::Endpoint {
                endpoint: url.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            client,
            traces_url: o.traces_endpoint.clone(),
            metrics_url: o.metrics_endpoint.clone(),
            json: o.protocol == Protocol::HttpJson,
            gzip: o.compression == Compression::Gzip,
            headers,
        })
    }
}

/// Decodes an OTLP/HTTP response body in the protocol's encoding; an
/// undecodable body counts as full success (the status code already said so).
fn decode_response<R: Message + Default + serde::de::DeserializeOwned>(
    h: &HttpTransport,
    body: &[u8],
) -> Option<R> {
    if h.json {
        serde_json::from_slice(body).ok()
    } else {
        R::decode(body).ok()
    }
}

/// POSTs `body` and reads the partial success (rejected items and the
/// server's message) out of the response `R` with `partial`.
pub(super) async fn http_export<R: Message + Default + serde::de::DeserializeOwned>(
    h: &HttpTransport,
    url: &str,
    body: Vec<u8>,
    partial: impl FnOnce(R) -> Option<(i64, String)>,
) -> Attempt {
    match http_post(h, url, body).await {
        Ok(response) => {
            let (rejected, message) = decode_response::<R>(h, &response)
                .and_then(partial)
                .unwrap_or_default();
            Attempt::Accepted { rejected, message }
        }
        Err(failed) => failed,
    }
}

async fn http_post(h: &HttpTransport, url: &str, mut body: Vec<u8>) -> Result<Vec<u8>, Attempt> {
    let permanent = |error: String| Attempt::Failed {
        verdict: Verdict::Permanent,
        error,
    };
    let content_type = if h.json {
        "application/json"
    } else {
        "application/x-protobuf"
    };
    let mut builder = h
        .client
        .post(url)
        .headers(h.headers.clone())
        .header(reqwest::header::CONTENT_TYPE, content_type);
    if h.gzip {
        body = gzip(&body).map_err(|e| permanent(format!("gzip: {e}")))?;
        builder = builder.header(reqwest::header::CONTENT_ENCODING, "gzip");
    }
    let response = builder
        .body(body)
        .send()
        .await
        .map_err(|e| Attempt::Failed {
            // Connection refused, reset, timeout: the collector may come back.
            verdict: Verdict::Retry(None),
            error: format!("HTTP {url}: {e}"),
        })?;
    let status = response.status().as_u16();
    if response.status().is_success() {
        // An oversized body is not a partial success we can trust: the
        // status said success, so it counts as full success (as an
        // undecodable one does).
        let (body, complete) = read_bounded(response, MAX_RESPONSE_BYTES).await;
        return Ok(if complete { body } else { Vec::new() });
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (text, _) = read_bounded(response, MAX_ERROR_TEXT_BYTES).await;
    let text: String = String::from_utf8_lossy(&text).chars().take(200).collect();
    Err(Attempt::Failed {
        verdict: retry::classify_http(status, retry_after.as_deref()),
        error: format!("HTTP {status} from {url}: {text}"),
    })
}

/// The largest success body read: a partial success names counts and one
/// message, far below this (the gRPC exporter's decode limit is the same).
pub(crate) const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// How much of an error response is read for the log line.
const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// Reads at most `limit` bytes of `response`'s body; `false` when there was
/// more (the rest is not read: a collector cannot make the agent buffer an
/// endless body) or the body broke off.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= limit => body.extend_from_slice(&chunk),
            Ok(None) => return (body, true),
            Ok(Some(_)) | Err(_) => return (body, false),
        }
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}
