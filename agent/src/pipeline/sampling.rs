//! Head sampling with `OTEL_TRACES_SAMPLER` semantics and tail sampling (the
//! control block's rules, optionally above the live p99), decided per
//! record. Sampled-out records still feed the metrics and are counted.
//!
//! Every ratio is *consistent probability sampling* as the OpenTelemetry
//! specification defines it (`trace/tracestate-probability-sampling.md`,
//! `trace/sdk.md` `TraceIdRatioBased`): a ratio `p` becomes a 56-bit rejection
//! threshold `T` (4 significant hex digits, the precision the specification
//! recommends to SDKs), the randomness `R` is the caller's explicit `rv` or
//! else the trace id's low 56 bits, and a request is kept when `R >= T`. So a
//! trace ringside keeps at `p` is kept by every consistent sampler (an SDK, a
//! gateway's `probabilistic_sampler`) at a higher ratio, and the threshold a
//! span was kept with goes out in its `tracestate` as `ot=th:…` for
//! downstream samplers and span-to-metrics estimates.

use ringside_shm_protocol::{OT_VALUE_LIMIT, RequestRecord, TailSampling};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// W3C trace flags: sampled.
pub const FLAG_SAMPLED: u8 = 0x01;
/// W3C Trace Context Level 2 trace flags: the trace id's low 56 bits are random.
pub const FLAG_RANDOM: u8 = 0x02;

/// Significant hex digits of the thresholds ringside computes from ratios.
pub const THRESHOLD_PRECISION: u32 = 4;

/// A 56-bit rejection threshold (`th`): of 2^56 randomness values, how many
/// are rejected. [`Threshold::ALWAYS`] (0) keeps everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Threshold(u64);

impl Threshold {
    /// Rejects nothing: probability 1 (`th:0`).
    pub const ALWAYS: Self = Self(0);

    /// A threshold from its 56-bit value (`None` when it is wider).
    pub fn from_value(value: u64) -> Option<Self> {
        (value < OT_VALUE_LIMIT).then_some(Self(value))
    }

    /// The 56-bit value.
    pub fn value(self) -> u64 {
        self.0
    }

    /// The threshold of a sampling probability in `(0, 1]` rounded to
    /// `precision` significant hex digits (1..=13), exactly as the
    /// specification's reference algorithm does it (IEEE-754 hex digits of
    /// `2 - p`, rounded at the last kept digit, the precision raised by the
    /// leading `f` digits of small probabilities). `None` for 0, which is not a
    /// probability (never sampling is `always_off`), or anything outside
    /// `[0, 1]`.
    pub fn from_probability(probability: f64, precision: u32) -> Option<Self> {
        if !(probability > 0.0 && probability <= 1.0) {
            return None;
        }
        if probability == 1.0 {
            return Some(Self::ALWAYS);
        }
        // frexp: probability = m * 2^exp with m in [0.5, 1). Every value
        // here is positive; a subnormal (far below 2^-56) takes the smallest
        // normal exponent, which the clamp below makes moot.
        let biased = i32::try_from((probability.to_bits() >> 52) & 0x7ff).unwrap_or(0);
        let exp = biased.max(1) - 1022;
        let wanted = i32::try_from(precision).unwrap_or(13);
        let precision = (wanted + (f64::from(exp) / -4.0).floor() as i32).clamp(1, 12);
        let rejection = 2.0 - probability + 2f64.powi(-4 * precision - 1);
        // The 13 hex digits of the mantissa of a value in [1, 2).
        let digits = if rejection >= 2.0 {
            0xf_ffff_ffff_ffff
        } else {
            rejection.to_bits() & ((1 << 52) - 1)
        };
        let kept = digits >> (4 * (13 - precision));
        Some(Self(kept << (4 * (14 - precision))))
    }

