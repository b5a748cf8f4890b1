//! The whole story with real parts: the engine on the real model, the agent
//! in its own process, a real OpenTelemetry collector (rotel), real requests.
//! Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, hex, http, records, span_field, wait_for_records,
    workspace_bin,
};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A chat request with a traceparent and known sampling parameters; returns
/// the response JSON.
fn traced_chat(engine: &Engine) -> serde_json::Value {
    let body = format!(
        r#"{{"model":"{}","messages":[{{"role":"user","content":"Say hello."}}],"max_tokens":6,"temperature":0,"top_p":0.9,"seed":11}}"#,
        engine.model
    );
    let response = http(
        engine.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("traceparent", TRACEPARENT),
        ],
        body.as_bytes(),
    )
    .expect("chat request");
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

/// Checks the SERVER span and its three children for the request `response`.
fn assert_request_spans(collector: &Collector, engine: &Engine, response: &serde_json::Value) {
    let segment = engine.segment();
    wait_for_records(&segment, 1);
    let record = *records(&segment)
        .iter()
        .find(|r| {
            response["id"]
                .as_str()
                .is_some_and(|id| id.ends_with(&hex(&r.request_id)))
        })
        .expect("the request's record");
    let span = collector.wait_for_span(&hex(&record.span_id), Duration::from_secs(30));
    assert_eq!(
        span_field(&span, "Trace ID"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(span_field(&span, "Parent ID"), Some("00f067aa0ba902b7"));
    assert_eq!(
        span_field(&span, "Name"),
        Some(format!("chat {}", engine.model).as_str())
    );
    assert_eq!(span_field(&span, "Kind"), Some("SPAN_KIND_SERVER"));
    let usage = &response["usage"];
    let (input, output) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    );
    let id = response["id"].as_str().expect("id");
    for attribute in [
        "gen_ai.operation.name: Str(chat)".to_owned(),
        format!("gen_ai.request.model: Str({})", engine.model),
        "gen_ai.request.max_tokens: Int(6)".to_owned(),
        "gen_ai.request.temperature: Double(0)".to_owned(),
        "gen_ai.request.top_p: Double(0.9)".to_owned(),
        "gen_ai.request.seed: Int(11)".to_owned(),
        format!("gen_ai.response.id: Str({id})"),
        format!("gen_ai.usage.input_tokens: Int({})", input.expect("usage")),
        format!(
            "gen_ai.usage.output_tokens: Int({})",
            output.expect("usage")
        ),
        format!("gen_ai.usage.prompt_tokens: Int({})", input.expect("usage")),
        format!(
            "gen_ai.usage.completion_tokens: Int({})",
            output.expect("usage")
        ),
        "gen_ai.latency.time_to_first_token:".to_owned(),
        "gen_ai.latency.time_in_queue:".to_owned(),
        "gen_ai.latency.e2e:".to_owned(),
        // The engine's API port, from the segment header (ABI 1.1).
        format!("server.port: Int({})", engine.port),
    ] {
        assert!(
            span.contains(&attribute),
            "missing {attribute:?} in\n{span}"
        );
    }
    let text = collector.text();
    for child in ["queue", "prefill", "decode"] {
        assert!(
            text.split("Span #")
                .any(|b| span_field(b, "Name") == Some(child)
                    && span_field(b, "Parent ID") == Some(hex(&record.span_id).as_str())),
            "no {child} child span under {}",
            hex(&record.span_id)
        );
    }
}

#[test]
fn the_engine_flag_starts_a_companion_agent_that_exports_over_grpc() {
    if !e2e_enabled("the_engine_flag_starts_a_companion_agent_that_exports_over_grpc") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let engine = Engine::start("companion", &["--otlp-traces-endpoint", &endpoint]);
    let response = traced_chat(&engine);
    assert_request_spans(&collector, &engine, &response);
}

#[test]
fn an_agent_attached_to_a_running_engine_exports_over_http_protobuf_and_backfills() {
    if !e2e_enabled(
        "an_agent_attached_to_a_running_engine_exports_over_http_protobuf_and_backfills",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    // The engine serves a request before any agent exists.
    let engine = Engine::start("late-agent", &[]);
    let early = traced_chat(&engine);
    let endpoint = format!("http://127.0.0.1:{}", collector.http_port);
    let _agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--backfill",
        "--protocol",
        "http/protobuf",
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "200",
    ]);
    assert_request_spans(&collector, &engine, &early);
}

#[test]
fn a_rejected_request_becomes_an_error_span() {
    if !e2e_enabled("a_rejected_request_becomes_an_error_span") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let engine = Engine::start("error-span", &["--otlp-traces-endpoint", &endpoint]);
    let response = http(
        engine.port,
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        format!(
            r#"{{"model":"{}","prompt":"x","temperature":9}}"#,
            engine.model
        )
        .as_bytes(),
    )
    .expect("bad request");
    assert_eq!(response.status, 400);
    let segment = engine.segment();
    wait_for_records(&segment, 1);
    let record = records(&segment)[0];
    let span = collector.wait_for_span(&hex(&record.span_id), Duration::from_secs(30));
    assert!(
        span.contains("STATUS_CODE_ERROR") || span.contains("Error"),
        "{span}"
    );
    assert!(span.contains("error.type: Str(invalid_request)"), "{span}");
}

