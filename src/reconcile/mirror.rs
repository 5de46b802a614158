//! A mirror (reflector): the current contents of a key or prefix, kept by a [`watcher`].

use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, watch};

use super::watcher::{Entry, StatsHandle, WatcherEvent, WatcherOptions, WatcherStats, watcher};
use crate::error::{Error, Result};
use crate::store::{PerStore, Store, WatchTarget};

/// One consistent view of a mirror: every entry as of [`Snapshot::revision`]. Cloning is O(1)
/// (a persistent map shares structure with the mirror), so readers can hold one as long as
/// they like without blocking the mirror.
#[derive(Clone, Default)]
pub struct Snapshot {
    entries: imbl::OrdMap<Bytes, Entry>,
    revision: u64,
    ready: bool,
    generation: u64,
}

impl Snapshot {
    /// The entry for `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.entries.values()
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn with_prefix<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .range(Bytes::copy_from_slice(prefix)..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The highest revision this view reflects (the last snapshot or live event applied).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// False until the first list has completed.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Increases by one on every change to this view (useful to tell two views apart).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("len", &self.entries.len())
            .field("revision", &self.revision)
            .field("ready", &self.ready)
            .finish()
    }
}

/// One change to a mirror, as seen by [`Mirror::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: Bytes,
    /// The value before (`None`: the key was absent).
    pub old: Option<Bytes>,
    /// The value now (`None`: the key is gone).
    pub new: Option<Bytes>,
    /// The revision of the change (for a change found by a relist, the snapshot's revision).
    pub revision: u64,
}

/// Options of a [`Mirror`].
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    pub(crate) watcher: WatcherOptions,
    pub(crate) change_buffer: usize,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            watcher: WatcherOptions::default(),
            change_buffer: 1024,
        }
    }
}

impl MirrorOptions {
    /// The watcher's options (resync period, idle timeout, backoff).
    #[must_use]
    pub fn watcher(mut self, options: WatcherOptions) -> Self {
        self.watcher = options;
        self
    }

    /// How many changes a slow [`Mirror::changes`] subscriber may fall behind before it gets
    /// [`Error::Lagged`]. Default 1024.
    #[must_use]
    pub fn change_buffer(mut self, n: usize) -> Self {
        self.change_buffer = n.max(1);
        self
    }
}

struct Shared {
    target: WatchTarget,
    state: watch::Sender<Snapshot>,
    changes: broadcast::Sender<Change>,
    stats: StatsHandle,
    /// Set when the watcher stopped for good (a fatal error).
    closed: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
}

/// The contents of a key or prefix, kept current by a background [`watcher`] task, with
/// consistent snapshots for readers and a stream of changes.
///
/// # Guarantees
/// - Readers always see a consistent [`Snapshot`]: a relist is built aside and swapped in
///   whole at `InitDone`; live events are applied one at a time.
/// - A key's revision never goes backwards, and neither does the snapshot's.
/// - Writing a key's current value again changes nothing and announces nothing.
/// - After every relist the mirror equals the store at that relist's revision; with the
///   periodic resync on (the default), the mirror converges to the store within one resync
///   period of the last write, whatever events d-engine dropped.
///
/// # NOT guaranteed
/// - Every intermediate value: a value overwritten while events were being lost is never seen.
/// - Freshness: the mirror is as fresh as the watch (one heartbeat behind on a follower).
///
/// # Failure modes
/// Lost watches are repaired by the watcher (see [`watcher`]); [`Mirror::last_error`] tells
/// the most recent cause and [`Mirror::stats`] counts them. If the target is invalid or the
/// embedded engine stops, the mirror closes: [`Mirror::wait_ready`] and
/// [`Mirror::wait_for`] return the error. Dropping the mirror stops its task.
pub struct Mirror {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("target", &self.shared.target)
            .field("snapshot", &*self.shared.state.borrow())
            .finish()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mirror {
    /// Starts mirroring `target` (a key or a '/'-bounded prefix) from `store`. Must be called
    /// within a tokio runtime. Returns at once; use [`Mirror::wait_ready`] for the first list.
    pub fn start(store: Arc<dyn Store>, target: WatchTarget, options: MirrorOptions) -> Mirror {
        let stream = watcher(store, target.clone(), options.watcher);
        let shared = Arc::new(Shared {
            target,
            state: watch::Sender::new(Snapshot::default()),
            changes: broadcast::Sender::new(options.change_buffer),
            stats: stream.stats(),
            closed: Mutex::new(None),
            last_error: Mutex::new(None),
        });
        let task = tokio::spawn(run(shared.clone(), stream));
        Mirror { shared, task }
    }

    /// A mirror of `target` shared by every caller in this process that asks for the same
    /// store (the same `Arc`) and target while one is alive: N readers of one key cost one
    /// watch and one relist loop, not N. The first caller's options apply.
    pub fn shared(
        store: Arc<dyn Store>,
        target: WatchTarget,
        options: MirrorOptions,
    ) -> Arc<Mirror> {
        static REGISTRY: PerStore<WatchTarget, Mirror> = PerStore::new();
        crate::store::shared_per_store(&REGISTRY, &store.clone(), target.clone(), || {
            Mirror::start(store, target, options)
        })
    }

    /// What this mirror watches.
    pub fn target(&self) -> &WatchTarget {
        &self.shared.target
    }

    /// The current view (O(1)).
    pub fn snapshot(&self) -> Snapshot {
        self.shared.state.borrow().clone()
    }

    /// The current entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.shared.state.borrow().get(key).cloned()
    }

