//! The export task: takes batches off the queue (full ones at once, a
//! partial one after the batch delay), keeps up to `--max-in-flight` of them
//! in flight, exports the metrics every interval, applies reloaded settings
//! between batches, and at shutdown flushes within the deadline.

use super::batch::BatchSender;
use super::queue::{ExportQueue, Item, StepPart};
use super::retry::Jitter;
use super::transport::{Attempt, Transport};
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::metrics::{ExportCounters, Metrics};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the exporter task needs.
#[derive(Debug)]
pub struct Exporter {
    /// The transport (shared with the batches in flight on it).
    pub transport: Arc<Transport>,
    /// The queue it drains.
    pub queue: Arc<ExportQueue>,
    /// Metric state to export.
    pub metrics: Arc<Mutex<Metrics>>,
    /// Export failure / retry counters.
    pub counters: Arc<ExportCounters>,
    /// Spans per batch.
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub batch_delay: Duration,
    /// Retry budget per batch.
    pub retry_max_elapsed: Duration,
    /// Metrics interval.
    pub metrics_interval: Duration,
    /// Whether metrics are pushed at all (`--metrics-exporter none`: a
    /// backend that takes traces only); `/metrics` is served either way.
    pub export_metrics: bool,
    /// How long a batch in flight at shutdown may still be retried.
    pub shutdown_timeout: Duration,
    /// Export requests in flight at once over OTLP (the console and the file
    /// write one batch at a time, in order). One request at a time caps
    /// throughput at one batch per round trip to the collector.
    pub max_in_flight: usize,
    in_flight: tokio::task::JoinSet<u64>,
    /// What each export request in flight carries, to count it failed if it
    /// is cut off at the shutdown deadline.
    in_flight_engines: HashMap<tokio::task::Id, InFlight>,
    /// Requests of batches that failed after the stop signal but ended
    /// before [`flush`](Self::flush) began: part of its report.
    failed_after_stop: u64,
    jitter: Jitter,
}

/// What one export request in flight carries.
#[derive(Debug)]
enum InFlight {
    /// A batch: the engine of each of its requests.
    Requests(Vec<Arc<EngineHandle>>),
    /// A part of a capture's steps: its engine and its steps.
    Steps(Arc<EngineHandle>, u64),
}

/// New export settings from a configuration reload (SIGHUP), applied
/// between batches: a batch in flight finishes on the old transport, and
/// nothing queued is dropped.
#[derive(Debug)]
pub struct ExporterUpdate {
    /// The new transport.
    pub transport: Transport,
    /// Spans per batch.
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub batch_delay: Duration,
    /// Retry budget per batch.
    pub retry_max_elapsed: Duration,
    /// Metrics interval.
    pub metrics_interval: Duration,
    /// Whether metrics are pushed at all.
    pub export_metrics: bool,
    /// Export requests in flight at once.
    pub max_in_flight: usize,
}

/// What the shutdown flush could not deliver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Requests still queued when the flush deadline passed.
    pub left_in_queue: u64,
    /// Requests whose export failed during the flush.
    pub failed: u64,
}

