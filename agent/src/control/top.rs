//! `ringside-agent top`: a live view of every engine, computed from its ring
//! by a passive reader of its own (it never moves the agent's cursor, so it
//! runs beside a daemon or without one).
//!
//! On a terminal it redraws in place on the alternate screen and quits on
//! `q`, Esc or Ctrl-C, restoring the terminal; otherwise it prints one plain
//! line per engine per refresh. On a terminal the table is followed by the
//! oldest requests the engines hold (see [`crate::control::inflight`]).

use crate::control::control_block::{self, ControlError, EngineSelection};
use crate::control::inflight;
use ringside_shm_protocol::{AttachedSegment, Consumer, Liveness, StartAt, list_segments};
use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// In-flight requests listed under the table (the oldest; then `+N more`).
const INFLIGHT_SHOWN: usize = 10;

/// Why `top` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// Engines could not be found or opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The terminal could not be driven or written.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// One finished request, as the window keeps it.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    prompt: u32,
    completion: u32,
    queue_us: Option<u64>,
    ttft_us: Option<u64>,
    tpot_us: Option<u64>,
    e2e_us: u64,
    error: bool,
}

struct Watched {
    segment: AttachedSegment,
    consumer: Consumer,
    window: VecDeque<Sample>,
    queue_depth: u16,
    running: u16,
    lost: u64,
    since: Instant,
}

/// Latency percentiles in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Values behind them.
    pub count: u64,
}

fn percentiles(values: impl Iterator<Item = u64>) -> Percentiles {
    let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2) else {
        return Percentiles::default();
    };
    for v in values {
        let _ = h.record(v.clamp(1, 3_600_000_000));
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        count: h.len(),
    }
}

/// One engine's figures over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Instance.
    pub engine: String,
    /// Whether it runs.
    pub alive: bool,
    /// Whether tracing is on (off: no figures arrive).
    pub tracing: bool,
    /// Requests per second.
    pub rps: f64,
    /// Prompt tokens per second.
    pub tokens_in: f64,
    /// Completion tokens per second.
    pub tokens_out: f64,
    /// Failed, aborted or rejected in the window.
    pub errors: u64,
    /// Queue depth at the last request.
    pub queue_depth: u16,
    /// Running sequences at the last request.
    pub running: u16,
    /// Time in queue.
    pub queue: Percentiles,
    /// Time to first token.
    pub ttft: Percentiles,
    /// Time per output token.
    pub tpot: Percentiles,
    /// End to end.
    pub e2e: Percentiles,
    /// Records the engine dropped plus those lost before this view read them.
    pub drops: u64,
}

impl Watched {
    fn open(segment: AttachedSegment) -> Self {
        let consumer = segment.ring().consumer(StartAt::Newest);
        Self {
            segment,
            consumer,
            window: VecDeque::new(),
            queue_depth: 0,
            running: 0,
            lost: 0,
            since: Instant::now(),
        }
    }

    /// Reads what is new; false if the ring cannot be read any more.
    fn poll(&mut self, window: Duration) -> bool {
        let now = Instant::now();
        let model_count = self.segment.info().model_count();
        loop {
            let mut batch = Vec::new();
            let report = match self.consumer.poll(1024, |_, r| batch.push(*r)) {
                Ok(r) => r,
                Err(_) => return false,
            };
            self.lost += report.lost_overwritten + report.lost_abandoned;
            for raw in &batch {
                let Ok(r) = raw.decode(model_count) else {
                    self.lost += 1;
                    continue;
                };
                self.queue_depth = r.queue_depth;
                self.running = r.running;
                self.window.push_back(Sample {
                    at: now,
                    prompt: r.prompt_tokens,
                    completion: r.completion_tokens,
                    queue_us: r.queue_ns().map(|n| n / 1000),
                    ttft_us: r.ttft_ns().filter(|_| !r.is_error()).map(|n| n / 1000),
                    tpot_us: r.tpot_ns().filter(|_| !r.is_error()).map(|n| n / 1000),
                    e2e_us: r.e2e_ns() / 1000,
                    error: r.is_error(),
                });
            }
            if report.delivered < 1024 {
                break;
            }
        }
        while self
            .window
            .front()
            .is_some_and(|s| now.duration_since(s.at) > window)
        {
            self.window.pop_front();
        }
        true
    }

