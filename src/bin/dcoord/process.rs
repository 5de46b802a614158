//! The processes dcoord runs or signals: the user's command (`lock -- CMD`, `queue consume
//! -- CMD`), soak workers, and dcoord's own shutdown.

use std::process::ExitCode;

use dcoord::Error;

/// Ctrl-C or SIGTERM; returns the conventional exit code for it (130 or 143).
pub async fn shutdown_signal() -> u8 {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => 128 + 2,
        _ = term.recv() => 128 + 15,
    }
}

pub use dcoord::engine::signal;

// Supervision of `-- CMD`: the command runs in a process group of its own, led by a supervisor
// (`dcoord supervise`, a child of dcoord). Stopping means SIGTERM to the group, a grace period,
// then SIGKILL to the group, so whatever the command started stops with it. The supervisor
// watches its parent: when dcoord dies by any means (SIGKILL, OOM), it stops the group within
// the grace period, which `lock` keeps shorter than the time before anyone can take over.

use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// Exit codes of a command run under supervision (the `timeout(1)` convention): anything else
/// is the command's own code, or 128 + n when a signal n ended it.
pub mod code {
    /// The lock was lost while the command ran; the command was stopped.
    pub const LOST: u8 = 124;
    /// dcoord itself failed (the lock could not be taken, the store is unreachable, ...).
    pub const FAILED: u8 = 125;
    /// The command was found but cannot be run.
    pub const CANNOT_RUN: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// Checks, before anything is acquired, that `command[0]` can be run: `Err(code)` with
/// [`code::NOT_FOUND`] or [`code::CANNOT_RUN`] and a message on stderr.
pub fn check_runnable(command: &[String]) -> Result<(), u8> {
    use std::os::unix::fs::PermissionsExt;
    let name = &command[0];
    let found = if name.contains('/') {
        Some(Path::new(name).to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    };
    let Some(path) = found.filter(|p| p.exists()) else {
        eprintln!("dcoord: {name}: command not found");
        return Err(code::NOT_FOUND);
    };
    let runnable =
        std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !runnable {
        eprintln!(
            "dcoord: {name}: cannot run ({} is not an executable file)",
            path.display()
        );
        return Err(code::CANNOT_RUN);
    }
    Ok(())
}

/// A command running under `dcoord supervise`, in the process group the supervisor leads.
pub struct Supervised {
    supervisor: tokio::process::Child,
    group: Pid,
}

impl Supervised {
    /// Starts `command` under a supervisor that stops the group `kill_after` after a SIGTERM
    /// or after dcoord's death. `configure` sets its environment and stdio.
    pub fn spawn(
        command: &[String],
        kill_after: Duration,
        configure: impl FnOnce(&mut tokio::process::Command),
    ) -> dcoord::Result<Supervised> {
        let exe = std::env::current_exe().map_err(|e| Error::Io {
            what: "cannot find this executable",
            path: "/proc/self/exe".into(),
            source: e,
        })?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("supervise")
            .arg("--kill-after-ms")
            .arg(kill_after.as_millis().to_string())
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--")
            .args(command)
            .process_group(0)
            .kill_on_drop(true);
        configure(&mut cmd);
        let supervisor = cmd.spawn().map_err(|e| Error::Io {
            what: "cannot start the supervisor",
            path: command[0].clone().into(),
            source: e,
        })?;
        let group = supervisor
            .id()
            .and_then(|id| Pid::from_raw(id as i32))
            .expect("a child just spawned has a pid");
        Ok(Supervised { supervisor, group })
    }

    /// The command's stdin, when `configure` asked for a pipe.
    pub fn stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.supervisor.stdin.take()
    }

    /// Waits for the command to end (and its group with it); the exit code to pass on.
    pub async fn wait(&mut self) -> u8 {
        match self.supervisor.wait().await {
            Ok(status) => match exit_code(status) {
                // The supervisor itself was killed (the OOM killer, say): stop what it led.
                c if c > 128 && status.code().is_none() => {
                    let _ = kill_process_group(self.group, Signal::KILL);
                    c
                }
                c => c,
            },
            Err(_) => {
                let _ = kill_process_group(self.group, Signal::KILL);
                code::FAILED
            }
        }
    }

    /// Stops the group: SIGTERM, then SIGKILL once `kill_after` has passed. Returns when the
    /// supervisor has exited.
    pub async fn stop(&mut self, kill_after: Duration) {
        // To the supervisor only: it passes SIGTERM on to the group, once.
        let _ = kill_process(self.group, Signal::TERM);
        // The supervisor escalates by itself; this is the backstop if it cannot.
        let grace = kill_after + Duration::from_secs(1);
        if tokio::time::timeout(grace, self.supervisor.wait())
            .await
            .is_err()
        {
            let _ = kill_process_group(self.group, Signal::KILL);
            let _ = self.supervisor.wait().await;
        }
    }
}

/// The code to exit with for a process that ended with `status`: its code, or 128 + signal.
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => code::FAILED,
    }
}

