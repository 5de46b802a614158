//! What a waiting participant does next: a pure decision from the record, the arrivals in sight
//! and what this process has observed of the sessions' heartbeats. No IO and no clock of its
//! own (`now` is an argument): the wait loop observes, decides, then acts, and the decision is
//! unit-tested on its own.

use tokio::time::Instant;

use super::record::{Entry, Record, Released, Slot};
use crate::session::Liveness;

/// The next step of a wait for entry `me`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// `me` holds a grant under this fencing token.
    Granted { token: u64 },
    /// The record took `me` in once and no longer has it: only a participant that saw our
    /// session dead removes a slot, so queue again with a new one.
    Vanished,
    /// `me` fits and is first in line (of those `next` grants, the first alive): write
    /// `next`, which also applies every release marker and takes every arrival in sight.
    Take(Record),
    /// Some of those in front of `me` look dead on this process's clock: confirm it with fresh
    /// reads of their heartbeats, then write `next` (they are dropped; whoever now fits,
    /// perhaps `me`, is granted).
    Reap {
        next: Record,
        dead: Vec<Slot>,
        blockers: Vec<Slot>,
    },
    /// `next` grants `me` with others, and `writer` (granted by it too, ahead of `me` and
    /// alive as far as this process knows) is the one to write it: wait for that write. Safe to
    /// write `next` anyway (a CAS over the same record: a duplicate write loses, and its loser
    /// finds itself granted by the winner); the wait only avoids the collision, so a writer
    /// that does not write soon (stalled, or its sight is behind) is written for.
    Batched { next: Record, writer: Slot },
    /// Everyone in front is alive (or not yet dead long enough): wait for a change, or until
    /// the first of `blockers` could expire.
    Wait { blockers: Vec<Slot> },
}

/// Decides the next step for `me` from `rec` (the newest record in sight), `released` (the
/// release markers in sight) and `arrivals` (announced waiters, oldest first; `me` among them
/// or not), with `liveness` observed up to `now`.
pub(crate) fn decide(
    rec: &Record,
    released: &[Released],
    arrivals: &[Entry],
    me: &Entry,
    liveness: &Liveness,
    now: Instant,
) -> Step {
    if let Some(grant) = rec.grant_of(&me.slot) {
        return Step::Granted { token: grant.token };
    }
    if rec.seen(&me.slot) && !rec.contains(&me.slot) {
        return Step::Vanished;
    }
    let mut arrivals = arrivals.to_vec();
    if !arrivals.iter().any(|a| a.slot == me.slot) {
        arrivals.push(me.clone());
    }
    let next = rec.released(released).absorbed(&arrivals);
    let dead = |s: &Slot| s.session != me.slot.session && liveness.is_dead(&s.session, now);
    if next.is_holder(&me.slot) {
        // Everyone `next` grants could write it (the same record from the same sight); the
        // first of them that is alive does, so k releases cost one write and no collisions.
        // The others wait for it, or for it to die. A wrong guess costs time, never safety.
        let writer = next
            .holders
            .iter()
            .map(|g| &g.entry.slot)
            .filter(|s| !rec.is_holder(s))
            .find(|s| **s == me.slot || !dead(s))
            .expect("`next` grants `me`, and `rec` does not");
        if *writer == me.slot {
            return Step::Take(next);
        }
        let writer = writer.clone();
        return Step::Batched { next, writer };
    }
    let blockers: Vec<Slot> = next.blockers(&me.slot).into_iter().cloned().collect();
    // One reaper at a time: the first live waiter. A live waiter ahead of `me` reaps what is
    // dead in front of it (and `me` what is left once it is served), so a death costs one
    // write, not one per waiter.
    let ahead = next.ahead(&me.slot);
    if !ahead.iter().all(|s| dead(s)) {
        return Step::Wait { blockers };
    }
    let dead: Vec<Slot> = blockers.iter().filter(|b| dead(b)).cloned().collect();
    match next.reap(&dead) {
        Some(next) => Step::Reap {
            next,
            dead,
            blockers,
        },
        None => Step::Wait { blockers },
    }
}

