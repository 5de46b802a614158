//! A node's own figures as gauges ([`crate::metrics`]'s `dcoord_node_*`), set once a second
//! while the node runs; `dcoord node --metrics-addr` serves them with everything else.
//!
//! d-engine 0.2.4 does not let an embedding read its commit index: the node reports its last
//! applied index (the state machine applies on commit, so it trails the commit index by the
//! apply step) and its last log index (at or above it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use d_engine_core::{LogStore, StateMachine, StorageEngine};
use metrics::gauge;

use super::probe::{NodeState, probe_with};
use super::raft_log::RaftStorage;
use super::state_machine::RedbStateMachine;
use crate::metrics::*;
use crate::tls::ClientTls;

/// Sets the gauges every second, until dropped.
pub(crate) async fn run(
    sm: RedbStateMachine,
    log: Arc<RaftStorage>,
    id: u32,
    listen: SocketAddr,
    tls: Option<ClientTls>,
) {
    let tls = tls.as_ref();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let applied = StateMachine::last_applied(&sm);
        gauge!(NODE_APPLIED_INDEX).set(applied.index as f64);
        gauge!(NODE_APPLIED_TERM).set(applied.term as f64);
        gauge!(NODE_KEYS).set(StateMachine::len(&sm) as f64);
        gauge!(NODE_LAST_LOG_INDEX).set(log.log_store().last_index() as f64);
        if let Ok(term) = log.last_log_term() {
            gauge!(NODE_TERM).set(term as f64);
        }
        let state = probe_with(super::watchdog::local(listen), tls, Duration::from_secs(1)).await;
        let leader = state.leader();
        gauge!(NODE_SERVING).set(f64::from(u8::from(matches!(
            state,
            NodeState::Serving { .. }
        ))));
        gauge!(NODE_LEADER_ID).set(f64::from(leader.unwrap_or(0)));
        gauge!(NODE_IS_LEADER).set(f64::from(u8::from(leader == Some(id))));
    }
}
