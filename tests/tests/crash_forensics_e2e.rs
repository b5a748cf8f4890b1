//! Telemetry that outlives the engine: the requests a killed, crashed or
//! wedged engine held are still seen, from its segment's in-flight table.
//! Real engine on the real model, the agent in its own process, rotel as the
//! collector, raw-socket clients with their own `traceparent`s. Needs
//! `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, free_port, span_blocks, span_field, workspace_bin,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// A client's caller span: trace id and parent span id it sent.
struct Caller {
    trace_id: String,
    parent_id: String,
    /// Content chunks (streamed) the client received before the end.
    chunks: Arc<AtomicU32>,
    done: mpsc::Receiver<()>,
}

impl Caller {
    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.parent_id)
    }
}

/// Sends a chat request from a thread with its own traceparent (`n`
/// distinguishes the callers) and reads the answer as it comes; the thread
/// ends when the connection does (the engine finished, or died).
fn client(port: u16, n: u8, stream: bool, max_tokens: u32, prompt: &str) -> Caller {
    let (tx, done) = mpsc::channel();
    let chunks = Arc::new(AtomicU32::new(0));
    let caller = Caller {
        trace_id: format!("{:02x}{}", n, "5eed".repeat(7) + "ab"),
        parent_id: format!("{:02x}{}", n, "0f".repeat(7)),
        chunks: Arc::clone(&chunks),
        done,
    };
    let traceparent = caller.traceparent();
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":{max_tokens},"temperature":0,"stream":{stream}}}"#
    );
    std::thread::spawn(move || {
        let Ok(mut socket) = TcpStream::connect(("127.0.0.1", port)) else {
            return;
        };
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-type: application/json\r\ntraceparent: {traceparent}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if socket.write_all(head.as_bytes()).is_err() || socket.write_all(body.as_bytes()).is_err()
        {
            return;
        }
        let mut reader = BufReader::new(socket);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            // A chunk with text (the first chunk only carries the role).
            if line.starts_with("data: ")
                && line.contains("\"content\":\"")
                && !line.contains("\"content\":\"\"")
            {
                chunks.fetch_add(1, Ordering::Relaxed);
            }
            line.clear();
        }
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        let _ = tx.send(());
    });
    caller
}

/// The in-flight requests of the engine's segment, as a passive reader sees them.
fn in_flight(engine: &Engine) -> Vec<ringside_shm_protocol::InflightRequest> {
    engine
        .segment()
        .inflight()
        .expect("ABI 1.2 segment with an in-flight table")
        .snapshot()
        .expect("snapshot")
        .requests
}

/// Waits until the engine holds `count` requests, one of them decoding with
/// at least `tokens` output tokens.
fn wait_in_flight(engine: &Engine, count: usize, tokens: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let requests = in_flight(engine);
        if requests.len() == count && requests.iter().any(|r| r.output_tokens >= tokens) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} requests in flight, one with {tokens}+ tokens; have {requests:?}\nengine log:\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent arguments every test here starts with: `engine`, exporting to
/// `collector` with short batches, then `extra`.
fn agent_args<'a>(engine: &'a Engine, endpoint: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--engine",
        engine.instance.as_str(),
        "--endpoint",
        endpoint,
        "--batch-delay-ms",
        "100",
    ];
    args.extend_from_slice(extra);
    args
}

const LONG: &str = "Count from one to five hundred, in words, one number per line.";

