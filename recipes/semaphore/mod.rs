//! `semaphore::Semaphore`: N permits shared by many processes, granted fairly, fenced, and
//! recovered from crashed holders.
//!
//! The same machinery as [`lock::Mutex`](crate::lock::Mutex) (one CAS-managed record, arrival
//! keys, the session's heartbeat), with a capacity of N: a holder takes `n` permits at once.
//! Since several holders release at once, the releases of one process are written together,
//! one write per batch: if the record is still the one in sight, that write releases them and
//! grants whoever now fits (the whole handoff); if another process changed it meanwhile, the
//! same write puts a *marker* per release instead (a key of its own, which never collides
//! with anyone), and the first waiter the markers let in grants every waiter they let in with
//! one CAS on the record. Releases never retry against each other.
//!
//! # Guarantees
//! - **Never more than N permits held by live sessions.** A grant is a CAS on the record; a
//!   crashed holder's permits are taken back only after its session showed no heartbeat for
//!   its lease, measured on a waiter's own clock and confirmed by a linearizable read.
//! - **Fair, no passing.** Requests are served in arrival order; a request that does not fit
//!   yet blocks every request behind it, however small (a large request is never starved).
//! - **Fencing.** Every grant carries [`Permit::fencing_token`], strictly greater than every
//!   earlier grant's (of any holder); [`Permit::fenced_put`] writes a key only if no newer
//!   grant has written it.
//! - **`lost()` comes first**, as for the lock: a holder learns its permits may be gone before
//!   anyone can be granted them.
//! - **Released is released.** Once [`Permit::release`] returns, its permits count as free
//!   for every reader ([`Semaphore::info`], `try_acquire`, waiters), even before a waiter has
//!   written its grant; and a holder that releases and then crashes is never waited for.
//!   A handoff is one write when the record is as the releaser saw it, two otherwise (the
//!   marker, then the grant that applies every marker in sight).
//!   A waiter a batch of releases lets in waits at most a short patience (a twentieth of the
//!   lease, 50 to 500 ms) for the batch's writer, then writes the grant itself.
//! - **Cancel-safe acquire** and idempotent release, as for the lock.
//!
//! # NOT guaranteed
//! - Exclusion of *effects* against a holder paused past its lease: use the fencing token.
//! - Bounded waiting while the holders are alive: wrap `acquire` in `tokio::time::timeout`.
//! - Fenced writes shared by holders: every grant has its own token, so two permit holders
//!   that are both valid and write the *same* key with `fenced_put` fence each other (the
//!   older one gets [`Error::Fenced`]). Give each holder keys of its own.
//! - Agreement on N: every handle must be opened with the same `permits`. The first grant
//!   writes N into the record; a handle opened with another N gets [`Error::Decode`] naming
//!   both, and writes nothing. To change N, use a new name.
//!
//! # Failure modes
//! - The store unreachable: the store's error after its retries ([`Error::Unavailable`]).
//! - The session lost while waiting or holding: [`Error::SessionLost`].
//! - Foreign bytes in the record, or another N: [`Error::Decode`] naming the key.
//! - Mixed versions: the record is format version 4 since release markers; a dcoord from
//!   before them gets [`Error::Decode`] ("version 4 is not supported") on its next read
//!   instead of waiting for releases it cannot see. Upgrade every process that uses one
//!   semaphore (or read-write lock) together.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::semaphore::Semaphore;
//! use dcoord::session::{Session, SessionOptions};
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let pool = Semaphore::new(&session, "db-connections", 4)?;
//! let three = pool.acquire(3).await?;
//! assert!(pool.try_acquire(2).await?.is_none(), "only one permit is left");
//! let one = pool.acquire(1).await?;
//! assert!(one.fencing_token() > three.fencing_token());
//! three.release().await?;
//! assert_eq!(pool.info().await?.available, 3);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::fair::{Fair, Holding};
use crate::session::Session;

/// A named counting semaphore. Cheap to clone; clones share one watch on the record.
#[derive(Clone)]
pub struct Semaphore {
    fair: Arc<Fair>,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.fair.name)
            .field("permits", &self.fair.capacity)
            .finish()
    }
}

/// A holder of permits, as [`Semaphore::info`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitHolder {
    /// The holder's session id.
    pub session: String,
    /// How many permits it holds.
    pub permits: u64,
    /// Its grant's fencing token (0 for a waiter).
    pub token: u64,
}

