//! A running `ringside-agent run`.

use super::workspace_bin;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
