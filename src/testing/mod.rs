//! An in-memory [`Store`] with d-engine's semantics and fault injection (feature `test-util`).
//!
//! # Same semantics as d-engine 0.2.4
//! - One global revision, bumped by every applied write (a failed CAS bumps it too, like the
//!   Raft index it stands for, but emits no event).
//! - Watch prefixes must start and end with `/`; a prefix watch sees every key under it.
//! - Deleting an absent key emits a Delete event.
//! - `put_with_ttl`: the key stays readable (and CAS-able) after it expires, until the sweeper
//!   removes it; removal emits NO event. A plain `put` or a CAS keeps the key's TTL.
//! - A watcher whose buffer is full is sent `Canceled` and dropped.
//!
//! # Faults
//! [`MemStore::cancel_watches`], [`MemStore::end_watches`], [`MemStore::drop_next_events`]
//! (silent loss, like d-engine's broadcast lag), [`MemStore::fail_next_ops`] (retryable,
//! nothing applied), [`MemStore::ambiguous_next_writes`] (applied, reported as
//! [`Error::Ambiguous`]), [`MemStore::late_next_writes`] (reported as ambiguous, applied
//! only before the next write), [`MemStore::overtaken_next_writes`] (reported as ambiguous,
//! applied after later writes), [`MemStore::set_latency`]. [`MemStore::op_counts`] counts operations.
//!
//! Everything runs on tokio's clock, so tests can use `start_paused = true`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{Error, Result, show};
use crate::keys;
use crate::store::{
    Consistency, Event, EventKind, Scan, Store, TxnOp, WatchStream, WatchTarget, check_write,
    ttl_secs,
};

/// Settings of a [`MemStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemOptions {
    /// Events a watcher may have queued before it is canceled (d-engine's default: 256).
    pub(crate) watcher_buffer: usize,
    /// How often expired keys are swept (d-engine's default: 1 s).
    pub(crate) ttl_sweep_interval: Duration,
    /// Whether [`Store::transact`] is applied (default) or answered as a store without
    /// transactions does ([`crate::store::txn::unsupported`]).
    pub(crate) transactions: bool,
}

impl Default for MemOptions {
    fn default() -> Self {
        Self {
            watcher_buffer: 256,
            ttl_sweep_interval: Duration::from_secs(1),
            transactions: true,
        }
    }
}

impl MemOptions {
    /// Sets [`MemOptions::watcher_buffer`].
    #[must_use]
    pub fn watcher_buffer(mut self, n: usize) -> Self {
        self.watcher_buffer = n.max(1);
        self
    }

    /// A store without transactions: [`Store::transact`] answers what the trait's default
    /// does (nothing is written, no op is counted), as a cluster of stock d-engine nodes or a
    /// custom store would.
    #[must_use]
    pub fn without_transactions(mut self) -> Self {
        self.transactions = false;
        self
    }

    /// Sets [`MemOptions::ttl_sweep_interval`].
    #[must_use]
    pub fn ttl_sweep_interval(mut self, d: Duration) -> Self {
        self.ttl_sweep_interval = d;
        self
    }
}

/// How many operations a [`MemStore`] has served (including failed ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// `get` calls.
    pub gets: u64,
    /// `scan_prefix` calls.
    pub scans: u64,
    /// `put`, `put_with_ttl`, `delete`, `compare_and_swap` and `transact` calls.
    pub writes: u64,
    /// `watch` calls.
    pub watches: u64,
}

impl OpCounts {
    /// Reads: gets plus scans.
    pub fn reads(&self) -> u64 {
        self.gets + self.scans
    }
}

struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
}

struct Watcher {
    target: WatchTarget,
    prev_value: bool,
    tx: mpsc::Sender<Result<Event>>,
}

#[derive(Default)]
struct Faults {
    drop_events: u64,
    fail_ops: u64,
    ambiguous_writes: u64,
    late_writes: u64,
    overtaken_writes: (u64, u64),
    latency: Duration,
}

#[derive(Default)]
struct State {
    data: BTreeMap<Bytes, Entry>,
    revision: u64,
    watchers: Vec<Watcher>,
    faults: Faults,
    ops: OpCounts,
    /// Writes reported as ambiguous and not applied yet: applied, in order, just before the
    /// next write (like uncommitted Raft entries ahead of it in the leader's log).
    in_flight: Vec<(Bytes, Write)>,
    /// Writes reported as ambiguous that are still on their way: applied once the count of
    /// later writes reaches zero (requests that later ones overtook).
    overtaken: Vec<(u64, Bytes, Write)>,
}

