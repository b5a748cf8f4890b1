//! The control plane end to end: `tracing on|off|status`, `set`, `status`,
//! tail sampling, and one agent serving two engines. The producer side is a
//! synthetic engine in this process (a segment it creates and writes like
//! the engine does). Tests that need the collector (`rotel-agent` from the
//! PyPI package `rotel`) run with `RINGSIDE_E2E=1`.

// Test harness code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use ringside_shm_protocol::{
    CreateOptions, EngineSegment, ErrorType, FinishReason, Operation, Record, RecordKind,
    RequestRecord, Sampling, Timestamps, monotonic_ns, params,
};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringside_tests::harness::{self, Collector, free_port, hex};

const MODEL: &str = "gemma-test";

fn e2e_enabled() -> bool {
    harness::e2e_enabled("collector tests")
}

/// The shared collector harness, read here as (instance, span id) pairs.
struct Rotel(Collector);

impl std::ops::Deref for Rotel {
    type Target = Collector;
    fn deref(&self) -> &Collector {
        &self.0
    }
}

impl Rotel {
    fn start() -> Self {
        Self(Collector::start())
    }

    /// (ringside.engine.instance, span ID) of every span received so far.
    fn spans(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for resource in self.text().split("ResourceSpans #").skip(1) {
            let instance = resource
                .lines()
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("-> ringside.engine.instance: Str(")
                        .and_then(|r| r.strip_suffix(')'))
                })
                .unwrap_or("")
                .to_owned();
            for block in resource.split("Span #").skip(1) {
                if let Some(id) = block.lines().find_map(|l| {
                    let (k, v) = l.split_once(" : ")?;
                    (k.trim() == "ID").then(|| v.trim().to_owned())
                }) {
                    out.push((instance.clone(), id));
                }
            }
        }
        out
    }

    fn has_span(&self, id: &str) -> bool {
        self.spans().iter().any(|(_, s)| s == id)
    }

    fn wait_for_span(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.has_span(id) {
            assert!(
                Instant::now() < deadline,
                "span {id} did not arrive; collector output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A synthetic engine: a segment owned by this test process.
struct FakeEngine {
    segment: EngineSegment,
    name: String,
}

impl FakeEngine {
    fn new(tag: &str) -> Self {
        let name = format!("ctl-e2e-{}-{tag}", std::process::id());
        let mut options = CreateOptions::new(name.clone(), vec![MODEL.to_owned()]);
        options.capacity = 256;
        let segment = EngineSegment::create(&options).expect("create segment");
        Self { segment, name }
    }

    /// A finished chat request (or a 400 when `error`).
    fn record(&self, error: bool) -> Record {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
        let now = monotonic_ns();
        let mut trace_id = [0; 16];
        trace_id[0..8].copy_from_slice(&seq.to_be_bytes());
        trace_id[8..].copy_from_slice(&seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        let mut r = RequestRecord {
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
            cached_prompt_tokens: 0,
            sampling: Sampling {
                max_tokens: 32,
                ..Sampling::default()
            },
            params_set: params::MAX_TOKENS,
            stream: false,
            finish_reason: FinishReason::Stop,
            http_status: 200,
            error_type: ErrorType::None,
            model_index: 0,
            queue_depth: 0,
            running: 0,
            sequence_slot: None,
        };
        if error {
            r.http_status = 400;
            r.error_type = ErrorType::InvalidRequest;
            r.finish_reason = FinishReason::Error;
            r.completion_tokens = 0;
            r.timestamps.first_token_ns = None;
            r.timestamps.last_token_ns = None;
        }
        r.encode()
    }

    /// Writes a record if the control word says tracing is on, as the
    /// engine does; the request span id if written.
    fn push(&self, error: bool) -> Option<String> {
        let producer = self.segment.ring().producer();
        if !producer.tracing_enabled() {
            return None;
        }
        let r = self.record(error);
        assert!(matches!(
            producer.push(&r),
            ringside_shm_protocol::PushOutcome::Written(_)
        ));
        Some(hex(&r.span_id))
    }

    fn written(&self) -> u64 {
        self.segment.ring().counters().head
    }
}

fn agent_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
        .args(args)
        .output()
        .expect("run ringside-agent")
}

fn cli_ok(args: &[&str]) -> String {
    let out = agent_cli(args);
    assert!(
        out.status.success(),
        "ringside-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&cli_ok(args)).unwrap()
}

/// A running agent daemon reading `engines` and exporting to `rotel`.
struct Agent {
    child: Child,
    stderr: PathBuf,
    state: PathBuf,
}

impl Agent {
    fn start(engines: &[&FakeEngine], rotel: &Rotel, extra: &[&str]) -> Self {
        let endpoint = format!("http://127.0.0.1:{}", rotel.grpc_port);
        let mut args = vec!["--endpoint", endpoint.as_str()];
        args.extend_from_slice(extra);
        Self::start_with(engines, &args, &[])
    }

    fn start_with(engines: &[&FakeEngine], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let base = std::env::temp_dir().join(format!(
            "{}-agent{}",
            engines[0].name,
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = base.with_extension("stderr");
        let state = base.with_extension("state.json");
        let mut args = vec![
            "run",
            "--batch-delay-ms",
            "100",
            "--poll-interval-ms",
            "10",
            "--discover-interval-ms",
            "200",
        ];
        if !env.iter().any(|(k, _)| *k == "RUNTIME_DIRECTORY") {
            args.extend(["--state-file", state.to_str().unwrap()]);
        }
        for e in engines {
            args.extend(["--engine", e.name.as_str()]);
        }
        args.extend_from_slice(extra);
        if !extra.contains(&"--admin-listen") {
            args.extend(["--admin-listen", "off"]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
            .args(&args)
            .env("RINGSIDE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start ringside-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        for e in engines {
            while e.segment.ring().control().agent().0 != child.id() {
                assert!(Instant::now() < deadline, "the agent did not attach");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self {
            child,
            stderr,
            state,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The admin API's generated bearer token, from the 0600 file the agent
    /// writes beside its state file.
    fn admin_token(&self) -> String {
        let path = self.state.with_extension("admin-token");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return text.trim().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no token file {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `status --json` for `engine` once its accounting is balanced and
    /// nothing is pending.
    fn settled_status(&self, engine: &FakeEngine) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = json(&[
                "status",
                "--json",
                "--engine",
                &engine.name,
                "--state-file",
                self.state.to_str().unwrap(),
            ]);
            let a = &v[0]["accounting"];
            if a["balanced"] == true
                && a["pending"] == 0
                && a["written"].as_u64() == Some(engine.written())
            {
                return v[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "accounting did not settle: {v:#}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
        let _ = std::fs::remove_file(&self.state);
    }
}

/// One HTTP/1.1 request to the admin API: (status, body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    http_raw(port, method, path, "localhost", &auth, body)
}

/// [`http`] with the Host and the authorization header lines as given.
fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    auth: &str,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n{auth}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of the samples of `name` in a Prometheus text body.
fn prometheus_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_admin_api_beyond_loopback_refuses_to_start_without_a_token() {
    let engine = FakeEngine::new("noauth");
    let port = free_port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
        .args(["run", "--exporter", "console", "--engine", &engine.name])
        .args(["--admin-listen", &format!("0.0.0.0:{port}")])
        .env_remove("RINGSIDE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin-listen") && err.contains("bearer token"),
        "{err}"
    );
    assert_eq!(
        engine.segment.ring().control().agent().0,
        0,
        "never attached"
    );
}

#[test]
fn the_admin_api_with_a_token_answers_401_without_it_and_200_with_it() {
    let engine = FakeEngine::new("auth");
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let token_file = std::env::temp_dir().join(format!("ctl-e2e-{}-token", std::process::id()));
    std::fs::write(&token_file, "s3cret\n").unwrap();
    // Readable by others: refused, naming the flag and the mode.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
        .args(["run", "--exporter", "console", "--engine", &engine.name])
        .args(["--admin-listen", &listen])
        .args(["--admin-token-file", token_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin-token-file") && err.contains("mode 644"),
        "{err}"
    );
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start_with(
        &[&engine],
        &[
            "--exporter",
            "console",
            "--admin-listen",
            &listen,
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    wait_for_port(port);
    assert!(
        agent.log().contains("auth=\"bearer token\""),
        "{}",
        agent.log()
    );
    assert_eq!(http(port, "GET", "/healthz", None, "").0, 200);
    // The readiness probe stays open (a kubelet cannot present the token).
    assert_eq!(http(port, "GET", "/readyz", None, "").0, 200);
    for path in ["/v1/tracing", "/metrics"] {
        assert_eq!(http(port, "GET", path, None, "").0, 401, "{path}");
        assert_eq!(http(port, "GET", path, Some("wrong"), "").0, 401, "{path}");
        assert_eq!(http(port, "GET", path, Some("s3cret"), "").0, 200, "{path}");
        // The scheme is case-insensitive; another scheme is not a bearer.
        let lower = "authorization: bearer s3cret\r\n";
        assert_eq!(http_raw(port, "GET", path, "localhost", lower, "").0, 200);
        let basic = "authorization: Basic s3cret\r\n";
        assert_eq!(http_raw(port, "GET", path, "localhost", basic, "").0, 401);
    }
    let (status, body) = http(port, "GET", "/v1/tracing", Some("s3cret"), "");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["engines"][0]["engine"], engine.name.as_str());
    let put = format!(r#"{{"engine":"{}","head_sample_ratio":7}}"#, engine.name);
    let (status, body) = http(port, "PUT", "/v1/tracing", Some("s3cret"), &put);
    assert_eq!(status, 400);
    assert!(body.contains("head_sample_ratio"), "{body}");
    // Only the engines this agent serves may be named.
    let put = r#"{"engine":"ctl-e2e-missing","enabled":false}"#;
    let (status, body) = http(port, "PUT", "/v1/tracing", Some("s3cret"), put);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("ctl-e2e-missing"), "{body}");
    let _ = std::fs::remove_file(&token_file);
}

#[test]
fn tracing_off_and_on_through_the_cli_flip_the_control_word() {
    let engine = FakeEngine::new("cli");
    let control = engine.segment.ring().control();
    assert!(control.tracing_enabled());
    let out = cli_ok(&["tracing", "off", "--engine", &engine.name]);
    assert!(
        out.contains(&format!("{}: tracing off", engine.name)),
        "{out}"
    );
    assert!(!control.tracing_enabled());
    assert_eq!(engine.push(false), None, "nothing written while off");
    assert_eq!(engine.written(), 0);
    let status = json(&["tracing", "status", "--json", "--engine", &engine.name]);
    assert_eq!(status[0]["enabled"], false);
    assert_eq!(status[0]["pid"], std::process::id());
    let table = cli_ok(&["tracing", "status", "--engine", &engine.name]);
    assert!(table.starts_with("ENGINE"), "{table}");
    assert!(table.contains("off"), "{table}");
    cli_ok(&["tracing", "on", "--engine", &engine.name]);
    assert!(control.tracing_enabled());
    assert!(engine.push(false).is_some());
    assert_eq!(engine.written(), 1);
}

#[test]
fn set_stores_detail_and_sampling_in_the_control_block() {
    let engine = FakeEngine::new("set");
    let control = engine.segment.ring().control();
    let epoch = control.settings_epoch();
    cli_ok(&[
        "set",
        "--engine",
        &engine.name,
        "--detail",
        "request",
        "--head-sample",
        "0.25",
        "--tail-keep-errors",
        "true",
        "--tail-sample",
        "0",
        "--tail-ttft-ms",
        "1500",
        "--tail-e2e-ms",
        "2.5",
    ]);
    assert!(control.settings_epoch() > epoch);
    assert_eq!(control.detail(), Ok(ringside_shm_protocol::Detail::Request));
    assert_eq!(control.head_sample_ppm(), 250_000);
    let tail = control.tail_sampling();
    assert!(tail.keep_errors);
    assert_eq!(tail.sample_ppm, 0);
    assert_eq!(tail.ttft_threshold_us, 1_500_000);
    assert_eq!(tail.e2e_threshold_us, 2_500);
    let v = json(&["tracing", "status", "--json", "--engine", &engine.name]);
    assert_eq!(v[0]["detail"], "request");
    assert_eq!(v[0]["head_sample_ratio"], 0.25);
    assert_eq!(v[0]["tail"]["ttft_threshold_ms"], 1500.0);
}

#[test]
fn bad_values_and_unknown_engines_are_refused_with_a_clear_message() {
    let engine = FakeEngine::new("bad");
    let out = agent_cli(&["set", "--engine", &engine.name, "--head-sample", "1.5"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("head_sample_ratio"), "{err}");
    assert_eq!(engine.segment.ring().control().head_sample_ppm(), 1_000_000);
    let out = agent_cli(&["set", "--engine", &engine.name]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to set"));
    let missing = format!("ctl-e2e-{}-absent", std::process::id());
    let out = agent_cli(&["tracing", "off", "--engine", &missing]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("engine {missing}")), "{err}");
    // A named engine that cannot be opened changes none of the others.
    let out = agent_cli(&[
        "tracing",
        "off",
        "--engine",
        &missing,
        "--engine",
        &engine.name,
    ]);
    assert!(!out.status.success());
    assert!(engine.segment.ring().control().tracing_enabled());
}

#[test]
fn status_without_an_agent_shows_the_segment_side() {
    let engine = FakeEngine::new("status");
    engine.push(false);
    engine.push(false);
    let state = std::env::temp_dir().join(format!("ctl-e2e-{}-nostate.json", std::process::id()));
    let v = json(&[
        "status",
        "--json",
        "--engine",
        &engine.name,
        "--state-file",
        state.to_str().unwrap(),
    ]);
    let e = &v[0];
    assert_eq!(e["instance"], engine.name.as_str());
    assert_eq!(e["pid"], std::process::id());
    assert_eq!(e["alive"], true);
    assert_eq!(e["models"][0], MODEL);
    assert_eq!(e["ring"]["capacity"], 256);
    assert_eq!(e["ring"]["written"], 2);
    assert_eq!(e["ring"]["fill"], 2);
    assert!(e["accounting"].is_null());
    let table = cli_ok(&[
        "status",
        "--engine",
        &engine.name,
        "--state-file",
        state.to_str().unwrap(),
    ]);
    assert!(
        table.contains("WRITTEN") && table.contains(&engine.name),
        "{table}"
    );
}

#[test]
fn toggling_through_the_cli_stops_and_resumes_spans_at_the_collector() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let engine = FakeEngine::new("toggle");
    let _agent = Agent::start(&[&engine], &rotel, &[]);
    let before = engine.push(false).unwrap();
    rotel.wait_for_span(&before);
    cli_ok(&["tracing", "off", "--engine", &engine.name]);
    let head = engine.written();
    assert!((0..3).all(|_| engine.push(false).is_none()));
    assert_eq!(engine.written(), head, "no records while off");
    cli_ok(&["tracing", "on", "--engine", &engine.name]);
    let after = engine.push(false).unwrap();
    rotel.wait_for_span(&after);
    assert_eq!(
        rotel.spans().len(),
        2 * 4,
        "two requests with three phases each"
    );
}

#[test]
fn status_json_matches_what_the_collector_received() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let engine = FakeEngine::new("acct");
    let agent = Agent::start(&[&engine], &rotel, &[]);
    cli_ok(&[
        "set",
        "--engine",
        &engine.name,
        "--detail",
        "request",
        "--head-sample",
        "0.5",
    ]);
    let ids: Vec<String> = (0..40).filter_map(|_| engine.push(false)).collect();
    let status = agent.settled_status(&engine);
    let a = &status["accounting"];
    let exported = a["exported"].as_u64().unwrap();
    let sampled_out = a["sampled_out"].as_u64().unwrap();
    let lost = a["lost"]["total"].as_u64().unwrap();
    assert_eq!(a["written"].as_u64().unwrap(), 40);
    assert_eq!(exported + sampled_out + lost, 40, "{status:#}");
    assert_eq!(lost, 0);
    assert!(exported > 0 && sampled_out > 0, "{status:#}");
    // The collector received exactly the exported requests (one span each).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = ids.iter().filter(|id| rotel.has_span(id)).count() as u64;
        if received == exported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "collector has {received}, agent says {exported}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rotel.spans().len() as u64, exported);
}

#[test]
fn tail_sampling_keeps_the_error_and_drops_the_successes_at_ratio_zero() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let engine = FakeEngine::new("tail");
    let agent = Agent::start(&[&engine], &rotel, &[]);
    cli_ok(&[
        "set",
        "--engine",
        &engine.name,
        "--detail",
        "request",
        "--tail-keep-errors",
        "true",
        "--tail-sample",
        "0",
    ]);
    let ok: Vec<String> = (0..5).filter_map(|_| engine.push(false)).collect();
    let error = engine.push(true).unwrap();
    rotel.wait_for_span(&error);
    let status = agent.settled_status(&engine);
    assert_eq!(status["accounting"]["exported"], 1, "{status:#}");
    assert_eq!(status["accounting"]["sampled_out"], 5, "{status:#}");
    assert!(ok.iter().all(|id| !rotel.has_span(id)));
    // A slow request is kept by an absolute threshold.
    cli_ok(&["set", "--engine", &engine.name, "--tail-e2e-ms", "500"]);
    let slow = engine.push(false).unwrap();
    rotel.wait_for_span(&slow);
}

#[test]
fn one_agent_two_engines_each_with_its_own_resource_and_control_word() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let a = FakeEngine::new("two-a");
    let b = FakeEngine::new("two-b");
    let _agent = Agent::start(&[&a, &b], &rotel, &["--detail", "request"]);
    let span_a = a.push(false).unwrap();
    let span_b = b.push(false).unwrap();
    rotel.wait_for_span(&span_a);
    rotel.wait_for_span(&span_b);
    let spans = rotel.spans();
    assert!(spans.contains(&(a.name.clone(), span_a)), "{spans:?}");
    assert!(spans.contains(&(b.name.clone(), span_b)), "{spans:?}");
    cli_ok(&["tracing", "off", "--engine", &a.name]);
    assert!(!a.segment.ring().control().tracing_enabled());
    assert!(b.segment.ring().control().tracing_enabled());
    assert_eq!(a.push(false), None);
    let span_b2 = b.push(false).unwrap();
    rotel.wait_for_span(&span_b2);
    assert!(rotel.spans().contains(&(b.name.clone(), span_b2)));
}

#[test]
fn toggling_through_put_v1_tracing_stops_and_resumes_spans() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let engine = FakeEngine::new("put");
    let other = FakeEngine::new("put-other");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(&[&engine, &other], &rotel, &["--admin-listen", &listen]);
    wait_for_port(port);
    assert!(
        agent.log().contains("auth=\"bearer token\""),
        "{}",
        agent.log()
    );
    let token = agent.admin_token();
    // A local user outside the agent's user, root and group ringside cannot
    // read the token (and so gets 401 like any other caller without it).
    let token_file = agent.state.with_extension("admin-token");
    let stranger = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&token_file)
        .output()
        .expect("setpriv (util-linux)");
    assert!(
        !stranger.status.success(),
        "user nobody read the admin token"
    );
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&stranger.stderr)
    );
    let before = engine.push(false).unwrap();
    rotel.wait_for_span(&before);
    let off = format!(r#"{{"engine":"{}","enabled":false}}"#, engine.name);
    // Loopback is authenticated too: any local user can connect to it.
    assert_eq!(http(port, "PUT", "/v1/tracing", None, &off).0, 401);
    // A DNS-rebinding page's request carries its own host name.
    let auth = format!("authorization: Bearer {token}\r\n");
    let (status, _) = http_raw(
        port,
        "PUT",
        "/v1/tracing",
        "rebind.example:9464",
        &auth,
        &off,
    );
    assert_eq!(status, 421);
    assert!(
        engine.segment.ring().control().tracing_enabled(),
        "nothing switched"
    );
    let (status, body) = http(port, "PUT", "/v1/tracing", Some(&token), &off);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["engines"][0]["enabled"], false);
    assert!(
        other.segment.ring().control().tracing_enabled(),
        "the other engine is left alone"
    );
    let head = engine.written();
    assert!((0..3).all(|_| engine.push(false).is_none()));
    assert_eq!(engine.written(), head, "no records while off");
    let on = format!(r#"{{"engines":["{}"],"enabled":true}}"#, engine.name);
    assert_eq!(http(port, "PUT", "/v1/tracing", Some(&token), &on).0, 200);
    let after = engine.push(false).unwrap();
    rotel.wait_for_span(&after);
    let (_, body) = http(port, "GET", "/v1/tracing", Some(&token), "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["engines"].as_array().unwrap().len(), 2);
}

#[test]
fn metrics_count_every_request_under_tail_sampling_and_pass_promtool() {
    if !e2e_enabled() {
        return;
    }
    let rotel = Rotel::start();
    let engine = FakeEngine::new("prom");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &[&engine],
        &rotel,
        &["--admin-listen", &listen, "--detail", "request"],
    );
    wait_for_port(port);
    cli_ok(&[
        "set",
        "--engine",
        &engine.name,
        "--tail-keep-errors",
        "true",
        "--tail-sample",
        "0",
    ]);
    let ok: Vec<String> = (0..7).filter_map(|_| engine.push(false)).collect();
    let error = engine.push(true).unwrap();
    rotel.wait_for_span(&error);
    agent.settled_status(&engine);
    assert!(ok.iter().all(|id| !rotel.has_span(id)));
    let (status, text) = http(port, "GET", "/metrics", Some(&agent.admin_token()), "");
    assert_eq!(status, 200);
    assert_eq!(
        prometheus_sum(&text, "gen_ai_server_request_duration_seconds_count"),
        8.0,
        "{text}"
    );
    assert_eq!(
        prometheus_sum(&text, "ringside_agent_records_sampled_out_total"),
        7.0,
        "{text}"
    );
    assert!(text.contains(&format!("engine=\"{}\"", engine.name)));
    assert!(text.contains("le=\"81.92\""), "semconv buckets: {text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_rereads_the_config_file_without_dropping_queued_spans() {
    if !e2e_enabled() {
        return;
    }
    let first = Rotel::start();
    let second = Rotel::start();
    let engine = FakeEngine::new("hup");
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{}.conf", engine.name));
    let state = dir.join(format!("{}.state.json", engine.name));
    let stderr = dir.join(format!("{}.hup.stderr", engine.name));
    let write_config = |port: u16, delay_ms: u32| {
        std::fs::write(
            &config,
            format!(
                "endpoint = http://127.0.0.1:{port}\nbatch-delay-ms = {delay_ms}\ndetail = request\n"
            ),
        )
        .unwrap();
    };
    write_config(first.grpc_port, 100);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--engine",
            &engine.name,
        ])
        .args(["--poll-interval-ms", "10", "--discover-interval-ms", "200"])
        .args([
            "--admin-listen",
            "off",
            "--state-file",
            state.to_str().unwrap(),
        ])
        .env("RINGSIDE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.segment.ring().control().agent().0 != child.id() {
        assert!(Instant::now() < deadline, "the agent did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let one = engine.push(false).unwrap();
    first.wait_for_span(&one);
    // A long batch delay: the next span waits in the queue.
    write_config(first.grpc_port, 60_000);
    let hup = |child: &Child| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    hup(&child);
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let wait_log = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while log().matches("exporter reconfigured").count() < n {
            assert!(Instant::now() < deadline, "no reload: {}", log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log(1);
    let queued = engine.push(false).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!first.has_span(&queued), "held by the 60 s batch delay");
    // Now to the second collector, promptly: the queued span goes there.
    write_config(second.grpc_port, 100);
    hup(&child);
    wait_log(2);
    second.wait_for_span(&queued);
    assert!(!first.has_span(&queued));
    let _ = child.kill();
    let _ = child.wait();
    let text = log();
    assert!(text.contains("SIGHUP: configuration reloaded"), "{text}");
    for f in [&config, &state, &stderr] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn top_piped_prints_plain_lines_with_the_requests_it_saw() {
    let engine = FakeEngine::new("top-pipe");
    let child = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
        .args(["top", "--engine", &engine.name, "--iterations", "4"])
        .args(["--interval-ms", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    for i in 0..6 {
        engine.push(i == 0);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no terminal control codes when piped"
    );
    for line in &lines {
        assert!(
            line.contains(&format!("engine={} state=on", engine.name)),
            "{line}"
        );
    }
    let last = lines[3];
    assert!(last.contains("errors=1"), "{text}");
    assert!(
        last.contains("tok_in_s=") && !last.contains("rps=0.0 "),
        "{text}"
    );
    assert!(!last.contains("e2e_ms=- "), "{text}");
}

#[test]
fn top_in_tmux_renders_the_table_and_exits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux not installed");
        return;
    }
    let engine = FakeEngine::new("top-tty");
    // A request the engine holds: top lists it under the percentiles.
    let now = monotonic_ns();
    let held = ringside_shm_protocol::InflightEntry {
        request_id: [0x7c; 16],
        trace_id: [0x11; 16],
        parent_span_id: [0; 8],
        span_id: [0x33; 8],
        t_arrival_ns: now - 2_000_000_000,
        t_scheduled_ns: now - 1_900_000_000,
        t_first_token_ns: now - 1_000_000_000,
        t_last_token_ns: now - 10_000_000,
        t_progress_ns: now - 10_000_000,
        prompt_tokens: 30,
        prefilled_tokens: 30,
        output_tokens: 8,
        cached_prompt_tokens: 0,
        max_tokens: 64,
        phase: ringside_shm_protocol::InflightPhase::Decode as u8,
        operation: Operation::Chat as u8,
        trace_flags: 1,
        flags: 0,
        model_index: 0,
        sequence_slot: 0,
        reserved: [0; 4],
    };
    let _held = engine.segment.inflight().unwrap().claim(&held).unwrap();
    let session = format!("ctl-e2e-{}", std::process::id());
    let done = std::env::temp_dir().join(format!("{session}.exit"));
    let _ = std::fs::remove_file(&done);
    let command = format!(
        "{} top --engine {} --interval-ms 200; echo $? > {}",
        env!("CARGO_BIN_EXE_ringside-agent"),
        engine.name,
        done.display()
    );
    let status = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "200",
            "-y",
            "30",
            &command,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        engine.push(false);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let screen = loop {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .unwrap();
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        if screen.contains("TTFT ms") && screen.contains(&engine.name) && !screen.contains(" 0.0 ")
        {
            break screen;
        }
        assert!(Instant::now() < deadline, "top did not render:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(screen.contains("ringside top"), "{screen}");
    assert!(
        screen.contains("IN FLIGHT") && screen.contains(&"7c".repeat(16)),
        "{screen}"
    );
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "q"])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(code) = std::fs::read_to_string(&done) {
            assert_eq!(code.trim(), "0", "top exited cleanly");
            break;
        }
        assert!(Instant::now() < deadline, "top did not exit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&done);
}

#[test]
fn status_finds_each_agents_own_state_file_in_the_runtime_directory() {
    let engine = FakeEngine::new("rundir");
    let dir = std::env::temp_dir().join(format!("ctl-e2e-{}-rundir", std::process::id()));
    let dir_text = dir.to_str().unwrap();
    let mut agent = Agent::start_with(
        &[&engine],
        &["--exporter", "file", "--output", "/dev/null", "--backfill"],
        &[("RUNTIME_DIRECTORY", dir_text)],
    );
    let own = dir.join(format!("agent-{}.json", agent.child.id()));
    for _ in 0..3 {
        engine.push(false);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_ringside-agent"))
            .args(["status", "--json", "--engine", &engine.name])
            .env("RUNTIME_DIRECTORY", dir_text)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v[0]["accounting"]["exported"] == 3 {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:#}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status[0]["accounting"]["written"], 3);
    assert_eq!(status[0]["accounting"]["balanced"], true);
    assert_eq!(status[0]["agent"]["pid"], agent.child.id());
    assert!(own.is_file());
    Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .unwrap();
    assert!(agent.child.wait().unwrap().success());
    assert!(!own.exists(), "removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inflight_lists_what_the_engine_holds_and_marks_the_stalled_request() {
    use ringside_shm_protocol::{InflightEntry, InflightPhase};
    let name = format!("ctl-e2e-{}-inflight", std::process::id());
    let mut options = CreateOptions::new(name.clone(), vec![MODEL.to_owned()]);
    options.capacity = 256;
    options.inflight_capacity = 8;
    let segment = EngineSegment::create(&options).expect("create segment");
    let table = segment.inflight().unwrap();
    let now = monotonic_ns();
    let decoding = InflightEntry {
        request_id: [0xd1; 16],
        trace_id: [0x11; 16],
        parent_span_id: [0x22; 8],
        span_id: [0x33; 8],
        t_arrival_ns: now - 3_000_000_000,
        t_scheduled_ns: now - 2_900_000_000,
        t_first_token_ns: now - 2_000_000_000,
        t_last_token_ns: now - 10_000_000,
        t_progress_ns: now - 10_000_000,
        prompt_tokens: 30,
        prefilled_tokens: 30,
        output_tokens: 12,
        cached_prompt_tokens: 4,
        max_tokens: 64,
        phase: InflightPhase::Decode as u8,
        operation: Operation::Chat as u8,
        trace_flags: 1,
        flags: 0,
        model_index: 0,
        sequence_slot: 0,
        reserved: [0; 4],
    };
    let queued = InflightEntry {
        request_id: [0x9e; 16],
        trace_id: [0x44; 16],
        parent_span_id: [0; 8],
        span_id: [0x55; 8],
        t_arrival_ns: now - 60_000_000_000,
        t_scheduled_ns: 0,
        t_first_token_ns: 0,
        t_last_token_ns: 0,
        t_progress_ns: now - 60_000_000_000,
        prompt_tokens: 20,
        prefilled_tokens: 0,
        output_tokens: 0,
        cached_prompt_tokens: 0,
        phase: InflightPhase::Queued as u8,
        sequence_slot: u16::MAX,
        ..decoding
    };
    let _decoding = table.claim(&decoding).unwrap();
    let _queued = table.claim(&queued).unwrap();

    let v = json(&[
        "inflight",
        "--json",
        "--engine",
        &name,
        "--stall-after",
        "1s",
    ]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    // Oldest first.
    let (q, d) = (&rows[0], &rows[1]);
    assert_eq!(q["request_id"], "9e".repeat(16));
    assert_eq!(q["phase"], "queued");
    assert_eq!(q["engine"], name.as_str());
    assert_eq!(q["engine_pid"], std::process::id());
    assert_eq!(q["engine_alive"], true);
    assert_eq!(q["model"], MODEL);
    assert_eq!(q["prompt_tokens"], 20);
    assert_eq!(q["output_tokens"], 0);
    assert!(q["parent_span_id"].is_null());
    assert!(q["tokens_per_s"].is_null());
    assert!(q["since_last_token_s"].is_null());
    assert!(q["age_s"].as_f64().unwrap() >= 60.0, "{q}");
    assert_eq!(q["stalled"], true);
    assert_eq!(d["request_id"], "d1".repeat(16));
    assert_eq!(d["phase"], "decode");
    assert_eq!(d["trace_id"], "11".repeat(16));
    assert_eq!(d["span_id"], "33".repeat(8));
    assert_eq!(d["parent_span_id"], "22".repeat(8));
    assert_eq!(d["operation"], "chat");
    assert_eq!(d["prefilled_tokens"], 30);
    assert_eq!(d["cached_prompt_tokens"], 4);
    assert_eq!(d["output_tokens"], 12);
    assert!(d["tokens_per_s"].as_f64().unwrap() > 0.0, "{d}");
    assert!(d["since_last_token_s"].as_f64().unwrap() < 1.0, "{d}");
    assert_eq!(d["stalled"], false);

    let text = cli_ok(&["inflight", "--engine", &name, "--stall-after", "1s"]);
    assert!(
        text.contains(&"9e".repeat(16)) && text.contains(&"d1".repeat(16)),
        "{text}"
    );
    assert!(
        text.contains("STALLED") && text.contains("queued"),
        "{text}"
    );

    // An engine without a table: a note on stderr, not an error.
    let old_name = format!("ctl-e2e-{}-inflight-none", std::process::id());
    let mut old_options = CreateOptions::new(old_name.clone(), vec![MODEL.to_owned()]);
    old_options.capacity = 256;
    old_options.inflight_capacity = 0;
    let _old = EngineSegment::create(&old_options).expect("create segment");
    let out = agent_cli(&["inflight", "--json", "--engine", &old_name]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&old_name),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_hostile_writer_with_maximal_variety_cannot_blow_up_the_metrics_page_or_the_agent() {
    if !e2e_enabled() {
        return;
    }
    // Before the statuses were folded, 32 000 forged but valid records made
    // one scrape a 403 MB page with an 833 MB peak (the unit's MemoryMax is
    // 256M): each distinct status was a series.
    let rotel = Rotel::start();
    let engine = FakeEngine::new("hostile");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(&[&engine], &rotel, &["--admin-listen", &listen]);
    wait_for_port(port);
    let producer = engine.segment.ring().producer();
    let mut pushed = 0u32;
    for batch in 0..160u32 {
        for i in 0..200u32 {
            let n = batch * 200 + i;
            let mut r = engine.record(true).decode(1).unwrap();
            // Every error class, and every valid error status (400..=599)
            // under each; a tenth without a class, so the status is its type.
            let class = n % 11;
            r.error_type = ErrorType::try_from(class as u8).unwrap();
            r.http_status = 400 + (n.wrapping_mul(7919) % 200) as u16;
            r.operation = if n % 2 == 0 {
                Operation::Chat
            } else {
                Operation::TextCompletion
            };
            r.stream = n % 3 == 0;
            assert!(matches!(
                producer.push(&r.encode()),
                ringside_shm_protocol::PushOutcome::Written(_)
            ));
            pushed += 1;
        }
        // Let the agent keep up with the 256-slot ring.
        std::thread::sleep(Duration::from_millis(30));
    }
    let status = agent.settled_status(&engine);
    let a = &status["accounting"];
    let count = |v: &serde_json::Value| v.as_u64().unwrap();
    // Every valid record the agent read is in the histograms (sampled out or
    // not): what was written less what the ring lost before it was read.
    let read = count(&a["written"])
        - count(&a["not_observed"])
        - count(&a["lost"]["overwritten"])
        - count(&a["lost"]["abandoned"])
        - count(&a["lost"]["invalid"]);
    assert!(
        read > u64::from(pushed) / 2,
        "the agent read {read} of {pushed}: {status:#}\n{}",
        agent.log()
    );
    let (code, page) = http(port, "GET", "/metrics", Some(&agent.admin_token()), "");
    assert_eq!(code, 200);
    assert!(
        page.len() < 1 << 20,
        "/metrics is {} bytes for one engine",
        page.len()
    );
    let series = page
        .lines()
        .filter(|l| l.starts_with("gen_ai_server_request_duration_seconds_count{"))
        .count();
    // 2 operations × (10 classes + 14 statuses with a series + 4xx + 5xx).
    assert!(series <= 2 * (10 + 16), "{series} series");
    assert_eq!(count(&a["lost"]["invalid"]), 0, "the variety was valid");
    // Every request read is in the histograms, whatever its status.
    assert_eq!(
        prometheus_sum(&page, "gen_ai_server_request_duration_seconds_count") as u64,
        read,
        "{status:#}"
    );
    let peak_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "hostile writer: {read} records read, /metrics {} bytes, {series} series, agent peak RSS {peak_kib} KiB",
        page.len()
    );
    assert!(peak_kib < 128 * 1024, "agent peak RSS {peak_kib} KiB");
}