/// What a semaphore's record says right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemaphoreInfo {
    /// N.
    pub permits: u64,
    /// Permits not held now and not about to be granted to a waiter (released permits that
    /// queued waiters fit into count as theirs: a writer grants them next).
    pub available: u64,
    /// The fencing token of the latest grant (0: never granted).
    pub token: u64,
    /// The holders, in grant order.
    pub holders: Vec<PermitHolder>,
    /// The waiters, in arrival order.
    pub waiters: Vec<PermitHolder>,
}

impl Semaphore {
    /// The semaphore `name` (`[A-Za-z0-9._-]`, at most 128 bytes) with `permits` permits,
    /// under the session's root. Starts watching the record; must be called within a tokio
    /// runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name or `permits == 0`.
    pub fn new(session: &Session, name: &str, permits: u64) -> Result<Semaphore> {
        Ok(Semaphore {
            fair: Fair::open(session, "semaphore", "semaphores", name, permits)?,
        })
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.fair.name
    }

    /// N.
    pub fn permits(&self) -> u64 {
        self.fair.capacity
    }

    /// Waits until `n` permits are granted, in arrival order behind earlier requests.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `1 <= n <= permits`; [`Error::SessionLost`];
    /// [`Error::Decode`]; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, its request is withdrawn in the background (and
    /// a grant that raced with the drop is given back).
    #[tracing::instrument(level = "debug", name = "semaphore.acquire", skip_all, fields(semaphore = %self.fair.name, n), err(level = "debug", Display))]
    pub async fn acquire(&self, n: u64) -> Result<Permit> {
        Ok(Permit {
            holding: self.fair.acquire(n, None).await?,
            n,
        })
    }

    /// Takes `n` permits only if they are free and nobody waits: `Ok(None)` otherwise.
    ///
    /// # Errors
    /// As [`Semaphore::acquire`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a grant that raced with the drop is given back in the background.
    #[tracing::instrument(level = "debug", name = "semaphore.try_acquire", skip_all, fields(semaphore = %self.fair.name, n), err(level = "debug", Display))]
    pub async fn try_acquire(&self, n: u64) -> Result<Option<Permit>> {
        let holding = self.fair.try_acquire(n, None).await?;
        Ok(holding.map(|holding| Permit { holding, n }))
    }

    /// What the record says now (a linearizable read).
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes or another N; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn info(&self) -> Result<SemaphoreInfo> {
        let info = self.fair.info().await?;
        let holder = |m: crate::fair::Member| PermitHolder {
            session: m.session,
            permits: m.n,
            token: m.token,
        };
        Ok(SemaphoreInfo {
            permits: self.fair.capacity,
            available: info.available,
            token: info.token,
            holders: info.holders.into_iter().map(holder).collect(),
            waiters: info.waiters.into_iter().map(holder).collect(),
        })
    }
}

/// Permits held. Give them back with [`Permit::release`]; dropping it releases in the
/// background (best effort).
#[must_use = "dropping the permit releases it at once"]
pub struct Permit {
    holding: Holding,
    n: u64,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("semaphore", &self.holding.fair().name)
            .field("permits", &self.n)
            .field("token", &self.holding.token())
            .finish()
    }
}

impl Permit {
    /// How many permits this grant holds.
    pub fn permits(&self) -> u64 {
        self.n
    }

    /// The fencing token of this grant: strictly greater than every earlier grant's.
    pub fn fencing_token(&self) -> u64 {
        self.holding.token()
    }

    /// True once the permits may be someone else's: the session is lost, or the record shows
    /// the grant over.
    pub fn is_lost(&self) -> bool {
        self.holding.is_lost()
    }

    /// Resolves when the permits may be someone else's (see [`Permit::is_lost`]).
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

    /// Gives the permits back in one write, with the other releases of this process: the
    /// grant of whoever now fits if the record is as seen, else a release marker that the
    /// first waiter that now fits applies, granting everyone who does. The permits count as
    /// free once this returns. Idempotent; never releases a later grant.
    ///
    /// # Errors
    /// The store's errors; the permits are then released in the background, or freed by the
    /// lease.
    ///
    /// # Cancel safety
    /// If dropped midway, the release is finished in the background.
    #[tracing::instrument(level = "debug", name = "semaphore.release", skip_all, fields(token = self.fencing_token()), err(level = "debug", Display))]
    pub async fn release(self) -> Result<()> {
        self.holding.release().await
    }
}
