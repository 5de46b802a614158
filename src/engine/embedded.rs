//! One d-engine node inside this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use d_engine::storage::DefaultLease;
use d_engine::{EmbeddedEngine, FileStateMachine, FileStorageEngine};
use tokio::sync::watch;

use super::config::{self, NodeConfig};
use super::raft_log::{RaftStorage, open_raft_log};
use super::state_machine::{RedbStateMachine, TICK_KEY, open_state_machine, run_clock};
use crate::error::{Error, Result};
use crate::store::{EmbeddedStore, Store};

/// Options of [`EmbeddedNode::start_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// The gRPC port (d-engine always serves gRPC, even embedded). `None`: a free port.
    pub(crate) port: Option<u16>,
    /// How long to wait for the node to become leader. Default 30 s.
    pub(crate) ready_timeout: Option<Duration>,
    /// Runs d-engine's `FileStateMachine` instead of dcoord's: for side-by-side benchmarks
    /// only; it is not crash-safe (see the README).
    #[doc(hidden)]
    pub(crate) bench_file_state_machine: bool,
}

impl EmbeddedOptions {
    /// The gRPC port (d-engine always serves gRPC, even embedded). Default: a free port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// How long to wait for the node to become leader. Default 30 s.
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = Some(timeout);
        self
    }

    /// Runs d-engine's `FileStateMachine` instead of dcoord's: for side-by-side benchmarks
    /// only; it is not crash-safe (see the README).
    #[doc(hidden)]
    #[must_use]
    pub fn bench_file_state_machine(mut self, on: bool) -> Self {
        self.bench_file_state_machine = on;
        self
    }
}

/// A single-node d-engine cluster running inside this process, with its data in one directory.
///
/// Watch and TTL are always enabled; the gRPC server listens on 127.0.0.1 (a free port unless
/// given), so other processes can reach the same data with a [`crate::store::RemoteStore`].
///
/// # Example
/// ```
/// # #[tokio::main] async fn main() -> dcoord::Result<()> {
/// use dcoord::store::{Consistency, Store};
/// let dir = tempfile::tempdir().unwrap();
/// let node = dcoord::engine::EmbeddedNode::start(dir.path()).await?;
/// let store = node.store();
/// store.put(b"/app/greeting", b"hello").await?;
/// assert_eq!(store.get(b"/app/greeting", Consistency::Linearizable).await?.unwrap(), "hello");
/// node.stop().await?;
/// # Ok(()) }
/// ```
pub struct EmbeddedNode {
    engine: EmbeddedEngine,
    store: Arc<EmbeddedStore>,
    stopped: watch::Sender<bool>,
    listen: SocketAddr,
    dir: PathBuf,
    /// The clock ticker and the failure watcher: aborted on stop and drop.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    backend: Backend,
}

impl std::fmt::Debug for EmbeddedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedNode")
            .field("dir", &self.dir)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl EmbeddedNode {
    /// Starts (or restarts) a node in `dir` on a free port and waits until it is ready.
    ///
    /// # Errors
    /// [`Error::Io`] when `dir` cannot be created or written; [`Error::Config`] when d-engine
    /// refuses the configuration or does not become ready.
    ///
    /// # Cancel safety
    /// Dropping the future before it returns may leave a started engine running in the
    /// background until the runtime shuts down.
    pub async fn start(dir: impl AsRef<Path>) -> Result<Self> {
        Self::start_with(dir, EmbeddedOptions::default()).await
    }

    /// [`EmbeddedNode::start`] with options.
    ///
    /// # Errors
    /// As [`EmbeddedNode::start`], plus [`Error::PortInUse`] when the given port is taken.
    ///
    /// # Cancel safety
    /// As [`EmbeddedNode::start`].
    pub async fn start_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let listen = match options.port {
            Some(port) => {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                config::check_bindable(addr)?;
                addr
            }
            None => config::free_addrs(1)?[0],
        };
        let cfg = NodeConfig::single(&dir, listen);
        let path = cfg.write()?;
        let (engine, backend) = start_engine(&dir, &path, options.bench_file_state_machine).await?;
        let ready = options.ready_timeout.unwrap_or(Duration::from_secs(30));
        let mut failure = backend.failure();
        let waited = tokio::select! {
            r = engine.wait_ready(ready) => r.map_err(|e| e.to_string()),
            reason = failed(&mut failure) => Err(reason),
        };
        if let Err(e) = waited {
            let _ = engine.stop().await;
            return Err(Error::Config(format!(
                "embedded node in {dir:?} did not become ready within {ready:?}: {e}"
            )));
        }
        let (stopped, stopped_rx) = watch::channel(false);
        let store = Arc::new(EmbeddedStore::new(engine.client(), stopped_rx));
        let mut tasks = Vec::new();
        // A state machine that stopped the node (a gap in the raft log) ends every watch and
        // fails every later operation with `Stopped`, instead of leaving calls to time out.
        let on_failure = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let reason = failed(&mut failure).await;
            tracing::error!("embedded node stopped by its state machine: {reason}");
            on_failure.send_replace(true);
        }));
        if let Backend::Redb(sm, _) = &backend {
            let client = engine.client();
            tasks.push(tokio::spawn(run_clock(sm.clone(), move |tick| {
                let client = client.clone();
                async move { client.put(TICK_KEY, tick).await.map_err(|e| e.to_string()) }
            })));
        }
        Ok(Self {
            engine,
            store,
            stopped,
            listen,
            dir,
            tasks,
            backend,
        })
    }

    /// The node's store.
    pub fn store(&self) -> Arc<EmbeddedStore> {
        self.store.clone()
    }

    /// The node's store as `Arc<dyn Store>`.
    pub fn dyn_store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The gRPC endpoint other processes can connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the engine. Every watch stream of this node's store ends with
    /// [`Error::WatchEnded`] and later operations fail with [`Error::Stopped`].
    ///
    /// # Errors
    /// [`Error::Engine`] if d-engine reports a shutdown failure (the node is stopped anyway).
    ///
    /// # Cancel safety
    /// Watches are ended first; dropping the future may leave the engine's shutdown unfinished.
    pub async fn stop(&self) -> Result<()> {
        self.stopped.send_replace(true);
        self.tasks.iter().for_each(|t| t.abort());
        let stopped = self.engine.stop().await.map_err(|e| Error::Engine {
            op: "stop",
            message: e.to_string(),
            source: None,
        });
        self.backend.sync();
        stopped
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        // d-engine's own Drop signals its shutdown; make sure our watches end too.
        self.stopped.send_replace(true);
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Starts the engine on dcoord's backend (d-engine's file raft log, dcoord's state machine).
async fn start_engine(
    dir: &Path,
    config_path: &Path,
    file_sm: bool,
) -> Result<(EmbeddedEngine, Backend)> {
    let cfg = config::load(config_path)?;
    let path = config_path.to_str().expect("checked by config::load");
    let backend = Backend::open(dir, &cfg, file_sm).await?;
    let started = match &backend {
        Backend::Redb(sm, log) => {
            EmbeddedEngine::start_custom(log.clone(), Arc::new(sm.clone()), Some(path)).await
        }
        Backend::File(sm) => {
            EmbeddedEngine::start_custom(file_raft_log(dir)?, sm.clone(), Some(path)).await
        }
    };
    let engine =
        started.map_err(|e| Error::Config(format!("d-engine did not start in {dir:?}: {e}")))?;
    Ok((engine, backend))
}

/// d-engine's file raft log in `<dir>/file_storage` (benchmarks only).
pub(crate) fn file_raft_log(dir: &Path) -> Result<Arc<FileStorageEngine>> {
    FileStorageEngine::new(dir.join("file_storage"))
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("cannot open raft log in {dir:?}: {e}")))
}

