//! Finding engines and reading their rings.
//!
//! A reader thread scans `/dev/shm` about once a second. It attaches to new
//! segments; notices restarted engines (the name now refers to another file,
//! i.e. a new generation / pid / start time) and dead ones (liveness), drains
//! what they left and detaches. Between scans it polls every attached ring,
//! validates each record (`Record::decode`), feeds the metrics, applies the
//! head and tail samplers and hands the kept records to the export queue
//! (they become spans only when their batch is encoded). The cursor
//! committed to the segment moves only past records that are settled:
//! exported, sampled out, invalid or counted lost (queue overflow, export
//! failure, shutdown deadline); each poll's queued records are tracked as
//! one poll batch ([`PollBatches`]). So the successor of a killed agent
//! re-reads and exports what it had read but not delivered (see "Delivery
//! guarantee" in the README).
//!
//! It takes its settings as a plain [`ReaderSettings`] value.
//!
//! Where a new consumer starts:
//! * a stored cursor, or a segment an agent attached to before: that cursor
//!   (no duplicates; a gap is counted as overwritten);
//! * otherwise, with `--backfill` or for an engine that appeared while the
//!   agent runs: the oldest record the ring holds;
//! * otherwise: the newest (only requests from now on).

use crate::capture::daemon::EngineCapture;
use crate::capture::{CaptureReason, CaptureSettings};
use crate::export::queue::{ExportQueue, Item, PollBatches};
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::crash::crash_record;
use crate::pipeline::metrics::Metrics;
use crate::pipeline::resource::ResourceEnv;
use crate::pipeline::sampling::{Sampler, SpanSampling, TailSampler, Threshold, randomness};
use crate::pipeline::spans::hex;
use crate::pipeline::spans::{AttributeSet, SpanContext};
use crate::pipeline::stalls::{Observed, StallTracker};
use crate::pipeline::steps::{RequestSteps, StepWindow};
use crate::pipeline::throttle::Throttled;
use ringside_shm_protocol::{
    AttachedSegment, Consumer, DeadSegment, Detail, EngineIdentity, InflightReader,
    InflightRequest, Liveness, OpenError, OpenOptions, PollError, Record, RequestRecord, StartAt,
    list_dead_generations, list_segments, monotonic_ns, remove_dead_generation,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the reader needs to know: the resolved settings of `run` that
/// concern attaching, decoding and sampling (plain values; the daemon builds
/// them from the configuration).
#[derive(Clone, Debug)]
pub struct ReaderSettings {
    /// Instances to attach to (empty: all).
    pub engines: Vec<String>,
    /// Export what the ring holds when attaching without a stored cursor.
    pub backfill: bool,
    /// Span detail overriding the engine's control block, if given.
    pub detail: Option<Detail>,
    /// Attribute set.
    pub attributes: AttributeSet,
    /// Ring poll interval.
    pub poll_interval: Duration,
    /// Discovery interval.
    pub discover_interval: Duration,
    /// Trusted segment owners.
    pub trusted_uids: Vec<u32>,
    /// Head sampler.
    pub sampler: Sampler,
    /// Keep requests above the live p99 (tail sampling).
    pub tail_above_p99: bool,
    /// Half the window of the live p99.
    pub tail_window: Duration,
    /// A request with no progress for this long is stalled (`--stall-after`).
    pub stall_after: Duration,
    /// Incident capture (`--capture-*`).
    pub capture: CaptureSettings,
}

/// Records taken from one ring per poll.
const POLL_BATCH: usize = 1024;
/// An agent heartbeat younger than this marks another live agent.
const AGENT_STALE_NS: u64 = 5_000_000_000;
/// How often the in-flight tables are looked at for stalls.
const STALL_LOOK_INTERVAL: Duration = Duration::from_millis(250);

struct Attached {
    segment: AttachedSegment,
    consumer: Consumer,
    handle: Arc<EngineHandle>,
    ctx: Arc<SpanContext>,
    tail: TailSampler,
    /// The in-flight table (ABI 1.2 segments).
    inflight: Option<InflightReader>,
    stalls: StallTracker,
    /// The recent steps (ABI 1.4 segments with a step ring), joined to each
    /// request read.
    steps: Option<StepWindow>,
    /// Warnings of invalid step records.
    step_log: Throttled<1>,
    /// Crash spans may be exported for this segment when it dies: the agent
    /// saw the engine alive, attached after its first scan, backfills, or
    /// takes over from an agent that was attached to it (which may have been
    /// killed between the death and the export).
    may_report_crash: bool,
    /// The crash spans handed to the export queue, not yet settled: the
    /// generation is marked reported only once they are (so the successor
    /// of an agent killed before exporting them still reports them).
    crash_delivery: PollBatches,
    /// The generation to mark reported once `crash_delivery` is settled.
    crash_unmarked: Option<u64>,
    /// The dead-generation file to remove once every record read from it is
    /// settled.
    release_when_settled: Option<DeadSegment>,
    /// Poll batches with records queued or in flight: the cursor may be
    /// committed only up to the oldest.
    delivery: PollBatches,
    /// The cursor last committed to the segment.
    committed: Option<u64>,
    /// Warnings of ring losses (overwritten, abandoned), at most one per
    /// [`WARN_EVERY`](crate::pipeline::throttle::WARN_EVERY).
    loss_log: Throttled<2>,
    /// Warnings of invalid records, likewise.
    invalid_log: Throttled<1>,
    /// What sampling dropped and the capture triggers (crate::capture).
    capture: EngineCapture,
}

/// The reader: owns every attached segment and its consumer.
pub struct Reader {
    settings: ReaderSettings,
    resource_env: ResourceEnv,
    queue: Arc<ExportQueue>,
    metrics: Arc<Mutex<Metrics>>,
    registry: Arc<Mutex<Vec<Arc<EngineHandle>>>>,
    attached: BTreeMap<String, Attached>,
    /// Detached engines with records still queued or in flight: their
    /// cursors are committed as those are settled, then they are let go.
    retired: Vec<Attached>,
    /// Engines drained after they died, not to be re-attached.
    finished: HashMap<String, EngineIdentity>,
    /// Open errors already logged, not to repeat them every second.
    reported: HashMap<String, String>,
    initial_scan_done: bool,
    next_id: u64,
    buffer: Vec<(u64, Record)>,
    my_pid: u32,
    sampler_update: Arc<Mutex<Option<Sampler>>>,
    /// The stall threshold in ns; a reload stores a new one.
    stall_after_ns: Arc<AtomicU64>,
    next_stall_look: Instant,
    /// Set by SIGUSR1: capture every attached engine.
    capture_signal: Arc<AtomicBool>,
    next_capture_look: Instant,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// A reader feeding `queue` and `metrics`; every engine it attaches to is
    /// added to `registry` (for the final accounting).
    pub fn new(
        settings: ReaderSettings,
        resource_env: ResourceEnv,
        queue: Arc<ExportQueue>,
        metrics: Arc<Mutex<Metrics>>,
        registry: Arc<Mutex<Vec<Arc<EngineHandle>>>>,
    ) -> Self {
        let settings_stall_after = settings.stall_after;
        Self {
            settings,
            resource_env,
            queue,
            metrics,
            registry,
            attached: BTreeMap::new(),
            retired: Vec::new(),
            finished: HashMap::new(),
            reported: HashMap::new(),
            initial_scan_done: false,
            next_id: 0,
            buffer: Vec::with_capacity(POLL_BATCH),
            my_pid: std::process::id(),
            sampler_update: Arc::default(),
            stall_after_ns: Arc::new(AtomicU64::new(duration_ns(settings_stall_after))),
            next_stall_look: Instant::now(),
            capture_signal: Arc::default(),
            next_capture_look: Instant::now(),
        }
    }

    /// Where SIGUSR1 asks for a capture of every attached engine.
    pub fn capture_signal(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.capture_signal)
    }

    /// Where a configuration reload stores a new stall threshold (ns).
    pub fn stall_after_update(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.stall_after_ns)
    }

    /// Where a configuration reload leaves a new head sampler; the reader
    /// takes it before its next poll.
    pub fn sampler_update(&self) -> Arc<Mutex<Option<Sampler>>> {
        Arc::clone(&self.sampler_update)
    }

    /// Polls until `stop` is set, then drains every ring once more (onto the
    /// queue; the cursors move past those records only once they are
    /// settled: [`commit_settled_cursors`](Self::commit_settled_cursors)
    /// after the flush).
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut next_scan = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut update) = self.sampler_update.try_lock()
                && let Some(sampler) = update.take()
            {
                self.settings.sampler = sampler;
            }
            if Instant::now() >= next_scan {
                self.scan();
                next_scan = Instant::now() + self.settings.discover_interval;
            }
            let busy = self.poll_all();
            if Instant::now() >= self.next_stall_look {
                self.look_for_stalls();
                self.next_stall_look = Instant::now() + STALL_LOOK_INTERVAL;
            }
            self.look_for_captures();
            if !busy {
                // Woken early when a poll batch is settled, to commit.
                std::thread::park_timeout(self.settings.poll_interval);
            }
        }
        // Final drain: what the engines wrote up to now goes to the queue.
        for _ in 0..64 {
            if !self.poll_all() {
                break;
            }
        }
    }

    /// Number of attached engines.
    pub fn attached(&self) -> usize {
        self.attached.len()
    }

    /// One discovery pass: attach new segments, detach dead or replaced ones.
    pub fn scan(&mut self) {
        let names = match list_segments() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list engine segments");
                Vec::new()
            }
        };
        let filter = self.settings.engines.clone();
        let wanted = |name: &str| filter.is_empty() || filter.iter().any(|e| e == name);
        // Detach what is gone, replaced or dead (after draining it).
        let now_mono = monotonic_ns();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter_map(|(name, a)| {
                a.segment.ring().control().set_agent(self.my_pid, now_mono);
                let replaced = a.segment.replaced();
                let dead = a.segment.liveness() == Liveness::Dead;
                (replaced || dead).then(|| name.clone())
            })
            .collect();
        for name in gone {
            self.detach(&name);
        }
        for name in names.iter().filter(|n| wanted(n)) {
            if !self.attached.contains_key(name) {
                self.try_attach(name);
            }
        }
        // Generations a restarted engine kept for us: what their rings and
        // in-flight tables still hold is read, then the file is let go. Found
        // at start-up they are history, read only with --backfill, unless an
        // agent was reading them (this one's killed predecessor: its work is
        // taken over).
        let mut dead_names = Vec::new();
        let history_too = self.initial_scan_done || self.settings.backfill;
        match list_dead_generations() {
            Ok(dead) => {
                for d in dead.into_iter().filter(|d| wanted(&d.instance)) {
                    let key = format!("{}~dead.{}", d.instance, d.generation);
                    dead_names.push(key.clone());
                    if self.attached.contains_key(&key) || self.finished.contains_key(&key) {
                        continue;
                    }
                    let options = OpenOptions {
                        trusted_uids: self.settings.trusted_uids.clone(),
                    };
                    match AttachedSegment::open_dead(&d, &options) {
                        Ok(segment) if !history_too && segment.ring().control().agent().0 == 0 => {
                            self.finished.insert(key, segment.info().identity);
                        }
                        Ok(segment) => self.attach_opened(&key, segment),
                        Err(e) => {
                            let text = e.to_string();
                            if self.reported.get(&key) != Some(&text) {
                                tracing::warn!(segment = %key, error = %text, "not reading a dead generation");
                                self.reported.insert(key, text);
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list dead engine generations"),
        }
        // Forget what no longer exists: names any local user can create and
        // remove must not grow these maps for as long as the agent runs.
        let present: std::collections::HashSet<&str> = names
            .iter()
            .chain(&dead_names)
            .map(String::as_str)
            .collect();
        self.finished
            .retain(|name, _| present.contains(name.as_str()));
        self.reported
            .retain(|name, _| present.contains(name.as_str()));
        if let Ok(mut m) = self.metrics.lock() {
            m.prune(crate::pipeline::metrics::unix_now_ns());
        }
        self.initial_scan_done = true;
    }

    fn try_attach(&mut self, name: &str) {
        let options = OpenOptions {
            trusted_uids: self.settings.trusted_uids.clone(),
        };
        let segment = match AttachedSegment::open(name, &options) {
            Ok(s) => s,
            Err(e) => {
                let text = e.to_string();
                if self.reported.get(name) != Some(&text) {
                    match e {
                        OpenError::NotInitialized(_) | OpenError::NotFound(_) => {
                            tracing::debug!(engine = name, error = %text, "segment not ready");
                        }
                        _ => tracing::warn!(engine = name, error = %text, "not attaching"),
                    }
                    self.reported.insert(name.to_owned(), text);
                }
                return;
            }
        };
        self.reported.remove(name);
        self.attach_opened(name, segment);
    }

    /// Attaches to an opened segment under `name` (an instance, or a dead
    /// generation's `instance~dead.generation`).
    fn attach_opened(&mut self, name: &str, segment: AttachedSegment) {
        let info = segment.info().clone();
        if self.finished.get(name) == Some(&info.identity) {
            return;
        }
        let control = segment.ring().control();
        let (agent_pid, agent_beat) = control.agent();
        if agent_pid != 0
            && agent_pid != self.my_pid
            && std::path::Path::new(&format!("/proc/{agent_pid}")).exists()
            && monotonic_ns().saturating_sub(agent_beat) < AGENT_STALE_NS
        {
            let text = format!("another agent (pid {agent_pid}) reads this engine");
            if self.reported.get(name) != Some(&text) {
                tracing::warn!(engine = name, "{text}; not attaching");
                self.reported.insert(name.to_owned(), text);
            }
            return;
        }
        let stored = control.read_cursor();
        // An agent was attached before (this one's predecessor, killed or
        // stopped): this one continues its work, crash reports included.
        let predecessor = agent_pid != 0;
        let start = if stored != 0 || predecessor {
            StartAt::Ticket(stored)
        } else if self.settings.backfill || self.initial_scan_done {
            StartAt::Oldest
        } else {
            StartAt::Newest
        };
        let consumer = segment.ring().consumer(start);
        control.set_agent(self.my_pid, monotonic_ns());
        let totals = consumer.totals();
        if totals.cursor_clamped {
            tracing::warn!(
                engine = name,
                stored,
                "stored cursor is beyond the ring head; starting at the head"
            );
        }
        let handle = Arc::new(EngineHandle {
            id: self.next_id,
            instance: info.instance.clone(),
            pid: info.identity.pid,
            resource: self
                .resource_env
                .engine_resource(&info.instance, &info.identity),
            stats: EngineStats::default(),
        });
        self.next_id += 1;
        EngineStats::add(&handle.stats.skipped_at_attach, consumer.cursor());
        tracing::info!(
            engine = name,
            pid = info.identity.pid,
            generation = info.identity.generation,
            models = ?info.models,
            start = ?start,
            cursor = consumer.cursor(),
            "attached"
        );
        if let Ok(mut registry) = self.registry.lock() {
            registry.push(Arc::clone(&handle));
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.attach(&handle);
        }
        let ctx = Arc::new(SpanContext {
            clock: info.clock,
            models: info.models.clone(),
            attributes: self.settings.attributes,
            server_address: self.resource_env.host_name.clone(),
            server_port: segment.info().listen_port,
        });
        let alive = segment.liveness() == Liveness::Alive;
        let inflight = segment.inflight();
        // Steps from where the records start: all the ring holds, unless the
        // agent reads only new requests.
        let step_start = if start == StartAt::Newest {
            StartAt::Newest
        } else {
            StartAt::Oldest
        };
        let steps = segment
            .steps()
            .map(|ring| StepWindow::new(&ring, step_start));
        let capture = EngineCapture::new(&self.settings.capture, segment.ring().capacity());
        self.attached.insert(
            name.to_owned(),
            Attached {
                segment,
                consumer,
                handle,
                ctx,
                tail: TailSampler::new(self.settings.tail_above_p99, self.settings.tail_window),
                inflight,
                stalls: StallTracker::default(),
                steps,
                step_log: Throttled::default(),
                may_report_crash: alive
                    || self.initial_scan_done
                    || self.settings.backfill
                    || predecessor,
                crash_delivery: PollBatches::default(),
                crash_unmarked: None,
                release_when_settled: None,
                delivery: PollBatches::default(),
                committed: None,
                loss_log: Throttled::default(),
                invalid_log: Throttled::default(),
                capture,
            },
        );
    }

    fn detach(&mut self, name: &str) {
        // Drain: everything committed goes out; tickets stuck past the
        // abandon timeout are skipped and counted.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Some(a) = self.attached.get_mut(name) else {
                return;
            };
            let Ok((delivered, stalled)) = Self::poll_one(
                a,
                &mut self.buffer,
                &self.settings,
                &self.queue,
                &self.metrics,
            ) else {
                break;
            };
            if delivered == 0 && !stalled {
                break;
            }
            if delivered == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut a) = self.attached.remove(name) {
            let dead = a.segment.liveness() == Liveness::Dead;
            // A clean stop removes the name; a dead engine leaves its file
            // behind, under its name or as a generation its successor kept.
            let dead_generation = a.segment.dead_generation();
            let left_behind = !a.segment.replaced() || dead_generation.is_some();
            let died = dead && left_behind;
            if died {
                if let Ok(mut m) = self.metrics.lock() {
                    m.engine_died(&a.handle.instance);
                }
                self.report_crash(name, &mut a);
                self.capture_death(&mut a);
            }
            if dead && !a.segment.replaced() {
                self.finished
                    .insert(name.to_owned(), a.segment.info().identity);
            }
            let s = a.handle.stats.snapshot();
            tracing::info!(
                engine = name,
                pid = a.handle.pid,
                reason = if dead {
                    "engine exited"
                } else {
                    "segment replaced"
                },
                read = s.read,
                invalid = s.invalid,
                lost_overwritten = s.lost_overwritten,
                lost_abandoned = s.lost_abandoned,
                crashed_in_flight = s.crashed_in_flight,
                "detached"
            );
            // Everything it held is handed on: the kept generation goes once
            // its records are settled (a successor of a killed agent still
            // finds it until then).
            if died && let Some(dead) = dead_generation {
                self.finished
                    .insert(name.to_owned(), a.segment.info().identity);
                a.release_when_settled = Some(dead);
            }
            self.retire(a);
        }
    }

    /// The engine of `a` died: every request its in-flight table still holds
    /// becomes an `engine_crashed` record on the export queue (unless an
    /// agent reported this generation already). Sampling does not apply:
    /// these are the requests an operator looks for after a crash.
    fn report_crash(&mut self, name: &str, a: &mut Attached) {
        let Some(table) = a.inflight.as_ref() else {
            return;
        };
        let generation = a.segment.info().identity.generation;
        if !a.may_report_crash || table.reported() == Some(generation) {
            return;
        }
        let snapshot = match table.snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(engine = name, error = %e, "cannot read the dead engine's in-flight table");
                return;
            }
        };
        let last_heartbeat = a.segment.ring().counters().engine_heartbeat_ns;
        let detail = self
            .settings
            .detail
            .unwrap_or_else(|| a.segment.ring().control().detail().unwrap_or_default());
        let mut items = Vec::with_capacity(snapshot.requests.len());
        let mut metrics = self
            .metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for request in &snapshot.requests {
            let record = crash_record(request, last_heartbeat);
            let stalls = a
                .stalls
                .finish(&request.request_id, record.timestamps.finished_ns);
            tracing::warn!(
                engine = name,
                request_id = %hex(&request.request_id),
                trace_id = %hex(&request.trace_id),
                phase = request.phase.as_str(),
                output_tokens = request.output_tokens,
                "request lost with the engine"
            );
            let model = a
                .ctx
                .models
                .get(usize::from(record.model_index))
                .map_or("unknown", String::as_str);
            metrics.record(&a.handle, model, &record);
            let joined = join_steps(&mut a.steps, &a.handle, &mut metrics, &record);
            // Kept by rule, not by chance, like a failed request.
            let sampling = SpanSampling {
                priority: true,
                threshold: None,
            };
            let mut item = Item::new(Arc::clone(&a.handle), Arc::clone(&a.ctx), record, detail)
                .with_stalls(stalls)
                .with_sampling(sampling);
            item.steps = joined;
            items.push(item);
        }
        drop(metrics);
        let n = items.len() as u64;
        EngineStats::add(&a.handle.stats.crashed_in_flight, n);
        if items.is_empty() {
            table.mark_reported(generation);
        } else {
            for (item, token) in items.iter_mut().zip(a.crash_delivery.open(0, n as usize)) {
                item.delivery = Some(token);
            }
            a.crash_unmarked = Some(generation);
        }
        self.queue.push_all(items);
        tracing::error!(
            engine = name,
            generation,
            in_flight = n,
            torn = snapshot.torn,
            invalid = snapshot.invalid,
            untracked = snapshot.untracked,
            "engine died; its in-flight requests are exported as engine_crashed spans"
        );
    }

    /// Incident capture: on SIGUSR1 every attached engine; every
    /// [`STALL_LOOK_INTERVAL`] each engine's triggers (see crate::capture).
    fn look_for_captures(&mut self) {
        let signal = self.capture_signal.swap(false, Ordering::Relaxed);
        let look = Instant::now() >= self.next_capture_look;
        if !signal && !look {
            return;
        }
        if look {
            self.next_capture_look = Instant::now() + STALL_LOOK_INTERVAL;
        }
        let now = monotonic_ns();
        for a in self.attached.values_mut() {
            let reason = if signal {
                // The triggers still take their look (an incident that
                // starts now is the signal's: it fires nothing more).
                let _ = a.capture.due(now);
                Some(CaptureReason::Signal)
            } else {
                a.capture.due(now)
            };
            if let Some(reason) = reason {
                let cursor = a.consumer.cursor();
                let window = a.capture.window_before(now);
                a.capture.capture(
                    &a.segment,
                    &a.handle,
                    &a.ctx,
                    cursor,
                    reason,
                    window,
                    &self.queue,
                );
            }
        }
    }

    /// The engine of `a` died (and its ring was drained): the window before
    /// its death (between its last heartbeat and now) is captured.
    fn capture_death(&self, a: &mut Attached) {
        if !a.capture.on_crash() {
            return;
        }
        let heartbeat = a.segment.ring().counters().engine_heartbeat_ns;
        let now = monotonic_ns();
        let last_seen = if heartbeat == 0 {
            now
        } else {
            heartbeat.min(now)
        };
        let window = crate::capture::window::Window {
            from_ns: a.capture.window_before(last_seen).from_ns,
            to_ns: now,
        };
        let cursor = a.consumer.cursor();
        a.capture.capture(
            &a.segment,
            &a.handle,
            &a.ctx,
            cursor,
            CaptureReason::EngineCrashed,
            window,
            &self.queue,
        );
    }

    /// Looks at every live engine's in-flight table: counts stalled requests
    /// and logs each new stall once.
    pub fn look_for_stalls(&mut self) {
        let threshold = self.stall_after_ns.load(Ordering::Relaxed);
        let now = monotonic_ns();
        let mut observed = Vec::new();
        for (name, a) in &mut self.attached {
            let Some(table) = a.inflight.as_ref() else {
                continue;
            };
            let Ok(snapshot) = table.snapshot() else {
                continue;
            };
            let occupied = snapshot
                .requests
                .iter()
                .filter(|r| r.sequence_slot.is_some())
                .count();
            if let Ok(mut m) = self.metrics.lock() {
                m.record_slots(a.handle.id, occupied as u64);
            }
            observed.clear();
            observed.extend(snapshot.requests.iter().map(|r| Observed {
                request_id: r.request_id,
                progress_ns: r.progress_ns,
            }));
            for stall in a.stalls.observe(&observed, now, threshold) {
                let request: Option<&InflightRequest> = snapshot
                    .requests
                    .iter()
                    .find(|r| r.request_id == stall.request_id);
                tracing::warn!(
                    engine = %name,
                    request_id = %hex(&stall.request_id),
                    trace_id = %request.map(|r| hex(&r.trace_id)).unwrap_or_default(),
                    phase = request.map_or("", |r| r.phase.as_str()),
                    no_progress_for_s = stall.for_ns as f64 / 1e9,
                    "request stalled"
                );
            }
            a.handle
                .stats
                .stalled
                .store(a.stalls.stalled_now() as u64, Ordering::Relaxed);
        }
    }

    /// Keeps a detached engine until its queued records are settled.
    fn retire(&mut self, mut a: Attached) {
        Self::commit_settled(&mut a);
        if Self::settled(&a) {
            self.let_go(a);
        } else {
            self.retired.push(a);
        }
    }

    /// A retired engine whose records are all settled: its dead-generation
    /// file, if it had one, is removed; the mapping goes with it, and its
    /// metric series after their retention.
    fn let_go(&self, a: Attached) {
        if let Ok(mut m) = self.metrics.lock() {
            m.let_go(a.handle.id, crate::pipeline::metrics::unix_now_ns());
        }
        if let Some(dead) = &a.release_when_settled
            && let Err(e) = remove_dead_generation(dead)
        {
            tracing::warn!(segment = %a.segment.path(), error = %e, "cannot remove a dead generation");
        }
    }

    /// Lets go of the retired engines whose records are all settled.
    fn drop_settled_retired(&mut self) {
        let (settled, waiting): (Vec<Attached>, Vec<Attached>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(Self::settled);
        self.retired = waiting;
        for a in settled {
            self.let_go(a);
        }
    }

    /// Commits every ring's cursor up to what is settled (the daemon calls
    /// it once more after the shutdown flush, when everything queued has
    /// been exported or counted). Returns the engines with records still
    /// queued or in flight.
    pub fn commit_settled_cursors(&mut self) -> usize {
        for a in self.attached.values_mut().chain(&mut self.retired) {
            Self::commit_settled(a);
        }
        self.drop_settled_retired();
        self.attached
            .values()
            .chain(&self.retired)
            .filter(|a| !Self::settled(a))
            .count()
    }

    /// Whether everything read from `a` (records and crash spans) is settled.
    fn settled(a: &Attached) -> bool {
        a.delivery.is_empty() && a.crash_unmarked.is_none()
    }

    /// Commits the cursor to the first record not yet settled, and marks a
    /// dead generation reported once its crash spans are settled.
    fn commit_settled(a: &mut Attached) {
        let point = a.delivery.commit_point(a.consumer.cursor());
        if a.committed != Some(point) {
            a.consumer.commit_cursor(point);
            a.committed = Some(point);
        }
        if let Some(generation) = a.crash_unmarked
            && a.crash_delivery.is_empty()
        {
            if let Some(table) = &a.inflight {
                table.mark_reported(generation);
            }
            a.crash_unmarked = None;
        }
    }

    /// Polls every ring once; true if any delivered a full batch (more may
    /// be waiting).
    pub fn poll_all(&mut self) -> bool {
        if !self.retired.is_empty() {
            for a in &mut self.retired {
                Self::commit_settled(a);
            }
            self.drop_settled_retired();
        }
        let mut busy = false;
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            let Some(a) = self.attached.get_mut(&name) else {
                continue;
            };
            match Self::poll_one(
                a,
                &mut self.buffer,
                &self.settings,
                &self.queue,
                &self.metrics,
            ) {
                Ok((delivered, _)) => busy |= delivered >= POLL_BATCH as u64,
                Err(e) => {
                    // The mapping cannot be read safely any more: let go of
                    // it; the next scan re-attaches if the segment is valid.
                    tracing::warn!(engine = %name, error = %e, "cannot read the ring; detaching");
                    self.attached.remove(&name);
                }
            }
        }
        busy
    }

    /// Reads up to one batch from one ring, hands it on and commits the
    /// cursor up to what is settled. Returns (delivered, stalled).
    fn poll_one(
        a: &mut Attached,
        buffer: &mut Vec<(u64, Record)>,
        settings: &ReaderSettings,
        queue: &ExportQueue,
        metrics: &Mutex<Metrics>,
    ) -> Result<(u64, bool), PollError> {
        buffer.clear();
        let report = a
            .consumer
            .poll(POLL_BATCH, |ticket, record| buffer.push((ticket, *record)))?;
        let stats = &a.handle.stats;
        EngineStats::add(&stats.read, report.delivered);
        EngineStats::add(&stats.lost_overwritten, report.lost_overwritten);
        EngineStats::add(&stats.lost_abandoned, report.lost_abandoned);
        if report.lost_overwritten + report.lost_abandoned > 0
            && let Some(line) = a.loss_log.note(
                Instant::now(),
                [report.lost_overwritten, report.lost_abandoned],
            )
        {
            tracing::warn!(
                engine = %a.handle.instance,
                overwritten = line.amounts[0],
                abandoned = line.amounts[1],
                polls = line.polls,
                "records lost in the ring (at most one line per 10 s; the counters are exact)"
            );
        }
        if let Some(window) = a.steps.as_mut() {
            let mut metrics = metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let id = a.handle.id;
            let polled = window.poll(stats, |step| metrics.record_step(id, step));
            drop(metrics);
            match polled {
                Ok(_) => {
                    if let Some(error) = window.last_error.take()
                        && let Some(line) = a.step_log.note(Instant::now(), [1])
                    {
                        tracing::warn!(engine = %a.handle.instance, polls = line.polls, %error, "invalid step records skipped (at most one line per 10 s; the counters are exact)");
                    }
                }
                // The request ring's poll checks the same mapping; a failure
                // here only costs the gap statistics.
                Err(error) => {
                    tracing::debug!(engine = %a.handle.instance, %error, "step ring not read")
                }
            }
        }
        if !buffer.is_empty() {
            let ring = a.segment.ring();
            let detail = settings
                .detail
                .unwrap_or_else(|| ring.control().detail().unwrap_or_default());
            // The control block's head ratio as a threshold, once per poll
            // (None: keep nothing).
            let head_ratio = Threshold::from_ppm(ring.control().head_sample_ppm());
            let tail_rules = ring.control().tail_sampling();
            let model_count = a.segment.info().model_count();
            let mut items = Vec::with_capacity(buffer.len());
            let mut metrics = metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut invalid = 0u64;
            let mut first_error = None;
            let mut first_kept = None;
            for (ticket, raw) in buffer.iter() {
                let record = match raw.decode(model_count) {
                    Ok(r) => r,
                    Err(e) => {
                        invalid += 1;
                        first_error.get_or_insert((*ticket, e));
                        continue;
                    }
                };
                let model = a
                    .ctx
                    .models
                    .get(usize::from(record.model_index))
                    .map_or("unknown", String::as_str);
                metrics.record(&a.handle, model, &record);
                let joined = join_steps(&mut a.steps, &a.handle, &mut metrics, &record);
                // Head (the configured sampler and the control block's
                // ratio) and tail rules must all keep a request; each
                // consistent stage raises the threshold its spans carry.
                let r = randomness(&record);
                let head = settings
                    .sampler
                    .sample(&record, r)
                    .and_then(|s| head_ratio.filter(|t| t.keeps(r)).map(|t| s.raised_to(t)));
                let stalls = a
                    .stalls
                    .finish(&record.request_id, record.timestamps.finished_ns);
                let Some(kept) = head.and_then(|h| {
                    a.tail
                        .decide(&tail_rules, &record)
                        .map(|keep| keep.apply(h))
                }) else {
                    EngineStats::add(&stats.sampled_out, 1);
                    a.capture.decided(*ticket, &record, true);
                    continue;
                };
                a.capture.decided(*ticket, &record, false);
                first_kept.get_or_insert(*ticket);
                let mut item = Item::new(Arc::clone(&a.handle), Arc::clone(&a.ctx), record, detail)
                    .with_stalls(stalls);
                // Set in place: the item is large, a builder would move it again.
                item.sampling = kept;
                item.steps = joined;
                items.push(item);
            }
            drop(metrics);
            if let Some(first) = first_kept {
                // One poll batch: the cursor stays at `first` until every
                // one of these is exported or counted lost.
                let n = items.len();
                for (item, token) in items.iter_mut().zip(a.delivery.open(first, n)) {
                    item.delivery = Some(token);
                }
            }
            queue.push_all(items);
            if let Some((ticket, error)) = first_error {
                EngineStats::add(&stats.invalid, invalid);
                if let Some(line) = a.invalid_log.note(Instant::now(), [invalid]) {
                    tracing::warn!(engine = %a.handle.instance, invalid = line.amounts[0], polls = line.polls, first_ticket = ticket, %error, "invalid records skipped (at most one line per 10 s; the counters are exact)");
                }
            }
        }
        let counters = a.segment.ring().counters();
        stats.lag.store(a.consumer.backlog(), Ordering::Relaxed);
        stats.engine_written.store(counters.head, Ordering::Relaxed);
        stats
            .engine_dropped
            .store(counters.dropped_before_ticket(), Ordering::Relaxed);
        // A restarted agent resumes at the first record not yet settled.
        Self::commit_settled(a);
        Ok((report.delivered, report.stalled))
    }
}

