//! The apply path: a chunk of entries checked and applied in one write transaction.

use std::time::Instant;

use d_engine_core::{ApplyEntry, ApplyResult, Command, Error};
use d_engine_proto::common::LogId;
use redb::{ReadableTable, WriteTransaction};

use super::codec::{be_u64, begin, due_key, encode_log_id, read_applied, term_at, u64_key};
use super::digest::pair_hash;
use super::util::{Ctx, lock};
use super::{
    CAS_RESULT_SLOTS, CAS_RESULTS, DURABLE_EVERY, Inner, KV, META, META_APPLIED, META_CLOCK, TERMS,
    TICK_KEY, TTL_DEADLINE, TTL_DUE, TTL_PENDING,
};
use crate::store::txn::{self, TXN_KEY, TXN_MAGIC};

impl Inner {
    pub(super) fn apply(&self, chunk: &[ApplyEntry]) -> Result<Vec<ApplyResult>, Error> {
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
            } if &key[..] == TXN_KEY && expected.as_deref() == Some(TXN_MAGIC) => {
                self.transact(value)
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

    /// Applies a transaction (see [`crate::store::txn`]): every expectation of the first
    /// branch is checked against the state before it; if all hold, its writes are applied
    /// (true), else those of the otherwise branch (false; none for a plain transaction). Bytes
    /// that do not decode apply nothing (false), like a failed CAS: a node never stops on a
    /// client's bytes.
    fn transact(&mut self, wire: &[u8]) -> Result<bool, Error> {
        let Some(ops) = txn::decode(wire) else {
            return Ok(false);
        };
        let mut holds = true;
        for op in ops.iter().filter(|op| !op.otherwise) {
            let current = self.kv.get(op.key).ctx("read for a transaction")?;
            if !op.holds(current.as_ref().map(|g| g.value())) {
                holds = false;
                break;
            }
        }
        for op in ops.iter().filter(|op| op.otherwise != holds) {
            match op.write {
                Some(value) => self.put(op.key, value)?,
                None => {
                    self.remove(op.key)?;
                    self.clear_ttl(op.key)?;
                }
            }
        }
        Ok(holds)
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
