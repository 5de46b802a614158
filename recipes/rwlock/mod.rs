//! `rwlock::RwLock`: many readers or one writer, across processes; fair, fenced and
//! crash-safe.
//!
//! The same machinery as [`lock::Mutex`](crate::lock::Mutex), with a capacity of
//! [`MAX_READERS`]: a reader takes one unit, a writer all of them. Requests are served in
//! arrival order and nobody passes the head of the queue, so a waiting writer holds back the
//! readers that arrive after it: writers are never starved.
//!
//! # Guarantees
//! - **Readers or one writer.** Never a writer together with anyone else among live
//!   sessions; a crashed holder is dropped only after its session showed no heartbeat for its
//!   lease on a waiter's own clock, confirmed by a linearizable read.
//! - **FIFO, no writer starvation**: a reader arriving after a waiting writer waits for it.
//!   Readers that arrive together while the lock is free or read-held are granted together.
//! - **Fencing.** Every grant (read or write) carries a token strictly greater than every
//!   earlier grant's; `fenced_put` writes only if no newer grant wrote the key.
//! - **`lost()` comes first**, cancel-safe acquires and idempotent releases, as for the lock.
//!
//! # NOT guaranteed
//! - Exclusion of *effects* against a holder paused past its lease: use the fencing token.
//!   A writer's token is newer than every reader's before it, so fenced writes by readers
//!   that lost their grant are rejected once the writer has written the key.
//! - Fenced writes shared by readers: each read grant has its own token, so two readers
//!   writing the same key with `fenced_put` fence each other. Readers should not write.
//! - Upgrades: a reader cannot become the writer in place (release, then `write()`).
//! - More than [`MAX_READERS`] concurrent readers.
//!
//! # Failure modes
//! As [`lock::Mutex`](crate::lock::Mutex): [`Error::Unavailable`], [`Error::SessionLost`],
//! [`Error::Decode`] for foreign bytes in the record, and for a dcoord from before release
//! markers reading this one's record (format version 4; upgrade the processes together, as
//! for [`semaphore`](crate::semaphore)).
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::rwlock::RwLock;
//! use dcoord::session::{Session, SessionOptions};
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let lock = RwLock::new(&session, "catalog")?;
//! let (r1, r2) = (lock.read().await?, lock.read().await?);
//! assert!(lock.try_write().await?.is_none(), "readers hold it");
//! let read_token = r2.fencing_token();
//! r1.release().await?;
//! r2.release().await?;
//! let w = lock.write().await?;
//! assert!(w.is_write() && w.fencing_token() > read_token);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::fair::{Fair, Holding};
use crate::session::Session;

/// The most readers that can hold an [`RwLock`] at once.
pub const MAX_READERS: u64 = 1 << 20;

/// A named read-write lock. Cheap to clone; clones share one watch on the record.
#[derive(Clone)]
pub struct RwLock {
    fair: Arc<Fair>,
}

impl fmt::Debug for RwLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwLock")
            .field("name", &self.fair.name)
            .finish()
    }
}

/// Who holds an [`RwLock`] now (see [`RwLock::info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RwLockInfo {
    /// The fencing token of the latest grant (0: never granted).
    pub token: u64,
    /// The writer's session id, if write-held.
    pub writer: Option<String>,
    /// The readers' session ids (one per read grant).
    pub readers: Vec<String>,
    /// Waiters in arrival order: (session id, wants to write).
    pub waiters: Vec<(String, bool)>,
}

