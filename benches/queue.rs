//! `queue::WorkQueue`, embedded and on a local 3-node cluster, in one run: raw put→watch
//! latency (the limit) next to enqueue→handler latency, throughput with 2 consumers while 2
//! producers enqueue, the drain rate of a pre-filled queue, and the enqueue rate of 16 tasks
//! calling `WorkQueue::enqueue` next to one `Producer::enqueue_many`. Prints markdown tables.
//!
//! Then the scale run, embedded and on one node over gRPC: 100,000 pending 1 KiB messages
//! (`--scale N`, `--payload BYTES`; `--scale 0` skips it, `--scale-only` runs only it). A
//! counting allocator measures the bytes this process holds: a consumer's per pending
//! message (the second consumer opened: the first one warmed whatever the engine caches), a
//! producer's growth over the fill, and the drain rate next to a 300-message drain of the
//! same payloads.
//!
//! Run: `cargo bench --bench queue` (optionally `-- --latency 300 --messages 4000`).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::alloc::System;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcoord::engine::{ClusterOptions, EmbeddedNode, LocalCluster};
use dcoord::queue::{EnqueueOptions, Producer, QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{Store, WatchTarget};
use futures::StreamExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::sync::Notify;

/// Counts the bytes allocated and freed, process-wide.
#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes held now, once the runtime's other tasks have had a moment (transient buffers of a
/// just-finished call freed).
async fn live() -> usize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = ALLOC.stats();
    // (A realloc's growth is counted in `bytes_allocated` as well as `bytes_reallocated`.)
    s.bytes_allocated - s.bytes_deallocated
}

struct Scale {
    setup: &'static str,
    n: usize,
    payload: usize,
    fill: f64,
    producer_growth: isize,
    open_first: Duration,
    open_second: Duration,
    per_message: f64,
    /// What dropping that consumer gave back, per message.
    freed: f64,
    drain: f64,
    drain_small: f64,
}

/// Fills a queue with `n` messages of `payload` bytes through one `Producer`, in batches,
/// measuring what the producer holds across the fill; returns (msg/s, growth in bytes).
async fn fill(store: &Arc<dyn Store>, name: &str, n: usize, payload: usize) -> (f64, isize) {
    let producer = Producer::new(store.clone(), name).unwrap();
    let body = vec![7u8; payload];
    let batch = 1000.min(n);
    let t = Instant::now();
    producer
        .enqueue_many((0..batch).map(|_| (body.as_slice(), EnqueueOptions::default())))
        .await
        .unwrap();
    let before = live().await as isize;
    let mut done = batch;
    while done < n {
        let k = batch.min(n - done);
        producer
            .enqueue_many((0..k).map(|_| (body.as_slice(), EnqueueOptions::default())))
            .await
            .unwrap();
        done += k;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let growth = live().await as isize - before;
    (rate, growth)
}

/// Drains `name` (holding `n` messages) with 2 consumers of 16 slots each; msg/s.
async fn drain(store: &Arc<dyn Store>, name: &str, n: usize) -> f64 {
    let started = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(Notify::new());
    let t = Instant::now();
    let cons = consumers(store, name, 2, started.clone(), stop.clone());
    wait_for(&started, n).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.notify_waiters();
    for c in cons {
        c.await.unwrap();
    }
    rate
}

async fn scale(setup: &'static str, store: Arc<dyn Store>, n: usize, payload: usize) -> Scale {
    let ns = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("scale-{ns}");
    eprintln!("scale, {setup}: filling {n} messages of {payload} B");
    let (fill_rate, producer_growth) = fill(&store, &name, n, payload).await;
    eprintln!("scale, {setup}: opening two consumers");
    // The first consumer warms what the engine caches; the second one's bytes are its own.
    let t = Instant::now();
    let (s1, q1) = queue(&store, &name).await;
    let open_first = t.elapsed();
    let before = live().await;
    let t = Instant::now();
    let (s2, q2) = queue(&store, &name).await;
    let open_second = t.elapsed();
    let after = live().await;
    assert_eq!(
        q2.stats().ready,
        n,
        "the second consumer lists every message"
    );
    let per_message = (after as f64 - before as f64) / n as f64;
    drop(q2);
    let _ = s2.close().await;
    let freed = (after as f64 - live().await as f64) / n as f64;
    drop(q1);
    let _ = s1.close().await;
    eprintln!("scale, {setup}: draining");
    let drain_rate = drain(&store, &name, n).await;
    let small = format!("small-{ns}");
    let _ = fill(&store, &small, 300, payload).await;
    let drain_small = drain(&store, &small, 300).await;
    Scale {
        setup,
        n,
        payload,
        fill: fill_rate,
        producer_growth,
        open_first,
        open_second,
        per_message,
        freed,
        drain: drain_rate,
        drain_small,
    }
}

async fn queue(store: &Arc<dyn Store>, name: &str) -> (Session, WorkQueue) {
    let s = Session::start(store.clone(), SessionOptions::default())
        .await
        .unwrap();
    let q = WorkQueue::open(&s, name, QueueOptions::default())
        .await
        .unwrap();
    (s, q)
}

struct Report {
    setup: &'static str,
    raw: Vec<Duration>,
    e2h: Vec<Duration>,
    throughput: f64,
    drain: f64,
    /// Pre-filling the drain queue: 16 tasks of `WorkQueue::enqueue`, msg/s.
    fill_tasks: f64,
    /// The same count through one `Producer::enqueue_many`, msg/s.
    fill_many: f64,
}

/// Consumers that count acks and note when each message's handler started.
fn consumers(
    store: &Arc<dyn Store>,
    name: &str,
    n: usize,
    started: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<Notify>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|_| {
            let (store, name, started, stop) = (
                store.clone(),
                name.to_string(),
                started.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let (_s, q) = queue(&store, &name).await;
                q.run(
                    16,
                    move |m| {
                        started.lock().unwrap().insert(m.id.clone(), Instant::now());
                        async { Ok(()) }
                    },
                    async move { stop.notified().await },
                )
                .await
                .unwrap()
                .acked
            })
        })
        .collect()
}

