//! Raw HTTP/1.1 clients: every byte under the test's control, timed like a client.

use super::Engine;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A raw HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `Connection: close` and reads the whole response:
/// raw on purpose, so tests control every byte (bad content types, broken
/// JSON, oversized bodies).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // The server may answer (413) before reading a large body; ignore a reset.
    let _ = stream.write_all(body);
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_owned();
            chunked |= name == "transfer-encoding" && value.contains("chunked");
            headers.push((name, value));
        }
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    let body = if chunked { dechunk(&raw) } else { raw };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..pos])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        raw = &raw[pos + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Posts a JSON chat body (with `traceparent`, if given) and reads the whole response.
pub fn post_chat(
    port: u16,
    body: &serde_json::Value,
    traceparent: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(t) = traceparent {
        headers.push(("traceparent", t));
    }
    http(
        port,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().as_bytes(),
    )
}

/// What a raw-socket client saw of one request ([`timed_traced_chat`]).
#[derive(Debug)]
pub struct ClientView {
    /// Wall clock when the request was written, ns since the epoch.
    pub sent_at_ns: u64,
    /// Time to the first content chunk (streamed) or the first byte, ms.
    pub first_ms: f64,
    /// Time to the last byte, ms.
    pub last_ms: f64,
    /// The whole response, head and body.
    pub response: String,
}

impl ClientView {
    /// The response's id (`chatcmpl-<hex>`), as hex.
    pub fn response_id(&self) -> String {
        let at = self.response.find("chatcmpl-").expect("a response id");
        self.response[at + 9..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect()
    }
}

/// Writes a chat request with `traceparent` on a fresh loopback socket (no
/// Nagle delay, `Connection: close`) and returns the socket to read the
/// response from, as a client timing it would.
pub fn send_raw_chat(port: u16, body: &serde_json::Value, traceparent: &str) -> TcpStream {
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         traceparent: {traceparent}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    socket.write_all(request.as_bytes()).expect("send");
    socket
}

/// Sends a chat request over a raw socket with its own trace id (parent span
/// `aa`), the way a client measures it, timed from right after the request
/// bytes were written.
pub fn timed_traced_chat(engine: &Engine, trace_id: &str, stream: bool) -> ClientView {
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": stream,
    });
    let traceparent = format!("00-{trace_id}-00000000000000aa-01");
    let mut socket = send_raw_chat(engine.port, &body, &traceparent);
    let start = Instant::now();
    let sent_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let mut all = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        if first.is_none() {
            let text = String::from_utf8_lossy(&all);
            let has_text = text
                .match_indices("\"content\":\"")
                .any(|(i, m)| !text[i + m.len()..].starts_with('"'));
            if !stream || has_text {
                first = Some(start.elapsed());
            }
        }
    }
    let last = start.elapsed();
    ClientView {
        sent_at_ns: sent_at,
        first_ms: first.expect("a content chunk").as_secs_f64() * 1e3,
        last_ms: last.as_secs_f64() * 1e3,
        response: String::from_utf8_lossy(&all).into_owned(),
    }
}
