//! Incident capture with real parts: the engine on the real model, the agent
//! (`snapshot`, and the daemon's triggers) in its own process, rotel as the
//! collector, raw-socket clients with their own `traceparent`s (so that the
//! test chooses which requests head sampling keeps). Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, hex, http, records, span_blocks, span_field,
    wait_for_records, workspace_bin,
};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const PARENT: &str = "00f067aa0ba902b7";

/// A trace id for caller `n` whose randomness (its low 56 bits) a head
/// ratio of 0.5 keeps (`keep`) or drops.
fn trace_id(n: u64, keep: bool) -> String {
    let randomness = if keep {
        "f1f2f3f4f5f6f7"
    } else {
        "01020304050607"
    };
    format!("{:016x}00{randomness}", 0x7e57_0000_0000_0000u64 + n)
}

/// One request with its own traceparent: a short chat, or (`!valid`) one
/// refused as invalid (temperature 9: a 400 with an `invalid_request`
/// record). Returns the engine's `x-request-id`.
fn request(engine: &Engine, trace_id: &str, valid: bool) -> String {
    let temperature = if valid { 0 } else { 9 };
    let body = format!(
        r#"{{"model":"{}","messages":[{{"role":"user","content":"Say hello."}}],"max_tokens":4,"temperature":{temperature}}}"#,
        engine.model
    );
    let traceparent = format!("00-{trace_id}-{PARENT}-01");
    let response = http(
        engine.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("traceparent", &traceparent),
        ],
        body.as_bytes(),
    )
    .expect("chat request");
    assert_eq!(
        response.status,
        if valid { 200 } else { 400 },
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response
        .header("x-request-id")
        .expect("x-request-id")
        .to_owned()
}

/// What the test knows of one request: the trace id it sent and the span
/// id the engine gave it (from its record, found by the `x-request-id`).
#[derive(Clone, Debug)]
struct Sent {
    trace_id: String,
    span_id: String,
    valid: bool,
}

