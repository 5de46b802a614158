//! The reconcile core's cost: raw put→watch latency next to put→mirror-updated latency
//! (interleaved in one run, embedded and 3-node), and how long a mirror takes to reflect new
//! writes after the Raft leader is SIGKILLed. Prints markdown tables.
//!
//! Run: `cargo bench --bench reconcile` (optionally `-- --ops 2000 --kills 3`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcoord::engine::EmbeddedNode;
use dcoord::reconcile::{Mirror, MirrorOptions};
use dcoord::store::{RemoteOptions, RemoteStore, Store, WatchTarget};
use futures::StreamExt;

/// Alternates: put then wait for the raw watch event; put then wait for the mirror to show it.
async fn raw_vs_mirror(s: Arc<dyn Store>, ops: usize) -> (Vec<Duration>, Vec<Duration>) {
    let ns = format!("/bench/{}/", uuid::Uuid::new_v4().simple());
    let mut raw = s
        .watch(WatchTarget::prefix(ns.clone()), false)
        .await
        .unwrap();
    let mirror = Mirror::start(
        s.clone(),
        WatchTarget::prefix(ns.clone()),
        MirrorOptions::default(),
    );
    mirror.wait_ready().await.unwrap();
    for i in 0..50 {
        s.put(format!("{ns}warm{i}").as_bytes(), b"v")
            .await
            .unwrap();
    }
    let (mut r, mut m) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
    for i in 0..2 * ops {
        let key = format!("{ns}{i}");
        let t = Instant::now();
        s.put(key.as_bytes(), b"value").await.unwrap();
        if i.is_multiple_of(2) {
            while raw.next().await.unwrap().unwrap().key != key.as_bytes() {}
            r.push(t.elapsed());
        } else {
            mirror
                .wait_for(|v| v.get(key.as_bytes()).is_some())
                .await
                .unwrap();
            m.push(t.elapsed());
        }
    }
    r.sort();
    m.sort();
    (r, m)
}

/// Kills the leader while a writer keeps writing; measures kill → first write accepted again,
/// and kill → the mirror shows that write.
async fn leader_kills(kills: usize) -> Vec<(Duration, Duration)> {
    let mut cluster = common::cluster().await;
    let remote = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(remote.clone());
    let mirror = Mirror::start(
        store.clone(),
        WatchTarget::prefix("/conv/"),
        MirrorOptions::default(),
    );
    mirror.wait_ready().await.unwrap();
    let mut out = Vec::new();
    for round in 0..kills {
        let leader = remote.leader_id().await.unwrap();
        cluster.kill(leader).unwrap();
        let killed = Instant::now();
        let value = format!("after-kill-{round}");
        loop {
            match store.put(b"/conv/x", value.as_bytes()).await {
                Ok(()) => break,
                Err(e) if e.is_ambiguous() || e.is_retryable() => continue,
                Err(e) => panic!("{e}"),
            }
        }
        let accepted = killed.elapsed();
        mirror
            .wait_for(|v| v.get(b"/conv/x").is_some_and(|e| e.value == value))
            .await
            .unwrap();
        out.push((accepted, killed.elapsed()));
        eprintln!(
            "kill {round}: leader {leader}, write accepted after {accepted:?}, mirror after {:?}; stats {:?}",
            killed.elapsed(),
            mirror.stats()
        );
        cluster.restart(leader).unwrap();
        cluster
            .wait_for_leader(Duration::from_secs(60))
            .await
            .unwrap();
        // Let the restarted node catch up before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    out
}

#[tokio::main]
async fn main() {
    let ops = arg("--ops", 2000);
    let kills = arg("--kills", 3);
    let mut rows = Vec::new();

    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    rows.push(("embedded", raw_vs_mirror(node.dyn_store(), ops).await));
    node.stop().await.unwrap();

    let cluster = common::cluster().await;
    let store = cluster.store().await.unwrap();
    rows.push(("3-node gRPC", raw_vs_mirror(Arc::new(store), ops).await));
    drop(cluster);

    println!(
        "\n| setup | n | raw watch p50 ms | mirror p50 ms | p50 ratio | raw watch p99 ms | mirror p99 ms | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (setup, (r, m)) in &rows {
        let ratio = |p| pct(m, p).as_secs_f64() / pct(r, p).as_secs_f64();
        println!(
            "| {setup} | {} | {} | {} | {:.3} | {} | {} | {:.3} |",
            r.len(),
            ms(pct(r, 0.5)),
            ms(pct(m, 0.5)),
            ratio(0.5),
            ms(pct(r, 0.99)),
            ms(pct(m, 0.99)),
            ratio(0.99)
        );
    }

    if kills > 0 {
        let conv = leader_kills(kills).await;
        println!("\n| leader kill | kill → write accepted ms | kill → mirror shows it ms |");
        println!("|---|---|---|");
        for (i, (a, m)) in conv.iter().enumerate() {
            println!("| {} | {} | {} |", i + 1, ms(*a), ms(*m));
        }
    }
}
