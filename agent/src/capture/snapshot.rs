//! `ringside-agent snapshot`: every record the selected engines' rings still
//! hold from the last `--since`, exported once at full detail whatever the
//! sampling, each span marked `ringside.capture.reason=manual`.
//!
//! It reads with a consumer of its own and never commits a cursor, so a
//! running daemon is not disturbed. It cannot know what a daemon exported:
//! a request the daemon exported too arrives twice, with the same trace and
//! span ids, the copy told apart by `ringside.capture.reason`.

use super::window::{Window, WindowReader};
use super::{CaptureReason, capture_handle};
use crate::control::control_block::{self, ControlError, EngineSelection};
use crate::export::{Attempt, ExportQueue, ExportSetupError, ExportTarget, Exporter, Transport};
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::metrics::{ExportCounters, Metrics, unix_now_ns};
use crate::pipeline::resource::{self, ResourceEnv};
use crate::pipeline::spans::{AttributeSet, SpanContext};
use ringside_shm_protocol::{AttachedSegment, PollError, monotonic_ns};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `snapshot` does.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Which engines.
    pub selection: EngineSelection,
    /// The window: records that ended this long ago or later.
    pub since: Duration,
    /// Where the spans go.
    pub target: ExportTarget,
}

/// Why `snapshot` failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Engines could not be found or opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The exporter could not be set up.
    #[error("exporter: {0}")]
    Export(#[from] ExportSetupError),
    /// A ring could not be read.
    #[error("reading the ring of {engine}: {source}")]
    Ring {
        /// The engine.
        engine: String,
        /// The error.
        source: PollError,
    },
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Some requests could not be exported.
    #[error("{failed} of {total} captured requests could not be exported (see the log)")]
    NotDelivered {
        /// Not exported.
        failed: u64,
        /// Captured.
        total: u64,
    },
}

/// Requests handed to the exporter at once (a ring may hold 2^24).
const CHUNK: usize = 4096;
/// Spans per export request.
const BATCH_SPANS: usize = 512;
/// Retry budget of one batch.
const RETRY_MAX_ELAPSED: Duration = Duration::from_secs(30);
/// Longest the export of one chunk may take.
const CHUNK_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `snapshot`: prints one line per engine (requests captured, in the
/// window, invalid, lost) on stderr.
pub fn run(options: &SnapshotOptions) -> Result<(), SnapshotError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SnapshotError::Runtime)?;
    runtime.block_on(snapshot(options))
}

async fn snapshot(options: &SnapshotOptions) -> Result<(), SnapshotError> {
    let selection = &options.selection;
    let opened = control_block::open_engines(&selection.engines, &selection.trusted_uids)?;
    for e in &opened.skipped {
        eprintln!("ringside-agent: skipped {e}");
    }
    let transport = Transport::new(&options.target)?;
    let queue = Arc::new(ExportQueue::new(CHUNK, 1 << 30, BATCH_SPANS));
    let mut exporter = Exporter::new(
        transport,
        Arc::clone(&queue),
        Arc::new(Mutex::new(Metrics::new(unix_now_ns()))),
        Arc::new(ExportCounters::default()),
        BATCH_SPANS,
        Duration::ZERO,
        RETRY_MAX_ELAPSED,
        Duration::from_secs(3600),
    );
    exporter.export_metrics = false;
    exporter.max_in_flight = 4;
    let process_env = |name: &str| std::env::var(name).ok();
    let resource_env = ResourceEnv::from_env(&process_env, resource::host_name());
    // One "now" for every engine: the same window on all of them.
    let end_ns = monotonic_ns();
    let window = Window::before(end_ns, options.since);
    let (mut total, mut failed) = (0u64, 0u64);
    for (id, segment) in (0u64..).zip(&opened.engines) {
        let (captured, not_delivered) =
            capture_engine(id, segment, &resource_env, window, &queue, &mut exporter).await?;
        total += captured;
        failed += not_delivered;
    }
    if failed > 0 {
        return Err(SnapshotError::NotDelivered { failed, total });
    }
    Ok(())
}

/// Exports one engine's window; returns (captured, not delivered).
async fn capture_engine(
    id: u64,
    segment: &AttachedSegment,
    resource_env: &ResourceEnv,
    window: Window,
    queue: &ExportQueue,
    exporter: &mut Exporter,
) -> Result<(u64, u64), SnapshotError> {
    let info = segment.info();
    let engine = EngineHandle {
        id,
        instance: info.instance.clone(),
        pid: info.identity.pid,
        resource: resource_env.engine_resource(&info.instance, &info.identity),
        stats: EngineStats::default(),
    };
    let handle = capture_handle(&engine);
    let ctx = Arc::new(SpanContext {
        clock: info.clock,
        models: info.models.clone(),
        attributes: AttributeSet::default(),
        server_address: resource_env.host_name.clone(),
        server_port: info.listen_port,
    });
    let mut reader = WindowReader::new(segment, window, None);
    let mut not_delivered = 0;
    loop {
        let chunk = reader
            .next_chunk(CHUNK, |_| true)
            .map_err(|source| SnapshotError::Ring {
                engine: info.instance.clone(),
                source,
            })?;
        let Some(chunk) = chunk else { break };
        queue.push_all(
            chunk
                .into_iter()
                .map(|(_, record)| super::item(&handle, &ctx, record, CaptureReason::Manual)),
        );
        let flush = exporter.flush(Instant::now() + CHUNK_DEADLINE).await;
        not_delivered += flush.failed + flush.left_in_queue;
    }
    not_delivered += export_steps(segment, &engine, window, exporter).await?;
    let totals = reader.totals();
    let exported = handle.stats.exported.load(Ordering::Relaxed);
    eprintln!(
        "{}: {} requests in the window exported ({} spans), {} not exported; {} records read, {} invalid, {} lost while reading",
        info.instance,
        exported,
        handle.stats.spans_exported.load(Ordering::Relaxed),
        totals.kept - exported,
        totals.read,
        totals.invalid,
        totals.lost
    );
    Ok((totals.kept, not_delivered))
}

/// The engine's steps of the window (ABI 1.4), as one `ringside.capture`
/// trace; returns 1 when it could not be exported.
async fn export_steps(
    segment: &AttachedSegment,
    engine: &EngineHandle,
    window: Window,
    exporter: &Exporter,
) -> Result<u64, SnapshotError> {
    let read = super::steps::read_steps(segment, window).map_err(|source| SnapshotError::Ring {
        engine: engine.instance.clone(),
        source,
    })?;
    let Some(read) = read else {
        eprintln!(
            "{}: no step ring (an engine before ABI 1.4)",
            engine.instance
        );
        return Ok(0);
    };
    let request = super::steps::encode(
        &engine.resource,
        &segment.info().clock,
        CaptureReason::Manual,
        window,
        &read.steps,
    );
    let console_text = format!(
        "capture {} of engine {} (pid {}): {} steps, trace {}\n",
        CaptureReason::Manual,
        engine.instance,
        engine.pid,
        read.steps.len(),
        request.resource_spans[0].scope_spans[0].spans[0]
            .trace_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let body = bytes::Bytes::from(prost::Message::encode_to_vec(&request));
    match exporter.transport.send_traces(&body, &console_text).await {
        Attempt::Accepted { .. } => {
            eprintln!(
                "{}: {} steps in the window exported ({} invalid, {} lost while reading)",
                engine.instance,
                read.steps.len(),
                read.invalid,
                read.lost
            );
            Ok(0)
        }
        Attempt::Failed { error, .. } => {
            tracing::error!(engine = %engine.instance, %error, "capture: the steps could not be exported");
            Ok(1)
        }
    }
}
