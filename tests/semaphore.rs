//! `semaphore::Semaphore` and `rwlock::RwLock`: the contract, on the in-memory store (paused
//! time, fault injection), the embedded engine and the shared 3-node cluster.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{long_session, session};
use dcoord::Error;
use dcoord::rwlock::RwLock;
use dcoord::semaphore::Semaphore;
use dcoord::store::{EventKind, Store, WatchTarget};
use dcoord::testing::MemStore;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

/// `contenders` sessions take 1..=3 of 4 permits `rounds` times each: the permits held at once
/// never exceed 4, and tokens strictly increase in grant order.
async fn never_more_than_n_permits(store: Arc<dyn Store>, contenders: usize, rounds: usize) {
    const N: u64 = 4;
    let name = format!("sem-{}", uuid::Uuid::new_v4().simple());
    let held = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..contenders {
        let (store, name, held, peak, tokens) = (
            store.clone(),
            name.clone(),
            held.clone(),
            peak.clone(),
            tokens.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let sem = Semaphore::new(&s, &name, N).unwrap();
            for r in 0..rounds {
                let n = 1 + ((c + r) % 3) as u64;
                let permit = sem.acquire(n).await.unwrap();
                assert_eq!(permit.permits(), n);
                let now = held.fetch_add(n, Ordering::SeqCst) + n;
                assert!(now <= N, "{now} permits held at once");
                peak.fetch_max(now, Ordering::SeqCst);
                tokens.lock().unwrap().push(permit.fencing_token());
                tokio::time::sleep(Duration::from_millis(1)).await;
                held.fetch_sub(n, Ordering::SeqCst);
                permit.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), contenders * rounds);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        contenders * rounds,
        "a token was granted twice"
    );
    assert!(peak.load(Ordering::SeqCst) > 1, "permits were never shared");
}

#[tokio::test(start_paused = true)]
async fn mem_never_more_than_n_permits() {
    never_more_than_n_permits(Arc::new(MemStore::new()), 8, 20).await;
}

#[tokio::test]
async fn embedded_never_more_than_n_permits() {
    let f = common::fixture(common::Backend::Embedded).await;
    never_more_than_n_permits(f.store.clone(), 8, 10).await;
}

#[tokio::test]
async fn cluster_never_more_than_n_permits() {
    let f = common::fixture(common::Backend::Cluster).await;
    never_more_than_n_permits(f.store.clone(), 6, 5).await;
}

async fn until_waiters(sem: &Semaphore, n: usize) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while sem.info().await.unwrap().waiters.len() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never {n} waiters"));
}

/// Waits until no key is left under `prefix`, for at most `within`.
async fn until_none_under(store: &Arc<dyn Store>, prefix: &str, within: Duration, what: &str) {
    tokio::time::timeout(within, async {
        while !store
            .scan_prefix(prefix.as_bytes())
            .await
            .unwrap()
            .entries
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} never deleted"));
}

#[tokio::test(start_paused = true)]
async fn requests_are_served_in_order_and_a_small_one_never_passes_a_big_one() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let sem = Semaphore::new(&a, "order", 4).unwrap();
    let three = sem.acquire(3).await.unwrap();
    let b = session(store.clone()).await;
    let big = {
        let sem = Semaphore::new(&b, "order", 4).unwrap();
        tokio::spawn(async move { (sem.acquire(2).await.unwrap(), Instant::now()) })
    };
    until_waiters(&sem, 1).await;
    let c = session(store.clone()).await;
    let small = {
        let sem = Semaphore::new(&c, "order", 4).unwrap();
        tokio::spawn(async move { (sem.acquire(1).await.unwrap(), Instant::now()) })
    };
    until_waiters(&sem, 2).await;
    // One permit is free, but the 1-permit request waits behind the 2-permit one.
    assert!(
        sem.try_acquire(1).await.unwrap().is_none(),
        "nobody jumps the queue"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!small.is_finished(), "the small request passed the big one");
    let released = Instant::now();
    three.release().await.unwrap();
    let ((p2, t2), (p1, t1)) = (big.await.unwrap(), small.await.unwrap());
    assert!(t2 >= released && t1 >= released);
    assert!(p1.fencing_token() > p2.fencing_token(), "granted in order");
    let info = sem.info().await.unwrap();
    assert_eq!((info.available, info.holders.len()), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holders_permits_are_taken_back_after_its_lease() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let permit = Semaphore::new(&a, "crash", 2)
        .unwrap()
        .acquire(2)
        .await
        .unwrap();
    let token = permit.fencing_token();
    std::mem::forget(permit);
    let crashed = Instant::now();
    a.orphan();
    let b = session(store.clone()).await;
    let sem = Semaphore::new(&b, "crash", 2).unwrap();
    let p = sem.acquire(1).await.unwrap();
    let waited = crashed.elapsed();
    assert!(p.fencing_token() > token);
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&waited),
        "took back after {waited:?} (lease 2 s)"
    );
    assert_eq!(
        sem.info().await.unwrap().available,
        1,
        "the dead holder's permits are free"
    );
}

