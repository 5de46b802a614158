//! Claiming messages: ready ones in order, and those of consumers whose session died.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::index::{Id, local_ms, pick, ripe, version_of};
use super::message::{Record, State};
use super::{Delivery, Inner, now_ms};
use crate::error::Result;
use crate::session::Owned;
use crate::store::{Cas, Consistency, Settled};

/// How long after a lost claim race claims keep spreading (see [`Inner::contended`]).
pub(super) const CONTENDED_FOR: Duration = Duration::from_secs(2);

impl Inner {
    /// Forgets the claims of ours the index now shows (or shows overtaken), and gives back
    /// the messages claimed by our session that nobody here holds.
    pub(super) fn sync(self: &Arc<Self>) {
        let me = self.session.id();
        let orphans: Vec<Id> = {
            let idx = self.index.lock().unwrap();
            self.claimed_from
                .lock()
                .unwrap()
                .retain(|id, from| idx.metas.get(id).is_some_and(|m| m.version == *from));
            let mut suspects = self.suspects.lock().unwrap();
            // A message claimed by our session that nobody here holds is an orphan, unless our
            // own ack/nack/give-back of it is just not visible yet: act only if it stays so.
            let now = Instant::now();
            let mut found = Vec::new();
            let mut still = std::collections::HashMap::new();
            for id in idx.claimed.get(me.as_str()).into_iter().flatten() {
                if self.session.owns(&self.key(id)) {
                    continue;
                }
                let Some(version) = idx.metas.get(id).map(|m| m.version) else {
                    continue;
                };
                match suspects.get(id) {
                    Some((v, since)) if *v == version => {
                        if now.duration_since(*since) >= Duration::from_secs(2) {
                            found.push(id.clone());
                        } else {
                            still.insert(id.clone(), (version, *since));
                        }
                    }
                    _ => {
                        still.insert(id.clone(), (version, now));
                    }
                }
            }
            *suspects = still;
            found
        };
        for id in orphans {
            let key = Bytes::from(self.key(&id));
            let Some(owned) = self.session.own(key.clone()) else {
                continue;
            };
            tracing::info!(queue = %self.name, id = %id, "giving back a claim nobody here holds");
            self.give_back(key, None, Some(owned));
        }
    }

