//! Retry classification exactly as the OTLP specification has it, and the
//! backoff schedule. Pure functions; the exporter applies them.
//!
//! * gRPC: CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE
//!   and DATA_LOSS are retried; RESOURCE_EXHAUSTED only when the server sent
//!   a `google.rpc.RetryInfo`; everything else is permanent.
//! * HTTP: 429, 502, 503 and 504 are retried, honouring `Retry-After`; every
//!   other status is permanent. A partial success is never retried.
//! * A server's delay hint is honoured but capped at [`MAX_SERVER_DELAY`];
//!   otherwise the delay grows exponentially with jitter, and no batch is
//!   retried past its maximum elapsed time.

use std::time::Duration;

/// First backoff delay.
pub const INITIAL_DELAY: Duration = Duration::from_millis(200);
/// Largest backoff delay.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// Largest delay a server may ask for with RetryInfo or Retry-After.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(30);

/// What to do with a failed export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Try again, after the server's hint if it gave one.
    Retry(Option<Duration>),
    /// Give up on this batch.
    Permanent,
}

/// Classifies a gRPC status code (`tonic::Code as i32`); `retry_info` is the
/// delay of a `google.rpc.RetryInfo` detail, if the status carried one.
pub fn classify_grpc(code: tonic::Code, retry_info: Option<Duration>) -> Verdict {
    use tonic::Code;
    match code {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Verdict::Retry(retry_info),
        Code::ResourceExhausted => match retry_info {
            Some(delay) => Verdict::Retry(Some(delay)),
            None => Verdict::Permanent,
        },
        _ => Verdict::Permanent,
    }
}

/// Classifies an HTTP response status; `retry_after` is the raw
/// `Retry-After` header value.
pub fn classify_http(status: u16, retry_after: Option<&str>) -> Verdict {
    match status {
        429 | 502 | 503 | 504 => Verdict::Retry(retry_after.and_then(parse_retry_after)),
        _ => Verdict::Permanent,
    }
}

/// `Retry-After` as delta-seconds or as an HTTP-date (IMF-fixdate, e.g.
/// `Wed, 21 Oct 2015 07:28:00 GMT`), relative to now.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    parse_retry_after_at(value, now)
}

/// [`parse_retry_after`] at a given Unix time (seconds).
pub fn parse_retry_after_at(value: &str, now_unix: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = parse_imf_fixdate(value)?;
    Some(Duration::from_secs(at.saturating_sub(now_unix)))
}

/// Unix seconds of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let mut parts = value.split_whitespace();
    let _weekday = parts.next()?.strip_suffix(',')?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let (h, m, sec): (u64, u64, u64) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    if parts.next()? != "GMT" || parts.next().is_some() || hms.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years >= 1970.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// The delay before retry number `attempt` (0 for the first retry), given
/// the server's hint and a jitter sample in `[0, 1)`.
pub fn backoff_delay(attempt: u32, hint: Option<Duration>, jitter: f64) -> Duration {
    if let Some(hint) = hint {
        // At least the first backoff step, so that a "retry now" (0 s, or a
        // date in the past) cannot make the exporter spin.
        return hint.max(INITIAL_DELAY).min(MAX_SERVER_DELAY);
    }
    let exp = INITIAL_DELAY.saturating_mul(1u32 << attempt.min(16));
    let base = exp.min(MAX_DELAY);
    // ±25 % jitter so that many agents do not retry in lockstep.
    base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Whether another attempt may start after `elapsed` with `delay` to wait,
/// within `max_elapsed`.
pub fn within_budget(elapsed: Duration, delay: Duration, max_elapsed: Duration) -> bool {
    elapsed.saturating_add(delay) <= max_elapsed
}

/// A small xorshift generator for jitter: no dependency, no shared state.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and the pid.
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self((u64::from(nanos) << 20 ^ u64::from(std::process::id())) | 1)
    }
    /// The next sample in `[0, 1)`.
    pub fn sample(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Self::new()
    }
}

/// `google.rpc.Status`, as carried in gRPC `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The RetryInfo delay in a gRPC status's details, if there is one.
pub fn grpc_retry_info(details: &[u8]) -> Option<Duration> {
    use prost::Message;
    let status = RpcStatus::decode(details).ok()?;
    let any = status
        .details
        .iter()
        .find(|d| d.type_url == RETRY_INFO_TYPE)?;
    let info = RetryInfo::decode(any.value.as_slice()).ok()?;
    let delay = info.retry_delay.unwrap_or_default();
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?;
    Some(Duration::new(seconds, nanos.min(999_999_999)))
}

