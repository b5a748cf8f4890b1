//! The running agent's published state: a small JSON file, rewritten about
//! once a second and at shutdown, that `ringside-agent status` reads for
//! what only the agent knows (exported, sampled out, lost in the agent).

use crate::pipeline::accounting::{EngineHandle, StatsSnapshot};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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
    // The temporary name is predictable: a file or link planted there must
    // not be written through. Remove whatever is there (a link itself, never
    // its target), then create exclusively, which never follows a link.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("removing", &tmp)(e));
        }
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(no_follow_flag())
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    file.write_all(&bytes).map_err(io("writing", &tmp))?;
    drop(file);
    // rename replaces a link at `path` itself; it never writes through it.
    std::fs::rename(&tmp, path).map_err(io("renaming to", path))
}

/// `O_NOFOLLOW`, as the `OpenOptions` custom flag.
fn no_follow_flag() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The largest state file read: far above any real one (about 1 KiB per
/// engine), so a planted huge or endless file cannot exhaust memory.
pub const MAX_STATE_FILE_BYTES: u64 = 4 << 20;

/// Reads a state file: a regular file (not followed through a link) of at
/// most [`MAX_STATE_FILE_BYTES`].
pub fn read(path: &Path) -> Result<AgentState, StateError> {
    let io = |op: &'static str| {
        move |source| StateError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow_flag() | rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io("opening"))?;
    let meta = file.metadata().map_err(io("reading"))?;
    if !meta.is_file() {
        return Err(io("reading")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > MAX_STATE_FILE_BYTES {
        return Err(io("reading")(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than a state file's {MAX_STATE_FILE_BYTES}",
                meta.len()
            ),
        )));
    }
    let mut text = Vec::new();
    // Bounded again while reading: the file may grow after the check.
    file.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io("reading"))?;
    if text.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(io("reading")(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "grew past the size limit while read",
        )));
    }
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

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_written_through() {
        let dir = std::env::temp_dir().join(format!("ringside-state-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.join("agent-1.json");
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        // A link at the final name is replaced, not followed, too.
        let victim2 = dir.join("victim2");
        std::fs::write(&victim2, "precious").unwrap();
        std::os::unix::fs::symlink(&victim2, &path).unwrap();
        let state = AgentState {
            agent_pid: 1,
            updated_unix_ms: 2,
            engines: vec![],
        };
        write(&path, &state).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&victim2).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(read(&path).unwrap(), state);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_file_that_is_a_link_a_device_or_huge_is_refused_without_reading_it_all() {
        let dir = std::env::temp_dir().join(format!("ringside-state-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let zero = dir.join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(
            read(&zero),
            Err(StateError::Io { op: "opening", .. })
        ));
        // A device opened directly (no link): refused as not a regular file.
        assert!(matches!(
            read(Path::new("/dev/zero")),
            Err(StateError::Io { op: "reading", .. })
        ));
        let huge = dir.join("huge.json");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_STATE_FILE_BYTES + 1).unwrap();
        assert!(matches!(
            read(&huge),
            Err(StateError::Io { op: "reading", .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
