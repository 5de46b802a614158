//! `lock::Mutex` cost, embedded and on a local 3-node cluster, in one run: raw CAS latency (the
//! limit), uncontended acquire+release, and 8 contenders (acquisitions/s, handoff latency from
//! the release call to the next holder's acquire returning, fairness). Prints markdown tables.
//!
//! Run: `cargo bench --bench lock` (optionally `-- --ops 1000 --secs 5`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use dcoord::engine::EmbeddedNode;
use dcoord::lock::Mutex;
use dcoord::session::{Session, SessionOptions};
use dcoord::store::Store;

struct Report {
    setup: &'static str,
    cas: Vec<Duration>,
    uncontended: Vec<Duration>,
    rate: f64,
    handoff: Vec<Duration>,
    fairness: (usize, usize),
    conflicts_per_grant: f64,
}

async fn run(setup: &'static str, store: Arc<dyn Store>, ops: usize, secs: u64) -> Report {
    let ns = format!("/bench/{}/", uuid::Uuid::new_v4().simple());
    let key = format!("{ns}cas");
    store.put(key.as_bytes(), b"0").await.unwrap();
    let session = Session::start(store.clone(), SessionOptions::default())
        .await
        .unwrap();
    let lock = Mutex::new(&session, "bench-uncontended").unwrap();
    // warm-up
    for _ in 0..50 {
        lock.acquire().await.unwrap().release().await.unwrap();
    }
    // Raw CAS and uncontended acquire+release, interleaved.
    let (mut cas, mut unc) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
    for i in 0..ops {
        let (old, new) = (i.to_string(), (i + 1).to_string());
        let t = Instant::now();
        assert!(
            store
                .compare_and_swap(key.as_bytes(), Some(old.as_bytes()), new.as_bytes())
                .await
                .unwrap()
        );
        cas.push(t.elapsed());
        let t = Instant::now();
        lock.acquire().await.unwrap().release().await.unwrap();
        unc.push(t.elapsed());
    }
    cas.sort();
    unc.sort();

    // 8 contenders, each with its own session.
    let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let released_at: Arc<StdMutex<Option<Instant>>> = Arc::new(StdMutex::new(None));
    let handoffs = Arc::new(StdMutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, name, released_at, handoffs) = (
            store.clone(),
            name.clone(),
            released_at.clone(),
            handoffs.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let session = Session::start(store, SessionOptions::default())
                .await
                .unwrap();
            let lock = Mutex::new(&session, &name).unwrap();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let g = lock.acquire().await.unwrap();
                if let Some(at) = released_at.lock().unwrap().take() {
                    handoffs.lock().unwrap().push(at.elapsed());
                }
                n += 1;
                *released_at.lock().unwrap() = Some(Instant::now());
                g.release().await.unwrap();
            }
            (n, lock.stats())
        }));
    }
    let started = Instant::now();
    let mut counts = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (n, c) = t.await.unwrap();
        counts.push(n);
        conflicts += c.conflicts;
    }
    let elapsed = started.elapsed();
    let total: usize = counts.iter().sum();
    let mut handoff = handoffs.lock().unwrap().clone();
    handoff.sort();
    Report {
        setup,
        cas,
        uncontended: unc,
        rate: total as f64 / elapsed.as_secs_f64(),
        handoff,
        fairness: (*counts.iter().min().unwrap(), *counts.iter().max().unwrap()),
        conflicts_per_grant: conflicts as f64 / total as f64,
    }
}

#[tokio::main]
async fn main() {
    init_logs();
    let ops = arg("--ops", 1000) as usize;
    let secs = arg("--secs", 5);
    let mut reports = Vec::new();

    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    reports.push(run("embedded", node.dyn_store(), ops, secs).await);
    node.stop().await.unwrap();

    let cluster = common::cluster().await;
    let store = cluster.store().await.unwrap();
    reports.push(run("3-node gRPC", Arc::new(store), ops, secs).await);
    drop(cluster);

    println!(
        "\n| setup | raw CAS p50 / p99 ms | acquire+release p50 / p99 ms | ratio to CAS (p50) |"
    );
    println!("|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} / {} | {} / {} | {:.2}x |",
            r.setup,
            ms(pct(&r.cas, 0.5)),
            ms(pct(&r.cas, 0.99)),
            ms(pct(&r.uncontended, 0.5)),
            ms(pct(&r.uncontended, 0.99)),
            pct(&r.uncontended, 0.5).as_secs_f64() / pct(&r.cas, 0.5).as_secs_f64()
        );
    }
    println!(
        "\n| setup | 8 contenders: acquisitions/s | raw sequential CAS/s | ratio | handoff p50 / p99 ms | fairness min / max | CAS conflicts per grant |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &reports {
        let mean_cas = r.cas.iter().sum::<Duration>().as_secs_f64() / r.cas.len() as f64;
        let cas_rate = 1.0 / mean_cas;
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {} / {} | {} / {} | {:.2} |",
            r.setup,
            r.rate,
            cas_rate,
            r.rate / cas_rate,
            ms(pct(&r.handoff, 0.5)),
            ms(pct(&r.handoff, 0.99)),
            r.fairness.0,
            r.fairness.1,
            r.conflicts_per_grant
        );
    }
}
