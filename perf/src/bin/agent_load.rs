//! Agent throughput, cost and overload: a synthetic engine (this process)
//! writes records into a real segment in /dev/shm at fixed rates, a real
//! `ringside-agent run` process attached to it exports them over OTLP/gRPC.
//!
//! Per run it measures: records and spans delivered per second (from the
//! agent's published counters), the agent's CPU in cores (utime+stime from
//! /proc over the production window), its resident memory (steady and
//! peak), records lost, the exact accounting `written = exported +
//! sampled_out + lost` after the agent is stopped with SIGTERM, and the
//! producer's own cost per push (every push timed).
//!
//! Sinks: rotel `--exporter blackhole` (a real collector) for throughput and
//! cost; in a separate pass `perf::sink::TimingSink`, a minimal OTLP/gRPC
//! receiver in this process that timestamps each request span on arrival,
//! for freshness (record finish stamp → arrival). rotel cannot report
//! arrival times, hence the second sink.
//!
//! Overload: flat out (`rate 0`), the producer writes far faster than the
//! agent drains (the ring overwrites, as the engine's default mode does);
//! its push latency is compared with a run with no agent at all.
//!
//! Steps (ABI 1.4), with `--step-rates`: instead of the above, the synthetic
//! engine runs a scheduler of 4 slots at a fixed step rate, every step
//! decoding every busy slot and prefilling the free ones, writing one step
//! record per step and one request record per request of
//! `--tokens-per-request` tokens as it ends (after its last step, as the
//! engine does), so the agent joins every request to its steps. Each step
//! rate runs twice, interleaved: with the step records, and the same
//! requests with none (the step ring stays empty), so the agent's CPU for
//! steps is the difference.
//!
//! ```text
//! agent_load [--rates 2500,10000,100000,0] [--seconds 5] [--repeats 3]
//!            [--freshness-rates 2500,10000,100000] [--agent PATH] [--pin]
//! agent_load --step-rates 1000,10000 [--tokens-per-request 16] [--seconds 5] [--repeats 3]
//! ```

#![forbid(unsafe_code)]

use hdrhistogram::Histogram;
use ringside_perf::sink::TimingSink;
use ringside_perf::{
    Report, Rotel, agent_record, fmt_summary, machine_line, proc_sample, workspace_bin,
};
use ringside_shm_protocol::{
    CreateOptions, EngineSegment, FinishReason, SlotSet, Step, Timestamps, monotonic_ns,
};
use rustix::process::{Pid, Signal, kill_process};
use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use rustix::time::{ClockId, clock_gettime};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Spans per record with the default `--detail phases`: the request span
/// and its queue, prefill and decode children.
const SPANS_PER_RECORD: u64 = 4;
/// The engine's default ring size (`ringside-engine serve --ring-capacity`).
const RING_CAPACITY: u32 = 16384;

struct Args {
    rates: Vec<u64>,
    freshness_rates: Vec<u64>,
    seconds: f64,
    repeats: usize,
    agent: PathBuf,
    /// Pin the producing thread to the last CPU and the agent and collector
    /// to the others, so that the agent cannot preempt the producer: what is
    /// left of a change in push latency is contention in the ring itself.
    pin: bool,
    /// Steps/s of the step runs (none: the record runs instead).
    step_rates: Vec<u64>,
    /// Output tokens per request in the step runs.
    tokens_per_request: u32,
}

fn usage(error: &str) -> ! {
    eprintln!(
        "agent_load: {error}\n\
         usage: agent_load [--rates R,R,...] [--freshness-rates R,...] [--seconds S] [--repeats N] [--agent PATH] [--pin]\n\
         \x20      agent_load --step-rates S,S,... [--tokens-per-request N] [--seconds S] [--repeats N] [--agent PATH]\n\
         rates are records/s; 0 means flat out; step rates are steps/s"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        rates: vec![2_500, 10_000, 100_000, 0],
        freshness_rates: vec![2_500, 10_000, 100_000],
        seconds: 5.0,
        repeats: 3,
        agent: PathBuf::new(),
        pin: false,
        step_rates: vec![],
        tokens_per_request: 16,
    };
    let mut agent = None;
    let mut it = std::env::args().skip(1);
    let rates = |v: Option<String>, flag: &str| -> Vec<u64> {
        let v = v.unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        if v.is_empty() || v == "none" {
            return vec![];
        }
        v.split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("{flag}: {r:?} is not a rate")))
            })
            .collect()
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--rates" => args.rates = rates(it.next(), "--rates"),
            "--freshness-rates" => args.freshness_rates = rates(it.next(), "--freshness-rates"),
            "--seconds" => {
                args.seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s: &f64| *s >= 0.5)
                    .unwrap_or_else(|| usage("--seconds needs a number ≥ 0.5"))
            }
            "--repeats" => {
                args.repeats = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 1)
                    .unwrap_or_else(|| usage("--repeats needs a whole number ≥ 1"))
            }
            "--agent" => agent = it.next().map(PathBuf::from),
            "--pin" => args.pin = true,
            "--step-rates" => {
                args.step_rates = rates(it.next(), "--step-rates");
                if args.step_rates.contains(&0) {
                    usage("--step-rates: a step rate must be above 0");
                }
            }
            "--tokens-per-request" => {
                args.tokens_per_request = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 2)
                    .unwrap_or_else(|| usage("--tokens-per-request needs a whole number ≥ 2"))
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    args.agent = match agent {
        Some(p) if p.is_file() => p,
        Some(p) => usage(&format!("--agent {}: no such file", p.display())),
        None => workspace_bin("ringside-agent").unwrap_or_else(|e| usage(&e)),
    };
    args
}

/// Where the agent sends its data.
enum Sink {
    Rotel(Rotel),
    Timing(TimingSink),
}

