//! `dcoord`: run d-engine nodes and a local cluster, and read / write / watch keys.
//!
//! Data goes to stdout, diagnostics to stderr. Exit codes: 0 success, 1 key not found (`get`),
//! 2 bad usage or input, 3 store unavailable or watch ended, 4 write outcome unknown, 5 other.
//! `lock -- CMD` passes the command's own code through instead (see `dcoord lock --help`):
//! 124 lock lost, 125 dcoord failed, 126 / 127 the command cannot be run / is not found,
//! 128 + n a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dcoord::Error;
use dcoord::store::{RemoteOptions, RemoteStore};
use dcoord::tls::ClientTls;

mod config;
mod elect;
mod group;
mod hold;
mod kv;
mod lock;
mod node;
mod output;
mod process;
mod queue;
mod semaphore;
mod soak;

use output::Output;
pub use process::{shutdown_signal, signal};

#[derive(Parser)]
#[command(
    name = "dcoord",
    version,
    about = "Coordination recipes on d-engine",
    after_help = "Examples:
  dcoord cluster                                  # a local 3-node cluster (Ctrl-C stops it)
  dcoord cluster --mtls                           # the same over TLS with client certificates
  dcoord status
  dcoord put /app/flags.json '{\"dark\": true}'
  dcoord get --prefix /app/ -o json
  dcoord lock --wait 30s deploy -- ./deploy.sh    # token in $DCOORD_FENCING_TOKEN
  dcoord queue push jobs 'payload'
  dcoord queue pop jobs -- ./handle.sh            # payload on stdin; exit 0 acks

Exit codes: 0 ok; 1 key not found (get), cluster not healthy (status), replicas differ (check);
2 bad usage or input; 3 store unavailable or watch ended; 4 write outcome unknown; 5 other.
With -- CMD (lock, queue consume): the command's own code, 128+n for signal n; 124 lock lost;
125 dcoord failed or --wait ran out; 126 cannot run; 127 not found; 130/143 Ctrl-C/SIGTERM.

