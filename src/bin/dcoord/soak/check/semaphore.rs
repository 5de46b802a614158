//! The semaphore checker.

use std::collections::HashMap;

use super::{Ev, Line, SemaphoreReport, Violation, show, v};

/// The worker slots' prefix.
pub const SLOTS: &str = "permit-";

/// Semaphore invariants, over the permit workers' lines:
/// 1. no token is granted twice;
/// 2. never more than `permits` permits held at once. A hold counts from when its grant was
///    recorded (after the grant happened) to its `PermitEnd`, recorded while the holder's
///    session was still valid (before the permits could go to anyone else): a sub-interval
///    of the real hold, so an overlap found is a real one. Holds that ended invalid (a paused
///    holder) or never ended (a killed one) are not counted.
pub fn check_semaphore(lines: &[Line], permits: u64, out: &mut Vec<Violation>) -> SemaphoreReport {
    let lines: Vec<&Line> = lines.iter().filter(|l| l.w.starts_with(SLOTS)).collect();
    let grants: Vec<&Line> = lines
        .iter()
        .copied()
        .filter(|l| matches!(l.ev, Ev::Permit { .. }))
        .collect();
    let mut by_token: HashMap<u64, &Line> = HashMap::new();
    for g in &grants {
        let Ev::Permit { token, .. } = g.ev else {
            continue;
        };
        if let Some(first) = by_token.insert(token, g) {
            out.push(v(
                "semaphore: each token granted once",
                format!("{}\n{}", show(first), show(g)),
            ));
        }
    }
    let ends: HashMap<(&str, u64), &Line> = lines
        .iter()
        .filter_map(|l| match l.ev {
            Ev::PermitEnd { token, valid: true } => Some(((l.w.as_str(), token), *l)),
            _ => None,
        })
        .collect();
    // (time, +n at a start / -n at an end, the line); ends sort first at equal times.
    let mut edges: Vec<(u64, i64, &Line)> = Vec::new();
    let mut invalid = 0;
    for g in &grants {
        let Ev::Permit { token, n, .. } = g.ev else {
            continue;
        };
        match ends.get(&(g.w.as_str(), token)) {
            Some(end) if end.at >= g.at => {
                edges.push((g.at, n as i64, g));
                edges.push((end.at, -(n as i64), end));
            }
            _ => invalid += 1,
        }
    }
    edges.sort_by_key(|e| (e.0, e.1));
    let (mut held, mut peak) = (0i64, 0i64);
    let mut open: Vec<&Line> = Vec::new();
    let mut reported = false;
    for (_, delta, line) in edges {
        held += delta;
        if delta > 0 {
            open.push(line);
        } else {
            open.retain(|g| !(g.w == line.w && token(g) == token(line)));
        }
        peak = peak.max(held);
        if held > permits as i64 && !reported {
            reported = true;
            out.push(v(
                "semaphore: never more than N permits held",
                format!(
                    "{held} of {permits} permits held at once by:\n{}",
                    open.iter().map(|l| show(l)).collect::<Vec<_>>().join("\n")
                ),
            ));
        }
    }
    SemaphoreReport {
        grants: grants.len(),
        peak: peak.max(0) as u64,
        uncounted: invalid,
    }
}

fn token(l: &Line) -> u64 {
    match l.ev {
        Ev::Permit { token, .. } | Ev::PermitEnd { token, .. } => token,
        _ => 0,
    }
}
