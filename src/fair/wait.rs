//! A queued wait: observe, [`decide`], act, sleep; until granted or its slot vanishes.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::decide::{Step, decide, sessions_in_sight};
use super::record::{Entry, Record, Released, Slot};
use super::{Fair, Holding, Pending, bump, spawn_leave};
use crate::error::{Error, Result};
use crate::reconcile::Snapshot;
use crate::session::Liveness;

/// What woke a sleeping waiter.
#[derive(Debug, PartialEq, Eq)]
enum Woke {
    /// A change of the record's mirror.
    Record,
    /// A heartbeat, a timer (with a fresh read), a lost session.
    Other,
}

/// What a waiter's decision depended on in the mirror ([`Waiter::sight`]).
#[derive(Debug, PartialEq, Eq)]
struct Sight {
    seq: u64,
    releases: Vec<(Bytes, u64, Bytes)>,
    arrivals: Option<Vec<(Bytes, u64, Bytes)>>,
}

/// How a queued acquire ended.
pub(super) enum Queued {
    Granted(Holding),
    /// Our slot left the record without us: queue again with a new one.
    Vanished,
}

/// One queued slot's wait: what it knows, and what it wakes on.
pub(super) struct Waiter<'a> {
    inner: &'a Arc<Fair>,
    me: Entry,
    /// The newest record bytes known.
    current: Option<Bytes>,
    liveness: Liveness,
    record: watch::Receiver<Snapshot>,
    /// The session's peers mirror, subscribed once someone is ahead of us.
    peers: Option<watch::Receiver<Snapshot>>,
    /// When to re-read the record even without a change (a lost watch event).
    next_read: Instant,
    /// Our arrival key is still there (not yet taken into the queue).
    announced: bool,
    /// Since when (and for which record `seq`) a batch that grants us has waited for its
    /// writer.
    batched: Option<(u64, Instant)>,
    /// Wake by then even if nothing changes (this turn of the loop only).
    wake_by: Option<Instant>,
}

