//! The reconcile core: watcher and mirror, under injected faults (paused time) and on the real
//! engine (embedded and 3-node, with a leader kill).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dcoord::reconcile::{
    Mirror, MirrorOptions, Relist, Snapshot, WatcherEvent, WatcherOptions, watcher,
};
use dcoord::store::{Store, WatchTarget};
use dcoord::testing::MemStore;
use futures::StreamExt;
use proptest::prelude::*;

const P: &str = "/m/";

fn contents(view: &Snapshot) -> BTreeMap<Bytes, Bytes> {
    view.iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

/// The store's contents under `prefix` (retrying injected failures).
async fn stored(store: &dyn Store, prefix: &str) -> BTreeMap<Bytes, Bytes> {
    loop {
        match store.scan_prefix(prefix.as_bytes()).await {
            Ok(scan) => return scan.entries.into_iter().collect(),
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("scan failed: {e}"),
        }
    }
}

fn mirror_of(store: &MemStore, options: WatcherOptions) -> Mirror {
    Mirror::start(
        Arc::new(store.clone()),
        WatchTarget::prefix(P),
        MirrorOptions::default().watcher(options),
    )
}

/// Waits (bounded) until the mirror holds exactly what the store holds under `prefix`.
async fn converge(mirror: &Mirror, store: &dyn Store, prefix: &str, within: Duration) -> Snapshot {
    let want = stored(store, prefix).await;
    match tokio::time::timeout(within, mirror.wait_for(|v| contents(v) == want)).await {
        Ok(view) => view.unwrap(),
        Err(_) => panic!(
            "mirror did not converge within {within:?}: has {:?}, store has {:?}; stats {:?}",
            contents(&mirror.snapshot()),
            want,
            mirror.stats()
        ),
    }
}

#[tokio::test(start_paused = true)]
async fn mirror_lists_then_follows_live_writes() {
    let s = MemStore::new();
    s.put(b"/m/a", b"1").await.unwrap();
    s.put(b"/other", b"x").await.unwrap();
    let m = mirror_of(&s, WatcherOptions::default());
    let view = m.wait_ready().await.unwrap();
    assert_eq!(contents(&view), stored(&s, P).await);
    s.put(b"/m/b", b"2").await.unwrap();
    s.delete(b"/m/a").await.unwrap();
    let view = converge(&m, &s, P, Duration::from_secs(1)).await;
    assert_eq!(view.len(), 1);
    assert_eq!(m.stats().relists.total_after_start(), 0);
    assert_eq!(m.stats().events, 2);
}

#[tokio::test(start_paused = true)]
async fn mirror_converges_after_a_cancelled_watch() {
    let s = MemStore::new();
    let m = mirror_of(&s, WatcherOptions::default());
    m.wait_ready().await.unwrap();
    s.put(b"/m/a", b"1").await.unwrap();
    s.cancel_watches();
    // Written while no watch is registered: only the relist can find these.
    s.put(b"/m/b", b"2").await.unwrap();
    s.put(b"/m/a", b"3").await.unwrap();
    converge(&m, &s, P, Duration::from_secs(10)).await;
    assert!(m.stats().relists.canceled >= 1, "{:?}", m.stats());
    assert!(
        m.last_error().unwrap().contains("cancel"),
        "{:?}",
        m.last_error()
    );
}

#[tokio::test(start_paused = true)]
async fn mirror_converges_after_the_stream_ends() {
    let s = MemStore::new();
    let m = mirror_of(&s, WatcherOptions::default());
    m.wait_ready().await.unwrap();
    s.end_watches();
    s.put(b"/m/x", b"1").await.unwrap();
    converge(&m, &s, P, Duration::from_secs(10)).await;
    assert!(m.stats().relists.ended >= 1, "{:?}", m.stats());
}

#[tokio::test(start_paused = true)]
async fn periodic_relist_repairs_silently_dropped_events() {
    let s = MemStore::new();
    let m = mirror_of(
        &s,
        WatcherOptions::default().resync_every(Some(Duration::from_secs(5))),
    );
    m.wait_ready().await.unwrap();
    s.drop_next_events(3);
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("a", "5")] {
        s.put(format!("{P}{k}").as_bytes(), v.as_bytes())
            .await
            .unwrap();
    }
    s.delete(b"/m/d").await.unwrap();
    // The live stream saw only the last three changes: a=5, then d=4 and its delete.
    let view = m.wait_for(|v| v.get(b"/m/a").is_some()).await.unwrap();
    assert!(view.get(b"/m/b").is_none() && view.get(b"/m/c").is_none());
    assert_eq!(m.stats().relists.periodic, 0);
    // After the resync, exactly the store's contents.
    let view = converge(&m, &s, P, Duration::from_secs(6)).await;
    let want: BTreeMap<Bytes, Bytes> = [("/m/a", "5"), ("/m/b", "2"), ("/m/c", "3")]
        .into_iter()
        .map(|(k, v)| (Bytes::from(k), Bytes::from(v)))
        .collect();
    assert_eq!(contents(&view), want);
    assert!(m.stats().relists.periodic >= 1);
}

