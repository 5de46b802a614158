//! Starting the bundled d-engine: an embedded node, a standalone node, a local cluster.
//!
//! # Guarantees
//! - Every node dcoord starts has watch and TTL (lease) enabled, its snapshots and logs inside
//!   its own data directory, and a server-side operation timeout of 5 s (d-engine's 50 ms
//!   default fails writes under load while they still commit).
//! - Storage is dcoord's own raft log ([`raft_log`], on redb: no torn records, a durable vote)
//!   and state machine ([`state_machine`], on redb): crash-safe, never applies an entry twice,
//!   stops the node with an error naming the indexes instead of skipping a hole in the log,
//!   keeps empty values and its snapshot metadata. RocksDB is an opt-in cargo feature, never the default.
//! - TTL expiry is driven by clock ticks the leader writes through Raft, so every replica
//!   expires the same keys at the same log index; no lease setting can poison a node.
//!
//! # NOT guaranteed
//! - `RAFT__*` environment variables override what dcoord writes (d-engine's rule).
//! - d-engine prints role changes to stdout; a process that runs a node should not use stdout
//!   for data.
//!
//! - A restarting voter (d-engine 0.2.4) does not serve until EVERY peer in its config answers
//!   its startup health check (dcoord's configs retry it every 100 ms..1 s; d-engine's default
//!   backoff grows to a minute). So with one node of three down,
//!   restarting a second one does not bring the quorum back until the first returns too
//!   (pinned in `tests/conformance.rs`).
//!
//! - A node reports itself loudly (an error line in its log, see [`watchdog`]) when it does not
//!   serve, knows no leader, or leads with no follower for 10 s; when that lasts 30-45 s while
//!   every peer serves, it restarts ([`NodeExit::Restart`]: `dcoord node` re-executes itself).
//!
//! # Failure modes
//! - A data directory that cannot be written: [`crate::Error::Io`] naming it.
//! - A port in use: [`crate::Error::PortInUse`] (d-engine itself only logs it and runs on
//!   without its gRPC server).

mod cluster;
mod config;
mod embedded;
mod node_metrics;
mod probe;
pub mod raft_log;
mod redb_txn;
pub mod replica;
pub mod state_machine;
pub mod watchdog;

use std::path::Path;

pub use cluster::{ClusterOptions, LocalCluster, dcoord_binary};
#[doc(hidden)]
pub use cluster::{process_group, signal};
pub use config::{NodeConfig, Timing};
pub use embedded::{EmbeddedNode, EmbeddedOptions};
pub use probe::{NodeState, probe, probe_with};
pub use watchdog::NodeExit;

use crate::error::{Error, Result};

/// Runs one standalone node (gRPC server) from a TOML config until `shutdown` fires or its
/// [`watchdog`] asks for a restart; with `admin`, it also serves its replica view there
/// ([`replica`]).
///
/// On [`NodeExit::Restart`] the node has stopped (or was abandoned after
/// [`watchdog::STOP_GRACE`]) and its storage is synced: start it again with the same config,
/// best in a fresh process (`dcoord node` re-executes itself), since d-engine 0.2.4 may leave
/// background tasks of an abandoned node behind.
///
/// # Errors
/// [`Error::Config`] for a config d-engine or dcoord refuses (including TTL disabled),
/// [`Error::PortInUse`] when the listen address is taken.
///
/// # Cancel safety
/// Dropping the future stops serving abruptly (like a crash); the data stays consistent.
pub async fn run_node(
    config_path: &Path,
    mut shutdown: tokio::sync::watch::Receiver<()>,
    admin: Option<std::net::SocketAddr>,
) -> Result<NodeExit> {
    let cfg = config::load(config_path)?;
    config::check_bindable(cfg.cluster.listen_address)?;
    let dir = cfg.cluster.db_root_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create data dir", &dir, e))?;
    let file_sm = std::env::var_os(embedded::FILE_SM_SWITCH).is_some_and(|v| v == "1");
    let backend = embedded::Backend::open(&dir, &cfg, file_sm).await?;
    let file_log = match &backend {
        embedded::Backend::File(_) => Some(embedded::file_raft_log(&dir)?),
        embedded::Backend::Redb(..) => None,
    };
    let peers: Vec<(u32, std::net::SocketAddr)> = cfg
        .cluster
        .initial_cluster
        .iter()
        .filter_map(|m| Some((m.id, m.address.parse().ok()?)))
        .collect();
    let (id, listen) = (cfg.cluster.node_id, cfg.cluster.listen_address);
    // How this node reaches its peers, and itself (on 127.0.0.1, verifying the name it
    // advertises): over TLS when it serves TLS.
    let peer_tls = crate::tls::NodeTls::from_engine(&cfg.tls)
        .map(|t| t.client())
        .transpose()?;
    let tls = self_tls(&cfg, peer_tls.clone());
    let mut dog = AbortOnDrop(tokio::spawn(watchdog::run(
        id,
        listen,
        peers,
        tls.clone(),
        peer_tls,
    )));
    let _admin = match (admin, &backend) {
        (Some(addr), embedded::Backend::Redb(sm, log)) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    Error::PortInUse { addr }
                } else {
                    Error::Config(format!("cannot listen on admin address {addr}: {e}"))
                }
            })?;
            let task = replica::serve(listener, id, sm.clone(), log.clone());
            Some(AbortOnDrop(tokio::spawn(task)))
        }
        (Some(_), embedded::Backend::File(_)) => {
            tracing::warn!("no admin endpoint with d-engine's file storage (benchmarks only)");
            None
        }
        (None, _) => None,
    };
    let mut failure = backend.failure();
    let path = config_path.to_str().expect("checked by config::load");
    // d-engine stops on its own signal, so that a restart can stop it too.
    let (stop, stopped) = tokio::sync::watch::channel(());
    let run = async {
        match &backend {
            embedded::Backend::Redb(sm, log) => {
                let _clock = AbortOnDrop(tokio::spawn(leader_clock(
                    sm.clone(),
                    id,
                    listen,
                    tls.clone(),
                )));
                let _figures = AbortOnDrop(tokio::spawn(node_metrics::run(
                    sm.clone(),
                    log.clone(),
                    id,
                    listen,
                    tls.clone(),
                )));
                let sm = std::sync::Arc::new(sm.clone());
                d_engine::StandaloneEngine::run_custom(log.clone(), sm, stopped, Some(path)).await
            }
            embedded::Backend::File(sm) => {
                let log = file_log.expect("opened for the file backend");
                d_engine::StandaloneEngine::run_custom(log, sm.clone(), stopped, Some(path)).await
            }
        }
    };
    tokio::pin!(run);
    shutdown.borrow_and_update();
    let node_failed = |e: d_engine::Error| Error::Config(format!("node {path} failed: {e}"));
    let exit = tokio::select! {
        r = &mut run => {
            backend.sync();
            return r.map(|()| NodeExit::Shutdown).map_err(node_failed);
        }
        reason = embedded::failed(&mut failure) => {
            backend.sync();
            return Err(Error::Engine {
                op: "apply",
                message: format!("node {path} stopped by its state machine: {reason}"),
                source: None,
            });
        }
        _ = shutdown.changed() => NodeExit::Shutdown,
        reason = &mut dog.0 => NodeExit::Restart {
            reason: reason.unwrap_or_else(|e| format!("the watchdog ended: {e}")),
        },
    };
    let _ = stop.send(());
    let result = match tokio::time::timeout(watchdog::STOP_GRACE, &mut run).await {
        Ok(r) => r.map_err(node_failed),
        Err(_) => {
            tracing::warn!(
                "node {path}: d-engine did not stop within {:?}; abandoning it",
                watchdog::STOP_GRACE
            );
            Ok(())
        }
    };
    backend.sync();
    result.map(|()| exit)
}

