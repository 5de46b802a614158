//! `election::Election`: leader election with a value, fencing tokens, and observers.
//!
//! The same machinery as [`lock::Mutex`](crate::lock::Mutex): candidates queue in one
//! CAS-managed record, the leader is its holder, and the leader's value lives in the record
//! next to its token, so a reader sees who leads, since when (the token) and with what value
//! in one read. Liveness comes from the candidates' [`Session`]s.
//!
//! # Guarantees
//! - **At most one live leader.** Leading is a CAS on the record; a crashed leader is replaced
//!   one lease after its last heartbeat, on the next candidate's own monotonic clock,
//!   confirmed by a linearizable read.
//! - **Terms are fenced.** Every term has a [`Leadership::token`] strictly greater than every
//!   earlier term's; [`Leadership::fenced_put`] writes only if no later term wrote the key.
//!   Two terms never overlap on a fenced register.
//! - **`lost()` comes first.** A leader whose session cannot renew learns it lost leadership
//!   ([`Leadership::lost`]) before any candidate can take over.
//! - **FIFO among candidates.** When a term ends the longest-waiting live candidate leads,
//!   in the same write as the resignation (one consensus write per handoff).
//! - **Observers converge.** [`Election::observe`] reports every leader change the record
//!   shows (a lost watch event is made good by a relist) and reports a leader that stopped
//!   heartbeating as gone one lease after its last heartbeat, on the observer's own clock,
//!   even when no candidate is left to replace it.
//! - **Cancel-safe campaign.** Dropping a `campaign()` future withdraws the candidacy in the
//!   background (and resigns a term that raced with the drop).
//!
//! # NOT guaranteed
//! - Exclusion of *effects* against a leader paused past its lease: use the token.
//! - That observers see every intermediate term: a watch delivers the latest state, and
//!   terms shorter than a round trip may be skipped.
//! - An observer's verdict on a silent leader comes from its watch of the heartbeats: an
//!   observer whose watch stalls for a lease may report a live leader gone until its watch
//!   recovers; an observer started after the leader died counts the lease from its start.
//! - [`Election::leader`] is the record as written: a crashed leader stays named there until a
//!   candidate replaces it (only an observer over time can tell it is dead).
//!
//! # Failure modes
//! - The store unreachable: the store's error after its retries ([`Error::Unavailable`]).
//! - The session lost while campaigning or leading: [`Error::SessionLost`].
//! - Foreign bytes in the record: [`Error::Decode`] naming the key, nothing overwritten.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::election::Election;
//! use dcoord::session::{Session, SessionOptions};
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let session = Session::start(store, SessionOptions::default()).await?;
//! let election = Election::new(&session, "scheduler")?;
//! let mut leading = election.campaign("10.0.0.7:8080").await?;
//! leading.proclaim("10.0.0.7:9090").await?;
//! let leader = election.leader().await?.expect("someone leads");
//! assert_eq!((leader.token, &leader.value[..]), (leading.token(), &b"10.0.0.7:9090"[..]));
//! leading.resign().await?;
//! assert!(election.leader().await?.is_none());
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::fair::{Fair, Holding, Record};
use crate::reconcile::Snapshot;
use crate::session::{Liveness, Session};

/// A named election. Cheap to clone; clones share one watch on the record.
#[derive(Clone)]
pub struct Election {
    fair: Arc<Fair>,
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.fair.name)
            .finish()
    }
}

/// Who leads: the leader's session, its term's token and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The leader's session id.
    pub session: String,
    /// The term's fencing token.
    pub token: u64,
    /// The value the leader campaigned with, or last proclaimed.
    pub value: Bytes,
}

fn leader_of(rec: &Record) -> Option<Leader> {
    rec.first_holder().map(|g| Leader {
        session: g.entry.slot.session.clone(),
        token: g.token,
        value: g.entry.value_bytes(),
    })
}

