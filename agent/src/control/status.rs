//! `ringside-agent status`: what every engine's segment says, joined with
//! the counters the running agent publishes (see [`crate::control::published_state`]).

use crate::control::control_block::{self, ControlError, EngineSelection, EngineSettings};
use crate::control::published_state::{self, AgentState, EngineState};
use ringside_shm_protocol::{AttachedSegment, monotonic_ns, realtime_ns};
use std::io::Write;

/// Why `status` failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Engines could not be found or opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// The JSON could not be produced.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One engine in the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineStatus {
    /// Instance name.
    pub instance: String,
    /// Engine pid.
    pub pid: u32,
    /// Whether the engine runs.
    pub alive: bool,
    /// Served models.
    pub models: Vec<String>,
    /// Seconds since the engine created its segment.
    pub uptime_s: u64,
    /// Control block settings.
    pub tracing: EngineSettings,
    /// The ring.
    pub ring: RingStatus,
    /// The attached agent, if any registered in the segment.
    pub agent: Option<AgentStatus>,
    /// The running agent's accounting; `None` when no running agent
    /// published one for this engine.
    pub accounting: Option<Accounting>,
    /// Why there is no accounting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounting_unavailable: Option<String>,
}

/// The ring's state, from the segment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RingStatus {
    /// Slots.
    pub capacity: u64,
    /// Records written and not yet read by an agent (at most `capacity`).
    pub fill: u64,
    /// Tickets the engine issued: records written.
    pub written: u64,
    /// Records the engine dropped before writing because the ring was full
    /// (discard mode).
    pub dropped_full: u64,
    /// Records dropped after lost races for a slot (discard mode).
    pub dropped_contended: u64,
}

/// The agent registered in the segment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentStatus {
    /// Its pid.
    pub pid: u32,
    /// Whether that process runs.
    pub running: bool,
    /// Seconds since its last heartbeat in the segment.
    pub heartbeat_age_s: f64,
    /// Records written and not yet read by it.
    pub lag: u64,
}

/// Where every record the engine wrote went, as the running agent counts
/// it: `written + crashed_in_flight = not_observed + exported + sampled_out +
/// lost.total + pending`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Accounting {
    /// When the agent published these (Unix ms).
    pub as_of_unix_ms: u64,
    /// Records the engine wrote (ring head at the agent's last poll).
    pub written: u64,
    /// Written before the agent attached and not read (no backfill).
    pub not_observed: u64,
    /// Records whose spans the collector accepted.
    pub exported: u64,
    /// Records the samplers left out (still counted in the metrics).
    pub sampled_out: u64,
    /// Lost records by cause.
    pub lost: Lost,
    /// Read but not yet delivered, or not yet read.
    pub pending: u64,
    /// Requests the engine held when it died (from its in-flight table),
    /// exported as `engine_crashed` spans: `written + crashed_in_flight` is
    /// what the other fields add up to.
    pub crashed_in_flight: u64,
    /// Whether the identity above holds.
    pub balanced: bool,
}

/// Lost records by cause.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Lost {
    /// Overwritten in the ring before the agent read them.
    pub overwritten: u64,
    /// Tickets their producer never committed.
    pub abandoned: u64,
    /// Records that failed validation.
    pub invalid: u64,
    /// Dropped from the agent's full export queue.
    pub queue_dropped: u64,
    /// Refused by the collector or out of retries.
    pub export_failed: u64,
    /// The sum.
    pub total: u64,
}

/// Builds the accounting of one engine from the agent's published state.
pub fn accounting(state: &EngineState, as_of_unix_ms: u64) -> Accounting {
    let s = &state.stats;
    let lost = Lost {
        overwritten: s.lost_overwritten,
        abandoned: s.lost_abandoned,
        invalid: s.invalid,
        queue_dropped: s.queue_dropped,
        export_failed: s.export_failed,
        total: s.lost(),
    };
    let pending = s.pending() + state.lag;
    let accounted = s.skipped_at_attach + s.exported + s.sampled_out + lost.total + pending;
    // Crash reports come from the in-flight table, not the ring: they are
    // accounted on top of what the engine wrote.
    let written_and_crashed = state.engine_written + s.crashed_in_flight;
    Accounting {
        as_of_unix_ms,
        written: state.engine_written,
        not_observed: s.skipped_at_attach,
        exported: s.exported,
        sampled_out: s.sampled_out,
        lost,
        pending,
        crashed_in_flight: s.crashed_in_flight,
        balanced: accounted == written_and_crashed,
    }
}

