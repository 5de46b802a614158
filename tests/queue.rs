//! `queue::WorkQueue`: the contract, on the in-memory store (paused time) and on the real
//! engine (embedded, 3-node, a consumer process SIGKILLed, a leader kill).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{long_session, session};
use dcoord::Error;
use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::session::Session;
use dcoord::store::Store;
use dcoord::testing::MemStore;
use serde::{Deserialize, Serialize};

async fn open(store: Arc<dyn Store>, name: &str, options: QueueOptions) -> (Session, WorkQueue) {
    let s = session(store).await;
    let q = WorkQueue::open(&s, name, options).await.unwrap();
    (s, q)
}

/// As [`open`], with the default 10 s lease ([`long_session`]): for tests that time no lease.
async fn open_long_lease(
    store: Arc<dyn Store>,
    name: &str,
    options: QueueOptions,
) -> (Session, WorkQueue) {
    let s = long_session(store).await;
    let q = WorkQueue::open(&s, name, options).await.unwrap();
    (s, q)
}

fn opts() -> QueueOptions {
    QueueOptions::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
}

async fn next(q: &WorkQueue) -> dcoord::queue::Delivery {
    tokio::time::timeout(Duration::from_secs(30), q.next())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn enqueue_is_idempotent_by_id_and_delivers_by_priority_then_order() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (_s, q) = open(store, "orders", opts()).await;
    q.enqueue(b"a", EnqueueOptions::default().id("a"))
        .await
        .unwrap();
    q.enqueue(b"a again", EnqueueOptions::default().id("a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    q.enqueue(b"b", EnqueueOptions::default().id("b"))
        .await
        .unwrap();
    q.enqueue(b"urgent", EnqueueOptions::default().id("u").priority(5))
        .await
        .unwrap();
    q.enqueue(
        b"later",
        EnqueueOptions::default()
            .id("l")
            .delay(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(1),
        common::until(|| q.stats().ready + q.stats().delayed >= 4),
    )
    .await
    .unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = next(&q).await;
        order.push((d.id().to_string(), d.payload().clone()));
        d.ack().await.unwrap();
    }
    assert_eq!(
        order.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["u", "a", "b"],
        "priority first, then enqueue order; the delayed one is not visible yet"
    );
    assert_eq!(
        order[1].1, "a",
        "the retried enqueue did not replace the first"
    );
    let d = next(&q).await;
    assert_eq!(d.id(), "l");
    d.ack().await.unwrap();
    // Acked ids stay deduplicated.
    q.enqueue(b"a", EnqueueOptions::default().id("a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(q.stats().ready, 0);
    assert_eq!(q.stats().done, 4);
}

#[tokio::test(start_paused = true)]
async fn failures_retry_with_backoff_then_dead_letter_and_redrive() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (_s, q) = open(store, "retry", opts()).await;
    q.enqueue(b"x", EnqueueOptions::default().id("x"))
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = next(&q).await;
        assert_eq!(d.attempt(), attempt);
        d.nack(&format!("boom {attempt}")).await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(1),
        common::until(|| q.stats().dead >= 1),
    )
    .await
    .unwrap();
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id.as_str(),
            dead[0].attempts,
            dead[0].error.as_str()
        ),
        ("x", 3, "boom 3")
    );
    assert_eq!(q.stats().dead, 1);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), q.next())
            .await
            .is_err(),
        "dead letters are not delivered"
    );
    assert!(q.redrive("x").await.unwrap());
    let d = next(&q).await;
    assert_eq!((d.id(), d.attempt()), ("x", 1));
    d.ack().await.unwrap();
    assert!(!q.redrive("x").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_payload_that_does_not_decode_goes_to_the_dead_letters_without_blocking() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Job {
        n: u32,
    }
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (_s, q) = open(store, "typed", opts()).await;
    q.enqueue(b"{not json", EnqueueOptions::default().id("bad"))
        .await
        .unwrap();
    q.enqueue_json(&Job { n: 7 }, EnqueueOptions::default().id("good"))
        .await
        .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let q2 = q.clone();
    let stats = q
        .run_json(
            2,
            move |_msg, job: Job| {
                let seen = seen2.clone();
                async move {
                    seen.fetch_add(job.n as usize, Ordering::SeqCst);
                    Ok(())
                }
            },
            common::until(move || q2.stats().done + q2.stats().dead >= 2),
        )
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 7);
    assert_eq!((stats.acked, stats.failed), (1, 1));
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "bad");
    assert_eq!(dead[0].attempts, 1, "straight to the dead letters");
    assert!(dead[0].error.contains("payload"), "{}", dead[0].error);
    assert_eq!(dead[0].payload, "{not json");
}

