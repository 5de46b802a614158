//! Read + watch reconciliation, written once: every recipe builds on this, none touches a raw
//! watch.
//!
//! d-engine's watch is at-most-once and future-only: it can drop events for everybody without
//! a signal, cancels a slow watcher, errors or hangs when a node goes away, and cannot resume
//! from a revision. [`watcher`] turns that into a stream that is *eventually complete*: watch
//! first, then scan (revision R), yield the snapshot (`Init`, `InitApply`..., `InitDone`), then
//! live events with revision > R; on any loss, yield the error and do it all again (a
//! *relist*), with jittered exponential backoff. A periodic relist repairs events dropped
//! silently. [`Mirror`] keeps the result as a consistent, cheaply cloned [`Snapshot`].
//!
//! # Guarantees
//! - Revisions yielded by a watcher never go backwards; a mirror key's revision never does.
//! - After each relist, a mirror equals the store at the relist's revision; with the periodic
//!   resync on (default every 30 s), it converges within one period after the last write, no
//!   matter which events were lost.
//! - A key deleted while the watch was down comes out as a `Delete` after the relist.
//!
//! # NOT guaranteed
//! - Every intermediate value (a lost event is repaired by the latest value only).
//! - That a revision gap means anything: revisions are d-engine's global Raft index.
//! - Per-key modification revisions for snapshot entries: d-engine has none, so an entry found
//!   by a scan carries the scan's revision (or keeps its previous one if unchanged).
//!
//! # Failure modes
//! Errors are *yielded*, not returned: the stream goes on after each (a relist follows), so a
//! consumer just logs them. It ends only when retrying cannot help: an invalid target, or a
//! stopped embedded engine.
//!
//! # Counters
//! [`Watcher::stats`] and [`Mirror::stats`] return [`WatcherStats`]: relists by reason
//! ([`Relist`]), events applied, events skipped as already listed, idle timeouts, stale scans
//! retried, errors. They are plain numbers to export to whatever metrics system the app uses.
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::reconcile::{Mirror, MirrorOptions};
//! use dcoord::store::{Store, WatchTarget};
//!
//! let store: Arc<dyn Store> = Arc::new(dcoord::testing::MemStore::new());
//! store.put(b"/app/flags/dark-mode", b"on").await?;
//! let mirror = Mirror::start(store.clone(), WatchTarget::prefix("/app/flags/"), MirrorOptions::default());
//! let view = mirror.wait_ready().await?;
//! assert_eq!(view.get(b"/app/flags/dark-mode").unwrap().value, "on");
//!
//! store.put(b"/app/flags/beta", b"off").await?;
//! let view = mirror.wait_for(|v| v.get(b"/app/flags/beta").is_some()).await?;
//! assert_eq!(view.len(), 2);
//! # Ok(()) }
//! ```

mod backoff;
mod mirror;
mod watcher;

pub use backoff::Backoff;
pub(crate) use backoff::after_collision;
pub use mirror::{Change, Mirror, MirrorOptions, Snapshot};
pub use watcher::{
    Entry, Relist, RelistCounts, StatsHandle, Watcher, WatcherEvent, WatcherOptions, WatcherStats,
    watcher,
};
