//! [`Settings`]: everything `run` needs, resolved from [`RunArgs`] and the
//! environment, one `resolve_*` function per setting; the OTLP exporter's
//! settings are resolved in [`super::otlp`].

use super::cli::{ExportArgs, ExporterKind, RunArgs};
use super::otlp::resolve_otlp;
use super::{ConfigError, invalid};
use crate::capture::CaptureSettings;
use crate::control::admin_api::AdminSettings;
use crate::control::published_state;
use crate::export::ExportTarget;
use crate::pipeline::attach::ReaderSettings;
use crate::pipeline::sampling::{Sampler, SamplerError};
use crate::pipeline::spans::AttributeSet;
use ringside_shm_protocol::Detail;
use std::path::PathBuf;
use std::time::Duration;

/// Default address of the admin API.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Reads one environment variable; empty values count as unset.
pub(super) type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Everything `run` needs, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Instances to attach to (empty: all).
    pub engines: Vec<String>,
    /// Export what the ring holds when attaching without a stored cursor.
    pub backfill: bool,
    /// Detail override.
    pub detail: Option<Detail>,
    /// Attribute set.
    pub attributes: AttributeSet,
    /// Exporter.
    pub target: ExportTarget,
    /// Spans per batch.
    pub batch_size: usize,
    /// Batch delay.
    pub batch_delay: Duration,
    /// OTLP export requests in flight at once.
    pub max_in_flight: usize,
    /// Queue limit in requests.
    pub queue_max_items: usize,
    /// Queue memory cap in bytes.
    pub queue_max_bytes: usize,
    /// Retry budget per batch.
    pub retry_max_elapsed: Duration,
    /// Metrics interval.
    pub metrics_interval: Duration,
    /// Whether metrics are pushed over OTLP (`--metrics-exporter`).
    pub export_metrics: bool,
    /// Ring poll interval.
    pub poll_interval: Duration,
    /// Discovery interval.
    pub discover_interval: Duration,
    /// Shutdown flush budget.
    pub shutdown_timeout: Duration,
    /// Trusted segment owners.
    pub trusted_uids: Vec<u32>,
    /// Head sampler.
    pub sampler: Sampler,
    /// Keep requests above the live p99 (tail sampling).
    pub tail_above_p99: bool,
    /// Half the window of the live p99.
    pub tail_window: Duration,
    /// The stall threshold.
    pub stall_after: Duration,
    /// The published state file.
    pub state_file: PathBuf,
    /// Whether it is the default one (removed at exit).
    pub state_file_default: bool,
    /// The admin API, if on.
    pub admin: Option<AdminSettings>,
    /// Incident capture.
    pub capture: CaptureSettings,
}

impl Settings {
    /// Resolves flags over the environment (`env` reads one variable).
    pub fn resolve(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        resolve_engines(&args.engines)?;
        let target = resolve_target(&args.export, &env)?;
        check_limits(args)?;
        let metrics_interval = resolve_metrics_interval(args.metrics_interval_ms, &env)?;
        let export_metrics = resolve_metrics_exporter(args.metrics_exporter.as_deref(), &env)?;
        let sampler = resolve_sampler(args, &env)?;
        let admin = resolve_admin(args, &env)?;
        let capture = super::capture::resolve_capture(&args.capture, &env)?;
        Ok(Self {
            engines: args.engines.clone(),
            backfill: args.backfill,
            detail: args.detail.map(Detail::from),
            attributes: AttributeSet::from(args.attributes),
            target,
            batch_size: args.batch_size,
            batch_delay: Duration::from_millis(args.batch_delay_ms),
            max_in_flight: args.max_in_flight,
            queue_max_items: args.queue_max_items,
            queue_max_bytes: args.queue_max_mib.saturating_mul(1 << 20),
            retry_max_elapsed: Duration::from_millis(args.retry_max_elapsed_ms),
            metrics_interval,
            export_metrics,
            poll_interval: Duration::from_millis(args.poll_interval_ms),
            discover_interval: Duration::from_millis(args.discover_interval_ms.max(1)),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            trusted_uids: super::trust::with_engine_user(args.trusted_uids.clone()),
            sampler,
            tail_above_p99: args.tail_above_p99,
            tail_window: Duration::from_secs(args.tail_window_s.max(1)),
            stall_after: args.stall_after,
            state_file: resolve_state_file(args.state_file.as_ref(), &env),
            state_file_default: args.state_file.is_none(),
            admin,
            capture,
        })
    }

