//! The consumer's index of the queue, fed by a watcher of its prefix, and the task that keeps
//! it.
//!
//! The index holds what claiming needs of each message and no payload: its id, place in the order,
//! state, due time, when it was seen and a hash of its record's bytes (about 240 bytes a message,
//! whatever the payload's size). The bytes of the oldest ready messages, up to [`CACHE_ENTRIES`] of
//! them and [`CACHE_BYTES`] in all, are kept too: from the events and lists that carried them, and
//! read ahead by [`prefetch`] for the first [`PREFETCH_AHEAD`] ready messages, several keys a
//! request. So claims need no read of their own; one that finds no bytes here (the prefetcher
//! behind, or the message beyond the cache's bounds) reads the record first.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::message::{Record, State};
use super::{Inner, now_ms};
use crate::reconcile::{Watcher, WatcherEvent};
use crate::store::{Consistency, TxnOp};

/// How many of the oldest ready messages a contended claim chooses from: enough for the
/// claims of a few consumers with a few in flight each to land on different messages.
pub(super) const CLAIM_WINDOW: usize = 16;

/// How long a ready message is left to the consumer whose share it is before another takes
/// it (measured from when this consumer's index saw it ready): about ten watch latencies of a
/// 3-node cluster, so the owner normally claims it first and the two do not collide, while a
/// busy or dead owner's share waits at most this much more.
pub(super) const STEAL_AFTER_MS: u32 = 20;

/// At most this many messages' bytes are kept (see the module docs).
pub(super) const CACHE_ENTRIES: usize = 2048;

/// At most this many bytes of messages are kept.
pub(super) const CACHE_BYTES: usize = 2 << 20;

/// How many of the oldest due ready messages [`prefetch`] keeps the bytes of.
pub(super) const PREFETCH_AHEAD: usize = 512;

/// At most this many keys are read in one request (of [`prefetch`], and of the dead letters'
/// listing).
pub(super) const READ_BATCH: usize = 64;

/// A message's id (its key without the queue's prefix).
pub(super) type Id = Arc<str>;

/// Where a message sorts: higher priority first, then enqueue time, producer, producer
/// sequence. Producers are numbered by the index that holds the order (24 bytes in all), so
/// messages of two producers enqueued in the same millisecond sort the same way within one
/// index, not necessarily in another consumer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Order {
    prio: i32,
    producer: u32,
    ts_ms: u64,
    n: u64,
}

impl Ord for Order {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .prio
            .cmp(&self.prio)
            .then(self.ts_ms.cmp(&other.ts_ms))
            .then(self.producer.cmp(&other.producer))
            .then(self.n.cmp(&other.n))
    }
}

impl PartialOrd for Order {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A message's state, without what claiming does not need (a dead letter's error is read when
/// the dead letters are listed). A claim's session is numbered like producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slim {
    Ready,
    Claimed(u32),
    Dead,
    Done { at_ms: u64 },
}

/// What the consumer knows about one message.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) order: Order,
    pub(super) state: Slim,
    pub(super) not_before_ms: u64,
    /// A hash of the record's bytes: which version of the message this is.
    pub(super) version: u64,
    /// When this index saw this version ([`local_ms`]).
    pub(super) since: u32,
}

