//! Snapshots: taking and installing one, the dump file, the stored snapshot metadata.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use d_engine_core::Error;
use d_engine_proto::common::LogId;
use d_engine_proto::server::storage::SnapshotMetadata;
use redb::{Database, ReadTransaction, ReadableTable};
use tracing::info;

use super::codec::{begin, create_tables, decode_log_id, encode_log_id, read_applied};
use super::digest::{Digests, state_xor};
use super::util::{Ctx, lock, path_err, remove_if_exists, sm_err, sync_dir};
use super::{
    DB_FILE, DUMP_MAGIC, INCOMING_FILE, Inner, META, META_SNAPSHOT, SNAPSHOT_FILE, TABLES,
};

impl Inner {
    pub(super) fn generate(&self, dir: &Path, label: LogId) -> Result<Bytes, Error> {
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

    pub(super) fn install(&self, metadata: &SnapshotMetadata, dir: &Path) -> Result<(), Error> {
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
}

pub(super) fn encode_snapshot_meta(meta: &SnapshotMetadata) -> Vec<u8> {
    let mut out = vec![u8::from(meta.last_included.is_some())];
    out.extend_from_slice(&encode_log_id(meta.last_included.unwrap_or_default()));
    out.extend_from_slice(&meta.checksum);
    out
}

pub(super) fn read_snapshot_meta<T: ReadableTable<&'static [u8], &'static [u8]>>(
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
