//! The hot path, head to head: what the engine pays per request to record
//! it, with ringside (stamp + copy into the shared-memory ring + commit)
//! against the in-process alternative that vLLM, TGI and Triton use — an
//! OpenTelemetry span through the Rust SDK (`opentelemetry_sdk` 0.33):
//! start with a remote parent (the caller's traceparent), the same 27
//! attributes the agent puts on a request span (`--attributes both`), end,
//! into the default `BatchSpanProcessor` whose exporter is
//! `opentelemetry-otlp` over gRPC (tonic) to a real rotel collector.
//!
//! Both in one run, in interleaved rounds (timer baseline, ringside, OTel,
//! the order rotating per round), single-threaded and with 2 producer
//! threads. Every call is timed into an HDR histogram; calls are paced at a
//! fixed rate per thread (`HOT_PATH_RATE`, default 20 000/s, far above any
//! real engine's request rate) so that the span exporter keeps up, as it
//! would in an engine, instead of measuring the SDK's queue-full drop path.
//!
//! Besides latency: allocations per call made by the calling thread, all
//! allocations in the process per call (the exporter thread's included), and
//! CPU time the process spent outside the calling threads per call (the
//! exporter thread encoding and sending; zero for ringside, whose export
//! happens in another process).
//!
//! The OTel side is one span per request; the agent turns a ringside record
//! into up to four (request + queue/prefill/decode), so the comparison
//! favours OTel.
//!
//! `cargo bench -p ringside-perf --bench hot_path`; `HOT_PATH_ROUNDS`
//! (default 6), `HOT_PATH_CALLS` (per subject, thread and round; default
//! 20 000), `HOT_PATH_RATE` (calls/s per thread; 0 = flat out).

#![forbid(unsafe_code)]

use hdrhistogram::Histogram;
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use ringside_perf::alloc::{Counting, process_counts, thread_counts};
use ringside_perf::{Report, Rotel, env_usize, fmt_summary, machine_line};
use ringside_shm_protocol::{CreateOptions, EngineSegment, Producer, monotonic_ns};
use rustix::time::{ClockId, clock_gettime};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What is measured in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    /// `Instant::now()` twice around nothing: the timer's own cost.
    Timer,
    /// One ring push as the engine does it.
    Ringside,
    /// One OpenTelemetry span with the request's attributes.
    Otel,
}

/// One thread's pass over `calls` calls.
struct Pass {
    latency: Histogram<u64>,
    thread_allocs: u64,
    thread_bytes: u64,
    thread_cpu: Duration,
}

fn histogram() -> Histogram<u64> {
    // Fixed bounds (1 ns – 10 s): recording never allocates.
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds")
}

/// CPU time (user and system) of the calling thread or the whole process.
fn cpu_time(clock: ClockId) -> Duration {
    let t = clock_gettime(clock);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// The request span's attributes as an in-process engine would set them:
/// `--attributes both` of the agent (GenAI semconv v1.41 + vLLM's set), with
/// per-request strings (ids) formatted per call as an engine must.
fn attributes(seq: u64) -> Vec<KeyValue> {
    let id = format!("cmpl-{seq:032x}");
    vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("gen_ai.provider.name", "ringside"),
        KeyValue::new("gen_ai.request.model", "gemma-3-270m"),
        KeyValue::new("gen_ai.request.max_tokens", 256i64),
        KeyValue::new("gen_ai.request.temperature", 0.7f64),
        KeyValue::new("gen_ai.request.top_p", 0.95f64),
        KeyValue::new("gen_ai.request.top_k", 40i64),
        KeyValue::new("gen_ai.request.seed", 1234i64),
        KeyValue::new("gen_ai.request.frequency_penalty", 0.0f64),
        KeyValue::new("gen_ai.request.presence_penalty", 0.0f64),
        KeyValue::new("gen_ai.response.id", id.clone()),
        KeyValue::new("gen_ai.response.model", "gemma-3-270m"),
        KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(vec![StringValue::from("stop")])),
        ),
        KeyValue::new("gen_ai.usage.input_tokens", 100i64),
        KeyValue::new("gen_ai.usage.output_tokens", 50i64),
        KeyValue::new("gen_ai.usage.cache_read.input_tokens", 0i64),
        KeyValue::new("server.address", "127.0.0.1"),
        KeyValue::new("server.port", 8000i64),
        KeyValue::new("gen_ai.request.id", id),
        KeyValue::new("gen_ai.usage.prompt_tokens", 100i64),
        KeyValue::new("gen_ai.usage.completion_tokens", 50i64),
        KeyValue::new("gen_ai.latency.e2e", 1.25f64),
        KeyValue::new("gen_ai.latency.time_to_first_token", 0.05f64),
        KeyValue::new("gen_ai.latency.time_in_queue", 0.001f64),
        KeyValue::new("gen_ai.latency.time_in_model_prefill", 0.049f64),
        KeyValue::new("gen_ai.latency.time_in_model_decode", 1.2f64),
        KeyValue::new("gen_ai.latency.time_in_model_inference", 1.249f64),
    ]
}

