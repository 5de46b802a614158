//! The queue checker.

use std::collections::BTreeSet;

use super::{Ev, Line, QueueFacts, QueueReport, Violation, show, v};

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