async fn wait_for(started: &Arc<Mutex<HashMap<String, Instant>>>, n: usize) {
    while started.lock().unwrap().len() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run(
    setup: &'static str,
    store: Arc<dyn Store>,
    latency_n: usize,
    messages: usize,
) -> Report {
    let ns = uuid::Uuid::new_v4().simple().to_string();
    // 1. Latency: raw put→watch and enqueue→handler, interleaved, one at a time.
    let name = format!("lat-{ns}");
    let started = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(Notify::new());
    let cons = consumers(&store, &name, 1, started.clone(), stop.clone());
    let (_ps, producer) = queue(&store, &name).await;
    let raw_prefix = format!("/bench/{ns}/raw/");
    let mut watch = store
        .watch(WatchTarget::prefix(raw_prefix.clone()), false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut raw, mut e2h) = (Vec::new(), Vec::new());
    for i in 0..latency_n + 20 {
        let key = format!("{raw_prefix}{i}");
        let t = Instant::now();
        store.put(key.as_bytes(), b"v").await.unwrap();
        while watch.next().await.unwrap().unwrap().key != key.as_bytes() {}
        let r = t.elapsed();
        let t = Instant::now();
        let id = producer
            .enqueue(b"job", EnqueueOptions::default())
            .await
            .unwrap();
        let at = loop {
            if let Some(at) = started.lock().unwrap().get(&id) {
                break *at;
            }
            tokio::task::yield_now().await;
        };
        if i >= 20 {
            raw.push(r);
            e2h.push(at - t);
        }
    }
    stop.notify_waiters();
    for c in cons {
        c.await.unwrap();
    }
    raw.sort();
    e2h.sort();

    // 2. Throughput: 2 producers and 2 consumers at once.
    let name = format!("tp-{ns}");
    let started = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(Notify::new());
    let cons = consumers(&store, &name, 2, started.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let (store, name) = (store.clone(), name.clone());
            tokio::spawn(async move {
                let (_s, q) = queue(&store, &name).await;
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..8 {
                    let q = q.clone();
                    tasks.spawn(async move {
                        for _ in 0..messages / 16 {
                            q.enqueue(b"job", EnqueueOptions::default()).await.unwrap();
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let total = (messages / 16) * 16;
    wait_for(&started, total).await;
    let throughput = total as f64 / t.elapsed().as_secs_f64();
    stop.notify_waiters();
    for c in cons {
        c.await.unwrap();
    }

    // 3. Drain: pre-fill, then 2 consumers.
    let name = format!("drain-{ns}");
    let (_s, q) = queue(&store, &name).await;
    let mut tasks = tokio::task::JoinSet::new();
    let t = Instant::now();
    for _ in 0..16 {
        let q = q.clone();
        tasks.spawn(async move {
            for _ in 0..messages / 16 {
                q.enqueue(b"job", EnqueueOptions::default()).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let fill_tasks = total as f64 / t.elapsed().as_secs_f64();
    // The same number through one sessionless producer's enqueue_many (64 writes in flight).
    let producer = Producer::new(store.clone(), &format!("many-{ns}")).unwrap();
    let t = Instant::now();
    producer
        .enqueue_many((0..total).map(|_| (b"job", EnqueueOptions::default())))
        .await
        .unwrap();
    let fill_many = total as f64 / t.elapsed().as_secs_f64();
    let started = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(Notify::new());
    let t = Instant::now();
    let cons = consumers(&store, &name, 2, started.clone(), stop.clone());
    wait_for(&started, total).await;
    let drain = total as f64 / t.elapsed().as_secs_f64();
    stop.notify_waiters();
    for c in cons {
        c.await.unwrap();
    }
    Report {
        setup,
        raw,
        e2h,
        throughput,
        drain,
        fill_tasks,
        fill_many,
    }
}

#[tokio::main]
async fn main() {
    init_logs();
    let latency_n = arg("--latency", 300);
    let messages = arg("--messages", 4000);
    let n = arg("--scale", 100_000usize);
    let payload = arg("--payload", 1024usize);
    let scale_only = std::env::args().any(|a| a == "--scale-only");
    if !scale_only {
        throughput(latency_n, messages).await;
    }
    if n == 0 {
        return;
    }
    let mut rows = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    rows.push(scale("embedded", node.dyn_store(), n, payload).await);
    node.stop().await.unwrap();
    let one = LocalCluster::start(
        ClusterOptions::default()
            .nodes(1)
            .binary(env!("CARGO_BIN_EXE_dcoord")),
    )
    .await
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(one.store().await.unwrap());
    rows.push(scale("1 node, gRPC", store, n, payload).await);
    drop(one);
    println!(
        "\n| setup | pending messages | payload B | fill msg/s | producer growth over the fill B | open 1st / 2nd consumer s | consumer B per pending message (held / freed when dropped) | drain msg/s | 300-message drain msg/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} | {:.0} | {:.2}x |",
            r.setup,
            r.n,
            r.payload,
            r.fill,
            r.producer_growth,
            r.open_first.as_secs_f64(),
            r.open_second.as_secs_f64(),
            r.per_message,
            r.freed,
            r.drain,
            r.drain_small,
            r.drain / r.drain_small
        );
    }
    println!(
        "\n(embedded: the process holds the engine too; its consumer figure is the second consumer's, opened once the first had warmed the engine)"
    );
}

async fn throughput(latency_n: usize, messages: usize) {
    let mut reports = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    reports.push(run("embedded", node.dyn_store(), latency_n, messages).await);
    node.stop().await.unwrap();
    let cluster = common::cluster().await;
    let store: Arc<dyn Store> = Arc::new(cluster.store().await.unwrap());
    reports.push(run("3-node gRPC", store, latency_n, messages).await);
    drop(cluster);

    println!(
        "\n| setup | put→watch p50 / p99 ms | enqueue→handler p50 / p99 ms | p50 ratio | 2 producers + 2 consumers msg/s | drain (2 consumers) msg/s | enqueue, 16 tasks msg/s | Producer::enqueue_many msg/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} / {} | {} / {} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.setup,
            ms(pct(&r.raw, 0.5)),
            ms(pct(&r.raw, 0.99)),
            ms(pct(&r.e2h, 0.5)),
            ms(pct(&r.e2h, 0.99)),
            pct(&r.e2h, 0.5).as_secs_f64() / pct(&r.raw, 0.5).as_secs_f64(),
            r.throughput,
            r.drain,
            r.fill_tasks,
            r.fill_many
        );
    }
}
