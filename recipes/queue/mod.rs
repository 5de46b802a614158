//! `queue::WorkQueue` ("d-queue"): a durable, at-least-once, watch-driven work queue with
//! retries and dead letters.
//!
//! Every message is one key, `<root>queues/<name>/m/<id>`, holding a small header (priority,
//! enqueue time, attempts, state) and the payload, changed only by compare-and-swap:
//! `Ready → Claimed{session} → Done` (a tombstone) on ack, back to `Ready` (with backoff) on
//! failure, `Dead` after `max_attempts`. A claim names the consumer's [`Session`]: the session's
//! heartbeat is the claim's renewal, and a claim whose session shows no heartbeat for its lease
//! (on the observer's own clock, confirmed by a linearizable read) is taken over: that is the
//! visibility timeout. Consumers follow the queue with a [`Mirror`] (a prefix watch plus a
//! periodic rescan), so an idle consumer makes no reads and a new message wakes one within
//! about one watch latency.
//!
//! # Guarantees
//! - `enqueue` is durable when it returns and idempotent by message id: a retried enqueue of an
//!   id that is pending, in flight, dead, or acked within `retention` does nothing.
//! - At-least-once: a message leaves the queue only when a handler acks it. One consumer holds
//!   it at a time; a crashed consumer's messages are redelivered one session lease later.
//! - A failing message is retried with exponential backoff, then moved to the dead letters with
//!   its last error, where it can be listed and redriven. A payload that does not decode goes
//!   there at once with the decode error: it never blocks the queue and never disappears.
//! - Order: each consumer claims the oldest ready message of the highest priority first.
//!   Messages of one producer keep their enqueue order; across producers the order is by the
//!   producers' wall clocks (skew between hosts can reorder messages enqueued that close
//!   together). With several consumers, *starting* order is as above; finishing order is not
//!   guaranteed, and a retried message goes back to its place once its backoff has passed.
//!
//! # NOT guaranteed
//! - Exactly-once effects: a handler can run twice for one message (a consumer dies after the
//!   effect, before the ack). Use [`Message::once`] / [`Message::effect_once`], or make effects
//!   idempotent by message id.
//! - Delays and backoff are measured on wall clocks (producer's and consumer's): approximate.
//! - Scale: every consumer keeps the queue's pending messages in memory (the mirror); keep
//!   payloads small (at most about 1 MiB each) and queues bounded.
//!
//! # Failure modes
//! A store outage delays claims and acks (an ack that cannot be written leaves the message to
//! be redelivered). A consumer whose session is lost stops claiming ([`Error::SessionLost`]);
//! an ack after another consumer took the message over is [`Error::ClaimLost`]. Bytes under the
//! queue's prefix that are not messages are skipped and counted in [`QueueStats::undecodable`].

mod message;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use message::{Header, Order, Record, State};

use crate::error::{Error, Result};
use crate::reconcile::{Mirror, MirrorOptions, WatcherOptions};
use crate::session::{Liveness, Session};
use crate::store::{Consistency, Store, WatchTarget};

/// Options of a [`WorkQueue`].
#[derive(Debug, Clone)]
pub struct QueueOptions {
    max_attempts: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    rescan_every: Duration,
    retention: Duration,
    handler_timeout: Option<Duration>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_attempts: 5,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            rescan_every: Duration::from_secs(30),
            retention: Duration::from_secs(600),
            handler_timeout: None,
        }
    }
}

impl QueueOptions {
    /// Attempts before a message goes to the dead letters (default 5, at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Retry backoff bounds: the n-th retry waits `min * 2^(n-1)`, capped (default 200 ms, 30 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// The safety-net rescan period: repairs watch events d-engine dropped (default 30 s; an
    /// idle consumer reads nothing in between).
    pub fn rescan_every(mut self, every: Duration) -> Self {
        self.rescan_every = every.max(Duration::from_millis(100));
        self
    }

    /// How long acked tombstones are kept for enqueue deduplication (default 10 min).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Cancel a handler (and count a failed attempt) after this long (default: none; a hung
    /// handler holds its message as long as its process lives).
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = Some(d);
        self
    }
}

/// Options of one [`WorkQueue::enqueue`].
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    id: Option<String>,
    priority: i32,
    delay: Duration,
}

