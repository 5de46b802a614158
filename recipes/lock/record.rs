//! The lock record: the whole state of one lock in one CAS-managed key, and its transitions.
//! Pure code: no IO, no clocks.
//!
//! Waiters announce themselves with an *arrival* key of their own (a plain put: arrivals never
//! contend with each other or with the holder). Whoever next writes the record (normally the
//! releasing holder) *absorbs* the arrivals it can see into the queue, in arrival order, in the
//! same write. `absorbed` remembers each session's highest absorbed ticket, so an arrival key
//! that outlives its slot (its owner had not deleted it yet) is never absorbed twice.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, show};

/// One participant: a session and a ticket, increasing per session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Slot {
    pub(crate) session: String,
    pub(crate) ticket: u64,
}

/// The lock record. Never deleted, never given a TTL: `epoch` (the fencing token of the
/// current or last grant) must survive forever so tokens keep increasing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Format version.
    pub(crate) v: u32,
    /// Incremented by every write: of two copies of the record, the higher `seq` is newer.
    pub(crate) seq: u64,
    /// Incremented on every grant; the fencing token of the grant it belongs to.
    pub(crate) epoch: u64,
    /// The current holder.
    pub(crate) holder: Option<Slot>,
    /// Waiters in arrival order.
    pub(crate) queue: Vec<Slot>,
    /// Per session, the highest ticket ever taken into the record.
    #[serde(default)]
    pub(crate) absorbed: BTreeMap<String, u64>,
}

/// Sessions remembered in `absorbed` before dead ones are pruned.
pub(crate) const ABSORBED_PRUNE_AT: usize = 256;

impl Record {
    pub(crate) const VERSION: u32 = 2;

