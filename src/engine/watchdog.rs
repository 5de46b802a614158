//! A node's watch over itself: says loudly, in the node's log, when it does not serve or its
//! cluster has no working leader, and restarts the node when that lasts and a restart can help,
//! instead of hanging in silence.
//!
//! d-engine 0.2.4 gives no such signal: a voter whose start-up health check of a peer never
//! passes answers "not ready" forever, and a cluster whose elections stall cycles between
//! candidate and follower with nothing but role-change lines. The watchdog asks its own node
//! and its peers ([`probe`](super::probe)) once a second and reports:
//! - not serving for [`PATIENCE`] after start, with each peer's state (the peer that is down
//!   is the one d-engine waits for);
//! - serving, but no leader known for [`PATIENCE`] (an election stall);
//! - leader, but no peer following it for [`PATIENCE`] (a leader without a quorum);
//! - not serving any more, after it did.
//!
//! # Recovery
//! When one of the last three lasts [`RESTART_AFTER`] (plus a few seconds per node id, so the
//! nodes of a stalled cluster do not all restart at once) **while every peer serves**, the
//! watchdog asks for a restart: the node stops (at most [`STOP_GRACE`], then abandoned) and
//! [`super::run_node`] returns [`NodeExit::Restart`]; `dcoord node` then re-executes itself
//! in place (same pid, same arguments). A restart is what clears the stalls seen with d-engine
//! 0.2.4 (its in-memory election state is rebuilt from the durable term, vote and log; see
//! the README), and it is as safe as a crash, which dcoord's storage survives by design.
//!
//! # NOT guaranteed
//! - No restart while a peer is down or does not answer: d-engine 0.2.4 serves only after EVERY
//!   peer answered its start-up check, so a restart then would take this node out until that
//!   peer returns. The watchdog keeps reporting instead.
//! - A node that does not serve yet after its start is never restarted (a restart would only
//!   repeat the same wait).
//! - Restarts are spaced by at least [`RESTART_AFTER`] (the node must serve first), so a cause
//!   that a restart does not clear is retried, not fixed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::probe::{NodeState, probe_with};
use crate::tls::ClientTls;

/// How long a bad state lasts before it is reported (and then again every this long).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long a stall lasts, with every peer serving, before the node restarts (node `id` waits
/// `(id - 1) % 4` × [`RESTART_STAGGER`] longer).
pub const RESTART_AFTER: Duration = Duration::from_secs(30);

/// The extra wait per node id before a restart.
pub const RESTART_STAGGER: Duration = Duration::from_secs(5);

/// How long a restart waits for d-engine to stop before it abandons it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How a node's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExit {
    /// The shutdown signal fired.
    Shutdown,
    /// The node stopped to be started again (the watchdog found a stall a restart can clear,
    /// or an operator sent SIGHUP to `dcoord node`); `reason` says why. Run it again with the
    /// same config, ideally in a fresh process (`dcoord node` re-executes itself).
    Restart {
        /// Why, for the log.
        reason: String,
    },
}

/// What the watchdog concludes from one round of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to say.
    Quiet,
    /// Log this error line.
    Report(String),
    /// Log that the node is fine again.
    Recovered(String),
    /// Restart the node, for this reason.
    Restart(String),
}

/// The watchdog's memory between rounds: pure, so its decisions are unit-tested.
#[derive(Debug)]
pub(crate) struct Watch {
    node_id: u32,
    voters: usize,
    started: Instant,
    served: bool,
    bad_since: Option<(Instant, &'static str)>,
    reported: Option<Instant>,
}

impl Watch {
    /// A watch over node `node_id` of `voters` voters, started at `now`.
    pub(crate) fn new(node_id: u32, voters: usize, now: Instant) -> Self {
        Self {
            node_id,
            voters,
            started: now,
            served: false,
            bad_since: None,
            reported: None,
        }
    }

    fn restart_after(&self) -> Duration {
        RESTART_AFTER + RESTART_STAGGER * (self.node_id.saturating_sub(1) % 4)
    }

