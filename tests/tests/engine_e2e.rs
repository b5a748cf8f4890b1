//! The real engine on the real default model, driven by the official OpenAI
//! Python client and by raw HTTP; every response is checked against the
//! record the engine wrote into its ring. Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_shm_protocol::{ErrorType, FinishReason, Operation, RecordKind, RequestRecord};
use ringside_tests::harness::{Engine, e2e_enabled, hex, http, records, wait_for_records};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

/// One engine at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn by_request_id(records: &[RequestRecord]) -> HashMap<String, RequestRecord> {
    records.iter().map(|r| (hex(&r.request_id), *r)).collect()
}

fn id_hex(response_id: &str) -> &str {
    response_id.rsplit('-').next().unwrap_or(response_id)
}

#[test]
fn openai_client_responses_match_the_records_in_the_ring() {
    if !e2e_enabled("openai_client_responses_match_the_records_in_the_ring") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // With the prompt cache on: the seed check below must hold when a prefix is reused
    // (issue 12; see identical_requests_give_identical_text_with_the_prompt_cache_under_load).
    let engine = Engine::start("basic", &["--parallel", "2"]);
    let responses = engine.openai_client(&["basic"]);
    assert_eq!(responses.len(), 10);
    let segment = engine.segment();
    wait_for_records(&segment, 10);
    let ring = by_request_id(&records(&segment));
    let mut traced = 0;
    for response in &responses {
        let id = response["id"].as_str().expect("id");
        let record = ring
            .get(id_hex(id))
            .unwrap_or_else(|| panic!("no record for {id}"));
        assert_eq!(record.kind, RecordKind::RequestFinished, "{id}");
        assert_eq!(record.http_status, 200, "{id}");
        assert_eq!(record.error_type, ErrorType::None, "{id}");
        let operation = match response["operation"].as_str() {
            Some("chat") => Operation::Chat,
            _ => Operation::TextCompletion,
        };
        assert_eq!(record.operation, operation, "{id}");
        assert_eq!(
            u64::from(record.prompt_tokens),
            response["prompt_tokens"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(record.completion_tokens),
            response["completion_tokens"].as_u64().unwrap(),
            "{id}: the record counts the tokens the client got"
        );
        assert_eq!(
            record.finish_reason.as_str(),
            response["finish_reason"].as_str(),
            "{id}"
        );
        assert_eq!(record.stream, response["stream"].as_bool().unwrap(), "{id}");
        let t = record.timestamps;
        let scheduled = t.scheduled_ns.expect("scheduled");
        let first = t.first_token_ns.expect("first token");
        let last = t.last_token_ns.expect("last token");
        assert!(t.arrival_ns <= scheduled && scheduled <= first && first <= last);
        assert!(last <= t.finished_ns);
        if let Some(traceparent) = response["traceparent"].as_str() {
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(
                hex(&record.trace_id),
                parts[1],
                "trace id from the traceparent"
            );
            assert_eq!(
                record.parent_span_id.map(|p| hex(&p)).as_deref(),
                Some(parts[2])
            );
            assert_eq!(record.trace_flags, 1);
            traced += 1;
        } else {
            assert_eq!(
                record.parent_span_id, None,
                "{id}: no caller span without traceparent"
            );
        }
        assert_ne!(record.span_id, [0; 8]);
    }
    assert_eq!(traced, 1);
    let trace_ids: std::collections::HashSet<_> = ring.values().map(|r| r.trace_id).collect();
    assert_eq!(
        trace_ids.len(),
        ring.len(),
        "each untraced request starts its own trace"
    );
}

#[test]
fn eight_clients_on_four_slots_all_finish_and_decode_together() {
    if !e2e_enabled("eight_clients_on_four_slots_all_finish_and_decode_together") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("batch", &["--parallel", "4"]);
    let responses = engine.openai_client(&["concurrent", "8"]);
    assert_eq!(responses.len(), 8);
    let segment = engine.segment();
    wait_for_records(&segment, 8);
    let recs = records(&segment);
    assert_eq!(recs.len(), 8);
    assert!(
        recs.iter()
            .all(|r| r.http_status == 200 && r.completion_tokens == 24)
    );
    // Sweep the decode intervals: how many sequences were decoding at once.
    let mut events: Vec<(u64, i32)> = recs
        .iter()
        .flat_map(|r| {
            let t = r.timestamps;
            [
                (t.first_token_ns.unwrap(), 1),
                (t.last_token_ns.unwrap(), -1),
            ]
        })
        .collect();
    events.sort_by_key(|&(at, delta)| (at, -delta));
    let (mut now, mut most) = (0, 0);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    eprintln!("decode intervals overlapping at most: {most}");
    assert!(
        most >= 2,
        "continuous batching: decode intervals must overlap"
    );
    assert!(most <= 4, "never more sequences than --parallel");
    let most_running = recs.iter().map(|r| r.running).max().unwrap_or(0);
    assert!(most_running <= 4);
}

/// POSTs a chat request; returns the response body.
fn chat(engine: &Engine, messages: &serde_json::Value) -> serde_json::Value {
    let body = serde_json::json!({
        "model": engine.model,
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
    });
    post_ok(engine.port, "/v1/chat/completions", &body)
}

/// POSTs `body` as JSON to `path`; asserts a 200 and returns the response body.
fn post_ok(port: u16, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let response = http(
        port,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

#[test]
fn a_conversations_next_turn_reuses_its_prompt_from_the_kv_cache() {
    if !e2e_enabled("a_conversations_next_turn_reuses_its_prompt_from_the_kv_cache") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("prompt-cache", &["--parallel", "2"]);
    let mut messages = serde_json::json!([
        {"role": "system", "content": "You are a terse assistant working for a travel agency. \
            Answer in one short sentence, name the city first, never add a greeting, never \
            apologise, never ask a question back, and keep every answer under twenty words \
            so that it fits on the screen of the small kiosk in the agency's front window."},
        {"role": "user", "content": "What is the capital of France?"},
    ]);
    let first = chat(&engine, &messages);
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!(
        first["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "nothing to reuse yet"
    );
    let reply = first["choices"][0]["message"]["content"].clone();
    let turns = messages.as_array_mut().expect("array");
    turns.push(serde_json::json!({"role": "assistant", "content": reply}));
    turns.push(serde_json::json!({"role": "user", "content": "And of Italy?"}));
    let second = chat(&engine, &messages);
    let second_prompt = second["usage"]["prompt_tokens"].as_u64().expect("usage");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    // The first turn's whole prompt is a prefix of the second's; the cache reuses it in
    // whole chunks of 64 tokens (what follows is computed as a fresh request computes it).
    assert!(
        first_prompt >= 64,
        "the test needs a first prompt of a chunk or more"
    );
    assert!(
        cached.is_multiple_of(64) && cached >= first_prompt / 64 * 64 && cached < second_prompt,
        "cached {cached} of {second_prompt}; the first prompt had {first_prompt}"
    );
    // An unrelated prompt shares only the template's opening tokens: no whole chunk.
    let other = chat(
        &engine,
        &serde_json::json!([{"role": "user", "content": "Count to five."}]),
    );
    let other_cached = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert_eq!(other_cached, 0);
    // The ring records what the client was told.
    let segment = engine.segment();
    wait_for_records(&segment, 3);
    let ring = by_request_id(&records(&segment));
    for (response, expected) in [(&first, 0), (&second, cached), (&other, other_cached)] {
        let id = response["id"].as_str().expect("id");
        let record = ring.get(id_hex(id)).expect("record");
        assert_eq!(u64::from(record.cached_prompt_tokens), expected, "{id}");
    }
}

/// POSTs a text completion; returns the response body.
fn complete(port: u16, body: &serde_json::Value) -> serde_json::Value {
    post_ok(port, "/v1/completions", body)
}

/// Issue 12: with the prompt cache a reused prefix was computed in other llama.cpp calls
/// than a fresh request computes it, and a request's rows went through other kernels
/// depending on what else was decoded with them; the rounding tipped greedy and seeded
/// tokens. Identical requests, fired together and among other traffic (some sharing their
/// prefix, so the cache holds it from other prompts), must return identical text.
#[test]
fn identical_requests_give_identical_text_with_the_prompt_cache_under_load() {
    if !e2e_enabled("identical_requests_give_identical_text_with_the_prompt_cache_under_load") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("repro", &["--parallel", "4"]);
    let port = engine.port;
    let model = engine.model.clone();
    // Long enough (> 2 prompt chunks) for the cache to reuse whole chunks of it.
    let story = "The lighthouse keeper climbed the stairs every evening at dusk, counting the \
        steps as his father had taught him, and lit the great lamp that warned the fishing \
        boats away from the rocks below. One winter night a storm rolled in from the north, \
        the waves rose higher than the harbour wall, and a small boat with a torn sail \
        drifted towards the reef while its crew shouted into the wind. ";
    let prompt = format!("{story}The keeper ran down to the shore and");
    let body = |k: usize| {
        if k.is_multiple_of(2) {
            serde_json::json!({"model": model, "prompt": prompt,
                "max_tokens": 24, "temperature": 0})
        } else {
            serde_json::json!({"model": model, "prompt": prompt,
                "max_tokens": 24, "temperature": 1.0, "seed": 7})
        }
    };
    // First alone, on an idle engine: the greedy one computed in full, the seeded one
    // reusing its chunks.
    let mut greedy = vec![complete(port, &body(0))];
    let mut seeded = vec![complete(port, &body(1))];
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Other traffic all along: prompts that share the story and differ after it, short
        // unrelated ones, different lengths and sampling.
        for t in 0..2u64 {
            let (stop, model, story) = (&stop, &model, story);
            scope.spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let prompt = if (n + t).is_multiple_of(2) {
                        format!("{story}Then, request {t}.{n}, the keeper")
                    } else {
                        format!("Request {t}.{n}: list some animals:")
                    };
                    complete(
                        port,
                        &serde_json::json!({"model": model, "prompt": prompt,
                            "max_tokens": 6 + (n * 7 + t * 3) % 20, "temperature": 0.8}),
                    );
                }
            });
        }
        for _ in 0..3 {
            let handles: Vec<_> = (0..4)
                .map(|k| {
                    let body = body(k);
                    scope.spawn(move || (k, complete(port, &body)))
                })
                .collect();
            for handle in handles {
                let (k, response) = handle.join().expect("request thread");
                if k.is_multiple_of(2) {
                    greedy.push(response);
                } else {
                    seeded.push(response);
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let text = |r: &serde_json::Value| r["choices"][0]["text"].as_str().expect("text").to_owned();
    for (what, responses) in [("temperature 0", &greedy), ("seed 7", &seeded)] {
        let first = text(&responses[0]);
        for r in responses.iter() {
            assert_eq!(text(r), first, "{what}: identical requests, different text");
        }
    }
    // The repeats really took the paths that used to differ: some reused cached chunks,
    // some were computed in full, and some decoded alongside other requests.
    let all: Vec<&serde_json::Value> = greedy.iter().chain(&seeded).collect();
    let cached: Vec<u64> = all
        .iter()
        .map(|r| {
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached")
        })
        .collect();
    assert!(
        cached.iter().any(|&c| c > 0),
        "no repeat reused the cache: {cached:?}"
    );
    assert_eq!(cached[0], 0, "the first request had nothing to reuse");
    let segment = engine.segment();
    let ring = by_request_id(&records(&segment));
    let running: Vec<u16> = all
        .iter()
        .map(|r| {
            let id = r["id"].as_str().expect("id");
            ring.get(id_hex(id)).expect("record").running
        })
        .collect();
    assert!(
        running.iter().any(|&n| n >= 3),
        "never ran among others: {running:?}"
    );
}

#[test]
fn under_systemd_the_engine_is_ready_once_its_model_is_loaded_and_says_when_it_stops() {
    if !e2e_enabled(
        "under_systemd_the_engine_is_ready_once_its_model_is_loaded_and_says_when_it_stops",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // What systemd gives a Type=notify unit: a datagram socket in $NOTIFY_SOCKET.
    let path = std::env::temp_dir().join(format!("ringside-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let receive = || {
        let mut buf = [0u8; 512];
        socket
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // With a companion agent: its own notifications must not reach systemd
    // (NotifyAccess=main would refuse and log them).
    let engine = Engine::start_with_env(
        "notify",
        &["--otlp-traces-endpoint", "http://127.0.0.1:9"],
        &[("NOTIFY_SOCKET", path.to_str().expect("utf-8 path"))],
    );
    let ready = receive().expect("READY=1 once the model is loaded");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l == "STATUS=serving"), "{ready:?}");
    drop(engine); // SIGTERM, then wait for the exit
    let stopping = receive().expect("STOPPING=1 on SIGTERM");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        receive().is_err(),
        "nothing else: the companion agent does not inherit the socket"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn tracing_switched_off_in_the_segment_stops_records_and_on_brings_them_back() {
    if !e2e_enabled("tracing_switched_off_in_the_segment_stops_records_and_on_brings_them_back") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::start("toggle", &["--parallel", "1"]);
    let pid = engine.pid();
    let segment = engine.segment();
    let control = segment.ring().control();
    engine.openai_client(&["one"]);
    wait_for_records(&segment, 1);
    control.set_tracing_enabled(false);
    engine.openai_client(&["one"]);
    engine.openai_client(&["one"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        segment.ring().counters().head,
        1,
        "no records while tracing is off"
    );
    control.set_tracing_enabled(true);
    let responses = engine.openai_client(&["one"]);
    wait_for_records(&segment, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        segment.ring().counters().head,
        2,
        "exactly one record once on again"
    );
    let recs = records(&segment);
    assert_eq!(
        hex(&recs[1].request_id),
        id_hex(responses[0]["id"].as_str().unwrap())
    );
    assert!(engine.running());
    assert_eq!(engine.pid(), pid, "same engine process throughout");
}

#[test]
fn bad_input_gets_the_right_status_and_a_record_and_the_engine_keeps_serving() {
    if !e2e_enabled("bad_input_gets_the_right_status_and_a_record_and_the_engine_keeps_serving") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start(
        "badinput",
        &[
            "--parallel",
            "1",
            "--ctx-size",
            "256",
            "--api-key",
            "sk-test",
        ],
    );
    let auth = ("authorization", "Bearer sk-test");
    let json = ("content-type", "application/json");
    let chat = "/v1/chat/completions";
    let model = engine.model.clone();
    let body = |extra: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    let long_prompt = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "hello ".repeat(600)
    );
    let oversized = vec![b' '; 5 * 1024 * 1024];
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "invalid json",
            vec![auth, json],
            b"{not json".to_vec(),
            400,
            "",
        ),
        (
            "wrong content type",
            vec![auth, ("content-type", "text/plain")],
            body("").into(),
            415,
            "",
        ),
        ("oversized body", vec![auth, json], oversized, 413, ""),
        (
            "unknown model",
            vec![auth, json],
            br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "model",
        ),
        (
            "empty messages",
            vec![auth, json],
            format!(r#"{{"model":"{model}","messages":[]}}"#).into(),
            400,
            "messages",
        ),
        (
            "negative max_tokens",
            vec![auth, json],
            body(r#","max_tokens":-1"#).into(),
            400,
            "max_tokens",
        ),
        (
            "temperature out of range",
            vec![auth, json],
            body(r#","temperature":5"#).into(),
            400,
            "temperature",
        ),
        (
            "n other than 1",
            vec![auth, json],
            body(r#","n":2"#).into(),
            400,
            "n",
        ),
        (
            "prompt over the context",
            vec![auth, json],
            long_prompt.into(),
            400,
            "context",
        ),
        (
            "wrong api key",
            vec![("authorization", "Bearer nope"), json],
            body("").into(),
            401,
            "",
        ),
        ("missing api key", vec![json], body("").into(), 401, ""),
    ];
    let mut expected_statuses = Vec::new();
    for (what, headers, payload, status, mention) in &cases {
        let response = http(engine.port, "POST", chat, headers, payload).expect(what);
        assert_eq!(
            response.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&response.body)
        );
        let error = &response.json()["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
        if !mention.is_empty() {
            let text = format!("{} {}", error["param"], error["message"]);
            assert!(
                text.contains(mention),
                "{what}: error should name {mention:?}: {error}"
            );
        }
        expected_statuses.push(*status);
    }
    // A malformed traceparent does not fail the request: a new trace starts.
    let bad_parent = (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    );
    let ok = http(
        engine.port,
        "POST",
        chat,
        &[auth, json, bad_parent],
        body(r#","max_tokens":2"#).as_bytes(),
    )
    .expect("request with a bad traceparent");
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    // And the engine still serves normally.
    let after = http(
        engine.port,
        "POST",
        "/v1/completions",
        &[auth, json],
        format!(r#"{{"model":"{model}","prompt":"Hi","max_tokens":2}}"#).as_bytes(),
    )
    .expect("after");
    assert_eq!(after.status, 200);

    // /metrics counts them, in a form promtool accepts.
    let metrics = http(engine.port, "GET", "/metrics", &[], b"").expect("/metrics");
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains(r#"operation="chat",status="401"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"operation="chat",status="400"}"#), "{text}");
    promtool_accepts(&text);

    let segment = engine.segment();
    wait_for_records(&segment, cases.len() as u64 + 2);
    let recs = records(&segment);
    let rejected: Vec<u16> = recs
        .iter()
        .filter(|r| r.kind == RecordKind::RequestRejected)
        .map(|r| r.http_status)
        .collect();
    let mut want = expected_statuses.clone();
    want.sort_unstable();
    let mut got = rejected.clone();
    got.sort_unstable();
    assert_eq!(
        got, want,
        "one rejection record per refused request, with its status"
    );
    let traced = recs
        .iter()
        .find(|r| r.http_status == 200)
        .expect("the bad-traceparent request");
    assert_eq!(traced.parent_span_id, None);
    assert_ne!(hex(&traced.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn a_client_that_disconnects_frees_its_slot_at_once() {
    if !e2e_enabled("a_client_that_disconnects_frees_its_slot_at_once") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let engine = Engine::start("abort", &["--parallel", "1"]);
    let body = format!(
        r#"{{"model":"{}","prompt":"Tell me a very long story.","max_tokens":3000,"stream":true}}"#,
        engine.model
    );
    {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", engine.port)).unwrap();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Wait until tokens are flowing, then hang up.
        let mut buf = [0u8; 2048];
        let mut seen = 0;
        while seen < 1500 {
            seen += stream.read(&mut buf).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let responses = engine.openai_client(&["one"]);
    let segment = engine.segment();
    wait_for_records(&segment, 2);
    let recs = records(&segment);
    let aborted = recs
        .iter()
        .find(|r| r.finish_reason == FinishReason::Abort)
        .expect("abort record");
    assert_eq!(aborted.error_type, ErrorType::ClientDisconnected);
    assert!(aborted.completion_tokens < 3000);
    let next = by_request_id(&recs)[id_hex(responses[0]["id"].as_str().unwrap())];
    let waited_ms = next.queue_ns().unwrap() / 1_000_000;
    // The aborted request had ~3000 tokens to go (over a minute here): the
    // next one got the slot without waiting for them.
    assert!(
        waited_ms < 5_000,
        "next request waited {waited_ms} ms for the slot"
    );
}

/// `promtool check metrics` (Debian package prometheus) accepts the page.
fn promtool_accepts(page: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/setup.sh does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{page}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
