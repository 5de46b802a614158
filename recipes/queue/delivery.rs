//! A claimed message ([`Delivery`]) and what a handler sees ([`Message`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::message::{Record, State};
use super::{Inner, now_ms};
use crate::error::{Error, Result};
use crate::reconcile::Backoff;
use crate::session::Owned;
use crate::store::{Cas, Settled, Store};
use serde::de::DeserializeOwned;
use std::fmt;

/// A claimed message. [`Delivery::ack`] it when done or [`Delivery::nack`] it; dropping it
/// gives it back unprocessed (in the background).
#[must_use = "a delivery must be acked or nacked; dropping it gives the message back"]
pub struct Delivery {
    pub(super) q: Arc<Inner>,
    pub(super) key: Bytes,
    pub(super) record: Record,
    pub(super) bytes: Bytes,
    pub(super) finished: bool,
    /// Marks the message as held here (see `Session::own`) until the delivery is finished.
    pub(super) owned: Option<Owned>,
    pub(super) poison: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.record.header.id)
            .field("attempt", &self.record.header.attempts)
            .finish()
    }
}

impl Delivery {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.record.header.id
    }

    /// Which attempt this is (1 for the first delivery).
    pub fn attempt(&self) -> u32 {
        self.record.header.attempts
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.record.payload
    }

    /// The payload decoded from JSON.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        self.message().json()
    }

    /// What a handler gets: id, attempt, enqueue time, payload, and the idempotency helpers.
    pub fn message(&self) -> Message {
        Message {
            q: self.q.clone(),
            id: self.record.header.id.clone(),
            attempt: self.record.header.attempts,
            priority: self.record.header.prio,
            enqueued_at: UNIX_EPOCH + Duration::from_millis(self.record.header.ts_ms),
            payload: self.record.payload.clone(),
            poison: self.poison.clone(),
        }
    }

    /// Done: the message leaves the queue (a tombstone stays for deduplication).
    ///
    /// # Errors
    /// [`Error::ClaimLost`] if another consumer took the message over (this one was considered
    /// dead); the store's errors (the message will then be redelivered).
    ///
    /// # Cancel safety
    /// If dropped, the ack happened or the message will be redelivered.
    #[tracing::instrument(level = "debug", name = "queue.ack", skip_all, fields(queue = %self.q.name, id = %self.record.header.id), err(level = "debug", Display))]
    pub async fn ack(mut self) -> Result<()> {
        let done = self.record.done(now_ms());
        self.finish(done).await
    }

    /// Failed: retried after a backoff, or dead-lettered after the last attempt, with `error`.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    ///
    /// # Cancel safety
    /// As [`Delivery::ack`].
    #[tracing::instrument(level = "debug", name = "queue.nack", skip_all, fields(queue = %self.q.name, id = %self.record.header.id), err(level = "debug", Display))]
    pub async fn nack(mut self, error: &str) -> Result<()> {
        let poison = self.poison.lock().unwrap().take();
        let next = match poison {
            Some(reason) => self.record.dead(&reason),
            None => {
                let o = &self.q.options;
                let exp = self.record.header.attempts.saturating_sub(1);
                let backoff = Backoff::ceiling(o.min_backoff, o.max_backoff, exp);
                self.record
                    .fail(error, o.max_attempts, now_ms() + backoff.as_millis() as u64)
            }
        };
        self.finish(next).await
    }

    /// Not done, not failed: the message is Ready again at once, this attempt not counted (as
    /// when the delivery is dropped, but awaited: once this returns Ok, another consumer can
    /// take it).
    ///
    /// # Errors
    /// As [`Delivery::ack`]; on a store error the message is given back in the background.
    ///
    /// # Cancel safety
    /// If dropped, the message is given back in the background.
    #[tracing::instrument(level = "debug", name = "queue.give_back", skip_all, fields(queue = %self.q.name, id = %self.record.header.id), err(level = "debug", Display))]
    pub async fn give_back(mut self) -> Result<()> {
        let Some(back) = self.record.release() else {
            return Err(self.claim_lost());
        };
        self.finish(back).await
    }

    async fn finish(&mut self, next: Record) -> Result<()> {
        let res = self.finish_inner(next).await;
        if self.finished {
            self.owned = None;
        }
        res
    }

    async fn finish_inner(&mut self, next: Record) -> Result<()> {
        self.finished = true;
        let q = &self.q;
        let new = next.encode();
        let counted = match next.header.state {
            State::Done { .. } => Some(crate::metrics::QUEUE_ACKED_TOTAL),
            State::Dead { .. } => Some(crate::metrics::QUEUE_DEAD_LETTERS_TOTAL),
            _ => None,
        };
        // Settled by re-sending the identical CAS, never by a read that still shows our claim
        // (the first write can apply after that read): see `Cas`. Our claim's bytes are
        // unique, so once replaced they never come back.
        match Cas::new(&*q.store, &self.key, Some(&self.bytes), &new)
            .settle()
            .await
        {
            Ok(Settled::Applied) => {
                if let Some(name) = counted {
                    crate::metrics::count(name, "queue", &q.name);
                }
                Ok(())
            }
            Ok(Settled::Rejected { .. }) => Err(self.claim_lost()),
            Err(e) => {
                self.finished = false;
                Err(e)
            }
        }
    }

    fn claim_lost(&self) -> Error {
        Error::ClaimLost {
            id: self.record.header.id.clone(),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Unfinished: give it back (retried until the store answers).
        self.q.give_back(
            self.key.clone(),
            Some(self.bytes.clone()),
            self.owned.take(),
        );
    }
}

