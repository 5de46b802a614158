//! `node`, `cluster`, `check`: running nodes and checking their replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use dcoord::Error;
use dcoord::engine::{ClusterOptions, LocalCluster, NodeConfig, NodeExit, Timing};

use crate::output::Output;
use crate::{Conn, endpoints_file, read_endpoints_file};

#[derive(Args)]
pub struct NodeArgs {
    /// A d-engine TOML config (as written by `dcoord cluster`); overrides the flags below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long, default_value_t = 1)]
    id: u32,
    /// The gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:9081")]
    listen: SocketAddr,
    /// Every voter as ID=ADDR (repeat); defaults to this node alone.
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(u32, SocketAddr)>,
    /// Data directory.
    #[arg(long, default_value = "./dcoord-data")]
    dir: PathBuf,
    /// Serve this node's replica view (for `dcoord check`) on this address (plain HTTP).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Serve TLS (clients and peers) with this certificate (PEM); needs --tls-key, --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the peers' certificates; the node trusts no other.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM) from every client and peer (mTLS);
    /// the node presents --tls-cert to its peers, so this CA must have signed it too.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (plain HTTP): the node's own figures
    /// (`dcoord_node_*`: applied and last log index, term, leader, serving) and d-engine's.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Exit when stdin closes (used by `dcoord cluster` and tests so nodes never outlive them).
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
}

#[derive(Args)]
pub struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Data directory (default: a temporary one, removed on exit). Must not hold a cluster.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Serve TLS with a throwaway CA and certificates generated into the data dir (`tls/`);
    /// the endpoints file names the CA, so other commands on this host just work.
    #[arg(long)]
    tls: bool,
    /// As --tls, and every node requires a client certificate (one is generated, `tls/client.pem`).
    #[arg(long)]
    mtls: bool,
}

fn parse_peer(s: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=ADDR, got {s:?}"))?;
    Ok((
        id.parse().map_err(|e| format!("bad node id {id:?}: {e}"))?,
        addr.parse()
            .map_err(|e| format!("bad address {addr:?}: {e}"))?,
    ))
}

pub async fn check(admin: Vec<String>, timeout: Duration) -> dcoord::Result<ExitCode> {
    match dcoord::engine::replica::check(&admin, timeout).await {
        Ok(report) => {
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Err(Error::ReplicaMismatch { report }) => {
            println!("replicas differ: {report}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e),
    }
}

pub async fn run_node(args: NodeArgs) -> dcoord::Result<ExitCode> {
    let config_path = match args.config {
        Some(path) => path,
        None => {
            let peers = if args.peers.is_empty() {
                vec![(args.id, args.listen)]
            } else {
                args.peers
            };
            let timing = if peers.len() == 1 {
                Timing::single()
            } else {
                Timing::cluster()
            };
            let dir = std::path::absolute(&args.dir).map_err(|e| Error::Io {
                what: "bad data dir",
                path: args.dir.clone(),
                source: e,
            })?;
            let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => {
                    let tls = dcoord::tls::NodeTls::new(cert, key, ca)?;
                    Some(match &args.tls_client_ca {
                        Some(client_ca) => tls.require_client_certs(client_ca)?,
                        None => tls,
                    })
                }
                _ => None,
            };
            NodeConfig {
                node_id: args.id,
                listen: args.listen,
                peers,
                data_dir: dir,
                timing,
                tls,
            }
            .write()?
        }
    };
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(());
    let hangup = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if args.exit_with_stdin {
        // The parent holds our stdin; when it dies, the pipe closes and we go too.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let hung_up = hangup.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = hup.recv() => hung_up.store(true, std::sync::atomic::Ordering::SeqCst),
        }
        let _ = shutdown_tx.send(());
    });
    let restarts: u32 = std::env::var(RESTARTS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match restarts {
        0 => eprintln!("dcoord: node starting with {config_path:?}"),
        n => eprintln!("dcoord: node restarted in place (restart {n}) with {config_path:?}"),
    }
    let ready = tokio::spawn(say_when_serving(config_path.clone()));
    let exit = dcoord::engine::run_node(&config_path, shutdown_rx, args.admin).await;
    ready.abort();
    let reason = match exit? {
        NodeExit::Shutdown if !hangup.load(std::sync::atomic::Ordering::SeqCst) => {
            return Ok(ExitCode::SUCCESS);
        }
        NodeExit::Shutdown => "SIGHUP".to_string(),
        NodeExit::Restart { reason } => reason,
    };
    eprintln!("dcoord: node restarting in place: {reason}");
    Err(reexec(restarts + 1))
}

/// Installs the Prometheus recorder, serving `/metrics` on `addr` (on this runtime).
fn serve_metrics(addr: SocketAddr) -> dcoord::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| match e {
            metrics_exporter_prometheus::BuildError::FailedToCreateHTTPListener(why)
                if why.contains("in use") =>
            {
                Error::Config(format!("--metrics-addr {addr} is in use: {why}"))
            }
            e => Error::Config(format!("cannot serve metrics on {addr}: {e}")),
        })?;
    dcoord::metrics::describe();
    Ok(())
}

