//! The soak run: the cluster and the workers up, the nemesis, heal and drain, the checks, and
//! the summary.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use dcoord::config::{ConfigOptions, ConfigWatch, Source};
use dcoord::engine::{ClusterOptions, LocalCluster};

use crate::signal;
use dcoord::queue::{QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{RemoteOptions, RemoteStore, Store};
use dcoord::{Error, Result};
use tokio::sync::watch;
use tokio::time::Instant;

use super::bad_input::bad_input;
use super::check::{self, Ev, Fault, Violation};
use super::load::{count, produce, publish_final, write_config};
use super::settle::{drain, settle_config, wait_ready, wait_serving};
use super::worker::{Role, SoakConfig, now_us};
use super::{CONFIG_KEY, QUEUE, Record, SoakArgs, Workers, read_histories};

/// Takeover bound beyond the lease: detection rounding, a relist, scheduling on busy cores.
const TAKEOVER_SLACK: Duration = Duration::from_secs(10);
/// How soon every watcher must hold the value written before a fault's heal.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(20);

fn io_error(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
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
