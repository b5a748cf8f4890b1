//! Run-time control of engines through their control blocks: tracing on and
//! off, span detail, head and tail sampling. Everything here writes straight
//! into the engine's segment, so it works whether or not an agent daemon is
//! running, and the engine sees a change on its next request.

use ringside_shm_protocol::{
    AttachedSegment, Detail, ListError, Liveness, OpenError, OpenOptions, TailSampling,
    list_segments,
};

/// Why engines could not be found, opened or changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `/dev/shm` could not be listed.
    #[error(transparent)]
    List(#[from] ListError),
    /// One named engine's segment could not be opened.
    #[error("engine {engine}: {error}")]
    Open {
        /// The instance name.
        engine: String,
        /// Why (shown in the message, not as a separate cause).
        error: OpenError,
    },
    /// No engine segment exists (and none was named).
    #[error("no ringside engine found under /dev/shm")]
    NoEngines,
    /// A requested value is out of range.
    #[error("{field}: {reason} (got {value})")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
}

/// Which engines a command acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineSelection {
    /// Engine instances; empty: every segment under `/dev/shm`.
    pub engines: Vec<String>,
    /// Uids whose segments are trusted besides our own and root.
    pub trusted_uids: Vec<u32>,
}

/// Opens the named engines, or every segment under `/dev/shm` when `names`
/// is empty. A named engine that cannot be opened is an error naming it;
/// when listing, segments that cannot be opened are returned in `skipped`.
pub fn open_engines(names: &[String], trusted_uids: &[u32]) -> Result<OpenedEngines, ControlError> {
    let options = OpenOptions {
        trusted_uids: trusted_uids.to_vec(),
    };
    let mut out = OpenedEngines::default();
    if names.is_empty() {
        let listed = list_segments()?;
        if listed.is_empty() {
            return Err(ControlError::NoEngines);
        }
        for name in listed {
            match AttachedSegment::open(&name, &options) {
                Ok(s) => out.engines.push(s),
                Err(error) => out.skipped.push(ControlError::Open {
                    engine: name,
                    error,
                }),
            }
        }
    } else {
        for name in names {
            let segment =
                AttachedSegment::open(name, &options).map_err(|error| ControlError::Open {
                    engine: name.clone(),
                    error,
                })?;
            out.engines.push(segment);
        }
    }
    Ok(out)
}

/// Engines opened by [`open_engines`].
#[derive(Debug, Default)]
pub struct OpenedEngines {
    /// The segments, in name order.
    pub engines: Vec<AttachedSegment>,
    /// Listed segments that could not be opened (only when none was named).
    pub skipped: Vec<ControlError>,
}

/// An engine's control settings, as shown and as changed over the admin API.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EngineSettings {
    /// Instance name.
    pub engine: String,
    /// Engine pid.
    pub pid: u32,
    /// Whether the engine process runs.
    pub alive: bool,
    /// Whether the engine writes records.
    pub enabled: bool,
    /// `request` or `phases` (`invalid(N)` for a word no engine writes).
    pub detail: String,
    /// Head sampling ratio in [0, 1].
    pub head_sample_ratio: f64,
    /// Tail sampling rules.
    pub tail: TailSettings,
    /// Incremented by every change.
    pub settings_epoch: u64,
}

/// Tail sampling rules in user units.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TailSettings {
    /// Keep every failed, aborted and rejected request.
    pub keep_errors: bool,
    /// Ratio of the other requests kept, in [0, 1].
    pub sample_ratio: f64,
    /// Keep requests whose time to first token is at least this (ms); 0 = off.
    pub ttft_threshold_ms: f64,
    /// Keep requests whose end-to-end latency is at least this (ms); 0 = off.
    pub e2e_threshold_ms: f64,
}

