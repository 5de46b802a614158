//! `Producer`: enqueues without a session, a heartbeat or an index of the queue.
//!
//! A producer is only a store handle, the queue's key prefix and an id of its own (which
//! orders its messages among equal priorities and enqueue times). [`super::WorkQueue::enqueue`]
//! goes through the same code, with the session id as the producer id.
//!
//! # Guarantees
//! - As [`super::WorkQueue::enqueue`]: durable when it returns, idempotent by message id (an
//!   existing id is left as it is, whatever its state).
//! - A producer's messages of one priority are delivered in the order it enqueued them
//!   (`enqueue_many` included, though its writes are sent concurrently): each gets the next
//!   number of this handle.
//! - Memory is constant: nothing of the queue is held.
//!
//! # Not guaranteed
//! - Order between different producers beyond enqueue time (milliseconds, on each producer's
//!   own clock).
//!
//! # Failure modes
//! - The store's errors; an [`crate::Error::Ambiguous`] write is settled by re-sending it
//!   ([`crate::store::Cas`]), so it surfaces only when that cannot decide. Enqueueing again
//!   with the same id is always safe.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::EnqueueOptions;
use super::message::{Header, Record, State};
use super::now_ms;
use crate::error::{Error, Result};
use crate::store::{Cas, Settled, Store};

/// How many writes one `enqueue_many` keeps in flight.
const MANY_IN_FLIGHT: usize = 64;

/// Enqueues to one queue with nothing but a store. Cheap to clone (clones share the id and
/// the sequence).
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// `<root>queues/<name>/m/`.
    prefix: Bytes,
    store: Arc<dyn Store>,
    /// Orders this producer's messages among equal priorities and times.
    id: String,
    seq: AtomicU64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("queue", &self.inner.name)
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// `<root>queues/<name>/m/`: where a queue's messages live.
pub(super) fn messages_prefix(root: &str, name: &str) -> Bytes {
    Bytes::from(format!("{root}queues/{name}/m/"))
}

impl Producer {
    /// A producer for the queue `name` under dcoord's default root (`/dcoord/`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad name.
    pub fn new(store: Arc<dyn Store>, name: &str) -> Result<Producer> {
        Self::with_root(store, crate::keys::DEFAULT_ROOT, name)
    }

    /// A producer for the queue `name` under `root` (as [`crate::session::SessionOptions::root`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad root or name.
    pub fn with_root(store: Arc<dyn Store>, root: &str, name: &str) -> Result<Producer> {
        crate::keys::validate_root(root)?;
        crate::keys::validate_name("queue", name)?;
        let id = format!("p-{}", uuid::Uuid::new_v4().simple());
        Ok(Self::with_id(store, messages_prefix(root, name), name, id))
    }

    pub(super) fn with_id(
        store: Arc<dyn Store>,
        prefix: Bytes,
        name: &str,
        id: String,
    ) -> Producer {
        Producer {
            inner: Arc::new(Inner {
                name: name.to_string(),
                prefix,
                store,
                id,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The record and key of one new message, numbered now.
    fn prepare(
        &self,
        payload: &[u8],
        options: EnqueueOptions,
    ) -> Result<(String, Vec<u8>, Vec<u8>)> {
        let id = match options.id {
            Some(id) => {
                crate::keys::validate_name("message id", &id)?;
                id
            }
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let mut key = self.inner.prefix.to_vec();
        key.extend_from_slice(id.as_bytes());
        let now = now_ms();
        let rec = Record {
            header: Header {
                v: Header::VERSION,
                id: id.clone(),
                prio: options.priority,
                ts_ms: now,
                producer: self.inner.id.clone(),
                n: self.inner.seq.fetch_add(1, Ordering::Relaxed),
                not_before_ms: if options.delay.is_zero() {
                    0
                } else {
                    now + options.delay.as_millis() as u64
                },
                attempts: 0,
                state: State::Ready,
                last_error: None,
                w: 0,
            },
            payload: Bytes::copy_from_slice(payload),
        };
        let bytes = rec.encode();
        crate::store::check_write(&key, &bytes)?;
        Ok((id, key, bytes))
    }

    /// Creates the message unless its id exists. Settled by re-sending (see `Cas`): the key is
    /// never absent again while a write could be in flight (the tombstone sweep waits
    /// `retention`). Refused means the id exists already, ours or an earlier enqueue's:
    /// idempotent either way.
    async fn create(&self, key: &[u8], bytes: &[u8]) -> Result<()> {
        if let Settled::Applied = Cas::new(&*self.inner.store, key, None, bytes)
            .settle()
            .await?
        {
            crate::metrics::count(
                crate::metrics::QUEUE_ENQUEUED_TOTAL,
                "queue",
                &self.inner.name,
            );
        }
        Ok(())
    }

    /// Adds a message (raw bytes). Returns its id. Durable when it returns; idempotent by id.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad id; [`Error::ValueTooLarge`] for a payload over
    /// about 1 MiB; the store's errors.
    ///
    /// # Cancel safety
    /// If dropped, the message may or may not have been added; enqueue again with the same id.
    #[tracing::instrument(level = "debug", name = "queue.enqueue", skip_all, fields(queue = %self.inner.name), err(level = "debug", Display))]
    pub async fn enqueue(&self, payload: &[u8], options: EnqueueOptions) -> Result<String> {
        let (id, key, bytes) = self.prepare(payload, options)?;
        self.create(&key, &bytes).await?;
        Ok(id)
    }

    /// Adds a message whose payload is `value` as JSON.
    ///
    /// # Errors
    /// As [`Producer::enqueue`]; [`Error::InvalidArgument`] if `value` does not serialize.
    ///
    /// # Cancel safety
    /// As [`Producer::enqueue`].
    pub async fn enqueue_json<T: Serialize>(
        &self,
        value: &T,
        options: EnqueueOptions,
    ) -> Result<String> {
        let payload = serde_json::to_vec(value)
            .map_err(|e| Error::InvalidArgument(format!("message does not serialize: {e}")))?;
        self.enqueue(&payload, options).await
    }

    /// Adds several messages, up to 64 writes in flight; returns their ids in order. They
    /// are delivered in the order given (within a priority), however their writes land.
    ///
    /// # Errors
    /// As [`Producer::enqueue`], for the first message that fails; the messages are checked
    /// (ids, sizes) before anything is written, so bad input writes nothing. After a store
    /// error some messages may have been added: enqueue the same batch again (ids make it
    /// idempotent; give ids when that matters).
    ///
    /// # Cancel safety
    /// If dropped, any subset of the messages may have been added.
    #[tracing::instrument(level = "debug", name = "queue.enqueue_many", skip_all, fields(queue = %self.inner.name), err(level = "debug", Display))]
    pub async fn enqueue_many<I, P>(&self, messages: I) -> Result<Vec<String>>
    where
        I: IntoIterator<Item = (P, EnqueueOptions)>,
        P: AsRef<[u8]>,
    {
        let prepared = messages
            .into_iter()
            .map(|(payload, options)| self.prepare(payload.as_ref(), options))
            .collect::<Result<Vec<_>>>()?;
        futures::stream::iter(prepared)
            .map(|(id, key, bytes)| async move {
                self.create(&key, &bytes).await?;
                Ok::<_, Error>(id)
            })
            .buffered(MANY_IN_FLIGHT)
            .try_collect()
            .await
    }
}
