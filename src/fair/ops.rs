//! The record's writes: reading it, the fast-path grab, leaving, and the settled CAS they
//! share; and the arrival keys waiters announce themselves with.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::record::{Entry, Record, Released, Slot};
use super::{Fair, Holding, Pending, bump, spawn_late_leave};
use crate::error::Result;
use crate::reconcile::Snapshot;
use crate::store::{Cas, Consistency, Scan, Settled, TxnOp};

impl Fair {
    pub(super) async fn read(&self) -> Result<Option<Bytes>> {
        self.store.get(&self.key, Consistency::Linearizable).await
    }

    /// One CAS from `current` to `new`, settled ([`Cas::settle`]); returns the record as it
    /// is afterwards (ours when it applied, re-read otherwise: the caller decides from its
    /// content, which is unique per write since `seq` rises with every one). `mine`: the
    /// writer's own arrival key is still there (see [`Fair::write`]).
    pub(super) async fn cas(
        &self,
        current: Option<Bytes>,
        next: &Record,
        mine: Option<&Slot>,
    ) -> Result<Option<Bytes>> {
        let new = next.encode();
        Ok(
            match self.write(current.as_ref(), &new, next, mine).await? {
                Settled::Applied => Some(Bytes::from(new)),
                Settled::Rejected {
                    current,
                    maybe_applied,
                } => {
                    if !maybe_applied {
                        bump(&self.stats.conflicts);
                    }
                    current
                }
            },
        )
    }

    /// Writes the record from `current` to `new`, settled, taking along the deletes of the
    /// keys it makes garbage ([`Fair::garbage`]; `mine`: the writer's own arrival, which its
    /// mirror may not show yet) in one transaction: a handoff costs no separate deletes, and a
    /// watcher sees them before the record. On a store without transactions the deletes follow
    /// the write, in the background.
    async fn write(
        &self,
        current: Option<&Bytes>,
        new: &[u8],
        next: &Record,
        mine: Option<&Slot>,
    ) -> Result<Settled> {
        let alive = || self.session.check();
        let garbage = self.garbage(current, next, mine);
        let current = current.map(|c| &c[..]);
        let deletes: Vec<TxnOp> = garbage
            .iter()
            .map(|(k, _)| TxnOp::delete(k.clone()))
            .collect();
        // A transaction carries the expected record too: one that would be too large goes as
        // a plain CAS.
        let cas_len =
            crate::store::txn::op_len(self.key.len(), current.map(|c| c.len()), Some(new.len()));
        let fits = crate::store::txn::encoded_len(&deletes) + cas_len <= crate::keys::MAX_VALUE_LEN;
        if !deletes.is_empty() && fits {
            match Cas::new(&*self.store, &self.key, current, new)
                .along(&deletes)
                .while_ok(&alive)
                .settle()
                .await
            {
                // Nothing was sent (a store without transactions answers at once, so this
                // costs nothing to ask again the next time).
                Err(e) if crate::store::txn::unsupported(&e) => {}
                settled => return settled,
            }
        }
        let settled = Cas::new(&*self.store, &self.key, current, new)
            .while_ok(&alive)
            .settle()
            .await?;
        if settled == Settled::Applied {
            self.sweep(garbage);
        }
        Ok(settled)
    }

    /// A fresh slot for this session.
    pub(super) fn slot(&self) -> Slot {
        Slot {
            session: self.session.id(),
            ticket: self.session.next_ticket(),
        }
    }

    pub(super) fn arrival_key(&self, slot: &Slot) -> Vec<u8> {
        slot_key(&self.arrivals, slot)
    }

    /// The slot an arrival key announces, if `key` is one.
    pub(super) fn parse_arrival(&self, key: &[u8], value: &[u8]) -> Option<Entry> {
        Entry::from_arrival(slot_of(&self.arrivals, key)?, value)
    }

    pub(super) fn release_key(&self, slot: &Slot) -> Vec<u8> {
        slot_key(&self.releases, slot)
    }

    /// The release marker `key` is, if it is one (its value is the released grant's token).
    pub(super) fn parse_release(&self, key: &[u8], value: &[u8]) -> Option<Released> {
        Some(Released {
            slot: slot_of(&self.releases, key)?,
            token: std::str::from_utf8(value).ok()?.parse().ok()?,
        })
    }

    /// The release markers in a scan of the queue's prefix.
    pub(super) fn releases_scanned(&self, scan: &Scan) -> Vec<Released> {
        scan.entries
            .iter()
            .filter_map(|(k, v)| self.parse_release(k, v))
            .collect()
    }

    /// The release markers in `snap`.
    pub(super) fn releases_in(&self, snap: &Snapshot) -> Vec<Released> {
        snap.with_prefix(&self.releases)
            .filter_map(|e| self.parse_release(&e.key, &e.value))
            .collect()
    }

