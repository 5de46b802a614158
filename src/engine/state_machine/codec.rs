//! Encoding: write transactions, the schema, integer keys, log ids, the applied index.

use d_engine_core::Error;
use d_engine_proto::common::LogId;
use redb::{Database, ReadableTable, WriteTransaction};

use super::util::{Ctx, sm_err};
use super::{META_APPLIED, TABLES};

pub(super) fn begin(db: &Database, durable: bool) -> Result<WriteTransaction, Error> {
    crate::engine::redb_txn::begin_write(db, durable).ctx("begin a write transaction")
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), Error> {
    for table in TABLES {
        txn.open_table(table).ctx("create a table")?;
    }
    Ok(())
}

pub(super) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(super) fn be_u64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let n = b.len().min(8);
    raw[8 - n..].copy_from_slice(&b[..n]);
    u64::from_be_bytes(raw)
}

pub(super) fn due_key(deadline: u64, key: &[u8]) -> Vec<u8> {
    let mut k = u64_key(deadline).to_vec();
    k.extend_from_slice(key);
    k
}

pub(super) fn term_at<T: ReadableTable<&'static [u8], &'static [u8]>>(
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

pub(super) fn encode_log_id(id: LogId) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&id.index.to_be_bytes());
    out[8..].copy_from_slice(&id.term.to_be_bytes());
    out
}

pub(super) fn decode_log_id(b: &[u8]) -> Result<LogId, Error> {
    if b.len() != 16 {
        return Err(sm_err(format!("a log id of {} bytes, not 16", b.len())));
    }
    Ok(LogId {
        index: be_u64(&b[..8]),
        term: be_u64(&b[8..]),
    })
}

pub(super) fn read_applied<T: ReadableTable<&'static [u8], &'static [u8]>>(
    meta: &T,
) -> Result<LogId, Error> {
    match meta.get(META_APPLIED).ctx("read the applied index")? {
        None => Ok(LogId { index: 0, term: 0 }),
        Some(g) => decode_log_id(g.value()),
    }
}
