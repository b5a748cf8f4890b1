//! Trace export over gRPC: the batch's encoded `ExportTraceServiceRequest`
//! sent as is (encoded once, not once per attempt), the response decoded
//! with prost.

use super::{GrpcTransport, connection_suspect, grpc_failure};
use crate::export::retry::Verdict;
use crate::export::transport::Attempt;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse as TraceResponse;
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;

impl GrpcTransport {
    /// One attempt to send `body`, an encoded `ExportTraceServiceRequest`.
    pub(crate) async fn send_traces(&self, body: &Bytes) -> Attempt {
        // A clone shares the channel (HTTP/2 multiplexes the batches
        // in flight on one connection).
        let (generation, mut client) = self.traces.get();
        let mut req = tonic::Request::new(body.clone());
        *req.metadata_mut() = self.metadata.clone();
        req.set_timeout(self.timeout);
        if let Err(e) = client.ready().await {
            self.traces.reconnect(generation);
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
            Err(status) => {
                if connection_suspect(status.code()) {
                    self.traces.reconnect(generation);
                }
                grpc_failure(&status)
            }
        }
    }
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
