//! `dcoord soak`: lock, queue and config under a nemesis, with invariant checkers (part of the
//! `dcoord` binary, not of the library).
//!
//! The harness starts a 3-node cluster as child processes and client processes
//! (`dcoord soak-worker`): 3 lock workers, 2 queue consumers, 2 config watchers, 2 electors
//! (leader election) and 3 permit workers (a semaphore of 2 permits). In-process it
//! enqueues messages (some poison, some undecodable) and publishes config values. A nemesis
//! injects one fault at a time, at random intervals: SIGKILL and restart of the leader or a
//! follower, SIGSTOP/SIGCONT of a node, SIGKILL or SIGSTOP (past the lease) of a lock worker,
//! a consumer or a watcher, and bad input (garbage bytes in recipe keys, an oversized payload,
//! invalid names). Every worker records its history; at the end the checkers in [`check`] read
//! it all and print a summary. Exit status 1 on any violation, with the history that shows it.
//!
//! What it checks is listed on [`check::check_lock`] (and, for the election, the same
//! invariants per term), [`check::check_semaphore`], [`check::check_queue`] and
//! [`check::check_config`], plus: bad input is refused with a clear error and leaves nothing
//! behind, and every node holds the same state after each node fault's heal and at the end
//! ([`dcoord::engine::replica`]: compared by state digest at every index all nodes remember,
//! while the workers keep writing).

pub mod check;
pub mod worker;

mod bad_input;
mod harness;
mod load;
mod nemesis;
mod settle;

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use crate::signal;
use dcoord::{Error, Result};
use tokio::io::AsyncReadExt;

pub use harness::run;

use check::{Line, QueueFacts};
use worker::Role;

/// The lock the workers contend for.
pub const LOCK: &str = "soak";
/// The fenced register the lock holders write.
pub const REGISTER: &str = "/soak/register";
/// The election the electors campaign in.
pub const ELECTION: &str = "soak";
/// The fenced register the leaders write.
pub const ELECTION_REGISTER: &str = "/soak/leader-register";
/// The semaphore the permit workers share, and its N.
pub const SEMAPHORE: &str = "soak";
pub const PERMITS: u64 = 2;
/// The queue.
pub const QUEUE: &str = "soak";
/// Where consumers record each message's effect (one key per message id).
pub const EFFECTS: &str = "/soak/effects/";
/// The config key.
pub const CONFIG_KEY: &str = "/soak/config";
/// Where the queue keeps its messages (dcoord's default root).
const QUEUE_MESSAGES: &str = "/dcoord/queues/soak/m/";

/// Options of `dcoord soak`.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the nemesis runs (e.g. 90s, 2m, 30m). Checks and draining take up to ~2 min
    /// more.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed of the nemesis's choices (default: random; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the cluster data, histories and worker logs here (default: a temp dir, kept only
    /// when a violation is found).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Session lease of the workers, in seconds: a failed lock holder or consumer is taken
    /// over after about this long.
    #[arg(long, default_value_t = 3)]
    lease: u64,
    /// Only these fault kinds (comma-separated; default all): kill-leader, kill-follower,
    /// pause-node, kill-lock-worker, pause-lock-worker, kill-consumer, pause-consumer,
    /// kill-watcher, kill-elector, pause-elector, kill-permit-worker, pause-permit-worker,
    /// bad-input.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Seconds between a node's recovery and the next node fault (client faults and bad input
    /// go on meanwhile). 0 crashes nodes back to back (stock d-engine 0.2.4 lost acknowledged
    /// writes that way; the store probe reports any loss).
    #[arg(long, default_value_t = 12)]
    node_cooldown: u64,
}

/// Options of the hidden `dcoord soak-worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// What to run.
    #[arg(value_enum)]
    role: Role,
    /// The worker's name (slot#incarnation).
    #[arg(long)]
    name: String,
    /// Cluster endpoints.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The history file to append to.
    #[arg(long)]
    history: PathBuf,
    /// Session lease in milliseconds.
    #[arg(long)]
    lease_ms: u64,
}