/// Releases with a capacity above 1 are markers the next writer applies: a holder that
/// releases and crashes at once is not waited for, one grant write serves every release it
/// sees, and the markers are deleted once applied.
#[tokio::test(start_paused = true)]
async fn released_permits_are_handed_on_without_waiting_and_markers_are_swept() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (a, b, c) = (
        session(store.clone()).await,
        session(store.clone()).await,
        session(store.clone()).await,
    );
    let name = "markers";
    let (sa, sb, sc) = (
        Semaphore::new(&a, name, 2).unwrap(),
        Semaphore::new(&b, name, 2).unwrap(),
        Semaphore::new(&c, name, 2).unwrap(),
    );
    let pa = sa.acquire(1).await.unwrap();
    let pb = sb.acquire(1).await.unwrap();
    let waiting = tokio::spawn(async move { sc.acquire(2).await.map(|p| (p, sc)) });
    until_waiters(&sb, 1).await;
    // a releases and its process dies at once; b releases too.
    let started = Instant::now();
    pa.release().await.unwrap();
    a.orphan();
    assert_eq!(sb.info().await.unwrap().available, 1, "a's permit is free");
    pb.release().await.unwrap();
    let (pc, sc) = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("c is granted without waiting for a's lease")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(pc.permits(), 2);
    let info = sc.info().await.unwrap();
    assert_eq!((info.available, info.holders.len()), (0, 1));
    // The grant applied both markers: they are deleted.
    let markers = format!("{}semaphores/{name}/r/", c.root());
    until_none_under(
        &store,
        &markers,
        Duration::from_secs(1),
        "the applied markers",
    )
    .await;
    pc.release().await.unwrap();
    assert_eq!(sc.info().await.unwrap().available, 2);
}

