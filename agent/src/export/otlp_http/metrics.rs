//! Metrics export over HTTP: protobuf or OTLP JSON bodies.

use super::{HttpTransport, http_export};
use crate::export::transport::{Attempt, json_body};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse as MetricsResponse,
};
use prost::Message;

impl HttpTransport {
    /// One attempt to send `request`.
    pub(crate) async fn send_metrics(&self, request: &ExportMetricsServiceRequest) -> Attempt {
        let body = if self.json {
            match json_body(request) {
                Ok(json) => json,
                Err(failed) => return failed,
            }
        } else {
            request.encode_to_vec()
        };
        http_export(self, &self.metrics_url, body, |r: MetricsResponse| {
            r.partial_success
                .map(|p| (p.rejected_data_points, p.error_message))
        })
        .await
    }
}
