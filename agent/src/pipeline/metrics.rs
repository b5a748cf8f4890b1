//! GenAI server metrics computed from every valid record (sampled out or
//! not), and the agent's own health counters, as OTLP metrics with
//! cumulative temporality.

use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::resource::{kv_int, kv_str};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use ringside_shm_protocol::{RequestRecord, Step};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

fn series_key(record: &RequestRecord) -> SeriesKey {
    SeriesKey {
        model_index: record.model_index,
        operation: record.operation as u8,
        error_type: record.error_type as u8,
        // With a class the label is the class: the status would only
        // split one label into several series.
        error_status: if record.error_type.as_str().is_some() {
            0
        } else {
            status_key(record.http_status)
        },
    }
}

/// Now, in nanoseconds since the Unix epoch (0 before it, saturating).
pub(crate) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Boundaries of `gen_ai.server.request.duration` (seconds), semconv v1.41;
/// also those of the phase histograms (`ringside.server.request.*.duration`),
/// so a phase and the whole request can be compared bucket by bucket.
pub const DURATION_BOUNDS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Boundaries of `gen_ai.server.time_per_output_token` (seconds).
pub const TPOT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Boundaries of `gen_ai.server.time_to_first_token` (seconds).
pub const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Boundaries of `ringside.server.token.usage` (tokens): those semconv v1.41
/// advises for `gen_ai.client.token.usage`, its client-side counterpart.
pub const TOKEN_BOUNDS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// Boundaries of `ringside.server.inter_token.duration` and of
/// `ringside.server.step.duration` (seconds): `gen_ai.server.time_per_output_token`'s,
/// with finer buckets below 10 ms (a GPU's gaps) and two above 2.5 s (stalls).
pub const GAP_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0,
];
/// Boundaries of `ringside.server.step.batch_size` (sequences per step).
pub const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// An explicit-bucket histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct Hist {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Hist {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    /// Adds one value. Buckets are upper-inclusive, as OTLP defines them.
    pub fn record(&mut self, value: f64) {
        let index = self.bounds.partition_point(|b| *b < value);
        if let Some(c) = self.counts.get_mut(index) {
            *c += 1;
        }
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn point(&self, attributes: Vec<KeyValue>, start: u64, now: u64) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: self.count,
            sum: Some(self.sum),
            bucket_counts: self.counts.clone(),
            explicit_bounds: self.bounds.to_vec(),
            min: (self.count > 0).then_some(self.min),
            max: (self.count > 0).then_some(self.max),
            ..HistogramDataPoint::default()
        }
    }
}

/// The HTTP statuses that get a series of their own when an error has no
/// class; any other error status is folded into `4xx`, `5xx` or `_OTHER`
/// (semconv's fallback), so forged statuses cannot multiply the series.
const STATUSES_WITH_A_SERIES: [u16; 14] = [
    400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 499, 500, 502, 503,
];

/// An error status as a series key: itself if it has a series, else its
/// class (`4` or `5`) or `1` (anything else at or above 400); 0 for none.
fn status_key(http_status: u16) -> u16 {
    match http_status {
        s if s < 400 => 0,
        s if STATUSES_WITH_A_SERIES.contains(&s) => s,
        400..=499 => 4,
        500..=599 => 5,
        _ => 1,
    }
}

/// The `error.type` label of a series: the record's error class, else its
/// folded status.
fn error_label(record: &RequestRecord) -> Option<String> {
    if let Some(e) = record.error_type.as_str() {
        return Some(e.to_owned());
    }
    match status_key(record.http_status) {
        0 => None,
        4 => Some("4xx".into()),
        5 => Some("5xx".into()),
        1 => Some("_OTHER".into()),
        s => Some(s.to_string()),
    }
}

/// A series, keyed without allocating: model index, operation, error class
/// and (only for an error without a class) the folded HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    model_index: u16,
    operation: u8,
    error_type: u8,
    error_status: u16,
}

#[derive(Clone, Debug)]
struct Series {
    model: String,
    operation: &'static str,
    error: Option<String>,
    duration: Hist,
    queue: Hist,
    prefill: Hist,
    decode: Hist,
    ttft: Hist,
    tpot: Hist,
    inter_token: Hist,
    input_tokens: Hist,
    output_tokens: Hist,
}