/// The sessions whose heartbeats matter to `me` now: the holders, the queue and the arrivals
/// (observing more than the blockers is harmless: only theirs are consulted).
pub(crate) fn sessions_in_sight<'a>(
    rec: &'a Record,
    arrivals: &'a [Entry],
    me: &Slot,
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = rec
        .holders
        .iter()
        .map(|g| &g.entry)
        .chain(&rec.queue)
        .chain(arrivals)
        .map(|e| e.slot.session.as_str())
        .filter(|s| *s != me.session)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn e(s: &str, t: u64) -> Entry {
        Entry::new(
            Slot {
                session: s.into(),
                ticket: t,
            },
            1,
            None,
        )
    }

    const LEASE: Duration = Duration::from_secs(10);

    /// `a` holds; `b` waits. Every session first observed at `t0` with no heartbeat.
    fn held_by_a_b_waiting(t0: Instant) -> (Record, Liveness) {
        let rec = Record::empty(1).grab(&e("a", 1)).unwrap();
        let rec = rec.absorbed(&[e("b", 1)]);
        let mut l = Liveness::new(LEASE);
        for id in ["a", "b"] {
            l.observe(id, None, t0);
        }
        (rec, l)
    }

    #[test]
    fn a_free_lock_is_taken_and_a_held_one_is_granted() {
        let t0 = Instant::now();
        let l = Liveness::new(LEASE);
        let me = e("me", 1);
        let Step::Take(next) = decide(&Record::empty(1), &[], &[], &me, &l, t0) else {
            panic!("a free lock is taken");
        };
        assert!(next.is_holder(&me.slot));
        assert_eq!(
            decide(&next, &[], &[], &me, &l, t0),
            Step::Granted { token: next.epoch }
        );
    }

    #[test]
    fn a_live_holder_makes_everyone_behind_wait_in_order() {
        let t0 = Instant::now();
        let (rec, l) = held_by_a_b_waiting(t0);
        let me = e("me", 1);
        let step = decide(
            &rec,
            &[],
            std::slice::from_ref(&me),
            &me,
            &l,
            t0 + LEASE / 2,
        );
        assert_eq!(
            step,
            Step::Wait {
                blockers: vec![e("a", 1).slot, e("b", 1).slot]
            }
        );
    }

    #[test]
    fn dead_blockers_are_reaped_and_live_ones_kept() {
        let t0 = Instant::now();
        let (rec, mut l) = held_by_a_b_waiting(t0);
        let me = e("me", 1);
        // b renewed: only the holder a is dead. b (the first live waiter) reaps it; me, behind
        // a live b, leaves it to b.
        l.observe(
            "b",
            Some(&bytes::Bytes::from_static(b"beat")),
            t0 + LEASE / 2,
        );
        let step = decide(&rec, &[], std::slice::from_ref(&me), &me, &l, t0 + LEASE);
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        let b = e("b", 1);
        let Step::Reap { next, dead, .. } = decide(&rec, &[], &[], &b, &l, t0 + LEASE) else {
            panic!("the dead holder is reaped by the first live waiter");
        };
        assert_eq!(dead, vec![e("a", 1).slot]);
        assert!(next.is_holder(&b.slot));
        // Both silent for a lease: both reaped, me granted.
        let (rec, l) = held_by_a_b_waiting(t0);
        let Step::Reap { next, dead, .. } =
            decide(&rec, &[], std::slice::from_ref(&me), &me, &l, t0 + LEASE)
        else {
            panic!("every blocker is dead");
        };
        assert!(next.is_holder(&me.slot));
        assert_eq!(dead, vec![e("a", 1).slot, e("b", 1).slot]);
        assert!(next.epoch > rec.epoch, "a takeover is a new grant");
        // Nobody dead yet: wait.
        let (rec, l) = held_by_a_b_waiting(t0);
        let step = decide(
            &rec,
            &[],
            std::slice::from_ref(&me),
            &me,
            &l,
            t0 + LEASE / 2,
        );
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
    }

    #[test]
    fn a_slot_removed_from_the_record_queues_again() {
        let t0 = Instant::now();
        let (rec, l) = held_by_a_b_waiting(t0);
        let b = e("b", 1);
        let gone = rec.leave(&b.slot).expect("b leaves");
        assert_eq!(decide(&gone, &[], &[], &b, &l, t0), Step::Vanished);
    }

    #[test]
    fn release_markers_let_the_first_live_waiter_they_grant_write_for_all() {
        let t0 = Instant::now();
        // Two permits, held by a and b; c, d, e wait in that order.
        let mut rec = Record::empty(2);
        for s in ["a", "b"] {
            rec = rec.grab(&e(s, 1)).unwrap();
        }
        let rec = rec.absorbed(&[e("c", 1), e("d", 1), e("e", 1)]);
        let mut l = Liveness::new(LEASE);
        for id in ["a", "b", "c", "d", "e"] {
            l.observe(id, None, t0);
        }
        let marks = [
            Released {
                slot: e("a", 1).slot,
                token: 1,
            },
            Released {
                slot: e("b", 1).slot,
                token: 2,
            },
        ];
        // Both released: c and d fit. c writes for both; d waits for c; e still waits.
        let Step::Take(next) = decide(&rec, &marks, &[], &e("c", 1), &l, t0) else {
            panic!("the first waiter the markers grant writes");
        };
        assert!(next.is_holder(&e("c", 1).slot) && next.is_holder(&e("d", 1).slot));
        assert!(!next.is_holder(&e("a", 1).slot) && !next.is_holder(&e("b", 1).slot));
        let Step::Batched {
            next: for_d,
            writer,
        } = decide(&rec, &marks, &[], &e("d", 1), &l, t0 + LEASE / 2)
        else {
            panic!("d waits for c to write");
        };
        assert_eq!(writer, e("c", 1).slot);
        assert_eq!(for_d, next, "d would write what c writes");
        assert!(matches!(
            decide(&rec, &marks, &[], &e("e", 1), &l, t0),
            Step::Wait { .. }
        ));
        // c silent for a lease: d writes instead.
        l.observe(
            "d",
            Some(&bytes::Bytes::from_static(b"beat")),
            t0 + LEASE / 2,
        );
        let Step::Take(next) = decide(&rec, &marks, &[], &e("d", 1), &l, t0 + LEASE) else {
            panic!("the next live waiter writes when the first is dead");
        };
        assert!(next.is_holder(&e("c", 1).slot) && next.is_holder(&e("d", 1).slot));
        // Once written, c and d are granted by the record itself; the markers are spent.
        assert_eq!(
            decide(&next, &marks, &[], &e("d", 1), &l, t0),
            Step::Granted { token: 4 }
        );
    }

    #[test]
    fn sessions_in_sight_name_everyone_but_me_once() {
        let (rec, _) = held_by_a_b_waiting(Instant::now());
        let me = e("me", 1);
        let arrivals = [e("c", 1), e("a", 2), me.clone()];
        let ids = sessions_in_sight(&rec, &arrivals, &me.slot);
        assert_eq!(ids, vec!["a", "b", "c"]);
    }
}
