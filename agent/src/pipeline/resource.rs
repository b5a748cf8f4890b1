//! The OTLP resource of an engine: who produced the spans and metrics.

use crate::key_values::parse_key_values;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use ringside_shm_protocol::EngineIdentity;

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

/// The resource attribute that names the engine instance on its host (the
/// segment's instance name; the `engine` label of the Prometheus page).
pub const ENGINE_INSTANCE_KEY: &str = "ringside.engine.instance";

/// The resource conventions' namespace for `service.instance.id` UUIDs.
const SERVICE_INSTANCE_NAMESPACE: [u8; 16] =
    0x4d63_009a_8d0f_11ee_aad7_4c79_6ed8_e320_u128.to_be_bytes();

/// A name-based UUID (version 5, SHA-1, RFC 9562 §5.5), in its text form.
fn uuid_v5(namespace: [u8; 16], name: &[u8]) -> String {
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(&namespace);
    sha1.update(name);
    let digest = sha1.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The host's machine id (`/etc/machine-id`, the conventions' `host.id` on
/// Linux); `None` if there is none.
pub fn machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|path| {
            let text = std::fs::read_to_string(path).ok()?;
            let id = text.trim();
            // 32 hex digits; anything else is not a machine id.
            (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
        })
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
    /// `host.id`: the machine id, when the host has one.
    pub machine_id: Option<String>,
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
            machine_id: machine_id(),
        }
    }

    /// The default `service.instance.id` of an engine generation: a UUID v5
    /// (the conventions' namespace) of the machine id (else the host name),
    /// the instance name, the segment's generation and its creation time.
    /// Unique across hosts (every bare-metal host runs `engine-8000`), the
    /// same for every agent that reads that generation, new when the engine
    /// restarts or the host reboots.
    pub fn service_instance_id(&self, instance: &str, identity: &EngineIdentity) -> String {
        let host = self.machine_id.as_deref().unwrap_or(&self.host_name);
        let name = format!(
            "{host}/{instance}/{}/{}",
            identity.generation, identity.created_realtime_ns
        );
        uuid_v5(SERVICE_INSTANCE_NAMESPACE, name.as_bytes())
    }

    /// The resource of one engine generation. OTEL_RESOURCE_ATTRIBUTES may
    /// override any attribute but `service.name` (OTEL_SERVICE_NAME wins
    /// over it, per the SDK specification).
    pub fn engine_resource(&self, instance: &str, identity: &EngineIdentity) -> Resource {
        let mut attributes = vec![
            kv_str("service.name", self.service_name.clone()),
            kv_str(
                "service.instance.id",
                self.service_instance_id(instance, identity),
            ),
            kv_str(ENGINE_INSTANCE_KEY, instance),
            kv_str("host.name", self.host_name.clone()),
        ];
        if let Some(id) = &self.machine_id {
            attributes.push(kv_str("host.id", id.clone()));
        }
        attributes.extend([
            kv_int("process.pid", i64::from(identity.pid)),
            kv_str("telemetry.sdk.name", "ringside"),
            kv_str("telemetry.sdk.language", "rust"),
            kv_str("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ]);
        for (key, value) in &self.extra {
            if key == "service.name" {
                continue;
            }
            match attributes.iter_mut().find(|a| &a.key == key) {
                Some(a) => *a = kv_str(key, value.clone()),
                None => attributes.push(kv_str(key, value.clone())),
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

    pub(crate) fn identity(pid: u32, generation: u64) -> EngineIdentity {
        EngineIdentity {
            pid,
            start_time: 7,
            generation,
            created_realtime_ns: 1_796_000_000_000_000_000,
        }
    }

    #[test]
    fn uuid_v5_matches_the_rfc_example() {
        // RFC 9562 appendix A.4: "www.example.com" in the DNS namespace.
        let dns = 0x6ba7_b810_9dad_11d1_80b4_00c0_4fd4_30c8_u128.to_be_bytes();
        assert_eq!(
            uuid_v5(dns, b"www.example.com"),
            "2ed6657d-e927-568b-95e1-2665a8aea6a2"
        );
    }

    #[test]
    fn the_instance_id_is_unique_per_host_and_generation_and_stable_within_one() {
        let mut env = ResourceEnv::from_env(&env_of(&[]), "box".into());
        env.machine_id = Some("0123456789abcdef0123456789abcdef".into());
        let id = |env: &ResourceEnv, name: &str, generation| {
            env.service_instance_id(name, &identity(1, generation))
        };
        let first = id(&env, "engine-8000", 1);
        assert_eq!(first.len(), 36);
        assert_eq!(&first[14..15], "5", "version 5: {first}");
        assert_eq!(first, id(&env, "engine-8000", 1), "stable");
        assert_ne!(
            first,
            id(&env, "engine-8000", 2),
            "a restart is a new instance"
        );
        assert_ne!(first, id(&env, "engine-8001", 1));
        let mut other_host = env.clone();
        other_host.machine_id = Some("fedcba9876543210fedcba9876543210".into());
        assert_ne!(first, id(&other_host, "engine-8000", 1), "another host");
        // Without a machine id the host name stands in.
        other_host.machine_id = None;
        assert_ne!(first, id(&other_host, "engine-8000", 1));
    }

    #[test]
    fn resource_attributes_override_the_defaults_but_not_the_service_name() {
        let env = ResourceEnv::from_env(
            &env_of(&[
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "service.instance.id=pod-7,host.name=node-a,service.name=x,k8s.pod.name=p",
                ),
                ("OTEL_SERVICE_NAME", "svc"),
            ]),
            "box".into(),
        );
        let r = env.engine_resource("eng-1", &identity(42, 1));
        let s = |k| match attr(&r.attributes, k) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("service.instance.id"), "pod-7");
        assert_eq!(s("host.name"), "node-a");
        assert_eq!(s("service.name"), "svc");
        assert_eq!(s("k8s.pod.name"), "p");
        assert_eq!(s(ENGINE_INSTANCE_KEY), "eng-1");
        let keys: Vec<&str> = r.attributes.iter().map(|a| a.key.as_str()).collect();
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "no key twice: {keys:?}");
    }

    #[test]
    fn defaults_and_engine_identity() {
        let mut env = ResourceEnv::from_env(&env_of(&[]), "box".into());
        env.machine_id = Some("0123456789abcdef0123456789abcdef".into());
        let r = env.engine_resource("eng-1", &identity(42, 1));
        let s = |k| match attr(&r.attributes, k) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("service.name"), "ringside-engine");
        assert_eq!(
            s("service.instance.id"),
            env.service_instance_id("eng-1", &identity(42, 1))
        );
        assert_eq!(s(ENGINE_INSTANCE_KEY), "eng-1");
        assert_eq!(s("host.id"), "0123456789abcdef0123456789abcdef");
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
