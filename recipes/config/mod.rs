//! `config::ConfigWatch<T>`: typed configuration that reloads live, never goes backwards, and
//! keeps the last good value when someone writes a bad one.
//!
//! A `ConfigWatch` follows one key (JSON, or TOML for keys ending in `.toml`) or a key prefix
//! (each key one entry: `<prefix>a/b = 1` reads as `{"a": {"b": 1}}`), decodes it into `T` with
//! serde, runs an optional validation, and publishes the result as a
//! `tokio::sync::watch::Receiver<Arc<T>>` plus a stream of [`ConfigEvent`]s. It is built on
//! [`crate::reconcile::Mirror`] (shared by every `ConfigWatch` of the same store and source in
//! the process), so it survives lost watch events, cancelled streams and leader changes, and
//! converges to what the store holds.
//!
//! # Guarantees
//! - Never backwards: a value is applied only if its revision is not older than the one in
//!   force; a relist never brings back an older value.
//! - A value that does not decode or validate is never applied: a [`ConfigEvent::Rejected`]
//!   names the key and the error and the last good value stays in force. Once the key is fixed,
//!   the fixed value applies.
//! - The same bytes written again are not announced again.
//! - Writers ([`ConfigWatch::update`], [`ConfigWatch::publish`]) compare-and-swap against the
//!   stored bytes: concurrent `update`s never lose one another's changes.
//!
//! # NOT guaranteed
//! - Every intermediate value: with debounce on, or when d-engine drops events, only the latest
//!   value is seen (within one resync period at worst).
//! - Atomic changes across keys of a prefix: a multi-key edit may be seen half-applied (each
//!   key is written separately; d-engine has no multi-key transaction). Use one key for
//!   settings that must change together.
//! - That an `update` whose write had an unknown outcome ([`Error::Ambiguous`]) can tell
//!   whether it applied: a stored value is the caller's bytes, which another writer can
//!   produce too, so it returns the error rather than guess (and never applies `change` twice).
//!   And a write request still on its way to the leader while the key goes A → B → A can
//!   apply over the second A (the store compares bytes; nothing in a config value is unique
//!   per write).
//!
//! # Failure modes
//! A missing key is the configured default, or [`Status::NotConfigured`] until it appears
//! ([`ConfigWatch::wait_configured`] waits). A deleted key falls back to the default, or keeps
//! the last good value with [`Status::Missing`]. An unreachable store only delays updates.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use std::sync::Arc;
//! use dcoord::config::{ConfigOptions, ConfigWatch, Source};
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! struct Flags { dark_mode: bool, max_items: u32 }
//!
//! let store: Arc<dyn dcoord::store::Store> = Arc::new(dcoord::testing::MemStore::new());
//! let options = ConfigOptions::default()
//!     .default_value(Flags { dark_mode: false, max_items: 10 })
//!     .validate(|f: &Flags| if f.max_items == 0 { Err("max_items must be > 0".into()) } else { Ok(()) });
//! let flags = ConfigWatch::<Flags>::open(store, Source::key("/app/flags.json"), options).await?;
//! let mut rx = flags.wait_configured().await?;
//! assert_eq!(rx.borrow().max_items, 10);
//!
//! flags.update(|f| f.max_items = 50).await?;
//! rx.wait_for(|f| f.max_items == 50).await.unwrap();
//! assert!(flags.update(|f| f.max_items = 0).await.is_err(), "validated before writing");
//! # Ok(()) }
//! ```

mod decode;
mod follow;
mod write;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, broadcast, watch};

pub use decode::Format;
use follow::{State, follow};

use crate::error::{Error, Result};
use crate::reconcile::{Mirror, MirrorOptions, WatcherOptions};
use crate::store::{Store, WatchTarget};

/// Where a configuration lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One key holding the whole value.
    Key(String),
    /// Every key under a '/'-bounded prefix, one entry each.
    Prefix(String),
}

impl Source {
    /// One key.
    pub fn key(key: impl Into<String>) -> Source {
        Source::Key(key.into())
    }

    /// A '/'-bounded prefix.
    pub fn prefix(prefix: impl Into<String>) -> Source {
        Source::Prefix(prefix.into())
    }

    fn target(&self) -> WatchTarget {
        match self {
            Source::Key(k) => WatchTarget::key(k.clone().into_bytes()),
            Source::Prefix(p) => WatchTarget::prefix(p.clone().into_bytes()),
        }
    }