    /// What the reader thread needs of these settings.
    pub fn reader(&self) -> ReaderSettings {
        ReaderSettings {
            engines: self.engines.clone(),
            backfill: self.backfill,
            detail: self.detail,
            attributes: self.attributes,
            poll_interval: self.poll_interval,
            discover_interval: self.discover_interval,
            trusted_uids: self.trusted_uids.clone(),
            sampler: self.sampler.clone(),
            tail_above_p99: self.tail_above_p99,
            tail_window: self.tail_window,
            stall_after: self.stall_after,
            capture: self.capture.clone(),
        }
    }
}

/// `--engine`: every name must be a valid instance name.
fn resolve_engines(engines: &[String]) -> Result<(), ConfigError> {
    for engine in engines {
        ringside_shm_protocol::validate_instance(engine)
            .map_err(|e| invalid("--engine", engine, e.reason))?;
    }
    Ok(())
}

/// `--exporter` (with `--output` for the file exporter, the OTLP settings
/// for `otlp`).
pub(super) fn resolve_target(
    args: &ExportArgs,
    env: &Env<'_>,
) -> Result<ExportTarget, ConfigError> {
    Ok(match args.exporter {
        ExporterKind::Console => ExportTarget::Console,
        ExporterKind::File => {
            ExportTarget::File(args.output.clone().ok_or(ConfigError::Missing {
                setting: "--output",
                when: "with --exporter file",
            })?)
        }
        ExporterKind::Otlp => ExportTarget::Otlp(resolve_otlp(args, env)?),
    })
}

/// The batch, in-flight, queue and poll limits: each must be at least 1
/// (`--max-in-flight` at most 64).
fn check_limits(args: &RunArgs) -> Result<(), ConfigError> {
    if args.batch_size == 0 {
        return Err(invalid("--batch-size", "0", "must be at least 1"));
    }
    if !(1..=64).contains(&args.max_in_flight) {
        return Err(invalid(
            "--max-in-flight",
            &args.max_in_flight.to_string(),
            "must be between 1 and 64",
        ));
    }
    if args.queue_max_items == 0 {
        return Err(invalid("--queue-max-items", "0", "must be at least 1"));
    }
    if args.queue_max_mib == 0 {
        return Err(invalid("--queue-max-mib", "0", "must be at least 1"));
    }
    if args.poll_interval_ms == 0 {
        return Err(invalid("--poll-interval-ms", "0", "must be at least 1"));
    }
    Ok(())
}

/// `--metrics-interval-ms` over `OTEL_METRIC_EXPORT_INTERVAL` (default 60 s).
fn resolve_metrics_interval(flag: Option<u64>, env: &Env<'_>) -> Result<Duration, ConfigError> {
    let metrics_interval_ms = match flag {
        Some(ms) => ms,
        None => match env("OTEL_METRIC_EXPORT_INTERVAL") {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| invalid("OTEL_METRIC_EXPORT_INTERVAL", &v, "not milliseconds"))?,
            None => 60_000,
        },
    };
    if metrics_interval_ms == 0 {
        return Err(invalid("--metrics-interval-ms", "0", "must be at least 1"));
    }
    Ok(Duration::from_millis(metrics_interval_ms))
}

