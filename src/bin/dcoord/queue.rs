//! `queue enqueue | consume | stats | dead | redrive`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use dcoord::Error;

use dcoord::queue::Delivery;

use crate::output::Output;
use crate::process::{Supervised, check_runnable};
use crate::{Conn, read_input, session, shutdown_signal};

/// The session lease of the queue commands that only read or add (consume has --lease).
const DEFAULT_LEASE: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum QueueOp {
    /// Add a message; prints its id.
    #[command(visible_alias = "push")]
    Enqueue {
        /// The queue name.
        name: String,
        /// The payload (or use --file).
        #[arg(required_unless_present = "file")]
        payload: Option<String>,
        /// Read the payload from this file.
        #[arg(long, conflicts_with = "payload")]
        file: Option<PathBuf>,
        /// Message id (enqueue is idempotent by id).
        #[arg(long)]
        id: Option<String>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Not visible before this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Take messages: run the command for each (payload on stdin, $DCOORD_MESSAGE_ID and
    /// $DCOORD_ATTEMPT set; exit 0 acks, anything else retries), or print payloads and ack.
    /// The command runs in a process group of its own. Ctrl-C / SIGTERM: the running command
    /// finishes and its message is acked or retried, then dcoord exits (130 / 143); a second
    /// one stops the command (SIGTERM, SIGKILL after --kill-after) and gives its message back
    /// without counting the attempt. If dcoord dies, the command's group is stopped too.
    #[command(visible_alias = "pop")]
    Consume {
        /// The queue name.
        name: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// How long without a heartbeat before this consumer's messages are redelivered (e.g.
        /// 10s; a bare number is seconds).
        #[arg(long, default_value = "10s", value_parser = crate::duration)]
        lease: Duration,
        /// Grace between SIGTERM and SIGKILL when a command is stopped (e.g. 2s, 500ms).
        #[arg(long, value_parser = crate::duration, default_value = "2s")]
        kill_after: Duration,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print message counts.
    Stats {
        /// The queue name.
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the dead letters (id, attempts, error).
    #[command(visible_alias = "dlq")]
    Dead {
        /// The queue name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a dead letter back into the queue.
    Redrive {
        /// The queue name.
        name: String,
        /// The message id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn run(op: QueueOp) -> dcoord::Result<ExitCode> {
    use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};

    let open = |name: String, conn: Conn, lease: Duration| async move {
        dcoord::keys::validate_name("queue", &name)?;
        let session = session(&conn, lease).await?;
        let q = WorkQueue::open(&session, &name, QueueOptions::default()).await?;
        Ok::<_, Error>((session, q))
    };
    match op {
        QueueOp::Enqueue {
            name,
            payload,
            file,
            id,
            priority,
            delay_ms,
            conn,
        } => {
            let payload = read_input(payload, file, "cannot read payload file")?;
            if let Some(id) = &id {
                dcoord::keys::validate_name("message id", id)?;
            }
            // A producer: no session, no mirror of the queue.
            let store: std::sync::Arc<dyn dcoord::store::Store> =
                std::sync::Arc::new(crate::connect(&conn).await?);
            let producer = dcoord::queue::Producer::with_root(store, &conn.root, &name)?;
            let mut options = EnqueueOptions::default()
                .priority(priority)
                .delay(Duration::from_millis(delay_ms));
            if let Some(id) = id {
                options = options.id(id);
            }
            println!("{}", producer.enqueue(&payload, options).await?);
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Consume {
            name,
            count,
            lease,
            kill_after,
            command,
            conn,
        } => {
            if !command.is_empty()
                && let Err(code) = check_runnable(&command)
            {
                return Ok(ExitCode::from(code));
            }
            let (session, q) = open(name, conn, lease).await?;
            let mut done = 0usize;
            let mut stopping = None;
            while stopping.is_none() && count.is_none_or(|c| done < c) {
                let d = tokio::select! {
                    d = q.next() => d?,
                    code = shutdown_signal() => {
                        stopping = Some(code);
                        break;
                    }
                };
                if command.is_empty() {
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(d.payload());
                    let _ = out.write_all(b"\n");
                    d.ack().await?;
                } else {
                    match handle(&command, kill_after, d).await? {
                        Handled::Done => {}
                        Handled::Finished(code) | Handled::Stopped(code) => stopping = Some(code),
                    }
                }
                done += 1;
            }
            let _ = session.close().await;
            Ok(ExitCode::from(stopping.unwrap_or(0)))
        }
        QueueOp::Stats { name, output, conn } => {
            let (session, q) = open(name.clone(), conn, DEFAULT_LEASE).await?;
            let s = q.stats();
            match output {
                Output::Simple => println!(
                    "ready {} delayed {} in_flight {} dead {} done {} undecodable {}",
                    s.ready, s.delayed, s.in_flight, s.dead, s.done, s.undecodable
                ),
                Output::Json => crate::output::json_line(&serde_json::json!({
                    "queue": name,
                    "ready": s.ready,
                    "delayed": s.delayed,
                    "in_flight": s.in_flight,
                    "dead": s.dead,
                    "done": s.done,
                    "undecodable": s.undecodable,
                })),
            }
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Dead { name, conn } => {
            let (session, q) = open(name, conn, DEFAULT_LEASE).await?;
            for d in q.dead_letters().await? {
                println!("{}\t{}\t{}", d.id, d.attempts, d.error);
            }
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Redrive { name, id, conn } => {
            let (session, q) = open(name, conn, DEFAULT_LEASE).await?;
            let moved = q.redrive(&id).await?;
            let _ = session.close().await;
            if moved {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("dcoord: {id:?} is not a dead letter");
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// How one message's command went.
enum Handled {
    /// Acked or retried; go on.
    Done,
    /// Acked or retried, and a stop signal came meanwhile: exit with this code.
    Finished(u8),
    /// Stopped by a second signal: the message was given back, its attempt not counted.
    Stopped(u8),
}

/// Runs `command` for one message: exit 0 acks, anything else retries. A first stop signal
/// lets the command finish; a second stops it and gives the message back.
async fn handle(command: &[String], kill_after: Duration, d: Delivery) -> dcoord::Result<Handled> {
    let mut child = Supervised::spawn(command, kill_after, |c| {
        c.env("DCOORD_MESSAGE_ID", d.id())
            .env("DCOORD_ATTEMPT", d.attempt().to_string())
            .stdin(std::process::Stdio::piped());
    })?;
    if let Some(mut stdin) = child.stdin() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(d.payload()).await;
    }
    let mut signalled = None;
    let code = loop {
        tokio::select! {
            code = child.wait() => break code,
            code = shutdown_signal() => match signalled {
                None => {
                    eprintln!("dcoord: stopping after message {:?} (again to stop it now)", d.id());
                    signalled = Some(code);
                }
                Some(_) => {
                    child.stop(kill_after).await;
                    // Ready again, the attempt not counted; awaited, so it lands before the
                    // session closes (a failed one is redelivered after the lease).
                    let _ = d.give_back().await;
                    return Ok(Handled::Stopped(code));
                }
            },
        }
    };
    if code == 0 {
        d.ack().await?;
    } else {
        d.nack(&format!("command exited with code {code}")).await?;
    }
    Ok(signalled.map_or(Handled::Done, Handled::Finished))
}
