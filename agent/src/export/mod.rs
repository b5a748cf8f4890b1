//! Sending what the pipeline queued: batches of whole requests encoded by
//! hand into one OTLP `ExportTraceServiceRequest` each (`wire`, straight
//! from the records) and sent as raw bytes over OTLP/gRPC ([`otlp_grpc`]) or
//! OTLP/HTTP with protobuf or JSON bodies ([`otlp_http`]), or written to the
//! [`console`] or a [`file`](mod@file); metrics are sent every interval from the
//! generated `opentelemetry-proto` structs. Retry classification and backoff
//! in [`retry`]; the bounded queue in [`queue`]; one batch's encoding and
//! retries in [`batch`]; the export task and the shutdown flush in
//! [`exporter`].
//!
//! Settings come in as plain values ([`ExportTarget`], [`OtlpSettings`]),
//! resolved by the configuration module (`config`), which depends on export, never
//! the reverse.

pub mod batch;
pub mod console;
pub mod exporter;
pub mod file;
pub mod otlp_grpc;
pub mod otlp_http;
pub mod queue;
pub mod retry;
pub mod transport;
pub(crate) mod wire;

pub use batch::encode_trace_request;
pub use exporter::{Exporter, ExporterUpdate, FlushReport};
pub use otlp_grpc::GrpcTransport;
pub use otlp_http::HttpTransport;
pub use queue::{ExportQueue, Item};
pub use transport::{Attempt, ExportSetupError, Transport};

use std::path::PathBuf;
use std::time::Duration;

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies.
    HttpJson,
}

/// Body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// gzip.
    Gzip,
}

/// Resolved OTLP exporter settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// Transport.
    pub protocol: Protocol,
    /// Full URL traces are sent to (for gRPC: the server's base URL).
    pub traces_endpoint: String,
    /// Full URL metrics are sent to.
    pub metrics_endpoint: String,
    /// Extra headers, values percent-decoded.
    pub headers: Vec<(String, String)>,
    /// Body compression.
    pub compression: Compression,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Where exports go.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportTarget {
    /// An OTLP collector.
    Otlp(OtlpSettings),
    /// Span trees on stdout.
    Console,
    /// OTLP JSON lines into a file.
    File(PathBuf),
}

impl ExportTarget {
    /// A one-line description for logs: never the header values (they may
    /// hold credentials).
    pub fn describe(&self) -> String {
        match self {
            Self::Otlp(o) => format!(
                "otlp {:?} traces={} metrics={} compression={:?} headers={:?}",
                o.protocol,
                o.traces_endpoint,
                o.metrics_endpoint,
                o.compression,
                o.headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
            ),
            Self::Console => "console".to_owned(),
            Self::File(path) => format!("file {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests;
