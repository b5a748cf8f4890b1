//! The operator commands that act on engines without a daemon:
//! `tracing on|off|status` and `set`.

use crate::config::{DetailArg, EngineSelection, SetArgs, ShowArgs, TracingAction, TracingArgs};
use crate::control::control_block::{self, Change, ControlError};
use ringside_shm_protocol::Detail;
use std::io::Write;

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
pub fn show(args: &ShowArgs) -> Result<(), OperatorError> {
    let opened = control_block::open_engines(&args.selection.engines, &args.selection.trusted_uids)?;
    warn_skipped(&opened.skipped);
    let settings: Vec<_> = opened.engines.iter().map(control_block::read_settings).collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &settings)?;
        writeln!(out)?;
    } else {
        out.write_all(control_block::settings_table(&settings).as_bytes())?;
    }
    Ok(())
}

/// `ringside-agent tracing on|off|status`.
pub fn tracing(args: &TracingArgs) -> Result<(), OperatorError> {
    match &args.action {
        TracingAction::On(selection) => change_all(
            selection,
            &Change {
                enabled: Some(true),
                ..Change::default()
            },
        ),
        TracingAction::Off(selection) => change_all(
            selection,
            &Change {
                enabled: Some(false),
                ..Change::default()
            },
        ),
        TracingAction::Status(show_args) => show(show_args),
    }
}

/// `ringside-agent set`.
pub fn set(args: &SetArgs) -> Result<(), OperatorError> {
    let change = Change {
        enabled: None,
        detail: args.detail.map(|d| match d {
            DetailArg::Request => Detail::Request,
            DetailArg::Phases => Detail::Phases,
        }),
        head_sample_ratio: args.head_sample,
        tail_keep_errors: args.tail_keep_errors,
        tail_sample_ratio: args.tail_sample,
        tail_ttft_threshold_ms: args.tail_ttft_ms,
        tail_e2e_threshold_ms: args.tail_e2e_ms,
    };
    if change.is_empty() {
        return Err(OperatorError::NothingToSet);
    }
    change_all(&args.selection, &change)
}