/// Milliseconds on this process's monotonic clock, truncated to 32 bits (wraps after 49
/// days): only compared with [`ripe`], over spans far shorter than that.
pub(super) fn local_ms() -> u32 {
    // tokio's clock: the same one the consumer's wake-ups sleep on (and paused in tests).
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

/// Whether a message this index saw at `since` may be taken from its owner's share at
/// `now` (both [`local_ms`]); else the milliseconds left.
pub(super) fn ripe(since: u32, now: u32) -> Result<(), u32> {
    let age = now.wrapping_sub(since);
    if age >= STEAL_AFTER_MS {
        Ok(())
    } else {
        Err(STEAL_AFTER_MS - age)
    }
}

/// A hash of a record's bytes (see [`Meta::version`]).
pub(super) fn version_of(raw: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    raw.hash(&mut h);
    h.finish()
}

/// FNV-1a of `parts`, one after the other: a hash every consumer computes alike, whatever
/// its build (std's `DefaultHasher` promises no stable algorithm across Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Which consumer's share a message is in (modulo the number of consumers): the same for all.
fn share_of(id: &str) -> u64 {
    fnv1a(&[id.as_bytes()])
}

/// A consumer's preference among the head of the queue: a hash of its session and the id
/// (different consumers prefer different messages).
fn spread_rank(session: &str, id: &str) -> u64 {
    fnv1a(&[session.as_bytes(), id.as_bytes()])
}

/// Which message a consumer claims next, of the `eligible` ready ones (in order). Alone and
/// uncontended (`consumers == 1`, no lost race lately), the first. Otherwise it chooses among
/// the first [`CLAIM_WINDOW`] of the first one's priority: with others, the first of its own
/// share (`share_of(id) % consumers == rank`); its share empty there, the one `me` ranks first
/// of those `ripe` (left to their owners for [`STEAL_AFTER_MS`]: `Err` is how much longer,
/// and the least of those is returned when none is ripe yet); alone but colliding (another
/// consumer it has not seen claim yet), the one `me` ranks first.
pub(super) fn pick<'a>(
    mut eligible: impl Iterator<Item = (&'a Order, &'a Id)>,
    consumers: usize,
    rank: usize,
    contended: bool,
    me: &str,
    ripe: impl Fn(&Id) -> Result<(), u32>,
) -> Result<&'a Id, Option<u32>> {
    let (first_order, first) = eligible.next().ok_or(None)?;
    if consumers <= 1 && !contended {
        return Ok(first);
    }
    let window: Vec<&Id> = std::iter::once(first)
        .chain(
            eligible
                .take_while(|(o, _)| o.prio == first_order.prio)
                .map(|(_, id)| id),
        )
        .take(CLAIM_WINDOW)
        .collect();
    if consumers <= 1 {
        let spread = window.iter().min_by_key(|id| spread_rank(me, id));
        return spread.copied().ok_or(None);
    }
    let n = consumers as u64;
    if let Some(own) = window.iter().find(|id| share_of(id) % n == rank as u64) {
        return Ok(own);
    }
    let mut wait: Option<u32> = None;
    let stealable = window.iter().filter(|id| match ripe(id) {
        Ok(()) => true,
        Err(left) => {
            wait = Some(wait.map_or(left, |w| w.min(left)));
            false
        }
    });
    let steal = stealable.min_by_key(|id| spread_rank(me, id)).copied();
    steal.ok_or(wait)
}

/// What the consumer knows about each message.
#[derive(Default)]
pub(super) struct Index {
    pub(super) metas: HashMap<Id, Meta>,
    pub(super) ready: BTreeSet<(Order, Id)>,
    /// Ready messages with a due time, by it.
    delayed: BTreeSet<(u64, Id)>,
    /// Claimed messages by the session holding them.
    pub(super) claimed: HashMap<Arc<str>, HashSet<Id>>,
    pub(super) undecodable: HashSet<Bytes>,
    /// Undecodable keys already logged (kept across relists: a junk key is logged once, not
    /// at every rescan).
    warned: HashSet<Bytes>,
    /// Undecodable keys logged by this index.
    logged: u64,
    /// The sessions seen claiming messages of this queue, with when (wall ms): the consumers
    /// the head of the queue is shared among.
    pub(super) claimers: HashMap<String, u64>,
    /// Producers' and sessions' names, numbered.
    names: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
    /// The bytes of the oldest ready messages (see the module docs), always their current
    /// ones, and their order.
    cache: HashMap<Id, Bytes>,
    cached: BTreeSet<(Order, Id)>,
    cached_bytes: usize,
}

impl Index {
    /// An index for a new list of the queue, with what is kept across lists.
    fn relisting(&mut self) -> Index {
        Index {
            claimers: self.claimers.clone(),
            warned: self.undecodable.clone(),
            ..Index::default()
        }
    }

    /// The number of name `s` in this index.
    fn number(&mut self, s: &str) -> u32 {
        if let Some(n) = self.numbers.get(s) {
            return *n;
        }
        let name: Arc<str> = Arc::from(s);
        let n = u32::try_from(self.names.len()).expect("fewer than 2^32 names");
        self.names.push(name.clone());
        self.numbers.insert(name, n);
        n
    }

    /// Keeps `raw` as message `id`'s bytes if it is among the oldest ready ones that fit,
    /// dropping younger ones to make room.
    fn cache(&mut self, id: &Id, order: Order, raw: &Bytes) {
        if raw.len() > CACHE_BYTES {
            return;
        }
        // The younger entries it would push out, if it fits once they are gone.
        let fits = |entries: usize, bytes: usize| {
            entries < CACHE_ENTRIES && bytes + raw.len() <= CACHE_BYTES
        };
        let (mut entries, mut bytes, mut evict) = (self.cache.len(), self.cached_bytes, 0);
        for (o, id) in self.cached.iter().rev() {
            if fits(entries, bytes) || *o <= order {
                break;
            }
            entries -= 1;
            bytes -= self.cache.get(id).map_or(0, Bytes::len);
            evict += 1;
        }
        if !fits(entries, bytes) {
            return;
        }
        for _ in 0..evict {
            let (_, gone) = self.cached.pop_last().expect("counted above");
            if let Some(b) = self.cache.remove(&gone) {
                self.cached_bytes -= b.len();
            }
        }
        // A copy: `raw` can be a slice of a much larger buffer (a scan's).
        self.cache.insert(id.clone(), Bytes::copy_from_slice(raw));
        self.cached.insert((order, id.clone()));
        self.cached_bytes += raw.len();
    }

