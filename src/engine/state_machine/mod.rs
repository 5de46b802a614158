//! dcoord's d-engine state machine: every node's key/value state in one redb file.
//!
//! It replaces d-engine 0.2.4's `FileStateMachine`, which re-applies entries after a crash (a
//! CAS applied twice can succeed the second time), loses replayed entries on a second crash,
//! drops empty values and keeps its snapshot metadata only in memory.
//!
//! # Guarantees
//! - **State and applied index move together.** One redb write transaction per `apply_chunk`
//!   holds the key changes, the new applied `(index, term)`, the term boundaries, the results of
//!   the chunk's CASes and the TTL bookkeeping. redb commits are atomic and checksummed, so the
//!   file always holds the state of exactly one applied index.
//! - **Crash argument.** Commits are not fsynced one by one: an apply commits with
//!   `Durability::None`, and a durable commit follows at most [`DURABLE_EVERY`] later (at the
//!   next apply), before every snapshot is taken, before a snapshot is installed and at `stop`.
//!   A durable redb commit persists every commit before it. After a crash the file therefore
//!   holds the state of some applied index `A ≤` the last applied one, with `A ≥` the index of
//!   the last snapshot this node took. d-engine purges its raft log only up to a snapshot's
//!   `last_included`, which is at most the applied index that snapshot's durable commit covered.
//!   So the log still holds every entry after `A`, and d-engine re-applies them from
//!   [`StateMachine::last_applied`] `+ 1`: committed entries replay to the same state.
//! - **A re-sent entry is never applied twice.** Entries at or below the applied index are
//!   skipped. Each is reported with the result it had the first time: every put, delete and noop
//!   succeeded, and a CAS's first result is kept for [`CAS_RESULT_SLOTS`] entries (in the file,
//!   and in snapshots). d-engine answers a client from the FIRST result of its entry (the
//!   leader's pending map is emptied by it) and emits watch events from every result, so a CAS
//!   that failed stays failed and produces no event when re-sent. A skipped CAS older than the
//!   ring reports failure (no client waits on it any more; no duplicate event).
//! - **No silent gap.** The first entry above the applied index must be `applied + 1` and the
//!   rest consecutive. Otherwise `apply_chunk` fails with an error naming the indexes, nothing
//!   of the chunk is applied, d-engine stops the node, and [`RedbStateMachine::failure`]
//!   reports why. The one legitimate jump, right after a snapshot install (d-engine's handler
//!   does not move its own applied index then, and resends from below the snapshot), is covered
//!   by the skip rule: the installed state carries its real applied index.
//! - **A re-sent entry with another term** than the one this node applied at its index (logs
//!   that diverged) is refused the same way.
//! - **Snapshots** are a dump of one read transaction, carrying that transaction's applied index
//!   (not d-engine's label, which is `retained_log_entries` lower). Installing one builds a new
//!   file, fsyncs it, renames it over the live one and fsyncs the directory: a crash leaves the
//!   old state or the new one. Snapshot metadata is stored in the file, so a restart does not
//!   take a snapshot at once.
//! - **TTL** is decided by a replicated clock, the same on every replica. A key written with a
//!   TTL starts its countdown at the first clock tick applied after it; the tick with time `≥`
//!   start `+ ttl` deletes it, in the tick's own transaction, with no watch event. Ticks are
//!   ordinary Raft writes of [`TICK_KEY`], proposed once a second by the leader while any TTL
//!   key exists (see `run_clock`). A TTL is never a poison pill: nothing here depends on
//!   d-engine's lease settings.
//!
//! # NOT guaranteed
//! - An expired key stays readable until the next tick (up to about a second, longer while the
//!   cluster has no leader). Ticks are the leader's wall clock, kept monotonic: a new leader
//!   whose clock runs ahead of the old one's expires keys early by the difference.
//! - A plain put of a key that has a TTL keeps the TTL (d-engine 0.2.4's semantics); a delete
//!   clears it.
//! - This type cannot fix a raft log that lost entries (d-engine 0.2.4's replication hole): it
//!   turns it into a node that stops loudly instead of one that diverges silently.
//! - Only this format is read. A data directory of d-engine's `FileStateMachine` is refused
//!   (see `open_state_machine`).
//!
//! # Failure modes
//! - A gap, an unordered chunk or a term mismatch: `apply_chunk` fails, the node stops, and
//!   every restart stops again until the raft log is repaired (or the node's data dir is wiped
//!   and it catches up from the leader).
//! - A corrupt or foreign snapshot: the install fails, the live state is untouched, the leader
//!   retries.
//! - I/O errors: the transaction rolls back and `apply_chunk` fails (the node stops).

