//! A timing OTLP/gRPC receiver: acknowledges every export like a collector
//! and, for each SERVER span (one per request record), records how long
//! after the span's end time it arrived: `arrival wall clock − end_time`.
//!
//! The end time is the record's finish stamp (the engine's monotonic clock,
//! converted by the agent with the segment's clock pair), so this is the
//! freshness of a request's telemetry at the collector: the agent's poll
//! interval, conversion, batching and the export round trip together. rotel's
//! blackhole exporter cannot report arrival times, hence this sink. It
//! decodes the protobuf like any collector; it does nothing else with it.

use hdrhistogram::Histogram;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug)]
struct State {
    spans: AtomicU64,
    requests: AtomicU64,
    /// Microseconds from a SERVER span's end to its arrival.
    freshness_us: Mutex<Histogram<u64>>,
}

#[derive(Debug, Clone)]
struct Service(Arc<State>);

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let arrived = now_unix_ns();
        let mut spans = 0u64;
        let mut ages = Vec::new();
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                spans += ss.spans.len() as u64;
                for span in &ss.spans {
                    if span.kind == SpanKind::Server as i32 {
                        ages.push(arrived.saturating_sub(span.end_time_unix_nano) / 1_000);
                    }
                }
            }
        }
        self.0.spans.fetch_add(spans, Ordering::Relaxed);
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.0.freshness_us.lock() {
            for age in ages {
                h.saturating_record(age);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The running receiver, on its own one-thread runtime. Stops on drop.
#[derive(Debug)]
pub struct TimingSink {
    /// Its OTLP/gRPC port on 127.0.0.1.
    pub port: u16,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TimingSink {
    /// Starts the receiver and waits until its port accepts connections.
    pub fn start() -> Result<TimingSink, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("timing-sink")
            .enable_all()
            .build()
            .map_err(|e| format!("sink runtime: {e}"))?;
        let state = Arc::new(State {
            spans: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            freshness_us: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3)
                    .map_err(|e| format!("histogram: {e}"))?,
            ),
        });
        let port = crate::free_port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service(Arc::clone(&state));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        runtime.spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(service.clone()).max_decoding_message_size(64 << 20),
                )
                .add_service(MetricsServiceServer::new(service))
                .serve_with_shutdown(addr, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("timing sink on {addr}: {e}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("timing sink did not open {addr}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(TimingSink {
            port,
            state,
            stop: Some(stop),
            runtime: Some(runtime),
        })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.state.spans.load(Ordering::Relaxed)
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The freshness histogram so far (µs), and a fresh one from now on.
    pub fn take_freshness(&self) -> Histogram<u64> {
        let mut h = self
            .state
            .freshness_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = h.clone();
        h.reset();
        out
    }
}

impl Drop for TimingSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