/// How to reach the node whose config is at `config_path` as the node reaches itself: over
/// TLS, trusting its CA (and presenting its certificate when it requires client
/// certificates), when it serves TLS; `None` when it serves plain text.
///
/// # Errors
/// [`Error::Config`] for a config d-engine refuses; [`Error::Io`] / [`Error::Config`] naming a
/// certificate file that cannot be read.
pub fn node_client_tls(config_path: &Path) -> Result<Option<crate::tls::ClientTls>> {
    let cfg = config::load(config_path)?;
    let tls = crate::tls::NodeTls::from_engine(&cfg.tls)
        .map(|t| t.client())
        .transpose()?;
    Ok(self_tls(&cfg, tls))
}

/// `tls` verifying the node's own advertised host (its address in `initial_cluster`), for
/// connections to itself on a local address.
fn self_tls(
    cfg: &d_engine_core::RaftNodeConfig,
    tls: Option<crate::tls::ClientTls>,
) -> Option<crate::tls::ClientTls> {
    let own = cfg
        .cluster
        .initial_cluster
        .iter()
        .find(|m| m.id == cfg.cluster.node_id)?;
    let host = own
        .address
        .rsplit_once(':')
        .map_or(own.address.as_str(), |(h, _)| h);
    tls.map(|t| t.verifying_as(host))
}

/// The clock ticks of a cluster node: proposed while this node leads (see
/// [`state_machine::run_clock`]), through a gRPC client of its own address.
async fn leader_clock(
    sm: state_machine::RedbStateMachine,
    id: u32,
    listen: std::net::SocketAddr,
    tls: Option<crate::tls::ClientTls>,
) {
    let client = std::sync::Arc::new(tokio::sync::Mutex::new(None::<d_engine::Client>));
    state_machine::run_clock(sm, move |tick| {
        let (client, tls) = (client.clone(), tls.clone());
        async move {
            let state = probe_with(
                watchdog::local(listen),
                tls.as_ref(),
                std::time::Duration::from_secs(1),
            )
            .await;
            if !matches!(state, NodeState::Serving { leader: Some(l) } if l == id) {
                return Ok(());
            }
            let mut slot = client.lock().await;
            if slot.is_none() {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let local = watchdog::local(listen);
                let mut builder = d_engine::Client::builder(vec![format!("{scheme}://{local}")]);
                if let Some(tls) = &tls {
                    builder = builder.tls_config(tls.config());
                }
                let built = builder.build().await.map_err(|e| e.to_string())?;
                *slot = Some(built);
            }
            let c = slot.as_ref().expect("set above");
            d_engine::ClientApi::put(&**c, state_machine::TICK_KEY, tick)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
