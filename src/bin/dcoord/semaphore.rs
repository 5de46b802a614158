//! `semaphore NAME --permits N [--take K] [-- CMD]` and `semaphore info NAME --permits N`.

use std::process::ExitCode;

use dcoord::semaphore::Semaphore;
use dcoord::session::Session;

use crate::hold::{Held, HoldArgs, What};
use crate::output::Output;
use crate::{Conn, connect};

/// `dcoord semaphore info NAME`.
#[derive(clap::Subcommand)]
pub enum SemaphoreOp {
    /// Show the semaphore's holders, waiters (in order) and free permits.
    Info {
        /// The semaphore name.
        name: String,
        /// N, as every user of the semaphore opens it.
        #[arg(long, short = 'n')]
        permits: u64,
        /// Output format: `simple` is `permits N`, `available K`, `token T`, then one
        /// `holder SESSION PERMITS TOKEN` / `waiter SESSION PERMITS` line each.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
}

/// What `dcoord semaphore NAME --permits N [-- CMD]` was asked to do.
#[derive(clap::Args)]
pub struct SemaphoreArgs {
    /// The semaphore name ([A-Za-z0-9._-]).
    #[arg(required = true)]
    name: Option<String>,
    /// N: how many permits the semaphore has (every user must give the same N).
    #[arg(long, short = 'n', required = true)]
    permits: Option<u64>,
    /// How many permits to take (1..=N).
    #[arg(long, default_value = "1")]
    take: u64,
    /// Also print the fencing token on stdout (it is always in $DCOORD_FENCING_TOKEN).
    #[arg(long)]
    print_token: bool,
    #[command(flatten)]
    hold: HoldArgs,
}

pub async fn run(args: SemaphoreArgs) -> dcoord::Result<ExitCode> {
    let name = args.name.as_deref().unwrap_or_default();
    let permits = args.permits.unwrap_or_default();
    let what = What {
        kind: "semaphore",
        name,
        env: "DCOORD_SEMAPHORE",
    };
    let take = args.take;
    // Checked in here, so that with a command a bad --take exits 125 like every failure of
    // dcoord's own.
    let acquire = async |session: &Session| {
        if permits == 0 || take == 0 || take > permits {
            return Err(dcoord::Error::InvalidArgument(format!(
                "--take {take} must be between 1 and --permits {permits} (at least 1)"
            )));
        }
        let sem = Semaphore::new(session, name, permits)?;
        Ok(Held::Permit(sem.acquire(take).await?))
    };
    let announce = |held: &Held| {
        if args.print_token {
            println!("{}", held.token());
        }
    };
    crate::hold::run(&args.hold, what, acquire, announce).await
}

pub async fn info(
    name: String,
    permits: u64,
    output: Output,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_name("semaphore", &name)?;
    let store: std::sync::Arc<dyn dcoord::store::Store> =
        std::sync::Arc::new(connect(&conn).await?);
    let session = Session::start(store, conn.session_options()).await?;
    let info = Semaphore::new(&session, &name, permits)?.info().await;
    let _ = session.close().await;
    let info = info?;
    match output {
        Output::Simple => {
            println!("permits {}", info.permits);
            println!("available {}", info.available);
            println!("token {}", info.token);
            for h in &info.holders {
                println!("holder {} {} {}", h.session, h.permits, h.token);
            }
            for w in &info.waiters {
                println!("waiter {} {}", w.session, w.permits);
            }
        }
        Output::Json => {
            let holder = |h: &dcoord::semaphore::PermitHolder| serde_json::json!({"session": h.session, "permits": h.permits, "token": h.token});
            crate::output::json_line(&serde_json::json!({
                "semaphore": name,
                "permits": info.permits,
                "available": info.available,
                "token": info.token,
                "holders": info.holders.iter().map(holder).collect::<Vec<_>>(),
                "waiters": info.waiters.iter().map(|w| serde_json::json!({"session": w.session, "permits": w.permits})).collect::<Vec<_>>(),
            }))
        }
    }
    Ok(ExitCode::SUCCESS)
}
