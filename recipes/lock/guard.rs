//! [`MutexGuard`], and what keeps a slot from being abandoned: the ownership marks, the
//! cancel guard of an acquire in progress, and the background leave.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use super::record::{Record, Slot};
use super::{Inner, fenced_put};
use crate::error::{Error, Result};
use crate::reconcile::Snapshot;
use crate::session::Owned;

impl Inner {
    /// Marks `slot` as having an owner in this process (an acquire in progress, a guard, or a
    /// background leave): `None` if it has one already. A slot of our own session in the
    /// record that nobody here owns was abandoned (a leave that failed or was never written);
    /// waiters of our session clean it up, so a transient failure can never leave a holder
    /// nobody is.
    pub(super) fn own(&self, slot: &Slot) -> Option<Owned> {
        let mut key = self.key.to_vec();
        key.extend_from_slice(format!("#{}.{}", slot.session, slot.ticket).as_bytes());
        self.session.own(key)
    }
}

/// Removes an acquire's entry if the acquire is dropped midway (cancel safety).
pub(super) struct Pending {
    inner: Arc<Inner>,
    me: Option<(Slot, Option<Owned>)>,
}

impl Pending {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Pending { inner, me: None }
    }

    pub(super) fn arm(&mut self, me: Slot) {
        let owned = self.inner.own(&me);
        self.me = Some((me, owned));
    }

    /// The slot's ownership moves on (to a guard, or a late check).
    pub(super) fn hand_over(&mut self) -> Option<Owned> {
        self.me.take().and_then(|(_, owned)| owned)
    }

    /// The slot is known not to be in the record: nothing to clean up.
    pub(super) fn disarm(&mut self) {
        self.me = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((me, owned)) = self.me.take() {
            spawn_leave(self.inner.clone(), me, None, owned);
        }
    }
}

/// Leaves `me` one lease from now (a grab whose outcome was unknown may land late).
pub(super) fn spawn_late_leave(inner: Arc<Inner>, me: Slot, owned: Option<Owned>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            tokio::time::sleep(inner.session.lease()).await;
            spawn_leave(inner, me, None, owned);
        });
    }
}

/// Leaves `me` in the background, retried for as long as the session lives (a slot
/// abandoned in the record would block everyone behind a live session); `owned` is given up
/// when it is done.
pub(super) fn spawn_leave(inner: Arc<Inner>, me: Slot, known: Option<Bytes>, owned: Option<Owned>) {
    tracing::debug!(lock = %inner.name, ?me, "leaving in the background");
    let session = inner.session.clone();
    let mut known = known;
    let mut first = true;
    session.spawn_while_alive("background release", move || {
        let _owner = &owned;
        let (inner, me, known) = (inner.clone(), me.clone(), known.take());
        let first = std::mem::replace(&mut first, false);
        async move {
            if first {
                // First the arrival key (so no fresh observer takes the slot in), then the
                // record.
                let _ = inner.store.delete(&inner.arrival_key(&me)).await;
            }
            inner.leave(&me, known).await
        }
    });
}

/// Proof of holding a [`Mutex`](super::Mutex). Release it with [`MutexGuard::release`]; dropping it
/// releases in the background (best effort).
#[must_use = "dropping the guard releases the lock at once"]
pub struct MutexGuard {
    inner: Arc<Inner>,
    me: Slot,
    /// Marks the slot owned here while the guard lives (`None` never happens for a fresh
    /// slot).
    owned: Option<Owned>,
    token: u64,
    known: Option<Bytes>,
    done: bool,
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("lock", &self.inner.name)
            .field("token", &self.token)
            .finish()
    }
}

impl MutexGuard {
    pub(super) fn new(
        inner: Arc<Inner>,
        me: Slot,
        owned: Option<Owned>,
        token: u64,
        known: Option<Bytes>,
    ) -> Self {
        MutexGuard {
            inner,
            me,
            owned,
            token,
            known,
            done: false,
        }
    }

    /// The fencing token of this grant: strictly greater than every earlier grant's.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// True once the lock may belong to someone else: the session is lost, or the record
    /// shows a newer grant.
    pub fn is_lost(&self) -> bool {
        !self.inner.session.is_alive() || self.superseded(&self.inner.record.snapshot())
    }

    fn superseded(&self, snap: &Snapshot) -> bool {
        match snap.get(&self.inner.key) {
            Some(e) => match Record::decode(&self.inner.key, Some(&e.value)) {
                Ok(rec) => {
                    rec.epoch > self.token || (rec.epoch == self.token && !rec.is_holder(&self.me))
                }
                Err(_) => true,
            },
            None => false,
        }
    }

    /// Resolves when the lock may belong to someone else (see [`MutexGuard::is_lost`]): stop
    /// the guarded work. Fires before anyone else can take over after a renewal failure.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        let mut rx = self.inner.record.subscribe();
        tokio::select! {
            _ = self.inner.session.lost() => {}
            _ = rx.wait_for(|snap| self.superseded(snap)) => {}
        }
    }

    /// Writes `value` to `key` fenced by this grant's token: rejected with [`Error::Fenced`]
    /// if a newer holder has written the key. See [`fenced_put`].
    ///
    /// # Errors
    /// [`Error::SessionLost`] if the session is lost; [`Error::LockLost`] if the record already
    /// shows a newer grant (or this one released); [`Error::Fenced`];
    /// [`Error::Decode`] if the key holds a value not written by `fenced_put`; store errors.
    ///
    /// # Cancel safety
    /// If dropped, the write may or may not have happened; the fence held either way.
    #[tracing::instrument(level = "debug", name = "lock.fenced_put", skip_all, fields(lock = %self.inner.name, token = self.token), err(level = "debug", Display))]
    pub async fn fenced_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        if self.is_lost() {
            self.inner.session.check()?;
            return Err(Error::LockLost {
                lock: self.inner.name.clone(),
                token: self.token,
            });
        }
        fenced_put(&*self.inner.store, key, self.token, value).await
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
    pub async fn release(mut self) -> Result<()> {
        self.leave().await
    }

    #[tracing::instrument(level = "debug", name = "lock.release", skip_all, fields(lock = %self.inner.name, token = self.token), err(level = "debug", Display))]
    async fn leave(&mut self) -> Result<()> {
        let known = self.known.take();
        let res = self.inner.leave(&self.me, known).await;
        if res.is_ok() {
            self.done = true;
            self.owned = None;
        }
        res
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        if !self.done {
            let owned = self.owned.take();
            spawn_leave(
                self.inner.clone(),
                self.me.clone(),
                self.known.take(),
                owned,
            );
        }
    }
}
