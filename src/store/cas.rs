//! [`Cas`]: the one way dcoord settles a compare-and-swap whose outcome was unknown.
//!
//! # Guarantees
//! - **At most one attempt applies.** [`Cas::settle`] re-sends the *identical* CAS after an
//!   [`Error::Ambiguous`] answer. Every attempt expects the same bytes, and under the contract
//!   below the first attempt to apply moves the key off them for good, so every other attempt
//!   (one still in flight included) is refused.
//! - **No write lands after a definite answer.** An attempt still in flight when a later one is
//!   answered either committed before that answer (Raft commits in log order) or can no longer
//!   match. So the outcome [`Settled`] reports is final.
//! - **"Failed" is never concluded from a read.** A linearizable read that still shows the
//!   expected bytes proves nothing: the first attempt can commit after the read (under a new
//!   leader, for example). Only an answer of the store decides.
//!
//! # Contract (the caller's part)
//! - `expected != Some(new)`, and once the key has left `expected` it never holds those bytes
//!   again. Recipes make this true by putting something unique per write into their records
//!   (a sequence number, a slot, a write id). For `expected = None` it means the key is not
//!   deleted while an attempt may be in flight.
//! - When `new` is not unique per write (a config value any writer could produce), say so with
//!   [`Cas::not_unique`]: the key holding `new` after an unknown outcome is then reported as
//!   [`Settled::Rejected`] with `maybe_applied`, not as [`Settled::Applied`].
//!
//! # NOT guaranteed
//! - Progress while the store keeps answering [`Error::Ambiguous`]: it is re-sent (with
//!   backoff) for as long as [`Cas::while_ok`] allows, by default forever.
//!
//! # Failure modes
//! Any other error is returned as is when no attempt could have applied; after an unknown
//! outcome it becomes [`Error::Ambiguous`] (the first attempt may still apply).

use std::time::Duration;

use bytes::Bytes;

use super::{Consistency, Store, TxnOp};
use crate::error::{Error, Result, show};
use crate::reconcile::Backoff;

/// What a settled compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// This write applied.
    Applied,
    /// The key did not hold the expected bytes. `current` is what a linearizable read saw
    /// afterwards. With `maybe_applied`, an earlier attempt's outcome was unknown: this write
    /// may have applied and been overwritten since, and only the record's content can tell.
    Rejected {
        /// The key's value after the refusal (a linearizable read).
        current: Option<Bytes>,
        /// An earlier attempt's outcome was unknown.
        maybe_applied: bool,
    },
}

/// A compare-and-swap to settle: `key` from `expected` to `new`. See the module docs for
/// the contract.
///
/// ```
/// # #[tokio::main] async fn main() -> dcoord::Result<()> {
/// use dcoord::store::{Cas, Settled};
/// let store = dcoord::testing::MemStore::new();
/// let outcome = Cas::new(&store, b"/app/k", None, b"v1").settle().await?;
/// assert_eq!(outcome, Settled::Applied);
/// # Ok(()) }
/// ```
#[must_use = "nothing is sent until settle() is awaited"]
pub struct Cas<'a> {
    store: &'a dyn Store,
    key: &'a [u8],
    expected: Option<&'a [u8]>,
    new: &'a [u8],
    unique: bool,
    reread: bool,
    while_ok: Option<&'a (dyn Fn() -> Result<()> + Send + Sync)>,
    along: &'a [TxnOp],
}

impl<'a> Cas<'a> {
    /// The CAS of `key` from `expected` (`None`: absent) to `new`.
    pub fn new(
        store: &'a dyn Store,
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        new: &'a [u8],
    ) -> Self {
        Cas {
            store,
            key,
            expected,
            new,
            unique: true,
            reread: true,
            while_ok: None,
            along: &[],
        }
    }

