//! The [`Store`] trait: d-engine's primitives, object-safe, with one event type.
//!
//! Every recipe is written against `Arc<dyn Store>`; three implementations exist:
//!
//! - [`EmbeddedStore`]: a d-engine node inside this process (the default; see
//!   [`crate::engine::EmbeddedNode`]).
//! - [`RemoteStore`]: a d-engine cluster over gRPC; follows the leader by itself.
//! - `MemStore` (feature `test-util`): in memory, same semantics, with fault injection.
//!
//! # Guarantees
//! - Writes are linearizable (they go through Raft on the leader). `get` is as consistent as the
//!   [`Consistency`] asked for.
//! - [`Store::compare_and_swap`] compares the stored bytes exactly; `expected = None` means "the
//!   key is absent". A failed CAS writes nothing and emits no watch event.
//! - [`Store::scan_prefix`] returns the entries and the revision (Raft applied index) they
//!   reflect. A watch registered BEFORE the scan delivers every later change with a revision
//!   greater than the scan's, as long as the stream has not ended.
//! - A watch stream never ends silently: its last item is one of [`Error::WatchCanceled`],
//!   [`Error::WatchEnded`] or [`Error::WatchTransport`], and then it yields `None`.
//! - Bad input (see [`crate::keys`]) is rejected before anything is sent.
//! - [`Store::transact`] applies several writes, each with its own condition, as one Raft
//!   entry: all of them (one watch event per op, at one revision) or none (no event). See
//!   [`txn`]. [`Store::transact_or`] writes a fallback instead of nothing, in the same entry.
//! - `RemoteStore` and `EmbeddedStore` send concurrent writes of one handle together: while
//!   one write request of the handle is in flight, the writes that arrive wait and then go as
//!   one transaction (a lone write goes after only a few scheduler yields, which let the
//!   callers just answered join it). Each caller gets an answer its own write
//!   could have had; see the `group` notes on [`Store::compare_and_swap`]. This is what makes
//!   many concurrent writers cheap on a cluster (one Raft entry for a group).
//!
//! # NOT guaranteed (d-engine 0.2.4)
//! - Watch delivery is at-most-once: under a burst, d-engine can drop events for every watcher
//!   with no signal at all. Anything that must not miss a change re-scans periodically
//!   (`reconcile` does).
//! - d-engine 0.2.4 hands committed ranges to the state machine again while it still applies
//!   them, and emits watch events for every hand-over. dcoord's state machine applies each entry
//!   once, and a watch stream drops events at or below the last revision it delivered; but an
//!   entry applied just BEFORE a watch was opened can still arrive as its first event.
//! - Revisions are global (shared by all keys and by Raft's own entries): gaps are normal and
//!   mean nothing. There is no watch-from-revision.
//! - A `Delete` event does not prove the key existed: deleting an absent key emits one.
//! - `prev_value` cannot tell "absent" from "empty": both are `Some(b"")`.
//! - TTL ([`Store::put_with_ttl`]) is garbage collection only: it emits NO watch event, and an
//!   expired key stays readable (and CAS-able) until it is removed. On dcoord's nodes the
//!   removal is a replicated clock tick (about once a second while a leader is known; see
//!   [`crate::engine::state_machine`]); in `MemStore` (feature `test-util`), its sweeper. Never
//!   let CAS manage a key that has a TTL.
//!
//! - Transactions need dcoord's state machine on every node: a cluster must not mix nodes
//!   that apply them with nodes that do not (an older `dcoord node`), or their replicas
//!   diverge (the replica check reports it). Upgrade all nodes together. A stock d-engine
//!   server refuses them: `RemoteStore` finds that out with one empty transaction, then sends
//!   writes one by one and [`Store::transact`] fails with [`Error::Engine`].
//!
//! # Failure modes
//! - [`Error::Unavailable`]: nothing applied, retry is safe.
//! - [`Error::Ambiguous`]: a write whose outcome is unknown. A re-read does not decide it (the
//!   write can still apply after the read); for a CAS, [`Cas::settle`] does.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

#[cfg(doc)]
use crate::error::Error;
use crate::error::{Result, show};

mod cas;
mod embedded;
mod group;
mod remote;
pub mod txn;

