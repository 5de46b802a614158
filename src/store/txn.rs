//! Multi-key write transactions ([`Store::transact`]) and their wire form.
//!
//! A transaction is a list of [`TxnOp`]s: each names a key, what the key must hold
//! ([`Expect`]) and what to write (a value, or a delete). It applies as ONE Raft entry: either
//! every expectation holds and every write is applied, at one revision, or nothing is written.
//!
//! # Wire form
//! d-engine 0.2.4 has no multi-op command, so a transaction travels as a compare-and-swap of
//! the reserved key [`TXN_KEY`] whose expected value is [`TXN_MAGIC`] and whose new value is
//! the encoded op list. dcoord's state machine recognises it and applies the ops instead; a
//! state machine that does not (stock d-engine) sees a CAS of an absent key that expects a
//! value, refuses it and writes nothing. dcoord's patch to d-engine-core turns the entry into
//! one watch event per op (see `patches/`).
//!
//! Encoding (big-endian): `b'T'`, version `1`, op count `u32`; per op a flags byte (bits 0-1:
//! 0 any, 1 absent, 2 value; bit 2: writes a value, else deletes), `u32` key length and key,
//! then the expected value (`u32` length and bytes) if bit 1 is set, then the new value
//! (`u32` length and bytes) if bit 2 is set. The patch to d-engine-core decodes the same form.
//!
//! A transaction with an *otherwise* branch ([`Store::transact_or`]) is version `2`: the same
//! form, where bit 3 of an op's flags puts it in the otherwise branch (an unconditional op,
//! applied exactly when some op of the first branch does not hold). A state machine from
//! before version 2 refuses the bytes (applies nothing); a client learns whether the servers
//! apply version 2 with one empty version-2 transaction (which they answer `true`).

use std::collections::HashSet;

use bytes::Bytes;

use crate::error::{Error, Result, show};
use crate::keys;

/// The reserved key a transaction is sent as (never a user key: it starts with a NUL byte).
pub const TXN_KEY: &[u8] = b"\0dcoord/txn";
/// The expected value of a transaction's CAS: no stored key holds it, so a state machine that
/// does not know transactions refuses them.
pub const TXN_MAGIC: &[u8] = b"\0dcoord/txn/v1";
/// Most ops in one transaction.
pub const MAX_TXN_OPS: usize = 1024;

const TAG: u8 = b'T';
const VERSION: u8 = 1;
/// A transaction with an otherwise branch.
const VERSION_OR: u8 = 2;
const EXPECT_MASK: u8 = 0b11;
const WRITES: u8 = 0b100;
/// The op belongs to the otherwise branch (version 2 only).
const OTHERWISE: u8 = 0b1000;

/// Whether `e` is a store's answer that it has no transactions ([`Store::transact`]'s
/// default, or a cluster whose state machine does not apply them): nothing was sent.
///
/// [`Store::transact`]: crate::store::Store::transact
pub fn unsupported(e: &Error) -> bool {
    matches!(e, Error::Engine { op: "transact", .. })
}

/// What a key must hold for a transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Anything, or nothing.
    Any,
    /// Nothing: the key is absent.
    Absent,
    /// Exactly these bytes.
    Value(Bytes),
}

impl Expect {
    /// `None`: absent; `Some(v)`: exactly `v` (the convention of [`Store::compare_and_swap`]).
    pub fn from_option(expected: Option<&[u8]>) -> Self {
        match expected {
            None => Expect::Absent,
            Some(v) => Expect::Value(Bytes::copy_from_slice(v)),
        }
    }

    /// Whether `current` (the stored value, `None` when absent) meets this expectation.
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match (self, current) {
            (Expect::Any, _) | (Expect::Absent, None) => true,
            (Expect::Value(v), Some(c)) => v.as_ref() == c,
            _ => false,
        }
    }
}

/// One op of a transaction: if `key` holds `expect`, write `write` (`None`: delete the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOp {
    /// The key.
    pub key: Bytes,
    /// What the key must hold.
    pub expect: Expect,
    /// The new value; `None` deletes the key.
    pub write: Option<Bytes>,
}

