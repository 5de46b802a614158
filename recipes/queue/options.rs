//! The queue's options, and the figures it reports.

use std::time::Duration;

use bytes::Bytes;

/// Options of a [`WorkQueue`](super::WorkQueue).
#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub(super) max_attempts: u32,
    pub(super) min_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) rescan_every: Duration,
    pub(super) retention: Duration,
    pub(super) handler_timeout: Option<Duration>,
    /// `None`: as many as `run`'s concurrency.
    pub(super) claim_ahead: Option<usize>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_attempts: 5,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            rescan_every: Duration::from_secs(30),
            retention: Duration::from_secs(600),
            handler_timeout: None,
            claim_ahead: None,
        }
    }
}

impl QueueOptions {
    /// Attempts before a message goes to the dead letters (default 5, at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Retry backoff bounds: the n-th retry waits `min * 2^(n-1)`, capped (default 200 ms, 30 s).
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// The safety-net rescan period: repairs watch events d-engine dropped (default 30 s; an
    /// idle consumer reads nothing in between).
    #[must_use]
    pub fn rescan_every(mut self, every: Duration) -> Self {
        self.rescan_every = every.max(Duration::from_millis(100));
        self
    }

    /// How long acked tombstones are kept for enqueue deduplication (default 10 min).
    #[must_use]
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Cancel a handler (and count a failed attempt) after this long (default: none; a hung
    /// handler holds its message as long as its process lives).
    #[must_use]
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = Some(d);
        self
    }

    /// Messages [`WorkQueue::run`](super::WorkQueue::run) claims beyond its concurrency, so
    /// the next one is claimed already when a handler returns (default: as many as the
    /// concurrency). A message claimed ahead is held by this consumer (redelivered one lease
    /// after a crash, as any claim) and waits for a free handler here, even if another
    /// consumer is idle: 0 for handlers that are slow next to a store round trip.
    #[must_use]
    pub fn claim_ahead(mut self, n: usize) -> Self {
        self.claim_ahead = Some(n);
        self
    }
}

/// Options of one [`WorkQueue::enqueue`](super::WorkQueue::enqueue).
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    pub(super) id: Option<String>,
    pub(super) priority: i32,
    pub(super) delay: Duration,
}

impl EnqueueOptions {
    /// The message id ([A-Za-z0-9._-], at most 128 bytes). Enqueue is idempotent by id; the
    /// default is a random one.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Higher runs first (default 0).
    #[must_use]
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }

    /// Not visible to consumers before this delay has passed (by wall clock).
    #[must_use]
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// Counts of a queue's messages, as this consumer's index shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready now.
    pub ready: usize,
    /// Ready later (delayed, or backing off after a failure).
    pub delayed: usize,
    /// Claimed by a consumer.
    pub in_flight: usize,
    /// In the dead letters.
    pub dead: usize,
    /// Acked tombstones kept for deduplication.
    pub done: usize,
    /// Keys under the queue's prefix that are not messages (skipped).
    pub undecodable: usize,
}

/// A message in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id.
    pub id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// The payload.
    pub payload: Bytes,
}

/// What [`WorkQueue::run`](super::WorkQueue::run) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Messages acked.
    pub acked: u64,
    /// Handler failures (retried or dead-lettered).
    pub failed: u64,
    /// Acks or nacks that could not be written (the messages will be redelivered).
    pub lost: u64,
    /// Claims that lost a race (another consumer claimed the message first, or it changed):
    /// each cost a write that delivered nothing.
    pub conflicts: u64,
}
