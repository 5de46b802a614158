//! One set of behaviours, pinned on all three stores: the in-memory store, an embedded d-engine
//! node, and a 3-node d-engine cluster over gRPC. If d-engine changes one of these, this file
//! says which.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Backend, Fixture, HEAVY, binary, fixture, next_error, next_event};
use dcoord::Error;
use dcoord::engine::{ClusterOptions, LocalCluster, NodeState};
use dcoord::keys::MAX_VALUE_LEN;
use dcoord::store::{
    Consistency, EventKind, RemoteOptions, RemoteStore, Store, TxnOp, WatchTarget,
};
use futures::StreamExt;

/// Generates one `#[tokio::test]` per backend for each conformance function.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $( #[tokio::test] async fn $name() { super::$name(super::fixture(super::Backend::Mem).await).await } )*
        }
        mod embedded {
            $( #[tokio::test] async fn $name() { super::$name(super::fixture(super::Backend::Embedded).await).await } )*
        }
        mod cluster {
            $( #[tokio::test] async fn $name() { super::$name(super::fixture(super::Backend::Cluster).await).await } )*
        }
    };
}

conformance!(
    cas_compares_exact_bytes_and_absence,
    bad_input_is_rejected_and_nothing_is_written,
    watch_first_then_scan_delivers_every_later_change,
    delete_of_missing_key_emits_delete_event,
    failed_cas_emits_no_event,
    ttl_expiry_emits_no_event_and_key_is_readable_until_swept,
    watch_reports_previous_value_when_asked,
    reads_see_own_writes_at_every_consistency,
    a_scan_of_more_than_4_mib_returns_every_entry,
    get_many_answers_in_the_order_asked_with_absent_keys_as_none,
    a_transaction_applies_every_op_at_one_revision_or_nothing,
    a_transaction_with_an_otherwise_branch_applies_exactly_one_branch,
    concurrent_writes_each_get_the_answer_of_their_own_write,
);

async fn cas_compares_exact_bytes_and_absence(f: Fixture) {
    let s = &f.store;
    let k = f.key("cas");
    assert!(s.compare_and_swap(&k, None, b"a").await.unwrap());
    assert!(
        !s.compare_and_swap(&k, None, b"b").await.unwrap(),
        "CAS(None) on a present key"
    );
    assert!(!s.compare_and_swap(&k, Some(b"x"), b"b").await.unwrap());
    assert_eq!(
        s.get(&k, Consistency::Linearizable).await.unwrap().unwrap(),
        "a"
    );
    assert!(s.compare_and_swap(&k, Some(b"a"), b"b").await.unwrap());
    assert_eq!(
        s.get(&k, Consistency::Linearizable).await.unwrap().unwrap(),
        "b"
    );
    s.delete(&k).await.unwrap();
    assert!(
        !s.compare_and_swap(&k, Some(b"b"), b"c").await.unwrap(),
        "CAS on a deleted key"
    );
    assert!(
        s.compare_and_swap(&k, None, b"d").await.unwrap(),
        "CAS(None) after delete"
    );
}

async fn bad_input_is_rejected_and_nothing_is_written(f: Fixture) {
    let s = &f.store;
    for p in ["no-leading/", "/no-trailing", ""] {
        let err = s
            .watch(WatchTarget::prefix(p.as_bytes().to_vec()), false)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::InvalidPrefix { .. }), "{p:?}: {err}");
    }
    let err = s.put(b"", b"v").await.unwrap_err();
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let big = vec![b'x'; MAX_VALUE_LEN + 1];
    let k = f.key("big");
    let err = s.put(&k, &big).await.unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    let err = s.compare_and_swap(&k, None, &big).await.unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    let err = s.put_with_ttl(&k, b"v", Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(s.get(&k, Consistency::Linearizable).await.unwrap(), None);
    let err = s.scan_prefix(b"").await.unwrap_err();
    assert!(matches!(err, Error::InvalidPrefix { .. }), "{err}");
}