    /// A ratio in parts per million (the control block's): 1e6 or more is
    /// [`Self::ALWAYS`], 0 is `None` (keep nothing).
    pub fn from_ppm(ppm: u32) -> Option<Self> {
        if ppm >= 1_000_000 {
            return Some(Self::ALWAYS);
        }
        Self::from_probability(f64::from(ppm) / 1e6, THRESHOLD_PRECISION)
    }

    /// Whether randomness `r` passes: `r >= T`.
    pub fn keeps(self, randomness: u64) -> bool {
        randomness >= self.0
    }

    /// The sampling probability it stands for.
    pub fn probability(self) -> f64 {
        (OT_VALUE_LIMIT - self.0) as f64 / OT_VALUE_LIMIT as f64
    }
}

impl std::fmt::Display for Threshold {
    /// The `th` value: 14 hex digits with the trailing zeros removed (`0`
    /// for [`Threshold::ALWAYS`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        let digits = 14 - (self.0.trailing_zeros() / 4) as usize;
        write!(f, "{:0digits$x}", self.0 >> (4 * (14 - digits)))
    }
}

/// The trace id's randomness: its low 56 bits (W3C Trace Context Level 2).
pub fn trace_id_randomness(trace_id: &[u8; 16]) -> u64 {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    u64::from_be_bytes(low) & (OT_VALUE_LIMIT - 1)
}

/// A request's randomness: the caller's explicit `rv`, else the trace id's.
pub fn randomness(record: &RequestRecord) -> u64 {
    record
        .ot
        .randomness
        .unwrap_or_else(|| trace_id_randomness(&record.trace_id))
}

/// How a kept request's spans are marked for what comes after the agent
/// (with the caller's explicit randomness, from the record, written back
/// unchanged as `ot=rv:`). Small: the export queue holds one per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanSampling {
    /// The highest threshold any stage kept it with, written as `ot=th:`;
    /// `None` when a stage of unknown probability kept it (a parent-based
    /// decision without the parent's threshold).
    pub threshold: Option<Threshold>,
    /// Kept by a tail rule (error, slow), not by chance: the spans carry
    /// `sampling.priority` = 1, which a downstream probabilistic sampler
    /// honours by keeping them.
    pub priority: bool,
}

impl SpanSampling {
    /// The threshold raised to `stage`'s, as a further consistent stage
    /// applies it (an unknown probability stays unknown).
    #[must_use]
    pub fn raised_to(self, stage: Threshold) -> Self {
        Self {
            threshold: self.threshold.map(|t| t.max(stage)),
            ..self
        }
    }
}

/// A sampler from `OTEL_TRACES_SAMPLER` / `_ARG`.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampler {
    /// Keep everything (`th:0`).
    AlwaysOn,
    /// Keep nothing.
    AlwaysOff,
    /// `TraceIdRatioBased`: keep when the randomness reaches the ratio's
    /// threshold, whatever the caller's sampled flag.
    TraceIdRatio {
        /// The configured ratio, in (0, 1].
        ratio: f64,
        /// Its rejection threshold.
        threshold: Threshold,
    },
    /// The caller's sampled flag decides when it sent a traceparent (its
    /// threshold carried on when consistent); the inner sampler decides for
    /// new traces.
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

/// Set once the compatibility warning for non-random trace ids was logged.
static WARNED_NOT_RANDOM: AtomicBool = AtomicBool::new(false);

