//! [`Store`] over a d-engine `EmbeddedEngine` in this process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use d_engine::{ClientApi, ClientApiError, EmbeddedClient, ErrorCode, WatchEvent, WatchEventType};
use tokio::sync::watch;

use super::group::{Direct, Group};
use super::txn::{self, Expect, TXN_KEY, TXN_MAGIC, TxnOp};
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
    /// Concurrent writes share Raft entries (see `group`).
    group: Arc<Group>,
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
        Self {
            client,
            stopped,
            group: Arc::default(),
        }
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
impl Direct for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn write_one(&self, op: &TxnOp) -> Result<bool> {
        self.check_running()?;
        let key = &op.key[..];
        let expected: Option<&[u8]> = match &op.expect {
            Expect::Value(v) => Some(v),
            _ => None,
        };
        match (&op.expect, &op.write) {
            (Expect::Any, Some(v)) => self.client.put(key, v).await.map(|()| true),
            (Expect::Any, None) => self.client.delete(key).await.map(|()| true),
            (_, Some(v)) => ClientApi::compare_and_swap(&*self.client, key, expected, v).await,
            (_, None) => return self.write_txn(txn::encode(std::slice::from_ref(op))).await,
        }
        .map_err(|e| self.map_err(op_name(op), Some(key), e))
    }

    async fn read(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>> {
        Store::get_many(self, keys, Consistency::Linearizable).await
    }

    async fn write_txn(&self, wire: Vec<u8>) -> Result<bool> {
        self.check_running()?;
        ClientApi::compare_and_swap(&*self.client, TXN_KEY, Some(TXN_MAGIC), &wire)
            .await
            .map_err(|e| self.map_err("transact", Some(TXN_KEY), e))
    }
}

/// The store op a single write is.
pub(super) fn op_name(op: &TxnOp) -> &'static str {
    match (&op.expect, &op.write) {
        (Expect::Any, Some(_)) => "put",
        (Expect::Any, None) => "delete",
        (_, Some(_)) => "compare_and_swap",
        (_, None) => "transact",
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
            let op = TxnOp::put(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
            self.group.write(self, op).await.map(|_| ())
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
            let op = TxnOp::delete(Bytes::copy_from_slice(key));
            self.group.write(self, op).await.map(|_| ())
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
            let op = TxnOp::cas(
                Bytes::copy_from_slice(key),
                expected,
                Bytes::copy_from_slice(new),
            );
            self.group.write(self, op).await
        })
        .await
    }

    async fn transact(&self, ops: &[TxnOp]) -> Result<bool> {
        let first = ops.first().map_or(&[][..], |o| &o.key[..]);
        super::observed("embedded", "transact", first, async {
            txn::check(ops)?;
            self.write_txn(txn::encode(ops)).await
        })
        .await
    }

    async fn transact_or(&self, ops: &[TxnOp], otherwise: &[TxnOp]) -> Result<bool> {
        let first = ops.first().map_or(&[][..], |o| &o.key[..]);
        super::observed("embedded", "transact", first, async {
            txn::check_or(ops, otherwise)?;
            self.write_txn(txn::encode_or(ops, otherwise)).await
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
                // and emits a watch event for every send: drop what this stream already delivered
                // (see `Delivered`).
                let mut delivered = super::Delivered::default();
                loop {
                    tokio::select! {
                        biased;
                        ev = handle.receiver_mut().recv() => match ev {
                            Some(ev) => match convert(ev, prev_value) {
                                Converted::Event(e) if delivered.fresh(&e) => yield Ok(e),
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
