//! The watch loop as a state machine: a `State` per phase of a round, and `WatchLoop::step`,
//! which performs one transition and yields at most one item.
//!
//! A round: `Listing` (register the watch, then scan) → `Snapshot` (one event per step) →
//! `Watching` (one live item per step) → `WatchLost` (close the watch; a healthy round resets
//! the backoff) → `BackingOff` → `Listing` again. The periodic resync skips `BackingOff`; a
//! failed watch or scan goes straight to `BackingOff`; a fatal error goes to `Stopping`.
//!
//! Timing is part of the behaviour, so the states keep the loop's original moments: work that
//! follows a yielded item (closing a lost watch, computing a backoff delay, starting the live
//! phase's clock) happens when the stream is next polled, not when the item is yielded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::{Counters, Entry, Relist, StatsHandle, WatcherEvent, WatcherOptions, is_fatal, list};
use crate::error::{Error, Result};
use crate::reconcile::backoff::Backoff;
use crate::store::{Event, EventKind, Scan, Store, WatchStream, WatchTarget};

/// What one step yields (if anything), and where the loop goes next.
type Transition = (Option<Result<WatcherEvent>>, State);

/// Where the loop is: each variant names what the next step does.
pub(super) enum State {
    /// Validate the target, once, before the first list.
    Start,
    /// Register a watch, then scan: the start of every round.
    Listing {
        /// Why this round; reported in its `Init` and counted.
        reason: Relist,
    },
    /// Yield the round's snapshot, one event per step. The watch registered before the scan
    /// stays open meanwhile; its events wait for the live phase.
    Snapshot {
        /// `Init`, `InitApply`..., `InitDone`, then `Delete` for vanished keys.
        events: std::vec::IntoIter<WatcherEvent>,
        /// The watch registered before the scan.
        watch: WatchStream,
        /// The scan's revision.
        revision: u64,
    },
    /// Pass on live events newer than the snapshot.
    Watching(Live),
    /// The watch is lost (its error already yielded) or the resync is due: close it, relist.
    WatchLost {
        /// The round's live phase, watch still open.
        live: Live,
        /// Why the next round happens.
        reason: Relist,
    },
    /// Wait out the next backoff delay, then relist.
    BackingOff {
        /// Why the next round happens.
        reason: Relist,
        /// After a failed scan, the watch registered just before it: it stays open through
        /// the delay, as the loop has always done, and closes before the next registration.
        open_watch: Option<WatchStream>,
    },
    /// A fatal error was yielded: close whatever is still open, and end.
    Stopping {
        /// The watch of the round that failed, if one was registered.
        open_watch: Option<WatchStream>,
    },
    /// The stream is over.
    Done,
}

impl State {
    /// Relist after the next backoff delay.
    fn back_off(reason: Relist) -> State {
        State::BackingOff {
            reason,
            open_watch: None,
        }
    }

    /// The round's watch is lost (or the resync is due): close it, then relist.
    fn lost(live: Live, reason: Relist) -> State {
        State::WatchLost { live, reason }
    }
}

/// A round's live phase: the watch, and what the round needs to judge its events.
pub(super) struct Live {
    stream: WatchStream,
    /// The snapshot's revision: events at or below it are already in the snapshot.
    listed_at: u64,
    /// When the live phase began: a round this old at its end was healthy.
    started: Instant,
    resync_at: Option<Instant>,
    /// Live events that were newer than the snapshot: a round with any was healthy.
    delivered: u64,
}

/// What waiting on a live watch produced.
enum Woke {
    /// The watch's next item (`None`: the stream ended).
    Item(Option<Result<Event>>),
    /// The periodic resync is due.
    ResyncDue,
    /// Nothing arrived within the idle timeout.
    Idle,
}

impl Live {
    /// Starts the live phase now: the resync clock runs from here.
    fn start(stream: WatchStream, listed_at: u64, resync_every: Option<Duration>) -> Live {
        let started = Instant::now();
        Live {
            stream,
            listed_at,
            started,
            resync_at: resync_every.map(|d| started + d),
            delivered: 0,
        }
    }

