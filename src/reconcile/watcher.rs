//! The one watch loop: watch first, then scan, then live events; relist on any loss.

use std::collections::HashSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::backoff::Backoff;
use crate::error::{Error, Result};
use crate::store::{EventKind, Scan, Store, WatchTarget};

/// How a [`watcher`] behaves. `WatcherOptions::default()` suits most uses.
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    pub(crate) resync_every: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) stale_scan_retries: u32,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            resync_every: Some(Duration::from_secs(30)),
            idle_timeout: None,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            stale_scan_retries: 20,
        }
    }
}

impl WatcherOptions {
    /// Relist (new watch, new scan) this often even when nothing went wrong, to repair events
    /// d-engine dropped without a signal. `None` disables it (not recommended: a lost event
    /// then stays lost until the stream fails). Default 30 s. Each relist costs one watch
    /// registration and one scan.
    #[must_use]
    pub fn resync_every(mut self, every: Option<Duration>) -> Self {
        self.resync_every = every;
        self
    }

    /// Relist when the watch has delivered nothing for this long. Default `None`: d-engine's
    /// heartbeats are not a liveness signal (they keep flowing from a stopped node), so a quiet
    /// key would be relisted for nothing; the periodic resync bounds how long a silently dead
    /// stream goes unnoticed instead.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Delay bounds between failed attempts (exponential, jittered). Default 50 ms .. 5 s.
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }
}

/// Why a (re)list happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Relist {
    /// The first list.
    Start,
    /// d-engine canceled the watch (the watcher fell behind).
    Canceled,
    /// The stream ended (server shutdown, or a stopped engine).
    Ended,
    /// The connection carrying the stream failed.
    Transport,
    /// Nothing arrived within the idle timeout.
    Idle,
    /// The periodic resync.
    Periodic,
    /// Opening the watch or the scan failed; this is a retry.
    Failed,
}

impl Relist {
    const ALL: [Relist; 7] = [
        Relist::Start,
        Relist::Canceled,
        Relist::Ended,
        Relist::Transport,
        Relist::Idle,
        Relist::Periodic,
        Relist::Failed,
    ];

    fn index(self) -> usize {
        Relist::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    fn after(err: &Error) -> Relist {
        match err {
            Error::WatchCanceled { .. } => Relist::Canceled,
            Error::WatchEnded { .. } => Relist::Ended,
            Error::WatchTransport { .. } => Relist::Transport,
            _ => Relist::Failed,
        }
    }
}

impl fmt::Display for Relist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Relist::Start => "start",
            Relist::Canceled => "canceled",
            Relist::Ended => "ended",
            Relist::Transport => "transport",
            Relist::Idle => "idle",
            Relist::Periodic => "periodic",
            Relist::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// One key and its value, as of `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key.
    pub key: Bytes,
    /// Its value.
    pub value: Bytes,
    /// For a live event, the revision of the write. For a snapshot entry, the snapshot's
    /// revision (d-engine keeps no per-key revision): the value was current at that revision.
    pub revision: u64,
}

/// What a [`watcher`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatcherEvent {
    /// A (re)list begins: the entries that follow, up to `InitDone`, are the complete contents.
    Init {
        /// Why.
        reason: Relist,
    },
    /// One entry of the snapshot.
    InitApply(Entry),
    /// The snapshot is complete: it reflects the store at `revision`. Replace whatever was
    /// known with the entries since `Init`.
    InitDone {
        /// The scan's revision.
        revision: u64,
    },
    /// A live put (revision > the last `InitDone`).
    Apply(Entry),
    /// A key is gone: a live delete, or (right after `InitDone`) a key that was present before
    /// a relist and is absent from the new snapshot.
    Delete {
        /// The key.
        key: Bytes,
        /// The revision of the delete, or of the snapshot that no longer had the key.
        revision: u64,
    },
}

