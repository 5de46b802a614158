//! The soak's invariant checkers: pure functions over the recorded history.
//!
//! Every worker process appends one JSON line per event to its own log file ([`Line`]); the
//! harness keeps its own record of faults, enqueues and config writes. Times are microseconds
//! since the Unix epoch on this machine's wall clock, which every process shares.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// One line of a worker's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Line {
    /// The worker: slot and incarnation, e.g. `lock-1#2`.
    pub w: String,
    /// When it was recorded (µs since the epoch).
    pub at: u64,
    /// What happened.
    #[serde(flatten)]
    pub ev: Ev,
}

/// What a worker recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Ev {
    /// The worker is set up and running.
    Ready,
    /// `acquire()`, called at `asked`, returned a grant (the grant happened between the two).
    Grant { token: u64, asked: u64 },
    /// A fenced write with `token`, sent at `sent`, was accepted.
    FenceOk { token: u64, sent: u64 },
    /// A fenced write was refused: a newer token had written.
    FenceRejected { token: u64, stored: u64 },
    /// `release()` of the grant returned.
    Release { token: u64 },
    /// A queue message's handler ran; `wrote`: its effect_once reported a write.
    Handled {
        id: String,
        attempt: u32,
        wrote: bool,
    },
    /// A config value was applied.
    Applied { n: u64, rev: u64 },
    /// A config value was rejected (bad bytes); the last good one stays.
    Rejected { rev: u64, error: String },
    /// An operation failed (recorded; not a violation by itself).
    Error { what: String, error: String },
}

/// The slot of a worker name: `lock-1#2` → `lock-1`.
pub fn slot(w: &str) -> &str {
    w.split('#').next().unwrap_or(w)
}

/// A fault the nemesis injected.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Its kind, e.g. `kill-leader`, `pause-lock-worker`, `garbage-config`.
    pub kind: &'static str,
    /// What it hit: a node id or a worker name.
    pub target: String,
    /// When it was injected.
    pub at: u64,
    /// When it was healed (restart, SIGCONT); equal to `at` for instant faults.
    pub healed: u64,
}

/// An invariant broken, with the history that shows it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// What happened, with the offending history lines.
    pub detail: String,
}

