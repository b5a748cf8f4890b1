//! A running `ringside-engine serve`, and its ring's records.

use super::{free_port, http, python, repo_root, unique_instance, workspace_bin};
use ringside_shm_protocol::{AttachedSegment, OpenOptions, Record, RequestRecord, StartAt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