async fn watch_first_then_scan_delivers_every_later_change(f: Fixture) {
    let s = &f.store;
    let (k1, k2, k3) = (f.key("r/1"), f.key("r/2"), f.key("r/3"));
    s.put(&k2, b"two").await.unwrap();
    s.put(&k1, b"one").await.unwrap();
    let mut watch = s
        .watch(WatchTarget::prefix(f.key("r/")), false)
        .await
        .unwrap();
    let scan = s.scan_prefix(&f.key("r/")).await.unwrap();
    let keys: Vec<&[u8]> = scan.entries.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(keys, vec![&k1[..], &k2[..]], "scan sorted by key");
    assert!(scan.revision > 0);
    s.put(&k3, b"three").await.unwrap();
    s.delete(&k1).await.unwrap();
    // Events at or below the scan revision are already in the scan (the reconcile rule).
    let mut live = Vec::new();
    while live.len() < 2 {
        let e = next_event(&mut watch, 10).await;
        if e.revision > scan.revision {
            live.push(e);
        }
    }
    assert_eq!((live[0].kind, &live[0].key[..]), (EventKind::Put, &k3[..]));
    assert_eq!(live[0].value, "three");
    assert_eq!(
        (live[1].kind, &live[1].key[..]),
        (EventKind::Delete, &k1[..])
    );
    assert!(live[1].revision > live[0].revision, "revisions increase");
    assert_eq!(live[0].prev_value, None, "not asked for");
}

async fn delete_of_missing_key_emits_delete_event(f: Fixture) {
    let s = &f.store;
    let k = f.key("never");
    let mut watch = s.watch(WatchTarget::key(k.clone()), false).await.unwrap();
    s.delete(&k).await.unwrap();
    let e = next_event(&mut watch, 10).await;
    assert_eq!((e.kind, &e.key[..]), (EventKind::Delete, &k[..]));
}

async fn failed_cas_emits_no_event(f: Fixture) {
    let s = &f.store;
    let mut watch = s
        .watch(WatchTarget::prefix(f.key("")), false)
        .await
        .unwrap();
    assert!(
        !s.compare_and_swap(&f.key("c"), Some(b"nope"), b"x")
            .await
            .unwrap()
    );
    s.put(&f.key("marker"), b"m").await.unwrap();
    let e = next_event(&mut watch, 10).await;
    assert_eq!(
        &e.key[..],
        &f.key("marker")[..],
        "the failed CAS emitted {e:?}"
    );
}

async fn ttl_expiry_emits_no_event_and_key_is_readable_until_swept(f: Fixture) {
    let s = &f.store;
    let k = f.key("ttl");
    let mut watch = s
        .watch(WatchTarget::prefix(f.key("")), false)
        .await
        .unwrap();
    let start = Instant::now();
    s.put_with_ttl(&k, b"v", Duration::from_secs(1))
        .await
        .unwrap();
    let put = next_event(&mut watch, 10).await;
    assert_eq!(put.kind, EventKind::Put);
    assert_eq!(
        s.get(&k, Consistency::Linearizable).await.unwrap().unwrap(),
        "v"
    );
    // Swept within TTL + sweep interval (+ slack for a busy machine).
    loop {
        if s.get(&k, Consistency::Linearizable)
            .await
            .unwrap()
            .is_none()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "TTL key never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "expired early"
    );
    s.put(&f.key("marker"), b"m").await.unwrap();
    let mut e = next_event(&mut watch, 10).await;
    if e == put {
        // Seen once on a just-started 3-node cluster: the same event (same revision) delivered
        // twice. Not an expiry event; the reconcile layer is idempotent to it.
        eprintln!("note: d-engine delivered {put:?} twice");
        e = next_event(&mut watch, 10).await;
    }
    assert_eq!(
        &e.key[..],
        &f.key("marker")[..],
        "expiry emitted {e:?} (the put was {put:?})"
    );
}

async fn watch_reports_previous_value_when_asked(f: Fixture) {
    let s = &f.store;
    let k = f.key("prev");
    let mut watch = s.watch(WatchTarget::key(k.clone()), true).await.unwrap();
    s.put(&k, b"a").await.unwrap();
    s.put(&k, b"b").await.unwrap();
    let first = next_event(&mut watch, 10).await;
    assert_eq!(
        first.prev_value,
        Some(Bytes::new()),
        "absent shows as empty"
    );
    let second = next_event(&mut watch, 10).await;
    assert_eq!(second.prev_value, Some(Bytes::from_static(b"a")));
    assert_eq!(second.value, "b");
}

