//! Waiting, bounded: for the workers to start, a restarted node to serve, the queue to drain
//! and the watchers to settle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use dcoord::engine::LocalCluster;
use dcoord::queue::WorkQueue;
use dcoord::store::{RemoteOptions, RemoteStore, Store};
use dcoord::{Error, Result};
use tokio::time::Instant;

use super::check::{self, Ev};
use super::{EFFECTS, Record, read_histories};

pub(super) async fn wait_ready(histories: &[PathBuf], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready: BTreeSet<String> = read_histories(histories)
            .into_iter()
            .filter(|l| l.ev == Ev::Ready)
            .map(|l| l.w)
            .collect();
        if ready.len() >= histories.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable {
                op: "soak",
                message: format!(
                    "only {} of {} workers started within {timeout:?} (see their .log files)",
                    ready.len(),
                    histories.len()
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a restarted node serves requests itself.
pub(super) async fn wait_serving(cluster: &LocalCluster, id: u32) -> Result<()> {
    let endpoint = cluster.endpoint(id).expect("a known node");
    RemoteStore::connect(
        &[endpoint],
        RemoteOptions::default().op_deadline(Duration::from_secs(90)),
    )
    .await
    .map(|_| ())
}

/// Waits until every confirmed message has its effect (or, if poison, is a dead letter), and
/// collects the effects and dead letters into the record.
pub(super) async fn drain(
    store: &dyn Store,
    queue: &WorkQueue,
    record: &StdMutex<Record>,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let effects: BTreeMap<String, String> = match store.scan_prefix(EFFECTS.as_bytes()).await {
            Ok(scan) => scan
                .entries
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k[EFFECTS.len()..]).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let dead: BTreeSet<String> = queue
            .dead_letters()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.id)
            .collect();
        let (left, sample) = {
            let mut r = record.lock().unwrap();
            let pending: Vec<String> = r
                .facts
                .confirmed
                .iter()
                .filter(|id| {
                    if r.facts.poison.contains(*id) {
                        !dead.contains(*id)
                    } else {
                        !effects.contains_key(*id)
                    }
                })
                .cloned()
                .collect();
            r.facts.effects = effects;
            r.facts.dead = dead;
            (
                pending.len(),
                pending.into_iter().take(5).collect::<Vec<_>>(),
            )
        };
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{left} messages still unhandled {timeout:?} after the faults stopped, e.g. {sample:?}; queue stats {:?}",
                queue.stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (bounded) until every watcher slot's latest value is `n`; the checker judges.
pub(super) async fn settle_config(histories: &[PathBuf], n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for l in read_histories(histories) {
            if let Ev::Applied { n, .. } = l.ev {
                last.insert(check::slot(&l.w).to_string(), n);
            }
        }
        let watchers = last.keys().filter(|k| k.starts_with("watch-")).count();
        if watchers == 2 && last.values().all(|&v| v == n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
