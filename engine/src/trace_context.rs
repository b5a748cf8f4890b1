//! W3C Trace Context (`traceparent` / `tracestate`) parsing, exactly per the Recommendation.
//!
//! `traceparent: 00-<32 lowercase hex trace id>-<16 lowercase hex parent id>-<2 lowercase hex flags>`
//!
//! The header is invalid (and a fresh trace is started, dropping `tracestate`) when
//! - it is absent or repeated,
//! - a field has the wrong length or a character outside `[0-9a-f]` (upper case is invalid),
//! - the version is `ff`,
//! - version `00` carries trailing data (a future version may, after a `-`),
//! - the trace id or the parent id is all zeros.
//!
//! `tracestate` is only kept when the `traceparent` is valid, and dropped when it does not parse
//! (more than 32 members, more than 512 bytes in all, a bad key or value, a duplicated key): a
//! bad `tracestate` is ignored, never an error.
//!
//! Of the `tracestate`, the engine records only the OpenTelemetry entry's sampling values
//! (`ot=th:<1-14 hex digits>;rv:<14 hex digits>`, [`parse_ot`]): the agent needs them for
//! consistent probability sampling. A malformed `th` or `rv` is ignored on its own.
//!
//! A trace the engine starts gets the W3C Level 2 *random* flag (`0x02`): its id is 128 random
//! bits, so its low 56 bits are the randomness consistent samplers compare with a threshold.

use axum::http::HeaderMap;
use ringside_shm_protocol::OtState;

/// The trace identity of one request as the engine records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id: the caller's, or a new random one.
    pub trace_id: [u8; 16],
    /// The caller's span id (our parent), when a valid `traceparent` was given.
    pub parent_span_id: Option<[u8; 8]>,
    /// Trace flags from the caller (bit 0 = sampled); 0 when the engine started the trace.
    pub trace_flags: u8,
    /// A new span id for this request's server span.
    pub span_id: [u8; 8],
    /// The caller's `tracestate`, when the `traceparent` was valid and the state parsed.
    pub tracestate: Option<String>,
    /// The sampling values of its `ot` entry.
    pub ot: OtState,
}

/// W3C Trace Context Level 2: the trace id's low 56 bits are random.
pub const FLAG_RANDOM: u8 = 0x02;

/// Why a `traceparent` header was rejected (the request still succeeds, with a new trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    /// More than one `traceparent` header was sent.
    #[error("traceparent header repeated")]
    Repeated,
    /// The header value is not visible ASCII.
    #[error("traceparent is not ASCII")]
    NotAscii,
    /// Too short, or a field has the wrong length or delimiter.
    #[error("traceparent has the wrong length or layout")]
    Malformed,
    /// A field contains a character other than lowercase hex.
    #[error("traceparent contains a character other than lowercase hex")]
    NotLowerHex,
    /// Version `ff` is forbidden.
    #[error("traceparent version ff is invalid")]
    ForbiddenVersion,
    /// Version `00` must be exactly 55 characters.
    #[error("traceparent version 00 has trailing data")]
    TrailingData,
    /// The trace id is all zeros.
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    /// The parent id is all zeros.
    #[error("traceparent parent id is all zeros")]
    ZeroParentId,
}

/// A parsed, valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    /// Version byte (00 today; higher versions are parsed as 00 per the spec).
    pub version: u8,
    /// Trace id.
    pub trace_id: [u8; 16],
    /// Parent (caller's) span id.
    pub parent_id: [u8; 8],
    /// Trace flags.
    pub flags: u8,
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn decode_hex<const N: usize>(s: &[u8]) -> Result<[u8; N], TraceparentError> {
    if s.len() != N * 2 {
        return Err(TraceparentError::Malformed);
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or(TraceparentError::NotLowerHex)?;
        let lo = hex_val(pair[1]).ok_or(TraceparentError::NotLowerHex)?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

/// Parses one `traceparent` value.
///
/// # Errors
/// Returns the first rule the value breaks (see the module documentation).
pub fn parse_traceparent(value: &[u8]) -> Result<Traceparent, TraceparentError> {
    if !value.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(TraceparentError::NotAscii);
    }
    // version "-" trace-id "-" parent-id "-" flags = 2+1+32+1+16+1+2 = 55
    if value.len() < 55 {
        return Err(TraceparentError::Malformed);
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return Err(TraceparentError::Malformed);
    }
    let [version] = decode_hex::<1>(&value[0..2])?;
    if version == 0xff {
        return Err(TraceparentError::ForbiddenVersion);
    }
    if value.len() > 55 {
        if version == 0 {
            return Err(TraceparentError::TrailingData);
        }
        // Future versions may append fields, separated by '-'.
        if value[55] != b'-' {
            return Err(TraceparentError::Malformed);
        }
    }
    let trace_id = decode_hex::<16>(&value[3..35])?;
    let parent_id = decode_hex::<8>(&value[36..52])?;
    let [flags] = decode_hex::<1>(&value[53..55])?;
    if trace_id == [0; 16] {
        return Err(TraceparentError::ZeroTraceId);
    }
    if parent_id == [0; 8] {
        return Err(TraceparentError::ZeroParentId);
    }
    Ok(Traceparent {
        version,
        trace_id,
        parent_id,
        flags,
    })
}

const MAX_TRACESTATE_MEMBERS: usize = 32;
/// What W3C asks every participant to propagate at least, and what implementations accept: a
/// longer combined `tracestate` is dropped whole.
const MAX_TRACESTATE_BYTES: usize = 512;

fn valid_simple_key(key: &[u8], max: usize) -> bool {
    match key.split_first() {
        Some((first, rest)) => {
            first.is_ascii_lowercase()
                && key.len() <= max
                && rest.iter().all(|&c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, b'_' | b'-' | b'*' | b'/')
                })
        }
        None => false,
    }
}

