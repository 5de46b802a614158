//! `election::Election` on the embedded default: three candidates (each with its own session, as
//! separate processes would have) campaign with their address; an observer prints every leader
//! change. The leader proclaims a new value, resigns (the next candidate leads in the same
//! write), and the next leader "crashes" (stops heartbeating without resigning): the last
//! candidate takes over one lease later, and the observer sees each step.
//!
//! Run: `cargo run --release --example election`
//! Against a cluster: `cargo run --release --example election -- --endpoints 127.0.0.1:9081,...`

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use dcoord::election::Election;
use dcoord::session::{Session, SessionOptions};

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, _node) = common::store(dir.path()).await?;
    let name = format!("example-{}", uuid::Uuid::new_v4().simple());
    let options = SessionOptions::default().lease(Duration::from_secs(2));
    let started = Instant::now();

    let watcher = Session::start(store.clone(), options.clone()).await?;
    let mut leader = Election::new(&watcher, &name)?.observe().await?;
    let printer = tokio::spawn(async move {
        loop {
            match &*leader.borrow_and_update() {
                Some(l) => println!(
                    "{:>6.2}s  observer: leader term {} value {:?}",
                    started.elapsed().as_secs_f64(),
                    l.token,
                    String::from_utf8_lossy(&l.value)
                ),
                None => println!(
                    "{:>6.2}s  observer: no leader",
                    started.elapsed().as_secs_f64()
                ),
            }
            if leader.changed().await.is_err() {
                return;
            }
        }
    });

    let mut sessions = Vec::new();
    let mut elections = Vec::new();
    for _ in 0..3 {
        let s = Session::start(store.clone(), options.clone()).await?;
        elections.push(Election::new(&s, &name)?);
        sessions.push(s);
    }
    // The first leads at once; the others queue behind it, in campaign order.
    let mut first = elections[0].campaign("10.0.0.1:8080").await?;
    let (second, third) = (elections[1].clone(), elections[2].clone());
    let second = tokio::spawn(async move { second.campaign("10.0.0.2:8080").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = tokio::spawn(async move { third.campaign("10.0.0.3:8080").await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    first.proclaim("10.0.0.1:9090").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.resign().await?;
    let second = second.await.expect("campaign task")?;
    println!(
        "candidate 2 leads (term {}); now it crashes",
        second.token()
    );
    std::mem::forget(second);
    let crashed = Instant::now();
    sessions.remove(1).orphan();
    let third = third.await.expect("campaign task")?;
    println!(
        "candidate 3 leads (term {}) {:?} after the crash (lease 2 s)",
        third.token(),
        crashed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    third.resign().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    printer.abort();
    Ok(())
}
