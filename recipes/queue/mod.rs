//! `queue::WorkQueue` ("d-queue"): a durable, at-least-once, watch-driven work queue with
//! retries and dead letters.
//!
//! Every message is one key, `<root>queues/<name>/m/<id>`, holding a small header (priority,
//! enqueue time, attempts, state) and the payload, changed only by compare-and-swap:
//! `Ready → Claimed{session} → Done` (a tombstone) on ack, back to `Ready` (with backoff) on
//! failure, `Dead` after `max_attempts`. A claim names the consumer's [`Session`]: the session's
//! heartbeat is the claim's renewal, and a claim whose session shows no heartbeat for its lease
//! (on the observer's own clock, confirmed by a linearizable read) is taken over: that is the
//! visibility timeout. Consumers follow the queue with a [`watcher`](crate::reconcile::watcher)
//! (a prefix watch plus a periodic rescan), so an idle consumer makes no reads and a new
//! message wakes one within about one watch latency.
//!
//! A consumer keeps an index of the queue, not its payloads: per message its id, place in the
//! order, state, due time, when it was seen and a hash of its bytes (about 240 bytes, whatever the
//! payload's size: measured with 100,000 pending 1 KiB messages), plus the bytes of up to 2048 of
//! the oldest ready messages (2 MiB in all). Those arrive with the watch's events and lists, and a
//! read-ahead task keeps the first 512 due ones filled (one multi-key read for up to 64), so a
//! claim needs no read of its own; a claim that finds no bytes kept reads the message first. Each
//! open consumer deletes its share of the expired tombstones, shared as claims are (among the
//! consumers seen claiming in the last lease; with none seen, each deletes them all).
//!
//! # Guarantees
//! - `enqueue` is durable when it returns and idempotent by message id: a retried enqueue of an
//!   id that is pending, in flight, dead, or acked within `retention` does nothing.
//! - At-least-once: a message leaves the queue only when a handler acks it. One consumer holds
//!   it at a time; a crashed consumer's messages are redelivered one session lease later.
//! - A failing message is retried with exponential backoff, then moved to the dead letters with
//!   its last error, where it can be listed and redriven. A payload that does not decode goes
//!   there at once with the decode error: it never blocks the queue and never disappears.
//! - Order: a consumer claims the oldest ready message of the highest priority first.
//!   Messages of one producer keep their enqueue order; across producers the order is by the
//!   producers' wall clocks (skew between hosts can reorder messages enqueued that close
//!   together). With several consumers, *starting* order is as above to within a window: the
//!   consumers seen claiming in the last lease share the head of the queue (a hash of the
//!   message id splits it among them), and each starts the oldest message of its share among
//!   the oldest 16 ready ones of the highest priority. When its share there is empty, it
//!   takes one of those 16 (picked by a hash of its session) that its owner has had for
//!   20 ms (since this consumer saw it ready) and not claimed; a consumer alone whose claims
//!   keep colliding (with one it has not seen claim yet) picks that way at once. So
//!   consumers do not all race for the queue's first message, nor for each other's shares
//!   while their owners are about to claim them (one write per message instead of one per
//!   collision), and a slow or dead consumer's share is taken by the others 20 ms late. A
//!   lone consumer keeps the exact order. Finishing order is not guaranteed, and a retried message
//!   goes back to its place once its backoff has passed.
//! - Pipelined: [`WorkQueue::run`] with a concurrency of N keeps up to N +
//!   [`QueueOptions::claim_ahead`] (default N) messages claimed, so a handler that returns
//!   finds the next message claimed already, and one message's ack overlaps the next claims.
//!   Claims and acks of many messages then share each group-commit write (measured with
//!   bench-etcd (e): a 2000-message drain on 3 nodes made about 260 writes instead of 510).
//!
//! # NOT guaranteed
//! - Exactly-once effects: a handler can run twice for one message (a consumer dies after the
//!   effect, before the ack). Use [`Message::once`] / [`Message::effect_once`], or make effects
//!   idempotent by message id.
//! - Delays and backoff are measured on wall clocks (producer's and consumer's): approximate.
//! - Reusing an id once its tombstone has expired is safe on dcoord's stores (the sweep deletes
//!   a tombstone only if it still holds the bytes read, in a transaction), but on a custom
//!   [`Store`](crate::store::Store) without [`transact`](crate::store::Store::transact) an
//!   enqueue that races the sweep can be deleted with the tombstone. Retries of an enqueue
//!   within `retention` are safe everywhere.
//! - Scale without bound: a consumer's memory grows with the number of messages under the
//!   queue (pending, dead, and acked within `retention`), about 240 bytes each, and opening
//!   one (and each periodic rescan) lists them all, payloads included (on the store's side
//!   and the wire; the consumer drops them as they come). Payloads are at most about 1 MiB.
//! - That a claimed message starts at once: one claimed ahead waits for a free handler of its
//!   consumer, while another consumer may be idle. With handlers slow next to a claim (a
//!   store round trip), set [`QueueOptions::claim_ahead`] to 0.
//!
//! # Failure modes
//! A store outage delays claims and acks (an ack that cannot be written leaves the message to
//! be redelivered). A consumer whose session is lost stops claiming ([`Error::SessionLost`]);
//! an ack after another consumer took the message over is [`Error::ClaimLost`]. Bytes under the
//! queue's prefix that are not messages are skipped and counted in [`QueueStats::undecodable`].

