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
//!   key exists (see [`run_clock`]). A TTL is never a poison pill: nothing here depends on
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
//!   (see [`open_state_machine`]).
//!
//! # Failure modes
//! - A gap, an unordered chunk or a term mismatch: `apply_chunk` fails, the node stops, and
//!   every restart stops again until the raft log is repaired (or the node's data dir is wiped
//!   and it catches up from the leader).
//! - A corrupt or foreign snapshot: the install fails, the live state is untouched, the leader
//!   retries.
//! - I/O errors: the transaction rolls back and `apply_chunk` fails (the node stops).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use d_engine_core::{
    ApplyEntry, ApplyResult, Command, Error, ScanResult, StateMachine, StorageError,
};
use d_engine_proto::common::LogId;
use d_engine_proto::server::storage::SnapshotMetadata;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

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

/// 64-bit FNV-1a over length-prefixed parts (so ("ab","c") and ("a","bc") differ).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, part: &[u8]) {
        for b in (part.len() as u64).to_be_bytes().iter().chain(part) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = Fnv::default();
    parts.iter().for_each(|p| h.write(p));
    h.0
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

    fn apply(&self, chunk: &[ApplyEntry]) -> Result<Vec<ApplyResult>, Error> {
        if chunk.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = lock(&self.write);
        if let Some(reason) = self.failure.borrow().clone() {
            return Err(Error::Fatal(format!(
                "the state machine stopped earlier: {reason}"
            )));
        }
        let durable = w.dirty && w.last_durable.elapsed() >= DURABLE_EVERY;
        let txn = begin(&self.db(), durable)?;
        let (results, applied, deltas) = match apply_in(&txn, chunk) {
            Ok(done) => done,
            Err(e) => return Err(self.fail(e)),
        };
        let Some(applied) = applied else {
            // Only re-sent entries: nothing changes.
            txn.abort().ctx("abort")?;
            return Ok(results);
        };
        txn.commit().ctx("commit apply").map_err(|e| self.fail(e))?;
        if durable {
            w.dirty = false;
            w.last_durable = Instant::now();
        } else {
            w.dirty = true;
        }
        *lock(&self.applied) = applied;
        let mut digests = lock(&self.digests);
        deltas.into_iter().for_each(|(i, d)| digests.push(i, d));
        Ok(results)
    }

    fn generate(&self, dir: &Path, label: LogId) -> Result<Bytes, Error> {
        // Durable first: d-engine purges its log up to `label` once this snapshot exists.
        self.sync_locked(&mut lock(&self.write))?;
        fs::create_dir_all(dir).map_err(|e| path_err(dir, e))?;
        let path = dir.join(SNAPSHOT_FILE);
        let (applied, checksum) = self.read(|txn| write_dump(txn, &path, label))?;
        sync_dir(dir)?;
        let meta = SnapshotMetadata {
            last_included: Some(label),
            checksum: checksum.clone(),
        };
        self.store_snapshot_meta(&meta)?;
        info!(?label, ?applied, "state machine snapshot written");
        Ok(checksum)
    }

    fn install(&self, metadata: &SnapshotMetadata, dir: &Path) -> Result<(), Error> {
        let mut w = lock(&self.write);
        let dump = dir.join(SNAPSHOT_FILE);
        let file = File::open(&dump).map_err(|e| path_err(&dump, e))?;
        let mut r = CrcReader::new(BufReader::new(file));
        let applied = read_dump_header(&mut r, &dump)?;
        if let Some(label) = metadata.last_included
            && label.index > applied.index
        {
            return Err(sm_err(format!(
                "snapshot {dump:?} is labelled {label:?} but holds entries only up to {applied:?}"
            )));
        }
        let current = *lock(&self.applied);
        if applied.index <= current.index {
            // Committed entries are the same everywhere: our state already contains it.
            info!(?current, snapshot = ?applied, "snapshot is not newer than the state; kept");
            drop(w);
            let label = |m: &SnapshotMetadata| m.last_included.map_or(0, |id| id.index);
            let ours = self
                .snapshot
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if ours.is_some_and(|o| label(&o) >= label(metadata)) {
                return Ok(());
            }
            return self.store_snapshot_meta(metadata);
        }
        self.sync_locked(&mut w)?;
        let incoming = self.dir.join(INCOMING_FILE);
        remove_if_exists(&incoming)?;
        if let Err(e) = build_from_dump(&incoming, &mut r, &dump, metadata) {
            let _ = fs::remove_file(&incoming);
            return Err(e);
        }
        let live = self.dir.join(DB_FILE);
        fs::rename(&incoming, &live).map_err(|e| path_err(&live, e))?;
        sync_dir(&self.dir)?;
        let db = Database::open(&live)
            .ctx("reopen after a snapshot install")
            .map_err(|e| self.fail(e))?;
        let digest = state_xor(&db).map_err(|e| self.fail(e))?;
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(db);
        *lock(&self.applied) = applied;
        *lock(&self.digests) = Digests::new(applied.index, digest);
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(metadata.clone());
        info!(?applied, label = ?metadata.last_included, "snapshot installed");
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

/// Applies a chunk inside `txn`. Returns the results and the new applied id (`None` when every
/// entry was a re-send).
fn apply_in(txn: &WriteTransaction, chunk: &[ApplyEntry]) -> Result<Applied, Error> {
    let mut meta = txn.open_table(META).ctx("open meta")?;
    let applied = read_applied(&meta)?;
    let first_new = plan_chunk(chunk, applied.index)?;
    let mut terms = txn.open_table(TERMS).ctx("open terms")?;
    let mut cas = txn.open_table(CAS_RESULTS).ctx("open cas results")?;
    let mut results = Vec::with_capacity(chunk.len());
    for entry in &chunk[..first_new] {
        if let Some(term) = term_at(&terms, entry.index)?
            && term != entry.term
        {
            return Err(Error::Fatal(format!(
                "state machine: entry {} is re-sent with term {}, but this node applied index {} \
                 in term {term} (the raft logs diverged)",
                entry.index, entry.term, entry.index
            )));
        }
        let succeeded = match entry.command {
            Command::CompareAndSwap { .. } => {
                let slot = cas
                    .get(u64_key(entry.index % CAS_RESULT_SLOTS).as_slice())
                    .ctx("read cas result")?;
                slot.is_some_and(|g| {
                    let v = g.value();
                    v.len() == 9 && be_u64(&v[..8]) == entry.index && v[8] == 1
                })
            }
            _ => true,
        };
        results.push(ApplyResult {
            index: entry.index,
            succeeded,
        });
    }
    let fresh = &chunk[first_new..];
    let Some(last) = fresh.last() else {
        return Ok((results, None, Vec::new()));
    };
    let mut deltas = Vec::with_capacity(fresh.len());
    let mut kv = Tables::open(txn)?;
    let mut prev_term = applied.term;
    for entry in fresh {
        if entry.term < prev_term {
            return Err(Error::Fatal(format!(
                "state machine refuses entry {}: its term {} is below the term {prev_term} of the \
                 entry before it",
                entry.index, entry.term
            )));
        }
        if entry.term != prev_term {
            terms
                .insert(
                    u64_key(entry.index).as_slice(),
                    u64_key(entry.term).as_slice(),
                )
                .ctx("record a term")?;
            prev_term = entry.term;
        }
        let succeeded = kv.apply(&mut meta, &entry.command)?;
        deltas.push((entry.index, std::mem::take(&mut kv.delta)));
        if matches!(entry.command, Command::CompareAndSwap { .. }) {
            let mut v = u64_key(entry.index).to_vec();
            v.push(u8::from(succeeded));
            cas.insert(
                u64_key(entry.index % CAS_RESULT_SLOTS).as_slice(),
                v.as_slice(),
            )
            .ctx("record a cas result")?;
        }
        results.push(ApplyResult {
            index: entry.index,
            succeeded,
        });
    }
    let id = LogId {
        index: last.index,
        term: last.term,
    };
    meta.insert(META_APPLIED, encode_log_id(id).as_slice())
        .ctx("record the applied index")?;
    Ok((results, Some(id), deltas))
}

/// What [`apply_in`] did: the results, the new applied id (`None` when every entry was a
/// re-send), and each fresh entry's change to the state digest.
type Applied = (Vec<ApplyResult>, Option<LogId>, Vec<(u64, u64)>);

/// How many (index, digest) pairs a state machine remembers.
pub const DIGEST_HISTORY: usize = 4096;

/// The digest of the state (XOR of [`pair_hash`] over every key) and its value after each of
/// the last [`DIGEST_HISTORY`] applied entries. Kept in memory: rebuilt from the table at open
/// and after an install.
struct Digests {
    current: u64,
    history: std::collections::VecDeque<(u64, u64)>,
}

impl Digests {
    fn new(applied: u64, digest: u64) -> Self {
        let mut history = std::collections::VecDeque::with_capacity(DIGEST_HISTORY);
        history.push_back((applied, digest));
        Self {
            current: digest,
            history,
        }
    }

    fn push(&mut self, index: u64, delta: u64) {
        self.current ^= delta;
        if self.history.len() == DIGEST_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((index, self.current));
    }
}

/// The hash of one (key, value) pair in the state digest.
fn pair_hash(key: &[u8], value: &[u8]) -> u64 {
    fnv1a(&[key, value])
}

/// XOR of [`pair_hash`] over every key of `db`.
fn state_xor(db: &Database) -> Result<u64, Error> {
    let txn = db.begin_read().ctx("begin_read")?;
    let kv = txn.open_table(KV).ctx("open kv")?;
    let mut x = 0;
    for item in kv.iter().ctx("iterate kv")? {
        let (k, v) = item.ctx("iterate kv")?;
        x ^= pair_hash(k.value(), v.value());
    }
    Ok(x)
}

/// Checks a chunk against the applied index; returns the position of its first new entry.
///
/// Indexes strictly increase. Entries at or below `applied` are re-sends (with holes allowed
/// between them: after a snapshot install d-engine resends from below it). The first entry
/// above `applied` is `applied + 1` and the rest follow one by one.
fn plan_chunk(chunk: &[ApplyEntry], applied: u64) -> Result<usize, Error> {
    let range = || format!("{}..={}", chunk[0].index, chunk[chunk.len() - 1].index);
    let mut first_new = chunk.len();
    for (pos, entry) in chunk.iter().enumerate() {
        let index = entry.index;
        let prev = pos.checked_sub(1).map(|p| chunk[p].index);
        if let Some(p) = prev
            && index <= p
        {
            return Err(Error::Fatal(format!(
                "state machine refuses an unordered chunk {}: entry {index} follows entry {p}",
                range()
            )));
        }
        if index <= applied {
            continue;
        }
        let expected = if first_new == chunk.len() {
            first_new = pos;
            applied + 1
        } else {
            prev.expect("not the first new entry") + 1
        };
        if index != expected {
            return Err(Error::Fatal(format!(
                "state machine gap: applied index {applied}, chunk {}: entries {expected}..={} \
                 are missing (a hole in the raft log). Refusing to apply; the node stops",
                range(),
                index - 1
            )));
        }
    }
    Ok(first_new)
}

/// The tables one command touches.
struct Tables<'t> {
    kv: redb::Table<'t, &'static [u8], &'static [u8]>,
    /// XOR of the pair hashes removed and added since it was last taken.
    delta: u64,
    pending: redb::Table<'t, &'static [u8], &'static [u8]>,
    deadline: redb::Table<'t, &'static [u8], &'static [u8]>,
    due: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, Error> {
        Ok(Self {
            kv: txn.open_table(KV).ctx("open kv")?,
            delta: 0,
            pending: txn.open_table(TTL_PENDING).ctx("open ttl")?,
            deadline: txn.open_table(TTL_DEADLINE).ctx("open ttl")?,
            due: txn.open_table(TTL_DUE).ctx("open ttl")?,
        })
    }

    /// Applies one command; returns whether it succeeded. Semantics of d-engine 0.2.4's
    /// FileStateMachine, except that empty values are kept and TTL follows the replicated clock.
    fn apply(
        &mut self,
        meta: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
        command: &Command,
    ) -> Result<bool, Error> {
        match command {
            Command::Noop => Ok(true),
            Command::Insert { key, value, .. } if &key[..] == TICK_KEY => {
                let tick = if value.len() == 8 { be_u64(value) } else { 0 };
                self.tick(meta, tick)?;
                Ok(true)
            }
            Command::Insert {
                key,
                value,
                ttl_secs,
            } => {
                self.put(key, value)?;
                if let Some(secs) = ttl_secs.filter(|s| *s > 0) {
                    self.clear_ttl(key)?;
                    self.pending
                        .insert(&key[..], u64_key(secs).as_slice())
                        .ctx("insert ttl")?;
                }
                Ok(true)
            }
            Command::Delete { key } => {
                self.remove(key)?;
                self.clear_ttl(key)?;
                Ok(true)
            }
            Command::CompareAndSwap {
                key,
                expected,
                value,
            } => {
                let matches = {
                    let current = self.kv.get(&key[..]).ctx("read for cas")?;
                    match (current.as_ref().map(|g| g.value()), expected.as_deref()) {
                        (Some(cur), Some(exp)) => cur == exp,
                        (None, None) => true,
                        _ => false,
                    }
                };
                if matches {
                    self.put(key, value)?;
                }
                Ok(matches)
            }
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let old = self.kv.insert(key, value).ctx("insert")?;
        if let Some(old) = old {
            self.delta ^= pair_hash(key, old.value());
        }
        self.delta ^= pair_hash(key, value);
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<(), Error> {
        if let Some(old) = self.kv.remove(key).ctx("delete")? {
            self.delta ^= pair_hash(key, old.value());
        }
        Ok(())
    }

    fn clear_ttl(&mut self, key: &[u8]) -> Result<(), Error> {
        self.pending.remove(key).ctx("remove ttl")?;
        let old = self
            .deadline
            .remove(key)
            .ctx("remove ttl")?
            .map(|g| be_u64(g.value()));
        if let Some(deadline) = old {
            self.due
                .remove(due_key(deadline, key).as_slice())
                .ctx("remove ttl")?;
        }
        Ok(())
    }

    /// Advances the replicated clock to `tick` (never backwards), starts the countdown of the
    /// keys written since the last tick and deletes the keys whose deadline has come.
    fn tick(
        &mut self,
        meta: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
        tick: u64,
    ) -> Result<(), Error> {
        let old = meta
            .get(META_CLOCK)
            .ctx("read clock")?
            .map(|g| be_u64(g.value()))
            .unwrap_or(0);
        let now = old.max(tick);
        meta.insert(META_CLOCK, u64_key(now).as_slice())
            .ctx("write clock")?;
        let started: Vec<(Vec<u8>, u64)> = self
            .pending
            .iter()
            .ctx("read ttl")?
            .map(|item| item.map(|(k, v)| (k.value().to_vec(), be_u64(v.value()))))
            .collect::<Result<_, _>>()
            .ctx("read ttl")?;
        for (key, secs) in started {
            let deadline = now.saturating_add(secs.saturating_mul(1000));
            self.pending.remove(key.as_slice()).ctx("start ttl")?;
            self.deadline
                .insert(key.as_slice(), u64_key(deadline).as_slice())
                .ctx("start ttl")?;
            self.due
                .insert(due_key(deadline, &key).as_slice(), &[][..])
                .ctx("start ttl")?;
        }
        let upto = due_key(now, &[0xff; 1]);
        let expired: Vec<Vec<u8>> = self
            .due
            .range(..upto.as_slice())
            .ctx("read ttl")?
            .map(|item| item.map(|(k, _)| k.value().to_vec()))
            .collect::<Result<_, _>>()
            .ctx("read ttl")?;
        for due in expired {
            if be_u64(&due[..8]) > now {
                continue;
            }
            let key = &due[8..];
            self.due.remove(due.as_slice()).ctx("expire")?;
            self.deadline.remove(key).ctx("expire")?;
            self.remove(key)?;
        }
        Ok(())
    }
}

#[async_trait]
impl StateMachine for RedbStateMachine {
    async fn start(&self) -> Result<(), Error> {
        self.inner.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) -> Result<(), Error> {
        self.inner.running.store(false, Ordering::SeqCst);
        self.sync()
    }

    fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::SeqCst)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.inner.read(|txn| {
            let kv = txn.open_table(KV).ctx("open kv")?;
            Ok(kv
                .get(key)
                .ctx("get")?
                .map(|g| Bytes::copy_from_slice(g.value())))
        })
    }

    fn entry_term(&self, index: u64) -> Option<u64> {
        if index == 0 || index > lock(&self.inner.applied).index {
            return None;
        }
        self.inner
            .read(|txn| term_at(&txn.open_table(TERMS).ctx("open terms")?, index))
            .unwrap_or_else(|e| {
                warn!(%e, index, "entry_term: read failed");
                None
            })
    }

    /// d-engine 0.2.4 calls this from its own `sm-apply` OS thread, one chunk at a time, so
    /// the blocking commit runs inline.
    async fn apply_chunk(&self, chunk: &[ApplyEntry]) -> Result<Vec<ApplyResult>, Error> {
        self.inner.apply(chunk)
    }

    fn len(&self) -> usize {
        self.inner
            .read(|txn| txn.open_table(KV).ctx("open kv")?.len().ctx("len"))
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(0)
    }

    /// The applied index is part of the committed state; an outside update is ignored (d-engine
    /// 0.2.4 never calls this).
    fn update_last_applied(&self, _last_applied: LogId) {}

    fn last_applied(&self) -> LogId {
        *lock(&self.inner.applied)
    }

    fn persist_last_applied(&self, _last_applied: LogId) -> Result<(), Error> {
        Ok(())
    }

    fn update_last_snapshot_metadata(&self, metadata: &SnapshotMetadata) -> Result<(), Error> {
        self.inner.store_snapshot_meta(metadata)
    }

    fn snapshot_metadata(&self) -> Option<SnapshotMetadata> {
        self.inner
            .snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn persist_last_snapshot_metadata(&self, metadata: &SnapshotMetadata) -> Result<(), Error> {
        self.inner.store_snapshot_meta(metadata)
    }

    async fn apply_snapshot_from_file(
        &self,
        metadata: &SnapshotMetadata,
        snapshot_dir: PathBuf,
    ) -> Result<(), Error> {
        let inner = self.inner.clone();
        let metadata = metadata.clone();
        tokio::task::spawn_blocking(move || inner.install(&metadata, &snapshot_dir)).await?
    }

    async fn generate_snapshot_data(
        &self,
        snapshot_dir: PathBuf,
        last_included: LogId,
    ) -> Result<Bytes, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.generate(&snapshot_dir, last_included)).await?
    }

    fn save_hard_state(&self) -> Result<(), Error> {
        self.sync()
    }

    fn flush(&self) -> Result<(), Error> {
        self.sync()
    }

    async fn flush_async(&self) -> Result<(), Error> {
        let sm = self.clone();
        tokio::task::spawn_blocking(move || sm.sync()).await?
    }

    async fn reset(&self) -> Result<(), Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.reset()).await?
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<ScanResult, Error> {
        self.inner.read(|txn| {
            let revision = read_applied(&txn.open_table(META).ctx("open meta")?)?.index;
            let kv = txn.open_table(KV).ctx("open kv")?;
            let mut entries = Vec::new();
            for item in kv.range(prefix..).ctx("scan")? {
                let (k, v) = item.ctx("scan")?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                entries.push((
                    Bytes::copy_from_slice(k.value()),
                    Bytes::copy_from_slice(v.value()),
                ));
            }
            Ok(ScanResult { entries, revision })
        })
    }

    /// Nothing expires outside Raft (replicas would diverge): see the module docs.
    async fn lease_background_cleanup(&self) -> Result<Vec<Bytes>, Error> {
        Ok(Vec::new())
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
            tracing::debug!("clock tick not written: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn begin(db: &Database, durable: bool) -> Result<WriteTransaction, Error> {
    let mut txn = db.begin_write().ctx("begin_write")?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .ctx("set durability")?;
    Ok(txn)
}

fn create_tables(txn: &WriteTransaction) -> Result<(), Error> {
    for table in TABLES {
        txn.open_table(table).ctx("create a table")?;
    }
    Ok(())
}

fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn be_u64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let n = b.len().min(8);
    raw[8 - n..].copy_from_slice(&b[..n]);
    u64::from_be_bytes(raw)
}

