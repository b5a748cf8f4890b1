//! `ringside-agent inflight`: the requests each engine holds right now
//! (queued, prefill, decode), read from the in-flight table of its segment
//! (ABI 1.2) by a passive reader. It needs no daemon and works while the
//! engine is stopped, hung or dead, and lists the dead generations kept for
//! an instance too, so an operator can see what a crashed engine held.

use crate::control::control_block::{self, ControlError, EngineSelection};
use crate::pipeline::spans::hex;
use ringside_shm_protocol::{
    AttachedSegment, InflightRequest, ListError, Liveness, OpenOptions, list_dead_generations,
    monotonic_ns,
};
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// Why `inflight` failed.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Engines could not be found or opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The dead generations could not be listed.
    #[error(transparent)]
    List(#[from] ListError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// The JSON could not be produced.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The engine a request belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineRef {
    /// Instance name.
    pub instance: String,
    /// Engine pid.
    pub pid: u32,
    /// Whether the engine runs (false for dead generations).
    pub alive: bool,
}

/// One in-flight request, as shown (and as its JSON object).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InflightRow {
    /// Engine instance.
    pub engine: String,
    /// Engine pid.
    pub engine_pid: u32,
    /// Whether the engine runs.
    pub engine_alive: bool,
    /// Request id (hex).
    pub request_id: String,
    /// W3C trace id (hex).
    pub trace_id: String,
    /// The engine's span id for the request (hex).
    pub span_id: String,
    /// The caller's span id (hex), if any.
    pub parent_span_id: Option<String>,
    /// Model name from the segment's model table.
    pub model: String,
    /// `chat` or `text_completion`.
    pub operation: String,
    /// Whether the response streams.
    pub stream: bool,
    /// `queued`, `prefill` or `decode`.
    pub phase: String,
    /// Seconds since arrival.
    pub age_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens computed so far.
    pub prefilled_tokens: u32,
    /// Prompt tokens served from the KV cache.
    pub cached_prompt_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
    /// Output tokens over the seconds since the first token (before 2
    /// tokens: `None`).
    pub tokens_per_s: Option<f64>,
    /// Seconds since the last token (before the first: `None`).
    pub since_last_token_s: Option<f64>,
    /// Seconds since the last progress of any kind.
    pub since_progress_s: f64,
    /// No progress for the stall threshold.
    pub stalled: bool,
}

fn secs_between(earlier_ns: u64, now_ns: u64) -> f64 {
    now_ns.saturating_sub(earlier_ns) as f64 / 1e9
}

/// The row of `request` at `now_ns` (`CLOCK_MONOTONIC`): stalled when it
/// made no progress for `stall_after`.
pub fn build_row(
    engine: &EngineRef,
    models: &[String],
    request: &InflightRequest,
    now_ns: u64,
    stall_after: Duration,
) -> InflightRow {
    let since_progress_ns = now_ns.saturating_sub(request.progress_ns);
    let tokens_per_s = match request.first_token_ns {
        Some(first) if request.output_tokens >= 2 && now_ns > first => {
            Some(f64::from(request.output_tokens) / secs_between(first, now_ns))
        }
        _ => None,
    };
    InflightRow {
        engine: engine.instance.clone(),
        engine_pid: engine.pid,
        engine_alive: engine.alive,
        request_id: hex(&request.request_id),
        trace_id: hex(&request.trace_id),
        span_id: hex(&request.span_id),
        parent_span_id: request.parent_span_id.as_ref().map(|p| hex(p)),
        model: models
            .get(usize::from(request.model_index))
            .cloned()
            .unwrap_or_else(|| format!("#{}", request.model_index)),
        operation: request.operation.as_str().to_owned(),
        stream: request.stream,
        phase: request.phase.as_str().to_owned(),
        age_s: secs_between(request.arrival_ns, now_ns),
        prompt_tokens: request.prompt_tokens,
        prefilled_tokens: request.prefilled_tokens,
        cached_prompt_tokens: request.cached_prompt_tokens,
        output_tokens: request.output_tokens,
        tokens_per_s,
        since_last_token_s: request.last_token_ns.map(|t| secs_between(t, now_ns)),
        since_progress_s: since_progress_ns as f64 / 1e9,
        stalled: u128::from(since_progress_ns) >= stall_after.as_nanos(),
    }
}

