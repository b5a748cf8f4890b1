//! Trace export over HTTP: the encoded request as the protobuf body, or
//! decoded and written as OTLP JSON.

use super::{HttpTransport, http_export};
use crate::export::transport::{Attempt, decode_trace_request, json_body};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse as TraceResponse;

impl HttpTransport {
    /// One attempt to send `body`, an encoded `ExportTraceServiceRequest`.
    pub(crate) async fn send_traces(&self, body: &Bytes) -> Attempt {
        let body = if self.json {
            match decode_trace_request(body).and_then(|r| json_body(&r)) {
                Ok(json) => json,
                Err(failed) => return failed,
            }
        } else {
            body.to_vec()
        };
        http_export(self, &self.traces_url, body, |r: TraceResponse| {
            r.partial_success
                .map(|p| (p.rejected_spans, p.error_message))
        })
        .await
    }
}
