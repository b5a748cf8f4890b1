//! `k=v,k2=v2` lists with percent-encoded values, the format of
//! `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_RESOURCE_ATTRIBUTES` (read by
//! [`crate::config`] and [`crate::pipeline::resource`]).

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
pub fn percent_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a W3C-baggage-like `k=v,k2=v2` list with percent-encoded values;
/// `None` if any member is malformed. Empty members are skipped.
pub fn parse_key_values(input: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for member in input.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        let key = percent_decode(key.trim())?;
        if key.is_empty() {
            return None;
        }
        out.push((key, percent_decode(value.trim())?));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_lists_decode_percent_escapes() {
        assert_eq!(
            parse_key_values("a=1, b = x%2Cy ,,c=%E2%9C%93"),
            Some(vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "\u{2713}".into())
            ])
        );
        assert_eq!(parse_key_values("a"), None);
        assert_eq!(parse_key_values("=v"), None);
        assert_eq!(parse_key_values("a=%4"), None);
        assert_eq!(parse_key_values("a=%ff"), None);
    }
}