    /// A receiver that is notified whenever the view changes (a live event applied or a relist
    /// swapped in). The latest-value channel never lags: a slow reader just sees a newer view.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.shared.state.subscribe()
    }

    /// Every change from now on, one per key change, in order. A subscriber that falls more
    /// than the change buffer behind gets one [`Error::Lagged`] item and continues with newer
    /// changes: re-read [`Mirror::snapshot`] then.
    pub fn changes(&self) -> impl Stream<Item = Result<Change>> + Send + 'static {
        let rx = self.shared.changes.subscribe();
        let target = self.shared.target.to_string();
        futures::stream::unfold((rx, target), |(mut rx, target)| async move {
            match rx.recv().await {
                Ok(c) => Some((Ok(c), (rx, target))),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    let e = Error::Lagged {
                        target: target.clone(),
                        skipped,
                    };
                    Some((Err(e), (rx, target)))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    /// Waits for the first complete list.
    ///
    /// # Errors
    /// The fatal error that closed the mirror (an invalid target, a stopped engine).
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn wait_ready(&self) -> Result<Snapshot> {
        self.wait_for(|s| s.is_ready()).await
    }

    /// Waits until a view satisfies `pred` (checked on the current view first, then on each
    /// new one) and returns that view.
    ///
    /// # Errors
    /// The fatal error that closed the mirror.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes. Compose a deadline with `tokio::time::timeout`.
    pub async fn wait_for(&self, mut pred: impl FnMut(&Snapshot) -> bool) -> Result<Snapshot> {
        let mut rx = self.shared.state.subscribe();
        loop {
            {
                let view = rx.borrow_and_update();
                if pred(&view) {
                    return Ok(view.clone());
                }
            }
            if let Some(why) = self.closed_reason() {
                return Err(Error::WatchEnded {
                    target: self.shared.target.to_string(),
                    reason: why,
                });
            }
            if rx.changed().await.is_err() {
                return Err(Error::Stopped);
            }
        }
    }

    /// Counters of the underlying watcher: relists by reason, events applied, idle timeouts.
    pub fn stats(&self) -> WatcherStats {
        self.shared.stats.get()
    }

    /// The most recent error the watcher recovered from (or stopped on), if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap().clone()
    }

    /// Why the mirror stopped for good, if it did.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed.lock().unwrap().clone()
    }
}

