//! The processes dcoord runs or signals: the user's command (`lock -- CMD`, `queue consume
//! -- CMD`), soak workers, and dcoord's own shutdown.

use dcoord::Error;

/// Starts the user's command (`-- CMD ARGS`), set up by `configure`; it is killed if dcoord
/// drops it.
pub fn spawn_command(
    command: &[String],
    configure: impl FnOnce(&mut tokio::process::Command),
) -> dcoord::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]).kill_on_drop(true);
    configure(&mut cmd);
    cmd.spawn().map_err(|e| Error::Io {
        what: "cannot run the command",
        path: command[0].clone().into(),
        source: e,
    })
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Sends signal `sig` (`STOP`, `CONT`, `TERM`, ...; see `kill -l`) to process `pid` with
/// `kill(1)`.
pub fn signal(pid: u32, sig: &str) -> dcoord::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| Error::Io {
            what: "cannot run",
            path: "kill".into(),
            source: e,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "kill -{sig} {pid} failed: {status}"
        )))
    }
}