mod claim;
mod delivery;
mod index;
mod message;
mod options;
mod producer;

pub use delivery::{Delivery, Message};
use index::{Id, Index, Slim, maintain};
pub use options::{DeadLetter, EnqueueOptions, QueueOptions, QueueStats, RunStats};
pub use producer::Producer;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use message::{Record, State};

#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::reconcile::{StatsHandle, WatcherEvent, WatcherOptions, watcher};
use crate::session::{Liveness, Session};
use crate::store::{Cas, Consistency, Settled, Store, WatchTarget};

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

struct Inner {
    name: String,
    prefix: Bytes,
    session: Session,
    store: Arc<dyn Store>,
    options: QueueOptions,
    /// The queue's watcher's counters.
    watch_stats: StatsHandle,
    index: Mutex<Index>,
    /// Notified whenever the index changes (shared with the prefetcher, which waits on it
    /// without keeping the queue alive).
    changed: Arc<tokio::sync::Notify>,
    /// Messages claimed by this session and not held here, with their version and when first
    /// seen so.
    suspects: Mutex<std::collections::HashMap<Id, (u64, Instant)>>,
    /// Enqueues, with the session id as the producer id.
    producer: Producer,
    /// The tasks keeping the index (see [`index::maintain`], [`index::prefetch`]).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// When a claim of ours last lost a race (wall ms; 0: never).
    collided_at_ms: std::sync::atomic::AtomicU64,
    /// Claims that lost a race, ever.
    conflicts: std::sync::atomic::AtomicU64,
    /// Messages this consumer claimed, with the version it claimed them from, until its index
    /// shows the claim (or anything after it).
    claimed_from: Mutex<std::collections::HashMap<Id, u64>>,
    /// The other consumers' heartbeats as observed here, kept across claims.
    liveness: tokio::sync::Mutex<Liveness>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
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
        let prefix = producer::messages_prefix(session.root(), name);
        let store = session.store().clone();
        let mut events = watcher(
            store.clone(),
            WatchTarget::Prefix(prefix.clone()),
            WatcherOptions::default()
                .resync_every(Some(options.rescan_every))
                .without_key_tracking(),
        );
        // The first list, before anything is claimed.
        let mut index = None;
        let mut building = Index::default();
        let mut last_error = None;
        while index.is_none() {
            match events.next().await {
                Some(Ok(WatcherEvent::Init { .. })) => building = Index::default(),
                Some(Ok(WatcherEvent::InitApply(e))) => {
                    building.upsert(&prefix, &e.key, Some(&e.value));
                }
                Some(Ok(WatcherEvent::InitDone { .. })) => {
                    index = Some(std::mem::take(&mut building));
                }
                Some(Ok(_)) => {}
                // The watcher retries (an error it cannot retry ends the stream).
                Some(Err(e)) => {
                    tracing::debug!(queue = %name, error = %e, "listing the queue failed; retrying");
                    last_error = Some(e);
                }
                None => return Err(last_error.unwrap_or(crate::Error::Stopped)),
            }
        }
        let producer = Producer::with_id(store.clone(), prefix.clone(), name, session.id());
        let inner = Arc::new(Inner {
            name: name.to_string(),
            prefix,
            session: session.clone(),
            store,
            options,
            watch_stats: events.stats(),
            index: Mutex::new(index.expect("listed")),
            changed: Arc::new(tokio::sync::Notify::new()),
            suspects: Mutex::new(Default::default()),
            producer,
            tasks: Mutex::new(Vec::new()),
            collided_at_ms: Default::default(),
            conflicts: Default::default(),
            claimed_from: Mutex::new(Default::default()),
            liveness: tokio::sync::Mutex::new(Liveness::new(session.lease())),
        });
        let tasks = [
            tokio::spawn(maintain(Arc::downgrade(&inner), events)),
            tokio::spawn(index::prefetch(
                Arc::downgrade(&inner),
                inner.changed.clone(),
            )),
        ];
        inner.tasks.lock().unwrap().extend(tasks);
        Ok(WorkQueue { inner })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Adds a message (raw bytes). Returns its id. Durable when it returns; idempotent by id.
    /// The same as [`Producer::enqueue`], with this session's id ordering the messages.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad id; [`Error::ValueTooLarge`] for a payload over
    /// about 1 MiB; the store's errors (an [`Error::Ambiguous`] write is resolved by a re-read).
    ///
    /// # Cancel safety
    /// If dropped, the message may or may not have been added; enqueue again with the same id.
    pub async fn enqueue(&self, payload: &[u8], options: EnqueueOptions) -> Result<String> {
        self.inner.producer.enqueue(payload, options).await
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
        self.inner.producer.enqueue_json(value, options).await
    }

