//! Starting and talking to the real binaries in end-to-end tests.

use ringside_shm_protocol::{AttachedSegment, OpenOptions, Record, RequestRecord, StartAt};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// End-to-end tests need the model, the Python tools and a release build; they
/// run when `RINGSIDE_E2E=1` (as `scripts/test.sh` sets it) and are skipped,
/// saying so, otherwise ([`skip`]: under `CI=true` that fails the test).
pub fn e2e_enabled(test: &str) -> bool {
    let on = std::env::var("RINGSIDE_E2E").is_ok_and(|v| v == "1");
    if !on {
        skip(test, "set RINGSIDE_E2E=1; scripts/test.sh does");
    }
    on
}

/// A test that cannot run here says so and returns; under `CI=true` (as
/// `.ci/run` sets it) it fails instead, naming what it could not do: a CI run
/// never passes a check it skipped.
///
/// # Panics
/// Under `CI=true`.
pub fn skip(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI=true: {why}");
    }
    eprintln!("{test}: skipped ({why})");
}

/// The directory holding the workspace's binaries for the profile the tests
/// were built with (`target/<profile>`), found from the test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf()
}

/// A binary of the workspace; tells how to build it if it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (cargo build --workspace --release)",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The Python of the project's virtualenv (`scripts/setup.sh` makes it).
pub fn python() -> PathBuf {
    let venv =
        std::env::var_os("RINGSIDE_VENV").map_or_else(|| repo_root().join(".venv"), PathBuf::from);
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} not found: run scripts/setup.sh",
        python.display()
    );
    python
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A unique instance name for this test process.
pub fn unique_instance(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "e2e-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running `ringside-agent run` with the given flags; SIGTERM (an orderly
/// stop with its flush) when dropped.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    /// Its log, when started with [`Agent::start_logged`].
    log: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

impl Agent {
    /// Starts the agent (its log goes to the test's stderr).
    pub fn start(args: &[&str]) -> Agent {
        Agent {
            child: Command::new(workspace_bin("ringside-agent"))
                .arg("run")
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .expect("start ringside-agent"),
            log: None,
        }
    }

    /// Starts the agent keeping its log for [`Agent::log_text`] (and
    /// echoing it to the test's stderr).
    pub fn start_logged(args: &[&str]) -> Agent {
        let mut child = Command::new(workspace_bin("ringside-agent"))
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringside-agent");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut text = sink.lock().unwrap_or_else(|e| e.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        Agent {
            child,
            log: Some(log),
        }
    }

    /// What the agent logged so far (empty unless started logged).
    pub fn log_text(&self) -> String {
        self.log.as_ref().map_or_else(String::new, |log| {
            log.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }

    /// Waits until the agent's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?} within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// Waits for the agent to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A running `ringside-engine serve` on the default model.
#[derive(Debug)]
pub struct Engine {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its segment's instance name.
    pub instance: String,
    /// The served model name.
    pub model: String,
    log: PathBuf,
}

impl Engine {
    /// Starts the engine with `extra` flags and waits until `/health` says it
    /// is ready.
    pub fn start(tag: &str, extra: &[&str]) -> Engine {
        Self::start_with_env(tag, extra, &[])
    }

    /// [`Engine::start`] with extra environment variables.
    pub fn start_with_env(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Engine {
        Self::spawn(unique_instance(tag), free_port(), extra, env, None)
    }

    /// [`Engine::start`] under `prlimit --nofile=N:N`: at most `nofile`
    /// descriptors, soft and hard (`prlimit` execs the engine: same pid).
    pub fn start_with_nofile(tag: &str, extra: &[&str], nofile: u64) -> Engine {
        Self::spawn(unique_instance(tag), free_port(), extra, &[], Some(nofile))
    }

    /// A new engine on this one's instance name and port, as systemd's
    /// `Restart=` starts one after a death (this one must have exited).
    pub fn restart(&self, extra: &[&str]) -> Engine {
        Self::spawn(self.instance.clone(), self.port, extra, &[], None)
    }

    fn spawn(
        instance: String,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Engine {
        let log =
            std::env::temp_dir().join(format!("{instance}.{port}.{}.log", unique_instance("log")));
        let log_file = std::fs::File::create(&log).expect("engine log file");
        let model = "gemma-3-270m".to_owned();
        let engine_bin = workspace_bin("ringside-engine");
        let mut command = match nofile {
            None => Command::new(&engine_bin),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(&engine_bin);
                c
            }
        };
        let child = command
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--instance",
                &instance,
            ])
            .args(["--served-model-name", &model])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn ringside-engine");
        let engine = Engine {
            child,
            port,
            instance,
            model,
            log,
        };
        engine.wait_ready(Duration::from_secs(120));
        engine
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if http(self.port, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "engine not ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The engine's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a `kill -s` name: KILL, SEGV, STOP, CONT, …) to the
    /// engine. For a signal that ends it, waits for the process and reaps it,
    /// as systemd would: a zombie still looks alive to readers.
    pub fn signal(&mut self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} failed");
        if matches!(signal, "KILL" | "SEGV" | "ABRT" | "TERM" | "INT" | "BUS") {
            let _ = self.child.wait();
        }
    }

    /// Whether the engine process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// What the engine logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a scenario of `tests/e2e/openai_client.py` against this engine and
    /// returns the JSON objects it printed, one per request.
    pub fn openai_client(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let script = repo_root().join("tests/e2e/openai_client.py");
        let output = Command::new(python())
            .arg(script)
            .args([&self.base_url(), &self.model])
            .args(args)
            .output()
            .expect("run openai_client.py");
        assert!(
            output.status.success(),
            "openai_client.py {args:?} failed:\n{}\nengine log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line from openai_client.py"))
            .collect()
    }

    /// Opens the engine's segment as the agent would.
    pub fn segment(&self) -> AttachedSegment {
        AttachedSegment::open(&self.instance, &OpenOptions::default()).expect("open segment")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SIGTERM first, so the engine removes its segment.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the engine has written `count` records. The engine writes a
/// request's record right after handing the response over, so a client can
/// see its response a moment before the record is in the ring.
pub fn wait_for_records(segment: &AttachedSegment, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while segment.ring().counters().head < count {
        assert!(
            Instant::now() < deadline,
            "expected {count} records, the ring has {}",
            segment.ring().counters().head
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every record the ring still holds, decoded (a bad record fails the test).
pub fn records(segment: &AttachedSegment) -> Vec<RequestRecord> {
    let mut consumer = segment.ring().consumer(StartAt::Oldest);
    let model_count = segment.info().model_count();
    let mut out = Vec::new();
    consumer
        .poll(usize::MAX, |_, record: &Record| {
            out.push(
                record
                    .decode(model_count)
                    .expect("engine wrote an invalid record"),
            );
        })
        .expect("poll");
    out
}

/// Lowercase hex of bytes, as the engine prints ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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

/// The `rotel-agent` collector binary (PyPI `rotel`): on `PATH`, in
/// `$RINGSIDE_VENV`, or in the project's `.venv` (`scripts/setup.sh` links it
/// into `bin/`; the wheel keeps it under `site-packages/rotel/`).
pub fn rotel_binary() -> PathBuf {
    find_rotel().expect(
        "rotel-agent not found on PATH, in $RINGSIDE_VENV or in .venv: run scripts/setup.sh",
    )
}

/// [`rotel_binary`], or `None` where it is not installed (benchmarks skip).
pub fn find_rotel() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("rotel-agent")));
    }
    let venvs = std::env::var_os("RINGSIDE_VENV")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo_root().join(".venv")]);
    for venv in venvs {
        candidates.push(venv.join("bin/rotel-agent"));
        if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
            candidates.extend(
                entries
                    .flatten()
                    .map(|e| e.path().join("site-packages/rotel/rotel-agent")),
            );
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// CPU time (user + system) process `pid` has used so far (`"self"` for
/// this one), from `/proc/<pid>/stat` in 10 ms ticks; zero if unreadable.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count after the last ')'.
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15: 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A real OpenTelemetry collector (`rotel-agent`) on loopback, printing every
/// span and metric it receives.
#[derive(Debug)]
pub struct Collector {
    child: Child,
    output: std::sync::Arc<std::sync::Mutex<String>>,
    /// OTLP/gRPC port.
    pub grpc_port: u16,
    /// OTLP/HTTP port.
    pub http_port: u16,
}

impl Collector {
    /// Starts rotel on two free ports.
    pub fn start() -> Collector {
        Self::start_on(free_port(), free_port())
    }

    /// Starts rotel on the given ports (a test that stops a collector and
    /// starts another where the first was) and waits until gRPC accepts
    /// connections.
    pub fn start_on(grpc_port: u16, http_port: u16) -> Collector {
        Self::start_at("127.0.0.1", grpc_port, http_port)
    }

    /// Starts rotel on the given ports of one loopback address (a gateway
    /// that moves from one address to another).
    pub fn start_at(ip: &str, grpc_port: u16, http_port: u16) -> Collector {
        let mut child = Command::new(rotel_binary())
            .args(["start", "--exporter", "blackhole"])
            .args(["--otlp-grpc-endpoint", &format!("{ip}:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("{ip}:{http_port}")])
            .args(["--debug-log", "traces", "--debug-log", "metrics"])
            .args(["--debug-log-verbosity", "detailed"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rotel-agent");
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let streams: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in streams {
            let output = std::sync::Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut text = output.lock().unwrap_or_else(|e| e.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((ip, grpc_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rotel did not listen on {grpc_port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Collector {
            child,
            output,
            grpc_port,
            http_port,
        }
    }

    /// Sends it `signal` (`STOP`: it hangs with its connections open, as a
    /// gateway whose host left the network; `CONT`: it goes on).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} rotel");
    }

    /// Everything rotel printed so far.
    pub fn text(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `pred` holds for everything printed so far, and returns it.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; collector printed:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The printed blocks of the spans received so far.
    pub fn spans(&self) -> Vec<String> {
        span_blocks(&self.text())
    }

    /// Waits until a span with `span_id` (hex) was received, and returns its
    /// printed block (up to the next span).
    pub fn wait_for_span(&self, span_id: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(block) = span_block(&self.text(), span_id) {
                return block;
            }
            assert!(
                Instant::now() < deadline,
                "span {span_id} never reached the collector; it printed:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The blocks rotel printed, one per span.
pub fn span_blocks(text: &str) -> Vec<String> {
    text.split("Span #")
        .skip(1)
        .map(|block| {
            // A block ends where the next resource or scope starts.
            let end = ["ResourceSpans #", "ScopeSpans #", "ResourceMetrics #"]
                .iter()
                .filter_map(|m| block.find(m))
                .min()
                .unwrap_or(block.len());
            block[..end].to_owned()
        })
        .collect()
}

/// The block rotel printed for the span whose `ID` is `span_id`.
pub fn span_block(text: &str, span_id: &str) -> Option<String> {
    span_blocks(text)
        .into_iter()
        .find(|block| span_field(block, "ID") == Some(span_id))
}

/// A `Name : value` field of a printed span block.
pub fn span_field<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    block.lines().find_map(|line| {
        let (key, value) = line.split_once(" : ")?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// The value of attribute `key` in a printed span block (`key: Double(0.5)`,
/// `key: Int(7)`, `key: Str(x)`): what is inside the parentheses.
pub fn span_attribute<'a>(block: &'a str, key: &str) -> Option<&'a str> {
    let at = block.find(&format!("{key}: "))? + key.len() + 2;
    let rest = &block[at..];
    let open = rest.find('(')?;
    let close = rest.find(')')?;
    rest.get(open + 1..close)
}

/// A double attribute of a printed span block.
pub fn span_double(block: &str, key: &str) -> Option<f64> {
    span_attribute(block, key)?.parse().ok()
}

/// An integer attribute of a printed span block.
pub fn span_int(block: &str, key: &str) -> Option<i64> {
    span_attribute(block, key)?.parse().ok()
}

/// The exported SERVER span of `trace_id`, once rotel printed it (60 s at most).
pub fn server_span(collector: &Collector, trace_id: &str) -> String {
    let find = |text: &str| {
        span_blocks(text).into_iter().find(|b| {
            span_field(b, "Trace ID") == Some(trace_id)
                && span_field(b, "Kind") == Some("SPAN_KIND_SERVER")
        })
    };
    let text = collector.wait_for("the server span", Duration::from_secs(60), |t| {
        find(t).is_some()
    });
    find(&text).expect("server span")
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

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         traceparent: 00-{trace_id}-00000000000000aa-01\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut socket = TcpStream::connect(("127.0.0.1", engine.port)).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    socket.write_all(request.as_bytes()).expect("send");
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

/// The numeric value of `key=` in a log (colours or not): the first one.
pub fn log_number(log: &str, key: &str) -> Option<u64> {
    // Drop ANSI colour sequences (ESC [ … m) that tracing puts around keys and values.
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let rest = plain.split(&format!("{key}=")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