impl EnqueueOptions {
    /// The message id ([A-Za-z0-9._-], at most 128 bytes). Enqueue is idempotent by id; the
    /// default is a random one.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Higher runs first (default 0).
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }

    /// Not visible to consumers before this delay has passed (by wall clock).
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// Counts of a queue's messages, as this consumer's mirror sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready now.
    pub ready: usize,
    /// Ready later (delayed, or backing off after a failure).
    pub delayed: usize,
    /// Claimed by a consumer.
    pub in_flight: usize,
    /// In the dead letters.
    pub dead: usize,
    /// Acked tombstones kept for deduplication.
    pub done: usize,
    /// Keys under the queue's prefix that are not messages (skipped).
    pub undecodable: usize,
}

/// A message in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id.
    pub id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// The payload.
    pub payload: Bytes,
}

/// Wall-clock milliseconds, read once and then advanced by the monotonic clock: immune to
/// clock steps while the process runs (and it follows tokio's paused clock in tests).
fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (wall, Instant::now())
    });
    wall + Instant::now().saturating_duration_since(mono).as_millis() as u64
}

/// What the consumer knows about each message (from its mirror).
#[derive(Default)]
struct Index {
    metas: HashMap<Bytes, (Order, State, u64)>,
    ready: BTreeSet<(Order, Bytes)>,
    claimed: HashMap<String, HashSet<Bytes>>,
    undecodable: HashSet<Bytes>,
}