/// One OTel span for request `seq`: remote parent from the traceparent,
/// start, attributes, end.
fn otel_call(tracer: &opentelemetry_sdk::trace::SdkTracer, seq: u64) {
    let parent = SpanContext::new(
        TraceId::from(u128::from(seq) | (1 << 100)),
        SpanId::from(seq | 1),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let cx = Context::new().with_remote_span_context(parent);
    let now = SystemTime::now();
    let span = tracer.build_with_context(
        SpanBuilder::from_name("chat gemma-3-270m")
            .with_kind(SpanKind::Server)
            .with_start_time(now)
            .with_attributes(attributes(seq)),
        &cx,
    );
    let cx = cx.with_span(span);
    cx.span().end_with_timestamp(now);
}

/// One push as the engine does it: the request's id and finish stamp into
/// its record, copy into the ring, commit.
fn ringside_call(producer: &Producer, record: &mut ringside_shm_protocol::Record, seq: u64) {
    if producer.tracing_enabled() {
        record.request_id = u128::from(seq).to_be_bytes();
        record.t_finished_ns = monotonic_ns();
        let _ = black_box(producer.push(black_box(record)));
    }
}

struct Subjects<'a> {
    producer: &'a EngineSegment,
    tracer: &'a opentelemetry_sdk::trace::SdkTracer,
}

/// `calls` calls of `subject` on this thread, one every `gap` (or flat out).
/// Setup happens before the `start` barrier and teardown after the `done`
/// one, so that the process-wide figures the main thread takes between the
/// two barriers hold only the calls and what runs beside them.
fn pass(
    subjects: &Subjects<'_>,
    subject: Subject,
    calls: usize,
    gap: Duration,
    seq0: u64,
    barriers: (&Barrier, &Barrier),
    phase: (u32, u32),
) -> Pass {
    let producer = subjects.producer.ring().producer();
    let mut record = ringside_perf::engine_like_record(seq0);
    let mut latency = histogram();
    barriers.0.wait();
    let allocs0 = thread_counts();
    let cpu0 = cpu_time(ClockId::ThreadCPUTime);
    let start = Instant::now();
    // Threads are phase-shifted by a fraction of the gap: requests do not
    // finish in lockstep, and calls at the very same instant on every
    // thread would measure a collision that paced lockstep manufactures.
    let mut next = start + gap * phase.0 / phase.1;
    for i in 0..calls {
        if !gap.is_zero() {
            next += gap;
            while Instant::now() < next {
                std::hint::spin_loop();
            }
        }
        let seq = seq0 + i as u64;
        let t0 = Instant::now();
        match subject {
            Subject::Timer => {
                black_box(seq);
            }
            Subject::Ringside => ringside_call(&producer, &mut record, seq),
            Subject::Otel => otel_call(subjects.tracer, seq),
        }
        let ns = t0.elapsed().as_nanos() as u64;
        latency.saturating_record(ns.max(1));
    }
    let cpu = cpu_time(ClockId::ThreadCPUTime).saturating_sub(cpu0);
    let allocs = thread_counts().since(allocs0);
    barriers.1.wait();
    Pass {
        latency,
        thread_allocs: allocs.allocs,
        thread_bytes: allocs.bytes,
        thread_cpu: cpu,
    }
}

/// One subject's figures from one round.
#[derive(Default, Clone)]
struct Figures {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    thread_allocs: f64,
    thread_bytes: f64,
    process_allocs: f64,
    background_cpu_ns: f64,
}