    /// Waits for the watch's next item, up to the resync time or the idle timeout (counted
    /// from now), whichever comes first.
    async fn wait(&mut self, idle_timeout: Option<Duration>) -> Woke {
        let idle_at = idle_timeout.map(|d| Instant::now() + d);
        let wake_at = match (self.resync_at, idle_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(at) = wake_at else {
            return Woke::Item(self.stream.next().await);
        };
        match tokio::time::timeout_at(at, self.stream.next()).await {
            Ok(item) => Woke::Item(item),
            Err(_) if self.resync_at.is_some_and(|r| Instant::now() >= r) => Woke::ResyncDue,
            Err(_) => Woke::Idle,
        }
    }
}

/// What the loop needs to act, and what it remembers across rounds.
pub(super) struct WatchLoop {
    store: Arc<dyn Store>,
    target: WatchTarget,
    /// The target as logged and reported in errors.
    name: String,
    options: WatcherOptions,
    counters: Arc<Counters>,
    backoff: Backoff,
    /// The keys this stream last showed as present.
    known: HashSet<Bytes>,
    /// The highest revision yielded so far.
    high_water: u64,
    /// Stale scans retried in a row.
    stale_tries: u32,
}

impl WatchLoop {
    /// A loop that has listed nothing yet.
    pub(super) fn new(
        store: Arc<dyn Store>,
        target: WatchTarget,
        options: WatcherOptions,
        counters: Arc<Counters>,
    ) -> WatchLoop {
        WatchLoop {
            name: target.to_string(),
            backoff: Backoff::new(options.min_backoff, options.max_backoff),
            store,
            target,
            options,
            counters,
            known: HashSet::new(),
            high_water: 0,
            stale_tries: 0,
        }
    }

    /// Steps until a transition yields an item: the item and the state to resume from, or
    /// `None` once the loop is done.
    pub(super) async fn step_until_item(
        &mut self,
        mut state: State,
    ) -> Option<(Result<WatcherEvent>, State)> {
        loop {
            match self.step(state).await {
                (Some(item), next) => return Some((item, next)),
                (None, State::Done) => return None,
                (None, next) => state = next,
            }
        }
    }

    /// One transition.
    async fn step(&mut self, state: State) -> Transition {
        match state {
            State::Start => self.validate(),
            State::Listing { reason } => self.watch_then_scan(reason).await,
            State::Snapshot {
                mut events,
                watch,
                revision,
            } => match events.next() {
                Some(event) => (
                    Some(Ok(event)),
                    State::Snapshot {
                        events,
                        watch,
                        revision,
                    },
                ),
                None => {
                    let live = Live::start(watch, revision, self.options.resync_every);
                    (None, State::Watching(live))
                }
            },
            State::Watching(live) => self.watch(live).await,
            State::WatchLost { live, reason } => (None, self.close(live, reason)),
            State::BackingOff { reason, open_watch } => {
                tokio::time::sleep(self.backoff.next_delay()).await;
                drop(open_watch);
                (None, State::Listing { reason })
            }
            State::Stopping { open_watch } => {
                drop(open_watch);
                (None, State::Done)
            }
            State::Done => (None, State::Done),
        }
    }

    /// An invalid target ends the stream before anything is registered.
    fn validate(&self) -> Transition {
        match self.target.validate() {
            Ok(()) => (
                None,
                State::Listing {
                    reason: Relist::Start,
                },
            ),
            Err(e) => {
                StatsHandle::bump(&self.counters.errors);
                (Some(Err(e)), State::Done)
            }
        }
    }