/// The keys a handoff leaves with no job (the release marker it applies, the arrival key of
/// the waiter it takes in) go with the grant's write, in the same transaction: no separate
/// deletes, and nothing left behind once the waiter holds. A store without transactions gets
/// the same end state from deletes after the write.
async fn a_handoff_takes_its_garbage_along(store: MemStore, transactions: bool) {
    // Every op takes a while: deletes sent after the grant would still be on their way.
    store.set_latency(Duration::from_millis(10));
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    // Capacity 1 hands off by the holder's write (garbage: the waiter's arrival), and so does
    // capacity 2 where the record is still the one the holder saw; without transactions
    // capacity 2 hands off by the waiter's write (garbage: the holder's release marker and the
    // waiter's arrival).
    for capacity in [1u64, 2] {
        let name = format!("garbage-{capacity}");
        let mut sems = Vec::new();
        for _ in 0..=capacity {
            let s = long_session(dyn_store.clone()).await;
            sems.push((Semaphore::new(&s, &name, capacity).unwrap(), s));
        }
        let (last, _) = sems.pop().unwrap();
        let mut held = Vec::new();
        for (sem, _) in &sems {
            held.push(sem.acquire(1).await.unwrap());
        }
        let waiting = {
            let last = last.clone();
            tokio::spawn(async move { last.acquire(1).await })
        };
        until_waiters(&last, 1).await;
        let base = format!("{}semaphores/{name}/", sems[0].1.root());
        let mut events = dyn_store
            .watch(WatchTarget::prefix(base.clone()), false)
            .await
            .unwrap();
        held.remove(0).release().await.unwrap();
        let next = waiting.await.unwrap().unwrap();
        let left = |scan: dcoord::store::Scan| {
            scan.entries
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k[base.len()..]).into_owned())
                .filter(|k| k != "rec")
                .collect::<Vec<_>>()
        };
        tokio::time::timeout(Duration::from_secs(1), async {
            while !left(dyn_store.scan_prefix(base.as_bytes()).await.unwrap()).is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("capacity {capacity}: the garbage is never deleted"));
        // Deleted in a write of the record (at its revision), or after it.
        let (mut record_writes, mut deletes) = (Vec::new(), Vec::new());
        while let Some(Some(Ok(e))) = events.next().now_or_never() {
            let key = String::from_utf8_lossy(&e.key[base.len()..]).into_owned();
            match e.kind {
                EventKind::Put if key == "rec" => record_writes.push(e.revision),
                EventKind::Delete => deletes.push((key, e.revision)),
                EventKind::Put => {}
            }
        }
        let expected = if capacity == 1 || transactions { 1 } else { 2 };
        assert_eq!(deletes.len(), expected, "capacity {capacity}: {deletes:?}");
        for (key, revision) in deletes {
            assert_eq!(
                record_writes.contains(&revision),
                transactions,
                "capacity {capacity}: {key} deleted at {revision}, record written at {record_writes:?}"
            );
        }
        next.release().await.unwrap();
        for h in held {
            h.release().await.unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_handoff_deletes_its_marker_and_arrival_in_the_grants_write() {
    a_handoff_takes_its_garbage_along(MemStore::new(), true).await;
}

#[tokio::test(start_paused = true)]
async fn without_transactions_a_handoffs_garbage_is_deleted_after_it() {
    let store =
        MemStore::with_options(dcoord::testing::MemOptions::default().without_transactions());
    a_handoff_takes_its_garbage_along(store, false).await;
}

/// Releases of one process are written together: four holders release at once and ONE
/// write of the record grants the four waiters, with no release marker at all.
#[tokio::test(start_paused = true)]
async fn releases_of_one_process_hand_off_in_one_write() {
    let store = MemStore::new();
    store.set_latency(Duration::from_millis(10));
    let dyn_store: Arc<dyn Store> = Arc::new(store);
    let name = "one-write";
    let mut sems = Vec::new();
    for _ in 0..8 {
        let s = long_session(dyn_store.clone()).await;
        sems.push((Semaphore::new(&s, name, 4).unwrap(), s));
    }
    let mut held = Vec::new();
    for (sem, _) in &sems[..4] {
        held.push(sem.acquire(1).await.unwrap());
    }
    let mut waiting = Vec::new();
    for (i, (sem, _)) in sems[4..].iter().enumerate() {
        let sem = sem.clone();
        waiting.push(tokio::spawn(async move { sem.acquire(1).await }));
        until_waiters(&sems[0].0, i + 1).await;
    }
    let base = format!("{}semaphores/{name}/", sems[0].1.root());
    let mut events = dyn_store
        .watch(WatchTarget::prefix(base.clone()), false)
        .await
        .unwrap();
    futures::future::try_join_all(held.into_iter().map(|p| p.release()))
        .await
        .unwrap();
    let mut granted = Vec::new();
    for w in waiting {
        granted.push(w.await.unwrap().unwrap());
    }
    let mut record_writes = 0;
    while let Some(Some(Ok(e))) = events.next().now_or_never() {
        let key = String::from_utf8_lossy(&e.key[base.len()..]).into_owned();
        assert!(
            !key.starts_with("r/"),
            "no release marker: {key} {:?}",
            e.kind
        );
        if key == "rec" {
            record_writes += 1;
        }
    }
    assert_eq!(
        record_writes, 1,
        "the four releases and grants are one write"
    );
    for p in granted {
        p.release().await.unwrap();
    }
    assert_eq!(sems[0].0.info().await.unwrap().available, 4);
}

/// Releases of two processes at once (two store handles: each has its own mirror and its own
/// queue of releases): the first write to land hands off; the other finds the record changed
/// and puts its release marker in the same write instead, which a later write applies. Every
/// waiter is granted, never more than the permits, and the marker is swept.
#[tokio::test(start_paused = true)]
async fn a_release_that_loses_to_another_process_leaves_a_marker_in_the_same_write() {
    let store = MemStore::new();
    store.set_latency(Duration::from_millis(10));
    let one: Arc<dyn Store> = Arc::new(store.clone());
    let two: Arc<dyn Store> = Arc::new(store.clone());
    let name = "two-processes";
    let (a, b) = (
        long_session(one.clone()).await,
        long_session(two.clone()).await,
    );
    let (sa, sb) = (
        Semaphore::new(&a, name, 2).unwrap(),
        Semaphore::new(&b, name, 2).unwrap(),
    );
    let (pa, pb) = (sa.acquire(1).await.unwrap(), sb.acquire(1).await.unwrap());
    let mut waiting = Vec::new();
    for i in 0..2 {
        let s = long_session(one.clone()).await;
        let sem = Semaphore::new(&s, name, 2).unwrap();
        waiting.push(tokio::spawn(async move {
            let _s = s;
            sem.acquire(1).await
        }));
        until_waiters(&sa, i + 1).await;
    }
    let base = format!("{}semaphores/{name}/", a.root());
    let mut events = one
        .watch(WatchTarget::prefix(base.clone()), false)
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(pa.release(), pb.release());
    ra.unwrap();
    rb.unwrap();
    let mut granted = Vec::new();
    for w in waiting {
        granted.push(
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("both waiters are granted well within the lease")
                .unwrap()
                .unwrap(),
        );
    }
    let info = sa.info().await.unwrap();
    assert_eq!((info.available, info.holders.len()), (0, 2));
    let markers = format!("{base}r/");
    until_none_under(&one, &markers, Duration::from_secs(2), "the marker").await;
    let mut marker_puts = 0;
    while let Some(Some(Ok(e))) = events.next().now_or_never() {
        if e.key.starts_with(markers.as_bytes()) && e.kind == EventKind::Put {
            marker_puts += 1;
        }
    }
    assert_eq!(
        marker_puts, 1,
        "one release handed off, the other left a marker"
    );
    for p in granted {
        p.release().await.unwrap();
    }
    assert_eq!(sa.info().await.unwrap().available, 2);
}

/// The first waiter a batch of releases grants writes the grant for all of them; one that is
/// alive but does not write (its task not polled, its view behind) does not hold the others
/// for its lease: they write it themselves after a short patience.
#[tokio::test(start_paused = true)]
async fn a_stalled_batch_writer_is_written_for_well_within_its_lease() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (a, b, w, d) = (
        long_session(store.clone()).await,
        long_session(store.clone()).await,
        long_session(store.clone()).await,
        long_session(store.clone()).await,
    );
    let name = "stalled-writer";
    let open = |s| Semaphore::new(s, name, 2).unwrap();
    let (sa, sb, sw, sd) = (open(&a), open(&b), open(&w), open(&d));
    let pa = sa.acquire(1).await.unwrap();
    let pb = sb.acquire(1).await.unwrap();
    // w queues first, then its task stops being polled (its session keeps beating).
    let mut stalled = Box::pin(sw.acquire(1));
    tokio::select! {
        _ = &mut stalled => panic!("w cannot be granted yet"),
        _ = until_waiters(&sa, 1) => {}
    }
    let waiting = tokio::spawn(async move { sd.acquire(1).await.map(|p| (p, sd)) });
    until_waiters(&sa, 2).await;
    let started = Instant::now();
    pa.release().await.unwrap();
    pb.release().await.unwrap();
    let (pd, sd) = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("d writes the batch itself, long before w's 10 s lease")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    // d's write granted w too: w is granted as soon as it runs again.
    let pw = tokio::time::timeout(Duration::from_secs(1), stalled)
        .await
        .expect("w's grant is in the record")
        .unwrap();
    assert!(pw.fencing_token() != pd.fencing_token());
    let info = sd.info().await.unwrap();
    assert_eq!((info.available, info.holders.len()), (0, 2));
    pw.release().await.unwrap();
    pd.release().await.unwrap();
    assert_eq!(sd.info().await.unwrap().available, 2);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_acquire_leaves_no_residue_and_bad_input_is_refused() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let a = session(store.clone()).await;
    let sem = Semaphore::new(&a, "cancel", 2).unwrap();
    let all = sem.acquire(2).await.unwrap();
    let b = session(store.clone()).await;
    let sb = Semaphore::new(&b, "cancel", 2).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sb.acquire(1))
            .await
            .is_err()
    );
    until_waiters(&sem, 0).await;
    all.release().await.unwrap();
    assert_eq!(sem.info().await.unwrap().available, 2);
    // Bad input: a clear error, nothing written.
    let err = sem.acquire(3).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("3 of 2"),
        "{err}"
    );
    assert!(matches!(
        sem.acquire(0).await.unwrap_err(),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        Semaphore::new(&a, "zero", 0).unwrap_err(),
        Error::InvalidArgument(_)
    ));
    let other = Semaphore::new(&b, "cancel", 5).unwrap();
    let err = other.acquire(1).await.unwrap_err();
    assert!(
        matches!(err, Error::Decode { .. }) && err.to_string().contains("capacity 2"),
        "{err}"
    );
    assert_eq!(
        sem.info().await.unwrap().holders.len(),
        0,
        "nothing was written"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_converge_after_lost_watch_events() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let a = session(store.clone()).await;
    let sem = Semaphore::new(&a, "lossy", 1).unwrap();
    let p = sem.acquire(1).await.unwrap();
    let b = session(store.clone()).await;
    let sb = Semaphore::new(&b, "lossy", 1).unwrap();
    let waiter = tokio::spawn(async move { sb.acquire(1).await.unwrap() });
    until_waiters(&sem, 1).await;
    // The release's event never reaches the waiter: its periodic re-read finds the grant.
    mem.drop_next_events(5);
    p.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("granted despite the lost event")
        .unwrap();
    assert_eq!(granted.permits(), 1);
}