async fn reads_see_own_writes_at_every_consistency(f: Fixture) {
    let s = &f.store;
    let k = f.key("read");
    s.put(&k, b"v1").await.unwrap();
    assert_eq!(
        s.get(&k, Consistency::Linearizable).await.unwrap().unwrap(),
        "v1"
    );
    assert_eq!(s.get(&k, Consistency::Lease).await.unwrap().unwrap(), "v1");
    // Eventual may be served by a lagging follower: it converges.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.get(&k, Consistency::Eventual).await.unwrap().as_deref() != Some(b"v1") {
        assert!(Instant::now() < deadline, "eventual read never converged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stock d-engine-client 0.2.4 keeps tonic's 4 MiB decode limit, so over gRPC a scan whose
/// answer is larger failed ("decoded message length too large"): a queue of 5,000 1 KiB
/// messages could not be opened. dcoord's client patch lifts the limit.
async fn a_scan_of_more_than_4_mib_returns_every_entry(f: Fixture) {
    let s = &f.store;
    let prefix = f.key("big/");
    let value = vec![b'x'; 512 << 10];
    for i in 0..10 {
        let mut k = prefix.clone();
        k.extend_from_slice(format!("{i:02}").as_bytes());
        s.put(&k, &value).await.unwrap();
    }
    let scan = s.scan_prefix(&prefix).await.unwrap();
    assert_eq!(scan.entries.len(), 10);
    assert!(scan.entries.iter().all(|(_, v)| v.len() == value.len()));
}

/// d-engine answers a multi-key read with the entries of the keys that exist only (sparse, in
/// no promised order); both of its clients realign them to the keys asked. Pinned, with
/// repeated keys, since the queue's read-ahead relies on the alignment.
async fn get_many_answers_in_the_order_asked_with_absent_keys_as_none(f: Fixture) {
    let s = &f.store;
    let (a, b, c) = (f.key("many/a"), f.key("many/b"), f.key("many/c"));
    s.put(&c, b"vc").await.unwrap();
    s.put(&a, b"va").await.unwrap();
    let keys: Vec<Bytes> = [&c, &b, &a, &c]
        .iter()
        .map(|k| Bytes::from(k.to_vec()))
        .collect();
    for consistency in [Consistency::Linearizable, Consistency::Lease] {
        let got = s.get_many(&keys, consistency).await.unwrap();
        let want: Vec<Option<&[u8]>> = vec![Some(b"vc"), None, Some(b"va"), Some(b"vc")];
        assert_eq!(
            got.iter().map(|v| v.as_deref()).collect::<Vec<_>>(),
            want,
            "{consistency:?}"
        );
    }
    assert!(
        s.get_many(&[], Consistency::Linearizable)
            .await
            .unwrap()
            .is_empty()
    );
    let bad = [Bytes::from(a.to_vec()), Bytes::new()];
    let err = s
        .get_many(&bad, Consistency::Linearizable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
}

/// d-engine 0.2.4 has no multi-op write: dcoord sends a transaction as a CAS of a reserved
/// key, its state machine applies the ops, and its patch to d-engine-core emits one watch event
/// per op (all at the entry's revision). Pinned here on every store, prev values included.
async fn a_transaction_applies_every_op_at_one_revision_or_nothing(f: Fixture) {
    /// An event as (kind, key, value, prev value).
    type Seen<'a> = (EventKind, &'a [u8], &'a [u8], &'a [u8]);
    let s = &f.store;
    let (a, b, c, d) = (f.key("t/a"), f.key("t/b"), f.key("t/c"), f.key("t/d"));
    s.put(&a, b"1").await.unwrap();
    s.put(&c, b"3").await.unwrap();
    let mut watch = s
        .watch(WatchTarget::prefix(f.key("t/")), true)
        .await
        .unwrap();
    let refused = [
        TxnOp::put(d.clone(), "never"),
        TxnOp::cas(a.clone(), Some(b"not 1"), "x"),
    ];
    assert!(!s.transact(&refused).await.unwrap());
    let ok = [
        TxnOp::cas(a.clone(), Some(b"1"), "2"),
        TxnOp::cas(b.clone(), None, "new"),
        TxnOp::delete_if(c.clone(), "3"),
        TxnOp::put(d.clone(), "4"),
    ];
    assert!(s.transact(&ok).await.unwrap());
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(next_event(&mut watch, 10).await);
    }
    let seen: Vec<Seen> = events
        .iter()
        .map(|e| {
            let prev = e.prev_value.as_deref().unwrap();
            (e.kind, &e.key[..], &e.value[..], prev)
        })
        .collect();
    let want: Vec<Seen> = vec![
        (EventKind::Put, &a, b"2", b"1"),
        (EventKind::Put, &b, b"new", b""),
        (EventKind::Delete, &c, b"", b"3"),
        (EventKind::Put, &d, b"4", b""),
    ];
    assert_eq!(seen, want, "the refused transaction emitted nothing");
    assert!(events.iter().all(|e| e.revision == events[0].revision));
    let scan = s.scan_prefix(&f.key("t/")).await.unwrap();
    let state: Vec<(&[u8], &[u8])> = scan.entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    assert_eq!(state, vec![(&a[..], &b"2"[..]), (&b, b"new"), (&d, b"4")]);
    // Bad input: refused before anything is sent.
    let twice = [TxnOp::put(a.clone(), "x"), TxnOp::delete(a.clone())];
    let err = s.transact(&twice).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("twice")),
        "{err}"
    );
    let err = s.transact(&[]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let big = vec![b'x'; MAX_VALUE_LEN + 1];
    let err = s.transact(&[TxnOp::put(a.clone(), big)]).await.unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    assert_eq!(
        s.get(&a, Consistency::Linearizable).await.unwrap().unwrap(),
        "2"
    );
}

