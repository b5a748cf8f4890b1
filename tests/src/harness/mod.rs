//! Starting and talking to the real binaries in end-to-end tests: the
//! [`Engine`] and [`Agent`] processes (`engine.rs`, `agent.rs`), the
//! [`Collector`] (rotel) and what it printed (`collector.rs`), raw [`http`]
//! clients (`http.rs`); and the small helpers every test uses, here.

mod agent;
mod collector;
mod engine;
mod http;

pub use agent::Agent;
pub use collector::{
    Collector, find_rotel, rotel_binary, server_span, span_attribute, span_block, span_blocks,
    span_double, span_field, span_int,
};
pub use engine::{Engine, records, wait_for_records};
pub use http::{ClientView, HttpResponse, http, post_chat, send_raw_chat, timed_traced_chat};

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

/// Lowercase hex of bytes, as the engine prints ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
