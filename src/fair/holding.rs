//! [`Holding`] (a grant), and what keeps a slot from being abandoned: the ownership marks, the
//! cancel guard of an acquire in progress, and the background leave.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use super::Fair;
use super::fence::fenced_put;
use super::record::Slot;
use crate::error::{Error, Result};
use crate::reconcile::Snapshot;
use crate::session::Owned;

impl Fair {
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
    inner: Arc<Fair>,
    me: Option<(Slot, Option<Owned>)>,
}

impl Pending {
    pub(super) fn new(inner: Arc<Fair>) -> Self {
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
pub(super) fn spawn_late_leave(inner: Arc<Fair>, me: Slot, owned: Option<Owned>) {
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
pub(super) fn spawn_leave(inner: Arc<Fair>, me: Slot, known: Option<Bytes>, owned: Option<Owned>) {
    tracing::debug!(kind = inner.kind, name = %inner.name, ?me, "leaving in the background");
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

/// A grant of a [`Fair`] queue, wrapped by each recipe's guard. Release it with
/// [`Holding::release`]; dropping it releases in the background (best effort).
pub(crate) struct Holding {
    inner: Arc<Fair>,
    me: Slot,
    /// Marks the slot owned here while the grant lives (`None` never happens for a fresh
    /// slot).
    owned: Option<Owned>,
    token: u64,
    /// The record's `seq` when the grant was seen: a newer record without it means it is over.
    seq: u64,
    known: Option<Bytes>,
    done: bool,
}

impl fmt::Debug for Holding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holding")
            .field("kind", &self.inner.kind)
            .field("name", &self.inner.name)
            .field("token", &self.token)
            .finish()
    }
}

impl Holding {
    pub(super) fn new(
        inner: Arc<Fair>,
        me: Slot,
        owned: Option<Owned>,
        token: u64,
        seq: u64,
        known: Option<Bytes>,
    ) -> Self {
        Holding {
            inner,
            me,
            owned,
            token,
            seq,
            known,
            done: false,
        }
    }

    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    pub(crate) fn fair(&self) -> &Arc<Fair> {
        &self.inner
    }

    /// The session id of this grant's holder.
    pub(crate) fn session(&self) -> &str {
        &self.me.session
    }

    /// True once the grant may be over: the session is lost, or the record shows it gone.
    pub(crate) fn is_lost(&self) -> bool {
        !self.inner.session.is_alive() || self.superseded(&self.inner.record.snapshot())
    }

    fn superseded(&self, snap: &Snapshot) -> bool {
        match snap.get(&self.inner.key) {
            Some(e) => match self.inner.decode(Some(&e.value)) {
                Ok(rec) => {
                    rec.seq > self.seq
                        && rec.grant_of(&self.me).is_none_or(|g| g.token != self.token)
                }
                Err(_) => true,
            },
            None => false,
        }
    }

    /// Resolves when the grant may be over (see [`Holding::is_lost`]). Cancel-safe.
    pub(crate) async fn lost(&self) {
        let mut rx = self.inner.record.subscribe();
        tokio::select! {
            _ = self.inner.session.lost() => {}
            _ = rx.wait_for(|snap| self.superseded(snap)) => {}
        }
    }

    fn lost_error(&self) -> Result<Error> {
        self.inner.session.check()?;
        let inner = &self.inner;
        let lock = if inner.kind == "lock" {
            inner.name.clone()
        } else {
            format!("{} {}", inner.kind, inner.name)
        };
        Ok(Error::LockLost {
            lock,
            token: self.token,
        })
    }

    /// `fenced_put` under this grant's token, refused at once if the grant is over.
    pub(crate) async fn fenced_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        if self.is_lost() {
            return Err(self.lost_error()?);
        }
        fenced_put(&*self.inner.store, key, self.token, value).await
    }

    /// Replaces this grant's value in the record (an election's leader value), keeping the
    /// grant and its token. Retries conflicts; [`Error::LockLost`] if the grant is over.
    pub(crate) async fn proclaim(&mut self, value: &[u8]) -> Result<()> {
        let inner = self.inner.clone();
        let want = super::record::encode_value(value);
        let mut current = inner.current(self.known.take()).await?;
        loop {
            let rec = inner.decode(current.as_ref())?;
            let grant = rec.grant_of(&self.me).filter(|g| g.token == self.token);
            let Some(grant) = grant else {
                return Err(self.lost_error()?);
            };
            if grant.entry.value.as_deref() == Some(&want[..]) {
                self.known = current;
                return Ok(());
            }
            let next = rec
                .proclaim(&self.me, value)
                .expect("the grant is in the record");
            current = inner.cas(current, &next, None).await?;
        }
    }

    /// Gives the grant back: granting whoever now fits in the same write, or (a capacity above
    /// 1, where releases race) in one write that does so if the record is still the one in
    /// sight and puts a release marker, which the next writer applies, if not (see the
    /// module docs of `fair`). Idempotent, and never releases a later grant (after a takeover it does
    /// nothing). If the future is dropped midway, the release is finished in the background.
    pub(crate) async fn release(mut self) -> Result<()> {
        let known = self.known.take();
        let res = if self.inner.capacity > 1 {
            self.inner.release(&self.me, self.token, known).await
        } else {
            self.inner.leave(&self.me, known).await
        };
        if res.is_ok() {
            self.done = true;
            self.owned = None;
        }
        res
    }
}

impl Drop for Holding {
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
