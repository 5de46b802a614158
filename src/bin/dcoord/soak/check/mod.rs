//! The soak's invariant checkers: pure functions over the recorded history.
//!
//! Every worker process appends one JSON line per event to its own log file ([`Line`]); the
//! harness keeps its own record of faults, enqueues and config writes. Times are microseconds
//! since the Unix epoch on this machine's wall clock, which every process shares.

mod config;
mod lock;
mod queue;
mod semaphore;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use config::check_config;
pub use lock::{ELECTION, check_exclusive, check_lock};
pub use queue::check_queue;
pub use semaphore::check_semaphore;

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
    /// `Semaphore::acquire(n)`, called at `asked`, returned permits with `token`.
    Permit { token: u64, asked: u64, n: u64 },
    /// The permit holder is about to release; `valid`: its session was still valid at `at`
    /// (checked after `at` was taken).
    PermitEnd { token: u64, valid: bool },
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

/// Results of the semaphore checks.
#[derive(Debug, Default)]
pub struct SemaphoreReport {
    /// Grants recorded.
    pub grants: usize,
    /// The most permits held at once (counted holds only).
    pub peak: u64,
    /// Grants whose hold could not be bounded (a killed or paused holder): not counted.
    pub uncounted: usize,
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

#[cfg(test)]
mod tests;