#[tokio::test(start_paused = true)]
async fn readers_share_a_writer_excludes_and_is_never_starved() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lock = RwLock::new(&a, "catalog").unwrap();
    let r1 = lock.read().await.unwrap();
    let r2 = lock.read().await.unwrap();
    assert!(!r1.is_write());
    assert!(lock.try_write().await.unwrap().is_none(), "readers hold it");
    let b = session(store.clone()).await;
    let writer = {
        let lock = RwLock::new(&b, "catalog").unwrap();
        tokio::spawn(async move { lock.write().await.unwrap() })
    };
    let waiting = |n: usize| {
        let lock = lock.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                while lock.info().await.unwrap().waiters.len() != n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("queued")
        }
    };
    waiting(1).await;
    // A reader arriving after the waiting writer waits for it.
    let c = session(store.clone()).await;
    let late_reader = {
        let lock = RwLock::new(&c, "catalog").unwrap();
        tokio::spawn(async move { lock.read().await.unwrap() })
    };
    waiting(2).await;
    assert!(
        lock.try_read().await.unwrap().is_none(),
        "a writer waits: no new readers"
    );
    let info = lock.info().await.unwrap();
    assert_eq!((info.readers.len(), info.writer.as_ref()), (2, None));
    assert_eq!(info.waiters, vec![(b.id(), true), (c.id(), false)]);
    r1.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "one reader still holds");
    let last_read = r2.fencing_token();
    r2.release().await.unwrap();
    let w = writer.await.unwrap();
    assert!(w.is_write() && w.fencing_token() > last_read);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!late_reader.is_finished(), "the writer holds");
    assert_eq!(lock.info().await.unwrap().writer, Some(b.id()));
    let write_token = w.fencing_token();
    w.release().await.unwrap();
    let r = late_reader.await.unwrap();
    assert!(r.fencing_token() > write_token);
}

