//! The agent binary end to end, with a synthetic engine: this process
//! creates a segment and writes records into it the way the engine does.
//!
//! The tests against a real OpenTelemetry collector (`rotel-agent` from the
//! PyPI package `rotel`) run with `RINGSIDE_E2E=1`; `rotel-agent` is found on
//! PATH, under `$RINGSIDE_VENV` or in the workspace's `.venv`. The tests of
//! the local exporters and of configuration refusals always run.

// Test harness code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use ringside_shm_protocol::{
    CreateOptions, EngineSegment, ErrorType, FinishReason, Operation, Record, RecordKind,
    RequestRecord, Sampling, Timestamps, monotonic_ns, params,
};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringside_tests::harness::{self, Collector as Rotel, free_port, hex, span_field as field};

const MODEL: &str = "gemma-test";
/// The API port the synthetic engine's header announces.
const LISTEN_PORT: u16 = 8123;

fn e2e_enabled() -> bool {
    harness::e2e_enabled("collector tests")
}

fn block_with_id<'a>(blocks: &'a [String], span_id: &str) -> Option<&'a String> {
    blocks.iter().find(|b| field(b, "ID") == Some(span_id))
}

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A synthetic engine: a segment owned by this test process.
struct FakeEngine {
    segment: EngineSegment,
    name: String,
}

impl FakeEngine {
    fn new(tag: &str) -> Self {
        Self::named(format!("agent-e2e-{}-{tag}", std::process::id()))
    }

    fn named(name: String) -> Self {
        let mut options = CreateOptions::new(name.clone(), vec![MODEL.to_owned()]);
        options.capacity = 256;
        options.listen_port = Some(LISTEN_PORT);
        let segment = EngineSegment::create(&options).expect("create segment");
        Self { segment, name }
    }

    /// A well-formed finished chat request, stamped just now.
    fn record(&self) -> Record {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
        let now = monotonic_ns();
        let mut trace_id = [0; 16];
        trace_id[0..8].copy_from_slice(&seq.to_be_bytes());
        trace_id[8..].copy_from_slice(&0x5eed_0000_0000_0001u64.to_be_bytes());
        RequestRecord {
            kind: RecordKind::RequestFinished,
            operation: Operation::Chat,
            request_id: (u128::from(seq) << 1 | 1).to_be_bytes(),
            trace_id,
            parent_span_id: Some((seq ^ 0xaaaa_0000_0000_0000).to_be_bytes()),
            span_id: (seq ^ 0x5555_0000_0000_0000).to_be_bytes(),
            trace_flags: 1,
            ot: Default::default(),
            timestamps: Timestamps {
                arrival_ns: now - 900_000_000,
                scheduled_ns: Some(now - 800_000_000),
                first_token_ns: Some(now - 500_000_000),
                last_token_ns: Some(now - 100_000_000),
                finished_ns: now - 50_000_000,
            },
            prompt_tokens: 17,
            completion_tokens: 9,
            cached_prompt_tokens: 3,
            sampling: Sampling {
                max_tokens: 32,
                temperature: 0.0,
                top_p: 0.95,
                top_k: 40,
                seed: 42,
                ..Sampling::default()
            },
            params_set: params::TEMPERATURE | params::MAX_TOKENS,
            stream: false,
            finish_reason: FinishReason::Stop,
            http_status: 200,
            error_type: ErrorType::None,
            model_index: 0,
            queue_depth: 0,
            running: 0,
            sequence_slot: None,
        }
        .encode()
    }

    /// Pushes a record if the control word says tracing is on, as the
    /// engine does. Returns the request span id if written.
    fn push(&self, record: &Record) -> Option<String> {
        let producer = self.segment.ring().producer();
        if !producer.tracing_enabled() {
            return None;
        }
        let outcome = producer.push(record);
        assert!(
            matches!(outcome, ringside_shm_protocol::PushOutcome::Written(_)),
            "{outcome:?}"
        );
        Some(hex(&record.span_id))
    }

    fn push_new(&self) -> String {
        let r = self.record();
        self.push(&r).expect("tracing is on")
    }

