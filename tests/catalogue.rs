//! `counter::Counter`, `membership::Group` and `barrier::{Barrier, DoubleBarrier}`: the
//! contract on the in-memory store (paused time, fault injection), the embedded engine and the
//! shared 3-node cluster.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{long_session, session};
use dcoord::Error;
use dcoord::barrier::{Barrier, DoubleBarrier};
use dcoord::counter::Counter;
use dcoord::membership::{Group, Member};
use dcoord::store::{Consistency, Store};
use dcoord::testing::MemStore;
use tokio::sync::watch;
use tokio::time::Instant;

/// `tasks` writers add 1 `adds` times each: the sum is exact.
async fn adds_are_exact(store: Arc<dyn Store>, tasks: usize, adds: usize) -> Counter {
    let name = format!("c-{}", uuid::Uuid::new_v4().simple());
    let counter = Counter::new(store, "/dcoord/", &name).unwrap();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let counter = counter.clone();
        handles.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..adds {
                seen.push(counter.add(1).await.unwrap());
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    let expected: Vec<i64> = (1..=(tasks * adds) as i64).collect();
    assert_eq!(
        all, expected,
        "every add saw its own value: none lost, none twice"
    );
    assert_eq!(counter.get().await.unwrap(), (tasks * adds) as i64);
    counter
}

#[tokio::test(start_paused = true)]
async fn mem_counter_adds_are_exact_even_when_outcomes_are_unknown() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    // Unknown outcomes of every kind: applied, applied late, overtaken by later writes.
    mem.ambiguous_next_writes(20);
    let c = adds_are_exact(store.clone(), 4, 25).await;
    mem.late_next_writes(10);
    for _ in 0..10 {
        c.add(1).await.unwrap();
    }
    mem.overtaken_next_writes(5, 2);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    c.add(1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        c.get().await.unwrap(),
        100 + 10 + 20,
        "no add counted twice or lost"
    );
}

#[tokio::test]
async fn embedded_counter_adds_are_exact() {
    let f = common::fixture(common::Backend::Embedded).await;
    adds_are_exact(f.store.clone(), 4, 25).await;
}

#[tokio::test]
async fn cluster_counter_adds_are_exact() {
    let f = common::fixture(common::Backend::Cluster).await;
    adds_are_exact(f.store.clone(), 4, 10).await;
}

#[tokio::test(start_paused = true)]
async fn counter_compare_and_set_overflow_and_foreign_bytes() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let c = Counter::new(store.clone(), "/dcoord/", "cas").unwrap();
    assert_eq!(c.get().await.unwrap(), 0);
    assert!(c.compare_and_set(0, i64::MAX - 1).await.unwrap());
    assert!(!c.compare_and_set(0, 5).await.unwrap());
    assert_eq!(c.add(1).await.unwrap(), i64::MAX);
    let err = c.add(1).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("overflows"),
        "{err}"
    );
    assert_eq!(c.get().await.unwrap(), i64::MAX, "nothing written");
    assert!(matches!(
        Counter::new(store.clone(), "/dcoord/", "a b").unwrap_err(),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        Counter::new(store.clone(), "dcoord", "x").unwrap_err(),
        Error::InvalidArgument(_)
    ));
    mem.put(b"/dcoord/counters/foreign", b"12").await.unwrap();
    let f = Counter::new(store.clone(), "/dcoord/", "foreign").unwrap();
    let err = f.add(1).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert_eq!(
        &mem.get(b"/dcoord/counters/foreign", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap()[..],
        b"12",
        "left alone"
    );
}

async fn until_members(
    rx: &mut watch::Receiver<Vec<Member>>,
    pred: impl Fn(&[Member]) -> bool,
) -> Vec<Member> {
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|m| pred(m)))
        .await
        .expect("the view converges")
        .expect("the view runs")
        .clone()
}