impl Sampler {
    /// Parses a sampler name and its argument (default ratio 1.0). A ratio
    /// of 0 is `always_off` (never sampling is not a probability).
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || -> Result<Self, SamplerError> {
            let ratio = match arg {
                None => 1.0,
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| SamplerError::Arg(a.to_owned()))?,
            };
            Ok(
                match Threshold::from_probability(ratio, THRESHOLD_PRECISION) {
                    Some(threshold) => Self::TraceIdRatio { ratio, threshold },
                    None => Self::AlwaysOff,
                },
            )
        };
        Ok(match name.map(str::trim) {
            None | Some("parentbased_always_on") => Self::ParentBased(Box::new(Self::AlwaysOn)),
            Some("always_on") => Self::AlwaysOn,
            Some("always_off") => Self::AlwaysOff,
            Some("traceidratio") => ratio()?,
            Some("parentbased_always_off") => Self::ParentBased(Box::new(Self::AlwaysOff)),
            Some("parentbased_traceidratio") => Self::ParentBased(Box::new(ratio()?)),
            Some(other) => return Err(SamplerError::Name(other.to_owned())),
        })
    }

    /// Decides for one request whose randomness is `randomness`
    /// ([`randomness`]): `None` drops it; else how its spans are marked.
    pub fn sample(&self, record: &RequestRecord, randomness: u64) -> Option<SpanSampling> {
        let kept = |threshold| SpanSampling {
            threshold,
            priority: false,
        };
        match self {
            Self::AlwaysOn => Some(kept(Some(Threshold::ALWAYS))),
            Self::AlwaysOff => None,
            Self::TraceIdRatio { threshold, .. } => {
                if record.parent_span_id.is_some()
                    && record.ot.randomness.is_none()
                    && record.trace_flags & FLAG_RANDOM == 0
                    && !WARNED_NOT_RANDOM.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        "the traceidratio sampler is presuming trace ids are random and expects the \
                         W3C random trace flag in confirmation; upgrade the callers to W3C Trace \
                         Context Level 2 (logged once)"
                    );
                }
                threshold.keeps(randomness).then(|| kept(Some(*threshold)))
            }
            Self::ParentBased(root) => match record.parent_span_id {
                None => root.sample(record, randomness),
                Some(_) if record.trace_flags & FLAG_SAMPLED != 0 => {
                    // The parent's threshold goes on when it agrees with
                    // the parent's decision; otherwise it is erased.
                    let parent = record
                        .ot
                        .threshold
                        .and_then(Threshold::from_value)
                        .filter(|t| t.keeps(randomness));
                    Some(kept(parent))
                }
                Some(_) => None,
            },
        }
    }
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
    /// Chosen by the ratio, whose threshold this is.
    Ratio(Threshold),
}