/// Readers and writers on one lock from many sessions: a writer is always alone.
async fn rwlock_excludes_writers(store: Arc<dyn Store>, contenders: usize, rounds: usize) {
    let name = format!("rw-{}", uuid::Uuid::new_v4().simple());
    let readers = Arc::new(AtomicU64::new(0));
    let writers = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..contenders {
        let (store, name, readers, writers) = (
            store.clone(),
            name.clone(),
            readers.clone(),
            writers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let lock = RwLock::new(&s, &name).unwrap();
            for r in 0..rounds {
                if (c + r) % 3 == 0 {
                    let w = lock.write().await.unwrap();
                    assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0, "two writers");
                    assert_eq!(readers.load(Ordering::SeqCst), 0, "a writer among readers");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    writers.fetch_sub(1, Ordering::SeqCst);
                    w.release().await.unwrap();
                } else {
                    let g = lock.read().await.unwrap();
                    readers.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(
                        writers.load(Ordering::SeqCst),
                        0,
                        "a reader beside a writer"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    readers.fetch_sub(1, Ordering::SeqCst);
                    g.release().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn mem_rwlock_writers_are_alone() {
    rwlock_excludes_writers(Arc::new(MemStore::new()), 6, 15).await;
}

#[tokio::test]
async fn embedded_rwlock_writers_are_alone() {
    let f = common::fixture(common::Backend::Embedded).await;
    rwlock_excludes_writers(f.store.clone(), 6, 9).await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_writer_is_taken_over_after_its_lease() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let w = RwLock::new(&a, "crash").unwrap().write().await.unwrap();
    let token = w.fencing_token();
    std::mem::forget(w);
    let crashed = Instant::now();
    a.orphan();
    let b = session(store.clone()).await;
    let r = RwLock::new(&b, "crash").unwrap().read().await.unwrap();
    let waited = crashed.elapsed();
    assert!(r.fencing_token() > token);
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&waited),
        "took over after {waited:?} (lease 2 s)"
    );
    let info = RwLock::new(&b, "crash").unwrap().info().await.unwrap();
    assert_eq!((info.writer, info.readers), (None, vec![b.id()]));
}
