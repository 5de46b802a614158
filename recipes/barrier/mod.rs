//! Barriers: [`Barrier`] (everyone waits until a key is removed) and [`DoubleBarrier`]
//! (enter together once N are present, leave together once all have left).
//!
//! A [`Barrier`] is one key (`<root>barriers/<name>/hold`): [`Barrier::hold`] marks it held,
//! [`Barrier::release`] marks it open (the key is never deleted, so an unknown outcome can be
//! settled), [`Barrier::wait`] returns once it is open. A
//! [`DoubleBarrier`] keeps one session-bound entry per participant
//! (`<root>barriers/<name>/m/<session>.<ticket>`) and a `ready` key written by whoever sees N
//! live participants.
//!
//! # Guarantees
//! - **Barrier:** `wait` returns only after a linearizable read shows the barrier open; a
//!   `wait` that started while the barrier was held returns once it is released (unless it
//!   is held again before the wait sees the release).
//! - **DoubleBarrier:** `enter` returns once N participants were present together (or the
//!   barrier was already open); `leave` returns once every participant has left. A crashed
//!   participant counts as gone one lease after its last heartbeat (on the observer's clock),
//!   so a crash never blocks `leave` forever; a closed session's entry goes at once.
//! - Lost watch events are made good by relists and periodic resyncs.
//!
//! # NOT guaranteed
//! - A [`Barrier`] held by a crashed process stays held: it is not session-bound (release it
//!   by hand, e.g. `dcoord del`).
//! - Reuse of one [`DoubleBarrier`] name for several rounds: a participant that re-enters
//!   before a slow one saw everyone leave keeps the slow one waiting. Name each round
//!   (`"stage-7"`).
//! - `enter` waiting for N participants that never come: wrap it in `tokio::time::timeout`.
//!
//! # Failure modes
//! - The store unreachable: the store's error after its retries.
//! - The session lost while inside a [`DoubleBarrier`]: [`Error::SessionLost`].
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::barrier::{Barrier, DoubleBarrier};
//! use dcoord::session::{Session, SessionOptions};
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let gate = Barrier::new(&session, "deploy")?;
//! assert!(gate.hold().await?);
//! let waiter = { let gate = gate.clone(); tokio::spawn(async move { gate.wait().await }) };
//! gate.release().await?;
//! waiter.await.unwrap()?;
//!
//! let stage = DoubleBarrier::new(&session, "stage-1", 1)?;
//! let inside = stage.enter().await?;
//! inside.leave().await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::presence::Presence;
use crate::reconcile::{Mirror, MirrorOptions, WatcherOptions};
use crate::session::Session;
use crate::store::{Cas, Consistency, Settled, Store, WatchTarget};

/// A barrier key's bytes say held (`held <nonce>`); anything else (absent, `open <nonce>`) is
/// open.
fn held(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| v.starts_with(b"held "))
}

fn exact(session: &Session, key: String) -> Arc<Mirror> {
    let resync = session.lease().max(Duration::from_secs(1));
    Mirror::shared(
        session.store().clone(),
        WatchTarget::key(key),
        MirrorOptions::default().watcher(WatcherOptions::default().resync_every(Some(resync))),
    )
}

/// A barrier: held, everyone who waits waits; released, they all go. Cheap to clone.
#[derive(Clone)]
pub struct Barrier {
    name: String,
    key: Bytes,
    store: Arc<dyn Store>,
    mirror: Arc<Mirror>,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("name", &self.name).finish()
    }
}

impl Barrier {
    /// The barrier `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under the session's root.
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(session: &Session, name: &str) -> Result<Barrier> {
        crate::keys::validate_name("barrier", name)?;
        let key = format!("{}barriers/{name}/hold", session.root());
        Ok(Barrier {
            name: name.to_string(),
            mirror: exact(session, key.clone()),
            key: Bytes::from(key),
            store: session.store().clone(),
        })
    }

    /// Holds the barrier: true if this call took it, false if it was held already.
    ///
    /// # Errors
    /// The store's errors ([`Error::Ambiguous`] if the outcome could not be settled).
    ///
    /// # Cancel safety
    /// If dropped, the barrier may or may not be held.
    pub async fn hold(&self) -> Result<bool> {
        // Every state is unique bytes (a nonce), and the key is never deleted (a release
        // writes an "open" marker), so an attempt still in flight can never land on a later
        // state: what `Cas` needs to settle an unknown outcome.
        let marker = format!("held {}", fastrand::u64(..));
        let mut current = self.store.get(&self.key, Consistency::Linearizable).await?;
        loop {
            if held(current.as_deref()) {
                return Ok(current.as_deref() == Some(marker.as_bytes()));
            }
            match Cas::new(
                &*self.store,
                &self.key,
                current.as_deref(),
                marker.as_bytes(),
            )
            .settle()
            .await?
            {
                Settled::Applied => return Ok(true),
                Settled::Rejected { current: now, .. } => current = now,
            }
        }
    }

