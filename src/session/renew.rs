//! The background renewal of a session's heartbeat, and the ownership marks of its keys.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::SessionState;
use crate::error::{Result, show};
use crate::reconcile::Backoff;
use crate::store::Store;

/// A key owned by one task of this process for a session (see [`Session::own`]); dropping
/// it gives the key up.
#[derive(Debug)]
pub(crate) struct Owned {
    pub(super) set: Arc<Mutex<HashSet<Bytes>>>,
    pub(super) key: Bytes,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.key);
    }
}

pub(super) async fn write(
    store: &dyn Store,
    key: &[u8],
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<()> {
    match ttl {
        Some(ttl) => store.put_with_ttl(key, value, ttl).await,
        None => store.put(key, value).await,
    }
}

pub(super) struct Renewer {
    pub(super) store: Arc<dyn Store>,
    pub(super) key: Bytes,
    pub(super) state: Arc<watch::Sender<SessionState>>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) lease: Duration,
    pub(super) margin: Duration,
    pub(super) renew_every: Duration,
    pub(super) gc_ttl: Option<Duration>,
    pub(super) beat: Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    pub(super) valid_until: Instant,
    pub(super) last_sent: Instant,
}

pub(super) async fn renew(mut r: Renewer) {
    let mut seq = 1u64;
    let mut next_at = r.last_sent + r.renew_every;
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        r.renew_every.max(Duration::from_millis(50)),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(r.valid_until) => break,
            _ = r.stop.changed() => return,
            _ = tokio::time::sleep_until(next_at) => {}
        }
        seq += 1;
        let value = (r.beat)(seq);
        let sent = Instant::now();
        let attempt = write(&*r.store, &r.key, &value, r.gc_ttl);
        let outcome = tokio::select! {
            res = tokio::time::timeout_at(r.valid_until, attempt) => res,
            _ = r.stop.changed() => return,
        };
        match outcome {
            // A write that succeeded only after our deadline (its answer waited while this
            // task was not scheduled: a pause, a busy host) extends nothing: an observer may
            // already count this session dead, so it must stay lost.
            Ok(Ok(())) if Instant::now() >= r.valid_until => break,
            Ok(Ok(())) => {
                r.last_sent = sent;
                r.valid_until = sent + r.lease - r.margin;
                next_at = sent + r.renew_every;
                backoff.reset();
                r.state.send_replace(SessionState::Alive {
                    valid_until: r.valid_until,
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %show(&r.key), error = %e, "session renewal failed");
                metrics::counter!(crate::metrics::SESSION_RENEW_FAILURES_TOTAL).increment(1);
                next_at = Instant::now() + backoff.next_delay();
            }
            Err(_) => break,
        }
    }
    tracing::warn!(
        key = %show(&r.key),
        "session lost: no renewal succeeded since {:?} ago",
        r.last_sent.elapsed()
    );
    metrics::counter!(crate::metrics::SESSION_LOST_TOTAL).increment(1);
    r.state.send_replace(SessionState::Lost);
}
