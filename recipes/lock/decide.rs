//! What a waiting acquire does next: a pure decision from the record, the arrivals in sight
//! and what this process has observed of the sessions' heartbeats. No IO and no clock of its
//! own (`now` is an argument): the acquire loop observes, decides, then acts, and the decision
//! is unit-tested on its own.

use tokio::time::Instant;

use super::record::{Record, Slot};
use crate::session::Liveness;

/// The next step of an acquire for slot `me`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// `me` holds the lock under this fencing token.
    Granted { token: u64 },
    /// The record took `me` in once and no longer has it: only a participant that saw our
    /// session dead removes a slot, so queue again with a new one.
    Vanished,
    /// The lock is free and `me` is first in line: write `next`, which also takes every
    /// arrival in sight into the queue.
    Take(Record),
    /// Everyone ahead of `me` looks dead on this process's clock: confirm it with fresh reads
    /// of their heartbeats, then write `next` (they are dropped, `me` holds).
    TakeOver { next: Record, blockers: Vec<Slot> },
    /// Someone ahead is alive (or not yet dead long enough): wait for a change, or until the
    /// first of `blockers` could expire.
    Wait { blockers: Vec<Slot> },
}

/// Decides the next step for `me` from `rec` (the newest record in sight) and `arrivals`
/// (announced waiters, oldest first; `me` among them or not), with `liveness` observed up to
/// `now`.
pub(crate) fn decide(
    rec: &Record,
    arrivals: &[Slot],
    me: &Slot,
    liveness: &Liveness,
    now: Instant,
) -> Step {
    if rec.is_holder(me) {
        return Step::Granted { token: rec.epoch };
    }
    if rec.seen(me) && !rec.contains(me) {
        return Step::Vanished;
    }
    let mut arrivals = arrivals.to_vec();
    if !arrivals.contains(me) {
        arrivals.push(me.clone());
    }
    let next = rec.absorbed(&arrivals);
    if next.is_holder(me) {
        return Step::Take(next);
    }
    let blockers: Vec<Slot> = next.blockers(me).into_iter().cloned().collect();
    let all_dead =
        !blockers.is_empty() && blockers.iter().all(|b| liveness.is_dead(&b.session, now));
    match next.take_over(me) {
        Some(next) if all_dead => Step::TakeOver { next, blockers },
        _ => Step::Wait { blockers },
    }
}

/// The sessions whose heartbeats matter to `me` now: the holder, the queue and the arrivals
/// (observing more than the blockers is harmless: only theirs are consulted).
pub(crate) fn sessions_in_sight<'a>(
    rec: &'a Record,
    arrivals: &'a [Slot],
    me: &Slot,
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = rec
        .holder
        .iter()
        .chain(&rec.queue)
        .chain(arrivals)
        .map(|s| s.session.as_str())
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

    fn slot(s: &str, t: u64) -> Slot {
        Slot {
            session: s.into(),
            ticket: t,
        }
    }

    const LEASE: Duration = Duration::from_secs(10);

    /// `a` holds; `b` waits. Every session first observed at `t0` with no heartbeat.
    fn held_by_a_b_waiting(t0: Instant) -> (Record, Liveness) {
        let rec = Record::default().grab(&slot("a", 1)).unwrap();
        let rec = rec.absorbed(&[slot("b", 1)]);
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
        let me = slot("me", 1);
        let Step::Take(next) = decide(&Record::default(), &[], &me, &l, t0) else {
            panic!("a free lock is taken");
        };
        assert!(next.is_holder(&me));
        assert_eq!(
            decide(&next, &[], &me, &l, t0),
            Step::Granted { token: next.epoch }
        );
    }

    #[test]
    fn a_live_holder_makes_everyone_behind_wait_in_order() {
        let t0 = Instant::now();
        let (rec, l) = held_by_a_b_waiting(t0);
        let me = slot("me", 1);
        let step = decide(&rec, std::slice::from_ref(&me), &me, &l, t0 + LEASE / 2);
        assert_eq!(
            step,
            Step::Wait {
                blockers: vec![slot("a", 1), slot("b", 1)]
            }
        );
    }

    #[test]
    fn dead_blockers_are_taken_over_only_when_all_are_dead() {
        let t0 = Instant::now();
        let (rec, mut l) = held_by_a_b_waiting(t0);
        let me = slot("me", 1);
        // b renewed: it is alive, so nobody is skipped.
        l.observe(
            "b",
            Some(&bytes::Bytes::from_static(b"beat")),
            t0 + LEASE / 2,
        );
        let step = decide(&rec, std::slice::from_ref(&me), &me, &l, t0 + LEASE);
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        // Both silent for a lease: take over.
        let (rec, l) = held_by_a_b_waiting(t0);
        let Step::TakeOver { next, blockers } =
            decide(&rec, std::slice::from_ref(&me), &me, &l, t0 + LEASE)
        else {
            panic!("every blocker is dead");
        };
        assert!(next.is_holder(&me));
        assert_eq!(blockers, vec![slot("a", 1), slot("b", 1)]);
        assert!(next.epoch > rec.epoch, "a takeover is a new grant");
    }

    #[test]
    fn a_slot_removed_from_the_record_queues_again() {
        let t0 = Instant::now();
        let (rec, l) = held_by_a_b_waiting(t0);
        let b = slot("b", 1);
        let gone = rec.leave(&b).expect("b leaves");
        assert_eq!(decide(&gone, &[], &b, &l, t0), Step::Vanished);
    }

    #[test]
    fn sessions_in_sight_name_everyone_but_me_once() {
        let (rec, _) = held_by_a_b_waiting(Instant::now());
        let me = slot("me", 1);
        let arrivals = [slot("c", 1), slot("a", 2), me.clone()];
        let ids = sessions_in_sight(&rec, &arrivals, &me);
        assert_eq!(ids, vec!["a", "b", "c"]);
    }
}