    /// A [`Producer`] of this queue that orders its messages by this session's id (clones of
    /// it share the sequence with [`WorkQueue::enqueue`]). For a producer that needs no
    /// session at all, [`Producer::new`].
    pub fn producer(&self) -> Producer {
        self.inner.producer.clone()
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
        loop {
            q.session.check()?;
            let notified = q.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            // A dead consumer's messages first (they were claimed before any ready one, and
            // have waited a lease already): a backlog never holds them back.
            if let Some(d) = q.claim_orphaned().await? {
                return Ok(d);
            }
            let ripe = match q.claim_ready(now).await? {
                Ok(d) => return Ok(d),
                Err(ripe) => ripe,
            };
            let wake = q.next_wake(now);
            let wake = ripe.map_or(wake, |at| wake.min(at));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = q.session.lost() => {}
            }
        }
    }

    /// Runs `handler` on messages, up to `concurrency` at a time, until `shutdown` resolves.
    /// `Ok(())` acks; `Err(reason)` retries with backoff (dead letter after the last attempt).
    ///
    /// It claims up to `concurrency` + [`QueueOptions::claim_ahead`] (default: `concurrency`)
    /// messages at a time, each on its own, so the next message is already claimed when a
    /// handler returns; claimed messages start in the order they were claimed. A claim is
    /// free again once its handler returns, and the ack (as many in flight as claims) overlaps
    /// the next claims. On shutdown, no new message is claimed or started (claims not yet
    /// granted are abandoned, one that raced is given back, and claimed messages not started
    /// are given back before this returns) and running handlers finish (their messages are
    /// acked or retried as usual).
    ///
    /// # Errors
    /// [`Error::SessionLost`](crate::Error::SessionLost) (running handlers are left to
    /// finish; their acks may fail); the store's errors from claiming that are not
    /// retryable (retryable ones are retried).
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
        let concurrency = concurrency.max(1);
        let ahead = self.inner.options.claim_ahead.unwrap_or(concurrency);
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency + ahead));
        let handlers = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let acks = Arc::new(tokio::sync::Semaphore::new(concurrency + ahead));
        let stats = Arc::new(Mutex::new(RunStats::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let conflicts = || {
            self.inner
                .conflicts
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let conflicts_before = conflicts();
        let mut running = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    if let Ok(Err(e)) = joined {
                        break Err(e);
                    }
                }
                permit = slots.clone().acquire_owned() => {
                    let permit = permit.expect("never closed");
                    let slot = Slot {
                        queue: self.clone(),
                        handler: handler.clone(),
                        handlers: handlers.clone(),
                        acks: acks.clone(),
                        stats: stats.clone(),
                        stopped: stopped.clone(),
                    };
                    running.spawn(slot.serve_one(permit));
                }
            }
        };
        let _ = stop.send(true);
        while running.join_next().await.is_some() {}
        let mut stats = *stats.lock().unwrap();
        stats.conflicts = conflicts() - conflicts_before;
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

    /// Message counts as this consumer's index shows them (no store access).
    pub fn stats(&self) -> QueueStats {
        self.inner.sync();
        let idx = self.inner.index.lock().unwrap();
        let now = now_ms();
        let mut s = QueueStats {
            undecodable: idx.undecodable.len(),
            ..QueueStats::default()
        };
        for m in idx.metas.values() {
            match m.state {
                Slim::Ready if m.not_before_ms > now => s.delayed += 1,
                Slim::Ready => s.ready += 1,
                Slim::Claimed(_) => s.in_flight += 1,
                Slim::Dead => s.dead += 1,
                Slim::Done { .. } => s.done += 1,
            }
        }
        s
    }

    /// The dead letters, with their payloads: those this consumer's index shows, read from
    /// the store (64 a request, in id order).
    ///
    /// # Errors
    /// The store's errors.
    ///
    /// # Cancel safety
    /// Cancel-safe (it only reads).
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let q = &self.inner;
        let mut ids: Vec<Id> = q
            .index
            .lock()
            .unwrap()
            .metas
            .iter()
            .filter(|(_, m)| m.state == Slim::Dead)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for ids in ids.chunks(index::READ_BATCH) {
            let keys: Vec<Bytes> = ids.iter().map(|id| Bytes::from(q.key(id))).collect();
            let values = q.store.get_many(&keys, Consistency::Linearizable).await?;
            for (key, raw) in keys.iter().zip(values) {
                let Some(raw) = raw else { continue };
                // Redriven (or replaced) since the index showed it: not a dead letter any more.
                if let Ok(rec) = Record::decode(key, &raw)
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
        }
        Ok(out)
    }

    /// Moves a dead letter back to the queue with a fresh attempt budget. `Ok(false)` if `id`
    /// is not a dead letter.
    ///
    /// # Errors
    /// [`Error::Decode`] if the key holds something else; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the message was redriven or not.
    #[tracing::instrument(level = "debug", name = "queue.redrive", skip_all, fields(queue = %self.inner.name, id), err(level = "debug", Display))]
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
            match Cas::new(&*q.store, &key, Some(&raw), &new).settle().await? {
                Settled::Applied => return Ok(true),
                // Ours may have applied and the message moved on since (claimed, say): it is
                // out of the dead letters either way.
                Settled::Rejected {
                    current,
                    maybe_applied: true,
                } if !current.as_ref().is_some_and(|c| {
                    Record::decode(&key, c)
                        .is_ok_and(|r| matches!(r.header.state, State::Dead { .. }))
                }) =>
                {
                    return Ok(true);
                }
                Settled::Rejected { .. } => {}
            }
        }
    }

    /// Counters of the underlying watch (relists, events).
    pub fn watch_stats(&self) -> crate::reconcile::WatcherStats {
        self.inner.watch_stats.get()
    }
}