struct Shared {
    state: Mutex<State>,
    options: MemOptions,
}

/// The in-memory store. Cheap to clone; clones share the data.
#[derive(Clone)]
pub struct MemStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").finish_non_exhaustive()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

enum Write {
    Put(Bytes, Option<Instant>),
    Delete,
    Cas(Option<Bytes>, Bytes),
    /// A transaction (checked): all its ops at one revision, or (some expectation does not
    /// hold) the second list's, which are unconditional (none for a plain transaction).
    Txn(Vec<TxnOp>, Vec<TxnOp>),
}

impl MemStore {
    /// A checked transaction (`otherwise`: its otherwise branch, empty for a plain one).
    async fn write_txn(&self, ops: &[TxnOp], otherwise: &[TxnOp]) -> Result<bool> {
        if !self.shared.options.transactions {
            return Err(Error::Engine {
                op: "transact",
                message: format!("{self:?} has no transactions"),
                source: None,
            });
        }
        self.write(
            "transact",
            crate::store::txn::TXN_KEY,
            Write::Txn(ops.to_vec(), otherwise.to_vec()),
        )
        .await
    }

    /// A new empty store. Must be called inside a tokio runtime (it starts the TTL sweeper).
    pub fn new() -> Self {
        Self::with_options(MemOptions::default())
    }