/// Runs `subject` on `threads` threads at once and merges their passes.
fn run(
    subjects: &Subjects<'_>,
    provider: &SdkTracerProvider,
    subject: Subject,
    threads: usize,
    calls: usize,
    gap: Duration,
    seq0: u64,
) -> Figures {
    // The main thread takes part in both barriers: it reads the process's
    // counters after the threads are set up and before they exit.
    let (start, done) = (Barrier::new(threads + 1), Barrier::new(threads + 1));
    let (passes, process_cpu, process_allocs) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barriers = (&start, &done);
                s.spawn(move || {
                    pass(
                        subjects,
                        subject,
                        calls,
                        gap,
                        seq0 + (t as u64) * (calls as u64),
                        barriers,
                        (t as u32, threads as u32),
                    )
                })
            })
            .collect();
        start.wait();
        let process_allocs0 = process_counts();
        let process_cpu0 = cpu_time(ClockId::ProcessCPUTime);
        done.wait();
        if subject == Subject::Otel {
            // What is still queued is exported now, so that its cost is
            // charged to this pass and not to the next subject's.
            provider.force_flush().expect("flush the span processor");
        }
        let process_cpu = cpu_time(ClockId::ProcessCPUTime).saturating_sub(process_cpu0);
        let process_allocs = process_counts().since(process_allocs0);
        let passes: Vec<Pass> = handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect();
        (passes, process_cpu, process_allocs)
    });
    let mut latency = histogram();
    let (mut ta, mut tb, mut tcpu) = (0u64, 0u64, Duration::ZERO);
    for p in &passes {
        latency.add(&p.latency).expect("same bounds");
        ta += p.thread_allocs;
        tb += p.thread_bytes;
        tcpu += p.thread_cpu;
    }
    let total = (threads * calls) as f64;
    Figures {
        p50: latency.value_at_quantile(0.5) as f64,
        p99: latency.value_at_quantile(0.99) as f64,
        p999: latency.value_at_quantile(0.999) as f64,
        max: latency.max() as f64,
        thread_allocs: ta as f64 / total,
        thread_bytes: tb as f64 / total,
        process_allocs: process_allocs.allocs as f64 / total,
        background_cpu_ns: process_cpu.saturating_sub(tcpu).as_nanos() as f64 / total,
    }
}

