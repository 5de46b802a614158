//! The node configuration dcoord writes for d-engine.
//!
//! d-engine only takes its configuration from a TOML file plus `RAFT__*` environment variables
//! (which override the file). dcoord writes one `node.toml` per node into the node's data
//! directory, so every path (log, snapshots, state) stays inside it: d-engine's defaults
//! (`/tmp/db`, `/tmp/snapshots`, port 9081) would be shared by every node on the host.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::tls::NodeTls;

/// How many times a node retries its start-up health check of a peer (about 1 s apart after
/// the first few): about a day. d-engine's node gives up and exits after the last one.
const STARTUP_CHECK_RETRIES: u32 = 100_000;

/// Raft timing of a node. The defaults are sized for shared, busy machines: an election
/// timeout well above any scheduling hiccup, and an operation timeout far above d-engine's
/// 50 ms default (which fails writes under load while they still commit).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Timing {
    /// Election timeout range, randomised per election.
    pub election_timeout: (Duration, Duration),
    /// Leader heartbeat / AppendEntries interval. Followers learn commits this late.
    pub heartbeat: Duration,
    /// Server-side timeout of one client operation (d-engine's `general_raft_timeout`).
    pub op_timeout: Duration,
    /// How often the TTL sweeper runs (100 ms ..= 60 s).
    pub ttl_sweep_interval: Duration,
}

impl Timing {
    /// Timing for a multi-node cluster on a shared machine.
    pub fn cluster() -> Self {
        Self {
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
            heartbeat: Duration::from_millis(100),
            op_timeout: Duration::from_secs(5),
            ttl_sweep_interval: Duration::from_millis(1000),
        }
    }

    /// Timing for a single embedded node: a short election timeout, since there is nobody to
    /// disagree with, so the node is ready quickly.
    pub fn single() -> Self {
        Self {
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            ..Self::cluster()
        }
    }
}

/// Everything needed to write one node's `node.toml`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (≥ 1), unique in the cluster.
    pub node_id: u32,
    /// The gRPC address this node listens on.
    pub listen: SocketAddr,
    /// All voters of the cluster, this node included: `(id, address)`.
    pub peers: Vec<(u32, SocketAddr)>,
    /// The node's data directory; everything it writes stays inside.
    pub data_dir: PathBuf,
    /// Raft timing.
    pub timing: Timing,
    /// Serve TLS (clients and peers) with these files; `None`: plain text.
    pub tls: Option<NodeTls>,
}

