//! A real OpenTelemetry collector (rotel) and what it printed.

use super::{free_port, repo_root};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