impl Sink {
    fn port(&self) -> u16 {
        match self {
            Sink::Rotel(r) => r.grpc_port,
            Sink::Timing(t) => t.port,
        }
    }
}

/// The agent's counters for our engine from its state file.
#[derive(Clone, Copy, Debug, Default)]
struct AgentCounters {
    updated_unix_ms: u64,
    engine_written: u64,
    lag: u64,
    read: u64,
    invalid: u64,
    sampled_out: u64,
    lost_overwritten: u64,
    lost_abandoned: u64,
    queue_dropped: u64,
    exported: u64,
    export_failed: u64,
    skipped_at_attach: u64,
    spans_exported: u64,
}

fn read_state(path: &Path, instance: &str) -> Option<AgentCounters> {
    let text = std::fs::read_to_string(path).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let engine = state["engines"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["instance"] == instance)?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let s = &engine["stats"];
    Some(AgentCounters {
        updated_unix_ms: n(&state["updated_unix_ms"]),
        engine_written: n(&engine["engine_written"]),
        lag: n(&engine["lag"]),
        read: n(&s["read"]),
        invalid: n(&s["invalid"]),
        sampled_out: n(&s["sampled_out"]),
        lost_overwritten: n(&s["lost_overwritten"]),
        lost_abandoned: n(&s["lost_abandoned"]),
        queue_dropped: n(&s["queue_dropped"]),
        exported: n(&s["exported"]),
        export_failed: n(&s["export_failed"]),
        skipped_at_attach: n(&s["skipped_at_attach"]),
        spans_exported: n(&s["spans_exported"]),
    })
}

/// A running agent process; SIGKILLed on drop if still running.
struct Agent {
    child: Child,
    state_file: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(binary: &Path, instance: &str, port: u16, dir: &Path) -> Result<Agent, String> {
        Self::start_with_admin(binary, instance, port, dir, None)
    }