impl NodeConfig {
    /// A single-node cluster in `data_dir`, listening on `listen`.
    pub fn single(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            node_id: 1,
            listen,
            peers: vec![(1, listen)],
            data_dir: data_dir.into(),
            timing: Timing::single(),
            tls: None,
        }
    }

    /// Checks the config for mistakes d-engine would not report clearly.
    pub fn validate(&self) -> Result<()> {
        if self.node_id == 0 {
            return Err(Error::Config("node ids start at 1".into()));
        }
        if !self.peers.iter().any(|(id, _)| *id == self.node_id) {
            return Err(Error::Config(format!(
                "node {} is not in its own peer list {:?}",
                self.node_id, self.peers
            )));
        }
        let mut ids: Vec<u32> = self.peers.iter().map(|p| p.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() {
            return Err(Error::Config(format!(
                "duplicate node id in peers {:?}",
                self.peers
            )));
        }
        let (lo, hi) = self.timing.election_timeout;
        if lo >= hi || self.timing.heartbeat >= lo {
            return Err(Error::Config(format!(
                "need heartbeat < election timeout min < max, got {:?} / {lo:?}..{hi:?}",
                self.timing.heartbeat
            )));
        }
        let sweep = self.timing.ttl_sweep_interval.as_millis();
        if !(100..=60_000).contains(&sweep) {
            return Err(Error::Config(format!(
                "ttl sweep interval must be 100 ms ..= 60 s, got {sweep} ms"
            )));
        }
        Ok(())
    }

    /// The path `node.toml` is written to.
    pub fn config_path(&self) -> PathBuf {
        self.data_dir.join("node.toml")
    }

    /// Renders the TOML d-engine reads. Voters are `role = 1, status = 3` (Follower, ACTIVE;
    /// d-engine's shipped example uses `status = 2`, which is READ_ONLY).
    pub fn to_toml(&self) -> String {
        let dir = self.data_dir.display().to_string();
        let t = &self.timing;
        let mut s = String::new();
        let _ = writeln!(s, "[cluster]");
        let _ = writeln!(s, "node_id = {}", self.node_id);
        let _ = writeln!(s, "listen_address = \"{}\"", self.listen);
        let _ = writeln!(s, "initial_cluster = [");
        for (id, addr) in &self.peers {
            let _ = writeln!(
                s,
                "  {{ id = {id}, address = \"{addr}\", role = 1, status = 3 }},"
            );
        }
        let _ = writeln!(s, "]");
        let _ = writeln!(s, "db_root_dir = {:?}", dir);
        let _ = writeln!(s, "log_dir = {:?}", format!("{dir}/logs"));
        let _ = writeln!(s, "\n[raft]");
        let _ = writeln!(
            s,
            "general_raft_timeout_duration_in_ms = {}",
            t.op_timeout.as_millis()
        );
        let _ = writeln!(s, "\n[raft.election]");
        let _ = writeln!(
            s,
            "election_timeout_min = {}",
            t.election_timeout.0.as_millis()
        );
        let _ = writeln!(
            s,
            "election_timeout_max = {}",
            t.election_timeout.1.as_millis()
        );
        let _ = writeln!(s, "\n[raft.replication]");
        let _ = writeln!(
            s,
            "rpc_append_entries_clock_in_ms = {}",
            t.heartbeat.as_millis()
        );
        let _ = writeln!(s, "\n[raft.read_consistency]");
        let _ = writeln!(
            s,
            "lease_duration_ms = {}",
            (t.election_timeout.0.as_millis() / 2).max(1)
        );
        let _ = writeln!(s, "\n[raft.snapshot]");
        let _ = writeln!(s, "snapshots_dir = {:?}", format!("{dir}/snapshots"));
        // d-engine 0.2.4 snapshots every 1000 entries; under heavy RPC load the snapshot and
        // log-purge events can block behind inbound RPCs on a bounded channel while the Raft
        // loop waits for them (d-engine #413, fixed after 0.2.4): the node stops for good.
        // Snapshot 100x less often.
        let _ = writeln!(s, "max_log_entries_before_snapshot = 100000");
        // A follower behind the purged log gets the snapshot pushed, and d-engine 0.2.4 sends
        // it no heartbeats meanwhile: a push longer than an election timeout (1 s) turns the
        // follower into a candidate that refuses the rest of the push. d-engine's defaults
        // (1 KiB chunks, 1 Mbit/s) take 80 s for 10 MB; 256 KiB chunks (well under gRPC's
        // 4 MiB message limit) without a rate limit take a fraction of a second. And keep
        // 10,000 entries below each snapshot, so a follower that was down for a short while
        // catches up from the log, with no push at all (the state machine skips what a
        // snapshot already holds, see `state_machine`).
        let _ = writeln!(s, "chunk_size = {}", 256 * 1024);
        let _ = writeln!(s, "max_bandwidth_mbps = 0");
        let _ = writeln!(s, "retained_log_entries = 10000");
        let _ = writeln!(s, "\n[raft.state_machine.lease]");
        let _ = writeln!(s, "enabled = true");
        let _ = writeln!(
            s,
            "cleanup_interval_ms = {}",
            t.ttl_sweep_interval.as_millis()
        );
        // d-engine 0.2.4 gives its gRPC server the control-plane request timeout, 100 ms, for
        // EVERY RPC, client writes included: a write that takes longer on a busy host is
        // cancelled ("Timeout expired") while it still commits, so the client sees an ambiguous
        // outcome. Longer than the Raft operation timeout (5 s), shorter than RemoteStore's 7 s.
        // Peer RPCs keep their own per-call timeouts ([retry.*]).
        let _ = writeln!(s, "\n[network.control]");
        let _ = writeln!(s, "request_timeout_in_ms = {SERVER_REQUEST_TIMEOUT_MS}");
        let _ = writeln!(s, "\n[raft.watch]");
        let _ = writeln!(s, "heartbeat_interval_ms = 1000");
        // d-engine 0.2.4: a voter serves nothing until EVERY peer in its config has answered its
        // start-up health check, retried with this policy. Its default (first retry after 3 s,
        // doubling to 60 s) turns "a peer came up 50 ms later" into seconds of a node that
        // answers "not ready", and, if any peer dies in that window, into an outage that lasts
        // until the peer returns. Peers started together come up within milliseconds of each
        // other: retry every 100 ms, capped at 1 s, for as long as the node runs (the node
        // reports itself loudly when it is still not serving; see `engine::run_node`).
        let _ = writeln!(s, "\n[retry.membership]");
        let _ = writeln!(s, "max_retries = {STARTUP_CHECK_RETRIES}");
        let _ = writeln!(s, "timeout_ms = 500");
        let _ = writeln!(s, "base_delay_ms = 100");
        let _ = writeln!(s, "max_delay_ms = 1000");
        if let Some(tls) = &self.tls {
            let _ = writeln!(s, "\n[tls]");
            let _ = writeln!(s, "enable_tls = true");
            let _ = writeln!(
                s,
                "server_certificate_path = {:?}",
                tls.cert.display().to_string()
            );
            let _ = writeln!(
                s,
                "server_private_key_path = {:?}",
                tls.key.display().to_string()
            );
            let _ = writeln!(
                s,
                "certificate_authority_root_path = {:?}",
                tls.ca.display().to_string()
            );
            if let Some(client_ca) = &tls.client_ca {
                let _ = writeln!(s, "enable_mtls = true");
                let _ = writeln!(
                    s,
                    "client_certificate_authority_root_path = {:?}",
                    client_ca.display().to_string()
                );
            }
        }
        s
    }

    /// Creates the data directory and writes `node.toml`; returns its path.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory when it cannot be created or written.
    pub fn write(&self) -> Result<PathBuf> {
        self.validate()?;
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| Error::io("cannot create data dir", &self.data_dir, e))?;
        let path = self.config_path();
        std::fs::write(&path, self.to_toml())
            .map_err(|e| Error::io("data dir is not writable: cannot write", &path, e))?;
        Ok(path)
    }
}