/// Runs a worker process until it is killed or its stdin closes (the harness is gone).
pub async fn run_worker(args: WorkerArgs) -> Result<ExitCode> {
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    worker::run(
        args.role,
        &args.name,
        &args.endpoints,
        &args.history,
        Duration::from_millis(args.lease_ms),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// One worker slot and its current process.
struct Proc {
    slot: String,
    role: Role,
    incarnation: u32,
    name: String,
    child: tokio::process::Child,
    _stdin: Option<tokio::process::ChildStdin>,
}

struct Workers {
    exe: PathBuf,
    dir: PathBuf,
    endpoints: Vec<String>,
    lease: Duration,
    procs: Vec<Proc>,
    histories: Vec<PathBuf>,
}

impl Workers {
    fn spawn(&mut self, role: Role, slot: &str, incarnation: u32) -> Result<Proc> {
        let name = format!("{slot}#{incarnation}");
        let history = self.dir.join(format!("{slot}.{incarnation}.jsonl"));
        let log = self.dir.join(format!("{slot}.{incarnation}.log"));
        let out = std::fs::File::create(&log).map_err(|e| Error::Io {
            what: "cannot create worker log",
            path: log.clone(),
            source: e,
        })?;
        let err = out.try_clone().map_err(|e| Error::Io {
            what: "cannot create worker log",
            path: log.clone(),
            source: e,
        })?;
        let role_arg = match role {
            Role::Lock => "lock",
            Role::Consumer => "consumer",
            Role::Watcher => "watcher",
            Role::Elector => "elector",
            Role::Permit => "permit",
        };
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("soak-worker")
            .arg(role_arg)
            .args(["--name", &name, "--endpoints", &self.endpoints.join(",")])
            .arg("--history")
            .arg(&history)
            .args(["--lease-ms", &self.lease.as_millis().to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Io {
                what: "cannot start worker",
                path: self.exe.clone(),
                source: e,
            })?;
        self.histories.push(history);
        let stdin = child.stdin.take();
        Ok(Proc {
            slot: slot.to_string(),
            role,
            incarnation,
            name,
            child,
            _stdin: stdin,
        })
    }

    fn start(&mut self, role: Role, slot: &str) -> Result<()> {
        let p = self.spawn(role, slot, 1)?;
        self.procs.push(p);
        Ok(())
    }

    /// SIGKILLs worker `i` and starts its next incarnation. Returns the killed one's name.
    async fn kill_and_restart(&mut self, i: usize) -> Result<String> {
        let old = &mut self.procs[i];
        let name = old.name.clone();
        if let Some(pid) = old.child.id() {
            let _ = signal(pid, "CONT");
        }
        let _ = old.child.start_kill();
        let _ = old.child.wait().await;
        let (role, slot, inc) = (old.role, old.slot.clone(), old.incarnation + 1);
        self.procs[i] = self.spawn(role, &slot, inc)?;
        Ok(name)
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].child.id()
    }

    fn of(&self, role: Role) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| {
                std::mem::discriminant(&self.procs[i].role) == std::mem::discriminant(&role)
            })
            .collect()
    }

    async fn stop_all(&mut self) {
        for p in &mut self.procs {
            if let Some(pid) = p.child.id() {
                let _ = signal(pid, "CONT");
            }
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
}

fn read_histories(paths: &[PathBuf]) -> Vec<Line> {
    let mut lines = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        lines.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Line>(l).ok()),
        );
    }
    lines.sort_by_key(|l| l.at);
    lines
}

/// What the in-process producer and config writer recorded.
#[derive(Default)]
struct Record {
    facts: QueueFacts,
    enqueue_errors: usize,
    writes: Vec<(u64, u64)>,
    max_attempted: u64,
    write_errors: usize,
    counter_writes: u64,
    regressions: Vec<(u64, String)>,
    /// The longest time without an acknowledged counter increment (µs), and when it ended.
    longest_stall: (u64, u64),
}