/// `Store::transact_or`: the first branch if every expectation holds (true), else the
/// otherwise branch (false), as one entry either way; the events are those of the branch
/// applied, at one revision (the patch to d-engine-core decodes the branch bit).
async fn a_transaction_with_an_otherwise_branch_applies_exactly_one_branch(f: Fixture) {
    let s = &f.store;
    let (rec, m1, m2, g) = (f.key("o/rec"), f.key("o/m1"), f.key("o/m2"), f.key("o/g"));
    s.put(&rec, b"v1").await.unwrap();
    s.put(&g, b"garbage").await.unwrap();
    let mut watch = s
        .watch(WatchTarget::prefix(f.key("o/")), false)
        .await
        .unwrap();
    let first = |expected: &[u8], new: &str| {
        vec![
            TxnOp::delete(g.clone()),
            TxnOp::cas(rec.clone(), Some(expected), new.to_string()),
        ]
    };
    let otherwise = [TxnOp::put(m1.clone(), "1"), TxnOp::put(m2.clone(), "2")];
    // Holds: the first branch only.
    assert!(
        s.transact_or(&first(b"v1", "v2"), &otherwise)
            .await
            .unwrap()
    );
    // Does not hold (the record moved on): the otherwise branch only; `g` stays deleted.
    s.put(&g, b"garbage again").await.unwrap();
    assert!(
        !s.transact_or(&first(b"v1", "v3"), &otherwise)
            .await
            .unwrap()
    );
    let mut events = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut watch, 10).await;
        events.push((e.kind, e.key.to_vec(), e.value.to_vec(), e.revision));
    }
    let shown: Vec<(EventKind, &[u8], &[u8])> = events
        .iter()
        .map(|(k, key, v, _)| (*k, &key[..], &v[..]))
        .collect();
    assert_eq!(
        shown,
        vec![
            (EventKind::Delete, &g[..], &b""[..]),
            (EventKind::Put, &rec, b"v2"),
            (EventKind::Put, &g, b"garbage again"),
            (EventKind::Put, &m1, b"1"),
            (EventKind::Put, &m2, b"2"),
        ]
    );
    assert_eq!(events[0].3, events[1].3, "the first branch at one revision");
    assert_eq!(
        events[3].3, events[4].3,
        "the otherwise branch at one revision"
    );
    let scan = s.scan_prefix(&f.key("o/")).await.unwrap();
    let state: Vec<(&[u8], &[u8])> = scan.entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    assert_eq!(
        state,
        vec![
            (&g[..], &b"garbage again"[..]),
            (&m1, b"1"),
            (&m2, b"2"),
            (&rec, b"v2"),
        ]
    );
    // Bad input: refused before anything is sent.
    let conditional = [TxnOp::cas(m1.clone(), None, "x")];
    let err = s
        .transact_or(&first(b"v2", "v4"), &conditional)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("unconditionally")),
        "{err}"
    );
    let err = s.transact_or(&first(b"v2", "v4"), &[]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(
        s.get(&rec, Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "v2"
    );
    f.check_replicas().await;
}

/// The gRPC and embedded stores send concurrent writes together as one transaction (see
/// `store::group`); a refused one is sent again write by write. Each caller still gets the
/// answer of its own write.
async fn concurrent_writes_each_get_the_answer_of_their_own_write(f: Fixture) {
    let s = &f.store;
    let n = 64;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| f.key(&format!("g/{i}"))).collect();
    for k in &keys {
        s.put(k, b"0").await.unwrap();
    }
    let before = s.scan_prefix(&f.key("g/")).await.unwrap().revision;
    // Every third expects the wrong bytes; every fifth is a plain put or a delete.
    let writes = keys.iter().enumerate().map(|(i, k)| async move {
        match i % 5 {
            0 => s.put(k, b"p").await.map(|()| true),
            1 if i % 3 != 0 => s.delete(k).await.map(|()| true),
            _ => {
                let expected: &[u8] = if i % 3 == 0 { b"wrong" } else { b"0" };
                s.compare_and_swap(k, Some(expected), b"1").await
            }
        }
    });
    let answers = futures::future::join_all(writes).await;
    let scan = s.scan_prefix(&f.key("g/")).await.unwrap();
    for (i, (k, answer)) in keys.iter().zip(answers).enumerate() {
        let answer = answer.unwrap();
        let stored = scan
            .entries
            .iter()
            .find(|(key, _)| key[..] == k[..])
            .map(|(_, v)| v.clone());
        let want: (bool, Option<&[u8]>) = match i % 5 {
            0 => (true, Some(b"p")),
            1 if i % 3 != 0 => (true, None),
            _ if i % 3 == 0 => (false, Some(b"0")),
            _ => (true, Some(b"1")),
        };
        assert_eq!((answer, stored.as_deref()), want, "write {i}");
    }
    if f.node.is_some() {
        // An embedded node of its own: nothing else writes, so the entries are countable.
        let entries = scan.revision - before;
        assert!(
            entries < n / 2,
            "{n} concurrent writes took {entries} entries"
        );
    }
}