    /// Waits until the agent committed its read cursor to `ticket`: every
    /// record below it settled (here: exported). A kill between the
    /// collector's acknowledgement and this commit may duplicate that batch
    /// (the documented at-least-once window); a kill after it may not.
    fn wait_for_cursor(&self, ticket: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.segment.ring().control().read_cursor() < ticket {
            assert!(
                Instant::now() < deadline,
                "the agent's cursor stayed at {}, expected {ticket}",
                self.segment.ring().control().read_cursor()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A running `ringside-agent`; its stdout and stderr go to files.
struct Agent {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

static AGENTS: AtomicU64 = AtomicU64::new(0);

impl Agent {
    fn start(engine: &FakeEngine, extra: &[&str]) -> Self {
        Self::start_with_hosts(engine, extra, None)
    }

    /// With `hosts`: in a mount namespace of its own whose `/etc/hosts` is
    /// that file (bound over it), so the test decides what a name resolves to.
    fn start_with_hosts(
        engine: &FakeEngine,
        extra: &[&str],
        hosts: Option<&std::path::Path>,
    ) -> Self {
        let mut args = vec![
            "run".to_owned(),
            "--engine".to_owned(),
            engine.name.clone(),
            "--batch-delay-ms".to_owned(),
            "100".to_owned(),
            "--poll-interval-ms".to_owned(),
            "10".to_owned(),
            "--discover-interval-ms".to_owned(),
            "200".to_owned(),
            "--metrics-interval-ms".to_owned(),
            "500".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let n = AGENTS.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("{}-agent{n}", engine.name));
        let stdout = base.with_extension("stdout");
        let stderr = base.with_extension("stderr");
        let mut command = match hosts {
            None => Command::new(env!("CARGO_BIN_EXE_ringside-agent")),
            Some(hosts) => {
                // unshare and sh exec: the agent keeps the child's pid.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(hosts)
                    .arg(env!("CARGO_BIN_EXE_ringside-agent"));
                c
            }
        };
        let child = command
            .args(&args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RINGSIDE_LOG", "info")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start ringside-agent");
        let agent = Self {
            child,
            stdout,
            stderr,
        };
        // Attached once it registered itself in the control block.
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine.segment.ring().control().agent().0 != agent.child.id() {
            assert!(Instant::now() < deadline, "the agent did not attach");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn grpc(engine: &FakeEngine, rotel: &Rotel, extra: &[&str]) -> Self {
        let endpoint = format!("http://127.0.0.1:{}", rotel.grpc_port);
        let mut args = vec!["--endpoint", endpoint.as_str()];
        args.extend_from_slice(extra);
        Self::start(engine, &args)
    }

    /// What it printed on stderr (its log).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What it printed on stdout.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// SIGTERM, and the exit status; the log is echoed for diagnosis.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                eprintln!("agent log:\n{}", self.log());
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no flush, no goodbye.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

fn wait_for_spans(rotel: &Rotel, ids: &[String], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let blocks = rotel.spans();
        if ids.iter().all(|id| block_with_id(&blocks, id).is_some()) {
            return blocks;
        }
        assert!(
            Instant::now() < deadline,
            "spans {ids:?} did not all arrive; collector output:\n{}",
            rotel.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_full_request_span(blocks: &[String], record: &Record) {
    let id = hex(&record.span_id);
    let block = block_with_id(blocks, &id).expect("request span");
    assert_eq!(
        field(block, "Trace ID"),
        Some(hex(&record.trace_id).as_str())
    );
    assert_eq!(
        field(block, "Parent ID"),
        Some(hex(&record.parent_span_id).as_str())
    );
    assert_eq!(field(block, "Name"), Some("chat gemma-test"));
    assert_eq!(field(block, "Kind"), Some("SPAN_KIND_SERVER"));
    let response_id = format!("chatcmpl-{}", hex(&record.request_id));
    for attr in [
        "-> gen_ai.operation.name: Str(chat)".to_owned(),
        "-> gen_ai.provider.name: Str(ringside)".to_owned(),
        "-> gen_ai.request.model: Str(gemma-test)".to_owned(),
        "-> gen_ai.request.max_tokens: Int(32)".to_owned(),
        "-> gen_ai.request.temperature: Double(0)".to_owned(),
        "-> gen_ai.request.top_k: Int(40)".to_owned(),
        "-> gen_ai.request.seed: Int(42)".to_owned(),
        "-> gen_ai.request.frequency_penalty: Double(0)".to_owned(),
        "-> gen_ai.request.presence_penalty: Double(0)".to_owned(),
        format!("-> gen_ai.response.id: Str({response_id})"),
        "-> gen_ai.response.model: Str(gemma-test)".to_owned(),
        "-> gen_ai.response.finish_reasons:".to_owned(),
        "-> gen_ai.usage.input_tokens: Int(17)".to_owned(),
        "-> gen_ai.usage.output_tokens: Int(9)".to_owned(),
        "-> gen_ai.usage.cache_read.input_tokens: Int(3)".to_owned(),
        "-> server.address:".to_owned(),
        format!("-> server.port: Int({LISTEN_PORT})"),
        format!("-> gen_ai.request.id: Str({response_id})"),
        "-> gen_ai.usage.prompt_tokens: Int(17)".to_owned(),
        "-> gen_ai.usage.completion_tokens: Int(9)".to_owned(),
        "-> gen_ai.latency.e2e: Double(0.85)".to_owned(),
        "-> gen_ai.latency.time_to_first_token: Double(0.4)".to_owned(),
        "-> gen_ai.latency.time_in_queue: Double(0.1)".to_owned(),
        "-> gen_ai.latency.time_in_model_prefill: Double(0.3)".to_owned(),
        "-> gen_ai.latency.time_in_model_decode: Double(0.4)".to_owned(),
        "-> gen_ai.latency.time_in_model_inference: Double(0.7)".to_owned(),
        "-> gen_ai.request.top_p: Double(0.95)".to_owned(),
    ] {
        assert!(block.contains(&attr), "missing {attr:?} in\n{block}");
    }
    // The three phases, children of the request span, in the same trace.
    for phase in ["queue", "prefill", "decode"] {
        let child = blocks
            .iter()
            .find(|b| field(b, "Name") == Some(phase) && field(b, "Parent ID") == Some(&id))
            .unwrap_or_else(|| panic!("no {phase} child of {id}"));
        assert_eq!(
            field(child, "Trace ID"),
            Some(hex(&record.trace_id).as_str())
        );
        assert_eq!(field(child, "Kind"), Some("SPAN_KIND_INTERNAL"));
    }
}

#[test]
fn grpc_export_delivers_the_request_span_its_phases_and_every_attribute() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("grpc");
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let record = engine.record();
    engine.push(&record).unwrap();
    let blocks = wait_for_spans(&rotel, &[hex(&record.span_id)], Duration::from_secs(15));
    assert_full_request_span(&blocks, &record);
    let text = rotel.text();
    assert!(text.contains(&format!(
        "-> ringside.engine.instance: Str({})",
        engine.name
    )));
    // A UUID (v5) unique to this host and engine generation, not the name
    // every host's engine shares.
    let instance_id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-> service.instance.id: Str("))
        .and_then(|r| r.strip_suffix(')'))
        .expect("service.instance.id");
    assert_eq!(instance_id.len(), 36, "{instance_id}");
    assert_eq!(&instance_id[14..15], "5", "{instance_id}");
    assert_ne!(instance_id, engine.name);
    assert!(text.contains("-> service.name: Str(ringside-engine)"));
    assert!(text.contains(&format!("-> process.pid: Int({})", std::process::id())));
    assert!(agent.terminate().success());
}

#[test]
fn http_protobuf_export_delivers_the_same_spans() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("http");
    let endpoint = format!("http://127.0.0.1:{}", rotel.http_port);
    let mut agent = Agent::start(
        &engine,
        &[
            "--protocol",
            "http/protobuf",
            "--endpoint",
            &endpoint,
            "--compression",
            "gzip",
        ],
    );
    let record = engine.record();
    engine.push(&record).unwrap();
    let blocks = wait_for_spans(&rotel, &[hex(&record.span_id)], Duration::from_secs(15));
    assert_full_request_span(&blocks, &record);
    assert!(agent.terminate().success());
}

#[test]
fn backfill_exports_what_the_engine_wrote_before_the_agent_started() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("backfill");
    let early: Vec<String> = (0..3).map(|_| engine.push_new()).collect();
    let mut agent = Agent::grpc(&engine, &rotel, &["--backfill"]);
    let later = engine.push_new();
    let mut all = early.clone();
    all.push(later);
    wait_for_spans(&rotel, &all, Duration::from_secs(15));
    assert!(agent.terminate().success());
}

#[test]
fn without_backfill_only_new_requests_are_exported() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("nobackfill");
    let early = engine.push_new();
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let later = engine.push_new();
    let blocks = wait_for_spans(
        &rotel,
        std::slice::from_ref(&later),
        Duration::from_secs(15),
    );
    assert!(block_with_id(&blocks, &early).is_none());
    assert!(agent.terminate().success());
}

#[test]
fn a_killed_and_restarted_agent_resumes_without_duplicates_or_loss() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("restart");
    let agent = Agent::grpc(&engine, &rotel, &[]);
    let first: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    wait_for_spans(&rotel, &first, Duration::from_secs(15));
    engine.wait_for_cursor(5);
    agent.kill();
    // Written while no agent runs.
    let gap: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let after: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    let all: Vec<String> = first.iter().chain(&gap).chain(&after).cloned().collect();
    wait_for_spans(&rotel, &all, Duration::from_secs(15));
    assert!(agent.terminate().success());
    let blocks = rotel.spans();
    for id in &all {
        let n = blocks.iter().filter(|b| field(b, "ID") == Some(id)).count();
        assert_eq!(n, 1, "request span {id} arrived {n} times");
    }
}

#[test]
fn spans_arrive_after_the_collector_comes_back() {
    if !e2e_enabled() {
        return;
    }
    let (grpc, http) = (free_port(), free_port());
    let engine = FakeEngine::new("outage");
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut agent = Agent::start(&engine, &["--endpoint", &endpoint, "--timeout-ms", "500"]);
    let ids: Vec<String> = (0..3).map(|_| engine.push_new()).collect();
    // Let the first attempts fail against the closed port.
    std::thread::sleep(Duration::from_millis(1500));
    let rotel = Rotel::start_on(grpc, http);
    wait_for_spans(&rotel, &ids, Duration::from_secs(20));
    assert!(agent.terminate().success());
}

/// The agent's accounting line at shutdown: (read, exported, lost in all).
fn shutdown_accounting(agent: &mut Agent) -> (u64, u64, u64) {
    assert!(agent.terminate().success());
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("accounting"))
        .unwrap_or_else(|| panic!("no accounting in\n{log}"));
    assert_eq!(log_value(line, "pending"), 0, "{line}");
    let lost = log_value(line, "queue_dropped") + log_value(line, "export_failed");
    (log_value(line, "read"), log_value(line, "exported"), lost)
}

#[test]
fn spans_written_while_the_gateway_restarts_on_its_port_arrive_and_the_accounting_is_exact() {
    if !e2e_enabled() {
        return;
    }
    let (grpc, http) = (free_port(), free_port());
    let engine = FakeEngine::new("gwrestart");
    let gateway = Rotel::start_on(grpc, http);
    let mut agent = Agent::grpc(&engine, &gateway, &["--timeout-ms", "500"]);
    let before: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    wait_for_spans(&gateway, &before, Duration::from_secs(15));
    // SIGKILL: the connection is reset, the port closed.
    drop(gateway);
    let during: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let gateway = Rotel::start_on(grpc, http);
    let after: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    let all: Vec<String> = during.iter().chain(&after).cloned().collect();
    wait_for_spans(&gateway, &all, Duration::from_secs(30));
    let (read, exported, lost) = shutdown_accounting(&mut agent);
    assert_eq!((read, exported, lost), (15, 15, 0));
}

/// Whether this process may make a mount namespace (root, or user
/// namespaces); the test of a moving gateway needs one.
fn can_bind_etc_hosts() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

// A gateway that moves: its name is rewritten to a new address and the old
// gateway hangs with its connection open (SIGSTOP: no FIN, no RST, as when
// its host leaves the network). The agent must give up the dead connection,
// resolve the name again and deliver to the new gateway.
#[test]
fn a_gateway_that_moves_to_a_new_address_is_found_again_by_its_name() {
    if !e2e_enabled() {
        return;
    }
    if !can_bind_etc_hosts() {
        eprintln!("SKIPPED: cannot make a mount namespace to bind /etc/hosts (needs root)");
        return;
    }
    const NAME: &str = "gateway.ringside.test";
    let hosts = std::env::temp_dir().join(format!("ringside-hosts-{}", std::process::id()));
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.2 {NAME}\n")).unwrap();
    let (grpc, http) = (free_port(), free_port());
    let old = Rotel::start_at("127.0.0.2", grpc, http);
    let engine = FakeEngine::new("gwmove");
    let endpoint = format!("http://{NAME}:{grpc}");
    let mut agent = Agent::start_with_hosts(
        &engine,
        &["--endpoint", &endpoint, "--timeout-ms", "500"],
        Some(&hosts),
    );
    let before: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    wait_for_spans(&old, &before, Duration::from_secs(15));
    old.signal("STOP");
    // Rewritten in place: the bind mount shows the same inode.
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.3 {NAME}\n")).unwrap();
    let new = Rotel::start_at("127.0.0.3", grpc, http);
    let after: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    wait_for_spans(&new, &after, Duration::from_secs(30));
    let (read, exported, lost) = shutdown_accounting(&mut agent);
    old.signal("CONT");
    let _ = std::fs::remove_file(&hosts);
    assert_eq!((read, exported, lost), (10, 10, 0));
}

#[test]
fn an_error_record_becomes_an_error_span_with_error_type() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("error");
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let mut r = engine.record();
    r.kind = RecordKind::RequestRejected as u8;
    r.error_type = ErrorType::InvalidRequest as u8;
    r.http_status = 400;
    r.t_scheduled_ns = 0;
    r.t_first_token_ns = 0;
    r.t_last_token_ns = 0;
    r.completion_tokens = 0;
    r.prompt_tokens = 0;
    r.cached_prompt_tokens = 0;
    r.finish_reason = FinishReason::None as u8;
    let id = engine.push(&r).unwrap();
    let blocks = wait_for_spans(&rotel, std::slice::from_ref(&id), Duration::from_secs(15));
    let block = block_with_id(&blocks, &id).unwrap();
    assert_eq!(field(block, "Status code"), Some("STATUS_CODE_ERROR"));
    assert_eq!(field(block, "Status message"), Some("invalid_request"));
    assert!(
        block.contains("-> error.type: Str(invalid_request)"),
        "{block}"
    );
    assert!(agent.terminate().success());
}

#[test]
fn tracing_switched_off_in_the_control_word_exports_nothing_new() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("toggle");
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let before = engine.push_new();
    wait_for_spans(
        &rotel,
        std::slice::from_ref(&before),
        Duration::from_secs(15),
    );
    let control = engine.segment.ring().control();
    control.set_tracing_enabled(false);
    let head = engine.segment.ring().counters().head;
    let off: Vec<Option<String>> = (0..3).map(|_| engine.push(&engine.record())).collect();
    assert!(off.iter().all(Option::is_none));
    assert_eq!(
        engine.segment.ring().counters().head,
        head,
        "nothing written while off"
    );
    control.set_tracing_enabled(true);
    let after = engine.push_new();
    wait_for_spans(
        &rotel,
        std::slice::from_ref(&after),
        Duration::from_secs(15),
    );
    assert!(agent.terminate().success());
    let servers = rotel
        .spans()
        .iter()
        .filter(|b| field(b, "Kind") == Some("SPAN_KIND_SERVER"))
        .count();
    assert_eq!(servers, 2, "one request span before, one after");
}

#[test]
fn http_json_export_delivers_spans() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("json");
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", rotel.http_port);
    let mut agent = Agent::start(
        &engine,
        &["--protocol", "http/json", "--traces-endpoint", &endpoint],
    );
    let record = engine.record();
    engine.push(&record).unwrap();
    let blocks = wait_for_spans(&rotel, &[hex(&record.span_id)], Duration::from_secs(15));
    assert_full_request_span(&blocks, &record);
    assert!(agent.terminate().success());
}

#[test]
fn an_invalid_record_is_skipped_counted_and_reading_goes_on() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("invalid");
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let mut bad = engine.record();
    bad.kind = 99;
    let bad_id = engine.push(&bad).unwrap();
    let mut bad2 = engine.record();
    bad2.t_finished_ns = bad2.t_arrival_ns - 1;
    engine.push(&bad2).unwrap();
    let good = engine.push_new();
    let blocks = wait_for_spans(&rotel, std::slice::from_ref(&good), Duration::from_secs(15));
    assert!(block_with_id(&blocks, &bad_id).is_none());
    assert!(agent.terminate().success());
    let log = agent.log();
    let accounting = log
        .lines()
        .find(|l| l.contains("accounting"))
        .unwrap_or_else(|| panic!("no accounting line in\n{log}"));
    for expected in [
        "read=3",
        "invalid=2",
        "exported=1",
        "pending=0",
        "export_failed=0",
    ] {
        assert!(
            accounting.contains(expected),
            "{expected} not in {accounting}"
        );
    }
}

#[test]
fn a_restarted_engine_is_noticed_and_its_new_segment_read() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let name = format!("agent-e2e-{}-engine-restart", std::process::id());
    let engine = FakeEngine::named(name.clone());
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    let first = engine.push_new();
    wait_for_spans(
        &rotel,
        std::slice::from_ref(&first),
        Duration::from_secs(15),
    );
    drop(engine);
    let engine = FakeEngine::named(name);
    let second = engine.push_new();
    wait_for_spans(
        &rotel,
        std::slice::from_ref(&second),
        Duration::from_secs(15),
    );
    assert!(agent.terminate().success());
    assert!(agent.log().contains("detached"));
}

