//! `counter::Counter`: a shared 64-bit integer with atomic add, get and compare-and-set, where
//! an operation whose outcome was unknown is never counted twice.
//!
//! The counter is one key (`<root>counters/<name>`) changed only by compare-and-swap. Every
//! operation carries a random id, and the record remembers the ids (and resulting values) of
//! the last [`REMEMBERED`] operations: an operation that may have applied (a timeout, a
//! leader change) is settled by looking for its id, never by re-applying it.
//!
//! # Guarantees
//! - **Linearizable.** Every operation is one CAS on the key; `get` is a linearizable read.
//! - **Exactly once per call.** A call that returns `Ok` applied exactly once, even when a
//!   write's outcome was unknown and was re-sent; a call that returns an error other than
//!   [`Error::Ambiguous`] applied nothing. `Ambiguous` (applied once or not at all, never
//!   twice) comes only when the outcome cannot be settled: the store stayed unreachable after
//!   an unknown outcome, or more than [`REMEMBERED`] operations landed in between.
//! - **No overflow.** An add that would overflow `i64` is refused ([`Error::InvalidArgument`])
//!   and writes nothing.
//!
//! # NOT guaranteed
//! - Throughput under contention: every writer CASes one key (one consensus write per
//!   operation; conflicts are retried).
//! - A definite answer when more than [`REMEMBERED`] other operations landed between an
//!   unknown outcome and its settling: the id may have been forgotten, so the call returns
//!   [`Error::Ambiguous`] rather than guess (nothing is re-sent).
//!
//! # Failure modes
//! - The store unreachable: the store's error after its retries; nothing applied.
//! - Foreign bytes in the key: [`Error::Decode`] naming it; nothing is overwritten.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::counter::Counter;
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let hits = Counter::new(store, "/dcoord/", "hits")?;
//! assert_eq!(hits.add(5).await?, 5);
//! assert_eq!(hits.add(-2).await?, 3);
//! assert!(hits.compare_and_set(3, 10).await?);
//! assert!(!hits.compare_and_set(3, 11).await?);
//! assert_eq!(hits.get().await?, 10);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, show};
use crate::store::{Cas, Consistency, Settled, Store};

/// How many recent operations a counter remembers (their ids settle unknown outcomes).
pub const REMEMBERED: usize = 256;

/// A named counter. Cheap to clone.
#[derive(Clone)]
pub struct Counter {
    store: Arc<dyn Store>,
    name: String,
    key: Bytes,
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter").field("name", &self.name).finish()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    v: u32,
    value: i64,
    /// Operations applied, ever; also makes every write's bytes unique.
    seq: u64,
    /// The last operations: (id, seq it was applied at, value after it).
    ops: VecDeque<(u64, u64, i64)>,
}

impl Record {
    const VERSION: u32 = 1;

    fn decode(key: &[u8], bytes: Option<&Bytes>) -> Result<Record> {
        let Some(bytes) = bytes else {
            return Ok(Record {
                v: Self::VERSION,
                ..Record::default()
            });
        };
        let rec: Record = serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            key: show(key),
            reason: format!("not a dcoord counter ({e}); refusing to overwrite it"),
        })?;
        if rec.v != Self::VERSION {
            return Err(Error::Decode {
                key: show(key),
                reason: format!("counter version {} is not supported", rec.v),
            });
        }
        Ok(rec)
    }

    fn applied(&self, id: u64) -> Option<i64> {
        self.ops.iter().find(|op| op.0 == id).map(|op| op.2)
    }

    fn with(&self, id: u64, value: i64) -> Record {
        let mut next = self.clone();
        next.seq += 1;
        next.value = value;
        next.ops.push_back((id, next.seq, value));
        while next.ops.len() > REMEMBERED {
            next.ops.pop_front();
        }
        next
    }

    /// True if every operation after `seq` is still remembered.
    fn remembers_since(&self, seq: u64) -> bool {
        self.seq <= seq || self.ops.front().is_some_and(|op| op.1 <= seq + 1)
    }
}

impl Counter {
    /// The counter `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under `root` (e.g.
    /// `session.root()`, or [`crate::keys::DEFAULT_ROOT`]). A counter needs no session.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name or root.
    pub fn new(store: Arc<dyn Store>, root: &str, name: &str) -> Result<Counter> {
        crate::keys::validate_name("counter", name)?;
        if !root.starts_with('/') || !root.ends_with('/') {
            return Err(Error::InvalidArgument(format!(
                "counter root {root:?} must start and end with '/'"
            )));
        }
        Ok(Counter {
            key: Bytes::from(format!("{root}counters/{name}")),
            name: name.to_string(),
            store,
        })
    }

