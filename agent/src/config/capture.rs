//! Incident capture's settings: the daemon's `--capture-*` flags over their
//! `RINGSIDE_CAPTURE_*` variables ([`resolve_capture`]), and what
//! `snapshot` needs ([`SnapshotArgs::options`]).

use super::cli::{CaptureArgs, SnapshotArgs};
use super::settings::{Env, resolve_target};
use super::{ConfigError, invalid};
use crate::capture::snapshot::SnapshotOptions;
use crate::capture::{
    CaptureSettings, DEFAULT_COOLDOWN, DEFAULT_WINDOW, ErrorBurstSettings, TtftP99Settings,
};
use crate::duration::parse_duration;
use std::time::Duration;

/// Default `--capture-error-window` and `--capture-ttft-window`.
const DEFAULT_TRIGGER_WINDOW: Duration = Duration::from_secs(60);
/// Default `--capture-ttft-min-requests`.
const DEFAULT_TTFT_MIN_REQUESTS: u32 = 20;

/// The flag if given, else the variable: with the name of the one used.
fn pick(
    env: &Env<'_>,
    flag: Option<&String>,
    flag_name: &'static str,
    var: &'static str,
) -> Option<(&'static str, String)> {
    flag.map(|v| (flag_name, v.clone()))
        .or_else(|| env(var).map(|v| (var, v)))
}

fn duration(
    env: &Env<'_>,
    flag: Option<&String>,
    flag_name: &'static str,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match pick(env, flag, flag_name, var) {
        None => Ok(default),
        Some((setting, v)) => parse_duration(&v).map_err(|e| invalid(setting, &v, e)),
    }
}

/// `--capture-*` over `RINGSIDE_CAPTURE_*`. The error-burst and TTFT
/// triggers are off unless given: what counts as a burst or a slow p99
/// depends on the traffic and the model, and a default-on error trigger
/// would let any client with bad requests set off exports.
pub fn resolve_capture(args: &CaptureArgs, env: &Env<'_>) -> Result<CaptureSettings, ConfigError> {
    let window = duration(
        env,
        args.capture_window.as_ref(),
        "--capture-window",
        "RINGSIDE_CAPTURE_WINDOW",
        DEFAULT_WINDOW,
    )?;
    let cooldown = duration(
        env,
        args.capture_cooldown.as_ref(),
        "--capture-cooldown",
        "RINGSIDE_CAPTURE_COOLDOWN",
        DEFAULT_COOLDOWN,
    )?;
    let on_crash = match pick(
        env,
        args.capture_on_crash.as_ref(),
        "--capture-on-crash",
        "RINGSIDE_CAPTURE_ON_CRASH",
    ) {
        None => true,
        Some((setting, v)) => match v.trim() {
            "on" => true,
            "off" => false,
            _ => return Err(invalid(setting, &v, "expected on or off")),
        },
    };
    let error_burst = match pick(
        env,
        args.capture_error_burst.as_ref(),
        "--capture-error-burst",
        "RINGSIDE_CAPTURE_ERROR_BURST",
    ) {
        None => None,
        Some((_, v)) if v.trim() == "off" => None,
        Some((setting, v)) => {
            let errors = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid(setting, &v, "expected a count of at least 1, or off"))?;
            Some(ErrorBurstSettings {
                errors,
                window: duration(
                    env,
                    args.capture_error_window.as_ref(),
                    "--capture-error-window",
                    "RINGSIDE_CAPTURE_ERROR_WINDOW",
                    DEFAULT_TRIGGER_WINDOW,
                )?,
            })
        }
    };
    let ttft_p99 = match pick(
        env,
        args.capture_ttft_p99.as_ref(),
        "--capture-ttft-p99",
        "RINGSIDE_CAPTURE_TTFT_P99",
    ) {
        None => None,
        Some((_, v)) if v.trim() == "off" => None,
        Some((setting, v)) => {
            let threshold = parse_duration(&v).map_err(|e| invalid(setting, &v, e))?;
            let min_requests = match pick(
                env,
                args.capture_ttft_min_requests.as_ref(),
                "--capture-ttft-min-requests",
                "RINGSIDE_CAPTURE_TTFT_MIN_REQUESTS",
            ) {
                None => DEFAULT_TTFT_MIN_REQUESTS,
                Some((setting, v)) => v
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| invalid(setting, &v, "expected a count of at least 1"))?,
            };
            Some(TtftP99Settings {
                threshold,
                window: duration(
                    env,
                    args.capture_ttft_window.as_ref(),
                    "--capture-ttft-window",
                    "RINGSIDE_CAPTURE_TTFT_WINDOW",
                    DEFAULT_TRIGGER_WINDOW,
                )?,
                min_requests,
            })
        }
    };
    Ok(CaptureSettings {
        window,
        cooldown,
        on_crash,
        error_burst,
        ttft_p99,
    })
}