/// Parts per million of a ratio.
pub fn ratio_to_ppm(ratio: f64) -> u32 {
    // In range after validation: the product is in [0, 1e6].
    (ratio.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
}

/// A ratio of parts per million.
pub fn ppm_to_ratio(ppm: u32) -> f64 {
    f64::from(ppm.min(1_000_000)) / 1_000_000.0
}

fn detail_name(detail: Result<Detail, u32>) -> String {
    match detail {
        Ok(Detail::Request) => "request".to_owned(),
        Ok(Detail::Phases) => "phases".to_owned(),
        Err(raw) => format!("invalid({raw})"),
    }
}

/// Reads one engine's settings.
pub fn read_settings(segment: &AttachedSegment) -> EngineSettings {
    let control = segment.ring().control();
    let tail = control.tail_sampling();
    EngineSettings {
        engine: segment.info().instance.clone(),
        pid: segment.info().identity.pid,
        alive: segment.liveness() == Liveness::Alive,
        enabled: control.tracing_enabled(),
        detail: detail_name(control.detail()),
        head_sample_ratio: ppm_to_ratio(control.head_sample_ppm()),
        tail: TailSettings {
            keep_errors: tail.keep_errors,
            sample_ratio: ppm_to_ratio(tail.sample_ppm),
            ttft_threshold_ms: tail.ttft_threshold_us as f64 / 1000.0,
            e2e_threshold_ms: tail.e2e_threshold_us as f64 / 1000.0,
        },
        settings_epoch: control.settings_epoch(),
    }
}

/// A change of settings: `None` leaves a setting as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Change {
    /// Tracing on or off.
    pub enabled: Option<bool>,
    /// Span detail.
    pub detail: Option<Detail>,
    /// Head sampling ratio in [0, 1].
    pub head_sample_ratio: Option<f64>,
    /// Keep every errored request.
    pub tail_keep_errors: Option<bool>,
    /// Tail ratio in [0, 1].
    pub tail_sample_ratio: Option<f64>,
    /// TTFT threshold in ms (0 = off).
    pub tail_ttft_threshold_ms: Option<f64>,
    /// End-to-end threshold in ms (0 = off).
    pub tail_e2e_threshold_ms: Option<f64>,
}

fn check_ratio(field: &'static str, value: Option<f64>) -> Result<(), ControlError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => Err(ControlError::Invalid {
            field,
            value: v.to_string(),
            reason: "expected a ratio in [0, 1]",
        }),
        _ => Ok(()),
    }
}

fn check_ms(field: &'static str, value: Option<f64>) -> Result<(), ControlError> {
    match value {
        // An hour is far beyond any request and keeps µs well inside u64.
        Some(v) if !(0.0..=3_600_000.0).contains(&v) => Err(ControlError::Invalid {
            field,
            value: v.to_string(),
            reason: "expected milliseconds in [0, 3600000]",
        }),
        _ => Ok(()),
    }
}

fn ms_to_us(ms: f64) -> u64 {
    // Validated to [0, 3.6e6] ms.
    (ms * 1000.0).round() as u64
}

impl Change {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Refuses out-of-range values, naming the field.
    pub fn validate(&self) -> Result<(), ControlError> {
        check_ratio("head_sample_ratio", self.head_sample_ratio)?;
        check_ratio("tail.sample_ratio", self.tail_sample_ratio)?;
        check_ms("tail.ttft_threshold_ms", self.tail_ttft_threshold_ms)?;
        check_ms("tail.e2e_threshold_ms", self.tail_e2e_threshold_ms)?;
        Ok(())
    }

