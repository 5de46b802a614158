//! The state digest ([`super::RedbStateMachine::digests`]): 64-bit FNV-1a and the digest history.

use d_engine_core::Error;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::KV;
use super::util::Ctx;

/// 64-bit FNV-1a over length-prefixed parts (so ("ab","c") and ("a","bc") differ).
pub(super) struct Fnv(pub(super) u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(super) fn write(&mut self, part: &[u8]) {
        for b in (part.len() as u64).to_be_bytes().iter().chain(part) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

pub(super) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = Fnv::default();
    parts.iter().for_each(|p| h.write(p));
    h.0
}

/// How many (index, digest) pairs a state machine remembers.
pub const DIGEST_HISTORY: usize = 4096;

/// The digest of the state (XOR of [`pair_hash`] over every key) and its value after each of
/// the last [`DIGEST_HISTORY`] applied entries. Kept in memory: rebuilt from the table at open
/// and after an install.
pub(super) struct Digests {
    current: u64,
    pub(super) history: std::collections::VecDeque<(u64, u64)>,
}

impl Digests {
    pub(super) fn new(applied: u64, digest: u64) -> Self {
        let mut history = std::collections::VecDeque::with_capacity(DIGEST_HISTORY);
        history.push_back((applied, digest));
        Self {
            current: digest,
            history,
        }
    }

    pub(super) fn push(&mut self, index: u64, delta: u64) {
        self.current ^= delta;
        if self.history.len() == DIGEST_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((index, self.current));
    }
}

/// The hash of one (key, value) pair in the state digest.
pub(super) fn pair_hash(key: &[u8], value: &[u8]) -> u64 {
    fnv1a(&[key, value])
}

/// XOR of [`pair_hash`] over every key of `db`.
pub(super) fn state_xor(db: &Database) -> Result<u64, Error> {
    let txn = db.begin_read().ctx("begin_read")?;
    let kv = txn.open_table(KV).ctx("open kv")?;
    let mut x = 0;
    for item in kv.iter().ctx("iterate kv")? {
        let (k, v) = item.ctx("iterate kv")?;
        x ^= pair_hash(k.value(), v.value());
    }
    Ok(x)
}