    /// One round: this node's state and each peer's.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        me: NodeState,
        others: &[(u32, NodeState)],
    ) -> Verdict {
        let problem = match me {
            NodeState::Serving { leader: None } => Some("serves but knows no leader"),
            NodeState::Serving { leader: Some(l) } if l == self.node_id => {
                let following = others.iter().filter(|(_, s)| s.leader() == Some(l));
                if self.voters > 1 && following.count() == 0 {
                    Some("is leader but no peer follows it")
                } else {
                    None
                }
            }
            NodeState::Serving { .. } => None,
            _ if !self.served => Some("does not serve yet"),
            _ => Some("stopped serving"),
        };
        if matches!(me, NodeState::Serving { .. }) && !self.served {
            self.served = true;
            let after = now - self.started;
            if after > PATIENCE {
                return Verdict::Report(format!("node serves now, {after:?} after start"));
            }
        }
        let Some(what) = problem else {
            self.reported = None;
            return match self.bad_since.take() {
                Some((since, what)) if self.reported_once(since, now) => {
                    Verdict::Recovered(format!("node {what} for {:?}, fine now", now - since))
                }
                _ => Verdict::Quiet,
            };
        };
        let since = match self.bad_since {
            Some((since, w)) if w == what => since,
            _ => {
                self.bad_since = Some((now, what));
                self.reported = None;
                return Verdict::Quiet;
            }
        };
        let lasted = now - since;
        let peers_said: Vec<String> = others
            .iter()
            .map(|(id, s)| format!("node {id}: {s}"))
            .collect();
        let all_peers_serve = others
            .iter()
            .all(|(_, s)| matches!(s, NodeState::Serving { .. }));
        if what != "does not serve yet" && all_peers_serve && lasted >= self.restart_after() {
            self.bad_since = None;
            self.reported = None;
            self.served = false;
            self.started = now;
            return Verdict::Restart(format!(
                "node {what} for {lasted:?} while every peer serves; restarting it \
                 (peers: {})",
                peers_said.join("; ")
            ));
        }
        let due = self.reported.is_none_or(|r| now - r >= PATIENCE);
        if lasted < PATIENCE || !due {
            return Verdict::Quiet;
        }
        self.reported = Some(now);
        let hint = if what == "does not serve yet" {
            " (d-engine 0.2.4 serves only after EVERY peer in its config has answered its \
             start-up check: start the peers that are down)"
        } else if all_peers_serve {
            ""
        } else {
            " (no restart while a peer does not serve: the restarted node would wait for it)"
        };
        Verdict::Report(format!(
            "node {what} for {lasted:?}{hint}; peers: {}",
            peers_said.join("; ")
        ))
    }

    /// Whether a bad state that began at `since` was reported (the first report comes after
    /// [`PATIENCE`]).
    fn reported_once(&self, since: Instant, now: Instant) -> bool {
        now - since >= PATIENCE
    }
}

