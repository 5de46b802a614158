//! Claiming messages: ready ones in order, and those of consumers whose session died.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::message::{Record, State};
use super::{Delivery, Inner, now_ms};
use crate::error::Result;
use crate::session::Owned;
use crate::store::{Cas, Settled};

/// How many of the oldest ready messages a contended claim chooses from: enough for the
/// claims of a few consumers with a few in flight each to land on different messages.
pub(super) const CLAIM_WINDOW: usize = 16;

/// How long after a lost claim race claims keep spreading (see [`Inner::contended`]).
pub(super) const CONTENDED_FOR: Duration = Duration::from_secs(2);

/// Which consumer's share a message is in (modulo the number of consumers): the same for all.
fn share_of(key: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A consumer's preference among the head of the queue: a hash of its session and the key
/// (different consumers prefer different messages).
fn spread_rank(session: &str, key: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

impl Inner {
    /// Brings the index up to the mirror's current view.
    pub(super) fn sync(self: &Arc<Self>) {
        let view = self.mirror.snapshot();
        // Claims of ours the mirror now shows (or shows overtaken): the view is past them.
        self.claimed_from
            .lock()
            .unwrap()
            .retain(|k, from| view.get(k).is_some_and(|e| e.value == *from));
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

    /// Claims a due ready message nobody in this process is claiming: the oldest of the
    /// highest priority when this is the only consumer. With others (sessions seen claiming
    /// in the last lease) the head of the queue is shared: of the oldest [`CLAIM_WINDOW`] of
    /// that priority, the oldest in this consumer's share (a hash of the key, modulo the
    /// consumers), else (its share there is empty, or its claims collide) one picked by a hash
    /// of this session and the key. So consumers do not all race for the same message.
    pub(super) async fn claim_ready(self: &Arc<Self>, now: u64) -> Result<Option<Delivery>> {
        self.sync();
        let me = self.session.id();
        let within = self.session.lease().as_millis() as u64;
        let mut tried = HashSet::new();
        loop {
            let contended = self.contended();
            let candidate = {
                let mut idx = self.index.lock().unwrap();
                let consumers = idx.consumers(&me, now, within);
                let idx = &*idx;
                let share = (
                    consumers.len() as u64,
                    consumers.iter().position(|c| *c == me),
                );
                let stale = self.claimed_from.lock().unwrap();
                let mut eligible = idx.ready.iter().filter(|(_, k)| {
                    !tried.contains(k)
                        && !self.session.owns(k)
                        && idx.metas.get(k).is_some_and(|m| m.2 <= now)
                        && !stale.get(k).is_some_and(|from| {
                            self.mirror.get(k).is_some_and(|e| e.value == *from)
                        })
                });
                match (eligible.next(), share) {
                    (None, _) => None,
                    (Some(first), (1, _)) if !contended => Some(first.1.clone()),
                    (Some(first), (n, rank)) => {
                        let prio = first.0.0;
                        let window: Vec<&Bytes> = std::iter::once(first)
                            .chain(eligible.take_while(|(o, _)| o.0 == prio))
                            .take(CLAIM_WINDOW)
                            .map(|(_, k)| k)
                            .collect();
                        let mine = rank.and_then(|r| {
                            window
                                .iter()
                                .find(|k| share_of(k) % n == r as u64)
                                .filter(|_| !contended || n > 1)
                        });
                        mine.or_else(|| window.iter().min_by_key(|k| spread_rank(&me, k)))
                            .map(|k| (*k).clone())
                    }
                }
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
    pub(super) fn next_wake(&self, now: u64) -> Instant {
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
        // (Another caller busy with the orphans wakes for them.)
        if let Ok(liveness) = self.liveness.try_lock() {
            for s in idx.claimed.keys() {
                match liveness.expires_at(s) {
                    Some(at) => wake = wake.min(at),
                    None => wake = wake.min(Instant::now() + Duration::from_millis(50)),
                }
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
            .without_reread()
            .settle()
            .await?
            == Settled::Applied;
        let owned = attempt.owned.take();
        if got {
            // Until the mirror shows it, it shows the bytes we claimed from: never claim the
            // message again from those (a lost race with ourselves, taken for a collision).
            self.claimed_from
                .lock()
                .unwrap()
                .insert(key.clone(), entry.value.clone());
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
