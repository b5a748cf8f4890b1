//! OTLP/gRPC over tonic: one channel per signal endpoint, the headers as
//! metadata, optional gzip. Traces go out as the pre-encoded request bytes
//! through a raw codec (`trace.rs`); metrics through the generated
//! `opentelemetry-proto` client (`metrics.rs`).

mod metrics;
mod trace;

use super::retry;
use super::transport::{Attempt, ExportSetupError};
use super::{Compression, OtlpSettings};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// OTLP/gRPC state.
#[derive(Debug)]
pub struct GrpcTransport {
    /// Sends pre-encoded requests (see `trace::RawCodec`).
    traces: tonic::client::Grpc<Channel>,
    metrics: MetricsServiceClient<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcTransport {
    /// Lazily connected channels to the traces and metrics endpoints.
    pub(crate) fn new(o: &OtlpSettings) -> Result<Self, ExportSetupError> {
        let mut metadata = MetadataMap::new();
        for (key, value) in &o.headers {
            let k = MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                .map_err(|_| ExportSetupError::Header(key.clone()))?;
            let v = MetadataValue::try_from(value.as_str())
                .map_err(|_| ExportSetupError::Header(key.clone()))?;
            metadata.insert(k, v);
        }
        let mut traces = tonic::client::Grpc::new(grpc_channel(&o.traces_endpoint, o.timeout)?);
        let mut metrics = MetricsServiceClient::new(grpc_channel(&o.metrics_endpoint, o.timeout)?);
        if o.compression == Compression::Gzip {
            traces = traces.send_compressed(CompressionEncoding::Gzip);
            metrics = metrics.send_compressed(CompressionEncoding::Gzip);
        }
        traces = traces.max_decoding_message_size(4 << 20);
        Ok(Self {
            traces,
            metrics,
            metadata,
            timeout: o.timeout,
        })
    }
}

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

fn grpc_failure(status: &tonic::Status) -> Attempt {
    let info = retry::grpc_retry_info(status.details());
    Attempt::Failed {
        verdict: retry::classify_grpc(status.code(), info),
        error: format!("gRPC {:?}: {}", status.code(), status.message()),
    }
}