    /// Writes the change into an engine's control block (validate first).
    pub fn apply(&self, segment: &AttachedSegment) -> Result<(), ControlError> {
        self.validate()?;
        let control = segment.ring().control();
        if let Some(detail) = self.detail {
            control.set_detail(detail);
        }
        if let Some(ratio) = self.head_sample_ratio {
            control.set_head_sample_ppm(ratio_to_ppm(ratio));
        }
        if self.tail_keep_errors.is_some()
            || self.tail_sample_ratio.is_some()
            || self.tail_ttft_threshold_ms.is_some()
            || self.tail_e2e_threshold_ms.is_some()
        {
            let old = control.tail_sampling();
            control.set_tail_sampling(TailSampling {
                keep_errors: self.tail_keep_errors.unwrap_or(old.keep_errors),
                sample_ppm: self.tail_sample_ratio.map_or(old.sample_ppm, ratio_to_ppm),
                ttft_threshold_us: self
                    .tail_ttft_threshold_ms
                    .map_or(old.ttft_threshold_us, ms_to_us),
                e2e_threshold_us: self
                    .tail_e2e_threshold_ms
                    .map_or(old.e2e_threshold_us, ms_to_us),
            });
        }
        // Last, so that an engine switched on already has its new settings.
        if let Some(on) = self.enabled {
            control.set_tracing_enabled(on);
        }
        Ok(())
    }
}

/// The settings of several engines as an aligned table.
pub fn settings_table(settings: &[EngineSettings]) -> String {
    let mut rows = vec![[
        "ENGINE".to_owned(),
        "PID".to_owned(),
        "ALIVE".to_owned(),
        "TRACING".to_owned(),
        "DETAIL".to_owned(),
        "HEAD".to_owned(),
        "TAIL".to_owned(),
    ]];
    for s in settings {
        rows.push([
            s.engine.clone(),
            s.pid.to_string(),
            if s.alive { "yes" } else { "no" }.to_owned(),
            if s.enabled { "on" } else { "off" }.to_owned(),
            s.detail.clone(),
            format!("{}", s.head_sample_ratio),
            describe_tail(&s.tail),
        ]);
    }
    crate::control::table::render(&rows)
}

/// `errors, ttft>=500ms, rest 0.1`: what the tail sampler keeps.
pub fn describe_tail(tail: &TailSettings) -> String {
    let mut parts = Vec::new();
    if tail.keep_errors {
        parts.push("errors".to_owned());
    }
    if tail.ttft_threshold_ms > 0.0 {
        parts.push(format!("ttft>={}ms", tail.ttft_threshold_ms));
    }
    if tail.e2e_threshold_ms > 0.0 {
        parts.push(format!("e2e>={}ms", tail.e2e_threshold_ms));
    }
    parts.push(format!("rest {}", tail.sample_ratio));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_round_trip_through_ppm() {
        assert_eq!(ratio_to_ppm(0.0), 0);
        assert_eq!(ratio_to_ppm(1.0), 1_000_000);
        assert_eq!(ratio_to_ppm(0.25), 250_000);
        assert_eq!(ppm_to_ratio(250_000), 0.25);
        assert_eq!(ppm_to_ratio(u32::MAX), 1.0);
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_field() {
        let bad = Change {
            head_sample_ratio: Some(1.5),
            ..Change::default()
        };
        assert!(
            matches!(bad.validate(), Err(ControlError::Invalid { field, .. }) if field == "head_sample_ratio")
        );
        let bad = Change {
            tail_ttft_threshold_ms: Some(-1.0),
            ..Change::default()
        };
        assert!(
            matches!(bad.validate(), Err(ControlError::Invalid { field, .. }) if field == "tail.ttft_threshold_ms")
        );
        let nan = Change {
            tail_sample_ratio: Some(f64::NAN),
            ..Change::default()
        };
        assert!(nan.validate().is_err());
        assert!(Change::default().is_empty());
    }

    #[test]
    fn tail_descriptions_read_well() {
        let off = TailSettings {
            keep_errors: false,
            sample_ratio: 0.0,
            ttft_threshold_ms: 0.0,
            e2e_threshold_ms: 0.0,
        };
        assert_eq!(describe_tail(&off), "rest 0");
        let on = TailSettings {
            keep_errors: true,
            sample_ratio: 0.1,
            ttft_threshold_ms: 500.0,
            e2e_threshold_ms: 0.0,
        };
        assert_eq!(describe_tail(&on), "errors, ttft>=500ms, rest 0.1");
    }
}
