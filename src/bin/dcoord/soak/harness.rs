//! The soak run: the cluster and the workers up, the nemesis, heal and drain, the checks, and
//! the summary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use dcoord::config::{ConfigOptions, ConfigWatch, Source};
use dcoord::engine::{ClusterOptions, LocalCluster};
use dcoord::queue::{QueueOptions, WorkQueue};
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{RemoteOptions, RemoteStore, Store};
use dcoord::{Error, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::check::{
    self, ConfigReport, Ev, Fault, LockReport, QueueReport, SemaphoreReport, Violation,
};
use super::load::{count, produce, publish_final, write_config};
use super::nemesis::Nemesis;
use super::settle::{drain, settle_config, wait_ready};
use super::worker::{Role, SoakConfig, now_us};
use super::{CONFIG_KEY, QUEUE, Record, SoakArgs, Workers, read_histories};

/// Takeover bound beyond the lease: detection rounding, a relist, scheduling on busy cores.
const TAKEOVER_SLACK: Duration = Duration::from_secs(10);
/// How soon every watcher must hold the value written before a fault's heal.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(20);

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The longest the store may go without acknowledging a write, faults included.
const STALL_BOUND: Duration = Duration::from_secs(60);

/// Runs the soak and prints its summary. Exit status 1 on a violation.
pub async fn run(args: SoakArgs) -> Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let lease = Duration::from_secs(args.lease.max(1));
    let (tmp, dir) = work_dir(args.dir.as_deref())?;
    let exe = dcoord::engine::dcoord_binary()?;
    let mut nemesis = Nemesis::new(seed, &args)?;
    eprintln!(
        "soak: {:?} of faults, seed {seed}, lease {lease:?}, dir {}",
        args.duration,
        dir.display()
    );

    let mut cluster = start_cluster(&dir, &exe).await?;
    let mut soak = Soak::start(&cluster, exe, dir, lease).await?;
    let load = soak.start_load();

    // The nemesis.
    nemesis.run(&mut soak, &mut cluster).await?;

    // Heal and drain.
    let ending = soak.heal_and_drain(&cluster, load).await;
    drop(cluster);

    // Check.
    let report = soak.check(lease, ending);

    soak.print_summary(&args, seed, lease, report);
    if soak.violations.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    soak.print_violations(tmp);
    Ok(ExitCode::from(1))
}

/// The run's directory: `dir`, created if need be, or else a new temp dir, returned with its
/// guard (dropping it deletes the directory).
fn work_dir(dir: Option<&Path>) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| io_error("cannot create", d, e))?;
            Ok((None, d.to_path_buf()))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("dcoord-soak-")
                .tempdir()
                .map_err(|e| io_error("cannot create a temp dir in", &std::env::temp_dir(), e))?;
            let p = t.path().to_path_buf();
            Ok((Some(t), p))
        }
    }
}

/// The 3-node cluster, child processes of `exe`, with its data in `dir/cluster`.
async fn start_cluster(dir: &Path, exe: &Path) -> Result<LocalCluster> {
    LocalCluster::start(
        ClusterOptions::default()
            .nodes(3)
            .dir(dir.join("cluster"))
            .binary(exe),
    )
    .await
}

/// What the phases of a run share: the harness's own clients of the cluster, the workers, and
/// what the run has recorded and found so far. (Not the cluster itself: it goes before the
/// checks, these stay to the end.)
pub(super) struct Soak {
    // Declared in the reverse of their creation: fields drop in declaration order, so these
    // drop in the order they did as locals of `run`.
    pub(super) workers: Workers,
    pub(super) record: Arc<StdMutex<Record>>,
    config: Arc<ConfigWatch<SoakConfig>>,
    pub(super) queue: WorkQueue,
    pub(super) session: Session,
    pub(super) store: Arc<dyn Store>,
    remote: RemoteStore,
    faults: Vec<Fault>,
    pub(super) violations: Vec<Violation>,
    /// Replica checks run so far.
    pub(super) replica_checks: u32,
}