/// One of [`WorkQueue::run`]'s `concurrency` slots: claims one message, runs the handler on
/// it, and acks or nacks it.
struct Slot<F> {
    queue: WorkQueue,
    handler: Arc<F>,
    /// Handlers running, at most `concurrency` (claims may run ahead of them).
    handlers: Arc<tokio::sync::Semaphore>,
    /// Acks and nacks in flight, at most `concurrency` + claims ahead (written after the slot
    /// is free).
    acks: Arc<tokio::sync::Semaphore>,
    stats: Arc<Mutex<RunStats>>,
    /// True once the run stops claiming.
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl<F, Fut> Slot<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    /// Holds `permit` (a slot: one of `concurrency` + claims ahead) until the handler of the
    /// message it claims is done (the handler waits for one of `concurrency` handler permits),
    /// then an ack permit while the ack or nack is written (the slot claims the next message
    /// meanwhile); an error only if claiming failed for good.
    async fn serve_one(mut self, permit: tokio::sync::OwnedSemaphorePermit) -> Result<()> {
        let name = self.queue.inner.name.clone();
        let delivery = loop {
            let claimed = tokio::select! {
                d = self.queue.next() => d,
                _ = self.stopped.wait_for(|s| *s) => return Ok(()),
            };
            match claimed {
                Ok(d) => break d,
                // A store hiccup while claiming: try again; anything else ends the run.
                Err(e) if e.is_retryable() || e.is_ambiguous() => {
                    tracing::warn!(queue = %name, error = %e, "claiming failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = self.stopped.wait_for(|s| *s) => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        // A claim made ahead waits here for a free handler.
        let running = tokio::select! {
            biased;
            _ = self.stopped.wait_for(|s| *s) => None,
            p = self.handlers.clone().acquire_owned() => Some(p.expect("never closed")),
        };
        let Some(running) = running else {
            // Claimed, never started, and the run stops: given back now, so another consumer
            // can take it at once.
            if let Err(e) = delivery.give_back().await {
                tracing::debug!(queue = %name, error = %e, "giving back an unstarted claim failed (it is given back in the background)");
            }
            return Ok(());
        };
        let msg = delivery.message();
        let outcome = match self.queue.inner.options.handler_timeout {
            Some(t) => tokio::time::timeout(t, (self.handler)(msg))
                .await
                .unwrap_or_else(|_| Err(format!("handler timed out after {t:?}"))),
            None => (self.handler)(msg).await,
        };
        let _acking = self
            .acks
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        drop(running);
        drop(permit);
        let res = match outcome {
            Ok(()) => delivery.ack().await.map(|()| true),
            Err(reason) => delivery.nack(&reason).await.map(|()| false),
        };
        let mut s = self.stats.lock().unwrap();
        match res {
            Ok(true) => s.acked += 1,
            Ok(false) => s.failed += 1,
            Err(e) => {
                tracing::warn!(queue = %name, error = %e, "ack/nack failed (the message will be redelivered)");
                s.lost += 1;
            }
        }
        Ok(())
    }
}
