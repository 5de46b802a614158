//! The consumer's index of the queue (kept from the mirror), and the task that maintains it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::message::{Order, Record, State};
use super::{Inner, now_ms};
use crate::error::Result;

/// What the consumer knows about each message (from its mirror).
#[derive(Default)]
pub(super) struct Index {
    pub(super) metas: HashMap<Bytes, (Order, State, u64)>,
    pub(super) ready: BTreeSet<(Order, Bytes)>,
    pub(super) claimed: HashMap<String, HashSet<Bytes>>,
    pub(super) undecodable: HashSet<Bytes>,
    /// The sessions seen claiming messages of this queue, with when (wall ms): the consumers
    /// the head of the queue is shared among.
    pub(super) claimers: HashMap<String, u64>,
}

impl Index {
    /// The consumers seen claiming within `within_ms` (and `me`), sorted; forgets older ones.
    pub(super) fn consumers(&mut self, me: &str, now: u64, within_ms: u64) -> Vec<String> {
        self.claimers
            .retain(|_, at| now.saturating_sub(*at) < within_ms);
        let mut all: Vec<String> = self.claimers.keys().cloned().collect();
        if !self.claimers.contains_key(me) {
            all.push(me.to_string());
        }
        all.sort_unstable();
        all
    }

    pub(super) fn remove(&mut self, key: &Bytes) {
        self.undecodable.remove(key);
        if let Some((order, state, _)) = self.metas.remove(key) {
            match state {
                State::Ready => {
                    self.ready.remove(&(order, key.clone()));
                }
                State::Claimed { session } => {
                    if let Some(set) = self.claimed.get_mut(&session) {
                        set.remove(key);
                        if set.is_empty() {
                            self.claimed.remove(&session);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn upsert(&mut self, key: &Bytes, raw: Option<&Bytes>) {
        self.remove(key);
        let Some(raw) = raw else { return };
        let rec = match Record::decode(key, raw) {
            Ok(r) => r,
            Err(e) => {
                if self.undecodable.insert(key.clone()) {
                    tracing::warn!(error = %e, "skipping a key in a queue");
                }
                return;
            }
        };
        let h = rec.header;
        let order = h.order();
        match &h.state {
            State::Ready => {
                self.ready.insert((order.clone(), key.clone()));
            }
            State::Claimed { session } => {
                self.claimed
                    .entry(session.clone())
                    .or_default()
                    .insert(key.clone());
                self.claimers.insert(session.clone(), now_ms());
            }
            _ => {}
        }
        self.metas
            .insert(key.clone(), (order, h.state, h.not_before_ms));
    }
}

/// Keeps the index in step with the mirror, and removes expired tombstones.
pub(super) async fn maintain(
    q: std::sync::Weak<Inner>,
    mut changes: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<crate::reconcile::Change>> + Send>,
    >,
) {
    let mut janitor = tokio::time::interval(Duration::from_secs(60));
    janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { return };
                let Some(q) = q.upgrade() else { return };
                match change {
                    Ok(c) => q.index.lock().unwrap().upsert(&c.key, c.new.as_ref()),
                    Err(_) => {
                        // Fell behind: rebuild from the mirror's current view.
                        let view = q.mirror.snapshot();
                        let mut idx = q.index.lock().unwrap();
                        *idx = Index::default();
                        for e in view.iter() {
                            idx.upsert(&e.key, Some(&e.value));
                        }
                    }
                }
                let depth = {
                    let idx = q.index.lock().unwrap();
                    idx.ready.len() + idx.claimed.values().map(|s| s.len()).sum::<usize>()
                };
                metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => q.name.clone()).set(depth as f64);
                q.changed.notify_waiters();
            }
            _ = janitor.tick() => {
                let Some(inner) = q.upgrade() else { return };
                if sweep.as_ref().is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                let cutoff = now_ms().saturating_sub(inner.options.retention.as_millis() as u64);
                let expired: Vec<Bytes> = inner.index.lock().unwrap().metas.iter()
                    .filter(|(_, m)| expired_at(&m.1, cutoff))
                    .map(|(k, _)| k.clone())
                    .collect();
                // In a task of its own: a sweep of many tombstones on a slow store takes
                // seconds, and the index must keep up with the changes meanwhile.
                sweep = Some(tokio::spawn(sweep_tombstones(q.clone(), expired, cutoff)));
            }
        }
    }
}

fn expired_at(state: &State, cutoff_ms: u64) -> bool {
    matches!(state, State::Done { at_ms } if *at_ms < cutoff_ms)
}

/// Deletes the expired Done tombstones in `keys`, each only if the mirror still shows it as one
/// (a message enqueued again under its id since the list was made stays).
///
/// NOT guaranteed: the check and the delete are two steps (the store has no conditional
/// delete), so an enqueue of the same id in between can still be deleted with the tombstone.
async fn sweep_tombstones(q: std::sync::Weak<Inner>, keys: Vec<Bytes>, cutoff_ms: u64) {
    for key in keys {
        let Some(q) = q.upgrade() else { return };
        let still = q.mirror.snapshot().get(&key).is_some_and(|e| {
            Record::decode(&key, &e.value).is_ok_and(|r| expired_at(&r.header.state, cutoff_ms))
        });
        if still {
            let _ = q.store.delete(&key).await;
        }
    }
}
