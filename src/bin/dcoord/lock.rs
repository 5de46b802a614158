//! `lock NAME [-- CMD]`.
//!
//! With a command, the command runs under `dcoord supervise` in a process group of its own.
//! When the lock is lost, when dcoord gets SIGTERM or Ctrl-C, or when dcoord dies, the group gets
//! SIGTERM and, `--kill-after` later, SIGKILL. The session's `lost()` fires early enough
//! (`SessionOptions::lost_before`) that the group is gone before anyone else can take the
//! lock, and `--kill-after` is kept short enough for the same to hold after dcoord's death.

use std::process::ExitCode;
use std::time::Duration;

use dcoord::Error;
use dcoord::lock::{Mutex, MutexGuard};
use dcoord::session::{Session, SessionOptions};

use crate::output::Output;
use crate::process::{Supervised, check_runnable, code};
use crate::{Conn, connect, shutdown_signal};

/// `dcoord lock info NAME`.
#[derive(clap::Subcommand)]
pub enum LockOp {
    /// Show the lock's holder, waiters (in order) and latest fencing token.
    Info {
        /// The lock name.
        name: String,
        /// Output format: `simple` is `token N`, `holder SESSION|-`, `waiters S1 S2 ...`.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn info(name: String, output: Output, conn: Conn) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_name("lock", &name)?;
    let store: std::sync::Arc<dyn dcoord::store::Store> =
        std::sync::Arc::new(connect(&conn).await?);
    let session = Session::start(store, conn.session_options()).await?;
    let info = Mutex::new(&session, &name)?.info().await?;
    let _ = session.close().await;
    match output {
        Output::Simple => {
            println!("token {}", info.token);
            println!("holder {}", info.holder.as_deref().unwrap_or("-"));
            println!("waiters {}", info.waiters.join(" "));
        }
        Output::Json => crate::output::json_line(&serde_json::json!({
            "lock": name,
            "token": info.token,
            "holder": info.holder,
            "waiters": info.waiters,
        })),
    }
    Ok(ExitCode::SUCCESS)
}

/// What `dcoord lock NAME [-- CMD]` was asked to do.
#[derive(clap::Args)]
pub struct LockArgs {
    /// The lock name ([A-Za-z0-9._-]).
    #[arg(required = true)]
    name: Option<String>,
    /// Give up if the lock is not granted within this long (e.g. 30s); exit 125.
    #[arg(long, value_parser = crate::duration)]
    wait: Option<Duration>,
    /// How long without a heartbeat before others may take the lock over (e.g. 10s; a
    /// bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = crate::duration)]
    lease: Duration,
    /// Grace between SIGTERM and SIGKILL when the command is stopped (e.g. 2s, 500ms).
    /// Default 2s, at most a quarter of the lease.
    #[arg(long, value_parser = crate::duration)]
    kill_after: Option<Duration>,
    /// Also print the fencing token on stdout (it is always in $DCOORD_FENCING_TOKEN).
    #[arg(long)]
    print_token: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

impl LockArgs {
    /// The lock's name (clap requires it unless a subcommand such as `info` is given).
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

pub async fn run(args: LockArgs) -> dcoord::Result<ExitCode> {
    if args.command.is_empty() {
        return hold(args).await;
    }
    // With a command, dcoord's own failures exit 125, so that they never pass for the
    // command's own exit code.
    if let Err(code) = check_runnable(&args.command) {
        return Ok(ExitCode::from(code));
    }
    match run_command(args).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("dcoord: {e}");
            Ok(ExitCode::from(code::FAILED))
        }
    }
}

/// The grace period, and the session it needs: `lost()` fires `kill_after` + 0.5 s before a
/// takeover can happen, and the grace is at most a quarter of the lease (so that, after
/// dcoord's death, the supervisor has stopped the group before the lease of the last renewal
/// runs out).
fn grace(args: &LockArgs) -> dcoord::Result<(Duration, SessionOptions)> {
    let (lease, kill_after) = (args.lease, args.kill_after);
    if lease < Duration::from_secs(1) {
        return Err(Error::InvalidArgument(
            "--lease must be at least 1 second".into(),
        ));
    }
    let limit = lease / 4;
    let kill_after = kill_after.unwrap_or(Duration::from_secs(2).min(limit));
    if kill_after > limit {
        return Err(Error::InvalidArgument(format!(
            "--kill-after {kill_after:?} is longer than a quarter of the lease ({limit:?}): the \
             command could outlive the lock; give a longer --lease or a shorter --kill-after"
        )));
    }
    let options = args
        .conn
        .session_options()
        .lease(lease)
        .lost_before(kill_after + Duration::from_millis(500));
    Ok((kill_after, options))
}

/// The lock, or the code to exit with: a signal's, or [`code::FAILED`] once `wait` ran out.
async fn acquire(
    args: &LockArgs,
    options: SessionOptions,
) -> dcoord::Result<Result<(Session, MutexGuard), u8>> {
    dcoord::keys::validate_name("lock", args.name())?;
    let store: std::sync::Arc<dyn dcoord::store::Store> =
        std::sync::Arc::new(connect(&args.conn).await?);
    let session = Session::start(store, options).await?;
    let lock = Mutex::new(&session, args.name())?;
    let wait = args.wait.unwrap_or(Duration::MAX);
    tokio::select! {
        g = tokio::time::timeout(wait, lock.acquire()) => match g {
            Ok(g) => Ok(Ok((session, g?))),
            Err(_) => {
                eprintln!("dcoord: lock {:?} not granted within {wait:?}", args.name());
                Ok(Err(code::FAILED))
            }
        },
        code = shutdown_signal() => Ok(Err(code)),
    }
}

fn announce(name: &str, guard: &MutexGuard, print_token: bool) {
    let token = guard.fencing_token();
    if print_token {
        println!("{token}");
    }
    eprintln!("dcoord: holding lock {name:?} with fencing token {token}");
}

/// Without a command: hold the lock until stdin closes, a signal, or the loss of the lock.
async fn hold(args: LockArgs) -> dcoord::Result<ExitCode> {
    let (_, options) = grace(&args)?;
    let (session, guard) = match acquire(&args, options).await? {
        Ok(held) => held,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    announce(args.name(), &guard, args.print_token);
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    });
    let code = tokio::select! {
        _ = stdin_closed => 0,
        code = shutdown_signal() => code,
        _ = guard.lost() => {
            eprintln!("dcoord: lock {:?} lost (lease ran out or taken over)", args.name());
            return Ok(ExitCode::from(code::LOST));
        }
    };
    guard.release().await?;
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}

async fn run_command(args: LockArgs) -> dcoord::Result<ExitCode> {
    let (kill_after, options) = grace(&args)?;
    let (session, guard) = match acquire(&args, options).await? {
        Ok(held) => held,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    announce(args.name(), &guard, args.print_token);
    let token = guard.fencing_token().to_string();
    let mut child = Supervised::spawn(&args.command, kill_after, |c| {
        c.env("DCOORD_FENCING_TOKEN", &token)
            .env("DCOORD_LOCK", args.name());
    })?;
    let code = tokio::select! {
        code = child.wait() => code,
        code = shutdown_signal() => {
            child.stop(kill_after).await;
            code
        }
        _ = guard.lost() => {
            eprintln!("dcoord: lock {:?} lost (lease ran out or taken over); stopping the command", args.name());
            child.stop(kill_after).await;
            return Ok(ExitCode::from(code::LOST));
        }
    };
    guard.release().await?;
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}
