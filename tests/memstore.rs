//! The in-memory store's fault injection, under tokio's paused clock.

use std::time::Duration;

use dcoord::Error;
use dcoord::store::{Cas, Consistency, EventKind, Settled, Store, WatchTarget};
use dcoord::testing::{MemOptions, MemStore};
use futures::StreamExt;

fn prefix() -> WatchTarget {
    WatchTarget::prefix(b"/q/".to_vec())
}

#[tokio::test(start_paused = true)]
async fn dropped_events_vanish_silently_but_the_data_is_written() {
    let s = MemStore::new();
    let mut w = s.watch(prefix(), false).await.unwrap();
    s.drop_next_events(2);
    s.put(b"/q/1", b"a").await.unwrap();
    s.put(b"/q/2", b"b").await.unwrap();
    s.put(b"/q/3", b"c").await.unwrap();
    let e = w.next().await.unwrap().unwrap();
    assert_eq!(&e.key[..], b"/q/3", "the first two events were dropped");
    assert_eq!(s.scan_prefix(b"/q/").await.unwrap().entries.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn failed_ops_change_nothing_and_are_retryable() {
    let s = MemStore::new();
    s.fail_next_ops(2);
    let err = s.put(b"/q/1", b"a").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        s.get(b"/q/1", Consistency::Linearizable)
            .await
            .unwrap_err()
            .is_retryable()
    );
    assert_eq!(
        s.get(b"/q/1", Consistency::Linearizable).await.unwrap(),
        None
    );
    assert_eq!(s.revision(), 0);
}

#[tokio::test(start_paused = true)]
async fn ambiguous_write_is_applied_and_reported_unknown() {
    let s = MemStore::new();
    let mut w = s.watch(prefix(), false).await.unwrap();
    s.ambiguous_next_writes(1);
    let err = s.compare_and_swap(b"/q/1", None, b"a").await.unwrap_err();
    assert!(err.is_ambiguous() && !err.is_retryable(), "{err}");
    assert_eq!(
        s.get(b"/q/1", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "a"
    );
    assert_eq!(w.next().await.unwrap().unwrap().kind, EventKind::Put);
}

#[tokio::test(start_paused = true)]
async fn slow_watcher_is_canceled_when_its_buffer_fills() {
    let s = MemStore::with_options(MemOptions::default().watcher_buffer(4));
    let mut w = s.watch(prefix(), false).await.unwrap();
    for i in 0..10 {
        s.put(format!("/q/{i}").as_bytes(), b"v").await.unwrap();
    }
    let mut got = 0;
    loop {
        match w.next().await.unwrap() {
            Ok(_) => got += 1,
            Err(e) => {
                assert!(matches!(e, Error::WatchCanceled { .. }), "{e}");
                break;
            }
        }
    }
    assert_eq!(got, 4, "d-engine delivers `buffer` events, then Canceled");
    assert!(w.next().await.is_none(), "nothing after the terminal error");
    assert_eq!(s.watch_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn latency_is_injected_on_the_paused_clock() {
    let s = MemStore::new();
    s.set_latency(Duration::from_millis(250));
    let start = tokio::time::Instant::now();
    s.put(b"/q/1", b"a").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn ttl_key_outlives_its_ttl_until_the_sweep_and_keeps_ttl_across_put() {
    let s =
        MemStore::with_options(MemOptions::default().ttl_sweep_interval(Duration::from_secs(10)));
    s.put_with_ttl(b"/q/t", b"v", Duration::from_millis(1500))
        .await
        .unwrap();
    // Rounded up to 2 s; a plain put keeps the TTL (d-engine 0.2.4).
    s.put(b"/q/t", b"w").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        s.get(b"/q/t", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "w",
        "expired but not swept yet"
    );
    assert!(
        !s.compare_and_swap(b"/q/t", None, b"x").await.unwrap(),
        "still CAS-visible"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        s.get(b"/q/t", Consistency::Linearizable).await.unwrap(),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn op_counts_show_an_idle_watcher_makes_no_reads() {
    let s = MemStore::new();
    let _w = s.watch(prefix(), false).await.unwrap();
    let before = s.op_counts();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(s.op_counts(), before);
    s.get(b"/q/x", Consistency::Eventual).await.unwrap();
    assert_eq!(s.op_counts().reads(), before.reads() + 1);
}

// `Cas::settle`: an unknown outcome is settled by re-sending the identical CAS.

async fn value(s: &MemStore, key: &[u8]) -> Option<bytes::Bytes> {
    s.get(key, Consistency::Linearizable).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_cas_that_lands_late_is_settled_as_applied() {
    let s = MemStore::new();
    s.late_next_writes(1);
    let got = Cas::new(&s, b"/q/k", None, b"v").settle().await.unwrap();
    assert_eq!(got, Settled::Applied);
    assert_eq!(value(&s, b"/q/k").await.unwrap(), "v");
}

#[tokio::test(start_paused = true)]
async fn a_refused_cas_reports_what_is_stored() {
    let s = MemStore::new();
    s.put(b"/q/k", b"x").await.unwrap();
    let got = Cas::new(&s, b"/q/k", Some(b"a"), b"b")
        .settle()
        .await
        .unwrap();
    assert_eq!(
        got,
        Settled::Rejected {
            current: Some("x".into()),
            maybe_applied: false
        }
    );
}

#[tokio::test(start_paused = true)]
async fn bytes_anyone_could_write_are_never_claimed_after_an_unknown_outcome() {
    let s = MemStore::new();
    s.put(b"/q/k", b"a").await.unwrap();
    s.ambiguous_next_writes(1);
    let got = Cas::new(&s, b"/q/k", Some(b"a"), b"b")
        .not_unique()
        .settle()
        .await
        .unwrap();
    assert_eq!(
        got,
        Settled::Rejected {
            current: Some("b".into()),
            maybe_applied: true
        },
        "the stored b may be another writer's"
    );
}

#[tokio::test(start_paused = true)]
async fn an_overtaken_cas_applies_at_most_once_when_values_are_unique() {
    let s = MemStore::new();
    s.put(b"/q/k", b"a1").await.unwrap();
    s.overtaken_next_writes(1, 2);
    let got = Cas::new(&s, b"/q/k", Some(b"a1"), b"b1")
        .settle()
        .await
        .unwrap();
    assert_eq!(got, Settled::Applied, "the re-send applied");
    // Another writer moves on; the first request lands after it and is refused.
    assert!(
        s.compare_and_swap(b"/q/k", Some(b"b1"), b"a2")
            .await
            .unwrap()
    );
    assert_eq!(value(&s, b"/q/k").await.unwrap(), "a2");
}

#[tokio::test(start_paused = true)]
async fn an_overtaken_cas_lands_again_when_values_repeat() {
    // Why the contract asks for unique values: A -> B -> A lets the stale request apply.
    let s = MemStore::new();
    s.put(b"/q/k", b"a").await.unwrap();
    s.overtaken_next_writes(1, 2);
    let got = Cas::new(&s, b"/q/k", Some(b"a"), b"b")
        .settle()
        .await
        .unwrap();
    assert_eq!(got, Settled::Applied);
    assert!(s.compare_and_swap(b"/q/k", Some(b"b"), b"a").await.unwrap());
    assert_eq!(
        value(&s, b"/q/k").await.unwrap(),
        "b",
        "the old request applied"
    );
}