fn due_key(deadline: u64, key: &[u8]) -> Vec<u8> {
    let mut k = u64_key(deadline).to_vec();
    k.extend_from_slice(key);
    k
}

fn term_at<T: ReadableTable<&'static [u8], &'static [u8]>>(
    terms: &T,
    index: u64,
) -> Result<Option<u64>, Error> {
    let upto = u64_key(index);
    let mut range = terms.range(..=upto.as_slice()).ctx("read terms")?;
    match range.next_back() {
        None => Ok(None),
        Some(item) => Ok(Some(be_u64(item.ctx("read terms")?.1.value()))),
    }
}

fn encode_log_id(id: LogId) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&id.index.to_be_bytes());
    out[8..].copy_from_slice(&id.term.to_be_bytes());
    out
}

fn decode_log_id(b: &[u8]) -> Result<LogId, Error> {
    if b.len() != 16 {
        return Err(sm_err(format!("a log id of {} bytes, not 16", b.len())));
    }
    Ok(LogId {
        index: be_u64(&b[..8]),
        term: be_u64(&b[8..]),
    })
}

fn read_applied<T: ReadableTable<&'static [u8], &'static [u8]>>(meta: &T) -> Result<LogId, Error> {
    match meta.get(META_APPLIED).ctx("read the applied index")? {
        None => Ok(LogId { index: 0, term: 0 }),
        Some(g) => decode_log_id(g.value()),
    }
}

