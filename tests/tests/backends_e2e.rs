//! Real backends that users look at, fed by the real engine and agent: a
//! Prometheus server (Debian's `prometheus`) scrapes the engine's and the
//! agent's `/metrics`, and PromQL must give back what the clients saw.
//! Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, free_port, http, timed_traced_chat,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let (_, first_ms, _) = timed_traced_chat(&engine, &format!("{:032x}", 0xb0_u128 + n), true);
        client_ttft_s.push(first_ms / 1e3);
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
