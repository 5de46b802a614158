//! Replica integrity on a 3-node cluster: after the faults that made stock d-engine 0.2.4
//! diverge a replica, every node holds the same state and a raft log without holes
//! ([`LocalCluster::check_replicas`]). Each test failed on stock 0.2.4 (a hole in the lagging
//! node's log, which dcoord's state machine refuses by stopping the node); dcoord's patched
//! d-engine-core passes them (README, "Patched d-engine-core").

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{HEAVY, binary};
use dcoord::engine::{ClusterOptions, LocalCluster};
use dcoord::store::{Consistency, RemoteOptions, RemoteStore, Store};
use futures::StreamExt;

fn options() -> RemoteOptions {
    RemoteOptions::default().op_deadline(Duration::from_secs(30))
}

/// `n` puts of `/replica/<tag>/<i>`, 16 at a time; all must succeed.
async fn puts(store: &RemoteStore, tag: &str, n: usize) {
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            let key = format!("/replica/{tag}/{i}");
            async move { store.put(key.as_bytes(), b"v").await.map_err(|e| format!("{key}: {e}")) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "puts failed: {failed:?}");
}

/// Writes until `stop` is set, 8 at a time, counting acknowledged writes; errors are retried.
fn background_writer(store: RemoteStore, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<_> = (0..8)
                .map(|_| {
                    seq += 1;
                    let store = store.clone();
                    let key = format!("/replica/bg/{seq}");
                    async move {
                        match store.put(key.as_bytes(), b"bg").await {
                            Ok(()) => true,
                            Err(e) => {
                                eprintln!("background put {key}: {e}");
                                false
                            }
                        }
                    }
                })
                .collect();
            let ok = futures::future::join_all(batch).await;
            acked.fetch_add(ok.iter().filter(|o| **o).count() as u64, Ordering::Relaxed);
        }
    })
}

/// Fact 1 of issue 14: a follower 300 entries behind got 100 old entries and then the newest
/// ones (a hole of ~200 it never asked for again). Here it catches up while writes go on,
/// and ends with every key.
#[tokio::test]
async fn a_follower_300_entries_behind_catches_up_under_writes_without_a_hole() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let follower = *cluster.ids().iter().find(|&&id| id != leader).unwrap();
    cluster.kill(follower).unwrap();
    puts(&store, "behind", 300).await;

    // The follower comes back while writes go on: its catch-up batches meet new entries.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = background_writer(store.clone(), stop.clone(), acked.clone());
    cluster.restart(follower).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let from = acked.load(Ordering::Relaxed);
    while acked.load(Ordering::Relaxed) < from + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let report = cluster
        .check_replicas(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert_eq!(report.nodes.len(), 3);
    let v = store
        .get(b"/replica/behind/299", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

/// Fact 2 of issue 14: a leader paused with writes in flight has entries the others never
/// got. When it resumes it truncates them and takes the new leader's entries; stock 0.2.4
/// then never wrote to disk the entries re-appended below its old durable index, so a restart
/// loaded a log with a hole. Here the old leader is killed and restarted after it catches up,
/// and every node agrees.
#[tokio::test]
async fn a_paused_leader_truncates_its_tail_and_keeps_a_log_without_holes_across_a_restart() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    puts(&store, "before", 100).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = background_writer(store.clone(), stop.clone(), acked.clone());
    while acked.load(Ordering::Relaxed) < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old = cluster.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    cluster.pause(old).unwrap();
    // The others elect a leader and take writes the paused one never saw.
    let from = acked.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < from + 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "no writes after pausing the leader\n{}",
            cluster.log_tails(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.resume(old).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let from = acked.load(Ordering::Relaxed);
    while acked.load(Ordering::Relaxed) < from + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(old).unwrap();
    cluster.restart(old).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let report = cluster
        .check_replicas(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert_eq!(report.nodes.len(), 3);
}

/// The checker itself: a node whose state differs is named with the keys. The difference is
/// a key written into one follower's state machine file behind Raft's back while it is down.
#[tokio::test]
async fn the_replica_check_names_the_node_and_keys_that_differ() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    puts(&store, "same", 10).await;
    cluster
        .check_replicas(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Plant a key in one follower's state machine file behind Raft's back.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let follower = *cluster.ids().iter().find(|&&id| id != leader).unwrap();
    cluster.kill(follower).unwrap();
    let dir = cluster.dir().join(format!("n{follower}")).join("state");
    {
        let kv: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");
        let db = redb::Database::open(dir.join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(kv)
            .unwrap()
            .insert(&b"/replica/planted"[..], &b"x"[..])
            .unwrap();
        txn.commit().unwrap();
    }
    cluster.restart(follower).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let err = cluster
        .check_replicas(Duration::from_secs(30))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("node {follower} vs node"))
            && err.contains("has extra 1 key(s) \"/replica/planted\""),
        "{err}"
    );
}