/// The harness's own load (the producer, the config writer and the store probe), running
/// until `stop`.
struct Load {
    stop: watch::Sender<bool>,
    producer: JoinHandle<()>,
    writer: JoinHandle<()>,
    counter: JoinHandle<()>,
}

/// What healing and draining left for the checks.
struct Ending {
    /// The last config value written.
    final_n: u64,
    /// Whether the queue drained.
    drained: std::result::Result<(), String>,
    /// When the draining and settling were over.
    end: u64,
    /// The final replica check, for the summary.
    final_replicas: String,
}

/// The checkers' results, for the summary.
struct Report {
    lock: LockReport,
    election: LockReport,
    semaphore: SemaphoreReport,
    queue: QueueReport,
    config: ConfigReport,
    /// The takeover bound the lock check used (µs).
    takeover_bound: u64,
    /// Operation errors the workers recorded.
    errors: usize,
    final_n: u64,
    final_replicas: String,
}

impl Soak {
    /// Connects the harness's own clients to `cluster`, publishes the first config value, and
    /// starts the workers; returns once every worker is ready.
    async fn start(
        cluster: &LocalCluster,
        exe: PathBuf,
        dir: PathBuf,
        lease: Duration,
    ) -> Result<Self> {
        let endpoints = cluster.endpoints();
        let remote = RemoteStore::connect(
            &endpoints,
            RemoteOptions::default().op_deadline(Duration::from_secs(60)),
        )
        .await?;
        let store: Arc<dyn Store> = Arc::new(remote.clone());
        // The harness's own session (producer, probes) must outlive every fault it injects.
        let session = Session::start(
            store.clone(),
            SessionOptions::default().lease(Duration::from_secs(60)),
        )
        .await?;
        let queue = WorkQueue::open(&session, QUEUE, QueueOptions::default()).await?;
        let config = Arc::new(
            ConfigWatch::<SoakConfig>::open(
                store.clone(),
                Source::key(CONFIG_KEY),
                ConfigOptions::default(),
            )
            .await?,
        );
        config.publish(&SoakConfig { n: 1 }).await?;
        let record = Arc::new(StdMutex::new(Record {
            writes: vec![(1, now_us())],
            max_attempted: 1,
            ..Record::default()
        }));
        let workers = start_workers(exe, dir, endpoints, lease).await?;
        Ok(Soak {
            workers,
            record,
            config,
            queue,
            session,
            store,
            remote,
            faults: Vec::new(),
            violations: Vec::new(),
            replica_checks: 0,
        })
    }

    /// Starts the producer, the config writer and the store probe.
    fn start_load(&self) -> Load {
        let (stop_tx, stop_rx) = watch::channel(false);
        let producer = tokio::spawn(produce(
            self.queue.clone(),
            stop_rx.clone(),
            self.record.clone(),
        ));
        let writer = tokio::spawn(write_config(
            self.config.clone(),
            stop_rx.clone(),
            self.record.clone(),
        ));
        let counter = tokio::spawn(count(self.remote.clone(), stop_rx, self.record.clone()));
        Load {
            stop: stop_tx,
            producer,
            writer,
            counter,
        }
    }

