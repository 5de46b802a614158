use super::*;

fn l(w: &str, at: u64, ev: Ev) -> Line {
    Line {
        w: w.into(),
        at,
        ev,
    }
}

/// The lock checker's violations, with the workers named as lock workers (`a#1` is
/// `lock-a#1`); the election's name the same events as election invariants.
fn lock_violations(lines: &[Line], faults: &[Fault]) -> Vec<&'static str> {
    let slot = |w: &str| format!("lock-{w}");
    let lines: Vec<Line> = lines
        .iter()
        .map(|l| Line {
            w: slot(&l.w),
            ..l.clone()
        })
        .collect();
    let faults: Vec<Fault> = faults
        .iter()
        .map(|f| Fault {
            target: slot(&f.target),
            ..f.clone()
        })
        .collect();
    let mut out = Vec::new();
    check_lock(&lines, &faults, 10, 1_000, &mut out);
    // Another recipe's workers are not the lock's business.
    let mut none = Vec::new();
    check_lock(
        &lines
            .iter()
            .map(|l| Line {
                w: format!("elect-{}", l.w),
                ..l.clone()
            })
            .collect::<Vec<_>>(),
        &[],
        10,
        1_000,
        &mut none,
    );
    assert!(none.is_empty(), "{none:?}");
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

#[test]
fn more_than_n_permits_at_once_is_caught_and_invalid_holds_are_not_counted() {
    let permit = |w: &str, at, token, n| {
        l(
            w,
            at,
            Ev::Permit {
                token,
                asked: at,
                n,
            },
        )
    };
    let end = |w: &str, at, token, valid| l(w, at, Ev::PermitEnd { token, valid });
    let clean = [
        permit("permit-a#1", 1, 1, 2),
        end("permit-a#1", 5, 1, true),
        permit("permit-b#1", 5, 2, 1),
        permit("permit-c#1", 6, 3, 1),
        end("permit-b#1", 9, 2, true),
        end("permit-c#1", 9, 3, true),
        // A paused holder: its hold ended invalid, and is not counted.
        permit("permit-d#1", 7, 4, 2),
        end("permit-d#1", 20, 4, false),
    ];
    let mut out = Vec::new();
    let r = check_semaphore(&clean, 2, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!((r.grants, r.peak, r.uncounted), (4, 2, 1));
    let mut bad = clean.to_vec();
    bad.push(permit("permit-e#1", 7, 5, 1));
    bad.push(end("permit-e#1", 8, 5, true));
    bad.push(permit("permit-f#1", 8, 2, 1));
    let mut out = Vec::new();
    check_semaphore(&bad, 2, &mut out);
    let got: Vec<_> = out.iter().map(|v| v.invariant).collect();
    assert_eq!(
        got,
        [
            "semaphore: each token granted once",
            "semaphore: never more than N permits held"
        ]
    );
}
