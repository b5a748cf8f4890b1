//! The exporter end to end: encoding, the JSON and file transports, and a
//! fake HTTP collector for concurrency, retries and the shutdown flush.

use super::*;
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::metrics::{ExportCounters, Metrics};
use crate::pipeline::spans::AttributeSet;
use crate::pipeline::spans::tests::{ctx, raw_record};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use ringside_shm_protocol::Detail;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
            machine_id: None,
        }
        .engine_resource(
            &format!("e{id}"),
            &crate::pipeline::resource::tests::identity(1, 1),
        ),
        stats: EngineStats::default(),
        capture: Default::default(),
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

#[tokio::test]
async fn with_the_metrics_exporter_none_the_flush_writes_no_metrics_but_traces_still_go() {
    for export_metrics in [true, false] {
        let path = std::env::temp_dir().join(format!(
            "ringside-agent-metrics-{export_metrics}-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let queue = Arc::new(ExportQueue::new(100, 1 << 20, 512));
        let metrics = Arc::new(Mutex::new(Metrics::new(0)));
        let it = item(1, 1);
        metrics.lock().unwrap().attach(&it.engine);
        let mut exporter = Exporter::new(
            Transport::new(&ExportTarget::File(path.clone())).unwrap(),
            Arc::clone(&queue),
            metrics,
            Arc::new(ExportCounters::default()),
            512,
            Duration::from_millis(10),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        exporter.export_metrics = export_metrics;
        queue.push(it);
        let report = exporter
            .flush(Instant::now() + Duration::from_secs(5))
            .await;
        assert_eq!(report, FlushReport::default());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let metric_lines = lines
            .iter()
            .filter(|l| l.contains("resourceMetrics"))
            .count();
        let trace_lines = lines.iter().filter(|l| l.contains("resourceSpans")).count();
        assert_eq!(trace_lines, 1, "export_metrics={export_metrics}: {text}");
        assert_eq!(
            metric_lines,
            usize::from(export_metrics),
            "export_metrics={export_metrics}: {text}"
        );
        let _ = std::fs::remove_file(&path);
    }
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

/// An exporter to a collector that is not there (nothing listens on port 9
/// of loopback: discard, normally closed), retrying for `budget`.
fn dead_collector(compression: Compression, budget: Duration) -> (Arc<ExportQueue>, Exporter) {
    let target = ExportTarget::Otlp(OtlpSettings {
        protocol: Protocol::HttpProtobuf,
        traces_endpoint: "http://127.0.0.1:9/v1/traces".into(),
        metrics_endpoint: "http://127.0.0.1:9/v1/metrics".into(),
        headers: vec![],
        compression,
        timeout: Duration::from_millis(200),
    });
    let queue = Arc::new(ExportQueue::new(100, 1 << 20, 512));
    let exporter = Exporter::new(
        Transport::new(&target).unwrap(),
        Arc::clone(&queue),
        Arc::new(Mutex::new(Metrics::new(0))),
        Arc::new(ExportCounters::default()),
        512,
        Duration::from_millis(10),
        budget,
        Duration::from_secs(60),
    );
    (queue, exporter)
}

#[tokio::test]
async fn a_dead_collector_exhausts_the_budget_and_counts_every_request_failed() {
    let (queue, mut exporter) = dead_collector(Compression::Gzip, Duration::from_millis(700));
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

#[tokio::test]
async fn an_endless_success_body_is_not_buffered_and_the_batch_counts_exported() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let written = Arc::new(AtomicUsize::new(0));
    let sent = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_request(&mut conn, &mut buf).await.is_none() {
                    return;
                }
                // Claims a 1 TiB partial success and streams it.
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 1099511627776\r\n\r\n";
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0x0au8; 64 * 1024];
                while conn.write_all(&chunk).await.is_ok() {
                    sent.fetch_add(chunk.len(), Ordering::SeqCst);
                }
            });
        }
    });
    let (mut exporter, queue) = http_exporter(&url, Duration::from_secs(10));
    let engine = Arc::clone(&item(1, 0).engine);
    let mut i = item(1, 0);
    i.engine = Arc::clone(&engine);
    queue.push(i);
    let report = exporter
        .flush(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(report, FlushReport::default());
    let s = engine.stats.snapshot();
    assert_eq!((s.exported, s.export_failed), (1, 0));
    // The agent stopped reading at the bound: what the collector got out is
    // the bound plus what the sockets' buffers held, nowhere near the claim.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = written.load(Ordering::SeqCst);
    assert!(
        out < crate::export::otlp_http::MAX_RESPONSE_BYTES + (32 << 20),
        "{out} bytes were sent"
    );
}

