//! `ringside-agent`: see the library crate for everything it does. This
//! binary only parses the command line, sets up logging (`RINGSIDE_LOG`) and
//! maps the result of [`ringside_agent::run`] to an exit code.

#![forbid(unsafe_code)]

use ringside_agent::{ParseError, parse_command_line};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = match parse_command_line(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("ringside-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RINGSIDE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match ringside_agent::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let e = anyhow::Error::from(e);
            // Every error's message already includes its cause.
            eprintln!("ringside-agent: {e}");
            let code = e
                .downcast_ref::<ringside_agent::RunError>()
                .map_or(1, ringside_agent::RunError::exit_code);
            std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
