//! [`Transport`]: where an export request goes (OTLP/gRPC, OTLP/HTTP, the
//! console, a file), set up once from an [`ExportTarget`], and the result of
//! one attempt ([`Attempt`]). Each transport sends the same pre-encoded
//! `ExportTraceServiceRequest` bytes (see [`encode_trace_request`]); the JSON
//! ones decode them to structs first.
//!
//! [`encode_trace_request`]: super::encode_trace_request

use super::ExportTarget;
use super::otlp_grpc::GrpcTransport;
use super::otlp_http::HttpTransport;
use super::retry::Verdict;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::path::PathBuf;
use std::sync::Mutex;

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

impl Attempt {
    /// Accepted whole.
    pub(crate) fn accepted() -> Self {
        Self::Accepted {
            rejected: 0,
            message: String::new(),
        }
    }
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

impl Transport {
    /// Sets up the exporter for `target`. gRPC connects lazily: a collector
    /// that is down at start is retried like any other outage.
    pub fn new(target: &ExportTarget) -> Result<Self, ExportSetupError> {
        match target {
            ExportTarget::Console => Ok(Self::Console),
            ExportTarget::File(path) => Ok(Self::File(super::file::open(path)?)),
            ExportTarget::Otlp(o) => match o.protocol {
                super::Protocol::Grpc => Ok(Self::Grpc(Box::new(GrpcTransport::new(o)?))),
                super::Protocol::HttpProtobuf | super::Protocol::HttpJson => {
                    Ok(Self::Http(Box::new(HttpTransport::new(o)?)))
                }
            },
        }
    }

    /// Whether this is the console exporter (which skips metrics).
    pub fn is_console(&self) -> bool {
        matches!(self, Self::Console)
    }

    /// One attempt to send spans: `body` is an encoded
    /// `ExportTraceServiceRequest` (see [`encode_trace_request`]).
    ///
    /// [`encode_trace_request`]: super::encode_trace_request
    pub async fn send_traces(&self, body: &Bytes, console_text: &str) -> Attempt {
        match self {
            Self::Grpc(g) => g.send_traces(body).await,
            Self::Http(h) => h.send_traces(body).await,
            Self::Console => super::console::write(console_text),
            Self::File(file) => match decode_trace_request(body) {
                Ok(request) => super::file::write_json_line(file, &request),
                Err(failed) => failed,
            },
        }
    }

    /// One attempt to send metrics.
    pub async fn send_metrics(&self, request: &ExportMetricsServiceRequest) -> Attempt {
        match self {
            Self::Grpc(g) => g.send_metrics(request).await,
            Self::Http(h) => h.send_metrics(request).await,
            Self::Console => Attempt::accepted(),
            Self::File(file) => super::file::write_json_line(file, request),
        }
    }
}

/// An encoded trace request as structs, for the exporters that write JSON.
pub(crate) fn decode_trace_request(body: &[u8]) -> Result<ExportTraceServiceRequest, Attempt> {
    ExportTraceServiceRequest::decode(body).map_err(|e| Attempt::Failed {
        verdict: Verdict::Permanent,
        error: format!("the batch does not decode: {e}"),
    })
}

pub(crate) fn json_body<T: serde::Serialize>(request: &T) -> Result<Vec<u8>, Attempt> {
    serde_json::to_vec(request).map_err(|e| Attempt::Failed {
        verdict: Verdict::Permanent,
        error: format!("JSON encoding: {e}"),
    })
}
