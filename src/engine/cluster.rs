//! A local N-node d-engine cluster: one child process of the `dcoord` binary per node.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::config::{self, NodeConfig, Timing};
use super::probe::{NodeState, probe_with};
use crate::error::{Error, Result};
use crate::store::{RemoteOptions, RemoteStore};
use crate::tls::{ClientTls, LocalPki};

/// Options of [`LocalCluster::start`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// Number of voters (1..=9). Default 3.
    pub(crate) nodes: usize,
    /// Where the nodes keep their data. `None`: a temporary directory removed on drop.
    pub(crate) dir: Option<PathBuf>,
    /// The `dcoord` binary to run nodes with. `None`: see [`dcoord_binary`].
    pub(crate) binary: Option<PathBuf>,
    /// Raft timing of every node.
    pub(crate) timing: Timing,
    /// How long to wait for a leader. Default 60 s.
    pub(crate) ready_timeout: Duration,
    /// Extra environment variables of every node process.
    pub(crate) env: Vec<(String, String)>,
    /// Serve TLS with a generated throwaway CA: `Some(true)` also requires client
    /// certificates (mTLS). Default `None`: plain text.
    pub(crate) tls: Option<bool>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            dir: None,
            binary: None,
            timing: Timing::cluster(),
            ready_timeout: Duration::from_secs(60),
            env: Vec::new(),
            tls: None,
        }
    }
}

impl ClusterOptions {
    /// Sets the number of nodes.
    #[must_use]
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Sets the data directory (kept after drop).
    #[must_use]
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Sets the `dcoord` binary.
    #[must_use]
    pub fn binary(mut self, bin: impl Into<PathBuf>) -> Self {
        self.binary = Some(bin.into());
        self
    }

    /// Sets the Raft timing of every node. Default [`Timing::cluster`].
    #[must_use]
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Sets how long [`LocalCluster::start`] waits for a leader. Default 60 s.
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Serves TLS, clients and peers alike, with a throwaway CA and certificates generated
    /// into the cluster's directory (`tls/`, see [`crate::tls::generate_local`]).
    /// [`LocalCluster::store`] and [`LocalCluster::remote_options`] trust that CA.
    #[must_use]
    pub fn tls(mut self) -> Self {
        self.tls = Some(self.tls.unwrap_or(false));
        self
    }

    /// As [`ClusterOptions::tls`], and every node requires a client certificate signed by the
    /// same CA (mTLS); [`LocalCluster::remote_options`] presents one.
    #[must_use]
    pub fn mutual_tls(mut self) -> Self {
        self.tls = Some(true);
        self
    }

    /// Adds an environment variable to every node process.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

struct ClusterNode {
    id: u32,
    addr: SocketAddr,
    /// The node's admin endpoint (its replica view, see [`super::replica`]).
    admin: SocketAddr,
    config_path: PathBuf,
    dir: PathBuf,
    process: Option<(Child, ChildStdin)>,
}

/// A local cluster of `dcoord node` child processes on 127.0.0.1 free ports.
///
/// Every node can be killed (SIGKILL), paused (SIGSTOP), resumed and restarted by id. Dropping
/// the cluster kills every node; a node also exits by itself when this process dies (it watches
/// its stdin, which this process holds), so no node outlives a crashed test.
pub struct LocalCluster {
    nodes: Vec<ClusterNode>,
    binary: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// The generated CA and certificates, when the cluster serves TLS.
    pki: Option<LocalPki>,
    /// How clients reach the nodes: `pki`'s CA and client certificate.
    client_tls: Option<ClientTls>,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("dir", &self.dir)
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

/// Finds the `dcoord` binary: `$DCOORD_BIN`, this executable if it is `dcoord`, or a `dcoord`
/// next to it or one level up (where cargo puts it for tests and examples).
pub fn dcoord_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("DCOORD_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot locate this executable: {e}")))?;
    if exe.file_stem().is_some_and(|s| s == "dcoord") {
        return Ok(exe);
    }
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("dcoord"))
        .collect::<Vec<_>>();
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Config(
            "cannot find the `dcoord` binary: run `cargo build --bin dcoord` or set DCOORD_BIN"
                .into(),
        )
    })
}