pub use cas::{Cas, Settled};
pub use embedded::EmbeddedStore;
pub use remote::{RemoteOptions, RemoteStore};
pub use txn::{Expect, TxnOp};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started (ReadIndex on the leader).
    #[default]
    Linearizable,
    /// Served by the leader under its lease: linearizable unless clocks misbehave.
    Lease,
    /// Served by any node from its own state: may be stale.
    Eventual,
}

impl Consistency {
    /// d-engine's name for this consistency.
    pub(crate) fn policy(self) -> d_engine::protocol::ReadConsistencyPolicy {
        use d_engine::protocol::ReadConsistencyPolicy as P;
        match self {
            Consistency::Linearizable => P::LinearizableRead,
            Consistency::Lease => P::LeaseRead,
            Consistency::Eventual => P::EventualConsistency,
        }
    }
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WatchTarget {
    /// Exactly this key.
    Key(Bytes),
    /// Every key under this prefix; the prefix must start and end with `/`.
    Prefix(Bytes),
}

impl WatchTarget {
    /// A watch on one key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        WatchTarget::Key(key.into())
    }

    /// A watch on a '/'-bounded prefix.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        WatchTarget::Prefix(prefix.into())
    }

    /// The key or prefix bytes.
    pub fn bytes(&self) -> &Bytes {
        match self {
            WatchTarget::Key(k) | WatchTarget::Prefix(k) => k,
        }
    }

    /// Validates the target with the rules of [`crate::keys`].
    pub fn validate(&self) -> Result<()> {
        match self {
            WatchTarget::Key(k) => crate::keys::validate_key(k),
            WatchTarget::Prefix(p) => crate::keys::validate_watch_prefix(p),
        }
    }

    /// Whether `key` is covered by this target.
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            WatchTarget::Key(k) => k.as_ref() == key,
            WatchTarget::Prefix(p) => key.starts_with(p),
        }
    }
}

impl fmt::Display for WatchTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchTarget::Key(k) => write!(f, "key {:?}", show(k)),
            WatchTarget::Prefix(p) => write!(f, "prefix {:?}", show(p)),
        }
    }
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was written (put, put_with_ttl, or a successful CAS).
    Put,
    /// The key was deleted (also emitted when the key did not exist). TTL expiry emits nothing.
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or Delete.
    pub kind: EventKind,
    /// The key that changed (for a prefix watch: the full child key).
    pub key: Bytes,
    /// The new value; empty for a Delete.
    pub value: Bytes,
    /// The value before the change, when the watch asked for it (`Some(b"")` when the key was
    /// absent or empty: d-engine does not tell them apart). `None` when not asked for.
    pub prev_value: Option<Bytes>,
    /// The Raft log index of the change: strictly increasing within one stream, global across
    /// keys, so gaps mean nothing.
    pub revision: u64,
}

/// A process-wide registry of one `T` per store handle (the same `Arc`) and key.
pub(crate) type PerStore<K, T> = std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<(usize, K), std::sync::Weak<T>>>,
>;

/// The `T` of `store` and `key` in `registry` while one is alive, else a new one from `make`
/// (what `Mirror::shared` and the fair queue's release batches are shared by).
pub(crate) fn shared_per_store<K: Eq + std::hash::Hash, T>(
    registry: &'static PerStore<K, T>,
    store: &std::sync::Arc<dyn Store>,
    key: K,
    make: impl FnOnce() -> T,
) -> std::sync::Arc<T> {
    let id = (std::sync::Arc::as_ptr(store) as *const () as usize, key);
    let mut reg = registry
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(t) = reg.get(&id).and_then(std::sync::Weak::upgrade) {
        return t;
    }
    reg.retain(|_, w| w.strong_count() > 0);
    let t = std::sync::Arc::new(make());
    reg.insert(id, std::sync::Arc::downgrade(&t));
    t
}

/// The result of [`Store::scan_prefix`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Matching entries, sorted by key.
    pub entries: Vec<(Bytes, Bytes)>,
    /// The revision (applied index) the entries reflect.
    pub revision: u64,
}

impl Scan {
    /// A scan of `entries` in any order, sorted here by key.
    pub(crate) fn sorted(mut entries: Vec<(Bytes, Bytes)>, revision: u64) -> Self {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self { entries, revision }
    }
}