fn valid_tracestate_key(key: &[u8]) -> bool {
    match key.iter().position(|&c| c == b'@') {
        None => valid_simple_key(key, 256),
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            // tenant-id = (lcalpha / DIGIT) 0*240( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
            let tenant_ok = match tenant.split_first() {
                Some((first, rest)) => {
                    (first.is_ascii_lowercase() || first.is_ascii_digit())
                        && tenant.len() <= 241
                        && rest.iter().all(|&c| {
                            c.is_ascii_lowercase()
                                || c.is_ascii_digit()
                                || matches!(c, b'_' | b'-' | b'*' | b'/')
                        })
                }
                None => false,
            };
            tenant_ok && valid_simple_key(system, 14)
        }
    }
}

fn valid_tracestate_value(value: &[u8]) -> bool {
    // value = 0*255(chr) nblk-chr ; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E ; chr = %x20 / nblk-chr
    match value.split_last() {
        Some((last, _)) => {
            value.len() <= 256
                && *last != b' '
                && value
                    .iter()
                    .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        }
        None => false,
    }
}

/// Parses the combined `tracestate` header values; `None` when the list is invalid or empty.
#[must_use]
pub fn parse_tracestate(values: &[&[u8]]) -> Option<String> {
    // The combined header: the values and the commas joining them.
    let combined = values.iter().map(|v| v.len()).sum::<usize>() + values.len().saturating_sub(1);
    if combined > MAX_TRACESTATE_BYTES {
        return None;
    }
    let mut members: Vec<&[u8]> = Vec::new();
    for value in values {
        for member in value.split(|&c| c == b',') {
            let member = member.trim_ascii();
            if member.is_empty() {
                continue;
            }
            let eq = member.iter().position(|&c| c == b'=')?;
            let (key, val) = (&member[..eq], &member[eq + 1..]);
            if !valid_tracestate_key(key) || !valid_tracestate_value(val) {
                return None;
            }
            if members
                .iter()
                .any(|m| m.get(..eq) == Some(key) && m.get(eq) == Some(&b'='))
            {
                return None;
            }
            members.push(member);
            if members.len() > MAX_TRACESTATE_MEMBERS {
                return None;
            }
        }
    }
    if members.is_empty() {
        return None;
    }
    let joined = members.join(&b","[..]);
    String::from_utf8(joined).ok()
}

fn parse_hex56(digits: &str) -> Option<u64> {
    if digits.is_empty()
        || digits.len() > 14
        || !digits
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The sampling values of a parsed `tracestate`'s `ot` entry: `rv` (exactly 14 lowercase hex
/// digits) and `th` (1 to 14 lowercase hex digits, padded with trailing zeros to 56 bits). A
/// sub-key that is repeated or malformed is ignored; other sub-keys are not the engine's.
#[must_use]
pub fn parse_ot(tracestate: &str) -> OtState {
    let mut ot = OtState::default();
    let Some(value) = tracestate
        .split(',')
        .find_map(|member| member.strip_prefix("ot="))
    else {
        return ot;
    };
    let (mut rv_seen, mut th_seen) = (0u8, 0u8);
    for item in value.split(';') {
        if let Some(rv) = item.strip_prefix("rv:") {
            rv_seen += 1;
            ot.randomness = parse_hex56(rv).filter(|_| rv.len() == 14);
        } else if let Some(th) = item.strip_prefix("th:") {
            th_seen += 1;
            ot.threshold = parse_hex56(th).map(|t| t << (4 * (14 - th.len())));
        }
    }
    if rv_seen > 1 {
        ot.randomness = None;
    }
    if th_seen > 1 {
        ot.threshold = None;
    }
    ot
}

/// Parses the `traceparent` from headers, requiring exactly one.
///
/// # Errors
/// [`TraceparentError::Repeated`] when several are sent, else see [`parse_traceparent`].
pub fn traceparent_from_headers(
    headers: &HeaderMap,
) -> Result<Option<Traceparent>, TraceparentError> {
    let mut all = headers.get_all("traceparent").iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(TraceparentError::Repeated);
    }
    parse_traceparent(first.as_bytes()).map(Some)
}