/// One table read: an engine (or one of its dead generations) and what its
/// in-flight table held.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineInflight {
    /// How the engine is named in the notes (`name`, or `name (dead
    /// generation N)`).
    pub label: String,
    /// Its requests.
    pub requests: Vec<InflightRow>,
    /// Entries skipped because they changed under every read.
    pub torn: u32,
    /// Entries that failed validation.
    pub invalid: u32,
    /// Requests the engine could not track (table full).
    pub untracked: u64,
}

/// Sorts by engine, then age, oldest first.
pub fn sort_rows(rows: &mut [InflightRow]) {
    rows.sort_by(|a, b| {
        a.engine
            .cmp(&b.engine)
            .then(b.age_s.total_cmp(&a.age_s))
            .then(a.request_id.cmp(&b.request_id))
    });
}

/// Seconds for humans: `0.25s`, `12.3s`, `4m05s`; `-` for none.
pub fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".to_owned(),
        Some(s) if s < 10.0 => format!("{s:.2}s"),
        Some(s) if s < 60.0 => format!("{s:.1}s"),
        Some(s) if s < 3600.0 => {
            let s = s as u64;
            format!("{}m{:02}s", s / 60, s % 60)
        }
        Some(s) => {
            let s = s as u64;
            format!("{}h{:02}m", s / 3600, s % 3600 / 60)
        }
    }
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"))
}

/// The notes under the table: engines holding nothing, and non-zero
/// `torn` / `invalid` / `untracked` counts.
pub fn render_notes(engines: &[EngineInflight]) -> String {
    let mut out = String::new();
    for e in engines {
        if e.requests.is_empty() {
            let _ = writeln!(out, "{}: no requests in flight", e.label);
        }
        if e.torn > 0 || e.invalid > 0 || e.untracked > 0 {
            let _ = writeln!(
                out,
                "{}: torn {}, invalid {}, untracked {}",
                e.label, e.torn, e.invalid, e.untracked
            );
        }
    }
    out
}

/// The full table, sorted by engine then age (oldest first), and the notes.
pub fn render(engines: &[EngineInflight]) -> String {
    let mut rows: Vec<InflightRow> = engines.iter().flat_map(|e| e.requests.clone()).collect();
    sort_rows(&mut rows);
    let mut out = String::new();
    if !rows.is_empty() {
        let mut table = vec![
            [
                "ENGINE",
                "PID",
                "ALIVE",
                "REQUEST",
                "MODEL",
                "OP",
                "PHASE",
                "AGE",
                "PROMPT",
                "PREFILLED",
                "CACHED",
                "OUT",
                "TOK/S",
                "LAST TOK",
                "PROGRESS",
                "STALLED",
            ]
            .map(str::to_owned),
        ];
        for r in &rows {
            table.push([
                r.engine.clone(),
                r.engine_pid.to_string(),
                if r.engine_alive { "yes" } else { "no" }.to_owned(),
                r.request_id.clone(),
                r.model.clone(),
                r.operation.clone(),
                r.phase.clone(),
                fmt_secs(Some(r.age_s)),
                r.prompt_tokens.to_string(),
                r.prefilled_tokens.to_string(),
                r.cached_prompt_tokens.to_string(),
                r.output_tokens.to_string(),
                fmt_rate(r.tokens_per_s),
                fmt_secs(r.since_last_token_s),
                fmt_secs(Some(r.since_progress_s)),
                if r.stalled { "STALLED" } else { "" }.to_owned(),
            ]);
        }
        out.push_str(&crate::control::table::render(&table));
    }
    out.push_str(&render_notes(engines));
    out
}

