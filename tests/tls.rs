//! TLS: a 3-node cluster that requires client certificates (mTLS), with the lock, the queue and
//! config running over it, then the replica check; and the clear errors of clients that get
//! TLS wrong (wrong CA, no client certificate, plain text against TLS, TLS against plain text).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{binary, long_session};
use dcoord::config::{ConfigOptions, ConfigWatch, Source};
use dcoord::engine::{ClusterOptions, LocalCluster};
use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::store::{Consistency, RemoteOptions, RemoteStore, Store};
use dcoord::tls::{ClientTls, generate_local};

/// A client option set that gives up quickly: every refusal below is immediate.
fn quick(options: RemoteOptions) -> RemoteOptions {
    options.op_deadline(Duration::from_secs(3))
}

async fn refused(endpoints: &[String], options: RemoteOptions) -> String {
    match RemoteStore::connect(endpoints, quick(options)).await {
        Ok(_) => panic!("connected to {endpoints:?}, which it should not"),
        Err(e) => e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Flags {
    level: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_run_over_a_mutual_tls_cluster_and_wrong_clients_get_clear_errors() {
    let cluster = LocalCluster::start(
        ClusterOptions::default()
            .nodes(3)
            .binary(binary())
            .mutual_tls(),
    )
    .await
    .unwrap();
    let endpoints = cluster.endpoints();
    assert!(
        endpoints.iter().all(|e| e.starts_with("https://")),
        "{endpoints:?}"
    );
    let store: Arc<dyn Store> = Arc::new(
        RemoteStore::connect(
            &endpoints,
            cluster
                .remote_options()
                .op_deadline(Duration::from_secs(30)),
        )
        .await
        .unwrap(),
    );

    // Plain store operations and a watch (opened on the leader, over TLS too).
    let mut watch = store
        .watch(dcoord::store::WatchTarget::prefix(&b"/tls/"[..]), false)
        .await
        .unwrap();
    store.put(b"/tls/k", b"v").await.unwrap();
    let event = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut watch),
    )
    .await
    .expect("an event within 10 s")
    .expect("the watch goes on")
    .unwrap();
    assert_eq!(&event.key[..], b"/tls/k");

    // The recipes.
    let session = long_session(store.clone()).await;
    let lock = dcoord::lock::Mutex::new(&session, "tls-lock").unwrap();
    let guard = lock.acquire().await.unwrap();
    guard.fenced_put(b"/tls/owner", b"me").await.unwrap();
    guard.release().await.unwrap();

    let queue = WorkQueue::open(&session, "tls-queue", QueueOptions::default())
        .await
        .unwrap();
    queue
        .enqueue(b"job", EnqueueOptions::default().id("j1"))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), queue.next())
        .await
        .expect("a delivery within 30 s")
        .unwrap();
    assert_eq!(&delivery.payload()[..], b"job");
    delivery.ack().await.unwrap();

    store.put(b"/tls/flags", br#"{"level":1}"#).await.unwrap();
    let config = ConfigWatch::<Flags>::open(
        store.clone(),
        Source::key("/tls/flags"),
        ConfigOptions::default(),
    )
    .await
    .unwrap();
    let mut value = config.wait_configured().await.unwrap();
    assert_eq!(value.borrow_and_update().level, 1);
    config.update(|f| f.level = 2).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while value.borrow_and_update().level != 2 {
            value.changed().await.unwrap();
        }
    })
    .await
    .expect("the update is seen within 10 s");
    drop((queue, lock));
    session.close().await.unwrap();
    assert_eq!(
        store
            .get(b"/tls/owner", Consistency::Linearizable)
            .await
            .unwrap()
            .map(|v| v.ends_with(b"me")),
        Some(true)
    );

    // Clients that get TLS wrong.
    let pki = cluster.pki().expect("a TLS cluster has its CA").clone();
    let other = tempfile::tempdir().unwrap();
    let other_pki = generate_local(other.path(), 1, &[], false).unwrap();

    let wrong_ca = ClientTls::from_ca_file(&other_pki.ca)
        .unwrap()
        .identity_files(&pki.client.0, &pki.client.1)
        .unwrap();
    let err = refused(&endpoints, RemoteOptions::default().tls(wrong_ca)).await;
    assert!(
        err.contains("TLS handshake failed")
            && err.contains("invalid peer certificate: UnknownIssuer"),
        "wrong CA: {err}"
    );

    let plain = refused(&endpoints, RemoteOptions::default()).await;
    assert!(
        plain.contains("--cacert"),
        "https endpoints without a CA: {plain}"
    );
    let hosts: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim_start_matches("https://").to_string())
        .collect();
    let plain = refused(&hosts, RemoteOptions::default()).await;
    assert!(
        plain.contains("the node speaks TLS"),
        "plain text against TLS: {plain}"
    );

    let no_cert = ClientTls::from_ca_file(&pki.ca).unwrap();
    let err = refused(&endpoints, RemoteOptions::default().tls(no_cert)).await;
    assert!(
        err.contains("requires a client certificate") && err.contains("--cert"),
        "no client certificate: {err}"
    );
    eprintln!("no client certificate: {err}");

    let err = ClientTls::from_ca_file(&pki.client.1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("client.key") && err.contains("no PEM certificate"),
        "a key given as the CA: {err}"
    );

    // The CLI: etcdctl's flags.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(binary())
            .args(args)
            .args(["--endpoints", &endpoints.join(","), "--timeout", "3s"])
            .env_remove("DCOORD_CACERT")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.client.0.to_str().unwrap(),
        pki.client.1.to_str().unwrap(),
    );
    let (code, text) = cli(&[
        "put", "/tls/cli", "x", "--cacert", ca, "--cert", cert, "--key", key,
    ]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = cli(&[
        "get", "/tls/cli", "--cacert", ca, "--cert", cert, "--key", key,
    ]);
    assert_eq!((code, text.as_str()), (Some(0), "x"));
    let (code, text) = cli(&["get", "/tls/cli"]);
    assert!(
        code == Some(2) && text.contains("--cacert"),
        "{code:?} {text}"
    );
    let (code, text) = cli(&["get", "/tls/cli", "--cacert", ca]);
    assert!(
        code == Some(3) && text.contains("client certificate"),
        "{code:?} {text}"
    );

    let report = cluster
        .check_replicas(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(report.nodes.len(), 3, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_against_a_plain_node_is_told_so() {
    let cluster = LocalCluster::start(ClusterOptions::default().nodes(1).binary(binary()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_local(dir.path(), 1, &[], false).unwrap();
    let tls = ClientTls::from_ca_file(&pki.ca).unwrap();
    let err = refused(
        &cluster.endpoints(),
        RemoteOptions::default().tls(tls.clone()),
    )
    .await;
    assert!(
        err.contains("TLS is configured"),
        "http:// endpoint with TLS: {err}"
    );
    let hosts: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    let err = refused(&hosts, RemoteOptions::default().tls(tls)).await;
    assert!(
        err.contains("TLS handshake failed"),
        "TLS against plain text: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcoord_node_serves_tls_from_its_flags_and_refuses_a_readable_key() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_local(&dir.path().join("tls"), 1, &[], false).unwrap();
    let node_tls = &pki.nodes[0];
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let node = |data: &str| {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(["node", "--listen", &listen, "--tls-cert"])
            .arg(node_tls.cert())
            .arg("--tls-key")
            .arg(node_tls.key())
            .arg("--tls-ca")
            .arg(node_tls.ca())
            .arg("--dir")
            .arg(dir.path().join(data))
            .arg("--exit-with-stdin")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };
    let mut running = node("n1").spawn().unwrap();
    let store = RemoteStore::connect(
        std::slice::from_ref(&listen),
        RemoteOptions::default()
            .op_deadline(Duration::from_secs(30))
            .tls(pki.client_tls().unwrap()),
    )
    .await
    .unwrap();
    assert!(store.endpoints()[0].starts_with("https://"));
    store.put(b"/tls/flags", b"on").await.unwrap();
    assert_eq!(
        store
            .get(b"/tls/flags", Consistency::Linearizable)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"on"[..])
    );
    drop(running.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), running.wait()).await;

    std::fs::set_permissions(node_tls.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = node("n2").output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("node-1.key") && err.contains("600"), "{err}");
}
