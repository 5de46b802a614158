//! `lock::Mutex`: a fair, fenced, crash-safe distributed lock with one-write handoff.
//!
//! The state of a lock lives in ONE record (`<root>locks/<name>/rec`), changed only by
//! compare-and-swap: the holder, the waiters in arrival order, and `epoch`, the fencing token
//! of the latest grant. The record is never deleted and never has a TTL, so tokens increase
//! forever. A waiter announces itself with a key of its own (`<root>locks/<name>/w/...`, a
//! plain put that contends with nobody); the releasing holder takes every announced waiter
//! into the queue and hands the lock to the first one in the same write. Liveness comes from
//! the [`Session`] each participant names in the record: one heartbeat per process, however
//! many locks it holds or waits for.
//!
//! # Guarantees
//! - **At most one live holder.** A grant is a CAS on the record; a crashed holder's lock is
//!   taken over only after its session showed no heartbeat for its lease, measured on the
//!   waiter's own monotonic clock and confirmed by a linearizable read (no synchronized
//!   clocks, no d-engine TTL).
//! - **Fencing.** Every grant carries [`MutexGuard::fencing_token`], strictly greater than every
//!   earlier grant's. [`MutexGuard::fenced_put`] / [`fenced_put`] write a key only if no newer
//!   token has written it.
//! - **Dead participants are dropped.** A waiter that sees any participant in front of it
//!   dead (holder or waiter) removes it from the record, confirmed the same way; the next live
//!   participant is granted in that write.
//! - **`lost()` comes first.** A holder's [`MutexGuard::lost`] fires when its session's
//!   renewals have failed long enough that a waiter could take over, *before* one can (the
//!   holder counts from when it sent its last successful renewal, a waiter from when it saw
//!   it), or when the record shows another grant.
//! - **FIFO.** Waiters are served in arrival order (the order of their announcements in the
//!   Raft log; among live waiters). A release hands the lock to the first waiter *in the same
//!   write* (one consensus write + one watch notification per handoff). No waiter sends a CAS
//!   on a release, and announcing never conflicts with anything: under contention the record
//!   sees one CAS per grant.
//! - **Cancel-safe acquire.** Dropping an `acquire()` future removes its queue entry (or
//!   releases a grant that raced with the drop) in the background; an entry left by a crashed
//!   process is skipped once its session's lease runs out.
//! - **Idempotent release** that never releases someone else's grant; an ambiguous write is
//!   resolved by re-reading the record.
//!
//! # NOT guaranteed
//! - Mutual exclusion of *effects* against a process paused past its lease: it learns of the
//!   loss when it resumes. Protect effects with the fencing token.
//! - Bounded waiting when the holder is alive: a holder keeps the lock as long as its session
//!   lives. Use `tokio::time::timeout` around `acquire()`.
//! - Fairness against waiters whose sessions die: their turn passes once their lease runs out.
//! - Every waiter still *receives* the watch notification of a change to the record (one
//!   exact-key watch each); only the new holder acts on it.
//! - Size: the queue lives in one value (1 MiB), so about 10,000 waiters per lock. The record
//!   also remembers, per session that ever waited, its last ticket (pruned once 256 sessions
//!   are remembered, dropping dead ones).
//! - Strict FIFO between two waiters whose announcements a relist saw only as a snapshot
//!   (no per-key revision): they are ordered by session id then.
//!
//! # Failure modes
//! - The store unreachable: `acquire` returns the store's error after its retries
//!   ([`Error::Unavailable`]); a waiter already queued keeps waiting while its session lives.
//! - The session lost while waiting or holding: [`Error::SessionLost`]; start a new session.
//! - The record holds bytes dcoord did not write: [`Error::Decode`] naming the key; the record
//!   is never reset.
//! - A release or a cancelled acquire whose write fails: it is retried in the background for
//!   as long as the session lives. A slot of this session that no task here owns any more
//!   (its leave never got written) is removed by the next `acquire` of the same session, so a
//!   failure can never leave a holder nobody is behind a live session.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::session::{Session, SessionOptions};
//! use dcoord::lock::Mutex;
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let lock = Mutex::new(&session, "orders")?;
//! let guard = lock.acquire().await?;
//! guard.fenced_put(b"/app/orders/owner", b"me").await?;
//! let token = guard.fencing_token();
//! guard.release().await?;
//! assert!(lock.acquire().await?.fencing_token() > token);
//! # Ok(()) }
//! ```

