//! Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).
//!
//! Plain atomics: updating them never blocks, rendering reads them with relaxed loads.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::telemetry::Operation;
use crate::telemetry::rejections::{CAUSES, RejectionLimiter, cause_name};

/// HTTP statuses counted individually; anything else counts as `other`.
const STATUSES: [u16; 11] = [200, 400, 401, 404, 408, 413, 415, 429, 499, 500, 503];
const OPERATIONS: [Operation; 2] = [Operation::Chat, Operation::TextCompletion];

fn op_index(op: Operation) -> usize {
    match op {
        Operation::Chat => 0,
        Operation::TextCompletion => 1,
    }
}

fn op_label(op: Operation) -> &'static str {
    match op {
        Operation::Chat => "chat",
        Operation::TextCompletion => "text_completion",
    }
}

/// The engine's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len() + 1]; 2],
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// Requests admitted and waiting for a sequence slot.
    pub queue_depth: AtomicUsize,
    /// Sequences holding a slot (prefilling or decoding).
    pub running: AtomicUsize,
    /// Configured number of slots.
    pub slots: AtomicUsize,
    /// Configured queue bound.
    pub max_queue: AtomicUsize,
    /// 1 once the model is loaded.
    pub loaded: AtomicUsize,
    /// Records pushed into a telemetry segment whose name had been removed, before the
    /// heartbeat re-created it (set by the heartbeat from [`crate::telemetry::Telemetry`]).
    pub records_lost_segment_removed: AtomicU64,
    /// HTTP connections open now.
    pub connections_open: AtomicUsize,
    /// Connections refused because `--max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Requests aborted by the engine at the shutdown deadline (recorded as 503).
    pub shutdown_aborted: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            max_queue: AtomicUsize::new(0),
            loaded: AtomicUsize::new(0),
            records_lost_segment_removed: AtomicU64::new(0),
            connections_open: AtomicUsize::new(0),
            connections_refused: AtomicU64::new(0),
            shutdown_aborted: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one finished or rejected request.
    pub fn count_request(&self, op: Operation, status: u16) {
        let idx = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.requests[op_index(op)][idx].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds processed prompt tokens and generated tokens.
    pub fn count_tokens(&self, prompt: u32, generated: u32) {
        self.prompt_tokens
            .fetch_add(u64::from(prompt), Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(u64::from(generated), Ordering::Relaxed);
    }

    /// Adds prompt tokens taken from the prompt cache (a part of the prompt tokens).
    pub fn count_cached_prompt_tokens(&self, cached: u32) {
        self.cached_prompt_tokens
            .fetch_add(u64::from(cached), Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self, model_name: &str, rejections: &RejectionLimiter) -> String {
        let model = escape_label(model_name);
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP ringside_requests_total Requests that ended, by operation and HTTP status.\n\
             # TYPE ringside_requests_total counter\n",
        );
        for op in OPERATIONS {
            for (i, counter) in self.requests[op_index(op)].iter().enumerate() {
                let status = STATUSES
                    .get(i)
                    .map_or_else(|| "other".to_owned(), u16::to_string);
                let _ = writeln!(
                    out,
                    "ringside_requests_total{{model=\"{model}\",operation=\"{}\",status=\"{status}\"}} {}",
                    op_label(op),
                    counter.load(Ordering::Relaxed)
                );
            }
        }
        let counters = [
            (
                "ringside_prompt_tokens_total",
                "Prompt tokens of scheduled requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "ringside_prompt_tokens_cached_total",
                "Prompt tokens reused from the prompt cache instead of computed (part of ringside_prompt_tokens_total).",
                self.cached_prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "ringside_generation_tokens_total",
                "Tokens generated.",
                self.generation_tokens.load(Ordering::Relaxed),
            ),
            (
                "ringside_records_lost_segment_removed_total",
                "Request records written into a telemetry segment after its name was removed, before the engine re-created it.",
                self.records_lost_segment_removed.load(Ordering::Relaxed),
            ),
            (
                "ringside_connections_refused_total",
                "HTTP connections refused because --max-connections were open.",
                self.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "ringside_shutdown_aborted_total",
                "Requests the engine aborted at the --shutdown-timeout deadline (recorded as 503).",
                self.shutdown_aborted.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model=\"{model}\"}} {value}\n"
            );
        }
        out.push_str(
            "# HELP ringside_rejection_records_suppressed_total Rejected requests whose ring \
             record the per-cause rate limit dropped (the request is still counted in \
             ringside_requests_total).\n\
             # TYPE ringside_rejection_records_suppressed_total counter\n",
        );
        for cause in 0..CAUSES {
            let value = rejections.suppressed(cause);
            if let Some(name) = cause_name(cause) {
                let _ = writeln!(
                    out,
                    "ringside_rejection_records_suppressed_total{{model=\"{model}\",error_type=\"{name}\"}} {value}"
                );
            }
        }
        let gauges = [
            (
                "ringside_queue_depth",
                "Requests waiting for a sequence slot.",
                self.queue_depth.load(Ordering::Relaxed),
            ),
            (
                "ringside_running_sequences",
                "Sequences being prefilled or decoded.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "ringside_sequence_slots",
                "Sequences decoded together at most (--parallel).",
                self.slots.load(Ordering::Relaxed),
            ),
            (
                "ringside_queue_capacity",
                "Waiting requests admitted at most (--max-queue).",
                self.max_queue.load(Ordering::Relaxed),
            ),
            (
                "ringside_model_loaded",
                "1 once the model is loaded and requests are served.",
                self.loaded.load(Ordering::Relaxed),
            ),
            (
                "ringside_connections_open",
                "HTTP connections open now (at most --max-connections).",
                self.connections_open.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model=\"{model}\"}} {value}\n"
            );
        }
        out
    }
}

fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts() {
        let m = Metrics::default();
        m.count_request(Operation::Chat, 200);
        m.count_request(Operation::Chat, 200);
        m.count_request(Operation::TextCompletion, 418);
        m.count_tokens(10, 5);
        m.count_cached_prompt_tokens(4);
        let limiter = RejectionLimiter::new(0);
        limiter.admit(crate::telemetry::ErrorKind::Unauthorized, 0);
        let text = m.render("m\"x", &limiter);
        assert!(text.contains(
            "ringside_rejection_records_suppressed_total{model=\"m\\\"x\",error_type=\"unauthorized\"} 1"
        ));
        assert!(text.contains(
            "ringside_requests_total{model=\"m\\\"x\",operation=\"chat\",status=\"200\"} 2"
        ));
        assert!(text.contains("operation=\"text_completion\",status=\"other\"} 1"));
        assert!(text.contains("ringside_prompt_tokens_total{model=\"m\\\"x\"} 10"));
        assert!(text.contains("ringside_generation_tokens_total{model=\"m\\\"x\"} 5"));
        assert!(text.contains("ringside_prompt_tokens_cached_total{model=\"m\\\"x\"} 4"));
    }
}