impl Series {
    fn new(model: &str, record: &RequestRecord) -> Self {
        Self {
            model: model.to_owned(),
            operation: record.operation.as_str(),
            error: error_label(record),
            duration: Hist::new(DURATION_BOUNDS),
            queue: Hist::new(DURATION_BOUNDS),
            prefill: Hist::new(DURATION_BOUNDS),
            decode: Hist::new(DURATION_BOUNDS),
            ttft: Hist::new(TTFT_BOUNDS),
            tpot: Hist::new(TPOT_BOUNDS),
            inter_token: Hist::new(GAP_BOUNDS),
            input_tokens: Hist::new(TOKEN_BOUNDS),
            output_tokens: Hist::new(TOKEN_BOUNDS),
        }
    }
}

/// What the engine's steps say (ABI 1.4 engines with a step ring).
#[derive(Clone, Debug)]
struct StepSeries {
    duration: Hist,
    batch_size: Hist,
    /// The most recent step's start: the gauges' values are as of then.
    kv_cells_used: u32,
    kv_cells_total: u32,
    slots_total: u16,
}

#[derive(Debug)]
struct EngineSeries {
    engine: Arc<EngineHandle>,
    series: BTreeMap<SeriesKey, Series>,
    steps: Option<StepSeries>,
    /// Sequence slots holding a request at the last look at the in-flight
    /// table (live, unlike a step's count).
    slots: Option<u64>,
    /// When the agent let go of the attachment (detached, all settled).
    let_go_unix_ns: Option<u64>,
}

/// How long a let-go attachment's series are still exported: several
/// metric intervals and scrapes see their final values, then they go, so an
/// engine restarted over and over cannot grow the agent's metrics.
pub const LET_GO_RETENTION_NS: u64 = 300_000_000_000;

/// Agent-wide export counters.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Export requests that failed (each attempt).
    pub failures: AtomicU64,
    /// Retries scheduled.
    pub retries: AtomicU64,
    /// Spans the collector rejected in partial successes.
    pub rejected_spans: AtomicU64,
}

/// All metric state of the agent.
#[derive(Debug)]
pub struct Metrics {
    start_unix_ns: u64,
    engines: BTreeMap<u64, EngineSeries>,
    /// Deaths seen per engine instance, across its generations.
    deaths: BTreeMap<String, u64>,
}

fn ns(value: u64) -> f64 {
    value as f64 / 1e9
}

impl Metrics {
    /// Empty state; cumulative series start at `start_unix_ns`.
    pub fn new(start_unix_ns: u64) -> Self {
        Self {
            start_unix_ns,
            engines: BTreeMap::new(),
            deaths: BTreeMap::new(),
        }
    }

    /// Counts one death of engine `instance`: a generation whose segment the
    /// agent read ended (crash, kill, or a stop that left it behind).
    pub fn engine_died(&mut self, instance: &str) {
        *self.deaths.entry(instance.to_owned()).or_default() += 1;
    }

    /// Deaths counted for `instance`.
    pub fn deaths(&self, instance: &str) -> u64 {
        self.deaths.get(instance).copied().unwrap_or(0)
    }

    /// Registers an engine so its health counters are exported even before
    /// its first request.
    pub fn attach(&mut self, engine: &Arc<EngineHandle>) {
        self.engines
            .entry(engine.id)
            .or_insert_with(|| EngineSeries {
                engine: Arc::clone(engine),
                series: BTreeMap::new(),
                steps: None,
                slots: None,
                let_go_unix_ns: None,
            });
    }

    /// The agent let go of attachment `engine_id` (detached, everything read
    /// from it settled): its series are kept for [`LET_GO_RETENTION_NS`].
    pub fn let_go(&mut self, engine_id: u64, now_unix_ns: u64) {
        if let Some(e) = self.engines.get_mut(&engine_id) {
            e.let_go_unix_ns.get_or_insert(now_unix_ns);
        }
    }

    /// Drops the series of attachments let go of more than
    /// [`LET_GO_RETENTION_NS`] before `now_unix_ns`.
    pub fn prune(&mut self, now_unix_ns: u64) {
        self.engines.retain(|_, e| {
            e.let_go_unix_ns
                .is_none_or(|at| now_unix_ns.saturating_sub(at) <= LET_GO_RETENTION_NS)
        });
    }

