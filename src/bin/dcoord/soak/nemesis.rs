//! The nemesis: one fault at a time, at random intervals, each healed before the next, its
//! choices drawn from the run's seed.

use std::time::Duration;

use dcoord::engine::LocalCluster;
use dcoord::{Error, Result};
use tokio::time::Instant;

use crate::signal;

use super::bad_input::bad_input;
use super::check::{Fault, Violation};
use super::harness::Soak;
use super::settle::wait_serving;
use super::worker::{Role, now_us};
use super::{SoakArgs, Workers};

/// The nemesis: which faults it may inject, for how long, and its seeded choices.
pub(super) struct Nemesis {
    rng: fastrand::Rng,
    kinds: Vec<&'static str>,
    /// How long the nemesis runs.
    duration: Duration,
    /// Time between a node's recovery and the next node fault.
    node_cooldown: Duration,
    /// Bad-input probes so far.
    probe: u32,
}

impl Nemesis {
    /// The nemesis `args` ask for, its choices drawn from `seed`. Errors on an unknown fault
    /// kind.
    pub(super) fn new(seed: u64, args: &SoakArgs) -> Result<Self> {
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
        Ok(Nemesis {
            rng: fastrand::Rng::with_seed(seed),
            kinds,
            duration: args.duration,
            node_cooldown: Duration::from_secs(args.node_cooldown),
            probe: 0,
        })
    }

    /// One fault at a time, at random intervals, until the duration is over. After each, the
    /// cluster must have a working leader (else the nemesis stops) and, after a node fault,
    /// replicas that agree.
    pub(super) async fn run(&mut self, soak: &mut Soak, cluster: &mut LocalCluster) -> Result<()> {
        let start = Instant::now();
        let mut last_node_heal = Instant::now();
        while start.elapsed() < self.duration {
            tokio::time::sleep(Duration::from_millis(self.rng.u64(500..2500))).await;
            let cooling = last_node_heal.elapsed() < self.node_cooldown;
            let allowed: Vec<&'static str> = self
                .kinds
                .iter()
                .copied()
                .filter(|k| !(cooling && node_fault(k)))
                .collect();
            let Some(&kind) = self.rng.choice(allowed.iter()) else {
                continue;
            };
            let at = now_us();
            let target = self.inject(soak, cluster, kind).await?;
            let target_name = target.clone();
            soak.log_fault(Fault {
                kind,
                target,
                at,
                healed: now_us(),
            });
            if let Err(e) = cluster.wait_for_leader(Duration::from_secs(60)).await {
                soak.violations.push(Violation {
                    invariant: "cluster: a working leader within 60 s of each fault (d-engine itself)",
                    detail: format!("after {kind} on {target_name}: {e}; the nemesis stops here"),
                });
                break;
            }
            if node_fault(kind) {
                last_node_heal = Instant::now();
                soak.replica_checks += 1;
                if let Err(e) = cluster.check_replicas(Duration::from_secs(60)).await {
                    soak.violations.push(Violation {
                        invariant: "cluster: replicas agree after each heal (d-engine itself)",
                        detail: format!("after {kind} on {target_name}: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Injects one fault of `kind` and heals it. Returns what it hit: a node id, a worker's
    /// name, or what the bad-input probe sent.
    async fn inject(
        &mut self,
        soak: &mut Soak,
        cluster: &mut LocalCluster,
        kind: &'static str,
    ) -> Result<String> {
        let rng = &mut self.rng;
        match kind {
            "kill-leader" | "kill-follower" => {
                kill_node(cluster, rng, kind, &mut soak.violations).await
            }
            "pause-node" => pause_node(cluster, rng).await,
            "kill-lock-worker" | "kill-consumer" | "kill-watcher" | "kill-elector"
            | "kill-permit-worker" => {
                let role = match kind {
                    "kill-lock-worker" => Role::Lock,
                    "kill-consumer" => Role::Consumer,
                    "kill-elector" => Role::Elector,
                    "kill-permit-worker" => Role::Permit,
                    _ => Role::Watcher,
                };
                kill_worker(&mut soak.workers, rng, role).await
            }
            "pause-lock-worker" | "pause-consumer" | "pause-elector" | "pause-permit-worker" => {
                let role = match kind {
                    "pause-lock-worker" => Role::Lock,
                    "pause-elector" => Role::Elector,
                    "pause-permit-worker" => Role::Permit,
                    _ => Role::Consumer,
                };
                pause_worker(&soak.workers, rng, role).await
            }
            _ => {
                self.probe += 1;
                Ok(bad_input(
                    &soak.session,
                    &soak.queue,
                    &*soak.store,
                    self.probe,
                    &soak.record,
                    rng,
                    &mut soak.violations,
                )
                .await)
            }
        }
    }
}

/// Whether a fault of `kind` hits a node (and so waits out the node cool-down).
fn node_fault(kind: &str) -> bool {
    matches!(kind, "kill-leader" | "kill-follower" | "pause-node")
}

/// SIGKILLs the leader (`kill-leader`) or a follower, restarts it after 1-3 s, and waits until
/// it serves again. Returns its id.
async fn kill_node(
    cluster: &mut LocalCluster,
    rng: &mut fastrand::Rng,
    kind: &str,
    violations: &mut Vec<Violation>,
) -> Result<String> {
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await?;
    let id = if kind == "kill-leader" {
        leader
    } else {
        let others: Vec<u32> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
        others[rng.usize(..others.len())]
    };
    cluster.kill(id)?;
    tokio::time::sleep(Duration::from_millis(rng.u64(1000..3000))).await;
    cluster.restart(id)?;
    if let Err(e) = wait_serving(cluster, id).await {
        violations.push(Violation {
            invariant: "cluster: a restarted node serves again",
            detail: format!("node {id}: {e}"),
        });
    }
    Ok(id.to_string())
}

/// SIGSTOPs a node and SIGCONTs it 1-4 s later. Returns its id.
async fn pause_node(cluster: &mut LocalCluster, rng: &mut fastrand::Rng) -> Result<String> {
    let ids = cluster.ids();
    let id = ids[rng.usize(..ids.len())];
    cluster.pause(id)?;
    tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
    cluster.resume(id)?;
    Ok(id.to_string())
}

/// SIGKILLs a worker of `role` and starts its next incarnation. Returns the killed one's name.
async fn kill_worker(workers: &mut Workers, rng: &mut fastrand::Rng, role: Role) -> Result<String> {
    let of = workers.of(role);
    let i = of[rng.usize(..of.len())];
    workers.kill_and_restart(i).await
}

/// SIGSTOPs a worker of `role` for longer than its lease, then SIGCONTs it. Returns its name.
async fn pause_worker(workers: &Workers, rng: &mut fastrand::Rng, role: Role) -> Result<String> {
    let of = workers.of(role);
    let i = of[rng.usize(..of.len())];
    let name = workers.procs[i].name.clone();
    if let Some(pid) = workers.pid(i) {
        signal(pid, "STOP")?;
        tokio::time::sleep(workers.lease + Duration::from_millis(rng.u64(500..2000))).await;
        signal(pid, "CONT")?;
    }
    Ok(name)
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
    "kill-elector",
    "pause-elector",
    "kill-permit-worker",
    "pause-permit-worker",
    "bad-input",
];
