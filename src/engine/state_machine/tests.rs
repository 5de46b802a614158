use std::collections::BTreeMap;

use d_engine_core::{ApplyEntry, Command, StateMachine};
use proptest::prelude::*;

use super::*;

fn open(dir: &Path) -> RedbStateMachine {
    RedbStateMachine::open_blocking(dir.to_path_buf()).unwrap()
}

fn put(index: u64, key: &str, value: &str) -> ApplyEntry {
    entry(
        index,
        1,
        Command::Insert {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ttl_secs: None,
        },
    )
}

fn cas(index: u64, key: &str, expected: Option<&str>, value: &str) -> ApplyEntry {
    entry(
        index,
        1,
        Command::CompareAndSwap {
            key: Bytes::copy_from_slice(key.as_bytes()),
            expected: expected.map(|e| Bytes::copy_from_slice(e.as_bytes())),
            value: Bytes::copy_from_slice(value.as_bytes()),
        },
    )
}

fn entry(index: u64, term: u64, command: Command) -> ApplyEntry {
    ApplyEntry {
        index,
        term,
        command,
    }
}

fn apply(sm: &RedbStateMachine, chunk: &[ApplyEntry]) -> Result<Vec<bool>, Error> {
    Ok(sm
        .inner
        .apply(chunk)?
        .into_iter()
        .map(|r| r.succeeded)
        .collect())
}

fn value(sm: &RedbStateMachine, key: &str) -> Option<String> {
    sm.get(key.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

#[test]
fn a_re_sent_chunk_is_not_applied_again_and_keeps_its_first_results() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    let first = [
        put(1, "a", "1"),
        cas(2, "a", Some("1"), "2"),
        cas(3, "a", Some("1"), "3"),
    ];
    assert_eq!(apply(&sm, &first).unwrap(), [true, true, false]);
    // d-engine's commit handler hands overlapping ranges: 2..=3 again, then 4.
    let resent = [
        cas(2, "a", Some("1"), "2"),
        cas(3, "a", Some("1"), "3"),
        cas(4, "a", Some("2"), "4"),
    ];
    assert_eq!(apply(&sm, &resent).unwrap(), [true, false, true]);
    assert_eq!(value(&sm, "a").as_deref(), Some("4"));
    assert_eq!(sm.last_applied().index, 4);
    // Across a restart, too.
    sm.stop().unwrap();
    drop(sm);
    let sm = open(dir.path());
    assert_eq!(apply(&sm, &first[1..]).unwrap(), [true, false]);
    assert_eq!(value(&sm, "a").as_deref(), Some("4"));
}

#[test]
fn a_gap_is_refused_with_the_missing_indexes_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    apply(&sm, &[put(1, "a", "1"), put(2, "a", "2")]).unwrap();
    let e = apply(&sm, &[put(5, "a", "5"), put(6, "b", "6")]).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("entries 3..=4 are missing"), "{text}");
    assert!(sm.failure().borrow().as_deref().unwrap().contains("3..=4"));
    assert_eq!(value(&sm, "a").as_deref(), Some("2"));
    assert_eq!(value(&sm, "b"), None);
    // It stays stopped: even a contiguous chunk is refused now.
    assert!(apply(&sm, &[put(3, "a", "3")]).is_err());

    let sm = open(tempfile::tempdir().unwrap().path());
    let e = apply(&sm, &[put(1, "a", "1"), put(3, "a", "3")]).unwrap_err();
    assert!(e.to_string().contains("entries 2..=2 are missing"), "{e}");
    let sm = open(tempfile::tempdir().unwrap().path());
    apply(&sm, &[put(1, "a", "1"), put(2, "a", "2")]).unwrap();
    let e = apply(&sm, &[put(3, "a", "1"), put(1, "a", "3")]).unwrap_err();
    assert!(e.to_string().contains("unordered"), "{e}");
}