    /// A new empty store with options.
    pub fn with_options(options: MemOptions) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            options,
        });
        tokio::spawn(sweeper(Arc::downgrade(&shared)));
        Self { shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every open watch is sent `Canceled` (as on a server-side overflow) and closed.
    pub fn cancel_watches(&self) {
        let mut st = self.lock();
        for w in st.watchers.drain(..) {
            let _ = w.tx.try_send(Err(Error::WatchCanceled {
                target: w.target.to_string(),
            }));
        }
    }

    /// Every open watch stream ends (as when the serving node goes away).
    pub fn end_watches(&self) {
        self.lock().watchers.clear();
    }

    /// The next `n` write events are silently not delivered to any watcher.
    pub fn drop_next_events(&self, n: u64) {
        self.lock().faults.drop_events += n;
    }

    /// The next `n` operations fail with [`Error::Unavailable`] and change nothing.
    pub fn fail_next_ops(&self, n: u64) {
        self.lock().faults.fail_ops += n;
    }

    /// The next `n` writes are applied but reported as [`Error::Ambiguous`].
    pub fn ambiguous_next_writes(&self, n: u64) {
        self.lock().faults.ambiguous_writes += n;
    }

    /// The next `n` writes are reported as [`Error::Ambiguous`] WITHOUT being applied yet;
    /// each is applied just before the next write that follows it (reads in between do not
    /// see it). This is a Raft leader's uncommitted entry whose client timed out: a read
    /// served meanwhile does not show it, and it still commits ahead of any later write.
    pub fn late_next_writes(&self, n: u64) {
        self.lock().faults.late_writes += n;
    }

    /// The next `n` writes are reported as [`Error::Ambiguous`] WITHOUT being applied; each is
    /// applied right AFTER the `by`-th write that follows it, its condition (for a CAS)
    /// checked then. This is a request still on its way to the leader when the client gave
    /// up: later requests overtake it. No Raft log protects against it, and
    /// [`crate::store::barrier`] cannot wait for it.
    pub fn overtaken_next_writes(&self, n: u64, by: u64) {
        self.lock().faults.overtaken_writes = (n, by.max(1));
    }

    /// Every operation first waits `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().faults.latency = latency;
    }

    /// Operations served so far.
    pub fn op_counts(&self) -> OpCounts {
        self.lock().ops
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Number of open watches.
    pub fn watch_count(&self) -> usize {
        let mut st = self.lock();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    /// Waits the injected latency, counts the op and consumes an injected failure.
    async fn enter(&self, op: &'static str, count: impl FnOnce(&mut OpCounts)) -> Result<()> {
        let latency = self.lock().faults.latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut st = self.lock();
        count(&mut st.ops);
        if st.faults.fail_ops > 0 {
            st.faults.fail_ops -= 1;
            return Err(Error::Unavailable {
                op,
                message: "injected failure".into(),
                source: None,
            });
        }
        Ok(())
    }

    async fn write(&self, op: &'static str, key: &[u8], w: Write) -> Result<bool> {
        self.enter(op, |c| c.writes += 1).await?;
        let buffer = self.shared.options.watcher_buffer;
        let mut st = self.lock();
        for (k, late) in std::mem::take(&mut st.in_flight) {
            apply(&mut st, &k, late, buffer);
        }
        let outcome = Self::write_now(&mut st, buffer, op, key, w);
        // Requests this one overtook land after it.
        let mut landing = Vec::new();
        for (left, k, late) in std::mem::take(&mut st.overtaken) {
            if left <= 1 {
                landing.push((k, late));
            } else {
                st.overtaken.push((left - 1, k, late));
            }
        }
        for (k, late) in landing {
            apply(&mut st, &k, late, buffer);
        }
        outcome
    }

    fn write_now(
        st: &mut State,
        buffer: usize,
        op: &'static str,
        key: &[u8],
        w: Write,
    ) -> Result<bool> {
        if st.faults.overtaken_writes.0 > 0 {
            st.faults.overtaken_writes.0 -= 1;
            let by = st.faults.overtaken_writes.1;
            // Counted down by the writes after this one (plus one for this one, below).
            st.overtaken.push((by + 1, Bytes::copy_from_slice(key), w));
            return Err(Error::Ambiguous {
                op,
                key: show(key),
                message: "injected: still on its way, overtaken by later writes".into(),
                source: None,
            });
        }
        if st.faults.late_writes > 0 {
            st.faults.late_writes -= 1;
            st.in_flight.push((Bytes::copy_from_slice(key), w));
            return Err(Error::Ambiguous {
                op,
                key: show(key),
                message: "injected: not applied yet, applied before the next write".into(),
                source: None,
            });
        }
        let applied = apply(st, key, w, buffer);
        if st.faults.ambiguous_writes > 0 {
            st.faults.ambiguous_writes -= 1;
            return Err(Error::Ambiguous {
                op,
                key: show(key),
                message: "injected: applied, reported as unknown".into(),
                source: None,
            });
        }
        Ok(applied)
    }
}

/// Applies one write: bumps the revision, changes the data, tells the watchers. Returns
/// whether it took effect (false only for a failed CAS).
fn apply(st: &mut State, key: &[u8], w: Write, buffer: usize) -> bool {
    if let Write::Txn(ops, otherwise) = w {
        st.revision += 1;
        let holds = ops
            .iter()
            .all(|op| op.expect.holds(st.data.get(&op.key).map(|e| &e.value[..])));
        let revision = st.revision;
        for op in if holds { ops } else { otherwise } {
            let prev = st.data.get(&op.key).map(|e| e.value.clone());
            let (kind, value) = match op.write {
                Some(value) => {
                    let expires_at = st.data.get(&op.key).and_then(|e| e.expires_at);
                    st.data.insert(
                        op.key.clone(),
                        Entry {
                            value: value.clone(),
                            expires_at,
                        },
                    );
                    (EventKind::Put, value)
                }
                None => {
                    st.data.remove(&op.key);
                    (EventKind::Delete, Bytes::new())
                }
            };
            if st.faults.drop_events > 0 {
                st.faults.drop_events -= 1;
                continue;
            }
            let event = Event {
                kind,
                key: op.key,
                value,
                prev_value: None,
                revision,
            };
            dispatch(st, event, prev, buffer);
        }
        return holds;
    }
    st.revision += 1;
    let revision = st.revision;
    let prev = st.data.get(key).map(|e| e.value.clone());
    let (applied, event) = match w {
        Write::Put(value, ttl) => {
            let expires_at = match ttl {
                Some(at) => Some(at),
                // d-engine keeps a key's lease across a plain put.
                None => st.data.get(key).and_then(|e| e.expires_at),
            };
            st.data.insert(
                Bytes::copy_from_slice(key),
                Entry {
                    value: value.clone(),
                    expires_at,
                },
            );
            (true, Some((EventKind::Put, value)))
        }
        Write::Delete => {
            st.data.remove(key);
            (true, Some((EventKind::Delete, Bytes::new())))
        }
        Write::Cas(expected, new) => {
            if prev.as_deref() == expected.as_deref() {
                let expires_at = st.data.get(key).and_then(|e| e.expires_at);
                st.data.insert(
                    Bytes::copy_from_slice(key),
                    Entry {
                        value: new.clone(),
                        expires_at,
                    },
                );
                (true, Some((EventKind::Put, new)))
            } else {
                (false, None)
            }
        }
        Write::Txn(..) => unreachable!("applied above"),
    };
    if let Some((kind, value)) = event {
        if st.faults.drop_events > 0 {
            st.faults.drop_events -= 1;
        } else {
            let event = Event {
                kind,
                key: Bytes::copy_from_slice(key),
                value,
                prev_value: None,
                revision,
            };
            dispatch(st, event, prev, buffer);
        }
    }
    applied
}

fn dispatch(st: &mut State, event: Event, prev: Option<Bytes>, buffer: usize) {
    st.watchers.retain(|w| {
        if !w.target.matches(&event.key) {
            return !w.tx.is_closed();
        }
        if w.tx.capacity() <= 1 {
            // d-engine: the last slot is reserved for the cancel notice.
            let _ = w.tx.try_send(Err(Error::WatchCanceled {
                target: w.target.to_string(),
            }));
            return false;
        }
        let mut e = event.clone();
        if w.prev_value {
            e.prev_value = Some(prev.clone().unwrap_or_default());
        }
        debug_assert!(buffer > 0);
        w.tx.try_send(Ok(e)).is_ok()
    });
}

async fn sweeper(shared: Weak<Shared>) {
    let interval = match shared.upgrade() {
        Some(s) => s.options.ttl_sweep_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        // Expiry is local and emits no event, exactly like d-engine's sweeper.
        st.data
            .retain(|_, e| e.expires_at.is_none_or(|at| at > now));
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &[u8], _consistency: Consistency) -> Result<Option<Bytes>> {
        keys::validate_key(key)?;
        self.enter("get", |c| c.gets += 1).await?;
        Ok(self.lock().data.get(key).map(|e| e.value.clone()))
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        check_write(key, value)?;
        self.write("put", key, Write::Put(Bytes::copy_from_slice(value), None))
            .await?;
        Ok(())
    }

    async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<()> {
        check_write(key, value)?;
        let secs = ttl_secs(ttl)?;
        let at = Instant::now() + Duration::from_secs(secs);
        self.write(
            "put_with_ttl",
            key,
            Write::Put(Bytes::copy_from_slice(value), Some(at)),
        )
        .await?;
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> Result<()> {
        keys::validate_key(key)?;
        self.write("delete", key, Write::Delete).await?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool> {
        check_write(key, new)?;
        self.write(
            "compare_and_swap",
            key,
            Write::Cas(
                expected.map(Bytes::copy_from_slice),
                Bytes::copy_from_slice(new),
            ),
        )
        .await
    }

    async fn transact(&self, ops: &[TxnOp]) -> Result<bool> {
        crate::store::txn::check(ops)?;
        self.write_txn(ops, &[]).await
    }

    async fn transact_or(&self, ops: &[TxnOp], otherwise: &[TxnOp]) -> Result<bool> {
        crate::store::txn::check_or(ops, otherwise)?;
        self.write_txn(ops, otherwise).await
    }

    async fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan> {
        keys::validate_scan_prefix(prefix)?;
        self.enter("scan_prefix", |c| c.scans += 1).await?;
        let st = self.lock();
        let entries = st
            .data
            .range(Bytes::copy_from_slice(prefix)..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect();
        Ok(Scan {
            entries,
            revision: st.revision,
        })
    }

    async fn watch(&self, target: WatchTarget, prev_value: bool) -> Result<WatchStream> {
        target.validate()?;
        self.enter("watch", |c| c.watches += 1).await?;
        let (tx, mut rx) = mpsc::channel(self.shared.options.watcher_buffer + 1);
        let name = target.to_string();
        self.lock().watchers.push(Watcher {
            target,
            prev_value,
            tx,
        });
        Ok(Box::pin(async_stream::stream! {
            loop {
                match rx.recv().await {
                    Some(Ok(e)) => yield Ok(e),
                    Some(Err(e)) => {
                        yield Err(e);
                        break;
                    }
                    None => {
                        yield Err(Error::WatchEnded {
                            target: name.clone(),
                            reason: "the store closed the stream".into(),
                        });
                        break;
                    }
                }
            }
        }))
    }
}
