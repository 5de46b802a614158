//! One d-engine node inside this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use d_engine::storage::DefaultLease;
use d_engine::{EmbeddedEngine, FileStateMachine, FileStorageEngine};
use tokio::sync::watch;

use super::config::{self, NodeConfig};
use crate::error::{Error, Result};
use crate::store::{EmbeddedStore, Store};

/// Options of [`EmbeddedNode::start_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// The gRPC port (d-engine always serves gRPC, even embedded). `None`: a free port.
    pub port: Option<u16>,
    /// How long to wait for the node to become leader. Default 30 s.
    pub ready_timeout: Option<Duration>,
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
        let engine = start_engine(&dir, &path).await?;
        let ready = options.ready_timeout.unwrap_or(Duration::from_secs(30));
        if let Err(e) = engine.wait_ready(ready).await {
            let _ = engine.stop().await;
            return Err(Error::Config(format!(
                "embedded node in {dir:?} did not become ready within {ready:?}: {e}"
            )));
        }
        let (stopped, stopped_rx) = watch::channel(false);
        let store = Arc::new(EmbeddedStore::new(engine.client(), stopped_rx));
        Ok(Self {
            engine,
            store,
            stopped,
            listen,
            dir,
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
        self.engine.stop().await.map_err(|e| Error::Engine {
            op: "stop",
            message: e.to_string(),
            source: None,
        })
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        // d-engine's own Drop signals its shutdown; make sure our watches end too.
        self.stopped.send_replace(true);
    }
}

/// Builds d-engine's file backend with the lease attached and starts the engine.
async fn start_engine(dir: &Path, config_path: &Path) -> Result<EmbeddedEngine> {
    let cfg = config::load(config_path)?;
    let (storage, sm) = file_backend(dir, &cfg).await?;
    let path = config_path.to_str().expect("checked by config::load");
    EmbeddedEngine::start_custom(storage, sm, Some(path))
        .await
        .map_err(|e| Error::Config(format!("d-engine did not start in {dir:?}: {e}")))
}

/// d-engine's file storage engine and state machine, with the TTL lease attached (d-engine only
/// does this itself for RocksDB; without it a TTL write poisons the node).
pub(crate) async fn file_backend(
    dir: &Path,
    cfg: &d_engine_core::RaftNodeConfig,
) -> Result<(Arc<FileStorageEngine>, Arc<FileStateMachine>)> {
    let storage = FileStorageEngine::new(dir.join("storage"))
        .map_err(|e| Error::Config(format!("cannot open raft log in {dir:?}: {e}")))?;
    super::repair::repair_state_machine(&dir.join("state_machine"))?;
    let mut sm = FileStateMachine::new(dir.join("state_machine"))
        .await
        .map_err(|e| Error::Config(format!("cannot open state machine in {dir:?}: {e}")))?;
    sm.set_lease(Arc::new(DefaultLease::new(
        cfg.raft.state_machine.lease.clone(),
    )));
    Ok((Arc::new(storage), Arc::new(sm)))
}