impl TailKeep {
    /// The marks after this decision: a rule's keep is not by chance
    /// ([`SpanSampling::priority`], the threshold unchanged: the rule keeps
    /// with probability 1); the ratio raises the threshold to its own.
    #[must_use]
    pub fn apply(self, sampling: SpanSampling) -> SpanSampling {
        match self {
            Self::Error | Self::Slow => SpanSampling {
                priority: true,
                ..sampling
            },
            Self::Ratio(t) => sampling.raised_to(t),
        }
    }
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
    /// The ratio's threshold, computed once per change of the rule.
    ratio: (u32, Option<Threshold>),
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
            ratio: (1_000_000, Some(Threshold::ALWAYS)),
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
        let decision = if rules.keep_errors && record.is_error() {
            Some(TailKeep::Error)
        } else if (rules.ttft_threshold_us > 0
            && ttft.is_some_and(|t| t >= rules.ttft_threshold_us))
            || (rules.e2e_threshold_us > 0 && e2e >= rules.e2e_threshold_us)
            || (self.above_p99
                && (ttft.zip(self.p99(0)).is_some_and(|(t, p)| t > p)
                    || self.p99(1).is_some_and(|p| e2e > p)))
        {
            Some(TailKeep::Slow)
        } else {
            if self.ratio.0 != rules.sample_ppm {
                self.ratio = (rules.sample_ppm, Threshold::from_ppm(rules.sample_ppm));
            }
            self.ratio
                .1
                .filter(|t| t.keeps(randomness(record)))
                .map(TailKeep::Ratio)
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
    use ringside_shm_protocol::OtState;
    use ringside_shm_protocol::{FinishReason, RecordKind};

    /// A record with `trace_flags`, a caller's parent when `parent`, and the
    /// caller's `ot` values.
    fn traced(low: u64, parent: bool, trace_flags: u8, ot: OtState) -> RequestRecord {
        let mut r = record(false, 5, low);
        r.parent_span_id = parent.then_some([3; 8]);
        r.trace_flags = trace_flags;
        r.ot = ot;
        r
    }

    fn decide(s: &Sampler, r: &RequestRecord) -> Option<SpanSampling> {
        s.sample(r, randomness(r))
    }

    // tracestate-probability-sampling.md, "Converting floating-point
    // probability to threshold value": the table for 1-in-N sampling at
    // precision 3, 4 and 5, with the actual probability at precision 4.
    #[test]
    fn thresholds_match_the_specifications_table() {
        let table: [(f64, [&str; 3], f64); 13] = [
            (1.0, ["0", "0", "0"], 1.0),
            (0.5, ["8", "8", "8"], 0.5),
            (1.0 / 3.0, ["aab", "aaab", "aaaab"], 0.3333282470703125),
            (0.25, ["c", "c", "c"], 0.25),
            (0.2, ["ccd", "cccd", "ccccd"], 0.1999969482421875),
            (0.125, ["e", "e", "e"], 0.125),
            (0.1, ["e66", "e666", "e6666"], 0.100006103515625),
            (0.0625, ["f", "f", "f"], 0.0625),
            (0.01, ["fd71", "fd70a", "fd70a4"], 0.010000228881835938),
            (0.001, ["ffbe7", "ffbe77", "ffbe76d"], 0.0009999871253967285),
            (
                0.0001,
                ["fff972", "fff9724", "fff97247"],
                0.00010000169277191162,
            ),
            (
                0.00001,
                ["ffff584", "ffff583a", "ffff583a5"],
                1.00000761449337e-05,
            ),
            (
                0.000001,
                ["ffffef4", "ffffef39", "ffffef391"],
                1.00000761449337e-06,
            ),
        ];
        for (p, th, actual) in table {
            for (precision, want) in (3..=5).zip(th) {
                let t = Threshold::from_probability(p, precision).unwrap();
                assert_eq!(t.to_string(), want, "p={p} precision={precision}");
            }
            let t = Threshold::from_probability(p, THRESHOLD_PRECISION).unwrap();
            assert_eq!(t.probability(), actual, "p={p}");
        }
        // "the rejection threshold with 5 digits of precision would be
        // (1-0.01) * 2^56 ≈ 71337018784743424 = 0xfd70a400000000"
        assert_eq!(
            Threshold::from_probability(0.01, 5).map(Threshold::value),
            Some(71_337_018_784_743_424)
        );
        assert_eq!(Threshold::from_probability(0.0, 4), None);
        assert_eq!(Threshold::from_probability(f64::NAN, 4), None);
        assert_eq!(Threshold::from_probability(1.5, 4), None);
    }

    #[test]
    fn ppm_ratios_become_thresholds_at_the_edges_exactly() {
        assert_eq!(Threshold::from_ppm(1_000_000), Some(Threshold::ALWAYS));
        assert_eq!(Threshold::from_ppm(u32::MAX), Some(Threshold::ALWAYS));
        assert_eq!(Threshold::from_ppm(0), None);
        assert_eq!(
            Threshold::from_ppm(500_000)
                .map(|t| t.to_string())
                .as_deref(),
            Some("8")
        );
        assert_eq!(
            Threshold::from_ppm(10_000)
                .map(|t| t.to_string())
                .as_deref(),
            Some("fd70a")
        );
        assert!(Threshold::ALWAYS.keeps(0));
    }

    // tracestate-handling.md, "Explicit randomness value rv": rv
    // 6e6d1a75832a2f is sampled at thresholds 6e6d1a75832a2f through 0, the
    // same as a trace id ending in 6e6d1a75832a2f without rv.
    #[test]
    fn randomness_is_the_explicit_rv_or_the_trace_ids_low_56_bits() {
        let rv = 0x6e6d1a75832a2f;
        let t = |v| Threshold::from_value(v).unwrap();
        assert!(t(rv).keeps(rv) && t(0).keeps(rv) && !t(rv + 1).keeps(rv));
        let mut id = [0xab; 16];
        id[9..].copy_from_slice(&[0x6e, 0x6d, 0x1a, 0x75, 0x83, 0x2a, 0x2f]);
        assert_eq!(trace_id_randomness(&id), rv);
        // sdk.md: "traceparent: 00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-00,
        // tracestate: ot=rv:7479cfb506891d": the rv, not the trace id, is the randomness.
        let mut r = traced(u64::MAX, true, 0, OtState::default());
        r.trace_id = [0xff; 16];
        assert_eq!(randomness(&r), 0xff_ffff_ffff_ffff);
        r.ot.randomness = Some(0x7479cfb506891d);
        assert_eq!(randomness(&r), 0x7479cfb506891d);
        assert_eq!(Threshold::from_value(1 << 56), None);
    }

    // The probabilistic sampler's documented example: a span with
    // `ot=th:0;rv:9b8233f7e3a151` sampled at 50% reads `ot=th:8;rv:9b8233f7e3a151`.
    #[test]
    fn a_further_stage_raises_the_threshold_and_keeps_the_rv() {
        let rv = 0x9b_8233_f7e3_a151;
        let half = Threshold::from_probability(0.5, THRESHOLD_PRECISION).unwrap();
        assert!(half.keeps(rv));
        let before = SpanSampling {
            threshold: Some(Threshold::ALWAYS),
            priority: false,
        };
        let after = before.raised_to(half);
        assert_eq!(after.threshold.map(|t| t.to_string()).as_deref(), Some("8"));
        // A stage never lowers a threshold, and an unknown one stays unknown.
        assert_eq!(after.raised_to(Threshold::ALWAYS), after);
        let unknown = SpanSampling::default();
        assert_eq!(unknown.raised_to(half).threshold, None);
    }

    #[test]
    fn parent_based_honours_the_callers_flag_and_carries_its_threshold() {
        let off = Sampler::parse(Some("parentbased_always_off"), None).unwrap();
        let sampled = traced(7, true, FLAG_SAMPLED, OtState::default());
        let unsampled = traced(7, true, 0, OtState::default());
        let root = traced(7, false, FLAG_RANDOM, OtState::default());
        // Sampled parent without a threshold: kept, no threshold goes out.
        assert_eq!(decide(&off, &sampled), Some(SpanSampling::default()));
        assert_eq!(decide(&off, &unsampled), None);
        assert_eq!(decide(&off, &root), None);
        let on = Sampler::default();
        assert_eq!(decide(&on, &unsampled), None);
        assert_eq!(
            decide(&on, &root).and_then(|s| s.threshold),
            Some(Threshold::ALWAYS)
        );
        // The parent's th:c (25%) goes on when the randomness agrees with it…
        let quarter = OtState {
            randomness: Some(0xc0_0000_0000_0000),
            threshold: Some(0xc0_0000_0000_0000),
        };
        let kept = decide(&on, &traced(7, true, FLAG_SAMPLED, quarter)).unwrap();
        assert_eq!(kept.threshold.map(|t| t.to_string()).as_deref(), Some("c"));
        // …and is erased when it contradicts the parent's sampled flag.
        let inconsistent = OtState {
            randomness: Some(0x10),
            ..quarter
        };
        let kept = decide(&on, &traced(7, true, FLAG_SAMPLED, inconsistent)).unwrap();
        assert_eq!(kept.threshold, None);
    }

    #[test]
    fn traceidratio_ignores_the_parents_flag_and_uses_the_threshold() {
        let s = Sampler::parse(Some("traceidratio"), Some("0.25")).unwrap();
        // th:c: kept exactly when the low 56 bits reach 0xc0000000000000.
        let at = |low: u64, flags| decide(&s, &traced(low, true, flags, OtState::default()));
        assert_eq!(
            at(0xc0_0000_0000_0000, 0).and_then(|k| k.threshold),
            Threshold::from_value(0xc0_0000_0000_0000)
        );
        assert_eq!(at(0xbf_ffff_ffff_ffff, FLAG_SAMPLED), None);
        // The byte above the low 56 bits is not randomness.
        assert_eq!(at(0xff00_0000_0000_0000, FLAG_SAMPLED), None);
        // An explicit rv decides instead of the trace id.
        let rv = OtState {
            randomness: Some(0xc0_0000_0000_0000),
            threshold: None,
        };
        assert!(decide(&s, &traced(0, true, 0, rv)).is_some());
        let all = Sampler::parse(Some("traceidratio"), Some("1")).unwrap();
        assert_eq!(
            decide(&all, &traced(0, false, 0, OtState::default())).and_then(|k| k.threshold),
            Some(Threshold::ALWAYS)
        );
        assert_eq!(
            Sampler::parse(Some("traceidratio"), Some("0")),
            Ok(Sampler::AlwaysOff)
        );
    }

    // The bug: below a 1/256 ratio the old rule (the top bits of the
    // trace id's low 64) and the specification's (the low 56 bits against
    // th) kept disjoint traces. Now ringside keeps at ratio p exactly the
    // traces every consistent sampler keeps at p, and a kept trace is kept
    // at every higher ratio.
    #[test]
    fn a_ratio_keeps_what_a_consistent_sampler_keeps_and_every_higher_ratio_too() {
        let ratios = ["0.001", "0.01", "0.1", "0.5", "1"];
        let samplers: Vec<Sampler> = ratios
            .iter()
            .map(|r| Sampler::parse(Some("traceidratio"), Some(r)).unwrap())
            .collect();
        let th_001 = Threshold::from_value(0xff_be77 << 32).unwrap();
        let mut kept_001 = 0;
        for i in 0u64..20_000 {
            let low = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let r = traced(low, false, FLAG_RANDOM, OtState::default());
            let kept: Vec<bool> = samplers.iter().map(|s| decide(s, &r).is_some()).collect();
            assert_eq!(kept[0], th_001.keeps(low & 0xff_ffff_ffff_ffff), "{low:x}");
            kept_001 += usize::from(kept[0]);
            for pair in kept.windows(2) {
                assert!(!pair[0] || pair[1], "{low:x}: {kept:?}");
            }
        }
        assert!((5..=40).contains(&kept_001), "{kept_001}");
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
            ot: Default::default(),
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
            sequence_slot: Some(0),
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
    fn tail_rules_mark_priority_and_the_ratio_raises_the_threshold() {
        let rules = TailSampling {
            keep_errors: true,
            sample_ppm: 250_000,
            ttft_threshold_us: 0,
            e2e_threshold_us: 0,
        };
        let mut t = TailSampler::new(false, Duration::from_secs(60));
        let head = SpanSampling {
            threshold: Some(Threshold::ALWAYS),
            ..SpanSampling::default()
        };
        // An error below the ratio is kept by the rule: th unchanged, priority.
        let error = t.decide(&rules, &record(true, 5, 1)).unwrap();
        assert_eq!(error, TailKeep::Error);
        assert_eq!(
            error.apply(head),
            SpanSampling {
                priority: true,
                ..head
            }
        );
        let quarter = Threshold::from_value(0xc0_0000_0000_0000).unwrap();
        assert_eq!(
            t.decide(&rules, &record(false, 5, 0xc0_0000_0000_0000)),
            Some(TailKeep::Ratio(quarter))
        );
        assert_eq!(
            TailKeep::Ratio(quarter).apply(head).threshold,
            Some(quarter)
        );
        assert_eq!(t.decide(&rules, &record(false, 5, 1)), None);
        // The default "rest 1" keeps everything at th:0.
        let all = TailSampling {
            sample_ppm: 1_000_000,
            ..rules
        };
        assert_eq!(
            t.decide(&all, &record(false, 5, 1)),
            Some(TailKeep::Ratio(Threshold::ALWAYS))
        );
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