Endpoints: --endpoints, else $DCOORD_ENDPOINTS, else the running `dcoord cluster`'s.
TLS: --cacert (and --cert/--key for mTLS), or $DCOORD_CACERT/$DCOORD_CERT/$DCOORD_KEY;
`dcoord cluster --tls` or `--mtls` makes its own CA and tells the other commands."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one standalone d-engine node (gRPC server) until Ctrl-C / SIGTERM. SIGHUP, or a
    /// stall its watchdog cannot wait out, restarts it in place (same pid and arguments).
    Node(node::NodeArgs),
    /// Fault soak: a 3-node cluster and client processes (lock, queue, config) under a nemesis
    /// that kills and pauses nodes and clients and writes bad input; checks the recipes'
    /// invariants from the recorded history. Exit 1 on any violation.
    Soak(soak::SoakArgs),
    /// Runs a command in this process's group and stops the group with it (internal: the
    /// supervisor of `lock -- CMD` and `queue consume -- CMD`).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        kill_after_ms: u64,
        /// dcoord's pid: the group is stopped when it dies.
        #[arg(long)]
        parent: u32,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// One client process of `dcoord soak` (internal).
    #[command(hide = true)]
    SoakWorker(soak::WorkerArgs),
    /// Run a local N-node cluster on 127.0.0.1 in the foreground until Ctrl-C.
    Cluster(node::ClusterArgs),
    /// Check that every node holds the same state and a raft log without holes (after writes
    /// stop). Reads each node's admin endpoint (`dcoord node --admin`; `dcoord cluster` prints
    /// them). Exit 0 when they agree, 1 naming the nodes, keys and index ranges that differ.
    Check {
        /// Every node's admin address (host:port), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        admin: Vec<String>,
        /// Give up after this long without a moment when all nodes stand at one index
        /// (e.g. 30s; a bare number is seconds).
        #[arg(long, default_value = "30s", value_parser = duration)]
        timeout: Duration,
    },
    /// Per endpoint: health, the leader it knows, the members; with the nodes' admin
    /// addresses (`dcoord cluster` records them), also each node's applied index and term.
    /// Exit 0 when every endpoint serves and knows a leader, 1 otherwise.
    Status {
        /// The nodes' admin addresses (host:port), comma-separated. Default: those the running
        /// `dcoord cluster` recorded.
        #[arg(long, value_delimiter = ',')]
        admin: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a key's value: its bytes exactly (`dcoord get k > file` copies it). With
    /// --prefix, every key under a '/'-bounded prefix, as `key` and `value` lines.
    #[command(
        after_help = "Examples:\n  dcoord get /app/flags.json\n  dcoord get --prefix /app/ -o json"
    )]
    Get {
        /// The key (or, with --prefix, the prefix).
        key: String,
        /// List every key under the prefix.
        #[arg(long)]
        prefix: bool,
        /// Read consistency (a single key).
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: kv::ConsistencyArg,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
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
    /// token in $DCOORD_FENCING_TOKEN and runs in a process group of its own: when the lock is
    /// lost, on SIGTERM / Ctrl-C, or when dcoord dies, the whole group gets SIGTERM, then
    /// SIGKILL after --kill-after, before anyone else can take the lock. Without a command:
    /// hold the lock until stdin closes or Ctrl-C.
    ///
    /// Exit codes with a command: the command's own code (128+n if signal n ended it);
    /// 124 the lock was lost and the command stopped; 125 dcoord failed or --wait ran out
    /// (nothing was run); 126 the command cannot be run; 127 not found; 130 / 143 dcoord got
    /// Ctrl-C / SIGTERM.
    ///
    /// `dcoord lock info NAME` shows the holder, the waiters and the latest token (so a lock
    /// cannot be named `info`).
    #[command(
        after_help = "Examples:\n  dcoord lock backup -- ./backup.sh\n  dcoord lock --wait 30s --lease 30 --kill-after 5s nightly -- sh -c 'make all'\n  dcoord lock info backup -o json",
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Lock {
        #[command(subcommand)]
        op: Option<lock::LockOp>,
        #[command(flatten)]
        args: lock::LockArgs,
    },
    /// Campaign to lead an election and hold leadership until interrupted (etcdctl elect
    /// parity). Once elected it prints `NAME TOKEN VALUE` on stdout (nothing before); with a
    /// command, it runs the command while leading, supervised as `dcoord lock` runs its
    /// command (the term's token in $DCOORD_FENCING_TOKEN). `--listen` observes without
    /// campaigning and prints every change; a leader that stopped heartbeating is reported
    /// gone (`NAME -`) one lease after its last heartbeat.
    ///
    /// Exit codes as `dcoord lock`'s: 124 leadership lost, 125 dcoord failed or --wait ran
    /// out, 130 / 143 Ctrl-C / SIGTERM.
    #[command(
        after_help = "Examples:\n  dcoord elect scheduler \"$(hostname):8080\" -- ./scheduler\n  dcoord elect --listen scheduler -o json"
    )]
    Elect {
        #[command(flatten)]
        args: elect::ElectArgs,
    },
    /// Run a command while holding permits of a counting semaphore: at most N permits are
    /// held at once across every process, granted in arrival order, taken back from crashed
    /// holders after their lease. Supervision, environment and exit codes as `dcoord lock`'s
    /// ($DCOORD_SEMAPHORE, $DCOORD_FENCING_TOKEN).
    ///
    /// `dcoord semaphore info NAME --permits N` shows holders, waiters and free permits (so a
    /// semaphore cannot be named `info`).
    #[command(
        after_help = "Examples:\n  dcoord semaphore db-pool --permits 4 -- ./migrate.sh\n  dcoord semaphore gpu --permits 8 --take 2 --wait 5m -- ./train\n  dcoord semaphore info db-pool --permits 4 -o json",
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Semaphore {
        #[command(subcommand)]
        op: Option<semaphore::SemaphoreOp>,
        #[command(flatten)]
        args: semaphore::SemaphoreArgs,
    },
    /// List the members of a group (service registry / presence), follow it with --watch,
    /// or join it with --join VALUE and stay a member until stdin closes or Ctrl-C.
    #[command(
        after_help = "Examples:\n  dcoord members api\n  dcoord members api --watch -o json\n  dcoord members api --join \"$(hostname):8080\" --watch"
    )]
    Members {
        #[command(flatten)]
        args: group::MembersArgs,
    },
    /// Read a shared counter, or add to it (exactly once, even across a leader change):
    /// prints the value after.
    #[command(
        after_help = "Examples:\n  dcoord counter builds\n  dcoord counter builds add 1\n  dcoord counter slots add -2"
    )]
    Counter {
        #[command(flatten)]
        args: group::CounterArgs,
    },
    /// Read, write or follow a configuration value (JSON, or TOML for keys ending in .toml).
    Config {
        #[command(subcommand)]
        op: config::ConfigOp,
    },
    /// Work queue operations: enqueue, consume (run a command per message), stats, dead
    /// letters, redrive.
    Queue {
        #[command(subcommand)]
        op: queue::QueueOp,
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
        /// Output format: `simple` is `revision<TAB>PUT|DELETE<TAB>key<TAB>value` per line.
        #[arg(short, long, value_enum, default_value = "simple")]
        output: Output,
        #[command(flatten)]
        conn: Conn,
    },
}

