//! OTLP/gRPC over tonic: one channel per signal endpoint, the headers as
//! metadata, optional gzip. Traces go out as the pre-encoded request bytes
//! through a raw codec (`trace.rs`); metrics through the generated
//! `opentelemetry-proto` client (`metrics.rs`).
//!
//! Gateways restart and move. A tonic channel connects lazily and, once its
//! connection is closed or reset, connects again on the next call, resolving
//! the endpoint's name anew (hyper's connector asks `getaddrinfo` at each
//! connect; nothing is cached). What it does not notice is a connection
//! that is silently dead: a gateway that hangs or whose host left the
//! network, with no FIN or RST; every call on it then times out. So after
//! an attempt fails in a way that may be the connection's fault (not ready,
//! a timeout, `UNAVAILABLE`, `UNKNOWN`), the channel is replaced by a fresh,
//! lazily connected one (`Reconnecting`): the next attempt resolves the
//! name and connects again. Attempts back off as the retry policy says, so
//! reconnects do too; what a batch cannot deliver within its retries is
//! counted failed.

mod metrics;
mod trace;

use super::retry;
use super::transport::{Attempt, ExportSetupError};
use super::{Compression, OtlpSettings};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// OTLP/gRPC state.
#[derive(Debug)]
pub struct GrpcTransport {
    /// Sends pre-encoded requests (see `trace::RawCodec`).
    traces: Reconnecting<tonic::client::Grpc<Channel>>,
    metrics: Reconnecting<MetricsServiceClient<Channel>>,
    metadata: MetadataMap,
    timeout: Duration,
}

/// A client whose channel is replaced after a failure that may be the
/// connection's: clones share the current channel (HTTP/2 multiplexes the
/// calls in flight); a generation number makes the several calls that fail
/// on one dead connection replace it once.
#[derive(Debug)]
struct Reconnecting<C> {
    current: Mutex<(u64, C)>,
    make: fn(&GrpcTarget) -> Result<C, ExportSetupError>,
    target: GrpcTarget,
}

/// What building a client needs.
#[derive(Debug, Clone)]
struct GrpcTarget {
    url: String,
    timeout: Duration,
    gzip: bool,
}

impl<C: Clone> Reconnecting<C> {
    fn new(
        target: GrpcTarget,
        make: fn(&GrpcTarget) -> Result<C, ExportSetupError>,
    ) -> Result<Self, ExportSetupError> {
        Ok(Self {
            current: Mutex::new((0, make(&target)?)),
            make,
            target,
        })
    }

    /// The current client and its generation.
    fn get(&self) -> (u64, C) {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After a failure on generation `failed`: a fresh channel, unless
    /// another call replaced that one already.
    fn reconnect(&self, failed: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != failed {
            return;
        }
        // The target was checked when the transport was built.
        if let Ok(client) = (self.make)(&self.target) {
            *current = (failed.wrapping_add(1), client);
            tracing::debug!(endpoint = %self.target.url, "gRPC channel replaced: the next call resolves and connects anew");
        }
    }
}

/// Whether a failed call may have failed because of its connection (then
/// the channel is replaced), rather than by the gateway's answer.
fn connection_suspect(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
    )
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
        let target = |url: &String| GrpcTarget {
            url: url.clone(),
            timeout: o.timeout,
            gzip: o.compression == Compression::Gzip,
        };
        Ok(Self {
            traces: Reconnecting::new(target(&o.traces_endpoint), traces_client)?,
            metrics: Reconnecting::new(target(&o.metrics_endpoint), metrics_client)?,
            metadata,
            timeout: o.timeout,
        })
    }
}

fn traces_client(t: &GrpcTarget) -> Result<tonic::client::Grpc<Channel>, ExportSetupError> {
    let mut client = tonic::client::Grpc::new(grpc_channel(&t.url, t.timeout)?);
    if t.gzip {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    Ok(client.max_decoding_message_size(4 << 20))
}

fn metrics_client(t: &GrpcTarget) -> Result<MetricsServiceClient<Channel>, ExportSetupError> {
    let mut client = MetricsServiceClient::new(grpc_channel(&t.url, t.timeout)?);
    if t.gzip {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    Ok(client)
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
