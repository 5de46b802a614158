//! Presence: session-bound entries under a prefix, and a live view of them that drops an entry
//! whose session died. Shared by `membership::Group` and `barrier::DoubleBarrier`.
//!
//! An entry is `<prefix><session>.<ticket>` holding an opaque value, written with a plain put
//! (entries never contend). It is as alive as its session: the view drops it at once when the
//! session's heartbeat record is gone (the session closed, or was garbage-collected), and one
//! lease after its heartbeat last changed, on the observer's own monotonic clock, once a
//! linearizable read confirms it (a view whose watch lags never drops a live entry); the
//! observer then deletes the entry, so every view (and a later scan) agrees.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::reconcile::{Mirror, MirrorOptions, Snapshot, WatcherOptions};
use crate::session::{Liveness, Session};
use crate::store::{Store, WatchTarget};

/// One entry of a live view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Present {
    /// The entry's key.
    pub(crate) key: Bytes,
    /// The session that wrote it.
    pub(crate) session: String,
    pub(crate) value: Bytes,
    /// The revision that created or last changed it (join order, roughly).
    pub(crate) revision: u64,
}

/// The entries under one prefix.
pub(crate) struct Presence {
    pub(crate) session: Session,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) prefix: Bytes,
    mirror: Arc<Mirror>,
}

impl Presence {
    /// Watches `prefix` (shared with other handles on it); must be called within a runtime.
    pub(crate) fn new(session: &Session, prefix: String) -> Presence {
        let store = session.store().clone();
        let resync = session.lease().max(std::time::Duration::from_secs(1));
        let mirror = Mirror::shared(
            store.clone(),
            WatchTarget::prefix(prefix.clone()),
            MirrorOptions::default().watcher(WatcherOptions::default().resync_every(Some(resync))),
        );
        Presence {
            session: session.clone(),
            store,
            prefix: Bytes::from(prefix),
            mirror,
        }
    }

    /// A fresh entry key of this session.
    pub(crate) fn entry_key(&self) -> Bytes {
        let mut k = self.prefix.to_vec();
        k.extend_from_slice(
            format!("{}.{}", self.session.id(), self.session.next_ticket()).as_bytes(),
        );
        Bytes::from(k)
    }

    /// The session an entry key names.
    fn owner<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let rest = std::str::from_utf8(key.strip_prefix(&self.prefix[..])?).ok()?;
        Some(rest.rsplit_once('.')?.0)
    }

    /// Resolves once `key` has been seen and then seen gone (deleted by us, or reaped by an
    /// observer that saw our session dead).
    pub(crate) async fn gone(&self, key: &[u8]) {
        let mut rx = self.mirror.subscribe();
        let mut seen = false;
        let _ = rx
            .wait_for(|snap| {
                if !snap.is_ready() {
                    return false;
                }
                seen |= snap.get(key).is_some();
                seen && snap.get(key).is_none()
            })
            .await;
    }

    /// Entries in sight right now, unfiltered: for a one-shot answer without a view.
    pub(crate) async fn scan(&self) -> Result<Vec<Present>> {
        let scan = self.store.scan_prefix(&self.prefix).await?;
        let beats = self
            .store
            .scan_prefix(format!("{}sessions/", self.session.root()).as_bytes())
            .await?;
        let mut out = Vec::new();
        for (key, value) in scan.entries {
            let Some(owner) = self.owner(&key) else {
                continue;
            };
            // A session whose heartbeat record is gone closed (or crashed long ago).
            let hb = self.session.heartbeat_key(owner);
            if !beats.entries.iter().any(|(k, _)| *k == hb) {
                continue;
            }
            out.push(Present {
                session: owner.to_string(),
                key,
                value,
                revision: scan.revision,
            });
        }
        Ok(out)
    }

    /// A live view: every entry whose session lives, in the order they were written, updated
    /// on every change. Returns once the entries and heartbeats have been read. The view's task
    /// stops when every receiver is dropped.
    pub(crate) async fn view(self: &Arc<Self>) -> Result<watch::Receiver<Vec<Present>>> {
        let mut entries = self.mirror.subscribe();
        self.mirror.wait_ready().await?;
        let mut peers = self.session.peers().await?.subscribe();
        let mut view = View {
            presence: self.clone(),
            liveness: Liveness::new(self.session.lease()),
            confirmed: HashSet::new(),
        };
        let (snap, beats) = (
            entries.borrow_and_update().clone(),
            peers.borrow_and_update().clone(),
        );
        let first = view.refresh(&snap, &beats).await;
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            loop {
                let wake = view.expiry();
                tokio::select! {
                    changed = entries.changed() => if changed.is_err() { return },
                    changed = peers.changed() => if changed.is_err() { return },
                    _ = sleep_until(wake) => {}
                    _ = tx.closed() => return,
                }
                let snap = entries.borrow_and_update().clone();
                let beats = peers.borrow_and_update().clone();
                let live = view.refresh(&snap, &beats).await;
                tx.send_if_modified(|l| {
                    let changed = *l != live;
                    *l = live;
                    changed
                });
            }
        });
        Ok(rx)
    }
}

pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct View {
    presence: Arc<Presence>,
    liveness: Liveness,
    /// Entries whose session a linearizable read confirmed dead (deleted, or being deleted).
    confirmed: HashSet<Bytes>,
}

impl View {
    /// The entries in `snap` not confirmed dead, and among them the suspects: those whose
    /// session looks dead on our clock, or whose heartbeat the mirror does not show.
    fn candidates(
        &mut self,
        snap: &Snapshot,
        beats: &Snapshot,
    ) -> (Vec<Present>, Vec<(Bytes, String)>) {
        let p = &self.presence;
        let now = Instant::now();
        let mut list = Vec::new();
        let mut suspects = Vec::new();
        let mut owners: Vec<String> = Vec::new();
        self.confirmed.retain(|k| snap.get(k).is_some());
        for e in snap.with_prefix(&p.prefix) {
            let Some(owner) = p.owner(&e.key) else {
                continue;
            };
            if self.confirmed.contains(&e.key) {
                continue;
            }
            owners.push(owner.to_string());
            let hb = beats.get(&p.session.heartbeat_key(owner));
            self.liveness.observe(owner, hb.map(|h| &h.value), now);
            if hb.is_none() || self.liveness.is_dead(owner, now) {
                suspects.push((e.key.clone(), owner.to_string()));
            }
            list.push(Present {
                key: e.key.clone(),
                session: owner.to_string(),
                value: e.value.clone(),
                revision: e.revision,
            });
        }
        self.liveness.retain(|s| owners.iter().any(|o| o == s));
        list.sort_by(|a, b| (a.revision, &a.key).cmp(&(b.revision, &b.key)));
        (list, suspects)
    }

    /// The live entries: the candidates without the suspects a linearizable read confirms
    /// dead (whose entries are deleted). A suspect that cannot be confirmed stays listed: a
    /// lagging watch never drops a live member.
    async fn refresh(&mut self, snap: &Snapshot, beats: &Snapshot) -> Vec<Present> {
        let (mut list, suspects) = self.candidates(snap, beats);
        // Entries confirmed dead whose delete failed: again (the mirror still shows them).
        let undeleted: Vec<Bytes> = self.confirmed.iter().cloned().collect();
        for key in undeleted {
            let _ = self.presence.store.delete(&key).await;
        }
        for (key, owner) in suspects {
            match self.confirm(&owner).await {
                Ok(true) => {
                    list.retain(|p| p.key != key);
                    self.confirmed.insert(key.clone());
                    match self.presence.store.delete(&key).await {
                        Ok(()) => {
                            tracing::debug!(key = %crate::error::show(&key), "presence: reaped the entry of a dead session")
                        }
                        Err(e) => {
                            tracing::debug!(key = %crate::error::show(&key), error = %e, "presence: deleting a dead session's entry failed; the next observer retries")
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "presence: cannot confirm a death now; retried on the next change")
                }
            }
        }
        list
    }

    /// True if a linearizable read confirms `owner` dead: its heartbeat record gone (closed,
    /// or garbage-collected: a session writes it before any entry), or unchanged for its
    /// lease on our clock.
    async fn confirm(&mut self, owner: &str) -> Result<bool> {
        let p = self.presence.clone();
        if p.session.confirm_dead(&[owner], &mut self.liveness).await? {
            return Ok(true);
        }
        let hb = p
            .store
            .get(
                &p.session.heartbeat_key(owner),
                crate::store::Consistency::Linearizable,
            )
            .await?;
        Ok(hb.is_none())
    }

    fn expiry(&self) -> Option<Instant> {
        let now = Instant::now();
        let snap = self.presence.mirror.snapshot();
        snap.with_prefix(&self.presence.prefix)
            .filter_map(|e| self.presence.owner(&e.key))
            .filter_map(|o| self.liveness.expires_at(o))
            .filter(|at| *at > now)
            .min()
    }
}

/// Refuses values over a limit that keeps entries small.
pub(crate) fn check_value(kind: &str, value: &[u8]) -> Result<()> {
    const MAX: usize = 64 * 1024;
    if value.len() > MAX {
        return Err(Error::InvalidArgument(format!(
            "a {kind} value is at most {MAX} bytes (got {})",
            value.len()
        )));
    }
    Ok(())
}
