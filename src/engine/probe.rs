//! Asking one node, directly, whether it serves and whom it follows.
//!
//! d-engine 0.2.4 answers its gRPC health service as soon as the port is open, long before the
//! node serves (a voter answers every other RPC with "Service is not ready" until all its peers
//! have passed its start-up check). The one honest question is an RPC that goes through the
//! node's Raft loop: `GetClusterMetadata`, which also says which leader the node knows.

use std::net::SocketAddr;
use std::time::Duration;

use d_engine_proto::server::cluster::MetadataRequest;

use crate::tls::ClientTls;
use d_engine_proto::server::cluster::cluster_management_service_client::ClusterManagementServiceClient;

/// What one node said about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Nothing accepts connections on its address.
    Down,
    /// Its gRPC server runs, but the node does not serve yet (start-up health check of its
    /// peers not passed), or it did not answer in time.
    NotServing,
    /// It serves; `leader` is the leader it knows (`None` while an election runs).
    Serving {
        /// The leader this node knows.
        leader: Option<u32>,
    },
}

impl NodeState {
    /// The leader, if the node serves and knows one.
    pub fn leader(self) -> Option<u32> {
        match self {
            NodeState::Serving { leader } => leader,
            _ => None,
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeState::Down => f.write_str("down (connection refused)"),
            NodeState::NotServing => f.write_str("not serving (\"not ready\" or no answer)"),
            NodeState::Serving { leader: Some(l) } => write!(f, "serving, leader {l}"),
            NodeState::Serving { leader: None } => f.write_str("serving, no leader known"),
        }
    }
}

/// Asks the node at `addr` for its cluster metadata, within `timeout`.
///
/// # Cancel safety
/// Dropping the future abandons the call; nothing is changed on the node.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> NodeState {
    probe_with(addr, None, timeout).await
}

/// [`probe`] over TLS when `tls` is set.
///
/// # Cancel safety
/// As [`probe`].
pub async fn probe_with(addr: SocketAddr, tls: Option<&ClientTls>, timeout: Duration) -> NodeState {
    let call = async {
        let Ok(endpoint) = crate::tls::endpoint(&addr.to_string(), tls) else {
            return NodeState::Down;
        };
        let endpoint = endpoint.connect_timeout(timeout).timeout(timeout);
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(_) => return NodeState::Down,
        };
        match ClusterManagementServiceClient::new(channel)
            .get_cluster_metadata(MetadataRequest {})
            .await
        {
            Ok(r) => NodeState::Serving {
                leader: r.into_inner().current_leader_id,
            },
            Err(_) => NodeState::NotServing,
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(NodeState::NotServing)
}