// ---- A watch never ends silently: one test per backend, each with its own way to die. ----

#[tokio::test]
async fn mem_watch_errors_when_streams_end() {
    let f = fixture(Backend::Mem).await;
    let mem = f.mem.clone().unwrap();
    let mut a = f
        .store
        .watch(WatchTarget::prefix(f.key("")), false)
        .await
        .unwrap();
    mem.end_watches();
    assert!(matches!(
        next_error(&mut a, 5).await,
        Error::WatchEnded { .. }
    ));
    let mut b = f
        .store
        .watch(WatchTarget::prefix(f.key("")), false)
        .await
        .unwrap();
    mem.cancel_watches();
    assert!(matches!(
        next_error(&mut b, 5).await,
        Error::WatchCanceled { .. }
    ));
}

#[tokio::test]
async fn embedded_watch_ends_when_the_engine_stops() {
    let f = fixture(Backend::Embedded).await;
    let mut w = f
        .store
        .watch(WatchTarget::prefix(f.key("")), false)
        .await
        .unwrap();
    f.node.as_ref().unwrap().stop().await.unwrap();
    let err = next_error(&mut w, 10).await;
    assert!(matches!(err, Error::WatchEnded { .. }), "{err}");
    assert!(matches!(
        f.store.put(&f.key("x"), b"v").await,
        Err(Error::Stopped)
    ));
}

