//! The config checker.

use std::collections::BTreeMap;

use super::{ConfigReport, Ev, Fault, Line, Violation, show, slot, v};

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
