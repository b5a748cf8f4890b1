//! Incremental text output: UTF-8 reassembly across tokens and stop-string matching.
//!
//! Tokens map to byte pieces that may split a UTF-8 character; [`Utf8Assembler`] emits only
//! complete characters. [`StopMatcher`] holds back the shortest tail of the output that could
//! still grow into a stop string, so a stop string spanning several tokens is caught and never
//! emitted.

/// Reassembles UTF-8 text from byte pieces.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Appends `bytes` and returns the text that is now complete. Invalid sequences become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is UTF-8 by the error's contract.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            // Incomplete character at the end: keep it for the next piece.
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes an incomplete trailing character as U+FFFD (end of generation).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit; generation goes on.
    Continue(String),
    /// A stop string was found: emit this text (everything before the stop string) and stop.
    Stopped(String),
}

/// Finds stop strings in streamed text without emitting them.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    #[must_use]
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        self.held.push_str(text);
        // Earliest occurrence of any stop string wins.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = found {
            let out = self.held[..pos].to_owned();
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Hold back the longest tail of `held` that is a proper prefix of some stop string.
        let held = self.held.as_bytes();
        let mut keep = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            let max = stop.len().saturating_sub(1).min(held.len());
            for len in (keep + 1..=max).rev() {
                if held[held.len() - len..] == stop[..len] {
                    keep = len;
                    break;
                }
            }
        }
        // The tail equals the start of a stop string, so it starts on a char boundary.
        let split = self.held.len() - keep;
        let rest = self.held.split_off(split);
        let out = std::mem::replace(&mut self.held, rest);
        StopOutcome::Continue(out)
    }

    /// Releases held-back text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_in_one_piece() {
        assert_eq!(
            run(&["STOP"], &["hello STOP world"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn stop_spanning_pieces() {
        assert_eq!(
            run(&["STOP"], &["hello S", "T", "OP world"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["line\n", "\nnext"]), ("line".into(), true));
    }

    #[test]
    fn partial_prefix_is_released_when_not_matching() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), StopOutcome::Continue("abc ".into()));
        assert_eq!(m.push("ART"), StopOutcome::Continue("START".into()));
        assert_eq!(run(&["STOP"], &["abc ST"]), ("abc ST".into(), false));
    }

    #[test]
    fn earliest_of_several_stops() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn multibyte_stop() {
        assert_eq!(run(&["é!"], &["caf", "é", "!x"]), ("caf".into(), true));
        assert_eq!(run(&["éa"], &["café", "b"]), ("caféb".into(), false));
    }

    #[test]
    fn empty_stop_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), false));
    }

    #[test]
    fn utf8_assembly_across_pieces() {
        let mut a = Utf8Assembler::default();
        let bytes = "é😀".as_bytes();
        assert_eq!(a.push(&bytes[..1]), "");
        assert_eq!(a.push(&bytes[1..3]), "é");
        assert_eq!(a.push(&bytes[3..5]), "");
        assert_eq!(a.push(&bytes[5..]), "😀");
        assert_eq!(a.push(b"\xffok"), "\u{fffd}ok");
        assert_eq!(a.push(&bytes[..1]), "");
        assert_eq!(a.finish(), "\u{fffd}");
    }
}