/// `dcoord supervise`: runs `command` in this process's group (which dcoord made this process
/// lead), and stops the whole group (SIGTERM, `kill_after`, SIGKILL) when the command ends,
/// when a stop signal arrives, or when the parent `parent` dies. Exits with the command's code.
pub async fn supervise(command: Vec<String>, kill_after: Duration, parent: u32) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let me = std::process::id();
    // Signals sent to the group reach this process too: handle them (they start a stop).
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return ExitCode::from(code::FAILED);
    };
    let mut child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dcoord: cannot run {:?}: {e}", command[0]);
            return ExitCode::from(code::CANNOT_RUN);
        }
    };
    let orphaned = async {
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let status = tokio::select! {
        status = child.wait() => status.ok(),
        _ = term.recv() => None,
        _ = int.recv() => None,
        _ = hup.recv() => None,
        _ = orphaned => None,
    };
    let status = match status {
        Some(status) => status,
        None => {
            // Stop: SIGTERM to everyone in the group, SIGKILL after the grace period.
            terminate_group_but(me);
            match tokio::time::timeout(kill_after, child.wait()).await {
                Ok(Ok(status)) => status,
                _ => {
                    let _ = child.start_kill();
                    match child.wait().await {
                        Ok(status) => status,
                        Err(_) => return ExitCode::from(code::FAILED),
                    }
                }
            }
        }
    };
    // The command is gone; whatever it started must go too, before dcoord moves on (and, for
    // a lock, releases it).
    stop_group_but(me, kill_after).await;
    ExitCode::from(exit_code(status))
}

use dcoord::engine::process_group as running_in_group;

/// Whether process `pid` runs (a zombie does not).
pub fn running(pid: u32) -> bool {
    running_in_group(pid).is_some()
}

/// Processes in this process's group other than `me`, from /proc.
fn group_members_but(me: u32) -> Vec<Pid> {
    let own_group = rustix::process::getpgrp().as_raw_nonzero().get();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && running_in_group(pid) == Some(own_group))
        .filter_map(|pid| Pid::from_raw(pid as i32))
        .collect()
}

fn terminate_group_but(me: u32) {
    for pid in group_members_but(me) {
        let _ = kill_process(pid, Signal::TERM);
    }
}

/// SIGTERM to every other member of the group, then SIGKILL to those left after `kill_after`,
/// until none is left.
async fn stop_group_but(me: u32, kill_after: Duration) {
    if group_members_but(me).is_empty() {
        return;
    }
    terminate_group_but(me);
    let deadline = tokio::time::Instant::now() + kill_after;
    while tokio::time::Instant::now() < deadline {
        if group_members_but(me).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let left = group_members_but(me);
        if left.is_empty() {
            return;
        }
        for pid in left {
            let _ = kill_process(pid, Signal::KILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
