//! Store latency: put, CAS, linearizable get, and put→watch-event, on the embedded engine and on
//! a local 3-node cluster over gRPC (watch on the leader, as `RemoteStore` does, next to a raw
//! watch on a follower for comparison). Prints a markdown table.
//!
//! Run: `cargo bench --bench store` (optionally `-- --ops 2000`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use d_engine_proto::client::WatchRequest;
use d_engine_proto::client::raft_client_service_client::RaftClientServiceClient;
use dcoord::engine::EmbeddedNode;
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

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ops = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000usize);
    let mut rows = Vec::new();

    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    bench_store("embedded", node.dyn_store(), ops, &mut rows).await;
    node.stop().await.unwrap();

    let cluster = common::cluster().await;
    let store = cluster.store().await.unwrap();
    bench_store("3-node gRPC", Arc::new(store.clone()), ops, &mut rows).await;
    let leader = store.leader_id().await.unwrap();
    let follower = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .and_then(|id| cluster.endpoint(id))
        .unwrap();
    bench_follower_watch(&store, follower, ops.min(300), &mut rows).await;

    println!("\n| setup | operation | n | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for r in &mut rows {
        r.samples.sort();
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.setup,
            r.op,
            r.samples.len(),
            ms(pct(&r.samples, 0.5)),
            ms(pct(&r.samples, 0.9)),
            ms(pct(&r.samples, 0.99))
        );
    }
}
