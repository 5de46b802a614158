//! Releases where several holders release at once (a capacity above 1): one write per batch.
//!
//! The releases of one record in this process wait in one queue ([`Releasing`], shared like
//! the mirror: same store, same record). One task at a time writes every release queued so far
//! in ONE transaction with an otherwise branch:
//! - if the record is still the one in sight, the write releases every grant of the batch in
//!   the record, granting whoever now fits (with the release markers and arrivals in sight
//!   applied and taken in, and the garbage that makes deleted along): the whole handoff;
//! - if it changed meanwhile (another process's release, a waiter's write, or a view of the
//!   record that was behind), the same write puts the batch's release markers instead, which
//!   the next writer of the record applies (see the module docs of `fair`).
//!
//! Releases queued while a write is in flight go in the next one, which builds on the record
//! the previous one wrote. So the releases of a process never collide with each other, a batch
//! costs one write whichever branch applies, and in a quiet moment it is the whole handoff.
//!
//! Safety is the markers' argument: the first branch is the record in sight with the batch's
//! markers applied, exactly what any writer that saw those markers would write, and a CAS on
//! the record's exact bytes. A release whose grant the record in sight does not show (the
//! mirror behind its grant, or the grant taken over) never takes the first branch.
//!
//! Fallbacks, where each release of the batch puts its own marker (one write each): a batch
//! with a grant the record in sight does not show, or too large for one transaction; a store
//! without transactions with an otherwise branch; a write whose outcome is unknown; a store
//! error. A marker of a grant the record no longer holds is garbage, so one that follows a
//! handoff that did land changes nothing.
//!
//! # Not guaranteed
//! - The writer is a task on the runtime of the release that started it, serving every
//!   release of the record in the process (as a shared mirror's tasks do). A process that
//!   shares one store handle between runtimes and stops driving that runtime while it still
//!   has a batch to write leaves the releases of that record waiting; a runtime that shuts
//!   down is fine (the releases then put their own markers).
//! - A cluster with a node older than this transaction form: such a node, as leader, answers
//!   "refused" without writing the markers, and the release returns as if it had. Upgrade
//!   every node before the clients (see the README).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::Fair;
use super::record::{Released, Slot};
use crate::error::Result;
use crate::store::{PerStore, Store, TxnOp, shared_per_store};

/// The releases of one record in this process waiting for their write.
#[derive(Default)]
pub(super) struct Releasing {
    st: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Each release, the record its holder last saw, and who waits for it (true: written).
    pending: Vec<(Released, Option<Bytes>, oneshot::Sender<bool>)>,
    /// A task is writing (it takes whatever is pending before it stops).
    writing: bool,
}

impl Releasing {
    /// The queue of the record `key` in `store`, shared by every handle of this process.
    pub(super) fn shared(store: &Arc<dyn Store>, key: &Bytes) -> Arc<Releasing> {
        static REGISTRY: PerStore<Bytes, Releasing> = PerStore::new();
        shared_per_store(&REGISTRY, store, key.clone(), Releasing::default)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Armed while a writer task runs (see [`Fair::write_releases`]).
struct WriterGuard(Option<Arc<Releasing>>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if let Some(releasing) = self.0.take() {
            let mut q = releasing.lock();
            q.writing = false;
            for (_, _, tx) in q.pending.drain(..) {
                let _ = tx.send(false);
            }
        }
    }
}

impl Fair {
    /// A holder gives back its grant of `token` where other holders may be releasing at the
    /// same moment (a capacity above 1): with the other releases of this process, in one
    /// write that hands the grants on if the record is still the one in sight (`known`, or
    /// the mirror's if newer) and puts release markers if not (see the module docs). If the
    /// future is dropped, the write goes on in the background.
    pub(super) async fn release(
        self: &Arc<Self>,
        me: &Slot,
        token: u64,
        known: Option<Bytes>,
    ) -> Result<()> {
        let mine = Released {
            slot: me.clone(),
            token,
        };
        let marker = self.marker(&mine);
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.releasing.lock();
            q.pending.push((mine, known, tx));
            !std::mem::replace(&mut q.writing, true)
        };
        if start {
            // Armed before the task exists: a task dropped before its first poll (its runtime
            // shutting down) resets the queue too.
            let guard = WriterGuard(Some(self.releasing.clone()));
            tokio::spawn(self.clone().write_releases(guard));
        }
        if rx.await.unwrap_or(false) {
            return Ok(());
        }
        let value = marker.write.unwrap_or_default();
        self.store.put(&marker.key, &value).await?;
        tracing::debug!(kind = self.kind, name = %self.name, ?me, token, "released (marker)");
        Ok(())
    }