impl LocalCluster {
    /// Starts the nodes and waits until the cluster is ready ([`LocalCluster::wait_ready`]):
    /// every node serves and follows the same leader.
    ///
    /// # Errors
    /// [`Error::Config`] when the binary is missing; [`Error::Unavailable`] (naming each
    /// node's state and the tail of its log) when the cluster is not ready in time;
    /// [`Error::Io`] when the directory cannot be written.
    ///
    /// # Cancel safety
    /// Dropping the future kills the nodes started so far.
    pub async fn start(options: ClusterOptions) -> Result<Self> {
        if !(1..=9).contains(&options.nodes) {
            return Err(Error::InvalidArgument(format!(
                "a local cluster has 1..=9 nodes, not {}",
                options.nodes
            )));
        }
        let binary = match options.binary.clone() {
            Some(b) => b,
            None => dcoord_binary()?,
        };
        let (dir, temp) = match &options.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("dcoord-cluster-")
                    .tempdir()
                    .map_err(|e| Error::io("cannot create temp dir in", std::env::temp_dir(), e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let all = config::free_addrs(options.nodes * 2)?;
        let (addrs, admins) = all.split_at(options.nodes);
        let peers: Vec<(u32, SocketAddr)> = (1..).zip(addrs.iter().copied()).collect();
        let pki = match options.tls {
            Some(mutual) => Some(crate::tls::generate_local(
                &dir.join("tls"),
                options.nodes,
                &[],
                mutual,
            )?),
            None => None,
        };
        let client_tls = pki.as_ref().map(LocalPki::client_tls).transpose()?;
        let mut nodes = Vec::with_capacity(options.nodes);
        for (i, (&(id, addr), &admin)) in peers.iter().zip(admins).enumerate() {
            let cfg = NodeConfig {
                node_id: id,
                listen: addr,
                peers: peers.clone(),
                data_dir: dir.join(format!("n{id}")),
                timing: options.timing.clone(),
                tls: pki.as_ref().map(|p| p.nodes[i].clone()),
            };
            let config_path = cfg.write()?;
            nodes.push(ClusterNode {
                id,
                addr,
                admin,
                config_path,
                dir: cfg.data_dir,
                process: None,
            });
        }
        let mut cluster = Self {
            nodes,
            binary,
            env: options.env.clone(),
            dir,
            pki,
            client_tls,
            _temp: temp,
        };
        for id in 1..=options.nodes as u32 {
            cluster.spawn(id)?;
        }
        cluster.wait_ready(options.ready_timeout).await?;
        Ok(cluster)
    }

    fn node(&mut self, id: u32) -> Result<&mut ClusterNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| Error::InvalidArgument(format!("no node {id} in this cluster")))
    }

    fn spawn(&mut self, id: u32) -> Result<()> {
        let binary = self.binary.clone();
        let env = self.env.clone();
        let node = self.node(id)?;
        if node.process.is_some() {
            return Ok(());
        }
        let log_path = node.dir.join("node.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io("cannot open node log", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("cannot open node log", &log_path, e))?;
        let mut child = Command::new(&binary)
            .arg("node")
            .arg("--config")
            .arg(&node.config_path)
            .arg("--exit-with-stdin")
            .arg("--admin")
            .arg(node.admin.to_string())
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| Error::io("cannot run node binary", &binary, e))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        node.process = Some((child, stdin));
        Ok(())
    }