fn encode_snapshot_meta(meta: &SnapshotMetadata) -> Vec<u8> {
    let mut out = vec![u8::from(meta.last_included.is_some())];
    out.extend_from_slice(&encode_log_id(meta.last_included.unwrap_or_default()));
    out.extend_from_slice(&meta.checksum);
    out
}

fn read_snapshot_meta<T: ReadableTable<&'static [u8], &'static [u8]>>(
    meta: &T,
) -> Result<Option<SnapshotMetadata>, Error> {
    let Some(g) = meta.get(META_SNAPSHOT).ctx("read snapshot metadata")? else {
        return Ok(None);
    };
    let b = g.value();
    if b.len() < 17 {
        return Err(sm_err(format!("snapshot metadata of {} bytes", b.len())));
    }
    Ok(Some(SnapshotMetadata {
        last_included: (b[0] == 1).then(|| decode_log_id(&b[1..17])).transpose()?,
        checksum: Bytes::copy_from_slice(&b[17..]),
    }))
}

// ---------------------------------------------------------------------------------------------
// Snapshot dump: magic | applied (16) | label (16) | records | 0xFF | record count u64 | crc32.
// A record: table position u8 | key len u64 | key | value len u64 | value. Big-endian.

fn write_dump(txn: &ReadTransaction, path: &Path, label: LogId) -> Result<(LogId, Bytes), Error> {
    let applied = read_applied(&txn.open_table(META).ctx("open meta")?)?;
    if label.index > applied.index {
        return Err(sm_err(format!(
            "snapshot label {label:?} is beyond the applied {applied:?}"
        )));
    }
    let file = File::create(path).map_err(|e| path_err(path, e))?;
    let mut w = CrcWriter {
        inner: BufWriter::new(file),
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(DUMP_MAGIC)?;
    w.write_all(&encode_log_id(applied))?;
    w.write_all(&encode_log_id(label))?;
    let mut count = 0u64;
    for (pos, table) in TABLES.iter().enumerate() {
        for item in txn
            .open_table(*table)
            .ctx("open a table")?
            .iter()
            .ctx("dump")?
        {
            let (k, v) = item.ctx("dump")?;
            if pos == TABLES.len() - 1 && k.value() == META_SNAPSHOT {
                continue; // the installer writes the metadata it is given
            }
            w.write_all(&[pos as u8])?;
            for part in [k.value(), v.value()] {
                w.write_all(&(part.len() as u64).to_be_bytes())?;
                w.write_all(part)?;
            }
            count += 1;
        }
    }
    w.write_all(&[0xFF])?;
    w.write_all(&count.to_be_bytes())?;
    let crc = w.crc.clone().finalize().to_be_bytes();
    let mut inner = w.inner;
    inner.write_all(&crc)?;
    let file = inner
        .into_inner()
        .map_err(|e| path_err(path, e.into_error()))?;
    file.sync_all().map_err(|e| path_err(path, e))?;
    Ok((applied, Bytes::copy_from_slice(&crc)))
}

fn read_dump_header<R: Read>(r: &mut CrcReader<R>, path: &Path) -> Result<LogId, Error> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| path_err(path, e))?;
    if &magic != DUMP_MAGIC {
        return Err(sm_err(format!(
            "{path:?} is not a dcoord state machine snapshot"
        )));
    }
    let mut ids = [0u8; 32];
    r.read_exact(&mut ids).map_err(|e| path_err(path, e))?;
    decode_log_id(&ids[..16])
}