    /// Attachments with series (tests and status).
    pub fn engine_count(&self) -> usize {
        self.engines.len()
    }

    /// Records one engine step: its duration, batch size and KV use.
    pub fn record_step(&mut self, engine_id: u64, step: &Step) {
        let Some(entry) = self.engines.get_mut(&engine_id) else {
            return;
        };
        let steps = entry.steps.get_or_insert_with(|| StepSeries {
            duration: Hist::new(GAP_BOUNDS),
            batch_size: Hist::new(BATCH_BOUNDS),
            kv_cells_used: 0,
            kv_cells_total: 0,
            slots_total: 0,
        });
        steps.duration.record(ns(step.duration_ns()));
        steps.batch_size.record(f64::from(step.batch_sequences()));
        steps.kv_cells_used = step.kv_cells_used;
        steps.kv_cells_total = step.kv_cells_total;
        steps.slots_total = step.slots_total;
    }

    /// Records the sequence slots of engine `engine_id` holding a request now.
    pub fn record_slots(&mut self, engine_id: u64, occupied: u64) {
        if let Some(entry) = self.engines.get_mut(&engine_id) {
            entry.slots = Some(occupied);
        }
    }

    /// Records one request's gaps between output tokens (ns), in the series
    /// its [`record`](Self::record) went to (call that first).
    pub fn record_gaps(&mut self, engine_id: u64, record: &RequestRecord, gaps: &[u64]) {
        let key = series_key(record);
        if let Some(series) = self
            .engines
            .get_mut(&engine_id)
            .and_then(|e| e.series.get_mut(&key))
        {
            for &gap in gaps {
                series.inter_token.record(ns(gap));
            }
        }
    }

    /// Records one request.
    pub fn record(&mut self, engine: &Arc<EngineHandle>, model: &str, record: &RequestRecord) {
        let entry = self
            .engines
            .entry(engine.id)
            .or_insert_with(|| EngineSeries {
                engine: Arc::clone(engine),
                series: BTreeMap::new(),
                steps: None,
                slots: None,
                let_go_unix_ns: None,
            });
        let key = series_key(record);
        let series = entry
            .series
            .entry(key)
            .or_insert_with(|| Series::new(model, record));
        series.duration.record(ns(record.e2e_ns()));
        // A phase is recorded when the request went through it, also when it
        // failed later: where a failing request spent its time is the point.
        for (hist, phase) in [
            (&mut series.queue, record.queue_ns()),
            (&mut series.prefill, record.prefill_ns()),
            (&mut series.decode, record.decode_ns()),
        ] {
            if let Some(phase) = phase {
                hist.record(ns(phase));
            }
        }
        series.input_tokens.record(f64::from(record.prompt_tokens));
        series
            .output_tokens
            .record(f64::from(record.completion_tokens));
        if !record.is_error() {
            if let Some(ttft) = record.ttft_ns() {
                series.ttft.record(ns(ttft));
            }
            if let Some(tpot) = record.tpot_ns() {
                series.tpot.record(ns(tpot));
            }
        }
    }

    /// Requests recorded for an engine (tests and status).
    pub fn requests(&self, engine_id: u64) -> u64 {
        self.engines
            .get(&engine_id)
            .map_or(0, |e| e.series.values().map(|s| s.duration.count()).sum())
    }

