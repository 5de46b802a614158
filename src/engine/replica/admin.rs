//! The admin endpoint: a node's read-only view of its own replica over HTTP.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::{ReplicaDigests, ReplicaKeys, ReplicaSummary, hex};
use crate::engine::raft_log::RaftStorage;
use crate::engine::state_machine::{RedbStateMachine, ReplicaState};

struct Admin {
    node: u32,
    sm: RedbStateMachine,
    log: Arc<RaftStorage>,
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    node: u32,
    sm: RedbStateMachine,
    log: Arc<RaftStorage>,
) {
    let state = Arc::new(Admin { node, sm, log });
    let app = Router::new()
        .route("/v1/replica", get(summary_handler))
        .route("/v1/replica/keys", get(keys_handler))
        .route("/v1/replica/digests", get(digests_handler))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}

type Reply<T> = std::result::Result<Json<T>, (StatusCode, String)>;

async fn summary_handler(State(admin): State<Arc<Admin>>) -> Reply<ReplicaSummary> {
    blocking(move || summarize(&admin)).await
}

async fn keys_handler(State(admin): State<Arc<Admin>>) -> Reply<ReplicaKeys> {
    blocking(move || {
        let state = admin.sm.replica_state().map_err(|e| e.to_string())?;
        Ok(ReplicaKeys {
            node: admin.node,
            applied_index: state.applied_index,
            entries: state
                .entries
                .iter()
                .map(|(k, v)| (hex(k), format!("{v:016x}")))
                .collect(),
        })
    })
    .await
}

async fn digests_handler(State(admin): State<Arc<Admin>>) -> Reply<ReplicaDigests> {
    let digests = admin.sm.digests();
    Ok(Json(ReplicaDigests {
        node: admin.node,
        digests: digests
            .into_iter()
            .map(|(i, d)| (i, format!("{d:016x}")))
            .collect(),
    }))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> Reply<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(Json(v)),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn summarize(admin: &Admin) -> std::result::Result<ReplicaSummary, String> {
    let state: ReplicaState = admin.sm.replica_state().map_err(|e| e.to_string())?;
    // The maintained digest at the index the state was read at (empty if an apply already
    // pushed it out of the history, which cannot happen within one summary in practice).
    let maintained = admin
        .sm
        .digests()
        .iter()
        .rev()
        .find(|(i, _)| *i == state.applied_index)
        .map(|(_, d)| format!("{d:016x}"))
        .unwrap_or_default();
    let log = admin.log.summary().map_err(|e| e.to_string())?;
    Ok(ReplicaSummary {
        node: admin.node,
        applied_index: state.applied_index,
        applied_term: state.applied_term,
        keys: state.entries.len() as u64,
        kv_digest: format!("{:016x}", state.kv_xor),
        maintained_digest: maintained,
        ttl_digest: format!("{:016x}", state.ttl_digest),
        log_bounds: log.bounds,
        log_holes: log.holes.iter().map(|h| (*h.start(), *h.end())).collect(),
    })
}
