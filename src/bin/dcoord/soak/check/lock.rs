//! The checker of exclusive grants: the lock's, and the election's (a term is a grant).

use std::collections::HashMap;

use super::{Ev, Fault, Line, LockReport, Violation, show, v};

/// What one exclusive recipe's workers are called, and its invariants' names.
pub struct Exclusive {
    /// The worker slots' prefix (`lock-`).
    pub slots: &'static str,
    /// The nemesis's fault kinds on a worker.
    pub kill: &'static str,
    pub pause: &'static str,
    pub unique: &'static str,
    pub order: &'static str,
    pub fence: &'static str,
    pub takeover: &'static str,
}

/// The lock's.
pub const LOCK: Exclusive = Exclusive {
    slots: "lock-",
    kill: "kill-lock-worker",
    pause: "pause-lock-worker",
    unique: "lock: each token granted once",
    order: "lock: tokens increase in real time",
    fence: "lock: fenced register rejects older tokens",
    takeover: "lock: a failed holder is taken over within lease + slack",
};

/// The election's: one leader per term.
pub const ELECTION: Exclusive = Exclusive {
    slots: "elect-",
    kill: "kill-elector",
    pause: "pause-elector",
    unique: "election: each term (token) has one leader",
    order: "election: terms increase in real time",
    fence: "election: fenced register rejects older terms",
    takeover: "election: a failed leader is replaced within lease + slack",
};

/// [`check_exclusive`] for the lock workers.
pub fn check_lock(
    lines: &[Line],
    faults: &[Fault],
    takeover_bound: u64,
    end: u64,
    out: &mut Vec<Violation>,
) -> LockReport {
    check_exclusive(&LOCK, lines, faults, takeover_bound, end, out)
}

/// Invariants of an exclusive grant (the lock's, the election's), over the lines of the
/// workers of `x` only:
/// 1. no token is granted twice;
/// 2. real-time order: a grant released before another grant was made has a smaller token;
/// 3. the fenced register: a write accepted with token `t` was never sent after a write with
///    a newer token had been accepted;
/// 4. a holder killed or paused is taken over (the next grant comes) within `takeover_bound`.
pub fn check_exclusive(
    x: &Exclusive,
    lines: &[Line],
    faults: &[Fault],
    takeover_bound: u64,
    end: u64,
    out: &mut Vec<Violation>,
) -> LockReport {
    let lines: Vec<Line> = lines
        .iter()
        .filter(|l| l.w.starts_with(x.slots))
        .cloned()
        .collect();
    let lines = &lines[..];
    let grants: Vec<&Line> = lines
        .iter()
        .filter(|l| matches!(l.ev, Ev::Grant { .. }))
        .collect();
    unique_tokens(x, &grants, out);
    tokens_increase(x, lines, &grants, out);
    let (fenced_ok, fenced_rejected) = fenced_register(x, lines, out);
    let (takeovers, worst_takeover) =
        taken_over(x, lines, &grants, faults, takeover_bound, end, out);
    LockReport {
        grants: grants.len(),
        fenced_ok,
        fenced_rejected,
        takeovers,
        worst_takeover,
    }
}

/// The token of a grant, a fenced write or a release (0 for any other line).
fn token(l: &Line) -> u64 {
    match l.ev {
        Ev::Grant { token, .. }
        | Ev::FenceOk { token, .. }
        | Ev::FenceRejected { token, .. }
        | Ev::Release { token } => token,
        _ => 0,
    }
}

/// 1. Unique tokens.
fn unique_tokens(x: &Exclusive, grants: &[&Line], out: &mut Vec<Violation>) {
    let mut by_token: HashMap<u64, &Line> = HashMap::new();
    for g in grants {
        if let Some(first) = by_token.insert(token(g), g) {
            out.push(v(x.unique, format!("{}\n{}", show(first), show(g))));
        }
    }
}

/// 2. Released before the other even asked => smaller token. (`at` of a grant is only an
///    upper bound: a worker paused right after acquire() returned logs it late.)
fn tokens_increase(x: &Exclusive, lines: &[Line], grants: &[&Line], out: &mut Vec<Violation>) {
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
    let mut by_asked = grants.to_vec();
    by_asked.sort_by_key(|g| asked(g));
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
                x.order,
                format!(
                    "released before this grant, with a token not smaller:\n{}\n{}",
                    show(r),
                    show(g)
                ),
            ));
        }
    }
}

/// 3. The fenced register.
///
/// Returns how many fenced writes were accepted, and how many refused.
fn fenced_register(x: &Exclusive, lines: &[Line], out: &mut Vec<Violation>) -> (usize, usize) {
    let mut oks: Vec<(u64, u64, u64, &Line)> = lines
        .iter()
        .filter_map(|l| match l.ev {
            Ev::FenceOk { token, sent } => Some((token, sent, l.at, l)),
            _ => None,
        })
        .collect();
    let fenced_ok = oks.len();
    let fenced_rejected = lines
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
                    x.fence,
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
    (fenced_ok, fenced_rejected)
}

/// 4. Takeover after a fault on the holder.
///
/// Returns how many faults hit a holder, and the longest time from one of them to the next
/// grant (µs).
fn taken_over(
    x: &Exclusive,
    lines: &[Line],
    grants: &[&Line],
    faults: &[Fault],
    takeover_bound: u64,
    end: u64,
    out: &mut Vec<Violation>,
) -> (usize, u64) {
    let mut sorted_grants = grants.to_vec();
    sorted_grants.sort_by_key(|g| g.at);
    let mut takeovers = 0usize;
    let mut worst_takeover = 0u64;
    for f in faults
        .iter()
        .filter(|f| f.kind == x.kill || f.kind == x.pause)
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
        takeovers += 1;
        let next = sorted_grants
            .iter()
            .find(|g| g.at > f.at && g.w != f.target);
        match next {
            Some(n) => {
                let took = n.at - f.at;
                worst_takeover = worst_takeover.max(took);
                if took > takeover_bound {
                    out.push(v(
                        x.takeover,
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
                x.takeover,
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
    (takeovers, worst_takeover)
}

fn token_of(l: &Line) -> u64 {
    match l.ev {
        Ev::Grant { token, .. } => token,
        _ => 0,
    }
}