#[test]
fn the_file_exporter_writes_otlp_json_lines() {
    let engine = FakeEngine::new("file");
    let path = std::env::temp_dir().join(format!("{}.jsonl", engine.name));
    let _ = std::fs::remove_file(&path);
    let mut agent = Agent::start(
        &engine,
        &["--exporter", "file", "--output", path.to_str().unwrap()],
    );
    let record = engine.record();
    engine.push(&record).unwrap();
    assert!(agent.terminate().success());
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let mut found = false;
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).expect("one JSON document per line");
        if let Some(spans) = value["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array() {
            for span in spans {
                if span["spanId"] == hex(&record.span_id) {
                    assert_eq!(span["traceId"], hex(&record.trace_id));
                    assert_eq!(span["name"], "chat gemma-test");
                    found = true;
                }
            }
        }
    }
    assert!(found, "request span not in\n{text}");
}

#[test]
fn the_console_exporter_prints_a_tree_per_trace() {
    let engine = FakeEngine::new("console");
    let mut agent = Agent::start(&engine, &["--exporter", "console"]);
    let record = engine.record();
    engine.push(&record).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.output().contains("decode") {
        assert!(
            Instant::now() < deadline,
            "no tree printed: {}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.terminate().success());
    let out = agent.output();
    assert!(
        out.contains(&format!("trace {}", hex(&record.trace_id))),
        "{out}"
    );
    assert!(
        out.contains("└─ chat gemma-test  SERVER  0.850 s  OK"),
        "{out}"
    );
    assert!(out.contains("├─ queue    0.100 s  +0.000"), "{out}");
    assert!(out.contains("├─ prefill  0.300 s  +0.100"), "{out}");
    assert!(out.contains("└─ decode   0.400 s  +0.400"), "{out}");
}

#[test]
fn bad_configuration_is_refused_naming_the_setting() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 5] = [
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (&["--endpoint", "collector:4317"], &[], "--endpoint"),
        (&["--compression", "brotli"], &[], "--compression"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_HEADERS", "broken")],
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            &[],
            &[
                ("OTEL_TRACES_SAMPLER_ARG", "7"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ];
    for (args, env, setting) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{setting}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(setting),
            "{stderr:?} does not name {setting}"
        );
    }
}

#[test]
fn metrics_reach_the_collector_over_otlp() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("metrics");
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    engine.push_new();
    rotel.wait_for("the agent's metrics", Duration::from_secs(15), |o| {
        [
            "-> Name: gen_ai.server.request.duration",
            "-> Name: gen_ai.server.time_to_first_token",
            "-> Name: gen_ai.server.time_per_output_token",
            "-> Name: ringside.server.token.usage",
            "-> Name: ringside.server.request.queue.duration",
            "-> Name: ringside.server.request.prefill.duration",
            "-> Name: ringside.server.request.decode.duration",
            "-> Name: ringside.agent.records.read",
            "-> Name: ringside.agent.records.lost",
            "-> Name: ringside.agent.lag",
            "-> Name: ringside.agent.queue.depth",
        ]
        .iter()
        .all(|m| o.contains(m))
    });
    assert!(agent.terminate().success());
}

