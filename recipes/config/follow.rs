//! Following the store: each view of the mirror decoded, validated and applied in revision
//! order, never backwards.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::{ConfigEvent, Shared, Source, Status, decode};
use crate::reconcile::Snapshot;

/// What the follower last saw.
#[derive(Default)]
pub(super) struct State {
    bytes: Option<Bytes>,
    revision: u64,
    missing: bool,
}

impl State {
    pub(super) fn process<T: DeserializeOwned + Send + Sync + 'static>(
        &mut self,
        shared: &Shared<T>,
        view: &Snapshot,
    ) {
        // The stored form: the key's bytes, or the prefix's entries as one JSON object.
        let (found, revision) = match &shared.source {
            Source::Key(k) => match view.get(k.as_bytes()) {
                Some(e) => (Some(Ok(e.value.clone())), e.revision),
                None => (None, view.revision()),
            },
            Source::Prefix(p) => {
                if view.with_prefix(p.as_bytes()).next().is_none() {
                    (None, view.revision())
                } else {
                    let obj = decode::prefix_object(p.as_bytes(), view)
                        .map(|o| Bytes::from(serde_json::to_vec(&o).expect("JSON value")));
                    (Some(obj), view.revision())
                }
            }
        };
        if revision < self.revision {
            return; // never backwards
        }
        let Some(found) = found else {
            if !self.missing {
                self.missing = true;
                self.bytes = None;
                self.revision = revision;
                shared.emit(ConfigEvent::Missing { revision });
                match &shared.default {
                    Some(d) => shared.apply(d.clone(), 0),
                    None if shared.value.get().is_some() => {
                        shared.status.send_replace(Status::Missing { revision });
                    }
                    None => {}
                }
            }
            return;
        };
        self.missing = false;
        let decoded: std::result::Result<T, (String, String)> = match found {
            Ok(bytes) => {
                if self.bytes.as_ref() == Some(&bytes) {
                    return; // the same value again: nothing to announce
                }
                self.bytes = Some(bytes.clone());
                match &shared.source {
                    Source::Key(k) => shared.format.decode(&bytes).map_err(|e| (k.clone(), e)),
                    Source::Prefix(p) => {
                        serde_json::from_slice(&bytes).map_err(|e| (p.clone(), e.to_string()))
                    }
                }
            }
            Err((key, e)) => Err((key, e)),
        };
        self.revision = revision;
        match decoded.and_then(|v| {
            shared
                .check(&v)
                .map(|()| v)
                .map_err(|e| (shared.source.name().to_string(), e))
        }) {
            Ok(value) => shared.apply(Arc::new(value), revision),
            Err((key, error)) => {
                tracing::warn!(config = %shared.source.name(), %key, %error, "refusing a bad value");
                crate::metrics::count(
                    crate::metrics::CONFIG_REJECTIONS_TOTAL,
                    "config",
                    shared.source.name(),
                );
                shared.status.send_replace(Status::Rejected {
                    key: key.clone(),
                    error: error.clone(),
                    revision,
                });
                shared.emit(ConfigEvent::Rejected {
                    key,
                    error,
                    revision,
                });
            }
        }
    }
}

impl<T> Shared<T> {
    fn emit(&self, event: ConfigEvent<T>) {
        let _ = self.events.send(event);
    }

    fn apply(&self, new: Arc<T>, revision: u64) {
        let old = match self.value.get() {
            Some(tx) => Some(tx.send_replace(new.clone())),
            None => {
                let _ = self.value.set(watch::Sender::new(new.clone()));
                None
            }
        };
        self.status.send_replace(Status::Current { revision });
        crate::metrics::count(
            crate::metrics::CONFIG_APPLIED_TOTAL,
            "config",
            self.source.name(),
        );
        self.emit(ConfigEvent::Applied { old, new, revision });
    }
}

pub(super) async fn follow<T: DeserializeOwned + Send + Sync + 'static>(
    shared: Arc<Shared<T>>,
    mut rx: watch::Receiver<Snapshot>,
    mut state: State,
    debounce: Option<(Duration, Duration)>,
) {
    loop {
        // Re-processing a view already seen is a no-op (same bytes), so nothing between the
        // first read and this subscription can be missed.
        let view = rx.borrow_and_update().clone();
        if view.is_ready() {
            state.process(&shared, &view);
        }
        if rx.changed().await.is_err() {
            return;
        }
        if let Some((quiet, max)) = debounce {
            let until = tokio::time::Instant::now() + max;
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(quiet) => break,
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
    }
}
