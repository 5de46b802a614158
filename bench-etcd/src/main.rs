//! dcoord vs etcd, side by side, interleaved in one run: each workload runs on dcoord
//! (embedded, and a local 3-node cluster over gRPC) and on etcd 3.4 (1 and 3 members on
//! 127.0.0.1, started and stopped here), in alternating rounds, and the report gives p50/p99,
//! throughput and the ratio per workload. Run it with `scripts/bench-etcd.sh`.
//!
//! The etcd side uses etcd's own algorithms: the Lock RPC and the client-side mutex of its
//! `concurrency` package (lease + key under a prefix + wait for the predecessor's delete), a
//! txn-claim queue (compare the key exists, delete it), N watch streams on one key, the
//! `concurrency.Election` algorithm (a key per candidate under a lease; the lowest create
//! revision leads; each candidate waits for its predecessor's delete), and the client-side
//! semaphore pattern (a key per contender under a lease; the first N by create revision hold;
//! a waiter re-checks on every delete under the prefix).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use clap::Parser;
use dcoord::election::Election;
use dcoord::engine::{ClusterOptions, EmbeddedNode, LocalCluster};
use dcoord::lock::Mutex;
use dcoord::queue::{EnqueueOptions, Message, Producer, QueueOptions, WorkQueue};
use dcoord::reconcile::{Mirror, MirrorOptions};
use dcoord::semaphore::Semaphore;
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{RemoteOptions, RemoteStore, Store, WatchTarget};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LockOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use futures::StreamExt;
use tokio::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
#[command(about = "dcoord vs etcd, side by side")]
struct Args {
    /// Where to write the markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Where both systems keep their data (default: /dev/shm when it exists). The same place
    /// for both: dcoord fsyncs before it acknowledges (its patched core), as etcd does, so a
    /// tmpfs makes both systems' fsyncs free alike, and a disk costs both alike.
    #[arg(long, alias = "etcd-dir")]
    data_dir: Option<PathBuf>,
    /// Samples per latency workload and system.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Seconds of each 8-contender round.
    #[arg(long, default_value_t = 3)]
    contention_secs: u64,
    /// Messages per queue round.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Enqueues the queue workload's producer keeps in flight (the same for both systems).
    #[arg(long, default_value_t = 8)]
    producer_in_flight: usize,
    /// Lease of the failover workload (g), in seconds, the same for dcoord and etcd.
    #[arg(long, default_value_t = 5)]
    failover_lease: u64,
    /// Leader crashes per system in the failover workload (g).
    #[arg(long, default_value_t = 3)]
    failovers: usize,
    /// Only these workloads (letters, comma-separated: a,b,...,h); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One system under test.
enum Sys {
    Dcoord(Arc<dyn Store>),
    Etcd(Box<Client>),
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report.

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// A metric's value on each of the four systems.
struct Row {
    metric: String,
    values: [Option<f64>; 4],
    /// Higher is better (throughput) or lower is better (latency).
    higher_better: bool,
}

struct Section {
    title: String,
    how: String,
    rows: Vec<Row>,
}

#[derive(Default)]
struct Samples {
    by_sys: [Vec<Duration>; 4],
}

impl Samples {
    fn rows(&mut self, what: &str) -> Vec<Row> {
        for v in &mut self.by_sys {
            v.sort();
        }
        let at = |p: f64| {
            let mut out = [None; 4];
            for (i, v) in self.by_sys.iter().enumerate() {
                if !v.is_empty() {
                    out[i] = Some(pct(v, p));
                }
            }
            out
        };
        vec![
            Row {
                metric: format!("{what} p50 (ms)"),
                values: at(0.5),
                higher_better: false,
            },
            Row {
                metric: format!("{what} p99 (ms)"),
                values: at(0.99),
                higher_better: false,
            },
        ]
    }
}

/// dcoord's advantage: > 1 means dcoord is better by that factor.
fn advantage(dcoord: Option<f64>, etcd: Option<f64>, higher_better: bool) -> String {
    match (dcoord, etcd) {
        (Some(d), Some(e)) if d > 0.0 && e > 0.0 => {
            let r = if higher_better { d / e } else { e / d };
            format!("{r:.2}×")
        }
        _ => "n/a".into(),
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
        None => "n/a".into(),
    }
}

fn render(sections: &[Section], header: &str) -> String {
    let mut s = String::from(header);
    for sec in sections {
        s.push_str(&format!("\n## {}\n\n{}\n\n", sec.title, sec.how));
        s.push_str(
            "| metric | dcoord embedded | dcoord 3-node | etcd 1 member | etcd 3 members | embedded vs etcd-1 | 3-node vs etcd-3 |\n",
        );
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for r in &sec.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.metric,
                fmt(r.values[0]),
                fmt(r.values[1]),
                fmt(r.values[2]),
                fmt(r.values[3]),
                advantage(r.values[0], r.values[2], r.higher_better),
                advantage(r.values[1], r.values[3], r.higher_better),
            ));
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// etcd members, started and stopped here (only the processes this program started).

struct EtcdCluster {
    children: Vec<tokio::process::Child>,
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_etcd(members: usize, base: &Path) -> Res<EtcdCluster> {
    let dir = tempfile::Builder::new()
        .prefix("dcoord-bench-etcd-")
        .tempdir_in(base)?;
    let ports: Vec<(u16, u16)> = (0..members)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Res<_>>()?;
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut children = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.path().join(format!("m{i}.log")))?;
        let child = tokio::process::Command::new("etcd")
            .arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(dir.path().join(format!("m{i}")))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("dcoord-bench")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
    }
    let endpoints: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    let cluster = EtcdCluster {
        children,
        endpoints,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = Client::connect(&cluster.endpoints, None).await
            && c.put("/bench/ready", "1", None).await.is_ok()
        {
            return Ok(cluster);
        }
        if Instant::now() > deadline {
            return Err("etcd did not become ready within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads. Each runs `n` samples (or `secs`) on one system; callers alternate systems.

/// (a) put latency and CAS latency.
async fn raw_ops(sys: &Sys, n: usize, tag: &str) -> Res<(Vec<Duration>, Vec<Duration>)> {
    let key = format!("/bench/a/{tag}");
    let (mut puts, mut cases) = (Vec::new(), Vec::new());
    for i in 0..n {
        let v = format!("v{i}");
        let t = Instant::now();
        match sys {
            Sys::Dcoord(s) => s.put(key.as_bytes(), v.as_bytes()).await?,
            Sys::Etcd(c) => {
                c.clone().put(key.as_str(), v.as_str(), None).await?;
            }
        }
        puts.push(t.elapsed());
    }
    let mut cur = format!("v{}", n - 1);
    for i in 0..n {
        let new = format!("c{i}");
        let t = Instant::now();
        let ok = match sys {
            Sys::Dcoord(s) => {
                s.compare_and_swap(key.as_bytes(), Some(cur.as_bytes()), new.as_bytes())
                    .await?
            }
            Sys::Etcd(c) => c
                .clone()
                .txn(
                    Txn::new()
                        .when([Compare::value(key.as_str(), CompareOp::Equal, cur.as_str())])
                        .and_then([TxnOp::put(key.as_str(), new.as_str(), None)]),
                )
                .await?
                .succeeded(),
        };
        cases.push(t.elapsed());
        if !ok {
            return Err(format!("CAS lost on an uncontended key {key}").into());
        }
        cur = new;
    }
    Ok((puts, cases))
}

/// (b) put → watch event.
async fn watch_latency(sys: &Sys, n: usize, tag: &str) -> Res<Vec<Duration>> {
    let key = format!("/bench/b/{tag}");
    let mut out = Vec::new();
    match sys {
        Sys::Dcoord(s) => {
            let mut w = s.watch(WatchTarget::key(key.clone()), false).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            for i in 0..n {
                let v = format!("w{i}");
                let t = Instant::now();
                s.put(key.as_bytes(), v.as_bytes()).await?;
                loop {
                    let ev = w.next().await.ok_or("watch ended")??;
                    if ev.value.as_ref() == v.as_bytes() {
                        break;
                    }
                }
                out.push(t.elapsed());
            }
        }
        Sys::Etcd(c) => {
            let mut c = c.clone();
            let mut w = c.watch(key.as_str(), None).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            for i in 0..n {
                let v = format!("w{i}");
                let t = Instant::now();
                c.put(key.as_str(), v.as_str(), None).await?;
                'wait: loop {
                    let resp = w.message().await?.ok_or("watch ended")?;
                    for e in resp.events() {
                        if e.kv().is_some_and(|kv| kv.value() == v.as_bytes()) {
                            break 'wait;
                        }
                    }
                }
                out.push(t.elapsed());
            }
        }
    }
    Ok(out)
}

/// etcd's `concurrency.Mutex`, client side: a key `<prefix><lease>` created under the lease;
/// the holder is the key with the lowest create revision; a waiter watches the key just
/// before its own until it is deleted.
struct EtcdMutex {
    client: Client,
    prefix: String,
    key: String,
}

impl EtcdMutex {
    async fn new(client: &Client, name: &str) -> Res<Self> {
        let mut client = client.clone();
        let lease = client.lease_grant(60, None).await?.id();
        let prefix = format!("/bench/mutex/{name}/");
        let key = format!("{prefix}{lease:x}");
        let _ = lease;
        Ok(EtcdMutex {
            client,
            prefix,
            key,
        })
    }

    async fn lock(&mut self, lease_put: bool) -> Res<()> {
        let _ = lease_put;
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.key.as_str(), "", None)])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let resp = self.client.txn(txn).await?;
        let my_rev = if resp.succeeded() {
            resp.header().map(|h| h.revision()).unwrap_or(0)
        } else {
            self.client
                .get(self.key.as_str(), None)
                .await?
                .kvs()
                .first()
                .map(|kv| kv.create_revision())
                .unwrap_or(0)
        };
        loop {
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(my_rev - 1)
                .with_limit(1);
            let got = self.client.get(self.prefix.as_str(), Some(opts)).await?;
            let Some(prev) = got.kvs().first() else {
                return Ok(());
            };
            let rev = got.header().map(|h| h.revision()).unwrap_or(0);
            let prev_key = prev.key().to_vec();
            let mut w = self
                .client
                .watch(
                    prev_key,
                    Some(WatchOptions::new().with_start_revision(rev + 1)),
                )
                .await?;
            'deleted: loop {
                let resp = w.message().await?.ok_or("watch ended")?;
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    break 'deleted;
                }
            }
        }
    }

    async fn unlock(&mut self) -> Res<()> {
        self.client.delete(self.key.as_str(), None).await?;
        Ok(())
    }
}

