//! `queue::WorkQueue` ("d-queue") on the embedded default: a producer enqueues jobs, two
//! consumers process them, one consumer crashes mid-job and its job is redelivered to the other
//! one lease later; a poison message ends in the dead letters and is redriven.
//!
//! Run: `cargo run --release --example queue`
//! Against a cluster: `DCOORD_ENDPOINTS=127.0.0.1:9081,... cargo run --release --example queue`

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Resize {
    image: String,
    width: u32,
}

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, _node) = common::store(dir.path()).await?;
    let name = format!("images-{}", uuid::Uuid::new_v4().simple());
    let lease = SessionOptions::default().lease(Duration::from_secs(2));
    let options = QueueOptions::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(100), Duration::from_secs(1));

    // The producer.
    let producer = Session::start(store.clone(), lease.clone()).await?;
    let q = WorkQueue::open(&producer, &name, options.clone()).await?;
    for i in 0..5 {
        let job = Resize {
            image: format!("photo-{i}.jpg"),
            width: 800,
        };
        q.enqueue_json(&job, EnqueueOptions::default().id(format!("job-{i}")))
            .await?;
    }
    q.enqueue(b"this is not JSON", EnqueueOptions::default().id("poison"))
        .await?;
    println!("enqueued 5 jobs and one poison message");

    // A consumer that crashes in the middle of its first job.
    let doomed = Session::start(store.clone(), lease.clone()).await?;
    let dq = WorkQueue::open(&doomed, &name, options.clone()).await?;
    let d = dq.next().await?;
    println!("consumer A took {} and crashes without acking", d.id());
    let crashed_job = d.id().to_string();
    std::mem::forget(d);
    doomed.orphan();
    let crashed_at = Instant::now();

    // A healthy consumer: runs every job, typed.
    let healthy = Session::start(store.clone(), lease).await?;
    let hq = WorkQueue::open(&healthy, &name, options).await?;
    let watcher = hq.clone();
    let stats = hq
        .run_json(
            2,
            move |msg, job: Resize| {
                let crashed_job = crashed_job.clone();
                async move {
                    let note = if msg.id == crashed_job {
                        format!(" (redelivered {:?} after the crash)", crashed_at.elapsed())
                    } else {
                        String::new()
                    };
                    println!(
                        "consumer B: {} attempt {}: resize {} to {}{note}",
                        msg.id, msg.attempt, job.image, job.width
                    );
                    Ok(())
                }
            },
            async move {
                while watcher.stats().done < 5 || watcher.stats().dead < 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await?;
    println!("consumer B: {} acked, {} failed", stats.acked, stats.failed);
    for dl in hq.dead_letters().await? {
        println!(
            "dead letter {}: {} attempt(s), error: {}",
            dl.id, dl.attempts, dl.error
        );
    }
    hq.redrive("poison").await?;
    let d = hq.next().await?;
    println!(
        "redriven {} is back (attempt {}); acking it by hand",
        d.id(),
        d.attempt()
    );
    d.ack().await?;
    println!("queue now: {:?}", hq.stats());
    Ok(())
}
