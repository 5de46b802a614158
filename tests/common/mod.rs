//! Fixtures shared by the integration tests: one store per backend, a shared 3-node cluster,
//! sessions, `dcoord` child processes, and a poll.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dcoord::engine::{ClusterOptions, EmbeddedNode, LocalCluster};
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{Consistency, Event, Scan, Store, WatchStream, WatchTarget};
use dcoord::testing::MemStore;
use futures::StreamExt;

/// Which store a conformance test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Mem,
    Embedded,
    Cluster,
}

/// A store plus whatever keeps it alive, and a key namespace of its own.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub ns: String,
    pub mem: Option<MemStore>,
    pub node: Option<EmbeddedNode>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// A key in this test's namespace.
    pub fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.ns).into_bytes()
    }

    /// On the shared cluster, checks that every node holds the same state (by digest while
    /// other tests write); nothing to check on one node.
    #[allow(dead_code)]
    pub async fn check_replicas(&self) {
        if self.mem.is_none() && self.node.is_none() {
            shared_cluster()
                .check_replicas(Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("replicas differ: {e}"));
        }
    }
}

/// The dcoord binary cargo built for this test run.
pub fn binary() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_dcoord").into()
}

/// One 3-node cluster shared by every non-destructive cluster test of this test binary. Its
/// nodes exit when this process exits (they watch their stdin).
pub fn shared_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = shared_cluster_dir();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(LocalCluster::start(
                ClusterOptions::default()
                    .nodes(3)
                    .binary(binary())
                    .dir(&dir),
            ))
            .expect("start the shared 3-node cluster")
        })
        .join()
        .unwrap()
    })
}

/// The shared cluster's directory: `target/tmp/shared-cluster/<test binary>-<pid>`. A static
/// is never dropped, so the cluster cannot remove its own directory; instead each run removes
/// the directories of runs whose process is gone, and keeps the last one for a look after a
/// failure (its path is in the failing test's output: `LocalCluster::log_tails`).
fn shared_cluster_dir() -> std::path::PathBuf {
    let parent = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("shared-cluster");
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let pid = file.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    parent.join(format!("{name}-{}", std::process::id()))
}

/// A client of the [`shared_cluster`], and its endpoints as `--endpoints` takes them.
pub async fn shared_remote() -> (Arc<dyn Store>, String) {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(cluster.store().await.unwrap());
    (store, cluster.endpoints().join(","))
}

/// `dcoord ARGS --endpoints ENDPOINTS -- COMMAND`: a recipe's command line running `COMMAND`,
/// as a child of this test that is killed when its handle is dropped. Not spawned yet: set its
/// stdio, then `spawn`.
pub fn dcoord_child(args: &[&str], endpoints: &str, command: &[&str]) -> tokio::process::Command {
    let mut child = tokio::process::Command::new(binary());
    child
        .args(args)
        .args(["--endpoints", endpoints, "--"])
        .args(command)
        .kill_on_drop(true);
    child
}

/// A session with a 2 s lease, for tests that time the lease (a takeover, a redelivery).
pub async fn session(store: Arc<dyn Store>) -> Session {
    Session::start(
        store,
        SessionOptions::default().lease(Duration::from_secs(2)),
    )
    .await
    .unwrap()
}

/// A session with the default 10 s lease, for tests that time no lease. A 2 s lease is lost
/// when a renewal write stalls for about 1.5 s, which a loaded 2-core host with fsyncing
/// followers does now and then; the session then ends its locks and consumers with
/// `SessionLost`, as it should.
pub async fn long_session(store: Arc<dyn Store>) -> Session {
    Session::start(store, SessionOptions::default())
        .await
        .unwrap()
}

/// Polls `done` every 5 ms until it holds. Compose a deadline with `tokio::time::timeout`.
pub async fn until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serializes tests that start clusters of their own, so 2 busy cores are not asked to run
/// several elections at once.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn fixture(backend: Backend) -> Fixture {
    let ns = format!("/t/{}/", uuid::Uuid::new_v4().simple());
    match backend {
        Backend::Mem => {
            let mem = MemStore::new();
            Fixture {
                store: Arc::new(mem.clone()),
                ns,
                mem: Some(mem),
                node: None,
                _dir: None,
            }
        }
        Backend::Embedded => {
            let dir = tempfile::tempdir().unwrap();
            let node = EmbeddedNode::start(dir.path())
                .await
                .expect("embedded node");
            Fixture {
                store: node.dyn_store(),
                ns,
                mem: None,
                node: Some(node),
                _dir: Some(dir),
            }
        }
        Backend::Cluster => {
            let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
            let store = cluster
                .store()
                .await
                .expect("connect to the shared cluster");
            Fixture {
                store: Arc::new(store),
                ns,
                mem: None,
                node: None,
                _dir: None,
            }
        }
    }
}