    /// Releases the barrier (idempotent): every waiter goes.
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the barrier may or may not be released.
    pub async fn release(&self) -> Result<()> {
        let open = format!("open {}", fastrand::u64(..));
        self.store.put(&self.key, open.as_bytes()).await
    }

    /// True if the barrier is held now (a linearizable read).
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn is_held(&self) -> Result<bool> {
        let now = self.store.get(&self.key, Consistency::Linearizable).await?;
        Ok(held(now.as_deref()))
    }

    /// Returns once the barrier is not held (at once if it is not).
    ///
    /// # Errors
    /// The store's errors; [`Error::Stopped`] if the engine stopped.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn wait(&self) -> Result<()> {
        // The mirror first (no read when the watch already shows it gone), then a linearizable
        // read so a lagging mirror never opens the barrier early.
        loop {
            self.mirror
                .wait_for(|snap| !held(snap.get(&self.key).map(|e| &e.value[..])))
                .await?;
            if !self.is_held().await? {
                return Ok(());
            }
            let mut rx = self.mirror.subscribe();
            tokio::select! {
                _ = rx.wait_for(|snap| held(snap.get(&self.key).map(|e| &e.value[..]))) => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// A double barrier for `count` participants. Cheap to clone.
#[derive(Clone)]
pub struct DoubleBarrier {
    name: String,
    count: usize,
    ready: Bytes,
    ready_mirror: Arc<Mirror>,
    presence: Arc<Presence>,
}

impl fmt::Debug for DoubleBarrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleBarrier")
            .field("name", &self.name)
            .field("count", &self.count)
            .finish()
    }
}

impl DoubleBarrier {
    /// The double barrier `name` for `count` participants, under the session's root. Must be
    /// called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name or `count == 0`.
    pub fn new(session: &Session, name: &str, count: usize) -> Result<DoubleBarrier> {
        crate::keys::validate_name("barrier", name)?;
        if count == 0 {
            return Err(Error::InvalidArgument(format!(
                "double barrier {name:?}: count must be at least 1"
            )));
        }
        let base = format!("{}barriers/{name}/", session.root());
        let ready = format!("{base}ready");
        Ok(DoubleBarrier {
            name: name.to_string(),
            count,
            ready_mirror: exact(session, ready.clone()),
            ready: Bytes::from(ready),
            presence: Arc::new(Presence::new(session, format!("{base}m/"))),
        })
    }

    /// Enters: registers this participant, then waits until `count` are present together
    /// (or the barrier already opened).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped enter removes its entry in the background.
    #[tracing::instrument(level = "debug", name = "barrier.enter", skip_all, fields(barrier = %self.name), err(level = "debug", Display))]
    pub async fn enter(&self) -> Result<Inside> {
        let p = &self.presence;
        p.session.check()?;
        let key = p.entry_key();
        let inside = Inside {
            barrier: self.clone(),
            key,
            done: false,
        };
        p.store.put(&inside.key, b"in").await?;
        let mut view = p.view().await?;
        let mut ready = self.ready_mirror.subscribe();
        loop {
            let open = ready.borrow_and_update().get(&self.ready).is_some();
            let present = view.borrow_and_update().len();
            if open {
                break;
            }
            if present >= self.count {
                p.store.put(&self.ready, b"open").await?;
                break;
            }
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return Err(Error::Stopped) },
                changed = ready.changed() => if changed.is_err() { return Err(Error::Stopped) },
                _ = p.session.lost() => { p.session.check()?; }
            }
        }
        Ok(inside)
    }
}

/// Inside a [`DoubleBarrier`]. Leave with [`Inside::leave`]; dropping it leaves in the
/// background without waiting for the others.
#[must_use = "dropping it leaves the barrier at once"]
pub struct Inside {
    barrier: DoubleBarrier,
    key: Bytes,
    done: bool,
}

impl fmt::Debug for Inside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inside")
            .field("barrier", &self.barrier.name)
            .finish()
    }
}

impl Inside {
    /// Leaves, then waits until every participant has left (a crashed one counts as gone one
    /// lease after its last heartbeat); the last to see it closes the barrier.
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// If dropped, this participant has left or leaves in the background; the barrier may
    /// stay open until another participant's `leave` returns.
    #[tracing::instrument(level = "debug", name = "barrier.leave", skip_all, fields(barrier = %self.barrier.name), err(level = "debug", Display))]
    pub async fn leave(mut self) -> Result<()> {
        let b = self.barrier.clone();
        let p = &b.presence;
        let res = p.store.delete(&self.key).await;
        self.done = res.is_ok();
        res?;
        drop(self);
        let mut view = p.view().await?;
        loop {
            view.wait_for(|live| live.is_empty())
                .await
                .map_err(|_| Error::Stopped)?;
            // The view says everyone left; a linearizable scan must agree (dead entries are
            // deleted by the view once confirmed) before the barrier closes.
            if p.store.scan_prefix(&p.prefix).await?.entries.is_empty() {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), view.changed()).await;
        }
        p.store.delete(&b.ready).await
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, key) = (self.barrier.presence.store.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}
