//! dcoord's raft log: d-engine's `StorageEngine` (log entries, purge boundary, hard state) in
//! one redb file, `<data_dir>/storage/raft.redb`, instead of d-engine's `FileStorageEngine`.
//!
//! # Guarantees
//! - Every change is one redb transaction: an append, a truncation, a replace (truncate +
//!   append), a purge with its boundary, a hard-state update. A crash (SIGKILL, power loss)
//!   leaves the log as it was after some whole transaction: never a torn record, never a
//!   misaligned tail, never an empty hard state.
//! - Appends commit without fsync; d-engine's IO thread calls `flush` after each batch, which is
//!   a durable (fsync) commit, so an entry is on disk when d-engine counts it durable (as with
//!   the file engine's `sync_all`).
//! - The hard state (term, vote) is committed durably before `save_hard_state` returns, so a
//!   restarted node never votes twice in one term.
//! - The purge boundary (index and term of the last purged entry) is kept and handed back to
//!   d-engine at start (`load_purge_boundary`), so `entry_term` of the snapshot boundary is
//!   right after a restart.
//!
//! # NOT guaranteed
//! - What d-engine 0.2.4 asks to persist is its business: followers acknowledge before the IO
//!   thread persists (upstream issue #446), and entries re-appended below the old durable index
//!   after a conflict are never handed to the store. This store cannot see either.
//!
//! # Failure modes
//! - A data directory holding d-engine's file raft log (`storage/logs/log.data`) and no
//!   `raft.redb` is refused with migration instructions (see `open_raft_log`).
//! - An undecodable stored entry fails the start, naming its index.
//!
//! Why not `FileStorageEngine`: it writes each record as two `write` calls (length, then body)
//! and, on start, stops reading at a torn record without truncating it; the next appends land
//! after the torn bytes, so the following restart misreads the log from there ("Failed to decode
//! entry", seen after 20 SIGKILLs in `tests/crash.rs`), and the node can no longer commit. Its
//! `purge` rewrites the file in place after `set_len(0)`, and its hard state is
//! `File::create` + write with no fsync: a crash in either window loses the log or the vote.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use d_engine_core::{Error, HardState, LogStore, MetaStore, StorageEngine, StorageError};
use d_engine_proto::common::{Entry, LogId};
use d_engine_proto::server::election::VotedFor;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const DB_FILE: &str = "raft.redb";
const FORMAT: &[u8] = b"dcoord-raft-log-1";

/// Log index → the prost-encoded `Entry`.
const LOG: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("log");
/// `format`, `hard_state`, `purged` (index ‖ term of the last purged entry).
const META: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("meta");

/// d-engine's storage engine for a dcoord node: [`RaftLogStore`] and [`HardStateStore`] on one
/// redb database.
#[derive(Debug)]
pub struct RaftStorage {
    log: Arc<RaftLogStore>,
    meta: Arc<HardStateStore>,
}

/// The log half of [`RaftStorage`].
#[derive(Debug)]
pub struct RaftLogStore {
    db: Arc<Database>,
    /// The highest stored index (0 when the log is empty).
    last: AtomicU64,
}

/// The hard-state half of [`RaftStorage`].
#[derive(Debug)]
pub struct HardStateStore {
    db: Arc<Database>,
}

/// What a stopped node's raft log holds: for replica checks and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    /// The lowest and highest stored index, if any entry is stored.
    pub bounds: Option<(u64, u64)>,
    /// Missing index ranges between the bounds (a healthy log has none).
    pub holes: Vec<RangeInclusive<u64>>,
    /// The last purged entry (index, term), if the log was ever purged.
    pub purged: Option<(u64, u64)>,
    /// The term d-engine last saved (0 if never; d-engine 0.2.4 saves only at a graceful stop).
    pub saved_term: u64,
    /// The term of the last stored entry (of the purge boundary if the log is empty).
    pub last_term: u64,
}

