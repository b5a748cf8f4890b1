//! Head sampling with `OTEL_TRACES_SAMPLER` semantics and tail sampling (the
//! control block's rules, optionally above the live p99), decided per
//! record. Sampled-out records still feed the metrics and are counted.

use ringside_shm_protocol::{FinishReason, RecordKind, RequestRecord, TailSampling};
use std::time::{Duration, Instant};

/// A sampler from `OTEL_TRACES_SAMPLER` / `_ARG`.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampler {
    /// Keep everything.
    AlwaysOn,
    /// Keep nothing.
    AlwaysOff,
    /// Keep a deterministic fraction of trace ids.
    TraceIdRatio(f64),
    /// The caller's sampled flag decides when it sent a traceparent; the
    /// inner sampler decides for new traces.
    ParentBased(Box<Sampler>),
}

/// Why a sampler setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    /// The sampler name is unknown.
    #[error("unknown sampler {0:?}")]
    Name(String),
    /// The ratio is not a number in [0, 1].
    #[error("sampler argument {0:?} is not a ratio in [0, 1]")]
    Arg(String),
}

impl Default for Sampler {
    fn default() -> Self {
        Self::ParentBased(Box::new(Self::AlwaysOn))
    }
}

impl Sampler {
    /// Parses a sampler name and its argument (default ratio 1.0).
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || -> Result<f64, SamplerError> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| SamplerError::Arg(a.to_owned())),
            }
        };
        Ok(match name.map(str::trim) {
            None | Some("parentbased_always_on") => Self::ParentBased(Box::new(Self::AlwaysOn)),
            Some("always_on") => Self::AlwaysOn,
            Some("always_off") => Self::AlwaysOff,
            Some("traceidratio") => Self::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => Self::ParentBased(Box::new(Self::AlwaysOff)),
            Some("parentbased_traceidratio") => {
                Self::ParentBased(Box::new(Self::TraceIdRatio(ratio()?)))
            }
            Some(other) => return Err(SamplerError::Name(other.to_owned())),
        })
    }

    /// Whether a request is exported: `parent_sampled` is the caller's
    /// sampled flag when it sent a valid traceparent.
    pub fn should_sample(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match self {
            Self::AlwaysOn => true,
            Self::AlwaysOff => false,
            Self::TraceIdRatio(ratio) => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let value = u64::from_be_bytes(low) >> 1;
                // 2^63 as f64 is exact; the product is at most 2^63.
                let bound = (ratio * 9_223_372_036_854_775_808.0) as u64;
                value < bound
            }
            Self::ParentBased(root) => match parent_sampled {
                Some(sampled) => sampled,
                None => root.should_sample(trace_id, None),
            },
        }
    }
}

/// Whether a trace id falls in a ratio given in parts per million: the same
/// trace-id bits as `traceidratio`, so the decision is consistent per trace.
pub fn keep_by_ppm(trace_id: &[u8; 16], ppm: u32) -> bool {
    if ppm >= 1_000_000 {
        return true;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let value = u64::from_be_bytes(low) >> 1;
    // (2^63 / 1e6) * ppm < 2^63 for ppm < 1e6.
    let bound = (u128::from(ppm) << 63) / 1_000_000;
    u128::from(value) < bound
}

/// Whether a request failed, was aborted or was rejected.
pub fn is_error(record: &RequestRecord) -> bool {
    record.kind == RecordKind::RequestRejected
        || record.error_type.as_str().is_some()
        || record.http_status >= 400
        || matches!(
            record.finish_reason,
            FinishReason::Abort | FinishReason::Error
        )
}

/// Time to first token and end-to-end latency of a request, in µs.
pub fn latencies_us(record: &RequestRecord) -> (Option<u64>, u64) {
    let t = &record.timestamps;
    let ttft = t
        .first_token_ns
        .map(|f| f.saturating_sub(t.arrival_ns) / 1000);
    (ttft, t.finished_ns.saturating_sub(t.arrival_ns) / 1000)
}

/// Why the tail sampler kept a request (or `None`: sampled out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailKeep {
    /// Failed, aborted or rejected.
    Error,
    /// Slower than an absolute threshold or the live p99.
    Slow,
    /// Chosen by the ratio.
    Ratio,
}

