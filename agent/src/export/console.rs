//! The `console` exporter: one readable tree per trace, written to stdout.
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736  engine gemma-1 (pid 4242)
//! └─ chat gemma-3-270m  SERVER  1.234 s  OK
//!    │  in 12 tok (4 cached) → out 11 tok  finish length  ttft 0.500 s  queue 0.250 s
//!    │  gaps max 0.412 s  p50 0.041  p99 0.412  (2 steps carried 512 prefill tokens of others)
//!    ├─ queue    0.250 s  +0.000
//!    ├─ prefill  0.250 s  +0.250
//!    └─ decode   1.000 s  +0.500
//! ```

use crate::export::queue::{Item, StepPart};
use crate::export::retry::Verdict;
use crate::export::transport::Attempt;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, status};
use std::fmt::Write as _;

use crate::pipeline::spans::hex;

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|a: &&KeyValue| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn float(span: &Span, key: &str) -> Option<f64> {
    match attr(span, key)? {
        Value::DoubleValue(f) => Some(*f),
        _ => None,
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Renders the requests of a batch, one tree per request span.
pub fn render(items: &[Item]) -> String {
    let mut out = String::new();
    for item in items {
        let spans = crate::pipeline::spans::convert(&item.ctx, &item.record, item.detail);
        let Some((root, children)) = spans.split_first() else {
            continue;
        };
        let _ = write!(
            out,
            "trace {}  engine {} (pid {})",
            hex(&root.trace_id),
            item.engine.instance,
            item.engine.pid
        );
        if let Some(reason) = item.capture {
            let _ = write!(out, "  captured: {reason}");
        }
        out.push('\n');
        let status = match &root.status {
            Some(s) if s.code == status::StatusCode::Error as i32 => format!("ERROR {}", s.message),
            _ => "OK".to_owned(),
        };
        let parent = if root.parent_span_id.is_empty() {
            String::new()
        } else {
            format!("  parent {}", hex(&root.parent_span_id))
        };
        let duration = secs(
            root.end_time_unix_nano
                .saturating_sub(root.start_time_unix_nano),
        );
        let _ = writeln!(
            out,
            "└─ {}  SERVER  {duration:.3} s  {status}  span {}{parent}",
            root.name,
            hex(&root.span_id)
        );
        let input =
            int(root, "gen_ai.usage.input_tokens").or(int(root, "gen_ai.usage.prompt_tokens"));
        let output =
            int(root, "gen_ai.usage.output_tokens").or(int(root, "gen_ai.usage.completion_tokens"));
        let mut line = String::new();
        if let (Some(i), Some(o)) = (input, output) {
            let _ = write!(line, "in {i} tok");
            if let Some(c) = int(root, "gen_ai.usage.cache_read.input_tokens").filter(|c| *c > 0) {
                let _ = write!(line, " ({c} cached)");
            }
            let _ = write!(line, " → out {o} tok");
        }
        if let Some(Value::ArrayValue(reasons)) = attr(root, "gen_ai.response.finish_reasons")
            && let Some(Value::StringValue(r)) =
                reasons.values.first().and_then(|v| v.value.as_ref())
        {
            let _ = write!(line, "  finish {r}");
        }
        if let Some(t) = float(root, "gen_ai.latency.time_to_first_token") {
            let _ = write!(line, "  ttft {t:.3} s");
        }
        if let Some(Value::DoubleValue(t)) = attr(root, "gen_ai.request.temperature") {
            let _ = write!(line, "  temperature {t}");
        }
        let bar = if children.is_empty() { " " } else { "│" };
        if !line.is_empty() {
            let _ = writeln!(out, "   {bar}  {}", line.trim_start());
        }
        if let Some(steps) = &item.steps {
            let _ = write!(
                out,
                "   {bar}  gaps max {:.3} s  p50 {:.3}  p99 {:.3}",
                secs(steps.gap_max_ns),
                secs(steps.gap_p50_ns),
                secs(steps.gap_p99_ns)
            );
            if steps.prefill_steps > 0 {
                let _ = write!(
                    out,
                    "  ({} steps carried {} prefill tokens of others)",
                    steps.prefill_steps, steps.prefill_tokens
                );
            }
            out.push('\n');
        }
        for (i, child) in children.iter().enumerate() {
            let branch = if i + 1 == children.len() {
                "└─"
            } else {
                "├─"
            };
            let _ = writeln!(
                out,
                "   {branch} {:<8} {:.3} s  +{:.3}",
                child.name,
                secs(
                    child
                        .end_time_unix_nano
                        .saturating_sub(child.start_time_unix_nano)
                ),
                secs(
                    child
                        .start_time_unix_nano
                        .saturating_sub(root.start_time_unix_nano)
                ),
            );
        }
    }
    out
}

/// Renders one part of a capture's steps: one line per step (its number,
/// duration, decoding and prefilling slots, prompt tokens), and with the
/// last part the capture's own line.
pub fn render_steps(part: &StepPart) -> String {
    let mut out = String::new();
    for step in &part.steps {
        let _ = writeln!(
            out,
            "capture {} trace {}  engine_step {}  {:.3} ms  decode {}  prefill {} ({} tok)  slots {}/{}  kv {}/{}{}",
            part.reason,
            hex(&part.ids.trace_id),
            step.step,
            secs(step.t_end_ns.saturating_sub(step.t_start_ns)) * 1e3,
            step.decode_slots.len(),
            step.prefill_slots.len(),
            step.prefill_tokens,
            step.slots_occupied,
            step.slots_total,
            step.kv_cells_used,
            step.kv_cells_total,
            if step.failed { "  FAILED" } else { "" },
        );
    }
    if let Some(total) = part.root {
        let _ = writeln!(
            out,
            "capture {} of engine {} (pid {}): {total} steps, trace {}  {:.3} s window",
            part.reason,
            part.engine.instance,
            part.engine.pid,
            hex(&part.ids.trace_id),
            secs(part.window.to_ns.saturating_sub(part.window.from_ns)),
        );
    }
    out
}

/// Writes one batch's rendered trees to stdout.
pub(crate) fn write(text: &str) -> Attempt {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Attempt::accepted(),
        Err(e) => Attempt::Failed {
            verdict: Verdict::Permanent,
            error: format!("stdout: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::accounting::{EngineHandle, EngineStats};
    use crate::pipeline::spans::AttributeSet;
    use crate::pipeline::spans::tests::{ctx, raw_record};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use ringside_shm_protocol::Detail;
    use std::sync::Arc;

    fn engine() -> Arc<EngineHandle> {
        Arc::new(EngineHandle {
            id: 0,
            instance: "eng".into(),
            pid: 42,
            resource: Resource::default(),
            stats: EngineStats::default(),
            capture: Default::default(),
        })
    }

    #[test]
    fn a_request_renders_as_a_tree_with_its_phases() {
        let record = raw_record(1).decode(1).unwrap();
        let engine = engine();
        let text = render(&[Item::new(
            engine,
            Arc::new(ctx(AttributeSet::Both)),
            record,
            Detail::Phases,
        )]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("trace 0000000000000001abababababababab  engine eng (pid 42)")
        );
        assert!(
            lines[1].starts_with("└─ chat gemma  SERVER  1.600 s  OK"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("in 12 tok (4 cached) → out 11 tok  finish length"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("temperature 0"), "{}", lines[2]);
        assert_eq!(lines[3], "   ├─ queue    0.250 s  +0.000");
        assert_eq!(lines[4], "   ├─ prefill  0.250 s  +0.250");
        assert_eq!(lines[5], "   └─ decode   1.000 s  +0.500");
    }

    #[test]
    fn a_request_joined_to_its_steps_shows_its_gaps_and_the_prefill_behind_them() {
        let record = raw_record(1).decode(1).unwrap();
        let engine = engine();
        let mut item = Item::new(
            engine,
            Arc::new(ctx(AttributeSet::Both)),
            record,
            Detail::Phases,
        );
        item.steps = Some(crate::pipeline::steps::RequestSteps {
            gap_max_ns: 412_000_000,
            gap_p50_ns: 41_000_000,
            gap_p99_ns: 412_000_000,
            prefill_steps: 2,
            prefill_tokens: 512,
        });
        let text = render(&[item]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[3],
            "   │  gaps max 0.412 s  p50 0.041  p99 0.412  (2 steps carried 512 prefill tokens of others)"
        );
        assert_eq!(lines[4], "   ├─ queue    0.250 s  +0.000");
    }
}