/// Opens the raft log of a node's data directory (`<data_dir>/storage/raft.redb`).
///
/// # Errors
/// A directory with d-engine's file raft log and no redb log is refused with an error that says
/// how to migrate; redb and decoding errors otherwise.
pub(crate) fn open_raft_log(data_dir: &Path) -> crate::Result<Arc<RaftStorage>> {
    let dir = data_dir.join("storage");
    let old = dir.join("logs").join("log.data");
    if old.exists() && !dir.join(DB_FILE).exists() {
        return Err(crate::Error::Config(format!(
            "{data_dir:?} holds d-engine's file raft log ({old:?}), written by an older dcoord; \
             this dcoord keeps its raft log in {:?} and does not read the old format. A node \
             of a cluster: stop it, move its data directory away, start it again; it catches up \
             from the leader. A single node: read the keys out with the older dcoord, start \
             afresh in a new directory, write them back.",
            dir.join(DB_FILE)
        )));
    }
    RaftStorage::open(&dir)
        .map(Arc::new)
        .map_err(|e| crate::Error::Config(format!("cannot open the raft log in {data_dir:?}: {e}")))
}

impl RaftStorage {
    /// The term of the last log entry (of the purge boundary when the log is empty): the
    /// node's term is at least this. Read without side effects (for metrics).
    pub(crate) fn last_log_term(&self) -> Result<u64, Error> {
        last_log_term(&self.meta.db)
    }

    /// Opens (or creates) the raft log in `dir` (the file `dir/raft.redb`). A running node
    /// holds the file's lock, so this fails on a live node's directory.
    ///
    /// # Errors
    /// I/O and redb errors, a file of another format, an undecodable entry.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| log_err(format!("{dir:?}: {e}")))?;
        let db = Database::create(dir.join(DB_FILE)).ctx("open the raft log")?;
        let txn = begin(&db, true)?;
        {
            txn.open_table(LOG).ctx("open log")?;
            let mut meta = txn.open_table(META).ctx("open meta")?;
            let format = meta
                .get("format")
                .ctx("read format")?
                .map(|g| g.value().to_vec());
            match format {
                None => {
                    meta.insert("format", FORMAT).ctx("write format")?;
                }
                Some(f) if f == FORMAT => {}
                Some(f) => {
                    return Err(log_err(format!(
                        "{dir:?} holds raft log format {:?}; this dcoord reads {:?}",
                        String::from_utf8_lossy(&f),
                        String::from_utf8_lossy(FORMAT)
                    )));
                }
            }
        }
        txn.commit().ctx("commit schema")?;
        let db = Arc::new(db);
        let last = {
            let txn = db.begin_read().ctx("begin_read")?;
            let log = txn.open_table(LOG).ctx("open log")?;
            log.last().ctx("read last")?.map_or(0, |(k, _)| k.value())
        };
        Ok(Self {
            log: Arc::new(RaftLogStore {
                db: db.clone(),
                last: AtomicU64::new(last),
            }),
            meta: Arc::new(HardStateStore { db }),
        })
    }

    /// Bounds, holes, purge boundary and term of the stored log.
    ///
    /// # Errors
    /// redb errors.
    pub fn summary(&self) -> Result<LogSummary, Error> {
        let txn = self.log.db.begin_read().ctx("begin_read")?;
        let log = txn.open_table(LOG).ctx("open log")?;
        let mut bounds: Option<(u64, u64)> = None;
        let mut holes = Vec::new();
        for row in log.iter().ctx("iterate log")? {
            let index = row.ctx("read log")?.0.value();
            bounds = Some(match bounds {
                None => (index, index),
                Some((first, prev)) => {
                    if index > prev + 1 {
                        holes.push(prev + 1..=index - 1);
                    }
                    (first, index)
                }
            });
        }
        let purged = read_purged(&self.log.db)?.map(|l| (l.index, l.term));
        let saved_term = read_saved_hard_state(&self.meta.db)?.map_or(0, |h| h.current_term);
        Ok(LogSummary {
            bounds,
            holes,
            purged,
            saved_term,
            last_term: last_log_term(&self.log.db)?,
        })
    }
}