    fn row(&self, window: Duration) -> Row {
        let span = self.since.elapsed().min(window).as_secs_f64().max(0.001);
        let w = &self.window;
        let counters = self.segment.ring().counters();
        Row {
            engine: self.segment.info().instance.clone(),
            alive: self.segment.liveness() == Liveness::Alive,
            tracing: self.segment.ring().control().tracing_enabled(),
            rps: w.len() as f64 / span,
            tokens_in: w.iter().fold(0.0, |a, s| a + f64::from(s.prompt)) / span,
            tokens_out: w.iter().fold(0.0, |a, s| a + f64::from(s.completion)) / span,
            errors: w.iter().filter(|s| s.error).count() as u64,
            queue_depth: self.queue_depth,
            running: self.running,
            queue: percentiles(w.iter().filter_map(|s| s.queue_us)),
            ttft: percentiles(w.iter().filter_map(|s| s.ttft_us)),
            tpot: percentiles(w.iter().filter_map(|s| s.tpot_us)),
            e2e: percentiles(w.iter().map(|s| s.e2e_us)),
            drops: counters.dropped_before_ticket() + self.lost,
        }
    }
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0}", us as f64 / 1000.0)
    } else {
        format!("{:.1}", us as f64 / 1000.0)
    }
}

fn triple(p: &Percentiles) -> String {
    if p.count == 0 {
        "-".to_owned()
    } else {
        format!("{}/{}/{}", ms(p.p50), ms(p.p90), ms(p.p99))
    }
}

/// The table `top` draws.
pub fn render_table(rows: &[Row], window: Duration) -> String {
    let mut table = vec![
        [
            "ENGINE",
            "STATE",
            "REQ/S",
            "TOK/S IN",
            "TOK/S OUT",
            "QUEUE",
            "RUN",
            "ERR",
            "QUEUE ms",
            "TTFT ms",
            "TPOT ms",
            "E2E ms",
            "DROPS",
        ]
        .map(str::to_owned),
    ];
    for r in rows {
        table.push([
            r.engine.clone(),
            match (r.alive, r.tracing) {
                (false, _) => "dead",
                (true, false) => "off",
                (true, true) => "on",
            }
            .to_owned(),
            format!("{:.1}", r.rps),
            format!("{:.0}", r.tokens_in),
            format!("{:.0}", r.tokens_out),
            r.queue_depth.to_string(),
            r.running.to_string(),
            r.errors.to_string(),
            triple(&r.queue),
            triple(&r.ttft),
            triple(&r.tpot),
            triple(&r.e2e),
            r.drops.to_string(),
        ]);
    }
    format!(
        "ringside top — {} engine(s), window {}s, percentiles p50/p90/p99 — q to quit\n\n{}",
        rows.len(),
        window.as_secs(),
        crate::control::table::render(&table)
    )
}

/// One plain line per engine, for pipes and logs.
pub fn render_line(row: &Row, unix_s: u64) -> String {
    format!(
        "ts={unix_s} engine={} state={} rps={:.1} tok_in_s={:.0} tok_out_s={:.0} queue={} running={} errors={} queue_ms={} ttft_ms={} tpot_ms={} e2e_ms={} drops={}",
        row.engine,
        match (row.alive, row.tracing) {
            (false, _) => "dead",
            (true, false) => "off",
            (true, true) => "on",
        },
        row.rps,
        row.tokens_in,
        row.tokens_out,
        row.queue_depth,
        row.running,
        row.errors,
        triple(&row.queue),
        triple(&row.ttft),
        triple(&row.tpot),
        triple(&row.e2e),
        row.drops
    )
}

struct Engines {
    names: Vec<String>,
    trusted: Vec<u32>,
    watched: BTreeMap<String, Watched>,
}

impl Engines {
    fn refresh(&mut self) -> Result<(), ControlError> {
        if self.watched.is_empty() {
            let opened = control_block::open_engines(&self.names, &self.trusted)?;
            for s in opened.engines {
                self.watched
                    .insert(s.info().instance.clone(), Watched::open(s));
            }
        } else if self.names.is_empty() {
            // Engines started since: watch them too.
            for name in list_segments()? {
                if !self.watched.contains_key(&name)
                    && let Ok(opened) =
                        control_block::open_engines(std::slice::from_ref(&name), &self.trusted)
                {
                    for s in opened.engines {
                        self.watched.insert(name.clone(), Watched::open(s));
                    }
                }
            }
        }
        self.watched.retain(|_, w| !w.segment.replaced());
        Ok(())
    }

    /// What every watched engine's in-flight table holds now (engines
    /// without one are left out).
    fn inflight(&self, stall_after: Duration) -> Vec<inflight::EngineInflight> {
        let now = ringside_shm_protocol::monotonic_ns();
        self.watched
            .values()
            .filter_map(|w| {
                let alive = w.segment.liveness() == Liveness::Alive;
                let name = w.segment.info().instance.clone();
                inflight::read_segment(&w.segment, name, alive, now, stall_after)
            })
            .collect()
    }
}

