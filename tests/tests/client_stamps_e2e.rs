//! The record's stamps against a raw-socket client's own clock: TTFT and duration within 5 ms
//! of what the client sees (the span is built from these stamps). Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{Engine, e2e_enabled, hex, records, wait_for_records};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Sends a chat request; returns (response id hex, time to first content chunk / first byte,
/// time to last byte), measured from right after the request bytes were written.
fn timed_chat(engine: &Engine, stream: bool) -> (String, f64, f64) {
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": stream,
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         traceparent: 00-{:032x}-{:016x}-01\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        0x1234_u128 + u128::from(stream),
        0x55_u64,
        body.len()
    );
    let mut socket = TcpStream::connect(("127.0.0.1", engine.port)).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    socket.write_all(request.as_bytes()).expect("send");
    let start = Instant::now();
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
            // The first chunk with text (the role chunk before it has an empty content).
            let has_text = text
                .match_indices("\"content\":\"")
                .any(|(i, m)| !text[i + m.len()..].starts_with('"'));
            if !stream || has_text {
                first = Some(start.elapsed());
            }
        }
    }
    let last = start.elapsed();
    let text = String::from_utf8_lossy(&all);
    let at = text.find("chatcmpl-").expect("id");
    let id: String = text[at + 9..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (
        id,
        first.expect("a content chunk").as_secs_f64() * 1e3,
        last.as_secs_f64() * 1e3,
    )
}

#[test]
fn record_stamps_match_what_a_raw_client_sees() {
    if !e2e_enabled("record_stamps_match_what_a_raw_client_sees") {
        return;
    }
    let engine = Engine::start("stamps", &[]);
    let segment = engine.segment();
    let mut report = Vec::new();
    for (n, stream) in [(1, true), (2, false)] {
        let (id, first_ms, last_ms) = timed_chat(&engine, stream);
        wait_for_records(&segment, n);
        let record = records(&segment)
            .into_iter()
            .find(|r| hex(&r.request_id) == id)
            .unwrap_or_else(|| panic!("no record for {id}"));
        let t = record.timestamps;
        let ms = |ns: u64| (ns - t.arrival_ns) as f64 / 1e6;
        let ttft = ms(t.first_token_ns.expect("first token"));
        let duration = ms(t.finished_ns);
        report.push(format!(
            "stream={stream}: client first {first_ms:.2} ms last {last_ms:.2} ms; record ttft {ttft:.2} ms duration {duration:.2} ms"
        ));
        if stream {
            assert!((ttft - first_ms).abs() <= 5.0, "{report:?}");
        }
        assert!((duration - last_ms).abs() <= 5.0, "{report:?}");
    }
    eprintln!("{report:#?}");
}