async fn run(shared: Arc<Shared>, mut stream: super::Watcher) {
    // Entries of a relist in progress, built aside and swapped in at InitDone.
    let mut pending: Option<imbl::OrdMap<Bytes, Entry>> = None;
    while let Some(item) = stream.next().await {
        match item {
            Err(e) => {
                *shared.last_error.lock().unwrap() = Some(e.to_string());
                tracing::debug!(target = %shared.target, error = %e, "mirror relisting");
            }
            Ok(WatcherEvent::Init { .. }) => pending = Some(imbl::OrdMap::new()),
            Ok(WatcherEvent::InitApply(entry)) => {
                if let Some(p) = pending.as_mut() {
                    p.insert(entry.key.clone(), entry);
                }
            }
            Ok(WatcherEvent::InitDone { revision }) => {
                let fresh = pending.take().unwrap_or_default();
                swap_in(&shared, fresh, revision);
            }
            Ok(WatcherEvent::Apply(entry)) => apply(&shared, entry),
            Ok(WatcherEvent::Delete { key, revision }) => remove(&shared, key, revision),
        }
    }
    // The watcher only ends on a fatal error.
    let why = shared
        .last_error
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| "the watcher stopped".into());
    *shared.closed.lock().unwrap() = Some(why);
    // Wake every waiter so it sees `closed`.
    shared.state.send_modify(|s| s.generation += 1);
}

fn swap_in(shared: &Shared, fresh: imbl::OrdMap<Bytes, Entry>, revision: u64) {
    let mut changes = Vec::new();
    shared.state.send_modify(|view| {
        let old = &view.entries;
        let mut next = imbl::OrdMap::new();
        for (key, entry) in fresh.iter() {
            let kept = match old.get(key) {
                // Unchanged: keep the revision of the change that produced it.
                Some(prev) if prev.value == entry.value => prev.clone(),
                // A live event newer than this snapshot cannot exist (the watcher retries
                // stale scans), but never let a key's revision go backwards regardless.
                Some(prev) if prev.revision > entry.revision => prev.clone(),
                prev => {
                    changes.push(Change {
                        key: key.clone(),
                        old: prev.map(|p| p.value.clone()),
                        new: Some(entry.value.clone()),
                        revision,
                    });
                    entry.clone()
                }
            };
            next.insert(key.clone(), kept);
        }
        for (key, prev) in old.iter() {
            if !fresh.contains_key(key) {
                changes.push(Change {
                    key: key.clone(),
                    old: Some(prev.value.clone()),
                    new: None,
                    revision,
                });
            }
        }
        view.entries = next;
        view.revision = view.revision.max(revision);
        view.ready = true;
        view.generation += 1;
    });
    for c in changes {
        let _ = shared.changes.send(c);
    }
}

fn apply(shared: &Shared, entry: Entry) {
    let mut change = None;
    shared.state.send_if_modified(|view| {
        let revision = entry.revision;
        match view.entries.get(&entry.key) {
            Some(prev) if prev.revision >= revision => return false,
            Some(prev) if prev.value == entry.value => {
                // Same value written again: note the revision, announce nothing.
                let key = entry.key.clone();
                view.entries.insert(key, entry);
                view.revision = view.revision.max(revision);
                return false;
            }
            prev => {
                change = Some(Change {
                    key: entry.key.clone(),
                    old: prev.map(|p| p.value.clone()),
                    new: Some(entry.value.clone()),
                    revision,
                });
            }
        }
        view.entries.insert(entry.key.clone(), entry);
        view.revision = view.revision.max(revision);
        view.generation += 1;
        true
    });
    if let Some(c) = change {
        let _ = shared.changes.send(c);
    }
}

fn remove(shared: &Shared, key: Bytes, revision: u64) {
    let mut change = None;
    shared.state.send_if_modified(|view| {
        match view.entries.get(&key) {
            Some(prev) if prev.revision < revision => {
                change = Some(Change {
                    key: key.clone(),
                    old: Some(prev.value.clone()),
                    new: None,
                    revision,
                });
            }
            _ => return false,
        }
        view.entries.remove(&key);
        view.revision = view.revision.max(revision);
        view.generation += 1;
        true
    });
    if let Some(c) = change {
        let _ = shared.changes.send(c);
    }
}