/// Joins `record` to the engine's recent steps: its gaps go to the
/// inter-token histogram, a request whose steps are not all there is counted.
fn join_steps(
    window: &mut Option<StepWindow>,
    engine: &EngineHandle,
    metrics: &mut Metrics,
    record: &RequestRecord,
) -> Option<RequestSteps> {
    let window = window.as_mut()?;
    match window.join(record) {
        Some((steps, gaps)) => {
            metrics.record_gaps(engine.id, record, gaps);
            Some(steps)
        }
        None => {
            if record.completion_tokens >= 2 && record.sequence_slot.is_some() {
                EngineStats::add(&engine.stats.steps_unjoined, 1);
            }
            None
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;

    fn reader(engines: Vec<String>) -> Reader {
        Reader::new(
            ReaderSettings {
                engines,
                backfill: false,
                detail: None,
                attributes: AttributeSet::default(),
                poll_interval: Duration::from_millis(10),
                discover_interval: Duration::from_millis(10),
                trusted_uids: Vec::new(),
                sampler: Sampler::AlwaysOn,
                tail_above_p99: false,
                tail_window: Duration::from_secs(60),
                stall_after: Duration::from_secs(10),
                capture: CaptureSettings::default(),
            },
            ResourceEnv::from_env(&|_| None, "box".into()),
            Arc::new(ExportQueue::new(1000, 1 << 20, 512)),
            Arc::new(Mutex::new(Metrics::new(1))),
            Arc::default(),
        )
    }

    #[test]
    fn refused_names_that_were_removed_are_forgotten() {
        // Files any local user could put in /dev/shm under segment names:
        // refused (too small to be a segment), reported once, then removed.
        let names: Vec<String> = (0..50)
            .map(|i| format!("t{}-junk{i}", std::process::id()))
            .collect();
        for name in &names {
            let path = ringside_shm_protocol::segment_path(name);
            std::fs::write(&path, b"not a segment").unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        let mut reader = reader(names.clone());
        reader.scan();
        assert_eq!(reader.reported.len(), names.len());
        for name in &names {
            std::fs::remove_file(ringside_shm_protocol::segment_path(name)).unwrap();
        }
        reader.scan();
        assert!(reader.reported.is_empty(), "{:?}", reader.reported.keys());
    }
}
