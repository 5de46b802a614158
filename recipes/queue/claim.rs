//! Claiming messages: ready ones in order, and those of consumers whose session died.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Delivery;
use super::Inner;
use super::message::{Record, State};
use crate::error::Result;
use crate::session::Liveness;
use crate::store::Consistency;

impl Inner {
    /// Brings the index up to the mirror's current view.
    pub(super) fn sync(self: &Arc<Self>) {
        let view = self.mirror.snapshot();
        let me = self.session.id();
        let orphans: Vec<(Bytes, Bytes)> = {
            let idx = self.index.lock().unwrap();
            let held = super::held().lock().unwrap();
            let mut suspects = self.suspects.lock().unwrap();
            let mine = idx.claimed.get(&me);
            // A message claimed by our session that nobody here holds is an orphan, unless our
            // own ack/nack/give-back of it is just not visible yet: act only if it stays so.
            let now = Instant::now();
            let mut found = Vec::new();
            let mut still = std::collections::HashMap::new();
            for key in mine.into_iter().flatten() {
                if held.contains(&(me.clone(), key.clone())) {
                    continue;
                }
                let Some(bytes) = view.get(key).map(|e| e.value.clone()) else {
                    continue;
                };
                // The index can lag the mirror (it is rebuilt from the same changes, later):
                // only a record the view still shows as claimed by us can be our orphan. Our
                // own ack, nack or give-back, or a takeover, is not.
                if !Record::decode(key, &bytes).is_ok_and(|r| r.claimed_by(&me)) {
                    continue;
                }
                match suspects.get(key) {
                    Some((b, since)) if *b == bytes => {
                        if now.duration_since(*since) >= Duration::from_secs(2) {
                            found.push((key.clone(), bytes));
                        } else {
                            still.insert(key.clone(), (bytes, *since));
                        }
                    }
                    _ => {
                        still.insert(key.clone(), (bytes, now));
                    }
                }
            }
            *suspects = still;
            found
        };
        for (key, claimed) in orphans {
            if !self.returning.lock().unwrap().insert(key.clone()) {
                continue;
            }
            tracing::info!(queue = %self.name, key = %String::from_utf8_lossy(&key), "giving back a claim nobody here holds");
            self.give_back(key, claimed);
        }
    }

