//! Shared pieces of the benchmarks: records like the engine writes, the
//! machine the figures come from, processes' CPU and memory from `/proc`, the
//! rotel collector, summaries (median with min–max over repeated runs) and
//! the markdown fragments `scripts/bench.sh` assembles into `perf/RESULTS.md`.

#![forbid(unsafe_code)]

pub use ringside_alloc_counter as alloc;
pub mod sink;

use ringside_shm_protocol::{
    ErrorType, FinishReason, Operation, Record, RecordKind, RequestRecord, Sampling, Timestamps,
};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A record with every field set, as the engine fills it at the end of a request.
pub fn engine_like_record(seq: u64) -> Record {
    RequestRecord {
        kind: RecordKind::RequestFinished,
        operation: Operation::Chat,
        request_id: u128::from(seq).to_le_bytes(),
        trace_id: [7; 16],
        parent_span_id: None,
        span_id: [9; 8],
        trace_flags: 0,
        ot: Default::default(),
        timestamps: Timestamps {
            arrival_ns: 1,
            scheduled_ns: Some(2),
            first_token_ns: Some(3),
            last_token_ns: Some(4),
            finished_ns: 5,
        },
        prompt_tokens: 100,
        completion_tokens: 50,
        cached_prompt_tokens: 0,
        sampling: Sampling {
            max_tokens: 256,
            temperature: 0.7,
            top_p: 0.95,
            ..Sampling::default()
        },
        params_set: 0,
        stream: false,
        finish_reason: FinishReason::Stop,
        http_status: 200,
        error_type: ErrorType::None,
        model_index: 0,
        queue_depth: 0,
        running: 0,
        sequence_slot: Some(0),
    }
    .encode()
}

/// A record the agent accepts and turns into a full span tree: unique ids,
/// a remote parent, stamps ending at `finished_ns` (the engine's monotonic
/// clock), so that the span's end time is when the record was written.
pub fn agent_record(seq: u64, finished_ns: u64) -> Record {
    // `finished_chat_record` finishes 4 µs after it arrives.
    ringside_tests::finished_chat_record(seq, finished_ns.saturating_sub(4_000))
}

/// CPU model and core count, for the header of every benchmark report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{model}, {cores} cores available")
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` gives them.
/// Printed next to every figure: on shared machines the load of the moment
/// moves figures more than the code does.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Machine, kernel and load, one line.
pub fn machine_line() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{}; Linux {kernel}; load average {}",
        machine(),
        load_average()
    )
}

/// A positive integer from the environment, or `default`. A value that is
/// set but not a number is an error: a typo must not silently run the
/// default length.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a whole number");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

/// One process's CPU time and memory, read from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime.
    pub cpu: Duration,
    /// Resident set now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set (VmHWM), KiB.
    pub hwm_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` once the
/// process is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // stat fields 14 (utime) and 15 (stime) are 11 and 12 after the name.
    let total_ticks = ticks(11)? + ticks(12)?;
    let hz = Some(rustix::param::clock_ticks_per_second())
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu: Duration::from_nanos(total_ticks * 1_000_000_000 / hz),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// The `rotel-agent` collector (PyPI `rotel`): `$ROTEL_AGENT`, on `PATH`, in
/// `$RINGSIDE_VENV` or in the workspace's `.venv` (`scripts/setup.sh`).
pub fn rotel_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROTEL_AGENT") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("rotel-agent"))
                .collect()
        })
        .unwrap_or_default();
    let venvs = [
        std::env::var_os("RINGSIDE_VENV").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv")),
    ];
    for venv in venvs.into_iter().flatten() {
        candidates.push(venv.join("bin/rotel-agent"));
        if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
            for e in entries.flatten() {
                candidates.push(e.path().join("site-packages/rotel/rotel-agent"));
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// rotel on loopback with `--exporter blackhole`: a real collector that
/// decodes every request and throws the data away. Killed on drop.
#[derive(Debug)]
pub struct Rotel {
    child: Child,
    /// Its OTLP/gRPC port.
    pub grpc_port: u16,
}

impl Rotel {
    /// Starts rotel and waits until its gRPC port accepts connections.
    pub fn start() -> Result<Rotel, String> {
        let binary = rotel_binary().ok_or(
            "rotel-agent not found (ROTEL_AGENT, PATH, RINGSIDE_VENV or .venv): run scripts/setup.sh",
        )?;
        let grpc_port = free_port();
        let http_port = free_port();
        let child = Command::new(&binary)
            .args(["start", "--exporter", "blackhole"])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let rotel = Rotel { child, grpc_port };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("rotel did not open 127.0.0.1:{grpc_port} in 15 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(rotel)
    }

    /// The collector's pid (for its CPU figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median, min and max of repeated measurements of one figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The middle value (the upper middle for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many runs.
    pub n: usize,
}

impl Summary {
    /// Summarises `values`; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Summary {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    /// `median (min–max)` with `decimals` digits after the point.
    pub fn fmt(&self, decimals: usize) -> String {
        if self.n == 1 {
            return format!("{:.*}", decimals, self.median);
        }
        format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }
}

/// `median (min–max)` of `values`, or `–` when there are none.
pub fn fmt_summary(values: &[f64], decimals: usize) -> String {
    Summary::of(values).map_or_else(|| "–".into(), |s| s.fmt(decimals))
}

/// A markdown section of the results: printed on stdout as it is built and,
/// when `RINGSIDE_BENCH_REPORT_DIR` is set (as `scripts/bench.sh` sets it),
/// written to `<dir>/<name>.md` for the generated `perf/RESULTS.md`.
#[derive(Debug)]
pub struct Report {
    name: String,
    text: String,
}

impl Report {
    /// A section headed `## {title}`, with the machine line under it.
    pub fn new(name: &str, title: &str) -> Report {
        let mut r = Report {
            name: name.into(),
            text: String::new(),
        };
        r.line(&format!("## {title}\n"));
        r.line(&format!("Machine: {}.\n", machine_line()));
        r
    }

    /// Appends one line (printed at once as well).
    pub fn line(&mut self, line: &str) {
        println!("{line}");
        let _ = writeln!(self.text, "{line}");
    }

    /// Appends a markdown table.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        self.line(&format!("| {} |", header.join(" | ")));
        self.line(&format!("|{}", "---|".repeat(header.len())));
        for row in rows {
            self.line(&format!("| {} |", row.join(" | ")));
        }
        self.line("");
    }

    /// Writes the section file, if asked to.
    pub fn finish(self) {
        if let Some(dir) = std::env::var_os("RINGSIDE_BENCH_REPORT_DIR") {
            let path = PathBuf::from(dir).join(format!("{}.md", self.name));
            if let Err(e) = std::fs::write(&path, &self.text) {
                eprintln!("writing {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

/// The directory of this executable's profile (`target/release`), where the
/// workspace's binaries are: benches and perf binaries live below it.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this executable");
    let dir = exe.parent().expect("executable in a directory");
    // Benches run from target/<profile>/deps, binaries from target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A binary of the workspace next to this one, or an error naming how to
/// build it.
pub fn workspace_bin(name: &str) -> Result<PathBuf, String> {
    let path = profile_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release --workspace --bins)",
            path.display()
        ))
    }
}
