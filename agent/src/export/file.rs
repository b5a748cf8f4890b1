//! The `file` exporter: OTLP JSON lines, one export request per line,
//! appended to `--output`.

use super::retry::Verdict;
use super::transport::{Attempt, ExportSetupError};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Opens `path` for appending (created if missing).
pub(crate) fn open(
    path: &Path,
) -> Result<Mutex<std::io::BufWriter<std::fs::File>>, ExportSetupError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ExportSetupError::File {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Mutex::new(std::io::BufWriter::new(file)))
}

pub(crate) fn write_json_line<T: serde::Serialize>(
    file: &Mutex<std::io::BufWriter<std::fs::File>>,
    request: &T,
) -> Attempt {
    let line = match serde_json::to_string(request) {
        Ok(l) => l,
        Err(e) => {
            return Attempt::Failed {
                verdict: Verdict::Permanent,
                error: format!("JSON encoding: {e}"),
            };
        }
    };
    let mut w = file
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match writeln!(w, "{line}").and_then(|()| w.flush()) {
        Ok(()) => Attempt::accepted(),
        Err(e) => Attempt::Failed {
            verdict: Verdict::Permanent,
            error: format!("writing the output file: {e}"),
        },
    }
}
