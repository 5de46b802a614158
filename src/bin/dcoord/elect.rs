//! `elect NAME [VALUE] [-- CMD]` and `elect --listen NAME`.

use std::process::ExitCode;

use dcoord::election::{Election, Leader};
use dcoord::session::Session;
use serde_json::{Map, json};

use crate::hold::{Held, HoldArgs, What};
use crate::output::Output;
use crate::shutdown_signal;

/// What `dcoord elect` was asked to do.
#[derive(clap::Args)]
pub struct ElectArgs {
    /// The election name ([A-Za-z0-9._-]).
    name: String,
    /// The value to lead with (e.g. this host's address); observers see it.
    #[arg(default_value = "")]
    value: String,
    /// Observe without campaigning: print the leader now and on every change, until
    /// interrupted.
    #[arg(long, conflicts_with_all = ["command", "wait"])]
    listen: bool,
    /// Output format: `simple` is `NAME TOKEN VALUE` (`NAME -` when nobody leads).
    #[arg(short, long, value_enum, default_value = "simple")]
    output: Output,
    #[command(flatten)]
    hold: HoldArgs,
}

fn print(output: Output, name: &str, leader: Option<&Leader>) {
    match output {
        Output::Simple => match leader {
            Some(l) => println!("{name} {} {}", l.token, String::from_utf8_lossy(&l.value)),
            None => println!("{name} -"),
        },
        Output::Json => {
            let mut obj = Map::new();
            obj.insert("election".into(), json!(name));
            obj.insert("leader".into(), json!(leader.map(|l| &l.session)));
            if let Some(l) = leader {
                obj.insert("token".into(), json!(l.token));
                crate::output::insert_value(&mut obj, &l.value);
            }
            crate::output::json_line(&serde_json::Value::Object(obj));
        }
    }
}

pub async fn run(args: ElectArgs) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_name("election", &args.name)?;
    if args.listen {
        return listen(args).await;
    }
    let name = args.name.as_str();
    let what = What {
        kind: "election",
        name,
        env: "DCOORD_ELECTION",
    };
    let value = args.value.clone();
    let acquire = async |session: &Session| {
        let election = Election::new(session, name)?;
        Ok(Held::Leader(election.campaign(value.as_bytes()).await?))
    };
    let output = args.output;
    let announce = |held: &Held| {
        if let Held::Leader(l) = held {
            let leader = Leader {
                session: l.session().to_string(),
                token: l.token(),
                value: l.value().clone(),
            };
            print(output, name, Some(&leader));
        }
    };
    crate::hold::run(&args.hold, what, acquire, announce).await
}

async fn listen(args: ElectArgs) -> dcoord::Result<ExitCode> {
    let session = crate::session(&args.hold.conn, args.hold.lease).await?;
    let mut rx = Election::new(&session, &args.name)?.observe().await?;
    let code = loop {
        print(args.output, &args.name, rx.borrow_and_update().as_ref());
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                break crate::process::code::FAILED;
            },
            code = shutdown_signal() => break code,
        }
    };
    let _ = session.close().await;
    Ok(ExitCode::from(code))
}