    /// Writes that go with the CAS, in one [`Store::transact`]: applied with it (just
    /// before it, at its revision) or not at all. Since at most one attempt's CAS applies,
    /// they apply at most once. A store without transactions answers the settle with its
    /// [`Error::Engine`] (see [`unsupported`](super::txn::unsupported)) before anything is
    /// sent; the caller then writes without them.
    pub fn along(mut self, ops: &'a [TxnOp]) -> Self {
        self.along = ops;
        self
    }

    /// A plain refusal (no earlier attempt's outcome unknown) is reported without reading the
    /// key: [`Settled::Rejected`] then has `current: None`, which says nothing about the key.
    /// For callers that drop a refused write and move on (a consumer that lost a claim race),
    /// saving a linearizable read per refusal. After an unknown outcome the key is read as
    /// always (it is what tells whether the first attempt applied).
    pub fn without_reread(mut self) -> Self {
        self.reread = false;
        self
    }

    /// `new` is bytes another writer could also write (see the module docs).
    pub fn not_unique(mut self) -> Self {
        self.unique = false;
        self
    }

    /// Stops re-sending after an unknown outcome once `check` errs (a lost session): the
    /// result is then [`Error::Ambiguous`].
    pub fn while_ok(mut self, check: &'a (dyn Fn() -> Result<()> + Send + Sync)) -> Self {
        self.while_ok = Some(check);
        self
    }

    /// Sends the CAS until the store gives a definite answer.
    ///
    /// # Errors
    /// See the module docs' failure modes.
    ///
    /// # Cancel safety
    /// Like dropping any write: at most one attempt applies, and whether one did is unknown.
    pub async fn settle(self) -> Result<Settled> {
        let mut unsure: Option<Error> = None;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        // The CAS last: a watcher sees the other writes before the key's new value.
        let txn: Vec<TxnOp> = match self.along {
            [] => Vec::new(),
            ops => ops
                .iter()
                .cloned()
                .chain([TxnOp::cas(
                    Bytes::copy_from_slice(self.key),
                    self.expected,
                    Bytes::copy_from_slice(self.new),
                )])
                .collect(),
        };
        loop {
            let sent = if txn.is_empty() {
                self.store
                    .compare_and_swap(self.key, self.expected, self.new)
                    .await
            } else {
                self.store.transact(&txn).await
            };
            match sent {
                Ok(true) => return Ok(Settled::Applied),
                Ok(false) => return self.rejected(unsure.is_some()).await,
                Err(e) if e.is_ambiguous() => {
                    tracing::debug!(key = %show(self.key), error = %e, "cas outcome unknown; re-sending it");
                    if let Some(check) = self.while_ok
                        && check().is_err()
                    {
                        return Err(e);
                    }
                    unsure = Some(e);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    return Err(match unsure {
                        None => e,
                        Some(_) => Error::Ambiguous {
                            op: "compare_and_swap",
                            key: show(self.key),
                            message: format!(
                                "an earlier attempt's outcome is unknown, and re-sending it failed: {e}"
                            ),
                            source: None,
                        },
                    });
                }
            }
        }
    }

    async fn rejected(&self, unsure: bool) -> Result<Settled> {
        if !unsure && !self.reread {
            return Ok(Settled::Rejected {
                current: None,
                maybe_applied: false,
            });
        }
        let current = match self.store.get(self.key, Consistency::Linearizable).await {
            Ok(current) => current,
            // After an unknown outcome a failed read decides nothing: the first attempt may
            // have applied, so the answer is "unknown", never the read's "nothing happened".
            Err(e) if unsure => {
                return Err(Error::Ambiguous {
                    op: "compare_and_swap",
                    key: show(self.key),
                    message: format!(
                        "an earlier attempt's outcome is unknown, and reading the key failed: {e}"
                    ),
                    source: None,
                });
            }
            Err(e) => return Err(e),
        };
        if unsure && self.unique && current.as_deref() == Some(self.new) {
            // Nobody else writes these bytes: the refused re-send lost to our first attempt.
            return Ok(Settled::Applied);
        }
        Ok(Settled::Rejected {
            current,
            maybe_applied: unsure,
        })
    }
}
