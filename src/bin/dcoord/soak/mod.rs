//! `dcoord soak`: lock, queue and config under a nemesis, with invariant checkers (part of the
//! `dcoord` binary, not of the library).
//!
//! The harness starts a 3-node cluster as child processes and client processes
//! (`dcoord soak-worker`): 3 lock workers, 2 queue consumers, 2 config watchers. In-process it
//! enqueues messages (some poison, some undecodable) and publishes config values. A nemesis
//! injects one fault at a time, at random intervals: SIGKILL and restart of the leader or a
//! follower, SIGSTOP/SIGCONT of a node, SIGKILL or SIGSTOP (past the lease) of a lock worker,
//! a consumer or a watcher, and bad input (garbage bytes in recipe keys, an oversized payload,
//! invalid names). Every worker records its history; at the end the checkers in [`check`] read
//! it all and print a summary. Exit status 1 on any violation, with the history that shows it.
//!
//! What it checks is listed on [`check::check_lock`], [`check::check_queue`] and
//! [`check::check_config`], plus: bad input is refused with a clear error and leaves nothing
//! behind, and every node holds the same state after each node fault's heal and at the end
//! ([`dcoord::engine::replica`]: compared by state digest at every index all nodes remember,
//! while the workers keep writing).

pub mod check;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use dcoord::config::{ConfigOptions, ConfigWatch, Source};
use dcoord::engine::{ClusterOptions, LocalCluster, signal};
use dcoord::lock::Mutex;
use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{Consistency, RemoteOptions, RemoteStore, Store};
use dcoord::{Error, Result};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;

use check::{Ev, Fault, Line, QueueFacts, Violation};
use worker::{Job, Role, SoakConfig, now_us};

/// The lock the workers contend for.
pub const LOCK: &str = "soak";
/// The fenced register the lock holders write.
pub const REGISTER: &str = "/soak/register";
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
    /// kill-watcher, bad-input.
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

/// Takeover bound beyond the lease: detection rounding, a relist, scheduling on busy cores.
const TAKEOVER_SLACK: Duration = Duration::from_secs(10);
/// How soon every watcher must hold the value written before a fault's heal.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(20);

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