    /// The export request of everything, stamped `now_unix_ns`.
    pub fn to_request(
        &self,
        now_unix_ns: u64,
        queue_depth: u64,
        export: &ExportCounters,
    ) -> ExportMetricsServiceRequest {
        let start = self.start_unix_ns;
        let mut resource_metrics = Vec::new();
        for engine in self.engines.values() {
            let mut duration = Vec::new();
            let mut phases: [Vec<HistogramDataPoint>; 3] = Default::default();
            let mut ttft = Vec::new();
            let mut tpot = Vec::new();
            let mut inter_token = Vec::new();
            let mut tokens = Vec::new();
            for s in engine.series.values() {
                let mut attrs = vec![
                    kv_str("gen_ai.operation.name", s.operation),
                    kv_str(
                        "gen_ai.provider.name",
                        crate::pipeline::spans::PROVIDER_NAME,
                    ),
                    kv_str("gen_ai.request.model", s.model.clone()),
                    kv_str("gen_ai.response.model", s.model.clone()),
                ];
                if let Some(e) = &s.error {
                    attrs.push(kv_str("error.type", e.clone()));
                }
                duration.push(s.duration.point(attrs.clone(), start, now_unix_ns));
                for (points, hist) in phases.iter_mut().zip([&s.queue, &s.prefill, &s.decode]) {
                    if hist.count() > 0 {
                        points.push(hist.point(attrs.clone(), start, now_unix_ns));
                    }
                }
                if s.ttft.count() > 0 {
                    ttft.push(s.ttft.point(attrs.clone(), start, now_unix_ns));
                }
                if s.tpot.count() > 0 {
                    tpot.push(s.tpot.point(attrs.clone(), start, now_unix_ns));
                }
                if s.inter_token.count() > 0 {
                    inter_token.push(s.inter_token.point(attrs.clone(), start, now_unix_ns));
                }
                for (kind, hist) in [("input", &s.input_tokens), ("output", &s.output_tokens)] {
                    let mut a = attrs.clone();
                    a.push(kv_str("gen_ai.token.type", kind));
                    tokens.push(hist.point(a, start, now_unix_ns));
                }
            }
            let mut metrics = Vec::new();
            let hist = |name: &str, unit: &str, description: &str, points| Metric {
                name: name.to_owned(),
                description: description.to_owned(),
                unit: unit.to_owned(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                ..Metric::default()
            };
            if !duration.is_empty() {
                metrics.push(hist(
                    "gen_ai.server.request.duration",
                    "s",
                    "Generative AI server request duration.",
                    duration,
                ));
                // Not `gen_ai.server.token.usage`: semconv v1.41 defines no
                // server token metric, only the client's.
                metrics.push(hist(
                    "ringside.server.token.usage",
                    "{token}",
                    "Number of input and output tokens per request.",
                    tokens,
                ));
            }
            let [queue, prefill, decode] = phases;
            for (name, description, points) in [
                (
                    "ringside.server.request.queue.duration",
                    "Time requests waited for a sequence slot (arrival to scheduling).",
                    queue,
                ),
                (
                    "ringside.server.request.prefill.duration",
                    "Time requests spent in prefill (scheduling to first token).",
                    prefill,
                ),
                (
                    "ringside.server.request.decode.duration",
                    "Time requests spent in decode (first token to last token).",
                    decode,
                ),
            ] {
                if !points.is_empty() {
                    metrics.push(hist(name, "s", description, points));
                }
            }
            if !ttft.is_empty() {
                metrics.push(hist(
                    "gen_ai.server.time_to_first_token",
                    "s",
                    "Time to generate first token for successful responses.",
                    ttft,
                ));
            }
            if !tpot.is_empty() {
                metrics.push(hist(
                    "gen_ai.server.time_per_output_token",
                    "s",
                    "Time per output token generated after the first token for successful responses.",
                    tpot,
                ));
            }
            if !inter_token.is_empty() {
                // Not a semconv metric: v1.41 defines only the client's
                // `gen_ai.client.operation.time_per_output_chunk`.
                metrics.push(hist(
                    "ringside.server.inter_token.duration",
                    "s",
                    "Time between two consecutive output tokens of a request, every gap (from the engine's steps).",
                    inter_token,
                ));
            }
            if let Some(steps) = &engine.steps {
                metrics.push(hist(
                    "ringside.server.step.duration",
                    "s",
                    "Duration of one engine step (its decode calls and prompt chunks).",
                    vec![steps.duration.point(Vec::new(), start, now_unix_ns)],
                ));
                metrics.push(hist(
                    "ringside.server.step.batch_size",
                    "{sequence}",
                    "Sequences one engine step decoded or prefilled.",
                    vec![steps.batch_size.point(Vec::new(), start, now_unix_ns)],
                ));
                if steps.kv_cells_total > 0 {
                    metrics.push(ratio_gauge(
                        "ringside.server.kv_cache.usage",
                        "Fraction of KV cache cells holding tokens, at the start of the engine's most recent step.",
                        f64::from(steps.kv_cells_used) / f64::from(steps.kv_cells_total),
                        now_unix_ns,
                    ));
                }
            }
            if let Some(occupied) = engine.slots {
                metrics.push(gauge(
                    "ringside.server.slots.occupied",
                    "{sequence}",
                    "Sequence slots holding a request (prefilling or decoding), from the in-flight table.",
                    occupied,
                    now_unix_ns,
                ));
            }
            if let Some(total) = engine.steps.as_ref().map(|s| s.slots_total) {
                metrics.push(gauge(
                    "ringside.server.slots.total",
                    "{sequence}",
                    "Sequence slots of the engine (its --parallel), from its steps.",
                    u64::from(total),
                    now_unix_ns,
                ));
            }
            metrics.extend(health_metrics(&engine.engine, start, now_unix_ns));
            resource_metrics.push(ResourceMetrics {
                resource: Some(engine.engine.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics,
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            });
        }
        // Agent-wide: queue depth and export failures / retries, on the
        // first engine's resource (there is no engine-less resource).
        if let Some(first) = resource_metrics.first_mut()
            && let Some(scope_metrics) = first.scope_metrics.first_mut()
        {
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            scope_metrics.metrics.push(sum(
                "ringside.agent.export.failures",
                "Failed export attempts (all engines).",
                vec![(vec![], load(&export.failures))],
                start,
                now_unix_ns,
            ));
            scope_metrics.metrics.push(sum(
                "ringside.agent.export.retries",
                "Export retries scheduled (all engines).",
                vec![(vec![], load(&export.retries))],
                start,
                now_unix_ns,
            ));
            scope_metrics.metrics.push(sum(
                "ringside.agent.spans.rejected",
                "Spans the collector rejected in partial successes (all engines).",
                vec![(vec![], load(&export.rejected_spans))],
                start,
                now_unix_ns,
            ));
            if !self.deaths.is_empty() {
                scope_metrics.metrics.push(sum(
                    "ringside.agent.engine.deaths",
                    "Engine processes that ended while the agent read their segment, per engine instance.",
                    self.deaths
                        .iter()
                        .map(|(instance, n)| (vec![kv_str("ringside.engine.instance", instance.clone())], *n))
                        .collect(),
                    start,
                    now_unix_ns,
                ));
            }
            scope_metrics.metrics.push(gauge(
                "ringside.agent.queue.depth",
                "{request}",
                "Requests waiting in the export queue (all engines).",
                queue_depth,
                now_unix_ns,
            ));
        }
        ExportMetricsServiceRequest { resource_metrics }
    }
}

/// The instrumentation scope of everything the agent emits.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "ringside-agent".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..InstrumentationScope::default()
    }
}