fn v(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

fn show(l: &Line) -> String {
    serde_json::to_string(l).unwrap_or_default()
}

/// Results of the lock checks.
#[derive(Debug, Default)]
pub struct LockReport {
    /// Grants recorded.
    pub grants: usize,
    /// Fenced writes accepted / refused.
    pub fenced_ok: usize,
    pub fenced_rejected: usize,
    /// Faults on a worker that held the lock at the time.
    pub takeovers: usize,
    /// The longest time from such a fault to the next grant (µs).
    pub worst_takeover: u64,
}

/// Lock invariants:
/// 1. no token is granted twice;
/// 2. real-time order: a grant released before another grant was made has a smaller token;
/// 3. the fenced register: a write accepted with token `t` was never sent after a write with
///    a newer token had been accepted;
/// 4. a holder killed or paused is taken over (the next grant comes) within `takeover_bound`.
pub fn check_lock(
    lines: &[Line],
    faults: &[Fault],
    takeover_bound: u64,
    end: u64,
    out: &mut Vec<Violation>,
) -> LockReport {
    let grants: Vec<&Line> = lines
        .iter()
        .filter(|l| matches!(l.ev, Ev::Grant { .. }))
        .collect();
    let token = |l: &Line| match l.ev {
        Ev::Grant { token, .. }
        | Ev::FenceOk { token, .. }
        | Ev::FenceRejected { token, .. }
        | Ev::Release { token } => token,
        _ => 0,
    };
    let mut report = LockReport {
        grants: grants.len(),
        ..LockReport::default()
    };

    // 1. Unique tokens.
    let mut by_token: HashMap<u64, &Line> = HashMap::new();
    for g in &grants {
        if let Some(first) = by_token.insert(token(g), g) {
            out.push(v(
                "lock: each token granted once",
                format!("{}\n{}", show(first), show(g)),
            ));
        }
    }

    // 2. Released before the other even asked => smaller token. (`at` of a grant is only an
    // upper bound: a worker paused right after acquire() returned logs it late.)
    let mut releases: Vec<(u64, u64, &Line)> = lines
        .iter()
        .filter(|l| matches!(l.ev, Ev::Release { .. }))
        .map(|l| (l.at, token(l), l))
        .collect();
    releases.sort_by_key(|r| r.0);
    let asked = |l: &Line| match l.ev {
        Ev::Grant { asked, .. } => asked,
        _ => l.at,
    };
    let mut by_asked = grants.clone();
    by_asked.sort_by_key(|g| asked(g));
    let mut sorted_grants = grants.clone();
    sorted_grants.sort_by_key(|g| g.at);
    let mut i = 0;
    let mut max_released: Option<(u64, &Line)> = None;
    for g in &by_asked {
        while i < releases.len() && releases[i].0 < asked(g) {
            if max_released.is_none_or(|(t, _)| releases[i].1 > t) {
                max_released = Some((releases[i].1, releases[i].2));
            }
            i += 1;
        }
        if let Some((t, r)) = max_released
            && t >= token(g)
        {
            out.push(v(
                "lock: tokens increase in real time",
                format!(
                    "released before this grant, with a token not smaller:\n{}\n{}",
                    show(r),
                    show(g)
                ),
            ));
        }
    }

    // 3. The fenced register.
    let mut oks: Vec<(u64, u64, u64, &Line)> = lines
        .iter()
        .filter_map(|l| match l.ev {
            Ev::FenceOk { token, sent } => Some((token, sent, l.at, l)),
            _ => None,
        })
        .collect();
    report.fenced_ok = oks.len();
    report.fenced_rejected = lines
        .iter()
        .filter(|l| matches!(l.ev, Ev::FenceRejected { .. }))
        .count();
    oks.sort_by_key(|o| std::cmp::Reverse(o.0));
    // Walking from the newest token down: the earliest acceptance among strictly newer tokens.
    let mut earliest_newer: Option<(u64, &Line)> = None;
    let mut j = 0;
    while j < oks.len() {
        let t = oks[j].0;
        let group_end = oks[j..]
            .iter()
            .position(|o| o.0 != t)
            .map_or(oks.len(), |p| j + p);
        for o in &oks[j..group_end] {
            if let Some((at, newer)) = earliest_newer
                && at < o.1
            {
                out.push(v(
                    "lock: fenced register rejects older tokens",
                    format!(
                        "accepted a write sent after a newer token's write was accepted:\n{}\n{}",
                        show(newer),
                        show(o.3)
                    ),
                ));
            }
        }
        for o in &oks[j..group_end] {
            if earliest_newer.is_none_or(|(at, _)| o.2 < at) {
                earliest_newer = Some((o.2, o.3));
            }
        }
        j = group_end;
    }

    // 4. Takeover after a fault on the holder.
    for f in faults
        .iter()
        .filter(|f| matches!(f.kind, "kill-lock-worker" | "pause-lock-worker"))
    {
        let held = grants.iter().rev().find(|g| {
            g.w == f.target
                && g.at <= f.at
                && !lines.iter().any(|l| {
                    l.w == g.w
                        && l.at <= f.at
                        && matches!(l.ev, Ev::Release { token } if token == self::token_of(g))
                })
        });
        let Some(held) = held else { continue };
        report.takeovers += 1;
        let next = sorted_grants
            .iter()
            .find(|g| g.at > f.at && g.w != f.target);
        match next {
            Some(n) => {
                let took = n.at - f.at;
                report.worst_takeover = report.worst_takeover.max(took);
                if took > takeover_bound {
                    out.push(v(
                        "lock: a failed holder is taken over within lease + slack",
                        format!(
                            "{} on {} at {}; next grant {:.1} s later:\n{}\n{}",
                            f.kind,
                            f.target,
                            f.at,
                            took as f64 / 1e6,
                            show(held),
                            show(n)
                        ),
                    ));
                }
            }
            None if end.saturating_sub(f.at) > takeover_bound => out.push(v(
                "lock: a failed holder is taken over within lease + slack",
                format!(
                    "{} on {}: never taken over:\n{}",
                    f.kind,
                    f.target,
                    show(held)
                ),
            )),
            None => {}
        }
    }
    report
}

fn token_of(l: &Line) -> u64 {
    match l.ev {
        Ev::Grant { token, .. } => token,
        _ => 0,
    }
}

/// What the harness knows about the queue at the end.
#[derive(Debug, Default)]
pub struct QueueFacts {
    /// Ids whose enqueue returned Ok.
    pub confirmed: BTreeSet<String>,
    /// Ids whose enqueue never returned Ok (they may or may not exist).
    pub unconfirmed: BTreeSet<String>,
    /// Ids of poison messages (handlers always fail them).
    pub poison: BTreeSet<String>,
    /// Effect keys found: message id → the worker that wrote it.
    pub effects: BTreeMap<String, String>,
    /// Ids in the dead letters.
    pub dead: BTreeSet<String>,
}

/// Results of the queue checks.
#[derive(Debug, Default)]
pub struct QueueReport {
    pub enqueued: usize,
    pub effects: usize,
    pub deliveries: usize,
    pub redeliveries: usize,
    pub dead: usize,
}

/// Queue invariants: every confirmed message has its effect exactly once (an effect key is
/// written once by construction; a missing one is a lost message), no effect for a message
/// never enqueued, dead letters only and all for poison messages.
pub fn check_queue(lines: &[Line], facts: &QueueFacts, out: &mut Vec<Violation>) -> QueueReport {
    let handled: Vec<(&String, &Line)> = lines
        .iter()
        .filter_map(|l| match &l.ev {
            Ev::Handled { id, .. } => Some((id, l)),
            _ => None,
        })
        .collect();
    let distinct: BTreeSet<&String> = handled.iter().map(|h| h.0).collect();
    let lines_of = |id: &str| {
        handled
            .iter()
            .filter(|h| h.0 == id)
            .map(|h| show(h.1))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for id in &facts.confirmed {
        if facts.poison.contains(id) {
            if !facts.dead.contains(id) {
                out.push(v(
                    "queue: poison messages end in the dead letters",
                    format!(
                        "{id} is not in the dead letters; its deliveries:\n{}",
                        lines_of(id)
                    ),
                ));
            }
        } else if !facts.effects.contains_key(id) {
            out.push(v(
                "queue: no message lost",
                format!(
                    "{id} was enqueued but its effect never happened; deliveries:\n{}",
                    lines_of(id)
                ),
            ));
        }
    }
    for id in facts.effects.keys() {
        if !facts.confirmed.contains(id) && !facts.unconfirmed.contains(id) {
            out.push(v(
                "queue: effects only for enqueued messages",
                format!("effect for {id}, never enqueued"),
            ));
        }
    }
    for id in &facts.dead {
        if !facts.poison.contains(id) {
            out.push(v(
                "queue: dead letters only for poison messages",
                format!(
                    "{id} is in the dead letters; its deliveries:\n{}",
                    lines_of(id)
                ),
            ));
        }
    }
    QueueReport {
        enqueued: facts.confirmed.len(),
        effects: facts.effects.len(),
        deliveries: handled.len(),
        redeliveries: handled.len() - distinct.len(),
        dead: facts.dead.len(),
    }
}

/// Results of the config checks.
#[derive(Debug, Default)]
pub struct ConfigReport {
    pub writes: usize,
    pub applied: usize,
    pub rejected: usize,
    /// The longest time from a fault's heal to every watcher holding the value written
    /// before it (µs).
    pub worst_convergence: u64,
}

/// Config invariants: per watcher process, values and revisions never go backwards; only
/// written values are applied (never garbage); after each fault, every watcher holds the value
/// confirmed before the heal within `bound`; at the end every watcher holds `final_n`.
pub fn check_config(
    lines: &[Line],
    writes: &[(u64, u64)],
    max_attempted: u64,
    faults: &[Fault],
    bound: u64,
    final_n: u64,
    out: &mut Vec<Violation>,
) -> ConfigReport {
    let mut report = ConfigReport {
        writes: writes.len(),
        ..ConfigReport::default()
    };
    let mut by_worker: BTreeMap<&str, Vec<&Line>> = BTreeMap::new();
    for l in lines {
        match l.ev {
            Ev::Applied { .. } => {
                report.applied += 1;
                by_worker.entry(&l.w).or_default().push(l);
            }
            Ev::Rejected { .. } => report.rejected += 1,
            _ => {}
        }
    }
    for (w, ls) in &by_worker {
        let mut last: Option<&Line> = None;
        for l in ls {
            let Ev::Applied { n, rev } = l.ev else {
                continue;
            };
            if n == 0 || n > max_attempted {
                out.push(v(
                    "config: only written values are applied",
                    format!("{w} applied a value never written:\n{}", show(l)),
                ));
            }
            if let Some(p) = last
                && let Ev::Applied { n: pn, rev: prev } = p.ev
                && (n < pn || rev < prev)
            {
                out.push(v(
                    "config: never goes backwards",
                    format!("{w}:\n{}\n{}", show(p), show(l)),
                ));
            }
            last = Some(l);
        }
    }
    let mut slots: BTreeMap<&str, Vec<&Line>> = BTreeMap::new();
    for (w, ls) in &by_worker {
        slots.entry(slot(w)).or_default().extend(ls.iter().copied());
    }
    for f in faults {
        let Some(&(want, _)) = writes.iter().rev().find(|(_, at)| *at <= f.healed) else {
            continue;
        };
        for (s, ls) in &slots {
            let reached = ls
                .iter()
                .filter(|l| matches!(l.ev, Ev::Applied { n, .. } if n >= want))
                .map(|l| l.at)
                .min();
            let took = reached.map(|at| at.saturating_sub(f.healed));
            match took {
                Some(t) if t <= bound => report.worst_convergence = report.worst_convergence.max(t),
                _ => out.push(v(
                    "config: watchers converge after a fault",
                    format!(
                        "{s} did not hold n >= {want} within {} s of healing {} on {} (took {:?} s)",
                        bound / 1_000_000,
                        f.kind,
                        f.target,
                        took.map(|t| t as f64 / 1e6)
                    ),
                )),
            }
        }
    }
    for (s, ls) in &slots {
        let last = ls.iter().max_by_key(|l| l.at);
        if !last.is_some_and(|l| matches!(l.ev, Ev::Applied { n, .. } if n == final_n)) {
            out.push(v(
                "config: watchers end at the last written value",
                format!(
                    "{s} ends at {:?}; the last write was n = {final_n}",
                    last.map(|l| show(l))
                ),
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(w: &str, at: u64, ev: Ev) -> Line {
        Line {
            w: w.into(),
            at,
            ev,
        }
    }

    fn lock_violations(lines: &[Line], faults: &[Fault]) -> Vec<&'static str> {
        let mut out = Vec::new();
        check_lock(lines, faults, 10, 1_000, &mut out);
        out.into_iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_clean_lock_history_passes() {
        let h = [
            l("a#1", 1, Ev::Grant { token: 1, asked: 1 }),
            l("a#1", 2, Ev::FenceOk { token: 1, sent: 2 }),
            l("a#1", 3, Ev::Release { token: 1 }),
            l("b#1", 4, Ev::Grant { token: 2, asked: 4 }),
            l("b#1", 5, Ev::FenceOk { token: 2, sent: 5 }),
            l("b#1", 6, Ev::Release { token: 2 }),
        ];
        assert!(lock_violations(&h, &[]).is_empty());
    }

    #[test]
    fn duplicate_and_backward_tokens_are_caught() {
        let h = [
            l("a#1", 1, Ev::Grant { token: 5, asked: 1 }),
            l("a#1", 3, Ev::Release { token: 5 }),
            l("b#1", 4, Ev::Grant { token: 5, asked: 4 }),
            l("b#1", 6, Ev::Release { token: 5 }),
            l("c#1", 7, Ev::Grant { token: 4, asked: 7 }),
        ];
        let got = lock_violations(&h, &[]);
        assert!(got.contains(&"lock: each token granted once"));
        assert_eq!(
            got.iter()
                .filter(|i| **i == "lock: tokens increase in real time")
                .count(),
            2
        );
    }

    #[test]
    fn a_stale_fenced_write_accepted_late_is_caught() {
        let h = [
            l("b#1", 10, Ev::FenceOk { token: 2, sent: 9 }),
            // Sent at 11, after token 2 was accepted at 10, yet accepted.
            l("a#1", 12, Ev::FenceOk { token: 1, sent: 11 }),
        ];
        assert_eq!(
            lock_violations(&h, &[]),
            ["lock: fenced register rejects older tokens"]
        );
        // Sent before the newer write was accepted: a legal interleaving.
        let ok = [
            l("b#1", 10, Ev::FenceOk { token: 2, sent: 9 }),
            l("a#1", 12, Ev::FenceOk { token: 1, sent: 8 }),
        ];
        assert!(lock_violations(&ok, &[]).is_empty());
    }

    #[test]
    fn a_slow_takeover_is_caught() {
        let h = [
            l("a#1", 1, Ev::Grant { token: 1, asked: 1 }),
            l(
                "b#1",
                30,
                Ev::Grant {
                    token: 2,
                    asked: 30,
                },
            ),
        ];
        let fault = |at| Fault {
            kind: "kill-lock-worker",
            target: "a#1".into(),
            at,
            healed: at,
        };
        assert_eq!(
            lock_violations(&h, &[fault(5)]),
            ["lock: a failed holder is taken over within lease + slack"]
        );
        assert!(lock_violations(&h, &[fault(25)]).is_empty());
    }

    #[test]
    fn lost_and_misrouted_messages_are_caught() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let facts = QueueFacts {
            confirmed: set(&["m1", "m2", "p1", "p2"]),
            unconfirmed: set(&["m3"]),
            poison: set(&["p1", "p2"]),
            effects: [("m1", "c#1"), ("m3", "c#1"), ("m9", "c#1")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            dead: set(&["p1", "m1"]),
        };
        let mut out = Vec::new();
        check_queue(&[], &facts, &mut out);
        let got: BTreeSet<_> = out.iter().map(|v| v.invariant).collect();
        assert_eq!(
            got,
            [
                "queue: no message lost",
                "queue: effects only for enqueued messages",
                "queue: dead letters only for poison messages",
                "queue: poison messages end in the dead letters",
            ]
            .into_iter()
            .collect()
        );
    }

    #[test]
    fn config_regressions_garbage_and_slow_convergence_are_caught() {
        let a = |w: &str, at, n, rev| l(w, at, Ev::Applied { n, rev });
        let writes = [(1, 10), (2, 20), (3, 30)];
        let clean = [
            a("w-0#1", 11, 1, 1),
            a("w-0#1", 21, 2, 2),
            a("w-0#1", 31, 3, 3),
        ];
        let fault = Fault {
            kind: "kill-leader",
            target: "1".into(),
            at: 15,
            healed: 22,
        };
        let mut out = Vec::new();
        check_config(
            &clean,
            &writes,
            3,
            std::slice::from_ref(&fault),
            5,
            3,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");

        let bad = [
            a("w-0#1", 11, 2, 2),
            a("w-0#1", 12, 1, 1),
            a("w-0#1", 13, 7, 9),
            a("w-0#1", 40, 2, 9),
        ];
        check_config(&bad, &writes, 3, &[fault], 5, 3, &mut out);
        let got: BTreeSet<_> = out.iter().map(|v| v.invariant).collect();
        assert!(got.contains("config: never goes backwards"));
        assert!(got.contains("config: only written values are applied"));
        assert!(got.contains("config: watchers end at the last written value"));
    }
}
