//! The one way dcoord's redb stores (raft log, state machine) open a write transaction.

use redb::{Database, Durability, WriteTransaction};

/// A write transaction; `durable`: its commit is fsynced before it returns.
pub(crate) fn begin_write(db: &Database, durable: bool) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })?;
    Ok(txn)
}