impl TxnOp {
    /// Writes `value` whatever the key holds (a TTL it has is kept, as with [`Store::put`]).
    pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Any,
            write: Some(value.into()),
        }
    }

    /// Deletes the key whatever it holds.
    pub fn delete(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Any,
            write: None,
        }
    }

    /// Writes `new` if the key holds `expected` (`None`: if it is absent).
    pub fn cas(key: impl Into<Bytes>, expected: Option<&[u8]>, new: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            expect: Expect::from_option(expected),
            write: Some(new.into()),
        }
    }

    /// Deletes the key if it holds exactly `expected`.
    pub fn delete_if(key: impl Into<Bytes>, expected: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Value(expected.into()),
            write: None,
        }
    }

    /// The op's size on the wire.
    pub(crate) fn encoded_len(&self) -> usize {
        let expected = match &self.expect {
            Expect::Value(v) => Some(v.len()),
            _ => None,
        };
        op_len(
            self.key.len(),
            expected,
            self.write.as_ref().map(|v| v.len()),
        )
    }
}

/// The size on the wire of an op on a key of `key` bytes that expects a value of `expected`
/// bytes (`None`: any, or absent) and writes `write` bytes (`None`: a delete); for callers
/// that size an op before building it (its values can be large).
pub(crate) fn op_len(key: usize, expected: Option<usize>, write: Option<usize>) -> usize {
    1 + 4 + key + expected.map_or(0, |n| 4 + n) + write.map_or(0, |n| 4 + n)
}