fn build_from_dump<R: Read>(
    target: &Path,
    r: &mut CrcReader<R>,
    dump: &Path,
    metadata: &SnapshotMetadata,
) -> Result<(), Error> {
    let corrupt = |what: &str| sm_err(format!("snapshot {dump:?} is corrupt: {what}"));
    let db = Database::create(target).ctx("create the incoming database")?;
    let txn = begin(&db, true)?;
    create_tables(&txn)?;
    let mut count = 0u64;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(|_| corrupt("truncated"))?;
        if tag[0] == 0xFF {
            break;
        }
        let table = *TABLES
            .get(tag[0] as usize)
            .ok_or_else(|| corrupt("unknown table"))?;
        let mut parts = [Vec::new(), Vec::new()];
        for part in &mut parts {
            let mut len = [0u8; 8];
            r.read_exact(&mut len).map_err(|_| corrupt("truncated"))?;
            let len = u64::from_be_bytes(len);
            if len > 1 << 32 {
                return Err(corrupt("a record length beyond 4 GiB"));
            }
            part.resize(len as usize, 0);
            r.read_exact(part).map_err(|_| corrupt("truncated"))?;
        }
        txn.open_table(table)
            .ctx("open a table")?
            .insert(parts[0].as_slice(), parts[1].as_slice())
            .ctx("load")?;
        count += 1;
    }
    let mut expected = [0u8; 8];
    r.read_exact(&mut expected)
        .map_err(|_| corrupt("truncated"))?;
    let computed = r.crc.clone().finalize();
    let mut stored = [0u8; 4];
    r.inner
        .read_exact(&mut stored)
        .map_err(|_| corrupt("truncated"))?;
    if u32::from_be_bytes(stored) != computed {
        return Err(corrupt("checksum mismatch"));
    }
    if u64::from_be_bytes(expected) != count {
        return Err(corrupt("record count mismatch"));
    }
    if r.inner.read(&mut [0u8; 1]).map_err(|e| path_err(dump, e))? != 0 {
        return Err(corrupt("data after the end"));
    }
    txn.open_table(META)
        .ctx("open meta")?
        .insert(META_SNAPSHOT, encode_snapshot_meta(metadata).as_slice())
        .ctx("write snapshot metadata")?;
    txn.commit().ctx("commit the incoming database")?;
    drop(db);
    File::open(target)
        .and_then(|f| f.sync_all())
        .map_err(|e| path_err(target, e))
}

struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R> CrcReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and small helpers

fn sm_err(message: String) -> Error {
    Error::from(StorageError::StateMachineError(message))
}

fn path_err(path: &Path, e: io::Error) -> Error {
    sm_err(format!("{path:?}: {e}"))
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, Error>;
}

impl<T, E: fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| sm_err(format!("{what}: {e}")))
    }
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(path_err(path, e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| path_err(dir, e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn open(dir: &Path) -> RedbStateMachine {
        RedbStateMachine::open_blocking(dir.to_path_buf()).unwrap()
    }

    fn put(index: u64, key: &str, value: &str) -> ApplyEntry {
        entry(
            index,
            1,
            Command::Insert {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ttl_secs: None,
            },
        )
    }

    fn cas(index: u64, key: &str, expected: Option<&str>, value: &str) -> ApplyEntry {
        entry(
            index,
            1,
            Command::CompareAndSwap {
                key: Bytes::copy_from_slice(key.as_bytes()),
                expected: expected.map(|e| Bytes::copy_from_slice(e.as_bytes())),
                value: Bytes::copy_from_slice(value.as_bytes()),
            },
        )
    }

    fn entry(index: u64, term: u64, command: Command) -> ApplyEntry {
        ApplyEntry {
            index,
            term,
            command,
        }
    }

    fn apply(sm: &RedbStateMachine, chunk: &[ApplyEntry]) -> Result<Vec<bool>, Error> {
        Ok(sm
            .inner
            .apply(chunk)?
            .into_iter()
            .map(|r| r.succeeded)
            .collect())
    }

    fn value(sm: &RedbStateMachine, key: &str) -> Option<String> {
        sm.get(key.as_bytes())
            .unwrap()
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn a_re_sent_chunk_is_not_applied_again_and_keeps_its_first_results() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        let first = [
            put(1, "a", "1"),
            cas(2, "a", Some("1"), "2"),
            cas(3, "a", Some("1"), "3"),
        ];
        assert_eq!(apply(&sm, &first).unwrap(), [true, true, false]);
        // d-engine's commit handler hands overlapping ranges: 2..=3 again, then 4.
        let resent = [
            cas(2, "a", Some("1"), "2"),
            cas(3, "a", Some("1"), "3"),
            cas(4, "a", Some("2"), "4"),
        ];
        assert_eq!(apply(&sm, &resent).unwrap(), [true, false, true]);
        assert_eq!(value(&sm, "a").as_deref(), Some("4"));
        assert_eq!(sm.last_applied().index, 4);
        // Across a restart, too.
        sm.stop().unwrap();
        drop(sm);
        let sm = open(dir.path());
        assert_eq!(apply(&sm, &first[1..]).unwrap(), [true, false]);
        assert_eq!(value(&sm, "a").as_deref(), Some("4"));
    }

    #[test]
    fn a_gap_is_refused_with_the_missing_indexes_and_nothing_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        apply(&sm, &[put(1, "a", "1"), put(2, "a", "2")]).unwrap();
        let e = apply(&sm, &[put(5, "a", "5"), put(6, "b", "6")]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("entries 3..=4 are missing"), "{text}");
        assert!(sm.failure().borrow().as_deref().unwrap().contains("3..=4"));
        assert_eq!(value(&sm, "a").as_deref(), Some("2"));
        assert_eq!(value(&sm, "b"), None);
        // It stays stopped: even a contiguous chunk is refused now.
        assert!(apply(&sm, &[put(3, "a", "3")]).is_err());

        let sm = open(tempfile::tempdir().unwrap().path());
        let e = apply(&sm, &[put(1, "a", "1"), put(3, "a", "3")]).unwrap_err();
        assert!(e.to_string().contains("entries 2..=2 are missing"), "{e}");
        let sm = open(tempfile::tempdir().unwrap().path());
        apply(&sm, &[put(1, "a", "1"), put(2, "a", "2")]).unwrap();
        let e = apply(&sm, &[put(3, "a", "1"), put(1, "a", "3")]).unwrap_err();
        assert!(e.to_string().contains("unordered"), "{e}");
    }

    #[test]
    fn a_re_sent_entry_with_another_term_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        apply(&sm, &[put(1, "a", "1"), entry(2, 3, Command::Noop)]).unwrap();
        let e = apply(&sm, &[entry(2, 2, Command::Noop)]).unwrap_err();
        assert!(e.to_string().contains("diverged"), "{e}");
        assert_eq!(sm.entry_term(1), Some(1));
        assert_eq!(sm.entry_term(2), Some(3));
        assert_eq!(sm.entry_term(3), None);
    }

    #[test]
    fn sync_makes_every_applied_chunk_durable() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        for i in 1..=50 {
            apply(&sm, &[put(i, &format!("k{i}"), "v")]).unwrap();
        }
        sm.sync().unwrap();
        // The file as a crash right now would leave it.
        let copy = tempfile::tempdir().unwrap();
        fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
        let crashed = open(copy.path());
        assert_eq!(crashed.last_applied().index, 50);
        assert_eq!(value(&crashed, "k50").as_deref(), Some("v"));
    }

    #[test]
    fn empty_values_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        apply(&sm, &[put(1, "e", "")]).unwrap();
        assert_eq!(value(&sm, "e").as_deref(), Some(""));
        assert_eq!(apply(&sm, &[cas(2, "e", Some(""), "x")]).unwrap(), [true]);
    }

    fn ttl_put(index: u64, key: &str, secs: u64) -> ApplyEntry {
        entry(
            index,
            1,
            Command::Insert {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::from_static(b"v"),
                ttl_secs: Some(secs),
            },
        )
    }

    fn tick(index: u64, ms: u64) -> ApplyEntry {
        entry(
            index,
            1,
            Command::Insert {
                key: Bytes::from_static(TICK_KEY),
                value: Bytes::copy_from_slice(&ms.to_be_bytes()),
                ttl_secs: None,
            },
        )
    }

    #[test]
    fn ttl_counts_down_from_the_first_tick_after_the_write_and_expires_on_a_tick() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open(dir.path());
        assert!(!sm.has_ttl_keys());
        apply(
            &sm,
            &[ttl_put(1, "t", 2), ttl_put(2, "d", 2), put(3, "p", "x")],
        )
        .unwrap();
        assert!(sm.has_ttl_keys());
        // A clock that was stale (the cluster was down) starts no countdown before the write.
        apply(&sm, &[tick(4, 10_000)]).unwrap();
        apply(
            &sm,
            &[
                tick(5, 11_999),
                entry(
                    6,
                    1,
                    Command::Delete {
                        key: Bytes::from_static(b"d"),
                    },
                ),
            ],
        )
        .unwrap();
        assert_eq!(value(&sm, "t").as_deref(), Some("v"));
        // A plain put keeps the TTL; the tick key itself is never stored.
        apply(&sm, &[put(7, "t", "w"), tick(8, 5_000)]).unwrap();
        assert_eq!(value(&sm, "t").as_deref(), Some("w"));
        assert_eq!(sm.get(TICK_KEY).unwrap(), None);
        apply(&sm, &[tick(9, 12_000)]).unwrap();
        assert_eq!(value(&sm, "t"), None);
        assert_eq!(value(&sm, "p").as_deref(), Some("x"));
        assert!(!sm.has_ttl_keys(), "the deleted key's TTL went with it");
        // Zero means no TTL (d-engine's rule), never an error.
        apply(&sm, &[ttl_put(10, "z", 0), tick(11, 99_000)]).unwrap();
        assert_eq!(value(&sm, "z").as_deref(), Some("v"));
    }

    #[test]
    fn a_snapshot_carries_state_applied_index_ttls_and_cas_results() {
        let a = tempfile::tempdir().unwrap();
        let sm = open(a.path());
        apply(
            &sm,
            &[
                put(1, "a", "1"),
                cas(2, "a", Some("0"), "x"),
                ttl_put(3, "t", 5),
                put(4, "b", ""),
                tick(5, 1_000),
            ],
        )
        .unwrap();
        let label = LogId { index: 2, term: 1 };
        let snap = tempfile::tempdir().unwrap();
        let checksum = sm.inner.generate(snap.path(), label).unwrap();
        let meta = SnapshotMetadata {
            last_included: Some(label),
            checksum,
        };
        assert_eq!(sm.snapshot_metadata(), Some(meta.clone()));

        let b = tempfile::tempdir().unwrap();
        let other = open(b.path());
        other.inner.install(&meta, snap.path()).unwrap();
        assert_eq!(
            other.last_applied().index,
            5,
            "the dump's real applied index"
        );
        assert_eq!(value(&other, "a").as_deref(), Some("1"));
        assert_eq!(value(&other, "b").as_deref(), Some(""));
        // d-engine resends from below the snapshot: skipped, with the first CAS result.
        assert_eq!(
            apply(&other, &[cas(2, "a", Some("0"), "x"), put(6, "c", "6")]).unwrap(),
            [false, true]
        );
        apply(&other, &[tick(7, 6_000)]).unwrap();
        assert_eq!(value(&other, "t"), None, "the running countdown came along");
        drop(other);
        let other = open(b.path());
        assert_eq!(
            other.snapshot_metadata(),
            Some(meta.clone()),
            "metadata persisted"
        );
        assert_eq!(other.last_applied().index, 7);

        // A corrupt dump is refused and the live state is untouched.
        let dump = snap.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&dump).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x55;
        fs::write(&dump, &bytes).unwrap();
        let c = tempfile::tempdir().unwrap();
        let fresh = open(c.path());
        apply(&fresh, &[put(1, "keep", "me")]).unwrap();
        assert!(fresh.inner.install(&meta, snap.path()).is_err());
        assert_eq!(value(&fresh, "keep").as_deref(), Some("me"));
        assert_eq!(fresh.last_applied().index, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Apply this many new entries.
        Apply(Vec<ModelCommand>),
        /// Re-send the last `back` applied entries plus `fresh` new ones.
        Resend { back: u64, fresh: Vec<ModelCommand> },
        /// Drop the state machine and reopen it, after a sync or not (a crash).
        Restart { synced: bool },
    }

    #[derive(Debug, Clone)]
    enum ModelCommand {
        Put(u8, u8),
        Delete(u8),
        Cas(u8, Option<u8>, u8),
        Noop,
    }

    fn command(c: &ModelCommand) -> Command {
        let b = |n: u8| Bytes::copy_from_slice(&[b'a' + n]);
        match c {
            ModelCommand::Put(k, v) => Command::Insert {
                key: b(*k),
                value: b(*v),
                ttl_secs: None,
            },
            ModelCommand::Delete(k) => Command::Delete { key: b(*k) },
            ModelCommand::Cas(k, e, v) => Command::CompareAndSwap {
                key: b(*k),
                expected: e.map(b),
                value: b(*v),
            },
            ModelCommand::Noop => Command::Noop,
        }
    }

    fn model_command() -> impl Strategy<Value = ModelCommand> {
        prop_oneof![
            (0..3u8, 0..3u8).prop_map(|(k, v)| ModelCommand::Put(k, v)),
            (0..3u8).prop_map(ModelCommand::Delete),
            (0..3u8, proptest::option::of(0..3u8), 0..3u8)
                .prop_map(|(k, e, v)| ModelCommand::Cas(k, e, v)),
            Just(ModelCommand::Noop),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec(model_command(), 1..8).prop_map(Op::Apply),
            3 => (1..10u64, proptest::collection::vec(model_command(), 0..4))
                .prop_map(|(back, fresh)| Op::Resend { back, fresh }),
            1 => any::<bool>().prop_map(|synced| Op::Restart { synced }),
        ]
    }

    /// The model: the log of commands, each entry's first result, and the state after each
    /// index.
    #[derive(Default)]
    struct Model {
        log: Vec<ModelCommand>,
        results: Vec<bool>,
        states: Vec<BTreeMap<u8, u8>>,
    }

    impl Model {
        fn state(&self, index: u64) -> BTreeMap<u8, u8> {
            match index {
                0 => BTreeMap::new(),
                i => self.states[i as usize - 1].clone(),
            }
        }

        fn push(&mut self, c: ModelCommand) {
            let mut s = self.state(self.log.len() as u64);
            let ok = match &c {
                ModelCommand::Put(k, v) => {
                    s.insert(*k, *v);
                    true
                }
                ModelCommand::Delete(k) => {
                    s.remove(k);
                    true
                }
                ModelCommand::Cas(k, e, v) => {
                    let ok = s.get(k) == e.as_ref();
                    if ok {
                        s.insert(*k, *v);
                    }
                    ok
                }
                ModelCommand::Noop => true,
            };
            self.log.push(c);
            self.results.push(ok);
            self.states.push(s);
        }

        fn entry(&self, index: u64) -> ApplyEntry {
            entry(index, 1, command(&self.log[index as usize - 1]))
        }
    }

    fn sm_state(sm: &RedbStateMachine) -> BTreeMap<u8, u8> {
        sm.scan_prefix(b"")
            .unwrap()
            .entries
            .iter()
            .map(|(k, v)| (k[0] - b'a', v[0] - b'a'))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random chunks, re-sends and restarts (clean or crash) against a model: every result
        /// is the model's first result, and the state always equals the model's state at the
        /// state machine's applied index, which never falls below the last synced index.
        #[test]
        fn matches_the_model_through_resends_and_restarts(ops in proptest::collection::vec(op(), 1..40)) {
            let mut dirs = vec![tempfile::tempdir().unwrap()];
            let mut sm = open(dirs[0].path());
            let mut model = Model::default();
            let mut synced = 0u64;
            for op in ops {
                let applied = sm.last_applied().index;
                let (from, fresh) = match op {
                    Op::Apply(cs) => (applied + 1, cs),
                    Op::Resend { back, fresh } => ((applied + 1).saturating_sub(back).max(1), fresh),
                    Op::Restart { synced: clean } => {
                        if clean {
                            sm.stop().unwrap();
                            synced = applied;
                            drop(sm);
                        } else {
                            // A crash: the file as it is on disk now (non-durable commits are
                            // not in its header yet), opened without a clean shutdown.
                            let copy = tempfile::tempdir().unwrap();
                            fs::copy(sm.inner.dir.join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
                            drop(sm);
                            dirs.push(copy);
                        }
                        sm = open(dirs.last().unwrap().path());
                        let now = sm.last_applied().index;
                        prop_assert!(now >= synced && now <= applied, "applied {now} after restart, synced {synced}, was {applied}");
                        prop_assert_eq!(sm_state(&sm), model.state(now));
                        continue;
                    }
                };
                // Entries between the state machine's index and the model's log end were lost
                // in a crash: Raft replays them from its log.
                let known = model.log.len() as u64;
                for c in fresh {
                    model.push(c);
                }
                let to = model.log.len() as u64;
                if to < from {
                    continue;
                }
                let chunk: Vec<ApplyEntry> = (from..=to).map(|i| model.entry(i)).collect();
                let got = apply(&sm, &chunk).unwrap();
                let want: Vec<bool> = (from..=to).map(|i| model.results[i as usize - 1]).collect();
                prop_assert_eq!(got, want, "chunk {}..={} (log had {})", from, to, known);
                prop_assert_eq!(sm.last_applied().index, to);
                prop_assert_eq!(sm_state(&sm), model.state(to));
                // The maintained digest is the digest of the state.
                let state = sm.replica_state().unwrap();
                prop_assert_eq!(sm.digests().last().copied(), Some((to, state.kv_xor)));
            }
        }
    }
}