#[tokio::test(start_paused = true)]
async fn members_join_leave_close_and_crash() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let observer = session(store.clone()).await;
    let group = Group::new(&observer, "api").unwrap();
    let mut view = group.watch().await.unwrap();
    assert!(view.borrow().is_empty());
    let (a, b, c) = (
        session(store.clone()).await,
        session(store.clone()).await,
        session(store.clone()).await,
    );
    let ma = Group::new(&a, "api").unwrap().join("a:1").await.unwrap();
    let mb = Group::new(&b, "api").unwrap().join("b:1").await.unwrap();
    let mc = Group::new(&c, "api").unwrap().join("c:1").await.unwrap();
    let seen = until_members(&mut view, |m| m.len() == 3).await;
    let values: Vec<&[u8]> = seen.iter().map(|m| &m.value[..]).collect();
    assert_eq!(values, vec![&b"a:1"[..], b"b:1", b"c:1"], "in join order");
    assert_eq!(seen[0].id, ma.id());
    ma.update("a:2").await.unwrap();
    until_members(&mut view, |m| m.iter().any(|m| m.value == "a:2")).await;
    // Leaving: gone at once.
    mb.leave().await.unwrap();
    until_members(&mut view, |m| m.len() == 2).await;
    // A closed session: its member goes at once, without waiting for a lease.
    let closed = Instant::now();
    std::mem::forget(mc);
    c.close().await.unwrap();
    until_members(&mut view, |m| m.len() == 1).await;
    assert!(
        closed.elapsed() < Duration::from_millis(500),
        "{:?}",
        closed.elapsed()
    );
    // A crash: gone one lease after the last heartbeat, then reaped for everyone.
    std::mem::forget(ma);
    let crashed = Instant::now();
    a.orphan();
    until_members(&mut view, |m| m.is_empty()).await;
    let gone = crashed.elapsed();
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&gone),
        "crashed member gone after {gone:?} (lease 2 s)"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !group.members().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dead entries are reaped");
}