    /// Records a fault: appended to `faults.log` in the run's directory (best effort), and to
    /// the faults the checkers judge.
    pub(super) fn log_fault(&mut self, fault: Fault) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.workers.dir.join("faults.log"))
        {
            use std::io::Write;
            let _ = writeln!(
                f,
                "{} {} {} {}",
                fault.at, fault.healed, fault.kind, fault.target
            );
        }
        self.faults.push(fault);
    }

    /// Stops the load, writes the final config value, drains the queue, lets the watchers
    /// settle, checks the replicas a last time, and stops the workers.
    async fn heal_and_drain(&mut self, cluster: &LocalCluster, load: Load) -> Ending {
        let _ = load.stop.send(true);
        let _ = load.producer.await;
        let _ = load.writer.await;
        let _ = load.counter.await;
        let final_n = self.record.lock().unwrap().max_attempted + 1;
        if let Err(e) = publish_final(&self.config, final_n, &self.record).await {
            self.violations.push(Violation {
                invariant: "cluster: writable after the faults (d-engine itself)",
                detail: format!("the final config write failed for 60 s: {e}"),
            });
        }
        let drained = drain(
            &*self.store,
            &self.queue,
            &self.record,
            Duration::from_secs(120),
        )
        .await;
        settle_config(&self.workers.histories, final_n, Duration::from_secs(30)).await;
        let end = now_us();
        self.replica_checks += 1;
        let final_replicas = match cluster.check_replicas(Duration::from_secs(60)).await {
            Ok(report) => report.to_string(),
            Err(e) => {
                self.violations.push(Violation {
                    invariant: "cluster: replicas agree at the end (d-engine itself)",
                    detail: e.to_string(),
                });
                format!("FAILED: {e}")
            }
        };
        self.workers.stop_all().await;
        Ending {
            final_n,
            drained,
            end,
            final_replicas,
        }
    }

    /// Runs the checkers over the histories, the record and the faults, then adds the store
    /// probe's and the drain's violations.
    fn check(&mut self, lease: Duration, ending: Ending) -> Report {
        let lines = read_histories(&self.workers.histories);
        let rec = self.record.lock().unwrap();
        let takeover_bound = (lease + TAKEOVER_SLACK).as_micros() as u64;
        let lock = check::check_lock(
            &lines,
            &self.faults,
            takeover_bound,
            ending.end,
            &mut self.violations,
        );
        let election = check::check_exclusive(
            &check::ELECTION,
            &lines,
            &self.faults,
            takeover_bound,
            ending.end,
            &mut self.violations,
        );
        let semaphore = check::check_semaphore(&lines, super::PERMITS, &mut self.violations);
        let queue = check::check_queue(&lines, &rec.facts, &mut self.violations);
        let config = check::check_config(
            &lines,
            &rec.writes,
            ending.final_n,
            &self.faults,
            CONVERGENCE_BOUND.as_micros() as u64,
            ending.final_n,
            &mut self.violations,
        );
        let (stall_us, stall_end) = rec.longest_stall;
        if stall_us > STALL_BOUND.as_micros() as u64 {
            self.violations.push(Violation {
                invariant: "store: acknowledges writes again within 60 s of any fault",
                detail: format!(
                    "no acknowledged write for {:.1} s, until {stall_end}",
                    stall_us as f64 / 1e6
                ),
            });
        }
        for (at, detail) in &rec.regressions {
            self.violations.push(Violation {
                invariant: "store: an acknowledged write never goes backwards (d-engine itself)",
                detail: format!("at {at}: {detail}"),
            });
        }
        if let Err(e) = ending.drained {
            self.violations.push(Violation {
                invariant: "queue: drains after the faults",
                detail: e,
            });
        }
        let errors = lines
            .iter()
            .filter(|l| matches!(l.ev, Ev::Error { .. }))
            .count();
        Report {
            lock,
            election,
            semaphore,
            queue,
            config,
            takeover_bound,
            errors,
            final_n: ending.final_n,
            final_replicas: ending.final_replicas,
        }
    }

    /// Prints the summary: per recipe what ran and what was checked, then the faults, the store
    /// probe, the replica checks, and the violations by invariant.
    fn print_summary(&self, args: &SoakArgs, seed: u64, lease: Duration, report: Report) {
        let rec = self.record.lock().unwrap();
        println!(
            "\n## dcoord soak: {:?} of faults, seed {seed}, lease {lease:?}\n",
            args.duration
        );
        print_table(&report, rec.facts.poison.len());
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.faults {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        let Report {
            errors,
            final_replicas,
            ..
        } = report;
        println!(
            "\nfaults: {} ({}); recorded operation errors: {errors}; enqueue gave up: {}, config write errors: {}",
            self.faults.len(),
            by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            rec.enqueue_errors,
            rec.write_errors
        );
        println!(
            "store probe: {} acknowledged counter increments, {} regressions, longest time \
             without an acknowledged write {:.1} s (until {}; bound {STALL_BOUND:?})",
            rec.counter_writes,
            rec.regressions.len(),
            rec.longest_stall.0 as f64 / 1e6,
            rec.longest_stall.1
        );
        let replica_checks = self.replica_checks;
        println!(
            "replica checks: {replica_checks} (after each node fault's heal and at the end); final: {final_replicas}"
        );
        println!("violations: {}", self.violations.len());
        let mut by_invariant: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            *by_invariant.entry(v.invariant).or_default() += 1;
        }
        for (invariant, n) in &by_invariant {
            println!("  {n} × {invariant}");
        }
    }

    /// Prints the first 20 violations in full, and keeps the temp dir, if any, with the
    /// histories that show them.
    fn print_violations(&self, tmp: Option<tempfile::TempDir>) {
        for v in self.violations.iter().take(20) {
            println!("\nVIOLATION {}\n{}", v.invariant, v.detail);
        }
        if let Some(t) = tmp {
            let kept = t.keep();
            println!("\nhistories kept in {}", kept.display());
        }
    }
}

