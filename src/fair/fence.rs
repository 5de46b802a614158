//! Fenced writes: a key written only by holders whose fencing token is not older than the one
//! stored with it.

use bytes::Bytes;

use crate::error::{Error, Result, show};
use crate::store::{Cas, Consistency, Settled, Store};

/// The first format: magic, token. Still read; no longer written.
const MAGIC_V1: &[u8; 4] = b"dcf1";
/// Magic, token, write id: the write id makes every fenced write's bytes unique, which is what
/// lets an unknown outcome be settled by re-sending the CAS ([`crate::store::Cas`]). Without
/// it, a holder writing `x`, `y`, `x` would produce the first `x` again, and a request for
/// `x -> y` still on its way could apply over the second.
const MAGIC: &[u8; 4] = b"dcf2";

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
        let header = match raw.get(..4) {
            Some(m) if m == MAGIC_V1 => 4 + 8,
            Some(m) if m == MAGIC => 4 + 8 + 8,
            _ => 0,
        };
        if header == 0 || raw.len() < header {
            return Err(Error::Decode {
                key: show(key),
                reason:
                    "not a fenced value (written without fenced_put?); refusing to overwrite it"
                        .into(),
            });
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&raw[4..12]);
        Ok(Fenced {
            token: u64::from_be_bytes(t),
            value: raw.slice(header..),
        })
    }

    fn encode(token: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 + 8 + value.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&token.to_be_bytes());
        out.extend_from_slice(&fastrand::u64(..).to_be_bytes());
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
/// something that is not a fenced value; the store's errors. Nothing is written on error,
/// except [`Error::Ambiguous`]: an unknown outcome is settled by re-sending the write, and
/// this is returned only when that cannot decide (the key changed meanwhile).
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
        match Cas::new(store, key, current.as_deref(), &new)
            .settle()
            .await?
        {
            Settled::Applied => return Ok(()),
            Settled::Rejected {
                current: now,
                maybe_applied: false,
            } => current = now,
            // Ours may have applied and been overwritten since: neither "written" nor
            // "nothing written" can be said.
            Settled::Rejected { .. } => {
                return Err(Error::Ambiguous {
                    op: "fenced_put",
                    key: show(key),
                    message: "an attempt's outcome is unknown and the key has changed since".into(),
                    source: None,
                });
            }
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