/// Restores the terminal however `top` ends.
struct TerminalGuard;

impl TerminalGuard {
    fn enter(out: &mut impl Write) -> std::io::Result<Self> {
        crossterm::terminal::enable_raw_mode()?;
        let guard = Self;
        crossterm::execute!(
            out,
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = crossterm::execute!(
            out,
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Waits up to `timeout` for a key; true if it asks to quit.
fn quit_requested(timeout: Duration) -> std::io::Result<bool> {
    use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !crossterm::event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = crossterm::event::read()?
            && key.kind != KeyEventKind::Release
        {
            let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                && matches!(key.code, KeyCode::Char('c'));
            if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// What `ringside-agent top` shows, and how often.
#[derive(Clone, Debug, Default)]
pub struct TopOptions {
    /// Which engines.
    pub selection: EngineSelection,
    /// Refresh interval in milliseconds (at least 100).
    pub interval_ms: u64,
    /// Sliding window of the rates and percentiles, in seconds (at least 1).
    pub window_s: u64,
    /// Stop after this many refreshes (default: until q / Ctrl-C).
    pub iterations: Option<u64>,
    /// No progress for this long marks an in-flight request stalled.
    pub stall_after: Duration,
}

/// `ringside-agent top`.
pub fn run(args: &TopOptions) -> Result<(), TopError> {
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let window = Duration::from_secs(args.window_s.max(1));
    let mut engines = Engines {
        names: args.selection.engines.clone(),
        trusted: args.selection.trusted_uids.clone(),
        watched: BTreeMap::new(),
    };
    engines.refresh()?;
    let tty = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let mut out = std::io::stdout();
    let _guard = if tty {
        Some(TerminalGuard::enter(&mut out)?)
    } else {
        None
    };
    let mut iteration = 0u64;
    loop {
        engines.watched.retain(|_, w| w.poll(window));
        let rows: Vec<Row> = engines.watched.values().map(|w| w.row(window)).collect();
        if tty {
            let mut text = render_table(&rows, window);
            let held = engines.inflight(args.stall_after);
            let list = inflight::render_compact(&held, INFLIGHT_SHOWN);
            if !list.is_empty() {
                text.push('\n');
                text.push_str(&list);
            }
            let text = text.replace('\n', "\r\n");
            crossterm::queue!(
                out,
                crossterm::cursor::MoveTo(0, 0),
                crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
            )?;
            out.write_all(text.as_bytes())?;
            out.flush()?;
        } else {
            let unix_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for row in &rows {
                writeln!(out, "{}", render_line(row, unix_s))?;
            }
            if rows.is_empty() {
                writeln!(out, "ts={unix_s} engines=0")?;
            }
            out.flush()?;
        }
        iteration += 1;
        if args.iterations.is_some_and(|n| iteration >= n) {
            return Ok(());
        }
        if tty {
            if quit_requested(interval)? {
                return Ok(());
            }
        } else {
            std::thread::sleep(interval);
        }
        engines.refresh()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_spread() {
        let p = percentiles(1..=1000u64);
        assert_eq!(p.count, 1000);
        assert!((495..=505).contains(&p.p50), "{p:?}");
        assert!((985..=999).contains(&p.p99), "{p:?}");
        assert_eq!(percentiles(std::iter::empty()), Percentiles::default());
    }

    #[test]
    fn lines_and_tables_show_every_figure() {
        let row = Row {
            engine: "e".into(),
            alive: true,
            tracing: true,
            rps: 2.0,
            tokens_in: 30.0,
            tokens_out: 40.0,
            errors: 1,
            queue_depth: 3,
            running: 4,
            queue: Percentiles::default(),
            ttft: Percentiles {
                p50: 1500,
                p90: 2000,
                p99: 25_000,
                count: 3,
            },
            tpot: Percentiles::default(),
            e2e: Percentiles::default(),
            drops: 5,
        };
        let line = render_line(&row, 9);
        assert!(line.contains("engine=e state=on rps=2.0"), "{line}");
        assert!(line.contains("ttft_ms=1.5/2.0/25 "), "{line}");
        assert!(line.ends_with("drops=5"), "{line}");
        let table = render_table(&[row], Duration::from_secs(10));
        assert!(
            table.contains("TTFT ms") && table.contains("1.5/2.0/25"),
            "{table}"
        );
    }
}
