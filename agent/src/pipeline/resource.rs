//! The OTLP resource of an engine: who produced the spans and metrics.

use crate::key_values::parse_key_values;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// Default `service.name` when OTEL_SERVICE_NAME is not set.
pub const DEFAULT_SERVICE_NAME: &str = "ringside-engine";

/// A string attribute.
pub fn kv_str(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

/// An integer attribute.
pub fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// A floating-point attribute.
pub fn kv_f64(key: &str, value: f64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::DoubleValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// A string-array attribute.
pub fn kv_str_array(key: &str, values: &[&str]) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::ArrayValue(
                opentelemetry_proto::tonic::common::v1::ArrayValue {
                    values: values
                        .iter()
                        .map(|v| AnyValue {
                            value: Some(any_value::Value::StringValue((*v).to_owned())),
                        })
                        .collect(),
                },
            )),
        }),
        ..KeyValue::default()
    }
}

/// The host's name, from the kernel; empty if unreadable.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Resource settings shared by every engine: read once from the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceEnv {
    /// `service.name`.
    pub service_name: String,
    /// Decoded OTEL_RESOURCE_ATTRIBUTES (empty if unset or undecodable).
    pub extra: Vec<(String, String)>,
    /// `host.name`.
    pub host_name: String,
}

impl ResourceEnv {
    /// Reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES through `env`. An
    /// undecodable OTEL_RESOURCE_ATTRIBUTES is ignored as a whole (and logged).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>, host_name: String) -> Self {
        let extra = match env("OTEL_RESOURCE_ATTRIBUTES") {
            None => Vec::new(),
            Some(raw) => parse_key_values(&raw).unwrap_or_else(|| {
                tracing::warn!(
                    value = %raw,
                    "OTEL_RESOURCE_ATTRIBUTES does not decode; ignoring it as a whole"
                );
                Vec::new()
            }),
        };
        let from_attrs = extra
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone());
        let service_name = env("OTEL_SERVICE_NAME")
            .filter(|s| !s.trim().is_empty())
            .or(from_attrs)
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        Self {
            service_name,
            extra,
            host_name,
        }
    }

    /// The resource of one engine.
    pub fn engine_resource(&self, instance: &str, engine_pid: u32) -> Resource {
        let mut attributes = vec![
            kv_str("service.name", self.service_name.clone()),
            kv_str("service.instance.id", instance),
            kv_str("host.name", self.host_name.clone()),
            kv_int("process.pid", i64::from(engine_pid)),
            kv_str("telemetry.sdk.name", "ringside"),
            kv_str("telemetry.sdk.language", "rust"),
            kv_str("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ];
        for (key, value) in &self.extra {
            if !attributes.iter().any(|a| &a.key == key) {
                attributes.push(kv_str(key, value.clone()));
            }
        }
        Resource {
            attributes,
            ..Resource::default()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_and_engine_identity() {
        let env = ResourceEnv::from_env(&env_of(&[]), "box".into());
        let r = env.engine_resource("eng-1", 42);
        let s = |k| match attr(&r.attributes, k) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("service.name"), "ringside-engine");
        assert_eq!(s("service.instance.id"), "eng-1");
        assert_eq!(s("host.name"), "box");
        assert_eq!(s("telemetry.sdk.language"), "rust");
        assert_eq!(
            attr(&r.attributes, "process.pid"),
            Some(&any_value::Value::IntValue(42))
        );
    }

    #[test]
    fn resource_attributes_are_percent_decoded_and_service_name_wins() {
        let env = ResourceEnv::from_env(
            &env_of(&[
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod%20eu,team=a%2Cb",
                ),
                ("OTEL_SERVICE_NAME", "svc"),
            ]),
            String::new(),
        );
        assert_eq!(env.service_name, "svc");
        assert_eq!(
            env.extra,
            vec![
                ("deployment.environment".into(), "prod eu".into()),
                ("team".into(), "a,b".into())
            ]
        );
        let env = ResourceEnv::from_env(
            &env_of(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")]),
            String::new(),
        );
        assert_eq!(env.service_name, "from-attrs");
    }

    #[test]
    fn an_undecodable_variable_is_ignored_as_a_whole() {
        let env = ResourceEnv::from_env(
            &env_of(&[("OTEL_RESOURCE_ATTRIBUTES", "good=1,bad=%zz")]),
            String::new(),
        );
        assert!(env.extra.is_empty());
        let env = ResourceEnv::from_env(
            &env_of(&[("OTEL_RESOURCE_ATTRIBUTES", "good=1,novalue")]),
            String::new(),
        );
        assert!(env.extra.is_empty());
    }
}