fn io_error(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
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

/// The longest the store may go without acknowledging a write, faults included.
const STALL_BOUND: Duration = Duration::from_secs(60);

/// Runs the soak and prints its summary. Exit status 1 on a violation.
pub async fn run(args: SoakArgs) -> Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let lease = Duration::from_secs(args.lease.max(1));
    let (tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| io_error("cannot create", d, e))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("dcoord-soak-")
                .tempdir()
                .map_err(|e| io_error("cannot create a temp dir in", &std::env::temp_dir(), e))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let exe = dcoord::engine::dcoord_binary()?;
    let kinds: Vec<&'static str> = if args.faults.is_empty() {
        KINDS.to_vec()
    } else {
        let mut kinds = Vec::new();
        for f in &args.faults {
            match KINDS.iter().find(|k| **k == f.as_str()) {
                Some(k) => kinds.push(*k),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown fault kind {f:?}; known: {}",
                        KINDS.join(", ")
                    )));
                }
            }
        }
        kinds
    };
    eprintln!(
        "soak: {:?} of faults, seed {seed}, lease {lease:?}, dir {}",
        args.duration,
        dir.display()
    );

    let mut cluster = LocalCluster::start(
        ClusterOptions::default()
            .nodes(3)
            .dir(dir.join("cluster"))
            .binary(&exe),
    )
    .await?;
    let endpoints = cluster.endpoints();
    let remote = RemoteStore::connect(
        &endpoints,
        RemoteOptions::default().op_deadline(Duration::from_secs(60)),
    )
    .await?;
    let store: Arc<dyn Store> = Arc::new(remote.clone());
    // The harness's own session (producer, probes) must outlive every fault it injects.
    let session = Session::start(
        store.clone(),
        SessionOptions::default().lease(Duration::from_secs(60)),
    )
    .await?;
    let queue = WorkQueue::open(&session, QUEUE, QueueOptions::default()).await?;
    let config = Arc::new(
        ConfigWatch::<SoakConfig>::open(
            store.clone(),
            Source::key(CONFIG_KEY),
            ConfigOptions::default(),
        )
        .await?,
    );
    config.publish(&SoakConfig { n: 1 }).await?;
    let record = Arc::new(StdMutex::new(Record {
        writes: vec![(1, now_us())],
        max_attempted: 1,
        ..Record::default()
    }));

    let mut workers = Workers {
        exe: exe.clone(),
        dir: dir.clone(),
        endpoints: endpoints.clone(),
        lease,
        procs: Vec::new(),
        histories: Vec::new(),
    };
    for i in 0..3 {
        workers.start(Role::Lock, &format!("lock-{i}"))?;
    }
    for i in 0..2 {
        workers.start(Role::Consumer, &format!("consumer-{i}"))?;
        workers.start(Role::Watcher, &format!("watch-{i}"))?;
    }
    wait_ready(&workers.histories, Duration::from_secs(120)).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let producer = tokio::spawn(produce(queue.clone(), stop_rx.clone(), record.clone()));
    let writer = tokio::spawn(write_config(
        config.clone(),
        stop_rx.clone(),
        record.clone(),
    ));
    let counter = tokio::spawn(count(remote.clone(), stop_rx, record.clone()));

    // The nemesis.
    let mut faults: Vec<Fault> = Vec::new();
    let mut violations: Vec<Violation> = Vec::new();
    let start = Instant::now();
    let mut probe = 0u32;
    let mut last_node_heal = Instant::now();
    let mut replica_checks = 0u32;
    while start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
        let node_fault = |k: &str| matches!(k, "kill-leader" | "kill-follower" | "pause-node");
        let cooling = last_node_heal.elapsed() < Duration::from_secs(args.node_cooldown);
        let allowed: Vec<&'static str> = kinds
            .iter()
            .copied()
            .filter(|k| !(cooling && node_fault(k)))
            .collect();
        let Some(&kind) = rng.choice(allowed.iter()) else {
            continue;
        };
        let at = now_us();
        let target = match kind {
            "kill-leader" | "kill-follower" => {
                let leader = cluster.wait_for_leader(Duration::from_secs(60)).await?;
                let id = if kind == "kill-leader" {
                    leader
                } else {
                    let others: Vec<u32> =
                        cluster.ids().into_iter().filter(|&i| i != leader).collect();
                    others[rng.usize(..others.len())]
                };
                cluster.kill(id)?;
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..3000))).await;
                cluster.restart(id)?;
                if let Err(e) = wait_serving(&cluster, id).await {
                    violations.push(Violation {
                        invariant: "cluster: a restarted node serves again",
                        detail: format!("node {id}: {e}"),
                    });
                }
                id.to_string()
            }
            "pause-node" => {
                let ids = cluster.ids();
                let id = ids[rng.usize(..ids.len())];
                cluster.pause(id)?;
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                cluster.resume(id)?;
                id.to_string()
            }
            "kill-lock-worker" | "kill-consumer" | "kill-watcher" => {
                let role = match kind {
                    "kill-lock-worker" => Role::Lock,
                    "kill-consumer" => Role::Consumer,
                    _ => Role::Watcher,
                };
                let of = workers.of(role);
                let i = of[rng.usize(..of.len())];
                workers.kill_and_restart(i).await?
            }
            "pause-lock-worker" | "pause-consumer" => {
                let role = if kind == "pause-lock-worker" {
                    Role::Lock
                } else {
                    Role::Consumer
                };
                let of = workers.of(role);
                let i = of[rng.usize(..of.len())];
                let name = workers.procs[i].name.clone();
                if let Some(pid) = workers.pid(i) {
                    signal(pid, "STOP")?;
                    tokio::time::sleep(lease + Duration::from_millis(rng.u64(500..2000))).await;
                    signal(pid, "CONT")?;
                }
                name
            }
            _ => {
                probe += 1;
                bad_input(
                    &session,
                    &queue,
                    &*store,
                    probe,
                    &record,
                    &mut rng,
                    &mut violations,
                )
                .await
            }
        };
        let target_name = target.clone();
        let fault = Fault {
            kind,
            target,
            at,
            healed: now_us(),
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("faults.log"))
        {
            use std::io::Write;
            let _ = writeln!(
                f,
                "{} {} {} {}",
                fault.at, fault.healed, fault.kind, fault.target
            );
        }
        faults.push(fault);
        if let Err(e) = cluster.wait_for_leader(Duration::from_secs(60)).await {
            violations.push(Violation {
                invariant: "cluster: a working leader within 60 s of each fault (d-engine itself)",
                detail: format!("after {kind} on {target_name}: {e}; the nemesis stops here"),
            });
            break;
        }
        if node_fault(kind) {
            last_node_heal = Instant::now();
            replica_checks += 1;
            if let Err(e) = cluster.check_replicas(Duration::from_secs(60)).await {
                violations.push(Violation {
                    invariant: "cluster: replicas agree after each heal (d-engine itself)",
                    detail: format!("after {kind} on {target_name}: {e}"),
                });
            }
        }
    }

    // Heal and drain.
    let _ = stop_tx.send(true);
    let _ = producer.await;
    let _ = writer.await;
    let _ = counter.await;
    let final_n = record.lock().unwrap().max_attempted + 1;
    if let Err(e) = publish_final(&config, final_n, &record).await {
        violations.push(Violation {
            invariant: "cluster: writable after the faults (d-engine itself)",
            detail: format!("the final config write failed for 60 s: {e}"),
        });
    }
    let drained = drain(&*store, &queue, &record, Duration::from_secs(120)).await;
    settle_config(&workers.histories, final_n, Duration::from_secs(30)).await;
    let end = now_us();
    replica_checks += 1;
    let final_replicas = match cluster.check_replicas(Duration::from_secs(60)).await {
        Ok(report) => report.to_string(),
        Err(e) => {
            violations.push(Violation {
                invariant: "cluster: replicas agree at the end (d-engine itself)",
                detail: e.to_string(),
            });
            format!("FAILED: {e}")
        }
    };
    workers.stop_all().await;
    drop(cluster);

    // Check.
    let lines = read_histories(&workers.histories);
    let rec = record.lock().unwrap();
    let takeover_bound = (lease + TAKEOVER_SLACK).as_micros() as u64;
    let lock = check::check_lock(&lines, &faults, takeover_bound, end, &mut violations);
    let q = check::check_queue(&lines, &rec.facts, &mut violations);
    let cfg = check::check_config(
        &lines,
        &rec.writes,
        final_n,
        &faults,
        CONVERGENCE_BOUND.as_micros() as u64,
        final_n,
        &mut violations,
    );
    let (stall_us, stall_end) = rec.longest_stall;
    if stall_us > STALL_BOUND.as_micros() as u64 {
        violations.push(Violation {
            invariant: "store: acknowledges writes again within 60 s of any fault",
            detail: format!(
                "no acknowledged write for {:.1} s, until {stall_end}",
                stall_us as f64 / 1e6
            ),
        });
    }
    for (at, detail) in &rec.regressions {
        violations.push(Violation {
            invariant: "store: an acknowledged write never goes backwards (d-engine itself)",
            detail: format!("at {at}: {detail}"),
        });
    }
    if let Err(e) = drained {
        violations.push(Violation {
            invariant: "queue: drains after the faults",
            detail: e,
        });
    }

    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &faults {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    let errors = lines
        .iter()
        .filter(|l| matches!(l.ev, Ev::Error { .. }))
        .count();
    println!(
        "\n## dcoord soak: {:?} of faults, seed {seed}, lease {lease:?}\n",
        args.duration
    );
    println!("| recipe | operations | checked |");
    println!("| --- | --- | --- |");
    println!(
        "| lock | {} grants, {} fenced writes accepted, {} refused | unique tokens, real-time order, fenced register, {} takeovers (worst {:.1} s, bound {:.0} s) |",
        lock.grants,
        lock.fenced_ok,
        lock.fenced_rejected,
        lock.takeovers,
        lock.worst_takeover as f64 / 1e6,
        takeover_bound as f64 / 1e6
    );
    println!(
        "| queue | {} enqueued ({} poison or undecodable), {} deliveries ({} redeliveries), {} effects, {} dead letters | none lost, effects once, dead letters = poison |",
        q.enqueued,
        rec.facts.poison.len(),
        q.deliveries,
        q.redeliveries,
        q.effects,
        q.dead
    );
    println!(
        "| config | {} writes, {} applied by watchers, {} rejected | never backwards, only written values, converged (worst {:.1} s, bound {:.0} s), final = {final_n} |",
        cfg.writes,
        cfg.applied,
        cfg.rejected,
        cfg.worst_convergence as f64 / 1e6,
        CONVERGENCE_BOUND.as_secs_f64()
    );
    println!(
        "\nfaults: {} ({}); recorded operation errors: {errors}; enqueue gave up: {}, config write errors: {}",
        faults.len(),
        by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        rec.enqueue_errors,
        rec.write_errors
    );
    println!(
        "store probe: {} acknowledged counter increments, {} regressions, longest time \
         without an acknowledged write {:.1} s (until {}; bound {STALL_BOUND:?})",
        rec.counter_writes,
        rec.regressions.len(),
        rec.longest_stall.0 as f64 / 1e6,
        rec.longest_stall.1
    );
    println!(
        "replica checks: {replica_checks} (after each node fault's heal and at the end); final: {final_replicas}"
    );
    println!("violations: {}", violations.len());
    let mut by_invariant: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &violations {
        *by_invariant.entry(v.invariant).or_default() += 1;
    }
    for (invariant, n) in &by_invariant {
        println!("  {n} × {invariant}");
    }
    if violations.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for v in violations.iter().take(20) {
        println!("\nVIOLATION {}\n{}", v.invariant, v.detail);
    }
    if let Some(t) = tmp {
        let kept = t.keep();
        println!("\nhistories kept in {}", kept.display());
    }
    Ok(ExitCode::from(1))
}

