//! Tracing on vs off on the real engine and default model, under a fixed
//! closed-loop load: N concurrent clients, each sending streamed
//! completions one after another (fixed prompts, fixed max_tokens,
//! temperature 0), so throughput (tokens/s, requests/s) and latency (time to
//! first token, end to end) are measured on the same requests.
//!
//! Four modes, in interleaved blocks whose order rotates per round (and is
//! reversed every other cycle), so all modes see the same model, threads,
//! warm caches and machine noise:
//! - `off`: the tracing word cleared (the engine writes nothing);
//! - `on`: tracing on — request records and one step record per scheduler
//!   step (ABI 1.4, default `--step-ring-capacity`) — no agent reading (the
//!   agent process is SIGSTOPped);
//! - `on, no step ring`: tracing on in a second engine process started with
//!   `--step-ring-capacity 0` (request records only), idle while the others
//!   run: what recording steps adds is `on` against it;
//! - `on+agent`: tracing on (steps too), a `ringside-agent` attached and
//!   exporting to rotel over OTLP/gRPC (SIGCONTed), competing for the same
//!   cores as a real deployment's agent would.
//!
//! Besides wall-clock throughput, the serving engine's CPU time (utime +
//! stime from `/proc`) per 1000 output tokens: less sensitive than
//! throughput to other processes taking the cores.
//!
//! `cargo bench -p ringside-perf --bench engine_tracing` (needs a release
//! build of `ringside-engine` and `ringside-agent`, the default model and
//! rotel: `scripts/setup.sh`). `ENGINE_BENCH_CLIENTS` (default 4, also the
//! engine's `--parallel`), `ENGINE_BENCH_BLOCKS` (rounds: each runs one
//! block per mode; default 8), `ENGINE_BENCH_REQUESTS` (per client per
//! block, default 2), `ENGINE_BENCH_MAX_TOKENS` (default 32).

#![forbid(unsafe_code)]

use ringside_perf::{
    Report, Rotel, env_usize, fmt_summary, machine_line, proc_sample, workspace_bin,
};
use ringside_shm_protocol::{AttachedSegment, OpenOptions};
use rustix::process::{Pid, Signal, kill_process};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMPTS: [&str; 4] = [
    "The history of the city of Rome begins in the eighth century before our era, when",
    "In mathematics, a prime number is a natural number greater than one that",
    "The steam engine changed the way goods were made and moved, because",
    "Photosynthesis is the process by which green plants and some other organisms",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    On,
    OnNoSteps,
    OnAgent,
}

const MODES: [Mode; 4] = [Mode::Off, Mode::On, Mode::OnNoSteps, Mode::OnAgent];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "tracing off",
            Mode::On => "tracing on (steps recorded), no agent",
            Mode::OnNoSteps => "tracing on, no step ring, no agent",
            Mode::OnAgent => "tracing on + agent → rotel",
        }
    }
}

/// One streamed request's figures.
#[derive(Clone, Copy, Debug)]
struct Request {
    ttft_ms: f64,
    e2e_ms: f64,
    tokens: u64,
}