#[test]
fn a_re_sent_entry_with_another_term_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    apply(&sm, &[put(1, "a", "1"), entry(2, 3, Command::Noop)]).unwrap();
    let e = apply(&sm, &[entry(2, 2, Command::Noop)]).unwrap_err();
    assert!(e.to_string().contains("diverged"), "{e}");
    assert_eq!(sm.entry_term(1), Some(1));
    assert_eq!(sm.entry_term(2), Some(3));
    assert_eq!(sm.entry_term(3), None);
}

#[test]
fn sync_makes_every_applied_chunk_durable() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    for i in 1..=50 {
        apply(&sm, &[put(i, &format!("k{i}"), "v")]).unwrap();
    }
    sm.sync().unwrap();
    // The file as a crash right now would leave it.
    let copy = tempfile::tempdir().unwrap();
    fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
    let crashed = open(copy.path());
    assert_eq!(crashed.last_applied().index, 50);
    assert_eq!(value(&crashed, "k50").as_deref(), Some("v"));
}

#[test]
fn empty_values_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    apply(&sm, &[put(1, "e", "")]).unwrap();
    assert_eq!(value(&sm, "e").as_deref(), Some(""));
    assert_eq!(apply(&sm, &[cas(2, "e", Some(""), "x")]).unwrap(), [true]);
}

fn ttl_put(index: u64, key: &str, secs: u64) -> ApplyEntry {
    entry(
        index,
        1,
        Command::Insert {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"v"),
            ttl_secs: Some(secs),
        },
    )
}

fn tick(index: u64, ms: u64) -> ApplyEntry {
    entry(
        index,
        1,
        Command::Insert {
            key: Bytes::from_static(TICK_KEY),
            value: Bytes::copy_from_slice(&ms.to_be_bytes()),
            ttl_secs: None,
        },
    )
}

#[test]
fn ttl_counts_down_from_the_first_tick_after_the_write_and_expires_on_a_tick() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    assert!(!sm.has_ttl_keys());
    apply(
        &sm,
        &[ttl_put(1, "t", 2), ttl_put(2, "d", 2), put(3, "p", "x")],
    )
    .unwrap();
    assert!(sm.has_ttl_keys());
    // A clock that was stale (the cluster was down) starts no countdown before the write.
    apply(&sm, &[tick(4, 10_000)]).unwrap();
    apply(
        &sm,
        &[
            tick(5, 11_999),
            entry(
                6,
                1,
                Command::Delete {
                    key: Bytes::from_static(b"d"),
                },
            ),
        ],
    )
    .unwrap();
    assert_eq!(value(&sm, "t").as_deref(), Some("v"));
    // A plain put keeps the TTL; the tick key itself is never stored.
    apply(&sm, &[put(7, "t", "w"), tick(8, 5_000)]).unwrap();
    assert_eq!(value(&sm, "t").as_deref(), Some("w"));
    assert_eq!(sm.get(TICK_KEY).unwrap(), None);
    apply(&sm, &[tick(9, 12_000)]).unwrap();
    assert_eq!(value(&sm, "t"), None);
    assert_eq!(value(&sm, "p").as_deref(), Some("x"));
    assert!(!sm.has_ttl_keys(), "the deleted key's TTL went with it");
    // Zero means no TTL (d-engine's rule), never an error.
    apply(&sm, &[ttl_put(10, "z", 0), tick(11, 99_000)]).unwrap();
    assert_eq!(value(&sm, "z").as_deref(), Some("v"));
}