/// The three lock implementations measured.
enum Locker {
    Dcoord(Mutex),
    EtcdRpc {
        client: Client,
        lease: i64,
        name: String,
    },
    EtcdMutex(EtcdMutex),
}

enum Held {
    Dcoord(dcoord::lock::MutexGuard),
    Rpc(Vec<u8>),
    Mutex,
}

impl Locker {
    async fn lock(&mut self) -> Res<Held> {
        Ok(match self {
            Locker::Dcoord(m) => Held::Dcoord(m.acquire().await?),
            Locker::EtcdRpc {
                client,
                lease,
                name,
            } => {
                let r = client
                    .lock(name.as_str(), Some(LockOptions::new().with_lease(*lease)))
                    .await?;
                Held::Rpc(r.key().to_vec())
            }
            Locker::EtcdMutex(m) => {
                m.lock(true).await?;
                Held::Mutex
            }
        })
    }

    async fn unlock(&mut self, held: Held) -> Res<()> {
        match (self, held) {
            (_, Held::Dcoord(g)) => g.release().await?,
            (Locker::EtcdRpc { client, .. }, Held::Rpc(key)) => {
                client.unlock(key).await?;
            }
            (Locker::EtcdMutex(m), Held::Mutex) => m.unlock().await?,
            _ => unreachable!("a grant is released by its own locker"),
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum EtcdLock {
    Rpc,
    ClientMutex,
}

async fn locker(sys: &Sys, name: &str, kind: EtcdLock) -> Res<(Locker, Option<Session>)> {
    Ok(match sys {
        Sys::Dcoord(s) => {
            let session = Session::start(s.clone(), SessionOptions::default()).await?;
            (Locker::Dcoord(Mutex::new(&session, name)?), Some(session))
        }
        Sys::Etcd(c) => match kind {
            EtcdLock::Rpc => {
                let mut client = Client::clone(c);
                let lease = client.lease_grant(60, None).await?.id();
                (
                    Locker::EtcdRpc {
                        client,
                        lease,
                        name: format!("/bench/lockrpc/{name}"),
                    },
                    None,
                )
            }
            EtcdLock::ClientMutex => (Locker::EtcdMutex(EtcdMutex::new(c, name).await?), None),
        },
    })
}

/// (c) uncontended lock + unlock.
async fn uncontended(sys: &Sys, n: usize, tag: &str, kind: EtcdLock) -> Res<Vec<Duration>> {
    let (mut l, _session) = locker(sys, &format!("c-{tag}"), kind).await?;
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let h = l.lock().await?;
        l.unlock(h).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

#[derive(Default)]
struct Contention {
    last_release: Option<Instant>,
    handoffs: Vec<Duration>,
    counts: Vec<usize>,
    inside: usize,
}

/// (d) 8 contenders for `secs`: acquisitions, handoff latencies, per-contender counts.
async fn contention(
    sys: &Sys,
    secs: u64,
    tag: &str,
    kind: EtcdLock,
) -> Res<(usize, Vec<Duration>, Vec<usize>)> {
    let name = format!("d-{tag}");
    let stats = Arc::new(StdMutex::new(Contention {
        counts: vec![0; 8],
        ..Contention::default()
    }));
    let mut lockers = Vec::new();
    for _ in 0..8 {
        lockers.push(locker(sys, &name, kind).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, (mut l, session)) in lockers.into_iter().enumerate() {
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            let _session = session;
            while Instant::now() < deadline {
                let h = l.lock().await?;
                {
                    let mut s = stats.lock().unwrap();
                    assert_eq!(s.inside, 0, "two holders");
                    s.inside = 1;
                    if let Some(r) = s.last_release.take() {
                        s.handoffs.push(r.elapsed());
                    }
                    s.counts[i] += 1;
                }
                {
                    let mut s = stats.lock().unwrap();
                    s.inside = 0;
                    s.last_release = Some(Instant::now());
                }
                l.unlock(h).await?;
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let s = std::mem::take(&mut *stats.lock().unwrap());
    Ok((s.counts.iter().sum(), s.handoffs, s.counts))
}

// ---------------------------------------------------------------------------------------------
// (g) Election and (h) semaphore.

/// etcd's `concurrency.Election`, client side: the candidate's key `<prefix><lease>` holds its
/// value under its lease; the key with the lowest create revision leads; a candidate waits for
/// the deletion of the key just before its own (as `concurrency.Mutex`).
struct EtcdCandidate {
    client: Client,
    prefix: String,
    lease: i64,
    keepalive: Option<tokio::task::JoinHandle<()>>,
}

impl EtcdCandidate {
    /// A candidate whose lease (`ttl` s) is kept alive every ttl/3 until [`Self::crash`].
    async fn new(client: &Client, name: &str, ttl: i64) -> Res<Self> {
        let mut client = client.clone();
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
        let every = Duration::from_millis((ttl as u64 * 1000) / 3);
        let keepalive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                    return;
                }
            }
        });
        Ok(EtcdCandidate {
            client,
            prefix: format!("/bench/election/{name}/"),
            lease,
            keepalive: Some(keepalive),
        })
    }

    fn key(&self) -> String {
        format!("{}{:x}", self.prefix, self.lease)
    }

    /// Campaigns with `value`; returns once leading.
    async fn campaign(&mut self, value: &str) -> Res<()> {
        let key = self.key();
        let put = etcd_client::PutOptions::new().with_lease(self.lease);
        let resp = self.client.put(key.as_str(), value, Some(put)).await?;
        let my_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        wait_predecessors(&mut self.client, &self.prefix, my_rev, 1).await
    }

    async fn resign(&mut self) -> Res<()> {
        self.client.delete(self.key(), None).await?;
        Ok(())
    }

    /// Stops keeping the lease alive (a crashed process): its key goes when the lease expires.
    fn crash(&mut self) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
    }
}

/// Waits until at most `n - 1` keys under `prefix` were created before `my_rev`, re-checking
/// on every delete under the prefix.
async fn wait_predecessors(client: &mut Client, prefix: &str, my_rev: i64, n: usize) -> Res<()> {
    loop {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_max_create_revision(my_rev - 1)
            .with_keys_only();
        let got = client.get(prefix, Some(opts)).await?;
        if got.kvs().len() < n {
            return Ok(());
        }
        let rev = got.header().map(|h| h.revision()).unwrap_or(0);
        let watch_key = if n == 1 {
            // Just the predecessor, as concurrency.Mutex / Election do.
            got.kvs()
                .last()
                .map(|kv| kv.key().to_vec())
                .unwrap_or_default()
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut opts = WatchOptions::new().with_start_revision(rev + 1);
        if n > 1 {
            opts = opts.with_prefix();
        }
        let mut stream = client.watch(watch_key, Some(opts)).await?;
        'deleted: loop {
            let resp = stream.message().await?.ok_or("watch ended")?;
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                break 'deleted;
            }
        }
    }
}

/// (g1) uncontended campaign → leading, then resign.
async fn campaign_latency(sys: &Sys, n: usize, tag: &str) -> Res<Vec<Duration>> {
    let name = format!("g-{tag}");
    let mut out = Vec::new();
    match sys {
        Sys::Dcoord(store) => {
            let session = Session::start(store.clone(), SessionOptions::default()).await?;
            let election = Election::new(&session, &name)?;
            for _ in 0..n {
                let t = Instant::now();
                let lead = election.campaign("me").await?;
                out.push(t.elapsed());
                lead.resign().await?;
            }
        }
        Sys::Etcd(c) => {
            let mut cand = EtcdCandidate::new(c, &name, 60).await?;
            for _ in 0..n {
                let t = Instant::now();
                cand.campaign("me").await?;
                out.push(t.elapsed());
                cand.resign().await?;
            }
            cand.crash();
        }
    }
    Ok(out)
}

/// (g2) the leader crashes (no more heartbeats / keepalives) with a candidate waiting: time to
/// the next leader.
async fn failover(sys: &Sys, lease: u64, tag: &str) -> Res<Duration> {
    let name = format!("gf-{tag}");
    match sys {
        Sys::Dcoord(store) => {
            let options = SessionOptions::default().lease(Duration::from_secs(lease));
            let a = Session::start(store.clone(), options.clone()).await?;
            let lead = Election::new(&a, &name)?.campaign("a").await?;
            let b = Session::start(store.clone(), options).await?;
            let election = Election::new(&b, &name)?;
            let next = tokio::spawn(async move {
                let l = election.campaign("b").await;
                (Instant::now(), l.map(|l| l.token()), b)
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::mem::forget(lead);
            let crashed = Instant::now();
            a.orphan();
            let (at, token, _b) = next.await?;
            token?;
            Ok(at - crashed)
        }
        Sys::Etcd(c) => {
            let mut a = EtcdCandidate::new(c, &name, lease as i64).await?;
            a.campaign("a").await?;
            let mut b = EtcdCandidate::new(c, &name, lease as i64).await?;
            let next = tokio::spawn(async move {
                let r = b.campaign("b").await.map_err(|e| e.to_string());
                (Instant::now(), r, b)
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            let crashed = Instant::now();
            a.crash();
            let (at, r, mut b) = next.await?;
            r?;
            b.crash();
            Ok(at - crashed)
        }
    }
}

/// (h) 16 contenders on a 4-permit semaphore for `secs`: grants, release → next grant.
async fn semaphore_contention(sys: &Sys, secs: u64, tag: &str) -> Res<(usize, Vec<Duration>)> {
    const N: usize = 4;
    const CONTENDERS: usize = 16;
    let name = format!("h-{tag}");
    #[derive(Default)]
    struct Stats {
        releases: std::collections::VecDeque<Instant>,
        handoffs: Vec<Duration>,
        grants: usize,
        inside: usize,
    }
    let stats = Arc::new(StdMutex::new(Stats::default()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..CONTENDERS {
        let stats = stats.clone();
        let on_grant = {
            let stats = stats.clone();
            move || {
                let mut s = stats.lock().unwrap();
                s.inside += 1;
                assert!(s.inside <= N, "more than {N} holders");
                s.grants += 1;
                if let Some(r) = s.releases.pop_front() {
                    s.handoffs.push(r.elapsed());
                }
            }
        };
        let on_release = move || {
            let mut s = stats.lock().unwrap();
            s.inside -= 1;
            s.releases.push_back(Instant::now());
        };
        match sys {
            Sys::Dcoord(store) => {
                let session = Session::start(store.clone(), SessionOptions::default()).await?;
                let sem = Semaphore::new(&session, &name, N as u64)?;
                tasks.push(tokio::spawn(async move {
                    let _session = session;
                    while Instant::now() < deadline {
                        let p = sem.acquire(1).await?;
                        on_grant();
                        on_release();
                        p.release().await?;
                    }
                    Res::Ok(())
                }));
            }
            Sys::Etcd(c) => {
                let mut client = Client::clone(c);
                let lease = client.lease_grant(60, None).await?.id();
                let prefix = format!("/bench/semaphore/{name}/");
                tasks.push(tokio::spawn(async move {
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        i += 1;
                        let key = format!("{prefix}{lease:x}-{i}");
                        let put = etcd_client::PutOptions::new().with_lease(lease);
                        let resp = client.put(key.as_str(), "", Some(put)).await?;
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        wait_predecessors(&mut client, &prefix, rev, N).await?;
                        on_grant();
                        on_release();
                        client.delete(key.as_str(), None).await?;
                    }
                    Res::Ok(())
                }));
            }
        }
    }
    for t in tasks {
        t.await??;
    }
    let s = std::mem::take(&mut *stats.lock().unwrap());
    Ok((s.grants, s.handoffs))
}

/// (e) a queue with 2 consumers: enqueue → handled latency and throughput with the producer
/// running, then the drain rate of a pre-filled queue.
async fn queue(sys: &Sys, m: usize, in_flight: usize, tag: &str) -> Res<(Vec<Duration>, f64, f64)> {
    let sent: Arc<StdMutex<HashMap<String, Instant>>> = Default::default();
    let lat: Arc<StdMutex<Vec<Duration>>> = Default::default();
    let done = Arc::new(tokio::sync::Notify::new());
    let handled = Arc::new(StdMutex::new(0usize));
    let mut results = Vec::new();
    let mut latencies = Vec::new();
    for (round, prefill) in [(0, false), (1, true)] {
        let name = format!("e{round}-{tag}");
        *handled.lock().unwrap() = 0;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let produce = |i: usize| format!("m{i:06}");
        let start_consumers = |stop_rx: tokio::sync::watch::Receiver<bool>| -> Res<Vec<tokio::task::JoinHandle<Res<()>>>> {
            let mut handles = Vec::new();
            for _ in 0..2 {
                let (sent, lat, done, handled, name) = (
                    sent.clone(),
                    lat.clone(),
                    done.clone(),
                    handled.clone(),
                    name.clone(),
                );
                let mut stop = stop_rx.clone();
                let record = move |id: &str| {
                    if let Some(t) = sent.lock().unwrap().get(id) {
                        lat.lock().unwrap().push(t.elapsed());
                    }
                    let mut h = handled.lock().unwrap();
                    *h += 1;
                    if *h >= m {
                        done.notify_one();
                    }
                };
                handles.push(match sys {
                    Sys::Dcoord(s) => {
                        let s = s.clone();
                        tokio::spawn(async move {
                            let session = Session::start(s, SessionOptions::default()).await?;
                            let q = WorkQueue::open(&session, &name, QueueOptions::default()).await?;
                            let stats = q
                                .run(
                                    4,
                                    move |msg: Message| {
                                        record(&msg.id);
                                        async { Ok(()) }
                                    },
                                    async move {
                                        let _ = stop.wait_for(|s| *s).await;
                                    },
                                )
                                .await?;
                            eprintln!("  {name}: a consumer acked {}, lost {} claim races", stats.acked, stats.conflicts);
                            Res::Ok(())
                        })
                    }
                    Sys::Etcd(c) => {
                        let mut c = c.clone();
                        tokio::spawn(async move {
                            let prefix = format!("/bench/q/{name}/");
                            let mut w = c
                                .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                                .await?;
                            loop {
                                if *stop.borrow() {
                                    return Ok(());
                                }
                                let opts = GetOptions::new().with_prefix().with_limit(16);
                                let got = c.get(prefix.as_str(), Some(opts)).await?;
                                let mut keys: Vec<Vec<u8>> =
                                    got.kvs().iter().map(|kv| kv.key().to_vec()).collect();
                                // Two consumers on one head would only collide: start anywhere.
                                fastrand_shuffle(&mut keys);
                                let claims = futures::stream::iter(keys)
                                    .map(|k| {
                                        let mut c = c.clone();
                                        async move {
                                            let txn = Txn::new()
                                                .when([Compare::version(
                                                    k.clone(),
                                                    CompareOp::Greater,
                                                    0,
                                                )])
                                                .and_then([TxnOp::delete(k.clone(), None)]);
                                            let ok = c.txn(txn).await.map(|r| r.succeeded());
                                            (k, ok)
                                        }
                                    })
                                    .buffer_unordered(4)
                                    .collect::<Vec<_>>()
                                    .await;
                                let mut any = false;
                                for (k, ok) in claims {
                                    if ok? {
                                        any = true;
                                        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                                        record(&id);
                                    }
                                }
                                if !any && got.kvs().is_empty() {
                                    tokio::select! {
                                        _ = w.message() => {}
                                        _ = stop.changed() => {}
                                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                                    }
                                }
                            }
                        })
                    }
                });
            }
            Ok(handles)
        };
        // dcoord's producer handle: no session, no index of the queue (as etcd's plain put).
        let producer = match sys {
            Sys::Dcoord(s) => Some(Producer::new(s.clone(), &name)?),
            Sys::Etcd(_) => None,
        };
        let enqueue = |i: usize| {
            let id = produce(i);
            let q = producer.clone();
            let c = match sys {
                Sys::Etcd(c) => Some(c.clone()),
                Sys::Dcoord(_) => None,
            };
            let name = name.clone();
            let sent = sent.clone();
            async move {
                sent.lock().unwrap().insert(id.clone(), Instant::now());
                match (q, c) {
                    (Some(q), _) => {
                        q.enqueue(b"payload", EnqueueOptions::default().id(&id))
                            .await?;
                    }
                    (None, Some(mut c)) => {
                        c.put(format!("/bench/q/{name}/{id}"), "payload", None)
                            .await?;
                    }
                    _ => unreachable!(),
                }
                Res::Ok(())
            }
        };
        let produce_all = || {
            futures::stream::iter(0..m)
                .map(&enqueue)
                .buffer_unordered(in_flight.max(1))
                .collect::<Vec<Res<()>>>()
        };
        if prefill {
            produce_all().await.into_iter().collect::<Res<Vec<()>>>()?;
            sent.lock().unwrap().clear();
        }
        lat.lock().unwrap().clear();
        let t0 = Instant::now();
        let consumers = start_consumers(stop_rx)?;
        if !prefill {
            produce_all().await.into_iter().collect::<Res<Vec<()>>>()?;
        }
        tokio::time::timeout(Duration::from_secs(120), done.notified())
            .await
            .map_err(|_| format!("queue {name}: not all {m} messages handled in 120 s"))?;
        let elapsed = t0.elapsed();
        let _ = stop_tx.send(true);
        for c in consumers {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
        results.push(m as f64 / elapsed.as_secs_f64());
        if !prefill {
            latencies = std::mem::take(&mut *lat.lock().unwrap());
        }
    }
    Ok((latencies, results[0], results[1]))
}

fn fastrand_shuffle<T>(v: &mut [T]) {
    // A small xorshift: enough to spread two consumers over a batch.
    let mut x = Instant::now().elapsed().as_nanos() as u64 | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// (f) `w` watchers on one key: write → all of them notified.
async fn fan_out(sys: &Sys, watchers: usize, writes: usize, tag: &str) -> Res<Vec<Duration>> {
    let key = format!("/bench/f/{tag}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut keep = Vec::new();
    match sys {
        Sys::Dcoord(s) => {
            for _ in 0..watchers {
                let mirror = Mirror::start(
                    s.clone(),
                    WatchTarget::key(key.clone()),
                    MirrorOptions::default(),
                );
                mirror.wait_ready().await?;
                let mut sub = mirror.subscribe();
                let (tx, key) = (tx.clone(), key.clone());
                keep.push(tokio::spawn(async move {
                    let _mirror = mirror;
                    while sub.changed().await.is_ok() {
                        let v = sub
                            .borrow_and_update()
                            .get(key.as_bytes())
                            .map(|e| String::from_utf8_lossy(&e.value).into_owned());
                        if let Some(v) = v {
                            let _ = tx.send((v, Instant::now()));
                        }
                    }
                }));
            }
        }
        Sys::Etcd(c) => {
            for _ in 0..watchers {
                let mut c = c.clone();
                let mut w = c.watch(key.as_str(), None).await?;
                let tx = tx.clone();
                keep.push(tokio::spawn(async move {
                    let _c = c;
                    while let Ok(Some(resp)) = w.message().await {
                        for e in resp.events() {
                            if let Some(kv) = e.kv() {
                                let v = String::from_utf8_lossy(kv.value()).into_owned();
                                let _ = tx.send((v, Instant::now()));
                            }
                        }
                    }
                }));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut out = Vec::new();
    for i in 0..writes {
        let v = format!("f{tag}-{i}");
        let t = Instant::now();
        match sys {
            Sys::Dcoord(s) => s.put(key.as_bytes(), v.as_bytes()).await?,
            Sys::Etcd(c) => {
                c.clone().put(key.as_str(), v.as_str(), None).await?;
            }
        }
        let mut seen = 0;
        let mut last = t;
        while seen < watchers {
            let (got, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .map_err(|_| format!("{seen} of {watchers} watchers saw write {i} in 30 s"))?
                .ok_or("watchers ended")?;
            if got == v {
                seen += 1;
                last = last.max(at);
            }
        }
        out.push(last - t);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in keep {
        k.abort();
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    format!("{cores} cores ({cpu}), {mem} RAM, {}", std::env::consts::OS)
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = Args::parse();
    let started = Instant::now();
    let n = args.samples.max(4);
    let half = n / 2;

    let data_base = args.data_dir.clone().unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        }
    });
    eprintln!(
        "starting dcoord (embedded, 3-node) in {} ...",
        data_base.display()
    );
    let data = tempfile::Builder::new()
        .prefix("dcoord-bench-")
        .tempdir_in(&data_base)?;
    let embedded = EmbeddedNode::start(data.path().join("embedded")).await?;
    let cluster = LocalCluster::start(
        ClusterOptions::default()
            .nodes(3)
            .dir(data.path().join("cluster")),
    )
    .await?;
    let remote = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(30)),
    )
    .await?;
    let mut systems: Vec<Option<Sys>> = vec![
        Some(Sys::Dcoord(embedded.dyn_store())),
        Some(Sys::Dcoord(Arc::new(remote))),
        None,
        None,
    ];
    let mut etcd_note = format!("etcd data in `{}` too", data_base.display());
    let mut etcds = Vec::new();
    if which("etcd") {
        for (slot, members) in [(2, 1), (3, 3)] {
            eprintln!("starting etcd ({members} member(s)) ...");
            let e = start_etcd(members, &data_base).await?;
            systems[slot] = Some(Sys::Etcd(Box::new(
                Client::connect(&e.endpoints, None).await?,
            )));
            etcds.push(e);
        }
    } else {
        etcd_note = "etcd not installed: etcd columns are n/a (run scripts/bench-etcd.sh)".into();
        eprintln!("{etcd_note}");
    }
    let live: Vec<usize> = (0..4).filter(|&i| systems[i].is_some()).collect();
    let run = |w: &str| args.only.is_empty() || args.only.iter().any(|o| o == w);
    let sys = |i: usize| systems[i].as_ref().expect("live");
    let mut sections = Vec::new();

    // (a)
    if run("a") {
        eprintln!("(a) put / CAS latency ...");
        let (mut puts, mut cases) = (Samples::default(), Samples::default());
        for round in 0..2 {
            for &i in &live {
                let (p, c) = raw_ops(sys(i), half, &format!("{i}-{round}")).await?;
                puts.by_sys[i].extend(p);
                cases.by_sys[i].extend(c);
            }
        }
        let mut rows = puts.rows("put");
        rows.extend(cases.rows("CAS"));
        sections.push(Section {
        title: "(a) Raw put and CAS latency".into(),
        how: format!(
            "{n} sequential puts, then {n} sequential compare-and-swaps on one key (etcd: a txn comparing the value), per system. Ratio columns: dcoord's advantage, etcd ÷ dcoord for latencies (> 1: dcoord is faster)."
        ),
        rows,
    });
    }

    // (b)
    if run("b") {
        eprintln!("(b) put → watch ...");
        let mut w = Samples::default();
        for round in 0..2 {
            for &i in &live {
                w.by_sys[i].extend(watch_latency(sys(i), half, &format!("{i}-{round}")).await?);
            }
        }
        sections.push(Section {
            title: "(b) put → watch event".into(),
            how: format!(
                "{n} puts on one key, each timed until the watcher (opened before) sees it."
            ),
            rows: w.rows("put→event"),
        });
    }

    // (c)
    if run("c") {
        eprintln!("(c) uncontended lock ...");
        let (mut rpc, mut cm) = (Samples::default(), Samples::default());
        for round in 0..2 {
            for &i in &live {
                let tag = format!("{i}-{round}");
                rpc.by_sys[i].extend(uncontended(sys(i), half, &tag, EtcdLock::Rpc).await?);
                if i >= 2 {
                    cm.by_sys[i]
                        .extend(uncontended(sys(i), half, &tag, EtcdLock::ClientMutex).await?);
                } else {
                    cm.by_sys[i] = rpc.by_sys[i].clone();
                }
            }
        }
        let mut rows = rpc.rows("lock+unlock (etcd: Lock RPC)");
        rows.extend(cm.rows("lock+unlock (etcd: client-side mutex)"));
        sections.push(Section {
        title: "(c) Uncontended lock + unlock".into(),
        how: format!(
            "{n} acquire+release pairs by one client. dcoord: `lock::Mutex` (fenced, fair, one-write handoff); etcd: its Lock RPC (with a lease), and the `concurrency` package's client-side mutex. The dcoord cells are the same in both rows."
        ),
        rows,
    });
    }

    // (d)
    if run("d") {
        eprintln!("(d) 8 contenders ...");
        let secs = args.contention_secs.max(1);
        let mut rows = Vec::new();
        for kind in [EtcdLock::Rpc, EtcdLock::ClientMutex] {
            let label = match kind {
                EtcdLock::Rpc => "etcd: Lock RPC",
                EtcdLock::ClientMutex => "etcd: client-side mutex",
            };
            let mut total = [None; 4];
            let mut fairness = [None; 4];
            let mut hand = Samples::default();
            let mut counts: Vec<Vec<usize>> = vec![vec![0; 8]; 4];
            let mut acq = [0usize; 4];
            for round in 0..2 {
                for &i in &live {
                    if kind == EtcdLock::ClientMutex && i < 2 && round == 1 {
                        continue;
                    }
                    let (a, h, c) =
                        contention(sys(i), secs, &format!("{i}-{round}-{}", kind as u8), kind)
                            .await?;
                    acq[i] += a;
                    hand.by_sys[i].extend(h);
                    for (k, v) in c.iter().enumerate() {
                        counts[i][k] += v;
                    }
                }
            }
            for &i in &live {
                let rounds = if kind == EtcdLock::ClientMutex && i < 2 {
                    1
                } else {
                    2
                };
                total[i] = Some(acq[i] as f64 / (secs * rounds) as f64);
                let (min, max) = (
                    *counts[i].iter().min().unwrap_or(&0),
                    *counts[i].iter().max().unwrap_or(&1),
                );
                fairness[i] = Some(min as f64 / max.max(1) as f64);
            }
            rows.push(Row {
                metric: format!("acquisitions/s ({label})"),
                values: total,
                higher_better: true,
            });
            rows.extend(hand.rows(&format!("handoff ({label})")));
            rows.push(Row {
                metric: format!("fairness: fewest ÷ most grants per contender ({label})"),
                values: fairness,
                higher_better: true,
            });
        }
        sections.push(Section {
        title: "(d) 8 contenders".into(),
        how: format!(
            "8 clients (each with its own session / lease) acquire and release one lock in a loop for {secs} s per round, 2 rounds. Handoff: from the holder starting its release to the next grant."
        ),
        rows,
    });
    }

    // (e)
    if run("e") {
        eprintln!("(e) queue ...");
        let mut lat = Samples::default();
        let mut tput = [None; 4];
        let mut drain = [None; 4];
        let m = args.messages.max(10);
        for round in 0..2 {
            for &i in &live {
                let (l, t, d) =
                    queue(sys(i), m, args.producer_in_flight, &format!("{i}-{round}")).await?;
                lat.by_sys[i].extend(l);
                tput[i] = Some(tput[i].unwrap_or(0.0) + t / 2.0);
                drain[i] = Some(drain[i].unwrap_or(0.0) + d / 2.0);
            }
        }
        let mut rows = vec![Row {
            metric: "throughput, producer running (msg/s)".into(),
            values: tput,
            higher_better: true,
        }];
        rows.extend(lat.rows("enqueue→handler"));
        rows.push(Row {
            metric: format!("drain of {m} pre-filled (msg/s)"),
            values: drain,
            higher_better: true,
        });
        sections.push(Section {
        title: "(e) Work queue, 2 consumers".into(),
        how: format!(
            "{m} messages per round, 2 rounds; one producer with {} enqueues in flight, 2 consumers, 4 in flight each. dcoord: a `queue::Producer` (a plain create, no session), `queue::WorkQueue` consumers (durable claim with a visibility lease, ack, retries, dead letters: at-least-once, 2 writes per message); etcd: a txn-claim queue (keys under a prefix; a consumer claims by a txn `version > 0 → delete`: 1 write, and a message whose consumer crashes is lost).",
            args.producer_in_flight
        ),
        rows,
    });
    }

    // (f)
    if run("f") {
        eprintln!("(f) 100 watchers ...");
        let mut f = Samples::default();
        let writes = (n / 10).max(10);
        for round in 0..2 {
            for &i in &live {
                f.by_sys[i]
                    .extend(fan_out(sys(i), 100, writes / 2, &format!("{i}-{round}")).await?);
            }
        }
        sections.push(Section {
        title: "(f) 100 watchers on one key".into(),
        how: format!(
            "100 independent watchers (dcoord: 100 `reconcile::Mirror`s, each with its own watch and resync; etcd: 100 watch streams), {writes} writes; time from the write until the last watcher has it."
        ),
        rows: f.rows("write → all 100 notified"),
    });
    }

    // (g)
    if run("g") {
        eprintln!("(g) election ...");
        let mut camp = Samples::default();
        for round in 0..2 {
            for &i in &live {
                camp.by_sys[i]
                    .extend(campaign_latency(sys(i), half, &format!("{i}-{round}")).await?);
            }
        }
        let lease = args.failover_lease.max(1);
        let mut fail = Samples::default();
        for round in 0..args.failovers.max(1) {
            for &i in &live {
                fail.by_sys[i].push(failover(sys(i), lease, &format!("{i}-{round}")).await?);
            }
        }
        let mut rows = camp.rows("campaign → leading, uncontended");
        let worst = |v: &Vec<Duration>| v.iter().max().map(|d| d.as_secs_f64() * 1e3);
        let mut over = [None; 4];
        for &i in &live {
            over[i] = worst(&fail.by_sys[i]).map(|ms| ms - lease as f64 * 1e3);
        }
        rows.extend(fail.rows(&format!("leader crash → next leader, lease {lease} s")));
        rows.push(Row {
            metric: format!(
                "worst failover minus the {lease} s lease (ms; below 0: within the lease)"
            ),
            values: over,
            higher_better: false,
        });
        sections.push(Section {
            title: "(g) Leader election".into(),
            how: format!(
                "Campaign → leading: {n} campaign + resign pairs by one candidate. Failover: a leader crashes (dcoord: its session stops heartbeating; etcd: its lease stops being kept alive) while a second candidate waits; time from the crash to the candidate leading, {} crashes per system, lease {lease} s on both. dcoord: `election::Election`; etcd: the `concurrency.Election` algorithm (key per candidate under its lease, lowest create revision leads, wait for the predecessor's delete).",
                args.failovers.max(1)
            ),
            rows,
        });
    }

    // (h)
    if run("h") {
        eprintln!("(h) semaphore ...");
        let secs = args.contention_secs.max(1);
        let mut hand = Samples::default();
        let mut grants = [0usize; 4];
        for round in 0..2 {
            for &i in &live {
                let (g, h) = semaphore_contention(sys(i), secs, &format!("{i}-{round}")).await?;
                grants[i] += g;
                hand.by_sys[i].extend(h);
            }
        }
        let mut rate = [None; 4];
        for &i in &live {
            rate[i] = Some(grants[i] as f64 / (secs * 2) as f64);
        }
        let mut rows = vec![Row {
            metric: "grants/s".into(),
            values: rate,
            higher_better: true,
        }];
        rows.extend(hand.rows("release → next grant"));
        sections.push(Section {
            title: "(h) Semaphore: 4 permits, 16 contenders".into(),
            how: format!(
                "16 clients (each with its own session / lease) take 1 permit of 4 and release it, in a loop for {secs} s per round, 2 rounds. dcoord: `semaphore::Semaphore` (fair, fenced; the releases of one process go in one write, which grants the next waiters when the record is as seen and else puts release markers that the first waiter they let in applies with one CAS); etcd: the client-side semaphore pattern (a key per request under a lease; the first 4 by create revision hold; a waiter re-checks on every delete under the prefix)."
            ),
            rows,
        });
    }

    let elapsed = started.elapsed();
    let header = format!(
        "# dcoord vs etcd\n\n\
         Generated by `./scripts/bench-etcd.sh {}` on {}, in {:.0} s.\n\n\
         Machine: {}. d-engine 0.2.4 (dcoord's bundled engine, patched to fsync a write on a \
         majority before it acknowledges it, as etcd does), data in `{}`; etcd {} ({etcd_note}: \
         both systems' data in the same place, so a tmpfs makes both fsyncs free alike, the \
         like-for-like durability setting). Every workload runs on all four systems in \
         alternating rounds in this one run; on a shared, noisy machine only the ratios in the \
         same table are meaningful. Ratio columns give **dcoord's advantage**: etcd ÷ dcoord \
         for latencies, dcoord ÷ etcd for rates; above 1.00× dcoord is better.\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        date(),
        elapsed.as_secs_f64(),
        machine(),
        data_base.display(),
        etcd_version(),
    );
    let report = render(&sections, &header);
    if let Some(dir) = args.out.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("{report}");
    eprintln!("wrote {} in {elapsed:?}", args.out.display());
    drop(etcds);
    drop(cluster);
    Ok(())
}

fn which(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_else(|| "n/a".into())
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