/// How long a waiter a batch grants waits for the batch's writer before writing it itself: a
/// few write latencies on a busy cluster, well under a lease (a writer that is alive but
/// stalled, or whose mirror is behind, must not hold the others for a lease).
fn batch_patience(lease: std::time::Duration) -> std::time::Duration {
    use std::time::Duration;
    (lease / 20).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

impl<'a> Waiter<'a> {
    /// Announces `me` (a key of our own: no contention with anyone) and starts waiting.
    pub(super) async fn join(inner: &'a Arc<Fair>, me: Entry) -> Result<Waiter<'a>> {
        // Not empty: d-engine 0.2.4's own FileStateMachine drops empty values after a crash
        // (a cluster not run by dcoord may use it).
        // No read of the record beside it: the mirror is at most a watch event behind, and
        // that event wakes us; a write built on a stale record is refused by its CAS; a lost
        // event is made up by the periodic re-read (`next_read`). The read cost every
        // contended acquire a round trip (bench-etcd (h), 2026-12-07: about 5% of grants/s).
        let arrival = inner.arrival_key(&me.slot);
        let bytes = me.arrival_bytes();
        inner.store.put(&arrival, &bytes).await?;
        let current = inner.newer(None, &inner.record.snapshot());
        Ok(Waiter {
            current,
            liveness: Liveness::new(inner.session.lease()),
            record: inner.record.subscribe(),
            peers: None,
            next_read: Self::read_due(inner),
            announced: true,
            batched: None,
            wake_by: None,
            inner,
            me,
        })
    }

    fn read_due(inner: &Fair) -> Instant {
        Instant::now() + inner.session.lease() / 2
    }

    /// Waits until granted, or until our slot vanishes.
    pub(super) async fn run(mut self, pending: &mut Pending) -> Result<Queued> {
        let inner = self.inner;
        loop {
            self.wake_by = None;
            let snap = self.record.borrow_and_update().clone();
            self.current = inner.newer(self.current.take(), &snap);
            let rec = inner.decode_shared(self.current.as_ref())?;
            let arrivals = inner.arrivals_in(&snap);
            let released = inner.releases_in(&snap);
            let blockers = match self.decide(&rec, &released, &arrivals).await? {
                Step::Granted { token } => {
                    tracing::debug!(kind = inner.kind, name = %inner.name, me = ?self.me.slot, seq = rec.seq, token, "granted");
                    bump(&inner.stats.grants);
                    crate::metrics::count(
                        crate::metrics::LOCK_ACQUIRED_TOTAL,
                        inner.kind,
                        &inner.name,
                    );
                    // Our arrival key, if it is still there, went with the write that took
                    // us in (or goes with the next one: see `Fair::garbage`).
                    let owned = pending.hand_over();
                    let holding = Holding::new(
                        inner.clone(),
                        self.me.slot,
                        owned,
                        token,
                        rec.seq,
                        self.current,
                    );
                    return Ok(Queued::Granted(holding));
                }
                Step::Vanished => {
                    pending.disarm();
                    inner.session.check()?;
                    tracing::warn!(kind = inner.kind, name = %inner.name, "our queue entry vanished; queueing again");
                    return Ok(Queued::Vanished);
                }
                _ if self.announced && rec.contains(&self.me.slot) => {
                    // Taken into the queue: the arrival key has done its job, and the write
                    // that took us in deleted it (or the next one does).
                    self.announced = false;
                    continue;
                }
                Step::Take(next) => {
                    // Free, and we are first in line: take it, taking the others in too.
                    self.write(next).await?;
                    continue;
                }
                Step::Reap {
                    next,
                    dead,
                    blockers,
                } => {
                    if self.reap(next, &dead).await? {
                        continue;
                    }
                    blockers
                }
                Step::Batched { next, writer } => {
                    let now = Instant::now();
                    let since = match self.batched {
                        Some((seq, since)) if seq == rec.seq => since,
                        _ => {
                            self.batched = Some((rec.seq, now));
                            now
                        }
                    };
                    let due = since + batch_patience(inner.session.lease());
                    if now >= due {
                        tracing::debug!(kind = inner.kind, name = %inner.name, me = ?self.me.slot, ?writer, seq = rec.seq, "the batch's writer has not written: writing it");
                        self.write(next).await?;
                        continue;
                    }
                    self.wake_by = Some(due);
                    vec![writer]
                }
                Step::Wait { blockers } => blockers,
            };
            self.clean_up_abandoned(&blockers);
            let sight = self.sight(&snap, &rec);
            // A change of the mirror that leaves what we decided on as it was (an arrival
            // behind us, a cleanup) decides nothing anew: every waiter wakes on every change.
            while self.sleep(&blockers).await? == Woke::Record {
                let snap = self.record.borrow_and_update().clone();
                let current = inner.newer(self.current.clone(), &snap);
                let rec = inner.decode_shared(current.as_ref())?;
                if self.sight(&snap, &rec) != sight {
                    break;
                }
            }
        }
    }

    /// What our next decision depends on in the mirror (see [`decide`]): the record (its
    /// `seq` rises with every write), the release markers and, until the record has taken us
    /// in, the arrivals (once queued, arrivals join behind us and change nothing for us: FIFO).
    fn sight(&self, snap: &Snapshot, rec: &Record) -> Sight {
        let inner = self.inner;
        let marks = |prefix: &[u8]| -> Vec<(Bytes, u64, Bytes)> {
            snap.with_prefix(prefix)
                .map(|e| (e.key.clone(), e.revision, e.value.clone()))
                .collect()
        };
        Sight {
            seq: rec.seq,
            releases: marks(&inner.releases),
            arrivals: (!rec.contains(&self.me.slot)).then(|| marks(&inner.arrivals)),
        }
    }

    /// [`decide`], after observing the heartbeats of whoever is ahead (the peers mirror starts
    /// on first use: not needed while nobody is ahead).
    async fn decide(
        &mut self,
        rec: &Record,
        released: &[Released],
        arrivals: &[Entry],
    ) -> Result<Step> {
        let me = &self.me;
        let step =
            |liveness: &Liveness| decide(rec, released, arrivals, me, liveness, Instant::now());
        if self.peers.is_none() {
            let first = step(&self.liveness);
            if !matches!(
                first,
                Step::Wait { .. } | Step::Reap { .. } | Step::Batched { .. }
            ) {
                return Ok(first);
            }
            let peers = self.inner.session.peers().await?;
            self.peers = Some(peers.subscribe());
        }
        // Observed first once subscribed: one decision per wake.
        let rx = self.peers.as_mut().expect("subscribed above");
        let view = rx.borrow_and_update().clone();
        let ids = sessions_in_sight(rec, arrivals, &me.slot);
        self.inner
            .session
            .observe_peers(&view, &ids, &mut self.liveness);
        Ok(step(&self.liveness))
    }

    /// Writes `next` over the record we know (settled; the loop reads the outcome from it).
    async fn write(&mut self, next: Record) -> Result<()> {
        let mine = self.announced.then_some(&self.me.slot);
        self.current = self.inner.cas(self.current.take(), &next, mine).await?;
        self.next_read = Self::read_due(self.inner);
        Ok(())
    }

    /// Drops `dead` from the record once fresh reads confirm they are all dead; false if one
    /// is not.
    async fn reap(&mut self, mut next: Record, dead: &[Slot]) -> Result<bool> {
        let inner = self.inner;
        let ids: Vec<&str> = dead.iter().map(|b| b.session.as_str()).collect();
        if !inner.session.confirm_dead(&ids, &mut self.liveness).await? {
            return Ok(false);
        }
        bump(&inner.stats.takeovers);
        let view = inner.session.peers().await?.snapshot();
        next.prune(|s| view.get(&inner.session.heartbeat_key(s)).is_none());
        let new = next.encode();
        let mine = self.announced.then_some(&self.me.slot);
        self.current = inner.cas(self.current.take(), &next, mine).await?;
        if self.current.as_deref() == Some(&new[..]) {
            crate::metrics::count(
                crate::metrics::LOCK_TAKEOVERS_TOTAL,
                inner.kind,
                &inner.name,
            );
        }
        for b in dead {
            inner.forget_arrival(b);
        }
        Ok(true)
    }

    /// A slot of our own session ahead of us that nobody here owns was abandoned (its leave
    /// failed, or was never written): leave it for its owner.
    fn clean_up_abandoned(&self, blockers: &[Slot]) {
        for b in blockers {
            if b.session == self.me.slot.session
                && let Some(owned) = self.inner.own(b)
            {
                tracing::warn!(kind = self.inner.kind, name = %self.inner.name, slot = ?b, "removing an abandoned slot of this session");
                spawn_leave(self.inner.clone(), b.clone(), None, Some(owned));
            }
        }
    }

    /// Sleeps until the record or a heartbeat changes, a blocker could expire, or the record
    /// is due for a re-read.
    async fn sleep(&mut self, blockers: &[Slot]) -> Result<Woke> {
        let inner = self.inner;
        let expiry = blockers
            .iter()
            .filter_map(|b| self.liveness.expires_at(&b.session))
            .min()
            .unwrap_or(self.next_read);
        let wake = expiry
            .min(self.next_read)
            .min(self.wake_by.unwrap_or(self.next_read));
        let peers = self
            .peers
            .as_mut()
            .expect("a waiting step observed the peers first");
        Ok(tokio::select! {
            changed = self.record.changed() => {
                if changed.is_err() {
                    return Err(Error::Stopped);
                }
                Woke::Record
            }
            _ = peers.changed() => Woke::Other,
            _ = tokio::time::sleep_until(wake) => {
                self.current = inner.read().await?;
                self.next_read = Self::read_due(inner);
                Woke::Other
            }
            _ = inner.session.lost() => {
                inner.session.check()?;
                Woke::Other
            }
        })
    }
}
