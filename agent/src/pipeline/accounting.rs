//! Exact accounting per engine: every ticket the agent moves past ends in one
//! counter, so `read + lost_overwritten + lost_abandoned` covers the ring and
//! `read + crashed_in_flight = invalid + sampled_out + queue_dropped +
//! exported + export_failed + pending`, where `crashed_in_flight` counts the
//! requests a dead engine's in-flight table still held (each handed on as one
//! `engine_crashed` record).

use opentelemetry_proto::tonic::resource::v1::Resource;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one attached engine. Updated by the reader and the exporter.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Tickets below the cursor the agent started at (not covered).
    pub skipped_at_attach: AtomicU64,
    /// Records delivered by the ring.
    pub read: AtomicU64,
    /// Records that failed validation (skipped).
    pub invalid: AtomicU64,
    /// Records the head or tail sampler left out (metrics still count them).
    pub sampled_out: AtomicU64,
    /// Records overwritten before they were read.
    pub lost_overwritten: AtomicU64,
    /// Tickets never committed by their producer.
    pub lost_abandoned: AtomicU64,
    /// Records dropped from the export queue (oldest first) when it was full.
    pub queue_dropped: AtomicU64,
    /// Records whose spans the collector accepted.
    pub exported: AtomicU64,
    /// Records whose export failed permanently or ran out of retries.
    pub export_failed: AtomicU64,
    /// Spans accepted by the collector.
    pub spans_exported: AtomicU64,
    /// Records written by the engine but not yet read (a gauge).
    pub lag: AtomicU64,
    /// The engine's ring head at the last poll: tickets it issued.
    pub engine_written: AtomicU64,
    /// Records the engine dropped before taking a ticket (discard mode).
    pub engine_dropped: AtomicU64,
    /// Requests found in the engine's in-flight table after it died, handed
    /// on as `engine_crashed` records.
    pub crashed_in_flight: AtomicU64,
    /// Requests of this engine stalled at the last look at its table (a gauge).
    pub stalled: AtomicU64,
    /// Step records read from the engine's step ring (ABI 1.4).
    pub steps_read: AtomicU64,
    /// Step records overwritten or abandoned before they were read.
    pub steps_lost: AtomicU64,
    /// Step records that failed validation (skipped).
    pub steps_invalid: AtomicU64,
    /// Requests with two or more tokens whose steps were not all in the
    /// window: exported without inter-token statistics.
    pub steps_unjoined: AtomicU64,
}

impl EngineStats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            skipped_at_attach: l(&self.skipped_at_attach),
            read: l(&self.read),
            invalid: l(&self.invalid),
            sampled_out: l(&self.sampled_out),
            lost_overwritten: l(&self.lost_overwritten),
            lost_abandoned: l(&self.lost_abandoned),
            queue_dropped: l(&self.queue_dropped),
            exported: l(&self.exported),
            export_failed: l(&self.export_failed),
            spans_exported: l(&self.spans_exported),
            crashed_in_flight: l(&self.crashed_in_flight),
        }
    }
}

/// A copy of [`EngineStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// See [`EngineStats::skipped_at_attach`].
    pub skipped_at_attach: u64,
    /// See [`EngineStats::read`].
    pub read: u64,
    /// See [`EngineStats::invalid`].
    pub invalid: u64,
    /// See [`EngineStats::sampled_out`].
    pub sampled_out: u64,
    /// See [`EngineStats::lost_overwritten`].
    pub lost_overwritten: u64,
    /// See [`EngineStats::lost_abandoned`].
    pub lost_abandoned: u64,
    /// See [`EngineStats::queue_dropped`].
    pub queue_dropped: u64,
    /// See [`EngineStats::exported`].
    pub exported: u64,
    /// See [`EngineStats::export_failed`].
    pub export_failed: u64,
    /// See [`EngineStats::spans_exported`].
    pub spans_exported: u64,
    /// See [`EngineStats::crashed_in_flight`].
    #[serde(default)]
    pub crashed_in_flight: u64,
}

impl StatsSnapshot {
    /// Records read but not yet exported, dropped or failed: still queued or
    /// in flight.
    pub fn pending(&self) -> u64 {
        (self.read + self.crashed_in_flight).saturating_sub(
            self.invalid
                + self.sampled_out
                + self.queue_dropped
                + self.exported
                + self.export_failed,
        )
    }
    /// Records lost for any reason.
    pub fn lost(&self) -> u64 {
        self.lost_overwritten
            + self.lost_abandoned
            + self.invalid
            + self.queue_dropped
            + self.export_failed
    }
}

/// One attached engine as the exporter sees it.
#[derive(Debug)]
pub struct EngineHandle {
    /// Unique per attachment (a restarted engine gets a new one).
    pub id: u64,
    /// Instance name.
    pub instance: String,
    /// Engine pid.
    pub pid: u32,
    /// The OTLP resource of its spans and metrics.
    pub resource: Resource,
    /// Its counters.
    pub stats: EngineStats,
}