    /// The start of a round.
    #[tracing::instrument(level = "debug", name = "reconcile.relist", skip_all, fields(prefix = %self.name, reason = reason.as_str()))]
    async fn watch_then_scan(&mut self, reason: Relist) -> Transition {
        StatsHandle::bump(&self.counters.relists[reason.index()]);
        metrics::counter!(crate::metrics::WATCH_RELISTS_TOTAL, "reason" => reason.as_str())
            .increment(1);
        // 1. Watch first, so nothing written after the scan can be missed.
        let watch = match self.store.watch(self.target.clone(), false).await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "watch failed");
                return self.list_failed(e, None);
            }
        };
        // 2. Scan.
        let scan = match list(&*self.store, &self.target).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "scan failed");
                return self.list_failed(e, Some(watch));
            }
        };
        self.accept_scan(reason, watch, scan)
    }

    /// A failed watch or scan: yield the error, then retry after a delay, or stop if
    /// retrying cannot help.
    fn list_failed(&self, err: Error, open_watch: Option<WatchStream>) -> Transition {
        StatsHandle::bump(&self.counters.errors);
        let next = if is_fatal(&err) {
            State::Stopping { open_watch }
        } else {
            State::BackingOff {
                reason: Relist::Failed,
                open_watch,
            }
        };
        (Some(Err(err)), next)
    }

    /// Turns a scan into the round's snapshot, unless it is older than a revision already
    /// yielded (a deposed or lagging leader): then the round is retried, for the same reason,
    /// after a delay, up to `stale_scan_retries` times in a row; past that, it is accepted.
    fn accept_scan(&mut self, reason: Relist, watch: WatchStream, scan: Scan) -> Transition {
        let high_water = self.high_water;
        if scan.revision < high_water && self.stale_tries < self.options.stale_scan_retries {
            self.stale_tries += 1;
            StatsHandle::bump(&self.counters.stale_scans);
            tracing::debug!(
                target = %self.name,
                "scan at revision {} is older than revision {high_water} already seen; retrying",
                scan.revision
            );
            drop(watch);
            return (None, State::back_off(reason));
        }
        if scan.revision < high_water {
            tracing::warn!(
                target = %self.name,
                "the store went back from revision {high_water} to {}; accepting it",
                scan.revision
            );
        }
        self.stale_tries = 0;
        let revision = scan.revision;
        self.high_water = high_water.max(revision);
        // 3. The snapshot.
        let events = if self.options.track_keys {
            snapshot_events(&mut self.known, reason, scan)
        } else {
            snapshot_only(reason, scan)
        }
        .into_iter();
        let snapshot = State::Snapshot {
            events,
            watch,
            revision,
        };
        (None, snapshot)
    }

    /// 4. Live events: waits for the watch's next item and passes it on, or ends the round.
    async fn watch(&mut self, mut live: Live) -> Transition {
        match live.wait(self.options.idle_timeout).await {
            Woke::Item(Some(Ok(event))) => {
                let item = self.live_event(&mut live, event).map(Ok);
                (item, State::Watching(live))
            }
            Woke::Item(Some(Err(e))) => self.watch_failed(live, e),
            Woke::Item(None) => {
                StatsHandle::bump(&self.counters.errors);
                let e = Error::WatchEnded {
                    target: self.name.clone(),
                    reason: "the stream ended".into(),
                };
                (Some(Err(e)), State::lost(live, Relist::Ended))
            }
            Woke::ResyncDue => (None, State::lost(live, Relist::Periodic)),
            Woke::Idle => {
                StatsHandle::bump(&self.counters.idle_timeouts);
                StatsHandle::bump(&self.counters.errors);
                let e = Error::WatchEnded {
                    target: self.name.clone(),
                    reason: format!(
                        "nothing received for {:?} (idle timeout)",
                        self.options.idle_timeout.unwrap_or_default()
                    ),
                };
                (Some(Err(e)), State::lost(live, Relist::Idle))
            }
        }
    }

    /// Judges a live event against the snapshot and the keys shown so far: `None` when there
    /// is nothing to pass on (the snapshot already has it, or it deletes a key this stream
    /// never showed).
    fn live_event(&mut self, live: &mut Live, ev: Event) -> Option<WatcherEvent> {
        if ev.revision <= live.listed_at {
            StatsHandle::bump(&self.counters.skipped);
            return None;
        }
        self.high_water = self.high_water.max(ev.revision);
        live.delivered += 1;
        match ev.kind {
            EventKind::Put => {
                if self.options.track_keys {
                    self.known.insert(ev.key.clone());
                }
                StatsHandle::bump(&self.counters.events);
                Some(WatcherEvent::Apply(Entry {
                    key: ev.key,
                    value: ev.value,
                    revision: ev.revision,
                }))
            }
            EventKind::Delete => {
                if self.options.track_keys && !self.known.remove(&ev.key) {
                    return None;
                }
                StatsHandle::bump(&self.counters.events);
                Some(WatcherEvent::Delete {
                    key: ev.key,
                    revision: ev.revision,
                })
            }
        }
    }

    /// The watch yielded an error: pass it on, then relist for the reason it names, or stop
    /// if retrying cannot help.
    fn watch_failed(&self, live: Live, err: Error) -> Transition {
        let reason = Relist::after(&err);
        StatsHandle::bump(&self.counters.errors);
        let next = if is_fatal(&err) {
            State::Stopping {
                open_watch: Some(live.stream),
            }
        } else {
            State::lost(live, reason)
        };
        (Some(Err(err)), next)
    }

    /// Closes a lost watch, then relists: at once after the periodic resync, after the next
    /// backoff delay otherwise. A round that delivered events, or lived at least as long as
    /// the longest delay, was healthy: the backoff starts over.
    fn close(&mut self, live: Live, reason: Relist) -> State {
        let Live {
            stream,
            started,
            delivered,
            ..
        } = live;
        drop(stream);
        if delivered > 0 || started.elapsed() >= self.options.max_backoff {
            self.backoff.reset();
        }
        if reason == Relist::Periodic {
            State::Listing { reason }
        } else {
            State::back_off(reason)
        }
    }
}

