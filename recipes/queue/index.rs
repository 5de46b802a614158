//! The consumer's index of the queue (kept from the mirror), and the task that maintains it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;

use super::message::{Order, Record, State};
use super::{Inner, now_ms};
use crate::reconcile::Snapshot;

/// What the consumer knows about each message (from its mirror).
#[derive(Default)]
pub(super) struct Index {
    pub(super) metas: HashMap<Bytes, (Order, State, u64)>,
    pub(super) ready: BTreeSet<(Order, Bytes)>,
    pub(super) claimed: HashMap<String, HashSet<Bytes>>,
    pub(super) undecodable: HashSet<Bytes>,
    /// The mirror view this index reflects.
    seen: Snapshot,
}

impl Index {
    /// Brings the index up to `view` (only what changed since the last view is looked at).
    pub(super) fn sync(&mut self, view: &Snapshot) {
        let changes: Vec<(Bytes, Option<Bytes>)> = self
            .seen
            .diff(view)
            .map(|(k, e)| (k.clone(), e.map(|e| e.value.clone())))
            .collect();
        for (key, value) in changes {
            self.upsert(&key, value.as_ref());
        }
        self.seen = view.clone();
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
                    tracing::warn!("skipping a key in a queue: {e}");
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
            }
            _ => {}
        }
        self.metas
            .insert(key.clone(), (order, h.state, h.not_before_ms));
    }
}

/// Keeps the index in step with the mirror, and removes expired tombstones.
/// Deletes acked tombstones once they are older than the retention period.
pub(super) async fn janitor(q: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(q) = q.upgrade() else { return };
        q.sync();
        let cutoff = now_ms().saturating_sub(q.options.retention.as_millis() as u64);
        let expired: Vec<Bytes> = q
            .index
            .lock()
            .unwrap()
            .metas
            .iter()
            .filter(|(_, m)| matches!(m.1, State::Done { at_ms } if at_ms < cutoff))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            let _ = q.store.delete(&key).await;
        }
    }
}
