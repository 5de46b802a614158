//! `lock NAME [-- CMD]` (holding is [`crate::hold`]'s) and `lock info NAME`.

use std::process::ExitCode;

use dcoord::lock::Mutex;
use dcoord::session::Session;

use crate::hold::{Held, HoldArgs, What};
use crate::output::Output;
use crate::{Conn, connect};

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
    /// Also print the fencing token on stdout (it is always in $DCOORD_FENCING_TOKEN).
    #[arg(long)]
    print_token: bool,
    #[command(flatten)]
    hold: HoldArgs,
}

pub async fn run(args: LockArgs) -> dcoord::Result<ExitCode> {
    // clap requires the name unless a subcommand such as `info` is given.
    let name = args.name.as_deref().unwrap_or_default();
    let what = What {
        kind: "lock",
        name,
        env: "DCOORD_LOCK",
    };
    let acquire =
        async |session: &Session| Ok(Held::Lock(Mutex::new(session, name)?.acquire().await?));
    let announce = |held: &Held| {
        if args.print_token {
            println!("{}", held.token());
        }
    };
    crate::hold::run(&args.hold, what, acquire, announce).await
}
