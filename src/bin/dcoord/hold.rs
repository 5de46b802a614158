//! Holding a grant from the command line, with or without a command: the shared half of
//! `dcoord lock`, `dcoord semaphore` and `dcoord elect`.
//!
//! With a command, the command runs under `dcoord supervise` in a process group of its own.
//! When the grant is lost, when dcoord gets SIGTERM or Ctrl-C, or when dcoord dies, the group
//! gets SIGTERM and, `--kill-after` later, SIGKILL. The session's `lost()` fires early enough
//! (`SessionOptions::lost_before`) that the group is gone before anyone else can be granted,
//! and `--kill-after` is kept short enough for the same to hold after dcoord's death.

use std::process::ExitCode;
use std::time::Duration;

use dcoord::Error;
use dcoord::election::Leadership;
use dcoord::lock::MutexGuard;
use dcoord::semaphore::Permit;
use dcoord::session::{Session, SessionOptions};

use crate::process::{Supervised, check_runnable, code};
use crate::{Conn, connect, shutdown_signal};

/// The options every grant-holding command shares.
#[derive(clap::Args)]
pub struct HoldArgs {
    /// Give up if not granted within this long (e.g. 30s); exit 125.
    #[arg(long, value_parser = crate::duration)]
    pub wait: Option<Duration>,
    /// How long without a heartbeat before others may take over (e.g. 10s; a bare number is
    /// seconds).
    #[arg(long, default_value = "10s", value_parser = crate::duration)]
    pub lease: Duration,
    /// Grace between SIGTERM and SIGKILL when the command is stopped (e.g. 2s, 500ms).
    /// Default 2s, at most a quarter of the lease.
    #[arg(long, value_parser = crate::duration)]
    pub kill_after: Option<Duration>,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// A grant of any recipe.
pub enum Held {
    Lock(MutexGuard),
    Permit(Permit),
    Leader(Leadership),
}

impl Held {
    pub fn token(&self) -> u64 {
        match self {
            Held::Lock(g) => g.fencing_token(),
            Held::Permit(p) => p.fencing_token(),
            Held::Leader(l) => l.token(),
        }
    }

    async fn lost(&self) {
        match self {
            Held::Lock(g) => g.lost().await,
            Held::Permit(p) => p.lost().await,
            Held::Leader(l) => l.lost().await,
        }
    }

    async fn release(self) -> dcoord::Result<()> {
        match self {
            Held::Lock(g) => g.release().await,
            Held::Permit(p) => p.release().await,
            Held::Leader(l) => l.resign().await,
        }
    }
}

/// What is held, for messages and the command's environment.
pub struct What<'a> {
    /// "lock", "semaphore", "election".
    pub kind: &'static str,
    pub name: &'a str,
    /// The variable that carries the name to the command (`DCOORD_LOCK`, ...).
    pub env: &'static str,
}

impl HoldArgs {
    /// The grace period, and the session it needs: `lost()` fires `kill_after` + 0.5 s before
    /// a takeover can happen, and the grace is at most a quarter of the lease (so that, after
    /// dcoord's death, the supervisor has stopped the group before the lease of the last
    /// renewal runs out).
    fn grace(&self) -> dcoord::Result<(Duration, SessionOptions)> {
        let (lease, kill_after) = (self.lease, self.kill_after);
        if lease < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(
                "--lease must be at least 1 second".into(),
            ));
        }
        let limit = lease / 4;
        let kill_after = kill_after.unwrap_or(Duration::from_secs(2).min(limit));
        if kill_after > limit {
            return Err(Error::InvalidArgument(format!(
                "--kill-after {kill_after:?} is longer than a quarter of the lease ({limit:?}): \
                 the command could outlive the grant; give a longer --lease or a shorter \
                 --kill-after"
            )));
        }
        let options = self
            .conn
            .session_options()
            .lease(lease)
            .lost_before(kill_after + Duration::from_millis(500));
        Ok((kill_after, options))
    }
}