    /// The counter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key the counter lives in.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The value now (a linearizable read; 0 if never written).
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn get(&self) -> Result<i64> {
        let bytes = self.store.get(&self.key, Consistency::Linearizable).await?;
        Ok(Record::decode(&self.key, bytes.as_ref())?.value)
    }

    /// Adds `delta` (which may be negative) and returns the value after it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] on overflow (nothing written); [`Error::Ambiguous`] if the
    /// outcome could not be settled (the store unreachable after an unknown outcome, or more
    /// than [`REMEMBERED`] other operations since); [`Error::Decode`]; the store's other
    /// errors (nothing applied).
    ///
    /// # Cancel safety
    /// If dropped, the add may or may not have applied (at most once).
    #[tracing::instrument(level = "debug", name = "counter.add", skip_all, fields(counter = %self.name, delta), err(level = "debug", Display))]
    pub async fn add(&self, delta: i64) -> Result<i64> {
        let name = &self.name;
        let value = self
            .apply(|v| {
                v.checked_add(delta).map(Some).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "counter {name:?}: {v} + {delta} overflows a 64-bit integer"
                    ))
                })
            })
            .await?;
        Ok(value.expect("an add always applies"))
    }

    /// Sets the counter to `new` if it holds `expected`; false (nothing written) otherwise.
    ///
    /// # Errors
    /// As [`Counter::add`].
    ///
    /// # Cancel safety
    /// If dropped, the set may or may not have applied (at most once).
    #[tracing::instrument(level = "debug", name = "counter.compare_and_set", skip_all, fields(counter = %self.name), err(level = "debug", Display))]
    pub async fn compare_and_set(&self, expected: i64, new: i64) -> Result<bool> {
        let applied = self.apply(|v| Ok((v == expected).then_some(new))).await?;
        Ok(applied.is_some())
    }

    /// Applies `op` (the new value from the current one; `None`: do nothing) exactly once.
    async fn apply(&self, op: impl Fn(i64) -> Result<Option<i64>>) -> Result<Option<i64>> {
        let id = fastrand::u64(..);
        let mut current = self.store.get(&self.key, Consistency::Linearizable).await?;
        // The seq of the record our first unknown attempt was based on.
        let mut unknown_since: Option<u64> = None;
        let mut attempt = 0u32;
        loop {
            let rec = Record::decode(&self.key, current.as_ref())?;
            if let Some(value) = rec.applied(id) {
                return Ok(Some(value));
            }
            if let Some(since) = unknown_since
                && !rec.remembers_since(since)
            {
                return Err(Error::Ambiguous {
                    op: "counter",
                    key: show(&self.key),
                    message: format!(
                        "an attempt's outcome is unknown and more than {REMEMBERED} operations \
                         landed since"
                    ),
                    source: None,
                });
            }
            let Some(value) = op(rec.value)? else {
                return Ok(None);
            };
            let next = rec.with(id, value);
            let bytes = serde_json::to_vec(&next).expect("a counter always serializes");
            let settled = match Cas::new(&*self.store, &self.key, current.as_deref(), &bytes)
                .settle()
                .await
            {
                Ok(settled) => settled,
                // Still unknown: the record tells. Our op id in it means applied; the record
                // unchanged means the next round re-sends these very bytes (at most one of
                // the identical attempts applies); anything else, with the id absent and the
                // window remembered, means it can no longer apply (the expected bytes are
                // gone for good).
                Err(e) if e.is_ambiguous() => {
                    unknown_since.get_or_insert(rec.seq);
                    current = match self.store.get(&self.key, Consistency::Linearizable).await {
                        Ok(now) => now,
                        Err(_) => return Err(e),
                    };
                    continue;
                }
                Err(e) => return Err(e),
            };
            match settled {
                Settled::Applied => return Ok(Some(value)),
                Settled::Rejected {
                    current: now,
                    maybe_applied,
                } => {
                    if maybe_applied {
                        unknown_since.get_or_insert(rec.seq);
                    }
                    current = now;
                    attempt += 1;
                    if attempt.is_multiple_of(8) {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_remembers_the_last_operations_and_knows_when_it_forgot() {
        let mut r = Record::decode(b"k", None).unwrap();
        for i in 0..(REMEMBERED as u64 + 10) {
            r = r.with(i, i as i64);
        }
        assert_eq!(r.ops.len(), REMEMBERED);
        assert_eq!(r.applied(5), None, "forgotten");
        assert_eq!(
            r.applied(REMEMBERED as u64 + 9),
            Some(REMEMBERED as i64 + 9)
        );
        assert!(r.remembers_since(r.seq - 5));
        assert!(r.remembers_since(r.seq - REMEMBERED as u64));
        assert!(!r.remembers_since(r.seq - REMEMBERED as u64 - 1));
        assert!(Record::decode(b"k", Some(&Bytes::from_static(b"7"))).is_err());
    }
}