mod apply;
mod codec;
mod digest;
mod machine;
mod snapshot;
mod util;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use d_engine_core::Error;
use d_engine_proto::common::LogId;
use d_engine_proto::server::storage::SnapshotMetadata;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use tokio::sync::watch;
use tracing::{error, info};

pub use self::digest::DIGEST_HISTORY;

use self::codec::{begin, create_tables, read_applied};
use self::digest::{Digests, Fnv, fnv1a, pair_hash, state_xor};
use self::snapshot::{encode_snapshot_meta, read_snapshot_meta};
use self::util::{Ctx, lock, path_err, remove_if_exists, sm_err};

// Only for the module docs' link to `StateMachine::last_applied` (the impl is in `machine.rs`).
#[cfg(doc)]
use d_engine_core::StateMachine;

/// The key clock ticks are written to (its value: unix milliseconds, 8 bytes big-endian). It
/// starts with a NUL byte, which dcoord's key rules refuse, so no user key can collide. The
/// state machine does not store it; a watch on the empty prefix sees its events.
pub const TICK_KEY: &[u8] = b"\0dcoord/clock";
/// The longest time an applied chunk stays non-durable (until the next apply).
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How many recent CAS results are kept to answer a re-sent CAS.
pub const CAS_RESULT_SLOTS: u64 = 65_536;

const DB_FILE: &str = "state.redb";
const INCOMING_FILE: &str = "state.redb.incoming";
/// The one file a snapshot directory holds.
const SNAPSHOT_FILE: &str = "dcoord-state.dump";
const FORMAT: &[u8] = b"dcoord-sm-1";
const DUMP_MAGIC: &[u8; 8] = b"DCSMDMP1";

type BytesTable = TableDefinition<'static, &'static [u8], &'static [u8]>;
/// User keys and values.
const KV: BytesTable = TableDefinition::new("kv");
/// Key with a TTL whose countdown has not started (no tick since it was written) → ttl secs.
const TTL_PENDING: BytesTable = TableDefinition::new("ttl_pending");
/// Key with a running countdown → deadline (clock ms).
const TTL_DEADLINE: BytesTable = TableDefinition::new("ttl_deadline");
/// (deadline ms ‖ key) → empty: the expiry order.
const TTL_DUE: BytesTable = TableDefinition::new("ttl_due");
/// First index of a term → the term.
const TERMS: BytesTable = TableDefinition::new("terms");
/// (index mod CAS_RESULT_SLOTS) → (index ‖ succeeded).
const CAS_RESULTS: BytesTable = TableDefinition::new("cas_results");
/// `format`, `applied` (index ‖ term), `clock` (ms), `snapshot` (metadata).
const META: BytesTable = TableDefinition::new("meta");
/// Every table, in dump order. A dump record names its table by position here.
const TABLES: [BytesTable; 7] = [
    KV,
    TTL_PENDING,
    TTL_DEADLINE,
    TTL_DUE,
    TERMS,
    CAS_RESULTS,
    META,
];

const META_FORMAT: &[u8] = b"format";
const META_APPLIED: &[u8] = b"applied";
const META_CLOCK: &[u8] = b"clock";
const META_SNAPSHOT: &[u8] = b"snapshot";

/// One replica's replicated state at one applied index ([`RedbStateMachine::replica_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// The last applied raft index.
    pub applied_index: u64,
    /// The term of that entry.
    pub applied_term: u64,
    /// Every key with the 64-bit FNV-1a hash of its value, in key order.
    pub entries: Vec<(Vec<u8>, u64)>,
    /// The state digest recomputed from the table: XOR over every key of FNV-1a of the key
    /// and its value (what [`RedbStateMachine::digests`] maintains incrementally).
    pub kv_xor: u64,
    /// FNV-1a over the TTL tables and the replicated clock.
    pub ttl_digest: u64,
}

/// The redb-backed state machine. Clones share one database.
#[derive(Clone)]
pub struct RedbStateMachine {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The live database, swapped only by a snapshot install. Readers clone the `Arc` for the
    /// length of their transaction.
    db: RwLock<Arc<Database>>,
    /// Serialises writers: apply, install, metadata, reset.
    write: Mutex<Writer>,
    applied: Mutex<LogId>,
    /// The state's digest and its recent history (see [`RedbStateMachine::digests`]).
    digests: Mutex<Digests>,
    snapshot: RwLock<Option<SnapshotMetadata>>,
    running: AtomicBool,
    /// Why this state machine refused to go on (first failure), for the node to report.
    failure: watch::Sender<Option<String>>,
}

