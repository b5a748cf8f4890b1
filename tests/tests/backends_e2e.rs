//! Real backends that users look at, fed by the real engine and agent: a
//! Prometheus server (Debian's `prometheus`) scrapes the engine's and the
//! agent's `/metrics`, and PromQL must give back what the clients saw.
//! Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, free_port, http, repo_root, timed_traced_chat,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One backend at a time: their timings are compared with a client's clock
/// within 5 ms, and two engines and a Phoenix on two cores would skew them.
static SERIAL: Mutex<()> = Mutex::new(());

/// A Prometheus server on loopback with its own configuration and storage,
/// killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(tag: &str, config: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("ringside-prom-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus.yml");
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config_path)
            .output()
            .expect("promtool (Debian package prometheus; scripts/setup.sh)");
        assert!(
            check.status.success(),
            "promtool refused the configuration:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("start prometheus (Debian package prometheus; scripts/setup.sh)");
        let prometheus = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/-/ready", &[], b"").map_or(true, |r| r.status != 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready; its log:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector of a PromQL query: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let response = http(
            self.port,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            &[],
            b"",
        )
        .expect("PromQL query");
        let body = response.json();
        assert_eq!(response.status, 200, "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: {body}"))
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of `promql`, once it equals `expected` (scrapes are
    /// periodic); panics with what it last saw.
    fn wait_for_value(&self, promql: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(promql);
            if got.len() == 1 && got[0].1 == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: expected {expected}, last saw {got:?}; targets: {}",
                http(self.port, "GET", "/api/v1/targets", &[], b"")
                    .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("token file");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("token file");
}

#[test]
fn prometheus_scrapes_the_engine_and_the_agent_and_promql_gives_back_what_the_clients_saw() {
    if !e2e_enabled(
        "prometheus_scrapes_the_engine_and_the_agent_and_promql_gives_back_what_the_clients_saw",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let collector = Collector::start();
    let engine = Engine::start("prometheus", &[]);
    let admin_port = free_port();
    let token_dir =
        std::env::temp_dir().join(format!("ringside-prom-token-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).expect("token dir");
    let token_file = token_dir.join("admin-token");
    write_private(&token_file, "prometheus-scrapes-with-this-token\n");
    let _agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &format!("http://127.0.0.1:{}", collector.grpc_port),
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
        "--admin-token-file",
        token_file.to_str().expect("utf-8 path"),
    ]);
    // The agent's /metrics is authenticated, as it is on every host: the
    // scrape sends the bearer token from the file.
    let config = format!(
        "global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: engine
    static_configs:
      - targets: ['127.0.0.1:{engine_port}']
  - job_name: agent
    authorization:
      type: Bearer
      credentials_file: {token}
    static_configs:
      - targets: ['127.0.0.1:{admin_port}']
",
        engine_port = engine.port,
        token = token_file.display(),
    );
    let prometheus = Prometheus::start(&engine.instance, &config);
    // The agent attaches within a scan; requests before it would be history.
    std::thread::sleep(Duration::from_secs(2));

    // What the clients see: streamed requests with their time to the first
    // content, one non-streamed, and one the engine refuses.
    let mut client_ttft_s = Vec::new();
    for n in 0..4 {
        let view = timed_traced_chat(&engine, &format!("{:032x}", 0xb0_u128 + n), true);
        client_ttft_s.push(view.first_ms / 1e3);
    }
    timed_traced_chat(&engine, &format!("{:032x}", 0xc0_u128), false);
    let refused_body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 7,
    })
    .to_string();
    let refused = http(
        engine.port,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        refused_body.as_bytes(),
    )
    .expect("refused request");
    assert_eq!(refused.status, 400);

    let instance = &engine.instance;
    // The engine's own counters, by HTTP status.
    prometheus.wait_for_value(
        r#"sum(ringside_requests_total{job="engine",status="200"})"#,
        5.0,
    );
    prometheus.wait_for_value(
        r#"sum(ringside_requests_total{job="engine",status="400"})"#,
        1.0,
    );
    // The agent's histograms, from the records, labelled with the engine.
    prometheus.wait_for_value(
        &format!(r#"sum(gen_ai_server_request_duration_seconds_count{{job="agent",engine="{instance}"}})"#),
        6.0,
    );
    prometheus.wait_for_value(
        &format!(
            r#"sum(gen_ai_server_request_duration_seconds_count{{job="agent",engine="{instance}",error_type="invalid_request"}})"#
        ),
        1.0,
    );
    prometheus.wait_for_value(
        &format!(r#"sum(ringside_agent_records_read_total{{job="agent",engine="{instance}"}})"#),
        6.0,
    );
    // TTFT is recorded for every success: the four streamed and the
    // non-streamed one (whose first token the client cannot see).
    prometheus.wait_for_value(
        &format!(
            r#"sum(gen_ai_server_time_to_first_token_seconds_bucket{{job="agent",engine="{instance}",le="+Inf"}})"#
        ),
        5.0,
    );
    // Bucket by bucket against the clients' own clocks: at each boundary no
    // client measurement is within 5 ms of, the streamed requests the client
    // saw at or under it are under it in Prometheus too (the non-streamed
    // one is known only to be under its whole duration, so it is allowed
    // either side).
    let buckets = prometheus.query(&format!(
        r#"sum by (le) (gen_ai_server_time_to_first_token_seconds_bucket{{job="agent",engine="{instance}"}})"#
    ));
    let mut compared = 0;
    for (labels, count) in &buckets {
        let le: f64 = match labels["le"].as_str() {
            Some("+Inf") | None => continue,
            Some(le) => le.parse().expect("numeric le"),
        };
        if client_ttft_s.iter().any(|t| (t - le).abs() <= 0.005) {
            continue;
        }
        let seen = client_ttft_s.iter().filter(|t| **t <= le).count() as f64;
        assert!(
            *count == seen || *count == seen + 1.0,
            "le={le}: Prometheus counts {count}, the streaming clients saw {seen} at or under it \
             (client TTFTs {client_ttft_s:?}); buckets {buckets:?}"
        );
        compared += 1;
    }
    assert!(
        compared >= 10,
        "too few unambiguous boundaries: {buckets:?}"
    );
    // The phase histograms reach Prometheus too.
    prometheus.wait_for_value(
        &format!(
            r#"sum(ringside_server_request_queue_duration_seconds_count{{job="agent",engine="{instance}"}})"#
        ),
        5.0,
    );
    let _ = std::fs::remove_dir_all(&token_dir);
}

/// Arize Phoenix (PyPI `arize-phoenix`, in `.venv` from `scripts/setup.sh
/// --tests`) on loopback with its own working directory (SQLite), killed
/// when dropped.
struct Phoenix {
    child: Child,
    http_port: u16,
    grpc_port: u16,
    dir: PathBuf,
}

impl Phoenix {
    fn start() -> Phoenix {
        let dir = std::env::temp_dir().join(format!("ringside-phoenix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("phoenix dir");
        let (http_port, grpc_port) = (free_port(), free_port());
        let phoenix = repo_root().join(".venv/bin/phoenix");
        let child = Command::new(&phoenix)
            .arg("serve")
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", http_port.to_string())
            .env("PHOENIX_GRPC_PORT", grpc_port.to_string())
            .env("PHOENIX_WORKING_DIR", &dir)
            .env("PHOENIX_TELEMETRY_ENABLED", "false")
            // A closed network: no docs assistant fetched from the internet.
            .env("PHOENIX_ALLOW_EXTERNAL_RESOURCES", "false")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("phoenix.log")).expect("log file"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} (arize-phoenix; scripts/setup.sh --tests): {e}",
                    phoenix.display()
                )
            });
        let phoenix = Phoenix {
            child,
            http_port,
            grpc_port,
            dir,
        };
        // Phoenix imports a lot before it listens: minutes on a loaded 2-core machine.
        let deadline = Instant::now() + Duration::from_secs(240);
        while http(http_port, "GET", "/v1/projects", &[], b"").map_or(true, |r| r.status != 200)
            || std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "phoenix did not come up; its log:\n{}",
                std::fs::read_to_string(phoenix.dir.join("phoenix.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        phoenix
    }

    /// The spans of `trace_id` Phoenix's REST API returns, once it returns
    /// `count` of them.
    fn wait_for_trace(&self, trace_id: &str, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = http(
                self.http_port,
                "GET",
                "/v1/projects/default/spans?limit=1000",
                &[],
                b"",
            )
            .expect("GET spans");
            let body = response.json();
            let spans: Vec<serde_json::Value> = body["data"]
                .as_array()
                .map(|spans| {
                    spans
                        .iter()
                        .filter(|s| s["context"]["trace_id"] == trace_id)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if spans.len() >= count {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "Phoenix has {} of {count} spans of {trace_id}: {body}",
                spans.len()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Seconds since the epoch of Phoenix's ISO 8601 stamps
/// (`2026-12-06T23:46:09.933772+00:00`).
fn epoch_seconds(stamp: &serde_json::Value) -> f64 {
    let text = stamp.as_str().expect("a timestamp string");
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    parsed.unix_timestamp_nanos() as f64 / 1e9
}

#[test]
fn phoenix_receives_spans_over_grpc_and_http_protobuf_with_the_clients_ids_tokens_and_durations() {
    if !e2e_enabled(
        "phoenix_receives_spans_over_grpc_and_http_protobuf_with_the_clients_ids_tokens_and_durations",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let phoenix = Phoenix::start();
    let engine = Engine::start("phoenix", &[]);
    for (protocol, endpoint, tag) in [
        (
            "grpc",
            format!("http://127.0.0.1:{}", phoenix.grpc_port),
            0xd0_u128,
        ),
        (
            "http/protobuf",
            format!("http://127.0.0.1:{}", phoenix.http_port),
            0xe0_u128,
        ),
    ] {
        // Phoenix takes traces only: without `--metrics-exporter none` every
        // metrics push would fail (gRPC Unimplemented, HTTP 405).
        let agent = Agent::start_logged(&[
            "--metrics-exporter",
            "none",
            "--engine",
            &engine.instance,
            "--protocol",
            protocol,
            "--endpoint",
            &endpoint,
            "--batch-delay-ms",
            "100",
            "--admin-listen",
            "off",
        ]);
        // The agent attaches within a scan; requests before it would be history.
        std::thread::sleep(Duration::from_secs(2));
        for (n, stream) in [(1_u128, true), (2, false)] {
            let trace_id = format!("{:032x}", tag + n);
            let view = timed_traced_chat(&engine, &trace_id, stream);
            let (sent_at_ns, last_ms) = (view.sent_at_ns, view.last_ms);
            let spans = phoenix.wait_for_trace(&trace_id, 4);
            let what = format!("{protocol} stream={stream}: {spans:#?}");
            let server: Vec<_> = spans.iter().filter(|s| s["span_kind"] == "LLM").collect();
            assert_eq!(server.len(), 1, "one LLM (server) span: {what}");
            let server = server[0];
            assert_eq!(
                server["parent_id"], "00000000000000aa",
                "the caller's parent span: {what}"
            );
            let server_id = &server["context"]["span_id"];
            let mut children: Vec<&str> = spans
                .iter()
                .filter(|s| &s["parent_id"] == server_id)
                .map(|s| s["name"].as_str().unwrap_or(""))
                .collect();
            children.sort_unstable();
            assert_eq!(children, ["decode", "prefill", "queue"], "{what}");
            // Token counts as the engine answered them (a chat of 32 tokens at most).
            let attributes = &server["attributes"];
            let output = attributes["gen_ai.usage.output_tokens"]
                .as_u64()
                .unwrap_or_else(|| panic!("output tokens: {what}"));
            assert!((1..=32).contains(&output), "{what}");
            assert!(
                attributes["gen_ai.usage.input_tokens"].as_u64() > Some(0),
                "{what}"
            );
            // The duration the client measured, and where its clock put the start.
            let start = epoch_seconds(&server["start_time"]);
            let duration_ms = (epoch_seconds(&server["end_time"]) - start) * 1e3;
            let start_offset_ms = (start - sent_at_ns as f64 / 1e9) * 1e3;
            assert!(
                (duration_ms - last_ms).abs() <= 5.0,
                "duration {duration_ms:.2} ms, the client saw {last_ms:.2} ms: {what}"
            );
            assert!(
                start_offset_ms.abs() <= 5.0,
                "starts {start_offset_ms:+.2} ms from the client's send: {what}"
            );
        }
        // SIGTERM: the agent flushes (metrics included, were they on) and says so.
        let _ = Command::new("kill").arg(agent.pid().to_string()).status();
        agent.wait_for_log(
            "shutdown: everything queued was delivered",
            Duration::from_secs(30),
        );
        let log = agent.log_text();
        assert!(!log.contains("WARN"), "{protocol}: a warning: {log}");
    }
}
