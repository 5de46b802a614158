//! Sessions: one identity per process (or per component), and its liveness, shared by every
//! recipe that uses it.
//!
//! A [`Session`] writes a heartbeat record under `<root>sessions/<uuid>` and rewrites it every
//! `renew_every` from one background task. Recipes (locks, queue claims) name the session in
//! their records instead of renewing each record: one write per session per renewal, however
//! much it holds. Other processes decide the session is dead when its heartbeat has not
//! *changed* for the session's lease, measured on **their own monotonic clock** from the
//! moment they saw it change ([`Liveness`]) — no synchronized clocks, and no d-engine TTL in
//! the argument (the record's TTL, if any, only garbage-collects records of crashed processes).
//!
//! # Guarantees
//! - [`Session::lost`] fires **before** any observer can consider the session dead: the holder
//!   counts its deadline from when it *sent* its last successful renewal, minus a margin
//!   (default 10 % of the lease) for clock-rate drift and scheduling, while an observer counts
//!   from when it *saw* that renewal, which is later.
//! - Losing a session is final: after `lost()` fires it never renews again. Start a new
//!   session; whatever the old one held must be treated as gone.
//!
//! # NOT guaranteed
//! - That a process paused (GC, SIGSTOP, swap) longer than its lease notices in time to stop
//!   acting: it notices when it resumes. Protect effects with fencing tokens (see `lock`).
//! - Bounded clock-rate drift is assumed (margin), as by every lease-based design.
//!
//! # Failure modes
//! Renewals that fail are retried with backoff until the deadline; then the session is lost.
//! An unreachable store at [`Session::start`] is an error (nothing was written).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result, show};
use crate::reconcile::{Backoff, Mirror, MirrorOptions, WatcherOptions};
use crate::store::{Consistency, Store, WatchTarget};

mod liveness;
mod renew;

pub use liveness::Liveness;
pub(crate) use renew::Owned;
use renew::{Renewer, renew, write};

/// Options of a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub(crate) root: String,
    pub(crate) lease: Duration,
    pub(crate) renew_every: Option<Duration>,
    pub(crate) margin: f64,
    pub(crate) lost_before: Duration,
    pub(crate) gc_ttl: Option<Duration>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            root: crate::keys::DEFAULT_ROOT.to_string(),
            lease: Duration::from_secs(10),
            renew_every: None,
            margin: 0.1,
            lost_before: Duration::ZERO,
            gc_ttl: Some(Duration::from_secs(600)),
        }
    }
}

impl SessionOptions {
    /// How long observers wait, after the last heartbeat change they saw, before they treat
    /// this session as dead (and take over its locks and claims). Default 10 s. Minimum 1 s.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// Makes [`Session::lost`] fire at least `d` before anyone else may consider this session
    /// dead (at most half the lease; default 10 % of it): time for the holder to stop what it
    /// guards, e.g. a command given a grace period. Renewals then run a third of the shorter
    /// window apart, unless [`SessionOptions::renew_every`] says otherwise.
    #[must_use]
    pub fn lost_before(mut self, d: Duration) -> Self {
        self.lost_before = d;
        self
    }

    /// How often to renew. Default: a third of the lease.
    #[must_use]
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// The key root all dcoord records live under. Default `/dcoord/`.
    #[must_use]
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    /// The TTL put on the heartbeat record so records of crashed processes disappear
    /// eventually (garbage collection only; never part of the liveness decision). `None`
    /// writes without TTL (needed if the cluster runs with d-engine's lease feature off).
    /// Default 10 min, and at least 10 leases.
    #[must_use]
    pub fn gc_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.gc_ttl = ttl;
        self
    }

    fn renew_interval(&self) -> Duration {
        let window = self.lease - self.lost_before.min(self.lease / 2);
        self.renew_every.unwrap_or(window / 3).min(self.lease / 2)
    }
}

/// The record a session keeps rewriting. Public so tools can decode it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The session id.
    pub id: String,
    /// Increases with every renewal.
    pub seq: u64,
    /// The lease observers must apply, in milliseconds.
    pub lease_ms: u64,
}

impl Heartbeat {
    /// Decodes a heartbeat record.
    ///
    /// # Errors
    /// [`Error::Decode`] naming `key` when the bytes are not a heartbeat.
    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<Heartbeat> {
        serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            key: show(key),
            reason: format!("not a session heartbeat: {e}"),
        })
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a heartbeat always serializes")
    }
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Renewed; valid (on this process's clock) until the instant given.
    Alive {
        /// The last moment at which nobody else can yet consider this session dead.
        valid_until: Instant,
    },
    /// Renewals failed until the deadline passed. Final.
    Lost,
    /// Closed by [`Session::close`] or dropped. Final.
    Closed,
}