/// Checks a transaction before anything is sent: 1..=[`MAX_TXN_OPS`] ops, valid keys and
/// values, no key twice, and an encoding within [`keys::MAX_VALUE_LEN`].
pub(crate) fn check(ops: &[TxnOp]) -> Result<()> {
    if ops.is_empty() {
        return Err(Error::InvalidArgument(
            "a transaction needs at least one op".into(),
        ));
    }
    if ops.len() > MAX_TXN_OPS {
        return Err(Error::InvalidArgument(format!(
            "a transaction of {} ops, over the limit of {MAX_TXN_OPS}",
            ops.len()
        )));
    }
    let mut seen = HashSet::with_capacity(ops.len());
    for op in ops {
        keys::validate_key(&op.key)?;
        if let Some(v) = &op.write {
            keys::validate_value(&op.key, v)?;
        }
        if !seen.insert(&op.key) {
            return Err(Error::InvalidArgument(format!(
                "key {:?} appears twice in one transaction",
                show(&op.key)
            )));
        }
    }
    let size = encoded_len(ops);
    if size > keys::MAX_VALUE_LEN {
        return Err(Error::ValueTooLarge {
            key: format!("a transaction of {} ops", ops.len()),
            size,
            limit: keys::MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks a transaction with an otherwise branch ([`Store::transact_or`]) before anything is
/// sent: each branch as [`check`] would (so neither is empty; a key may be in both), the otherwise branch
/// unconditional ([`Expect::Any`]), both within [`MAX_TXN_OPS`] and the encoding within
/// [`keys::MAX_VALUE_LEN`].
pub(crate) fn check_or(ops: &[TxnOp], otherwise: &[TxnOp]) -> Result<()> {
    check(ops)?;
    check(otherwise)?;
    if let Some(op) = otherwise.iter().find(|op| op.expect != Expect::Any) {
        return Err(Error::InvalidArgument(format!(
            "the otherwise branch of a transaction writes unconditionally, but its op on {:?} \
             has a condition",
            show(&op.key)
        )));
    }
    if ops.len() + otherwise.len() > MAX_TXN_OPS {
        return Err(Error::InvalidArgument(format!(
            "a transaction of {} ops, over the limit of {MAX_TXN_OPS}",
            ops.len() + otherwise.len()
        )));
    }
    let size = encoded_len(ops) + encoded_len(otherwise) - 6;
    if size > keys::MAX_VALUE_LEN {
        return Err(Error::ValueTooLarge {
            key: format!("a transaction of {} ops", ops.len() + otherwise.len()),
            size,
            limit: keys::MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// The encoded size of `ops`.
pub(crate) fn encoded_len(ops: &[TxnOp]) -> usize {
    6 + ops.iter().map(TxnOp::encoded_len).sum::<usize>()
}

/// The wire form of `ops` (see the module docs).
pub(crate) fn encode(ops: &[TxnOp]) -> Vec<u8> {
    encode_with(VERSION, ops, &[])
}

/// The wire form of `ops` with the otherwise branch `otherwise` (version 2; see the module
/// docs). Both empty: the probe of whether a store's servers apply version 2.
pub(crate) fn encode_or(ops: &[TxnOp], otherwise: &[TxnOp]) -> Vec<u8> {
    encode_with(VERSION_OR, ops, otherwise)
}

fn encode_with(version: u8, ops: &[TxnOp], otherwise: &[TxnOp]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(ops) + encoded_len(otherwise) - 6);
    out.extend_from_slice(&[TAG, version]);
    out.extend_from_slice(&((ops.len() + otherwise.len()) as u32).to_be_bytes());
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    let branches = ops
        .iter()
        .map(|op| (op, 0))
        .chain(otherwise.iter().map(|op| (op, OTHERWISE)));
    for (op, branch) in branches {
        let expect = match op.expect {
            Expect::Any => 0,
            Expect::Absent => 1,
            Expect::Value(_) => 2,
        };
        let writes = if op.write.is_some() { WRITES } else { 0 };
        out.push(expect | writes | branch);
        put(&mut out, &op.key);
        if let Expect::Value(v) = &op.expect {
            put(&mut out, v);
        }
        if let Some(v) = &op.write {
            put(&mut out, v);
        }
    }
    out
}

/// One decoded op, borrowing the encoded bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OpRef<'a> {
    pub key: &'a [u8],
    /// `None`: any; `Some(None)`: absent; `Some(Some(v))`: exactly `v`.
    pub expect: Option<Option<&'a [u8]>>,
    /// `None`: delete.
    pub write: Option<&'a [u8]>,
    /// In the otherwise branch: applied exactly when an op of the first branch does not hold.
    pub otherwise: bool,
}

impl OpRef<'_> {
    /// Whether `current` meets the op's expectation.
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match self.expect {
            None => true,
            Some(expected) => expected == current,
        }
    }
}

/// Decodes the wire form (either version); `None` if the bytes are not a transaction.
pub(crate) fn decode(mut b: &[u8]) -> Option<Vec<OpRef<'_>>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
        take(b, n)
    }
    let version = match take(&mut b, 2)? {
        [TAG, v @ (VERSION | VERSION_OR)] => *v,
        _ => return None,
    };
    // Version 1 ignores the bits it does not know (as it always did: replicas replaying old
    // entries must decide as the nodes that applied them first).
    let known = if version == VERSION_OR {
        EXPECT_MASK | WRITES | OTHERWISE
    } else {
        u8::MAX
    };
    let count = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
    if count > MAX_TXN_OPS {
        return None;
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = take(&mut b, 1)?[0];
        if flags & !known != 0 {
            return None;
        }
        let otherwise = version == VERSION_OR && flags & OTHERWISE != 0;
        if otherwise && flags & EXPECT_MASK != 0 {
            return None;
        }
        let key = bytes(&mut b)?;
        let expect = match flags & EXPECT_MASK {
            0 => None,
            1 => Some(None),
            2 => Some(Some(bytes(&mut b)?)),
            _ => return None,
        };
        let write = if flags & WRITES != 0 {
            Some(bytes(&mut b)?)
        } else {
            None
        };
        ops.push(OpRef {
            key,
            expect,
            write,
            otherwise,
        });
    }
    b.is_empty().then_some(ops)
}

#[cfg(doc)]
use super::Store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_and_decode_agree() {
        let ops = vec![
            TxnOp::put("a", "1"),
            TxnOp::delete("b"),
            TxnOp::cas("c", None, ""),
            TxnOp::cas("d", Some(b"old"), "new"),
            TxnOp::delete_if("e", "gone"),
        ];
        let wire = encode(&ops);
        assert_eq!(wire.len(), encoded_len(&ops));
        let back = decode(&wire).unwrap();
        let want = [
            OpRef {
                key: b"a",
                expect: None,
                write: Some(b"1"),
                otherwise: false,
            },
            OpRef {
                key: b"b",
                expect: None,
                write: None,
                otherwise: false,
            },
            OpRef {
                key: b"c",
                expect: Some(None),
                write: Some(b""),
                otherwise: false,
            },
            OpRef {
                key: b"d",
                expect: Some(Some(b"old")),
                write: Some(b"new"),
                otherwise: false,
            },
            OpRef {
                key: b"e",
                expect: Some(Some(b"gone")),
                write: None,
                otherwise: false,
            },
        ];
        assert_eq!(back, want);
        for (op, r) in ops.iter().zip(&back) {
            for current in [None, Some(&b"old"[..]), Some(b"gone"), Some(b"")] {
                assert_eq!(op.expect.holds(current), r.holds(current));
            }
        }
    }

    #[test]
    fn an_otherwise_branch_is_version_2_and_marks_its_ops() {
        let ops = [TxnOp::cas("a", Some(b"old"), "new"), TxnOp::delete("b")];
        let otherwise = [TxnOp::put("m", "1")];
        let wire = encode_or(&ops, &otherwise);
        assert_eq!(&wire[..2], b"T\x02");
        let back = decode(&wire).unwrap();
        let branches: Vec<(&[u8], bool)> = back.iter().map(|o| (o.key, o.otherwise)).collect();
        assert_eq!(
            branches,
            [(&b"a"[..], false), (&b"b"[..], false), (&b"m"[..], true)]
        );
        assert_eq!(back[2].write, Some(&b"1"[..]));
        // The probe: an empty version-2 transaction.
        assert_eq!(decode(&encode_or(&[], &[])), Some(Vec::new()));
        // Version 1 has no otherwise branch (it ignores the bit, as it always ignored unknown
        // bits); an otherwise op has no condition.
        let mut v1 = wire.clone();
        v1[1] = 1;
        assert!(decode(&v1).unwrap().iter().all(|op| !op.otherwise));
        let mut conditional = encode_or(&[], &[TxnOp::put("m", "1")]);
        conditional[6] |= 1;
        assert_eq!(decode(&conditional), None);
    }

    #[test]
    fn an_otherwise_branch_is_checked_before_anything_is_sent() {
        let ops = [TxnOp::cas("a", None, "1")];
        assert!(
            check_or(&ops, &[TxnOp::put("a", "2")]).is_ok(),
            "a key may be in both"
        );
        assert!(matches!(
            check_or(&ops, &[TxnOp::cas("m", None, "1")]),
            Err(Error::InvalidArgument(m)) if m.contains("unconditionally")
        ));
        assert!(matches!(
            check_or(&ops, &[]),
            Err(Error::InvalidArgument(_))
        ));
        let many: Vec<TxnOp> = (0..MAX_TXN_OPS)
            .map(|i| TxnOp::delete(format!("k{i}")))
            .collect();
        assert!(matches!(
            check_or(&ops, &many),
            Err(Error::InvalidArgument(m)) if m.contains("limit")
        ));
    }

    #[test]
    fn damaged_bytes_are_not_a_transaction() {
        let wire = encode(&[TxnOp::put("a", "1")]);
        for cut in 0..wire.len() {
            assert_eq!(decode(&wire[..cut]), None, "cut at {cut}");
        }
        let mut longer = wire.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        let mut other = wire;
        other[1] = 3;
        assert_eq!(decode(&other), None);
    }

    #[test]
    fn bad_transactions_are_refused_with_a_reason() {
        assert!(matches!(check(&[]), Err(Error::InvalidArgument(m)) if m.contains("at least one")));
        let twice = [TxnOp::put("a", "1"), TxnOp::delete("a")];
        assert!(matches!(check(&twice), Err(Error::InvalidArgument(m)) if m.contains("twice")));
        assert!(matches!(
            check(&[TxnOp::put("", "1")]),
            Err(Error::InvalidKey { .. })
        ));
        let big = vec![0u8; keys::MAX_VALUE_LEN / 2 + 16];
        let two = [TxnOp::put("a", big.clone()), TxnOp::put("b", big)];
        assert!(matches!(check(&two), Err(Error::ValueTooLarge { .. })));
        let many: Vec<TxnOp> = (0..=MAX_TXN_OPS)
            .map(|i| TxnOp::delete(format!("k{i}")))
            .collect();
        assert!(matches!(check(&many), Err(Error::InvalidArgument(m)) if m.contains("limit")));
    }
}