const KINDS: &[&str] = &[
    "kill-leader",
    "kill-follower",
    "pause-node",
    "kill-lock-worker",
    "pause-lock-worker",
    "kill-consumer",
    "pause-consumer",
    "kill-watcher",
    "bad-input",
];

async fn wait_ready(histories: &[PathBuf], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready: BTreeSet<String> = read_histories(histories)
            .into_iter()
            .filter(|l| l.ev == Ev::Ready)
            .map(|l| l.w)
            .collect();
        if ready.len() >= histories.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable {
                op: "soak",
                message: format!(
                    "only {} of {} workers started within {timeout:?} (see their .log files)",
                    ready.len(),
                    histories.len()
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a restarted node serves requests itself.
async fn wait_serving(cluster: &LocalCluster, id: u32) -> Result<()> {
    let endpoint = cluster.endpoint(id).expect("a known node");
    RemoteStore::connect(
        &[endpoint],
        RemoteOptions::default().op_deadline(Duration::from_secs(90)),
    )
    .await
    .map(|_| ())
}

/// Enqueues a message every ~40 ms (every 50th poison), each retried with its id until it
/// is confirmed (idempotent by id).
async fn produce(q: WorkQueue, stop: watch::Receiver<bool>, record: Arc<StdMutex<Record>>) {
    let mut i = 0u64;
    while !*stop.borrow() {
        let id = format!("m-{i:06}");
        let job = Job {
            i,
            poison: i % 50 == 7,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ok = loop {
            match q
                .enqueue_json(&job, EnqueueOptions::default().id(&id))
                .await
            {
                Ok(_) => break true,
                Err(e) if (e.is_retryable() || e.is_ambiguous()) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    eprintln!("soak: enqueue {id} gave up: {e}");
                    break false;
                }
            }
        };
        {
            let mut r = record.lock().unwrap();
            if ok {
                r.facts.confirmed.insert(id.clone());
                if job.poison {
                    r.facts.poison.insert(id);
                }
            } else {
                r.enqueue_errors += 1;
                r.facts.unconfirmed.insert(id);
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// The store itself, under the same faults: increments a counter with compare-and-swap and
/// checks that no linearizable read ever returns less than a value whose write was
/// acknowledged. A violation here is d-engine's, not a recipe's.
async fn count(store: RemoteStore, stop: watch::Receiver<bool>, record: Arc<StdMutex<Record>>) {
    let key = b"/soak/counter";
    let mut acked = 0u64;
    let mut last_ack = now_us();
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let Ok(current) = store.get(key, Consistency::Linearizable).await else {
            continue;
        };
        let value = current
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        if value < acked {
            let leader = store.leader_id().await;
            let mut r = record.lock().unwrap();
            if r.regressions.len() < 20 {
                r.regressions.push((
                    now_us(),
                    format!("read {value} after {acked} was acknowledged (leader {leader:?})"),
                ));
            }
            acked = value;
            continue;
        }
        let next = (value + 1).to_string();
        if let Ok(true) = store
            .compare_and_swap(key, current.as_deref(), next.as_bytes())
            .await
        {
            acked = value + 1;
            let now = now_us();
            let mut r = record.lock().unwrap();
            r.counter_writes += 1;
            let gap = now.saturating_sub(last_ack);
            if gap > r.longest_stall.0 {
                r.longest_stall = (gap, now);
            }
            last_ack = now;
        }
    }
}

/// Publishes n = 2, 3, ... every ~150 ms.
async fn write_config(
    cfg: Arc<ConfigWatch<SoakConfig>>,
    stop: watch::Receiver<bool>,
    record: Arc<StdMutex<Record>>,
) {
    let mut n = 2;
    while !*stop.borrow() {
        record.lock().unwrap().max_attempted = n;
        match cfg.publish(&SoakConfig { n }).await {
            Ok(()) => record.lock().unwrap().writes.push((n, now_us())),
            Err(_) => record.lock().unwrap().write_errors += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn publish_final(
    cfg: &ConfigWatch<SoakConfig>,
    n: u64,
    record: &StdMutex<Record>,
) -> Result<()> {
    record.lock().unwrap().max_attempted = n;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match cfg.publish(&SoakConfig { n }).await {
            Ok(()) => {
                record.lock().unwrap().writes.push((n, now_us()));
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("soak: final config write failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until every confirmed message has its effect (or, if poison, is a dead letter), and
/// collects the effects and dead letters into the record.
async fn drain(
    store: &dyn Store,
    queue: &WorkQueue,
    record: &StdMutex<Record>,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let effects: BTreeMap<String, String> = match store.scan_prefix(EFFECTS.as_bytes()).await {
            Ok(scan) => scan
                .entries
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k[EFFECTS.len()..]).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let dead: BTreeSet<String> = queue.dead_letters().into_iter().map(|d| d.id).collect();
        let (left, sample) = {
            let mut r = record.lock().unwrap();
            let pending: Vec<String> = r
                .facts
                .confirmed
                .iter()
                .filter(|id| {
                    if r.facts.poison.contains(*id) {
                        !dead.contains(*id)
                    } else {
                        !effects.contains_key(*id)
                    }
                })
                .cloned()
                .collect();
            r.facts.effects = effects;
            r.facts.dead = dead;
            (
                pending.len(),
                pending.into_iter().take(5).collect::<Vec<_>>(),
            )
        };
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{left} messages still unhandled {timeout:?} after the faults stopped, e.g. {sample:?}; queue stats {:?}",
                queue.stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (bounded) until every watcher slot's latest value is `n`; the checker judges.
async fn settle_config(histories: &[PathBuf], n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for l in read_histories(histories) {
            if let Ev::Applied { n, .. } = l.ev {
                last.insert(check::slot(&l.w).to_string(), n);
            }
        }
        let watchers = last.keys().filter(|k| k.starts_with("watch-")).count();
        if watchers == 2 && last.values().all(|&v| v == n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One bad-input probe: each must be refused with a clear error and leave nothing behind.
/// Some probes also add messages the queue must dead-letter.
async fn bad_input(
    session: &Session,
    queue: &WorkQueue,
    store: &dyn Store,
    probe: u32,
    record: &StdMutex<Record>,
    rng: &mut fastrand::Rng,
    out: &mut Vec<Violation>,
) -> String {
    let garbage: Vec<u8> = (0..rng.usize(1..200)).map(|_| rng.u8(..) | 0x80).collect();
    let mut fail = |what: &str, detail: String| {
        out.push(Violation {
            invariant: "bad input: refused with a clear error, nothing half-written",
            detail: format!("{what}: {detail}"),
        })
    };
    match probe % 5 {
        0 => {
            // Invalid names.
            match Mutex::new(session, "no spaces/or slashes") {
                Err(Error::InvalidArgument(_)) => {}
                other => fail("lock name", format!("{other:?}")),
            }
            match WorkQueue::open(session, "bad queue name", QueueOptions::default()).await {
                Err(Error::InvalidArgument(_)) => {}
                other => fail("queue name", format!("{:?}", other.map(|_| ()))),
            }
            "invalid names".into()
        }
        1 => {
            // An oversized payload: refused before anything is written.
            let id = format!("big-{probe}");
            match queue
                .enqueue(&vec![7u8; 2 << 20], EnqueueOptions::default().id(&id))
                .await
            {
                Err(Error::ValueTooLarge { .. }) => {}
                other => fail("oversized enqueue", format!("{other:?}")),
            }
            let key = format!("{QUEUE_MESSAGES}{id}");
            if let Ok(Some(_)) = store.get(key.as_bytes(), Consistency::Linearizable).await {
                fail("oversized enqueue", format!("{key} exists"));
            }
            "oversized payload".into()
        }
        2 => {
            // Garbage in a lock record: a clear error, and the bytes are left alone.
            let key = b"/dcoord/locks/victim/rec";
            if store.put(key, &garbage).await.is_ok() {
                match Mutex::new(session, "victim") {
                    Ok(m) => match m.try_acquire().await {
                        Err(Error::Decode { .. }) => {}
                        other => fail("garbage lock record", format!("{other:?}")),
                    },
                    Err(e) => fail("lock victim", e.to_string()),
                }
                match store.get(key, Consistency::Linearizable).await {
                    Ok(Some(v)) if v[..] == garbage[..] => {}
                    other => fail("garbage lock record was changed", format!("{other:?}")),
                }
            }
            "garbage lock record".into()
        }
        3 => {
            // Garbage over the config value: watchers keep the last good value; the writer's
            // next publish replaces it.
            let _ = store.put(CONFIG_KEY.as_bytes(), &garbage).await;
            "garbage config value".into()
        }
        _ => {
            // A garbage key among the queue's messages, and a message whose payload is not a
            // job: the first is skipped, the second dead-lettered with its decode error.
            let _ = store
                .put(format!("{QUEUE_MESSAGES}junk-{probe}").as_bytes(), &garbage)
                .await;
            let id = format!("undecodable-{probe}");
            match queue
                .enqueue(b"not json at all", EnqueueOptions::default().id(&id))
                .await
            {
                Ok(_) => {
                    let mut r = record.lock().unwrap();
                    r.facts.confirmed.insert(id.clone());
                    r.facts.poison.insert(id);
                }
                Err(e) => {
                    record.lock().unwrap().facts.unconfirmed.insert(id);
                    eprintln!("soak: enqueue of an undecodable message failed: {e}");
                }
            }
            "garbage queue entries".into()
        }
    }
}