/// `--metrics-exporter` over `OTEL_METRICS_EXPORTER`: whether metrics are
/// pushed over OTLP. The specification's other values (`prometheus`,
/// `console`) are refused rather than read as `none`: `/metrics` on the admin
/// API is always there, and a silent fallback would hide a typo.
fn resolve_metrics_exporter(flag: Option<&str>, env: &Env<'_>) -> Result<bool, ConfigError> {
    let (setting, value) = match flag {
        Some(v) => ("--metrics-exporter", v.to_owned()),
        None => match env("OTEL_METRICS_EXPORTER") {
            Some(v) => ("OTEL_METRICS_EXPORTER", v),
            None => return Ok(true),
        },
    };
    match value.trim() {
        "otlp" => Ok(true),
        "none" => Ok(false),
        other => Err(invalid(setting, other, "must be otlp or none")),
    }
}

/// `--sampler` / `--sampler-arg` over `OTEL_TRACES_SAMPLER` / `_ARG`.
fn resolve_sampler(args: &RunArgs, env: &Env<'_>) -> Result<Sampler, ConfigError> {
    let (sampler_setting, sampler) = match &args.sampler {
        Some(s) => ("--sampler", Some(s.clone())),
        None => ("OTEL_TRACES_SAMPLER", env("OTEL_TRACES_SAMPLER")),
    };
    let (arg_setting, sampler_arg) = match &args.sampler_arg {
        Some(s) => ("--sampler-arg", Some(s.clone())),
        None => ("OTEL_TRACES_SAMPLER_ARG", env("OTEL_TRACES_SAMPLER_ARG")),
    };
    Sampler::parse(sampler.as_deref(), sampler_arg.as_deref()).map_err(|e| match e {
        SamplerError::Name(v) => ConfigError::Invalid {
            setting: sampler_setting.to_owned(),
            value: v,
            reason: "expected always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio"
                .to_owned(),
        },
        SamplerError::Arg(v) => ConfigError::Invalid {
            setting: arg_setting.to_owned(),
            value: v,
            reason: "expected a ratio in [0, 1]".to_owned(),
        },
    })
}

/// `--state-file`; default `agent-<pid>.json` in the runtime directory.
fn resolve_state_file(flag: Option<&PathBuf>, env: &Env<'_>) -> PathBuf {
    flag.cloned()
        .unwrap_or_else(|| published_state::default_path(env, std::process::id()))
}

/// The largest token file read (a token is a line).
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// Reads a bearer token file: a regular file (not through a link) that no
/// other user can read and that nobody but its owner can write (a group may
/// read it: Kubernetes mounts secrets `root:<fsGroup>` 0440).
fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => "is a symbolic link; give the file itself".to_owned(),
            _ => e.to_string(),
        })?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "mode {mode:o} lets other users read it or others write it; chmod 0600 (or 0440 for a group)"
        ));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "longer than {MAX_TOKEN_FILE_BYTES} bytes: not a token"
        ));
    }
    Ok(text)
}

/// `--admin-listen` (or `off`) and the bearer token (`--admin-token-file`
/// over `RINGSIDE_ADMIN_TOKEN`), required beyond loopback.
fn resolve_admin(args: &RunArgs, env: &Env<'_>) -> Result<Option<AdminSettings>, ConfigError> {
    let (text, explicit) = match args.admin_listen.as_deref() {
        Some(t) => (t.trim(), true),
        None => (DEFAULT_ADMIN_LISTEN, false),
    };
    if text == "off" {
        return Ok(None);
    }
    let listen: std::net::SocketAddr = text
        .parse()
        .map_err(|_| invalid("--admin-listen", text, "expected IP:PORT or off"))?;
    let token = match &args.admin_token_file {
        Some(path) => {
            let t = read_token_file(path)
                .map_err(|e| invalid("--admin-token-file", &path.display().to_string(), e))?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                return Err(invalid(
                    "--admin-token-file",
                    &path.display().to_string(),
                    "the file is empty",
                ));
            }
            Some(t)
        }
        None => env("RINGSIDE_ADMIN_TOKEN").map(|t| t.trim().to_owned()),
    };
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(invalid(
            "--admin-listen",
            text,
            "an admin API beyond loopback requires a bearer token: \
             give --admin-token-file PATH or set RINGSIDE_ADMIN_TOKEN (or bind 127.0.0.1)",
        ));
    }
    Ok(Some(AdminSettings {
        listen,
        explicit,
        token,
    }))
}
