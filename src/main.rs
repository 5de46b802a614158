//! `dcoord`: run d-engine nodes and a local cluster, and read / write / watch keys.
//!
//! Data goes to stdout, diagnostics to stderr. Exit codes: 0 success, 1 key not found (`get`),
//! 2 bad usage or input, 3 store unavailable or watch ended, 4 write outcome unknown, 5 other,
//! 6 lock lost (`lock`: the session's lease ran out while the command ran; it was killed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dcoord::Error;
use dcoord::engine::{ClusterOptions, LocalCluster, NodeConfig, NodeExit, Timing};
use dcoord::store::{Consistency, EventKind, RemoteOptions, RemoteStore, Store, WatchTarget};
use futures::StreamExt;

mod soak;

#[derive(Parser)]
#[command(name = "dcoord", version, about = "Coordination recipes on d-engine")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one standalone d-engine node (gRPC server) until Ctrl-C / SIGTERM. SIGHUP, or a
    /// stall its watchdog cannot wait out, restarts it in place (same pid and arguments).
    Node(NodeArgs),
    /// Fault soak: a 3-node cluster and client processes (lock, queue, config) under a nemesis
    /// that kills and pauses nodes and clients and writes bad input; checks the recipes'
    /// invariants from the recorded history. Exit 1 on any violation.
    Soak(soak::SoakArgs),
    /// One client process of `dcoord soak` (internal).
    #[command(hide = true)]
    SoakWorker(soak::WorkerArgs),
    /// Run a local N-node cluster on 127.0.0.1 in the foreground until Ctrl-C.
    Cluster(ClusterArgs),
    /// Check that every node holds the same state and a raft log without holes (after writes
    /// stop). Reads each node's admin endpoint (`dcoord node --admin`; `dcoord cluster` prints
    /// them). Exit 0 when they agree, 1 naming the nodes, keys and index ranges that differ.
    Check {
        /// Every node's admin address (host:port), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        admin: Vec<String>,
        /// Give up after this many seconds without a moment when all nodes stand at one index.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print a key's value.
    Get {
        /// The key.
        key: String,
        /// Read consistency.
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a key.
    Put {
        /// The key.
        key: String,
        /// The value (or use --file).
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Delete the key after this many seconds (garbage collection only: no watch event).
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a command while holding a lock (etcdctl lock parity). The command gets the fencing
    /// token in $DCOORD_FENCING_TOKEN; dcoord exits with its status, or 6 if the lock was lost
    /// (the command is then killed). Without a command: print the token and hold the lock
    /// until stdin closes or Ctrl-C.
    Lock {
        /// The lock name ([A-Za-z0-9._-]).
        name: String,
        /// Seconds without a heartbeat after which others may take the lock over.
        #[arg(long, default_value_t = 10)]
        lease: u64,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Read, write or follow a configuration value (JSON, or TOML for keys ending in .toml).
    Config {
        #[command(subcommand)]
        op: ConfigOp,
    },
    /// Work queue operations: enqueue, consume (run a command per message), stats, dead
    /// letters, redrive.
    Queue {
        #[command(subcommand)]
        op: QueueOp,
    },
    /// Print changes of a key (or, with --prefix, of every key under a '/'-bounded prefix).
    Watch {
        /// The key or prefix.
        key: String,
        /// Watch a prefix ("/app/" style) instead of one key.
        #[arg(long)]
        prefix: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum ConfigOp {
    /// Print the value (exit 1 if missing, 2 if it does not parse).
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a value after checking that it parses (nothing is written otherwise).
    Set {
        /// The key.
        key: String,
        /// The value (or use --file).
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print every value applied (and every value refused) until Ctrl-C.
    Watch {
        /// The key.
        key: String,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum QueueOp {
    /// Add a message; prints its id.
    #[command(visible_alias = "push")]
    Enqueue {
        /// The queue name.
        name: String,
        /// The payload (or use --file).
        #[arg(required_unless_present = "file")]
        payload: Option<String>,
        /// Read the payload from this file.
        #[arg(long, conflicts_with = "payload")]
        file: Option<PathBuf>,
        /// Message id (enqueue is idempotent by id).
        #[arg(long)]
        id: Option<String>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Not visible before this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Take messages: run the command for each (payload on stdin, $DCOORD_MESSAGE_ID and
    /// $DCOORD_ATTEMPT set; exit 0 acks, anything else retries), or print payloads and ack.
    #[command(visible_alias = "pop")]
    Consume {
        /// The queue name.
        name: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Seconds without a heartbeat after which this consumer's messages are redelivered.
        #[arg(long, default_value_t = 10)]
        lease: u64,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print message counts.
    Stats {
        /// The queue name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the dead letters (id, attempts, error).
    #[command(visible_alias = "dlq")]
    Dead {
        /// The queue name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a dead letter back into the queue.
    Redrive {
        /// The queue name.
        name: String,
        /// The message id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
struct NodeArgs {
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
    /// Serve this node's replica view (for `dcoord check`) on this address.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Exit when stdin closes (used by `dcoord cluster` and tests so nodes never outlive them).
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
}

#[derive(Args)]
struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Data directory (default: a temporary one, removed on exit). Must not hold a cluster.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct Conn {
    /// Cluster endpoints, comma-separated (default: $DCOORD_ENDPOINTS, else the ones the
    /// running `dcoord cluster` wrote to the endpoints file in the temp dir).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Give up after this many seconds of unavailability.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    Linearizable,
    Lease,
    Eventual,
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

/// A value given inline or (clap guarantees one of the two) in a file.
fn read_input(
    inline: Option<String>,
    file: Option<PathBuf>,
    what: &'static str,
) -> dcoord::Result<Vec<u8>> {
    match (inline, file) {
        (Some(v), _) => Ok(v.into_bytes()),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| Error::Io {
            what,
            path: f,
            source: e,
        }),
        (None, None) => Err(Error::InvalidArgument("give a value or --file".into())),
    }
}

/// Where `dcoord cluster` publishes its endpoints for the other commands.
fn endpoints_file() -> PathBuf {
    std::env::temp_dir().join("dcoord-cluster.endpoints")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The soak provokes failures on purpose: the client's own error lines are noise there.
    let default_filter = match cli.command {
        Cmd::Soak(_) | Cmd::SoakWorker(_) => "warn,d_engine_client=off",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DCOORD_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dcoord: cannot start the async runtime: {e}");
            return ExitCode::from(5);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dcoord: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::InvalidKey { .. }
        | Error::InvalidPrefix { .. }
        | Error::ValueTooLarge { .. }
        | Error::InvalidArgument(_)
        | Error::Config(_)
        | Error::PortInUse { .. } => 2,
        e if e.is_retryable() => 3,
        e if e.is_ambiguous() => 4,
        _ => 5,
    }
}

async fn connect(conn: &Conn) -> dcoord::Result<RemoteStore> {
    let mut endpoints = conn.endpoints.clone();
    if endpoints.is_empty()
        && let Ok(env) = std::env::var("DCOORD_ENDPOINTS")
    {
        endpoints = env.split(',').map(str::to_string).collect();
    }
    if endpoints.is_empty()
        && let Ok(text) = std::fs::read_to_string(endpoints_file())
    {
        endpoints = text.split_whitespace().map(str::to_string).collect();
    }
    if endpoints.is_empty() {
        return Err(Error::InvalidArgument(
            "no endpoints: pass --endpoints, set DCOORD_ENDPOINTS, or start `dcoord cluster`"
                .into(),
        ));
    }
    let options = RemoteOptions::default().op_deadline(Duration::from_secs(conn.timeout));
    RemoteStore::connect(&endpoints, options).await
}

async fn run(cmd: Cmd) -> dcoord::Result<ExitCode> {
    match cmd {
        Cmd::Node(args) => run_node(args).await,
        Cmd::Soak(args) => soak::run(args).await,
        Cmd::SoakWorker(args) => soak::run_worker(args).await,
        Cmd::Cluster(args) => run_cluster(args).await,
        Cmd::Check { admin, timeout } => {
            match dcoord::engine::replica::check(&admin, Duration::from_secs(timeout)).await {
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
        Cmd::Get {
            key,
            consistency,
            conn,
        } => {
            dcoord::keys::validate_key(key.as_bytes())?;
            let store = connect(&conn).await?;
            let c = match consistency {
                ConsistencyArg::Linearizable => Consistency::Linearizable,
                ConsistencyArg::Lease => Consistency::Lease,
                ConsistencyArg::Eventual => Consistency::Eventual,
            };
            match store.get(key.as_bytes(), c).await? {
                Some(v) => {
                    println!("{}", String::from_utf8_lossy(&v));
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("dcoord: key {key:?} not found");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Put {
            key,
            value,
            file,
            ttl,
            conn,
        } => {
            let value = read_input(value, file, "cannot read value file")?;
            dcoord::keys::validate_key(key.as_bytes())?;
            dcoord::keys::validate_value(key.as_bytes(), &value)?;
            let store = connect(&conn).await?;
            match ttl {
                Some(secs) => {
                    store
                        .put_with_ttl(key.as_bytes(), &value, Duration::from_secs(secs))
                        .await?
                }
                None => store.put(key.as_bytes(), &value).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config { op } => run_config(op).await,
        Cmd::Queue { op } => run_queue(op).await,
        Cmd::Lock {
            name,
            lease,
            command,
            conn,
        } => run_lock(name, lease, command, conn).await,
        Cmd::Del { key, conn } => {
            dcoord::keys::validate_key(key.as_bytes())?;
            let store = connect(&conn).await?;
            store.delete(key.as_bytes()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch {
            key,
            prefix,
            count,
            conn,
        } => {
            let target = if prefix {
                WatchTarget::prefix(key.into_bytes())
            } else {
                WatchTarget::key(key.into_bytes())
            };
            target.validate()?;
            let store = connect(&conn).await?;
            let mut stream = store.watch(target, false).await?;
            eprintln!("dcoord: watching (Ctrl-C to stop)");
            let mut seen = 0;
            while let Some(item) = stream.next().await {
                let ev = item?;
                let kind = match ev.kind {
                    EventKind::Put => "PUT",
                    EventKind::Delete => "DELETE",
                };
                println!(
                    "{}\t{kind}\t{}\t{}",
                    ev.revision,
                    String::from_utf8_lossy(&ev.key),
                    String::from_utf8_lossy(&ev.value)
                );
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_node(args: NodeArgs) -> dcoord::Result<ExitCode> {
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
            NodeConfig {
                node_id: args.id,
                listen: args.listen,
                peers,
                data_dir: dir,
                timing,
            }
            .write()?
        }
    };
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
    let reason = match dcoord::engine::run_node(&config_path, shutdown_rx, args.admin).await? {
        NodeExit::Shutdown if !hangup.load(std::sync::atomic::Ordering::SeqCst) => {
            return Ok(ExitCode::SUCCESS);
        }
        NodeExit::Shutdown => "SIGHUP".to_string(),
        NodeExit::Restart { reason } => reason,
    };
    eprintln!("dcoord: node restarting in place: {reason}");
    Err(reexec(restarts + 1))
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

async fn run_cluster(args: ClusterArgs) -> dcoord::Result<ExitCode> {
    let mut options = ClusterOptions::default().nodes(args.nodes);
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
    let cluster = LocalCluster::start(options).await?;
    let endpoints = cluster.endpoints();
    let file = endpoints_file();
    std::fs::write(&file, endpoints.join("\n")).map_err(|e| Error::Io {
        what: "cannot write endpoints file",
        path: file.clone(),
        source: e,
    })?;
    for (id, e) in cluster.ids().iter().zip(&endpoints) {
        println!("node {id}: {e} (pid {})", cluster.pid(*id).unwrap_or(0));
    }
    println!("DCOORD_ENDPOINTS={}", endpoints.join(","));
    println!(
        "check replicas: dcoord check --admin {}",
        cluster.admins().join(",")
    );
    eprintln!(
        "dcoord: cluster running, data in {:?}; Ctrl-C to stop",
        cluster.dir()
    );
    let _ = tokio::signal::ctrl_c().await;
    let _ = std::fs::remove_file(&file);
    drop(cluster);
    eprintln!("dcoord: cluster stopped");
    Ok(ExitCode::SUCCESS)
}

async fn run_lock(
    name: String,
    lease: u64,
    command: Vec<String>,
    conn: Conn,
) -> dcoord::Result<ExitCode> {
    use dcoord::lock::Mutex;
    use dcoord::session::{Session, SessionOptions};
    use std::sync::Arc;

    dcoord::keys::validate_name("lock", &name)?;
    if lease == 0 {
        return Err(Error::InvalidArgument(
            "--lease must be at least 1 second".into(),
        ));
    }
    let store: Arc<dyn Store> = Arc::new(connect(&conn).await?);
    let session = Session::start(
        store,
        SessionOptions::default().lease(Duration::from_secs(lease)),
    )
    .await?;
    let lock = Mutex::new(&session, &name)?;
    let guard = tokio::select! {
        g = lock.acquire() => g?,
        _ = shutdown_signal() => return Ok(ExitCode::from(130)),
    };
    let token = guard.fencing_token();
    println!("{token}");
    eprintln!("dcoord: holding lock {name:?} with fencing token {token}");
    let code = if command.is_empty() {
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        });
        tokio::select! {
            _ = stdin_closed => ExitCode::SUCCESS,
            _ = shutdown_signal() => ExitCode::from(130),
            _ = guard.lost() => {
                eprintln!("dcoord: lock {name:?} lost (lease ran out or taken over)");
                return Ok(ExitCode::from(6));
            }
        }
    } else {
        let mut child = tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .env("DCOORD_FENCING_TOKEN", token.to_string())
            .env("DCOORD_LOCK", &name)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Io {
                what: "cannot run the command",
                path: command[0].clone().into(),
                source: e,
            })?;
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Error::Io {
                    what: "cannot wait for the command",
                    path: command[0].clone().into(),
                    source: e,
                })?;
                ExitCode::from(status.code().map_or(5, |c| c as u8))
            }
            _ = shutdown_signal() => {
                let _ = child.kill().await;
                ExitCode::from(130)
            }
            _ = guard.lost() => {
                let _ = child.kill().await;
                eprintln!("dcoord: lock {name:?} lost (lease ran out or taken over); command killed");
                return Ok(ExitCode::from(6));
            }
        }
    };
    guard.release().await?;
    let _ = session.close().await;
    Ok(code)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_config(op: ConfigOp) -> dcoord::Result<ExitCode> {
    use dcoord::config::{ConfigEvent, ConfigOptions, ConfigWatch, Format, Source};
    use std::sync::Arc;

    let parse = |key: &str, bytes: &[u8]| -> dcoord::Result<serde_json::Value> {
        let format = Format::for_key(key);
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Decode {
            key: key.to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        match format {
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
            Format::Toml => toml::from_str(text).map_err(|e| e.to_string()),
        }
        .map_err(|reason| Error::Decode {
            key: key.to_string(),
            reason: format!("not valid {format:?}: {reason}"),
        })
    };
    match op {
        ConfigOp::Get { key, conn } => {
            dcoord::keys::validate_key(key.as_bytes())?;
            let store = connect(&conn).await?;
            let Some(bytes) = store.get(key.as_bytes(), Consistency::Linearizable).await? else {
                eprintln!("dcoord: config {key:?} is not set");
                return Ok(ExitCode::from(1));
            };
            if let Err(e) = parse(&key, &bytes) {
                eprintln!("dcoord: {e}");
                return Ok(ExitCode::from(2));
            }
            println!("{}", String::from_utf8_lossy(&bytes).trim_end());
            Ok(ExitCode::SUCCESS)
        }
        ConfigOp::Set {
            key,
            value,
            file,
            conn,
        } => {
            let bytes = read_input(value, file, "cannot read value file")?;
            dcoord::keys::validate_key(key.as_bytes())?;
            dcoord::keys::validate_value(key.as_bytes(), &bytes)?;
            parse(&key, &bytes)
                .map_err(|e| Error::InvalidArgument(format!("{e}; nothing written")))?;
            let store = connect(&conn).await?;
            store.put(key.as_bytes(), &bytes).await?;
            Ok(ExitCode::SUCCESS)
        }
        ConfigOp::Watch { key, count, conn } => {
            let store: Arc<dyn Store> = Arc::new(connect(&conn).await?);
            let cw = ConfigWatch::<serde_json::Value>::open(
                store,
                Source::key(key.clone()),
                ConfigOptions::default(),
            )
            .await?;
            let mut events = Box::pin(cw.events());
            let mut seen = 0;
            if let Some(v) = cw.current() {
                println!("{}", serde_json::to_string(&*v).unwrap_or_default());
                seen += 1;
            } else {
                eprintln!("dcoord: config {key:?} is not set yet; waiting");
            }
            while count.is_none_or(|c| seen < c) {
                let Some(ev) = events.next().await else { break };
                match ev? {
                    ConfigEvent::Applied { new, .. } => {
                        println!("{}", serde_json::to_string(&*new).unwrap_or_default());
                        seen += 1;
                    }
                    ConfigEvent::Rejected {
                        key,
                        error,
                        revision,
                    } => {
                        eprintln!("dcoord: refused revision {revision} of {key}: {error}");
                    }
                    ConfigEvent::Missing { .. } => eprintln!("dcoord: config {key:?} deleted"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_queue(op: QueueOp) -> dcoord::Result<ExitCode> {
    use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
    use dcoord::session::{Session, SessionOptions};
    use std::sync::Arc;

    let open = |name: String, conn: Conn, lease: u64| async move {
        dcoord::keys::validate_name("queue", &name)?;
        if lease == 0 {
            return Err(Error::InvalidArgument(
                "--lease must be at least 1 second".into(),
            ));
        }
        let store: Arc<dyn Store> = Arc::new(connect(&conn).await?);
        let session = Session::start(
            store,
            SessionOptions::default().lease(Duration::from_secs(lease)),
        )
        .await?;
        let q = WorkQueue::open(&session, &name, QueueOptions::default()).await?;
        Ok::<_, Error>((session, q))
    };
    match op {
        QueueOp::Enqueue {
            name,
            payload,
            file,
            id,
            priority,
            delay_ms,
            conn,
        } => {
            let payload = read_input(payload, file, "cannot read payload file")?;
            if let Some(id) = &id {
                dcoord::keys::validate_name("message id", id)?;
            }
            let (session, q) = open(name, conn, 10).await?;
            let mut options = EnqueueOptions::default()
                .priority(priority)
                .delay(Duration::from_millis(delay_ms));
            if let Some(id) = id {
                options = options.id(id);
            }
            println!("{}", q.enqueue(&payload, options).await?);
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Consume {
            name,
            count,
            lease,
            command,
            conn,
        } => {
            let (session, q) = open(name, conn, lease).await?;
            let mut done = 0usize;
            while count.is_none_or(|c| done < c) {
                let d = tokio::select! {
                    d = q.next() => d?,
                    _ = shutdown_signal() => break,
                };
                if command.is_empty() {
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(d.payload());
                    let _ = out.write_all(b"\n");
                    d.ack().await?;
                } else {
                    let mut child = tokio::process::Command::new(&command[0])
                        .args(&command[1..])
                        .env("DCOORD_MESSAGE_ID", d.id())
                        .env("DCOORD_ATTEMPT", d.attempt().to_string())
                        .stdin(std::process::Stdio::piped())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| Error::Io {
                            what: "cannot run the command",
                            path: command[0].clone().into(),
                            source: e,
                        })?;
                    if let Some(mut stdin) = child.stdin.take() {
                        use tokio::io::AsyncWriteExt;
                        let _ = stdin.write_all(d.payload()).await;
                    }
                    let status = child.wait().await.map_err(|e| Error::Io {
                        what: "cannot wait for the command",
                        path: command[0].clone().into(),
                        source: e,
                    })?;
                    if status.success() {
                        d.ack().await?;
                    } else {
                        d.nack(&format!("command exited with {status}")).await?;
                    }
                }
                done += 1;
            }
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Stats { name, conn } => {
            let (session, q) = open(name, conn, 10).await?;
            let s = q.stats();
            println!(
                "ready {} delayed {} in_flight {} dead {} done {} undecodable {}",
                s.ready, s.delayed, s.in_flight, s.dead, s.done, s.undecodable
            );
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Dead { name, conn } => {
            let (session, q) = open(name, conn, 10).await?;
            for d in q.dead_letters() {
                println!("{}\t{}\t{}", d.id, d.attempts, d.error);
            }
            let _ = session.close().await;
            Ok(ExitCode::SUCCESS)
        }
        QueueOp::Redrive { name, id, conn } => {
            let (session, q) = open(name, conn, 10).await?;
            let moved = q.redrive(&id).await?;
            let _ = session.close().await;
            if moved {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("dcoord: {id:?} is not a dead letter");
                Ok(ExitCode::from(1))
            }
        }
    }
}