    /// Writes the pending releases, a batch per write, until none is left. If this task ends
    /// early (its runtime shuts down, a panic), `guard` lets the next release start a writer
    /// again, and the ones pending put their own markers.
    async fn write_releases(self: Arc<Self>, mut guard: WriterGuard) {
        // The record the last batch wrote: the next one builds on it (the mirror may not show
        // it yet).
        let mut wrote: Option<Bytes> = None;
        loop {
            let batch = {
                let mut q = self.releasing.lock();
                if q.pending.is_empty() {
                    q.writing = false;
                    guard.0 = None;
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            let (released, mut known): (Vec<Released>, Vec<Option<Bytes>>) =
                batch.iter().map(|(r, k, _)| (r.clone(), k.clone())).unzip();
            known.push(wrote.take());
            let (written, record) = self.write_batch(&released, known).await;
            wrote = record;
            for (_, _, tx) in batch {
                let _ = tx.send(written);
            }
        }
    }

    /// One write for `batch` (see the module docs); false if each must put its own marker.
    /// With the record it wrote, if the first branch applied.
    async fn write_batch(
        &self,
        batch: &[Released],
        known: Vec<Option<Bytes>>,
    ) -> (bool, Option<Bytes>) {
        let markers: Vec<TxnOp> = batch.iter().map(|r| self.marker(r)).collect();
        let seq = |b: &Bytes| self.decode_shared(Some(b)).map_or(0, |r| r.seq);
        let newest = known.into_iter().flatten().max_by_key(seq);
        let Some((ops, next, grants)) = self.handoff(batch, newest, &markers) else {
            return (false, None);
        };
        match self.store.transact_or(&ops, &markers).await {
            Ok(handed) => {
                tracing::debug!(kind = self.kind, name = %self.name, releases = batch.len(), handed, "released in one write");
                if handed && grants {
                    crate::metrics::count(
                        crate::metrics::LOCK_HANDOFFS_TOTAL,
                        self.kind,
                        &self.name,
                    );
                }
                (true, handed.then_some(next))
            }
            // Nothing was sent (no such transactions), or either branch may have applied, or
            // the store failed: the markers, one by one (right after either branch).
            Err(e) => {
                tracing::debug!(kind = self.kind, name = %self.name, error = %e, "releases fall back to markers");
                (false, None)
            }
        }
    }

    /// The put of `released`'s release marker (its value: the released grant's token).
    fn marker(&self, released: &Released) -> TxnOp {
        TxnOp::put(self.release_key(&released.slot), released.token.to_string())
    }

    /// The first branch of a batch's write: the record in sight (the newer of `known` and the
    /// mirror's) without the batch's grants, with the markers and arrivals in sight applied
    /// and taken in, expecting exactly those bytes, and the deletes of what that makes
    /// garbage; the record it writes, and whether that grants anyone. `None` when the record
    /// in sight does not show every grant of the batch, or the write would not fit in one
    /// transaction beside `markers`.
    fn handoff(
        &self,
        batch: &[Released],
        known: Option<Bytes>,
        markers: &[TxnOp],
    ) -> Option<(Vec<TxnOp>, Bytes, bool)> {
        let snap = self.record.snapshot();
        let current = self.newer(known, &snap)?;
        let rec = self.decode_shared(Some(&current)).ok()?;
        let shown = |r: &Released| rec.grant_of(&r.slot).is_some_and(|g| g.token == r.token);
        if !batch.iter().all(shown) {
            return None;
        }
        let mut released = self.releases_in(&snap);
        released.extend(batch.iter().cloned());
        let next = rec.released(&released).absorbed(&self.arrivals_in(&snap));
        let mut ops: Vec<TxnOp> = self
            .garbage(Some(&current), &next, None)
            .into_iter()
            .map(|(k, _)| TxnOp::delete(k))
            .collect();
        let new = Bytes::from(next.encode());
        ops.push(TxnOp::cas(self.key.clone(), Some(&current), new.clone()));
        let size = crate::store::txn::encoded_len(&ops) + crate::store::txn::encoded_len(markers);
        let fits = size <= crate::keys::MAX_VALUE_LEN
            && ops.len() + markers.len() <= crate::store::txn::MAX_TXN_OPS;
        fits.then_some((ops, new, next.epoch > rec.epoch))
    }
}