#[test]
fn a_snapshot_carries_state_applied_index_ttls_and_cas_results() {
    let a = tempfile::tempdir().unwrap();
    let sm = open(a.path());
    apply(
        &sm,
        &[
            put(1, "a", "1"),
            cas(2, "a", Some("0"), "x"),
            ttl_put(3, "t", 5),
            put(4, "b", ""),
            tick(5, 1_000),
        ],
    )
    .unwrap();
    let label = LogId { index: 2, term: 1 };
    let snap = tempfile::tempdir().unwrap();
    let checksum = sm.inner.generate(snap.path(), label).unwrap();
    let meta = SnapshotMetadata {
        last_included: Some(label),
        checksum,
    };
    assert_eq!(sm.snapshot_metadata(), Some(meta.clone()));

    let b = tempfile::tempdir().unwrap();
    let other = open(b.path());
    other.inner.install(&meta, snap.path()).unwrap();
    assert_eq!(
        other.last_applied().index,
        5,
        "the dump's real applied index"
    );
    assert_eq!(value(&other, "a").as_deref(), Some("1"));
    assert_eq!(value(&other, "b").as_deref(), Some(""));
    // d-engine resends from below the snapshot: skipped, with the first CAS result.
    assert_eq!(
        apply(&other, &[cas(2, "a", Some("0"), "x"), put(6, "c", "6")]).unwrap(),
        [false, true]
    );
    apply(&other, &[tick(7, 6_000)]).unwrap();
    assert_eq!(value(&other, "t"), None, "the running countdown came along");
    drop(other);
    let other = open(b.path());
    assert_eq!(
        other.snapshot_metadata(),
        Some(meta.clone()),
        "metadata persisted"
    );
    assert_eq!(other.last_applied().index, 7);

    // A corrupt dump is refused and the live state is untouched.
    let dump = snap.path().join(SNAPSHOT_FILE);
    let mut bytes = fs::read(&dump).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x55;
    fs::write(&dump, &bytes).unwrap();
    let c = tempfile::tempdir().unwrap();
    let fresh = open(c.path());
    apply(&fresh, &[put(1, "keep", "me")]).unwrap();
    assert!(fresh.inner.install(&meta, snap.path()).is_err());
    assert_eq!(value(&fresh, "keep").as_deref(), Some("me"));
    assert_eq!(fresh.last_applied().index, 1);
}

#[derive(Debug, Clone)]
enum Op {
    /// Apply this many new entries.
    Apply(Vec<ModelCommand>),
    /// Re-send the last `back` applied entries plus `fresh` new ones.
    Resend { back: u64, fresh: Vec<ModelCommand> },
    /// Drop the state machine and reopen it, after a sync or not (a crash).
    Restart { synced: bool },
}

#[derive(Debug, Clone)]
enum ModelCommand {
    Put(u8, u8),
    Delete(u8),
    Cas(u8, Option<u8>, u8),
    Noop,
}

fn command(c: &ModelCommand) -> Command {
    let b = |n: u8| Bytes::copy_from_slice(&[b'a' + n]);
    match c {
        ModelCommand::Put(k, v) => Command::Insert {
            key: b(*k),
            value: b(*v),
            ttl_secs: None,
        },
        ModelCommand::Delete(k) => Command::Delete { key: b(*k) },
        ModelCommand::Cas(k, e, v) => Command::CompareAndSwap {
            key: b(*k),
            expected: e.map(b),
            value: b(*v),
        },
        ModelCommand::Noop => Command::Noop,
    }
}

fn model_command() -> impl Strategy<Value = ModelCommand> {
    prop_oneof![
        (0..3u8, 0..3u8).prop_map(|(k, v)| ModelCommand::Put(k, v)),
        (0..3u8).prop_map(ModelCommand::Delete),
        (0..3u8, proptest::option::of(0..3u8), 0..3u8)
            .prop_map(|(k, e, v)| ModelCommand::Cas(k, e, v)),
        Just(ModelCommand::Noop),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(model_command(), 1..8).prop_map(Op::Apply),
        3 => (1..10u64, proptest::collection::vec(model_command(), 0..4))
            .prop_map(|(back, fresh)| Op::Resend { back, fresh }),
        1 => any::<bool>().prop_map(|synced| Op::Restart { synced }),
    ]
}

