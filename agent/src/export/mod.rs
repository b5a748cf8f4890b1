//! Sending batches: OTLP/gRPC (tonic, the generated clients of
//! `opentelemetry-proto`), OTLP/HTTP with protobuf or JSON bodies, the
//! console tree and the JSON-lines file; batching, retry and the shutdown
//! flush.


pub mod console;
pub mod queue;
pub mod retry;
pub(crate) mod wire;

use crate::config::{Compression, ExportTarget, OtlpSettings, Protocol};
use crate::pipeline::metrics::{ExportCounters, Metrics, scope};
use crate::export::queue::{ExportQueue, Item};
use crate::export::retry::{Jitter, Verdict};
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse as MetricsResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse as TraceResponse,
};
use prost::Message;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Why an exporter could not be set up. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ExportSetupError {
    /// The endpoint is not a usable URI.
    #[error("endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A header cannot be sent as gRPC metadata or an HTTP header.
    #[error("header {0:?} cannot be sent")]
    Header(String),
    /// The HTTP client could not be built (TLS setup).
    #[error("HTTP client: {0}")]
    Http(String),
    /// The output file could not be opened.
    #[error("cannot open {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The result of one export attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Accepted; `rejected` items were refused by the server (partial
    /// success, never retried).
    Accepted {
        /// Spans or data points the server rejected.
        rejected: i64,
        /// Its message.
        message: String,
    },
    /// Failed.
    Failed {
        /// Retry or give up.
        verdict: Verdict,
        /// What happened.
        error: String,
    },
}