struct Writer {
    last_durable: Instant,
    /// A non-durable commit happened since the last durable one.
    dirty: bool,
}

impl fmt::Debug for RedbStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStateMachine")
            .field("dir", &self.inner.dir)
            .field("applied", &*lock(&self.inner.applied))
            .finish_non_exhaustive()
    }
}

/// Opens the state machine of a node's data directory (`<data_dir>/state`).
///
/// # Errors
/// A directory written by d-engine's `FileStateMachine` (dcoord before this format) is refused
/// with an error that says how to migrate; redb errors otherwise.
pub(crate) async fn open_state_machine(data_dir: &Path) -> crate::Result<RedbStateMachine> {
    let old = data_dir.join("state_machine");
    let dir = data_dir.join("state");
    if old.exists() && !dir.join(DB_FILE).exists() {
        return Err(crate::Error::Config(format!(
            "{data_dir:?} holds d-engine's FileStateMachine data ({old:?}), written by an older \
             dcoord; this dcoord stores state in {dir:?} and does not read the old format. A \
             node of a cluster: stop it, move its data directory away, start it again; it \
             catches up from the leader. A single node: read the keys out with the older dcoord \
             (or with `dcoord` against it over gRPC), start afresh in a new directory, write \
             them back."
        )));
    }
    RedbStateMachine::open(dir).await.map_err(|e| {
        crate::Error::Config(format!(
            "cannot open the state machine in {data_dir:?}: {e}"
        ))
    })
}

impl RedbStateMachine {
    /// Opens (or creates) the state machine in `dir`.
    ///
    /// # Errors
    /// I/O errors, a file redb cannot open, or a file of another format.
    ///
    /// # Cancel safety
    /// The work runs on tokio's blocking pool and finishes even if the future is dropped.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(dir)).await?
    }

    fn open_blocking(dir: PathBuf) -> Result<Self, Error> {
        fs::create_dir_all(&dir).map_err(|e| path_err(&dir, e))?;
        // Left by an install that crashed before its rename; the live file is intact.
        remove_if_exists(&dir.join(INCOMING_FILE))?;
        let db = Database::create(dir.join(DB_FILE)).ctx("open the state machine database")?;
        let txn = begin(&db, true)?;
        create_tables(&txn)?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            let format = meta
                .get(META_FORMAT)
                .ctx("read format")?
                .map(|g| g.value().to_vec());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT).ctx("write format")?;
                }
                Some(f) if f == FORMAT => {}
                Some(f) => {
                    return Err(sm_err(format!(
                        "{dir:?} holds state machine format {:?}; this dcoord reads {:?}",
                        String::from_utf8_lossy(&f),
                        String::from_utf8_lossy(FORMAT)
                    )));
                }
            }
        }
        txn.commit().ctx("commit schema")?;
        let (applied, snapshot) = {
            let txn = db.begin_read().ctx("begin_read")?;
            let meta = txn.open_table(META).ctx("open meta")?;
            (read_applied(&meta)?, read_snapshot_meta(&meta)?)
        };
        let digest = state_xor(&db)?;
        info!(?dir, ?applied, ?snapshot, "state machine opened");
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                db: RwLock::new(Arc::new(db)),
                write: Mutex::new(Writer {
                    last_durable: Instant::now(),
                    dirty: false,
                }),
                applied: Mutex::new(applied),
                digests: Mutex::new(Digests::new(applied.index, digest)),
                snapshot: RwLock::new(snapshot),
                running: AtomicBool::new(true),
                failure: watch::channel(None).0,
            }),
        })
    }

    /// Why this state machine refused a chunk (a gap, a term mismatch, an I/O error), once it
    /// has; `None` while it runs. d-engine stops the node at that point.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.inner.failure.subscribe()
    }

    /// Whether any key has a TTL (so the clock must tick).
    pub fn has_ttl_keys(&self) -> bool {
        self.inner
            .read(|txn| {
                let pending = txn
                    .open_table(TTL_PENDING)
                    .ctx("open ttl")?
                    .len()
                    .ctx("len")?;
                let running = txn
                    .open_table(TTL_DEADLINE)
                    .ctx("open ttl")?
                    .len()
                    .ctx("len")?;
                Ok(pending + running > 0)
            })
            .unwrap_or(false)
    }

    /// Makes every applied chunk durable now.
    ///
    /// # Errors
    /// redb errors.
    pub fn sync(&self) -> Result<(), Error> {
        let mut w = lock(&self.inner.write);
        self.inner.sync_locked(&mut w)
    }

    /// The state digest (XOR over every key of a 64-bit hash of the key and its value) after
    /// each of the last [`DIGEST_HISTORY`] applied entries, as (index, digest), oldest first.
    /// Replicas that applied the same entries have the same digest at each index, so two
    /// replicas can be compared while writes go on, at any index both still remember.
    pub fn digests(&self) -> Vec<(u64, u64)> {
        lock(&self.inner.digests).history.iter().copied().collect()
    }

    /// This replica's replicated state, read in one transaction: the applied index and term,
    /// every key with a hash of its value (in key order), and a hash of the TTL bookkeeping
    /// and the replicated clock. Two replicas at the same applied index must agree on all of it.
    ///
    /// # Errors
    /// redb errors.
    pub fn replica_state(&self) -> Result<ReplicaState, Error> {
        self.inner.read(|txn| {
            let meta = txn.open_table(META).ctx("open meta")?;
            let applied = read_applied(&meta)?;
            let kv = txn.open_table(KV).ctx("open kv")?;
            let mut entries = Vec::new();
            let mut kv_xor = 0;
            for item in kv.iter().ctx("iterate kv")? {
                let (k, v) = item.ctx("iterate kv")?;
                kv_xor ^= pair_hash(k.value(), v.value());
                entries.push((k.value().to_vec(), fnv1a(&[v.value()])));
            }
            let mut ttl = Fnv::default();
            for table in [TTL_PENDING, TTL_DEADLINE] {
                for item in txn
                    .open_table(table)
                    .ctx("open ttl")?
                    .iter()
                    .ctx("iterate ttl")?
                {
                    let (k, v) = item.ctx("iterate ttl")?;
                    ttl.write(k.value());
                    ttl.write(v.value());
                }
            }
            if let Some(clock) = meta.get(META_CLOCK).ctx("read clock")? {
                ttl.write(clock.value());
            }
            Ok(ReplicaState {
                applied_index: applied.index,
                applied_term: applied.term,
                entries,
                kv_xor,
                ttl_digest: ttl.0,
            })
        })
    }
}