/// Per-engine tail sampler: the rules come from the engine's control block
/// each batch; with `above_p99` it also keeps requests slower than the live
/// p99 of TTFT or end-to-end latency (a sliding window of two periods).
#[derive(Debug)]
pub struct TailSampler {
    above_p99: bool,
    window: Duration,
    rotated: Instant,
    current: [hdrhistogram::Histogram<u64>; 2],
    previous: [hdrhistogram::Histogram<u64>; 2],
}

/// Fewer samples than this in the window: no p99 yet, the rule keeps nothing.
const P99_MIN_SAMPLES: u64 = 100;

fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    // 1 µs .. 1 hour at 2 significant digits: constant bounds hdrhistogram
    // accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
        .expect("constant histogram bounds are valid")
}

impl TailSampler {
    /// A sampler; `above_p99` enables the live-p99 rule over `window`.
    pub fn new(above_p99: bool, window: Duration) -> Self {
        Self {
            above_p99,
            window,
            rotated: Instant::now(),
            current: [latency_histogram(), latency_histogram()],
            previous: [latency_histogram(), latency_histogram()],
        }
    }

    fn p99(&self, which: usize) -> Option<u64> {
        let (c, p) = (&self.current[which], &self.previous[which]);
        let n = c.len() + p.len();
        if n < P99_MIN_SAMPLES {
            return None;
        }
        let mut merged = c.clone();
        merged.add(p).ok()?;
        Some(merged.value_at_quantile(0.99))
    }

    fn observe(&mut self, ttft: Option<u64>, e2e: u64) {
        if self.rotated.elapsed() >= self.window {
            self.previous = std::mem::replace(
                &mut self.current,
                [latency_histogram(), latency_histogram()],
            );
            self.rotated = Instant::now();
        }
        if let Some(t) = ttft {
            let _ = self.current[0].record(t.clamp(1, 3_600_000_000));
        }
        let _ = self.current[1].record(e2e.clamp(1, 3_600_000_000));
    }