    fn name(&self) -> &str {
        match self {
            Source::Key(k) | Source::Prefix(k) => k,
        }
    }
}

type Validator<T> = Arc<dyn Fn(&T) -> std::result::Result<(), String> + Send + Sync>;

/// Options of a [`ConfigWatch`].
pub struct ConfigOptions<T> {
    default: Option<Arc<T>>,
    validate: Option<Validator<T>>,
    format: Option<Format>,
    debounce: Option<(Duration, Duration)>,
    mirror: MirrorOptions,
    events: usize,
    shared: bool,
}

impl<T> Default for ConfigOptions<T> {
    fn default() -> Self {
        ConfigOptions {
            default: None,
            validate: None,
            format: None,
            debounce: None,
            mirror: MirrorOptions::default(),
            events: 256,
            shared: true,
        }
    }
}

impl<T> fmt::Debug for ConfigOptions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigOptions")
            .field("default", &self.default.is_some())
            .field("validate", &self.validate.is_some())
            .field("format", &self.format)
            .field("debounce", &self.debounce)
            .finish()
    }
}

impl<T> ConfigOptions<T> {
    /// The value in force while the key is missing (and after it is deleted).
    #[must_use]
    pub fn default_value(mut self, value: T) -> Self {
        self.default = Some(Arc::new(value));
        self
    }

    /// A check every value must pass before it is applied (and before `update` / `publish`
    /// write it). The error text is reported in [`ConfigEvent::Rejected`].
    pub fn validate(
        mut self,
        check: impl Fn(&T) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validate = Some(Arc::new(check));
        self
    }

    /// The encoding of a single-key source. Default: TOML for keys ending in `.toml`, else
    /// JSON. (Prefix entries are always JSON values; a value that is not JSON is a string.)
    #[must_use]
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }

    /// Turn a burst of writes into one reload: apply once no change has come for `quiet`, or
    /// at the latest `max` after the first change (consul-template's `wait`).
    #[must_use]
    pub fn debounce(mut self, quiet: Duration, max: Duration) -> Self {
        self.debounce = Some((quiet, max.max(quiet)));
        self
    }

    /// Share one watch with every other `ConfigWatch` of the same store and source in this
    /// process (default `true`). `false` gives this one its own watch stream.
    #[must_use]
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Options of the underlying watcher (resync period, backoff).
    #[must_use]
    pub fn watcher(mut self, options: WatcherOptions) -> Self {
        self.mirror = self.mirror.watcher(options);
        self
    }
}

/// What happened to a configuration.
#[derive(Debug)]
pub enum ConfigEvent<T> {
    /// A new value is in force.
    Applied {
        /// The value before (`None`: nothing was in force).
        old: Option<Arc<T>>,
        /// The value now.
        new: Arc<T>,
        /// The revision it was written at (0 for the default).
        revision: u64,
    },
    /// A stored value was refused; the previous value stays in force.
    Rejected {
        /// The key whose value was refused.
        key: String,
        /// Why (decode or validation error).
        error: String,
        /// The revision of the refused value.
        revision: u64,
    },
    /// The key is gone (or the prefix empty). The default is in force if there is one (an
    /// `Applied` event follows), else the last good value stays.
    Missing {
        /// The revision at which it was seen missing.
        revision: u64,
    },
}

impl<T> Clone for ConfigEvent<T> {
    fn clone(&self) -> Self {
        match self {
            ConfigEvent::Applied { old, new, revision } => ConfigEvent::Applied {
                old: old.clone(),
                new: new.clone(),
                revision: *revision,
            },
            ConfigEvent::Rejected {
                key,
                error,
                revision,
            } => ConfigEvent::Rejected {
                key: key.clone(),
                error: error.clone(),
                revision: *revision,
            },
            ConfigEvent::Missing { revision } => ConfigEvent::Missing {
                revision: *revision,
            },
        }
    }
}

/// Where a [`ConfigWatch`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Nothing stored yet and no default: waiting.
    NotConfigured,
    /// The value of `revision` is in force (0: the default).
    Current {
        /// Its revision.
        revision: u64,
    },
    /// The latest stored value was refused; the previous good value (if any) is in force.
    Rejected {
        /// The key.
        key: String,
        /// Why.
        error: String,
        /// The refused value's revision.
        revision: u64,
    },
    /// The key is gone and there is no default; the last good value is in force.
    Missing {
        /// When it was seen missing.
        revision: u64,
    },
}