/// The three callers of the crash scenario: one streaming a long answer,
/// two waiting behind it (`--parallel 1`).
fn three_callers(engine: &Engine) -> [Caller; 3] {
    let streaming = client(engine.port, 1, true, 900, LONG);
    // Let it take the only slot first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight(engine).is_empty() {
        assert!(Instant::now() < deadline, "the first request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued_a = client(engine.port, 2, false, 16, "Say hi.");
    let queued_b = client(engine.port, 3, true, 16, "Say bye.");
    wait_in_flight(engine, 3, 8);
    [streaming, queued_a, queued_b]
}

/// The `engine_crashed` SERVER span of each caller, once all three arrived.
fn crash_spans(collector: &Collector, callers: &[Caller; 3]) -> Vec<String> {
    let text = collector.wait_for("three engine_crashed spans", Duration::from_secs(60), |t| {
        span_blocks(t)
            .iter()
            .filter(|b| b.contains("error.type: Str(engine_crashed)"))
            .count()
            >= 3
    });
    let blocks = span_blocks(&text);
    callers
        .iter()
        .map(|c| {
            let mine: Vec<&String> = blocks
                .iter()
                .filter(|b| {
                    span_field(b, "Trace ID") == Some(c.trace_id.as_str())
                        && b.contains("error.type: Str(engine_crashed)")
                })
                .collect();
            assert_eq!(
                mine.len(),
                1,
                "one crash span for trace {}:\n{text}",
                c.trace_id
            );
            mine[0].clone()
        })
        .collect()
}

fn int_attribute(block: &str, key: &str) -> Option<u64> {
    let at = block.find(&format!("{key}: Int("))? + key.len() + 6;
    block[at..].split(')').next()?.parse().ok()
}

/// What each crash span must say: the caller's ids, ERROR, SERVER, the
/// phases it reached as children, its tokens so far.
fn assert_crash_spans(collector: &Collector, callers: &[Caller; 3], spans: &[String]) {
    let text = collector.text();
    let blocks = span_blocks(&text);
    for (i, (caller, span)) in callers.iter().zip(spans).enumerate() {
        assert_eq!(
            span_field(span, "Parent ID"),
            Some(caller.parent_id.as_str()),
            "{span}"
        );
        assert_eq!(span_field(span, "Kind"), Some("SPAN_KIND_SERVER"), "{span}");
        assert_eq!(
            span_field(span, "Status code"),
            Some("STATUS_CODE_ERROR"),
            "{span}"
        );
        // The table does not carry sampling parameters: none are made up.
        assert!(!span.contains("gen_ai.request.temperature"), "{span}");
        let id = span_field(span, "ID").expect("span id");
        let children: Vec<&str> = blocks
            .iter()
            .filter(|b| span_field(b, "Parent ID") == Some(id))
            .filter_map(|b| span_field(b, "Name"))
            .collect();
        let output = int_attribute(span, "gen_ai.usage.output_tokens").expect("output tokens");
        if i == 0 {
            // Streaming when the engine died: every phase, and at least the
            // tokens the client had received.
            for phase in ["queue", "prefill", "decode"] {
                assert!(
                    children.contains(&phase),
                    "{phase} child missing: {children:?}"
                );
            }
            let received = u64::from(caller.chunks.load(Ordering::Relaxed));
            assert!(
                output >= 8 && output >= received,
                "output {output}, client got {received}"
            );
        } else {
            assert!(
                children.is_empty(),
                "a queued request has no phase yet: {children:?}"
            );
            assert_eq!(output, 0);
        }
    }
}

#[test]
fn a_sigkilled_engine_leaves_an_engine_crashed_span_for_each_request_it_held() {
    if !e2e_enabled("a_sigkilled_engine_leaves_an_engine_crashed_span_for_each_request_it_held") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("crash-kill", &["--parallel", "1", "--max-queue", "4"]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&agent_args(
        &engine,
        &endpoint,
        &["--metrics-interval-ms", "500"],
    ));
    let callers = three_callers(&engine);
    engine.signal("KILL");
    for caller in &callers {
        caller
            .done
            .recv_timeout(Duration::from_secs(10))
            .expect("the client saw the end");
    }
    let spans = crash_spans(&collector, &callers);
    assert_crash_spans(&collector, &callers, &spans);
    // The death is counted, per engine.
    collector.wait_for("the engine deaths counter", Duration::from_secs(20), |t| {
        t.contains("ringside.agent.engine.deaths")
    });
}

#[test]
fn an_agent_started_after_an_abort_finds_the_requests_with_backfill() {
    if !e2e_enabled("an_agent_started_after_an_abort_finds_the_requests_with_backfill") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("crash-abort", &["--parallel", "1", "--max-queue", "4"]);
    let callers = three_callers(&engine);
    // SIGABRT: what an assertion in llama.cpp (GGML_ASSERT → abort) delivers;
    // no handler runs. (A SIGSEGV sent with kill is not a fault: Rust's
    // stack-overflow handler returns and the process goes on.)
    engine.signal("ABRT");
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let agent_args = [
        "--engine",
        &engine.instance,
        "--backfill",
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ];
    let agent = Agent::start(&agent_args);
    let spans = crash_spans(&collector, &callers);
    assert_crash_spans(&collector, &callers, &spans);
    // Reported once: a second agent finds the generation marked and exports
    // nothing again.
    drop(agent);
    let before = collector
        .text()
        .matches("error.type: Str(engine_crashed)")
        .count();
    let _again = Agent::start(&agent_args);
    std::thread::sleep(Duration::from_secs(8));
    let after = collector
        .text()
        .matches("error.type: Str(engine_crashed)")
        .count();
    assert_eq!(before, after, "crash spans exported twice");
    let segment = engine.segment();
    assert_eq!(
        segment.inflight().and_then(|t| t.reported()),
        Some(segment.info().identity.generation)
    );
}

/// `ringside-agent inflight --json` for the engine: one object per request.
fn inflight_json(engine: &Engine, stall_after: &str) -> Vec<serde_json::Value> {
    let output = Command::new(workspace_bin("ringside-agent"))
        .args([
            "inflight",
            "--json",
            "--engine",
            &engine.instance,
            "--stall-after",
            stall_after,
        ])
        .output()
        .expect("run ringside-agent inflight");
    assert!(
        output.status.success(),
        "inflight failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("one JSON array")
}

#[test]
fn a_wedged_engine_shows_its_requests_stalled_and_after_sigcont_their_spans_carry_the_stall() {
    if !e2e_enabled(
        "a_wedged_engine_shows_its_requests_stalled_and_after_sigcont_their_spans_carry_the_stall",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("wedged", &["--parallel", "1", "--max-queue", "4"]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&agent_args(&engine, &endpoint, &["--stall-after", "1s"]));
    let streaming = client(engine.port, 4, true, 64, LONG);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight(&engine).is_empty() {
        assert!(Instant::now() < deadline, "the request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued = client(engine.port, 5, false, 8, "Say hi.");
    wait_in_flight(&engine, 2, 4);
    // SIGSTOP: the engine is frozen as a deadlock or a stuck step would be.
    engine.signal("STOP");
    std::thread::sleep(Duration::from_millis(2500));
    let listed = inflight_json(&engine, "1s");
    assert_eq!(listed.len(), 2, "{listed:?}");
    for request in &listed {
        assert_eq!(
            request["stalled"],
            serde_json::Value::Bool(true),
            "{request}"
        );
        assert!(
            request["since_progress_s"]
                .as_f64()
                .is_some_and(|s| s >= 2.0),
            "{request}"
        );
    }
    assert!(listed.iter().any(|r| r["phase"] == "decode"), "{listed:?}");
    assert!(listed.iter().any(|r| r["phase"] == "queued"), "{listed:?}");
    // With the default threshold (10 s) they are not stalled yet.
    assert!(
        inflight_json(&engine, "10s")
            .iter()
            .all(|r| r["stalled"] == false)
    );
    engine.signal("CONT");
    for caller in [&streaming, &queued] {
        caller
            .done
            .recv_timeout(Duration::from_secs(60))
            .expect("the request finished");
    }
    // Both finish normally, and each span carries the stall it lived through.
    for caller in [&streaming, &queued] {
        let server_span = |text: &str| {
            span_blocks(text).into_iter().find(|b| {
                span_field(b, "Trace ID") == Some(caller.trace_id.as_str())
                    && span_field(b, "Kind") == Some("SPAN_KIND_SERVER")
            })
        };
        let text = collector.wait_for("the span with its stall", Duration::from_secs(30), |t| {
            server_span(t).is_some()
        });
        let block = server_span(&text).expect("server span");
        assert!(
            block.contains("ringside.stalled"),
            "no stall event:\n{block}"
        );
        assert!(block.contains("ringside.stall.duration"), "{block}");
        assert_eq!(
            span_field(&block, "Status code"),
            Some("STATUS_CODE_UNSET"),
            "{block}"
        );
    }
}

#[test]
fn an_agent_killed_before_exporting_the_crash_spans_leaves_them_to_its_successor() {
    if !e2e_enabled("an_agent_killed_before_exporting_the_crash_spans_leaves_them_to_its_successor")
    {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The collector is down while the first agent sees the crash.
    let (grpc_port, http_port) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let mut engine = Engine::start("crash-handover", &["--parallel", "1", "--max-queue", "4"]);
    let instance = engine.instance.clone();
    let agent_args = [
        "--engine",
        &instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ];
    let mut first = Agent::start_logged(&agent_args);
    first.wait_for_log("attached", Duration::from_secs(20));
    let callers = three_callers(&engine);
    let generation = engine.segment().info().identity.generation;
    engine.signal("KILL");
    first.wait_for_log("engine died", Duration::from_secs(20));
    // Handed to the export queue is not exported: the generation stays
    // unreported while the collector is unreachable.
    std::thread::sleep(Duration::from_secs(2));
    let table = engine.segment().inflight().expect("in-flight table");
    assert_eq!(
        table.reported(),
        None,
        "marked reported before its crash spans were exported"
    );
    first.kill().expect("SIGKILL the agent");
    let _ = first.wait();
    // The successor, without --backfill, takes the report over and exports
    // each crash span once.
    let collector = Collector::start_on(grpc_port, http_port);
    let _second = Agent::start(&agent_args);
    let spans = crash_spans(&collector, &callers);
    assert_crash_spans(&collector, &callers, &spans);
    let deadline = Instant::now() + Duration::from_secs(20);
    while table.reported() != Some(generation) {
        assert!(
            Instant::now() < deadline,
            "the successor never marked generation {generation} reported"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_engine_restarted_on_its_name_keeps_the_dead_generation_until_the_agent_reported_it() {
    if !e2e_enabled(
        "an_engine_restarted_on_its_name_keeps_the_dead_generation_until_the_agent_reported_it",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let mut engine = Engine::start("crash-restart", &["--parallel", "1", "--max-queue", "4"]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let agent = Agent::start_logged(&agent_args(&engine, &endpoint, &[]));
    agent.wait_for_log("attached", Duration::from_secs(20));
    let callers = three_callers(&engine);
    let dead_generation = engine.segment().info().identity.generation;
    // The agent is frozen while the engine dies and systemd-style restarts
    // it on the same name: the agent cannot have seen the death, so only the
    // kept generation can tell it what was lost.
    let frozen = Frozen::new(agent.pid());
    engine.signal("KILL");
    let successor = Engine::restart(&engine, &["--parallel", "1", "--max-queue", "4"]);
    let kept = ringside_shm_protocol::dead_segment_path(&engine.instance, dead_generation);
    assert!(
        std::path::Path::new(&kept).exists(),
        "the successor did not keep the dead generation as {kept}"
    );
    assert_ne!(
        successor.segment().info().identity.generation,
        dead_generation
    );
    drop(frozen);
    // Each request the dead engine held is exported once, with its ids.
    let spans = crash_spans(&collector, &callers);
    assert_crash_spans(&collector, &callers, &spans);
    // Reported and settled: the kept file goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&kept).exists() {
        assert!(
            Instant::now() < deadline,
            "the dead generation {kept} was never released"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent reads the new generation: a request to it is exported.
    let after = client(successor.port, 9, false, 4, "Say hi.");
    after
        .done
        .recv_timeout(Duration::from_secs(60))
        .expect("the successor answered");
    collector.wait_for(
        "the successor's request span",
        Duration::from_secs(30),
        |t| {
            span_blocks(t).iter().any(|b| {
                span_field(b, "Trace ID") == Some(after.trace_id.as_str())
                    && span_field(b, "Kind") == Some("SPAN_KIND_SERVER")
                    && !b.contains("error.type")
            })
        },
    );
    let text = collector.text();
    assert_eq!(
        text.matches("error.type: Str(engine_crashed)").count(),
        3,
        "crash spans exported more than once"
    );
}

/// A process stopped with SIGSTOP until this is dropped (also when a test
/// fails, so that the process can still be stopped and reaped).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -s {signal} {pid}");
}