    /// How the work is shared: the number of consumers seen claiming within `within_ms` (and
    /// `me`), and `me`'s rank among them (by session id); forgets older ones. Claims and the
    /// tombstone sweep are split by it ([`share_of`] modulo the number).
    pub(super) fn share(&mut self, me: &str, now: u64, within_ms: u64) -> (usize, usize) {
        self.claimers
            .retain(|_, at| now.saturating_sub(*at) < within_ms);
        let mut all: Vec<&str> = self.claimers.keys().map(String::as_str).collect();
        if !self.claimers.contains_key(me) {
            all.push(me);
        }
        all.sort_unstable();
        let rank = all.iter().position(|c| *c == me).unwrap_or(0);
        (all.len(), rank)
    }

    /// Up to `max` of the first `ahead` due ready messages whose bytes are not kept here,
    /// oldest first.
    ///
    /// With the cache nearly full (by entries or bytes), only messages older than its youngest
    /// one: a younger one's bytes would be refused, and reading them again on every change
    /// would be a busy loop. At most `4 * ahead` ready messages are looked at.
    fn uncached_head(&self, now: u64, ahead: usize, max: usize) -> Vec<Id> {
        let nearly_full = self.cache.len() + max >= CACHE_ENTRIES
            || self.cached_bytes + CACHE_BYTES / 8 >= CACHE_BYTES;
        let younger_than = nearly_full
            .then(|| self.cached.last().map(|(o, _)| *o))
            .flatten();
        self.ready
            .iter()
            .take(ahead.saturating_mul(4))
            .take_while(|(o, _)| younger_than.is_none_or(|y| *o < y))
            .filter(|(_, id)| self.metas.get(id).is_some_and(|m| m.not_before_ms <= now))
            .take(ahead)
            .filter(|(_, id)| !self.cache.contains_key(id))
            .take(max)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Keeps `raw`, read from the store, as message `id`'s bytes if the index shows it ready
    /// in exactly that version (else the read is older or newer than the index: not kept).
    /// Returns whether it did.
    fn fill(&mut self, id: &str, raw: &Bytes) -> bool {
        let Some((id, meta)) = self.metas.get_key_value(id) else {
            return false;
        };
        if meta.state != Slim::Ready
            || meta.version != version_of(raw)
            || self.cache.contains_key(id)
        {
            return false;
        }
        let (id, order) = (id.clone(), meta.order);
        self.cache(&id, order, raw);
        self.cache.contains_key(&id)
    }

    /// The earliest due time of a ready message after `now` (wall ms).
    pub(super) fn next_due_after(&self, now: u64) -> Option<u64> {
        let from = (now.saturating_add(1), Id::from(""));
        self.delayed.range(from..).next().map(|(at, _)| *at)
    }

    /// The current bytes of message `id`, if kept here.
    pub(super) fn bytes(&self, id: &str) -> Option<Bytes> {
        self.cache.get(id).cloned()
    }

    /// Ready and claimed messages.
    pub(super) fn depth(&self) -> usize {
        self.ready.len() + self.claimed.values().map(HashSet::len).sum::<usize>()
    }

    pub(super) fn remove(&mut self, id: &str) {
        let Some((id, meta)) = self.metas.remove_entry(id) else {
            return;
        };
        match meta.state {
            Slim::Ready => {
                if meta.not_before_ms > 0 {
                    self.delayed.remove(&(meta.not_before_ms, id.clone()));
                }
                let at = (meta.order, id);
                self.ready.remove(&at);
                if let Some(b) = self.cache.remove(&at.1) {
                    self.cached_bytes -= b.len();
                    self.cached.remove(&at);
                }
            }
            Slim::Claimed(session) => {
                let session = self.names[session as usize].clone();
                if let Some(set) = self.claimed.get_mut(&session) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.claimed.remove(&session);
                    }
                }
            }
            Slim::Dead | Slim::Done { .. } => {}
        }
    }

    /// Counts `key` as undecodable; true if it is to be logged (not logged before).
    fn skip(&mut self, key: &Bytes) -> bool {
        self.undecodable.insert(key.clone());
        let new = self.warned.insert(key.clone());
        self.logged += u64::from(new);
        new
    }

    fn forget_undecodable(&mut self, key: &Bytes) {
        self.undecodable.remove(key);
        self.warned.remove(key);
    }

    /// Records message `key` (under `prefix`) as `raw` now holds it; `None`: deleted.
    pub(super) fn upsert(&mut self, prefix: &[u8], key: &Bytes, raw: Option<&Bytes>) {
        let Some(id) = key
            .strip_prefix(prefix)
            .and_then(|s| std::str::from_utf8(s).ok())
        else {
            if raw.is_none() {
                self.forget_undecodable(key);
            } else if self.skip(key) {
                tracing::warn!(key = %crate::error::show(key), "skipping a key in a queue");
            }
            return;
        };
        self.remove(id);
        let Some(raw) = raw else {
            self.forget_undecodable(key);
            return;
        };
        self.undecodable.remove(key);
        let h = match Record::decode(key, raw) {
            Ok(r) => {
                // A message now: junk written here again later is news again. (Checked first:
                // this runs for every event, and the set is nearly always empty.)
                if !self.warned.is_empty() {
                    self.warned.remove(key);
                }
                r.header
            }
            Err(e) => {
                if self.skip(key) {
                    tracing::warn!(error = %e, "skipping a key in a queue");
                }
                return;
            }
        };
        let id: Id = Arc::from(id);
        let order = Order {
            prio: h.prio,
            producer: self.number(&h.producer),
            ts_ms: h.ts_ms,
            n: h.n,
        };
        let state = match h.state {
            State::Ready => {
                self.ready.insert((order, id.clone()));
                if h.not_before_ms > 0 {
                    self.delayed.insert((h.not_before_ms, id.clone()));
                }
                // Not yet due (delayed, or in its backoff): kept once due, by the read-ahead.
                if h.not_before_ms <= now_ms() {
                    self.cache(&id, order, raw);
                }
                Slim::Ready
            }
            State::Claimed { session } => {
                let number = self.number(&session);
                let name = self.names[number as usize].clone();
                self.claimed.entry(name).or_default().insert(id.clone());
                self.claimers.insert(session, now_ms());
                Slim::Claimed(number)
            }
            State::Dead { .. } => Slim::Dead,
            State::Done { at_ms } => Slim::Done { at_ms },
        };
        self.metas.insert(
            id,
            Meta {
                order,
                state,
                not_before_ms: h.not_before_ms,
                version: version_of(raw),
                since: local_ms(),
            },
        );
    }
}

