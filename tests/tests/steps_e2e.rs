//! The per-step timeline against the outside view: the inter-token gaps the agent derives
//! from the engine's steps, compared with a streaming client's own clock between chunks, and
//! the prefill that made a gap, compared with what the other request's usage says. Real
//! engine, real agent, real rotel. Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, http, post_chat, send_raw_chat, server_span,
    span_double, span_int,
};
use std::io::Read;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// One engine at a time: the gap test compares the engine's stamps with a client's clock
/// within 5 ms, which another engine decoding on the same two cores would disturb.
static SERIAL: Mutex<()> = Mutex::new(());

/// A streaming chat request over a raw socket with its own trace id; returns when each
/// content chunk arrived (relative to the first) and the whole response. `started` gets a
/// message once `signal_after` chunks arrived.
fn stream_and_time(
    port: u16,
    model: &str,
    trace_id: &str,
    signal_after: usize,
    started: &mpsc::Sender<()>,
) -> Vec<Duration> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Count from 1 to 200, separated by commas and spaces."}],
        "max_tokens": 90,
        "temperature": 0,
        "stream": true,
    });
    let traceparent = format!("00-{trace_id}-00000000000000aa-01");
    let mut socket = send_raw_chat(port, &body, &traceparent);
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let mut arrivals = Vec::new();
    let mut counted = 0;
    loop {
        let n = socket.read(&mut buf).expect("read");
        let now = Instant::now();
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&all);
        // Every content delta with text so far (a role-only first delta has none).
        let with_text = text
            .match_indices("\"content\":\"")
            .filter(|(i, m)| !text[i + m.len()..].starts_with('"'))
            .count();
        for _ in counted..with_text {
            arrivals.push(now);
        }
        if counted < signal_after && with_text >= signal_after {
            let _ = started.send(());
        }
        counted = with_text;
    }
    let first = arrivals[0];
    arrivals.iter().map(|t| t.duration_since(first)).collect()
}

fn double(block: &str, key: &str) -> f64 {
    span_double(block, key).unwrap_or_else(|| panic!("no {key} in\n{block}"))
}

fn int(block: &str, key: &str) -> u64 {
    span_int(block, key)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| panic!("no {key} in\n{block}"))
}

fn nearest_rank(sorted: &[f64], p: usize) -> f64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[test]
fn inter_token_gaps_match_a_streaming_client_and_a_long_prefill_shows_in_them() {
    if !e2e_enabled("inter_token_gaps_match_a_streaming_client_and_a_long_prefill_shows_in_them") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("steps-itl", &["--parallel", "2", "--no-prompt-cache"]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let admin_port = ringside_tests::harness::free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
        "--metrics-interval-ms",
        "500",
        "--admin-listen",
        &admin,
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let trace_a = "17171717171717171717171717170001";
    let trace_b = "17171717171717171717171717170002";
    let (started_tx, started_rx) = mpsc::channel();
    let (port, model) = (engine.port, engine.model.clone());
    let streaming =
        std::thread::spawn(move || stream_and_time(port, &model, trace_a, 10, &started_tx));
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the streaming request's first chunks");
    // A long prompt while the stream decodes: its prefill shares the stream's steps.
    let long_prompt =
        "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(90);
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": long_prompt}],
        "max_tokens": 1,
    });
    let traceparent = format!("00-{trace_b}-00000000000000bb-01");
    let b = post_chat(engine.port, &body, Some(&traceparent)).expect("the long request");
    assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
    let arrivals = streaming.join().expect("the streaming client");
    let b_prompt_tokens = b.json()["usage"]["prompt_tokens"]
        .as_u64()
        .expect("the long request's prompt tokens");

    let span = server_span(&collector, trace_a);
    let tokens = int(&span, "gen_ai.usage.output_tokens");
    assert_eq!(
        arrivals.len() as u64,
        tokens,
        "one content chunk per token\n{span}"
    );
    let mut client: Vec<f64> = arrivals
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    client.sort_by(f64::total_cmp);
    let ours = [
        double(&span, "ringside.inter_token.max"),
        double(&span, "ringside.inter_token.p50"),
        double(&span, "ringside.inter_token.p99"),
    ];
    let theirs = [
        *client.last().expect("gaps"),
        nearest_rank(&client, 50),
        nearest_rank(&client, 99),
    ];
    let report = format!(
        "span max/p50/p99 {ours:?} s, client {theirs:?} s over {} gaps",
        client.len()
    );
    eprintln!("{report}");
    for (o, t) in ours.iter().zip(theirs) {
        assert!((o - t).abs() <= 0.005, "{report}\n{span}");
    }
    // The prefill stalled the stream: the largest gap stands out, and every prompt token of
    // the long request was computed in steps that also decoded the stream.
    assert!(ours[0] > 3.0 * ours[1], "{report}");
    assert_eq!(
        int(&span, "ringside.batch.prefill_tokens"),
        b_prompt_tokens,
        "{span}"
    );
    assert!(int(&span, "ringside.batch.prefill_steps") >= 2, "{span}");
    assert!(
        span.contains("Name: scheduled") && span.contains("Name: first_token"),
        "the phase events\n{span}"
    );
    // Every gap is in the histogram (the long request had one token: no gap), in the bucket
    // the client's own gap falls in: at each boundary with no client gap within 5 ms of it,
    // the cumulative counts agree.
    let token_file = format!("/run/ringside/agent-{}.admin-token", agent.pid());
    let token = std::fs::read_to_string(&token_file).expect("the agent's token file");
    let bearer = format!("Bearer {}", token.trim());
    let scrape = http(
        admin_port,
        "GET",
        "/metrics",
        &[("authorization", &bearer)],
        b"",
    )
    .expect("GET /metrics");
    assert_eq!(scrape.status, 200);
    let text = String::from_utf8_lossy(&scrape.body).into_owned();
    let mut compared = 0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("ringside_server_inter_token_duration_seconds_bucket"))
    {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
        let count: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
        let Some(Ok(bound)) = le.filter(|l| *l != "+Inf").map(str::parse::<f64>) else {
            assert_eq!(count, client.len(), "{line}");
            continue;
        };
        if client.iter().any(|g| (g - bound).abs() <= 0.005) {
            continue;
        }
        let theirs = client.iter().filter(|g| **g <= bound).count();
        assert_eq!(count, theirs, "at {bound} s: {line}\n{report}");
        compared += 1;
    }
    assert!(compared >= 10, "too few unambiguous boundaries in\n{text}");
    for name in [
        "ringside_server_step_duration_seconds_count",
        "ringside_server_step_batch_size_bucket",
        "ringside_server_kv_cache_usage",
        "ringside_server_slots_total",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }
    // And the same through OTLP, to a real collector.
    collector.wait_for("the inter-token histogram", Duration::from_secs(30), |t| {
        t.contains("ringside.server.inter_token.duration")
    });
}

