//! The lock record: the whole state of one lock in one CAS-managed key, and its transitions.
//! Pure code: no IO, no clocks.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, show};

/// One participant: a session and a ticket unique within this lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The ticket the next participant gets.
    pub(crate) next_ticket: u64,
}

/// What the record became, and whether the participant now holds the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joined {
    pub(crate) record: Record,
    pub(crate) me: Slot,
    pub(crate) granted: bool,
}

impl Record {
    pub(crate) const VERSION: u32 = 1;

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

    /// A new participant arrives: it takes the lock if it is free and nobody waits, else it
    /// queues at the end.
    pub(crate) fn join(&self, session: &str) -> Joined {
        let me = Slot {
            session: session.to_string(),
            ticket: self.next_ticket,
        };
        let mut record = self.clone();
        record.seq += 1;
        record.next_ticket += 1;
        let granted = record.holder.is_none() && record.queue.is_empty();
        if granted {
            record.epoch += 1;
            record.holder = Some(me.clone());
        } else {
            record.queue.push(me.clone());
        }
        Joined {
            record,
            me,
            granted,
        }
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

    /// A waiter gives up (or a holder lets go): `None` if `me` is not in the record.
    pub(crate) fn leave(&self, me: &Slot) -> Option<Record> {
        if self.is_holder(me) {
            return self.release(me);
        }
        let i = self.queue.iter().position(|s| s == me)?;
        let mut record = self.clone();
        record.seq += 1;
        record.queue.remove(i);
        Some(record)
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

    #[test]
    fn first_joiner_is_granted_later_ones_queue_in_order() {
        let r = Record::decode(b"k", None).unwrap();
        let a = r.join("a");
        assert!(a.granted && a.record.epoch == 1);
        let b = a.record.join("b");
        let c = b.record.join("c");
        assert!(!b.granted && !c.granted);
        assert_eq!(c.record.queue, vec![slot("b", 1), slot("c", 2)]);
    }

    #[test]
    fn release_hands_lock_to_oldest_waiter_and_bumps_the_token() {
        let r = Record::default()
            .join("a")
            .record
            .join("b")
            .record
            .join("c")
            .record;
        let r2 = r.release(&slot("a", 0)).unwrap();
        assert_eq!(r2.holder, Some(slot("b", 1)));
        assert_eq!(r2.epoch, r.epoch + 1);
        assert_eq!(r2.queue, vec![slot("c", 2)]);
        assert!(
            r2.release(&slot("a", 0)).is_none(),
            "a second release is a no-op"
        );
        let r3 = r2
            .release(&slot("b", 1))
            .unwrap()
            .release(&slot("c", 2))
            .unwrap();
        assert_eq!(r3.holder, None);
        assert_eq!(r3.epoch, 3, "a release to nobody does not grant");
    }

    #[test]
    fn take_over_drops_dead_blockers_and_keeps_those_behind() {
        let r = Record::default()
            .join("a")
            .record
            .join("b")
            .record
            .join("c")
            .record
            .join("d")
            .record;
        let me = slot("c", 2);
        let blockers: Vec<_> = r.blockers(&me).into_iter().cloned().collect();
        assert_eq!(blockers, vec![slot("a", 0), slot("b", 1)]);
        let r2 = r.take_over(&me).unwrap();
        assert_eq!(r2.holder, Some(me));
        assert_eq!(r2.queue, vec![slot("d", 3)]);
        assert_eq!(r2.epoch, r.epoch + 1);
    }

    #[test]
    fn leave_removes_a_waiter_or_releases_a_holder() {
        let r = Record::default().join("a").record.join("b").record;
        let r2 = r.leave(&slot("b", 1)).unwrap();
        assert!(r2.queue.is_empty() && r2.is_holder(&slot("a", 0)));
        assert!(r2.leave(&slot("b", 1)).is_none());
        let r3 = r.leave(&slot("a", 0)).unwrap();
        assert!(r3.is_holder(&slot("b", 1)));
    }

    #[test]
    fn foreign_bytes_are_an_error_never_a_reset() {
        let err =
            Record::decode(b"/dcoord/locks/x", Some(&Bytes::from_static(b"garbage"))).unwrap_err();
        assert!(err.to_string().contains("/dcoord/locks/x"), "{err}");
    }
}