#[tokio::test(start_paused = true)]
async fn mirror_converges_after_an_ambiguous_write() {
    let s = MemStore::new();
    let m = mirror_of(&s, WatcherOptions::default());
    m.wait_ready().await.unwrap();
    s.ambiguous_next_writes(1);
    let err = s.put(b"/m/amb", b"1").await.unwrap_err();
    assert!(err.is_ambiguous(), "{err}");
    s.put(b"/m/after", b"2").await.unwrap();
    let view = converge(&m, &s, P, Duration::from_secs(1)).await;
    // The in-memory store applies an ambiguous write; the mirror shows what really happened.
    assert_eq!(&view.get(b"/m/amb").unwrap().value[..], b"1");
}

#[tokio::test(start_paused = true)]
async fn failed_scans_and_watches_are_retried_with_backoff() {
    let s = MemStore::new();
    s.put(b"/m/a", b"1").await.unwrap();
    s.fail_next_ops(5);
    let m = mirror_of(&s, WatcherOptions::default());
    let view = m.wait_ready().await.unwrap();
    assert_eq!(contents(&view), stored(&s, P).await);
    assert!(m.stats().relists.failed >= 2, "{:?}", m.stats());
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_a_gap_comes_out_as_delete_after_the_relist() {
    let s = MemStore::new();
    s.put(b"/m/a", b"1").await.unwrap();
    s.put(b"/m/b", b"2").await.unwrap();
    let mut w = watcher(
        Arc::new(s.clone()),
        WatchTarget::prefix(P),
        WatcherOptions::default(),
    );
    let mut first = Vec::new();
    loop {
        let ev = w.next().await.unwrap().unwrap();
        let done = matches!(ev, WatcherEvent::InitDone { .. });
        first.push(ev);
        if done {
            break;
        }
    }
    assert_eq!(first.len(), 4, "Init, 2 x InitApply, InitDone: {first:?}");
    s.cancel_watches();
    s.delete(b"/m/a").await.unwrap();
    let err = w.next().await.unwrap().unwrap_err();
    assert!(err.is_watch_end(), "{err}");
    let mut second = Vec::new();
    while second.len() < 4 {
        second.push(w.next().await.unwrap().unwrap());
    }
    assert_eq!(
        second[0],
        WatcherEvent::Init {
            reason: Relist::Canceled
        }
    );
    assert!(matches!(&second[1], WatcherEvent::InitApply(e) if e.key == "/m/b"));
    assert!(matches!(second[2], WatcherEvent::InitDone { .. }));
    assert!(
        matches!(&second[3], WatcherEvent::Delete { key, .. } if key == "/m/a"),
        "{second:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_relists_and_is_counted() {
    let s = MemStore::new();
    let opts = WatcherOptions::default().idle_timeout(Some(Duration::from_secs(2)));
    let m = mirror_of(&s, opts);
    m.wait_ready().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = m.stats();
    assert!(st.idle_timeouts >= 1 && st.relists.idle >= 1, "{st:?}");
    s.put(b"/m/z", b"1").await.unwrap();
    converge(&m, &s, P, Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_target_closes_the_mirror_with_a_clear_error() {
    let s = MemStore::new();
    let m = Mirror::start(
        Arc::new(s),
        WatchTarget::prefix("no-slash"),
        MirrorOptions::default(),
    );
    let err = m.wait_ready().await.unwrap_err();
    assert!(err.to_string().contains("no-slash"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_key_mirror_ignores_longer_keys_sharing_its_prefix() {
    let s = MemStore::new();
    s.put(b"/cfg/app", b"1").await.unwrap();
    s.put(b"/cfg/app2", b"2").await.unwrap();
    let m = Mirror::start(
        Arc::new(s.clone()),
        WatchTarget::key("/cfg/app"),
        MirrorOptions::default(),
    );
    let view = m.wait_ready().await.unwrap();
    assert_eq!(view.len(), 1);
    s.put(b"/cfg/app", b"3").await.unwrap();
    let view = m
        .wait_for(|v| v.get(b"/cfg/app").is_some_and(|e| e.value == "3"))
        .await
        .unwrap();
    assert_eq!(view.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn changes_report_old_and_new_and_skip_identical_rewrites() {
    let s = MemStore::new();
    s.put(b"/m/a", b"1").await.unwrap();
    let m = mirror_of(&s, WatcherOptions::default());
    m.wait_ready().await.unwrap();
    let mut changes = Box::pin(m.changes());
    s.put(b"/m/a", b"1").await.unwrap(); // identical: not announced
    s.put(b"/m/a", b"2").await.unwrap();
    s.delete(b"/m/a").await.unwrap();
    let c1 = changes.next().await.unwrap().unwrap();
    assert_eq!(
        (c1.old.as_deref(), c1.new.as_deref()),
        (Some(&b"1"[..]), Some(&b"2"[..]))
    );
    let c2 = changes.next().await.unwrap().unwrap();
    assert_eq!((c2.old.as_deref(), c2.new), (Some(&b"2"[..]), None));
    assert!(c2.revision > c1.revision);
}

/// Records every revision per key a watcher yields, through random faults, and checks none
/// goes backwards (and the stream as a whole never does).
#[tokio::test(start_paused = true)]
async fn watcher_never_yields_an_older_revision_for_a_key() {
    let s = MemStore::new();
    let opts = WatcherOptions::default().resync_every(Some(Duration::from_secs(3)));
    let mut w = watcher(Arc::new(s.clone()), WatchTarget::prefix(P), opts);
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..400u32 {
                let key = format!("{P}{}", i % 7);
                match i % 50 {
                    10 => s.cancel_watches(),
                    20 => s.end_watches(),
                    30 => s.drop_next_events(4),
                    _ => {}
                }
                if i.is_multiple_of(9) {
                    let _ = s.delete(key.as_bytes()).await;
                } else {
                    let _ = s.put(key.as_bytes(), i.to_string().as_bytes()).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut last: HashMap<Bytes, u64> = HashMap::new();
    let mut global = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let Ok(Some(item)) = tokio::time::timeout_at(deadline, w.next()).await else {
            break;
        };
        let Ok(ev) = item else { continue };
        let Some(rev) = ev.revision() else { continue };
        assert!(
            rev >= global,
            "stream went back from {global} to {rev}: {ev:?}"
        );
        global = rev;
        let key = match &ev {
            WatcherEvent::InitApply(e) | WatcherEvent::Apply(e) => e.key.clone(),
            WatcherEvent::Delete { key, .. } => key.clone(),
            _ => continue,
        };
        let prev = last.insert(key.clone(), rev).unwrap_or(0);
        assert!(rev >= prev, "{key:?} went back from {prev} to {rev}");
    }
    writer.await.unwrap();
    assert!(
        w.stats().get().relists.total_after_start() >= 8,
        "{:?}",
        w.stats().get()
    );
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Delete(u8),
    Cancel,
    End,
    Drop(u8),
    Fail(u8),
    Pause(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..8).prop_map(Op::Delete),
        1 => Just(Op::Cancel),
        1 => Just(Op::End),
        1 => (1u8..6).prop_map(Op::Drop),
        1 => (1u8..4).prop_map(Op::Fail),
        2 => (0u16..2000).prop_map(Op::Pause),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random writes interleaved with random faults: the mirror ends equal to the store.
    #[test]
    fn mirror_ends_equal_to_the_store(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let s = MemStore::new();
            let m = mirror_of(&s, WatcherOptions::default().resync_every(Some(Duration::from_secs(10))));
            m.wait_ready().await.unwrap();
            for op in ops {
                match op {
                    Op::Put(k, v) => { let _ = s.put(format!("{P}{k}").as_bytes(), &[v]).await; }
                    Op::Delete(k) => { let _ = s.delete(format!("{P}{k}").as_bytes()).await; }
                    Op::Cancel => s.cancel_watches(),
                    Op::End => s.end_watches(),
                    Op::Drop(n) => s.drop_next_events(n.into()),
                    Op::Fail(n) => s.fail_next_ops(n.into()),
                    Op::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms.into())).await,
                }
            }
            let want = stored(&s, P).await;
            let got = tokio::time::timeout(Duration::from_secs(30), m.wait_for(|v| contents(v) == want)).await;
            assert!(got.is_ok(), "no convergence: mirror {:?} store {:?}", contents(&m.snapshot()), want);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The real engine.

/// 1000 writes from 20 concurrent tasks (overwrites and deletes among 100 keys).
async fn concurrent_writes(store: Arc<dyn Store>, ns: &str, total: usize) -> (usize, usize) {
    let tasks = 20;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let ns = ns.to_string();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut ambiguous) = (0, 0);
            for i in 0..total / tasks {
                let n = t * (total / tasks) + i;
                let key = format!("{ns}k{:03}", n % 100);
                let res = if n.is_multiple_of(11) {
                    store.delete(key.as_bytes()).await
                } else {
                    store.put(key.as_bytes(), n.to_string().as_bytes()).await
                };
                match res {
                    Ok(()) => ok += 1,
                    Err(e) if e.is_ambiguous() || e.is_retryable() => {
                        eprintln!("write {n}: {e}");
                        ambiguous += 1
                    }
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            (ok, ambiguous)
        }));
    }
    let mut sum = (0, 0);
    for h in handles {
        let (a, b) = h.await.unwrap();
        sum.0 += a;
        sum.1 += b;
    }
    sum
}

fn engine_mirror(store: Arc<dyn Store>, ns: &str) -> Mirror {
    Mirror::start(
        store,
        WatchTarget::prefix(ns.to_string()),
        MirrorOptions::default()
            .watcher(WatcherOptions::default().resync_every(Some(Duration::from_secs(5)))),
    )
}

async fn mirror_under_concurrent_writes_equals_final_scan(f: common::Fixture) {
    let m = engine_mirror(f.store.clone(), &f.ns);
    m.wait_ready().await.unwrap();
    let started = std::time::Instant::now();
    let (ok, _) = concurrent_writes(f.store.clone(), &f.ns, 1000).await;
    assert_eq!(ok, 1000);
    let view = converge(&m, &*f.store, &f.ns, Duration::from_secs(20)).await;
    println!(
        "mirror of {} keys converged {:?} after the writes began; stats {:?}",
        view.len(),
        started.elapsed(),
        m.stats()
    );
    assert!(!view.is_empty());
}

#[tokio::test]
async fn embedded_mirror_under_concurrent_writes_equals_final_scan() {
    mirror_under_concurrent_writes_equals_final_scan(
        common::fixture(common::Backend::Embedded).await,
    )
    .await;
}

#[tokio::test]
async fn cluster_mirror_under_concurrent_writes_equals_final_scan() {
    mirror_under_concurrent_writes_equals_final_scan(
        common::fixture(common::Backend::Cluster).await,
    )
    .await;
}

/// The leader (which also serves the mirror's watch) is SIGKILLed during the writes: the
/// mirror converges to the final scan, within a bound the test prints.
#[tokio::test]
async fn cluster_mirror_converges_after_the_leader_is_killed_mid_writes() {
    let _heavy = common::HEAVY.lock().await;
    let (mut cluster, remote) = common::own_cluster().await;
    let leader = remote.leader_id().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(remote);
    let ns = "/kill/";
    let m = engine_mirror(store.clone(), ns);
    m.wait_ready().await.unwrap();

    let writes = tokio::spawn(concurrent_writes(store.clone(), ns, 1000));
    m.wait_for(|v| v.len() >= 20).await.unwrap();
    cluster.kill(leader).unwrap();
    let killed = std::time::Instant::now();
    let (ok, uncertain) = writes.await.unwrap();
    let writes_done = killed.elapsed();
    let view = converge(&m, &*store, ns, Duration::from_secs(60)).await;
    let converged = killed.elapsed();
    println!(
        "leader {leader} killed: writes finished {writes_done:?} later ({ok} ok, {uncertain} \
         ambiguous/unavailable); mirror of {} keys equal to the final scan {converged:?} after \
         the kill; stats {:?}",
        view.len(),
        m.stats()
    );
    let st = m.stats();
    assert!(
        st.relists.total_after_start() >= 1,
        "the watch on the killed leader must have been relisted: {st:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Sessions.

mod session {
    use super::*;
    use dcoord::session::{Heartbeat, Liveness, Session, SessionOptions, SessionState};
    use tokio::time::Instant;

    fn opts() -> SessionOptions {
        SessionOptions::default().lease(Duration::from_secs(3))
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_renews_its_heartbeat_in_the_background() {
        let s = MemStore::new();
        let session = Session::start(Arc::new(s.clone()), opts()).await.unwrap();
        assert!(session.is_alive());
        let read = |s: MemStore, key: Vec<u8>| async move {
            let v = s
                .get(&key, dcoord::store::Consistency::Linearizable)
                .await
                .unwrap()
                .unwrap();
            Heartbeat::decode(&key, &v).unwrap()
        };
        let first = read(s.clone(), session.key().to_vec()).await;
        assert_eq!(first.id, session.id());
        assert_eq!(first.lease_ms, 3000);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = read(s.clone(), session.key().to_vec()).await;
        assert!(
            later.seq >= first.seq + 9,
            "1 s renewals over 10 s: {later:?}"
        );
        assert!(session.is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn lost_fires_before_any_observer_can_call_the_session_dead() {
        let s = MemStore::new();
        let session = Session::start(Arc::new(s.clone()), opts()).await.unwrap();
        // An observer in another process: it watches the heartbeat and runs its own clock.
        let mirror = Mirror::start(
            Arc::new(s.clone()),
            WatchTarget::key(session.key().to_vec()),
            MirrorOptions::default(),
        );
        mirror.wait_ready().await.unwrap();
        let id = session.id();
        let observer = {
            let mut rx = mirror.subscribe();
            let key = session.key().to_vec();
            let id = id.clone();
            tokio::spawn(async move {
                let mut live = Liveness::new(Duration::from_secs(3));
                loop {
                    let now = Instant::now();
                    live.observe(&id, rx.borrow_and_update().get(&key).map(|e| &e.value), now);
                    if live.is_dead(&id, now) {
                        return now;
                    }
                    let at = live.expires_at(&id).unwrap();
                    let _ = tokio::time::timeout_at(at, rx.changed()).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        // From now on every write fails: renewals stop succeeding.
        s.fail_next_ops(u64::MAX / 2);
        session.lost().await;
        let lost_at = Instant::now();
        assert_eq!(session.state(), SessionState::Lost);
        assert!(session.check().is_err());
        let dead_at = observer.await.unwrap();
        assert!(
            lost_at < dead_at,
            "the holder learned at {lost_at:?}, the observer decided at {dead_at:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn close_stops_renewing_and_deletes_the_record() {
        let s = MemStore::new();
        let session = Session::start(Arc::new(s.clone()), opts()).await.unwrap();
        let key = session.key().to_vec();
        let watcher = session.clone();
        session.close().await.unwrap();
        assert_eq!(watcher.state(), SessionState::Closed);
        watcher.lost().await;
        let err = watcher.check().unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        let writes = s.op_counts().writes;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(s.op_counts().writes, writes, "no renewals after close");
        assert!(s.get(&key, Default::default()).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_fails_start_and_writes_nothing() {
        let s = MemStore::new();
        s.fail_next_ops(1);
        let err = Session::start(Arc::new(s.clone()), opts())
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(s.scan_prefix(b"/dcoord/").await.unwrap().entries.is_empty());
        let err = Session::start(Arc::new(s), opts().root("no-slash"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no-slash"), "{err}");
    }
}