/// The compact list `top` shows under its percentiles: the `limit` oldest
/// requests of all engines, then `+N more`.
pub fn render_compact(engines: &[EngineInflight], limit: usize) -> String {
    let mut rows: Vec<InflightRow> = engines.iter().flat_map(|e| e.requests.clone()).collect();
    rows.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let mut table = vec![
        [
            "IN FLIGHT",
            "REQUEST",
            "PHASE",
            "AGE",
            "OUT",
            "TOK/S",
            "LAST TOK",
            "",
        ]
        .map(str::to_owned),
    ];
    for r in rows.iter().take(limit) {
        table.push([
            r.engine.clone(),
            r.request_id.clone(),
            r.phase.clone(),
            fmt_secs(Some(r.age_s)),
            r.output_tokens.to_string(),
            fmt_rate(r.tokens_per_s),
            fmt_secs(r.since_last_token_s),
            if r.stalled { "STALLED" } else { "" }.to_owned(),
        ]);
    }
    out.push_str(&crate::control::table::render(&table));
    if rows.len() > limit {
        let _ = writeln!(out, "+{} more", rows.len() - limit);
    }
    out
}

/// Reads the in-flight table of `segment` at `now_ns`; `None` when the
/// segment has none (older than ABI 1.2, or made without one). A table that
/// cannot be read is reported on stderr and also gives `None`.
pub fn read_segment(
    segment: &AttachedSegment,
    label: String,
    alive: bool,
    now_ns: u64,
    stall_after: Duration,
) -> Option<EngineInflight> {
    let info = segment.info();
    let reader = segment.inflight()?;
    let snapshot = match reader.snapshot() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringside-agent: {label}: the in-flight table cannot be read: {e}");
            return None;
        }
    };
    let engine = EngineRef {
        instance: info.instance.clone(),
        pid: info.identity.pid,
        alive,
    };
    Some(EngineInflight {
        label,
        requests: snapshot
            .requests
            .iter()
            .map(|r| build_row(&engine, &info.models, r, now_ns, stall_after))
            .collect(),
        torn: snapshot.torn,
        invalid: snapshot.invalid,
        untracked: snapshot.untracked,
    })
}

/// What `ringside-agent inflight` shows.
#[derive(Clone, Debug)]
pub struct InflightOptions {
    /// Which engines.
    pub selection: EngineSelection,
    /// JSON instead of a table.
    pub json: bool,
    /// No progress for this long marks a request stalled.
    pub stall_after: Duration,
}

impl Default for InflightOptions {
    fn default() -> Self {
        Self {
            selection: EngineSelection::default(),
            json: false,
            stall_after: Duration::from_secs(10),
        }
    }
}