/// Acquires with `acquire`, tells with `announce`, then holds: until stdin closes without a
/// command, until the command exits with one. Exit codes as `dcoord lock`'s.
pub async fn run(
    args: &HoldArgs,
    what: What<'_>,
    acquire: impl AsyncFnOnce(&Session) -> dcoord::Result<Held>,
    announce: impl FnOnce(&Held),
) -> dcoord::Result<ExitCode> {
    if args.command.is_empty() {
        return hold(args, what, acquire, announce).await;
    }
    // With a command, dcoord's own failures exit 125, so that they never pass for the
    // command's own exit code.
    if let Err(code) = check_runnable(&args.command) {
        return Ok(ExitCode::from(code));
    }
    match run_command(args, what, acquire, announce).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("dcoord: {e}");
            Ok(ExitCode::from(code::FAILED))
        }
    }
}

/// The grant, or the code to exit with: a signal's, or [`code::FAILED`] once `wait` ran out.
async fn acquire_within(
    args: &HoldArgs,
    what: &What<'_>,
    options: SessionOptions,
    acquire: impl AsyncFnOnce(&Session) -> dcoord::Result<Held>,
) -> dcoord::Result<Result<(Session, Held), u8>> {
    dcoord::keys::validate_name(what.kind, what.name)?;
    let store: std::sync::Arc<dyn dcoord::store::Store> =
        std::sync::Arc::new(connect(&args.conn).await?);
    let session = Session::start(store, options).await?;
    let wait = args.wait.unwrap_or(Duration::MAX);
    tokio::select! {
        held = tokio::time::timeout(wait, acquire(&session)) => match held {
            Ok(held) => Ok(Ok((session, held?))),
            Err(_) => {
                eprintln!("dcoord: {} {:?} not granted within {wait:?}", what.kind, what.name);
                Ok(Err(code::FAILED))
            }
        },
        code = shutdown_signal() => Ok(Err(code)),
    }
}

fn tell(what: &What<'_>, held: &Held, announce: impl FnOnce(&Held)) {
    announce(held);
    let verb = if matches!(held, Held::Leader(_)) {
        "leading"
    } else {
        "holding"
    };
    eprintln!(
        "dcoord: {verb} {} {:?} with fencing token {}",
        what.kind,
        what.name,
        held.token()
    );
}

/// Without a command: hold until stdin closes, a signal, or the loss of the grant.
async fn hold(
    args: &HoldArgs,
    what: What<'_>,
    acquire: impl AsyncFnOnce(&Session) -> dcoord::Result<Held>,
    announce: impl FnOnce(&Held),
) -> dcoord::Result<ExitCode> {
    let (_, options) = args.grace()?;
    let (session, held) = match acquire_within(args, &what, options, acquire).await? {
        Ok(held) => held,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    tell(&what, &held, announce);
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    });
    let code = tokio::select! {
        _ = stdin_closed => 0,
        code = shutdown_signal() => code,
        _ = held.lost() => {
            eprintln!("dcoord: {} {:?} lost (lease ran out or taken over)", what.kind, what.name);
            return Ok(ExitCode::from(code::LOST));
        }
    };
    held.release().await?;
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}

async fn run_command(
    args: &HoldArgs,
    what: What<'_>,
    acquire: impl AsyncFnOnce(&Session) -> dcoord::Result<Held>,
    announce: impl FnOnce(&Held),
) -> dcoord::Result<ExitCode> {
    let (kill_after, options) = args.grace()?;
    let (session, held) = match acquire_within(args, &what, options, acquire).await? {
        Ok(held) => held,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    tell(&what, &held, announce);
    let token = held.token().to_string();
    let mut child = Supervised::spawn(&args.command, kill_after, |c| {
        c.env("DCOORD_FENCING_TOKEN", &token)
            .env(what.env, what.name);
    })?;
    let code = tokio::select! {
        code = child.wait() => code,
        code = shutdown_signal() => {
            child.stop(kill_after).await;
            code
        }
        _ = held.lost() => {
            eprintln!(
                "dcoord: {} {:?} lost (lease ran out or taken over); stopping the command",
                what.kind, what.name
            );
            child.stop(kill_after).await;
            return Ok(ExitCode::from(code::LOST));
        }
    };
    held.release().await?;
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}
