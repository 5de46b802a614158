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
    pub(super) fn key(&self, id: &str) -> Vec<u8> {
        let mut k = self.prefix.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Claims the first due ready message nobody in this process is claiming.
    pub(super) async fn claim_ready(self: &Arc<Self>, now: u64) -> Result<Option<Delivery>> {
        let mut tried = HashSet::new();
        loop {
            let candidate = {
                let idx = self.index.lock().unwrap();
                let claiming = self.claiming.lock().unwrap();
                idx.ready
                    .iter()
                    .map(|(_, k)| k)
                    .find(|k| {
                        !tried.contains(*k)
                            && !claiming.contains(*k)
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
        let idx = self.index.lock().unwrap();
        let mut wake = Instant::now() + self.options.rescan_every;
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
        self.claiming.lock().unwrap().insert(key.clone());
        // If this future is dropped (or fails) after the CAS was sent, give the claim back.
        let mut attempt = Attempt {
            q: self.clone(),
            key: key.clone(),
            claimed: bytes.clone(),
            back: claimed.release().encode(),
            armed: true,
        };
        let got = match self
            .store
            .compare_and_swap(key, Some(&entry.value), &bytes)
            .await
        {
            Ok(ok) => ok,
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
            self.claiming.lock().unwrap().remove(key);
            return Ok(None);
        }
        // Stays in `claiming` while held, so local workers skip it until our claim is seen.
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
    back: Vec<u8>,
    armed: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (q, key, claimed, back) = (
            self.q.clone(),
            self.key.clone(),
            self.claimed.clone(),
            std::mem::take(&mut self.back),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = q.store.compare_and_swap(&key, Some(&claimed), &back).await;
                    q.claiming.lock().unwrap().remove(&key);
                });
            }
            Err(_) => {
                q.claiming.lock().unwrap().remove(&key);
            }
        }
    }
}
