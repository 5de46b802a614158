//! `membership::Group`: session-bound membership with a value per member: a service
//! registry, presence, a worker roster.
//!
//! A member is one key (`<root>groups/<name>/m/<session>.<ticket>`) holding its value, written
//! with a plain put (joins never contend). It lives as long as its session: observers drop a
//! member at once when its session closes, and one lease after its last heartbeat when its
//! process dies, measured on their own monotonic clock; the observer that sees the death then
//! confirms it with a linearizable read and deletes the entry, so later snapshots agree.
//!
//! # Guarantees
//! - **A joined member is listed** by every observer from the moment the observer's watch
//!   delivers the join (or a relist shows it) until it leaves or its session dies.
//! - **Dead members disappear**: one lease after the last heartbeat (observer's clock), or at
//!   once after [`Session::close`](crate::session::Session::close) or [`Membership::leave`].
//! - **Observers converge** after lost watch events (relists, periodic resync).
//!
//! # NOT guaranteed
//! - That all observers agree at every instant: each decides death on its own clock.
//! - [`Group::members`] (a one-shot read) cannot see a crashed member's death, only a closed
//!   session's: it lists a crashed member until some observer ([`Group::watch`]) has reaped
//!   it.
//! - A member paused past its lease may be reaped and come back to find its entry gone:
//!   [`Membership::lost`] tells it; join again.
//!
//! # Failure modes
//! - The store unreachable: the store's error after its retries; nothing half-written.
//! - A value over 64 KiB: [`Error::InvalidArgument`], nothing written.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::membership::Group;
//! use dcoord::session::{Session, SessionOptions};
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let group = Group::new(&session, "api")?;
//! let mut view = group.watch().await?;
//! let me = group.join("10.0.0.7:8080").await?;
//! view.wait_for(|members| members.len() == 1).await.unwrap();
//! assert_eq!(&view.borrow()[0].value[..], b"10.0.0.7:8080");
//! me.leave().await?;
//! view.wait_for(|members| members.is_empty()).await.unwrap();
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::presence::{Presence, Present, check_value};
use crate::session::Session;

/// A named group. Cheap to clone; clones share one watch.
#[derive(Clone)]
pub struct Group {
    name: String,
    presence: Arc<Presence>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group").field("name", &self.name).finish()
    }
}

/// A member as observers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's id (unique per join): `<session>.<ticket>`.
    pub id: String,
    /// The member's session id.
    pub session: String,
    /// Its value.
    pub value: Bytes,
}

impl Group {
    /// The group `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under the session's root.
    /// Starts watching the group; must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(session: &Session, name: &str) -> Result<Group> {
        crate::keys::validate_name("group", name)?;
        let prefix = format!("{}groups/{name}/m/", session.root());
        Ok(Group {
            name: name.to_string(),
            presence: Arc::new(Presence::new(session, prefix)),
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn member(&self, p: Present) -> Member {
        let id = String::from_utf8_lossy(&p.key[self.presence.prefix.len()..]).into_owned();
        Member {
            id,
            session: p.session,
            value: p.value,
        }
    }

    /// Joins with `value`; the membership lasts until [`Membership::leave`], its drop, or the
    /// session's end. A session may join several times (each join is its own member).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::InvalidArgument`] for a value over 64 KiB; the
    /// store's errors (nothing written).
    ///
    /// # Cancel safety
    /// If dropped, the entry may have been written; it is then removed with the session.
    #[tracing::instrument(level = "debug", name = "group.join", skip_all, fields(group = %self.name), err(level = "debug", Display))]
    pub async fn join(&self, value: impl AsRef<[u8]>) -> Result<Membership> {
        let value = value.as_ref();
        check_value("member", value)?;
        let p = &self.presence;
        p.session.check()?;
        let key = p.entry_key();
        p.store.put(&key, value).await?;
        Ok(Membership {
            id: String::from_utf8_lossy(&key[p.prefix.len()..]).into_owned(),
            presence: p.clone(),
            key,
            done: false,
        })
    }

    /// The members now: a linearizable read, without those whose session has closed (see the
    /// module docs for crashed members).
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (reads).
    pub async fn members(&self) -> Result<Vec<Member>> {
        let found = self.presence.scan().await?;
        Ok(found.into_iter().map(|p| self.member(p)).collect())
    }

    /// A live view of the members (in join order), updated on every change, dropping dead
    /// members one lease after their last heartbeat. Returns once the members and their
    /// heartbeats have been read. The view stops when every receiver is dropped.
    ///
    /// # Errors
    /// The store's errors (the first read).
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped call starts nothing.
    pub async fn watch(&self) -> Result<watch::Receiver<Vec<Member>>> {
        let mut raw = self.presence.view().await?;
        let first: Vec<Member> = raw
            .borrow_and_update()
            .iter()
            .cloned()
            .map(|p| self.member(p))
            .collect();
        let (tx, rx) = watch::channel(first);
        let group = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = raw.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let now: Vec<Member> = raw
                    .borrow_and_update()
                    .iter()
                    .cloned()
                    .map(|p| group.member(p))
                    .collect();
                tx.send_replace(now);
            }
        });
        Ok(rx)
    }
}

/// This process's membership of a [`Group`]. Leave with [`Membership::leave`]; dropping it
/// leaves in the background (best effort; the session's end removes it in any case).
#[must_use = "dropping the membership leaves the group at once"]
pub struct Membership {
    presence: Arc<Presence>,
    id: String,
    key: Bytes,
    done: bool,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership").field("id", &self.id).finish()
    }
}

impl Membership {
    /// This member's id (as [`Member::id`] shows it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the value (a plain put).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::InvalidArgument`] for a value over 64 KiB; the
    /// store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the new value may or may not have been written.
    pub async fn update(&self, value: impl AsRef<[u8]>) -> Result<()> {
        let value = value.as_ref();
        check_value("member", value)?;
        self.presence.session.check()?;
        self.presence.store.put(&self.key, value).await
    }

    /// Resolves when this member is gone from the group: the session is lost, or an observer
    /// reaped the entry (it saw the session dead: a pause past the lease).
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        tokio::select! {
            _ = self.presence.session.lost() => {}
            _ = self.presence.gone(&self.key) => {}
        }
    }

    /// Leaves the group (deletes the entry). Idempotent.
    ///
    /// # Errors
    /// The store's errors; the entry then goes with the session.
    ///
    /// # Cancel safety
    /// If dropped midway, the entry is deleted in the background.
    pub async fn leave(mut self) -> Result<()> {
        let res = self.presence.store.delete(&self.key).await;
        self.done = res.is_ok();
        res
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, key) = (self.presence.store.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}