/// Starts the workers (3 lock workers, 2 consumers, 2 watchers, 2 electors, 3 permit workers)
/// and waits until each is ready.
async fn start_workers(
    exe: PathBuf,
    dir: PathBuf,
    endpoints: Vec<String>,
    lease: Duration,
) -> Result<Workers> {
    let mut workers = Workers {
        exe,
        dir,
        endpoints,
        lease,
        procs: Vec::new(),
        histories: Vec::new(),
    };
    for i in 0..3 {
        workers.start(Role::Lock, &format!("lock-{i}"))?;
    }
    for i in 0..2 {
        workers.start(Role::Consumer, &format!("consumer-{i}"))?;
        workers.start(Role::Watcher, &format!("watch-{i}"))?;
        workers.start(Role::Elector, &format!("elect-{i}"))?;
    }
    for i in 0..3 {
        workers.start(Role::Permit, &format!("permit-{i}"))?;
    }
    wait_ready(&workers.histories, Duration::from_secs(120)).await?;
    Ok(workers)
}

/// The summary's table: per recipe, what ran and what was checked.
fn print_table(report: &Report, poison: usize) {
    let Report {
        lock,
        election,
        semaphore,
        queue: q,
        config: cfg,
        takeover_bound,
        final_n,
        ..
    } = report;
    println!("| recipe | operations | checked |");
    println!("| --- | --- | --- |");
    println!(
        "| lock | {} grants, {} fenced writes accepted, {} refused | unique tokens, real-time order, fenced register, {} takeovers (worst {:.1} s, bound {:.0} s) |",
        lock.grants,
        lock.fenced_ok,
        lock.fenced_rejected,
        lock.takeovers,
        lock.worst_takeover as f64 / 1e6,
        *takeover_bound as f64 / 1e6
    );
    println!(
        "| election | {} terms, {} fenced writes accepted, {} refused | one leader per term, real-time order, fenced register, {} leader faults (worst replacement {:.1} s, bound {:.0} s) |",
        election.grants,
        election.fenced_ok,
        election.fenced_rejected,
        election.takeovers,
        election.worst_takeover as f64 / 1e6,
        *takeover_bound as f64 / 1e6
    );
    println!(
        "| semaphore | {} grants of 1-2 of {} permits | unique tokens, never more than {} held (peak {}; {} holds of killed or paused workers not counted) |",
        semaphore.grants,
        super::PERMITS,
        super::PERMITS,
        semaphore.peak,
        semaphore.uncounted
    );
    println!(
        "| queue | {} enqueued ({} poison or undecodable), {} deliveries ({} redeliveries), {} effects, {} dead letters | none lost, effects once, dead letters = poison |",
        q.enqueued, poison, q.deliveries, q.redeliveries, q.effects, q.dead
    );
    println!(
        "| config | {} writes, {} applied by watchers, {} rejected | never backwards, only written values, converged (worst {:.1} s, bound {:.0} s), final = {final_n} |",
        cfg.writes,
        cfg.applied,
        cfg.rejected,
        cfg.worst_convergence as f64 / 1e6,
        CONVERGENCE_BOUND.as_secs_f64()
    );
}
