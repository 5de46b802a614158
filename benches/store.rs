//! Store latency: put, CAS, linearizable get, and put→watch-event, on the embedded engine and on
//! a local 3-node cluster over gRPC (watch on the leader, as `RemoteStore` does, next to a raw
//! watch on a follower for comparison), with dcoord's state machine and, side by side in the
//! same run (alternating rounds), d-engine's stock storage (`FileStateMachine` and
//! `FileStorageEngine`) and, on the cluster, dcoord's storage with d-engine's acknowledgement
//! from memory (`DCOORD_BENCH_MEMORY_ACK=1`: what the patched core's fsync before every ACK
//! costs). Then the disk bytes each needs for 100k small keys. Prints markdown tables.
//!
//! Run: `cargo bench --bench store` (optionally `-- --ops 2000 --rounds 2 --disk-keys 100000`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use d_engine_proto::client::WatchRequest;
use d_engine_proto::client::raft_client_service_client::RaftClientServiceClient;
use dcoord::engine::{ClusterOptions, EmbeddedNode, EmbeddedOptions, LocalCluster};
use dcoord::store::{Consistency, RemoteStore, Store, WatchTarget};
use futures::StreamExt;

struct Row {
    setup: &'static str,
    op: &'static str,
    samples: Vec<Duration>,
}

async fn bench_store(setup: &'static str, s: Arc<dyn Store>, ops: usize, rows: &mut Vec<Row>) {
    let ns = format!("/bench/{}/", uuid::Uuid::new_v4().simple());
    // warm-up
    for i in 0..50 {
        s.put(format!("{ns}warm/{i}").as_bytes(), b"v")
            .await
            .unwrap();
    }
    let mut put = Vec::with_capacity(ops);
    for i in 0..ops {
        let k = format!("{ns}put/{i}");
        let t = Instant::now();
        s.put(k.as_bytes(), b"value-0123456789").await.unwrap();
        put.push(t.elapsed());
    }
    let cas_key = format!("{ns}cas");
    s.put(cas_key.as_bytes(), b"0").await.unwrap();
    let mut cas = Vec::with_capacity(ops);
    for i in 0..ops {
        let (old, new) = (i.to_string(), (i + 1).to_string());
        let t = Instant::now();
        let ok = s
            .compare_and_swap(cas_key.as_bytes(), Some(old.as_bytes()), new.as_bytes())
            .await
            .unwrap();
        cas.push(t.elapsed());
        assert!(ok);
    }
    let mut get = Vec::with_capacity(ops);
    for _ in 0..ops {
        let t = Instant::now();
        s.get(cas_key.as_bytes(), Consistency::Linearizable)
            .await
            .unwrap();
        get.push(t.elapsed());
    }
    let mut watch = s
        .watch(WatchTarget::prefix(format!("{ns}w/").into_bytes()), false)
        .await
        .unwrap();
    let mut pw = Vec::with_capacity(ops);
    for i in 0..ops {
        let k = format!("{ns}w/{i}");
        let t = Instant::now();
        s.put(k.as_bytes(), b"v").await.unwrap();
        loop {
            let e = watch.next().await.unwrap().unwrap();
            if e.key == k.as_bytes() {
                break;
            }
        }
        pw.push(t.elapsed());
    }
    rows.push(Row {
        setup,
        op: "put",
        samples: put,
    });
    rows.push(Row {
        setup,
        op: "compare_and_swap",
        samples: cas,
    });
    rows.push(Row {
        setup,
        op: "get (linearizable)",
        samples: get,
    });
    rows.push(Row {
        setup,
        op: "put → watch event",
        samples: pw,
    });
}