/// The gRPC server's timeout for any request (see the node config).
pub(crate) const SERVER_REQUEST_TIMEOUT_MS: u64 = 6000;

/// Loads a node's config the way d-engine will (defaults, then the file, then `RAFT__*`
/// environment variables), refusing what d-engine refuses.
pub(crate) fn load(path: &Path) -> Result<d_engine_core::RaftNodeConfig> {
    let path_str = path
        .to_str()
        .ok_or_else(|| Error::Config(format!("config path {path:?} is not UTF-8")))?;
    if !path.exists() {
        return Err(Error::Config(format!(
            "config file {path:?} does not exist"
        )));
    }
    let cfg = d_engine_core::RaftNodeConfig::default()
        .with_override_config(path_str)
        .and_then(|c| c.validate())
        .map_err(|e| Error::Config(format!("{path:?}: {e}")))?;
    Ok(cfg)
}

/// Fails with [`Error::PortInUse`] when `addr` cannot be bound right now. d-engine itself only
/// logs a bind failure and keeps running without its gRPC server.
pub(crate) fn check_bindable(addr: SocketAddr) -> Result<()> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::PortInUse { addr }),
        Err(e) => Err(Error::Config(format!("cannot listen on {addr}: {e}"))),
    }
}

/// `n` distinct free ports on 127.0.0.1, all held until the listeners are dropped.
pub(crate) fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Config(format!("cannot find a free port: {e}")))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map_err(|e| Error::Config(format!("cannot read a free port: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trips_through_d_engine_with_lease_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:19999".parse().unwrap();
        let mut cfg = NodeConfig::single(dir.path().join("n1"), addr);
        cfg.peers.push((2, "127.0.0.1:19998".parse().unwrap()));
        let path = cfg.write().unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.cluster.node_id, 1);
        assert_eq!(loaded.cluster.initial_cluster.len(), 2);
        assert_eq!(loaded.cluster.initial_cluster[0].status, 3);
        assert!(loaded.raft.state_machine.lease.enabled);
        assert_eq!(loaded.raft.general_raft_timeout_duration_in_ms, 5000);
        assert!(loaded.raft.snapshot.snapshots_dir.starts_with(dir.path()));
        assert_eq!(loaded.retry.membership.base_delay_ms, 100);
        assert_eq!(loaded.retry.membership.max_delay_ms, 1000);
        assert_eq!(
            loaded.network.control.request_timeout_in_ms,
            SERVER_REQUEST_TIMEOUT_MS
        );
        assert_eq!(
            loaded.network.control.connect_timeout_in_ms, 20,
            "defaults kept"
        );
    }

    #[test]
    fn tls_settings_reach_d_engine() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::tls::generate_local(&dir.path().join("tls"), 1, &["node1.example"], true)
            .unwrap();
        let addr: SocketAddr = "127.0.0.1:19997".parse().unwrap();
        let mut cfg = NodeConfig::single(dir.path().join("n1"), addr);
        cfg.tls = Some(pki.nodes[0].clone());
        let loaded = load(&cfg.write().unwrap()).unwrap();
        assert!(loaded.tls.enable_tls && loaded.tls.enable_mtls);
        assert_eq!(
            std::path::Path::new(&loaded.tls.certificate_authority_root_path),
            pki.ca
        );
        let back = crate::tls::NodeTls::from_engine(&loaded.tls).unwrap();
        assert!(
            back.client().unwrap().has_identity(),
            "mTLS: the node presents its certificate"
        );
    }

    #[test]
    fn node_missing_from_peers_is_rejected() {
        let mut cfg = NodeConfig::single("/tmp/x", "127.0.0.1:1".parse().unwrap());
        cfg.node_id = 2;
        assert!(matches!(cfg.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let cfg = NodeConfig::single("/proc/dcoord-cannot-write", "127.0.0.1:1".parse().unwrap());
        let err = cfg.write().unwrap_err();
        assert!(
            err.to_string().contains("/proc/dcoord-cannot-write"),
            "{err}"
        );
    }

    #[test]
    fn port_in_use_is_detected() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(matches!(check_bindable(addr), Err(Error::PortInUse { .. })));
    }
}