impl StorageEngine for RaftStorage {
    type LogStore = RaftLogStore;
    type MetaStore = HardStateStore;

    fn log_store(&self) -> Arc<RaftLogStore> {
        self.log.clone()
    }

    fn meta_store(&self) -> Arc<HardStateStore> {
        self.meta.clone()
    }
}

impl RaftLogStore {
    /// Deletes `from..` and inserts `entries` in one transaction; returns the new last index.
    fn write(&self, truncate_from: Option<u64>, entries: &[Entry]) -> Result<(), Error> {
        let txn = begin(&self.db, false)?;
        let last = {
            let mut log = txn.open_table(LOG).ctx("open log")?;
            if let Some(from) = truncate_from {
                log.retain_in(from.., |_, _| false).ctx("truncate")?;
            }
            for entry in entries {
                log.insert(entry.index, entry.encode_to_vec().as_slice())
                    .ctx("append")?;
            }
            log.last().ctx("read last")?.map_or(0, |(k, _)| k.value())
        };
        txn.commit().ctx("commit")?;
        self.last.store(last, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl LogStore for RaftLogStore {
    async fn persist_entries(&self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(None, &entries)
    }

    async fn entry(&self, index: u64) -> Result<Option<Entry>, Error> {
        let txn = self.db.begin_read().ctx("begin_read")?;
        let log = txn.open_table(LOG).ctx("open log")?;
        log.get(index)
            .ctx("read entry")?
            .map(|g| decode(index, g.value()))
            .transpose()
    }

    fn get_entries(&self, range: RangeInclusive<u64>) -> Result<Vec<Entry>, Error> {
        let txn = self.db.begin_read().ctx("begin_read")?;
        let log = txn.open_table(LOG).ctx("open log")?;
        let mut out = Vec::new();
        for row in log.range(range).ctx("read range")? {
            let (k, v) = row.ctx("read entry")?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    async fn purge(&self, cutoff: LogId) -> Result<(), Error> {
        let txn = begin(&self.db, true)?;
        {
            let mut log = txn.open_table(LOG).ctx("open log")?;
            log.retain_in(..=cutoff.index, |_, _| false).ctx("purge")?;
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("purged", cutoff.encode_to_vec().as_slice())
                .ctx("write purge boundary")?;
        }
        txn.commit().ctx("commit purge")
    }

    async fn truncate(&self, from_index: u64) -> Result<(), Error> {
        self.write(Some(from_index), &[])
    }

    async fn replace_range(&self, from_index: u64, new_entries: Vec<Entry>) -> Result<(), Error> {
        self.write(Some(from_index), &new_entries)
    }

    fn is_write_durable(&self) -> bool {
        // Appends commit without fsync; d-engine then calls `flush` once per batch.
        false
    }

    fn flush(&self) -> Result<(), Error> {
        begin(&self.db, true)?.commit().ctx("durable commit")
    }

    async fn flush_async(&self) -> Result<(), Error> {
        self.flush()
    }

    async fn reset(&self) -> Result<(), Error> {
        let txn = begin(&self.db, true)?;
        {
            let mut log = txn.open_table(LOG).ctx("open log")?;
            log.retain(|_, _| false).ctx("reset")?;
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.remove("purged").ctx("reset purge boundary")?;
        }
        txn.commit().ctx("commit reset")?;
        self.last.store(0, Ordering::SeqCst);
        Ok(())
    }

    fn last_index(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }

    fn load_purge_boundary(&self) -> Result<Option<LogId>, Error> {
        read_purged(&self.db)
    }
}

#[async_trait]
impl MetaStore for HardStateStore {
    fn save_hard_state(&self, state: &HardState) -> Result<(), Error> {
        let txn = begin(&self.db, true)?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("hard_state", encode_hard_state(state).as_slice())
                .ctx("write hard state")?;
        }
        txn.commit().ctx("commit hard state")
    }

    /// The saved hard state, raised to the last log entry's term when that is higher (with no
    /// vote in it). d-engine 0.2.4 saves the hard state only at a graceful stop, so after a crash
    /// the saved term is stale or absent; a node that restarted below the terms in its own log
    /// would lead in an old term and append entries whose terms go backwards, and Raft's
    /// up-to-date check would then rank its log wrongly. Raising one's own term is always
    /// allowed in Raft. (The vote of the crashed run is still lost: issue 14.)
    fn load_hard_state(&self) -> Result<Option<HardState>, Error> {
        let saved = read_saved_hard_state(&self.db)?;
        let floor = last_log_term(&self.db)?;
        Ok(match saved {
            Some(h) if h.current_term >= floor => Some(h),
            _ if floor == 0 => saved,
            _ => {
                tracing::warn!(
                    saved_term = saved.map_or(0, |h| h.current_term),
                    log_term = floor,
                    "the saved term is behind the raft log (d-engine saves it only at a graceful \
                     stop); starting at the log's term, with no vote"
                );
                Some(HardState {
                    current_term: floor,
                    voted_for: None,
                })
            }
        })
    }
}

fn read_saved_hard_state(db: &Database) -> Result<Option<HardState>, Error> {
    let txn = db.begin_read().ctx("begin_read")?;
    let meta = txn.open_table(META).ctx("open meta")?;
    meta.get("hard_state")
        .ctx("read hard state")?
        .map(|g| decode_hard_state(g.value()))
        .transpose()
}

/// The term of the last stored entry, else of the purge boundary, else 0.
fn last_log_term(db: &Database) -> Result<u64, Error> {
    let last = {
        let txn = db.begin_read().ctx("begin_read")?;
        let log = txn.open_table(LOG).ctx("open log")?;
        let row = log.last().ctx("read last")?;
        match row {
            Some((k, v)) => Some(decode(k.value(), v.value())?.term),
            None => None,
        }
    };
    match last {
        Some(term) => Ok(term),
        None => Ok(read_purged(db)?.map_or(0, |l| l.term)),
    }
}

fn read_purged(db: &Database) -> Result<Option<LogId>, Error> {
    let txn = db.begin_read().ctx("begin_read")?;
    let meta = txn.open_table(META).ctx("open meta")?;
    meta.get("purged")
        .ctx("read purge boundary")?
        .map(|g| LogId::decode(g.value()).ctx("decode purge boundary"))
        .transpose()
}

fn decode(index: u64, bytes: &[u8]) -> Result<Entry, Error> {
    Entry::decode(bytes).map_err(|e| log_err(format!("raft log entry {index} is undecodable: {e}")))
}

/// term ‖ voted (0/1) ‖ voted_for_id ‖ voted_for_term ‖ committed (0/1), big-endian.
fn encode_hard_state(state: &HardState) -> Vec<u8> {
    let mut out = state.current_term.to_be_bytes().to_vec();
    match state.voted_for {
        None => out.extend_from_slice(&[0; 14]),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.voted_for_id.to_be_bytes());
            out.extend_from_slice(&v.voted_for_term.to_be_bytes());
            out.push(u8::from(v.committed));
        }
    }
    out
}

fn decode_hard_state(bytes: &[u8]) -> Result<HardState, Error> {
    if bytes.len() != 22 {
        return Err(log_err(format!(
            "hard state has {} bytes, expected 22",
            bytes.len()
        )));
    }
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let voted_for = (bytes[8] == 1).then(|| VotedFor {
        voted_for_id: u32::from_be_bytes(bytes[9..13].try_into().expect("4 bytes")),
        voted_for_term: u64_at(13),
        committed: bytes[21] == 1,
    });
    Ok(HardState {
        current_term: u64_at(0),
        voted_for,
    })
}

fn begin(db: &Database, durable: bool) -> Result<redb::WriteTransaction, Error> {
    crate::engine::redb_txn::begin_write(db, durable).ctx("begin a write transaction")
}

fn log_err(message: String) -> Error {
    Error::from(StorageError::LogStorage(message))
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, Error>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| log_err(format!("raft log: {what}: {e}")))
    }
}

#[cfg(test)]
mod tests;