/// Encodes a status with a RetryInfo detail (tests, and fake servers).
pub fn encode_retry_info(delay: Duration) -> Vec<u8> {
    use prost::Message;
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
        }),
    };
    RpcStatus {
        code: tonic::Code::ResourceExhausted as i32,
        message: String::new(),
        details: vec![ProtoAny {
            type_url: RETRY_INFO_TYPE.to_owned(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn grpc_codes_are_classified_per_the_otlp_specification() {
        let hint = Some(Duration::from_secs(2));
        let table = [
            (Code::Ok, None, Verdict::Permanent),
            (Code::Cancelled, None, Verdict::Retry(None)),
            (Code::Unknown, None, Verdict::Permanent),
            (Code::InvalidArgument, None, Verdict::Permanent),
            (Code::DeadlineExceeded, None, Verdict::Retry(None)),
            (Code::NotFound, None, Verdict::Permanent),
            (Code::AlreadyExists, None, Verdict::Permanent),
            (Code::PermissionDenied, None, Verdict::Permanent),
            (Code::ResourceExhausted, None, Verdict::Permanent),
            (Code::ResourceExhausted, hint, Verdict::Retry(hint)),
            (Code::FailedPrecondition, None, Verdict::Permanent),
            (Code::Aborted, None, Verdict::Retry(None)),
            (Code::OutOfRange, None, Verdict::Retry(None)),
            (Code::Unimplemented, None, Verdict::Permanent),
            (Code::Internal, None, Verdict::Permanent),
            (Code::Unavailable, None, Verdict::Retry(None)),
            (Code::Unavailable, hint, Verdict::Retry(hint)),
            (Code::DataLoss, None, Verdict::Retry(None)),
            (Code::Unauthenticated, None, Verdict::Permanent),
        ];
        for (code, info, verdict) in table {
            assert_eq!(classify_grpc(code, info), verdict, "{code:?} {info:?}");
        }
    }

    #[test]
    fn http_statuses_are_classified_per_the_otlp_specification() {
        let table = [
            (400, None, Verdict::Permanent),
            (401, None, Verdict::Permanent),
            (403, None, Verdict::Permanent),
            (404, None, Verdict::Permanent),
            (408, None, Verdict::Permanent),
            (413, None, Verdict::Permanent),
            (429, None, Verdict::Retry(None)),
            (429, Some("7"), Verdict::Retry(Some(Duration::from_secs(7)))),
            (500, None, Verdict::Permanent),
            (501, None, Verdict::Permanent),
            (502, None, Verdict::Retry(None)),
            (
                503,
                Some(" 3 "),
                Verdict::Retry(Some(Duration::from_secs(3))),
            ),
            (
                // A date in the past: retry now.
                503,
                Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                Verdict::Retry(Some(Duration::ZERO)),
            ),
            (504, None, Verdict::Retry(None)),
            (505, None, Verdict::Permanent),
        ];
        for (status, after, verdict) in table {
            assert_eq!(classify_http(status, after), verdict, "{status} {after:?}");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        // 1994-11-06T08:49:37Z
        let at = 784_111_777;
        assert_eq!(
            parse_retry_after_at("Sun, 06 Nov 1994 08:49:37 GMT", at - 30),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after_at("120", at),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after_at("Sun, 06 Nov 1994 08:49:37 GMT", at + 5),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after_at("Thu, 01 Jan 1970 00:00:00 GMT", 0),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after_at("Sat, 29 Feb 2020 12:00:00 GMT", 1_582_977_600 - 1),
            Some(Duration::from_secs(1))
        );
        for bad in [
            "soon",
            "-5",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "",
        ] {
            assert_eq!(parse_retry_after_at(bad, at), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        assert_eq!(backoff_delay(0, None, 0.5), INITIAL_DELAY);
        assert_eq!(backoff_delay(1, None, 0.5), INITIAL_DELAY * 2);
        assert_eq!(backoff_delay(2, None, 0.5), INITIAL_DELAY * 4);
        assert_eq!(backoff_delay(30, None, 0.5), MAX_DELAY);
        assert_eq!(backoff_delay(0, None, 0.0), INITIAL_DELAY.mul_f64(0.75));
        assert_eq!(backoff_delay(0, None, 1.0), INITIAL_DELAY.mul_f64(1.25));
        assert_eq!(backoff_delay(u32::MAX, None, 0.5), MAX_DELAY);
    }

    #[test]
    fn server_hints_are_honoured_but_capped() {
        let one = Duration::from_secs(1);
        assert_eq!(backoff_delay(5, Some(one), 0.9), one);
        assert_eq!(
            backoff_delay(0, Some(Duration::from_secs(3600)), 0.0),
            MAX_SERVER_DELAY
        );
        assert_eq!(backoff_delay(3, Some(Duration::ZERO), 0.5), INITIAL_DELAY);
    }

    #[test]
    fn the_elapsed_budget_ends_retrying() {
        let max = Duration::from_secs(10);
        assert!(within_budget(
            Duration::from_secs(9),
            Duration::from_secs(1),
            max
        ));
        assert!(!within_budget(
            Duration::from_secs(9),
            Duration::from_secs(2),
            max
        ));
    }

    #[test]
    fn retry_info_round_trips_and_garbage_is_ignored() {
        let bytes = encode_retry_info(Duration::from_millis(1500));
        assert_eq!(grpc_retry_info(&bytes), Some(Duration::from_millis(1500)));
        assert_eq!(grpc_retry_info(&[0xff, 0x01, 0x02]), None);
        assert_eq!(grpc_retry_info(&[]), None);
    }

    #[test]
    fn jitter_samples_stay_in_range() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let s = j.sample();
            assert!((0.0..1.0).contains(&s));
        }
    }
}