/// Says once, on stderr, when the node of `config` listens and serves (its leader known).
async fn say_when_serving(config: PathBuf) {
    let listen = std::fs::read_to_string(&config)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            let cluster = t.get("cluster")?;
            let id = cluster.get("node_id")?.as_integer()?;
            let addr = cluster.get("listen_address")?.as_str()?.parse().ok()?;
            Some((id, addr))
        });
    let Some((id, addr)) = listen else {
        return;
    };
    let Ok(tls) = dcoord::engine::node_client_tls(&config) else {
        return;
    };
    loop {
        if let Some(leader) = dcoord::engine::probe_with(addr, tls.as_ref(), Duration::from_secs(1))
            .await
            .leader()
        {
            eprintln!("dcoord: node {id} listening on {addr}, serving (leader: node {leader})");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many times `dcoord node` re-executed itself (for its log).
const RESTARTS_VAR: &str = "DCOORD_NODE_RESTARTS";

/// Replaces this process with a fresh run of the same binary and arguments (same pid, so a
/// supervisor's handle, the stdin pipe and the log redirection stay). Returns only on failure.
fn reexec(restarts: u32) -> Error {
    use std::os::unix::process::CommandExt;
    // /proc/self/exe still runs when the file was replaced (a rebuild), unlike current_exe().
    let exe = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => match std::env::current_exe() {
            Ok(p) => p,
            Err(source) => {
                return Error::Io {
                    what: "cannot find this binary to restart",
                    path: "/proc/self/exe".into(),
                    source,
                };
            }
        },
    };
    let e = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(RESTARTS_VAR, restarts.to_string())
        .exec();
    Error::Io {
        what: "cannot re-execute this binary to restart",
        path: exe,
        source: e,
    }
}

pub async fn run_cluster(args: ClusterArgs) -> dcoord::Result<ExitCode> {
    let mut options = ClusterOptions::default().nodes(args.nodes);
    if args.mtls {
        options = options.mutual_tls();
    } else if args.tls {
        options = options.tls();
    }
    if let Some(dir) = args.dir {
        if dir.join("n1").join("node.toml").exists() {
            return Err(Error::InvalidArgument(format!(
                "{dir:?} already holds a cluster; remove it or pick another --dir"
            )));
        }
        options = options.dir(std::path::absolute(&dir).map_err(|e| Error::Io {
            what: "bad data dir",
            path: dir.clone(),
            source: e,
        })?);
    }
    let file = endpoints_file();
    if let Some(pid) = read_endpoints_file().and_then(|f| f.owner)
        && pid != std::process::id()
        && crate::process::running(pid)
    {
        return Err(Error::InvalidArgument(format!(
            "another `dcoord cluster` (pid {pid}) is running and owns {file:?}; stop it first, \
             or run this one's clients with --endpoints"
        )));
    }
    let cluster = LocalCluster::start(options).await?;
    let endpoints = cluster.endpoints();
    let admins: String = cluster
        .admins()
        .iter()
        .map(|a| format!("admin {a}\n"))
        .collect();
    let tls_lines = match cluster.pki() {
        Some(pki) => {
            let mut lines = format!("cacert {}\n", pki.ca.display());
            if args.mtls {
                lines += &format!(
                    "cert {}\nkey {}\n",
                    pki.client.0.display(),
                    pki.client.1.display()
                );
            }
            lines
        }
        None => String::new(),
    };
    let contents = format!(
        "pid {}\n{}\n{admins}{tls_lines}",
        std::process::id(),
        endpoints.join("\n")
    );
    std::fs::write(&file, contents).map_err(|e| Error::Io {
        what: "cannot write endpoints file",
        path: file.clone(),
        source: e,
    })?;
    for (id, e) in cluster.ids().iter().zip(&endpoints) {
        println!("node {id}: {e} (pid {})", cluster.pid(*id).unwrap_or(0));
    }
    println!("DCOORD_ENDPOINTS={}", endpoints.join(","));
    if let Some(pki) = cluster.pki() {
        println!("DCOORD_CACERT={}", pki.ca.display());
        if args.mtls {
            println!("DCOORD_CERT={}", pki.client.0.display());
            println!("DCOORD_KEY={}", pki.client.1.display());
        }
    }
    println!(
        "check replicas: dcoord check --admin {}",
        cluster.admins().join(",")
    );
    eprintln!(
        "dcoord: cluster running, data in {:?}; Ctrl-C to stop",
        cluster.dir()
    );
    // Ctrl-C or SIGTERM: stop the nodes, remove the data dir and (if still ours) the file.
    crate::shutdown_signal().await;
    if read_endpoints_file().is_some_and(|f| f.owner == Some(std::process::id())) {
        let _ = std::fs::remove_file(&file);
    }
    drop(cluster);
    eprintln!("dcoord: cluster stopped");
    Ok(ExitCode::SUCCESS)
}

/// One endpoint's answer to `dcoord status`, as JSON.
async fn endpoint_status(
    endpoint: &str,
    tls: Option<&dcoord::tls::ClientTls>,
    timeout: Duration,
) -> serde_json::Value {
    use d_engine_proto::common::NodeRole;
    use d_engine_proto::server::cluster::MetadataRequest;
    use d_engine_proto::server::cluster::cluster_management_service_client::ClusterManagementServiceClient;
    use serde_json::json;

    let call = async {
        let channel = dcoord::tls::endpoint(endpoint, tls)
            .map_err(|e| format!("bad endpoint: {e}"))?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("down ({e})"))?;
        ClusterManagementServiceClient::new(channel)
            .get_cluster_metadata(MetadataRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|status| format!("not serving ({})", status.message()))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(meta)) => {
            let members: Vec<_> = meta
                .nodes
                .iter()
                .map(|n| {
                    let role = NodeRole::try_from(n.role)
                        .map(|r| r.as_str_name().to_ascii_lowercase())
                        .unwrap_or_else(|_| n.role.to_string());
                    json!({"id": n.id, "address": n.address, "role": role})
                })
                .collect();
            json!({
                "endpoint": endpoint,
                "health": "serving",
                "leader": meta.current_leader_id,
                "members": members,
            })
        }
        Ok(Err(why)) => json!({"endpoint": endpoint, "health": why}),
        Err(_) => json!({"endpoint": endpoint, "health": format!("no answer within {timeout:?}")}),
    }
}

