//! The fair queue every exclusive-or-counted recipe is built on: `lock::Mutex` (capacity 1),
//! `semaphore::Semaphore` (N permits), `rwlock::RwLock` (readers weigh 1, a writer all) and
//! `election::Election` (capacity 1, holders carry a value).
//!
//! The state of one queue lives in ONE record (`<root><dir>/<name>/rec`), changed only by
//! compare-and-swap: the holders with their fencing tokens, the waiters in arrival order, and
//! `epoch`, the token of the latest grant. The record is never deleted and never has a TTL, so
//! tokens increase forever. A waiter announces itself with a key of its own
//! (`<root><dir>/<name>/w/<session>.<ticket>`, a plain put that contends with nobody); whoever
//! writes the record next (normally a releasing holder) takes every announced waiter into the
//! queue and grants whoever now fits in the same write. Liveness comes from the [`Session`]
//! each participant names: one heartbeat per process, however many queues it is in.
//!
//! Where several holders release at once (a capacity above 1), their CASes on the one record
//! would collide and retry in turn. So the releases of one process are written together, one
//! write per batch (`release`), and a write that finds the record changed (by another
//! process, a waiter, or since a view that was behind) puts a *release marker* per release
//! instead, in the same write
//! (`<root><dir>/<name>/r/<session>.<ticket>`, the grant's token as value; a plain put
//! again): every writer of the record applies the markers it can see, and the first waiter
//! that the markers let in writes that, so k releases cost one write that grants k waiters. A marker only ever removes the grant it names (slot and token: slots are
//! never reused), so the record stays the one authority on who holds: a pending marker only
//! keeps a permit counted as held a little longer, never the other way round. Markers that no
//! longer name a holder (and name a token at most the written record's epoch: a later grant
//! is not in it yet) are garbage, and so are the arrival keys the record has taken in. A
//! write of the record deletes the garbage in sight in the same transaction (the deletes
//! first, so a watcher never sees the new record with them still there): a handoff is one
//! write, whatever it cleans up. A leftover (garbage the writer could not see yet) goes with
//! the next write that sees it; on a store without transactions the writer deletes the garbage
//! right after its write, in the background (a leftover once per handle). Garbage that
//! lingers changes nothing. The first waiter a batch of markers lets in is the batch's writer
//! only by convention (to avoid colliding CASes): the others it lets in wait for its write
//! for a short patience (a twentieth of the lease, 50 to 500 ms), then write it themselves,
//! so a writer that is alive but stalled, or whose view is behind, delays them by that much
//! and never by a lease. Records of capacity above 1 are format version 4: a dcoord from
//! before markers refuses one with a clear `Decode` error rather than waiting for releases it
//! cannot see.
//!
//! The guarantees (at most `capacity` granted to live sessions; tokens strictly increasing;
//! `lost()` before anyone can take over; FIFO with no passing; cancel-safe waits) are stated in
//! the recipes' docs; the pure parts are `record` (the transitions) and `decide` (what a
//! waiter does next), the IO is `ops` (writes), `release` (releases above capacity 1),
//! `wait` (the waiter's loop) and `holding` (a grant, and what keeps a slot from being
//! abandoned).

mod decide;
pub(crate) mod fence;
mod holding;
mod ops;
mod record;
mod release;
mod wait;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

pub(crate) use holding::Holding;
use holding::{Pending, spawn_late_leave, spawn_leave};
use record::Entry;
pub(crate) use record::Record;
use wait::{Queued, Waiter};

use crate::error::{Error, Result};
use crate::reconcile::{Mirror, MirrorOptions, Snapshot, WatcherOptions};
use crate::session::Session;
use crate::store::{Store, WatchTarget};