impl Index {
    fn remove(&mut self, key: &Bytes) {
        self.undecodable.remove(key);
        if let Some((order, state, _)) = self.metas.remove(key) {
            match state {
                State::Ready => {
                    self.ready.remove(&(order, key.clone()));
                }
                State::Claimed { session } => {
                    if let Some(set) = self.claimed.get_mut(&session) {
                        set.remove(key);
                        if set.is_empty() {
                            self.claimed.remove(&session);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn upsert(&mut self, key: &Bytes, raw: Option<&Bytes>) {
        self.remove(key);
        let Some(raw) = raw else { return };
        let rec = match Record::decode(key, raw) {
            Ok(r) => r,
            Err(e) => {
                if self.undecodable.insert(key.clone()) {
                    tracing::warn!("skipping a key in a queue: {e}");
                }
                return;
            }
        };
        let h = rec.header;
        let order = h.order();
        match &h.state {
            State::Ready => {
                self.ready.insert((order.clone(), key.clone()));
            }
            State::Claimed { session } => {
                self.claimed
                    .entry(session.clone())
                    .or_default()
                    .insert(key.clone());
            }
            _ => {}
        }
        self.metas
            .insert(key.clone(), (order, h.state, h.not_before_ms));
    }
}

struct Inner {
    name: String,
    prefix: Bytes,
    session: Session,
    store: Arc<dyn Store>,
    options: QueueOptions,
    mirror: Arc<Mirror>,
    index: Mutex<Index>,
    changed: Notify,
    claiming: Mutex<HashSet<Bytes>>,
    producer_seq: AtomicU64,
    maintainer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.maintainer.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// A named work queue, used through one [`Session`]. Cheap to clone.
#[derive(Clone)]
pub struct WorkQueue {
    inner: Arc<Inner>,
}

impl fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("name", &self.inner.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl WorkQueue {
    /// Opens the queue `name` (`[A-Za-z0-9._-]`) under the session's root, and starts
    /// following it. Returns once its messages have been listed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn open(session: &Session, name: &str, options: QueueOptions) -> Result<WorkQueue> {
        crate::keys::validate_name("queue", name)?;
        let prefix = Bytes::from(format!("{}queues/{name}/m/", session.root()));
        let store = session.store().clone();
        let mirror = Mirror::shared(
            store.clone(),
            WatchTarget::Prefix(prefix.clone()),
            MirrorOptions::default()
                .watcher(WatcherOptions::default().resync_every(Some(options.rescan_every))),
        );
        let inner = Arc::new(Inner {
            name: name.to_string(),
            prefix,
            session: session.clone(),
            store,
            options,
            mirror,
            index: Mutex::new(Index::default()),
            changed: Notify::new(),
            claiming: Mutex::new(HashSet::new()),
            producer_seq: AtomicU64::new(0),
            maintainer: Mutex::new(None),
        });
        let changes = inner.mirror.changes();
        let view = inner.mirror.wait_ready().await?;
        {
            let mut idx = inner.index.lock().unwrap();
            for e in view.iter() {
                idx.upsert(&e.key, Some(&e.value));
            }
        }
        let task = tokio::spawn(maintain(Arc::downgrade(&inner), Box::pin(changes)));
        *inner.maintainer.lock().unwrap() = Some(task);
        Ok(WorkQueue { inner })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Adds a message (raw bytes). Returns its id. Durable when it returns; idempotent by id.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad id; [`Error::ValueTooLarge`] for a payload over
    /// about 1 MiB; the store's errors (an [`Error::Ambiguous`] write is resolved by a re-read).
    ///
    /// # Cancel safety
    /// If dropped, the message may or may not have been added; enqueue again with the same id.
    pub async fn enqueue(&self, payload: &[u8], options: EnqueueOptions) -> Result<String> {
        let q = &self.inner;
        let id = match options.id {
            Some(id) => {
                crate::keys::validate_name("message id", &id)?;
                id
            }
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let key = q.key(&id);
        let now = now_ms();
        let rec = Record {
            header: Header {
                v: Header::VERSION,
                id: id.clone(),
                prio: options.priority,
                ts_ms: now,
                producer: q.session.id(),
                n: q.producer_seq.fetch_add(1, Ordering::Relaxed),
                not_before_ms: if options.delay.is_zero() {
                    0
                } else {
                    now + options.delay.as_millis() as u64
                },
                attempts: 0,
                state: State::Ready,
                last_error: None,
            },
            payload: Bytes::copy_from_slice(payload),
        };
        let bytes = rec.encode();
        crate::store::check_write(&key, &bytes)?;
        loop {
            match q.store.compare_and_swap(&key, None, &bytes).await {
                Ok(_) => return Ok(id), // false: the id exists already (idempotent)
                // Unknown outcome: present means it landed (or the id was taken); absent
                // means it did not apply: try again.
                Err(e) if e.is_ambiguous() => {
                    if q.store
                        .get(&key, Consistency::Linearizable)
                        .await?
                        .is_some()
                    {
                        return Ok(id);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds a message whose payload is `value` as JSON.
    ///
    /// # Errors
    /// As [`WorkQueue::enqueue`]; [`Error::InvalidArgument`] if `value` does not serialize.
    ///
    /// # Cancel safety
    /// As [`WorkQueue::enqueue`].
    pub async fn enqueue_json<T: Serialize>(
        &self,
        value: &T,
        options: EnqueueOptions,
    ) -> Result<String> {
        let payload = serde_json::to_vec(value)
            .map_err(|e| Error::InvalidArgument(format!("message does not serialize: {e}")))?;
        self.enqueue(&payload, options).await
    }

    /// Waits for a message and claims it. Ack or nack the delivery; dropping it gives the
    /// message back (in the background).
    ///
    /// # Errors
    /// [`Error::SessionLost`]; the store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: a claim that raced with the drop is given back in the background.
    pub async fn next(&self) -> Result<Delivery> {
        let q = &self.inner;
        let mut liveness = Liveness::new(q.session.lease());
        loop {
            q.session.check()?;
            let notified = q.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            if let Some(d) = q.claim_ready(now).await? {
                return Ok(d);
            }
            if let Some(d) = q.claim_orphaned(&mut liveness).await? {
                return Ok(d);
            }
            let wake = q.next_wake(now, &liveness);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = q.session.lost() => {}
            }
        }
    }

    /// Runs `handler` on messages, up to `concurrency` at a time, until `shutdown` resolves.
    /// `Ok(())` acks; `Err(reason)` retries with backoff (dead letter after the last attempt).
    /// On shutdown, no new message is claimed and running handlers finish (their messages are
    /// acked or retried as usual).
    ///
    /// # Errors
    /// [`Error::SessionLost`] (running handlers are left to finish; their acks may fail);
    /// the store's errors from claiming.
    ///
    /// # Cancel safety
    /// If dropped, running handlers are dropped and their messages given back.
    pub async fn run<F, Fut>(
        &self,
        concurrency: usize,
        handler: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunStats>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let stats = Arc::new(Mutex::new(RunStats::default()));
        let mut running = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = &mut shutdown => break Ok(()),
            };
            let delivery = tokio::select! {
                d = self.next() => match d {
                    Ok(d) => d,
                    Err(e) => break Err(e),
                },
                _ = &mut shutdown => break Ok(()),
            };
            let (handler, stats, timeout) = (
                handler.clone(),
                stats.clone(),
                self.inner.options.handler_timeout,
            );
            running.spawn(async move {
                let _permit = permit;
                let msg = delivery.message();
                let outcome = match timeout {
                    Some(t) => tokio::time::timeout(t, handler(msg))
                        .await
                        .unwrap_or_else(|_| Err(format!("handler timed out after {t:?}"))),
                    None => handler(msg).await,
                };
                let res = match outcome {
                    Ok(()) => delivery.ack().await.map(|()| true),
                    Err(reason) => delivery.nack(&reason).await.map(|()| false),
                };
                let mut s = stats.lock().unwrap();
                match res {
                    Ok(true) => s.acked += 1,
                    Ok(false) => s.failed += 1,
                    Err(e) => {
                        tracing::warn!("ack/nack failed (the message will be redelivered): {e}");
                        s.lost += 1;
                    }
                }
            });
            while running.try_join_next().is_some() {}
        };
        while running.join_next().await.is_some() {}
        let stats = *stats.lock().unwrap();
        result.map(|()| stats)
    }

    /// As [`WorkQueue::run`], with the payload decoded from JSON. A payload that does not
    /// decode goes straight to the dead letters with the decode error.
    ///
    /// # Errors
    /// As [`WorkQueue::run`].
    ///
    /// # Cancel safety
    /// As [`WorkQueue::run`].
    pub async fn run_json<T, F, Fut>(
        &self,
        concurrency: usize,
        handler: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunStats>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.run(
            concurrency,
            move |msg: Message| {
                let handler = handler.clone();
                async move {
                    match msg.json::<T>() {
                        Ok(value) => handler(msg, value).await,
                        Err(e) => {
                            msg.poison(e.to_string());
                            Err(e.to_string())
                        }
                    }
                }
            },
            shutdown,
        )
        .await
    }

    /// Message counts as this consumer's mirror sees them (no store access).
    pub fn stats(&self) -> QueueStats {
        let idx = self.inner.index.lock().unwrap();
        let now = now_ms();
        let mut s = QueueStats {
            undecodable: idx.undecodable.len(),
            ..QueueStats::default()
        };
        for (_, state, not_before) in idx.metas.values() {
            match state {
                State::Ready if *not_before > now => s.delayed += 1,
                State::Ready => s.ready += 1,
                State::Claimed { .. } => s.in_flight += 1,
                State::Dead { .. } => s.dead += 1,
                State::Done { .. } => s.done += 1,
            }
        }
        s
    }

    /// The dead letters (from this consumer's mirror).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let view = self.inner.mirror.snapshot();
        let mut out = Vec::new();
        for e in view.iter() {
            if let Ok(rec) = Record::decode(&e.key, &e.value)
                && let State::Dead { error } = &rec.header.state
            {
                out.push(DeadLetter {
                    id: rec.header.id.clone(),
                    attempts: rec.header.attempts,
                    error: error.clone(),
                    payload: rec.payload.clone(),
                });
            }
        }
        out
    }

    /// Moves a dead letter back to the queue with a fresh attempt budget. `Ok(false)` if `id`
    /// is not a dead letter.
    ///
    /// # Errors
    /// [`Error::Decode`] if the key holds something else; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the message was redriven or not.
    pub async fn redrive(&self, id: &str) -> Result<bool> {
        crate::keys::validate_name("message id", id)?;
        let q = &self.inner;
        let key = q.key(id);
        loop {
            let Some(raw) = q.store.get(&key, Consistency::Linearizable).await? else {
                return Ok(false);
            };
            let rec = Record::decode(&key, &raw)?;
            if !matches!(rec.header.state, State::Dead { .. }) {
                return Ok(false);
            }
            let new = rec.redrive().encode();
            match q.store.compare_and_swap(&key, Some(&raw), &new).await {
                Ok(true) => return Ok(true),
                Ok(false) => continue,
                Err(e) if e.is_ambiguous() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Counters of the underlying watch (relists, events).
    pub fn watch_stats(&self) -> crate::reconcile::WatcherStats {
        self.inner.mirror.stats()
    }
}

/// What [`WorkQueue::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Messages acked.
    pub acked: u64,
    /// Handler failures (retried or dead-lettered).
    pub failed: u64,
    /// Acks or nacks that could not be written (the messages will be redelivered).
    pub lost: u64,
}

impl Inner {
    fn key(&self, id: &str) -> Vec<u8> {
        let mut k = self.prefix.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Claims the first due ready message nobody in this process is claiming.
    async fn claim_ready(self: &Arc<Self>, now: u64) -> Result<Option<Delivery>> {
        let mut tried = HashSet::new();
        loop {
            let candidate = {
                let idx = self.index.lock().unwrap();
                let claiming = self.claiming.lock().unwrap();
                idx.ready
                    .iter()
                    .map(|(_, k)| k)
                    .find(|k| {
                        !tried.contains(*k)
                            && !claiming.contains(*k)
                            && idx.metas.get(*k).is_some_and(|m| m.2 <= now)
                    })
                    .cloned()
            };
            let Some(key) = candidate else {
                return Ok(None);
            };
            tried.insert(key.clone());
            if let Some(d) = self
                .try_claim(&key, |rec| matches!(rec.header.state, State::Ready))
                .await?
            {
                return Ok(Some(d));
            }
        }
    }

    /// Takes over messages claimed by sessions that are dead (visibility timeout).
    async fn claim_orphaned(self: &Arc<Self>, liveness: &mut Liveness) -> Result<Option<Delivery>> {
        let me = self.session.id();
        let claimed: Vec<(String, Vec<Bytes>)> = {
            let idx = self.index.lock().unwrap();
            idx.claimed
                .iter()
                .filter(|(s, _)| **s != me)
                .map(|(s, keys)| (s.clone(), keys.iter().cloned().collect()))
                .collect()
        };
        liveness.retain(|id| claimed.iter().any(|(s, _)| s == id));
        if claimed.is_empty() {
            return Ok(None);
        }
        let peers = self.session.peers().await?.snapshot();
        let now = Instant::now();
        for (session, keys) in claimed {
            let hb_key = self.session.heartbeat_key(&session);
            liveness.observe(&session, peers.get(&hb_key).map(|e| &e.value), now);
            if !liveness.is_dead(&session, now) {
                continue;
            }
            // Never on the word of a watch alone: a lost event must not kill a live consumer.
            let hb = self.store.get(&hb_key, Consistency::Linearizable).await?;
            let now = Instant::now();
            liveness.observe(&session, hb.as_ref(), now);
            if !liveness.is_dead(&session, now) {
                continue;
            }
            for key in keys {
                let s = session.clone();
                if let Some(d) = self.try_claim(&key, move |rec| rec.claimed_by(&s)).await? {
                    tracing::info!(queue = %self.name, id = %d.record.header.id, dead = %session, "redelivering a dead consumer's message");
                    return Ok(Some(d));
                }
            }
        }
        Ok(None)
    }

    /// When to look again without a change: the next delayed message, or the next claim
    /// that could expire.
    fn next_wake(&self, now: u64, liveness: &Liveness) -> Instant {
        let idx = self.index.lock().unwrap();
        let mut wake = Instant::now() + self.options.rescan_every;
        if let Some(due) = idx
            .metas
            .values()
            .filter(|m| matches!(m.1, State::Ready) && m.2 > now)
            .map(|m| m.2)
            .min()
        {
            wake = wake.min(Instant::now() + Duration::from_millis(due - now));
        }
        for s in idx.claimed.keys() {
            match liveness.expires_at(s) {
                Some(at) => wake = wake.min(at),
                None => wake = wake.min(Instant::now() + Duration::from_millis(50)),
            }
        }
        wake
    }

    /// CAS-claims `key` if `eligible`; `None` if someone else got it or it changed.
    async fn try_claim(
        self: &Arc<Self>,
        key: &Bytes,
        eligible: impl Fn(&Record) -> bool,
    ) -> Result<Option<Delivery>> {
        let Some(entry) = self.mirror.get(key) else {
            return Ok(None);
        };
        let Ok(rec) = Record::decode(key, &entry.value) else {
            return Ok(None);
        };
        if !eligible(&rec) {
            return Ok(None);
        }
        let me = self.session.id();
        let claimed = rec.claim(&me);
        let bytes = Bytes::from(claimed.encode());
        self.claiming.lock().unwrap().insert(key.clone());
        let res = self
            .store
            .compare_and_swap(key, Some(&entry.value), &bytes)
            .await;
        let got = match res {
            Ok(ok) => ok,
            Err(e) if e.is_ambiguous() => {
                self.store
                    .get(key, Consistency::Linearizable)
                    .await?
                    .as_ref()
                    == Some(&bytes)
            }
            Err(e) => {
                self.claiming.lock().unwrap().remove(key);
                return Err(e);
            }
        };
        if !got {
            self.claiming.lock().unwrap().remove(key);
            return Ok(None);
        }
        // Stays in `claiming` while held, so local workers skip it until our claim is seen.
        Ok(Some(Delivery {
            q: self.clone(),
            key: key.clone(),
            record: claimed,
            bytes,
            finished: false,
            poison: Arc::new(Mutex::new(None)),
        }))
    }
}

/// Keeps the index in step with the mirror, and removes expired tombstones.
async fn maintain(
    q: std::sync::Weak<Inner>,
    mut changes: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<crate::reconcile::Change>> + Send>,
    >,
) {
    let mut janitor = tokio::time::interval(Duration::from_secs(60));
    janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { return };
                let Some(q) = q.upgrade() else { return };
                match change {
                    Ok(c) => q.index.lock().unwrap().upsert(&c.key, c.new.as_ref()),
                    Err(_) => {
                        // Fell behind: rebuild from the mirror's current view.
                        let view = q.mirror.snapshot();
                        let mut idx = q.index.lock().unwrap();
                        *idx = Index::default();
                        for e in view.iter() {
                            idx.upsert(&e.key, Some(&e.value));
                        }
                    }
                }
                q.changed.notify_waiters();
            }
            _ = janitor.tick() => {
                let Some(q) = q.upgrade() else { return };
                let cutoff = now_ms().saturating_sub(q.options.retention.as_millis() as u64);
                let expired: Vec<Bytes> = q.index.lock().unwrap().metas.iter()
                    .filter(|(_, m)| matches!(m.1, State::Done { at_ms } if at_ms < cutoff))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in expired {
                    let _ = q.store.delete(&key).await;
                }
            }
        }
    }
}

/// A claimed message. [`Delivery::ack`] it when done or [`Delivery::nack`] it; dropping it
/// gives it back unprocessed (in the background).
#[must_use = "a delivery must be acked or nacked; dropping it gives the message back"]
pub struct Delivery {
    q: Arc<Inner>,
    key: Bytes,
    record: Record,
    bytes: Bytes,
    finished: bool,
    poison: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.record.header.id)
            .field("attempt", &self.record.header.attempts)
            .finish()
    }
}

impl Delivery {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.record.header.id
    }

    /// Which attempt this is (1 for the first delivery).
    pub fn attempt(&self) -> u32 {
        self.record.header.attempts
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.record.payload
    }

    /// The payload decoded from JSON.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        self.message().json()
    }

    /// What a handler gets: id, attempt, enqueue time, payload, and the idempotency helpers.
    pub fn message(&self) -> Message {
        Message {
            q: self.q.clone(),
            id: self.record.header.id.clone(),
            attempt: self.record.header.attempts,
            priority: self.record.header.prio,
            enqueued_at: UNIX_EPOCH + Duration::from_millis(self.record.header.ts_ms),
            payload: self.record.payload.clone(),
            poison: self.poison.clone(),
        }
    }

    /// Done: the message leaves the queue (a tombstone stays for deduplication).
    ///
    /// # Errors
    /// [`Error::ClaimLost`] if another consumer took the message over (this one was considered
    /// dead); the store's errors (the message will then be redelivered).
    ///
    /// # Cancel safety
    /// If dropped, the ack happened or the message will be redelivered.
    pub async fn ack(mut self) -> Result<()> {
        let done = self.record.done(now_ms());
        self.finish(done).await
    }

    /// Failed: retried after a backoff, or dead-lettered after the last attempt, with `error`.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    ///
    /// # Cancel safety
    /// As [`Delivery::ack`].
    pub async fn nack(mut self, error: &str) -> Result<()> {
        let poison = self.poison.lock().unwrap().take();
        let next = match poison {
            Some(reason) => self.record.dead(&reason),
            None => {
                let o = &self.q.options;
                let exp = self.record.header.attempts.saturating_sub(1).min(20);
                let backoff = o.min_backoff.saturating_mul(1 << exp).min(o.max_backoff);
                self.record
                    .fail(error, o.max_attempts, now_ms() + backoff.as_millis() as u64)
            }
        };
        self.finish(next).await
    }

    async fn finish(&mut self, next: Record) -> Result<()> {
        let res = self.finish_inner(next).await;
        if self.finished {
            self.q.claiming.lock().unwrap().remove(&self.key);
        }
        res
    }

    async fn finish_inner(&mut self, next: Record) -> Result<()> {
        self.finished = true;
        let q = &self.q;
        let new = next.encode();
        loop {
            match q
                .store
                .compare_and_swap(&self.key, Some(&self.bytes), &new)
                .await
            {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(self.claim_lost()),
                Err(e) if e.is_ambiguous() => {
                    let now = q.store.get(&self.key, Consistency::Linearizable).await?;
                    if now.as_deref() == Some(&new[..]) {
                        return Ok(());
                    } else if now.as_ref() != Some(&self.bytes) {
                        return Err(self.claim_lost());
                    }
                    // Still our claim: the write did not apply; try again.
                }
                Err(e) => {
                    self.finished = false;
                    return Err(e);
                }
            }
        }
    }

    fn claim_lost(&self) -> Error {
        Error::ClaimLost {
            id: self.record.header.id.clone(),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (q, key, bytes, back) = (
            self.q.clone(),
            self.key.clone(),
            self.bytes.clone(),
            self.record.release().encode(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = q.store.compare_and_swap(&key, Some(&bytes), &back).await;
                q.claiming.lock().unwrap().remove(&key);
            });
        }
    }
}

/// A message as a handler sees it.
#[derive(Clone)]
pub struct Message {
    q: Arc<Inner>,
    /// The message id.
    pub id: String,
    /// Which attempt this is (1 for the first delivery).
    pub attempt: u32,
    /// Its priority.
    pub priority: i32,
    /// When it was enqueued (producer's wall clock).
    pub enqueued_at: SystemTime,
    /// The payload.
    pub payload: Bytes,
    poison: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("len", &self.payload.len())
            .finish()
    }
}

impl Message {
    /// The payload decoded from JSON.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            key: format!("{}{}", String::from_utf8_lossy(&self.q.prefix), self.id),
            reason: format!("message payload: {e}"),
        })
    }

    /// Marks this message as poison: the failure that follows sends it straight to the dead
    /// letters with `reason`, whatever attempts remain.
    pub fn poison(&self, reason: impl Into<String>) {
        *self.poison.lock().unwrap() = Some(reason.into());
    }

    /// True exactly once per (`scope`, message id), over every delivery of this message: a
    /// marker written with compare-and-swap. Run a non-idempotent effect only when it returns
    /// true: the effect then happens at most once (it is skipped if a delivery died between
    /// marking and finishing it; put the marker and the effect in one write with
    /// [`Message::effect_once`] when the effect is a write to the store).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad scope; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the marker may have been written (the effect then never runs).
    pub async fn once(&self, scope: &str) -> Result<bool> {
        crate::keys::validate_name("once scope", scope)?;
        let key = format!("{}once/{scope}/{}", self.q.session.root(), self.id);
        self.effect_once(key.as_bytes(), self.q.session.id().as_bytes())
            .await
    }

    /// Writes `value` to `key` only if `key` is absent (compare-and-swap): an effect on the
    /// store that happens exactly once however often the message is delivered, if `key` is
    /// derived from the message id. Returns true if this call wrote it.
    ///
    /// # Errors
    /// The store's errors (an ambiguous write is resolved by a re-read).
    ///
    /// # Cancel safety
    /// If dropped, the effect happened or not, never twice.
    pub async fn effect_once(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        let store = &self.q.store;
        loop {
            match store.compare_and_swap(key, None, value).await {
                Ok(wrote) => return Ok(wrote),
                // Unknown outcome: a linearizable read decides. Absent means it did not apply
                // (the read follows the new leader's first commit), so try again.
                Err(e) if e.is_ambiguous() => {
                    match store.get(key, Consistency::Linearizable).await? {
                        Some(v) => return Ok(v == value),
                        None => continue,
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