/// Keeps the index in step with the queue's watcher, and removes expired tombstones.
pub(super) async fn maintain(q: std::sync::Weak<Inner>, mut events: Watcher) {
    let mut janitor = tokio::time::interval(Duration::from_secs(60));
    janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep: Option<AbortOnDrop> = None;
    // A relist being built, installed at its `InitDone`.
    let mut relist: Option<Index> = None;
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                let Some(q) = q.upgrade() else { return };
                match event {
                    Ok(WatcherEvent::Init { .. }) => {
                        relist = Some(q.index.lock().unwrap().relisting());
                        continue;
                    }
                    Ok(WatcherEvent::InitApply(e)) => {
                        if let Some(idx) = relist.as_mut() {
                            idx.upsert(&q.prefix, &e.key, Some(&e.value));
                        }
                        continue;
                    }
                    Ok(WatcherEvent::InitDone { .. }) => {
                        if let Some(idx) = relist.take() {
                            *q.index.lock().unwrap() = idx;
                        }
                    }
                    Ok(WatcherEvent::Apply(e)) => {
                        q.index.lock().unwrap().upsert(&q.prefix, &e.key, Some(&e.value));
                    }
                    Ok(WatcherEvent::Delete { key, .. }) => {
                        q.index.lock().unwrap().upsert(&q.prefix, &key, None);
                    }
                    // A relist follows (and replaces the index at its end).
                    Err(e) => {
                        tracing::debug!(queue = %q.name, error = %e, "the queue's watch was lost; relisting");
                        continue;
                    }
                }
                let depth = q.index.lock().unwrap().depth();
                metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => q.name.clone()).set(depth as f64);
                q.changed.notify_waiters();
            }
            _ = janitor.tick() => {
                let Some(inner) = q.upgrade() else { return };
                if sweep.as_ref().is_some_and(|t| !t.0.is_finished()) {
                    continue;
                }
                let now = now_ms();
                let cutoff = now.saturating_sub(inner.options.retention.as_millis() as u64);
                let me = inner.session.id();
                let within = inner.session.lease().as_millis() as u64;
                // This consumer's share of them (as claims are shared): a consumer that stopped
                // claiming drops out of the others' count a lease later, and its share with it.
                let expired: Vec<Id> = {
                    let mut idx = inner.index.lock().unwrap();
                    let (n, rank) = idx.share(&me, now, within);
                    idx.metas.iter()
                        .filter(|(id, m)| expired_at(&m.state, cutoff) && share_of(id) % n as u64 == rank as u64)
                        .map(|(id, _)| id.clone())
                        .collect()
                };
                // In a task of its own: a sweep of many tombstones on a slow store takes
                // seconds, and the index must keep up with the changes meanwhile.
                sweep = Some(AbortOnDrop(tokio::spawn(sweep_tombstones(q.clone(), expired, cutoff))));
            }
        }
    }
}