    /// The keys a write of `written` over `before` leaves with no job: the arrivals in sight
    /// (and `mine`) that it or `before` has taken in (the record never takes a slot in twice;
    /// one `before` took in and the write forgets is a pruned session's), and the
    /// release markers in sight whose grant it could have held (token at most its epoch) and
    /// does not (such a grant is over for good). The mirror may already be newer than
    /// `written`: a marker of a later grant (a higher token) is never among them. Each comes
    /// with whether this write made it garbage (else an earlier write did, and left it).
    pub(super) fn garbage(
        &self,
        before: Option<&Bytes>,
        rec: &Record,
        mine: Option<&Slot>,
    ) -> Vec<(Bytes, bool)> {
        let Ok(before) = self.decode_shared(before) else {
            return Vec::new();
        };
        let snap = self.record.snapshot();
        let holds =
            |rec: &Record, m: &Released| rec.grant_of(&m.slot).is_some_and(|g| g.token == m.token);
        let mut found: Vec<(Bytes, bool)> = Vec::new();
        for e in snap.with_prefix(&self.releases) {
            let Some(m) = self.parse_release(&e.key, &e.value) else {
                continue;
            };
            if m.token <= rec.epoch && !holds(rec, &m) {
                found.push((e.key.clone(), holds(&before, &m)));
            }
        }
        let mut arrivals: Vec<Slot> = snap
            .with_prefix(&self.arrivals)
            .filter_map(|e| slot_of(&self.arrivals, &e.key))
            .collect();
        if let Some(me) = mine
            && !arrivals.contains(me)
        {
            arrivals.push(me.clone());
        }
        for slot in arrivals {
            // Seen before this write and not after: a slot of a session the write forgets
            // (pruning). Left behind, its key would be taken in again as a ghost waiter.
            if rec.seen(&slot) || before.seen(&slot) {
                found.push((Bytes::from(self.arrival_key(&slot)), !before.seen(&slot)));
            }
        }
        found.truncate(MAX_GARBAGE);
        found
    }

    /// Deletes `garbage` in the background (a store without transactions): the keys a write
    /// made garbage, and leftovers of earlier writes once per handle, so that the writers
    /// after it do not all delete the same keys again.
    fn sweep(&self, garbage: Vec<(Bytes, bool)>) {
        let mut sweeping = self.sweeping.lock().expect("never poisoned");
        // Forget deletes the mirror has seen land (the set stays as small as the garbage).
        let snap = self.record.snapshot();
        sweeping.retain(|k| snap.get(k).is_some());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (key, now) in garbage {
            if !now && sweeping.contains(&key) {
                continue;
            }
            sweeping.insert(key.clone());
            let (store, sweeping) = (self.store.clone(), self.sweeping.clone());
            rt.spawn(async move {
                if store.delete(&key).await.is_err() {
                    // Another write of this handle tries again.
                    sweeping.lock().expect("never poisoned").remove(&key);
                }
            });
        }
    }

    /// The record in sight with its pending release markers applied, and the arrivals in
    /// sight not yet taken in. From the mirror, or from `scan` (a linearizable read) if given.
    fn sighted(&self, current: Option<&Bytes>, scan: Option<&Scan>) -> Result<(Record, bool)> {
        let rec = self.decode(current)?;
        let (released, waiting) = match scan {
            None => {
                let snap = self.record.snapshot();
                let waiting = self.arrivals_in(&snap).iter().any(|a| !rec.seen(&a.slot));
                (self.releases_in(&snap), waiting)
            }
            Some(scan) => {
                let released = self.releases_scanned(scan);
                let waiting = scan
                    .entries
                    .iter()
                    .filter_map(|(k, v)| self.parse_arrival(k, v))
                    .any(|a| !rec.seen(&a.slot));
                (released, waiting)
            }
        };
        Ok((rec.released(&released), waiting))
    }

    /// The arrivals in `snap`, oldest first (by the revision that wrote them).
    pub(super) fn arrivals_in(&self, snap: &Snapshot) -> Vec<Entry> {
        let mut found: Vec<(u64, Entry)> = snap
            .with_prefix(&self.arrivals)
            .filter_map(|e| Some((e.revision, self.parse_arrival(&e.key, &e.value)?)))
            .collect();
        found.sort_by(|a, b| (a.0, &a.1.slot).cmp(&(b.0, &b.1.slot)));
        found.into_iter().map(|(_, s)| s).collect()
    }

    /// The newest record we can see: `known`, the mirror's, or (if neither) a read.
    pub(super) async fn current(&self, known: Option<Bytes>) -> Result<Option<Bytes>> {
        let snap = self.record.snapshot();
        let current = self.newer(known, &snap);
        if current.is_none() && !snap.is_ready() {
            return self.read().await;
        }
        Ok(current)
    }

    /// Deletes an arrival key in the background (a dead session's, which pruning may make
    /// the record forget it took in; harmless if it lingers meanwhile).
    pub(super) fn forget_arrival(&self, slot: &Slot) {
        let (store, key) = (self.store.clone(), self.arrival_key(slot));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }

