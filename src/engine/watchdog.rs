//! A node's watch over itself: says loudly, in the node's log, when it does not serve or its
//! cluster has no working leader, instead of hanging in silence.
//!
//! d-engine 0.2.4 gives no such signal: a voter whose start-up health check of a peer never
//! passes answers "not ready" forever, and a cluster whose elections stall cycles between
//! candidate and follower with nothing but role-change lines. The watchdog asks its own node
//! and its peers ([`probe`]) once a second and reports:
//! - not serving for [`PATIENCE`] after start, with each peer's state (the peer that is down
//!   is the one d-engine waits for);
//! - serving, but no leader known for [`PATIENCE`] (an election stall);
//! - leader, but no peer following it for [`PATIENCE`] (a leader without a quorum).
//!
//! It only reports; it never restarts anything.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::probe::{NodeState, probe};

/// How long a bad state lasts before it is reported (and then again every this long).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Runs until the process ends. `peers` holds every voter, this node included.
pub(crate) async fn run(node_id: u32, listen: SocketAddr, peers: Vec<(u32, SocketAddr)>) {
    let started = Instant::now();
    let mut served = false;
    let mut bad_since: Option<(Instant, &'static str)> = None;
    let mut reported: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let me = probe(local(listen), Duration::from_secs(2)).await;
        let others = futures::future::join_all(
            peers
                .iter()
                .filter(|(id, _)| *id != node_id)
                .map(|&(id, addr)| async move { (id, probe(addr, Duration::from_secs(2)).await) }),
        )
        .await;
        let problem = match me {
            NodeState::Serving { leader: None } => Some("serves but knows no leader"),
            NodeState::Serving { leader: Some(l) } if l == node_id => {
                let following = others.iter().filter(|(_, s)| s.leader() == Some(node_id));
                if peers.len() > 1 && following.count() == 0 {
                    Some("is leader but no peer follows it")
                } else {
                    None
                }
            }
            NodeState::Serving { .. } => None,
            _ if !served => Some("does not serve yet"),
            _ => Some("stopped serving"),
        };
        if matches!(me, NodeState::Serving { .. }) && !served {
            served = true;
            if started.elapsed() > PATIENCE {
                tracing::warn!(
                    node = node_id,
                    "node serves now, {:?} after start",
                    started.elapsed()
                );
            }
        }
        match problem {
            None => {
                if let Some((since, what)) = bad_since.take()
                    && reported.is_some()
                {
                    tracing::warn!(
                        node = node_id,
                        "recovered: node {what} for {:?}, fine now",
                        since.elapsed()
                    );
                }
                reported = None;
            }
            Some(what) => {
                let since = match bad_since {
                    Some((since, w)) if w == what => since,
                    _ => {
                        bad_since = Some((Instant::now(), what));
                        reported = None;
                        continue;
                    }
                };
                let due = reported.is_none_or(|r| r.elapsed() >= PATIENCE);
                if since.elapsed() >= PATIENCE && due {
                    reported = Some(Instant::now());
                    let peers_said: Vec<String> = others
                        .iter()
                        .map(|(id, s)| format!("node {id}: {s}"))
                        .collect();
                    let hint = if what == "does not serve yet" {
                        " (d-engine 0.2.4 serves only after EVERY peer in its config has \
                         answered its start-up check: start the peers that are down)"
                    } else {
                        ""
                    };
                    tracing::error!(
                        node = node_id,
                        "node {what} for {:?}{hint}; peers: {}",
                        since.elapsed(),
                        peers_said.join("; ")
                    );
                }
            }
        }
    }
}

/// The address to reach a node listening on `listen` from the same host.
fn local(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    }
}