fn sent(engine: &Engine, trace_id: &str, valid: bool) -> Sent {
    let request_id = request(engine, trace_id, valid);
    let segment = engine.segment();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = records(&segment)
            .iter()
            .find(|r| hex(&r.request_id) == request_id)
        {
            assert_eq!(hex(&r.trace_id), trace_id, "the caller's trace id");
            return Sent {
                trace_id: trace_id.to_owned(),
                span_id: hex(&r.span_id),
                valid,
            };
        }
        assert!(
            Instant::now() < deadline,
            "no record for request {request_id}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The printed blocks of every span the collector received with `span_id`.
fn blocks_of(collector: &Collector, span_id: &str) -> Vec<String> {
    span_blocks(&collector.text())
        .into_iter()
        .filter(|b| span_field(b, "ID") == Some(span_id))
        .collect()
}

/// The children the collector received under `span_id`.
fn children_of(collector: &Collector, span_id: &str) -> Vec<String> {
    span_blocks(&collector.text())
        .into_iter()
        .filter(|b| span_field(b, "Parent ID") == Some(span_id))
        .collect()
}

fn reason_attribute(reason: &str) -> String {
    format!("ringside.capture.reason: Str({reason})")
}

/// Checks that `request` arrived exactly once, captured for `reason`: its
/// SERVER span (the caller's trace and parent) and, for a served request,
/// its three phase children, each marked.
fn assert_captured_once(collector: &Collector, request: &Sent, reason: &str) {
    let blocks = blocks_of(collector, &request.span_id);
    assert_eq!(
        blocks.len(),
        1,
        "{request:?} arrived {} times",
        blocks.len()
    );
    let span = &blocks[0];
    assert_eq!(
        span_field(span, "Trace ID"),
        Some(request.trace_id.as_str())
    );
    assert_eq!(span_field(span, "Parent ID"), Some(PARENT));
    assert_eq!(span_field(span, "Kind"), Some("SPAN_KIND_SERVER"));
    assert!(span.contains(&reason_attribute(reason)), "{span}");
    let children = children_of(collector, &request.span_id);
    let names: Vec<_> = children
        .iter()
        .filter_map(|c| span_field(c, "Name"))
        .collect();
    if request.valid {
        assert_eq!(names, ["queue", "prefill", "decode"], "phases detail");
    } else {
        assert!(names.is_empty(), "a rejected request has no phases");
    }
    for child in &children {
        assert!(child.contains(&reason_attribute(reason)), "{child}");
    }
}

/// Runs a `ringside-agent` subcommand to completion; panics with its output on failure.
fn agent_command(args: &[&str]) -> String {
    let output = Command::new(workspace_bin("ringside-agent"))
        .args(args)
        .output()
        .expect("agent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "ringside-agent {args:?} failed:\n{text}"
    );
    text
}

/// Waits until the daemon has committed its cursor up to `ticket` (every
/// record below it exported or sampled out).
fn wait_for_cursor(engine: &Engine, ticket: u64) {
    let segment = engine.segment();
    let deadline = Instant::now() + Duration::from_secs(20);
    while segment.ring().control().read_cursor() < ticket {
        assert!(
            Instant::now() < deadline,
            "the agent never settled {ticket} records"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon on `engine` exporting to `collector` with short batches and
/// discovery, then `extra`; its log kept.
fn daemon(engine: &Engine, collector: &Collector, extra: &[&str]) -> Agent {
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let mut args = vec![
        "--engine",
        engine.instance.as_str(),
        "--endpoint",
        endpoint.as_str(),
        "--batch-delay-ms",
        "100",
        "--discover-interval-ms",
        "200",
        "--admin-listen",
        "off",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start_logged(&args);
    agent.wait_for_log("attached", Duration::from_secs(20));
    agent
}

fn capture_lines(agent: &Agent) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("capture: the window's sampled-out requests are exported"))
        .count()
}

#[test]
fn snapshot_exports_the_window_head_sampling_dropped_marked_manual_without_moving_the_cursor() {
    if !e2e_enabled(
        "snapshot_exports_the_window_head_sampling_dropped_marked_manual_without_moving_the_cursor",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("snapshot", &[]);
    let _daemon = daemon(&engine, &collector, &[]);
    agent_command(&["set", "--engine", &engine.instance, "--head-sample", "0"]);
    // Two requests, then a pause longer than the margin below: outside --since.
    let old: Vec<Sent> = (0..2)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let window_start = Instant::now();
    let mut new: Vec<Sent> = (10..13)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    new.push(sent(&engine, &trace_id(13, false), false));
    wait_for_records(&engine.segment(), 6);
    wait_for_cursor(&engine, 6);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !collector.text().contains("Span #"),
        "head sampling at 0: the daemon exports nothing"
    );
    let cursor = engine.segment().ring().control().read_cursor();
    // The new requests, with a 1.5 s margin; the old ones ended 4 s before.
    let since_ms = window_start.elapsed().as_millis() + 1500;
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let out = agent_command(&[
        "snapshot",
        "--engine",
        &engine.instance,
        "--since",
        &format!("{since_ms}ms"),
        "--exporter",
        "otlp",
        "--endpoint",
        &endpoint,
    ]);
    assert!(out.contains("4 requests in the window exported"), "{out}");
    for request in &new {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    for request in &new {
        assert_captured_once(&collector, request, "manual");
    }
    for request in &old {
        assert!(
            blocks_of(&collector, &request.span_id).is_empty(),
            "{request:?} ended before --since"
        );
    }
    // 3 served requests with 3 phases each, one rejected: 13 spans, no more.
    let blocks = span_blocks(&collector.text());
    let is_step_trace = |b: &String| {
        matches!(
            span_field(b, "Name"),
            Some("ringside.capture" | "engine_step")
        )
    };
    assert_eq!(blocks.iter().filter(|b| !is_step_trace(b)).count(), 13);
    // The engine's steps of the window: one root, a child per step, in a
    // trace of its own.
    let roots: Vec<&String> = blocks
        .iter()
        .filter(|b| span_field(b, "Name") == Some("ringside.capture"))
        .collect();
    assert_eq!(roots.len(), 1, "one capture root");
    assert!(
        roots[0].contains(&reason_attribute("manual")),
        "{}",
        roots[0]
    );
    let root_id = span_field(roots[0], "ID").expect("root id");
    let steps: Vec<&String> = blocks
        .iter()
        .filter(|b| span_field(b, "Name") == Some("engine_step"))
        .collect();
    // Each served request took a prefill step and decode steps.
    assert!(steps.len() >= 3, "{} steps", steps.len());
    for step in &steps {
        assert_eq!(span_field(step, "Parent ID"), Some(root_id));
        assert_eq!(
            span_field(step, "Trace ID"),
            span_field(roots[0], "Trace ID")
        );
        assert!(step.contains("ringside.step.number: Int("), "{step}");
    }
    assert!(
        new.iter()
            .all(|r| span_field(roots[0], "Trace ID") != Some(r.trace_id.as_str()))
    );
    assert_eq!(
        engine.segment().ring().control().read_cursor(),
        cursor,
        "a snapshot never moves the daemon's cursor"
    );
}

#[test]
fn an_error_burst_captures_only_what_sampling_dropped_and_fires_once_per_incident() {
    if !e2e_enabled(
        "an_error_burst_captures_only_what_sampling_dropped_and_fires_once_per_incident",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("burst", &[]);
    let daemon = daemon(
        &engine,
        &collector,
        &[
            "--capture-error-burst",
            "4",
            "--capture-error-window",
            "3s",
            "--capture-cooldown",
            "60s",
            "--capture-window",
            "1m",
        ],
    );
    // Half the traces: the test's trace ids choose which.
    agent_command(&["set", "--engine", &engine.instance, "--head-sample", "0.5"]);
    let kept_ok: Vec<Sent> = (0..2)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    let dropped_ok: Vec<Sent> = (2..4)
        .map(|n| sent(&engine, &trace_id(n, false), true))
        .collect();
    for request in &kept_ok {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    assert_eq!(capture_lines(&daemon), 0, "no errors yet");
    // The burst: four errors, one of them kept by head sampling.
    let kept_error = sent(&engine, &trace_id(4, true), false);
    let dropped_errors: Vec<Sent> = (5..8)
        .map(|n| sent(&engine, &trace_id(n, false), false))
        .collect();
    let dropped: Vec<Sent> = dropped_ok.iter().chain(&dropped_errors).cloned().collect();
    for request in &dropped {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    for request in &dropped {
        assert_captured_once(&collector, request, "error_burst");
    }
    // What the daemon exported itself is not repeated.
    for request in kept_ok.iter().chain([&kept_error]) {
        let blocks = blocks_of(&collector, &request.span_id);
        assert_eq!(
            blocks.len(),
            1,
            "{request:?} arrived {} times",
            blocks.len()
        );
        assert!(
            !blocks[0].contains("ringside.capture.reason"),
            "{}",
            blocks[0]
        );
    }
    assert_eq!(capture_lines(&daemon), 1, "one capture for the burst");
    // The burst's window passes (the condition clears), then a second
    // burst inside the cool-down: the same incident, no second capture.
    std::thread::sleep(Duration::from_secs(4));
    let second: Vec<Sent> = (20..25)
        .map(|n| sent(&engine, &trace_id(n, false), false))
        .collect();
    wait_for_cursor(&engine, 13);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        capture_lines(&daemon),
        1,
        "a second burst inside the cool-down fires nothing; log:\n{}",
        daemon.log_text()
    );
    for request in &second {
        assert!(blocks_of(&collector, &request.span_id).is_empty());
    }
}

#[test]
fn killing_the_engine_captures_the_window_before_its_death() {
    if !e2e_enabled("killing_the_engine_captures_the_window_before_its_death") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("crash-capture", &[]);
    let daemon = daemon(&engine, &collector, &[]);
    agent_command(&["set", "--engine", &engine.instance, "--head-sample", "0"]);
    let requests: Vec<Sent> = (0..3)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    wait_for_cursor(&engine, 3);
    assert!(!collector.text().contains("Span #"));
    engine.signal("KILL");
    for request in &requests {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    for request in &requests {
        assert_captured_once(&collector, request, "engine_crashed");
    }
    assert_eq!(capture_lines(&daemon), 1, "{}", daemon.log_text());
}

#[test]
fn sigusr1_captures_the_window_once() {
    if !e2e_enabled("sigusr1_captures_the_window_once") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("signal-capture", &[]);
    let daemon = daemon(&engine, &collector, &[]);
    agent_command(&["set", "--engine", &engine.instance, "--head-sample", "0"]);
    let requests: Vec<Sent> = (0..2)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    wait_for_cursor(&engine, 2);
    assert!(!collector.text().contains("Span #"));
    let status = Command::new("kill")
        .args(["-s", "USR1", &daemon.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    for request in &requests {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    for request in &requests {
        assert_captured_once(&collector, request, "signal");
    }
    assert_eq!(capture_lines(&daemon), 1, "{}", daemon.log_text());
}

#[test]
fn a_ttft_p99_above_its_threshold_captures_once() {
    if !e2e_enabled("a_ttft_p99_above_its_threshold_captures_once") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("ttft-capture", &[]);
    // Every real request takes more than 1 ms to its first token: the p99
    // of three is above it once the third has ended.
    let daemon = daemon(
        &engine,
        &collector,
        &[
            "--capture-ttft-p99",
            "1ms",
            "--capture-ttft-min-requests",
            "3",
            "--capture-ttft-window",
            "1m",
        ],
    );
    agent_command(&["set", "--engine", &engine.instance, "--head-sample", "0"]);
    let requests: Vec<Sent> = (0..3)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    for request in &requests {
        collector.wait_for_span(&request.span_id, Duration::from_secs(30));
    }
    // Two more while the p99 stays above: the same incident, nothing more.
    let more: Vec<Sent> = (3..5)
        .map(|n| sent(&engine, &trace_id(n, true), true))
        .collect();
    wait_for_cursor(&engine, 5);
    std::thread::sleep(Duration::from_secs(2));
    for request in &requests {
        assert_captured_once(&collector, request, "ttft_p99");
    }
    for request in &more {
        assert!(blocks_of(&collector, &request.span_id).is_empty());
    }
    assert_eq!(capture_lines(&daemon), 1, "{}", daemon.log_text());
}