/// Keeps the bytes of the first [`PREFETCH_AHEAD`] due ready messages in the index's cache,
/// reading those it lacks ([`READ_BATCH`] keys a request), whenever the index changes
/// (`changed`). Ends when the queue is dropped; it holds the queue only while it reads.
pub(super) async fn prefetch(q: std::sync::Weak<Inner>, changed: Arc<tokio::sync::Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(inner) = q.upgrade() else { return };
        let want = inner
            .index
            .lock()
            .unwrap()
            .uncached_head(now_ms(), PREFETCH_AHEAD, READ_BATCH);
        if want.is_empty() {
            drop(inner);
            notified.await;
            continue;
        }
        let keys: Vec<Bytes> = want.iter().map(|id| Bytes::from(inner.key(id))).collect();
        // A lease read is enough: bytes older or newer than the index are not kept.
        match inner.store.get_many(&keys, Consistency::Lease).await {
            Ok(values) => {
                let filled = {
                    let mut idx = inner.index.lock().unwrap();
                    want.iter()
                        .zip(values)
                        .filter(|(id, value)| value.as_ref().is_some_and(|raw| idx.fill(id, raw)))
                        .count()
                };
                if filled == 0 {
                    // The store is ahead of the index (or behind it): the same reads would
                    // be refused again until the index changes.
                    drop(inner);
                    notified.await;
                }
            }
            Err(e) => {
                tracing::debug!(queue = %inner.name, error = %e, "reading ahead failed");
                drop(inner);
                // Claims read for themselves meanwhile; try again after a pause or a change.
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        }
    }
}

/// A task that ends with its owner: the sweep must not outlive the queue's maintainer.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn expired_at(state: &Slim, cutoff_ms: u64) -> bool {
    matches!(state, Slim::Done { at_ms } if *at_ms < cutoff_ms)
}

/// Deletes the expired Done tombstones in `ids` that the index still shows as such, each only
/// if it still holds the tombstone read just before (a conditional delete, see
/// [`TxnOp::delete_if`]): a message enqueued again under its id meanwhile stays. The deletes
/// of up to [`READ_BATCH`] tombstones go as one transaction.
async fn sweep_tombstones(q: std::sync::Weak<Inner>, ids: Vec<Id>, cutoff_ms: u64) {
    for chunk in ids.chunks(READ_BATCH) {
        let Some(q) = q.upgrade() else { return };
        let keys: Vec<Bytes> = {
            let idx = q.index.lock().unwrap();
            chunk
                .iter()
                .filter(|id| {
                    idx.metas
                        .get(*id)
                        .is_some_and(|m| expired_at(&m.state, cutoff_ms))
                })
                .map(|id| Bytes::from(q.key(id)))
                .collect()
        };
        if keys.is_empty() {
            continue;
        }
        // (A failed read or delete is retried by the next round.)
        let Ok(values) = q.store.get_many(&keys, Consistency::Lease).await else {
            return;
        };
        let deletes: Vec<TxnOp> = keys
            .into_iter()
            .zip(values)
            .filter_map(|(key, value)| {
                let value = value?;
                let rec = Record::decode(&key, &value).ok()?;
                let expired =
                    matches!(rec.header.state, State::Done { at_ms } if at_ms < cutoff_ms);
                expired.then(|| TxnOp::delete_if(key, value))
            })
            .collect();
        delete_tombstones(&q, deletes).await;
    }
}

/// Deletes tombstones, all in one transaction; if it is refused (one of them changed since it
/// was read) each on its own. A store without transactions deletes them unconditionally (an
/// enqueue between the read and the delete is then lost with the tombstone).
async fn delete_tombstones(q: &Inner, deletes: Vec<TxnOp>) {
    let no_transactions = crate::store::txn::unsupported;
    let alone = match q.store.transact(&deletes).await {
        Ok(true) => return,
        Ok(false) => deletes.len() > 1,
        Err(e) => no_transactions(&e),
    };
    if !alone {
        return;
    }
    futures::stream::iter(deletes)
        .for_each_concurrent(SWEEP_IN_FLIGHT, |op| async move {
            if let Err(e) = q.store.transact(std::slice::from_ref(&op)).await
                && no_transactions(&e)
            {
                let _ = q.store.delete(&op.key).await;
            }
        })
        .await;
}

