//! Tracing on vs off on the real engine: paired runs on the same engine
//! process, the control word flipped between blocks, so both modes see the
//! same model, threads, warm caches and machine noise.
//!
//! `cargo bench -p ringside-perf --bench engine_tracing` (needs a release
//! build of `ringside-engine` and the default model: `scripts/setup.sh`).
//! `ENGINE_BENCH_BLOCKS` (default 12) and `ENGINE_BENCH_REQUESTS` (per block,
//! default 4) set the run length.

use ringside_perf::machine;
use ringside_shm_protocol::{AttachedSegment, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAX_TOKENS: u32 = 48;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One non-streamed completion; returns (seconds, completion tokens).
fn complete(port: u16) -> (f64, u64) {
    let body = format!(
        r#"{{"model":"bench","prompt":"Write a short story about a lighthouse keeper.","max_tokens":{MAX_TOKENS},"temperature":0}}"#
    );
    let start = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let seconds = start.elapsed().as_secs_f64();
    let tokens = response
        .split("\"completion_tokens\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no usage in response: {response}"));
    (seconds, tokens)
}

/// `GET /health` answers 200 (the model is loaded).
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}

fn main() {
    let exe = std::env::current_exe().expect("bench path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("ringside-engine");
    assert!(
        bin.exists(),
        "build the engine first: cargo build --release -p ringside-engine"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let instance = format!("bench-{}", std::process::id());
    let mut engine = Command::new(&bin)
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--instance",
            &instance,
        ])
        .args(["--served-model-name", "bench", "--parallel", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start engine");
    let stderr = engine.stderr.take().expect("stderr");
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let deadline = Instant::now() + Duration::from_secs(120);
    let segment = loop {
        if let Ok(segment) = AttachedSegment::open(&instance, &OpenOptions::default())
            && health_ok(port)
        {
            break segment;
        }
        assert!(Instant::now() < deadline, "engine did not start");
        std::thread::sleep(Duration::from_millis(200));
    };
    // Warm up (first requests page the model in).
    for _ in 0..3 {
        complete(port);
    }
    let blocks = env_or("ENGINE_BENCH_BLOCKS", 12);
    let per_block = env_or("ENGINE_BENCH_REQUESTS", 4);
    let (mut on_tps, mut off_tps, mut on_lat, mut off_lat) = (vec![], vec![], vec![], vec![]);
    for block in 0..blocks {
        // Alternate which mode goes first, so drift does not favour one.
        let order = if block % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for tracing in order {
            // The engine writes a record just after the response: let the
            // last one of the previous phase land before flipping.
            std::thread::sleep(Duration::from_millis(100));
            segment.ring().control().set_tracing_enabled(tracing);
            for _ in 0..per_block {
                let (seconds, tokens) = complete(port);
                let (tps, lat) = if tracing {
                    (&mut on_tps, &mut on_lat)
                } else {
                    (&mut off_tps, &mut off_lat)
                };
                tps.push(tokens as f64 / seconds);
                lat.push(seconds * 1000.0);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let written = segment.ring().counters().head;
    let _ = Command::new("kill").arg(engine.id().to_string()).status();
    let _ = engine.wait();

    println!("machine: {}", machine());
    println!(
        "engine --parallel 1, default threads, {MAX_TOKENS} tokens per request, {blocks} blocks x {per_block} requests per mode"
    );
    let (on_m, off_m) = (median(&mut on_tps), median(&mut off_tps));
    println!(
        "tokens/s median   tracing on {on_m:8.2}   off {off_m:8.2}   on/off {:.4}",
        on_m / off_m
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (on, off) = (percentile(&mut on_lat, q), percentile(&mut off_lat, q));
        println!(
            "latency {name} (ms)  tracing on {on:8.1}   off {off:8.1}   on/off {:.4}",
            on / off
        );
    }
    println!(
        "records written while on: {written} (expected {})",
        blocks * per_block + 3
    );
}