/// The model: the log of commands, each entry's first result, and the state after each
/// index.
#[derive(Default)]
struct Model {
    log: Vec<ModelCommand>,
    results: Vec<bool>,
    states: Vec<BTreeMap<u8, u8>>,
}

impl Model {
    fn state(&self, index: u64) -> BTreeMap<u8, u8> {
        match index {
            0 => BTreeMap::new(),
            i => self.states[i as usize - 1].clone(),
        }
    }

    fn push(&mut self, c: ModelCommand) {
        let mut s = self.state(self.log.len() as u64);
        let ok = match &c {
            ModelCommand::Put(k, v) => {
                s.insert(*k, *v);
                true
            }
            ModelCommand::Delete(k) => {
                s.remove(k);
                true
            }
            ModelCommand::Cas(k, e, v) => {
                let ok = s.get(k) == e.as_ref();
                if ok {
                    s.insert(*k, *v);
                }
                ok
            }
            ModelCommand::Noop => true,
        };
        self.log.push(c);
        self.results.push(ok);
        self.states.push(s);
    }

    fn entry(&self, index: u64) -> ApplyEntry {
        entry(index, 1, command(&self.log[index as usize - 1]))
    }
}

fn sm_state(sm: &RedbStateMachine) -> BTreeMap<u8, u8> {
    sm.scan_prefix(b"")
        .unwrap()
        .entries
        .iter()
        .map(|(k, v)| (k[0] - b'a', v[0] - b'a'))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random chunks, re-sends and restarts (clean or crash) against a model: every result
    /// is the model's first result, and the state always equals the model's state at the
    /// state machine's applied index, which never falls below the last synced index.
    #[test]
    fn matches_the_model_through_resends_and_restarts(ops in proptest::collection::vec(op(), 1..40)) {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        let mut sm = open(dirs[0].path());
        let mut model = Model::default();
        let mut synced = 0u64;
        for op in ops {
            let applied = sm.last_applied().index;
            let (from, fresh) = match op {
                Op::Apply(cs) => (applied + 1, cs),
                Op::Resend { back, fresh } => ((applied + 1).saturating_sub(back).max(1), fresh),
                Op::Restart { synced: clean } => {
                    if clean {
                        sm.stop().unwrap();
                        synced = applied;
                        drop(sm);
                    } else {
                        // A crash: the file as it is on disk now (non-durable commits are
                        // not in its header yet), opened without a clean shutdown.
                        let copy = tempfile::tempdir().unwrap();
                        fs::copy(sm.inner.dir.join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
                        drop(sm);
                        dirs.push(copy);
                    }
                    sm = open(dirs.last().unwrap().path());
                    let now = sm.last_applied().index;
                    prop_assert!(now >= synced && now <= applied, "applied {now} after restart, synced {synced}, was {applied}");
                    prop_assert_eq!(sm_state(&sm), model.state(now));
                    continue;
                }
            };
            // Entries between the state machine's index and the model's log end were lost
            // in a crash: Raft replays them from its log.
            let known = model.log.len() as u64;
            for c in fresh {
                model.push(c);
            }
            let to = model.log.len() as u64;
            if to < from {
                continue;
            }
            let chunk: Vec<ApplyEntry> = (from..=to).map(|i| model.entry(i)).collect();
            let got = apply(&sm, &chunk).unwrap();
            let want: Vec<bool> = (from..=to).map(|i| model.results[i as usize - 1]).collect();
            prop_assert_eq!(got, want, "chunk {}..={} (log had {})", from, to, known);
            prop_assert_eq!(sm.last_applied().index, to);
            prop_assert_eq!(sm_state(&sm), model.state(to));
            // The maintained digest is the digest of the state.
            let state = sm.replica_state().unwrap();
            prop_assert_eq!(sm.digests().last().copied(), Some((to, state.kv_xor)));
        }
    }
}

fn txn(index: u64, ops: &[crate::store::TxnOp]) -> ApplyEntry {
    entry(
        index,
        1,
        Command::CompareAndSwap {
            key: Bytes::from_static(crate::store::txn::TXN_KEY),
            expected: Some(Bytes::from_static(crate::store::txn::TXN_MAGIC)),
            value: Bytes::from(crate::store::txn::encode(ops)),
        },
    )
}

#[test]
fn a_transaction_applies_all_its_ops_or_none_and_keeps_its_result_when_re_sent() {
    use crate::store::TxnOp;
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    let ok = [
        TxnOp::cas("a", Some(b"1"), "2"),
        TxnOp::cas("b", None, "new"),
        TxnOp::delete_if("c", "3"),
        TxnOp::put("d", "4"),
    ];
    let refused = [TxnOp::put("e", "5"), TxnOp::cas("a", Some(b"1"), "9")];
    let chunk = [
        put(1, "a", "1"),
        put(2, "c", "3"),
        txn(3, &ok),
        txn(4, &refused),
    ];
    assert_eq!(apply(&sm, &chunk).unwrap(), [true, true, true, false]);
    assert_eq!(value(&sm, "a").as_deref(), Some("2"));
    assert_eq!(value(&sm, "b").as_deref(), Some("new"));
    assert_eq!(value(&sm, "c"), None);
    assert_eq!(value(&sm, "d").as_deref(), Some("4"));
    // The refused one wrote nothing, not even its unconditional put.
    assert_eq!(value(&sm, "e"), None);
    // Re-sent: the first results, nothing applied again.
    assert_eq!(apply(&sm, &chunk[2..]).unwrap(), [true, false]);
    // Bytes that are not a transaction of this version apply nothing; the node goes on.
    let mut bad = txn(5, &ok);
    if let Command::CompareAndSwap { value, .. } = &mut bad.command {
        *value = value.slice(..value.len() - 1);
    }
    assert_eq!(apply(&sm, &[bad, put(6, "f", "6")]).unwrap(), [false, true]);
    assert!(sm.failure().borrow().is_none());
}

fn txn_or(
    index: u64,
    ops: &[crate::store::TxnOp],
    otherwise: &[crate::store::TxnOp],
) -> ApplyEntry {
    entry(
        index,
        1,
        Command::CompareAndSwap {
            key: Bytes::from_static(crate::store::txn::TXN_KEY),
            expected: Some(Bytes::from_static(crate::store::txn::TXN_MAGIC)),
            value: Bytes::from(crate::store::txn::encode_or(ops, otherwise)),
        },
    )
}

#[test]
fn a_transaction_with_an_otherwise_branch_applies_one_branch_once() {
    use crate::store::TxnOp;
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    let first = |expected: &[u8], new: &str| {
        vec![
            TxnOp::delete("g"),
            TxnOp::cas("rec", Some(expected), new.to_string()),
        ]
    };
    let otherwise = [TxnOp::put("m", "1")];
    let chunk = [
        put(1, "rec", "v1"),
        put(2, "g", "x"),
        txn_or(3, &first(b"v1", "v2"), &otherwise),
        put(4, "g", "y"),
        txn_or(5, &first(b"v1", "v3"), &otherwise),
        // The probe: an empty transaction of this form applies (nothing).
        txn_or(6, &[], &[]),
    ];
    assert_eq!(
        apply(&sm, &chunk).unwrap(),
        [true, true, true, true, false, true]
    );
    assert_eq!(value(&sm, "rec").as_deref(), Some("v2"));
    // The refused one wrote its otherwise branch only: `g` is still there, the marker too.
    assert_eq!(value(&sm, "g").as_deref(), Some("y"));
    assert_eq!(value(&sm, "m").as_deref(), Some("1"));
    // Re-sent: the first results, nothing applied again.
    assert_eq!(apply(&sm, &chunk[2..]).unwrap(), [true, true, false, true]);
    assert_eq!(value(&sm, "g").as_deref(), Some("y"));
}
