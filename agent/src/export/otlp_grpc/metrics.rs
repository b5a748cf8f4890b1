//! Metrics export over gRPC, through the generated `opentelemetry-proto`
//! client (one request per interval: no need to pre-encode).

use super::{GrpcTransport, connection_suspect, grpc_failure};
use crate::export::transport::Attempt;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

impl GrpcTransport {
    /// One attempt to send `request`.
    pub(crate) async fn send_metrics(&self, request: &ExportMetricsServiceRequest) -> Attempt {
        let mut req = tonic::Request::new(request.clone());
        *req.metadata_mut() = self.metadata.clone();
        req.set_timeout(self.timeout);
        let (generation, mut client) = self.metrics.get();
        match client.export(req).await {
            Ok(resp) => {
                let p = resp.into_inner().partial_success.unwrap_or_default();
                Attempt::Accepted {
                    rejected: p.rejected_data_points,
                    message: p.error_message,
                }
            }
            Err(status) => {
                if connection_suspect(status.code()) {
                    self.metrics.reconnect(generation);
                }
                grpc_failure(&status)
            }
        }
    }
}
