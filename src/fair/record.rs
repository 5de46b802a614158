//! The record: the whole state of one fair queue in one CAS-managed key, and its transitions.
//! Pure code: no IO, no clocks.
//!
//! A record has a `capacity` and grants *weights* out of it: a lock or an election is capacity
//! 1 taken whole, a semaphore capacity N taken `n` at a time, a read-write lock a large capacity
//! that a reader takes 1 of and a writer all of. Grants go strictly in queue order: the first
//! waiter is granted once its weight fits, and nobody behind it passes it (so a writer is never
//! starved by readers, nor a big request by small ones).
//!
//! Waiters announce themselves with an *arrival* key of their own (a plain put: arrivals never
//! contend with each other or with holders). Whoever next writes the record (normally a
//! releasing holder) *absorbs* the arrivals it can see into the queue, in arrival order, in the
//! same write. `absorbed` remembers each session's highest absorbed ticket, so an arrival key
//! that outlives its slot (the write that absorbed it had not seen it; a later write deletes
//! it) is never absorbed twice.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, show};

/// One participant: a session and a ticket, increasing per session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Slot {
    pub(crate) session: String,
    pub(crate) ticket: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// What a participant asks for: its slot, a weight, and (elections) a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    #[serde(flatten)]
    pub(crate) slot: Slot,
    /// The weight taken out of the capacity.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub(crate) n: u64,
    /// An opaque value (base64), e.g. a candidate's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<String>,
}

impl Entry {
    pub(crate) fn new(slot: Slot, n: u64, value: Option<&[u8]>) -> Entry {
        Entry {
            slot,
            n,
            value: value.map(encode_value),
        }
    }