    /// The gRPC endpoints of all nodes (`http://127.0.0.1:port`, `https://` with TLS),
    /// running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| self.url(n.addr)).collect()
    }

    fn url(&self, addr: SocketAddr) -> String {
        match self.client_tls {
            Some(_) => format!("https://{addr}"),
            None => format!("http://{addr}"),
        }
    }

    /// The generated CA and certificates, when the cluster serves TLS
    /// ([`ClusterOptions::tls`]).
    pub fn pki(&self) -> Option<&LocalPki> {
        self.pki.as_ref()
    }

    /// [`RemoteOptions`] that reach this cluster: the defaults, with its CA and client
    /// certificate when it serves TLS.
    pub fn remote_options(&self) -> RemoteOptions {
        let options = RemoteOptions::default();
        match &self.client_tls {
            Some(tls) => options.tls(tls.clone()),
            None => options,
        }
    }

    /// The admin addresses (`127.0.0.1:port`, see [`super::replica`]) of all nodes, running
    /// or not.
    pub fn admins(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.admin.to_string()).collect()
    }

    /// Checks that every running node holds the same state and a raft log without holes
    /// ([`super::replica::check`]); call it after writes stop.
    ///
    /// # Errors
    /// [`Error::ReplicaMismatch`] naming the nodes, keys and index ranges that differ (the
    /// message also carries every node's log tail); [`Error::Unavailable`] when the running
    /// nodes did not stand at one applied index within `timeout`.
    ///
    /// # Cancel safety
    /// Dropping the future has no effect (it only reads).
    pub async fn check_replicas(&self, timeout: Duration) -> Result<super::replica::ReplicaReport> {
        let admins: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.admin.to_string())
            .collect();
        super::replica::check(&admins, timeout)
            .await
            .map_err(|e| match e {
                Error::ReplicaMismatch { report } => Error::ReplicaMismatch {
                    report: format!("{report}; data in {:?}\n{}", self.dir, self.log_tails(40)),
                },
                Error::Unavailable {
                    op,
                    message,
                    source,
                } => Error::Unavailable {
                    op,
                    message: format!("{message}; data in {:?}\n{}", self.dir, self.log_tails(40)),
                    source,
                },
                e => e,
            })
    }

    /// The endpoint of one node.
    pub fn endpoint(&self, id: u32) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| self.url(n.addr))
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The data directory of the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The OS process id of a running node.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.process.as_ref().map(|(c, _)| c.id()))
    }

    /// Connects a [`RemoteStore`] to all nodes.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when no leader answers in time.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the connection attempt.
    pub async fn store(&self) -> Result<RemoteStore> {
        RemoteStore::connect(&self.endpoints(), self.remote_options()).await
    }

    /// Kills a node with SIGKILL and reaps it. Killing a stopped node is a no-op.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id.
    pub fn kill(&mut self, id: u32) -> Result<()> {
        let node = self.node(id)?;
        if let Some((mut child, stdin)) = node.process.take() {
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
            drop(stdin);
        }
        Ok(())
    }

    /// Restarts a killed node on the same address and data.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id; [`Error::Io`] if it cannot be spawned.
    pub fn restart(&mut self, id: u32) -> Result<()> {
        self.spawn(id)
    }

    /// Pauses a node (SIGSTOP).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown or stopped node.
    pub fn pause(&mut self, id: u32) -> Result<()> {
        let pid = self
            .pid(id)
            .ok_or_else(|| Error::InvalidArgument(format!("node {id} is not running")))?;
        signal(pid, "STOP")
    }

    /// Resumes a paused node (SIGCONT).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown or stopped node.
    pub fn resume(&mut self, id: u32) -> Result<()> {
        let pid = self
            .pid(id)
            .ok_or_else(|| Error::InvalidArgument(format!("node {id} is not running")))?;
        signal(pid, "CONT")
    }

    /// Sends signal `sig` (`TERM`, `HUP`, `STOP`, ...; see `kill -l`) to a running node.
    /// `dcoord node` stops cleanly on `TERM` and restarts itself in place on `HUP`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown or stopped node, or a signal `kill` rejects;
    /// [`Error::Io`] if `kill` cannot run.
    pub fn signal(&self, id: u32, sig: &str) -> Result<()> {
        let pid = self
            .pid(id)
            .ok_or_else(|| Error::InvalidArgument(format!("node {id} is not running")))?;
        signal(pid, sig)
    }

    /// Asks the running nodes who leads, until one answers or `timeout` passes.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when no leader is known in time.
    ///
    /// # Cancel safety
    /// Dropping the future has no effect.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| self.url(n.addr))
            .collect();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let opts = self
                .remote_options()
                .op_deadline(remaining.min(Duration::from_secs(5)));
            if let Ok(store) = RemoteStore::connect(&live, opts).await
                && let Some(id) = store.leader_id().await
            {
                return Ok(id);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable {
                    op: "wait_for_leader",
                    message: format!(
                        "no leader among {} within {timeout:?}; node logs are in {:?}",
                        live.join(", "),
                        self.dir
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl LocalCluster {
    /// What every node says about itself right now, in id order (a node that is not running
    /// is [`NodeState::Down`]).
    ///
    /// # Cancel safety
    /// Dropping the future has no effect.
    pub async fn states(&self) -> Vec<(u32, NodeState)> {
        let probes = self.nodes.iter().map(|n| {
            let running = n.process.is_some();
            let (id, addr, tls) = (n.id, n.addr, self.client_tls.as_ref());
            async move {
                if running {
                    (id, probe_with(addr, tls, Duration::from_secs(2)).await)
                } else {
                    (id, NodeState::Down)
                }
            }
        });
        futures::future::join_all(probes).await
    }

    /// Waits until every running node serves and all of them follow the same leader; returns
    /// the leader's id. A node that answers "not ready" is not ready, even if the others
    /// already elected a leader: d-engine 0.2.4 cannot bring such a node into service once any
    /// peer dies, so a cluster with one is one fault away from an outage.
    ///
    /// # Errors
    /// [`Error::Unavailable`] after `timeout`, naming every node's state and the tail of its
    /// log.
    ///
    /// # Cancel safety
    /// Dropping the future has no effect.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.states().await;
            let running: Vec<&(u32, NodeState)> = states
                .iter()
                .filter(|(id, _)| self.pid(*id).is_some())
                .collect();
            let leaders: Vec<Option<u32>> = running.iter().map(|(_, s)| s.leader()).collect();
            if let Some(Some(leader)) = leaders.first()
                && leaders.iter().all(|l| *l == Some(*leader))
                && running.iter().any(|(id, _)| id == leader)
            {
                return Ok(*leader);
            }
            let exited: Vec<u32> = self
                .nodes
                .iter()
                .filter(|n| n.process.as_ref().is_some_and(|(c, _)| exited(c.id())))
                .map(|n| n.id)
                .collect();
            if !exited.is_empty() || Instant::now() >= deadline {
                let why = match exited.is_empty() {
                    true => format!("not every node serves one leader within {timeout:?}"),
                    false => format!("node(s) {exited:?} exited"),
                };
                let report: Vec<String> = states
                    .iter()
                    .map(|(id, s)| format!("node {id}: {s}"))
                    .collect();
                return Err(Error::Unavailable {
                    op: "cluster ready",
                    message: format!(
                        "{why} ({}); data in {:?}\n{}",
                        report.join("; "),
                        self.dir,
                        self.log_tails(40)
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of every node's `node.log`, headed by the node's id.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let path = n.dir.join("node.log");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!(
                "----- node {} ({}), last {} of {} lines of {:?}\n",
                n.id,
                n.addr,
                all.len() - from,
                all.len(),
                path
            ));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Sends signal `sig` (`STOP`, `CONT`, `KILL`, ...) to process `pid` with `kill(1)`.
///
/// # Errors
/// [`Error::Io`] if `kill` cannot run; [`Error::InvalidArgument`] if it fails.
/// Whether the child `pid` has exited (a zombie not yet reaped, or gone).
fn exited(pid: u32) -> bool {
    process_group(pid).is_none()
}

/// The process group of `pid` if it runs, from `/proc/PID/stat` ("pid (comm) state ppid pgrp
/// ..."; comm may hold spaces or ')'). A zombie is dead already (its parent has not reaped it
/// yet): `None`. For the `dcoord` binary's supervisor; not part of the library's API.
#[doc(hidden)]
pub fn process_group(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    (!matches!(state, "Z" | "X")).then_some(pgrp)
}

/// Sends signal `sig` (`STOP`, `CONT`, `TERM`, ...; see `kill -l`) to process `pid` with
/// `kill(1)`. For the `dcoord` binary; not part of the library's API.
#[doc(hidden)]
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| Error::io("cannot run", "kill", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "kill -{sig} {pid} failed: {status}"
        )))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: keep the data and say what the nodes did.
            if let Some(temp) = self._temp.take() {
                let _ = temp.keep();
            }
            eprintln!(
                "LocalCluster: kept {:?} for the failure\n{}",
                self.dir,
                self.log_tails(60)
            );
        }
        for node in &mut self.nodes {
            if let Some((mut child, stdin)) = node.process.take() {
                let _ = signal(child.id(), "CONT");
                let _ = child.kill();
                let _ = child.wait();
                drop(stdin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exited;

    #[test]
    fn an_exited_child_is_seen_before_it_is_reaped() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(!exited(running.id()));
        assert!(!exited(std::process::id()));
        let mut done = std::process::Command::new("true").spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exited(done.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "`true` still running after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done.wait().unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
    }
}