/// The request-record counters of `engine`: untouched by captured steps.
fn record_counters(engine: &EngineHandle) -> (u64, u64, u64, u64) {
    let s = engine.stats.snapshot();
    (
        s.exported,
        s.spans_exported,
        s.export_failed,
        s.queue_dropped,
    )
}

#[tokio::test]
async fn a_captures_steps_are_retried_like_a_batch_and_counted_exported_apart_from_the_records() {
    use crate::pipeline::capture::steps::tests::{engine, part};
    let (url, heads) = fake_collector(vec![(503, None)]).await;
    let (mut exporter, queue) = http_exporter(&url, Duration::from_secs(10));
    let e = engine("e");
    queue.push_steps(part(&e, 300, None));
    queue.push_steps(part(&e, 20, Some(320)));
    let report = exporter
        .flush(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(report, FlushReport::default());
    let stats = &e.stats;
    assert_eq!(stats.capture_steps_exported.load(Ordering::Relaxed), 320);
    assert_eq!(stats.capture_steps_failed.load(Ordering::Relaxed), 0);
    assert_eq!(record_counters(&e), (0, 0, 0, 0));
    assert_eq!(exporter.counters.retries.load(Ordering::Relaxed), 1);
    // Two parts, the first tried twice.
    assert_eq!(heads.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn captured_steps_a_dead_collector_refuses_are_counted_failed_not_as_records() {
    use crate::pipeline::capture::steps::tests::{engine, part};
    let (queue, mut exporter) = dead_collector(Compression::None, Duration::from_millis(500));
    let e = engine("e");
    queue.push_steps(part(&e, 7, Some(7)));
    let report = exporter
        .flush(Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(report, FlushReport::default(), "no request was lost");
    assert_eq!(e.stats.capture_steps_failed.load(Ordering::Relaxed), 7);
    assert_eq!(e.stats.capture_steps_exported.load(Ordering::Relaxed), 0);
    assert_eq!(record_counters(&e), (0, 0, 0, 0));
}

#[tokio::test]
async fn captured_steps_in_flight_or_queued_at_the_flush_deadline_are_counted_failed() {
    use crate::pipeline::capture::steps::tests::{engine, part};
    let (url, _) = slow_collector(None).await;
    let (mut exporter, queue) = http_exporter(&url, Duration::from_secs(10));
    exporter.max_in_flight = 1;
    let e = engine("e");
    queue.push_steps(part(&e, 30, None));
    queue.push_steps(part(&e, 12, Some(42)));
    let report = exporter
        .flush(Instant::now() + Duration::from_millis(300))
        .await;
    assert_eq!(report, FlushReport::default());
    // One part in flight, never answered: cut off; the other still queued.
    assert_eq!(e.stats.capture_steps_failed.load(Ordering::Relaxed), 42);
    assert_eq!(e.stats.capture_steps_exported.load(Ordering::Relaxed), 0);
    assert_eq!(queue.step_parts(), 0);
}

#[test]
fn the_metrics_carry_the_captured_steps_counters_per_engine() {
    use crate::pipeline::capture::steps::tests::engine;
    let e = engine("e");
    EngineStats::add(&e.stats.capture_steps_exported, 5);
    EngineStats::add(&e.stats.capture_steps_failed, 2);
    EngineStats::add(&e.stats.capture_steps_dropped, 3);
    let mut metrics = Metrics::new(0);
    metrics.attach(&e);
    let request = metrics.to_request(1, 0, &ExportCounters::default());
    let found = |name: &str| {
        let metric = request.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        match &metric.data {
            Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) => {
                match s.data_points[0].value {
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v),
                    ) => v,
                    ref other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(found("ringside.agent.capture.steps.exported"), 5);
    assert_eq!(found("ringside.agent.capture.steps.failed"), 2);
    assert_eq!(found("ringside.agent.capture.steps.dropped"), 3);
}