/// How a client command reaches the cluster.
#[derive(Args)]
pub struct Conn {
    /// Cluster endpoints (host:port, http://host:port, or https://host:port with --cacert),
    /// comma-separated. Default: the ones the running `dcoord cluster` wrote to the endpoints
    /// file in the temp dir (with its CA and client certificate, if it serves TLS).
    #[arg(long, value_delimiter = ',', env = "DCOORD_ENDPOINTS")]
    endpoints: Vec<String>,
    /// Talk TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, env = "DCOORD_CACERT")]
    cacert: Option<PathBuf>,
    /// Present this client certificate (PEM) to nodes that require one; needs --key.
    #[arg(long = "cert", env = "DCOORD_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long = "key", env = "DCOORD_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Give up after this long without an available cluster (e.g. 10s, 500ms; a bare number
    /// is seconds).
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// The key root dcoord's records live under (sessions, locks, queues).
    #[arg(long, default_value = dcoord::keys::DEFAULT_ROOT)]
    pub root: String,
}

impl Conn {
    /// Session options with this connection's key root.
    pub fn session_options(&self) -> dcoord::session::SessionOptions {
        dcoord::session::SessionOptions::default().root(self.root.clone())
    }
}

/// A value given inline or (clap guarantees one of the two) in a file.
pub fn read_input(
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

/// Where `dcoord cluster` publishes its endpoints for the other commands: `pid N`, then one
/// endpoint per line.
pub fn endpoints_file() -> PathBuf {
    std::env::temp_dir().join("dcoord-cluster.endpoints")
}

/// What `dcoord cluster` wrote to its endpoints file: `pid N`, the endpoints, `admin ADDR`s,
/// and with TLS `cacert PATH`, `cert PATH`, `key PATH`.
#[derive(Default)]
pub struct EndpointsFile {
    /// The `dcoord cluster` that wrote it, if the file names one.
    pub owner: Option<u32>,
    /// The cluster's client endpoints.
    pub endpoints: Vec<String>,
    /// Its nodes' admin addresses (for `dcoord status` and `dcoord check`).
    pub admins: Vec<String>,
    /// The CA its nodes' certificates chain to, when it serves TLS.
    pub cacert: Option<PathBuf>,
    /// A client certificate and key its CA signed (for mTLS).
    pub identity: (Option<PathBuf>, Option<PathBuf>),
}

/// The endpoints file, if there is one.
pub fn read_endpoints_file() -> Option<EndpointsFile> {
    let text = std::fs::read_to_string(endpoints_file()).ok()?;
    let mut file = EndpointsFile::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(pid) = line.strip_prefix("pid ") {
            file.owner = pid.trim().parse().ok();
        } else if let Some(admin) = line.strip_prefix("admin ") {
            file.admins.push(admin.trim().to_string());
        } else if let Some(path) = line.strip_prefix("cacert ") {
            file.cacert = Some(path.trim().into());
        } else if let Some(path) = line.strip_prefix("cert ") {
            file.identity.0 = Some(path.trim().into());
        } else if let Some(path) = line.strip_prefix("key ") {
            file.identity.1 = Some(path.trim().into());
        } else {
            file.endpoints.push(line.to_string());
        }
    }
    Some(file)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The soak provokes failures on purpose: the client's own error lines are noise there.
    // A node logs what d-engine used to print on stdout (role changes, snapshots): see the
    // README's "Patched d-engine-core".
    let default_filter = match cli.command {
        Cmd::Soak(_) | Cmd::SoakWorker(_) => "warn,d_engine_client=off",
        Cmd::Node(_) => "warn,d_engine_core::print=info,d_engine_server::print=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dcoord: {e}");
            ExitCode::from(exit_code(&e))
        }
    };
    // Not a plain drop: that waits for blocking tasks, and a command holding a grant until
    // stdin closes has one reading a terminal, so Ctrl-C would hang until EOF.
    runtime.shutdown_background();
    code
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