/// A message as a handler sees it.
#[derive(Clone)]
pub struct Message {
    q: Arc<Inner>,
    /// The message id.
    pub id: String,
    /// Which attempt this is (1 for the first delivery).
    pub attempt: u32,
    /// Its priority.
    pub priority: i32,
    /// When it was enqueued (producer's wall clock).
    pub enqueued_at: SystemTime,
    /// The payload.
    pub payload: Bytes,
    poison: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("len", &self.payload.len())
            .finish()
    }
}

impl Message {
    /// The payload decoded from JSON.
    ///
    /// # Errors
    /// [`Error::Decode`] naming the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            key: format!("{}{}", String::from_utf8_lossy(&self.q.prefix), self.id),
            reason: format!("message payload: {e}"),
        })
    }

    /// Marks this message as poison: the failure that follows sends it straight to the dead
    /// letters with `reason`, whatever attempts remain.
    pub fn poison(&self, reason: impl Into<String>) {
        *self.poison.lock().unwrap() = Some(reason.into());
    }

    /// True at most once per (`scope`, message id), over every delivery of this message
    /// (normally exactly once; never if the marker's write timed out and landed late): a
    /// marker written with compare-and-swap. Run a non-idempotent effect only when it returns
    /// true: the effect then happens at most once (it is skipped if a delivery died between
    /// marking and finishing it; put the marker and the effect in one write with
    /// [`Message::effect_once`] when the effect is a write to the store).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad scope; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the marker may have been written (the effect then never runs).
    pub async fn once(&self, scope: &str) -> Result<bool> {
        crate::keys::validate_name("once scope", scope)?;
        let key = format!("{}once/{scope}/{}", self.q.session.root(), self.id);
        // A marker unique to this call: with the session id alone, a later delivery of the
        // same message to the same session whose write had an unknown outcome would read the
        // earlier delivery's marker back as its own and run the effect a second time.
        let marker = format!(
            "{}/{}/{}",
            self.q.session.id(),
            self.attempt,
            uuid::Uuid::new_v4().simple()
        );
        write_once(&*self.q.store, key.as_bytes(), marker.as_bytes(), true).await
    }

    /// Writes `value` to `key` only if `key` is absent (compare-and-swap): an effect on the
    /// store that happens exactly once however often the message is delivered, if `key` is
    /// derived from the message id. Returns true only if this call is known to have written
    /// it: after a write whose outcome was unknown it returns false when the stored value
    /// equals `value` (an earlier delivery could have written the same bytes). The effect is
    /// there exactly once either way, but do not count effects by this return value alone;
    /// when it matters, make `value` unique to the call, as [`Message::once`] does.
    ///
    /// # Errors
    /// The store's errors (an unknown outcome is settled by re-sending the write).
    ///
    /// # Cancel safety
    /// If dropped, the effect happened or not, never twice.
    pub async fn effect_once(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        write_once(&*self.q.store, key, value, false).await
    }
}

/// CAS `key` from absent to `value`, settled (see `Cas`). `unique`: nobody else writes `value`.
async fn write_once(store: &dyn Store, key: &[u8], value: &[u8], unique: bool) -> Result<bool> {
    let cas = Cas::new(store, key, None, value);
    let cas = if unique { cas } else { cas.not_unique() };
    Ok(cas.settle().await? == Settled::Applied)
}
