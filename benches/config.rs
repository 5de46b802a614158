//! `config::ConfigWatch` fan-out: write → all N watchers hold the new value, N = 1, 100, 1000,
//! embedded and on a local 3-node cluster, p50/p99, and resident memory per watcher. Watchers
//! in one process share one watch by default; the "own stream" rows give each watcher its own
//! d-engine watch (what N separate processes would cost the server).
//!
//! Run: `cargo bench --bench config` (optionally `-- --writes 200`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dcoord::config::{ConfigOptions, ConfigWatch, Source};
use dcoord::engine::EmbeddedNode;
use dcoord::store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Flags {
    n: u64,
    dark_mode: bool,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn fan_out(
    store: Arc<dyn Store>,
    n: usize,
    shared: bool,
    writes: usize,
) -> (Vec<Duration>, f64) {
    let key = format!("/bench/{}/flags.json", uuid::Uuid::new_v4().simple());
    let before = rss_bytes();
    let seen = Arc::new(AtomicUsize::new(0));
    let target = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(Notify::new());
    let mut watchers = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let cw = ConfigWatch::<Flags>::open(
            store.clone(),
            Source::key(key.clone()),
            ConfigOptions::default()
                .default_value(Flags {
                    n: 0,
                    dark_mode: false,
                })
                .shared(shared),
        )
        .await
        .unwrap();
        let mut rx = cw.wait_configured().await.unwrap();
        let (seen, target, all) = (seen.clone(), target.clone(), all.clone());
        tasks.push(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let v = rx.borrow_and_update().n as usize;
                if v == target.load(Ordering::SeqCst)
                    && seen.fetch_add(1, Ordering::SeqCst) + 1 == n
                {
                    all.notify_one();
                }
            }
        }));
        watchers.push(cw);
    }
    let per_watcher = (rss_bytes().saturating_sub(before)) as f64 / n as f64;
    let writer = &watchers[0];
    let mut samples = Vec::with_capacity(writes);
    for i in 1..=writes + 10 {
        seen.store(0, Ordering::SeqCst);
        target.store(i, Ordering::SeqCst);
        let notified = all.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let t = Instant::now();
        store
            .put(
                key.as_bytes(),
                &serde_json::to_vec(&Flags {
                    n: i as u64,
                    dark_mode: i % 2 == 0,
                })
                .unwrap(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), notified)
            .await
            .expect("all watchers updated");
        if i > 10 {
            samples.push(t.elapsed());
        }
    }
    let _ = writer;
    for t in tasks {
        t.abort();
    }
    samples.sort();
    (samples, per_watcher)
}

#[tokio::main]
async fn main() {
    let writes = arg("--writes", 200) as usize;
    let mut rows = Vec::new();
    let cases: &[(usize, bool)] = &[(1, true), (100, true), (1000, true), (100, false)];

    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    for &(n, shared) in cases {
        let (s, mem) = fan_out(node.dyn_store(), n, shared, writes).await;
        rows.push(("embedded", n, shared, s, mem));
    }
    node.stop().await.unwrap();

    let cluster = common::cluster().await;
    let store: Arc<dyn Store> = Arc::new(cluster.store().await.unwrap());
    for &(n, shared) in cases {
        let (s, mem) = fan_out(store.clone(), n, shared, writes).await;
        rows.push(("3-node gRPC", n, shared, s, mem));
    }
    drop(cluster);

    println!(
        "\n| setup | watchers | watch streams | write → all updated p50 ms | p99 ms | RSS per watcher |"
    );
    println!("|---|---|---|---|---|---|");
    for (setup, n, shared, s, mem) in &rows {
        println!(
            "| {setup} | {n} | {} | {} | {} | {:.1} KiB |",
            if *shared {
                "1 (shared)".to_string()
            } else {
                format!("{n} (own)")
            },
            ms(pct(s, 0.5)),
            ms(pct(s, 0.99)),
            mem / 1024.0
        );
    }
}
