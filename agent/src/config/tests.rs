//! Resolution of flags over the environment, and the config file.

use super::*;
use crate::export::{Compression, ExportTarget, OtlpSettings, Protocol};
use crate::pipeline::sampling::Sampler;
use crate::pipeline::spans::AttributeSet;
use clap::Parser;
use std::collections::HashMap;
use std::time::Duration;

fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let mut argv = vec!["ringside-agent", "run"];
    argv.extend_from_slice(args);
    let Command::Run(run) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not run")
    };
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::resolve(&run, &|name| env.get(name).cloned())
}

fn otlp(settings: &Settings) -> &OtlpSettings {
    match &settings.target {
        ExportTarget::Otlp(o) => o,
        other => panic!("not otlp: {other:?}"),
    }
}

#[test]
fn defaults_are_grpc_on_localhost_4317() {
    let s = resolve(&[], &[]).unwrap();
    let o = otlp(&s);
    assert_eq!(o.protocol, Protocol::Grpc);
    assert_eq!(o.traces_endpoint, "http://localhost:4317");
    assert_eq!(o.timeout, Duration::from_secs(10));
    assert_eq!(o.compression, Compression::None);
    assert_eq!(s.attributes, AttributeSet::Both);
    assert_eq!(s.sampler, Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
}

#[test]
fn http_appends_signal_paths_to_the_base_but_not_to_per_signal_endpoints() {
    let s = resolve(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:9/custom"),
        ],
    )
    .unwrap();
    let o = otlp(&s);
    assert_eq!(o.traces_endpoint, "http://collector:4318/v1/traces");
    assert_eq!(o.metrics_endpoint, "http://m:9/custom");
    let s = resolve(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap();
    assert_eq!(otlp(&s).traces_endpoint, "http://localhost:4318/v1/traces");
    assert_eq!(otlp(&s).protocol, Protocol::HttpJson);
}

#[test]
fn flags_override_the_environment() {
    let s = resolve(
        &[
            "--endpoint",
            "http://flag:1",
            "--compression",
            "gzip",
            "--timeout-ms",
            "250",
            "--header",
            "x-api-key=flag",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:2"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "9"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "X-Api-Key=env,tenant=a%20b"),
        ],
    )
    .unwrap();
    let o = otlp(&s);
    assert_eq!(o.traces_endpoint, "http://flag:1");
    assert_eq!(o.compression, Compression::Gzip);
    assert_eq!(o.timeout, Duration::from_millis(250));
    assert_eq!(
        o.headers,
        vec![
            ("tenant".to_owned(), "a b".to_owned()),
            ("x-api-key".to_owned(), "flag".to_owned())
        ]
    );
}

#[test]
fn bad_settings_are_refused_naming_the_setting() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (&["--protocol", "thrift"], &[], "--protocol"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (&["--endpoint", "http://host:port"], &[], "--endpoint"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz")],
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (&["--header", "a"], &[], "--header"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
        (
            &[],
            &[("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            &[],
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (&["--exporter", "file"], &[], "--output"),
        (&["--engine", "../etc"], &[], "--engine"),
        (&["--batch-size", "0"], &[], "--batch-size"),
        (&["--max-in-flight", "0"], &[], "--max-in-flight"),
        (&["--max-in-flight", "65"], &[], "--max-in-flight"),
        (
            &[],
            &[("OTEL_METRICS_EXPORTER", "prometheus")],
            "OTEL_METRICS_EXPORTER",
        ),
        (
            &["--metrics-exporter", "nothing"],
            &[],
            "--metrics-exporter",
        ),
    ];
    for (args, env, setting) in cases {
        let err = resolve(args, env).expect_err(setting).to_string();
        assert!(err.contains(setting), "{err:?} does not name {setting}");
    }
}

#[test]
fn metrics_are_pushed_unless_the_exporter_is_none_and_the_flag_wins_over_the_variable() {
    assert!(resolve(&[], &[]).unwrap().export_metrics);
    assert!(
        !resolve(&[], &[("OTEL_METRICS_EXPORTER", "none")])
            .unwrap()
            .export_metrics
    );
    assert!(
        resolve(
            &["--metrics-exporter", "otlp"],
            &[("OTEL_METRICS_EXPORTER", "none")]
        )
        .unwrap()
        .export_metrics
    );
    assert!(
        !resolve(&["--metrics-exporter", "none"], &[])
            .unwrap()
            .export_metrics
    );
}

#[test]
fn traces_specific_variables_win_over_the_general_ones() {
    let s = resolve(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=general,b=general"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "A=traces"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2000"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ],
    )
    .unwrap();
    let o = otlp(&s);
    assert_eq!(
        o.headers,
        vec![
            ("b".to_owned(), "general".to_owned()),
            ("A".to_owned(), "traces".to_owned())
        ]
    );
    assert_eq!(o.compression, Compression::Gzip);
    assert_eq!(o.timeout, Duration::from_secs(2));
    assert_eq!(o.protocol, Protocol::HttpJson);
    let err = resolve(&[], &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "x")]).unwrap_err();
    assert!(
        err.to_string()
            .contains("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
    );
}

#[test]
fn the_target_description_never_shows_header_values() {
    let s = resolve(&["--header", "authorization=Bearer%20s3cret"], &[]).unwrap();
    let text = s.target.describe();
    assert!(text.contains("authorization"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn empty_variables_count_as_unset() {
    let s = resolve(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", " ")]).unwrap();
    assert_eq!(otlp(&s).protocol, Protocol::Grpc);
}

#[test]
fn config_files_become_flags_and_the_command_line_wins() {
    assert_eq!(
        config_file_args("# c\n\nendpoint = \"http://c:1\"\nbackfill = true\nx = false\n"),
        Ok(vec![
            "--endpoint".to_owned(),
            "http://c:1".to_owned(),
            "--backfill".to_owned()
        ])
    );
    assert_eq!(config_file_args("endpoint http://c"), Err(1));
    assert_eq!(config_file_args("ok = 1\nbad name = 2"), Err(2));
    let path = std::env::temp_dir().join(format!("ringside-agent-cfg-{}", std::process::id()));
    std::fs::write(&path, "endpoint = http://file:1\ncompression = gzip\n").unwrap();
    let argv = [
        "ringside-agent",
        "run",
        "--config",
        path.to_str().unwrap(),
        "--endpoint",
        "http://flag:2",
    ];
    let cli = parse_command_line(argv.iter().map(Into::into).collect()).unwrap();
    let Command::Run(run) = cli.command else {
        panic!("not run")
    };
    assert_eq!(run.export.endpoint.as_deref(), Some("http://flag:2"));
    assert_eq!(run.export.compression.as_deref(), Some("gzip"));
    std::fs::write(&path, "endpoint\n").unwrap();
    let argv = ["ringside-agent", "run", "--config", path.to_str().unwrap()];
    let err = parse_command_line(argv.iter().map(Into::into).collect()).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    let _ = std::fs::remove_file(&path);
}
