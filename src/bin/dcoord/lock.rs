//! `lock NAME [-- CMD]`.

use std::process::ExitCode;

use dcoord::Error;

use crate::{Conn, session, shutdown_signal, spawn_command};

pub async fn run(
    name: String,
    lease: u64,
    command: Vec<String>,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    use dcoord::lock::Mutex;

    dcoord::keys::validate_name("lock", &name)?;
    let session = session(&conn, lease).await?;
    let lock = Mutex::new(&session, &name)?;
    let guard = tokio::select! {
        g = lock.acquire() => g?,
        _ = shutdown_signal() => return Ok(ExitCode::from(130)),
    };
    let token = guard.fencing_token();
    println!("{token}");
    eprintln!("dcoord: holding lock {name:?} with fencing token {token}");
    let code = if command.is_empty() {
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        });
        tokio::select! {
            _ = stdin_closed => ExitCode::SUCCESS,
            _ = shutdown_signal() => ExitCode::from(130),
            _ = guard.lost() => {
                eprintln!("dcoord: lock {name:?} lost (lease ran out or taken over)");
                return Ok(ExitCode::from(6));
            }
        }
    } else {
        let mut child = spawn_command(&command, |c| {
            c.env("DCOORD_FENCING_TOKEN", token.to_string())
                .env("DCOORD_LOCK", &name);
        })?;
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Error::Io {
                    what: "cannot wait for the command",
                    path: command[0].clone().into(),
                    source: e,
                })?;
                ExitCode::from(status.code().map_or(5, |c| c as u8))
            }
            _ = shutdown_signal() => {
                let _ = child.kill().await;
                ExitCode::from(130)
            }
            _ = guard.lost() => {
                let _ = child.kill().await;
                eprintln!("dcoord: lock {name:?} lost (lease ran out or taken over); command killed");
                return Ok(ExitCode::from(6));
            }
        }
    };
    guard.release().await?;
    let _ = session.close().await;
    Ok(code)
}