impl WatcherEvent {
    /// The revision this event carries, if any (`Init` has none).
    pub fn revision(&self) -> Option<u64> {
        match self {
            WatcherEvent::Init { .. } => None,
            WatcherEvent::InitApply(e) | WatcherEvent::Apply(e) => Some(e.revision),
            WatcherEvent::InitDone { revision } | WatcherEvent::Delete { revision, .. } => {
                Some(*revision)
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    relists: [AtomicU64; 7],
    events: AtomicU64,
    skipped: AtomicU64,
    idle_timeouts: AtomicU64,
    stale_scans: AtomicU64,
    errors: AtomicU64,
}

/// A live view of a watcher's (or a mirror's) counters. Cheap to clone; read with
/// [`StatsHandle::get`]. Also available from [`super::Mirror::stats`].
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn get(&self) -> WatcherStats {
        let c = &self.0;
        let r = |x: Relist| c.relists[x.index()].load(Ordering::Relaxed);
        WatcherStats {
            relists: RelistCounts {
                start: r(Relist::Start),
                canceled: r(Relist::Canceled),
                ended: r(Relist::Ended),
                transport: r(Relist::Transport),
                idle: r(Relist::Idle),
                periodic: r(Relist::Periodic),
                failed: r(Relist::Failed),
            },
            events: c.events.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            idle_timeouts: c.idle_timeouts.load(Ordering::Relaxed),
            stale_scans: c.stale_scans.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Relists by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelistCounts {
    /// The first list.
    pub start: u64,
    /// After d-engine canceled the watch.
    pub canceled: u64,
    /// After the stream ended.
    pub ended: u64,
    /// After a transport error.
    pub transport: u64,
    /// After the idle timeout.
    pub idle: u64,
    /// Periodic resyncs.
    pub periodic: u64,
    /// Retries after a failed watch or scan.
    pub failed: u64,
}

impl RelistCounts {
    /// All relists except the first list.
    pub fn total_after_start(&self) -> u64 {
        self.canceled + self.ended + self.transport + self.idle + self.periodic + self.failed
    }
}

/// A watcher's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatcherStats {
    /// Lists, by reason.
    pub relists: RelistCounts,
    /// Live events passed on (`Apply` and `Delete`).
    pub events: u64,
    /// Live events dropped because the snapshot already contained them (revision <= scan's).
    pub skipped: u64,
    /// Idle timeouts.
    pub idle_timeouts: u64,
    /// Scans older than a revision already seen (a deposed or lagging leader), retried.
    pub stale_scans: u64,
    /// Errors yielded (each followed by a relist, or the end of the stream if fatal).
    pub errors: u64,
}

/// The stream returned by [`watcher`]: [`WatcherEvent`]s and the errors that caused relists.
/// It ends only on a fatal error (an invalid target, or a stopped embedded engine).
pub struct Watcher {
    inner: Pin<Box<dyn Stream<Item = Result<WatcherEvent>> + Send>>,
    stats: StatsHandle,
}

impl Watcher {
    /// This watcher's counters (live; the handle outlives the stream).
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("stats", &self.stats.get())
            .finish()
    }
}

impl Stream for Watcher {
    type Item = Result<WatcherEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Errors after which retrying cannot help.
fn is_fatal(err: &Error) -> bool {
    matches!(
        err,
        Error::Stopped
            | Error::InvalidKey { .. }
            | Error::InvalidPrefix { .. }
            | Error::InvalidArgument(_)
    )
}

async fn list(store: &dyn Store, target: &WatchTarget) -> Result<Scan> {
    let mut scan = store.scan_prefix(target.bytes()).await?;
    if let WatchTarget::Key(key) = target {
        // A scan is a plain starts_with: drop longer keys that share the prefix.
        scan.entries.retain(|(k, _)| k == key);
    }
    Ok(scan)
}

/// Watches `target` and yields its complete state, then every change, for as long as the
/// stream is polled, relisting whenever the underlying watch is lost.
///
/// The protocol, each round: register the watch; scan (revision R); yield `Init`,
/// `InitApply` per entry, `InitDone{R}`, then `Delete` for each key that was present before
/// and is absent now; then live events with revision > R, in order. On a canceled, ended or
/// failed watch, an idle timeout, or the periodic resync: yield the error (not for the
/// resync) and start a new round after a jittered, capped exponential backoff.
///
/// # Guarantees
/// - Revisions never go backwards across the whole stream: live events increase, and a
///   relist whose scan is older than a revision already yielded (a deposed or lagging leader)
///   is retried instead of being yielded.
/// - After each `InitDone`, the state built from the stream equals the store at that
///   revision; changes made while the watch was down come out as the snapshot (and as
///   `Delete` for vanished keys).
/// - A live `Delete` is yielded only for a key this stream last showed as present.
///
/// # NOT guaranteed
/// - That every intermediate value is seen: events d-engine drops silently are repaired at
///   the next resync, as the latest value only.
/// - That a `Put` changed anything: an identical value written again is yielded again.
pub fn watcher(store: Arc<dyn Store>, target: WatchTarget, options: WatcherOptions) -> Watcher {
    let stats = StatsHandle::default();
    let c = stats.0.clone();
    let inner = async_stream::stream! {
        if let Err(e) = target.validate() {
            StatsHandle::bump(&c.errors);
            yield Err(e);
            return;
        }
        let name = target.to_string();
        let mut backoff = Backoff::new(options.min_backoff, options.max_backoff);
        let mut known: HashSet<Bytes> = HashSet::new();
        let mut high_water = 0u64;
        let mut reason = Relist::Start;
        let mut stale_tries = 0u32;
        loop {
            StatsHandle::bump(&c.relists[reason.index()]);
            // 1. Watch first, so nothing written after the scan can be missed.
            let mut live = match store.watch(target.clone(), false).await {
                Ok(w) => w,
                Err(e) => {
                    let fatal = is_fatal(&e);
                    tracing::debug!(target = %name, "watch failed: {e}");
                    StatsHandle::bump(&c.errors);
                    yield Err(e);
                    if fatal {
                        return;
                    }
                    reason = Relist::Failed;
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            // 2. Scan.
            let scan = match list(&*store, &target).await {
                Ok(s) => s,
                Err(e) => {
                    let fatal = is_fatal(&e);
                    tracing::debug!(target = %name, "scan failed: {e}");
                    StatsHandle::bump(&c.errors);
                    yield Err(e);
                    if fatal {
                        return;
                    }
                    reason = Relist::Failed;
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if scan.revision < high_water && stale_tries < options.stale_scan_retries {
                stale_tries += 1;
                StatsHandle::bump(&c.stale_scans);
                tracing::debug!(
                    target = %name,
                    "scan at revision {} is older than revision {high_water} already seen; retrying",
                    scan.revision
                );
                drop(live);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            if scan.revision < high_water {
                tracing::warn!(
                    target = %name,
                    "the store went back from revision {high_water} to {}; accepting it",
                    scan.revision
                );
            }
            stale_tries = 0;
            let rev = scan.revision;
            high_water = high_water.max(rev);
            // 3. The snapshot.
            yield Ok(WatcherEvent::Init { reason });
            let mut now_known = HashSet::with_capacity(scan.entries.len());
            for (key, value) in scan.entries {
                now_known.insert(key.clone());
                yield Ok(WatcherEvent::InitApply(Entry { key, value, revision: rev }));
            }
            yield Ok(WatcherEvent::InitDone { revision: rev });
            let mut gone: Vec<Bytes> = known.difference(&now_known).cloned().collect();
            gone.sort();
            known = now_known;
            for key in gone {
                yield Ok(WatcherEvent::Delete { key, revision: rev });
            }
            // 4. Live events.
            let started = Instant::now();
            let resync_at = options.resync_every.map(|d| started + d);
            let mut delivered = 0u64;
            reason = loop {
                let idle_at = options.idle_timeout.map(|d| Instant::now() + d);
                let wake_at = match (resync_at, idle_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let next = match wake_at {
                    Some(at) => match tokio::time::timeout_at(at, live.next()).await {
                        Ok(next) => next,
                        Err(_) if resync_at.is_some_and(|r| Instant::now() >= r) => {
                            break Relist::Periodic;
                        }
                        Err(_) => {
                            StatsHandle::bump(&c.idle_timeouts);
                            StatsHandle::bump(&c.errors);
                            yield Err(Error::WatchEnded {
                                target: name.clone(),
                                reason: format!(
                                    "nothing received for {:?} (idle timeout)",
                                    options.idle_timeout.unwrap_or_default()
                                ),
                            });
                            break Relist::Idle;
                        }
                    },
                    None => live.next().await,
                };
                match next {
                    Some(Ok(ev)) => {
                        if ev.revision <= rev {
                            StatsHandle::bump(&c.skipped);
                            continue;
                        }
                        high_water = high_water.max(ev.revision);
                        delivered += 1;
                        match ev.kind {
                            EventKind::Put => {
                                known.insert(ev.key.clone());
                                StatsHandle::bump(&c.events);
                                yield Ok(WatcherEvent::Apply(Entry {
                                    key: ev.key,
                                    value: ev.value,
                                    revision: ev.revision,
                                }));
                            }
                            EventKind::Delete => {
                                if known.remove(&ev.key) {
                                    StatsHandle::bump(&c.events);
                                    yield Ok(WatcherEvent::Delete {
                                        key: ev.key,
                                        revision: ev.revision,
                                    });
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let why = Relist::after(&e);
                        let fatal = is_fatal(&e);
                        StatsHandle::bump(&c.errors);
                        yield Err(e);
                        if fatal {
                            return;
                        }
                        break why;
                    }
                    None => {
                        StatsHandle::bump(&c.errors);
                        yield Err(Error::WatchEnded {
                            target: name.clone(),
                            reason: "the stream ended".into(),
                        });
                        break Relist::Ended;
                    }
                }
            };
            drop(live);
            if delivered > 0 || started.elapsed() >= options.max_backoff {
                backoff.reset();
            }
            if reason != Relist::Periodic {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    Watcher {
        inner: Box::pin(inner),
        stats,
    }
}