#[tokio::test(start_paused = true)]
async fn a_reaped_member_learns_it_and_views_converge_after_lost_events() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let observer = session(store.clone()).await;
    let group = Group::new(&observer, "lossy").unwrap();
    let mut view = group.watch().await.unwrap();
    mem.drop_next_events(3);
    let m = session(store.clone()).await;
    let me = Group::new(&m, "lossy").unwrap().join("x").await.unwrap();
    until_members(&mut view, |v| v.len() == 1).await;
    assert_eq!(group.members().await.unwrap().len(), 1);
    mem.cancel_watches();
    me.update("y").await.unwrap();
    until_members(&mut view, |v| v.first().is_some_and(|m| m.value == "y")).await;
    // The member's session dies; the member is told.
    m.orphan();
    tokio::time::timeout(Duration::from_secs(10), me.lost())
        .await
        .expect("lost fires");
    until_members(&mut view, |v| v.is_empty()).await;
    let err = me.update("z").await.unwrap_err();
    assert!(matches!(err, Error::SessionLost { .. }), "{err}");
    let err = group.join(vec![0u8; 100 * 1024]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[tokio::test]
async fn cluster_members_are_seen_by_every_observer() {
    let f = common::fixture(common::Backend::Cluster).await;
    let name = format!("g-{}", uuid::Uuid::new_v4().simple());
    let mut sessions = Vec::new();
    let mut views = Vec::new();
    let mut members = Vec::new();
    for i in 0..3 {
        let s = long_session(f.store.clone()).await;
        let g = Group::new(&s, &name).unwrap();
        views.push(g.watch().await.unwrap());
        members.push(g.join(format!("m{i}")).await.unwrap());
        sessions.push(s);
    }
    for v in &mut views {
        until_members(v, |m| m.len() == 3).await;
    }
    members.remove(1).leave().await.unwrap();
    for v in &mut views {
        let now = until_members(v, |m| m.len() == 2).await;
        assert!(now.iter().all(|m| m.value != "m1"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_barrier_holds_everyone_until_released() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let s = session(store.clone()).await;
    let gate = Barrier::new(&s, "deploy").unwrap();
    gate.wait().await.unwrap();
    assert!(gate.hold().await.unwrap());
    assert!(!gate.hold().await.unwrap(), "held already");
    assert!(gate.is_held().await.unwrap());
    let passed = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let other = session(store.clone()).await;
        let (gate, passed) = (Barrier::new(&other, "deploy").unwrap(), passed.clone());
        waiters.push(tokio::spawn(async move {
            gate.wait().await.unwrap();
            passed.fetch_add(1, Ordering::SeqCst);
            drop(other);
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(passed.load(Ordering::SeqCst), 0, "the barrier held");
    gate.release().await.unwrap();
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("released")
            .unwrap();
    }
    assert_eq!(passed.load(Ordering::SeqCst), 3);
}

/// `n` participants on a double barrier: nobody is let in before all `n` arrived, nobody
/// out before all left.
async fn double_barrier_rounds(store: Arc<dyn Store>, n: usize) {
    let name = format!("db-{}", uuid::Uuid::new_v4().simple());
    let entered = Arc::new(AtomicUsize::new(0));
    let left = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, name, entered, left) =
            (store.clone(), name.clone(), entered.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let b = DoubleBarrier::new(&s, &name, n).unwrap();
            tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
            entered.fetch_add(1, Ordering::SeqCst);
            let inside = b.enter().await.unwrap();
            assert_eq!(
                entered.load(Ordering::SeqCst),
                n,
                "let in before all arrived"
            );
            tokio::time::sleep(Duration::from_millis(30 * (n - i) as u64)).await;
            left.fetch_add(1, Ordering::SeqCst);
            inside.leave().await.unwrap();
            assert_eq!(left.load(Ordering::SeqCst), n, "let out before all left");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the round ends")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn mem_double_barrier_enters_and_leaves_together() {
    double_barrier_rounds(Arc::new(MemStore::new()), 4).await;
}

#[tokio::test]
async fn embedded_double_barrier_enters_and_leaves_together() {
    let f = common::fixture(common::Backend::Embedded).await;
    double_barrier_rounds(f.store.clone(), 3).await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_participant_does_not_keep_the_others_inside() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let b = session(store.clone()).await;
    let ba = DoubleBarrier::new(&a, "crash", 2).unwrap();
    let bb = DoubleBarrier::new(&b, "crash", 2).unwrap();
    let (ia, ib) = tokio::join!(ba.enter(), bb.enter());
    let (ia, ib) = (ia.unwrap(), ib.unwrap());
    std::mem::forget(ib);
    let crashed = Instant::now();
    b.orphan();
    ia.leave().await.unwrap();
    let waited = crashed.elapsed();
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&waited),
        "left after {waited:?} (lease 2 s)"
    );
    assert!(matches!(
        DoubleBarrier::new(&a, "zero", 0).unwrap_err(),
        Error::InvalidArgument(_)
    ));
}

/// `dcoord counter` and `dcoord members` as processes against the shared cluster.
#[tokio::test]
async fn counter_and_members_from_the_command_line() {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let (_store, endpoints) = common::shared_remote().await;
    let run = |args: Vec<String>| {
        let endpoints = endpoints.clone();
        async move {
            let out = tokio::process::Command::new(common::binary())
                .args(&args)
                .args(["--endpoints", &endpoints])
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let name = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let adds: Vec<_> = (0..3)
        .map(|_| {
            run(vec![
                "counter".into(),
                name.clone(),
                "add".into(),
                "2".into(),
            ])
        })
        .collect();
    for (code, _, err) in futures::future::join_all(adds).await {
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = run(vec![
        "counter".into(),
        name.clone(),
        "add".into(),
        "-1".into(),
    ])
    .await;
    assert_eq!((code, out.trim()), (Some(0), "5"), "{err}");
    let (_, out, _) = run(vec!["counter".into(), name.clone()]).await;
    assert_eq!(out.trim(), "5");
    let (code, _, err) = run(vec![
        "counter".into(),
        name.clone(),
        "sub".into(),
        "1".into(),
    ])
    .await;
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown operation"), "{err}");

    let mut member = tokio::process::Command::new(common::binary())
        .args([
            "members",
            &name,
            "--join",
            "host-a:1",
            "--endpoints",
            &endpoints,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let listed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, out, _) = run(vec![
                "members".into(),
                name.clone(),
                "-o".into(),
                "json".into(),
            ])
            .await;
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            if v["members"].as_array().unwrap().len() == 1 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the member is listed");
    assert_eq!(listed["members"][0]["value"], "host-a:1", "{listed}");
    // stdin closes: the member leaves and dcoord exits 0.
    member.stdin.take().unwrap().shutdown().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), member.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let (_, out, _) = run(vec!["members".into(), name.clone()]).await;
    assert_eq!(out, "", "the member left");
}

/// A hold whose outcome was unknown is settled (applied once, reported as this caller's), also
/// after a release (which marks the key open instead of deleting it).
#[tokio::test(start_paused = true)]
async fn a_barrier_hold_with_an_unknown_outcome_is_settled() {
    let mem = MemStore::new();
    let s = session(Arc::new(mem.clone())).await;
    let gate = Barrier::new(&s, "ambiguous").unwrap();
    mem.ambiguous_next_writes(1);
    assert!(gate.hold().await.unwrap(), "applied once, reported as ours");
    assert!(!gate.hold().await.unwrap());
    gate.release().await.unwrap();
    assert!(!gate.is_held().await.unwrap());
    // A second holder's hold whose outcome is unknown: it applied, so it is that holder's.
    mem.ambiguous_next_writes(1);
    assert!(gate.hold().await.unwrap());
    assert!(gate.is_held().await.unwrap());
    gate.release().await.unwrap();
    gate.wait().await.unwrap();
}