/// Kills the leader of a cluster of its own: the watch (opened on the leader) errors, and the
/// same `RemoteStore` writes again without help. Prints the time to the first good write.
#[tokio::test]
async fn cluster_watch_errors_and_writes_resume_after_leader_sigkill() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    // A generous deadline: on 2 busy cores an election plus rediscovery can take a while.
    let store = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    store.put(b"/k/before", b"1").await.unwrap();
    let mut watch = store
        .watch(WatchTarget::prefix(b"/k/".to_vec()), false)
        .await
        .unwrap();
    store.put(b"/k/seen", b"1").await.unwrap();
    let mut first = next_event(&mut watch, 10).await;
    if &first.key[..] == b"/k/before" {
        // d-engine re-sent the entry of the put before the watch (see `store` module docs).
        eprintln!("note: d-engine delivered the earlier put {first:?} to a later watch");
        first = next_event(&mut watch, 10).await;
    }
    assert_eq!(&first.key[..], b"/k/seen");

    let leader = store.leader_id().await.unwrap();
    cluster.kill(leader).unwrap();
    let killed = Instant::now();
    let err = next_error(&mut watch, 10).await;
    assert!(
        matches!(err, Error::WatchTransport { .. } | Error::WatchEnded { .. }),
        "{err}"
    );

    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.put(b"/k/after", b"2").await {
            Ok(()) => break,
            // A write cut by the kill may be ambiguous; a fresh one after it must succeed.
            Err(e) if e.is_ambiguous() && attempt < 3 => continue,
            Err(e) => panic!("write after leader kill failed: {e}"),
        }
    }
    let took = killed.elapsed();
    println!("first successful write {took:?} after SIGKILL of leader {leader}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        store
            .get(b"/k/before", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "1"
    );
    assert_ne!(store.leader_id().await, Some(leader));

    // A new watch lands on the new leader and sees fresh writes.
    let mut watch = store
        .watch(WatchTarget::prefix(b"/k/".to_vec()), false)
        .await
        .unwrap();
    store.put(b"/k/new", b"3").await.unwrap();
    assert_eq!(&next_event(&mut watch, 10).await.key[..], b"/k/new");

    // d-engine 0.2.4 pin: a restarting voter does not serve until ALL its peers answer its
    // startup health check. With the other follower down, restarting the old leader does NOT
    // restore a quorum; restarting the follower too does.
    let new_leader = store.leader_id().await.unwrap();
    let other = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != new_leader)
        .unwrap();
    cluster.kill(other).unwrap();
    cluster.restart(leader).unwrap();
    let short = RemoteStore::connect(
        &cluster.endpoints(),
        RemoteOptions::default().op_deadline(Duration::from_secs(6)),
    )
    .await
    .unwrap();
    let err = short.put(b"/k/quorum", b"4").await.unwrap_err();
    assert!(err.is_retryable() || err.is_ambiguous(), "{err}");
    // ... and says so: its watchdog logs an error naming the peer that is down (after 10 s),
    // and its probe answers "not serving".
    let log = cluster.dir().join(format!("n{leader}/node.log"));
    let wanted = format!("node {other}: down");
    let waiting = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("does not serve yet") && l.contains(&wanted))
        {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "node {leader} never reported that it does not serve (waiting for node {other})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let states = cluster.states().await;
    assert!(
        states.contains(&(leader, NodeState::NotServing)),
        "{states:?}"
    );
    cluster.restart(other).unwrap();
    let restarted = Instant::now();
    loop {
        match store.put(b"/k/quorum", b"4").await {
            Ok(()) => break,
            Err(e) if restarted.elapsed() < Duration::from_secs(90) => {
                assert!(e.is_retryable() || e.is_ambiguous(), "{e}");
            }
            Err(e) => panic!("no quorum after both nodes restarted: {e}"),
        }
    }
    println!(
        "quorum back {:?} after the second restart",
        restarted.elapsed()
    );
    assert_eq!(
        store
            .get(b"/k/quorum", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "4"
    );
}

#[tokio::test]
async fn remote_connect_to_unreachable_endpoints_fails_fast_with_a_clear_error() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let start = Instant::now();
    let err = RemoteStore::connect(
        &[addr.to_string()],
        RemoteOptions::default().op_deadline(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "hung for {:?}",
        start.elapsed()
    );
    assert!(matches!(
        RemoteStore::connect(&[], RemoteOptions::default()).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn embedded_node_on_a_taken_port_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let options = dcoord::engine::EmbeddedOptions::default().port(port);
    let err = dcoord::engine::EmbeddedNode::start_with(dir.path(), options)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PortInUse { .. }), "{err}");
}

/// A data directory of d-engine's FileStateMachine (older dcoord) is refused with a clear
/// error, never misread, and nothing in it is changed.
#[tokio::test]
async fn embedded_node_refuses_a_file_state_machine_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("state_machine");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("state.data"), b"old").unwrap();
    let e = dcoord::engine::EmbeddedNode::start(dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("FileStateMachine") && e.contains("move its data directory away"),
        "{e}"
    );
    assert_eq!(std::fs::read(old.join("state.data")).unwrap(), b"old");
    assert!(!dir.path().join("state").exists());
}

#[tokio::test]
async fn embedded_node_restarts_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let node = dcoord::engine::EmbeddedNode::start(dir.path())
        .await
        .unwrap();
    node.store().put(b"/persist/k", b"kept").await.unwrap();
    node.stop().await.unwrap();
    drop(node);
    let node = dcoord::engine::EmbeddedNode::start(dir.path())
        .await
        .unwrap();
    let v = node
        .store()
        .get(b"/persist/k", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(v.unwrap(), "kept");
    node.stop().await.unwrap();
}

