//! The operator commands that act on engines without a daemon:
//! `tracing on|off|status` and `set`.

use crate::control::control_block::{self, Change, ControlError, EngineSelection};
use std::io::Write;

/// What `tracing status` shows.
#[derive(Clone, Debug, Default)]
pub struct ShowOptions {
    /// Which engines.
    pub selection: EngineSelection,
    /// JSON instead of a table.
    pub json: bool,
}

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Engines could not be found, opened or changed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// `set` was given nothing to change.
    #[error("nothing to set: give --detail, --head-sample or a --tail-* flag")]
    NothingToSet,
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// The JSON could not be produced.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn warn_skipped(skipped: &[ControlError]) {
    for e in skipped {
        eprintln!("ringside-agent: skipped {e}");
    }
}

fn change_all(selection: &EngineSelection, change: &Change) -> Result<(), OperatorError> {
    change.validate()?;
    let opened = control_block::open_engines(&selection.engines, &selection.trusted_uids)?;
    warn_skipped(&opened.skipped);
    let mut out = std::io::stdout().lock();
    for segment in &opened.engines {
        change.apply(segment)?;
        let s = control_block::read_settings(segment);
        writeln!(
            out,
            "{}: tracing {}, detail {}, head sample {}, tail {}",
            s.engine,
            if s.enabled { "on" } else { "off" },
            s.detail,
            s.head_sample_ratio,
            control_block::describe_tail(&s.tail)
        )?;
    }
    Ok(())
}

/// Shows the settings of the selected engines as a table or JSON.
pub fn show(options: &ShowOptions) -> Result<(), OperatorError> {
    let selection = &options.selection;
    let opened = control_block::open_engines(&selection.engines, &selection.trusted_uids)?;
    warn_skipped(&opened.skipped);
    let settings: Vec<_> = opened
        .engines
        .iter()
        .map(control_block::read_settings)
        .collect();
    let mut out = std::io::stdout().lock();
    if options.json {
        serde_json::to_writer_pretty(&mut out, &settings)?;
        writeln!(out)?;
    } else {
        out.write_all(control_block::settings_table(&settings).as_bytes())?;
    }
    Ok(())
}

/// `ringside-agent tracing on|off`: switches tracing of the selected
/// engines.
pub fn switch_tracing(selection: &EngineSelection, enabled: bool) -> Result<(), OperatorError> {
    change_all(
        selection,
        &Change {
            enabled: Some(enabled),
            ..Change::default()
        },
    )
}

/// `ringside-agent set`: applies `change` to the selected engines.
pub fn set(selection: &EngineSelection, change: &Change) -> Result<(), OperatorError> {
    if change.is_empty() {
        return Err(OperatorError::NothingToSet);
    }
    change_all(selection, change)
}