    /// Decides for one request under `rules`; every request also feeds the
    /// live p99 (after the decision, so a request is compared with those
    /// before it).
    pub fn decide(&mut self, rules: &TailSampling, record: &RequestRecord) -> Option<TailKeep> {
        let (ttft, e2e) = latencies_us(record);
        let decision = if rules.keep_errors && is_error(record) {
            Some(TailKeep::Error)
        } else if (rules.ttft_threshold_us > 0
            && ttft.is_some_and(|t| t >= rules.ttft_threshold_us))
            || (rules.e2e_threshold_us > 0 && e2e >= rules.e2e_threshold_us)
            || (self.above_p99
                && (ttft.zip(self.p99(0)).is_some_and(|(t, p)| t > p)
                    || self.p99(1).is_some_and(|p| e2e > p)))
        {
            Some(TailKeep::Slow)
        } else if keep_by_ppm(&record.trace_id, rules.sample_ppm) {
            Some(TailKeep::Ratio)
        } else {
            None
        };
        if self.above_p99 {
            self.observe(ttft, e2e);
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_based_honours_the_callers_flag() {
        let s = Sampler::parse(Some("parentbased_always_off"), None).unwrap();
        assert!(s.should_sample(&[1; 16], Some(true)));
        assert!(!s.should_sample(&[1; 16], Some(false)));
        assert!(!s.should_sample(&[1; 16], None));
        let s = Sampler::default();
        assert!(!s.should_sample(&[1; 16], Some(false)));
        assert!(s.should_sample(&[1; 16], None));
    }

    #[test]
    fn ratio_keeps_about_the_fraction_and_the_edges_exactly() {
        let s = Sampler::parse(Some("traceidratio"), Some("0.25")).unwrap();
        let mut kept = 0;
        for i in 0u64..10_000 {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            kept += usize::from(s.should_sample(&id, None));
        }
        assert!((2_000..3_000).contains(&kept), "{kept}");
        let none = Sampler::parse(Some("traceidratio"), Some("0")).unwrap();
        let all = Sampler::parse(Some("traceidratio"), Some("1")).unwrap();
        assert!(!none.should_sample(&[0xff; 16], None));
        assert!(all.should_sample(&[0xff; 16], None));
    }

    #[test]
    fn bad_names_and_ratios_are_refused() {
        assert_eq!(
            Sampler::parse(Some("often"), None),
            Err(SamplerError::Name("often".into()))
        );
        for bad in ["-0.1", "1.5", "NaN", "x"] {
            assert!(
                Sampler::parse(Some("traceidratio"), Some(bad)).is_err(),
                "{bad}"
            );
        }
    }

    fn record(error: bool, e2e_ms: u64, low: u64) -> RequestRecord {
        use ringside_shm_protocol::{ErrorType, Operation, Sampling, Timestamps};
        let mut trace_id = [0; 16];
        trace_id[0] = 1;
        trace_id[8..].copy_from_slice(&low.to_be_bytes());
        let mut r = RequestRecord {
            kind: RecordKind::RequestFinished,
            operation: Operation::Chat,
            request_id: [1; 16],
            trace_id,
            parent_span_id: None,
            span_id: [2; 8],
            trace_flags: 0,
            timestamps: Timestamps {
                arrival_ns: 1_000_000_000,
                scheduled_ns: Some(1_000_000_001),
                first_token_ns: Some(1_000_000_002),
                last_token_ns: Some(1_000_000_003),
                finished_ns: 1_000_000_000 + e2e_ms * 1_000_000,
            },
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            sampling: Sampling::default(),
            params_set: 0,
            stream: false,
            finish_reason: FinishReason::Stop,
            http_status: 200,
            error_type: ErrorType::None,
            model_index: 0,
            queue_depth: 0,
            running: 0,
        };
        if error {
            r.error_type = ErrorType::InvalidRequest;
            r.http_status = 400;
            r.finish_reason = FinishReason::Error;
        }
        // What the engine would write decodes to the same value.
        assert_eq!(r.encode().decode(1), Ok(r));
        r
    }

    #[test]
    fn ppm_edges_are_exact() {
        assert!(keep_by_ppm(&[0xff; 16], 1_000_000));
        assert!(!keep_by_ppm(&[0; 16], 0));
        let kept = (0u64..10_000)
            .filter(|i| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
                keep_by_ppm(&id, 100_000)
            })
            .count();
        assert!((800..1_200).contains(&kept), "{kept}");
    }

    #[test]
    fn tail_keeps_errors_and_slow_requests_and_drops_the_rest_at_ratio_zero() {
        let rules = TailSampling {
            keep_errors: true,
            sample_ppm: 0,
            ttft_threshold_us: 0,
            e2e_threshold_us: 2_000_000,
        };
        let mut t = TailSampler::new(false, Duration::from_secs(60));
        assert_eq!(t.decide(&rules, &record(true, 5, 7)), Some(TailKeep::Error));
        assert_eq!(
            t.decide(&rules, &record(false, 3000, 7)),
            Some(TailKeep::Slow)
        );
        assert_eq!(t.decide(&rules, &record(false, 5, 7)), None);
        let no_errors = TailSampling {
            keep_errors: false,
            ..rules
        };
        assert_eq!(t.decide(&no_errors, &record(true, 5, 7)), None);
    }

    #[test]
    fn the_live_p99_rule_keeps_only_the_outliers() {
        let rules = TailSampling {
            keep_errors: false,
            sample_ppm: 0,
            ttft_threshold_us: 0,
            e2e_threshold_us: 0,
        };
        let mut t = TailSampler::new(true, Duration::from_secs(60));
        let mut kept = 0;
        for i in 0..1_000u64 {
            kept += usize::from(t.decide(&rules, &record(false, 10 + i % 10, i)).is_some());
        }
        assert!(kept < 20, "{kept}");
        assert_eq!(
            t.decide(&rules, &record(false, 500, 1)),
            Some(TailKeep::Slow)
        );
    }
}