    /// With `admin`: the admin API (and its Prometheus `/metrics`) on that
    /// loopback port.
    fn start_with_admin(
        binary: &Path,
        instance: &str,
        port: u16,
        dir: &Path,
        admin: Option<u16>,
    ) -> Result<Agent, String> {
        let state_file = dir.join(format!("agent-{instance}.json"));
        let log = dir.join(format!("agent-{instance}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(binary);
        // Nothing from the caller's OTEL_* environment: the flags below are
        // the whole configuration, defaults otherwise (batching included).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(["run", "--engine", instance, "--exporter", "otlp"])
            .args(["--endpoint", &format!("http://127.0.0.1:{port}")])
            .args(["--protocol", "grpc", "--admin-listen"])
            .arg(admin.map_or_else(|| "off".into(), |p| format!("127.0.0.1:{p}")))
            .arg("--state-file")
            .arg(&state_file)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        Ok(Agent {
            child,
            state_file,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then wait for the agent's flush and exit.
    fn stop(&mut self) -> Result<(), String> {
        // The child is not reaped yet, so its pid is still its own.
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "agent exited with {status}; log:\n{}",
                        self.log_tail()
                    ));
                }
                Ok(None) if Instant::now() > deadline => {
                    return Err("agent did not exit 20 s after SIGTERM".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for the agent: {e}")),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One run's figures.
#[derive(Debug, Default, Clone)]
struct RunResult {
    offered_rps: f64,
    pushes_per_cpu_s: f64,
    pushed: u64,
    delivered_rps: f64,
    delivered_sps: f64,
    agent_cores: f64,
    collector_cores: f64,
    rss_steady_mib: f64,
    rss_peak_mib: f64,
    lost: u64,
    final_counters: AgentCounters,
    head: u64,
    dropped_before_ticket: u64,
    accounting_exact: bool,
    push: Option<Histogram<u64>>,
    freshness: Option<Histogram<u64>>,
    sink_spans: u64,
}

fn push_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds")
}

/// Writes records for `seconds` at `rate` records/s (0: flat out), every
/// push timed. Pacing: pushes are issued in whatever bursts catch up with
/// `rate × elapsed`, checked every 100 µs, like requests finishing in bursts.
/// Also returns the producing thread's CPU time: on a machine where the agent
/// and the collector share the cores, wall-clock pushes/s fall because the
/// producer gets less CPU, not because a push costs more.
fn produce(
    segment: &EngineSegment,
    rate: u64,
    seconds: f64,
    seq0: u64,
) -> (u64, Histogram<u64>, Duration) {
    let producer = segment.ring().producer();
    let mut hist = push_histogram();
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    let mut pushed = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= window {
            break;
        }
        let target = if rate == 0 {
            pushed + 1024
        } else {
            (rate as f64 * elapsed.as_secs_f64()) as u64
        };
        while pushed < target {
            let t0 = Instant::now();
            let record = agent_record(seq0 + pushed, monotonic_ns());
            let _ = producer.push(&record);
            hist.saturating_record((t0.elapsed().as_nanos() as u64).max(1));
            pushed += 1;
        }
        if rate != 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    (pushed, hist, thread_cpu().saturating_sub(cpu0))
}

/// The calling thread's CPU time (user and system).
fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// What the sampler thread saw during a run.
#[derive(Default)]
struct Samples {
    /// Largest VmRSS / VmHWM seen, KiB.
    peak_rss_kib: u64,
    /// Every distinct publication of the agent's state file.
    publications: Vec<AgentCounters>,
}

/// Samples the agent's resident set and its state file every 50 ms until
/// stopped, keeping every distinct state publication (the agent rewrites
/// it about once a second), so that delivered rates can be taken between
/// two publications that both fall inside the production window.
fn sampler(
    pid: u32,
    state_file: PathBuf,
    instance: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Samples> {
    std::thread::spawn(move || {
        let mut out = Samples::default();
        while !stop.load(Ordering::Relaxed) {
            if let Some(s) = proc_sample(pid) {
                out.peak_rss_kib = out.peak_rss_kib.max(s.rss_kib).max(s.hwm_kib);
            }
            if let Some(c) = read_state(&state_file, &instance)
                && out
                    .publications
                    .last()
                    .is_none_or(|l| l.updated_unix_ms != c.updated_unix_ms)
            {
                out.publications.push(c);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Restricts `pid` (0: the calling thread) to `cpus`; false if refused.
fn pin(pid: u32, cpus: &[usize]) -> bool {
    let mut set = CpuSet::new();
    for &cpu in cpus.iter().filter(|&&c| c < CpuSet::MAX_CPU) {
        set.set(cpu);
    }
    // `Pid::from_raw(0)` is `None`: the calling thread.
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
    sched_setaffinity(pid, &set).is_ok()
}

/// Pins every thread of process `pid` (the agent spawns its threads at
/// start, and a thread keeps the affinity it was created with).
fn pin_process(pid: u32, cpus: &[usize]) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // Every thread is tried, even after one fails.
    let mut ok = true;
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
    {
        ok &= pin(tid, cpus);
    }
    ok
}

/// With `--pin`: the producer's CPU (the last allowed) and the others.
fn split_cpus() -> (usize, Vec<usize>) {
    let cpus = allowed_cpus();
    match cpus.split_last() {
        Some((last, others)) if !others.is_empty() => (*last, others.to_vec()),
        _ => {
            eprintln!("agent_load: --pin needs two CPUs or more");
            std::process::exit(2)
        }
    }
}

/// `produce`, on the producer's own CPU with `--pin` (and back to every
/// CPU afterwards, so threads started later are not confined to it).
fn produce_maybe_pinned(
    args: &Args,
    segment: &EngineSegment,
    rate: u64,
    seq0: u64,
) -> (u64, Histogram<u64>, Duration) {
    let all = allowed_cpus();
    if args.pin {
        let (mine, _) = split_cpus();
        if !pin(0, &[mine]) {
            eprintln!("[agent_load] --pin: could not pin the producer");
        }
    }
    let out = produce(segment, rate, args.seconds, seq0);
    if args.pin {
        pin(0, &all);
    }
    out
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(None) else {
        return vec![];
    };
    (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect()
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// One run: segment, sink, agent, production window, drain, SIGTERM,
/// accounting. `with_agent = false`: the same production with no reader.
fn run(args: &Args, rate: u64, timing_sink: bool, with_agent: bool) -> Result<RunResult, String> {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let instance = format!("perf-agent-{}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(format!("ringside-agent-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut options = CreateOptions::new(instance.clone(), vec!["bench-model".into()]);
    options.capacity = RING_CAPACITY;
    let segment = EngineSegment::create(&options).map_err(|e| format!("segment: {e}"))?;
    let mut result = RunResult::default();

    if !with_agent {
        let (pushed, hist, cpu) = produce_maybe_pinned(args, &segment, rate, 0);
        result.pushed = pushed;
        result.pushes_per_cpu_s = pushed as f64 / cpu.as_secs_f64().max(1e-6);
        result.offered_rps = pushed as f64 / args.seconds;
        result.push = Some(hist);
        return Ok(result);
    }

    let sink = if timing_sink {
        Sink::Timing(TimingSink::start()?)
    } else {
        Sink::Rotel(Rotel::start()?)
    };
    let mut agent = Agent::start(&args.agent, &instance, sink.port(), &dir)?;
    if args.pin {
        let (_, others) = split_cpus();
        let mut ok = pin_process(agent.pid(), &others);
        if let Sink::Rotel(r) = &sink {
            ok &= pin_process(r.pid(), &others);
        }
        if !ok {
            eprintln!("[agent_load] --pin: could not pin the agent or the collector");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while segment.ring().control().agent().0 != agent.pid() {
        if Instant::now() > deadline {
            return Err(format!(
                "the agent did not attach in 15 s; log:\n{}",
                agent.log_tail()
            ));
        }
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Err(format!("agent exited with {status}:\n{}", agent.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let samples = sampler(
        agent.pid(),
        agent.state_file.clone(),
        instance.clone(),
        Arc::clone(&stop),
    );
    let collector_pid = match &sink {
        Sink::Rotel(r) => Some(r.pid()),
        Sink::Timing(_) => None,
    };
    let cpu0 = proc_sample(agent.pid()).ok_or("the agent died")?;
    let collector_cpu0 = collector_pid.and_then(proc_sample);
    let wall0 = Instant::now();
    let start_ms = unix_ms();
    let (pushed, hist, producer_cpu) = produce_maybe_pinned(args, &segment, rate, 1 << 40);
    let end_ms = unix_ms();
    let wall = wall0.elapsed().as_secs_f64();
    let cpu1 = proc_sample(agent.pid()).ok_or("the agent died")?;
    let collector_cpu1 = collector_pid.and_then(proc_sample);
    result.pushed = pushed;
    result.pushes_per_cpu_s = pushed as f64 / producer_cpu.as_secs_f64().max(1e-6);
    result.offered_rps = pushed as f64 / wall;
    result.push = Some(hist);
    result.agent_cores = cpu1.cpu.saturating_sub(cpu0.cpu).as_secs_f64() / wall;
    if let (Some(a), Some(b)) = (collector_cpu0, collector_cpu1) {
        result.collector_cores = b.cpu.saturating_sub(a.cpu).as_secs_f64() / wall;
    }
    result.rss_steady_mib = cpu1.rss_kib as f64 / 1024.0;

    // Drain: wait until the agent has read everything the ring still holds
    // and its queue is empty, so the SIGTERM flush leaves nothing pending.
    let head = segment.ring().counters().head;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = read_state(&agent.state_file, &instance).unwrap_or_default();
        let settled = c.engine_written == head
            && c.lag == 0
            && c.read == c.invalid + c.sampled_out + c.queue_dropped + c.exported + c.export_failed;
        if settled || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop()?;
    stop.store(true, Ordering::Relaxed);
    let samples = samples.join().unwrap_or_default();
    result.rss_peak_mib = samples.peak_rss_kib as f64 / 1024.0;
    // Delivered: between the first and the last publication made inside
    // the production window (the exporter's counters move as batches are
    // acknowledged).
    let inside: Vec<&AgentCounters> = samples
        .publications
        .iter()
        .filter(|p| p.updated_unix_ms > start_ms && p.updated_unix_ms <= end_ms)
        .collect();
    if let (Some(a), Some(b)) = (inside.first(), inside.last()) {
        let dt = b.updated_unix_ms.saturating_sub(a.updated_unix_ms) as f64 / 1000.0;
        if dt > 0.0 {
            result.delivered_rps = b.exported.saturating_sub(a.exported) as f64 / dt;
            result.delivered_sps = b.spans_exported.saturating_sub(a.spans_exported) as f64 / dt;
        }
    }
    if result.delivered_rps == 0.0 {
        result.delivered_rps = f64::NAN;
        result.delivered_sps = f64::NAN;
        eprintln!(
            "[agent_load] fewer than two agent state publications inside the {:.1} s window: no delivered rate",
            args.seconds
        );
    }
    let c = read_state(&agent.state_file, &instance)
        .ok_or_else(|| format!("no final state in {}", agent.state_file.display()))?;
    let counters = segment.ring().counters();
    result.head = counters.head;
    result.dropped_before_ticket = counters.dropped_before_ticket();
    result.lost = c.lost_overwritten
        + c.lost_abandoned
        + c.invalid
        + c.queue_dropped
        + c.export_failed
        + c.skipped_at_attach;
    // Every push either took a ticket or was counted as dropped before one;
    // every ticket was exported, sampled out or lost (nothing pending).
    result.accounting_exact = pushed == counters.head + result.dropped_before_ticket
        && counters.head == c.exported + c.sampled_out + result.lost
        && c.engine_written == counters.head;
    result.final_counters = c;
    if let Sink::Timing(t) = &sink {
        result.freshness = Some(t.take_freshness());
        result.sink_spans = t.spans();
    }
    Ok(result)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

fn rate_label(rate: u64) -> String {
    if rate == 0 {
        "flat out".into()
    } else {
        format!("{rate}/s")
    }
}

fn main() {
    let args = parse_args();
    if !args.step_rates.is_empty() {
        steps_main(&args);
        return;
    }
    let mut report = if args.pin {
        Report::new(
            "agent_pinned",
            "Agent, pinned: producer on its own CPU, agent and rotel on the others",
        )
    } else {
        Report::new("agent", "Agent: throughput, cost, freshness, overload")
    };
    if args.pin {
        report.line(
            "`--pin`: the producing thread runs alone on the last CPU, every thread of the agent and of rotel \
             on the others, so the agent cannot preempt the producer: a change in push latency left here comes \
             from sharing the ring (cache lines the reader touches), not from scheduling. Other processes on \
             the machine are not pinned.\n",
        );
    }
    report.line(&format!(
        "`agent_load`: a synthetic engine (`perf/src/bin/agent_load.rs`) writes records into a real segment \
         (ring of {RING_CAPACITY}, overwrite mode: the engine's defaults) at fixed rates for {} s per run, {} run(s) per rate, \
         rates interleaved; a `ringside-agent run --exporter otlp --protocol grpc` process with default batching \
         (512 spans, 1 s delay) and `--detail phases` (≤ {SPANS_PER_RECORD} spans per record) exports to rotel \
         `--exporter blackhole` on loopback. rotel, the agent and the producer share this machine's cores. \
         Agent CPU = utime+stime from /proc over the production window ÷ wall time; \
         delivered = the change in the agent's `exported` counters between the first and last of its state publications (about one a second) inside the production window.\n",
        args.seconds, args.repeats
    ));

    let mut by_rate: Vec<(u64, Vec<RunResult>)> = args.rates.iter().map(|&r| (r, vec![])).collect();
    let mut no_agent: Vec<RunResult> = vec![];
    let mut fresh: Vec<(u64, Vec<RunResult>)> =
        args.freshness_rates.iter().map(|&r| (r, vec![])).collect();
    let mut failures = 0usize;
    for repeat in 0..args.repeats {
        let mut rates: Vec<usize> = (0..by_rate.len()).collect();
        rates.rotate_left(repeat % by_rate.len().max(1));
        for i in rates {
            let rate = by_rate[i].0;
            match run(&args, rate, false, true) {
                Ok(r) => {
                    eprintln!(
                        "[agent_load] rate {} repeat {repeat}: {:.0} rec/s offered, {:.0} spans/s delivered, agent {:.3} cores, RSS {:.1} MiB, lost {} (overwritten {}, queue-dropped {}, export failed {}), exact {}",
                        rate_label(rate),
                        r.offered_rps,
                        r.delivered_sps,
                        r.agent_cores,
                        r.rss_steady_mib,
                        r.lost,
                        r.final_counters.lost_overwritten,
                        r.final_counters.queue_dropped,
                        r.final_counters.export_failed,
                        r.accounting_exact
                    );
                    by_rate[i].1.push(r);
                }
                Err(e) => {
                    eprintln!("[agent_load] rate {}: {e}", rate_label(rate));
                    failures += 1;
                }
            }
            if rate == 0 {
                // The overload baseline right after: the same flat-out
                // production with no agent attached.
                match run(&args, 0, false, false) {
                    Ok(r) => no_agent.push(r),
                    Err(e) => {
                        eprintln!("[agent_load] no-agent baseline: {e}");
                        failures += 1;
                    }
                }
            }
        }
        for (rate, results) in &mut fresh {
            match run(&args, *rate, true, true) {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("[agent_load] freshness at {}: {e}", rate_label(*rate));
                    failures += 1;
                }
            }
        }
    }

    let f = |rs: &[RunResult], g: fn(&RunResult) -> f64, d: usize| {
        fmt_summary(&rs.iter().map(g).collect::<Vec<_>>(), d)
    };
    let rows: Vec<Vec<String>> = by_rate
        .iter()
        .filter(|(_, rs)| !rs.is_empty())
        .map(|(rate, rs)| {
            vec![
                rate_label(*rate),
                f(rs, |r| r.offered_rps, 0),
                f(rs, |r| r.delivered_rps, 0),
                f(rs, |r| r.delivered_sps, 0),
                f(rs, |r| r.agent_cores * 100.0, 1),
                f(
                    rs,
                    |r| r.delivered_sps / r.agent_cores.max(1e-6) / 1000.0,
                    0,
                ),
                f(rs, |r| r.rss_steady_mib, 1),
                f(rs, |r| r.rss_peak_mib, 1),
                f(rs, |r| r.lost as f64, 0),
                f(rs, |r| r.collector_cores * 100.0, 1),
                format!(
                    "{}/{}",
                    rs.iter().filter(|r| r.accounting_exact).count(),
                    rs.len()
                ),
            ]
        })
        .collect();
    report.line("**Throughput and cost** (median (min–max) over runs)\n");
    report.table(
        &[
            "offered",
            "records/s written",
            "records/s delivered",
            "spans/s delivered",
            "agent CPU % of a core",
            "k spans/s per agent core",
            "agent RSS MiB (end)",
            "agent RSS MiB (peak)",
            "records lost",
            "rotel CPU %",
            "accounting exact",
        ],
        &rows,
    );
    if let Some((_, rs)) = by_rate.iter().find(|(r, rs)| *r == 2_500 && !rs.is_empty()) {
        report.line(&format!(
            "At 2 500 records/s = 10 k spans/s the agent used {} % of a core. Published figures at 10 k spans/s \
             (shared/reference/peers.md): OpenTelemetry Collector 7–14 %, rotel 5.4 % — those are collectors \
             receiving OTLP; the agent reads shared memory and builds the spans itself, then sends OTLP.\n",
            f(rs, |r| r.agent_cores * 100.0, 1)
        ));
    }
    report.line(
        "Targets (issue 7): ≥ 100 k spans/s per agent core, RSS ≤ 32 MiB, freshness p99 ≤ 1 s with default batching. \
         Lost records at flat out are the ring overwriting what the agent could not read in time (overwrite mode), \
         counted exactly.\n",
    );

    let fresh_rows: Vec<Vec<String>> = fresh
        .iter()
        .filter(|(_, rs)| !rs.is_empty())
        .map(|(rate, rs)| {
            vec![
                rate_label(*rate),
                f(
                    rs,
                    |r| r.freshness.as_ref().map_or(f64::NAN, |h| pct(h, 0.5)) / 1000.0,
                    1,
                ),
                f(
                    rs,
                    |r| r.freshness.as_ref().map_or(f64::NAN, |h| pct(h, 0.99)) / 1000.0,
                    1,
                ),
                f(
                    rs,
                    |r| r.freshness.as_ref().map_or(f64::NAN, |h| h.max() as f64) / 1000.0,
                    1,
                ),
                f(rs, |r| r.sink_spans as f64, 0),
                f(rs, |r| r.final_counters.spans_exported as f64, 0),
            ]
        })
        .collect();
    if !fresh_rows.is_empty() {
        report.line(
            "**Freshness** — a separate pass with the timing sink in place of rotel (an OTLP/gRPC receiver in the \
             bench process that timestamps every request span on arrival): wall clock at arrival − the span's end \
             time (the record's finish stamp converted by the agent with the segment's clock pair). Includes the \
             20 ms poll interval, batching (512 spans or 1 s) and the export round trip.\n",
        );
        report.table(
            &[
                "rate (records/s)",
                "p50 ms",
                "p99 ms",
                "max ms",
                "spans received by the sink",
                "spans the agent counted exported",
            ],
            &fresh_rows,
        );
    }

    let flat: Vec<&RunResult> = by_rate
        .iter()
        .filter(|(r, _)| *r == 0)
        .flat_map(|(_, rs)| rs)
        .collect();
    if !flat.is_empty() && !no_agent.is_empty() {
        let q = |rs: &[&RunResult], quant: f64| -> String {
            fmt_summary(
                &rs.iter()
                    .filter_map(|r| r.push.as_ref().map(|h| pct(h, quant)))
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let base: Vec<&RunResult> = no_agent.iter().collect();
        let ratio = |quant: f64| -> String {
            let v: Vec<f64> = flat
                .iter()
                .zip(&base)
                .filter_map(|(a, b)| {
                    Some(pct(a.push.as_ref()?, quant) / pct(b.push.as_ref()?, quant).max(1.0))
                })
                .collect();
            fmt_summary(&v, 2)
        };
        report.line(
            "**Overload** — flat-out production (every push timed, timer included: ~20 ns), with the agent attached \
             and draining as fast as it can, against the same production with no agent (run right after). \
             Wall-clock pushes/s fall with the agent because the agent and rotel take CPU from the producer on \
             this 2-core machine; pushes per CPU-second of the producing thread and the per-push latency show \
             whether a push itself costs more:\n",
        );
        report.table(
            &[
                "producer",
                "pushes/s (wall)",
                "M pushes per producer CPU-second",
                "push p50 ns",
                "p99 ns",
                "p99.9 ns",
            ],
            &[
                vec![
                    "no agent".into(),
                    f(&no_agent, |r| r.offered_rps, 0),
                    f(&no_agent, |r| r.pushes_per_cpu_s / 1e6, 2),
                    q(&base, 0.5),
                    q(&base, 0.99),
                    q(&base, 0.999),
                ],
                vec![
                    "agent draining (overloaded)".into(),
                    fmt_summary(&flat.iter().map(|r| r.offered_rps).collect::<Vec<_>>(), 0),
                    fmt_summary(
                        &flat
                            .iter()
                            .map(|r| r.pushes_per_cpu_s / 1e6)
                            .collect::<Vec<_>>(),
                        2,
                    ),
                    q(&flat, 0.5),
                    q(&flat, 0.99),
                    q(&flat, 0.999),
                ],
                vec![
                    "ratio (same repeat)".into(),
                    String::new(),
                    String::new(),
                    format!("{}×", ratio(0.5)),
                    format!("{}×", ratio(0.99)),
                    format!("{}×", ratio(0.999)),
                ],
            ],
        );
        let acct: Vec<Vec<String>> = flat
            .iter()
            .map(|r| {
                let c = &r.final_counters;
                vec![
                    r.pushed.to_string(),
                    r.head.to_string(),
                    c.exported.to_string(),
                    c.sampled_out.to_string(),
                    r.lost.to_string(),
                    (c.exported + c.sampled_out + r.lost).to_string(),
                    if r.accounting_exact { "yes" } else { "**no**" }.into(),
                ]
            })
            .collect();
        report.line(
            "Accounting after the agent's SIGTERM flush, per flat-out run (written = ring tickets taken; \
             lost = overwritten + abandoned + invalid + queue-dropped + export-failed):\n",
        );
        report.table(
            &[
                "pushed",
                "written",
                "exported",
                "sampled out",
                "lost",
                "exported + sampled out + lost",
                "exact",
            ],
            &acct,
        );
    }
    report.line(&format!(
        "Run finished; machine at the end: {}.\n",
        machine_line()
    ));
    report.finish();
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("ringside-agent-load-{}", std::process::id())),
    );
    if failures > 0 {
        eprintln!("agent_load: {failures} run(s) failed (see above)");
        std::process::exit(1);
    }
}

/// Slots of the synthetic scheduler (the engine's default `--parallel`).
const STEP_SLOTS: usize = 4;
/// Prompt tokens of a synthetic request (one prefill chunk).
const STEP_PROMPT: u32 = 12;

/// A request finished by the synthetic scheduler, as the engine records it:
/// its slot, and first/last token stamps that bracket its decode steps.
fn stepped_record(
    seq: u64,
    slot: usize,
    stamps: [u64; 5],
    tokens: u32,
) -> ringside_shm_protocol::Record {
    let [arrival, scheduled, first, last, finished] = stamps;
    let mut raw = ringside_tests::finished_chat_record(seq, arrival);
    raw.trace_id[8] = 2;
    let mut r = raw.decode(1).expect("the tests' record is valid");
    r.timestamps = Timestamps {
        arrival_ns: arrival,
        scheduled_ns: Some(scheduled),
        first_token_ns: Some(first),
        last_token_ns: Some(last),
        finished_ns: finished,
    };
    r.prompt_tokens = STEP_PROMPT;
    r.completion_tokens = tokens;
    r.sampling.max_tokens = tokens;
    r.stream = true;
    r.finish_reason = FinishReason::Length;
    r.running = u16::try_from(STEP_SLOTS).unwrap_or(u16::MAX);
    r.sequence_slot = u16::try_from(slot).ok();
    r.encode()
}

/// One request in a slot of the synthetic scheduler.
#[derive(Clone, Copy)]
struct Running {
    arrival: u64,
    scheduled: u64,
    first: u64,
    last: u64,
    tokens: u32,
}

/// Runs the synthetic scheduler for `seconds` at `step_rate` steps/s: each
/// step prefills every free slot (its first token at the step's end) and
/// decodes one token of every other; a request ends with its
/// `tokens`-th token, its record pushed after the step's. Without
/// `push_steps` the same requests are recorded and the step ring stays
/// empty. Returns (records, steps) written.
fn produce_steps(
    segment: &EngineSegment,
    step_rate: u64,
    tokens: u32,
    seconds: f64,
    push_steps: bool,
) -> (u64, u64) {
    let records = segment.ring().producer();
    let step_ring = segment.steps().expect("the segment has a step ring");
    let steps = step_ring.producer();
    let mut slots: [Option<Running>; STEP_SLOTS] = [None; STEP_SLOTS];
    let mut ended: Vec<(usize, Running)> = Vec::with_capacity(STEP_SLOTS);
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    let (mut n_steps, mut n_records, mut seq) = (0u64, 0u64, 1u64 << 41);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= window {
            break;
        }
        let target = (step_rate as f64 * elapsed.as_secs_f64()) as u64;
        while n_steps < target {
            let t_start = monotonic_ns();
            let mut decode_slots = SlotSet::EMPTY;
            let mut prefill_slots = SlotSet::EMPTY;
            for (i, slot) in slots.iter().enumerate() {
                if slot.is_some() {
                    decode_slots.insert(i);
                } else {
                    prefill_slots.insert(i);
                }
            }
            let t_decode_end = monotonic_ns();
            let t_end = monotonic_ns();
            let mut kv = 0u32;
            for (i, slot) in slots.iter_mut().enumerate() {
                match slot {
                    Some(r) => {
                        r.tokens += 1;
                        r.last = t_decode_end;
                        kv += STEP_PROMPT + r.tokens;
                        if r.tokens == tokens {
                            ended.push((i, *r));
                            *slot = None;
                        }
                    }
                    None => {
                        *slot = Some(Running {
                            arrival: t_start.saturating_sub(1_000),
                            scheduled: t_start,
                            first: t_end,
                            last: t_end,
                            tokens: 1,
                        });
                        kv += STEP_PROMPT + 1;
                    }
                }
            }
            n_steps += 1;
            let prefills = u16::try_from(prefill_slots.len()).unwrap_or(u16::MAX);
            let decoding = !decode_slots.is_empty();
            if push_steps {
                let step = Step {
                    step: n_steps,
                    t_start_ns: t_start,
                    t_decode_end_ns: t_decode_end,
                    t_end_ns: t_end,
                    decode_slots,
                    prefill_slots,
                    prefill_tokens: u32::from(prefills) * STEP_PROMPT,
                    decode_rows: if decoding { STEP_SLOTS as u16 } else { 0 },
                    decode_calls: u16::from(decoding),
                    prefill_calls: prefills,
                    slots_occupied: STEP_SLOTS as u16,
                    slots_total: STEP_SLOTS as u16,
                    kv_cells_used: kv,
                    kv_cells_total: 4096 * STEP_SLOTS as u32,
                    queue_depth: 0,
                    failed: false,
                };
                let _ = steps.push(&step.encode());
            }
            for (i, r) in ended.drain(..) {
                let finished = monotonic_ns();
                let record = stepped_record(
                    seq,
                    i,
                    [r.arrival, r.scheduled, r.first, r.last, finished],
                    r.tokens,
                );
                let _ = records.push(&record);
                seq += 1;
                n_records += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    (n_records, n_steps)
}

/// One step run's figures.
#[derive(Debug, Default, Clone)]
struct StepRun {
    records_per_s: f64,
    steps_per_s: f64,
    agent_cores: f64,
    rss_peak_mib: f64,
    exported: u64,
    steps_read: u64,
    /// Overwritten and invalid.
    steps_lost: u64,
    unjoined: u64,
    /// Gaps in the inter-token histogram.
    gaps: u64,
    accounting_exact: bool,
}

fn run_steps(args: &Args, step_rate: u64, push_steps: bool) -> Result<StepRun, String> {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let instance = format!("perf-agent-steps-{}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(format!("ringside-agent-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut options = CreateOptions::new(instance.clone(), vec!["bench-model".into()]);
    options.capacity = RING_CAPACITY;
    let segment = EngineSegment::create(&options).map_err(|e| format!("segment: {e}"))?;
    let rotel = Rotel::start()?;
    let admin = ringside_perf::free_port();
    let mut agent =
        Agent::start_with_admin(&args.agent, &instance, rotel.grpc_port, &dir, Some(admin))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while segment.ring().control().agent().0 != agent.pid() {
        if Instant::now() > deadline {
            return Err(format!(
                "the agent did not attach in 15 s; log:\n{}",
                agent.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let samples = sampler(
        agent.pid(),
        agent.state_file.clone(),
        instance.clone(),
        Arc::clone(&stop),
    );
    let cpu0 = proc_sample(agent.pid()).ok_or("the agent died")?;
    let wall0 = Instant::now();
    let (records, steps) = produce_steps(
        &segment,
        step_rate,
        args.tokens_per_request,
        args.seconds,
        push_steps,
    );
    let wall = wall0.elapsed().as_secs_f64();
    let cpu1 = proc_sample(agent.pid()).ok_or("the agent died")?;
    let head = segment.ring().counters().head;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = read_state(&agent.state_file, &instance).unwrap_or_default();
        let settled = c.engine_written == head
            && c.lag == 0
            && c.read == c.invalid + c.sampled_out + c.queue_dropped + c.exported + c.export_failed;
        if settled || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The step counters are in the agent's metrics, not its state file:
    // read them from its Prometheus endpoint once everything is settled.
    let token =
        std::fs::read_to_string(agent.state_file.with_extension("admin-token")).unwrap_or_default();
    let metrics = scrape_metrics(admin, token.trim()).unwrap_or_else(|e| {
        eprintln!("[agent_load] the agent's /metrics: {e}");
        String::new()
    });
    let metric = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let steps_read = metric("ringside_agent_steps_read");
    let steps_lost = metric("ringside_agent_steps_lost");
    let unjoined = metric("ringside_agent_requests_unjoined");
    let gaps = metric("ringside_server_inter_token_duration_seconds_count");
    agent.stop()?;
    stop.store(true, Ordering::Relaxed);
    let samples = samples.join().unwrap_or_default();
    let c = read_state(&agent.state_file, &instance)
        .ok_or_else(|| format!("no final state in {}", agent.state_file.display()))?;
    let lost = c.lost_overwritten
        + c.lost_abandoned
        + c.invalid
        + c.queue_dropped
        + c.export_failed
        + c.skipped_at_attach;
    drop(rotel);
    Ok(StepRun {
        records_per_s: records as f64 / wall,
        steps_per_s: steps as f64 / wall,
        agent_cores: cpu1.cpu.saturating_sub(cpu0.cpu).as_secs_f64() / wall,
        rss_peak_mib: samples.peak_rss_kib as f64 / 1024.0,
        exported: c.exported,
        steps_read,
        steps_lost,
        unjoined,
        gaps,
        accounting_exact: records == head && head == c.exported + c.sampled_out + lost,
    })
}

fn steps_main(args: &Args) {
    let mut report = Report::new("agent_steps", "Agent with steps (ABI 1.4)");
    let tokens = args.tokens_per_request;
    report.line(&format!(
        "`agent_load --step-rates`: a synthetic engine (`perf/src/bin/agent_load.rs`) runs a scheduler of \
         {STEP_SLOTS} slots at a fixed step rate: every step decodes one token of each busy slot and prefills the free \
         ones, one step record per step into the segment's step ring (4096, the default) and one request record \
         per {tokens}-token request as it ends (after its last step's record, as the engine writes them), so \
         records/s = steps/s × {STEP_SLOTS} ÷ {tokens} and every request joins {} steps. Each step rate runs with the \
         step records and with the same requests and no step records (step ring empty), interleaved, the order \
         alternating per repeat; {} s per run, {} repeat(s). A `ringside-agent run --exporter otlp --protocol grpc` \
         (default batching, `--detail phases`) exports to rotel `--exporter blackhole` on loopback; producer, agent \
         and rotel share this machine's cores. Agent CPU = utime+stime from /proc over the production window ÷ wall \
         time. Steps read, lost and requests unjoined from the agent's \
         Prometheus `/metrics` (`ringside.agent.steps.*`, `ringside.agent.requests.unjoined`) after the run; joined = \
         exported − unjoined; gaps = the count of `ringside.server.inter_token.duration` (exported requests × {} \
         when every request joins; the run without step records has none).\n",
        tokens - 1,
        args.seconds,
        args.repeats,
        tokens - 1,
    ));
    let mut with: Vec<Vec<StepRun>> = vec![vec![]; args.step_rates.len()];
    let mut without: Vec<Vec<StepRun>> = vec![vec![]; args.step_rates.len()];
    let mut failures = 0usize;
    for repeat in 0..args.repeats {
        for (i, &rate) in args.step_rates.iter().enumerate() {
            let order = if repeat % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for push in order {
                match run_steps(args, rate, push) {
                    Ok(r) => {
                        eprintln!(
                            "[agent_load] {rate} steps/s, steps {}: {:.0} steps/s, {:.0} records/s, agent {:.3} cores, steps read {} lost+invalid {}, unjoined {}, gaps {}, exported {}, exact {}",
                            if push { "on" } else { "off" },
                            r.steps_per_s,
                            r.records_per_s,
                            r.agent_cores,
                            r.steps_read,
                            r.steps_lost,
                            r.unjoined,
                            r.gaps,
                            r.exported,
                            r.accounting_exact
                        );
                        (if push { &mut with } else { &mut without })[i].push(r);
                    }
                    Err(e) => {
                        eprintln!("[agent_load] {rate} steps/s: {e}");
                        failures += 1;
                    }
                }
            }
        }
    }
    let f = |rs: &[StepRun], g: fn(&StepRun) -> f64, d: usize| {
        fmt_summary(&rs.iter().map(g).collect::<Vec<_>>(), d)
    };
    let mut rows = vec![];
    for (i, &rate) in args.step_rates.iter().enumerate() {
        for (label, rs) in [
            ("with step records", &with[i]),
            ("no step records", &without[i]),
        ] {
            if rs.is_empty() {
                continue;
            }
            rows.push(vec![
                format!("{rate}/s, {label}"),
                f(rs, |r| r.steps_per_s, 0),
                f(rs, |r| r.records_per_s, 0),
                f(rs, |r| r.agent_cores * 100.0, 2),
                f(rs, |r| r.rss_peak_mib, 1),
                f(rs, |r| r.steps_read as f64, 0),
                f(rs, |r| r.steps_lost as f64, 0),
                f(rs, |r| r.exported.saturating_sub(r.unjoined) as f64, 0),
                f(rs, |r| r.gaps as f64, 0),
                f(rs, |r| r.exported as f64, 0),
                format!(
                    "{}/{}",
                    rs.iter().filter(|r| r.accounting_exact).count(),
                    rs.len()
                ),
            ]);
        }
    }
    report.line("**Agent CPU with steps** (median (min–max) over runs)\n");
    report.table(
        &[
            "step rate, run",
            "steps/s written",
            "records/s written",
            "agent CPU % of a core",
            "agent RSS MiB (peak)",
            "steps read by the agent",
            "steps lost + invalid",
            "requests joined",
            "gaps in the inter-token histogram",
            "requests exported",
            "record accounting exact",
        ],
        &rows,
    );
    let mut diff_rows = vec![];
    for (i, &rate) in args.step_rates.iter().enumerate() {
        // Same repeat, same rate: with − without.
        let diffs: Vec<f64> = with[i]
            .iter()
            .zip(&without[i])
            .map(|(a, b)| (a.agent_cores - b.agent_cores) * 100.0)
            .collect();
        let per_step: Vec<f64> = with[i]
            .iter()
            .zip(&without[i])
            .map(|(a, b)| (a.agent_cores - b.agent_cores) * 1e9 / a.steps_per_s.max(1.0))
            .collect();
        diff_rows.push(vec![
            format!("{rate}/s"),
            fmt_summary(&diffs, 2),
            fmt_summary(&per_step, 0),
        ]);
    }
    report.table(
        &[
            "step rate",
            "agent CPU for steps, % of a core (with − without, same repeat)",
            "agent CPU ns per step",
        ],
        &diff_rows,
    );
    report.finish();
    if failures > 0 {
        eprintln!("agent_load: {failures} run(s) failed");
        std::process::exit(1);
    }
}

/// `GET /metrics` of the agent's admin API on loopback `port`, with its
/// bearer token.
fn scrape_metrics(port: u16, token: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {token}\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return Err(text.lines().next().unwrap_or("no answer").to_owned());
    }
    Ok(text)
}
