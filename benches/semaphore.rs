//! `semaphore::Semaphore` under contention, embedded and on a local 3-node cluster, in one run:
//! 16 contenders (each with its own session) take 1 of 4 permits and give it back, in a loop.
//! Prints grants/s, the time from a release call to the next grant, and how evenly the grants
//! went. The same workload as bench-etcd's (h), without etcd, for profiling.
//!
//! Run: `cargo bench --bench semaphore` (optionally `-- --secs 5 --permits 4 --contenders 16`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use dcoord::engine::EmbeddedNode;
use dcoord::semaphore::Semaphore;
use dcoord::session::{Session, SessionOptions};
use dcoord::store::Store;

struct Report {
    setup: &'static str,
    rate: f64,
    handoff: Vec<Duration>,
    fairness: (usize, usize),
}

#[derive(Default)]
struct Shared {
    inside: u64,
    releases: VecDeque<Instant>,
    handoffs: Vec<Duration>,
}

async fn run(setup: &'static str, store: Arc<dyn Store>, secs: u64) -> Report {
    let permits: u64 = arg("--permits", 4);
    let contenders: usize = arg("--contenders", 16);
    let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let shared = Arc::new(StdMutex::new(Shared::default()));
    let mut sessions = Vec::new();
    for _ in 0..contenders {
        sessions.push(
            Session::start(store.clone(), SessionOptions::default())
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for session in sessions {
        let (name, shared) = (name.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let sem = Semaphore::new(&session, &name, permits).unwrap();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let p = sem.acquire(1).await.unwrap();
                {
                    let mut s = shared.lock().unwrap();
                    s.inside += 1;
                    assert!(s.inside <= permits, "more than {permits} holders");
                    if let Some(at) = s.releases.pop_front() {
                        s.handoffs.push(at.elapsed());
                    }
                    s.inside -= 1;
                    s.releases.push_back(Instant::now());
                }
                p.release().await.unwrap();
                n += 1;
            }
            session.close().await.unwrap();
            n
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let mut handoff = std::mem::take(&mut shared.lock().unwrap().handoffs);
    handoff.sort();
    Report {
        setup,
        rate: counts.iter().sum::<usize>() as f64 / elapsed.as_secs_f64(),
        handoff,
        fairness: (*counts.iter().min().unwrap(), *counts.iter().max().unwrap()),
    }
}

#[tokio::main]
async fn main() {
    init_logs();
    let secs = arg("--secs", 5);
    let only: String = arg("--only", "both".to_string());
    let mut reports = Vec::new();

    if only != "cluster" {
        let dir = tempfile::tempdir().unwrap();
        let node = EmbeddedNode::start(dir.path()).await.unwrap();
        reports.push(run("embedded", node.dyn_store(), secs).await);
        node.stop().await.unwrap();
    }
    if only != "embedded" {
        let cluster = common::cluster().await;
        let store = cluster.store().await.unwrap();
        reports.push(run("3-node gRPC", Arc::new(store), secs).await);
        drop(cluster);
    }

    println!("\n| setup | grants/s | release → next grant p50 / p99 ms | fewest / most grants |");
    println!("|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {:.0} | {} / {} | {} / {} |",
            r.setup,
            r.rate,
            ms(pct(&r.handoff, 0.5)),
            ms(pct(&r.handoff, 0.99)),
            r.fairness.0,
            r.fairness.1
        );
    }
}