/// One named fair queue, shared by a recipe handle and its clones.
pub(crate) struct Fair {
    /// What the recipe calls itself in errors, logs and metric labels ("lock", ...).
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    /// What the holders' weights add up to at most.
    pub(crate) capacity: u64,
    stats: Counters,
    /// The record.
    pub(crate) key: Bytes,
    /// Where waiters announce themselves.
    arrivals: Bytes,
    /// Where releasers leave their release markers.
    releases: Bytes,
    pub(crate) session: Session,
    pub(crate) store: Arc<dyn Store>,
    /// The record and the arrivals (one prefix watch).
    record: Arc<Mirror>,
    /// Garbage this handle has a delete in flight for (or done, not yet out of the mirror), on
    /// a store without transactions: so that its writes do not delete a leftover again and
    /// again.
    sweeping: Arc<std::sync::Mutex<std::collections::HashSet<Bytes>>>,
    /// This process's releases of the record waiting for their write (a capacity above 1).
    releasing: Arc<release::Releasing>,
}

/// A participant of a queue, as [`Fair::info`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) session: String,
    pub(crate) n: u64,
    /// The fencing token (holders only; 0 for waiters).
    pub(crate) token: u64,
    pub(crate) value: Bytes,
}

/// What a record and its arrivals say right now.
#[derive(Debug, Clone)]
pub(crate) struct Info {
    pub(crate) token: u64,
    /// The capacity nobody holds or is about to be granted: the queued waiters that released
    /// grants (markers not yet applied) make room for count as holders here.
    pub(crate) available: u64,
    pub(crate) holders: Vec<Member>,
    pub(crate) waiters: Vec<Member>,
}

impl Member {
    fn of(e: &Entry, token: u64) -> Member {
        Member {
            session: e.slot.session.clone(),
            n: e.n,
            token,
            value: e.value_bytes(),
        }
    }
}

/// Counters of one queue handle (and its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub(crate) grants: u64,
    pub(crate) takeovers: u64,
    pub(crate) conflicts: u64,
}