/// The next item of a watch, which must be an event, within `secs` seconds.
pub async fn next_event(stream: &mut WatchStream, secs: u64) -> Event {
    match tokio::time::timeout(Duration::from_secs(secs), stream.next()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no event within {secs} s"),
    }
}

/// The next item of a watch, which must be an error, within `secs` seconds.
pub async fn next_error(stream: &mut WatchStream, secs: u64) -> dcoord::Error {
    loop {
        match tokio::time::timeout(Duration::from_secs(secs), stream.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return e,
            Ok(None) => panic!("watch ended without an error"),
            Err(_) => panic!("no error within {secs} s"),
        }
    }
}

/// A 3-node cluster of this test's own (for tests that kill nodes) and a client with a
/// generous deadline (an election on 2 busy cores can take a while). Hold `HEAVY` around it.
pub async fn own_cluster() -> (LocalCluster, dcoord::store::RemoteStore) {
    use dcoord::store::{RemoteOptions, RemoteStore};
    let cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let remote = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    (cluster, remote)
}

/// `nodes` nodes that snapshot every 50 entries, keeping 5 below the snapshot in the log.
pub fn snapshot_every_50(nodes: usize) -> ClusterOptions {
    ClusterOptions::default()
        .nodes(nodes)
        .binary(binary())
        .env(
            "RAFT__RAFT__SNAPSHOT__MAX_LOG_ENTRIES_BEFORE_SNAPSHOT",
            "50",
        )
        .env("RAFT__RAFT__SNAPSHOT__RETAINED_LOG_ENTRIES", "5")
}

/// A store that can be cut off from the others (a partition), wrapping a shared MemStore.
#[derive(Debug, Clone)]
pub struct Cuttable {
    inner: MemStore,
    cut: Arc<AtomicBool>,
}

impl Cuttable {
    /// `inner`, failing every operation while `cut` is set.
    pub fn new(inner: MemStore, cut: Arc<AtomicBool>) -> Self {
        Cuttable { inner, cut }
    }

    fn check(&self, op: &'static str) -> dcoord::Result<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(dcoord::Error::Unavailable {
                op,
                message: "partitioned by the test".into(),
                source: None,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for Cuttable {
    async fn get(&self, key: &[u8], c: Consistency) -> dcoord::Result<Option<Bytes>> {
        self.check("get")?;
        self.inner.get(key, c).await
    }
    async fn put(&self, key: &[u8], value: &[u8]) -> dcoord::Result<()> {
        self.check("put")?;
        self.inner.put(key, value).await
    }
    async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> dcoord::Result<()> {
        self.check("put_with_ttl")?;
        self.inner.put_with_ttl(key, value, ttl).await
    }
    async fn delete(&self, key: &[u8]) -> dcoord::Result<()> {
        self.check("delete")?;
        self.inner.delete(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> dcoord::Result<bool> {
        self.check("compare_and_swap")?;
        self.inner.compare_and_swap(key, expected, new).await
    }
    async fn transact(&self, ops: &[dcoord::store::TxnOp]) -> dcoord::Result<bool> {
        self.check("transact")?;
        self.inner.transact(ops).await
    }
    async fn transact_or(
        &self,
        ops: &[dcoord::store::TxnOp],
        otherwise: &[dcoord::store::TxnOp],
    ) -> dcoord::Result<bool> {
        self.check("transact")?;
        self.inner.transact_or(ops, otherwise).await
    }
    async fn scan_prefix(&self, prefix: &[u8]) -> dcoord::Result<Scan> {
        self.check("scan_prefix")?;
        self.inner.scan_prefix(prefix).await
    }
    async fn watch(&self, target: WatchTarget, prev: bool) -> dcoord::Result<WatchStream> {
        self.check("watch")?;
        self.inner.watch(target, prev).await
    }
}