/// put → event on a raw watch opened on a follower (what d-engine's `Client::watch` may pick).
async fn bench_follower_watch(s: &RemoteStore, follower: String, ops: usize, rows: &mut Vec<Row>) {
    let ns = format!("/bench/{}/f/", uuid::Uuid::new_v4().simple());
    let mut client = RaftClientServiceClient::connect(follower).await.unwrap();
    let mut stream = client
        .watch(WatchRequest {
            client_id: 0,
            key: ns.clone().into(),
            prefix: true,
            prev_kv: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut samples = Vec::with_capacity(ops);
    for i in 0..ops {
        let k = format!("{ns}{i}");
        let t = Instant::now();
        s.put(k.as_bytes(), b"v").await.unwrap();
        loop {
            let r = stream.next().await.unwrap().unwrap();
            if r.key == k.as_bytes() {
                break;
            }
        }
        samples.push(t.elapsed());
    }
    rows.push(Row {
        setup: "3-node gRPC",
        op: "put → watch event, raw watch on a follower",
        samples,
    });
}

/// (setup, operation).
type RowKey = (&'static str, &'static str);

/// Which storage a run uses: d-engine's file state machine and raft log, dcoord's, or dcoord's
/// with d-engine 0.2.4's acknowledgement from memory (cluster only: the switch is read once
/// per process, and the embedded node runs in this one).
#[derive(Clone, Copy, PartialEq)]
enum Sm {
    File,
    Dcoord,
    MemoryAck,
}

const ALL: [Sm; 3] = [Sm::File, Sm::Dcoord, Sm::MemoryAck];

impl Sm {
    fn embedded(self) -> EmbeddedOptions {
        EmbeddedOptions::default().bench_file_state_machine(self == Sm::File)
    }

    fn cluster(self) -> ClusterOptions {
        let o = ClusterOptions::default()
            .nodes(3)
            .binary(env!("CARGO_BIN_EXE_dcoord"));
        match self {
            Sm::File => o.env("DCOORD_BENCH_FILE_STATE_MACHINE", "1"),
            Sm::Dcoord => o,
            Sm::MemoryAck => o.env("DCOORD_BENCH_MEMORY_ACK", "1"),
        }
    }

    /// The directory its state lives in, inside a node's data directory.
    fn state_dir(self) -> &'static str {
        match self {
            Sm::File => "file_state_machine",
            Sm::Dcoord | Sm::MemoryAck => "state",
        }
    }

    /// The directory its raft log lives in, inside a node's data directory.
    fn log_dir(self) -> &'static str {
        match self {
            Sm::File => "file_storage",
            Sm::Dcoord | Sm::MemoryAck => "storage",
        }
    }
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Disk bytes after `keys` puts of 16-byte values under ~20-byte keys on an embedded node
/// (state machine directory, raft log directory).
async fn disk(sm: Sm, keys: usize) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start_with(dir.path(), sm.embedded())
        .await
        .unwrap();
    let store = node.dyn_store();
    futures::stream::iter(0..keys)
        .map(|i| {
            let store = store.clone();
            async move {
                store
                    .put(format!("/disk/{i:010}").as_bytes(), b"value-0123456789")
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    node.stop().await.unwrap();
    drop(node);
    (
        dir_bytes(&dir.path().join(sm.state_dir())),
        dir_bytes(&dir.path().join(sm.log_dir())),
    )
}

#[tokio::main]
async fn main() {
    let ops = arg("--ops", 2000usize);
    let rounds = arg("--rounds", 2usize).max(1);
    let disk_keys = arg("--disk-keys", 100_000usize);
    let per_round = (ops / rounds).max(1);
    // (setup, op) → samples of [file, dcoord, memory ACK], in first-seen order.
    let mut table: Vec<(RowKey, [Vec<Duration>; 3])> = Vec::new();
    let mut add = |sm: Sm, rows: Vec<Row>| {
        for r in rows {
            let key = (r.setup, r.op);
            let at = match table.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    table.push((key, Default::default()));
                    table.len() - 1
                }
            };
            table[at].1[sm as usize].extend(r.samples);
        }
    };
    for round in 0..rounds {
        let mut order = ALL;
        order.rotate_left(round % ALL.len());
        for sm in order {
            let mut rows = Vec::new();
            if sm != Sm::MemoryAck {
                let dir = tempfile::tempdir().unwrap();
                let node = EmbeddedNode::start_with(dir.path(), sm.embedded())
                    .await
                    .unwrap();
                bench_store("embedded", node.dyn_store(), per_round, &mut rows).await;
                node.stop().await.unwrap();
                drop(node);
            }

            let cluster = LocalCluster::start(sm.cluster()).await.unwrap();
            let store = cluster.store().await.unwrap();
            bench_store("3-node gRPC", Arc::new(store.clone()), per_round, &mut rows).await;
            if sm == Sm::Dcoord && round == 0 {
                let leader = store.leader_id().await.unwrap();
                let follower = cluster
                    .ids()
                    .into_iter()
                    .find(|id| *id != leader)
                    .and_then(|id| cluster.endpoint(id))
                    .unwrap();
                bench_follower_watch(&store, follower, per_round.min(300), &mut rows).await;
            }
            drop(cluster);
            add(sm, rows);
        }
    }

    println!(
        "\n| setup | operation | n | file p50 ms | file p99 ms | dcoord p50 ms | dcoord p99 ms \
         | memory-ACK p50 ms | memory-ACK p99 ms | dcoord/file p50 | dcoord/memory-ACK p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for ((setup, op), samples) in &mut table {
        for s in samples.iter_mut() {
            s.sort();
        }
        let cell = |s: &Vec<Duration>, p: f64| {
            if s.is_empty() {
                "-".to_string()
            } else {
                ms(pct(s, p))
            }
        };
        let ratio = |a: &Vec<Duration>, b: &Vec<Duration>| {
            if a.is_empty() || b.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{:.2}",
                    pct(a, 0.5).as_secs_f64() / pct(b, 0.5).as_secs_f64()
                )
            }
        };
        println!(
            "| {setup} | {op} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            samples.iter().map(Vec::len).max().unwrap_or(0),
            cell(&samples[0], 0.5),
            cell(&samples[0], 0.99),
            cell(&samples[1], 0.5),
            cell(&samples[1], 0.99),
            cell(&samples[2], 0.5),
            cell(&samples[2], 0.99),
            ratio(&samples[1], &samples[0]),
            ratio(&samples[1], &samples[2]),
        );
    }

    if disk_keys > 0 {
        println!("\n| storage | keys | state machine bytes | raft log bytes |");
        println!("|---|---|---|---|");
        for sm in [Sm::File, Sm::Dcoord] {
            let (state, log) = disk(sm, disk_keys).await;
            let name = if sm == Sm::File {
                "d-engine FileStateMachine + FileStorageEngine"
            } else {
                "dcoord (redb state machine + redb raft log)"
            };
            println!("| {name} | {disk_keys} | {state} | {log} |");
        }
    }
}