impl Fair {
    /// The queue `name` of `kind` under `<root><dir>/`, of `capacity`. Starts watching the
    /// record; must be called within a tokio runtime.
    pub(crate) fn open(
        session: &Session,
        kind: &'static str,
        dir: &str,
        name: &str,
        capacity: u64,
    ) -> Result<Arc<Fair>> {
        crate::keys::validate_name(kind, name)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument(format!(
                "{kind} {name:?}: the capacity must be at least 1"
            )));
        }
        let base = format!("{}{dir}/{name}/", session.root());
        let store = session.store().clone();
        let resync = session.lease().max(Duration::from_secs(1));
        let record = Mirror::shared(
            store.clone(),
            WatchTarget::prefix(base.clone()),
            MirrorOptions::default().watcher(WatcherOptions::default().resync_every(Some(resync))),
        );
        let key = Bytes::from(format!("{base}rec"));
        Ok(Arc::new(Fair {
            releasing: release::Releasing::shared(&store, &key),
            kind,
            name: name.to_string(),
            capacity,
            stats: Counters::default(),
            key,
            arrivals: Bytes::from(format!("{base}w/")),
            releases: Bytes::from(format!("{base}r/")),
            session: session.clone(),
            store,
            record,
            sweeping: Default::default(),
        }))
    }

    /// The prefix of the record, the arrivals and the release markers.
    fn base(&self) -> &[u8] {
        &self.key[..self.key.len() - "rec".len()]
    }

    fn check_weight(&self, n: u64) -> Result<()> {
        if n == 0 || n > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "{} {:?}: cannot take {n} of {} (1..={})",
                self.kind, self.name, self.capacity, self.capacity
            )));
        }
        Ok(())
    }

    /// Waits until `n` (with `value`) is granted, in arrival order behind earlier waiters.
    /// Cancel-safe: a dropped wait leaves (or passes on a grant that raced with the drop) in the
    /// background.
    pub(crate) async fn acquire(self: &Arc<Self>, n: u64, value: Option<&[u8]>) -> Result<Holding> {
        self.check_weight(n)?;
        let started = std::time::Instant::now();
        let mut pending = Pending::new(self.clone());
        let holding = match self.grab(&mut pending, n, value, false).await? {
            Some(h) => h,
            None => loop {
                self.session.check()?;
                let me = Entry::new(self.slot(), n, value);
                pending.arm(me.slot.clone());
                match Waiter::join(self, me).await?.run(&mut pending).await? {
                    Queued::Granted(h) => break h,
                    Queued::Vanished => {}
                }
            },
        };
        metrics::histogram!(crate::metrics::LOCK_WAIT_SECONDS, self.kind => self.name.clone())
            .record(started.elapsed().as_secs_f64());
        Ok(holding)
    }

    /// Takes `n` only if it fits and nobody waits: `Ok(None)` otherwise.
    pub(crate) async fn try_acquire(
        self: &Arc<Self>,
        n: u64,
        value: Option<&[u8]>,
    ) -> Result<Option<Holding>> {
        self.check_weight(n)?;
        let mut pending = Pending::new(self.clone());
        self.grab(&mut pending, n, value, true).await
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.stats;
        Stats {
            grants: c.grants.load(Ordering::Relaxed),
            takeovers: c.takeovers.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn decode(&self, bytes: Option<&Bytes>) -> Result<Record> {
        Record::decode(self.kind, &self.key, self.capacity, bytes)
    }

    /// [`Fair::decode`], shared with every other reader of the same bytes on this thread.
    pub(crate) fn decode_shared(&self, bytes: Option<&Bytes>) -> Result<Arc<Record>> {
        Record::decode_shared(self.kind, &self.key, self.capacity, bytes)
    }

    /// The record in the mirror's snapshot (`None` if the mirror has not loaded yet).
    pub(crate) fn record_in(&self, snap: &Snapshot) -> Option<Result<Record>> {
        if !snap.is_ready() {
            return None;
        }
        Some(self.decode(snap.get(&self.key).map(|e| &e.value)))
    }

    /// The mirror of the record and its arrivals.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.record.subscribe()
    }

    /// The mirror's first complete snapshot (at once if it has loaded).
    pub(crate) async fn ready(&self) -> Result<Snapshot> {
        self.record.wait_ready().await
    }

    /// What the record says now (a linearizable read), with the arrivals not yet taken in.
    pub(crate) async fn info(&self) -> Result<Info> {
        // The mirror orders the arrivals: let it load first (at once when it has).
        self.record.wait_ready().await?;
        let scan = self.store.scan_prefix(self.base()).await?;
        let record = scan
            .entries
            .iter()
            .find(|(k, _)| *k == self.key)
            .map(|(_, v)| v);
        let released = self.releases_scanned(&scan);
        let mut rec = self.decode(record)?;
        let available = self.capacity.saturating_sub(rec.released(&released).used());
        // A released grant is over, whether or not a writer has applied its marker yet.
        rec.holders.retain(|g| {
            !released
                .iter()
                .any(|r| r.slot == g.entry.slot && r.token == g.token)
        });
        let mut arrivals: Vec<Entry> = scan
            .entries
            .iter()
            .filter_map(|(k, v)| self.parse_arrival(k, v))
            .filter(|a| !rec.seen(&a.slot))
            .collect();
        // In arrival order where the mirror has seen them (the scan carries no per-key
        // revision); by session id after those.
        let snap = self.record.snapshot();
        let revision = |e: &Entry| {
            snap.get(&self.arrival_key(&e.slot))
                .map_or(u64::MAX, |seen| seen.revision)
        };
        arrivals.sort_by_cached_key(|a| (revision(a), a.slot.clone()));
        Ok(Info {
            token: rec.epoch,
            available,
            holders: rec
                .holders
                .iter()
                .map(|g| Member::of(&g.entry, g.token))
                .collect(),
            waiters: rec
                .queue
                .iter()
                .chain(&arrivals)
                .map(|e| Member::of(e, 0))
                .collect(),
        })
    }

    /// Of the record bytes we hold and the mirror's, the newer (higher `seq`).
    fn newer(&self, current: Option<Bytes>, snap: &Snapshot) -> Option<Bytes> {
        let Some(theirs) = snap.get(&self.key).map(|e| e.value.clone()) else {
            return current;
        };
        let seq = |b: &Option<Bytes>| self.decode_shared(b.as_ref()).map(|r| r.seq).unwrap_or(0);
        let theirs = Some(theirs);
        if seq(&theirs) > seq(&current) {
            theirs
        } else {
            current
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    grants: AtomicU64,
    takeovers: AtomicU64,
    conflicts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