impl Inner {
    fn db(&self) -> Arc<Database> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T, Error>) -> Result<T, Error> {
        let db = self.db();
        let txn = db.begin_read().ctx("begin_read")?;
        f(&txn)
    }

    fn fail(&self, e: Error) -> Error {
        let message = e.to_string();
        error!(dir = ?self.dir, "state machine stops the node: {message}");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message);
                true
            } else {
                false
            }
        });
        e
    }

    fn sync_locked(&self, w: &mut Writer) -> Result<(), Error> {
        if w.dirty {
            let txn = begin(&self.db(), true)?;
            txn.commit().ctx("durable commit")?;
            w.dirty = false;
        }
        w.last_durable = Instant::now();
        Ok(())
    }

    fn store_snapshot_meta(&self, meta: &SnapshotMetadata) -> Result<(), Error> {
        let mut w = lock(&self.write);
        let txn = begin(&self.db(), true)?;
        txn.open_table(META)
            .ctx("open meta")?
            .insert(META_SNAPSHOT, encode_snapshot_meta(meta).as_slice())
            .ctx("write snapshot metadata")?;
        txn.commit().ctx("commit snapshot metadata")?;
        w.dirty = false;
        w.last_durable = Instant::now();
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(meta.clone());
        Ok(())
    }

    fn reset(&self) -> Result<(), Error> {
        let mut w = lock(&self.write);
        let txn = begin(&self.db(), true)?;
        for table in TABLES {
            txn.delete_table(table).ctx("delete table")?;
        }
        create_tables(&txn)?;
        txn.open_table(META)
            .ctx("open meta")?
            .insert(META_FORMAT, FORMAT)
            .ctx("write format")?;
        txn.commit().ctx("commit reset")?;
        w.dirty = false;
        *lock(&self.applied) = LogId { index: 0, term: 0 };
        *lock(&self.digests) = Digests::new(0, 0);
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }
}

/// Proposes a clock tick once a second while any key has a TTL, until the task is aborted.
/// `tick` writes [`TICK_KEY`] (the caller decides whether this node should: the leader); an
/// error is logged and the next second tries again.
pub(crate) async fn run_clock<F, Fut>(sm: RedbStateMachine, mut tick: F)
where
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !sm.has_ttl_keys() {
            continue;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Err(e) = tick(Bytes::copy_from_slice(&now.to_be_bytes())).await {
            tracing::debug!(error = %e, "clock tick not written");
        }
    }
}

#[cfg(test)]
mod tests;
