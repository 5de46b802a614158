//! The harness's own load, in-process: the producer, the store probe and the config writer.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use dcoord::Result;
use dcoord::config::ConfigWatch;
use dcoord::queue::{EnqueueOptions, WorkQueue};
use dcoord::store::{Consistency, RemoteStore, Store};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Record;
use super::worker::{Job, SoakConfig, now_us};

/// Enqueues a message every ~40 ms (every 50th poison), each retried with its id until it
/// is confirmed (idempotent by id).
pub(super) async fn produce(
    q: WorkQueue,
    stop: watch::Receiver<bool>,
    record: Arc<StdMutex<Record>>,
) {
    let mut i = 0u64;
    while !*stop.borrow() {
        let id = format!("m-{i:06}");
        let job = Job {
            i,
            poison: i % 50 == 7,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ok = loop {
            match q
                .enqueue_json(&job, EnqueueOptions::default().id(&id))
                .await
            {
                Ok(_) => break true,
                Err(e) if (e.is_retryable() || e.is_ambiguous()) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    eprintln!("soak: enqueue {id} gave up: {e}");
                    break false;
                }
            }
        };
        {
            let mut r = record.lock().unwrap();
            if ok {
                r.facts.confirmed.insert(id.clone());
                if job.poison {
                    r.facts.poison.insert(id);
                }
            } else {
                r.enqueue_errors += 1;
                r.facts.unconfirmed.insert(id);
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// The store itself, under the same faults: increments a counter with compare-and-swap and
/// checks that no linearizable read ever returns less than a value whose write was
/// acknowledged. A violation here is d-engine's, not a recipe's.
pub(super) async fn count(
    store: RemoteStore,
    stop: watch::Receiver<bool>,
    record: Arc<StdMutex<Record>>,
) {
    let key = b"/soak/counter";
    let mut acked = 0u64;
    let mut last_ack = now_us();
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let Ok(current) = store.get(key, Consistency::Linearizable).await else {
            continue;
        };
        let value = current
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        if value < acked {
            let leader = store.leader_id().await;
            let mut r = record.lock().unwrap();
            if r.regressions.len() < 20 {
                r.regressions.push((
                    now_us(),
                    format!("read {value} after {acked} was acknowledged (leader {leader:?})"),
                ));
            }
            acked = value;
            continue;
        }
        let next = (value + 1).to_string();
        if let Ok(true) = store
            .compare_and_swap(key, current.as_deref(), next.as_bytes())
            .await
        {
            acked = value + 1;
            let now = now_us();
            let mut r = record.lock().unwrap();
            r.counter_writes += 1;
            let gap = now.saturating_sub(last_ack);
            if gap > r.longest_stall.0 {
                r.longest_stall = (gap, now);
            }
            last_ack = now;
        }
    }
}

/// Publishes n = 2, 3, ... every ~150 ms.
pub(super) async fn write_config(
    cfg: Arc<ConfigWatch<SoakConfig>>,
    stop: watch::Receiver<bool>,
    record: Arc<StdMutex<Record>>,
) {
    let mut n = 2;
    while !*stop.borrow() {
        record.lock().unwrap().max_attempted = n;
        match cfg.publish(&SoakConfig { n }).await {
            Ok(()) => record.lock().unwrap().writes.push((n, now_us())),
            Err(_) => record.lock().unwrap().write_errors += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

pub(super) async fn publish_final(
    cfg: &ConfigWatch<SoakConfig>,
    n: u64,
    record: &StdMutex<Record>,
) -> Result<()> {
    record.lock().unwrap().max_attempted = n;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match cfg.publish(&SoakConfig { n }).await {
            Ok(()) => {
                record.lock().unwrap().writes.push((n, now_us()));
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("soak: final config write failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