    /// Decodes the stored bytes (`None`: the lock was never used). Bytes that are not a lock
    /// record are an error naming the key: they are never silently reset.
    pub(crate) fn decode(key: &[u8], bytes: Option<&Bytes>) -> Result<Record> {
        let Some(bytes) = bytes else {
            return Ok(Record {
                v: Self::VERSION,
                ..Record::default()
            });
        };
        let rec: Record = serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            key: show(key),
            reason: format!("not a dcoord lock record ({e}); refusing to overwrite it"),
        })?;
        if rec.v != Self::VERSION {
            return Err(Error::Decode {
                key: show(key),
                reason: format!(
                    "lock record version {} is not supported (expected {})",
                    rec.v,
                    Self::VERSION
                ),
            });
        }
        Ok(rec)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lock record always serializes")
    }

    fn note(&mut self, me: &Slot) {
        let t = self.absorbed.entry(me.session.clone()).or_insert(0);
        *t = (*t).max(me.ticket);
    }

    /// True if `slot` was already taken into the record once (it may have left since).
    pub(crate) fn seen(&self, slot: &Slot) -> bool {
        self.absorbed
            .get(&slot.session)
            .is_some_and(|t| *t >= slot.ticket)
    }

    /// The fast path: `me` takes the lock directly. `None` unless it is free and nobody
    /// waits.
    pub(crate) fn grab(&self, me: &Slot) -> Option<Record> {
        if self.holder.is_some() || !self.queue.is_empty() {
            return None;
        }
        let mut record = self.clone();
        record.seq += 1;
        record.epoch += 1;
        record.holder = Some(me.clone());
        record.note(me);
        Some(record)
    }

    /// Takes `arrivals` (in arrival order) into the queue, skipping any already seen; then, if
    /// the lock is free, grants it to the first waiter. `None` if nothing changes.
    pub(crate) fn absorb(&self, arrivals: &[Slot]) -> Option<Record> {
        let mut record = self.clone();
        let mut changed = false;
        for a in arrivals {
            if !record.seen(a) {
                record.queue.push(a.clone());
                record.note(a);
                changed = true;
            }
        }
        if record.holder.is_none() && !record.queue.is_empty() {
            record.holder = Some(record.queue.remove(0));
            record.epoch += 1;
            changed = true;
        }
        if changed {
            record.seq += 1;
            Some(record)
        } else {
            None
        }
    }

    /// The record after absorbing `arrivals` (itself if nothing changes).
    pub(crate) fn absorbed(&self, arrivals: &[Slot]) -> Record {
        self.absorb(arrivals).unwrap_or_else(|| self.clone())
    }

    /// Forgets sessions for which `dead` says so and that hold no slot, once the map is large.
    pub(crate) fn prune(&mut self, mut dead: impl FnMut(&str) -> bool) {
        if self.absorbed.len() < ABSORBED_PRUNE_AT {
            return;
        }
        let live: Vec<String> = self
            .holder
            .iter()
            .chain(self.queue.iter())
            .map(|s| s.session.clone())
            .collect();
        self.absorbed.retain(|s, _| live.contains(s) || !dead(s));
    }

    /// `me` holds the lock.
    pub(crate) fn is_holder(&self, me: &Slot) -> bool {
        self.holder.as_ref() == Some(me)
    }

    /// `me` is the holder or waits.
    pub(crate) fn contains(&self, me: &Slot) -> bool {
        self.is_holder(me) || self.queue.contains(me)
    }

    /// The holder lets go: the first waiter gets the lock in the same write (one-write
    /// handoff). `None` if `me` does not hold it (already released, or taken over).
    pub(crate) fn release(&self, me: &Slot) -> Option<Record> {
        if !self.is_holder(me) {
            return None;
        }
        let mut record = self.clone();
        record.seq += 1;
        if record.queue.is_empty() {
            record.holder = None;
        } else {
            record.holder = Some(record.queue.remove(0));
            record.epoch += 1;
        }
        Some(record)
    }

    /// A participant gives up: releases if holding, leaves the queue if waiting, and in any
    /// case marks its slot as seen so its arrival key can never be taken in later. `None` if
    /// nothing changes.
    pub(crate) fn leave(&self, me: &Slot) -> Option<Record> {
        if self.is_holder(me) {
            return self.release(me);
        }
        let mut record = self.clone();
        match record.queue.iter().position(|s| s == me) {
            Some(i) => {
                record.queue.remove(i);
            }
            None if self.seen(me) => return None,
            None => {}
        }
        record.note(me);
        record.seq += 1;
        Some(record)
    }

    /// What `me` leaving writes, taking in `arrivals` (others') on the way: `None` only if
    /// THIS record already shows `me` gone for good (seen, not queued, not holding).
    ///
    /// Absorbing a later arrival of `me`'s own session marks `me` seen as well; that write
    /// must still happen. (Deciding "nothing to do" on the absorbed copy, unwritten, once let a
    /// stale view of `me`'s deleted arrival key be taken in later: a holder nobody was.)
    pub(crate) fn leaving(&self, me: &Slot, arrivals: &[Slot]) -> Option<Record> {
        if self.seen(me) && !self.contains(me) {
            return None;
        }
        let absorbed = self.absorbed(arrivals);
        match absorbed.leave(me) {
            Some(next) => Some(next),
            // `me` is seen only thanks to the absorption: write that.
            None => Some(absorbed),
        }
    }

    /// The participants whose death `me` must establish before taking the lock: the holder
    /// and every waiter ahead of `me`. Empty when `me` is not queued.
    pub(crate) fn blockers(&self, me: &Slot) -> Vec<&Slot> {
        let Some(i) = self.queue.iter().position(|s| s == me) else {
            return Vec::new();
        };
        self.holder.iter().chain(self.queue[..i].iter()).collect()
    }

    /// `me` takes the lock because every blocker is dead: the holder (if any) and the waiters
    /// ahead are dropped, the epoch moves on. `None` if `me` is not waiting.
    pub(crate) fn take_over(&self, me: &Slot) -> Option<Record> {
        let i = self.queue.iter().position(|s| s == me)?;
        let mut record = self.clone();
        record.seq += 1;
        record.queue.drain(..=i);
        record.holder = Some(me.clone());
        record.epoch += 1;
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(s: &str, t: u64) -> Slot {
        Slot {
            session: s.into(),
            ticket: t,
        }
    }

    fn held_by_a_with_b_c_waiting() -> Record {
        let r = Record::decode(b"k", None)
            .unwrap()
            .grab(&slot("a", 1))
            .unwrap();
        r.absorb(&[slot("b", 1), slot("c", 1)]).unwrap()
    }

    #[test]
    fn leaving_persists_the_seen_mark_even_when_a_later_own_arrival_implies_it() {
        let r = held_by_a_with_b_c_waiting();
        // d.2 gave up before being taken in; d.4 (same session) has arrived since.
        let next = r
            .leaving(&slot("d", 2), &[slot("d", 4)])
            .expect("must write");
        assert!(next.seen(&slot("d", 2)));
        assert!(next.queue.contains(&slot("d", 4)));
        assert_eq!(next.seq, r.seq + 1);
        // Once written, leaving again is a no-op; and so is an old slot the record has seen.
        assert!(next.leaving(&slot("d", 2), &[]).is_none());
        assert!(next.leaving(&slot("d", 1), &[]).is_none());
        // A queued participant leaves the queue; the holder releases.
        let gone = r.leaving(&slot("b", 1), &[]).unwrap();
        assert_eq!(gone.queue, vec![slot("c", 1)]);
        let released = r.leaving(&slot("a", 1), &[]).unwrap();
        assert_eq!(released.holder, Some(slot("b", 1)));
    }

    #[test]
    fn grab_takes_a_free_lock_and_arrivals_queue_in_order() {
        let r = held_by_a_with_b_c_waiting();
        assert_eq!(r.epoch, 1);
        assert!(r.is_holder(&slot("a", 1)));
        assert_eq!(r.queue, vec![slot("b", 1), slot("c", 1)]);
        assert!(r.grab(&slot("d", 1)).is_none(), "held");
        assert!(
            r.absorb(&[slot("b", 1)]).is_none(),
            "an arrival is taken in once"
        );
    }

    #[test]
    fn release_hands_lock_to_oldest_waiter_and_bumps_the_token() {
        let r = held_by_a_with_b_c_waiting();
        let r2 = r.release(&slot("a", 1)).unwrap();
        assert_eq!(r2.holder, Some(slot("b", 1)));
        assert_eq!(r2.epoch, r.epoch + 1);
        assert!(
            r2.release(&slot("a", 1)).is_none(),
            "a second release is a no-op"
        );
        let r3 = r2
            .release(&slot("b", 1))
            .unwrap()
            .release(&slot("c", 1))
            .unwrap();
        assert_eq!(r3.holder, None);
        assert_eq!(r3.epoch, 3, "a release to nobody does not grant");
        // A stale arrival of a slot that was served is never taken in again.
        assert!(r3.absorb(&[slot("b", 1)]).is_none());
        assert!(r3.absorb(&[slot("b", 2)]).unwrap().is_holder(&slot("b", 2)));
    }

    #[test]
    fn absorbing_into_a_free_lock_grants_the_first_arrival() {
        let r = Record::decode(b"k", None).unwrap();
        let r2 = r.absorb(&[slot("x", 3), slot("y", 1)]).unwrap();
        assert!(r2.is_holder(&slot("x", 3)));
        assert_eq!(r2.queue, vec![slot("y", 1)]);
        assert_eq!(r2.epoch, 1);
    }

    #[test]
    fn take_over_drops_dead_blockers_and_keeps_those_behind() {
        let r = held_by_a_with_b_c_waiting()
            .absorb(&[slot("d", 1)])
            .unwrap();
        let me = slot("c", 1);
        let blockers: Vec<_> = r.blockers(&me).into_iter().cloned().collect();
        assert_eq!(blockers, vec![slot("a", 1), slot("b", 1)]);
        let r2 = r.take_over(&me).unwrap();
        assert_eq!(r2.holder, Some(me));
        assert_eq!(r2.queue, vec![slot("d", 1)]);
        assert_eq!(r2.epoch, r.epoch + 1);
    }

    #[test]
    fn leave_removes_a_waiter_or_releases_and_blocks_a_late_arrival() {
        let r = held_by_a_with_b_c_waiting();
        let r2 = r.leave(&slot("b", 1)).unwrap();
        assert_eq!(r2.queue, vec![slot("c", 1)]);
        assert!(r2.leave(&slot("b", 1)).is_none());
        let r3 = r.leave(&slot("a", 1)).unwrap();
        assert!(r3.is_holder(&slot("b", 1)));
        // Leaving before being taken in: the arrival can no longer be absorbed.
        let r4 = r.leave(&slot("z", 9)).unwrap();
        assert!(r4.absorb(&[slot("z", 9)]).is_none());
    }

    #[test]
    fn prune_keeps_sessions_in_the_record() {
        let mut r = held_by_a_with_b_c_waiting();
        for i in 0..ABSORBED_PRUNE_AT {
            r.absorbed.insert(format!("gone{i}"), 1);
        }
        r.prune(|_| true);
        assert_eq!(
            r.absorbed.len(),
            3,
            "{:?}",
            r.absorbed.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn foreign_bytes_are_an_error_never_a_reset() {
        let err =
            Record::decode(b"/dcoord/locks/x", Some(&Bytes::from_static(b"garbage"))).unwrap_err();
        assert!(err.to_string().contains("/dcoord/locks/x"), "{err}");
    }
}