/// Every step record the engine left in its ring, decoded.
fn steps_of(engine: &Engine) -> Vec<ringside_shm_protocol::Step> {
    let ring = engine.segment().steps().expect("a step ring");
    let mut steps = Vec::new();
    ring.consumer(ringside_shm_protocol::StartAt::Oldest)
        .poll(usize::MAX, |_, raw| {
            steps.push(raw.decode().expect("a valid step record"));
        })
        .expect("poll the step ring");
    steps
}

#[test]
fn one_step_per_token_of_a_lone_request_recorded_only_while_tracing_is_on() {
    if !e2e_enabled("one_step_per_token_of_a_lone_request_recorded_only_while_tracing_is_on") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start(
        "steps-count",
        &["--parallel", "2", "--tracing", "off", "--no-prompt-cache"],
    );
    let chat = |max_tokens: u32| {
        let body = serde_json::json!({
            "model": engine.model,
            "messages": [{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        let r = post_chat(engine.port, &body, None).expect("a chat request");
        assert_eq!(r.status, 200);
        r.json()
    };
    chat(8);
    assert!(
        steps_of(&engine).is_empty(),
        "no steps while tracing is off"
    );
    let segment = engine.segment();
    segment.ring().control().set_tracing_enabled(true);
    let response = chat(20);
    let usage = &response["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(response["choices"][0]["finish_reason"], "length");
    let steps = steps_of(&engine);
    // The prompt in 64-token chunks (the last one samples the first token), then one decode
    // step per further token; numbered without a gap.
    let prefill: u64 = steps.iter().map(|s| u64::from(s.prefill_tokens)).sum();
    let decode_steps = steps.iter().filter(|s| s.decode_calls > 0).count() as u64;
    assert_eq!(prefill, prompt, "{steps:#?}");
    assert_eq!(decode_steps, completion - 1, "{steps:#?}");
    assert!(steps.windows(2).all(|w| w[1].step == w[0].step + 1));
    for s in &steps {
        assert_eq!(s.slots_total, 2);
        assert_eq!(s.slots_occupied, 1);
        assert_eq!(s.kv_cells_total, 2 * 4096);
        assert!(s.kv_cells_used <= (prompt + completion) as u32);
        assert_eq!(s.batch_sequences(), 1);
        // Two slots decode as one group of two rows: one is the idle slot's placeholder.
        assert!(s.decode_calls == 0 || s.decode_rows == 2, "{s:?}");
    }
    // The request record names the slot its steps carry.
    let record = ringside_tests::harness::records(&segment)
        .into_iter()
        .last()
        .expect("the traced request's record");
    let slot = record.sequence_slot.expect("a sequence slot");
    assert!(
        steps
            .iter()
            .all(|s| s.decode_slots.contains(slot) || s.prefill_slots.contains(slot))
    );
}

#[test]
fn an_engine_started_without_a_step_ring_serves_and_its_spans_have_no_gap_statistics() {
    if !e2e_enabled(
        "an_engine_started_without_a_step_ring_serves_and_its_spans_have_no_gap_statistics",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("steps-none", &["--step-ring-capacity", "0"]);
    assert!(engine.segment().steps().is_none());
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&["--engine", &engine.instance, "--endpoint", &endpoint]);
    std::thread::sleep(Duration::from_secs(2));
    let trace = "17171717171717171717171717170003";
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "Count from 1 to 10."}],
        "max_tokens": 8,
    });
    let traceparent = format!("00-{trace}-00000000000000cc-01");
    let r = post_chat(engine.port, &body, Some(&traceparent)).expect("a chat request");
    assert_eq!(r.status, 200);
    let span = server_span(&collector, trace);
    assert!(!span.contains("ringside.inter_token"), "{span}");
    assert!(span.contains("Name: first_token"), "{span}");
}