struct Shared<T> {
    source: Source,
    format: Format,
    default: Option<Arc<T>>,
    validate: Option<Validator<T>>,
    value: OnceCell<watch::Sender<Arc<T>>>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<ConfigEvent<T>>,
    store: Arc<dyn Store>,
}

/// A live, typed configuration value. See the [module docs](self).
pub struct ConfigWatch<T> {
    shared: Arc<Shared<T>>,
    mirror: Arc<Mirror>,
    task: tokio::task::JoinHandle<()>,
}

impl<T> fmt::Debug for ConfigWatch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("source", &self.shared.source)
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

impl<T> Drop for ConfigWatch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> ConfigWatch<T> {
    /// Starts following `source` and returns once the store has been read once (the value,
    /// the default, or [`Status::NotConfigured`] is then in place).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] / [`Error::InvalidPrefix`] for a bad source (nothing is watched);
    /// [`Error::WatchEnded`] if the store stops before the first read.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future stops the watch.
    pub async fn open(
        store: Arc<dyn Store>,
        source: Source,
        options: ConfigOptions<T>,
    ) -> Result<ConfigWatch<T>> {
        let target = source.target();
        target.validate()?;
        let format = match options.format {
            Some(format) => format,
            None => Format::checked_for_key(source.name())?,
        };
        let mirror = if options.shared {
            Mirror::shared(store.clone(), target, options.mirror.clone())
        } else {
            Arc::new(Mirror::start(store.clone(), target, options.mirror.clone()))
        };
        let shared = Arc::new(Shared {
            source,
            format,
            default: options.default.clone(),
            validate: options.validate.clone(),
            value: OnceCell::new(),
            status: watch::Sender::new(Status::NotConfigured),
            events: broadcast::Sender::new(options.events.max(1)),
            store,
        });
        let view = mirror.wait_ready().await?;
        let mut state = State::default();
        state.process(&shared, &view);
        let task = tokio::spawn(follow(
            shared.clone(),
            mirror.subscribe(),
            state,
            options.debounce,
        ));
        Ok(ConfigWatch {
            shared,
            mirror,
            task,
        })
    }

    /// The value in force, if any.
    pub fn current(&self) -> Option<Arc<T>> {
        self.shared.value.get().map(|tx| tx.borrow().clone())
    }

    /// Where things stand (value in force, refused value, missing key).
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// A receiver of the value in force, once there is one (at once if the key exists or a
    /// default was given).
    ///
    /// # Errors
    /// [`Error::WatchEnded`] if the watch stopped for good (a stopped engine) first.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only observes.
    pub async fn wait_configured(&self) -> Result<watch::Receiver<Arc<T>>> {
        let mut status = self.shared.status.subscribe();
        loop {
            if let Some(tx) = self.shared.value.get() {
                return Ok(tx.subscribe());
            }
            if let Some(why) = self.mirror.closed_reason() {
                return Err(Error::WatchEnded {
                    target: self.shared.source.name().to_string(),
                    reason: why,
                });
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { return Err(Error::Stopped) },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// A receiver of the value in force, if there is one now.
    pub fn receiver(&self) -> Option<watch::Receiver<Arc<T>>> {
        self.shared.value.get().map(|tx| tx.subscribe())
    }

    /// Every event from now on. A subscriber that falls more than 256 events behind gets one
    /// [`Error::Lagged`] and continues; the value channel never lags.
    pub fn events(&self) -> impl Stream<Item = Result<ConfigEvent<T>>> + Send + 'static {
        let rx = self.shared.events.subscribe();
        let target = self.shared.source.name().to_string();
        futures::stream::unfold((rx, target), |(mut rx, target)| async move {
            match rx.recv().await {
                Ok(e) => Some((Ok(e), (rx, target))),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    let e = Error::Lagged {
                        target: target.clone(),
                        skipped,
                    };
                    Some((Err(e), (rx, target)))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    /// Counters of the underlying watch (relists, events), shared with other watchers of the
    /// same source in this process.
    pub fn watch_stats(&self) -> crate::reconcile::WatcherStats {
        self.mirror.stats()
    }
}