/// An acked message is never delivered again, even when this consumer's index lags its mirror
/// for seconds (found by the fault soak: the index stalled behind a slow tombstone sweep, the
/// orphan check took our own Done tombstone for a claim nobody holds, and gave it back as a
/// Ready message without a payload, which then went to the dead letters as undecodable).
#[tokio::test(start_paused = true)]
async fn an_acked_message_stays_done_while_the_index_lags() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let t0 = tokio::time::Instant::now();
    let (_s, q) = open_long_lease(store, "lag", opts().retention(Duration::ZERO)).await;
    // Tombstones for the sweep one minute after the queue opened.
    for i in 0..200 {
        q.enqueue(b"{}", EnqueueOptions::default().id(format!("old-{i}")))
            .await
            .unwrap();
        next(&q).await.ack().await.unwrap();
    }
    q.enqueue(br#"{"i":1}"#, EnqueueOptions::default().id("m"))
        .await
        .unwrap();
    let d = next(&q).await;
    assert_eq!(d.id(), "m");
    tokio::time::sleep(Duration::from_millis(10)).await;
    // A slow store: the sweep's 200 deletes take seconds.
    mem.set_latency(Duration::from_millis(20));
    tokio::time::sleep_until(t0 + Duration::from_millis(60_200)).await;
    d.ack().await.unwrap();
    for _ in 0..5 {
        let _ = q.stats(); // runs the orphan check
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    mem.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let again = tokio::time::timeout(Duration::from_secs(30), q.next()).await;
    assert!(
        again.is_err(),
        "an acked message was delivered again: {:?}",
        again.map(|d| d.map(|d| (d.id().to_string(), d.attempt(), d.payload().len())))
    );
    let dead = q.dead_letters().await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}

/// Expired tombstones are swept, each by one of the consumers claiming from the queue (they
/// split them as they split claims), not by every consumer.
#[tokio::test(start_paused = true)]
async fn consumers_split_the_tombstone_sweep() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let t0 = tokio::time::Instant::now();
    let (_sa, a) = open_long_lease(store.clone(), "sweep", opts().retention(Duration::ZERO)).await;
    let (_sb, b) = open_long_lease(store.clone(), "sweep", opts().retention(Duration::ZERO)).await;
    for i in 0..40 {
        let q = if i % 2 == 0 { &a } else { &b };
        q.enqueue(b"{}", EnqueueOptions::default().id(format!("old-{i}")))
            .await
            .unwrap();
        next(q).await.ack().await.unwrap();
    }
    let both_see = |done: usize| {
        let (a, b) = (a.clone(), b.clone());
        common::until(move || a.stats().done == done && b.stats().done == done)
    };
    tokio::time::timeout(Duration::from_secs(5), both_see(40))
        .await
        .expect("both consumers see the 40 tombstones");
    // Both claiming just before the janitors' next round (a minute after opening).
    tokio::time::sleep_until(t0 + Duration::from_millis(59_000)).await;
    for (i, q) in [&a, &b].into_iter().enumerate() {
        q.enqueue(b"{}", EnqueueOptions::default().id(format!("new-{i}")))
            .await
            .unwrap();
    }
    let (_da, _db) = (next(&a).await, next(&b).await);
    let gets = mem.op_counts().gets;
    tokio::time::sleep_until(t0 + Duration::from_millis(61_000)).await;
    tokio::time::timeout(Duration::from_secs(5), both_see(0))
        .await
        .expect("every expired tombstone is swept");
    // A sweep reads each tombstone (the memory store reads one key a get) before its
    // conditional delete: 40 reads, and a few of other tasks; 80 if each consumer swept them all.
    let reads = mem.op_counts().gets - gets;
    assert!((40..60).contains(&reads), "{reads} reads for 40 tombstones");
}

/// `once` is true at most once per message, even for a later delivery to the same session
/// whose marker write has an unknown outcome (its re-read finds the earlier delivery's marker).
#[tokio::test(start_paused = true)]
async fn once_stays_once_when_a_redelivery_to_the_same_session_is_ambiguous() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (_s, q) = open(store, "once", opts()).await;
    q.enqueue(b"{}", EnqueueOptions::default().id("m"))
        .await
        .unwrap();
    let first = next(&q).await;
    assert!(first.message().once("effect").await.unwrap());
    first.nack("failed after the effect").await.unwrap();
    let second = next(&q).await;
    assert_eq!((second.id(), second.attempt()), ("m", 2));
    mem.ambiguous_next_writes(1);
    assert!(
        !second.message().once("effect").await.unwrap(),
        "the effect would run twice"
    );
}

