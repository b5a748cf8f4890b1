//! Reading the command line: clap, then `run --config FILE` (a file of
//! `flag-name = value` lines inserted before the command line's own flags).

use super::cli::{Cli, Command};
use clap::Parser;
use std::path::PathBuf;

/// Why the command line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// clap refused it (or it asked for help / the version).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the config file is not `name = value`.
    #[error("config file {path}, line {line}: expected `name = value`")]
    ConfigLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// Turns config file text into flags: `name = value` becomes
/// `--name value`, `name = true` becomes `--name`, `name = false` is left
/// out. Values may be double-quoted. `None` names the first bad line.
pub fn config_file_args(text: &str) -> Result<Vec<String>, usize> {
    let mut args = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or(index + 1)?;
        let name = name.trim().trim_start_matches("--");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(index + 1);
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match value {
            "true" => args.push(format!("--{name}")),
            "false" => {}
            v => {
                args.push(format!("--{name}"));
                args.push(v.to_owned());
            }
        }
    }
    Ok(args)
}

/// Parses the command line; with `run --config FILE`, the file's settings
/// are inserted before the command line's own flags so that these win.
pub fn parse_command_line(argv: Vec<std::ffi::OsString>) -> Result<Cli, ParseError> {
    let cli = Cli::try_parse_from(&argv)?;
    let Command::Run(run) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = run.config.clone() else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ParseError::ConfigFile {
        path: path.clone(),
        source,
    })?;
    let file_args =
        config_file_args(&text).map_err(|line| ParseError::ConfigLine { path, line })?;
    let run_at = argv.iter().position(|a| a == "run").unwrap_or(argv.len());
    let mut merged: Vec<std::ffi::OsString> = argv[..=run_at.min(argv.len() - 1)].to_vec();
    merged.extend(file_args.into_iter().map(Into::into));
    merged.extend(argv.into_iter().skip(run_at + 1));
    Ok(Cli::try_parse_from(merged)?)
}
