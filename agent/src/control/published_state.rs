//! The running agent's published state: a small JSON file, rewritten about
//! once a second and at shutdown, that `ringside-agent status` reads for
//! what only the agent knows (exported, sampled out, lost in the agent).

use crate::pipeline::accounting::{EngineHandle, StatsSnapshot};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Prefix of the state files in the runtime directory: one per agent
/// process, `agent-<pid>.json`, so that several agents (e.g. one companion
/// per engine) do not overwrite each other.
pub const STATE_FILE_PREFIX: &str = "agent-";

/// Why the state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not an agent state.
    #[error("{path} is not an agent state file: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

/// What the agent publishes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentState {
    /// The agent's pid.
    pub agent_pid: u32,
    /// When this was written (Unix ms).
    pub updated_unix_ms: u64,
    /// One entry per attachment, the newest last.
    pub engines: Vec<EngineState>,
}

/// One attached engine's counters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineState {
    /// Instance name.
    pub instance: String,
    /// Engine pid.
    pub pid: u32,
    /// The engine's ring head when last polled: tickets it issued.
    pub engine_written: u64,
    /// Records written but not yet read.
    pub lag: u64,
    /// The agent's counters.
    pub stats: StatsSnapshot,
}

impl EngineState {
    /// A copy of an attached engine's counters.
    pub fn of(handle: &EngineHandle) -> Self {
        // Read `read`-side counters after the head so that a poll in between
        // can only make `pending` look larger, never negative.
        let engine_written = handle.stats.engine_written.load(Ordering::Relaxed);
        let lag = handle.stats.lag.load(Ordering::Relaxed);
        Self {
            instance: handle.instance.clone(),
            pid: handle.pid,
            engine_written,
            lag,
            stats: handle.stats.snapshot(),
        }
    }
}

/// The directory of the default state files: `$RUNTIME_DIRECTORY` (systemd)
/// or `/run/ringside`.
pub fn default_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let dir = env("RUNTIME_DIRECTORY")
        .and_then(|d| d.split(':').next().map(str::to_owned))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/run/ringside".to_owned());
    PathBuf::from(dir)
}

/// The default state file of the agent process `pid`.
pub fn default_path(env: &dyn Fn(&str) -> Option<String>, pid: u32) -> PathBuf {
    default_dir(env).join(format!("{STATE_FILE_PREFIX}{pid}.json"))
}

/// Every readable state file in `dir` (unreadable or foreign ones are
/// skipped).
pub fn read_dir(dir: &Path) -> Vec<AgentState> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(STATE_FILE_PREFIX) && name.ends_with(".json")
        })
        .filter_map(|e| read(&e.path()).ok())
        .collect()
}

/// Builds the state from the agent's registry.
pub fn collect(registry: &[Arc<EngineHandle>], now_unix_ms: u64) -> AgentState {
    AgentState {
        agent_pid: std::process::id(),
        updated_unix_ms: now_unix_ms,
        engines: registry.iter().map(|h| EngineState::of(h)).collect(),
    }
}

/// Writes `state` to `path` atomically (a temporary file renamed over it),
/// creating the directory if needed.
pub fn write(path: &Path, state: &AgentState) -> Result<(), StateError> {
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| StateError::Io {
            op,
            path: p,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming to", path))
}

/// Reads a state file.
pub fn read(path: &Path) -> Result<AgentState, StateError> {
    let text = std::fs::read(path).map_err(|source| StateError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| StateError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_follows_systemds_runtime_directory() {
        let none = |_: &str| None;
        assert_eq!(
            default_path(&none, 42),
            Path::new("/run/ringside/agent-42.json")
        );
        let set = |n: &str| (n == "RUNTIME_DIRECTORY").then(|| "/run/x:/run/y".to_owned());
        assert_eq!(default_path(&set, 7), Path::new("/run/x/agent-7.json"));
    }

    #[test]
    fn a_written_state_reads_back() {
        let path =
            std::env::temp_dir().join(format!("ringside-state-{}/s.json", std::process::id()));
        let state = AgentState {
            agent_pid: 7,
            updated_unix_ms: 9,
            engines: vec![EngineState {
                instance: "a".into(),
                pid: 1,
                engine_written: 5,
                lag: 1,
                stats: StatsSnapshot {
                    read: 4,
                    exported: 4,
                    ..StatsSnapshot::default()
                },
            }],
        };
        write(&path, &state).unwrap();
        assert_eq!(read(&path).unwrap(), state);
        let named = path.with_file_name("agent-7.json");
        write(&named, &state).unwrap();
        assert_eq!(read_dir(path.parent().unwrap()), vec![state.clone()]);
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(read(&path), Err(StateError::Decode { .. })));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