/// d-engine 0.2.4's file state machine, after a SIGKILL: the restart replays the WAL into
/// memory but keeps `last_applied` at the last checkpoint, so Raft applies the same entries
/// again. A CAS that failed the first time (`B→C` while the key held `A`) then succeeds on the
/// later value `B`, and the node ends at `C`, a value the key never held; and the replay drops
/// an empty value, which Raft's second application brings back. Pinned on d-engine's
/// `FileStateMachine` (the benchmark switch), and shown absent from dcoord's state machine with
/// no repair step. If the first half starts failing, d-engine fixed it.
#[tokio::test]
async fn restart_after_sigkill_applies_cas_entries_twice_on_d_engines_file_state_machine() {
    let _heavy = HEAVY.lock().await;
    for dcoord_sm in [false, true] {
        let mut options = ClusterOptions::default().nodes(1).binary(binary());
        if !dcoord_sm {
            options = options.env("DCOORD_BENCH_FILE_STATE_MACHINE", "1");
        }
        let mut cluster = LocalCluster::start(options).await.unwrap();
        let opts = RemoteOptions::default().op_deadline(Duration::from_secs(30));
        let store = RemoteStore::connect(&cluster.endpoints(), opts.clone())
            .await
            .unwrap();
        let key = b"/conformance/replay";
        store.put(key, b"A").await.unwrap();
        // 1000 more entries: a checkpoint (state.data, last_applied) now holds `A`.
        let filler = futures::stream::iter(0..1000)
            .map(|i| {
                let store = store.clone();
                async move {
                    store
                        .put(format!("/conformance/f/{i}").as_bytes(), b"x")
                        .await
                }
            })
            .buffer_unordered(16);
        let filled: Vec<_> = filler.collect().await;
        assert!(filled.iter().all(|r| r.is_ok()));
        // Only in the WAL: a failed CAS, then a successful one; and an empty value.
        assert!(!store.compare_and_swap(key, Some(b"B"), b"C").await.unwrap());
        assert!(store.compare_and_swap(key, Some(b"A"), b"B").await.unwrap());
        let empty = b"/conformance/replay-empty";
        store.put(empty, b"").await.unwrap();
        cluster.kill(1).unwrap();
        cluster.restart(1).unwrap();
        let store = RemoteStore::connect(&cluster.endpoints(), opts)
            .await
            .unwrap();
        let got = store.get(key, Consistency::Linearizable).await.unwrap();
        let want: &[u8] = if dcoord_sm { b"B" } else { b"C" };
        assert_eq!(
            got.as_deref(),
            Some(want),
            "dcoord's state machine {dcoord_sm}: d-engine's replay behaviour changed"
        );
        // An empty value survives the crash on dcoord's state machine. (d-engine's WAL replay
        // skips it, "INSERT operation without value"; Raft's second application restores it.)
        let got = store.get(empty, Consistency::Linearizable).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&b""[..]),
            "dcoord's state machine {dcoord_sm}: empty value after the crash"
        );
    }
}

