//! Development aid: read an engine's ring and print each record as one line, or switch its
//! tracing control word. The real reader is `ringside-agent`.
//!
//! ```sh
//! cargo run -p ringside-engine --example ring_dump -- engine-8000          # records so far
//! cargo run -p ringside-engine --example ring_dump -- engine-8000 off      # tracing off
//! cargo run -p ringside-engine --example ring_dump -- engine-8000 on       # tracing on
//! ```

use std::process::ExitCode;

use ringside_engine::trace_context::hex;
use ringside_shm_protocol::{AttachedSegment, OpenOptions, StartAt};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(instance) = args.next() else {
        eprintln!("usage: ring_dump INSTANCE [on|off]");
        return ExitCode::from(2);
    };
    let segment = match AttachedSegment::open(&instance, &OpenOptions::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ring_dump: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.next().as_deref() {
        Some("on") => {
            segment.ring().control().set_tracing_enabled(true);
            return ExitCode::SUCCESS;
        }
        Some("off") => {
            segment.ring().control().set_tracing_enabled(false);
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("ring_dump: unknown action {other:?} (on|off)");
            return ExitCode::from(2);
        }
        None => {}
    }
    let models = segment.info().model_count();
    let mut consumer = segment.ring().consumer(StartAt::Oldest);
    let result = consumer.poll(usize::MAX, |ticket, record| match record.decode(models) {
        Ok(r) => {
            let t = r.timestamps;
            let ms = |ns: Option<u64>| {
                ns.map_or_else(
                    || "-".to_owned(),
                    |ns| format!("{:.1}", ns.saturating_sub(t.arrival_ns) as f64 / 1e6),
                )
            };
            println!(
                "#{ticket} {:?} {:?} status={} finish={:?} err={:?} id={} trace={} parent={} \
                 tokens={}+{} queue={} running={} ms: sched={} first={} last={} end={}",
                r.kind,
                r.operation,
                r.http_status,
                r.finish_reason,
                r.error_type,
                hex(&r.request_id),
                hex(&r.trace_id),
                r.parent_span_id.map_or_else(|| "-".to_owned(), |p| hex(&p)),
                r.prompt_tokens,
                r.completion_tokens,
                r.queue_depth,
                r.running,
                ms(t.scheduled_ns),
                ms(t.first_token_ns),
                ms(t.last_token_ns),
                ms(Some(t.finished_ns)),
            );
        }
        Err(e) => println!("#{ticket} invalid record: {e}"),
    });
    if let Err(e) = result {
        eprintln!("ring_dump: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