mod guard;

use std::fmt;
use std::sync::Arc;

pub use crate::fair::fence::{Fenced, fenced_get, fenced_put};
pub use guard::MutexGuard;

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::fair::Fair;
use crate::session::Session;

/// A named distributed lock. Cheap to clone; clones share one watch on the lock record.
#[derive(Clone)]
pub struct Mutex {
    fair: Arc<Fair>,
}

impl fmt::Debug for Mutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutex")
            .field("name", &self.fair.name)
            .field("session", &self.fair.session.id())
            .finish()
    }
}

/// What a lock record says right now (see [`Mutex::info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The fencing token of the latest grant (0: never granted).
    pub token: u64,
    /// The session id of the holder, if held.
    pub holder: Option<String>,
    /// Session ids of the waiters, in arrival order.
    pub waiters: Vec<String>,
}

impl Mutex {
    /// The lock `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under the session's root.
    /// Starts watching the lock record; must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(session: &Session, name: &str) -> Result<Mutex> {
        Ok(Mutex {
            fair: Fair::open(session, "lock", "locks", name, 1)?,
        })
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.fair.name
    }

    /// The key of the lock record.
    pub fn key(&self) -> &[u8] {
        &self.fair.key
    }

    /// Waits until this participant holds the lock, in arrival order behind earlier waiters.
    ///
    /// # Errors
    /// [`Error::SessionLost`] if the session is (or becomes) lost; [`Error::Decode`] if the
    /// record holds foreign bytes; the store's errors if it cannot be reached.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, its queue entry is removed in the background (and
    /// a grant that raced with the drop is passed on to the next waiter). Compose a deadline
    /// with `tokio::time::timeout`.
    #[tracing::instrument(level = "debug", name = "lock.acquire", skip_all, fields(lock = %self.fair.name), err(level = "debug", Display))]
    pub async fn acquire(&self) -> Result<MutexGuard> {
        self.fair.acquire(1, None).await.map(MutexGuard::new)
    }

    /// Takes the lock only if it is free and nobody waits: `Ok(None)` otherwise (including
    /// when the holder is dead but its lease has not yet been observed to run out).
    ///
    /// # Errors
    /// As [`Mutex::acquire`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a grant that raced with the drop is released in the background.
    #[tracing::instrument(level = "debug", name = "lock.try_acquire", skip_all, fields(lock = %self.fair.name), err(level = "debug", Display))]
    pub async fn try_acquire(&self) -> Result<Option<MutexGuard>> {
        Ok(self.fair.try_acquire(1, None).await?.map(MutexGuard::new))
    }

    /// This handle's counters: grants, takeovers, CAS conflicts (a measure of contention).
    pub fn stats(&self) -> LockStats {
        let s = self.fair.stats();
        LockStats {
            grants: s.grants,
            takeovers: s.takeovers,
            conflicts: s.conflicts,
        }
    }

    /// What the lock record says now (a linearizable read).
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn info(&self) -> Result<LockInfo> {
        let info = self.fair.info().await?;
        Ok(LockInfo {
            token: info.token,
            holder: info.holders.into_iter().next().map(|h| h.session),
            waiters: info.waiters.into_iter().map(|w| w.session).collect(),
        })
    }
}

/// Counters of one [`Mutex`] handle (and its clones): see [`Mutex::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Grants received through this handle.
    pub grants: u64,
    /// Writes that removed dead participants from the record (a dead holder taken over, or
    /// dead waiters ahead dropped).
    pub takeovers: u64,
    /// Compare-and-swaps on the record that lost a race and were retried (contention).
    pub conflicts: u64,
}
