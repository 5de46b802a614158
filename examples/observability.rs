//! What a service installs to see dcoord at work: a `tracing` subscriber (the library's
//! warnings, and with `RUST_LOG=dcoord=debug` its spans: `lock.acquire{lock=..}`,
//! `queue.claim{queue=..,key=..}`, `reconcile.relist{prefix=..,reason=..}`,
//! `store{store=..,op=..,key=..}`, errors as `error` fields) and a `metrics` recorder (here
//! Prometheus' text format, printed at the end; serve it with the exporter's HTTP listener).
//!
//! Run: `cargo run --release --example observability`
//! More detail: `RUST_LOG=info,dcoord=debug cargo run --release --example observability`

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    // 1. Logs: dcoord logs through `tracing`; without a subscriber its warnings go nowhere.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,dcoord=info".into()),
        )
        .init();
    // 2. Metrics: any `metrics` recorder; dcoord's series appear under `dcoord_*`.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("no other recorder installed");
    dcoord::metrics::describe();

    let dir = tempfile::tempdir().expect("temp dir");
    let (store, node) = common::store(dir.path()).await?;
    let session = Session::start(store.clone(), SessionOptions::default()).await?;

    let lock = dcoord::lock::Mutex::new(&session, "observed")?;
    for _ in 0..3 {
        lock.acquire().await?.release().await?;
    }
    let queue = WorkQueue::open(&session, "observed", QueueOptions::default()).await?;
    for i in 0..5 {
        queue
            .enqueue(format!("job {i}").as_bytes(), EnqueueOptions::default())
            .await?;
    }
    for _ in 0..5 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), queue.next())
            .await
            .expect("a delivery within 10 s")?;
        delivery.ack().await?;
    }

    println!("dcoord's series after 3 lock grants and 5 queue messages:");
    for line in metrics.render().lines() {
        let summary = line.contains("_seconds{") && !line.contains("quantile=\"0.99\"");
        if line.starts_with("dcoord_") && !summary {
            println!("  {line}");
        }
    }
    drop((queue, lock));
    session.close().await?;
    if let Some(node) = node {
        node.stop().await?;
    }
    Ok(())
}
