//! `run --env-file FILE`: the service's environment file, read by the agent
//! itself at start and again on SIGHUP. The service manager reads an
//! `EnvironmentFile=` only when it starts the process, so without this a
//! `systemctl reload` after editing the file would change nothing.

use std::collections::BTreeMap;
use std::path::Path;

use super::{ConfigError, invalid};

/// Larger than any environment file; a bigger one is refused unread.
const MAX_BYTES: u64 = 1 << 20;

/// The variables of an environment file, in the subset of systemd's
/// `EnvironmentFile=` syntax ours use: `NAME=value` lines, `#` and `;`
/// comments, blank lines, a value optionally in matching quotes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFile {
    vars: BTreeMap<String, String>,
}

impl EnvFile {
    /// Parses the text; `Err` names the first line that is not `NAME=value`.
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut vars = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or(index + 1)?;
            let name = name.trim();
            let valid_name = name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_name {
                return Err(index + 1);
            }
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|&q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
                .unwrap_or(value);
            vars.insert(name.to_owned(), unquoted.to_owned());
        }
        Ok(Self { vars })
    }

    /// Reads and parses `path` (at most 1 MiB).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `--env-file`: unreadable, too large, or a bad line.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let refuse = |reason: String| invalid("--env-file", &shown, reason);
        let len = std::fs::metadata(path)
            .map_err(|e| refuse(e.to_string()))?
            .len();
        if len > MAX_BYTES {
            return Err(refuse(format!("{len} bytes, more than {MAX_BYTES}")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| refuse(e.to_string()))?;
        Self::parse(&text).map_err(|line| refuse(format!("line {line}: expected NAME=value")))
    }

    /// The value the file gives `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// `name` as the agent resolves it with this file read now, when the
    /// process started with `at_start`: the file's value; unset if the file
    /// defined it at start and no longer does (the service manager put the
    /// old value into the process environment); else `process_env`'s.
    pub fn lookup(
        &self,
        at_start: &EnvFile,
        process_env: &dyn Fn(&str) -> Option<String>,
        name: &str,
    ) -> Option<String> {
        match self.get(name) {
            Some(value) => Some(value.to_owned()),
            None if at_start.get(name).is_some() => None,
            None => process_env(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_comments_and_quotes() {
        let file = EnvFile::parse(
            "# c\n; c\n\nOTEL_EXPORTER_OTLP_ENDPOINT=http://a:4317\nA = \"x y\"\nB='z'\nEMPTY=\n",
        )
        .unwrap();
        assert_eq!(
            file.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://a:4317")
        );
        assert_eq!(file.get("A"), Some("x y"));
        assert_eq!(file.get("B"), Some("z"));
        assert_eq!(file.get("EMPTY"), Some(""));
        assert_eq!(EnvFile::parse("A=1\nno equals sign"), Err(2));
        assert_eq!(EnvFile::parse("1A=1"), Err(1));
        assert_eq!(EnvFile::parse("A B=1"), Err(1));
    }

    #[test]
    fn a_reload_sees_an_edited_env_file_over_the_environment_systemd_gave_at_start() {
        let at_start = EnvFile::parse("ENDPOINT=http://a\nHEADERS=k=v\n").unwrap();
        // What systemd's EnvironmentFile= put into the process at start.
        let process = |name: &str| match name {
            "ENDPOINT" => Some("http://a".to_owned()),
            "HEADERS" => Some("k=v".to_owned()),
            "OTHER" => Some("from the unit".to_owned()),
            _ => None,
        };
        let now = EnvFile::parse("ENDPOINT=http://b\n").unwrap();
        assert_eq!(
            now.lookup(&at_start, &process, "ENDPOINT").as_deref(),
            Some("http://b")
        );
        // Removed from the file: unset, not the start-time value.
        assert_eq!(now.lookup(&at_start, &process, "HEADERS"), None);
        // Never in the file: the process environment's.
        assert_eq!(
            now.lookup(&at_start, &process, "OTHER").as_deref(),
            Some("from the unit")
        );
    }

    #[test]
    fn a_missing_or_oversized_env_file_is_refused_naming_it() {
        let e = EnvFile::read(Path::new("/nonexistent/agent.env")).unwrap_err();
        assert!(e.to_string().contains("--env-file"), "{e}");
        assert!(e.to_string().contains("/nonexistent/agent.env"), "{e}");
    }
}