/// `dcoord status`: every endpoint's health, leader and members; with admin addresses, every
/// node's applied index and term. Exit 0 when every endpoint serves and knows a leader.
pub async fn status(admin: Vec<String>, output: Output, conn: Conn) -> dcoord::Result<ExitCode> {
    use serde_json::json;
    let (endpoints, tls) = crate::endpoints(&conn)?;
    let timeout = conn
        .timeout
        .clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut rows = Vec::new();
    for e in &endpoints {
        rows.push(endpoint_status(e, tls.as_ref(), timeout).await);
    }
    let healthy = rows
        .iter()
        .all(|r| r["health"] == "serving" && r["leader"].is_u64());
    let admins = if admin.is_empty() {
        read_endpoints_file().map(|f| f.admins).unwrap_or_default()
    } else {
        admin
    };
    let mut nodes = Vec::new();
    for a in &admins {
        nodes.push(match dcoord::engine::replica::summary(a).await {
            Ok(s) => json!({
                "admin": a,
                "node": s.node,
                "applied_index": s.applied_index,
                "applied_term": s.applied_term,
                "keys": s.keys,
            }),
            Err(e) => json!({"admin": a, "error": e.to_string()}),
        });
    }
    match output {
        Output::Json => crate::output::json_line(&json!({"endpoints": rows, "nodes": nodes})),
        Output::Simple => print_status(&rows, &nodes),
    }
    Ok(ExitCode::from(if healthy { 0 } else { 1 }))
}

fn print_status(rows: &[serde_json::Value], nodes: &[serde_json::Value]) {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    for r in rows {
        let members: Vec<String> = r["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| format!("{}={}", n["id"], text(&n["address"])))
            .collect();
        let leader = r["leader"].as_u64().map_or("-".into(), |l| l.to_string());
        println!(
            "{}\t{}\tleader {leader}\tmembers {}",
            text(&r["endpoint"]),
            text(&r["health"]),
            members.join(",")
        );
    }
    for n in nodes {
        match n.get("error") {
            Some(e) => println!("admin {}\terror {}", text(&n["admin"]), text(e)),
            None => println!(
                "node {}\tapplied index {}\tterm {}\tkeys {}",
                n["node"], n["applied_index"], n["applied_term"], n["keys"]
            ),
        }
    }
}