    /// Gives a message claimed by us back (Ready, the attempt not counted), retrying while the
    /// session lives; does nothing if `claimed` (the claim's bytes; `None`: as read now) is not
    /// our claim or is no longer stored. `owned` (the message marked as held here) is given up
    /// when it is done.
    pub(super) fn give_back(
        self: &Arc<Self>,
        key: Bytes,
        claimed: Option<Bytes>,
        owned: Option<Owned>,
    ) {
        let me = self.session.id();
        let q = self.clone();
        self.session.spawn_while_alive("give-back", move || {
            let _owner = &owned;
            let (q, key, claimed, me) = (q.clone(), key.clone(), claimed.clone(), me.clone());
            async move {
                let claimed = match claimed {
                    Some(c) => c,
                    None => match q.store.get(&key, Consistency::Linearizable).await? {
                        Some(c) => c,
                        None => return Ok(()),
                    },
                };
                let Some(back) = Record::decode(&key, &claimed)
                    .ok()
                    .filter(|r| r.claimed_by(&me))
                    .and_then(|r| r.release())
                else {
                    return Ok(());
                };
                let back = back.encode();
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

    /// Claims a due ready message nobody in this process is claiming, chosen by [`pick`]: the
    /// oldest of the highest priority when this is the only consumer; with others (sessions
    /// seen claiming in the last lease), the oldest of this consumer's share of the head of the
    /// queue, or (that empty) one of the others' shares they have left for [`STEAL_AFTER_MS`].
    /// So consumers do not all race for the same message. `Err`: nothing to claim, and when
    /// to look again at the latest (a message of another's share becomes ours to take).
    ///
    /// [`STEAL_AFTER_MS`]: super::index::STEAL_AFTER_MS
    pub(super) async fn claim_ready(
        self: &Arc<Self>,
        now: u64,
    ) -> Result<std::result::Result<Delivery, Option<Instant>>> {
        self.sync();
        let me = self.session.id();
        let within = self.session.lease().as_millis() as u64;
        let mut tried: HashSet<Id> = HashSet::new();
        loop {
            let contended = self.contended();
            let candidate = {
                let mut idx = self.index.lock().unwrap();
                let (consumers, rank) = idx.share(&me, now, within);
                let idx = &*idx;
                // Claimed by us from bytes the index still shows: not claimable again.
                let stale = self.claimed_from.lock().unwrap();
                let eligible = idx
                    .ready
                    .iter()
                    .filter(|(_, id)| {
                        !tried.contains(id)
                            && idx.metas.get(id).is_some_and(|m| {
                                m.not_before_ms <= now && stale.get(id) != Some(&m.version)
                            })
                            && !self.session.owns(&self.key(id))
                    })
                    .map(|(o, id)| (o, id));
                let local = local_ms();
                let ripe = |id: &Id| match idx.metas.get(id) {
                    Some(m) => ripe(m.since, local),
                    None => Ok(()),
                };
                pick(eligible, consumers, rank, contended, &me, ripe).cloned()
            };
            let id = match candidate {
                Ok(id) => id,
                Err(wait) => {
                    let at = wait.map(|ms| Instant::now() + Duration::from_millis(ms.into()));
                    return Ok(Err(at));
                }
            };
            tried.insert(id.clone());
            if let Some(d) = self
                // The bytes claimed from can be newer than the index (read now): a nacked
                // message in its backoff is not taken early.
                .try_claim(&id, |rec| {
                    matches!(rec.header.state, State::Ready) && rec.header.not_before_ms <= now
                })
                .await?
            {
                return Ok(Ok(d));
            }
        }
    }

    /// True while a claim of this consumer lost a race with another consumer's in the last
    /// [`CONTENDED_FOR`]: claims spread over the head of the queue then.
    pub(super) fn contended(&self) -> bool {
        let last = self.collided_at_ms.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) < CONTENDED_FOR.as_millis() as u64
    }

    /// Takes over messages claimed by sessions that are dead (visibility timeout).
    ///
    /// What this consumer has observed of the other consumers' heartbeats persists across
    /// calls ([`Inner::liveness`]), so a dead consumer is noticed one lease after its last
    /// heartbeat however busy the queue is. One caller at a time does this (the others skip
    /// it: it is the same work).
    pub(super) async fn claim_orphaned(self: &Arc<Self>) -> Result<Option<Delivery>> {
        let Ok(mut liveness) = self.liveness.try_lock() else {
            return Ok(None);
        };
        let liveness = &mut *liveness;
        let me = self.session.id();
        let claimed: Vec<(String, Vec<Id>)> = {
            let idx = self.index.lock().unwrap();
            idx.claimed
                .iter()
                .filter(|(s, _)| ***s != *me)
                .map(|(s, ids)| (s.to_string(), ids.iter().cloned().collect()))
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
            for id in keys {
                if let Some(d) = self.try_claim(id, |rec| rec.claimed_by(session)).await? {
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
    pub(super) fn next_wake(&self, now: u64) -> Instant {
        let mut wake = Instant::now() + self.options.rescan_every;
        if !self.suspects.lock().unwrap().is_empty() {
            wake = wake.min(Instant::now() + Duration::from_millis(2100));
        }
        let idx = self.index.lock().unwrap();
        if let Some(due) = idx.next_due_after(now) {
            wake = wake.min(Instant::now() + Duration::from_millis(due - now));
        }
        // (Another caller busy with the orphans wakes for them.)
        if let Ok(liveness) = self.liveness.try_lock() {
            for s in idx.claimed.keys() {
                match liveness.expires_at(s.as_ref()) {
                    Some(at) => wake = wake.min(at),
                    None => wake = wake.min(Instant::now() + Duration::from_millis(50)),
                }
            }
        }
        wake
    }

    /// CAS-claims message `id` if `eligible`; `None` if someone else got it or it changed.
    /// Its bytes are the index's, or read now.
    #[tracing::instrument(level = "debug", name = "queue.claim", skip_all, fields(queue = %self.name, id = %id), err(level = "debug", Display))]
    async fn try_claim(
        self: &Arc<Self>,
        id: &Id,
        eligible: impl Fn(&Record) -> bool,
    ) -> Result<Option<Delivery>> {
        let key = Bytes::from(self.key(id));
        let cached = self.index.lock().unwrap().bytes(id);
        let current = match cached {
            Some(b) => b,
            None => match self.store.get(&key, Consistency::Lease).await? {
                Some(b) => b,
                None => return Ok(None),
            },
        };
        let Ok(rec) = Record::decode(&key, &current) else {
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
        let got = Cas::new(&*self.store, &key, Some(&current), &bytes)
            .while_ok(&alive)
            .without_reread()
            .settle()
            .await?
            == Settled::Applied;
        let owned = attempt.owned.take();
        if got {
            // Until the index shows it, it shows the bytes we claimed from: never claim the
            // message again from those (a lost race with ourselves, taken for a collision).
            self.claimed_from
                .lock()
                .unwrap()
                .insert(id.clone(), version_of(&current));
        }
        if !got {
            // Someone changed it first: another consumer's claim, normally.
            self.collided_at_ms
                .store(now_ms().max(1), Ordering::Relaxed);
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some(Delivery {
            q: self.clone(),
            key,
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
                .give_back(self.key.clone(), Some(self.claimed.clone()), Some(owned));
        }
    }
}
