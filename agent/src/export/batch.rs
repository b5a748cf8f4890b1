//! One batch: encoded once into an OTLP `ExportTraceServiceRequest`
//! ([`encode_trace_request`], written by hand with `wire`
//! straight from the records), then sent with retries and backoff until it
//! is accepted, refused for good, or out of budget.

use super::queue::Item;
use super::retry::{self, Jitter, Verdict};
use super::transport::{Attempt, Transport};
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::metrics::{ExportCounters, scope};
use bytes::Bytes;
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Encodes one export request from whole requests: one `ResourceSpans` per
/// engine (in order of first appearance) with one `ScopeSpans` holding its
/// requests' spans in queue order, written straight from the records. The
/// same bytes prost would write for the equivalent structs.
pub fn encode_trace_request(items: &[Item]) -> Vec<u8> {
    use super::wire::{bytes_field, message};
    /// A request span with both attribute sets and three children.
    const TYPICAL_REQUEST_BYTES: usize = 1536;
    let scope = scope().encode_to_vec();
    let mut engines: Vec<&Arc<EngineHandle>> = Vec::new();
    for item in items {
        if !engines.iter().any(|e| e.id == item.engine.id) {
            engines.push(&item.engine);
        }
    }
    let mut out = Vec::with_capacity(items.len() * TYPICAL_REQUEST_BYTES + engines.len() * 512);
    for engine in engines {
        // ExportTraceServiceRequest.resource_spans (1) → ResourceSpans {
        // resource (1), scope_spans (2) → ScopeSpans { scope (1), spans (2)… } }
        message(&mut out, 1, |out| {
            bytes_field(out, 1, &engine.resource.encode_to_vec());
            message(out, 2, |out| {
                bytes_field(out, 1, &scope);
                for item in items.iter().filter(|i| i.engine.id == engine.id) {
                    let extras = crate::pipeline::spans::SpanExtras {
                        stalls: &item.stalls,
                        sampling: item.sampling,
                        steps: item.steps.as_ref(),
                        capture_reason: item.capture.map(|r| r.as_str()),
                    };
                    crate::pipeline::spans::encode_with(
                        &item.ctx,
                        &item.record,
                        item.detail,
                        &extras,
                        out,
                    );
                }
            });
        });
    }
    out
}

/// What sending one batch needs; cloned into each batch's task.
#[derive(Clone, Debug)]
pub(super) struct BatchSender {
    pub(super) transport: Arc<Transport>,
    pub(super) counters: Arc<ExportCounters>,
    pub(super) retry_max_elapsed: Duration,
    pub(super) shutdown_timeout: Duration,
    pub(super) jitter: Jitter,
}

impl BatchSender {
    /// Sends one batch with retries; returns the number of requests whose
    /// export failed (0 on success). Every request ends counted as exported
    /// or failed.
    pub(super) async fn send(
        mut self,
        items: Vec<Item>,
        mut deadline: Option<Instant>,
        mut stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> u64 {
        let console_text = if self.transport.is_console() {
            super::console::render(&items)
        } else {
            String::new()
        };
        let total_spans: u64 = items.iter().map(|i| i.spans as u64).sum();
        // Encoded once; every attempt sends the same bytes.
        let body = Bytes::from(encode_trace_request(&items));
        let started = Instant::now();
        let mut attempt_no = 0u32;
        loop {
            let attempt = match deadline {
                // During the shutdown flush no attempt may outlast the deadline.
                Some(dl) => match tokio::time::timeout(
                    dl.saturating_duration_since(Instant::now()),
                    self.transport.send_traces(&body, &console_text),
                )
                .await
                {
                    Ok(a) => a,
                    Err(_) => Attempt::Failed {
                        verdict: Verdict::Permanent,
                        error: "the shutdown deadline passed during the export".to_owned(),
                    },
                },
                None => self.transport.send_traces(&body, &console_text).await,
            };
            let (verdict, error) = match attempt {
                Attempt::Accepted { rejected, message } => {
                    if rejected > 0 {
                        self.counters
                            .rejected_spans
                            .fetch_add(u64::try_from(rejected).unwrap_or(0), Ordering::Relaxed);
                        tracing::warn!(rejected, %message, "collector rejected part of a batch (partial success, not retried)");
                    }
                    for item in &items {
                        EngineStats::add(&item.engine.stats.exported, 1);
                        EngineStats::add(&item.engine.stats.spans_exported, item.spans as u64);
                    }
                    return 0;
                }
                Attempt::Failed { verdict, error } => (verdict, error),
            };
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            if stop.as_ref().is_some_and(|s| *s.borrow()) {
                // Shutting down: keep trying, but only until the flush deadline.
                deadline = Some(Instant::now() + self.shutdown_timeout);
                stop = None;
            }
            let delay = match verdict {
                Verdict::Retry(hint) => {
                    Some(retry::backoff_delay(attempt_no, hint, self.jitter.sample()))
                }
                Verdict::Permanent => None,
            };
            let delay = delay.filter(|d| {
                retry::within_budget(started.elapsed(), *d, self.retry_max_elapsed)
                    && deadline.is_none_or(|dl| Instant::now() + *d < dl)
            });
            let Some(delay) = delay else {
                let n = items.len() as u64;
                tracing::error!(%error, requests = n, spans = total_spans, "export failed; dropping the batch");
                for item in &items {
                    EngineStats::add(&item.engine.stats.export_failed, 1);
                }
                return n;
            };
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            if attempt_no == 0 {
                tracing::warn!(%error, "export failed; retrying with backoff");
            } else {
                tracing::debug!(%error, delay_ms = delay.as_millis() as u64, attempt = attempt_no, "export failed; retrying");
            }
            attempt_no = attempt_no.saturating_add(1);
            match stop.as_mut() {
                Some(s) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = s.changed() => {
                            // Shutting down: retry now, within the shutdown deadline.
                            deadline = Some(Instant::now() + self.shutdown_timeout);
                            stop = None;
                        }
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
    }
}