/// An ack whose write has an unknown outcome and lands late (after a read that still showed
/// the claim) is an ack: it is not reported as a lost claim, and the message stays done.
#[tokio::test(start_paused = true)]
async fn an_ack_that_lands_late_is_an_ack() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (_s, q) = open(store, "late", opts()).await;
    q.enqueue(b"{}", EnqueueOptions::default().id("m"))
        .await
        .unwrap();
    let d = next(&q).await;
    mem.late_next_writes(1);
    d.ack().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(30), q.next()).await;
    assert!(again.is_err(), "an acked message was delivered again");
    assert_eq!(q.stats().done, 1);
}

/// A redrive whose write lands late is reported as done, and the message runs again.
#[tokio::test(start_paused = true)]
async fn a_redrive_that_lands_late_is_reported_done() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (_s, q) = open(store, "redrive", opts()).await;
    q.enqueue(b"{}", EnqueueOptions::default().id("m"))
        .await
        .unwrap();
    let d = next(&q).await;
    d.message().poison("bad");
    d.nack("bad").await.unwrap();
    mem.late_next_writes(1);
    assert!(q.redrive("m").await.unwrap(), "the redrive applied");
    let d = next(&q).await;
    assert_eq!((d.id(), d.attempt()), ("m", 1));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_consumers_message_is_redelivered_after_its_lease() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (crashing, q1) = open(store.clone(), "crash", opts()).await;
    q1.enqueue(b"job", EnqueueOptions::default().id("j"))
        .await
        .unwrap();
    let d = next(&q1).await;
    std::mem::forget(d); // the handler never finishes...
    crashing.orphan(); // ...and the process is gone
    let crashed = tokio::time::Instant::now();
    let (_s2, q2) = open(store.clone(), "crash", opts()).await;
    let d = next(&q2).await;
    assert_eq!((d.id(), d.attempt()), ("j", 2));
    let waited = crashed.elapsed();
    assert!(
        waited >= Duration::from_millis(1300) && waited <= Duration::from_secs(4),
        "{waited:?}"
    );
    d.ack().await.unwrap();
}