/// d-engine 0.2.4's file raft log (`FileStorageEngine`) writes a record as two writes (length,
/// then body). A SIGKILL between them leaves a torn record; the next start stops reading there
/// but does not cut it off, so later appends land behind the torn bytes and the start after
/// that misreads them: entries that were appended and flushed are gone (in `tests/crash.rs` the
/// node then could no longer commit). Pinned on d-engine's engine, and shown absent from
/// dcoord's raft log (each append is one redb transaction; there is no torn record to leave).
/// If the first half starts failing, d-engine fixed it.
#[tokio::test]
async fn a_torn_record_in_d_engines_file_raft_log_loses_later_flushed_entries() {
    use d_engine_core::{LogStore, StorageEngine};
    use d_engine_proto::common::Entry;
    let entry = |index| Entry {
        index,
        term: 1,
        ..Default::default()
    };
    let indexes = |log: &dyn LogStore| -> Vec<u64> {
        let entries = log.get_entries(1..=10).unwrap();
        entries.iter().map(|e| e.index).collect()
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let engine = d_engine::FileStorageEngine::new(path.clone()).unwrap();
        let log = engine.log_store();
        log.persist_entries((1..=3).map(entry).collect())
            .await
            .unwrap();
        log.flush().unwrap();
    }
    // What a SIGKILL between the two writes leaves: a length with only part of its body.
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path.join("logs").join("log.data"))
        .unwrap();
    file.write_all(&100u64.to_be_bytes()).unwrap();
    file.write_all(&[0x08, 0x04]).unwrap();
    drop(file);
    {
        let engine = d_engine::FileStorageEngine::new(path.clone()).unwrap();
        let log = engine.log_store();
        assert_eq!(log.last_index(), 3);
        log.persist_entries((4..=5).map(entry).collect())
            .await
            .unwrap();
        log.flush().unwrap();
        assert_eq!(indexes(&*log), [1, 2, 3, 4, 5]);
    }
    let engine = d_engine::FileStorageEngine::new(path).unwrap();
    assert_eq!(
        indexes(&*engine.log_store()),
        [1, 2, 3],
        "d-engine's file raft log kept the entries behind a torn record"
    );

    // dcoord's raft log: the same appends survive every reopen.
    let dir = tempfile::tempdir().unwrap();
    for batch in [1..=3, 4..=5] {
        let storage = dcoord::engine::raft_log::RaftStorage::open(dir.path()).unwrap();
        let log = storage.log_store();
        log.persist_entries(batch.map(entry).collect())
            .await
            .unwrap();
        log.flush().unwrap();
    }
    let storage = dcoord::engine::raft_log::RaftStorage::open(dir.path()).unwrap();
    assert_eq!(indexes(&*storage.log_store()), [1, 2, 3, 4, 5]);
}

/// Stock d-engine 0.2.4 saves the term and vote only when its `Raft` is dropped (`raft.rs`,
/// `impl Drop for Raft`), never while it runs: a node killed with SIGKILL came back at term 0
/// with no vote, free to vote twice in one term. dcoord's patched d-engine-core saves them
/// before it asks for votes or grants one, so after each SIGKILL the saved term is the term the
/// node led in (a 1-node cluster elects itself), and each restart leads in a higher term.
/// (Against stock 0.2.4 the saved term here was 0 every time.)
#[tokio::test]
async fn a_node_killed_with_sigkill_keeps_its_term_and_vote() {
    use dcoord::engine::raft_log::RaftStorage;
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(1).binary(binary()))
        .await
        .unwrap();
    let dir = cluster.dir().join("n1").join("storage");
    let mut terms = Vec::new();
    for _ in 0..3 {
        cluster.kill(1).unwrap();
        let summary = RaftStorage::open(&dir).unwrap().summary().unwrap();
        assert!(
            summary.saved_term >= 1 && summary.saved_term == summary.last_term,
            "saved term {} after SIGKILL, last log term {} (stock 0.2.4 saved 0)",
            summary.saved_term,
            summary.last_term
        );
        terms.push(summary.saved_term);
        cluster.restart(1).unwrap();
        cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    }
    assert!(
        terms[0] >= 1 && terms.windows(2).all(|w| w[0] < w[1]),
        "the leader's term after each restart: {terms:?} (must rise)"
    );
    cluster.signal(1, "TERM").unwrap();
    let started = Instant::now();
    let storage = loop {
        match RaftStorage::open(&dir) {
            Ok(s) => break s,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "the node did not stop: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let summary = storage.summary().unwrap();
    assert!(
        summary.saved_term > terms[2],
        "saved term {} after a graceful stop, terms {terms:?}",
        summary.saved_term
    );
}

/// A cluster whose nodes cannot start (here: a config d-engine refuses) fails at once, naming
/// the nodes that exited and carrying their logs, instead of waiting out its ready timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_nodes_exit_fails_fast_with_their_logs() {
    let started = Instant::now();
    let err = LocalCluster::start(
        ClusterOptions::default()
            .nodes(2)
            .binary(binary())
            .ready_timeout(Duration::from_secs(120))
            .env("RAFT__RAFT__ELECTION__ELECTION_TIMEOUT_MIN", "not-a-number"),
    )
    .await
    .expect_err("nodes with a broken config never serve");
    let text = err.to_string();
    assert!(text.contains("exited"), "{text}");
    assert!(text.contains("node.log"), "the nodes' logs: {text}");
    assert!(
        text.contains("ELECTION_TIMEOUT_MIN") || text.contains("election_timeout_min"),
        "why: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}: {text}",
        started.elapsed()
    );
}
