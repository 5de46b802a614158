//! `lock::Mutex` on the embedded default: five workers (each with its own session, as separate
//! processes would have) contend for one lock, print the fencing token of every grant, and
//! protect a shared key with fenced writes. Then a holder "crashes" (stops renewing without
//! releasing) and a waiter takes over once its lease has run out.
//!
//! Run: `cargo run --release --example lock`
//! Against a cluster: `cargo run --release --example lock -- --endpoints 127.0.0.1:9081,...`
//! (or set `DCOORD_ENDPOINTS`; `dcoord cluster` prints them).

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use dcoord::lock::{Mutex, fenced_get};
use dcoord::session::{Session, SessionOptions};

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, _node) = common::store(dir.path()).await?;
    let name = format!("example-{}", uuid::Uuid::new_v4().simple());
    let shared = format!("/example/{name}/balance");
    let options = SessionOptions::default().lease(Duration::from_secs(2));

    // 1. Five contenders, three rounds each.
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..5 {
        let (store, name, shared, options) =
            (store.clone(), name.clone(), shared.clone(), options.clone());
        workers.push(tokio::spawn(async move {
            let session = Session::start(store, options).await?;
            let lock = Mutex::new(&session, &name)?;
            for round in 0..3 {
                let guard = lock.acquire().await?;
                println!(
                    "worker {w} holds the lock (round {round}), fencing token {}",
                    guard.fencing_token()
                );
                guard
                    .fenced_put(
                        shared.as_bytes(),
                        format!("written by worker {w}").as_bytes(),
                    )
                    .await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                guard.release().await?;
            }
            session.close().await
        }));
    }
    for w in workers {
        w.await.expect("worker panicked")?;
    }
    let last = fenced_get(&*store, shared.as_bytes())
        .await?
        .expect("written");
    println!(
        "15 grants in {:?}; last fenced write: {:?} with token {}",
        started.elapsed(),
        String::from_utf8_lossy(&last.value),
        last.token
    );

    // 2. A holder crashes: it stops renewing and never releases.
    let crashed = Session::start(store.clone(), options.clone()).await?;
    let guard = Mutex::new(&crashed, &name)?.acquire().await?;
    println!("a holder takes token {} and crashes", guard.fencing_token());
    std::mem::forget(guard);
    crashed.orphan();
    let t = Instant::now();
    let survivor = Session::start(store.clone(), options).await?;
    let guard = Mutex::new(&survivor, &name)?.acquire().await?;
    println!(
        "a waiter took over after {:?} (lease 2 s) with token {}",
        t.elapsed(),
        guard.fencing_token()
    );
    guard.release().await?;
    survivor.close().await
}
