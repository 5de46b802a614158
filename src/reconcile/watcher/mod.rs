//! The one watch loop: watch first, then scan, then live events; relist on any loss.
//!
//! # Guarantees
//! Those of [`watcher`]: revisions never go backwards across the stream; after each
//! `InitDone`, the state built from the stream equals the store at that revision; a live
//! `Delete` is yielded only for a key the stream last showed as present.
//!
//! # NOT guaranteed
//! That every intermediate value is seen (a lost event is repaired by the next relist, as the
//! latest value only), or that a `Put` changed anything.
//!
//! # Failure modes
//! Errors are yielded, not returned: each is followed by a relist after a jittered, capped
//! exponential backoff, which starts over after a healthy round. The periodic resync is not an
//! error and relists at once. The stream ends only after a fatal error: an invalid target, or a
//! stopped embedded engine. Dropping the stream at any point closes its watch.
//!
//! # Structure
//! The loop is a state machine (`state.rs`, after kube-runtime's watcher): a `State` per phase
//! of a round (listing, yielding the snapshot, watching, closing a lost watch, backing off,
//! stopping) and a `step` that performs one transition and yields at most one item. Losing a
//! watch is a transition, not a special code path. [`watcher`] only drives it: each poll steps
//! until a transition yields.

mod state;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::store::{Scan, Store, WatchTarget};
use state::{State, WatchLoop};

/// How a [`watcher`] behaves. `WatcherOptions::default()` suits most uses.
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    pub(crate) resync_every: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) stale_scan_retries: u32,
    pub(crate) track_keys: bool,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            resync_every: Some(Duration::from_secs(30)),
            idle_timeout: None,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            stale_scan_retries: 20,
            track_keys: true,
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

    /// Do not remember which keys the stream has shown (one key's memory per key saved, for a
    /// consumer that keeps its own key set). Then a relist yields no `Delete` for keys missing
    /// from the new snapshot (replace the state on `InitDone`, as the protocol says), and every
    /// live delete is passed on, also of a key the stream never showed. Default: remembered.
    #[must_use]
    pub fn without_key_tracking(mut self) -> Self {
        self.track_keys = false;
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
        f.write_str(self.as_str())
    }
}

impl Relist {
    /// The reason's name: `start`, `canceled`, `ended`, `transport`, `idle`, `periodic`,
    /// `failed` (the `reason` label of [`crate::metrics::WATCH_RELISTS_TOTAL`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Relist::Start => "start",
            Relist::Canceled => "canceled",
            Relist::Ended => "ended",
            Relist::Transport => "transport",
            Relist::Idle => "idle",
            Relist::Periodic => "periodic",
            Relist::Failed => "failed",
        }
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
    let machine = WatchLoop::new(store, target, options, stats.0.clone());
    // Each poll steps the machine until a transition yields an item; the loop's end ends the
    // stream. Fused: polled again after its end, it keeps answering `None` instead of panicking.
    let start = (machine, State::Start);
    let inner = futures::stream::unfold(start, |(mut machine, state)| async move {
        let (item, state) = machine.step_until_item(state).await?;
        Some((item, (machine, state)))
    })
    .fuse();
    Watcher {
        inner: Box::pin(inner),
        stats,
    }
}