impl Exporter {
    /// An exporter over `transport`, one request in flight at a time until
    /// [`max_in_flight`](Self::max_in_flight) is raised.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transport: Transport,
        queue: Arc<ExportQueue>,
        metrics: Arc<Mutex<Metrics>>,
        counters: Arc<ExportCounters>,
        batch_size: usize,
        batch_delay: Duration,
        retry_max_elapsed: Duration,
        metrics_interval: Duration,
    ) -> Self {
        Self {
            transport: Arc::new(transport),
            queue,
            metrics,
            counters,
            batch_size,
            batch_delay,
            retry_max_elapsed,
            metrics_interval,
            export_metrics: true,
            shutdown_timeout: Duration::from_secs(5),
            max_in_flight: 1,
            in_flight: tokio::task::JoinSet::new(),
            in_flight_engines: HashMap::new(),
            failed_after_stop: 0,
            jitter: Jitter::new(),
        }
    }

    /// Exports until `stop` turns true; then returns (the caller flushes).
    pub async fn run(&mut self, stop: tokio::sync::watch::Receiver<bool>) {
        let (_keep, updates) = tokio::sync::mpsc::channel(1);
        self.run_with_updates(stop, updates).await;
    }

    fn apply(&mut self, update: ExporterUpdate) {
        // Batches in flight finish on the transport they started on.
        self.transport = Arc::new(update.transport);
        self.batch_size = update.batch_size;
        self.batch_delay = update.batch_delay;
        self.retry_max_elapsed = update.retry_max_elapsed;
        self.metrics_interval = update.metrics_interval;
        self.export_metrics = update.export_metrics;
        self.max_in_flight = update.max_in_flight;
    }

    /// Batches allowed in flight on the current transport.
    fn in_flight_limit(&self) -> usize {
        match *self.transport {
            Transport::Grpc(_) | Transport::Http(_) => self.max_in_flight.max(1),
            Transport::Console | Transport::File(_) => 1,
        }
    }

    /// [`run`](Self::run), taking new settings from `updates` between
    /// batches. Batches still in flight when `stop` turns true are left to
    /// [`flush`](Self::flush).
    pub async fn run_with_updates(
        &mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        mut updates: tokio::sync::mpsc::Receiver<ExporterUpdate>,
    ) {
        let mut next_metrics = Instant::now() + self.metrics_interval;
        // A partial batch goes once the batch delay has passed since the
        // last one (or since the queue was last found empty).
        let mut last_partial = Instant::now();
        let queue = Arc::clone(&self.queue);
        let mut updates_open = true;
        loop {
            if *stop.borrow() {
                return;
            }
            let wait = (last_partial + self.batch_delay)
                .min(next_metrics)
                .saturating_duration_since(Instant::now());
            tokio::select! {
                () = queue.ready.notified() => {}
                () = tokio::time::sleep(wait) => {}
                Some(joined) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    let failed = self.settle(joined);
                    // The stop and this batch's end can wake the loop together.
                    if *stop.borrow() {
                        self.failed_after_stop += failed;
                    }
                }
                _ = stop.changed() => return,
                update = updates.recv(), if updates_open => match update {
                    Some(update) => {
                        self.apply(update);
                        next_metrics = next_metrics.min(Instant::now() + self.metrics_interval);
                        tracing::info!(batch_size = self.batch_size, max_in_flight = self.max_in_flight, queued = queue.len(), "exporter reconfigured; queued spans kept");
                        continue;
                    }
                    None => updates_open = false,
                },
            }
            // A capture's steps at once (captures are rare; each part is
            // one request); then full batches as soon as they are full,
            // while there is room in flight; a partial one once the batch
            // delay has passed.
            while self.in_flight.len() < self.in_flight_limit() {
                let Some(part) = queue.take_steps() else {
                    break;
                };
                self.start_steps(part, None, Some(stop.clone()));
            }
            while self.in_flight.len() < self.in_flight_limit() {
                let full = queue.spans() >= self.batch_size;
                if !full && Instant::now() < last_partial + self.batch_delay {
                    break;
                }
                let batch = queue.take(self.batch_size);
                if batch.is_empty() {
                    last_partial = Instant::now();
                    break;
                }
                self.start(batch, None, Some(stop.clone()));
                if !full {
                    last_partial = Instant::now();
                    break;
                }
            }
            if Instant::now() >= next_metrics {
                self.export_metrics(None).await;
                next_metrics = Instant::now() + self.metrics_interval;
            }
        }
    }

    fn sender(&mut self) -> BatchSender {
        let sender = BatchSender {
            transport: Arc::clone(&self.transport),
            counters: Arc::clone(&self.counters),
            retry_max_elapsed: self.retry_max_elapsed,
            shutdown_timeout: self.shutdown_timeout,
            jitter: self.jitter.clone(),
        };
        // Each batch its own jitter sequence.
        self.jitter.sample();
        sender
    }

    /// Starts sending one batch in its own task.
    fn start(
        &mut self,
        items: Vec<Item>,
        deadline: Option<Instant>,
        stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) {
        let engines = items.iter().map(|i| Arc::clone(&i.engine)).collect();
        let sender = self.sender();
        let task = self.in_flight.spawn(sender.send(items, deadline, stop));
        self.in_flight_engines
            .insert(task.id(), InFlight::Requests(engines));
    }

    /// Starts sending one part of a capture's steps in its own task.
    fn start_steps(
        &mut self,
        part: StepPart,
        deadline: Option<Instant>,
        stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) {
        let carried = InFlight::Steps(Arc::clone(&part.engine), part.steps.len() as u64);
        let sender = self.sender();
        let task = self.in_flight.spawn(async move {
            sender.send_steps(part, deadline, stop).await;
            0
        });
        self.in_flight_engines.insert(task.id(), carried);
    }

    /// Accounts for a finished batch task; returns its requests that failed.
    fn settle(&mut self, joined: Result<(tokio::task::Id, u64), tokio::task::JoinError>) -> u64 {
        match joined {
            Ok((id, failed)) => {
                self.in_flight_engines.remove(&id);
                failed
            }
            Err(e) => {
                // Cut off at the shutdown deadline (or a bug): what it
                // carried was neither exported nor counted yet.
                let carried = self.in_flight_engines.remove(&e.id());
                if e.is_panic() {
                    tracing::error!(
                        ?carried,
                        "an export task panicked; what it carried is counted failed"
                    );
                }
                match carried {
                    Some(InFlight::Requests(engines)) => {
                        for engine in &engines {
                            EngineStats::add(&engine.stats.export_failed, 1);
                        }
                        engines.len() as u64
                    }
                    Some(InFlight::Steps(engine, steps)) => {
                        EngineStats::add(&engine.stats.capture_steps_failed, steps);
                        0
                    }
                    None => 0,
                }
            }
        }
    }

    /// Sends what is queued and waits for the batches in flight, until the
    /// queue is empty or `deadline` passes (batches still in flight then are
    /// cut off); then sends the metrics once more. Returns what was not
    /// delivered.
    pub async fn flush(&mut self, deadline: Instant) -> FlushReport {
        let mut report = FlushReport {
            failed: std::mem::take(&mut self.failed_after_stop),
            ..FlushReport::default()
        };
        loop {
            while self.in_flight.len() < self.in_flight_limit() && Instant::now() < deadline {
                if let Some(part) = self.queue.take_steps() {
                    self.start_steps(part, Some(deadline), None);
                    continue;
                }
                let batch = self.queue.take(self.batch_size);
                if batch.is_empty() {
                    break;
                }
                self.start(batch, Some(deadline), None);
            }
            if self.in_flight.is_empty() {
                break;
            }
            let next =
                tokio::time::timeout_at(deadline.into(), self.in_flight.join_next_with_id()).await;
            match next {
                Ok(Some(joined)) => report.failed += self.settle(joined),
                Ok(None) => break,
                Err(_) => {
                    self.in_flight.abort_all();
                    while let Some(joined) = self.in_flight.join_next_with_id().await {
                        report.failed += self.settle(joined);
                    }
                    break;
                }
            }
        }
        let left = self.queue.take(usize::MAX);
        report.left_in_queue = left.len() as u64;
        for item in &left {
            EngineStats::add(&item.engine.stats.export_failed, 1);
        }
        let mut steps_left = 0;
        while let Some(part) = self.queue.take_steps() {
            let n = part.steps.len() as u64;
            EngineStats::add(&part.engine.stats.capture_steps_failed, n);
            steps_left += n;
        }
        if steps_left > 0 {
            tracing::warn!(
                steps = steps_left,
                "flush: captured steps still queued at the deadline are counted failed"
            );
        }
        if Instant::now() < deadline {
            self.export_metrics(Some(deadline)).await;
        }
        report
    }

    async fn export_metrics(&mut self, deadline: Option<Instant>) {
        if !self.export_metrics || self.transport.is_console() {
            return;
        }
        let request = {
            let metrics = self
                .metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            metrics.to_request(
                crate::pipeline::metrics::unix_now_ns(),
                self.queue.len() as u64,
                &self.counters,
            )
        };
        if request.resource_metrics.is_empty() {
            return;
        }
        let attempt = match deadline {
            Some(d) => {
                match tokio::time::timeout(
                    d.saturating_duration_since(Instant::now()),
                    self.transport.send_metrics(&request),
                )
                .await
                {
                    Ok(a) => a,
                    Err(_) => return,
                }
            }
            None => self.transport.send_metrics(&request).await,
        };
        if let Attempt::Failed { error, .. } = attempt {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "metrics export failed (the next interval sends cumulative values again)");
        }
    }
}