/// The cluster `conn` names: its endpoints (flags, then $DCOORD_ENDPOINTS, then `dcoord
/// cluster`'s file) and how to reach them (--cacert/--cert/--key, else the file's).
pub fn endpoints(conn: &Conn) -> dcoord::Result<(Vec<String>, Option<ClientTls>)> {
    let mut endpoints = conn.endpoints.clone();
    let (mut cacert, mut identity) = (
        conn.cacert.clone(),
        (conn.client_cert.clone(), conn.client_key.clone()),
    );
    if endpoints.is_empty()
        && let Some(EndpointsFile {
            owner,
            endpoints: listed,
            cacert: file_ca,
            identity: file_identity,
            ..
        }) = read_endpoints_file()
    {
        if let Some(pid) = owner
            && !process::running(pid)
        {
            return Err(Error::InvalidArgument(format!(
                "stale endpoints file {:?}: its `dcoord cluster` (pid {pid}) is gone; start one, \
                 or pass --endpoints / set DCOORD_ENDPOINTS",
                endpoints_file()
            )));
        }
        endpoints = listed;
        if cacert.is_none() {
            cacert = file_ca;
        }
        if identity == (None, None) {
            identity = file_identity;
        }
    }
    if endpoints.is_empty() {
        return Err(Error::InvalidArgument(
            "no endpoints: pass --endpoints, set DCOORD_ENDPOINTS, or start `dcoord cluster`"
                .into(),
        ));
    }
    let tls = match (cacert, identity) {
        (None, (None, None)) => None,
        (None, _) => {
            return Err(Error::InvalidArgument(
                "--cert/--key need --cacert (the CA that signed the nodes)".into(),
            ));
        }
        (Some(ca), (Some(cert), Some(key))) => {
            Some(ClientTls::from_ca_file(ca)?.identity_files(cert, key)?)
        }
        (Some(ca), _) => Some(ClientTls::from_ca_file(ca)?),
    };
    Ok((endpoints, tls))
}

/// A store on the cluster `conn` names (see [`endpoints`]).
pub async fn connect(conn: &Conn) -> dcoord::Result<RemoteStore> {
    let (endpoints, tls) = endpoints(conn)?;
    let mut options = RemoteOptions::default().op_deadline(conn.timeout);
    if let Some(tls) = tls {
        options = options.tls(tls);
    }
    RemoteStore::connect(&endpoints, options).await
}

async fn run(cmd: Cmd) -> dcoord::Result<ExitCode> {
    match cmd {
        Cmd::Node(args) => node::run_node(args).await,
        Cmd::Soak(args) => soak::run(args).await,
        Cmd::SoakWorker(args) => soak::run_worker(args).await,
        Cmd::Cluster(args) => node::run_cluster(args).await,
        Cmd::Check { admin, timeout } => node::check(admin, timeout).await,
        Cmd::Get {
            key,
            prefix: true,
            output,
            conn,
            ..
        } => kv::list(key, output, conn).await,
        Cmd::Get {
            key,
            consistency,
            output,
            conn,
            ..
        } => kv::get(key, consistency, output, conn).await,
        Cmd::Put {
            key,
            value,
            file,
            ttl,
            conn,
        } => kv::put(key, value, file, ttl, conn).await,
        Cmd::Config { op } => config::run(op).await,
        Cmd::Queue { op } => queue::run(op).await,
        Cmd::Lock {
            op: Some(lock::LockOp::Info { name, output, conn }),
            ..
        } => lock::info(name, output, conn).await,
        Cmd::Lock { op: None, args } => lock::run(args).await,
        Cmd::Elect { args } => elect::run(args).await,
        Cmd::Members { args } => group::members(args).await,
        Cmd::Counter { args } => group::counter(args).await,
        Cmd::Semaphore {
            op:
                Some(semaphore::SemaphoreOp::Info {
                    name,
                    permits,
                    output,
                    conn,
                }),
            ..
        } => semaphore::info(name, permits, output, conn).await,
        Cmd::Semaphore { op: None, args } => semaphore::run(args).await,
        Cmd::Supervise {
            kill_after_ms,
            parent,
            command,
        } => Ok(process::supervise(command, Duration::from_millis(kill_after_ms), parent).await),
        Cmd::Del { key, conn } => kv::del(key, conn).await,
        Cmd::Watch {
            key,
            prefix,
            count,
            output,
            conn,
        } => kv::watch(key, prefix, count, output, conn).await,
        Cmd::Status {
            admin,
            output,
            conn,
        } => node::status(admin, output, conn).await,
    }
}

/// A duration on the command line: `500ms`, `2s`, `1m` (humantime), or a bare number of seconds.
pub fn duration(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}")),
    }
}

/// A session on the cluster `conn` names, with this lease (at least 1 s).
pub async fn session(conn: &Conn, lease: Duration) -> dcoord::Result<dcoord::session::Session> {
    use dcoord::session::Session;
    if lease < Duration::from_secs(1) {
        return Err(Error::InvalidArgument(
            "--lease must be at least 1 second".into(),
        ));
    }
    let store: std::sync::Arc<dyn dcoord::store::Store> = std::sync::Arc::new(connect(conn).await?);
    Session::start(store, conn.session_options().lease(lease)).await
}