/// What a watch stream delivered last: d-engine 0.2.4 emits the events of a committed entry
/// again each time it hands the entry to the state machine, so a stream drops an event at or
/// below the last revision it delivered, except a further key of the same revision (a
/// transaction's ops share their entry's revision; no key appears twice in one).
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    revision: u64,
    keys: Vec<Bytes>,
}

impl Delivered {
    /// Whether `event` is new to this stream (and, if so, records it).
    pub(crate) fn fresh(&mut self, event: &Event) -> bool {
        if event.revision > self.revision {
            self.revision = event.revision;
            self.keys.clear();
        } else if event.revision < self.revision || self.keys.contains(&event.key) {
            return false;
        }
        self.keys.push(event.key.clone());
        true
    }
}

/// A watch stream: events, then exactly one terminal error, then `None`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send + 'static>>;

/// d-engine's primitives, object-safe (`Arc<dyn Store>`).
///
/// # Cancel safety
/// Dropping a read's future has no effect. Dropping a write's future after it started leaves the
/// write in an unknown state, exactly like [`crate::Error::Ambiguous`]: it may still be applied.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Reads one key.
    async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Bytes>>;

    /// Reads several keys, in one request where the store can (one read of d-engine's state
    /// machine for all of them); the values come in the order of `keys`, `None` for an absent
    /// key. No keys: no request. The default reads the keys one at a time.
    async fn get_many(
        &self,
        keys: &[Bytes],
        consistency: Consistency,
    ) -> Result<Vec<Option<Bytes>>> {
        check_keys(keys)?;
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key, consistency).await?);
        }
        Ok(values)
    }

    /// Writes one key. A TTL the key had before is kept (d-engine 0.2.4 semantics).
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<()>;

    /// Writes one key that the store deletes after `ttl` (rounded up to whole seconds, at least
    /// one). Expiry emits no watch event; see the module docs.
    async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<()>;

    /// Deletes one key. Deleting an absent key succeeds (and emits a Delete event).
    async fn delete(&self, key: &[u8]) -> Result<()>;

    /// Writes `new` only if the key currently holds `expected` (`None`: only if it is absent).
    /// Returns whether it wrote.
    ///
    /// Sent in a group with concurrent writes (dcoord's gRPC and embedded stores): if the
    /// group's transaction is refused, a linearizable read of its keys answers false for the
    /// writes whose expectation does not hold then (what a lone CAS would have answered at
    /// that moment) and the others are sent again. An unknown outcome of the group is an
    /// [`crate::Error::Ambiguous`] for each of its writes.
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool>;

    /// Applies `ops` as one write: if every op's [`Expect`] holds, every op's write is applied
    /// (in one Raft entry, at one revision, one watch event per op) and this returns true;
    /// otherwise nothing is written, no event is emitted, and this returns false. See
    /// [`txn`] for the limits and the wire form.
    ///
    /// The default (a store without transactions) returns [`crate::Error::Engine`] after
    /// checking the ops; callers that only batch for speed then send the ops one by one.
    async fn transact(&self, ops: &[TxnOp]) -> Result<bool> {
        txn::check(ops)?;
        Err(crate::Error::Engine {
            op: "transact",
            message: format!("{self:?} has no transactions"),
            source: None,
        })
    }

    /// Applies `ops` or, if any of their [`Expect`]s does not hold, `otherwise` (unconditional
    /// writes only; neither list empty), as one write either way: one Raft entry, at one revision, one watch event
    /// per op of the branch applied. Returns true if `ops` applied, false if `otherwise` did.
    /// Where a plain [`Store::transact`] answers "refused" and the caller writes again, this
    /// writes the fallback in the same round trip.
    ///
    /// The default (a store without it: no transactions, or servers from before dcoord
    /// learned it) returns [`crate::Error::Engine`] after checking the ops, having sent
    /// nothing ([`txn::unsupported`]); callers then write the fallback themselves.
    async fn transact_or(&self, ops: &[TxnOp], otherwise: &[TxnOp]) -> Result<bool> {
        txn::check_or(ops, otherwise)?;
        Err(crate::Error::Engine {
            op: "transact",
            message: format!("{self:?} has no transactions with an otherwise branch"),
            source: None,
        })
    }

    /// All entries whose key starts with `prefix`, and the revision they reflect.
    async fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan>;

    /// Starts a watch. Only changes applied after this returns are guaranteed to be delivered.
    async fn watch(&self, target: WatchTarget, prev_value: bool) -> Result<WatchStream>;
}