/// The storage a node runs.
pub(crate) enum Backend {
    /// dcoord's own state machine ([`RedbStateMachine`]) and raft log ([`RaftStorage`]),
    /// always, except:
    Redb(RedbStateMachine, Arc<RaftStorage>),
    /// d-engine's `FileStateMachine` and `FileStorageEngine`, only for side-by-side
    /// benchmarks, when `DCOORD_BENCH_FILE_STATE_MACHINE=1` (nodes) or
    /// `bench_file_state_machine` (embedded). Neither is crash-safe (see the README).
    File(Arc<FileStateMachine>),
}

/// Environment variable that selects d-engine's `FileStateMachine` (benchmarks only).
pub(crate) const FILE_SM_SWITCH: &str = "DCOORD_BENCH_FILE_STATE_MACHINE";

impl Backend {
    pub(crate) async fn open(
        dir: &Path,
        cfg: &d_engine_core::RaftNodeConfig,
        file_sm: bool,
    ) -> Result<Self> {
        if file_sm {
            tracing::warn!(
                "{FILE_SM_SWITCH}=1: running d-engine's FileStateMachine and file raft log, which \
                 are not crash-safe (benchmarks only)"
            );
            let mut sm = FileStateMachine::new(dir.join("file_state_machine"))
                .await
                .map_err(|e| Error::Config(format!("cannot open state machine in {dir:?}: {e}")))?;
            sm.set_lease(Arc::new(DefaultLease::new(
                cfg.raft.state_machine.lease.clone(),
            )));
            return Ok(Self::File(Arc::new(sm)));
        }
        let log = open_raft_log(dir)?;
        let sm = open_state_machine(dir).await?;
        Ok(Self::Redb(sm, log))
    }

    /// Makes every applied entry durable (d-engine never calls `StateMachine::stop`). A failure
    /// is logged: the raft log still holds the entries.
    pub(crate) fn sync(&self) {
        if let Self::Redb(sm, _) = self {
            match sm.sync() {
                Ok(()) => tracing::info!("state machine synced at shutdown"),
                Err(e) => tracing::warn!(error = %e, "state machine sync at shutdown failed"),
            }
        }
    }

    /// Why the state machine stopped the node, once it has (never, for the file one).
    pub(crate) fn failure(&self) -> watch::Receiver<Option<String>> {
        match self {
            Self::Redb(sm, _) => sm.failure(),
            Self::File(_) => watch::channel(None).1,
        }
    }
}

/// Resolves with the reason once the state machine has stopped the node; never, if it cannot.
pub(crate) async fn failed(failure: &mut watch::Receiver<Option<String>>) -> String {
    let reason = failure
        .wait_for(Option::is_some)
        .await
        .map(|r| r.clone().unwrap_or_default());
    match reason {
        Ok(reason) => reason,
        Err(_) => std::future::pending().await,
    }
}