/// Tombstone deletes a sweep keeps in flight.
const SWEEP_IN_FLIGHT: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn order(prio: i32, n: u64) -> Order {
        Order {
            prio,
            producer: 0,
            ts_ms: 1,
            n,
        }
    }

    fn queue(prios: &[i32]) -> Vec<(Order, Id)> {
        prios
            .iter()
            .enumerate()
            .map(|(i, p)| (order(*p, i as u64), Arc::from(format!("m{i:03}"))))
            .collect()
    }

    fn pick_of(
        q: &[(Order, Id)],
        consumers: usize,
        rank: usize,
        contended: bool,
        me: &str,
    ) -> String {
        pick(
            q.iter().map(|(o, id)| (o, id)),
            consumers,
            rank,
            contended,
            me,
            |_| Ok(()),
        )
        .unwrap()
        .to_string()
    }

    #[test]
    fn a_lone_uncontended_consumer_takes_the_first() {
        let q = queue(&[0; 40]);
        assert_eq!(pick_of(&q, 1, 0, false, "s"), "m000");
        assert_eq!(
            pick(std::iter::empty(), 1, 0, false, "s", |_| Ok(())),
            Err(None)
        );
    }

    #[test]
    fn consumers_take_their_own_shares_of_the_window() {
        let q = queue(&[0; 40]);
        let picks: Vec<String> = (0..3).map(|r| pick_of(&q, 3, r, false, "s")).collect();
        for (rank, id) in picks.iter().enumerate() {
            assert_eq!(share_of(id) % 3, rank as u64, "{picks:?}");
            let pos = q.iter().position(|(_, i)| **i == **id).unwrap();
            assert!(pos < CLAIM_WINDOW, "{id} is outside the window");
            // The first of its share: no earlier message is in it.
            assert!(q[..pos].iter().all(|(_, i)| share_of(i) % 3 != rank as u64));
        }
    }

    #[test]
    fn a_contended_lone_consumer_spreads_and_stays_in_the_window_and_priority() {
        // 3 of priority 5 first: a spread pick stays among them.
        let q = queue(&[5, 5, 5, 0, 0, 0, 0, 0]);
        let picks: HashSet<String> = (0..32)
            .map(|i| pick_of(&q, 1, 0, true, &format!("session-{i}")))
            .collect();
        assert!(
            picks
                .iter()
                .all(|p| ["m000", "m001", "m002"].contains(&p.as_str()))
        );
        assert!(
            picks.len() > 1,
            "different sessions prefer different messages"
        );
        let long = queue(&[0; 100]);
        for i in 0..32 {
            let p = pick_of(&long, 1, 0, true, &format!("session-{i}"));
            let pos = long.iter().position(|(_, id)| **id == *p).unwrap();
            assert!(pos < CLAIM_WINDOW);
        }
    }

    #[test]
    fn a_consumer_whose_share_is_empty_in_the_window_takes_a_spread_pick() {
        let q = queue(&[0; 2]);
        // 16 consumers, 2 messages: most ranks have no share here, yet each gets one of them.
        for rank in 0..16 {
            let p = pick_of(&q, 16, rank, false, &format!("s{rank}"));
            assert!(p == "m000" || p == "m001");
        }
    }

    #[test]
    fn another_consumers_share_is_left_to_it_until_ripe() {
        let q = queue(&[0; 2]);
        let owners: Vec<u64> = q.iter().map(|(_, id)| share_of(id) % 16).collect();
        let rank = (0..16u64).find(|r| !owners.contains(r)).unwrap() as usize;
        fn ids(q: &[(Order, Id)]) -> Vec<(&Order, &Id)> {
            q.iter().map(|(o, id)| (o, id)).collect()
        }
        // Neither ripe: nothing now, and the sooner of the two is when to look again.
        let young = pick(ids(&q).into_iter(), 16, rank, false, "s", |id: &Id| {
            Err(if &**id == "m000" { 7 } else { 3 })
        });
        assert_eq!(young, Err(Some(3)));
        // One ripe: that one.
        let one = pick(ids(&q).into_iter(), 16, rank, true, "s", |id: &Id| {
            if &**id == "m001" { Ok(()) } else { Err(5) }
        });
        assert_eq!(one.map(|id| id.to_string()), Ok("m001".to_string()));
        // The owner takes its own at once, ripe or not.
        let owner = owners[0] as usize;
        let own = pick(ids(&q).into_iter(), 16, owner, false, "s", |_: &Id| Err(20));
        assert_eq!(own.map(|id| id.to_string()), Ok("m000".to_string()));
        assert_eq!(ripe(100, 100 + STEAL_AFTER_MS), Ok(()));
        assert_eq!(ripe(100, 105), Err(STEAL_AFTER_MS - 5));
        assert_eq!(
            ripe(u32::MAX - 2, 1 + STEAL_AFTER_MS),
            Ok(()),
            "across the wrap"
        );
    }

    fn record(
        id: &str,
        state: State,
        ts_ms: u64,
        not_before_ms: u64,
        w: u64,
        payload: &[u8],
    ) -> Bytes {
        let r = Record {
            header: super::super::message::Header {
                v: 1,
                id: id.into(),
                prio: 0,
                ts_ms,
                producer: "p".into(),
                n: 0,
                not_before_ms,
                attempts: 0,
                state,
                last_error: None,
                w,
            },
            payload: Bytes::copy_from_slice(payload),
        };
        Bytes::from(r.encode())
    }

    fn ready_record(id: &str, ts_ms: u64, not_before_ms: u64, w: u64) -> Bytes {
        record(id, State::Ready, ts_ms, not_before_ms, w, b"payload")
    }

    #[test]
    fn the_read_ahead_keeps_the_due_head_and_only_the_bytes_the_index_shows() {
        let prefix = b"/q/m/";
        let mut idx = Index::default();
        let key = |id: &str| Bytes::from(format!("/q/m/{id}"));
        for i in 0..6u64 {
            let id = format!("m{i}");
            // m1 is not due before 10_000.
            let due = if i == 1 { 10_000 } else { 0 };
            idx.upsert(prefix, &key(&id), Some(&ready_record(&id, i, due, 0)));
        }
        assert_eq!(idx.next_due_after(5_000), Some(10_000));
        assert_eq!(idx.next_due_after(10_000), None);
        // As if listed beyond the cache's bounds: nothing kept.
        idx.cache.clear();
        idx.cached.clear();
        idx.cached_bytes = 0;
        let ids = |v: Vec<Id>| v.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(idx.uncached_head(5_000, 4, 3)), ["m0", "m2", "m3"]);
        assert_eq!(
            ids(idx.uncached_head(20_000, 4, 8)),
            ["m0", "m1", "m2", "m3"],
            "due now, and only the first `ahead`"
        );
        // The bytes the index shows are kept; other versions of them are not.
        assert!(idx.fill("m0", &ready_record("m0", 0, 0, 0)));
        assert!(
            !idx.fill("m2", &ready_record("m2", 2, 0, 99)),
            "another version"
        );
        assert!(!idx.fill("gone", &ready_record("gone", 0, 0, 0)));
        assert!(
            !idx.fill("m0", &ready_record("m0", 0, 0, 0)),
            "already kept"
        );
        assert_eq!(idx.bytes("m0"), Some(ready_record("m0", 0, 0, 0)));
        assert_eq!(ids(idx.uncached_head(5_000, 4, 8)), ["m2", "m3", "m4"]);
        assert_eq!(idx.cache.len(), idx.cached.len());
        // Claimed, the delayed one is no longer due at all.
        idx.upsert(prefix, &key("m1"), None);
        assert_eq!(idx.next_due_after(5_000), None);
    }

    #[test]
    fn the_cache_evicts_only_to_make_room_and_the_read_ahead_stops_where_it_would_be_refused() {
        let prefix = b"/q/m/";
        let mut idx = Index::default();
        let key = |id: &str| Bytes::from(format!("/q/m/{id}"));
        let msg = |id: &str, ts: u64, size: usize| {
            let mut r = Record::decode(b"/q/m/x", &ready_record(id, ts, 0, 0)).unwrap();
            r.payload = Bytes::from(vec![0u8; size]);
            Bytes::from(r.encode())
        };
        let quarter = CACHE_BYTES / 4 - 512;
        for (id, ts) in [("old", 2), ("b0", 100), ("b1", 101)] {
            idx.upsert(prefix, &key(id), Some(&msg(id, ts, quarter)));
        }
        assert_eq!(idx.cache.len(), 3);
        // Older than b0 and b1, but it does not fit even once they are gone: nothing evicted.
        idx.upsert(
            prefix,
            &key("mid"),
            Some(&msg("mid", 50, 3 * quarter + 2048)),
        );
        assert!(idx.bytes("mid").is_none());
        assert!(idx.bytes("b0").is_some() && idx.bytes("b1").is_some());
        // Fits once the youngest (b1) goes: b1 makes room, b0 stays.
        idx.upsert(
            prefix,
            &key("mid2"),
            Some(&msg("mid2", 60, 2 * quarter - 2048)),
        );
        assert!(idx.bytes("mid2").is_some());
        assert!(idx.bytes("b1").is_none() && idx.bytes("b0").is_some());
        assert!(idx.cached_bytes <= CACHE_BYTES);
        assert_eq!(idx.cache.len(), idx.cached.len());
        // The cache is nearly full (the younger y* do not fit): read ahead only what is older
        // than its youngest (b0).
        for i in 0..4u64 {
            let id = format!("y{i}");
            idx.upsert(prefix, &key(&id), Some(&msg(&id, 1000 + i, 8192)));
        }
        assert!(idx.cached_bytes + CACHE_BYTES / 8 >= CACHE_BYTES);
        let ids = |v: Vec<Id>| v.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(idx.uncached_head(5_000, 64, 64)), ["mid"]);
        // A deleted key that is not UTF-8 leaves nothing behind.
        idx.upsert(prefix, &Bytes::from_static(b"/q/m/\xff"), None);
        assert!(idx.undecodable.is_empty());
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn the_index_keeps_no_payload_beyond_its_cache_and_follows_states() {
        let prefix = b"/q/m/";
        let mut idx = Index::default();
        let rec = |id: &str, state: State, payload: &[u8]| record(id, state, 1, 0, 0, payload);
        let key = Bytes::from_static(b"/q/m/a");
        let ready = rec("a", State::Ready, b"hello");
        idx.upsert(prefix, &key, Some(&ready));
        assert_eq!(idx.bytes("a"), Some(ready.clone()));
        assert_eq!(idx.ready.len(), 1);
        assert_eq!(idx.metas["a"].version, version_of(&ready));
        let claimed = rec(
            "a",
            State::Claimed {
                session: "s1".into(),
            },
            b"hello",
        );
        idx.upsert(prefix, &key, Some(&claimed));
        assert_eq!(idx.bytes("a"), None, "only ready messages are kept");
        assert!(idx.ready.is_empty());
        assert_eq!(idx.claimed[&Arc::from("s1")].len(), 1);
        assert_eq!(idx.cached_bytes, 0);
        idx.upsert(prefix, &key, None);
        assert!(idx.metas.is_empty());
        assert!(idx.claimed.is_empty());
        // Not ours to read: skipped, counted, and forgotten once deleted.
        let odd = Bytes::from_static(b"/q/m/x");
        idx.upsert(prefix, &odd, Some(&Bytes::from_static(b"junk")));
        assert_eq!(idx.undecodable.len(), 1);
        assert_eq!(idx.logged, 1);
        // Logged once: not again by a relist (every rescan) that finds it still there.
        let mut relist = idx.relisting();
        relist.upsert(prefix, &odd, Some(&Bytes::from_static(b"junk")));
        assert_eq!(relist.undecodable.len(), 1);
        assert_eq!(
            relist.logged, 0,
            "a junk key is logged once, not at every rescan"
        );
        idx.upsert(prefix, &odd, None);
        assert!(idx.undecodable.is_empty());
        // Deleted, then junk again: logged again.
        idx.upsert(prefix, &odd, Some(&Bytes::from_static(b"junk")));
        assert_eq!(idx.logged, 2);
        idx.upsert(prefix, &odd, None);
        // Higher priority first, then age.
        let mut prio = rec("c", State::Ready, b"");
        let mut r = Record::decode(b"/q/m/c", &prio).unwrap();
        r.header.prio = 5;
        r.header.ts_ms = 100;
        prio = Bytes::from(r.encode());
        idx.upsert(prefix, &key, Some(&ready));
        idx.upsert(prefix, &Bytes::from_static(b"/q/m/c"), Some(&prio));
        let first: Vec<&str> = idx.ready.iter().map(|(_, id)| &**id).collect();
        assert_eq!(first, ["c", "a"]);
        // The cache is bounded.
        let big = vec![0u8; CACHE_BYTES / 2];
        for i in 0..4 {
            let id = format!("b{i}");
            let key = Bytes::from(format!("/q/m/{id}"));
            idx.upsert(prefix, &key, Some(&rec(&id, State::Ready, &big)));
        }
        assert!(idx.cached_bytes <= CACHE_BYTES);
        assert_eq!(idx.ready.len(), 6);
        assert!(idx.bytes("b3").is_none());
        // ... and holds the oldest: an older message pushes a younger one out.
        assert!(idx.bytes("b0").is_some());
        let mut old = Record::decode(b"/q/m/o", &rec("o", State::Ready, &big)).unwrap();
        old.header.ts_ms = 0;
        idx.upsert(
            prefix,
            &Bytes::from_static(b"/q/m/o"),
            Some(&Bytes::from(old.encode())),
        );
        assert!(idx.bytes("o").is_some());
        assert!(
            idx.bytes("b0").is_none(),
            "the youngest cached one made room"
        );
        assert!(idx.cached_bytes <= CACHE_BYTES);
        assert_eq!(idx.cache.len(), idx.cached.len());
    }
}
