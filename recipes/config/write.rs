//! The writers: [`ConfigWatch::update`] and [`ConfigWatch::publish`], validated before they
//! write, with compare-and-swap against the stored bytes.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ConfigWatch, Shared, Source};
use crate::error::{Error, Result};
use crate::store::{Cas, Consistency, Settled};

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> ConfigWatch<T> {
    /// Reads the stored value (or the default), applies `change`, validates, and writes it back
    /// with compare-and-swap; a concurrent write makes it re-read and re-apply (up to 100
    /// times). Returns the value written. Single-key sources only.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a prefix source, a value that fails validation or does
    /// not encode; [`Error::Decode`] if the stored value does not decode (fix it, or
    /// `publish` over it); [`Error::Ambiguous`] if a write's outcome could not be determined
    /// and the stored value is not ours (retrying could apply `change` twice); store errors.
    ///
    /// # Cancel safety
    /// If dropped, the change was written at most once.
    #[tracing::instrument(level = "debug", name = "config.update", skip_all, fields(config = %self.shared.source.name()), err(level = "debug", Display))]
    pub async fn update(&self, mut change: impl FnMut(&mut T)) -> Result<Arc<T>> {
        let key = self.single_key()?;
        for attempt in 1..=100 {
            let current = self
                .shared
                .store
                .get(key.as_bytes(), Consistency::Linearizable)
                .await?;
            let mut value: T = match &current {
                Some(bytes) => self.shared.decode(key, bytes)?,
                None => match &self.shared.default {
                    Some(d) => (**d).clone(),
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "config {key:?} is not configured and has no default to update"
                        )));
                    }
                },
            };
            change(&mut value);
            let new = self.shared.encode_checked(key, &value)?;
            if current.as_deref() == Some(&new[..]) {
                return Ok(Arc::new(value));
            }
            let sent = tokio::time::Instant::now();
            if self.shared.cas(key, current.as_deref(), &new).await? {
                return Ok(Arc::new(value));
            }
            crate::reconcile::after_collision(attempt, sent.elapsed()).await;
        }
        Err(Error::Unavailable {
            op: "config update",
            message: format!("{key:?}: 100 concurrent writes in a row beat this update"),
            source: None,
        })
    }

    /// Writes `value` (validated first) over whatever is stored, with compare-and-swap so it is
    /// never interleaved with a concurrent `update`. Single-key sources only.
    ///
    /// # Errors
    /// As [`ConfigWatch::update`], except that stored bytes that do not decode are simply
    /// replaced.
    ///
    /// # Cancel safety
    /// If dropped, the value was written or not; nothing half-written.
    #[tracing::instrument(level = "debug", name = "config.publish", skip_all, fields(config = %self.shared.source.name()), err(level = "debug", Display))]
    pub async fn publish(&self, value: &T) -> Result<()> {
        let key = self.single_key()?;
        let new = self.shared.encode_checked(key, value)?;
        let mut attempt = 0;
        loop {
            let current = self
                .shared
                .store
                .get(key.as_bytes(), Consistency::Linearizable)
                .await?;
            if current.as_deref() == Some(&new[..]) {
                return Ok(());
            }
            let sent = tokio::time::Instant::now();
            match self.shared.cas(key, current.as_deref(), &new).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    attempt += 1;
                    crate::reconcile::after_collision(attempt, sent.elapsed()).await;
                }
                // Publishing is idempotent: a re-read decides (the same bytes stored is done).
                Err(e) if e.is_ambiguous() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn single_key(&self) -> Result<&str> {
        match &self.shared.source {
            Source::Key(k) => Ok(k),
            Source::Prefix(p) => Err(Error::InvalidArgument(format!(
                "config prefix {p:?}: update/publish need a single-key source; write the entries with the store"
            ))),
        }
    }
}

impl<T: DeserializeOwned> Shared<T> {
    pub(super) fn decode(&self, key: &str, bytes: &[u8]) -> Result<T> {
        self.format.decode(bytes).map_err(|reason| Error::Decode {
            key: key.to_string(),
            reason,
        })
    }

    pub(super) fn check(&self, value: &T) -> std::result::Result<(), String> {
        match &self.validate {
            Some(v) => v(value),
            None => Ok(()),
        }
    }

    fn encode_checked(&self, key: &str, value: &T) -> Result<Vec<u8>>
    where
        T: Serialize,
    {
        self.check(value).map_err(|e| {
            Error::InvalidArgument(format!("config {key:?}: value fails validation: {e}"))
        })?;
        let bytes = self.format.encode(value).map_err(|e| {
            Error::InvalidArgument(format!("config {key:?}: value does not encode: {e}"))
        })?;
        crate::keys::validate_value(key.as_bytes(), &bytes)?;
        Ok(bytes)
    }

    /// CAS, settled by re-sending it ([`crate::store::Cas`]). Config values are the caller's
    /// bytes, not unique per write: if the key holds ours after an unknown outcome, another
    /// writer may have written the same bytes from the same value, and calling it ours would
    /// lose their change. So: applied → `true`; refused with no unknown outcome → `false` (the
    /// caller may try again); anything else → [`Error::Ambiguous`].
    ///
    /// The limit left (documented on the module): a request of ours still on its way while
    /// the key goes A → B → A can apply over the second A.
    async fn cas(&self, key: &str, current: Option<&[u8]>, new: &[u8]) -> Result<bool> {
        match Cas::new(&*self.store, key.as_bytes(), current, new)
            .not_unique()
            .settle()
            .await?
        {
            Settled::Applied => Ok(true),
            Settled::Rejected {
                maybe_applied: false,
                ..
            } => Ok(false),
            Settled::Rejected { .. } => Err(Error::Ambiguous {
                op: "compare_and_swap",
                key: key.to_string(),
                message: "an attempt's outcome is unknown and the stored value cannot tell \
                          (another writer may have written the same bytes)"
                    .into(),
                source: None,
            }),
        }
    }
}
