//! OTLP/gRPC export throughput into a real collector: `rotel-agent
//! --exporter blackhole` on a loopback port (found on PATH, under
//! `$RINGSIDE_VENV` or in the workspace's `.venv`; skipped if absent).
//!
//! `cargo bench -p ringside-agent --bench export_grpc`

use ringside_agent::{
    AttributeSet, Compression, EngineHandle, EngineStats, ExportCounters, ExportQueue,
    ExportTarget, Exporter, Item, Metrics, OtlpSettings, Protocol, ResourceEnv, SpanContext,
    Transport,
};
use ringside_shm_protocol::{ClockPair, Detail};
use ringside_tests::finished_chat_record;
use ringside_tests::harness::{cpu_time, find_rotel};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() {
    let Some(binary) = find_rotel() else {
        println!("export_grpc: rotel-agent not found; skipped");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let http_port = port.wrapping_add(1);
    let mut collector = Command::new(binary)
        .args([
            "start",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{port}"),
            "--otlp-http-endpoint",
            &format!("127.0.0.1:{http_port}"),
            "--exporter",
            "blackhole",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rotel-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    let requests = 100_000u64;
    // Spans per export request (the agent's --batch-size; default 512).
    let batch: usize = std::env::var("EXPORT_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    // Export requests in flight (the agent's --max-in-flight; default 8).
    let in_flight: usize = std::env::var("EXPORT_BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let engine = Arc::new(EngineHandle {
        id: 0,
        instance: "bench".into(),
        pid: 1,
        resource: ResourceEnv::from_env(&|_| None, "bench".into()).engine_resource(
            "bench",
            &ringside_shm_protocol::EngineIdentity {
                pid: 1,
                start_time: 1,
                generation: 1,
                created_realtime_ns: 1,
            },
        ),
        stats: EngineStats::default(),
        capture: Default::default(),
    });
    let ctx = Arc::new(SpanContext {
        clock: ClockPair {
            realtime_ns: 1_700_000_000_000_000_000,
            monotonic_ns: 0,
        },
        models: vec!["bench-model".into()],
        attributes: AttributeSet::Both,
        server_address: "bench".into(),
        server_port: None,
    });
    let queue = Arc::new(ExportQueue::new(usize::MAX, usize::MAX, 512));
    for seq in 0..requests {
        let decoded = finished_chat_record(seq, 1_000_000)
            .decode(1)
            .expect("valid bench record");
        queue.push(Item::new(
            Arc::clone(&engine),
            Arc::clone(&ctx),
            decoded,
            Detail::Phases,
        ));
    }
    let spans = queue.spans();
    let collector_pid = collector.id().to_string();
    let mut cpu_start = (Duration::ZERO, Duration::ZERO);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let elapsed = runtime.block_on(async {
        let target = ExportTarget::Otlp(OtlpSettings {
            protocol: Protocol::Grpc,
            traces_endpoint: format!("http://127.0.0.1:{port}"),
            metrics_endpoint: format!("http://127.0.0.1:{port}"),
            headers: vec![],
            compression: if std::env::var_os("EXPORT_BENCH_GZIP").is_some() {
                Compression::Gzip
            } else {
                Compression::None
            },
            timeout: Duration::from_secs(10),
        });
        let mut exporter = Exporter::new(
            Transport::new(&target).expect("transport"),
            Arc::clone(&queue),
            Arc::new(Mutex::new(Metrics::new(0))),
            Arc::new(ExportCounters::default()),
            batch,
            Duration::from_millis(100),
            Duration::from_secs(30),
            Duration::from_secs(3600),
        );
        exporter.max_in_flight = in_flight;
        let start = Instant::now();
        cpu_start = (cpu_time("self"), cpu_time(&collector_pid));
        let report = exporter
            .flush(Instant::now() + Duration::from_secs(120))
            .await;
        assert_eq!(report.left_in_queue + report.failed, 0, "{report:?}");
        start.elapsed()
    });
    let agent_cpu = cpu_time("self").saturating_sub(cpu_start.0);
    let collector_cpu = cpu_time(&collector_pid).saturating_sub(cpu_start.1);
    let _ = collector.kill();
    let _ = collector.wait();
    let exported = engine.stats.snapshot().spans_exported;
    assert_eq!(exported as usize, spans);
    println!(
        "export over OTLP/gRPC into rotel (blackhole), batches of {batch} spans, {in_flight} in flight: {exported} spans in {:.3} s = {:.0} spans/s",
        elapsed.as_secs_f64(),
        exported as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  CPU: exporter {:.2} s ({:.0} k spans per CPU second), rotel {:.2} s; machine: {} cores",
        agent_cpu.as_secs_f64(),
        exported as f64 / agent_cpu.as_secs_f64().max(1e-3) / 1e3,
        collector_cpu.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
}