fn process_runs(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The status of one engine, joined with `agent_state` when it is from the
/// agent registered in the segment and that agent runs.
pub fn engine_status(segment: &AttachedSegment, agent_state: Option<&AgentState>) -> EngineStatus {
    let info = segment.info();
    let ring = segment.ring();
    let control = ring.control();
    let counters = ring.counters();
    let (agent_pid, beat) = control.agent();
    let cursor = control.read_cursor();
    let unread = counters.head.saturating_sub(cursor);
    let agent = (agent_pid != 0).then(|| AgentStatus {
        pid: agent_pid,
        running: process_runs(agent_pid),
        heartbeat_age_s: monotonic_ns().saturating_sub(beat) as f64 / 1e9,
        lag: unread,
    });
    let (accounting, unavailable) = match agent_state {
        None => (None, Some("no agent state file".to_owned())),
        Some(st) if !process_runs(st.agent_pid) => (
            None,
            Some(format!(
                "the agent that wrote the state (pid {}) is not running",
                st.agent_pid
            )),
        ),
        Some(st) if st.agent_pid != agent_pid => (
            None,
            Some(format!(
                "the running agent (pid {}) does not read this engine",
                st.agent_pid
            )),
        ),
        Some(st) => match st
            .engines
            .iter()
            .rev()
            .find(|e| e.instance == info.instance && e.pid == info.identity.pid)
        {
            Some(e) => (Some(accounting(e, st.updated_unix_ms)), None),
            None => (None, Some("the agent has not attached yet".to_owned())),
        },
    };
    EngineStatus {
        instance: info.instance.clone(),
        pid: info.identity.pid,
        alive: segment.liveness() == ringside_shm_protocol::Liveness::Alive,
        models: info.models.clone(),
        uptime_s: realtime_ns().saturating_sub(info.identity.created_realtime_ns) / 1_000_000_000,
        tracing: control_block::read_settings(segment),
        ring: RingStatus {
            capacity: ring.capacity(),
            fill: unread.min(ring.capacity()),
            written: counters.head,
            dropped_full: counters.dropped_full,
            dropped_contended: counters.dropped_contended,
        },
        agent,
        accounting,
        accounting_unavailable: unavailable,
    }
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The report as a table, with a line of loss causes under each engine
/// that lost anything.
pub fn render(engines: &[EngineStatus]) -> String {
    let dash = || "-".to_owned();
    let mut rows = vec![
        [
            "ENGINE", "PID", "ALIVE", "MODELS", "UPTIME", "TRACING", "RING", "WRITTEN", "EXPORTED",
            "SAMPLED", "LOST", "LAG",
        ]
        .map(str::to_owned),
    ];
    for e in engines {
        let a = e.accounting.as_ref();
        rows.push([
            e.instance.clone(),
            e.pid.to_string(),
            if e.alive { "yes" } else { "no" }.to_owned(),
            e.models.join(","),
            uptime(e.uptime_s),
            if e.tracing.enabled { "on" } else { "off" }.to_owned(),
            format!("{}/{}", e.ring.fill, e.ring.capacity),
            e.ring.written.to_string(),
            a.map_or_else(dash, |a| a.exported.to_string()),
            a.map_or_else(dash, |a| a.sampled_out.to_string()),
            a.map_or_else(dash, |a| a.lost.total.to_string()),
            e.agent
                .as_ref()
                .filter(|g| g.running)
                .map_or_else(dash, |g| g.lag.to_string()),
        ]);
    }
    let mut out = crate::control::table::render(&rows);
    for e in engines {
        if let Some(a) = &e.accounting {
            let l = &a.lost;
            if l.total > 0 || a.not_observed > 0 || !a.balanced {
                out.push_str(&format!(
                    "{}: lost overwritten {}, abandoned {}, invalid {}, queue dropped {}, export failed {}; before attach {}; pending {}{}\n",
                    e.instance,
                    l.overwritten,
                    l.abandoned,
                    l.invalid,
                    l.queue_dropped,
                    l.export_failed,
                    a.not_observed,
                    a.pending,
                    if a.balanced { "" } else { " (counters moving)" }
                ));
            }
        } else if let Some(why) = &e.accounting_unavailable {
            out.push_str(&format!("{}: no agent counters: {why}\n", e.instance));
        }
    }
    out
}

/// What `ringside-agent status` shows.
#[derive(Clone, Debug, Default)]
pub struct StatusOptions {
    /// Which engines.
    pub selection: EngineSelection,
    /// JSON instead of a table.
    pub json: bool,
    /// The running agent's state file; default: every `agent-<pid>.json` in
    /// the runtime directory, matched to each engine by its agent's pid.
    pub state_file: Option<std::path::PathBuf>,
}

/// `ringside-agent status`.
pub fn run(args: &StatusOptions) -> Result<(), StatusError> {
    let opened =
        control_block::open_engines(&args.selection.engines, &args.selection.trusted_uids)?;
    for e in &opened.skipped {
        eprintln!("ringside-agent: skipped {e}");
    }
    let states = match &args.state_file {
        Some(path) => published_state::read(path).into_iter().collect(),
        None => {
            let env = |n: &str| std::env::var(n).ok();
            published_state::read_dir(&published_state::default_dir(&env))
        }
    };
    let engines: Vec<EngineStatus> = opened
        .engines
        .iter()
        .map(|s| {
            // The state of the agent registered in this engine's segment, or
            // (to explain why there is none) any other.
            let registered = s.ring().control().agent().0;
            let st = states
                .iter()
                .find(|st| st.agent_pid == registered)
                .or(states.first());
            engine_status(s, st)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &engines)?;
        writeln!(out)?;
    } else {
        out.write_all(render(&engines).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::accounting::StatsSnapshot;

    #[test]
    fn the_accounting_identity_covers_every_counter() {
        let state = EngineState {
            instance: "a".into(),
            pid: 1,
            engine_written: 100,
            lag: 3,
            stats: StatsSnapshot {
                skipped_at_attach: 10,
                read: 80,
                invalid: 1,
                sampled_out: 20,
                lost_overwritten: 5,
                lost_abandoned: 2,
                queue_dropped: 4,
                exported: 50,
                export_failed: 1,
                spans_exported: 200,
                crashed_in_flight: 0,
            },
        };
        let a = accounting(&state, 0);
        assert_eq!(a.lost.total, 13);
        assert_eq!(a.pending, 4 + 3);
        assert!(a.balanced, "{a:?}");
    }

    #[test]
    fn requests_a_dead_engine_held_are_accounted_on_top_of_what_it_wrote() {
        // 10 written and exported, then the engine died holding 3 requests,
        // exported as engine_crashed spans: 13 exported, balanced.
        let mut state = EngineState {
            instance: "a".into(),
            pid: 1,
            engine_written: 10,
            lag: 0,
            stats: StatsSnapshot {
                read: 10,
                exported: 13,
                crashed_in_flight: 3,
                ..StatsSnapshot::default()
            },
        };
        let a = accounting(&state, 0);
        assert_eq!((a.crashed_in_flight, a.pending), (3, 0));
        assert!(a.balanced, "{a:?}");
        // Not yet exported: pending, still balanced.
        state.stats.exported = 10;
        let a = accounting(&state, 0);
        assert_eq!(a.pending, 3);
        assert!(a.balanced, "{a:?}");
    }

    #[test]
    fn uptimes_read_well() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m05s");
        assert_eq!(uptime(7260), "2h01m");
        assert_eq!(uptime(90_000), "1d01h");
    }
}