struct Inner {
    tickets: std::sync::atomic::AtomicU64,
    /// Keys some task of this process owns for this session (see [`Session::own`]).
    owned: Arc<Mutex<HashSet<Bytes>>>,
    id: uuid::Uuid,
    key: Bytes,
    root: String,
    peers: tokio::sync::OnceCell<Mirror>,
    lease: Duration,
    store: Arc<dyn Store>,
    state: Arc<watch::Sender<SessionState>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        if matches!(*self.state.borrow(), SessionState::Alive { .. }) {
            self.state.send_replace(SessionState::Closed);
            // Best effort: remove the record so observers need not wait out the lease for a
            // session that is certainly gone... except they must anyway (they cannot tell a
            // deleted record from one never seen), so this is only garbage collection.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let store = self.store.clone();
                let key = self.key.clone();
                rt.spawn(async move {
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

/// A process identity with a liveness lease, renewed in the background. Cheap to clone; the
/// last clone dropped closes it (best effort, in the background).
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Session {
    /// Starts a session: writes its first heartbeat, then renews it in a background task.
    ///
    /// # Errors
    /// The store's error if the first heartbeat cannot be written ([`Error::Unavailable`],
    /// [`Error::Ambiguous`]); [`Error::InvalidArgument`] for a bad root.
    ///
    /// # Cancel safety
    /// If dropped before it returns, at most a heartbeat record is left behind; it is never
    /// renewed, so observers treat it as dead after its lease (and its TTL removes it).
    pub async fn start(store: Arc<dyn Store>, options: SessionOptions) -> Result<Session> {
        crate::keys::validate_root(&options.root)?;
        let id = uuid::Uuid::new_v4();
        let key = Bytes::from(format!("{}sessions/{}", options.root, id.simple()));
        let lease = options.lease;
        let margin = lease
            .mul_f64(options.margin.clamp(0.0, 0.5))
            .max(options.lost_before.min(lease / 2));
        let gc_ttl = options.gc_ttl.map(|t| t.max(lease * 10));
        let beat = move |seq| {
            Heartbeat {
                id: id.simple().to_string(),
                seq,
                lease_ms: lease.as_millis() as u64,
            }
            .encode()
        };
        let sent = Instant::now();
        write(&*store, &key, &beat(1), gc_ttl).await?;
        let valid_until = sent + lease - margin;
        let state = Arc::new(watch::Sender::new(SessionState::Alive { valid_until }));
        let (stop, stop_rx) = watch::channel(false);
        let renew_every = options.renew_interval();
        let task = tokio::spawn(renew(Renewer {
            store: store.clone(),
            key: key.clone(),
            state: state.clone(),
            stop: stop_rx,
            lease,
            margin,
            renew_every,
            gc_ttl,
            beat: Box::new(beat),
            valid_until,
            last_sent: sent,
        }));
        tracing::debug!(session = %id.simple(), ?lease, ?renew_every, "session started");
        Ok(Session {
            inner: Arc::new(Inner {
                tickets: std::sync::atomic::AtomicU64::new(1),
                owned: Arc::default(),
                id,
                key,
                root: options.root.clone(),
                peers: tokio::sync::OnceCell::new(),
                lease,
                store,
                state,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The session id (a random UUID), as recipes write it into their records.
    pub fn id(&self) -> String {
        self.inner.id.simple().to_string()
    }

    /// The key of this session's heartbeat record.
    pub fn key(&self) -> &[u8] {
        &self.inner.key
    }

    /// The lease observers apply.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// A number never handed out before by this session (recipes tell their slots apart by
    /// session and ticket).
    pub(crate) fn next_ticket(&self) -> u64 {
        self.inner
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The key root this session (and the recipes using it) live under.
    pub fn root(&self) -> &str {
        &self.inner.root
    }

    /// The heartbeat key of session `id` (under this session's root).
    pub fn heartbeat_key(&self, id: &str) -> Vec<u8> {
        format!("{}sessions/{id}", self.inner.root).into_bytes()
    }

    /// A mirror of every session's heartbeat under this root, started on first use and shared
    /// by every recipe using this session (waiters use it to see holders' heartbeats).
    ///
    /// # Errors
    /// The mirror's fatal error (a stopped engine).
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped call leaves the mirror started or not.
    pub async fn peers(&self) -> Result<&Mirror> {
        self.inner
            .peers
            .get_or_try_init(|| async {
                let prefix = format!("{}sessions/", self.inner.root);
                let options = MirrorOptions::default().watcher(
                    WatcherOptions::default()
                        .resync_every(Some(self.inner.lease.max(Duration::from_secs(1)))),
                );
                let mirror = Mirror::start(
                    self.inner.store.clone(),
                    WatchTarget::prefix(prefix),
                    options,
                );
                mirror.wait_ready().await?;
                Ok(mirror)
            })
            .await
    }

    /// Confirms with linearizable reads that every session in `ids` is dead on `liveness`'s
    /// clock: each heartbeat is re-read and observed, and the answer is false as soon as one
    /// shows a change. Recipes call it before taking over what a dead session held, so that a
    /// lost watch event can never make a live session look dead.
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (reads).
    pub async fn confirm_dead(&self, ids: &[&str], liveness: &mut Liveness) -> Result<bool> {
        for &id in ids {
            let hb = self
                .inner
                .store
                .get(&self.heartbeat_key(id), Consistency::Linearizable)
                .await?;
            let now = Instant::now();
            liveness.observe(id, hb.as_ref(), now);
            if !liveness.is_dead(id, now) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Observes, in the peers mirror's `view`, the heartbeat of every session in `ids`, and
    /// forgets the sessions not in `ids`.
    pub fn observe_peers(
        &self,
        view: &crate::reconcile::Snapshot,
        ids: &[&str],
        liveness: &mut Liveness,
    ) {
        let now = Instant::now();
        for &id in ids {
            let hb = view.get(&self.heartbeat_key(id));
            liveness.observe(id, hb.map(|e| &e.value), now);
        }
        liveness.retain(|seen| ids.contains(&seen));
    }

    /// Claims `key` for one owner in this process: `None` if another owner holds it. The
    /// claim ends when the returned guard is dropped. Recipes mark what some task here is
    /// behind (a lock slot, a claimed message): a record of this session that nobody here
    /// owns was abandoned (a write that failed, or landed after its caller gave up), and is
    /// cleaned up by whoever finds it.
    pub(crate) fn own(&self, key: impl Into<Bytes>) -> Option<Owned> {
        let key = key.into();
        let mut owned = self.inner.owned.lock().unwrap();
        if !owned.insert(key.clone()) {
            return None;
        }
        Some(Owned {
            set: self.inner.owned.clone(),
            key,
        })
    }

    /// True while some owner in this process holds `key` (see [`Session::own`]).
    pub(crate) fn owns(&self, key: &[u8]) -> bool {
        self.inner.owned.lock().unwrap().contains(key)
    }

    /// Runs `attempt` in the background until it succeeds, retrying (with backoff) errors
    /// that may pass ([`Error::is_retryable`], [`Error::is_ambiguous`]) for as long as this
    /// session is alive. For writes that must not be abandoned while the session could still
    /// be blocking others with what it holds (a release, a give-back); once the session is
    /// gone, others take over after its lease anyway. Returns false (and runs nothing) outside
    /// a tokio runtime.
    pub(crate) fn spawn_while_alive<F, Fut>(&self, what: &'static str, mut attempt: F) -> bool
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send,
    {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(session = %self.id(), "no runtime for {what}; the lease will free it");
            return false;
        };
        let session = self.clone();
        rt.spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            loop {
                match attempt().await {
                    Ok(()) => break,
                    Err(e) if (e.is_retryable() || e.is_ambiguous()) && session.is_alive() => {
                        tracing::debug!(session = %session.id(), error = %e, "{what} failed, retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => {
                        tracing::warn!(session = %session.id(), error = %e, "{what} failed");
                        break;
                    }
                }
            }
        });
        true
    }

    /// Stops renewing WITHOUT deleting the heartbeat record, as if the process had crashed:
    /// observers treat the session as dead one lease after its last renewal, and take over what
    /// it held. For handing work over abruptly, and for tests of crash recovery.
    pub fn orphan(self) {
        let _ = self.inner.stop.send(true);
        if let Some(task) = self.inner.task.lock().unwrap().take() {
            task.abort();
        }
        self.inner.state.send_replace(SessionState::Closed);
    }

    /// The store this session renews in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Where the session stands now.
    pub fn state(&self) -> SessionState {
        *self.inner.state.borrow()
    }

    /// True while the session is alive (renewed, and its deadline not passed).
    pub fn is_alive(&self) -> bool {
        match self.state() {
            SessionState::Alive { valid_until } => Instant::now() < valid_until,
            _ => false,
        }
    }

    /// The instant until which nobody else can consider this session dead, if it is alive.
    pub fn valid_until(&self) -> Option<Instant> {
        match self.state() {
            SessionState::Alive { valid_until } => Some(valid_until),
            _ => None,
        }
    }

    /// Errors with [`Error::SessionLost`] unless the session is alive.
    pub fn check(&self) -> Result<()> {
        if self.is_alive() {
            return Ok(());
        }
        Err(Error::SessionLost {
            id: self.id(),
            state: if self.state() == SessionState::Closed {
                "closed"
            } else {
                "lost"
            },
        })
    }

    /// A receiver of the session's state; it changes on every renewal and once more when the
    /// session is lost or closed.
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.inner.state.subscribe()
    }

    /// Resolves when the session is lost or closed (at once if it already is).
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn lost(&self) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx
            .wait_for(|s| !matches!(s, SessionState::Alive { .. }))
            .await;
    }

    /// Stops renewing and deletes the heartbeat record. Recipes using this session lose what
    /// they hold (their guards' `lost()` fire); release them first for a clean handoff.
    ///
    /// # Errors
    /// The store's error if the record could not be deleted (it is then left to its TTL;
    /// observers treat it as dead after one lease either way).
    ///
    /// # Cancel safety
    /// If dropped midway the session is already closed; only the record's deletion may be
    /// skipped (harmless, see Errors).
    pub async fn close(self) -> Result<()> {
        let _ = self.inner.stop.send(true);
        if let Some(task) = self.inner.task.lock().unwrap().take() {
            task.abort();
        }
        self.inner.state.send_replace(SessionState::Closed);
        self.inner.store.delete(&self.inner.key).await
    }
}
