//! Replica integrity on a 3-node cluster: after the faults that made stock d-engine 0.2.4
//! diverge a replica, every node holds the same state and a raft log without holes
//! ([`LocalCluster::check_replicas`]). Each test failed on stock 0.2.4 (a hole in the lagging
//! node's log, which dcoord's state machine refuses by stopping the node); dcoord's patched
//! d-engine-core passes them (README, "Patched d-engine-core").

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{HEAVY, binary, snapshot_every_50};
use dcoord::engine::{ClusterOptions, LocalCluster};
use dcoord::store::{Consistency, RemoteOptions, RemoteStore, Store};
use futures::StreamExt;

/// Every write its own Raft entry (no group commit): these tests need logs of a given length.
fn options() -> RemoteOptions {
    RemoteOptions::default()
        .op_deadline(Duration::from_secs(30))
        .group_writes(false)
}

/// `n` puts of `/replica/<tag>/<i>`, 16 at a time; all must succeed. A put whose outcome is
/// unknown or that found no leader is sent again (the same value: idempotent) for up to 30 s:
/// a node catching up hundreds of entries on a loaded host can hold a write past the
/// server's 5 s deadline, which is write availability, not what these tests check.
async fn puts(store: &RemoteStore, tag: &str, n: usize) {
    let retried = Arc::new(AtomicU64::new(0));
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let (store, retried) = (store.clone(), retried.clone());
            let key = format!("/replica/{tag}/{i}");
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match store.put(key.as_bytes(), b"v").await {
                        Ok(()) => return Ok(()),
                        Err(e)
                            if (e.is_ambiguous() || e.is_retryable())
                                && std::time::Instant::now() < deadline =>
                        {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(format!("{key}: {e}")),
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "puts failed: {failed:?}");
    let retried = retried.load(Ordering::Relaxed);
    if retried > 0 {
        eprintln!("puts {tag}: {retried} sent again after an unknown outcome or no leader");
    }
}

/// Writes until `stop` is set, 8 at a time, counting acknowledged writes; errors are retried.
fn background_writer(
    store: RemoteStore,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
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

/// Fact 1 of issue 14: a follower far behind got 100 old entries and then the newest ones (a
/// hole it never asked for again). Here it is 300 entries behind a leader that snapshots every
/// 50 entries: it installs a snapshot, then catches up from the log while writes go on. Stock
/// 0.2.4 sent it the entries after the snapshot's 100-entry window together with the newest
/// ones, and dcoord's state machine stopped it ("entries 146..=398 are missing"). Here it ends
/// with every key.
#[tokio::test]
async fn a_follower_300_entries_behind_catches_up_under_writes_without_a_hole() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(snapshot_every_50(3)).await.unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
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

/// Fact 2 of issue 14: after a node truncates a conflicting tail, stock 0.2.4 kept its durable
/// index above the truncation point, so the entries it then appended there were never written
/// to disk, and a restart loaded a log with a hole. To get a long conflicting tail: pause both
/// followers, send the leader 300 writes it appends but cannot commit, pause it, resume the
/// followers (they elect a leader and take other writes), resume the old leader (it truncates
/// its 300 entries and takes the new leader's), then SIGKILL and restart it.
#[tokio::test]
async fn a_leader_that_truncates_a_long_uncommitted_tail_keeps_it_on_disk_across_a_restart() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    puts(&store, "before", 50).await;
    let old = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let followers: Vec<u32> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    let admin = cluster.admins()[old as usize - 1].clone();
    let last_index = |admin: String| async move {
        dcoord::engine::replica::summary(&admin)
            .await
            .ok()
            .and_then(|s| s.log_bounds)
            .map_or(0, |b| b.1)
    };
    let before = last_index(admin.clone()).await;
    for &f in &followers {
        cluster.pause(f).unwrap();
    }
    // Writes the old leader appends (200 or more) and cannot commit (they end ambiguous).
    let doomed = tokio::spawn({
        let store = store.clone();
        async move {
            futures::future::join_all((0..300).map(|i| {
                let store = store.clone();
                async move {
                    let key = format!("/replica/doomed/{i}");
                    let _ = store.put(key.as_bytes(), b"d").await;
                }
            }))
            .await;
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = last_index(admin.clone()).await;
        if now >= before + 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader did not append the writes: its log ends at {now}, it was {before}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.pause(old).unwrap();
    for &f in &followers {
        cluster.resume(f).unwrap();
    }
    doomed.abort();
    // Wait until the resumed followers follow a new leader (at first they still name the old).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let states = cluster.states().await;
        let leaders: Vec<Option<u32>> = states
            .iter()
            .filter(|(id, _)| followers.contains(id))
            .map(|(_, s)| s.leader())
            .collect();
        if leaders
            .iter()
            .all(|l| l.is_some_and(|l| l != old) && *l == leaders[0])
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new leader: {states:?}\n{}",
            cluster.log_tails(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    puts(&store, "after", 300).await;
    cluster.resume(old).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    puts(&store, "caught-up", 300).await;
    cluster.kill(old).unwrap();
    cluster.restart(old).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    puts(&store, "restarted", 50).await;

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
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
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

    // While writes go on the nodes rarely stand at one index: they are compared by state
    // digest at the indexes all of them remember, and the planted key still shows.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = background_writer(store.clone(), stop.clone(), acked.clone());
    while acked.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = cluster.check_replicas(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let err = err.unwrap_err().to_string();
    assert!(err.starts_with("replicas differ"), "{err}");
}

/// While writes go on, healthy replicas pass the check (by digest history, or in full if the
/// nodes happen to stand at one index).
#[tokio::test]
async fn healthy_replicas_pass_the_check_while_writes_go_on() {
    let _heavy = HEAVY.lock().await;
    let cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let store = RemoteStore::connect(&cluster.endpoints(), options())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = background_writer(store.clone(), stop.clone(), acked.clone());
    while acked.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = cluster.check_replicas(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let report = report.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert_eq!(report.nodes.len(), 3);
}
