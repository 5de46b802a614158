//! `config get | set | watch`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use dcoord::Error;
use dcoord::store::{Consistency, Store};
use futures::StreamExt;

use crate::{Conn, connect, read_input};

#[derive(Subcommand)]
pub enum ConfigOp {
    /// Print the value (exit 1 if missing, 2 if it does not parse).
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a value after checking that it parses (nothing is written otherwise).
    Set {
        /// The key.
        key: String,
        /// The value (or use --file).
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print every value applied (and every value refused) until Ctrl-C.
    Watch {
        /// The key.
        key: String,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn run(op: ConfigOp) -> dcoord::Result<ExitCode> {
    use dcoord::config::{ConfigEvent, ConfigOptions, ConfigWatch, Format, Source};
    use std::sync::Arc;

    let parse = |key: &str, bytes: &[u8]| -> dcoord::Result<serde_json::Value> {
        let format = Format::checked_for_key(key)?;
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Decode {
            key: key.to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        match format {
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
            Format::Toml => toml::from_str(text).map_err(|e| e.to_string()),
        }
        .map_err(|reason| Error::Decode {
            key: key.to_string(),
            reason: format!("not valid {format:?}: {reason}"),
        })
    };
    match op {
        ConfigOp::Get { key, conn } => {
            dcoord::keys::validate_key(key.as_bytes())?;
            let store = connect(&conn).await?;
            let Some(bytes) = store.get(key.as_bytes(), Consistency::Linearizable).await? else {
                eprintln!("dcoord: config {key:?} is not set");
                return Ok(ExitCode::from(1));
            };
            if let Err(e) = parse(&key, &bytes) {
                eprintln!("dcoord: {e}");
                return Ok(ExitCode::from(2));
            }
            println!("{}", String::from_utf8_lossy(&bytes).trim_end());
            Ok(ExitCode::SUCCESS)
        }
        ConfigOp::Set {
            key,
            value,
            file,
            conn,
        } => {
            let bytes = read_input(value, file, "cannot read value file")?;
            dcoord::keys::validate_key(key.as_bytes())?;
            dcoord::keys::validate_value(key.as_bytes(), &bytes)?;
            parse(&key, &bytes)
                .map_err(|e| Error::InvalidArgument(format!("{e}; nothing written")))?;
            let store = connect(&conn).await?;
            store.put(key.as_bytes(), &bytes).await?;
            Ok(ExitCode::SUCCESS)
        }
        ConfigOp::Watch { key, count, conn } => {
            let store: Arc<dyn Store> = Arc::new(connect(&conn).await?);
            let cw = ConfigWatch::<serde_json::Value>::open(
                store,
                Source::key(key.clone()),
                ConfigOptions::default(),
            )
            .await?;
            let mut events = Box::pin(cw.events());
            let mut seen = 0;
            if let Some(v) = cw.current() {
                println!("{}", serde_json::to_string(&*v).unwrap_or_default());
                seen += 1;
            } else {
                eprintln!("dcoord: config {key:?} is not set yet; waiting");
            }
            while count.is_none_or(|c| seen < c) {
                let Some(ev) = events.next().await else { break };
                match ev? {
                    ConfigEvent::Applied { new, .. } => {
                        println!("{}", serde_json::to_string(&*new).unwrap_or_default());
                        seen += 1;
                    }
                    ConfigEvent::Rejected {
                        key,
                        error,
                        revision,
                    } => {
                        eprintln!("dcoord: refused revision {revision} of {key}: {error}");
                    }
                    ConfigEvent::Missing { .. } => eprintln!("dcoord: config {key:?} deleted"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