#[test]
fn a_config_file_sets_what_flags_do_and_flags_override_it() {
    let engine = FakeEngine::new("configfile");
    let out = std::env::temp_dir().join(format!("{}.jsonl", engine.name));
    let config = std::env::temp_dir().join(format!("{}.conf", engine.name));
    let _ = std::fs::remove_file(&out);
    std::fs::write(
        &config,
        format!(
            "# exporter settings\nexporter = \"file\"\noutput = \"{}\"\nattributes = semconv\nbatch-delay-ms = 5000\n",
            out.display()
        ),
    )
    .unwrap();
    // The flag overrides the file's batch delay (5 s would outlast the wait).
    let mut agent = Agent::start(
        &engine,
        &[
            "--config",
            config.to_str().unwrap(),
            "--batch-delay-ms",
            "50",
        ],
    );
    let record = engine.record();
    engine.push(&record).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains(&hex(&record.span_id))
    {
        assert!(
            Instant::now() < deadline,
            "nothing written to {}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.terminate().success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("gen_ai.usage.input_tokens"));
    assert!(!text.contains("gen_ai.latency.e2e"), "semconv only");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&config);
}

/// The value of `key=` in a log line.
fn log_value(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn with_the_collector_down_the_queue_stays_bounded_and_shutdown_counts_what_was_not_delivered() {
    let engine = FakeEngine::new("bounded");
    // Nothing listens on this port.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &engine,
        &[
            "--endpoint",
            &endpoint,
            "--timeout-ms",
            "200",
            "--queue-max-items",
            "100",
            "--max-in-flight",
            "2",
            "--shutdown-timeout-ms",
            "500",
        ],
    );
    for _ in 0..6 {
        for _ in 0..100 {
            engine.push_new();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("agent RSS with a full queue: {rss_kib} KiB");
    assert!(rss_kib < 64 * 1024, "agent RSS {rss_kib} KiB");
    assert!(agent.terminate().success());
    let log = agent.log();
    let accounting = log.lines().find(|l| l.contains("accounting")).unwrap();
    let read = log_value(accounting, "read");
    let dropped = log_value(accounting, "queue_dropped");
    let failed = log_value(accounting, "export_failed");
    assert_eq!(read, 600);
    assert_eq!(log_value(accounting, "exported"), 0);
    // At most 100 requests queued plus two batches (512 spans = 128
    // requests each) in flight, retrying.
    assert!(dropped >= 600 - 100 - 2 * 128, "{accounting}");
    assert_eq!(
        dropped + failed,
        read,
        "every request accounted for: {accounting}"
    );
    assert_eq!(log_value(accounting, "pending"), 0);
    let shutdown = log
        .lines()
        .find(|l| l.contains("could not be delivered"))
        .unwrap_or_else(|| panic!("no shutdown count in\n{log}"));
    assert_eq!(log_value(shutdown, "requests"), failed);
    // Committed once more after the flush: past every request it counted.
    assert_eq!(engine.segment.ring().control().read_cursor(), 600);
}

#[test]
fn a_restarted_agent_that_was_lapped_reports_exactly_what_it_lost() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start_on(free_port(), free_port());
    let engine = FakeEngine::new("lapped");
    let capacity = engine.segment.info().capacity as usize;
    let agent = Agent::grpc(&engine, &rotel, &[]);
    let first: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    wait_for_spans(&rotel, &first, Duration::from_secs(15));
    engine.wait_for_cursor(5);
    agent.kill();
    // More than the ring holds while no agent reads: the oldest are lost.
    let while_down: Vec<String> = (0..capacity + 44).map(|_| engine.push_new()).collect();
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    wait_for_spans(&rotel, &while_down[44..], Duration::from_secs(20));
    assert!(agent.terminate().success());
    let blocks = rotel.spans();
    assert!(
        while_down[..44]
            .iter()
            .all(|id| block_with_id(&blocks, id).is_none())
    );
    let log = agent.log();
    let accounting = log.lines().find(|l| l.contains("accounting")).unwrap();
    assert_eq!(log_value(accounting, "before_attach"), 5, "{accounting}");
    assert_eq!(
        log_value(accounting, "lost_overwritten"),
        44,
        "{accounting}"
    );
    assert_eq!(
        log_value(accounting, "read"),
        capacity as u64,
        "{accounting}"
    );
    assert_eq!(
        log_value(accounting, "exported"),
        capacity as u64,
        "{accounting}"
    );
    assert_eq!(
        log_value(accounting, "written"),
        5 + capacity as u64 + 44,
        "{accounting}"
    );
}

#[test]
fn records_read_but_not_exported_when_the_agent_is_killed_are_exported_by_its_successor_exactly_once()
 {
    if !e2e_enabled() {
        return;
    }
    let (grpc, http) = (free_port(), free_port());
    let engine = FakeEngine::new("undelivered");
    // Nothing listens there yet: the agent reads the records and retries.
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let agent = Agent::start(&engine, &["--endpoint", &endpoint, "--timeout-ms", "200"]);
    let ids: Vec<String> = (0..5).map(|_| engine.push_new()).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.log().contains("export failed; retrying") {
        assert!(
            Instant::now() < deadline,
            "the agent never tried to export:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        engine.segment.ring().counters().head,
        5,
        "all written before the kill"
    );
    agent.kill();
    assert_eq!(
        engine.segment.ring().control().read_cursor(),
        0,
        "the cursor did not move past records that were read but not exported"
    );
    let rotel = Rotel::start_on(grpc, http);
    let mut agent = Agent::grpc(&engine, &rotel, &[]);
    wait_for_spans(&rotel, &ids, Duration::from_secs(20));
    assert!(agent.terminate().success());
    let blocks = rotel.spans();
    for id in &ids {
        let n = blocks.iter().filter(|b| field(b, "ID") == Some(id)).count();
        assert_eq!(n, 1, "request span {id} arrived {n} times");
    }
    let log = agent.log();
    let accounting = log.lines().find(|l| l.contains("accounting")).unwrap();
    let value = |key| log_value(accounting, key);
    assert_eq!(value("before_attach"), 0, "{accounting}");
    assert_eq!(value("written"), 5, "{accounting}");
    assert_eq!(value("exported"), 5, "{accounting}");
    let lost = value("invalid")
        + value("lost_overwritten")
        + value("lost_abandoned")
        + value("queue_dropped")
        + value("export_failed");
    assert_eq!(
        value("written"),
        value("exported") + value("sampled_out") + lost,
        "written = exported + sampled out + lost: {accounting}"
    );
    assert_eq!(value("pending"), 0, "{accounting}");
    assert_eq!(
        engine.segment.ring().control().read_cursor(),
        5,
        "committed past everything exported at shutdown"
    );
}