    /// The value, decoded (empty if none).
    pub(crate) fn value_bytes(&self) -> Bytes {
        self.value
            .as_deref()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// The bytes of an arrival key announcing this entry: `w` for weight 1 and no value (the
    /// format of every release before weights), JSON otherwise.
    pub(crate) fn arrival_bytes(&self) -> Vec<u8> {
        if self.n == 1 && self.value.is_none() {
            return b"w".to_vec();
        }
        serde_json::to_vec(&ArrivalBody {
            n: self.n,
            value: self.value.clone(),
        })
        .expect("an arrival always serializes")
    }

    /// The entry an arrival key's bytes announce for `slot`; `None` for bytes no dcoord wrote.
    pub(crate) fn from_arrival(slot: Slot, bytes: &[u8]) -> Option<Entry> {
        if bytes == b"w" {
            return Some(Entry::new(slot, 1, None));
        }
        let body: ArrivalBody = serde_json::from_slice(bytes).ok()?;
        (body.n >= 1).then_some(Entry {
            slot,
            n: body.n,
            value: body.value,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct ArrivalBody {
    n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

pub(crate) fn encode_value(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// A release marker: the holder of `slot` gave back its grant of `token`, and the next writer of
/// the record applies that (see `Fair`'s docs). It names the grant, so a marker that outlives
/// its write can never release anything else: slots are never reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Released {
    pub(crate) slot: Slot,
    pub(crate) token: u64,
}

/// A granted entry and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Grant {
    #[serde(flatten)]
    pub(crate) entry: Entry,
    /// The fencing token of this grant: the record's `epoch` when it was made.
    pub(crate) token: u64,
}

/// The record. Never deleted, never given a TTL: `epoch` (the fencing token of the latest
/// grant) must survive forever so tokens keep increasing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Format version.
    pub(crate) v: u32,
    /// Incremented by every write: of two copies of the record, the higher `seq` is newer.
    pub(crate) seq: u64,
    /// Incremented on every grant; the fencing token of the latest.
    pub(crate) epoch: u64,
    /// What the holders' weights add up to at most.
    pub(crate) capacity: u64,
    /// The current holders, in grant order.
    pub(crate) holders: Vec<Grant>,
    /// Waiters in arrival order.
    pub(crate) queue: Vec<Entry>,
    /// Per session, the highest ticket ever taken into the record.
    #[serde(default)]
    pub(crate) absorbed: BTreeMap<String, u64>,
}

/// The lock record before weights (dcoord ≤ 0.1 wrote it): still read, never written.
#[derive(Deserialize)]
struct RecordV2 {
    seq: u64,
    epoch: u64,
    holder: Option<Slot>,
    queue: Vec<Slot>,
    #[serde(default)]
    absorbed: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct Version {
    v: u32,
}

/// Sessions remembered in `absorbed` before dead ones are pruned.
pub(crate) const ABSORBED_PRUNE_AT: usize = 256;

/// Records decoded lately on this thread, by the identity of their bytes (pointer and length
/// of a `Bytes` kept here, so the memory cannot be reused while it is remembered: the same
/// pointer and length are the same bytes). Every waiter of a queue wakes on each change of
/// the one mirror they share and reads the record from the same `Bytes`: one parse per
/// thread serves them all.
const DECODED_KEPT: usize = 16;

thread_local! {
    static DECODED: RefCell<VecDeque<(Bytes, Arc<Record>)>> =
        const { RefCell::new(VecDeque::new()) };
}

fn recall(bytes: &Bytes) -> Option<Arc<Record>> {
    // (None while the thread's locals are being destroyed: parsed then.)
    DECODED
        .try_with(|memo| {
            memo.borrow()
                .iter()
                .find(|(b, _)| b.as_ptr() == bytes.as_ptr() && b.len() == bytes.len())
                .map(|(_, rec)| rec.clone())
        })
        .ok()
        .flatten()
}

fn remember(bytes: &Bytes, rec: &Arc<Record>) {
    if bytes.is_empty() {
        return;
    }
    let _ = DECODED.try_with(|memo| {
        let mut memo = memo.borrow_mut();
        if memo.len() >= DECODED_KEPT {
            memo.pop_front();
        }
        memo.push_back((bytes.clone(), rec.clone()));
    });
}

impl Record {
    /// The format of a record of capacity 1 (a lock, an election).
    pub(crate) const VERSION: u32 = 3;
    /// The format of a record of capacity above 1 (a semaphore, a read-write lock) since its
    /// releases are release markers: a process that does not apply them (dcoord before them)
    /// must refuse such a record with a clear error rather than wait for a release it cannot
    /// see.
    pub(crate) const VERSION_MARKERS: u32 = 4;

    fn version_for(capacity: u64) -> u32 {
        if capacity > 1 {
            Self::VERSION_MARKERS
        } else {
            Self::VERSION
        }
    }

    /// An unused record of `capacity`.
    pub(crate) fn empty(capacity: u64) -> Record {
        Record {
            v: Self::version_for(capacity),
            capacity,
            ..Record::default()
        }
    }

    /// Decodes the stored bytes (`None`: never used; a record of `capacity`). Bytes that are
    /// not a `kind` record, or one of another capacity, are an error naming the key: they are
    /// never silently reset.
    pub(crate) fn decode(
        kind: &str,
        key: &[u8],
        capacity: u64,
        bytes: Option<&Bytes>,
    ) -> Result<Record> {
        Self::decode_shared(kind, key, capacity, bytes).map(Arc::unwrap_or_clone)
    }

    /// [`Record::decode`], shared: bytes decoded recently on this thread (the same bytes,
    /// not merely equal ones: every waiter of a queue reads the one copy its mirror holds)
    /// are not parsed again.
    pub(crate) fn decode_shared(
        kind: &str,
        key: &[u8],
        capacity: u64,
        bytes: Option<&Bytes>,
    ) -> Result<Arc<Record>> {
        let Some(bytes) = bytes else {
            return Ok(Arc::new(Record::empty(capacity)));
        };
        let bad = |reason: String| Error::Decode {
            key: show(key),
            reason,
        };
        let rec = match recall(bytes) {
            Some(rec) => rec,
            None => {
                let rec = Arc::new(Self::parse(kind, bytes).map_err(bad)?);
                remember(bytes, &rec);
                rec
            }
        };
        if rec.capacity != capacity {
            return Err(bad(format!(
                "this {kind} has capacity {} but this handle was opened with {capacity}",
                rec.capacity
            )));
        }
        Ok(rec)
    }

    /// The record `bytes` hold, whatever its capacity; the reason if they are not one.
    fn parse(kind: &str, bytes: &[u8]) -> std::result::Result<Record, String> {
        let foreign = |e: serde_json::Error| {
            format!("not a dcoord {kind} record ({e}); refusing to overwrite it")
        };
        let Version { v } = serde_json::from_slice(bytes).map_err(foreign)?;
        let mut rec = match v {
            2 => {
                let old: RecordV2 = serde_json::from_slice(bytes).map_err(foreign)?;
                let entry = |slot: Slot| Entry::new(slot, 1, None);
                Record {
                    v: Self::VERSION,
                    seq: old.seq,
                    epoch: old.epoch,
                    capacity: 1,
                    holders: old
                        .holder
                        .into_iter()
                        .map(|s| Grant {
                            entry: entry(s),
                            token: old.epoch,
                        })
                        .collect(),
                    queue: old.queue.into_iter().map(entry).collect(),
                    absorbed: old.absorbed,
                }
            }
            Self::VERSION | Self::VERSION_MARKERS => {
                serde_json::from_slice::<Record>(bytes).map_err(foreign)?
            }
            v => {
                return Err(format!(
                    "{kind} record version {v} is not supported (this dcoord reads 2 to {})",
                    Self::VERSION_MARKERS
                ));
            }
        };
        // A version 3 record of capacity > 1 (written before release markers) is written back
        // as version 4.
        rec.v = Self::version_for(rec.capacity);
        Ok(rec)
    }

    /// The bytes to store: a plain lock's record in the format before weights (version 2), so
    /// that processes of earlier releases keep working beside this one; version 4 for capacity
    /// above 1 (release markers); version 3 otherwise.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let plain = |e: &Entry| e.n == 1 && e.value.is_none();
        let v2 = self.capacity == 1
            && self.holders.len() <= 1
            && self
                .holders
                .iter()
                .all(|g| plain(&g.entry) && g.token == self.epoch)
            && self.queue.iter().all(plain);
        if v2 {
            return serde_json::to_vec(&serde_json::json!({
                "v": 2,
                "seq": self.seq,
                "epoch": self.epoch,
                "holder": self.holders.first().map(|g| &g.entry.slot),
                "queue": self.queue.iter().map(|e| &e.slot).collect::<Vec<_>>(),
                "absorbed": self.absorbed,
            }))
            .expect("a record always serializes");
        }
        serde_json::to_vec(self).expect("a record always serializes")
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

    /// The weight granted now.
    pub(crate) fn used(&self) -> u64 {
        self.holders.iter().map(|g| g.entry.n).sum()
    }

    /// Grants waiters from the head of the queue while their weight fits. True if any was.
    fn fill(&mut self) -> bool {
        let mut changed = false;
        while let Some(head) = self.queue.first() {
            if head.n > self.capacity.saturating_sub(self.used()) {
                break;
            }
            let entry = self.queue.remove(0);
            self.epoch += 1;
            self.holders.push(Grant {
                entry,
                token: self.epoch,
            });
            changed = true;
        }
        changed
    }

    /// The fast path: `me` is granted directly. `None` unless nobody waits and its weight
    /// fits.
    pub(crate) fn grab(&self, me: &Entry) -> Option<Record> {
        if !self.queue.is_empty() || me.n > self.capacity.saturating_sub(self.used()) {
            return None;
        }
        let mut record = self.clone();
        record.seq += 1;
        record.epoch += 1;
        record.holders.push(Grant {
            entry: me.clone(),
            token: record.epoch,
        });
        record.note(&me.slot);
        Some(record)
    }

    /// Takes `arrivals` (in arrival order) into the queue, skipping any already seen; then
    /// grants from the head of the queue while weights fit. `None` if nothing changes.
    pub(crate) fn absorb(&self, arrivals: &[Entry]) -> Option<Record> {
        let mut record = self.clone();
        let mut changed = false;
        for a in arrivals {
            if !record.seen(&a.slot) {
                // A weight over the capacity (a handle opened with another capacity, which
                // fails on the record) would block the queue forever: never taken in.
                if a.n <= record.capacity {
                    record.queue.push(a.clone());
                }
                record.note(&a.slot);
                changed = true;
            }
        }
        changed |= record.fill();
        if changed {
            record.seq += 1;
            Some(record)
        } else {
            None
        }
    }

    /// The record after absorbing `arrivals` (itself if nothing changes).
    pub(crate) fn absorbed(&self, arrivals: &[Entry]) -> Record {
        self.absorb(arrivals).unwrap_or_else(|| self.clone())
    }

    /// Forgets sessions for which `dead` says so and that hold no slot, once the map is large.
    pub(crate) fn prune(&mut self, mut dead: impl FnMut(&str) -> bool) {
        if self.absorbed.len() < ABSORBED_PRUNE_AT {
            return;
        }
        let live: Vec<String> = self
            .holders
            .iter()
            .map(|g| &g.entry)
            .chain(self.queue.iter())
            .map(|e| e.slot.session.clone())
            .collect();
        self.absorbed.retain(|s, _| live.contains(s) || !dead(s));
    }

    /// `me`'s grant, if it holds one.
    pub(crate) fn grant_of(&self, me: &Slot) -> Option<&Grant> {
        self.holders.iter().find(|g| g.entry.slot == *me)
    }

    /// `me` holds a grant.
    pub(crate) fn is_holder(&self, me: &Slot) -> bool {
        self.grant_of(me).is_some()
    }

    fn queued(&self, me: &Slot) -> Option<usize> {
        self.queue.iter().position(|e| e.slot == *me)
    }

    /// `me` holds or waits.
    pub(crate) fn contains(&self, me: &Slot) -> bool {
        self.is_holder(me) || self.queued(me).is_some()
    }

    /// The first holder (a lock's or an election's only one).
    pub(crate) fn first_holder(&self) -> Option<&Grant> {
        self.holders.first()
    }

    /// `me` gives its grant back; waiters that now fit are granted in the same write
    /// (one-write handoff). `None` if `me` does not hold (already released, or taken over).
    pub(crate) fn release(&self, me: &Slot) -> Option<Record> {
        let i = self.holders.iter().position(|g| g.entry.slot == *me)?;
        let mut record = self.clone();
        record.seq += 1;
        record.holders.remove(i);
        record.fill();
        Some(record)
    }

    /// The holders named by `released` (release markers: a slot and the token of its grant)
    /// give their grants back; waiters that now fit are granted in the same write. Itself if
    /// none of them holds that grant (a marker outlives the write that applied it).
    pub(crate) fn released(&self, released: &[Released]) -> Record {
        let mut record = self.clone();
        let before = record.holders.len();
        record.holders.retain(|g| {
            !released
                .iter()
                .any(|r| r.slot == g.entry.slot && r.token == g.token)
        });
        if record.holders.len() != before {
            record.fill();
            record.seq += 1;
        }
        record
    }

    /// A participant gives up: releases if holding, leaves the queue if waiting (which may let
    /// those behind it in), and in any case marks its slot as seen so its arrival key can never
    /// be taken in later. `None` if nothing changes.
    pub(crate) fn leave(&self, me: &Slot) -> Option<Record> {
        if self.is_holder(me) {
            return self.release(me);
        }
        let mut record = self.clone();
        match record.queued(me) {
            Some(i) => {
                record.queue.remove(i);
                record.fill();
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
    pub(crate) fn leaving(&self, me: &Slot, arrivals: &[Entry]) -> Option<Record> {
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

    /// The participants in front of `me`: every holder and every waiter ahead of it. Empty
    /// when `me` is not queued.
    pub(crate) fn blockers(&self, me: &Slot) -> Vec<&Slot> {
        let Some(i) = self.queued(me) else {
            return Vec::new();
        };
        self.holders
            .iter()
            .map(|g| &g.entry)
            .chain(self.queue[..i].iter())
            .map(|e| &e.slot)
            .collect()
    }

    /// The waiters ahead of `me` (empty when `me` is not queued, or first).
    pub(crate) fn ahead(&self, me: &Slot) -> Vec<&Slot> {
        let Some(i) = self.queued(me) else {
            return Vec::new();
        };
        self.queue[..i].iter().map(|e| &e.slot).collect()
    }

    /// Drops the `dead` participants (holders and waiters alike); waiters that now fit are
    /// granted, each with a new token. `None` if none of them is in the record.
    pub(crate) fn reap(&self, dead: &[Slot]) -> Option<Record> {
        let mut record = self.clone();
        let before = record.holders.len() + record.queue.len();
        record.holders.retain(|g| !dead.contains(&g.entry.slot));
        record.queue.retain(|e| !dead.contains(&e.slot));
        if record.holders.len() + record.queue.len() == before {
            return None;
        }
        record.fill();
        record.seq += 1;
        Some(record)
    }

    /// `me`'s grant with its value replaced by `value`. `None` if `me` does not hold.
    pub(crate) fn proclaim(&self, me: &Slot, value: &[u8]) -> Option<Record> {
        let mut record = self.clone();
        let grant = record.holders.iter_mut().find(|g| g.entry.slot == *me)?;
        grant.entry.value = Some(encode_value(value));
        record.seq += 1;
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

    fn e(s: &str, t: u64) -> Entry {
        Entry::new(slot(s, t), 1, None)
    }

    fn w(s: &str, t: u64, n: u64) -> Entry {
        Entry::new(slot(s, t), n, None)
    }

    fn holders(r: &Record) -> Vec<(String, u64)> {
        r.holders
            .iter()
            .map(|g| (g.entry.slot.session.clone(), g.token))
            .collect()
    }

    fn held_by_a_with_b_c_waiting() -> Record {
        let r = Record::empty(1).grab(&e("a", 1)).unwrap();
        r.absorb(&[e("b", 1), e("c", 1)]).unwrap()
    }

    #[test]
    fn the_same_bytes_are_parsed_once_and_equal_bytes_on_their_own() {
        let rec = held_by_a_with_b_c_waiting();
        let bytes = Bytes::from(rec.encode());
        let decode = |b: &Bytes, capacity| Record::decode_shared("lock", b"k", capacity, Some(b));
        let one = decode(&bytes, rec.capacity).unwrap();
        let two = decode(&bytes.clone(), rec.capacity).unwrap();
        assert!(Arc::ptr_eq(&one, &two), "the same bytes: one parse");
        let copy = Bytes::copy_from_slice(&bytes);
        let three = decode(&copy, rec.capacity).unwrap();
        assert!(
            !Arc::ptr_eq(&one, &three),
            "equal bytes elsewhere: parsed on their own"
        );
        assert_eq!(*one, *three);
        assert_eq!(
            Record::decode("lock", b"k", rec.capacity, Some(&bytes)).unwrap(),
            rec
        );
        // A remembered record of another capacity is still refused.
        let err = decode(&bytes, rec.capacity + 1).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
    }

    #[test]
    fn leaving_persists_the_seen_mark_even_when_a_later_own_arrival_implies_it() {
        let r = held_by_a_with_b_c_waiting();
        // d.2 gave up before being taken in; d.4 (same session) has arrived since.
        let next = r.leaving(&slot("d", 2), &[e("d", 4)]).expect("must write");
        assert!(next.seen(&slot("d", 2)));
        assert!(next.queue.contains(&e("d", 4)));
        assert_eq!(next.seq, r.seq + 1);
        // Once written, leaving again is a no-op; and so is an old slot the record has seen.
        assert!(next.leaving(&slot("d", 2), &[]).is_none());
        assert!(next.leaving(&slot("d", 1), &[]).is_none());
        // A queued participant leaves the queue; the holder releases.
        let gone = r.leaving(&slot("b", 1), &[]).unwrap();
        assert_eq!(gone.queue, vec![e("c", 1)]);
        let released = r.leaving(&slot("a", 1), &[]).unwrap();
        assert!(released.is_holder(&slot("b", 1)));
    }

    #[test]
    fn release_markers_free_their_grants_and_grant_the_queue_in_order() {
        let mut r = Record::empty(3);
        for s in ["a", "b", "c"] {
            r = r.grab(&e(s, 1)).unwrap();
        }
        let r = r.absorb(&[e("d", 1), w("e", 1, 2), e("f", 1)]).unwrap();
        let mark = |s: &str, token| Released {
            slot: slot(s, 1),
            token,
        };
        // a and c release (tokens 1 and 3): d and then e (weight 2) would fit only once both
        // have: d is granted, e waits for the third permit, f does not pass it.
        let next = r.released(&[mark("a", 1)]);
        assert_eq!(next.seq, r.seq + 1);
        assert_eq!(
            holders(&next),
            vec![("b".into(), 2), ("c".into(), 3), ("d".into(), 4)]
        );
        let next = next.released(&[mark("c", 3), mark("b", 2)]);
        assert_eq!(holders(&next), vec![("d".into(), 4), ("e".into(), 5)]);
        assert_eq!(next.queue, vec![e("f", 1)]);
        // A marker of another grant of the slot, or of a slot no longer holding: nothing.
        assert_eq!(r.released(&[mark("b", 9), mark("z", 1)]), r);
        assert_eq!(next.released(&[mark("a", 1)]), next);
    }

    #[test]
    fn grab_takes_a_free_lock_and_arrivals_queue_in_order() {
        let r = held_by_a_with_b_c_waiting();
        assert_eq!(r.epoch, 1);
        assert!(r.is_holder(&slot("a", 1)));
        assert_eq!(r.queue, vec![e("b", 1), e("c", 1)]);
        assert!(r.grab(&e("d", 1)).is_none(), "held");
        assert!(
            r.absorb(&[e("b", 1)]).is_none(),
            "an arrival is taken in once"
        );
    }

    #[test]
    fn release_hands_lock_to_oldest_waiter_and_bumps_the_token() {
        let r = held_by_a_with_b_c_waiting();
        let r2 = r.release(&slot("a", 1)).unwrap();
        assert_eq!(holders(&r2), vec![("b".into(), r.epoch + 1)]);
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
        assert!(r3.holders.is_empty());
        assert_eq!(r3.epoch, 3, "a release to nobody does not grant");
        // A stale arrival of a slot that was served is never taken in again.
        assert!(r3.absorb(&[e("b", 1)]).is_none());
        assert!(r3.absorb(&[e("b", 2)]).unwrap().is_holder(&slot("b", 2)));
    }

    #[test]
    fn absorbing_into_a_free_lock_grants_the_first_arrival() {
        let r = Record::empty(1);
        let r2 = r.absorb(&[e("x", 3), e("y", 1)]).unwrap();
        assert!(r2.is_holder(&slot("x", 3)));
        assert_eq!(r2.queue, vec![e("y", 1)]);
        assert_eq!(r2.epoch, 1);
    }

    #[test]
    fn reaping_every_blocker_grants_me_and_keeps_those_behind() {
        let r = held_by_a_with_b_c_waiting().absorb(&[e("d", 1)]).unwrap();
        let me = slot("c", 1);
        let blockers: Vec<_> = r.blockers(&me).into_iter().cloned().collect();
        assert_eq!(blockers, vec![slot("a", 1), slot("b", 1)]);
        let r2 = r.reap(&blockers).unwrap();
        assert_eq!(holders(&r2), vec![("c".into(), r.epoch + 1)]);
        assert_eq!(r2.queue, vec![e("d", 1)]);
        assert!(r2.reap(&blockers).is_none(), "reaped once");
        // Reaping only the dead holder hands over to the live waiter ahead.
        let r3 = r.reap(&[slot("a", 1)]).unwrap();
        assert!(r3.is_holder(&slot("b", 1)));
    }

    #[test]
    fn leave_removes_a_waiter_or_releases_and_blocks_a_late_arrival() {
        let r = held_by_a_with_b_c_waiting();
        let r2 = r.leave(&slot("b", 1)).unwrap();
        assert_eq!(r2.queue, vec![e("c", 1)]);
        assert!(r2.leave(&slot("b", 1)).is_none());
        let r3 = r.leave(&slot("a", 1)).unwrap();
        assert!(r3.is_holder(&slot("b", 1)));
        // Leaving before being taken in: the arrival can no longer be absorbed.
        let r4 = r.leave(&slot("z", 9)).unwrap();
        assert!(r4.absorb(&[e("z", 9)]).is_none());
    }

    #[test]
    fn weights_are_granted_in_order_and_nobody_passes_the_head() {
        // Capacity 4: a takes 3; b wants 2 (does not fit), c wants 1 (would fit, but is behind).
        let r = Record::empty(4).grab(&w("a", 1, 3)).unwrap();
        assert!(r.grab(&w("x", 1, 2)).is_none(), "does not fit");
        let r = r.absorb(&[w("b", 1, 2), w("c", 1, 1)]).unwrap();
        assert_eq!(r.used(), 3);
        assert_eq!(r.queue.len(), 2, "c waits behind b: no passing");
        assert!(r.grab(&w("d", 1, 1)).is_none(), "nobody jumps a queue");
        // a releases: b and c both fit now, granted in one write with their own tokens.
        let r2 = r.release(&slot("a", 1)).unwrap();
        assert_eq!(holders(&r2), vec![("b".into(), 2), ("c".into(), 3)]);
        assert_eq!(r2.used(), 3);
        // b (head) leaving the queue lets c in, in the same write.
        let r3 = r.leave(&slot("b", 1)).unwrap();
        assert_eq!(holders(&r3), vec![("a".into(), 1), ("c".into(), 2)]);
        // Blockers of c: every holder and b.
        assert_eq!(r.blockers(&slot("c", 1)).len(), 2);
    }

    #[test]
    fn a_record_of_another_capacity_is_refused() {
        let bytes = Bytes::from(Record::empty(4).encode());
        let err = Record::decode("semaphore", b"/s/rec", 5, Some(&bytes)).unwrap_err();
        assert!(err.to_string().contains("capacity 4"), "{err}");
        assert!(Record::decode("semaphore", b"/s/rec", 4, Some(&bytes)).is_ok());
    }

    #[test]
    fn a_version_2_lock_record_is_read() {
        let v2 = br#"{"v":2,"seq":5,"epoch":7,"holder":{"session":"a","ticket":3},"queue":[{"session":"b","ticket":1}],"absorbed":{"a":3,"b":1}}"#;
        let r = Record::decode("lock", b"k", 1, Some(&Bytes::from_static(v2))).unwrap();
        assert_eq!(r.seq, 5);
        assert_eq!(holders(&r), vec![("a".into(), 7)]);
        assert_eq!(r.queue, vec![e("b", 1)]);
        let r2 = r.release(&slot("a", 3)).unwrap();
        assert_eq!(holders(&r2), vec![("b".into(), 8)]);
    }

    #[test]
    fn a_plain_lock_record_is_written_as_version_2_a_semaphore_as_4_and_anything_else_as_3() {
        let r = held_by_a_with_b_c_waiting();
        let bytes = Bytes::from(r.encode());
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["v"], 2, "{json}");
        assert_eq!(json["holder"]["session"], "a");
        assert_eq!(Record::decode("lock", b"k", 1, Some(&bytes)).unwrap(), r);
        let sem = Record::empty(4).grab(&w("a", 1, 2)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&sem.encode()).unwrap();
        assert_eq!(json["v"], 4, "{json}");
        let leader = Record::empty(1)
            .grab(&Entry::new(slot("a", 1), 1, Some(b"x")))
            .unwrap();
        let bytes = Bytes::from(leader.encode());
        assert_eq!(
            Record::decode("election", b"k", 1, Some(&bytes)).unwrap(),
            leader
        );
    }

    #[test]
    fn a_semaphore_record_from_before_release_markers_is_read_and_written_back_as_version_4() {
        let v3 = br#"{"v":3,"seq":2,"epoch":1,"capacity":4,"holders":[{"session":"a","ticket":1,"n":2,"token":1}],"queue":[],"absorbed":{"a":1}}"#;
        let r = Record::decode("semaphore", b"k", 4, Some(&Bytes::from_static(v3))).unwrap();
        assert_eq!(r.used(), 2);
        let json: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        assert_eq!(json["v"], 4, "{json}");
        // A process that reads only up to 3 refuses it (as this one refuses 5), naming it.
        let v5 = br#"{"v":5,"seq":2,"epoch":1,"capacity":4,"holders":[],"queue":[]}"#;
        let err = Record::decode("semaphore", b"/s/rec", 4, Some(&Bytes::from_static(v5)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version 5 is not supported") && err.contains("/s/rec"),
            "{err}"
        );
    }

    #[test]
    fn an_arrival_heavier_than_the_capacity_is_never_taken_in() {
        let r = Record::empty(4)
            .absorb(&[w("big", 1, 6), w("ok", 1, 1)])
            .unwrap();
        assert!(r.seen(&slot("big", 1)) && !r.contains(&slot("big", 1)));
        assert!(r.is_holder(&slot("ok", 1)));
    }

    #[test]
    fn arrivals_and_values_round_trip() {
        let plain = e("a", 1);
        assert_eq!(plain.arrival_bytes(), b"w");
        assert_eq!(Entry::from_arrival(slot("a", 1), b"w"), Some(plain));
        let rich = Entry::new(slot("a", 2), 3, Some(b"\x00host:1"));
        let back = Entry::from_arrival(slot("a", 2), &rich.arrival_bytes()).unwrap();
        assert_eq!(back, rich);
        assert_eq!(&back.value_bytes()[..], b"\x00host:1");
        assert!(Entry::from_arrival(slot("a", 3), b"junk").is_none());
        assert!(Entry::from_arrival(slot("a", 3), br#"{"n":0}"#).is_none());
        assert!(
            Record::empty(1).grab(&rich).is_none(),
            "3 does not fit in 1"
        );
        let r = Record::empty(3).grab(&rich).unwrap();
        let p = r.proclaim(&slot("a", 2), b"new").unwrap();
        assert_eq!(
            &p.grant_of(&slot("a", 2)).unwrap().entry.value_bytes()[..],
            b"new"
        );
        assert!(p.proclaim(&slot("z", 1), b"x").is_none());
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
        let err = Record::decode(
            "lock",
            b"/dcoord/locks/x",
            1,
            Some(&Bytes::from_static(b"garbage")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/dcoord/locks/x"), "{err}");
    }
}
