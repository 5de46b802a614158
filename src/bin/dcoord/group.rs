//! `members NAME [--watch] [--join VALUE]` and `counter NAME [add N]`.

use std::process::ExitCode;
use std::time::Duration;

use dcoord::Error;
use dcoord::counter::Counter;
use dcoord::membership::{Group, Member};
use serde_json::{Map, json};

use crate::output::Output;
use crate::{Conn, shutdown_signal};

/// What `dcoord members` was asked to do.
#[derive(clap::Args)]
pub struct MembersArgs {
    /// The group name ([A-Za-z0-9._-]).
    name: String,
    /// Keep printing the whole list on every change (a dead member goes one lease after its
    /// last heartbeat), until interrupted.
    #[arg(long)]
    watch: bool,
    /// Join with this value first, and stay a member until stdin closes or Ctrl-C (exit 124
    /// if the membership is lost). Under a service manager, keep stdin open (not /dev/null).
    #[arg(long, value_name = "VALUE")]
    join: Option<String>,
    /// How long without a heartbeat before others drop this member (with --join).
    #[arg(long, default_value = "10s", value_parser = crate::duration)]
    lease: Duration,
    /// Output format: `simple` is one `ID VALUE` line per member (and an empty line after
    /// each list with --watch); `json` is one object per list.
    #[arg(short, long, value_enum, default_value = "simple")]
    output: Output,
    #[command(flatten)]
    conn: Conn,
}

fn print(output: Output, name: &str, members: &[Member], watching: bool) {
    match output {
        Output::Simple => {
            for m in members {
                println!("{} {}", m.id, String::from_utf8_lossy(&m.value));
            }
            if watching {
                println!();
            }
        }
        Output::Json => {
            let list: Vec<serde_json::Value> = members
                .iter()
                .map(|m| {
                    let mut obj = Map::new();
                    obj.insert("id".into(), json!(m.id));
                    obj.insert("session".into(), json!(m.session));
                    crate::output::insert_value(&mut obj, &m.value);
                    serde_json::Value::Object(obj)
                })
                .collect();
            crate::output::json_line(&json!({"group": name, "members": list}));
        }
    }
}

pub async fn members(args: MembersArgs) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_name("group", &args.name)?;
    let session = crate::session(&args.conn, args.lease).await?;
    let group = Group::new(&session, &args.name)?;
    let me = match &args.join {
        Some(value) => Some(group.join(value).await?),
        None => None,
    };
    // With --join: stdin closing ends the membership (and the command), and so does its loss.
    let code = {
        let joined = me.is_some();
        let stdin_closed = async move {
            if joined {
                let _ = tokio::task::spawn_blocking(|| {
                    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                })
                .await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let lost = async {
            match &me {
                Some(me) => me.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stdin_closed, lost);
        let lost_code = || {
            eprintln!("dcoord: membership of {:?} lost (lease ran out)", args.name);
            crate::process::code::LOST
        };
        if args.watch {
            let mut rx = group.watch().await?;
            loop {
                print(args.output, &args.name, &rx.borrow_and_update(), true);
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break crate::process::code::FAILED },
                    code = shutdown_signal() => break code,
                    _ = &mut stdin_closed => break 0,
                    _ = &mut lost => break lost_code(),
                }
            }
        } else {
            print(args.output, &args.name, &group.members().await?, false);
            if me.is_some() {
                tokio::select! {
                    _ = &mut stdin_closed => 0,
                    code = shutdown_signal() => code,
                    _ = &mut lost => lost_code(),
                }
            } else {
                0
            }
        }
    };
    if let Some(me) = me {
        let _ = me.leave().await;
    }
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}

/// What `dcoord counter` was asked to do.
#[derive(clap::Args)]
pub struct CounterArgs {
    /// The counter name ([A-Za-z0-9._-]).
    name: String,
    /// `add`, to add N (which may be negative); without it, print the value.
    op: Option<String>,
    /// What to add.
    #[arg(allow_negative_numbers = true)]
    amount: Option<i64>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn counter(args: CounterArgs) -> dcoord::Result<ExitCode> {
    let store: std::sync::Arc<dyn dcoord::store::Store> =
        std::sync::Arc::new(crate::connect(&args.conn).await?);
    let counter = Counter::new(store, &args.conn.root, &args.name)?;
    let value = match (args.op.as_deref(), args.amount) {
        (None, None) => counter.get().await?,
        (Some("add"), Some(n)) => counter.add(n).await?,
        (Some("add"), None) => {
            return Err(Error::InvalidArgument(
                "counter add: give the amount, e.g. `add 1`".into(),
            ));
        }
        (Some(op), _) => {
            return Err(Error::InvalidArgument(format!(
                "counter: unknown operation {op:?} (expected `add N`)"
            )));
        }
        (None, Some(_)) => unreachable!("clap fills op first"),
    };
    println!("{value}");
    Ok(ExitCode::SUCCESS)
}
