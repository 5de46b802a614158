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
use crate::session::{Liveness, Owned};
use crate::store::{Cas, Settled};

impl Inner {
    /// Brings the index up to the mirror's current view.
    pub(super) fn sync(self: &Arc<Self>) {
        let view = self.mirror.snapshot();
        let me = self.session.id();
        let orphans: Vec<(Bytes, Bytes)> = {
            let idx = self.index.lock().unwrap();
            let mut suspects = self.suspects.lock().unwrap();
            let mine = idx.claimed.get(&me);
            // A message claimed by our session that nobody here holds is an orphan, unless our
            // own ack/nack/give-back of it is just not visible yet: act only if it stays so.
            let now = Instant::now();
            let mut found = Vec::new();
            let mut still = std::collections::HashMap::new();
            for key in mine.into_iter().flatten() {
                if self.session.owns(key) {
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
            let Some(owned) = self.session.own(key.clone()) else {
                continue;
            };
            tracing::info!(queue = %self.name, key = %String::from_utf8_lossy(&key), "giving back a claim nobody here holds");
            self.give_back(key, claimed, Some(owned));
        }
    }

    /// Gives a message claimed by us back (Ready, the attempt not counted), retrying while the
    /// session lives; does nothing if `claimed` is not our claim or is no longer stored.
    /// `owned` (the message marked as held here) is given up when it is done.
    pub(super) fn give_back(self: &Arc<Self>, key: Bytes, claimed: Bytes, owned: Option<Owned>) {
        let me = self.session.id();
        let Some(back) = Record::decode(&key, &claimed)
            .ok()
            .filter(|r| r.claimed_by(&me))
            .and_then(|r| r.release())
        else {
            return;
        };
        let back = Bytes::from(back.encode());
        let q = self.clone();
        self.session.spawn_while_alive("give-back", move || {
            let _owner = &owned;
            let (q, key, claimed, back) = (q.clone(), key.clone(), claimed.clone(), back.clone());
            async move {
                // Re-sending the same CAS stays sound (see `Cas`); refused means it is not our
                // claim any more (acked meanwhile, or taken over): nothing to give back.
                let alive = || q.session.check();
                Cas::new(&*q.store, &key, Some(&claimed), &back)
                    .while_ok(&alive)
                    .settle()
                    .await
                    .map(|_| ())
            }
        });
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
                idx.ready
                    .iter()
                    .map(|(_, k)| k)
                    .find(|k| {
                        !tried.contains(*k)
                            && !self.session.owns(k)
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
        if claimed.is_empty() {
            liveness.retain(|_| false);
            return Ok(None);
        }
        let peers = self.session.peers().await?.snapshot();
        let sessions: Vec<&str> = claimed.iter().map(|(s, _)| s.as_str()).collect();
        self.session.observe_peers(&peers, &sessions, liveness);
        for (session, keys) in &claimed {
            // Never on the word of a watch alone: a lost event must not kill a live consumer.
            if !liveness.is_dead(session, Instant::now())
                || !self.session.confirm_dead(&[session], liveness).await?
            {
                continue;
            }
            for key in keys {
                if let Some(d) = self.try_claim(key, |rec| rec.claimed_by(session)).await? {
                    tracing::info!(queue = %self.name, id = %d.record.header.id, dead = %session, "redelivering a dead consumer's message");
                    crate::metrics::count(
                        crate::metrics::QUEUE_REDELIVERIES_TOTAL,
                        "queue",
                        &self.name,
                    );
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
    #[tracing::instrument(level = "debug", name = "queue.claim", skip_all, fields(queue = %self.name, key = %crate::error::show(key)), err(level = "debug", Display))]
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
        // Held here from now on, so local workers skip it (and `sync` does not take our claim
        // for an orphan) until the delivery is finished.
        let Some(owned) = self.session.own(key.clone()) else {
            return Ok(None);
        };
        // If this future is dropped (or fails) after the CAS was sent, give the claim back.
        let mut attempt = Attempt {
            q: self.clone(),
            key: key.clone(),
            claimed: bytes.clone(),
            owned: Some(owned),
        };
        // Settled by re-sending (see `Cas`; every record's bytes are unique, `Header::w`). If
        // this future is dropped meanwhile, `attempt` gives back a claim that lands.
        let alive = || self.session.check();
        let got = Cas::new(&*self.store, key, Some(&entry.value), &bytes)
            .while_ok(&alive)
            .settle()
            .await?
            == Settled::Applied;
        let owned = attempt.owned.take();
        if !got {
            return Ok(None);
        }
        Ok(Some(Delivery {
            q: self.clone(),
            key: key.clone(),
            record: claimed,
            bytes,
            finished: false,
            owned,
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
    /// Taken when the attempt is decided: armed while it is here.
    owned: Option<Owned>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(owned) = self.owned.take() {
            self.q
                .give_back(self.key.clone(), self.claimed.clone(), Some(owned));
        }
    }
}
