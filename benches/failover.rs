//! Leader failover probe: N leader SIGKILLs in a row on a local 3-node cluster, each timed from
//! the kill to the first acknowledged write through ONE long-lived `RemoteStore`.
//!
//! `cargo bench --bench failover -- --kills 30 --hog 2`
//!
//! - `--kills N` (default 30): leader kills. After each recovery the killed node is restarted
//!   and the cluster is ready again (every node serves one leader) before the next kill.
//! - `--hog N` (default 0): N busy processes (`yes > /dev/null`) beside the cluster for the
//!   whole run, as on a loaded host.
//!
//! For every kill it prints the time to the first acknowledged write and how many terms the
//! recovery took (from the nodes' role-change lines: 1 = one election). Then p50 / p99 / max.
//! A kill that needed more than one term is listed with the nodes' role changes in between.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, ms, pct};
use dcoord::engine::LocalCluster;
use dcoord::store::{RemoteOptions, RemoteStore, Store};

struct Hog(Vec<Child>);

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every node's log as it is now.
fn logs(cluster: &LocalCluster) -> Vec<String> {
    cluster
        .ids()
        .iter()
        .map(|id| {
            std::fs::read_to_string(cluster.dir().join(format!("n{id}/node.log")))
                .unwrap_or_default()
        })
        .collect()
}

/// The highest term any node became leader in, from d-engine's role-change lines.
fn leader_term(logs: &[String]) -> u64 {
    logs.iter()
        .flat_map(|l| l.lines())
        .filter_map(|l| l.split("Candidate → Leader (term ").nth(1))
        .filter_map(|t| t.trim_end_matches(')').parse().ok())
        .max()
        .unwrap_or(0)
}

/// The role-change lines written since `before`.
fn role_changes_since(before: &[String], now: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (b, n)) in before.iter().zip(now).enumerate() {
        for line in n[b.len().min(n.len())..].lines() {
            if line.contains(" → ") || line.contains("ERROR") {
                out.push(format!("n{}: {line}", i + 1));
            }
        }
    }
    out
}

#[tokio::main]
async fn main() {
    let kills: usize = arg("--kills", 30);
    let hogs: usize = arg("--hog", 0);
    let _hog = Hog((0..hogs)
        .map(|_| {
            Command::new("yes")
                .stdout(Stdio::null())
                .spawn()
                .expect("run `yes` as a CPU hog")
        })
        .collect());
    let mut cluster = common::cluster().await;
    let store = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(120)),
    )
    .await
    .unwrap();
    println!("failover: {kills} leader SIGKILLs, 3 nodes, {hogs} CPU hog(s)");
    println!(
        "{:>4}  {:>6}  {:>10}  {:>5}",
        "kill", "leader", "write_ms", "terms"
    );
    let mut samples = Vec::new();
    let mut slow = Vec::new();
    for k in 1..=kills {
        let leader = cluster.wait_ready(Duration::from_secs(120)).await.unwrap();
        store.put(b"/failover/warm", b"1").await.unwrap();
        let before = logs(&cluster);
        let term_before = leader_term(&before);
        cluster.kill(leader).unwrap();
        let killed = Instant::now();
        let value = format!("{k}");
        loop {
            match store.put(b"/failover/k", value.as_bytes()).await {
                Ok(()) => break,
                // A write cut by the kill may be ambiguous; the next one decides.
                Err(e) if e.is_ambiguous() => continue,
                Err(e) => panic!("kill {k}: no write after the kill: {e}"),
            }
        }
        let took = killed.elapsed();
        let now = logs(&cluster);
        let terms = leader_term(&now).saturating_sub(term_before);
        println!("{k:>4}  {leader:>6}  {:>10}  {terms:>5}", ms(took));
        if terms > 1 || took > Duration::from_secs(5) {
            slow.push((k, took, terms, role_changes_since(&before, &now)));
        }
        samples.push(took);
        cluster.restart(leader).unwrap();
    }
    cluster.wait_ready(Duration::from_secs(120)).await.unwrap();
    samples.sort();
    println!(
        "time to first acknowledged write after a leader SIGKILL ({} kills, {hogs} hogs): \
         p50 {} ms  p99 {} ms  max {} ms",
        samples.len(),
        ms(pct(&samples, 0.5)),
        ms(pct(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
    println!(
        "kills that took more than one term or more than 5 s: {}",
        slow.len()
    );
    for (k, took, terms, lines) in slow {
        println!(
            "--- kill {k}: {} ms, {terms} terms; role changes:",
            ms(took)
        );
        for l in lines {
            println!("    {l}");
        }
    }
}
