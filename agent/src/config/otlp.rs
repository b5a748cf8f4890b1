//! The OTLP exporter's settings, as the OpenTelemetry specification's
//! `OTEL_EXPORTER_OTLP_*` variables define them (and opentelemetry-otlp
//! resolves them): one `resolve_*` function per setting, the flag over the
//! signal-specific variable (`OTEL_EXPORTER_OTLP_TRACES_*`) over the general
//! one.

use super::cli::ExportArgs;
use super::settings::Env;
use super::{ConfigError, invalid};
use crate::export::{Compression, OtlpSettings, Protocol};
use crate::key_values::parse_key_values;
use std::time::Duration;

/// Resolves every OTLP setting, in this order: protocol, endpoints,
/// headers, compression, timeout.
pub(super) fn resolve_otlp(args: &ExportArgs, env: &Env<'_>) -> Result<OtlpSettings, ConfigError> {
    let protocol = resolve_protocol(args, env)?;
    let (traces_endpoint, metrics_endpoint) = resolve_endpoints(args, env, protocol)?;
    let headers = resolve_headers(args, env)?;
    let compression = resolve_compression(args, env)?;
    let timeout = resolve_timeout(args, env)?;
    Ok(OtlpSettings {
        protocol,
        traces_endpoint,
        metrics_endpoint,
        headers,
        compression,
        timeout,
    })
}

/// The flag if given, else the variable: with the name of the one used.
fn pick(
    env: &Env<'_>,
    flag: &Option<String>,
    flag_name: &'static str,
    var: &'static str,
) -> Option<(&'static str, String)> {
    flag.clone()
        .map(|v| (flag_name, v))
        .or_else(|| env(var).map(|v| (var, v)))
}

/// `--protocol` over `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` over
/// `OTEL_EXPORTER_OTLP_PROTOCOL`; default gRPC.
fn resolve_protocol(args: &ExportArgs, env: &Env<'_>) -> Result<Protocol, ConfigError> {
    match pick(
        env,
        &args.protocol,
        "--protocol",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    )
    .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)))
    {
        Some((setting, value)) => parse_protocol(&value)
            .ok_or_else(|| invalid(setting, &value, "expected grpc, http/protobuf or http/json")),
        None => Ok(Protocol::Grpc),
    }
}

fn parse_protocol(value: &str) -> Option<Protocol> {
    match value.trim() {
        "grpc" => Some(Protocol::Grpc),
        "http/protobuf" => Some(Protocol::HttpProtobuf),
        "http/json" => Some(Protocol::HttpJson),
        _ => None,
    }
}

/// The traces and metrics URLs: each signal's own endpoint (flag or
/// `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`) used as given; else the
/// base (`--endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`, default localhost
/// 4317 for gRPC, 4318 for HTTP), with `/v1/{signal}` appended over HTTP.
fn resolve_endpoints(
    args: &ExportArgs,
    env: &Env<'_>,
    protocol: Protocol,
) -> Result<(String, String), ConfigError> {
    let base = pick(
        env,
        &args.endpoint,
        "--endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    );
    if let Some((setting, url)) = &base {
        check_url(setting, url)?;
    }
    let default_base = match protocol {
        Protocol::Grpc => "http://localhost:4317",
        Protocol::HttpProtobuf | Protocol::HttpJson => "http://localhost:4318",
    };
    let base_url = base.map_or_else(|| default_base.to_owned(), |(_, url)| url);
    let signal_endpoint = |flag: &Option<String>,
                           flag_name: &'static str,
                           var: &'static str,
                           signal: &str|
     -> Result<String, ConfigError> {
        match pick(env, flag, flag_name, var) {
            Some((setting, url)) => {
                check_url(setting, &url)?;
                Ok(url)
            }
            None => Ok(match protocol {
                Protocol::Grpc => base_url.clone(),
                Protocol::HttpProtobuf | Protocol::HttpJson => join_signal_path(&base_url, signal),
            }),
        }
    };
    let traces_endpoint = signal_endpoint(
        &args.traces_endpoint,
        "--traces-endpoint",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "traces",
    )?;
    let metrics_endpoint = signal_endpoint(
        &args.metrics_endpoint,
        "--metrics-endpoint",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "metrics",
    )?;
    Ok((traces_endpoint, metrics_endpoint))
}

/// `OTEL_EXPORTER_OTLP_HEADERS`, then `OTEL_EXPORTER_OTLP_TRACES_HEADERS`,
/// then each `--header`: a later one replaces a same-named (ignoring case)
/// earlier one. Values are percent-decoded; each must be a valid HTTP header.
fn resolve_headers(args: &ExportArgs, env: &Env<'_>) -> Result<Vec<(String, String)>, ConfigError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    // General headers first; the traces-specific ones replace same-named ones.
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Some(value) = env(var) {
            let parsed = parse_key_values(&value).ok_or_else(|| {
                invalid(
                    var,
                    &value,
                    "expected key=value,key2=value2 with percent-encoded values",
                )
            })?;
            for (key, value) in parsed {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                headers.push((key, value));
            }
        }
    }
    for header in &args.headers {
        let parsed = parse_key_values(header)
            .filter(|kv| kv.len() == 1)
            .ok_or_else(|| invalid("--header", header, "expected key=value"))?;
        for (key, value) in parsed {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
            headers.push((key, value));
        }
    }
    for (key, value) in &headers {
        let valid_key = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid_key || value.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(invalid(
                "OTEL_EXPORTER_OTLP_HEADERS / --header",
                &format!("{key}={value}"),
                "not a valid HTTP header",
            ));
        }
    }
    Ok(headers)
}

/// `--compression` over `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION` over
/// `OTEL_EXPORTER_OTLP_COMPRESSION`: `gzip` or `none` (the default).
fn resolve_compression(args: &ExportArgs, env: &Env<'_>) -> Result<Compression, ConfigError> {
    match pick(
        env,
        &args.compression,
        "--compression",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    )
    .or_else(|| {
        env("OTEL_EXPORTER_OTLP_COMPRESSION").map(|v| ("OTEL_EXPORTER_OTLP_COMPRESSION", v))
    }) {
        None => Ok(Compression::None),
        Some((setting, value)) => match value.trim() {
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            _ => Err(invalid(setting, &value, "expected gzip or none")),
        },
    }
}

/// `--timeout-ms` over `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` over
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds (default 10 s, at least 1).
fn resolve_timeout(args: &ExportArgs, env: &Env<'_>) -> Result<Duration, ConfigError> {
    let timeout_var = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|var| env(var).map(|v| (var, v)));
    let timeout_ms = match (args.timeout_ms, timeout_var) {
        (Some(ms), _) => ms,
        (None, Some((var, v))) => v
            .trim()
            .parse()
            .map_err(|_| invalid(var, &v, "expected milliseconds"))?,
        (None, None) => 10_000,
    };
    if timeout_ms == 0 {
        return Err(invalid("--timeout-ms", "0", "must be at least 1"));
    }
    Ok(Duration::from_millis(timeout_ms))
}

fn check_url(setting: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid(setting, url, "must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(invalid(setting, url, "has no host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !port.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(invalid(setting, url, "the port is not a number"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(invalid(setting, url, "contains whitespace"));
    }
    Ok(())
}

fn join_signal_path(base: &str, signal: &str) -> String {
    let base = base.trim_end_matches('/');
    format!("{base}/v1/{signal}")
}