    /// The fast path: take the lock with one CAS if it is free and nobody waits or arrives.
    /// `None` if it is not free. With `confirm`, a "not free" seen in the mirror is confirmed by
    /// a linearizable read first, and a CAS that lost a race is tried again (`try_acquire` must
    /// not say no on a stale view); without, `None` on the first lost race too (`acquire`
    /// queues then: FIFO among contenders, where racing for the record again is neither fair
    /// nor fast, and its waiter takes a lock that turns out free).
    pub(super) async fn grab(
        self: &Arc<Self>,
        pending: &mut Pending,
        n: u64,
        value: Option<&[u8]>,
        confirm: bool,
    ) -> Result<Option<Holding>> {
        self.session.check()?;
        let me = Entry::new(self.slot(), n, value);
        let mut current = self.current(None).await?;
        // A linearizable read of the record, its markers and arrivals (try_acquire's "no").
        let mut scan: Option<Scan> = None;
        loop {
            let (rec, waiting) = self.sighted(current.as_ref(), scan.as_ref())?;
            let next = if waiting { None } else { rec.grab(&me) };
            let Some(next) = next else {
                if !confirm || scan.is_some() {
                    return Ok(None);
                }
                // The mirror may be behind: confirm with a linearizable read before saying no.
                let fresh = self.store.scan_prefix(self.base()).await?;
                current = fresh
                    .entries
                    .iter()
                    .find(|(k, _)| *k == self.key)
                    .map(|(_, v)| v.clone());
                scan = Some(fresh);
                continue;
            };
            pending.arm(me.slot.clone());
            let sent = Instant::now();
            // Settled by re-sending the identical CAS (see `Cas`): the record never returns to
            // `current` (its `seq` rises with every write). A read that still shows `current`
            // would prove nothing: the first attempt could apply after it.
            let after = match self.cas(current, &next, None).await {
                Ok(after) => after,
                Err(e) if e.is_ambiguous() => {
                    // Still unknown, and the first attempt may land yet: give back a grant
                    // that lands late, one lease from now.
                    spawn_late_leave(self.clone(), me.slot, pending.hand_over());
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let rec = self.decode(after.as_ref())?;
            if let Some(grant) = rec.grant_of(&me.slot) {
                tracing::debug!(kind = self.kind, name = %self.name, ?me, seq = rec.seq, token = grant.token, "granted (fast path)");
                bump(&self.stats.grants);
                crate::metrics::count(crate::metrics::LOCK_ACQUIRED_TOTAL, self.kind, &self.name);
                let owned = pending.hand_over();
                let token = grant.token;
                return Ok(Some(Holding::new(
                    self.clone(),
                    me.slot,
                    owned,
                    token,
                    rec.seq,
                    after,
                )));
            }
            pending.disarm();
            if !confirm {
                // Contended: `acquire` queues (FIFO from here on) rather than racing the
                // others for the record again.
                return Ok(None);
            }
            crate::reconcile::after_collision(1, sent.elapsed()).await;
            current = after;
            // The markers and arrivals of the old scan are older than `after`.
            scan = None;
        }
    }

    /// Leaves the record: releases if holding (handing off to the first waiter, after taking
    /// in every arrival in sight), removes the queue entry if waiting, and marks the slot seen
    /// so its arrival key can never be taken in later. Retries conflicts.
    pub(super) async fn leave(&self, me: &Slot, known: Option<Bytes>) -> Result<()> {
        let mut current = self.current(known).await?;
        loop {
            let snap = self.record.snapshot();
            current = self.newer(current, &snap);
            let rec = self.decode(current.as_ref())?;
            let mut arrivals = self.arrivals_in(&snap);
            arrivals.retain(|a| a.slot != *me);
            let next = rec
                .released(&self.releases_in(&snap))
                .leaving(me, &arrivals);
            let Some(next) = next else {
                tracing::debug!(kind = self.kind, name = %self.name, ?me, seq = rec.seq, "leave: nothing to do");
                return Ok(());
            };
            match self
                .write(current.as_ref(), &next.encode(), &next, None)
                .await?
            {
                Settled::Applied => {
                    tracing::debug!(kind = self.kind, name = %self.name, ?me, seq = next.seq, holders = next.holders.len(), "left");
                    if rec.is_holder(me) && next.epoch > rec.epoch {
                        crate::metrics::count(
                            crate::metrics::LOCK_HANDOFFS_TOTAL,
                            self.kind,
                            &self.name,
                        );
                    }
                    return Ok(());
                }
                // Our leave may have applied and been built on since: the loop tells by
                // whether `me` is still in the record.
                Settled::Rejected {
                    current: now,
                    maybe_applied,
                } => {
                    if !maybe_applied {
                        bump(&self.stats.conflicts);
                    }
                    current = now;
                }
            }
        }
    }
}

/// Most keys one write of the record deletes along (the rest: the next writes).
const MAX_GARBAGE: usize = 256;

/// `<prefix><session>.<ticket>`: a slot's arrival or release key.
fn slot_key(prefix: &[u8], slot: &Slot) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{}.{}", slot.session, slot.ticket).as_bytes());
    k
}

/// The slot a key under `prefix` names, if it is one.
fn slot_of(prefix: &[u8], key: &[u8]) -> Option<Slot> {
    let name = std::str::from_utf8(key.strip_prefix(prefix)?).ok()?;
    let (session, ticket) = name.rsplit_once('.')?;
    Some(Slot {
        session: session.to_string(),
        ticket: ticket.parse().ok()?,
    })
}