/// Runs until the node should restart, and returns why. `peers` holds every voter, this node
/// included.
pub(crate) async fn run(
    node_id: u32,
    listen: SocketAddr,
    peers: Vec<(u32, SocketAddr)>,
    self_tls: Option<ClientTls>,
    peer_tls: Option<ClientTls>,
) -> String {
    let (self_tls, tls) = (self_tls.as_ref(), peer_tls.as_ref());
    let mut watch = Watch::new(node_id, peers.len(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let me = probe_with(local(listen), self_tls, Duration::from_secs(2)).await;
        let others = futures::future::join_all(peers.iter().filter(|(id, _)| *id != node_id).map(
            |&(id, addr)| async move { (id, probe_with(addr, tls, Duration::from_secs(2)).await) },
        ))
        .await;
        match watch.observe(Instant::now(), me, &others) {
            Verdict::Quiet => {}
            Verdict::Report(line) => tracing::error!(node = node_id, "{line}"),
            Verdict::Recovered(line) => tracing::warn!(node = node_id, "recovered: {line}"),
            Verdict::Restart(reason) => {
                tracing::error!(node = node_id, "{reason}");
                return reason;
            }
        }
    }
}

/// The address to reach a node listening on `listen` from the same host.
pub(super) fn local(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLLOWS_2: NodeState = NodeState::Serving { leader: Some(2) };
    const NO_LEADER: NodeState = NodeState::Serving { leader: None };

    /// Feeds the same round every second for `secs` seconds; returns every verdict that is not
    /// quiet, with the second it came at.
    fn run(
        w: &mut Watch,
        t0: Instant,
        from: u64,
        secs: u64,
        me: NodeState,
        others: &[(u32, NodeState)],
    ) -> Vec<(u64, Verdict)> {
        (from..from + secs)
            .filter_map(|s| {
                let v = w.observe(t0 + Duration::from_secs(s), me, others);
                (v != Verdict::Quiet).then_some((s, v))
            })
            .collect()
    }

    #[test]
    fn a_stall_with_every_peer_serving_is_reported_then_restarted_after_its_staggered_wait() {
        let t0 = Instant::now();
        let mut w = Watch::new(3, 3, t0);
        let peers = [(1, NO_LEADER), (2, NO_LEADER)];
        let got = run(&mut w, t0, 0, 41, NO_LEADER, &peers);
        let seconds: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        // First seen at 0; reported at 10, 20, 30; node 3 restarts at 30 + 2 × 5 s.
        assert_eq!(seconds, [10, 20, 30, 40], "{got:?}");
        assert!(matches!(&got[3].1, Verdict::Restart(r) if r.contains("knows no leader")));
        // After a restart the node must serve again before any new restart.
        let again = run(&mut w, t0, 41, 120, NodeState::NotServing, &peers);
        assert!(
            again.iter().all(|(_, v)| !matches!(v, Verdict::Restart(_))),
            "{again:?}"
        );
    }

    #[test]
    fn no_restart_while_a_peer_does_not_serve() {
        let t0 = Instant::now();
        let mut w = Watch::new(1, 3, t0);
        let peers = [(2, NodeState::Down), (3, NO_LEADER)];
        let got = run(&mut w, t0, 0, 300, NO_LEADER, &peers);
        assert!(
            got.iter()
                .all(|(_, v)| matches!(v, Verdict::Report(r) if r.contains("no restart"))),
            "{got:?}"
        );
        assert_eq!(got.len(), 29);
    }

    #[test]
    fn a_node_that_never_served_is_reported_never_restarted() {
        let t0 = Instant::now();
        let mut w = Watch::new(1, 3, t0);
        let peers = [(2, FOLLOWS_2), (3, FOLLOWS_2)];
        let got = run(&mut w, t0, 0, 300, NodeState::NotServing, &peers);
        assert!(
            got.iter()
                .all(|(_, v)| matches!(v, Verdict::Report(r) if r.contains("does not serve yet"))),
            "{got:?}"
        );
    }

    #[test]
    fn a_node_that_stopped_serving_restarts_and_a_lone_leader_too() {
        let t0 = Instant::now();
        let mut w = Watch::new(1, 3, t0);
        let peers = [(2, FOLLOWS_2), (3, FOLLOWS_2)];
        assert_eq!(run(&mut w, t0, 0, 5, FOLLOWS_2, &peers), []);
        let got = run(&mut w, t0, 5, 40, NodeState::NotServing, &peers);
        assert!(
            matches!(got.last(), Some((35, Verdict::Restart(r))) if r.contains("stopped serving")),
            "{got:?}"
        );
        let t1 = t0 + Duration::from_secs(100);
        let mut w = Watch::new(2, 3, t1);
        let lone = run(
            &mut w,
            t1,
            0,
            40,
            FOLLOWS_2,
            &[(1, NO_LEADER), (3, NO_LEADER)],
        );
        assert!(
            matches!(lone.last(), Some((35, Verdict::Restart(r))) if r.contains("no peer follows")),
            "{lone:?}"
        );
    }

    #[test]
    fn recovery_is_logged_only_after_a_report_and_resets_the_clock() {
        let t0 = Instant::now();
        let mut w = Watch::new(1, 3, t0);
        let peers = [(2, FOLLOWS_2), (3, FOLLOWS_2)];
        assert_eq!(run(&mut w, t0, 0, 1, FOLLOWS_2, &peers), []);
        // A 5 s blip: never reported, so no "recovered" line either.
        assert_eq!(run(&mut w, t0, 1, 5, NO_LEADER, &peers), []);
        assert_eq!(run(&mut w, t0, 6, 1, FOLLOWS_2, &peers), []);
        // A 25 s stall: reported twice, recovered, and the next stall starts from zero.
        let got = run(&mut w, t0, 7, 25, NO_LEADER, &peers);
        assert_eq!(got.len(), 2, "{got:?}");
        let back = run(&mut w, t0, 32, 1, FOLLOWS_2, &peers);
        assert!(
            matches!(&back[..], [(32, Verdict::Recovered(_))]),
            "{back:?}"
        );
        let next = run(&mut w, t0, 33, 29, NO_LEADER, &peers);
        assert!(
            next.iter().all(|(_, v)| matches!(v, Verdict::Report(_))),
            "{next:?}"
        );
    }
}