    /// Gives a message claimed by us back (Ready, the attempt not counted), retrying until the
    /// store answers; does nothing if `claimed` is not our claim or is no longer stored.
    pub(super) fn give_back(self: &Arc<Self>, key: Bytes, claimed: Bytes) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let q = self.clone();
        rt.spawn(async move {
            let me = q.session.id();
            let ours = Record::decode(&key, &claimed)
                .ok()
                .filter(|r| r.claimed_by(&me))
                .and_then(|r| r.release());
            if let Some(back) = ours {
                let back = back.encode();
                let mut backoff = crate::reconcile::Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_secs(2),
                );
                loop {
                    match q.store.compare_and_swap(&key, Some(&claimed), &back).await {
                        Ok(_) => break,
                        Err(e)
                            if (e.is_retryable() || e.is_ambiguous()) && q.session.is_alive() =>
                        {
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                        Err(_) => break,
                    }
                }
            }
            q.returning.lock().unwrap().remove(&key);
        });
    }

    pub(super) fn hold(&self, key: &Bytes) {
        super::held()
            .lock()
            .unwrap()
            .insert((self.session.id(), key.clone()));
    }

    pub(super) fn unhold(&self, key: &Bytes) {
        super::held()
            .lock()
            .unwrap()
            .remove(&(self.session.id(), key.clone()));
    }

    pub(super) fn key(&self, id: &str) -> Vec<u8> {
        let mut k = self.prefix.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Claims the first due ready message nobody in this process is claiming.
    pub(super) async fn claim_ready(self: &Arc<Self>, now: u64) -> Result<Option<Delivery>> {
        self.sync();
        let mut tried = HashSet::new();
        loop {
            let candidate = {
                let idx = self.index.lock().unwrap();
                let held = super::held().lock().unwrap();
                let me = self.session.id();
                idx.ready
                    .iter()
                    .map(|(_, k)| k)
                    .find(|k| {
                        !tried.contains(*k)
                            && !held.contains(&(me.clone(), (*k).clone()))
                            && idx.metas.get(*k).is_some_and(|m| m.2 <= now)
                    })
                    .cloned()
            };
            let Some(key) = candidate else {
                return Ok(None);
            };
            tried.insert(key.clone());
            if let Some(d) = self
                .try_claim(&key, |rec| matches!(rec.header.state, State::Ready))
                .await?
            {
                return Ok(Some(d));
            }
        }
    }

    /// Takes over messages claimed by sessions that are dead (visibility timeout).
    pub(super) async fn claim_orphaned(
        self: &Arc<Self>,
        liveness: &mut Liveness,
    ) -> Result<Option<Delivery>> {
        let me = self.session.id();
        let claimed: Vec<(String, Vec<Bytes>)> = {
            let idx = self.index.lock().unwrap();
            idx.claimed
                .iter()
                .filter(|(s, _)| **s != me)
                .map(|(s, keys)| (s.clone(), keys.iter().cloned().collect()))
                .collect()
        };
        liveness.retain(|id| claimed.iter().any(|(s, _)| s == id));
        if claimed.is_empty() {
            return Ok(None);
        }
        let peers = self.session.peers().await?.snapshot();
        let now = Instant::now();
        for (session, keys) in claimed {
            let hb_key = self.session.heartbeat_key(&session);
            liveness.observe(&session, peers.get(&hb_key).map(|e| &e.value), now);
            if !liveness.is_dead(&session, now) {
                continue;
            }
            // Never on the word of a watch alone: a lost event must not kill a live consumer.
            let hb = self.store.get(&hb_key, Consistency::Linearizable).await?;
            let now = Instant::now();
            liveness.observe(&session, hb.as_ref(), now);
            if !liveness.is_dead(&session, now) {
                continue;
            }
            for key in keys {
                let s = session.clone();
                if let Some(d) = self.try_claim(&key, move |rec| rec.claimed_by(&s)).await? {
                    tracing::info!(queue = %self.name, id = %d.record.header.id, dead = %session, "redelivering a dead consumer's message");
                    return Ok(Some(d));
                }
            }
        }
        Ok(None)
    }

    /// When to look again without a change: the next delayed message, or the next claim
    /// that could expire.
    pub(super) fn next_wake(&self, now: u64, liveness: &Liveness) -> Instant {
        let mut wake = Instant::now() + self.options.rescan_every;
        if !self.suspects.lock().unwrap().is_empty() {
            wake = wake.min(Instant::now() + Duration::from_millis(2100));
        }
        let idx = self.index.lock().unwrap();
        if let Some(due) = idx
            .metas
            .values()
            .filter(|m| matches!(m.1, State::Ready) && m.2 > now)
            .map(|m| m.2)
            .min()
        {
            wake = wake.min(Instant::now() + Duration::from_millis(due - now));
        }
        for s in idx.claimed.keys() {
            match liveness.expires_at(s) {
                Some(at) => wake = wake.min(at),
                None => wake = wake.min(Instant::now() + Duration::from_millis(50)),
            }
        }
        wake
    }

    /// CAS-claims `key` if `eligible`; `None` if someone else got it or it changed.
    async fn try_claim(
        self: &Arc<Self>,
        key: &Bytes,
        eligible: impl Fn(&Record) -> bool,
    ) -> Result<Option<Delivery>> {
        let Some(entry) = self.mirror.get(key) else {
            return Ok(None);
        };
        let Ok(rec) = Record::decode(key, &entry.value) else {
            return Ok(None);
        };
        if !eligible(&rec) {
            return Ok(None);
        }
        let me = self.session.id();
        let claimed = rec.claim(&me);
        let bytes = Bytes::from(claimed.encode());
        self.hold(key);
        // If this future is dropped (or fails) after the CAS was sent, give the claim back.
        let mut attempt = Attempt {
            q: self.clone(),
            key: key.clone(),
            claimed: bytes.clone(),
            armed: true,
        };
        let got = match self
            .store
            .compare_and_swap(key, Some(&entry.value), &bytes)
            .await
        {
            Ok(ok) => ok,
            // If it lands after this read says no, `sync` finds it claimed by us and not held,
            // and gives it back.
            Err(e) if e.is_ambiguous() => {
                self.store
                    .get(key, Consistency::Linearizable)
                    .await?
                    .as_ref()
                    == Some(&bytes)
            }
            Err(e) => return Err(e),
        };
        attempt.armed = false;
        if !got {
            self.unhold(key);
            return Ok(None);
        }
        // Stays held (see `held`) until the delivery is finished, so local workers skip it.
        Ok(Some(Delivery {
            q: self.clone(),
            key: key.clone(),
            record: claimed,
            bytes,
            finished: false,
            poison: Arc::new(Mutex::new(None)),
        }))
    }
}

/// An in-flight claim: dropped while armed, it gives the message back (if the claim landed)
/// and forgets it locally, in the background.
struct Attempt {
    q: Arc<Inner>,
    key: Bytes,
    claimed: Bytes,
    armed: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.q.unhold(&self.key);
        self.q.give_back(self.key.clone(), self.claimed.clone());
    }
}
