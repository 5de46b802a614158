//! [`Store`] over a d-engine `EmbeddedEngine` in this process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use d_engine::{ClientApi, ClientApiError, EmbeddedClient, ErrorCode, WatchEvent, WatchEventType};
use tokio::sync::watch;

use super::{Consistency, Event, EventKind, Scan, Store, WatchStream, WatchTarget, check_write};
use crate::error::{Error, Result, show};
use crate::keys;

/// A [`Store`] backed by an embedded d-engine node. Get one from
/// [`EmbeddedNode::store`](crate::engine::EmbeddedNode::store).
///
/// The node must be a single-node cluster or the leader: a follower rejects writes, which come
/// out as [`Error::Unavailable`].
///
/// Unlike d-engine's own watchers, dcoord's watch streams end with [`Error::WatchEnded`] when the
/// node is stopped.
#[derive(Clone)]
pub struct EmbeddedStore {
    client: Arc<EmbeddedClient>,
    stopped: watch::Receiver<bool>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("stopped", &*self.stopped.borrow())
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    pub(crate) fn new(client: Arc<EmbeddedClient>, stopped: watch::Receiver<bool>) -> Self {
        Self { client, stopped }
    }

    fn check_running(&self) -> Result<()> {
        if *self.stopped.borrow() {
            Err(Error::Stopped)
        } else {
            Ok(())
        }
    }

    /// Maps a d-engine error. `write_key` is `Some` for writes, whose timeouts are ambiguous.
    fn map_err(&self, op: &'static str, write_key: Option<&[u8]>, e: ClientApiError) -> Error {
        if *self.stopped.borrow() {
            return Error::Stopped;
        }
        let message = e.message().to_string();
        let not_leader = e.code() == ErrorCode::NotLeader || message.contains("Not leader");
        if not_leader {
            return Error::Unavailable {
                op,
                message: format!("this embedded node is not the leader: {message}"),
                source: Some(Box::new(e)),
            };
        }
        if e.code() == ErrorCode::ConnectionTimeout {
            return match write_key {
                Some(key) => Error::Ambiguous {
                    op,
                    key: show(key),
                    message,
                    source: Some(Box::new(e)),
                },
                None => Error::Unavailable {
                    op,
                    message,
                    source: Some(Box::new(e)),
                },
            };
        }
        Error::Engine {
            op,
            message,
            source: Some(Box::new(e)),
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Bytes>> {
        super::observed("embedded", "get", key, async {
            keys::validate_key(key)?;
            self.check_running()?;
            self.client
                .get_with_consistency(key, consistency.policy())
                .await
                .map_err(|e| self.map_err("get", None, e))
        })
        .await
    }

    async fn get_many(
        &self,
        keys: &[Bytes],
        consistency: Consistency,
    ) -> Result<Vec<Option<Bytes>>> {
        super::read_many("embedded", keys, async {
            self.check_running()?;
            self.client
                .get_multi_with_consistency(keys, consistency.policy())
                .await
                .map_err(|e| self.map_err("get_many", None, e))
        })
        .await
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        super::observed("embedded", "put", key, async {
            check_write(key, value)?;
            self.check_running()?;
            self.client
                .put(key, value)
                .await
                .map_err(|e| self.map_err("put", Some(key), e))
        })
        .await
    }

    async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<()> {
        super::observed("embedded", "put_with_ttl", key, async {
            check_write(key, value)?;
            let secs = super::ttl_secs(ttl)?;
            self.check_running()?;
            ClientApi::put_with_ttl(&*self.client, key, value, secs)
                .await
                .map_err(|e| self.map_err("put_with_ttl", Some(key), e))
        })
        .await
    }

    async fn delete(&self, key: &[u8]) -> Result<()> {
        super::observed("embedded", "delete", key, async {
            keys::validate_key(key)?;
            self.check_running()?;
            self.client
                .delete(key)
                .await
                .map_err(|e| self.map_err("delete", Some(key), e))
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool> {
        super::observed("embedded", "compare_and_swap", key, async {
            check_write(key, new)?;
            self.check_running()?;
            ClientApi::compare_and_swap(&*self.client, key, expected, new)
                .await
                .map_err(|e| self.map_err("compare_and_swap", Some(key), e))
        })
        .await
    }

    async fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan> {
        super::observed("embedded", "scan_prefix", prefix, async {
            keys::validate_scan_prefix(prefix)?;
            self.check_running()?;
            let scan = self
                .client
                .scan_prefix(prefix)
                .await
                .map_err(|e| self.map_err("scan_prefix", None, e))?;
            Ok(Scan::sorted(scan.entries, scan.revision))
        })
        .await
    }

    async fn watch(&self, target: WatchTarget, prev_value: bool) -> Result<WatchStream> {
        super::observed::<WatchStream>("embedded", "watch", target.bytes(), async {
            target.validate()?;
            self.check_running()?;
            let handle = match &target {
                WatchTarget::Key(k) => self.client.watch_with_options(k, prev_value),
                WatchTarget::Prefix(p) => self.client.watch_prefix_with_options(p, prev_value),
            }
            .map_err(|e| self.map_err("watch", None, e))?;
            let mut stopped = self.stopped.clone();
            let name = target.to_string();
            Ok::<WatchStream, Error>(Box::pin(async_stream::stream! {
                let mut handle = handle;
                // d-engine 0.2.4 re-sends committed ranges to the state machine while it applies,
                // and emits a watch event for every send: drop what this stream already delivered.
                let mut last = 0u64;
                loop {
                    tokio::select! {
                        biased;
                        ev = handle.receiver_mut().recv() => match ev {
                            Some(ev) => match convert(ev, prev_value) {
                                Converted::Event(e) if e.revision > last => {
                                    last = e.revision;
                                    yield Ok(e);
                                }
                                Converted::Event(_) => {}
                                Converted::Skip => {}
                                Converted::Canceled => {
                                    yield Err(Error::WatchCanceled { target: name.clone() });
                                    break;
                                }
                            },
                            None => {
                                yield Err(Error::WatchEnded {
                                    target: name.clone(),
                                    reason: "the engine closed the watch".into(),
                                });
                                break;
                            }
                        },
                        _ = async { stopped.wait_for(|s| *s).await.is_ok() } => {
                            yield Err(Error::WatchEnded {
                                target: name.clone(),
                                reason: "the embedded engine was stopped".into(),
                            });
                            break;
                        }
                    }
                }
            }))
        })
        .await
    }
}

enum Converted {
    Event(Event),
    Skip,
    Canceled,
}

fn convert(ev: WatchEvent, prev_value: bool) -> Converted {
    let kind = match ev.event_type {
        WatchEventType::Put => EventKind::Put,
        WatchEventType::Delete => EventKind::Delete,
        WatchEventType::Canceled => return Converted::Canceled,
        WatchEventType::Progress => return Converted::Skip,
    };
    Converted::Event(Event {
        kind,
        key: ev.key,
        value: ev.value,
        prev_value: if prev_value {
            Some(ev.prev_value.unwrap_or_default())
        } else {
            None
        },
        revision: ev.revision,
    })
}
