//! The one-command setup of the seed page: `serve --otlp-traces-endpoint URL`, or an
//! `OTEL_EXPORTER_OTLP_ENDPOINT` in the engine's environment, starts a companion
//! `ringside-agent run --engine <instance>` process. The engine's hot path is unchanged: the
//! companion reads the ring like any agent, and the engine never waits for it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::ServeArgs;

/// The engine's secrets, never handed to the companion: it reads the ring, not the API.
pub const WITHHELD_VARIABLES: [&str; 3] =
    ["RINGSIDE_API_KEY", "RINGSIDE_API_KEY_FILE", "VLLM_API_KEY"];

/// How long the companion gets to flush its spans when the engine stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the companion agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// No `ringside-agent` binary next to the engine, in `RINGSIDE_AGENT_BIN` or on `PATH`.
    #[error(
        "--otlp-traces-endpoint needs the ringside-agent binary: not found next to {exe}, in \
         RINGSIDE_AGENT_BIN or on PATH"
    )]
    NotFound {
        /// The engine's own executable.
        exe: String,
    },
    /// The process could not be started.
    #[error("cannot start the companion agent {path}: {source}")]
    Spawn {
        /// The agent binary.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the companion exports to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `--otlp-traces-endpoint`: this collector, over gRPC.
    Endpoint(String),
    /// OTEL_EXPORTER_OTLP_* in the environment, which the agent inherits and reads.
    Environment,
}

/// Whether a companion is wanted, and where it exports.
#[must_use]
pub fn wanted(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> Option<Target> {
    if args.no_companion_agent {
        return None;
    }
    if let Some(url) = args.otlp_traces_endpoint.as_ref().filter(|u| !u.is_empty()) {
        return Some(Target::Endpoint(url.clone()));
    }
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| env(name).is_some_and(|v| !v.is_empty()))
    .then_some(Target::Environment)
}

/// The arguments the companion is started with.
#[must_use]
pub fn agent_args(instance: &str, target: &Target) -> Vec<String> {
    // --backfill: requests served before the agent attached are exported too. No admin API:
    // that is the host agent's; companions of several engines would fight over its port.
    let mut args: Vec<String> = [
        "run",
        "--engine",
        instance,
        "--backfill",
        "--admin-listen",
        "off",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Target::Endpoint(url) = target {
        args.extend([
            "--endpoint".to_owned(),
            url.clone(),
            "--protocol".to_owned(),
            "grpc".to_owned(),
        ]);
    }
    args
}

/// A running companion agent; stopped (SIGTERM, then a bounded wait for its flush) on
/// [`Companion::stop`].
#[derive(Debug)]
pub struct Companion {
    child: Child,
}

impl Companion {
    /// Starts `ringside-agent` for `instance`.
    ///
    /// # Errors
    /// [`CompanionError`] when the binary is missing or cannot be started.
    pub fn start(instance: &str, target: &Target) -> Result<Self, CompanionError> {
        let path = find_agent()?;
        let child =
            command(&path, instance, target)
                .spawn()
                .map_err(|source| CompanionError::Spawn {
                    path: path.display().to_string(),
                    source,
                })?;
        tracing::info!(pid = child.id(), agent = %path.display(), ?target,
            "companion agent started");
        Ok(Self { child })
    }

    /// Asks the agent to flush and exit, and waits for it (at most 15 s, then SIGKILL).
    pub fn stop(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("companion agent did not stop within {STOP_TIMEOUT:?}; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The companion's command: the engine's environment (the `OTEL_*` settings) without its
/// secrets and without systemd's readiness socket.
fn command(path: &Path, instance: &str, target: &Target) -> Command {
    let mut command = Command::new(path);
    command.args(agent_args(instance, target));
    // systemd's readiness socket is the engine's: a unit with NotifyAccess=main would log
    // every message of the companion as refused.
    command.env_remove("NOTIFY_SOCKET");
    for name in WITHHELD_VARIABLES {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

fn find_agent() -> Result<PathBuf, CompanionError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(explicit) = std::env::var_os("RINGSIDE_AGENT_BIN") {
        candidates.push(PathBuf::from(explicit));
    }
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("ringside-agent"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("ringside-agent")));
    }
    candidates
        .into_iter()
        .find(|c| is_executable(c))
        .ok_or_else(|| CompanionError::NotFound {
            exe: exe.display().to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as CliCommand};
    use clap::Parser as _;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["ringside-engine", "serve"];
        argv.extend(extra);
        let CliCommand::Serve(args) = Cli::try_parse_from(argv).unwrap().command;
        args
    }

    #[test]
    fn the_flag_or_the_otel_environment_starts_a_companion() {
        let none = |_: &str| None;
        let otel =
            |name: &str| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into());
        assert_eq!(wanted(&serve_args(&[]), none), None);
        assert_eq!(
            wanted(
                &serve_args(&["--otlp-traces-endpoint", "http://c:4317"]),
                none
            ),
            Some(Target::Endpoint("http://c:4317".into()))
        );
        assert_eq!(wanted(&serve_args(&[]), otel), Some(Target::Environment));
        assert_eq!(wanted(&serve_args(&["--no-companion-agent"]), otel), None);
        let empty = |_: &str| Some(String::new());
        assert_eq!(wanted(&serve_args(&[]), empty), None);
    }

    #[test]
    fn the_api_key_variables_are_removed_from_the_companions_environment() {
        let command = command(Path::new("/bin/true"), "e", &Target::Environment);
        let removed: Vec<_> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in WITHHELD_VARIABLES.iter().chain(&["NOTIFY_SOCKET"]) {
            assert!(removed.iter().any(|r| r == name), "{name} is passed on");
        }
    }

    #[test]
    fn the_companion_attaches_to_this_engine_only_and_backfills() {
        let args = agent_args("engine-8000", &Target::Endpoint("http://c:4317".into()));
        assert_eq!(
            args,
            [
                "run",
                "--engine",
                "engine-8000",
                "--backfill",
                "--admin-listen",
                "off",
                "--endpoint",
                "http://c:4317",
                "--protocol",
                "grpc"
            ]
        );
        assert_eq!(
            agent_args("e", &Target::Environment),
            [
                "run",
                "--engine",
                "e",
                "--backfill",
                "--admin-listen",
                "off"
            ]
        );
    }
}