impl Election {
    /// The election `name` (`[A-Za-z0-9._-]`, at most 128 bytes) under the session's root.
    /// Starts watching the record; must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(session: &Session, name: &str) -> Result<Election> {
        Ok(Election {
            fair: Fair::open(session, "election", "elections", name, 1)?,
        })
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.fair.name
    }

    /// Waits to lead, behind the candidates that campaigned earlier; `value` is published as
    /// the leader's value once this candidate leads.
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::Decode`]; [`Error::InvalidArgument`] for a value over
    /// the store's limit; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, the candidacy is withdrawn in the background
    /// (and a term that raced with the drop is resigned).
    #[tracing::instrument(level = "debug", name = "election.campaign", skip_all, fields(election = %self.fair.name), err(level = "debug", Display))]
    pub async fn campaign(&self, value: impl AsRef<[u8]>) -> Result<Leadership> {
        let value = value.as_ref();
        check_value(value)?;
        let holding = self.fair.acquire(1, Some(value)).await?;
        Ok(Leadership::new(holding, value))
    }

    /// Leads only if nobody leads or campaigns now: `Ok(None)` otherwise.
    ///
    /// # Errors
    /// As [`Election::campaign`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a term that raced with the drop is resigned in the background.
    pub async fn try_campaign(&self, value: impl AsRef<[u8]>) -> Result<Option<Leadership>> {
        let value = value.as_ref();
        check_value(value)?;
        let holding = self.fair.try_acquire(1, Some(value)).await?;
        Ok(holding.map(|h| Leadership::new(h, value)))
    }

    /// The leader the record names now (a linearizable read). A crashed leader stays named
    /// until a candidate replaces it: use [`Election::observe`] to see it go.
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let bytes = self
            .fair
            .store
            .get(&self.fair.key, crate::store::Consistency::Linearizable)
            .await?;
        Ok(leader_of(&self.fair.decode(bytes.as_ref())?))
    }

    /// The session ids of the candidates waiting to lead, in order.
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn candidates(&self) -> Result<Vec<String>> {
        let info = self.fair.info().await?;
        Ok(info.waiters.into_iter().map(|m| m.session).collect())
    }

    /// A receiver of the current leader, updated on every change: a new term, a proclaimed
    /// value, a resignation, and a leader whose heartbeat stopped for its lease (reported as
    /// `None` until someone leads again). Returns once the record has been read, so the first
    /// value is the truth, not a placeholder. The observer stops when every receiver is
    /// dropped.
    ///
    /// # Errors
    /// [`Error::Decode`] for foreign bytes; the store's errors (the record or the heartbeats
    /// could not be read). Later decode errors keep the last good value and are logged.
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped call starts nothing.
    pub async fn observe(&self) -> Result<watch::Receiver<Option<Leader>>> {
        let fair = self.fair.clone();
        let mut records = fair.subscribe();
        fair.ready().await?;
        let mut peers = fair.session.peers().await?.subscribe();
        let mut observer = Observer {
            liveness: Liveness::new(fair.session.lease()),
            tracked: None,
            fair,
        };
        let snap = records.borrow_and_update().clone();
        let first = observer.leader(&snap, &peers.borrow_and_update())?;
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            loop {
                let wake = observer.expiry();
                tokio::select! {
                    changed = records.changed() => if changed.is_err() { return },
                    changed = peers.changed() => if changed.is_err() { return },
                    _ = sleep_until(wake) => {}
                    _ = tx.closed() => return,
                }
                let snap = records.borrow_and_update().clone();
                let view = peers.borrow_and_update().clone();
                match observer.leader(&snap, &view) {
                    Ok(now) => {
                        tx.send_if_modified(|l| {
                            let changed = *l != now;
                            *l = now;
                            changed
                        });
                    }
                    Err(e) => {
                        tracing::warn!(election = %observer.fair.name, error = %e, "cannot read the election record; keeping the last leader")
                    }
                }
            }
        });
        Ok(rx)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn check_value(value: &[u8]) -> Result<()> {
    // The value is stored twice over in base64 (arrival key, record): keep it well inside a
    // value's limit.
    const MAX: usize = 64 * 1024;
    if value.len() > MAX {
        return Err(Error::InvalidArgument(format!(
            "an election value is at most {MAX} bytes (got {})",
            value.len()
        )));
    }
    Ok(())
}

/// An observer's view: the record's leader, unless its heartbeat stopped for its lease.
struct Observer {
    fair: Arc<Fair>,
    liveness: Liveness,
    /// The session of the leader the record names.
    tracked: Option<String>,
}

impl Observer {
    fn leader(&mut self, snap: &Snapshot, peers: &Snapshot) -> Result<Option<Leader>> {
        let rec = match self.fair.record_in(snap) {
            Some(rec) => rec?,
            None => return Ok(None),
        };
        let leader = leader_of(&rec);
        self.tracked = leader.as_ref().map(|l| l.session.clone());
        let Some(leader) = leader else {
            self.liveness.retain(|_| false);
            return Ok(None);
        };
        let session = &self.fair.session;
        session.observe_peers(peers, &[&leader.session], &mut self.liveness);
        let dead = self.liveness.is_dead(&leader.session, Instant::now());
        Ok((!dead).then_some(leader))
    }

    /// When the tracked leader would count as dead (`None`: nothing to wait for).
    fn expiry(&self) -> Option<Instant> {
        let at = self.liveness.expires_at(self.tracked.as_deref()?)?;
        (at > Instant::now()).then_some(at)
    }
}

/// Leadership of an [`Election`] for one term. Resign with [`Leadership::resign`]; dropping
/// it resigns in the background (best effort).
#[must_use = "dropping the leadership resigns at once"]
pub struct Leadership {
    holding: Holding,
    value: Bytes,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("election", &self.holding.fair().name)
            .field("token", &self.holding.token())
            .finish()
    }
}

impl Leadership {
    fn new(holding: Holding, value: &[u8]) -> Self {
        Leadership {
            holding,
            value: Bytes::copy_from_slice(value),
        }
    }

    /// This term's fencing token: strictly greater than every earlier term's.
    pub fn token(&self) -> u64 {
        self.holding.token()
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.holding.fair().name
    }

    /// The leader's session id (this process's).
    pub fn session(&self) -> &str {
        self.holding.session()
    }

    /// The value published for this term now.
    pub fn value(&self) -> &Bytes {
        &self.value
    }

    /// True once the term may be over: the session is lost, or the record shows another
    /// leader (or none).
    pub fn is_lost(&self) -> bool {
        self.holding.is_lost()
    }

    /// Resolves when the term may be over (see [`Leadership::is_lost`]): stop leading. Fires
    /// before any candidate can take over after a renewal failure.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        self.holding.lost().await
    }

    /// Publishes `value` as the leader's value, keeping the term and its token.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the term is over; [`Error::SessionLost`];
    /// [`Error::InvalidArgument`] for a value over the limit; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the value may or may not have been published; the term is unaffected.
    #[tracing::instrument(level = "debug", name = "election.proclaim", skip_all, fields(token = self.token()), err(level = "debug", Display))]
    pub async fn proclaim(&mut self, value: impl AsRef<[u8]>) -> Result<()> {
        let value = value.as_ref();
        check_value(value)?;
        self.holding.proclaim(value).await?;
        self.value = Bytes::copy_from_slice(value);
        Ok(())
    }

    /// Writes `value` to `key` fenced by this term's token (see
    /// [`fenced_put`](crate::lock::fenced_put)).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; [`Error::LockLost`] if the term is over; [`Error::Fenced`];
    /// [`Error::Decode`]; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the write may or may not have happened; the fence held either way.
    pub async fn fenced_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.holding.fenced_put(key, value).await
    }

    /// Ends the term: the longest-waiting candidate leads in the same write. Idempotent;
    /// never ends a later term.
    ///
    /// # Errors
    /// The store's errors; the resignation is then finished in the background, or the term
    /// ends with the lease.
    ///
    /// # Cancel safety
    /// If dropped midway, the resignation is finished in the background.
    #[tracing::instrument(level = "debug", name = "election.resign", skip_all, fields(token = self.token()), err(level = "debug", Display))]
    pub async fn resign(self) -> Result<()> {
        self.holding.release().await
    }
}