#[derive(Debug)]
struct Grpc {
    /// Sends pre-encoded requests (see [`RawCodec`]).
    traces: tonic::client::Grpc<Channel>,
    metrics: MetricsServiceClient<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

#[derive(Debug)]
struct Http {
    client: reqwest::Client,
    traces_url: String,
    metrics_url: String,
    json: bool,
    gzip: bool,
    headers: reqwest::header::HeaderMap,
}

/// Where batches go.
#[derive(Debug)]
pub enum Transport {
    /// OTLP/gRPC.
    Grpc(Box<GrpcTransport>),
    /// OTLP/HTTP.
    Http(Box<HttpTransport>),
    /// Trees on stdout.
    Console,
    /// JSON lines in a file.
    File(Mutex<std::io::BufWriter<std::fs::File>>),
}

/// OTLP/gRPC state.
#[derive(Debug)]
pub struct GrpcTransport(Grpc);
/// OTLP/HTTP state.
#[derive(Debug)]
pub struct HttpTransport(Http);

fn grpc_channel(url: &str, timeout: Duration) -> Result<Channel, ExportSetupError> {
    let bad = |reason: String| ExportSetupError::Endpoint {
        endpoint: url.to_owned(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .timeout(timeout)
        .connect_timeout(timeout);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

impl Transport {
    /// Sets up the exporter for `target`. gRPC connects lazily: a collector
    /// that is down at start is retried like any other outage.
    pub fn new(target: &ExportTarget) -> Result<Self, ExportSetupError> {
        match target {
            ExportTarget::Console => Ok(Self::Console),
            ExportTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ExportSetupError::File {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Self::File(Mutex::new(std::io::BufWriter::new(file))))
            }
            ExportTarget::Otlp(o) => Self::otlp(o),
        }
    }

    fn otlp(o: &OtlpSettings) -> Result<Self, ExportSetupError> {
        match o.protocol {
            Protocol::Grpc => {
                let mut metadata = MetadataMap::new();
                for (key, value) in &o.headers {
                    let k = MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                        .map_err(|_| ExportSetupError::Header(key.clone()))?;
                    let v = MetadataValue::try_from(value.as_str())
                        .map_err(|_| ExportSetupError::Header(key.clone()))?;
                    metadata.insert(k, v);
                }
                let mut traces =
                    tonic::client::Grpc::new(grpc_channel(&o.traces_endpoint, o.timeout)?);
                let mut metrics =
                    MetricsServiceClient::new(grpc_channel(&o.metrics_endpoint, o.timeout)?);
                if o.compression == Compression::Gzip {
                    traces = traces.send_compressed(CompressionEncoding::Gzip);
                    metrics = metrics.send_compressed(CompressionEncoding::Gzip);
                }
                traces = traces.max_decoding_message_size(4 << 20);
                Ok(Self::Grpc(Box::new(GrpcTransport(Grpc {
                    traces,
                    metrics,
                    metadata,
                    timeout: o.timeout,
                }))))
            }
            Protocol::HttpProtobuf | Protocol::HttpJson => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (key, value) in &o.headers {
                    let k = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                        .map_err(|_| ExportSetupError::Header(key.clone()))?;
                    let v = reqwest::header::HeaderValue::from_str(value)
                        .map_err(|_| ExportSetupError::Header(key.clone()))?;
                    headers.insert(k, v);
                }
                let client = reqwest::Client::builder()
                    .timeout(o.timeout)
                    .user_agent(concat!("ringside-agent/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| ExportSetupError::Http(e.to_string()))?;
                for url in [&o.traces_endpoint, &o.metrics_endpoint] {
                    reqwest::Url::parse(url).map_err(|e| ExportSetupError::Endpoint {
                        endpoint: url.clone(),
                        reason: e.to_string(),
                    })?;
                }
                Ok(Self::Http(Box::new(HttpTransport(Http {
                    client,
                    traces_url: o.traces_endpoint.clone(),
                    metrics_url: o.metrics_endpoint.clone(),
                    json: o.protocol == Protocol::HttpJson,
                    gzip: o.compression == Compression::Gzip,
                    headers,
                }))))
            }
        }
    }

    /// Whether this is the console exporter (which skips metrics).
    pub fn is_console(&self) -> bool {
        matches!(self, Self::Console)
    }

    /// One attempt to send spans: `body` is an encoded
    /// `ExportTraceServiceRequest` (see [`encode_trace_request`]).
    pub async fn send_traces(&self, body: &Bytes, console_text: &str) -> Attempt {
        match self {
            Self::Grpc(g) => {
                let g = &g.0;
                // A clone shares the channel (HTTP/2 multiplexes the batches
                // in flight on one connection).
                let mut client = g.traces.clone();
                let mut req = tonic::Request::new(body.clone());
                *req.metadata_mut() = g.metadata.clone();
                req.set_timeout(g.timeout);
                if let Err(e) = client.ready().await {
                    return Attempt::Failed {
                        verdict: Verdict::Retry(None),
                        error: format!("gRPC channel not ready: {e}"),
                    };
                }
                let path = PathAndQuery::from_static(TRACE_EXPORT_PATH);
                match client
                    .unary(req, path, RawCodec::<TraceResponse>::default())
                    .await
                {
                    Ok(resp) => {
                        let p = resp.into_inner().partial_success.unwrap_or_default();
                        Attempt::Accepted {
                            rejected: p.rejected_spans,
                            message: p.error_message,
                        }
                    }
                    Err(status) => grpc_failure(&status),
                }
            }
            Self::Http(h) => {
                let h = &h.0;
                let body = if h.json {
                    match decode_trace_request(body).and_then(|r| json_body(&r)) {
                        Ok(json) => json,
                        Err(failed) => return failed,
                    }
                } else {
                    body.to_vec()
                };
                http_export(h, &h.traces_url, body, |r: TraceResponse| {
                    r.partial_success
                        .map(|p| (p.rejected_spans, p.error_message))
                })
                .await
            }
            Self::Console => {
                let mut out = std::io::stdout().lock();
                match out
                    .write_all(console_text.as_bytes())
                    .and_then(|()| out.flush())
                {
                    Ok(()) => Attempt::Accepted {
                        rejected: 0,
                        message: String::new(),
                    },
                    Err(e) => Attempt::Failed {
                        verdict: Verdict::Permanent,
                        error: format!("stdout: {e}"),
                    },
                }
            }
            Self::File(file) => match decode_trace_request(body) {
                Ok(request) => write_json_line(file, &request),
                Err(failed) => failed,
            },
        }
    }

    /// One attempt to send metrics.
    pub async fn send_metrics(&self, request: &ExportMetricsServiceRequest) -> Attempt {
        match self {
            Self::Grpc(g) => {
                let g = &g.0;
                let mut req = tonic::Request::new(request.clone());
                *req.metadata_mut() = g.metadata.clone();
                req.set_timeout(g.timeout);
                match g.metrics.clone().export(req).await {
                    Ok(resp) => {
                        let p = resp.into_inner().partial_success.unwrap_or_default();
                        Attempt::Accepted {
                            rejected: p.rejected_data_points,
                            message: p.error_message,
                        }
                    }
                    Err(status) => grpc_failure(&status),
                }
            }
            Self::Http(h) => {
                let h = &h.0;
                let body = if h.json {
                    match json_body(request) {
                        Ok(json) => json,
                        Err(failed) => return failed,
                    }
                } else {
                    request.encode_to_vec()
                };
                http_export(h, &h.metrics_url, body, |r: MetricsResponse| {
                    r.partial_success
                        .map(|p| (p.rejected_data_points, p.error_message))
                })
                .await
            }
            Self::Console => Attempt::Accepted {
                rejected: 0,
                message: String::new(),
            },
            Self::File(file) => write_json_line(file, request),
        }
    }
}

/// Decodes an OTLP/HTTP response body in the protocol's encoding; an
/// undecodable body counts as full success (the status code already said so).
fn decode_response<R: Message + Default + serde::de::DeserializeOwned>(
    h: &Http,
    body: &[u8],
) -> Option<R> {
    if h.json {
        serde_json::from_slice(body).ok()
    } else {
        R::decode(body).ok()
    }
}

fn write_json_line<T: serde::Serialize>(
    file: &Mutex<std::io::BufWriter<std::fs::File>>,
    request: &T,
) -> Attempt {
    let line = match serde_json::to_string(request) {
        Ok(l) => l,
        Err(e) => {
            return Attempt::Failed {
                verdict: Verdict::Permanent,
                error: format!("JSON encoding: {e}"),
            };
        }
    };
    let mut w = file
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match writeln!(w, "{line}").and_then(|()| w.flush()) {
        Ok(()) => Attempt::Accepted {
            rejected: 0,
            message: String::new(),
        },
        Err(e) => Attempt::Failed {
            verdict: Verdict::Permanent,
            error: format!("writing the output file: {e}"),
        },
    }
}

fn grpc_failure(status: &tonic::Status) -> Attempt {
    let info = retry::grpc_retry_info(status.details());
    Attempt::Failed {
        verdict: retry::classify_grpc(status.code(), info),
        error: format!("gRPC {:?}: {}", status.code(), status.message()),
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// The gRPC method of trace export.
const TRACE_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC codec sending bytes that already are an encoded request, and
/// decoding the response `R` with prost: the batch is encoded once, not once
/// per attempt, and never as owned structs.
#[derive(Debug)]
struct RawCodec<R>(std::marker::PhantomData<R>);

impl<R> Default for RawCodec<R> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct ProstDecoder<R>(std::marker::PhantomData<R>);

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl<R: Message + Default> tonic::codec::Decoder for ProstDecoder<R> {
    type Item = R;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<R>, tonic::Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable response: {e}")))
    }
}

impl<R: Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder(std::marker::PhantomData)
    }
}

/// An encoded trace request as structs, for the exporters that write JSON.
fn decode_trace_request(body: &[u8]) -> Result<ExportTraceServiceRequest, Attempt> {
    ExportTraceServiceRequest::decode(body).map_err(|e| Attempt::Failed {
        verdict: Verdict::Permanent,
        error: format!("the batch does not decode: {e}"),
    })
}

fn json_body<T: serde::Serialize>(request: &T) -> Result<Vec<u8>, Attempt> {
    serde_json::to_vec(request).map_err(|e| Attempt::Failed {
        verdict: Verdict::Permanent,
        error: format!("JSON encoding: {e}"),
    })
}

/// POSTs `body` and reads the partial success (rejected items and the
/// server's message) out of the response `R` with `partial`.
async fn http_export<R: Message + Default + serde::de::DeserializeOwned>(
    h: &Http,
    url: &str,
    body: Vec<u8>,
    partial: impl FnOnce(R) -> Option<(i64, String)>,
) -> Attempt {
    match http_post(h, url, body).await {
        Ok(response) => {
            let (rejected, message) = decode_response::<R>(h, &response)
                .and_then(partial)
                .unwrap_or_default();
            Attempt::Accepted { rejected, message }
        }
        Err(failed) => failed,
    }
}

async fn http_post(h: &Http, url: &str, mut body: Vec<u8>) -> Result<Vec<u8>, Attempt> {
    let permanent = |error: String| Attempt::Failed {
        verdict: Verdict::Permanent,
        error,
    };
    let content_type = if h.json {
        "application/json"
    } else {
        "application/x-protobuf"
    };
    let mut builder = h
        .client
        .post(url)
        .headers(h.headers.clone())
        .header(reqwest::header::CONTENT_TYPE, content_type);
    if h.gzip {
        body = gzip(&body).map_err(|e| permanent(format!("gzip: {e}")))?;
        builder = builder.header(reqwest::header::CONTENT_ENCODING, "gzip");
    }
    let response = builder
        .body(body)
        .send()
        .await
        .map_err(|e| Attempt::Failed {
            // Connection refused, reset, timeout: the collector may come back.
            verdict: Verdict::Retry(None),
            error: format!("HTTP {url}: {e}"),
        })?;
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Ok(response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default());
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.unwrap_or_default();
    let text: String = text.chars().take(200).collect();
    Err(Attempt::Failed {
        verdict: retry::classify_http(status, retry_after.as_deref()),
        error: format!("HTTP {status} from {url}: {text}"),
    })
}

/// Encodes one export request from whole requests: one `ResourceSpans` per
/// engine (in order of first appearance) with one `ScopeSpans` holding its
/// requests' spans in queue order, written straight from the records. The
/// same bytes prost would write for the equivalent structs.
pub fn encode_trace_request(items: &[Item]) -> Vec<u8> {
    use crate::export::wire::{bytes_field, message};
    /// A request span with both attribute sets and three children.
    const TYPICAL_REQUEST_BYTES: usize = 1536;
    let scope = scope().encode_to_vec();
    let mut engines: Vec<&Arc<EngineHandle>> = Vec::new();
    for item in items {
        if !engines.iter().any(|e| e.id == item.engine.id) {
            engines.push(&item.engine);
        }
    }
    let mut out = Vec::with_capacity(items.len() * TYPICAL_REQUEST_BYTES + engines.len() * 512);
    for engine in engines {
        // ExportTraceServiceRequest.resource_spans (1) → ResourceSpans {
        // resource (1), scope_spans (2) → ScopeSpans { scope (1), spans (2)… } }
        message(&mut out, 1, |out| {
            bytes_field(out, 1, &engine.resource.encode_to_vec());
            message(out, 2, |out| {
                bytes_field(out, 1, &scope);
                for item in items.iter().filter(|i| i.engine.id == engine.id) {
                    crate::pipeline::spans::encode(&item.ctx, &item.record, item.detail, out);
                }
            });
        });
    }
    out
}

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
    /// How long a batch in flight at shutdown may still be retried.
    pub shutdown_timeout: Duration,
    /// Export requests in flight at once over OTLP (the console and the file
    /// write one batch at a time, in order). One request at a time caps
    /// throughput at one batch per round trip to the collector.
    pub max_in_flight: usize,
    in_flight: tokio::task::JoinSet<u64>,
    /// The engine of every request of each batch in flight, to count them
    /// failed if the batch is cut off at the shutdown deadline.
    in_flight_engines: HashMap<tokio::task::Id, Vec<Arc<EngineHandle>>>,
    /// Requests of batches that failed after the stop signal but ended
    /// before [`flush`](Self::flush) began: part of its report.
    failed_after_stop: u64,
    jitter: Jitter,
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

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What sending one batch needs; cloned into each batch's task.
#[derive(Clone, Debug)]
struct BatchSender {
    transport: Arc<Transport>,
    counters: Arc<ExportCounters>,
    retry_max_elapsed: Duration,
    shutdown_timeout: Duration,
    jitter: Jitter,
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
            // Full batches as soon as they are full, while there is room in
            // flight; a partial one once the batch delay has passed.
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

    /// Starts sending one batch in its own task.
    fn start(
        &mut self,
        items: Vec<Item>,
        deadline: Option<Instant>,
        stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) {
        let engines = items.iter().map(|i| Arc::clone(&i.engine)).collect();
        let sender = BatchSender {
            transport: Arc::clone(&self.transport),
            counters: Arc::clone(&self.counters),
            retry_max_elapsed: self.retry_max_elapsed,
            shutdown_timeout: self.shutdown_timeout,
            jitter: self.jitter.clone(),
        };
        // Each batch its own jitter sequence.
        self.jitter.sample();
        let task = self.in_flight.spawn(sender.send(items, deadline, stop));
        self.in_flight_engines.insert(task.id(), engines);
    }

    /// Accounts for a finished batch task; returns its requests that failed.
    fn settle(&mut self, joined: Result<(tokio::task::Id, u64), tokio::task::JoinError>) -> u64 {
        match joined {
            Ok((id, failed)) => {
                self.in_flight_engines.remove(&id);
                failed
            }
            Err(e) => {
                // Cut off at the shutdown deadline (or a bug): its requests
                // were neither exported nor counted yet.
                let engines = self.in_flight_engines.remove(&e.id()).unwrap_or_default();
                if e.is_panic() {
                    tracing::error!(
                        requests = engines.len(),
                        "an export task panicked; its batch is counted failed"
                    );
                }
                for engine in &engines {
                    EngineStats::add(&engine.stats.export_failed, 1);
                }
                engines.len() as u64
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
        if Instant::now() < deadline {
            self.export_metrics(Some(deadline)).await;
        }
        report
    }

    async fn export_metrics(&mut self, deadline: Option<Instant>) {
        if self.transport.is_console() {
            return;
        }
        let request = {
            let metrics = self
                .metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            metrics.to_request(unix_now_ns(), self.queue.len() as u64, &self.counters)
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

impl BatchSender {
    /// Sends one batch with retries; returns the number of requests whose
    /// export failed (0 on success). Every request ends counted as exported
    /// or failed.
    async fn send(
        mut self,
        items: Vec<Item>,
        mut deadline: Option<Instant>,
        mut stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> u64 {
        let console_text = if self.transport.is_console() {
            crate::export::console::render(&items)
        } else {
            String::new()
        };
        let total_spans: u64 = items.iter().map(|i| i.spans as u64).sum();
        // Encoded once; every attempt sends the same bytes.
        let body = Bytes::from(encode_trace_request(&items));
        let started = Instant::now();
        let mut attempt_no = 0u32;
        loop {
            let attempt = match deadline {
                // During the shutdown flush no attempt may outlast the deadline.
                Some(dl) => match tokio::time::timeout(
                    dl.saturating_duration_since(Instant::now()),
                    self.transport.send_traces(&body, &console_text),
                )
                .await
                {
                    Ok(a) => a,
                    Err(_) => Attempt::Failed {
                        verdict: Verdict::Permanent,
                        error: "the shutdown deadline passed during the export".to_owned(),
                    },
                },
                None => self.transport.send_traces(&body, &console_text).await,
            };
            let (verdict, error) = match attempt {
                Attempt::Accepted { rejected, message } => {
                    if rejected > 0 {
                        self.counters
                            .rejected_spans
                            .fetch_add(u64::try_from(rejected).unwrap_or(0), Ordering::Relaxed);
                        tracing::warn!(rejected, %message, "collector rejected part of a batch (partial success, not retried)");
                    }
                    for item in &items {
                        EngineStats::add(&item.engine.stats.exported, 1);
                        EngineStats::add(&item.engine.stats.spans_exported, item.spans as u64);
                    }
                    return 0;
                }
                Attempt::Failed { verdict, error } => (verdict, error),
            };
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            if stop.as_ref().is_some_and(|s| *s.borrow()) {
                // Shutting down: keep trying, but only until the flush deadline.
                deadline = Some(Instant::now() + self.shutdown_timeout);
                stop = None;
            }
            let delay = match verdict {
                Verdict::Retry(hint) => {
                    Some(retry::backoff_delay(attempt_no, hint, self.jitter.sample()))
                }
                Verdict::Permanent => None,
            };
            let delay = delay.filter(|d| {
                retry::within_budget(started.elapsed(), *d, self.retry_max_elapsed)
                    && deadline.is_none_or(|dl| Instant::now() + *d < dl)
            });
            let Some(delay) = delay else {
                let n = items.len() as u64;
                tracing::error!(%error, requests = n, spans = total_spans, "export failed; dropping the batch");
                for item in &items {
                    EngineStats::add(&item.engine.stats.export_failed, 1);
                }
                return n;
            };
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            if attempt_no == 0 {
                tracing::warn!(%error, "export failed; retrying with backoff");
            } else {
                tracing::debug!(%error, delay_ms = delay.as_millis() as u64, attempt = attempt_no, "export failed; retrying");
            }
            attempt_no = attempt_no.saturating_add(1);
            match stop.as_mut() {
                Some(s) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = s.changed() => {
                            // Shutting down: retry now, within the shutdown deadline.
                            deadline = Some(Instant::now() + self.shutdown_timeout);
                            stop = None;
                        }
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AttributeSet;
    use crate::pipeline::spans::tests::{ctx, raw_record};
    use ringside_shm_protocol::Detail;
    use std::sync::atomic::AtomicUsize;

    fn item(id: u64, seq: u64) -> Item {
        let record = raw_record(seq).decode(1).unwrap();
        let engine = Arc::new(EngineHandle {
            id,
            instance: format!("e{id}"),
            pid: 1,
            resource: crate::pipeline::resource::ResourceEnv {
                service_name: "s".into(),
                extra: vec![],
                host_name: "h".into(),
            }
            .engine_resource(&format!("e{id}"), 1),
            stats: EngineStats::default(),
        });
        Item::new(
            engine,
            Arc::new(ctx(AttributeSet::Both)),
            record,
            Detail::Phases,
        )
    }

    fn trace_request(items: &[Item]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(encode_trace_request(items).as_slice()).unwrap()
    }

    #[test]
    fn a_batch_groups_spans_by_engine_resource() {
        let a = item(1, 1);
        let b = item(2, 2);
        let mut a2 = item(1, 3);
        a2.engine = Arc::clone(&a.engine);
        let items = [a, b, a2];
        let encoded = encode_trace_request(&items);
        let req = trace_request(&items);
        // Canonical: what prost writes for the same structs.
        assert_eq!(req.encode_to_vec(), encoded);
        assert_eq!(
            req.resource_spans[0].resource.as_ref(),
            Some(&items[0].engine.resource)
        );
        assert_eq!(
            req.resource_spans[1].resource.as_ref(),
            Some(&items[1].engine.resource)
        );
        let first = &req.resource_spans[0].scope_spans[0].spans;
        let spans_of = |i: &Item| crate::pipeline::spans::convert(&i.ctx, &i.record, i.detail);
        assert_eq!(first[..4], spans_of(&items[0])[..]);
        assert_eq!(first[4..], spans_of(&items[2])[..]);
        assert_eq!(req.resource_spans.len(), 2);
        assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 8);
        assert_eq!(req.resource_spans[1].scope_spans[0].spans.len(), 4);
        assert_eq!(
            req.resource_spans[0].scope_spans[0]
                .scope
                .as_ref()
                .unwrap()
                .name,
            "ringside-agent"
        );
    }

    #[test]
    fn json_bodies_use_otlp_json_conventions() {
        let req = trace_request(&[item(1, 1)]);
        let json = serde_json::to_value(&req).unwrap();
        let span = &json["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "0000000000000001abababababababab");
        assert_eq!(span["spanId"], "0000000000000002");
        assert_eq!(span["parentSpanId"], "1111111111111111");
        assert_eq!(span["kind"], 2);
        assert!(span["startTimeUnixNano"].is_string() || span["startTimeUnixNano"].is_number());
        let back: ExportTraceServiceRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
    }

    #[tokio::test]
    async fn the_file_exporter_writes_one_json_line_per_request() {
        let path =
            std::env::temp_dir().join(format!("ringside-agent-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let t = Transport::new(&ExportTarget::File(path.clone())).unwrap();
        let items = [item(1, 1)];
        let req = trace_request(&items);
        let body = Bytes::from(encode_trace_request(&items));
        assert!(matches!(
            t.send_traces(&body, "").await,
            Attempt::Accepted { .. }
        ));
        assert!(matches!(
            t.send_traces(&body, "").await,
            Attempt::Accepted { .. }
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let line: ExportTraceServiceRequest =
            serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line, req);
        let _ = std::fs::remove_file(&path);
    }

    /// Reads one HTTP/1.1 request (head, then content-length bytes) from
    /// `conn`; returns its head, lower-cased, or `None` at the end.
    async fn read_request(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        Some(head)
    }

    /// A minimal OTLP/HTTP collector answering with `statuses` in turn (then
    /// 200), recording each request's head.
    async fn fake_collector(
        statuses: Vec<(u16, Option<&'static str>)>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                while let Some(head) = read_request(&mut conn, &mut buf).await {
                    seen.lock().unwrap().push(head);
                    let (status, retry_after) = statuses.next().unwrap_or((200, None));
                    let extra = retry_after
                        .map(|v| format!("retry-after: {v}\r\n"))
                        .unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 {status} X\r\n{extra}content-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                    );
                    if conn.write_all(response.as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        });
        (url, heads)
    }

    /// An OTLP/HTTP collector that answers every request with 200 after
    /// `delay` (never, if `None`), serving connections concurrently;
    /// returns the most requests it ever held at once.
    async fn slow_collector(delay: Option<Duration>) -> (String, Arc<AtomicUsize>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let most = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&most);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (most, now) = (Arc::clone(&seen), Arc::clone(&now));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut conn, &mut buf).await.is_some() {
                        let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(held, Ordering::SeqCst);
                        match delay {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                        now.fetch_sub(1, Ordering::SeqCst);
                        let response = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if conn.write_all(response.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (url, most)
    }

    #[tokio::test]
    async fn batches_go_out_concurrently_up_to_the_limit_and_all_are_counted() {
        let (url, most) = slow_collector(Some(Duration::from_millis(200))).await;
        let (mut exporter, _) = http_exporter(&url, Duration::from_secs(10));
        exporter.max_in_flight = 3;
        let queue = Arc::new(ExportQueue::new(10_000, 1 << 30, 512));
        exporter.queue = Arc::clone(&queue);
        // 4 spans per request, 512 per batch: 128 requests a batch, 8 batches.
        let engine = Arc::clone(&item(1, 0).engine);
        for seq in 0..1024 {
            let mut i = item(1, seq);
            i.engine = Arc::clone(&engine);
            queue.push(i);
        }
        let started = Instant::now();
        let report = exporter
            .flush(Instant::now() + Duration::from_secs(10))
            .await;
        assert_eq!(report, FlushReport::default());
        assert_eq!(
            most.load(Ordering::SeqCst),
            3,
            "at most 3 in flight, and 3 used"
        );
        // 8 batches, 3 at a time: 3 rounds of 200 ms, not 8.
        assert!(started.elapsed() < Duration::from_millis(1500));
        let s = engine.stats.snapshot();
        assert_eq!(
            (s.exported, s.spans_exported, s.export_failed),
            (1024, 4096, 0)
        );
    }

    #[tokio::test]
    async fn batches_in_flight_at_the_flush_deadline_are_cut_off_and_counted_failed() {
        let (url, most) = slow_collector(None).await;
        let (mut exporter, _) = http_exporter(&url, Duration::from_secs(10));
        exporter.max_in_flight = 2;
        let queue = Arc::new(ExportQueue::new(10_000, 1 << 30, 512));
        exporter.queue = Arc::clone(&queue);
        let engine = Arc::clone(&item(1, 0).engine);
        for seq in 0..300 {
            let mut i = item(1, seq);
            i.engine = Arc::clone(&engine);
            queue.push(i);
        }
        let report = exporter
            .flush(Instant::now() + Duration::from_millis(500))
            .await;
        // Two batches of 128 requests in flight, never answered; 44 queued.
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(
            report,
            FlushReport {
                left_in_queue: 44,
                failed: 256
            }
        );
        let s = engine.stats.snapshot();
        assert_eq!((s.exported, s.export_failed), (0, 300));
    }

    fn http_exporter(url: &str, max_elapsed: Duration) -> (Exporter, Arc<ExportQueue>) {
        let target = ExportTarget::Otlp(OtlpSettings {
            protocol: Protocol::HttpProtobuf,
            traces_endpoint: url.to_owned(),
            metrics_endpoint: url.replace("traces", "metrics"),
            headers: vec![("x-api-key".into(), "secret".into())],
            compression: Compression::Gzip,
            timeout: Duration::from_secs(2),
        });
        let queue = Arc::new(ExportQueue::new(100, 1 << 20, 512));
        let exporter = Exporter::new(
            Transport::new(&target).unwrap(),
            Arc::clone(&queue),
            Arc::new(Mutex::new(Metrics::new(0))),
            Arc::new(ExportCounters::default()),
            512,
            Duration::from_millis(10),
            max_elapsed,
            Duration::from_secs(60),
        );
        (exporter, queue)
    }

    #[tokio::test]
    async fn throttling_is_retried_after_the_servers_delay_with_gzip_and_headers() {
        let (url, heads) = fake_collector(vec![(429, Some("0")), (503, None)]).await;
        let (mut exporter, queue) = http_exporter(&url, Duration::from_secs(10));
        let item = item(1, 1);
        let engine = Arc::clone(&item.engine);
        queue.push(item);
        let report = exporter
            .flush(Instant::now() + Duration::from_secs(10))
            .await;
        assert_eq!(report, FlushReport::default());
        let s = engine.stats.snapshot();
        assert_eq!((s.exported, s.spans_exported, s.export_failed), (1, 4, 0));
        assert_eq!(exporter.counters.retries.load(Ordering::Relaxed), 2);
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 3);
        for head in heads.iter() {
            assert!(head.starts_with("post /v1/traces "), "{head}");
            assert!(head.contains("content-encoding: gzip"), "{head}");
            assert!(head.contains("x-api-key: secret"), "{head}");
            assert!(
                head.contains("content-type: application/x-protobuf"),
                "{head}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_request_is_not_retried() {
        for status in [400u16, 401, 500] {
            let (url, heads) = fake_collector(vec![(status, Some("1"))]).await;
            let (mut exporter, queue) = http_exporter(&url, Duration::from_secs(10));
            let item = item(1, 1);
            let engine = Arc::clone(&item.engine);
            queue.push(item);
            let report = exporter
                .flush(Instant::now() + Duration::from_secs(10))
                .await;
            assert_eq!(report.failed, 1, "{status}");
            assert_eq!(engine.stats.snapshot().export_failed, 1);
            assert_eq!(exporter.counters.retries.load(Ordering::Relaxed), 0);
            assert_eq!(heads.lock().unwrap().len(), 1, "{status}: one attempt only");
        }
    }

    #[tokio::test]
    async fn a_dead_collector_exhausts_the_budget_and_counts_every_request_failed() {
        // Nothing listens on port 9 of loopback (discard, normally closed).
        let target = ExportTarget::Otlp(OtlpSettings {
            protocol: Protocol::HttpProtobuf,
            traces_endpoint: "http://127.0.0.1:9/v1/traces".into(),
            metrics_endpoint: "http://127.0.0.1:9/v1/metrics".into(),
            headers: vec![],
            compression: Compression::Gzip,
            timeout: Duration::from_millis(200),
        });
        let queue = Arc::new(ExportQueue::new(100, 1 << 20, 512));
        let mut exporter = Exporter::new(
            Transport::new(&target).unwrap(),
            Arc::clone(&queue),
            Arc::new(Mutex::new(Metrics::new(0))),
            Arc::new(ExportCounters::default()),
            512,
            Duration::from_millis(10),
            Duration::from_millis(700),
            Duration::from_secs(60),
        );
        let a = item(1, 1);
        let engine = Arc::clone(&a.engine);
        queue.push(a);
        let mut b = item(1, 2);
        b.engine = Arc::clone(&engine);
        queue.push(b);
        let report = exporter
            .flush(Instant::now() + Duration::from_secs(5))
            .await;
        assert_eq!(report.failed, 2);
        let s = engine.stats.snapshot();
        assert_eq!(s.export_failed, 2);
        assert_eq!(s.exported, 0);
        assert!(exporter.counters.retries.load(Ordering::Relaxed) >= 1);
    }
}
