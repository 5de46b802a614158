//! The store on the embedded default: start a node in a temp dir, write, claim with CAS, and
//! follow a prefix with watch-first-then-scan. Set `DCOORD_ENDPOINTS=host:port,...` to run the
//! same code against a cluster (for example one started by `dcoord cluster`).
//!
//! Run: `cargo run --release --example quickstart`

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use dcoord::store::{EventKind, WatchTarget};
use futures::StreamExt;

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, _node) = common::store(dir.path()).await?;

    // Watch first, then scan: every change after the scan's revision arrives on the watch.
    let mut watch = store
        .watch(WatchTarget::prefix(&b"/demo/jobs/"[..]), false)
        .await?;
    store.put(b"/demo/jobs/1", b"resize image").await?;
    let scan = store.scan_prefix(b"/demo/jobs/").await?;
    println!(
        "scan: {} job(s) at revision {}",
        scan.entries.len(),
        scan.revision
    );

    // Two workers race to claim job 1; CAS lets exactly one win.
    let claim = b"/demo/claims/1";
    let a = store.compare_and_swap(claim, None, b"worker-a").await?;
    let b = store.compare_and_swap(claim, None, b"worker-b").await?;
    println!("worker-a claimed: {a}, worker-b claimed: {b}");
    assert!(a && !b);

    // Live changes after the scan.
    let t = Instant::now();
    store.put(b"/demo/jobs/2", b"send email").await?;
    store.delete(b"/demo/jobs/1").await?;
    let mut seen = 0;
    while seen < 2 {
        let e = watch.next().await.expect("watch ends only with an error")?;
        if e.revision <= scan.revision {
            continue; // already in the scan
        }
        let kind = match e.kind {
            EventKind::Put => "put",
            EventKind::Delete => "delete",
        };
        println!(
            "event rev {}: {kind} {} {:?}",
            e.revision,
            String::from_utf8_lossy(&e.key),
            String::from_utf8_lossy(&e.value)
        );
        seen += 1;
    }
    println!("two writes observed through the watch in {:?}", t.elapsed());

    // Bad input is a clear error, and nothing is written.
    let err = store
        .watch(WatchTarget::prefix(&b"demo"[..]), false)
        .await
        .err()
        .unwrap();
    println!("bad prefix: {err}");
    if let Some(node) = _node {
        node.stop().await?;
    }
    Ok(())
}
