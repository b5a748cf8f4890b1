//! The stamps against a raw-socket client's own clock: TTFT and duration within 5 ms of what
//! the client sees, in the record, in the span a real collector received, and in the partial
//! timings of a crash span. Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, hex, records, send_raw_chat, server_span, span_double,
    timed_traced_chat, wait_for_records,
};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time: each compares an engine's stamps with a client's clock
/// within 5 ms, and three engines decoding at once on two cores delayed a
/// first chunk by a whole decode step of another engine (9 ms, seen in CI).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn record_stamps_match_what_a_raw_client_sees() {
    if !e2e_enabled("record_stamps_match_what_a_raw_client_sees") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("stamps", &[]);
    let segment = engine.segment();
    let mut report = Vec::new();
    for (n, stream) in [(1, true), (2, false)] {
        let view = timed_traced_chat(
            &engine,
            &format!("{:032x}", 0x1234_u128 + u128::from(stream)),
            stream,
        );
        let (id, first_ms, last_ms) = (view.response_id(), view.first_ms, view.last_ms);
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

/// (start, end) of a span block, ns since the epoch (rotel prints `Start time: <ns>`).
fn span_bounds(block: &str) -> (u64, u64) {
    let parse = |field: &str| {
        block
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(field)?
                    .strip_prefix(": ")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field:?} in\n{block}"))
    };
    (parse("Start time"), parse("End time"))
}

#[test]
fn exported_span_timings_match_what_a_raw_client_sees() {
    if !e2e_enabled("exported_span_timings_match_what_a_raw_client_sees") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("span-stamps", &[]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ]);
    // The agent attaches within a scan; requests before it would be history.
    std::thread::sleep(Duration::from_secs(2));
    let mut report = Vec::new();
    for (trace_id, stream) in [
        ("5a5a5a5a5a5a5a5a5a5a5a5a5a5a0001", true),
        ("5a5a5a5a5a5a5a5a5a5a5a5a5a5a0002", false),
    ] {
        let view = timed_traced_chat(&engine, trace_id, stream);
        let (sent_at, first_ms, last_ms) = (view.sent_at_ns, view.first_ms, view.last_ms);
        let span = server_span(&collector, trace_id);
        let (start, end) = span_bounds(&span);
        let duration = (end - start) as f64 / 1e6;
        let ttft = span_double(&span, "gen_ai.latency.time_to_first_token")
            .expect("time to first token")
            * 1e3;
        let start_offset = (start as f64 - sent_at as f64) / 1e6;
        report.push(format!(
            "stream={stream}: client first {first_ms:.2} ms last {last_ms:.2} ms; span ttft \
             {ttft:.2} ms duration {duration:.2} ms, starts {start_offset:+.2} ms from the send"
        ));
        if stream {
            assert!((ttft - first_ms).abs() <= 5.0, "{report:#?}\n{span}");
        }
        assert!((duration - last_ms).abs() <= 5.0, "{report:#?}\n{span}");
        // On the client's own wall clock too: where a trace view puts it.
        assert!(start_offset.abs() <= 5.0, "{report:#?}\n{span}");
    }
    eprintln!("{report:#?}");
}

#[test]
fn a_crash_span_s_partial_timings_match_what_the_client_had_received() {
    if !e2e_enabled("a_crash_span_s_partial_timings_match_what_the_client_had_received") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("crash-stamps", &["--parallel", "1"]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let trace_id = "c4a5c4a5c4a5c4a5c4a5c4a5c4a50001";
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "Count from one to five hundred, in words."}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": true,
    });
    let traceparent = format!("00-{trace_id}-00000000000000bb-01");
    let mut socket = send_raw_chat(engine.port, &body, &traceparent);
    let start = Instant::now();
    // Read content chunks as they come; kill the engine after 20.
    let mut seen = String::new();
    let mut first = None;
    let mut last_chunk = Duration::ZERO;
    let mut chunks = 0;
    let mut buf = [0u8; 4096];
    while chunks < 20 {
        let n = socket.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        let now = chunks_with_text(&seen);
        if now > chunks {
            chunks = now;
            last_chunk = start.elapsed();
            first.get_or_insert(last_chunk);
        }
    }
    engine.signal("KILL");
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest);
    let eof = start.elapsed();
    let span = server_span(&collector, trace_id);
    assert!(span.contains("error.type: Str(engine_crashed)"), "{span}");
    let (span_start, span_end) = span_bounds(&span);
    let duration = Duration::from_nanos(span_end - span_start);
    let ttft =
        span_double(&span, "gen_ai.latency.time_to_first_token").expect("time to first token");
    let first = first.expect("a first chunk");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = format!(
        "client: first {:.2} ms, 20th chunk {:.2} ms, eof {:.2} ms; span ttft {:.2} ms, duration {:.2} ms",
        ms(first),
        ms(last_chunk),
        ms(eof),
        ttft * 1e3,
        ms(duration)
    );
    assert!((ttft * 1e3 - ms(first)).abs() <= 5.0, "{report}\n{span}");
    // Its end is the engine's last sign of life: after the last token the
    // client got, before the connection dropped.
    assert!(
        ms(duration) >= ms(last_chunk) - 5.0 && ms(duration) <= ms(eof) + 5.0,
        "{report}\n{span}"
    );
    eprintln!("{report}");
}

/// Streamed chunks with text content in `text` so far.
fn chunks_with_text(text: &str) -> usize {
    text.match_indices("data: ")
        .filter(|(i, _)| {
            let line = text[*i..].lines().next().unwrap_or("");
            line.contains("\"content\":\"")
                && !line.contains("\"content\":\"\"")
                && line.ends_with('}')
        })
        .count()
}