fn main() {
    let rounds = env_usize("HOT_PATH_ROUNDS", 6).max(1);
    let calls = env_usize("HOT_PATH_CALLS", 20_000).max(1);
    let rate = env_usize("HOT_PATH_RATE", 20_000);
    let gap = if rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(1_000_000_000 / rate as u64)
    };

    let rotel = match Rotel::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hot_path: {e}");
            std::process::exit(1);
        }
    };

    // The tonic client needs a Tokio runtime for its connection; the batch
    // processor runs its own export thread and blocks on the export future.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let provider = runtime.block_on(async {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://127.0.0.1:{}", rotel.grpc_port))
            .build()
            .expect("OTLP gRPC span exporter");
        // The SDK's defaults (queue 2048, batches of 512, 5 s delay): what
        // an engine gets unless it tunes them.
        SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .build()
    });
    let tracer = provider.tracer("ringside-perf");

    // A real segment in /dev/shm, as the engine has: the engine's default
    // ring size and overflow mode (overwrite), no reader attached.
    let mut options = CreateOptions::new(
        format!("perf-hot-{}", std::process::id()),
        vec!["gemma-3-270m".into()],
    );
    options.capacity = 16384;
    let segment = EngineSegment::create(&options).expect("create the bench segment");
    let subjects = Subjects {
        producer: &segment,
        tracer: &tracer,
    };

    // Warm up both paths (connection to rotel, page faults in the ring).
    for subject in [Subject::Ringside, Subject::Otel] {
        run(&subjects, &provider, subject, 1, 20_000, Duration::ZERO, 0);
    }

    let mut report = Report::new(
        "hot_path",
        "Hot path: ringside push vs an in-process OpenTelemetry span",
    );
    report.line(&format!(
        "`--bench hot_path`: {rounds} rounds × {calls} calls per subject and thread, paced at {} per thread; subjects interleaved, order rotating per round; with 2 threads their calls are offset by half the gap. \
         OTel: `opentelemetry_sdk` 0.33 span (remote parent, 27 attributes, end) → default `BatchSpanProcessor` → `opentelemetry-otlp` gRPC → rotel `--exporter blackhole` on loopback. \
         ringside: stamp + copy of the 256-byte record into a 16384-slot ring in /dev/shm + commit.\n",
        if rate == 0 { "flat out".to_owned() } else { format!("{rate} calls/s") }
    ));

    let mut seq = 1u64 << 32;
    for threads in [1usize, 2] {
        let mut figs: [Vec<Figures>; 3] = Default::default();
        for round in 0..rounds {
            let mut order = [Subject::Timer, Subject::Ringside, Subject::Otel];
            order.rotate_left(round % 3);
            for subject in order {
                let f = run(&subjects, &provider, subject, threads, calls, gap, seq);
                seq += (threads * calls) as u64;
                figs[subject as usize].push(f);
            }
        }
        let col = |s: Subject, f: fn(&Figures) -> f64| -> Vec<f64> {
            figs[s as usize].iter().map(f).collect()
        };
        let ratio = |f: fn(&Figures) -> f64, net: bool| -> Vec<f64> {
            (0..rounds)
                .map(|r| {
                    let timer = if net { f(&figs[0][r]) } else { 0.0 };
                    let o = f(&figs[Subject::Otel as usize][r]) - timer;
                    let g = f(&figs[Subject::Ringside as usize][r]) - timer;
                    o / g.max(1.0)
                })
                .collect()
        };
        report.line(&format!(
            "**{threads} producer thread{}** (ns per call as timed; median (min–max) over {rounds} rounds)\n",
            if threads == 1 { "" } else { "s" }
        ));
        let rows = [Subject::Timer, Subject::Ringside, Subject::Otel]
            .iter()
            .map(|&s| {
                vec![
                    match s {
                        Subject::Timer => "timer around nothing".to_owned(),
                        Subject::Ringside => "**ringside** push".to_owned(),
                        Subject::Otel => "**OpenTelemetry** span".to_owned(),
                    },
                    fmt_summary(&col(s, |f| f.p50), 0),
                    fmt_summary(&col(s, |f| f.p99), 0),
                    fmt_summary(&col(s, |f| f.p999), 0),
                    fmt_summary(&col(s, |f| f.max), 0),
                    fmt_summary(&col(s, |f| f.thread_allocs), 2),
                    fmt_summary(&col(s, |f| f.thread_bytes), 0),
                    fmt_summary(&col(s, |f| f.process_allocs), 2),
                    fmt_summary(&col(s, |f| f.background_cpu_ns), 0),
                ]
            })
            .collect::<Vec<_>>();
        report.table(
            &[
                "subject",
                "p50 ns",
                "p99 ns",
                "p99.9 ns",
                "max ns",
                "allocs/call (caller)",
                "bytes/call (caller)",
                "allocs/call (process)",
                "background CPU ns/call",
            ],
            &rows,
        );
        report.table(
            &[
                "OTel ÷ ringside (same round)",
                "p50",
                "p99.9",
                "p50 net of timer",
                "p99.9 net of timer",
            ],
            &[vec![
                format!("{threads} thread(s)"),
                format!("{}×", fmt_summary(&ratio(|f| f.p50, false), 1)),
                format!("{}×", fmt_summary(&ratio(|f| f.p999, false), 1)),
                format!("{}×", fmt_summary(&ratio(|f| f.p50, true), 1)),
                format!("{}×", fmt_summary(&ratio(|f| f.p999, true), 1)),
            ]],
        );
    }
    report.line(
        "Target (issue 7): ringside ≥ 10× cheaper at the median and at p99.9. \
         \"Background CPU\" is the process's CPU time outside the calling threads (the SDK's export thread \
         and the tonic runtime), per call: work an in-process tracer puts on the engine's cores; ringside's \
         export runs in the agent's process instead (see the agent section for its cost).",
    );
    report.line(&format!(
        "\nRun finished; machine at the end: {}.\n",
        machine_line()
    ));
    let _ = provider.shutdown();
    drop(runtime);
    drop(rotel);
    report.finish();
}