/// The events of one (re)list without key tracking: `Init`, an `InitApply` per entry,
/// `InitDone`.
fn snapshot_only(reason: Relist, scan: Scan) -> Vec<WatcherEvent> {
    let revision = scan.revision;
    let mut events = Vec::with_capacity(scan.entries.len() + 2);
    events.push(WatcherEvent::Init { reason });
    events.extend(scan.entries.into_iter().map(|(key, value)| {
        WatcherEvent::InitApply(Entry {
            key,
            value,
            revision,
        })
    }));
    events.push(WatcherEvent::InitDone { revision });
    events
}

/// The events of one (re)list, in order: `Init`, an `InitApply` per entry, `InitDone`, then a
/// `Delete` for each key of `known` the scan no longer has (in key order, so the stream is
/// deterministic). Then `known` is the scan's keys.
fn snapshot_events(known: &mut HashSet<Bytes>, reason: Relist, scan: Scan) -> Vec<WatcherEvent> {
    let revision = scan.revision;
    let mut events = Vec::with_capacity(scan.entries.len() + 2);
    events.push(WatcherEvent::Init { reason });
    let mut now_known = HashSet::with_capacity(scan.entries.len());
    for (key, value) in scan.entries {
        now_known.insert(key.clone());
        events.push(WatcherEvent::InitApply(Entry {
            key,
            value,
            revision,
        }));
    }
    events.push(WatcherEvent::InitDone { revision });
    let mut gone: Vec<Bytes> = known.difference(&now_known).cloned().collect();
    gone.sort();
    *known = now_known;
    for key in gone {
        events.push(WatcherEvent::Delete { key, revision });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&'static str]) -> HashSet<Bytes> {
        names.iter().map(|k| Bytes::from(*k)).collect()
    }

    #[test]
    fn a_relist_yields_the_snapshot_then_deletes_vanished_keys_in_key_order() {
        let mut known = keys(&["/m/c", "/m/a", "/m/b"]);
        let scan = Scan {
            entries: vec![(Bytes::from_static(b"/m/b"), Bytes::from_static(b"2"))],
            revision: 7,
        };
        let events = snapshot_events(&mut known, Relist::Canceled, scan);
        assert_eq!(
            events,
            [
                WatcherEvent::Init {
                    reason: Relist::Canceled
                },
                WatcherEvent::InitApply(Entry {
                    key: Bytes::from_static(b"/m/b"),
                    value: Bytes::from_static(b"2"),
                    revision: 7,
                }),
                WatcherEvent::InitDone { revision: 7 },
                WatcherEvent::Delete {
                    key: Bytes::from_static(b"/m/a"),
                    revision: 7,
                },
                WatcherEvent::Delete {
                    key: Bytes::from_static(b"/m/c"),
                    revision: 7,
                },
            ]
        );
        assert_eq!(known, keys(&["/m/b"]));
    }
}
