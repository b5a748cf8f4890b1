//! OpenMP wait policy.
//!
//! llama.cpp's CPU backend synchronises its threads with OpenMP barriers hundreds of times per
//! token. libgomp's default (`OMP_WAIT_POLICY` unset) spins in those barriers; when another
//! process wants the same cores — a load generator, the agent, a test client on a 2-core machine
//! — the spinning threads steal each other's time slices and decoding collapses (measured here:
//! 7.7 tokens/s spinning against 27 tokens/s passive with the machine loaded). `passive` waits
//! on a futex instead.
//!
//! libgomp reads the variable in a constructor that runs when the library is loaded, before
//! `main`, so it cannot be changed from inside the process: [`reexec_with_passive_wait_policy`]
//! re-executes the binary once with the variable set. An explicit `OMP_WAIT_POLICY` is always
//! respected.

use std::ffi::OsString;

/// The variable libgomp reads.
pub const OMP_WAIT_POLICY: &str = "OMP_WAIT_POLICY";

/// Why the engine could not re-execute itself (it then runs with libgomp's default).
#[derive(Debug, thiserror::Error)]
pub enum ReexecError {
    /// The path of the running binary is unknown.
    #[error("cannot find the running executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// `execve` failed.
    #[error("cannot re-execute {path}: {source}")]
    Exec {
        /// The binary.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// When `OMP_WAIT_POLICY` is unset, replaces the process with itself, same arguments, and
/// `OMP_WAIT_POLICY=passive`. Returns `Ok(())` without doing anything when it is set.
///
/// # Errors
/// [`ReexecError`] when the re-execution is impossible; the caller may go on regardless.
#[cfg(unix)]
pub fn reexec_with_passive_wait_policy() -> Result<(), ReexecError> {
    use std::os::unix::process::CommandExt as _;

    if std::env::var_os(OMP_WAIT_POLICY).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(ReexecError::CurrentExe)?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let source = std::process::Command::new(&exe)
        .args(args)
        .env(OMP_WAIT_POLICY, "passive")
        .exec();
    Err(ReexecError::Exec {
        path: exe.display().to_string(),
        source,
    })
}

/// Non-Unix: nothing to do.
///
/// # Errors
/// Never.
#[cfg(not(unix))]
pub fn reexec_with_passive_wait_policy() -> Result<(), ReexecError> {
    Ok(())
}