impl SnapshotArgs {
    /// What `snapshot` does, its exporter resolved over the `OTEL_*`
    /// variables (`env` reads one) as `run` resolves it.
    pub fn options(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SnapshotOptions, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        for engine in &self.selection.engines {
            ringside_shm_protocol::validate_instance(engine)
                .map_err(|e| invalid("--engine", engine, e.reason))?;
        }
        Ok(SnapshotOptions {
            selection: self.selection.selection(),
            since: self.since,
            target: resolve_target(&self.export, &env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

    use super::*;

    fn resolve(args: &CaptureArgs, vars: &[(&str, &str)]) -> Result<CaptureSettings, ConfigError> {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        resolve_capture(args, &env)
    }

    #[test]
    fn defaults_capture_deaths_only_over_five_minutes() {
        let s = resolve(&CaptureArgs::default(), &[]).unwrap();
        assert_eq!(s, CaptureSettings::default());
        assert_eq!(s.window, Duration::from_secs(300));
        assert!(s.on_crash && s.error_burst.is_none() && s.ttft_p99.is_none());
    }

    #[test]
    fn flags_win_over_variables_and_turn_the_triggers_on() {
        let args = CaptureArgs {
            capture_error_burst: Some("5".into()),
            capture_ttft_p99: Some("750ms".into()),
            capture_window: Some("2m".into()),
            ..CaptureArgs::default()
        };
        let s = resolve(
            &args,
            &[
                ("RINGSIDE_CAPTURE_WINDOW", "10m"),
                ("RINGSIDE_CAPTURE_ERROR_WINDOW", "30s"),
                ("RINGSIDE_CAPTURE_ON_CRASH", "off"),
            ],
        )
        .unwrap();
        assert_eq!(s.window, Duration::from_secs(120));
        assert!(!s.on_crash);
        assert_eq!(
            s.error_burst,
            Some(ErrorBurstSettings {
                errors: 5,
                window: Duration::from_secs(30)
            })
        );
        let ttft = s.ttft_p99.unwrap();
        assert_eq!(ttft.threshold, Duration::from_millis(750));
        assert_eq!(ttft.min_requests, 20);
    }

    #[test]
    fn bad_values_name_their_setting() {
        let bad =
            |args: CaptureArgs, vars: &[(&str, &str)], setting: &str| match resolve(&args, vars) {
                Err(ConfigError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{setting}: {other:?}"),
            };
        bad(
            CaptureArgs::default(),
            &[("RINGSIDE_CAPTURE_ERROR_BURST", "0")],
            "RINGSIDE_CAPTURE_ERROR_BURST",
        );
        bad(
            CaptureArgs {
                capture_on_crash: Some("false".into()),
                ..CaptureArgs::default()
            },
            &[],
            "--capture-on-crash",
        );
        bad(
            CaptureArgs {
                capture_ttft_p99: Some("500".into()),
                ..CaptureArgs::default()
            },
            &[],
            "--capture-ttft-p99",
        );
        bad(
            CaptureArgs::default(),
            &[("RINGSIDE_CAPTURE_COOLDOWN", "soon")],
            "RINGSIDE_CAPTURE_COOLDOWN",
        );
    }
}
