//! Metrics: a node's `/metrics` (scraped over HTTP from a `dcoord node --metrics-addr` child)
//! moves as writes happen; the library's series (locks, queues, config, watches, sessions,
//! store calls) move as the recipes run on the embedded engine, seen through the Prometheus
//! recorder installed in this test process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{binary, long_session};
use dcoord::config::{ConfigEvent, ConfigOptions, ConfigWatch, Source};
use dcoord::engine::EmbeddedNode;
use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::store::{RemoteOptions, RemoteStore, Store};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` at `addr`; `None` while nothing answers.
async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// The value of the series `name` (exact, labels included) in a scrape.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Scrapes until `done` holds for the text, for at most 30 s (the node sets its figures once a
/// second).
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let wait = async {
        loop {
            if let Some(text) = scrape(addr).await
                && done(&text)
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not seen on http://{addr}/metrics within 30 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_metrics_endpoint_moves_with_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, metrics) = (free_port(), free_port());
    let mut node = tokio::process::Command::new(binary())
        .args(["node", "--listen", &listen.to_string(), "--metrics-addr"])
        .arg(metrics.to_string())
        .arg("--dir")
        .arg(dir.path())
        .arg("--exit-with-stdin")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let text = scrape_until(metrics, "the node leading", |t| {
        value(t, "dcoord_node_is_leader") == Some(1.0)
    })
    .await;
    assert_eq!(value(&text, "dcoord_node_serving"), Some(1.0), "{text}");
    assert_eq!(value(&text, "dcoord_node_leader_id"), Some(1.0), "{text}");
    assert!(text.contains("# HELP dcoord_node_applied_index"), "{text}");
    let before = value(&text, "dcoord_node_applied_index").unwrap();

    let store = RemoteStore::connect(&[listen.to_string()], RemoteOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        store.put(format!("/m/{i}").as_bytes(), b"v").await.unwrap();
    }
    let text = scrape_until(metrics, "five more applied entries", |t| {
        value(t, "dcoord_node_applied_index").is_some_and(|v| v >= before + 5.0)
    })
    .await;
    assert!(
        value(&text, "dcoord_node_keys").is_some_and(|k| k >= 5.0),
        "{text}"
    );
    assert!(
        value(&text, "dcoord_node_last_log_index").unwrap()
            >= value(&text, "dcoord_node_applied_index").unwrap(),
        "{text}"
    );
    assert!(
        value(&text, "dcoord_node_term").is_some_and(|t| t >= 1.0),
        "{text}"
    );
    // d-engine's own series come along.
    assert!(text.contains("raft_write_propose_to_commit_ms"), "{text}");
    drop(node.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), node.wait()).await;
}

#[test]
fn a_taken_metrics_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "node",
            "--listen",
            &free_port().to_string(),
            "--metrics-addr",
        ])
        .arg(taken.local_addr().unwrap().to_string())
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&taken.local_addr().unwrap().to_string()),
        "{err}"
    );
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Flags {
    level: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_series_move_as_the_recipes_run() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    dcoord::metrics::describe();
    let dir = tempfile::tempdir().unwrap();
    let node = EmbeddedNode::start(dir.path()).await.unwrap();
    let store: Arc<dyn Store> = node.dyn_store();
    let session = long_session(store.clone()).await;

    // A lock handed from one holder to a waiter.
    let lock = dcoord::lock::Mutex::new(&session, "m-lock").unwrap();
    let first = lock.acquire().await.unwrap();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire().await.unwrap() })
    };
    common::until(|| handle.render().contains("dcoord_watch_relists_total")).await;
    // Announced, and seen by the releasing handle's mirror of the lock (the same shared
    // mirror in this process): a release takes in the arrivals its mirror shows, so one it
    // does not see yet leaves the lock free, and the waiter takes it without a handoff (seen
    // on a loaded host).
    let base = format!("{}locks/m-lock/", session.root());
    let arrivals = format!("{base}w/");
    let mirror = dcoord::reconcile::Mirror::shared(
        session.store().clone(),
        dcoord::store::WatchTarget::prefix(base),
        dcoord::reconcile::MirrorOptions::default(),
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while lock.info().await.unwrap().waiters.is_empty()
            || mirror
                .snapshot()
                .with_prefix(arrivals.as_bytes())
                .next()
                .is_none()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the waiter queued within 10 s");
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter granted within 10 s")
        .unwrap();
    second.release().await.unwrap();

    // A queue message enqueued, delivered, acked; one failed for good.
    let queue = WorkQueue::open(&session, "m-queue", QueueOptions::default().max_attempts(1))
        .await
        .unwrap();
    for id in ["a", "b"] {
        queue
            .enqueue(b"job", EnqueueOptions::default().id(id))
            .await
            .unwrap();
    }
    let d = queue.next().await.unwrap();
    d.ack().await.unwrap();
    let d = queue.next().await.unwrap();
    d.nack("broken").await.unwrap();

    // A config value applied, then a bad one rejected.
    store.put(b"/m/flags", br#"{"level":1}"#).await.unwrap();
    let config = ConfigWatch::<Flags>::open(
        store.clone(),
        Source::key("/m/flags"),
        ConfigOptions::default(),
    )
    .await
    .unwrap();
    let mut events = Box::pin(config.events());
    config.wait_configured().await.unwrap();
    store.put(b"/m/flags", b"{not json").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.next().await, Some(Ok(ConfigEvent::Rejected { .. }))) {}
    })
    .await
    .expect("the bad value rejected within 10 s");

    let text = handle.render();
    let value = |name: &str| value(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    assert_eq!(value(r#"dcoord_lock_acquired_total{lock="m-lock"}"#), 2.0);
    assert_eq!(value(r#"dcoord_lock_handoffs_total{lock="m-lock"}"#), 1.0);
    assert_eq!(
        value(r#"dcoord_lock_wait_seconds_count{lock="m-lock"}"#),
        2.0
    );
    assert_eq!(
        value(r#"dcoord_queue_enqueued_total{queue="m-queue"}"#),
        2.0
    );
    assert_eq!(value(r#"dcoord_queue_acked_total{queue="m-queue"}"#), 1.0);
    assert_eq!(
        value(r#"dcoord_queue_dead_letters_total{queue="m-queue"}"#),
        1.0
    );
    assert_eq!(
        value(r#"dcoord_config_applied_total{config="/m/flags"}"#),
        1.0
    );
    assert_eq!(
        value(r#"dcoord_config_rejections_total{config="/m/flags"}"#),
        1.0
    );
    assert!(value(r#"dcoord_watch_relists_total{reason="start"}"#) >= 3.0);
    assert!(
        value(
            r#"dcoord_store_request_seconds_count{store="embedded",op="compare_and_swap",outcome="ok"}"#
        ) >= 4.0
    );
    assert!(text.contains("# HELP dcoord_lock_wait_seconds"), "{text}");
    drop((queue, config, lock));
    session.close().await.unwrap();
    node.stop().await.unwrap();
}