/// How many times the collector received the span `span_id`.
fn received(collector: &Collector, span_id: &str) -> usize {
    collector
        .text()
        .split("Span #")
        .filter(|b| span_field(b, "ID") == Some(span_id))
        .count()
}

#[test]
fn an_agent_killed_and_restarted_between_requests_exports_each_span_exactly_once() {
    if !e2e_enabled("an_agent_killed_and_restarted_between_requests_exports_each_span_exactly_once")
    {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("agent-restart", &[]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let args = [
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ];
    let segment = engine.segment();

    let mut agent = Agent::start(&args);
    traced_chat(&engine);
    wait_for_records(&segment, 1);
    let first = hex(&records(&segment)[0].span_id);
    collector.wait_for_span(&first, Duration::from_secs(30));
    // Between requests: once the agent has settled the first (committed its
    // cursor past it). A kill between the collector's acknowledgement and
    // that commit may duplicate the batch (the documented at-least-once
    // window of agent/README.md "Delivery guarantee").
    let deadline = Instant::now() + Duration::from_secs(10);
    while segment.ring().control().read_cursor() < 1 {
        assert!(
            Instant::now() < deadline,
            "the agent never committed past the first request"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL: no flush, no goodbye; the cursor in the segment is all it leaves.
    agent.kill().expect("kill agent");
    agent.wait().expect("reap agent");
    traced_chat(&engine);
    wait_for_records(&segment, 2);
    let second = hex(&records(&segment)[1].span_id);
    let _agent = Agent::start(&args);
    collector.wait_for_span(&second, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        received(&collector, &first),
        1,
        "no duplicate after the restart"
    );
    assert_eq!(
        received(&collector, &second),
        1,
        "no loss across the restart"
    );
}

#[test]
fn tracing_off_in_the_control_word_means_no_spans_and_on_brings_them_back() {
    if !e2e_enabled("tracing_off_in_the_control_word_means_no_spans_and_on_brings_them_back") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let mut engine = Engine::start("agent-toggle", &["--otlp-traces-endpoint", &endpoint]);
    let pid = engine.pid();
    let segment = engine.segment();
    segment.ring().control().set_tracing_enabled(false);
    traced_chat(&engine);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        segment.ring().counters().head,
        0,
        "nothing written while off"
    );
    assert!(!collector.text().contains("Span #"), "no span while off");
    segment.ring().control().set_tracing_enabled(true);
    let response = traced_chat(&engine);
    assert_request_spans(&collector, &engine, &response);
    assert!(engine.running());
    assert_eq!(engine.pid(), pid, "same engine process throughout");
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

#[test]
fn the_tracing_cli_and_the_admin_api_switch_a_serving_engine_without_a_restart() {
    if !e2e_enabled("the_tracing_cli_and_the_admin_api_switch_a_serving_engine_without_a_restart") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("cli-toggle", &[]);
    let pid = engine.pid();
    let admin_port = ringside_tests::harness::free_port();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let admin = format!("127.0.0.1:{admin_port}");
    let agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
        "--admin-listen",
        &admin,
    ]);
    let segment = engine.segment();
    let head = || segment.ring().counters().head;
    let settle = || std::thread::sleep(Duration::from_millis(300));

    // Through the CLI, with no daemon involvement.
    agent_command(&["tracing", "off", "--engine", &engine.instance]);
    traced_chat(&engine);
    settle();
    assert_eq!(head(), 0, "no record while switched off by the CLI");
    let status = agent_command(&["tracing", "status", "--engine", &engine.instance]);
    assert!(status.contains(&engine.instance), "{status}");
    agent_command(&["tracing", "on", "--engine", &engine.instance]);
    let response = traced_chat(&engine);
    assert_request_spans(&collector, &engine, &response);

    // Through the agent's admin API.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(admin_port, "GET", "/healthz", &[], b"").map_or(true, |r| r.status != 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "admin API did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Authenticated on loopback too: the token the agent generated beside
    // its default state file, readable by its user (this test's) and root.
    let token_file = format!("/run/ringside/agent-{}.admin-token", agent.pid());
    let token = std::fs::read_to_string(&token_file).expect("the agent's token file");
    let bearer = format!("Bearer {}", token.trim());
    let put = |enabled: bool| {
        let body = format!(r#"{{"engine":"{}","enabled":{enabled}}}"#, engine.instance);
        let r = http(
            admin_port,
            "PUT",
            "/v1/tracing",
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
            body.as_bytes(),
        )
        .expect("PUT /v1/tracing");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    put(false);
    traced_chat(&engine);
    settle();
    assert_eq!(
        head(),
        1,
        "no record while switched off through the admin API"
    );
    put(true);
    traced_chat(&engine);
    wait_for_records(&segment, 2);
    let second = hex(&records(&segment)[1].span_id);
    collector.wait_for_span(&second, Duration::from_secs(30));

    assert!(engine.running());
    assert_eq!(engine.pid(), pid, "same engine process throughout");
    drop(agent);
    assert!(
        !std::path::Path::new(&token_file).exists(),
        "the generated token outlived the agent"
    );
}
