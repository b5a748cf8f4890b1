//! The agent's metrics in the Prometheus text exposition format (0.0.4),
//! converted from the same OTLP request the agent exports: the gen_ai
//! histograms are computed from every record (sampled out or not).
//!
//! Names follow the OpenTelemetry → Prometheus rules: dots become
//! underscores, the unit `s` adds `_seconds`, monotonic sums add `_total`;
//! attributes become labels, and each series carries its engine as
//! `engine` (the resource's `ringside.engine.instance`).

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{NumberDataPoint, metric, number_data_point};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Default)]
struct Family {
    kind: &'static str,
    help: String,
    samples: String,
}

fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn unit_suffix(unit: &str) -> &'static str {
    match unit {
        "s" => "_seconds",
        "ms" => "_milliseconds",
        "By" => "_bytes",
        _ => "",
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn labels(engine: &str, attributes: &[KeyValue], extra: Option<(&str, &str)>) -> String {
    let mut pairs: BTreeMap<String, String> = BTreeMap::new();
    pairs.insert("engine".to_owned(), engine.to_owned());
    for kv in attributes {
        pairs.insert(sanitize(&kv.key), value_text(kv.value.as_ref()));
    }
    let mut out = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    if let Some((k, v)) = extra {
        let _ = write!(out, ",{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
    out
}

fn float(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.is_nan() {
        "NaN".to_owned()
    } else {
        value.to_string()
    }
}

fn number(point: &NumberDataPoint) -> String {
    match point.value {
        Some(number_data_point::Value::AsInt(i)) => i.to_string(),
        Some(number_data_point::Value::AsDouble(d)) => float(d),
        None => "0".to_owned(),
    }
}

/// Renders every metric of `request`.
pub fn render(request: &ExportMetricsServiceRequest) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for rm in &request.resource_metrics {
        let engine = rm
            .resource
            .as_ref()
            .and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == crate::pipeline::resource::ENGINE_INSTANCE_KEY)
            })
            .map(|kv| value_text(kv.value.as_ref()))
            .unwrap_or_default();
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let base = format!("{}{}", sanitize(&m.name), unit_suffix(&m.unit));
                match &m.data {
                    Some(metric::Data::Histogram(h)) => {
                        let f = families.entry(base.clone()).or_default();
                        f.kind = "histogram";
                        f.help.clone_from(&m.description);
                        for p in &h.data_points {
                            let mut cumulative = 0u64;
                            for (i, c) in p.bucket_counts.iter().enumerate() {
                                cumulative += c;
                                let le = p
                                    .explicit_bounds
                                    .get(i)
                                    .map_or("+Inf".to_owned(), |b| float(*b));
                                let _ = writeln!(
                                    f.samples,
                                    "{base}_bucket{} {cumulative}",
                                    labels(&engine, &p.attributes, Some(("le", &le)))
                                );
                            }
                            let l = labels(&engine, &p.attributes, None);
                            let _ = writeln!(
                                f.samples,
                                "{base}_sum{l} {}",
                                float(p.sum.unwrap_or(0.0))
                            );
                            let _ = writeln!(f.samples, "{base}_count{l} {}", p.count);
                        }
                    }
                    Some(metric::Data::Sum(s)) => {
                        let (name, kind) = if s.is_monotonic {
                            (format!("{base}_total"), "counter")
                        } else {
                            (base, "gauge")
                        };
                        let f = families.entry(name.clone()).or_default();
                        f.kind = kind;
                        f.help.clone_from(&m.description);
                        for p in &s.data_points {
                            let _ = writeln!(
                                f.samples,
                                "{name}{} {}",
                                labels(&engine, &p.attributes, None),
                                number(p)
                            );
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        let f = families.entry(base.clone()).or_default();
                        f.kind = "gauge";
                        f.help.clone_from(&m.description);
                        for p in &g.data_points {
                            let _ = writeln!(
                                f.samples,
                                "{base}{} {}",
                                labels(&engine, &p.attributes, None),
                                number(p)
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let mut out = String::new();
    for (name, f) in families {
        if f.samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
        let _ = writeln!(out, "# TYPE {name} {}", f.kind);
        out.push_str(&f.samples);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::accounting::{EngineHandle, EngineStats};
    use crate::pipeline::metrics::Metrics;
    use std::sync::Arc;

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let handle = Arc::new(EngineHandle {
            id: 0,
            instance: "eng\"1".into(),
            pid: 1,
            resource: crate::pipeline::resource::ResourceEnv::from_env(&|_| None, "h".into())
                .engine_resource("eng\"1", &crate::pipeline::resource::tests::identity(1, 1)),
            stats: EngineStats::default(),
            capture: Default::default(),
        });
        let mut m = Metrics::new(0);
        m.attach(&handle);
        let record = crate::pipeline::spans::tests::raw_record(1)
            .decode(1)
            .unwrap();
        m.record(&handle, "m", &record);
        m.record(&handle, "m", &record);
        let text =
            render(&m.to_request(1, 0, &crate::pipeline::metrics::ExportCounters::default()));
        assert!(
            text.contains("# TYPE ringside_agent_records_read_total counter"),
            "{text}"
        );
        assert!(text.contains("engine=\"eng\\\"1\""), "{text}");
        assert!(
            text.contains("# TYPE gen_ai_server_request_duration_seconds histogram"),
            "{text}"
        );
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_server_request_duration_seconds_bucket"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(
            buckets.len(),
            crate::pipeline::metrics::DURATION_BOUNDS.len() + 1
        );
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative");
        assert_eq!(buckets.last(), Some(&2));
        assert!(text.contains("le=\"+Inf\""), "{text}");
        assert!(
            text.contains("gen_ai_server_request_duration_seconds_count{"),
            "{text}"
        );
        for family in [
            "# TYPE ringside_server_request_queue_duration_seconds histogram",
            "# TYPE ringside_server_request_prefill_duration_seconds histogram",
            "# TYPE ringside_server_request_decode_duration_seconds histogram",
            "# TYPE ringside_server_token_usage histogram",
        ] {
            assert!(text.contains(family), "{family}\n{text}");
        }
    }
}