/// Random non-zero trace id.
#[must_use]
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// Random non-zero span id.
#[must_use]
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

impl TraceContext {
    /// The request's trace context: continue the caller's trace when its `traceparent` is valid,
    /// otherwise start a new one (and drop `tracestate`). A new span id is always generated.
    #[must_use]
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let span_id = new_span_id();
        match traceparent_from_headers(headers) {
            Ok(Some(tp)) => {
                let states: Vec<&[u8]> = headers
                    .get_all("tracestate")
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                let tracestate = parse_tracestate(&states);
                Self {
                    trace_id: tp.trace_id,
                    parent_span_id: Some(tp.parent_id),
                    trace_flags: tp.flags,
                    span_id,
                    ot: tracestate.as_deref().map(parse_ot).unwrap_or_default(),
                    tracestate,
                }
            }
            Ok(None) | Err(_) => Self::new_root(),
        }
    }

    /// A new trace started by the engine, whatever the caller sent.
    #[must_use]
    pub fn new_root() -> Self {
        Self {
            trace_id: new_trace_id(),
            parent_span_id: None,
            trace_flags: FLAG_RANDOM,
            span_id: new_span_id(),
            tracestate: None,
            ot: OtState::default(),
        }
    }

    /// The trace id as 32 lowercase hex characters.
    #[must_use]
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// Lowercase hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid() {
        let tp = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(tp.version, 0);
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(parse_traceparent(unsampled.as_bytes()).unwrap().flags, 0);
    }

    #[test]
    fn rejects_every_invalid_case() {
        use TraceparentError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Malformed),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                E::Malformed,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                E::ForbiddenVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                E::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                E::ZeroParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                E::TrailingData,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-010",
                E::TrailingData,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                E::NotLowerHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                E::NotLowerHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                E::NotLowerHex,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                E::NotLowerHex,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                E::Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                E::Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                E::Malformed,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                E::Malformed,
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                E::Malformed,
            ),
        ];
        for (value, want) in cases {
            assert_eq!(parse_traceparent(value.as_bytes()), Err(*want), "{value:?}");
        }
        assert_eq!(parse_traceparent("00-é".as_bytes()), Err(E::NotAscii));
    }

    #[test]
    fn future_version_parses_first_fields() {
        let tp =
            parse_traceparent(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-ever")
                .unwrap();
        assert_eq!(tp.version, 0xcc);
        assert_eq!(tp.flags, 9);
        let exact = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(exact.as_bytes()).is_ok());
    }

    #[test]
    fn repeated_header_is_invalid_and_starts_new_trace() {
        let mut h = HeaderMap::new();
        h.append("traceparent", HeaderValue::from_static(VALID));
        h.append("traceparent", HeaderValue::from_static(VALID));
        h.append("tracestate", HeaderValue::from_static("a=b"));
        assert_eq!(
            traceparent_from_headers(&h),
            Err(TraceparentError::Repeated)
        );
        let ctx = TraceContext::from_headers(&h);
        assert_eq!(ctx.parent_span_id, None);
        assert_eq!(ctx.tracestate, None);
        assert_ne!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(ctx.trace_id, [0; 16]);
    }

    #[test]
    fn valid_header_continues_trace_with_new_span() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(VALID));
        h.append(
            "tracestate",
            HeaderValue::from_static("rojo=00f067aa0ba902b7"),
        );
        h.append("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        let ctx = TraceContext::from_headers(&h);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent_span_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(ctx.trace_flags, 1);
        assert_ne!(ctx.span_id, [0; 8]);
        assert_ne!(ctx.span_id, ctx.parent_span_id.unwrap());
        assert_eq!(
            ctx.tracestate.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
    }

    #[test]
    fn missing_header_starts_new_trace() {
        let ctx = TraceContext::from_headers(&HeaderMap::new());
        assert_eq!(ctx.parent_span_id, None);
        assert_eq!(ctx.trace_flags, FLAG_RANDOM);
        assert_ne!(ctx.trace_id, [0; 16]);
    }

    #[test]
    fn tracestate_over_512_bytes_is_dropped_whole() {
        // Two header lines of `n` bytes each, joined by a comma.
        let member = |key: &str, n: usize| format!("{key}={}", "x".repeat(n - key.len() - 1));
        let (a, b) = (member("a", 256), member("b", 256));
        assert!(parse_tracestate(&[a.as_bytes(), b.as_bytes()]).is_none());
        let b = member("b", 255);
        assert_eq!(
            parse_tracestate(&[a.as_bytes(), b.as_bytes()]).map(|s| s.len()),
            Some(512)
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(VALID));
        let long = format!(
            "ot=th:c;rv:6e6d1a75832a2f,{}",
            "k=".to_owned() + &"v".repeat(600)
        );
        h.insert("tracestate", HeaderValue::from_str(&long).unwrap());
        let ctx = TraceContext::from_headers(&h);
        assert_eq!((ctx.tracestate, ctx.ot), (None, OtState::default()));
    }

    // The specification's own encodings (tracestate-handling.md, tracestate-probability-sampling.md).
    #[test]
    fn ot_sampling_values_parse_per_the_specification() {
        let ot = |s: &str| parse_ot(s);
        assert_eq!(ot("ot=th:0").threshold, Some(0));
        assert_eq!(ot("ot=th:c").threshold, Some(0xc0_0000_0000_0000));
        assert_eq!(ot("ot=th:fd70a4").threshold, Some(0xfd70a400000000));
        assert_eq!(ot("ot=th:8").threshold, Some(1 << 55));
        assert_eq!(
            ot("ot=rv:6e6d1a75832a2f"),
            OtState {
                randomness: Some(0x6e6d1a75832a2f),
                threshold: None
            }
        );
        assert_eq!(
            ot("ot=th:8;rv:9b8233f7e3a151"),
            OtState {
                randomness: Some(0x9b8233f7e3a151),
                threshold: Some(0x80000000000000)
            }
        );
        // Other entries and other OpenTelemetry sub-keys are not in the way.
        assert_eq!(
            ot("congo=t61rcWkgMzE,ot=p:8;th:c;r:62").threshold,
            Some(0xc0_0000_0000_0000)
        );
    }

    #[test]
    fn malformed_ot_values_are_ignored_never_an_error() {
        for bad in [
            "ot=th:",
            "ot=th:123456789abcdef",
            "ot=th:C",
            "ot=th:xyz",
            "ot=rv:6e6d1a75832a2",
            "ot=rv:6e6d1a75832a2f0",
            "ot=rv:6E6D1A75832A2F",
            "ot=th:c;th:8",
            "ot=rv:6e6d1a75832a2f;rv:6e6d1a75832a2f",
            "xot=th:c",
        ] {
            assert_eq!(parse_ot(bad), OtState::default(), "{bad}");
        }
        // One bad sub-key does not take the other with it.
        assert_eq!(
            parse_ot("ot=th:zz;rv:6e6d1a75832a2f").randomness,
            Some(0x6e6d1a75832a2f)
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(VALID));
        h.insert(
            "tracestate",
            HeaderValue::from_static("ot=th:c;rv:0000000000000g"),
        );
        let ctx = TraceContext::from_headers(&h);
        assert_eq!(ctx.ot.threshold, Some(0xc0_0000_0000_0000));
        assert_eq!(ctx.ot.randomness, None);
    }

    #[test]
    fn tracestate_rules() {
        assert_eq!(parse_tracestate(&[b"a=1, b=2"]).as_deref(), Some("a=1,b=2"));
        assert_eq!(parse_tracestate(&[b"t@sys=v"]).as_deref(), Some("t@sys=v"));
        assert_eq!(parse_tracestate(&[b"a=1,,b=2"]).as_deref(), Some("a=1,b=2"));
        assert_eq!(parse_tracestate(&[b"A=1"]), None);
        assert_eq!(parse_tracestate(&[b"a=1,a=2"]), None);
        assert_eq!(parse_tracestate(&[b"a"]), None);
        assert_eq!(parse_tracestate(&[b"a=b=c"]), None);
        assert_eq!(parse_tracestate(&[b"a="]), None);
        assert_eq!(parse_tracestate(&[b""]), None);
        let many: String = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_tracestate(&[many.as_bytes()]), None);
        let ok: String = (0..32)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_tracestate(&[ok.as_bytes()]).is_some());
    }
}
