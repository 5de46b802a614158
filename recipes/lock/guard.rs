//! [`MutexGuard`]: a lock grant.

use std::fmt;

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::fair::Holding;

/// Proof of holding a [`Mutex`](super::Mutex). Release it with [`MutexGuard::release`];
/// dropping it releases in the background (best effort).
#[must_use = "dropping the guard releases the lock at once"]
pub struct MutexGuard {
    holding: Holding,
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("lock", &self.name())
            .field("token", &self.fencing_token())
            .finish()
    }
}

impl MutexGuard {
    pub(super) fn new(holding: Holding) -> Self {
        MutexGuard { holding }
    }

    /// The fencing token of this grant: strictly greater than every earlier grant's.
    pub fn fencing_token(&self) -> u64 {
        self.holding.token()
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.holding.fair().name
    }

    /// True once the lock may belong to someone else: the session is lost, or the record
    /// shows the grant over.
    pub fn is_lost(&self) -> bool {
        self.holding.is_lost()
    }

    /// Resolves when the lock may belong to someone else (see [`MutexGuard::is_lost`]): stop
    /// the guarded work. Fires before anyone else can take over after a renewal failure.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        self.holding.lost().await
    }

    /// Writes `value` to `key` fenced by this grant's token: rejected with [`Error::Fenced`]
    /// if a newer holder has written the key. See [`fenced_put`](super::fenced_put).
    ///
    /// # Errors
    /// [`Error::SessionLost`] if the session is lost; [`Error::LockLost`] if the record already
    /// shows the grant over (taken over, or released); [`Error::Fenced`];
    /// [`Error::Decode`] if the key holds a value not written by `fenced_put`; store errors.
    ///
    /// # Cancel safety
    /// If dropped, the write may or may not have happened; the fence held either way.
    #[tracing::instrument(level = "debug", name = "lock.fenced_put", skip_all, fields(lock = %self.name(), token = self.fencing_token()), err(level = "debug", Display))]
    pub async fn fenced_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.holding.fenced_put(key, value).await
    }

    /// Releases the lock, handing it to the first waiter in the same write. Idempotent, and
    /// never releases a later grant (after a takeover it does nothing).
    ///
    /// # Errors
    /// The store's errors ([`Error::Unavailable`]); the lock is then released in the
    /// background, or freed by the lease.
    ///
    /// # Cancel safety
    /// If dropped midway, the release is finished in the background.
    #[tracing::instrument(level = "debug", name = "lock.release", skip_all, fields(lock = %self.name(), token = self.fencing_token()), err(level = "debug", Display))]
    pub async fn release(self) -> Result<()> {
        self.holding.release().await
    }
}
