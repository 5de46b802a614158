//! `get`, `put`, `del`, `watch`: single keys.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use dcoord::store::{Consistency, EventKind, Store, WatchTarget};
use futures::StreamExt;

use std::io::Write;

use crate::output::{self, Output};
use crate::{Conn, connect, read_input};

#[derive(Clone, Copy, ValueEnum)]
pub enum ConsistencyArg {
    Linearizable,
    Lease,
    Eventual,
}

pub async fn get(
    key: String,
    consistency: ConsistencyArg,
    output: Output,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_key(key.as_bytes())?;
    let store = connect(&conn).await?;
    let c = match consistency {
        ConsistencyArg::Linearizable => Consistency::Linearizable,
        ConsistencyArg::Lease => Consistency::Lease,
        ConsistencyArg::Eventual => Consistency::Eventual,
    };
    match store.get(key.as_bytes(), c).await? {
        Some(v) => {
            match output {
                Output::Simple => output::raw(&v),
                Output::Json => output::json_line(&output::entry(key.as_bytes(), &v, &[])),
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("dcoord: key {key:?} not found");
            Ok(ExitCode::from(1))
        }
    }
}

/// `get --prefix`: every key under `prefix`, sorted; `key` then `value` lines (simple), or one
/// JSON object per entry with the scan's revision.
pub async fn list(prefix: String, output: Output, conn: Conn) -> dcoord::Result<ExitCode> {
    WatchTarget::prefix(prefix.clone().into_bytes()).validate()?;
    let store = connect(&conn).await?;
    let scan = store.scan_prefix(prefix.as_bytes()).await?;
    let mut out = std::io::stdout().lock();
    for (k, v) in &scan.entries {
        match output {
            Output::Simple => {
                let _ = out.write_all(k);
                let _ = out.write_all(b"\n");
                let _ = out.write_all(v);
                let _ = out.write_all(b"\n");
            }
            Output::Json => {
                let line = output::entry(k, v, &[("revision", scan.revision.into())]);
                let _ = writeln!(out, "{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn put(
    key: String,
    value: Option<String>,
    file: Option<PathBuf>,
    ttl: Option<u64>,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    let value = read_input(value, file, "cannot read value file")?;
    dcoord::keys::validate_key(key.as_bytes())?;
    dcoord::keys::validate_value(key.as_bytes(), &value)?;
    let store = connect(&conn).await?;
    match ttl {
        Some(secs) => {
            store
                .put_with_ttl(key.as_bytes(), &value, Duration::from_secs(secs))
                .await?
        }
        None => store.put(key.as_bytes(), &value).await?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn del(key: String, conn: Conn) -> dcoord::Result<ExitCode> {
    dcoord::keys::validate_key(key.as_bytes())?;
    let store = connect(&conn).await?;
    store.delete(key.as_bytes()).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(
    key: String,
    prefix: bool,
    count: Option<usize>,
    output: Output,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    let target = if prefix {
        WatchTarget::prefix(key.into_bytes())
    } else {
        WatchTarget::key(key.into_bytes())
    };
    target.validate()?;
    let store = connect(&conn).await?;
    let mut stream = store.watch(target, false).await?;
    eprintln!("dcoord: watching (Ctrl-C to stop)");
    let mut seen = 0;
    while let Some(item) = stream.next().await {
        let ev = item?;
        let kind = match ev.kind {
            EventKind::Put => "PUT",
            EventKind::Delete => "DELETE",
        };
        match output {
            Output::Simple => println!(
                "{}\t{kind}\t{}\t{}",
                ev.revision,
                String::from_utf8_lossy(&ev.key),
                String::from_utf8_lossy(&ev.value)
            ),
            Output::Json => output::json_line(&output::entry(
                &ev.key,
                &ev.value,
                &[("revision", ev.revision.into()), ("kind", kind.into())],
            )),
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