/// Rounds a TTL up to whole seconds, rejecting zero (d-engine treats 0 as "no TTL").
/// Checks every key of a multi-key read.
fn check_keys(keys: &[Bytes]) -> Result<()> {
    keys.iter()
        .try_for_each(|key| crate::keys::validate_key(key))
}

/// A backend's `get_many`: the keys checked (no keys: no request), `read` observed as one
/// store call, and its answer checked to hold one value per key (both d-engine clients realign
/// the server's sparse answer; a short one would silently drop keys).
pub(crate) async fn read_many<F>(
    store: &'static str,
    keys: &[Bytes],
    read: F,
) -> Result<Vec<Option<Bytes>>>
where
    F: Future<Output = Result<Vec<Option<Bytes>>>>,
{
    check_keys(keys)?;
    let Some(first) = keys.first() else {
        return Ok(Vec::new());
    };
    observed(store, "get_many", first, async {
        let values = read.await?;
        if values.len() != keys.len() {
            return Err(crate::Error::Engine {
                op: "get_many",
                message: format!("{} values for {} keys", values.len(), keys.len()),
                source: None,
            });
        }
        Ok(values)
    })
    .await
}

pub(crate) fn ttl_secs(ttl: Duration) -> Result<u64> {
    if ttl.is_zero() {
        return Err(crate::Error::InvalidArgument(
            "a TTL must be at least one second (zero would mean no TTL)".into(),
        ));
    }
    Ok(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
}

/// Validation shared by every store's write path.
pub(crate) fn check_write(key: &[u8], value: &[u8]) -> Result<()> {
    crate::keys::validate_key(key)?;
    crate::keys::validate_value(key, value)
}

/// A write barrier: returns once every write this process sent BEFORE the call is decided,
/// applied or never to be applied. Use it after an [`crate::Error::Ambiguous`] write, before
/// the re-read that decides what happened.
///
/// Why: a write reported as ambiguous (a timeout, a leader stepping down) can still be in the
/// leader's log, uncommitted. A linearizable read does not wait for it, so a read alone may show
/// the old value and the write land later. The barrier is a write of its own (a put to a key of
/// this process under `/dcoord/barrier/`, with a TTL so it is collected). Raft commits entries
/// in log order, so once the barrier is acknowledged, every earlier entry in the same leader's
/// log is committed; and once a new leader commits anything, an earlier leader's uncommitted
/// entries it does not hold can never commit.
///
/// NOT guaranteed: a request still on its way to a node (sent, not yet received) when the
/// barrier overtakes it. `RemoteStore` waits longer for an answer than the server does, so a
/// request it calls ambiguous has normally reached the server's Raft loop.
///
/// # Errors
/// [`crate::Error::Unavailable`] or other store errors when the barrier cannot be written
/// (an ambiguous barrier is written again: a put is idempotent).
///
/// # Cancel safety
/// Dropping the future leaves at most the barrier key behind (collected by its TTL).
pub async fn barrier(store: &dyn Store) -> Result<()> {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        format!(
            "{}barrier/{}",
            crate::keys::DEFAULT_ROOT,
            uuid::Uuid::new_v4().simple()
        )
    });
    loop {
        match store
            .put_with_ttl(key.as_bytes(), b"1", Duration::from_secs(600))
            .await
        {
            Err(e) if e.is_ambiguous() => continue,
            other => return other,
        }
    }
}

/// One store call, observed: a `store` span (at debug level) with the op and key, the error as
/// a field, and [`crate::metrics::STORE_REQUEST_SECONDS`] by outcome.
pub(crate) async fn observed<T>(
    store: &'static str,
    op: &'static str,
    key: &[u8],
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    use tracing::Instrument as _;
    let span = tracing::debug_span!(
        "store",
        store,
        op,
        key = tracing::field::Empty,
        error = tracing::field::Empty
    );
    if !span.is_disabled() {
        span.record("key", crate::error::show(key));
    }
    let started = std::time::Instant::now();
    let r = call.instrument(span.clone()).await;
    if let Err(e) = &r {
        span.record("error", tracing::field::display(e));
    }
    crate::metrics::store_call(store, op, started, &r);
    r
}
