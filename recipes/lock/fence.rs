//! Fenced writes: a key written only by holders whose fencing token is not older than the one
//! stored with it.

use bytes::Bytes;

use crate::error::{Error, Result, show};
use crate::store::{Consistency, Store};

const MAGIC: &[u8; 4] = b"dcf1";
const HEADER: usize = MAGIC.len() + 8;

/// A value written with [`fenced_put`]: the token of the writer and the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// The fencing token the value was written with.
    pub token: u64,
    /// The data.
    pub value: Bytes,
}

impl Fenced {
    fn decode(key: &[u8], raw: &Bytes) -> Result<Fenced> {
        if raw.len() < HEADER || &raw[..MAGIC.len()] != MAGIC {
            return Err(Error::Decode {
                key: show(key),
                reason:
                    "not a fenced value (written without fenced_put?); refusing to overwrite it"
                        .into(),
            });
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&raw[MAGIC.len()..HEADER]);
        Ok(Fenced {
            token: u64::from_be_bytes(t),
            value: raw.slice(HEADER..),
        })
    }

    fn encode(token: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + value.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&token.to_be_bytes());
        out.extend_from_slice(value);
        out
    }
}

/// Writes `value` to `key` unless the key holds a value written with a newer token. Check and
/// write are one compare-and-swap, so a holder that lost its lock (paused, partitioned) cannot
/// overwrite what a later holder wrote.
///
/// The fence is per key: it rejects a stale writer only once a newer holder has written
/// *this* key (Kleppmann's fencing; the store only knows tokens it has seen).
///
/// # Errors
/// [`Error::Fenced`] if a newer token has written the key; [`Error::Decode`] if the key holds
/// something that is not a fenced value; the store's errors. Nothing is written on error
/// (an [`Error::Ambiguous`] from the store is resolved by re-reading first).
///
/// # Cancel safety
/// If dropped, the write may or may not have happened; whether it did, the fence held.
pub async fn fenced_put(store: &dyn Store, key: &[u8], token: u64, value: &[u8]) -> Result<()> {
    let new = Fenced::encode(token, value);
    crate::store::check_write(key, &new)?;
    let mut current = store.get(key, Consistency::Linearizable).await?;
    loop {
        if let Some(raw) = &current {
            let stored = Fenced::decode(key, raw)?;
            if stored.token > token {
                return Err(Error::Fenced {
                    key: show(key),
                    token,
                    stored: stored.token,
                });
            }
        }
        match store.compare_and_swap(key, current.as_deref(), &new).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if e.is_ambiguous() => {}
            Err(e) => return Err(e),
        }
        current = store.get(key, Consistency::Linearizable).await?;
        if current.as_deref() == Some(&new[..]) {
            // Our ambiguous write landed (or an identical one did).
            return Ok(());
        }
    }
}

/// Reads a value written with [`fenced_put`].
///
/// # Errors
/// [`Error::Decode`] if the key holds something else; the store's errors.
///
/// # Cancel safety
/// Cancel-safe (a read).
pub async fn fenced_get(store: &dyn Store, key: &[u8]) -> Result<Option<Fenced>> {
    match store.get(key, Consistency::Linearizable).await? {
        Some(raw) => Fenced::decode(key, &raw).map(Some),
        None => Ok(None),
    }
}