/// A backlog of ready messages never holds a dead consumer's message back: it is redelivered
/// one lease after the crash while the queue is still busy.
#[tokio::test(start_paused = true)]
async fn a_crashed_consumers_message_is_redelivered_after_its_lease_under_a_backlog() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (crashing, q1) = open(store.clone(), "crash-busy", opts()).await;
    q1.enqueue(b"job", EnqueueOptions::default().id("a-crashed"))
        .await
        .unwrap();
    let d = next(&q1).await;
    std::mem::forget(d);
    crashing.orphan();
    let crashed = tokio::time::Instant::now();
    let (_s2, q2) = open(store.clone(), "crash-busy", opts()).await;
    for i in 0..400 {
        q2.enqueue(b"x", EnqueueOptions::default().id(format!("b{i:03}")))
            .await
            .unwrap();
    }
    // One message every 20 ms: the backlog lasts 8 s, well past the 2 s lease.
    let mut handled = 0;
    let waited = loop {
        let d = next(&q2).await;
        if d.id() == "a-crashed" {
            assert_eq!(d.attempt(), 2);
            d.ack().await.unwrap();
            break crashed.elapsed();
        }
        handled += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.ack().await.unwrap();
    };
    assert!(q2.stats().ready > 0, "the backlog is still there");
    assert!(
        waited >= Duration::from_millis(1300) && waited <= Duration::from_secs(4),
        "redelivered after {waited:?} ({handled} others handled first)"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_consumer_makes_no_reads_and_wakes_on_a_new_message() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let (_s, q) = open(
        store.clone(),
        "idle",
        opts().rescan_every(Duration::from_secs(60)),
    )
    .await;
    let waiter = tokio::spawn({
        let q = q.clone();
        async move {
            let d = q.next().await.unwrap();
            let at = tokio::time::Instant::now();
            d.ack().await.unwrap();
            at
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = mem.op_counts();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = mem.op_counts();
    assert_eq!(
        after.reads(),
        before.reads(),
        "no reads while idle: {before:?} -> {after:?}"
    );
    let (_p, producer) = open(store.clone(), "idle", opts()).await;
    let sent = tokio::time::Instant::now();
    producer
        .enqueue(b"wake", EnqueueOptions::default())
        .await
        .unwrap();
    let got = waiter.await.unwrap();
    assert!(
        got - sent < Duration::from_millis(50),
        "woken by the watch, not a poll: {:?}",
        got - sent
    );
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_refused_and_garbage_is_skipped() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let s = session(store.clone()).await;
    let err = WorkQueue::open(&s, "bad/name", opts()).await.unwrap_err();
    assert!(err.to_string().contains("bad/name"), "{err}");
    let q = WorkQueue::open(&s, "input", opts()).await.unwrap();
    let err = q
        .enqueue(b"x", EnqueueOptions::default().id("no spaces"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no spaces"), "{err}");
    let err = q
        .enqueue(
            &vec![0u8; dcoord::keys::MAX_VALUE_LEN],
            EnqueueOptions::default().id("big"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    assert!(
        store
            .scan_prefix(b"/dcoord/queues/")
            .await
            .unwrap()
            .entries
            .is_empty(),
        "nothing written"
    );
    store
        .put(b"/dcoord/queues/input/m/garbage", b"\x01\x02")
        .await
        .unwrap();
    q.enqueue(b"ok", EnqueueOptions::default().id("ok"))
        .await
        .unwrap();
    let d = next(&q).await;
    assert_eq!(d.id(), "ok");
    d.ack().await.unwrap();
    assert_eq!(q.stats().undecodable, 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_running_handlers_finish() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (_s, q) = open(store, "drain", opts()).await;
    for i in 0..4 {
        q.enqueue(format!("{i}").as_bytes(), EnqueueOptions::default())
            .await
            .unwrap();
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Arc::new(AtomicUsize::new(0));
    let s2 = started.clone();
    let run = tokio::spawn({
        let q = q.clone();
        async move {
            q.run(
                2,
                move |_m| {
                    let s2 = s2.clone();
                    async move {
                        s2.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(())
                    }
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "no new claims after shutdown"
    );
    assert_eq!(
        stats.acked, 2,
        "the two running handlers finished and acked"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(q.stats().ready, 2);
}

/// `run` claims up to `claim_ahead` messages beyond its concurrency, never runs more handlers
/// than its concurrency, and gives the claims it never started back when it stops.
#[tokio::test]
async fn run_claims_ahead_of_its_handlers_and_gives_unstarted_claims_back() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (_s, q) = open(store, "ahead", opts().claim_ahead(2)).await;
    for i in 0..5 {
        q.enqueue(b"x", EnqueueOptions::default().id(format!("m{i}")))
            .await
            .unwrap();
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let (q, gate, running, most, started) = (
            q.clone(),
            gate.clone(),
            running.clone(),
            most.clone(),
            started.clone(),
        );
        async move {
            q.run(
                1,
                move |m| {
                    let (gate, running, most) = (gate.clone(), running.clone(), most.clone());
                    started.lock().unwrap().push(m.id.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    }
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });
    let wait = |what: &'static str, f: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(Duration::from_secs(30), common::until(f))
            .await
            .unwrap_or_else(|_| panic!("{what} within 30 s"));
    };
    // One handler running, two more claimed ahead of it.
    let (q2, s2) = (q.clone(), started.clone());
    wait(
        "three claimed, one started",
        Box::new(move || q2.stats().in_flight == 3 && s2.lock().unwrap().len() == 1),
    )
    .await;
    // The handler returns: the next one starts at once (claimed already) and another is claimed.
    gate.add_permits(1);
    let (q2, s2) = (q.clone(), started.clone());
    wait(
        "the next started and a new one claimed",
        Box::new(move || s2.lock().unwrap().len() == 2 && q2.stats().in_flight == 3),
    )
    .await;
    stop_tx.send(()).unwrap();
    gate.add_permits(1);
    let stats = run.await.unwrap().unwrap();
    assert_eq!(stats.acked, 2, "the two started messages were acked");
    assert_eq!(
        started.lock().unwrap().len(),
        2,
        "nothing started after shutdown"
    );
    assert_eq!(most.load(Ordering::SeqCst), 1, "one handler at a time");
    // The two claimed ahead were given back before `run` returned; with the fifth, 3 ready.
    let q2 = q.clone();
    wait(
        "the unstarted claims ready again",
        Box::new(move || q2.stats().ready == 3 && q2.stats().in_flight == 0),
    )
    .await;
}

/// Drains `n` messages with `consumers` consumers running `slots` slots each; returns the
/// (virtual) time it took and the store writes it made.
async fn drain_with(
    mem: &MemStore,
    name: &str,
    n: usize,
    consumers: usize,
    slots: usize,
) -> (Duration, u64) {
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let mut queues = Vec::new();
    for _ in 0..consumers {
        queues.push(open_long_lease(store.clone(), name, opts()).await);
    }
    for i in 0..n {
        queues[0]
            .1
            .enqueue(b"x", EnqueueOptions::default().id(format!("m{i:04}")))
            .await
            .unwrap();
    }
    mem.set_latency(Duration::from_millis(10));
    let writes = mem.op_counts().writes;
    let started = tokio::time::Instant::now();
    let handled = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    for (_, q) in &queues {
        let (q, handled, done_tx, mut done_rx) =
            (q.clone(), handled.clone(), done_tx.clone(), done_rx.clone());
        runs.push(tokio::spawn(async move {
            q.run(
                slots,
                move |_m| {
                    if handled.fetch_add(1, Ordering::SeqCst) + 1 == n {
                        let _ = done_tx.send(true);
                    }
                    async { Ok(()) }
                },
                async move {
                    let _ = done_rx.wait_for(|d| *d).await;
                },
            )
            .await
        }));
    }
    let mut done = done_rx.clone();
    tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d))
        .await
        .expect("drained")
        .unwrap();
    let took = started.elapsed();
    let mut acked = 0;
    for r in runs {
        acked += r.await.unwrap().unwrap().acked;
    }
    assert_eq!(acked, n as u64, "every message handled once");
    mem.set_latency(Duration::ZERO);
    (took, mem.op_counts().writes - writes)
}

/// `run` keeps its concurrency of claims in flight (a claim is one store round trip: claimed
/// one after another, 64 messages would take 64 of them before the acks), and consumers that
/// collide spread over the head of the queue instead of all racing for its first message.
#[tokio::test(start_paused = true)]
async fn run_pipelines_its_claims_and_consumers_spread_over_the_head() {
    // One consumer, 8 slots, 10 ms per store op: about 64 / 8 x (claim + ack) = 160 ms.
    let (took, _) = drain_with(&MemStore::new(), "pipelined", 64, 1, 8).await;
    assert!(
        took < Duration::from_millis(400),
        "claims are pipelined: {took:?}"
    );
    // Two consumers of 4 slots: one claim and one ack per message, plus the claims that lost
    // a race (most would, if both went for the oldest message each time).
    let (took, writes) = drain_with(&MemStore::new(), "spread", 128, 2, 4).await;
    let lost = writes.saturating_sub(2 * 128);
    eprintln!(
        "two consumers: {took:?}, {writes} writes ({lost} beyond one claim and one ack each)"
    );
    assert!(
        lost <= 64,
        "{lost} extra writes for 128 messages: consumers race for the same messages"
    );
}

/// A consumer that stops claiming (alive, its slots busy) keeps its share of the queue only
/// for the steal delay (20 ms): another consumer takes it then, woken for it (no rescan or
/// new message needed).
#[tokio::test(start_paused = true)]
async fn a_busy_consumers_share_is_taken_by_another_after_the_steal_delay() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let never = QueueOptions::default().rescan_every(Duration::from_secs(3600));
    let (_sa, a) = open_long_lease(store.clone(), "steal", never.clone()).await;
    let (_sb, b) = open_long_lease(store.clone(), "steal", never).await;
    // Both claim once, so each sees the other as a consumer sharing the head.
    for i in 0..2 {
        a.enqueue(b"x", EnqueueOptions::default().id(format!("first{i}")))
            .await
            .unwrap();
    }
    let held_by_b = next(&b).await;
    next(&a).await.ack().await.unwrap();
    let n = 24;
    for i in 0..n {
        a.enqueue(b"x", EnqueueOptions::default().id(format!("m{i:03}")))
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .expect("the busy consumer's share is taken without a rescan")
            .unwrap();
        d.ack().await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{n} messages, half of them another's share, in {took:?}"
    );
    held_by_b.ack().await.unwrap();
}

/// How many keys are under `prefix`.
async fn count(store: &dyn Store, prefix: &str) -> usize {
    loop {
        match store.scan_prefix(prefix.as_bytes()).await {
            Ok(scan) => return scan.entries.len(),
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("scan {prefix}: {e}"),
        }
    }
}

/// `producers` × `per_producer` messages, `consumers` consumers (each its own session); every
/// message handled, the effect (a key per message, written with `effect_once`) exactly once.
async fn producers_and_consumers(
    store: Arc<dyn Store>,
    name: &str,
    producers: usize,
    consumers: usize,
    per_producer: usize,
) {
    let total = producers * per_producer;
    let handled = Arc::new(AtomicUsize::new(0));
    let effects = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let (store, handled, effects, done) = (
            store.clone(),
            handled.clone(),
            effects.clone(),
            done.clone(),
        );
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            let (_s, q) = open_long_lease(store, &name, QueueOptions::default()).await;
            let effect_prefix = format!("/t/{name}/effects/");
            q.run(
                4,
                move |m| {
                    let (handled, effects, effect_prefix) =
                        (handled.clone(), effects.clone(), effect_prefix.clone());
                    async move {
                        handled.fetch_add(1, Ordering::SeqCst);
                        let key = format!("{effect_prefix}{}", m.id);
                        if m.effect_once(key.as_bytes(), &m.payload)
                            .await
                            .map_err(|e| e.to_string())?
                        {
                            effects.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(())
                    }
                },
                async move { done.notified().await },
            )
            .await
            .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        let name = name.to_string();
        ids.push(tokio::spawn(async move {
            let (_s, q) = open_long_lease(store, &name, QueueOptions::default()).await;
            let mut ids = Vec::new();
            for i in 0..per_producer {
                ids.push(
                    q.enqueue(format!("{p}/{i}").as_bytes(), EnqueueOptions::default())
                        .await
                        .unwrap(),
                );
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for t in ids {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), total);
    let started = std::time::Instant::now();
    let effect_prefix = format!("/t/{name}/effects/");
    // Wait on the effects themselves: `effect_once` can answer false for the one write that
    // landed (its first attempt timed out, landed late, and the retry found it), so the counter
    // may end below `total`; the keys may not.
    while count(&*store, &effect_prefix).await < total {
        assert!(
            !tasks.iter().any(|t| t.is_finished()),
            "a consumer stopped early (its panic is printed above)"
        );
        if started.elapsed() > Duration::from_secs(180) {
            let prefix = format!("/t/{name}/effects/");
            let done: HashSet<Vec<u8>> = store
                .scan_prefix(prefix.as_bytes())
                .await
                .unwrap()
                .entries
                .into_iter()
                .map(|(k, _)| k[prefix.len()..].to_vec())
                .collect();
            let qp = format!("/dcoord/queues/{name}/m/");
            for (k, v) in store.scan_prefix(qp.as_bytes()).await.unwrap().entries {
                if !done.contains(&k[qp.len()..]) {
                    eprintln!(
                        "unhandled {}: {}",
                        String::from_utf8_lossy(&k),
                        String::from_utf8_lossy(&v)
                    );
                }
            }
            panic!(
                "stuck at {} of {total}",
                count(&*store, &effect_prefix).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every message acked (a Done tombstone), as an observer's mirror sees it: an ack lost to
    // a timed-out write is redelivered and acked again before this holds.
    let (_o, observer) = open(store.clone(), name, QueueOptions::default()).await;
    let acked_by = std::time::Instant::now();
    while observer.stats().done < total {
        assert!(
            acked_by.elapsed() < Duration::from_secs(120),
            "only {} of {total} acked: {:?}",
            observer.stats().done,
            observer.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.notify_waiters();
    let mut acked = 0;
    for t in tasks {
        acked += tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            .acked;
    }
    let scan = store
        .scan_prefix(format!("/t/{name}/effects/").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        scan.entries.len(),
        total,
        "every message's effect exactly once"
    );
    assert!(
        effects.load(Ordering::SeqCst) <= total,
        "an effect reported twice"
    );
    println!(
        "{total} messages: handled {} times, {acked} acks",
        handled.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn embedded_two_producers_four_consumers_lose_nothing() {
    let f = common::fixture(common::Backend::Embedded).await;
    let name = format!("pc-{}", uuid::Uuid::new_v4().simple());
    producers_and_consumers(f.store.clone(), &name, 2, 4, 2500).await;
}

#[tokio::test]
async fn cluster_two_producers_two_consumers_lose_nothing() {
    let f = common::fixture(common::Backend::Cluster).await;
    let name = format!("pc-{}", uuid::Uuid::new_v4().simple());
    producers_and_consumers(f.store.clone(), &name, 2, 2, 2500).await;
}

/// A `dcoord queue consume` process SIGKILLed mid-handler: its message goes to another
/// consumer one lease later, as attempt 2.
#[tokio::test]
async fn a_sigkilled_consumer_process_message_is_redelivered() {
    let (store, endpoints) = common::shared_remote().await;
    let name = format!("kill-{}", uuid::Uuid::new_v4().simple());
    let (_s, q) = open(store.clone(), &name, QueueOptions::default()).await;
    q.enqueue(b"slow job", EnqueueOptions::default().id("slow"))
        .await
        .unwrap();
    let mut child = common::dcoord_child(
        &["queue", "consume", &name, "--lease", "2"],
        &endpoints,
        &["sleep", "10"],
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        common::until(|| q.stats().in_flight > 0),
    )
    .await
    .expect("the child claims the message");
    child.kill().await.unwrap();
    let killed = std::time::Instant::now();
    let d = next(&q).await;
    println!(
        "redelivered {:?} after the consumer's SIGKILL (lease 2 s)",
        killed.elapsed()
    );
    assert_eq!((d.id(), d.attempt()), ("slow", 2));
    assert!(killed.elapsed() < Duration::from_secs(8));
    d.ack().await.unwrap();
}

/// Sends `sig` (`-INT`, `-TERM`) to the child process.
fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([sig, &pid])
        .status();
    assert!(sent.unwrap().success());
}

/// `dcoord queue consume NAME -- sh -c ...`: the command touches `dir/ready`, waits for
/// `dir/go`, then exits 0.
fn gated_consumer(endpoints: &str, name: &str, dir: &std::path::Path) -> tokio::process::Child {
    let script = format!(
        "touch {0}/ready; while [ ! -e {0}/go ]; do sleep 0.02; done; cat > /dev/null",
        dir.display()
    );
    common::dcoord_child(
        &["queue", "consume", name],
        endpoints,
        &["sh", "-c", &script],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap()
}

#[tokio::test]
async fn ctrl_c_lets_the_running_command_finish_and_a_second_one_gives_its_message_back() {
    use tokio::io::AsyncBufReadExt;
    let (store, endpoints) = common::shared_remote().await;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("int-{}", uuid::Uuid::new_v4().simple());
    let (_s, q) = open_long_lease(store.clone(), &name, QueueOptions::default()).await;
    q.enqueue(b"a", EnqueueOptions::default().id("a").priority(1))
        .await
        .unwrap();
    q.enqueue(b"b", EnqueueOptions::default().id("b"))
        .await
        .unwrap();
    let ready = dir.path().join("ready");
    let wait_ready =
        || tokio::time::timeout(Duration::from_secs(30), common::until(|| ready.exists()));

    // One Ctrl-C: the command runs on to its end, its message is acked, nothing more is taken.
    let mut child = gated_consumer(&endpoints, &name, dir.path());
    wait_ready().await.expect("the command runs");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    signal(&child, "-INT");
    let line = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .expect("dcoord says it will stop")
        .unwrap()
        .unwrap_or_default();
    assert!(line.contains("stopping after message \"a\""), "{line}");
    std::fs::write(dir.path().join("go"), "").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("dcoord exits")
        .unwrap();
    assert_eq!(status.code(), Some(130));
    tokio::time::timeout(
        Duration::from_secs(30),
        common::until(|| q.stats().done == 1),
    )
    .await
    .expect("the finished message is acked");
    assert_eq!(q.stats().ready, 1, "b was not taken");

    // Two: the command is stopped and its message given back, the attempt not counted.
    std::fs::remove_file(dir.path().join("go")).unwrap();
    std::fs::remove_file(&ready).unwrap();
    let mut child = gated_consumer(&endpoints, &name, dir.path());
    wait_ready().await.expect("the command runs");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    signal(&child, "-INT");
    tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .expect("dcoord says it will stop")
        .unwrap();
    signal(&child, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("dcoord exits")
        .unwrap();
    assert_eq!(status.code(), Some(130));
    let d = next(&q).await;
    assert_eq!(
        (d.id(), d.attempt()),
        ("b", 1),
        "given back without counting the attempt"
    );
    d.ack().await.unwrap();
}

/// The Raft leader is SIGKILLed while producers and consumers run: nothing is lost, every
/// effect happens once. Enqueues that fail are retried with the same id (idempotent).
#[tokio::test]
async fn leader_kill_mid_run_loses_nothing() {
    let _heavy = common::HEAVY.lock().await;
    let (mut cluster, remote) = common::own_cluster().await;
    let leader = remote.leader_id().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(remote);
    let total = 600;
    let effects = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let (store, effects, stop) = (store.clone(), effects.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let q = WorkQueue::open(
                &s,
                "lk",
                QueueOptions::default().rescan_every(Duration::from_secs(5)),
            )
            .await
            .unwrap();
            q.run(
                4,
                move |m| {
                    let effects = effects.clone();
                    async move {
                        let key = format!("/lk/effects/{}", m.id);
                        if m.effect_once(key.as_bytes(), b"1")
                            .await
                            .map_err(|e| e.to_string())?
                        {
                            effects.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(())
                    }
                },
                async move { stop.notified().await },
            )
            .await
        }));
    }
    let producer = {
        let store = store.clone();
        tokio::spawn(async move {
            let s = long_session(store).await;
            let q = WorkQueue::open(&s, "lk", QueueOptions::default())
                .await
                .unwrap();
            for i in 0..total {
                let id = format!("m{i}");
                loop {
                    match q
                        .enqueue(b"x", EnqueueOptions::default().id(id.clone()))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() || e.is_ambiguous() => continue,
                        Err(e) => panic!("enqueue {id}: {e}"),
                    }
                }
            }
        })
    };
    common::until(|| effects.load(Ordering::SeqCst) >= total / 3).await;
    cluster.kill(leader).unwrap();
    let killed = std::time::Instant::now();
    producer.await.unwrap();
    while count(&*store, "/lk/effects/").await < total {
        if killed.elapsed() > Duration::from_secs(90) {
            let done: HashSet<Vec<u8>> = store
                .scan_prefix(b"/lk/effects/")
                .await
                .unwrap()
                .entries
                .into_iter()
                .map(|(k, _)| k[12..].to_vec())
                .collect();
            for (k, v) in store
                .scan_prefix(b"/dcoord/queues/lk/m/")
                .await
                .unwrap()
                .entries
            {
                let id = &k[b"/dcoord/queues/lk/m/".len()..];
                if !done.contains(id) {
                    eprintln!(
                        "unhandled {}: {}",
                        String::from_utf8_lossy(&k),
                        String::from_utf8_lossy(&v)
                    );
                }
            }
            let finished: Vec<bool> = consumers.iter().map(|c| c.is_finished()).collect();
            panic!(
                "stuck at {}; consumers finished: {finished:?}",
                count(&*store, "/lk/effects/").await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "all {total} messages handled {:?} after the leader kill",
        killed.elapsed()
    );
    stop.notify_waiters();
    for c in consumers {
        // A consumer whose session was lost during the election stops with SessionLost: fine.
        let _ = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap()
            .unwrap();
    }
    // Linearizable reads (a scan on a just-elected leader may lag; see DESIGN).
    for i in 0..total {
        let key = format!("/lk/effects/m{i}");
        let v = store
            .get(key.as_bytes(), dcoord::store::Consistency::Linearizable)
            .await
            .unwrap();
        assert!(v.is_some(), "effect of m{i} missing");
    }
    assert!(
        effects.load(Ordering::SeqCst) <= total,
        "an effect reported twice"
    );
}

#[tokio::test(start_paused = true)]
async fn a_producer_needs_no_session_keeps_its_order_and_is_idempotent_by_id() {
    use dcoord::queue::Producer;
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let producer = Producer::new(store.clone(), "p-jobs").unwrap();
    let ids = producer
        .enqueue_many((0..100).map(|i| {
            (
                format!("job {i}").into_bytes(),
                EnqueueOptions::default().id(format!("j{i:03}")),
            )
        }))
        .await
        .unwrap();
    assert_eq!(ids.len(), 100);
    assert_eq!(ids[7], "j007");
    // Again, and one more by itself: nothing is added twice.
    producer
        .enqueue_many((0..100).map(|i| {
            (
                b"again".to_vec(),
                EnqueueOptions::default().id(format!("j{i:03}")),
            )
        }))
        .await
        .unwrap();
    producer
        .enqueue(b"job 0 again", EnqueueOptions::default().id("j000"))
        .await
        .unwrap();
    // Bad input anywhere in a batch writes nothing of it.
    let err = producer
        .enqueue_many([
            (b"fine".to_vec(), EnqueueOptions::default().id("fine")),
            (b"bad".to_vec(), EnqueueOptions::default().id("no/slash")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(Producer::new(store.clone(), "bad/name").is_err());

    let (_s, q) = open_long_lease(store.clone(), "p-jobs", opts()).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        common::until(|| q.stats().ready >= 100),
    )
    .await
    .unwrap();
    assert_eq!(
        q.stats().ready,
        100,
        "the second batch and the repeat added nothing"
    );
    for i in 0..100 {
        let d = next(&q).await;
        assert_eq!(d.id(), format!("j{i:03}"), "enqueue order");
        assert_eq!(&d.payload()[..], format!("job {i}").as_bytes());
        d.ack().await.unwrap();
    }
}