impl RwLock {
    /// The read-write lock `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under the session's
    /// root. Starts watching the record; must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(session: &Session, name: &str) -> Result<RwLock> {
        Ok(RwLock {
            fair: Fair::open(session, "rwlock", "rwlocks", name, MAX_READERS)?,
        })
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.fair.name
    }

    /// Waits for a read grant, behind every earlier request (a waiting writer first).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::Decode`]; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`lock::Mutex::acquire`](crate::lock::Mutex::acquire).
    #[tracing::instrument(level = "debug", name = "rwlock.read", skip_all, fields(rwlock = %self.fair.name), err(level = "debug", Display))]
    pub async fn read(&self) -> Result<RwLockGuard> {
        Ok(RwLockGuard::new(self.fair.acquire(1, None).await?, false))
    }

    /// Waits for the write grant, behind every earlier request.
    ///
    /// # Errors
    /// As [`RwLock::read`].
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`lock::Mutex::acquire`](crate::lock::Mutex::acquire).
    #[tracing::instrument(level = "debug", name = "rwlock.write", skip_all, fields(rwlock = %self.fair.name), err(level = "debug", Display))]
    pub async fn write(&self) -> Result<RwLockGuard> {
        Ok(RwLockGuard::new(
            self.fair.acquire(MAX_READERS, None).await?,
            true,
        ))
    }

    /// A read grant only if no writer holds or waits: `Ok(None)` otherwise.
    ///
    /// # Errors
    /// As [`RwLock::read`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a grant that raced with the drop is given back in the background.
    pub async fn try_read(&self) -> Result<Option<RwLockGuard>> {
        let h = self.fair.try_acquire(1, None).await?;
        Ok(h.map(|h| RwLockGuard::new(h, false)))
    }

    /// The write grant only if nobody holds or waits: `Ok(None)` otherwise.
    ///
    /// # Errors
    /// As [`RwLock::read`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a grant that raced with the drop is given back in the background.
    pub async fn try_write(&self) -> Result<Option<RwLockGuard>> {
        let h = self.fair.try_acquire(MAX_READERS, None).await?;
        Ok(h.map(|h| RwLockGuard::new(h, true)))
    }

    /// What the record says now (a linearizable read).
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn info(&self) -> Result<RwLockInfo> {
        let info = self.fair.info().await?;
        let (writers, readers): (Vec<_>, Vec<_>) =
            info.holders.into_iter().partition(|m| m.n == MAX_READERS);
        Ok(RwLockInfo {
            token: info.token,
            writer: writers.into_iter().next().map(|m| m.session),
            readers: readers.into_iter().map(|m| m.session).collect(),
            waiters: info
                .waiters
                .into_iter()
                .map(|m| (m.session, m.n == MAX_READERS))
                .collect(),
        })
    }
}

/// A read or write grant of an [`RwLock`]. Release it with [`RwLockGuard::release`];
/// dropping it releases in the background (best effort).
#[must_use = "dropping the guard releases the lock at once"]
pub struct RwLockGuard {
    holding: Holding,
    write: bool,
}

impl fmt::Debug for RwLockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwLockGuard")
            .field("rwlock", &self.holding.fair().name)
            .field("write", &self.write)
            .field("token", &self.holding.token())
            .finish()
    }
}

impl RwLockGuard {
    fn new(holding: Holding, write: bool) -> Self {
        RwLockGuard { holding, write }
    }

    /// True for the write grant.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// The fencing token of this grant: strictly greater than every earlier grant's.
    pub fn fencing_token(&self) -> u64 {
        self.holding.token()
    }

    /// True once the grant may be over: the session is lost, or the record shows it gone.
    pub fn is_lost(&self) -> bool {
        self.holding.is_lost()
    }

    /// Resolves when the grant may be over (see [`RwLockGuard::is_lost`]).
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        self.holding.lost().await
    }

    /// Writes `value` to `key` fenced by this grant's token (see
    /// [`fenced_put`](crate::lock::fenced_put)).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::LockLost`] if the grant is over; [`Error::Fenced`];
    /// [`Error::Decode`]; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the write may or may not have happened; the fence held either way.
    pub async fn fenced_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.holding.fenced_put(key, value).await
    }

    /// Releases the grant, granting whoever now fits in the same write. Idempotent.
    ///
    /// # Errors
    /// The store's errors; the grant is then released in the background, or freed by the
    /// lease.
    ///
    /// # Cancel safety
    /// If dropped midway, the release is finished in the background.
    pub async fn release(self) -> Result<()> {
        self.holding.release().await
    }
}