/// Reads every selected engine and its dead generations.
pub fn collect(args: &InflightOptions) -> Result<Vec<EngineInflight>, InflightError> {
    let names = &args.selection.engines;
    let trusted = &args.selection.trusted_uids;
    let dead: Vec<_> = list_dead_generations()?
        .into_iter()
        .filter(|d| names.is_empty() || names.contains(&d.instance))
        .collect();
    let mut segments = Vec::new();
    if names.is_empty() {
        match control_block::open_engines(names, trusted) {
            Ok(opened) => {
                for e in &opened.skipped {
                    eprintln!("ringside-agent: skipped {e}");
                }
                segments = opened.engines;
            }
            Err(ControlError::NoEngines) if !dead.is_empty() => {}
            Err(e) => return Err(e.into()),
        }
    } else {
        for name in names {
            match control_block::open_engines(std::slice::from_ref(name), trusted) {
                Ok(opened) => segments.extend(opened.engines),
                // A crashed engine whose segment is gone: its dead
                // generations below are what it held.
                Err(e) if dead.iter().any(|d| &d.instance == name) => {
                    eprintln!("ringside-agent: {e}; showing its dead generations");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let now = monotonic_ns();
    let mut out = Vec::new();
    for s in &segments {
        let name = s.info().instance.clone();
        let alive = s.liveness() == Liveness::Alive;
        match read_segment(s, name.clone(), alive, now, args.stall_after) {
            Some(e) => out.push(e),
            None if s.inflight().is_none() => {
                let (major, minor) = s.info().abi;
                eprintln!(
                    "ringside-agent: {name}: no in-flight table (segment ABI {major}.{minor}; the table needs 1.2)"
                );
            }
            None => {}
        }
    }
    let options = OpenOptions {
        trusted_uids: trusted.clone(),
    };
    for d in &dead {
        let label = format!("{} (dead generation {})", d.instance, d.generation);
        match AttachedSegment::open_dead(d, &options) {
            Ok(s) => {
                if let Some(e) = read_segment(&s, label.clone(), false, now, args.stall_after) {
                    out.push(e);
                } else if s.inflight().is_none() {
                    eprintln!("ringside-agent: {label}: no in-flight table");
                }
            }
            Err(e) => eprintln!("ringside-agent: {label}: {e}"),
        }
    }
    Ok(out)
}

/// `ringside-agent inflight`.
pub fn run(args: &InflightOptions) -> Result<(), InflightError> {
    let engines = collect(args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut rows: Vec<InflightRow> = engines.iter().flat_map(|e| e.requests.clone()).collect();
        sort_rows(&mut rows);
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else {
        out.write_all(render(&engines).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringside_shm_protocol::{InflightPhase, Operation};

    const S: u64 = 1_000_000_000;

    fn request(phase: InflightPhase) -> InflightRequest {
        InflightRequest {
            index: 0,
            update: 1,
            phase,
            operation: Operation::Chat,
            request_id: [0xab; 16],
            trace_id: [0x01; 16],
            parent_span_id: None,
            span_id: [0x02; 8],
            trace_flags: 1,
            remote_parent: false,
            stream: true,
            arrival_ns: 100 * S,
            scheduled_ns: None,
            first_token_ns: None,
            last_token_ns: None,
            progress_ns: 100 * S,
            prompt_tokens: 40,
            prefilled_tokens: 0,
            output_tokens: 0,
            cached_prompt_tokens: 0,
            max_tokens: 64,
            model_index: 0,
            sequence_slot: None,
        }
    }

    fn engine() -> EngineRef {
        EngineRef {
            instance: "e1".into(),
            pid: 42,
            alive: true,
        }
    }

    fn models() -> Vec<String> {
        vec!["gemma".to_owned()]
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(
            crate::duration::parse_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            crate::duration::parse_duration("10s"),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            crate::duration::parse_duration("2m"),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            crate::duration::parse_duration("1h"),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(
            crate::duration::parse_duration("1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert!(crate::duration::parse_duration("10").is_err());
        assert!(crate::duration::parse_duration("s").is_err());
        assert!(crate::duration::parse_duration("3 days").is_err());
    }

    #[test]
    fn a_queued_request_has_no_token_figures_and_stalls_after_the_threshold() {
        let r = request(InflightPhase::Queued);
        let row = build_row(&engine(), &models(), &r, 112 * S, Duration::from_secs(10));
        assert_eq!(row.phase, "queued");
        assert_eq!(row.model, "gemma");
        assert_eq!(row.operation, "chat");
        assert_eq!(row.request_id, "ab".repeat(16));
        assert_eq!(row.trace_id, "01".repeat(16));
        assert_eq!(row.span_id, "02".repeat(8));
        assert_eq!(row.parent_span_id, None);
        assert!((row.age_s - 12.0).abs() < 1e-9, "{row:?}");
        assert!((row.since_progress_s - 12.0).abs() < 1e-9);
        assert_eq!(row.tokens_per_s, None);
        assert_eq!(row.since_last_token_s, None);
        assert!(row.stalled);
        let fresh = build_row(&engine(), &models(), &r, 105 * S, Duration::from_secs(10));
        assert!(!fresh.stalled);
    }

    #[test]
    fn a_decoding_request_has_a_rate_from_its_first_token() {
        let mut r = request(InflightPhase::Decode);
        r.parent_span_id = Some([0x03; 8]);
        r.scheduled_ns = Some(101 * S);
        r.first_token_ns = Some(102 * S);
        r.last_token_ns = Some(106 * S);
        r.progress_ns = 106 * S;
        r.prefilled_tokens = 40;
        r.cached_prompt_tokens = 8;
        r.output_tokens = 20;
        let row = build_row(&engine(), &models(), &r, 107 * S, Duration::from_secs(10));
        assert_eq!(row.phase, "decode");
        assert_eq!(row.parent_span_id.as_deref(), Some("0303030303030303"));
        assert_eq!(row.tokens_per_s, Some(4.0));
        assert_eq!(row.since_last_token_s, Some(1.0));
        assert!((row.since_progress_s - 1.0).abs() < 1e-9);
        assert!(!row.stalled);
        // One token: no rate yet.
        r.output_tokens = 1;
        let row = build_row(&engine(), &models(), &r, 107 * S, Duration::from_secs(10));
        assert_eq!(row.tokens_per_s, None);
        assert_eq!(row.since_last_token_s, Some(1.0));
    }

    #[test]
    fn an_unknown_model_index_and_a_clock_behind_do_not_panic() {
        let mut r = request(InflightPhase::Prefill);
        r.model_index = 5;
        let row = build_row(&engine(), &models(), &r, 50 * S, Duration::from_secs(10));
        assert_eq!(row.model, "#5");
        assert_eq!(row.age_s, 0.0);
        assert!(!row.stalled);
    }

    #[test]
    fn the_json_shape_has_exactly_the_documented_fields() {
        let row = build_row(
            &engine(),
            &models(),
            &request(InflightPhase::Queued),
            101 * S,
            Duration::from_secs(10),
        );
        let v = serde_json::to_value(&row).unwrap_or_default();
        let mut keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        let mut expected = vec![
            "engine",
            "engine_pid",
            "engine_alive",
            "request_id",
            "trace_id",
            "span_id",
            "parent_span_id",
            "model",
            "operation",
            "stream",
            "phase",
            "age_s",
            "prompt_tokens",
            "prefilled_tokens",
            "cached_prompt_tokens",
            "output_tokens",
            "tokens_per_s",
            "since_last_token_s",
            "since_progress_s",
            "stalled",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert!(v["parent_span_id"].is_null());
        assert!(v["tokens_per_s"].is_null());
        assert_eq!(v["phase"], "queued");
        assert_eq!(v["engine_pid"], 42);
    }

    fn snapshot(label: &str, ages: &[u64]) -> EngineInflight {
        let now = 1000 * S;
        let requests = ages
            .iter()
            .enumerate()
            .map(|(i, age)| {
                let mut r = request(InflightPhase::Decode);
                r.request_id = [i as u8; 16];
                r.arrival_ns = now - age * S;
                r.progress_ns = r.arrival_ns;
                let e = EngineRef {
                    instance: label.to_owned(),
                    ..engine()
                };
                build_row(&e, &models(), &r, now, Duration::from_secs(10))
            })
            .collect();
        EngineInflight {
            label: label.to_owned(),
            requests,
            torn: 0,
            invalid: 0,
            untracked: 0,
        }
    }

    #[test]
    fn the_table_sorts_by_engine_then_age_and_notes_empty_engines() {
        let mut idle = snapshot("a-idle", &[]);
        idle.untracked = 3;
        let busy = snapshot("b-busy", &[1, 30, 5]);
        let text = render(&[busy, idle]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ENGINE"), "{text}");
        assert!(lines[1].contains(&"01".repeat(16)), "{text}"); // 30s
        assert!(lines[2].contains(&"02".repeat(16)), "{text}"); // 5s
        assert!(lines[3].contains(&"00".repeat(16)), "{text}"); // 1s
        assert!(lines[1].contains("STALLED") && !lines[3].contains("STALLED"));
        assert!(text.contains("a-idle: no requests in flight\n"), "{text}");
        assert!(
            text.contains("a-idle: torn 0, invalid 0, untracked 3\n"),
            "{text}"
        );
        assert!(!text.contains("b-busy: torn"), "{text}");
    }

    #[test]
    fn the_compact_list_keeps_the_oldest_and_counts_the_rest() {
        let ages: Vec<u64> = (1..=13).collect();
        let text = render_compact(&[snapshot("e", &ages)], 10);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 12, "{text}");
        assert!(lines[0].starts_with("IN FLIGHT"));
        assert!(lines[1].contains("13.0s"), "{text}");
        assert_eq!(lines[11], "+3 more");
        assert_eq!(render_compact(&[snapshot("e", &[])], 10), "");
    }

    #[test]
    fn seconds_read_well() {
        assert_eq!(fmt_secs(None), "-");
        assert_eq!(fmt_secs(Some(0.25)), "0.25s");
        assert_eq!(fmt_secs(Some(12.34)), "12.3s");
        assert_eq!(fmt_secs(Some(245.0)), "4m05s");
        assert_eq!(fmt_secs(Some(7300.0)), "2h01m");
    }
}
