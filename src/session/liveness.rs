//! [`Liveness`]: which sessions are dead, decided on this process's own clock.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Heartbeat;

/// Decides, on this process's monotonic clock, which sessions are dead: a session is dead
/// once its heartbeat has not changed for its lease since this tracker first saw it or saw it
/// change. A record never seen, or gone, counts as unchanged since first asked about.
///
/// Feed it every view of the sessions that matter ([`Liveness::observe`]), and wake up at
/// [`Liveness::expires_at`] to re-check: expiry produces no event.
#[derive(Debug, Clone)]
pub struct Liveness {
    default_lease: Duration,
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone)]
struct Seen {
    value: Option<Bytes>,
    changed_at: Instant,
    lease: Duration,
}

impl Liveness {
    /// A tracker; `default_lease` applies to sessions whose record it cannot read.
    pub fn new(default_lease: Duration) -> Self {
        Liveness {
            default_lease,
            seen: HashMap::new(),
        }
    }

    /// Records what session `id`'s heartbeat record holds now (`None`: absent).
    pub fn observe(&mut self, id: &str, heartbeat: Option<&Bytes>, now: Instant) {
        // Parsed only when it changed: every waiter observes everyone in sight at every wake.
        let default = self.default_lease;
        let lease = || {
            heartbeat
                .and_then(|b| serde_json::from_slice::<Heartbeat>(b).ok())
                .map_or(default, |h| Duration::from_millis(h.lease_ms))
        };
        match self.seen.get_mut(id) {
            Some(s) if s.value.as_ref() == heartbeat => {}
            Some(s) => {
                s.value = heartbeat.cloned();
                s.changed_at = now;
                s.lease = lease();
            }
            None => {
                self.seen.insert(
                    id.to_string(),
                    Seen {
                        value: heartbeat.cloned(),
                        changed_at: now,
                        lease: lease(),
                    },
                );
            }
        }
    }

    /// When session `id` will count as dead if its heartbeat does not change (None: never
    /// observed).
    pub fn expires_at(&self, id: &str) -> Option<Instant> {
        self.seen.get(id).map(|s| s.changed_at + s.lease)
    }

    /// True once session `id` has shown no heartbeat change for its lease. A session never
    /// observed is not (yet) dead: observe it first.
    pub fn is_dead(&self, id: &str, now: Instant) -> bool {
        self.expires_at(id).is_some_and(|at| now >= at)
    }

    /// Stops tracking `id`.
    pub fn forget(&mut self, id: &str) {
        self.seen.remove(id);
    }

    /// Stops tracking every session not in `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_counts_from_the_last_change_seen() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::from_secs(5));
        let hb = |seq| {
            Bytes::from(
                Heartbeat {
                    id: "a".into(),
                    seq,
                    lease_ms: 2000,
                }
                .encode(),
            )
        };
        l.observe("a", Some(&hb(1)), t0);
        assert!(!l.is_dead("a", t0 + Duration::from_millis(1999)));
        // The same record seen again does not extend it.
        l.observe("a", Some(&hb(1)), t0 + Duration::from_millis(1500));
        assert!(l.is_dead("a", t0 + Duration::from_millis(2000)));
        // A new heartbeat restarts the clock.
        l.observe("a", Some(&hb(2)), t0 + Duration::from_millis(2100));
        assert!(!l.is_dead("a", t0 + Duration::from_millis(4000)));
        assert!(l.is_dead("a", t0 + Duration::from_millis(4100)));
        // An absent record uses the default lease from when it was first asked about.
        l.observe("b", None, t0);
        assert!(!l.is_dead("b", t0 + Duration::from_millis(4999)));
        assert!(l.is_dead("b", t0 + Duration::from_secs(5)));
        assert!(!l.is_dead("never", t0 + Duration::from_secs(100)));
    }
}