fn sum(
    name: &str,
    description: &str,
    points: Vec<(Vec<KeyValue>, u64)>,
    start: u64,
    now: u64,
) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: "1".to_owned(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points
                .into_iter()
                .map(|(attributes, value)| NumberDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsInt(
                        i64::try_from(value).unwrap_or(i64::MAX),
                    )),
                    ..NumberDataPoint::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Metric::default()
    }
}

fn ratio_gauge(name: &str, description: &str, value: f64, now: u64) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: "1".to_owned(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint {
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..NumberDataPoint::default()
            }],
        })),
        ..Metric::default()
    }
}

fn gauge(name: &str, unit: &str, description: &str, value: u64, now: u64) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint {
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(
                    i64::try_from(value).unwrap_or(i64::MAX),
                )),
                ..NumberDataPoint::default()
            }],
        })),
        ..Metric::default()
    }
}

fn health_metrics(engine: &EngineHandle, start: u64, now: u64) -> Vec<Metric> {
    let s = engine.stats.snapshot();
    let cause = |c: &str| vec![kv_str("cause", c)];
    vec![
        sum(
            "ringside.agent.records.read",
            "Records read from the engine's ring.",
            vec![(vec![], s.read)],
            start,
            now,
        ),
        sum(
            "ringside.agent.records.lost",
            "Records lost, by cause.",
            vec![
                (cause("overwritten"), s.lost_overwritten),
                (cause("abandoned"), s.lost_abandoned),
                (cause("invalid"), s.invalid),
                (cause("queue_full"), s.queue_dropped),
                (cause("export_failed"), s.export_failed),
            ],
            start,
            now,
        ),
        sum(
            "ringside.agent.records.sampled_out",
            "Records left out by the head sampler.",
            vec![(vec![], s.sampled_out)],
            start,
            now,
        ),
        sum(
            "ringside.agent.spans.exported",
            "Spans accepted by the collector.",
            vec![(
                vec![kv_int("process.pid", i64::from(engine.pid))],
                s.spans_exported,
            )],
            start,
            now,
        ),
        sum(
            "ringside.agent.requests.crashed",
            "Requests the engine held when it died (from its in-flight table), exported as engine_crashed spans.",
            vec![(vec![], s.crashed_in_flight)],
            start,
            now,
        ),
        sum(
            "ringside.agent.capture.requests",
            "Requests incident captures handed on, by outcome (apart from the engine's own accounting).",
            {
                let c = engine
                    .capture
                    .get()
                    .map(|h| h.stats.snapshot())
                    .unwrap_or_default();
                vec![
                    (vec![kv_str("outcome", "exported")], c.exported),
                    (vec![kv_str("outcome", "failed")], c.export_failed),
                    (vec![kv_str("outcome", "dropped")], c.queue_dropped),
                ]
            },
            start,
            now,
        ),
        sum(
            "ringside.agent.steps.read",
            "Step records read from the engine's step ring.",
            vec![(vec![], engine.stats.steps_read.load(Ordering::Relaxed))],
            start,
            now,
        ),
        sum(
            "ringside.agent.steps.lost",
            "Step records lost, by cause (inter-token statistics need every step of a request).",
            vec![
                (
                    cause("overwritten"),
                    engine.stats.steps_overwritten.load(Ordering::Relaxed),
                ),
                (
                    cause("abandoned"),
                    engine.stats.steps_abandoned.load(Ordering::Relaxed),
                ),
                (
                    cause("invalid"),
                    engine.stats.steps_invalid.load(Ordering::Relaxed),
                ),
            ],
            start,
            now,
        ),
        sum(
            "ringside.agent.capture.steps.exported",
            "Steps of incident captures exported as engine_step spans.",
            vec![(
                vec![],
                engine.stats.capture_steps_exported.load(Ordering::Relaxed),
            )],
            start,
            now,
        ),
        sum(
            "ringside.agent.capture.steps.failed",
            "Steps of incident captures whose export failed (or was cut off at shutdown).",
            vec![(
                vec![],
                engine.stats.capture_steps_failed.load(Ordering::Relaxed),
            )],
            start,
            now,
        ),
        sum(
            "ringside.agent.capture.steps.dropped",
            "Steps of incident captures the export queue dropped to stay within its cap for them.",
            vec![(
                vec![],
                engine.stats.capture_steps_dropped.load(Ordering::Relaxed),
            )],
            start,
            now,
        ),
        sum(
            "ringside.agent.requests.unjoined",
            "Requests exported without inter-token statistics because some of their steps were not in the window.",
            vec![(vec![], engine.stats.steps_unjoined.load(Ordering::Relaxed))],
            start,
            now,
        ),
        gauge(
            "ringside.agent.requests.stalled",
            "{request}",
            "In-flight requests with no progress for the stall threshold.",
            engine.stats.stalled.load(Ordering::Relaxed),
            now,
        ),
        gauge(
            "ringside.agent.lag",
            "{record}",
            "Records the engine wrote that the agent has not read yet.",
            engine.stats.lag.load(Ordering::Relaxed),
            now,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::accounting::EngineStats;
    use crate::pipeline::spans::tests::raw_record;
    use opentelemetry_proto::tonic::resource::v1::Resource;

    /// The metric called `name` (the test fails without it).
    fn named<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
        metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    }

    fn engine(id: u64, instance: &str) -> Arc<EngineHandle> {
        Arc::new(EngineHandle {
            id,
            instance: instance.into(),
            pid: 1,
            resource: Resource::default(),
            stats: EngineStats::default(),
            capture: Default::default(),
        })
    }

    #[test]
    fn buckets_are_upper_inclusive_and_complete() {
        let mut h = Hist::new(DURATION_BOUNDS);
        for v in [0.0, 0.01, 0.0100001, 81.92, 100.0] {
            h.record(v);
        }
        assert_eq!(h.counts.len(), DURATION_BOUNDS.len() + 1);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[13], 1);
        assert_eq!(h.counts[14], 1);
        assert_eq!(h.count, 5);
    }

    #[test]
    fn records_become_semconv_histograms_with_the_spec_boundaries() {
        let engine = engine(7, "e");
        let mut m = Metrics::new(1);
        let rec = raw_record(1).decode(1).unwrap();
        m.record(&engine, "gemma", &rec);
        m.record(&engine, "gemma", &rec);
        assert_eq!(m.requests(7), 2);
        let req = m.to_request(2, 0, &ExportCounters::default());
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let find = |name: &str| named(metrics, name);
        let points = |name: &str| match &find(name).data {
            Some(metric::Data::Histogram(h)) => h.data_points.clone(),
            other => panic!("{other:?}"),
        };
        let d = points("gen_ai.server.request.duration");
        assert_eq!(d[0].explicit_bounds, DURATION_BOUNDS);
        assert_eq!(d[0].count, 2);
        assert_eq!(d[0].sum, Some(3.2));
        assert_eq!(
            points("gen_ai.server.time_to_first_token")[0].explicit_bounds,
            TTFT_BOUNDS
        );
        let tpot = points("gen_ai.server.time_per_output_token");
        assert_eq!(tpot[0].explicit_bounds, TPOT_BOUNDS);
        // 1 s of decode over 10 steps.
        assert_eq!(tpot[0].sum, Some(0.2));
        let tokens = points("ringside.server.token.usage");
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].sum, Some(24.0));
        assert_eq!(tokens[1].sum, Some(22.0));
        for name in [
            "ringside.agent.records.read",
            "ringside.agent.records.lost",
            "ringside.agent.lag",
            "ringside.agent.queue.depth",
            "ringside.agent.export.retries",
        ] {
            find(name);
        }
    }

    #[test]
    fn each_phase_of_a_request_is_its_own_histogram_and_unreached_phases_are_not_recorded() {
        let engine = engine(7, "e");
        let mut m = Metrics::new(1);
        // queue 0.25 s, prefill 0.25 s, decode 1 s.
        let finished = raw_record(1).decode(1).unwrap();
        m.record(&engine, "gemma", &finished);
        // Failed in the queue: a queue phase it never left is not a queue time.
        let mut queued = finished;
        queued.timestamps.scheduled_ns = None;
        queued.timestamps.first_token_ns = None;
        queued.timestamps.last_token_ns = None;
        queued.error_type = ringside_shm_protocol::ErrorType::Unavailable;
        queued.http_status = 503;
        m.record(&engine, "gemma", &queued);
        let req = m.to_request(2, 0, &ExportCounters::default());
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let points = |name: &str| {
            let metric = metrics
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name}"));
            assert_eq!(metric.unit, "s", "{name}");
            match &metric.data {
                Some(metric::Data::Histogram(h)) => h.data_points.clone(),
                other => panic!("{other:?}"),
            }
        };
        for (name, seconds) in [
            ("ringside.server.request.queue.duration", 0.25),
            ("ringside.server.request.prefill.duration", 0.25),
            ("ringside.server.request.decode.duration", 1.0),
        ] {
            let p = points(name);
            assert_eq!(p.len(), 1, "{name}: only the finished request's series");
            assert_eq!(p[0].explicit_bounds, DURATION_BOUNDS, "{name}");
            assert_eq!((p[0].count, p[0].sum), (1, Some(seconds)), "{name}");
        }
        // Both requests are in the end-to-end histogram, in their own series.
        assert_eq!(points("gen_ai.server.request.duration").len(), 2);
        assert!(
            metrics
                .iter()
                .all(|m| m.name != "gen_ai.server.token.usage"),
            "semconv defines no server token usage metric"
        );
    }

    #[test]
    fn steps_become_gap_step_and_batch_histograms_and_kv_and_slot_gauges() {
        let engine = engine(7, "e");
        let mut m = Metrics::new(1);
        let record = raw_record(1).decode(1).unwrap();
        m.record(&engine, "gemma", &record);
        m.record_gaps(7, &record, &[20_000_000, 30_000_000, 900_000_000]);
        let mut step = ringside_shm_protocol::Step {
            step: 1,
            t_start_ns: 1_000,
            t_decode_end_ns: 2_000_000,
            t_end_ns: 4_001_000,
            decode_rows: 4,
            decode_calls: 1,
            prefill_calls: 1,
            prefill_tokens: 64,
            slots_total: 4,
            kv_cells_used: 300,
            kv_cells_total: 1200,
            ..Default::default()
        };
        step.decode_slots.insert(0);
        step.decode_slots.insert(1);
        step.prefill_slots.insert(2);
        m.record_step(7, &step);
        m.record_slots(7, 3);
        let req = m.to_request(2, 0, &ExportCounters::default());
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let find = |name: &str| named(metrics, name);
        let hist = |name: &str| match &find(name).data {
            Some(metric::Data::Histogram(h)) => h.data_points[0].clone(),
            other => panic!("{other:?}"),
        };
        let gauge = |name: &str| match &find(name).data {
            Some(metric::Data::Gauge(g)) => g.data_points[0].value,
            other => panic!("{other:?}"),
        };
        let gaps = hist("ringside.server.inter_token.duration");
        assert_eq!(gaps.count, 3);
        assert!((gaps.sum.unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(gaps.explicit_bounds, GAP_BOUNDS);
        assert_eq!(find("ringside.server.inter_token.duration").unit, "s");
        let duration = hist("ringside.server.step.duration");
        assert_eq!((duration.count, duration.sum), (1, Some(0.004)));
        let batch = hist("ringside.server.step.batch_size");
        assert_eq!((batch.count, batch.sum), (1, Some(3.0)));
        assert_eq!(
            gauge("ringside.server.kv_cache.usage"),
            Some(number_data_point::Value::AsDouble(0.25))
        );
        assert_eq!(
            gauge("ringside.server.slots.occupied"),
            Some(number_data_point::Value::AsInt(3))
        );
        assert_eq!(
            gauge("ringside.server.slots.total"),
            Some(number_data_point::Value::AsInt(4))
        );
        let text = crate::control::prometheus::render(&req);
        for name in [
            "ringside_server_inter_token_duration_seconds_bucket",
            "ringside_server_step_duration_seconds_count",
            "ringside_server_step_batch_size_bucket",
            "ringside_server_kv_cache_usage",
            "ringside_server_slots_occupied",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }

    #[test]
    fn forged_http_statuses_fold_into_a_bounded_set_of_series() {
        let engine = engine(7, "e");
        let mut m = Metrics::new(1);
        let mut rec = raw_record(1).decode(1).unwrap();
        rec.error_type = ringside_shm_protocol::ErrorType::None;
        for status in 100..=u16::MAX {
            rec.http_status = status;
            m.record(&engine, "gemma", &rec);
        }
        // With a class, the status does not split the class's series.
        rec.error_type = ringside_shm_protocol::ErrorType::Internal;
        for status in 400..=599 {
            rec.http_status = status;
            m.record(&engine, "gemma", &rec);
        }
        let series = &m.engines[&7].series;
        // Success, the statuses with a series of their own, 4xx, 5xx,
        // _OTHER, and the one class.
        assert_eq!(series.len(), 1 + STATUSES_WITH_A_SERIES.len() + 3 + 1);
        let labels: std::collections::BTreeSet<_> =
            series.values().filter_map(|s| s.error.clone()).collect();
        for label in ["4xx", "5xx", "_OTHER", "429", "503"] {
            assert!(labels.contains(label), "{label}: {labels:?}");
        }
        assert_eq!(m.requests(7), u64::from(u16::MAX) - 99 + 200);
    }

    #[test]
    fn the_series_of_a_let_go_engine_are_exported_for_the_retention_then_pruned() {
        let mut m = Metrics::new(1);
        let rec = raw_record(1).decode(1).unwrap();
        for id in 0..100 {
            let engine = engine(id, "restarting");
            m.record(&engine, "gemma", &rec);
            m.let_go(id, 1_000 + id);
        }
        let live = engine(100, "live");
        m.record(&live, "gemma", &rec);
        m.prune(1_000 + LET_GO_RETENTION_NS);
        assert_eq!(m.engine_count(), 101, "within the retention: all exported");
        let req = m.to_request(1_000 + LET_GO_RETENTION_NS, 0, &ExportCounters::default());
        assert_eq!(req.resource_metrics.len(), 101);
        // A second let-go keeps the first stamp.
        m.let_go(99, 5_000 + LET_GO_RETENTION_NS);
        m.prune(1_100 + LET_GO_RETENTION_NS);
        assert_eq!(m.engine_count(), 1, "only the live engine is left");
        assert_eq!(m.requests(100), 1);
    }
}