/// One streamed completion over HTTP/1.0 (so the body is close-delimited,
/// not chunked, and each SSE line arrives whole).
fn stream_completion(port: u16, prompt: &str, max_tokens: usize) -> Result<Request, String> {
    let body = serde_json::json!({
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let start = Instant::now();
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    write!(
        stream,
        "POST /v1/completions HTTP/1.0\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut ttft = None;
    let mut tokens = None;
    let mut chunks = 0u64;
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .map_err(|e| format!("read: {e}"))?;
    if !status.contains(" 200") {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        return Err(format!("{}: {rest}", status.trim()));
    }
    for line in reader.lines() {
        let line = line.map_err(|e| format!("read: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        if let Some(rest) = data.split("\"completion_tokens\":").nth(1) {
            tokens = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok());
        } else {
            chunks += 1;
            ttft.get_or_insert_with(|| start.elapsed());
        }
    }
    let e2e = start.elapsed();
    Ok(Request {
        ttft_ms: ttft.unwrap_or(e2e).as_secs_f64() * 1000.0,
        e2e_ms: e2e.as_secs_f64() * 1000.0,
        tokens: tokens.unwrap_or(chunks),
    })
}

/// `GET /health` answers 200 (the model is loaded).
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nhost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// One block: every client sends `per_client` requests back to back.
/// Returns the block's wall time and its requests.
fn block(port: u16, clients: usize, per_client: usize, max_tokens: usize) -> (f64, Vec<Request>) {
    let start = Instant::now();
    let requests = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..per_client)
                        .map(|_| {
                            stream_completion(port, PROMPTS[c % PROMPTS.len()], max_tokens)
                                .unwrap_or_else(|e| {
                                    eprintln!("engine_tracing: request failed: {e}");
                                    std::process::exit(1)
                                })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    (start.elapsed().as_secs_f64(), requests)
}

fn signal(child: &Child, sig: Signal) {
    // The child is not reaped yet, so its pid is still its own.
    let _ = kill_process(Pid::from_child(child), sig);
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn stop(child: &mut Child) {
    signal(child, Signal::CONT);
    signal(child, Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A started engine: its process, port, instance name and attached segment.
struct Engine {
    child: Child,
    port: u16,
    instance: String,
    segment: AttachedSegment,
}

/// Starts `ringside-engine serve` with `extra` flags and waits until its
/// segment exists and `/health` answers 200.
fn start_engine(
    bin: &Path,
    instance: &str,
    clients: usize,
    extra: &[&str],
) -> Result<Engine, String> {
    let port = ringside_perf::free_port();
    let log = std::env::temp_dir().join(format!("{instance}.engine.log"));
    let mut child = Command::new(bin)
        .args(["serve", "--port", &port.to_string(), "--instance", instance])
        .args(["--served-model-name", "bench"])
        .args(["--parallel", &clients.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(&log)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(segment) = AttachedSegment::open(instance, &OpenOptions::default())
            && health_ok(port)
        {
            return Ok(Engine {
                child,
                port,
                instance: instance.into(),
                segment,
            });
        }
        if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
            stop(&mut child);
            return Err(format!("the engine did not start; log {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() {
    let fail = |e: String| -> ! {
        eprintln!("engine_tracing: {e}");
        std::process::exit(1)
    };
    let engine_bin = workspace_bin("ringside-engine").unwrap_or_else(|e| fail(e));
    let agent_bin = workspace_bin("ringside-agent").unwrap_or_else(|e| fail(e));
    let clients = env_usize("ENGINE_BENCH_CLIENTS", 4).max(1);
    let rounds = env_usize("ENGINE_BENCH_BLOCKS", 8).max(1);
    let per_client = env_usize("ENGINE_BENCH_REQUESTS", 2).max(1);
    let max_tokens = env_usize("ENGINE_BENCH_MAX_TOKENS", 32).max(1);

    let rotel = Rotel::start().unwrap_or_else(|e| fail(e));
    let pid = std::process::id();
    // The engine under test (default step ring) and its twin without one.
    let mut main_engine = start_engine(&engine_bin, &format!("perf-engine-{pid}"), clients, &[])
        .unwrap_or_else(|e| fail(e));
    let mut no_steps = match start_engine(
        &engine_bin,
        &format!("perf-engine-nosteps-{pid}"),
        clients,
        &["--step-ring-capacity", "0"],
    ) {
        Ok(e) => e,
        Err(e) => {
            stop(&mut main_engine.child);
            fail(e)
        }
    };
    let Some(step_ring) = main_engine.segment.steps() else {
        stop(&mut main_engine.child);
        stop(&mut no_steps.child);
        fail(
            "the engine under test has no step ring (ABI 1.4 and the default capacity expected)"
                .into(),
        )
    };
    if no_steps.segment.steps().is_some() {
        stop(&mut main_engine.child);
        stop(&mut no_steps.child);
        fail("--step-ring-capacity 0 still made a step ring".into());
    }
    let instance = main_engine.instance.clone();
    let state_file = std::env::temp_dir().join(format!("{instance}.agent.json"));
    let mut agent = Command::new(&agent_bin)
        .args(["run", "--engine", &instance, "--exporter", "otlp"])
        .args([
            "--endpoint",
            &format!("http://127.0.0.1:{}", rotel.grpc_port),
        ])
        .args(["--protocol", "grpc", "--admin-listen", "off"])
        .arg("--state-file")
        .arg(&state_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(format!("starting {}: {e}", agent_bin.display())));
    let segment = &main_engine.segment;
    let deadline = Instant::now() + Duration::from_secs(15);
    while segment.ring().control().agent().0 != agent.id() {
        if Instant::now() > deadline {
            stop(&mut agent);
            stop(&mut main_engine.child);
            stop(&mut no_steps.child);
            fail("the agent did not attach in 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Warm up both engines (the first requests page the model in); the twin
    // only ever serves with tracing on.
    segment.ring().control().set_tracing_enabled(false);
    no_steps.segment.ring().control().set_tracing_enabled(true);
    signal(&agent, Signal::STOP);
    block(main_engine.port, clients, 1, max_tokens);
    block(no_steps.port, clients, 1, max_tokens);

    let n = MODES.len();
    // Per mode: per-block tokens/s, requests/s and engine CPU ms per 1000
    // tokens, and every request.
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut reqs: Vec<Vec<Request>> = vec![Vec::new(); n];
    let mut sent_while_on = 0u64;
    let mut steps_while_on = 0u64;
    let mut steps_while_off = 0u64;
    let mut tokens_while_on = 0u64;
    let mut wall_while_on = 0.0f64;
    for round in 0..rounds {
        // Rotated each round, reversed every other cycle: each mode takes
        // each position equally often and follows and precedes the others.
        let mut order = MODES;
        order.rotate_left(round % n);
        if (round / n) % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            // The engine writes a request's record just after its response:
            // let the previous block's last records land before switching.
            std::thread::sleep(Duration::from_millis(150));
            segment
                .ring()
                .control()
                .set_tracing_enabled(matches!(mode, Mode::On | Mode::OnAgent));
            signal(
                &agent,
                if mode == Mode::OnAgent {
                    Signal::CONT
                } else {
                    Signal::STOP
                },
            );
            let serving = if mode == Mode::OnNoSteps {
                &no_steps
            } else {
                &main_engine
            };
            let steps_before = step_ring.counters().head;
            let cpu_before = proc_sample(serving.child.id()).map(|s| s.cpu);
            let (wall, requests) = block(serving.port, clients, per_client, max_tokens);
            let cpu_after = proc_sample(serving.child.id()).map(|s| s.cpu);
            let tokens: u64 = requests.iter().map(|r| r.tokens).sum();
            let i = mode as usize;
            tps[i].push(tokens as f64 / wall);
            rps[i].push(requests.len() as f64 / wall);
            if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
                cpu[i].push(b.saturating_sub(a).as_secs_f64() * 1e6 / tokens.max(1) as f64);
            }
            if mode == Mode::Off {
                steps_while_off += step_ring.counters().head - steps_before;
            }
            if matches!(mode, Mode::On | Mode::OnAgent) {
                sent_while_on += requests.len() as u64;
                steps_while_on += step_ring.counters().head - steps_before;
                tokens_while_on += tokens;
                wall_while_on += wall;
            }
            reqs[i].extend(requests);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let written = segment.ring().counters().head;
    let steps_total = step_ring.counters().head;
    // Let the agent export the rest and account for it.
    signal(&agent, Signal::CONT);
    std::thread::sleep(Duration::from_millis(1500));
    stop(&mut agent);
    let exported = std::fs::read_to_string(&state_file)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|s| {
            s["engines"]
                .as_array()?
                .iter()
                .rev()
                .find(|e| e["instance"] == instance.as_str())
                .and_then(|e| e["stats"]["exported"].as_u64())
        });
    let _ = std::fs::remove_file(&state_file);
    stop(&mut main_engine.child);
    stop(&mut no_steps.child);
    drop(rotel);

    let mut report = Report::new("engine_tracing", "Engine: tracing on vs off");
    report.line(&format!(
        "`--bench engine_tracing`: engine processes with the default model and threads, `--parallel {clients}`; \
         {clients} closed-loop clients, each sending {per_client} streamed `/v1/completions` per block \
         ({max_tokens} tokens max, temperature 0, fixed prompts); {rounds} rounds of one block per mode, \
         the order rotated per round and reversed every other cycle. `on` records requests and steps \
         (ABI 1.4, the default `--step-ring-capacity`); `on, no step ring` is a second engine process started \
         with `--step-ring-capacity 0`, idle while the other modes run. In the `on` modes without agent the agent \
         process is SIGSTOPped; in `on + agent` it runs and exports to rotel over OTLP/gRPC on the same cores. \
         tokens/s, requests/s and the serving engine's CPU time (utime + stime, `/proc`, 10 ms ticks) per 1000 \
         output tokens per block: median (min–max) over blocks; TTFT and end-to-end over all requests of a mode.\n",
    ));
    let rows: Vec<Vec<String>> = MODES
        .iter()
        .map(|&m| {
            let i = m as usize;
            let ttft: Vec<f64> = reqs[i].iter().map(|r| r.ttft_ms).collect();
            let e2e: Vec<f64> = reqs[i].iter().map(|r| r.e2e_ms).collect();
            vec![
                m.name().into(),
                fmt_summary(&tps[i], 2),
                fmt_summary(&rps[i], 3),
                fmt_summary(&cpu[i], 0),
                format!("{:.0}", percentile(&ttft, 0.5)),
                format!("{:.0}", percentile(&ttft, 0.99)),
                format!("{:.0}", percentile(&e2e, 0.5)),
                format!("{:.0}", percentile(&e2e, 0.99)),
                reqs[i].len().to_string(),
            ]
        })
        .collect();
    report.table(
        &[
            "mode",
            "tokens/s",
            "requests/s",
            "engine CPU ms / 1000 tokens",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "e2e p50 ms",
            "e2e p99 ms",
            "requests",
        ],
        &rows,
    );
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let row = |name: &str, a: Mode, b: Mode| -> Vec<String> {
        let (a, b) = (a as usize, b as usize);
        vec![
            name.into(),
            fmt_summary(&ratio(&tps[a], &tps[b]), 3),
            fmt_summary(&ratio(&rps[a], &rps[b]), 3),
            fmt_summary(&ratio(&cpu[a], &cpu[b]), 3),
        ]
    };
    report.table(
        &[
            "ratio (same round, median (min–max))",
            "tokens/s",
            "requests/s",
            "engine CPU per token",
        ],
        &[
            row("on ÷ off", Mode::On, Mode::Off),
            row("on + agent ÷ off", Mode::OnAgent, Mode::Off),
            row("on ÷ on, no step ring", Mode::On, Mode::OnNoSteps),
            row(
                "on, no step ring ÷ off (two processes)",
                Mode::OnNoSteps,
                Mode::Off,
            ),
        ],
    );
    report.line(&format!(
        "Records written while tracing was on: {written} (requests sent while on: {sent_while_on}); \
         exported by the agent: {}. Step records written during the blocks with tracing on: {steps_while_on} \
         ({:.1} steps/s, {:.2} output tokens per step); during the blocks with tracing off: {steps_while_off}; \
         {steps_total} in all (a block's last step can be pushed just after its last response: it lands between \
         blocks). Target (issue 7, issue 14 with steps): on ÷ off ≥ 0.995 for throughput.\n",
        exported.map_or_else(|| "unknown (no state file)".into(), |n| n.to_string()),
        steps_while_on as f64 / wall_while_on.max(f64::MIN_POSITIVE),
        tokens_while_on as f64 / steps_while_on.max(1) as f64,
    ));
    report.line(&format!(
        "Run finished; machine at the end: {}.\n",
        machine_line()
    ));
    report.finish();
}
