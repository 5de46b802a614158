//! The `dcoord` command line against a local 3-node cluster: data on stdout, exit codes, and a
//! `put` that succeeds right after the leader is SIGKILLed.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{HEAVY, binary};
use dcoord::engine::{ClusterOptions, LocalCluster};

fn dcoord(endpoints: &[String], args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .output()
        .expect("run dcoord")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `dcoord watch --prefix /cli/w/ --count 1 ARGS`, started, then `put KEY VALUE`: its output.
async fn watch_one(eps: &[String], args: &[&str], key: &str, value: &str) -> Output {
    let mut watch = Command::new(binary())
        .args(["watch", "--prefix", "/cli/w/", "--count", "1"])
        .args(args)
        .arg("--endpoints")
        .arg(eps.join(","))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The watch is registered once "watching" is on stderr.
    let mut stderr = watch.stderr.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut seen = String::new();
        while !seen.contains("watching") {
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0, "watch exited early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap();
    assert!(dcoord(eps, &["put", key, value]).status.success());
    tokio::task::spawn_blocking(move || watch.wait_with_output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn cli_put_get_del_watch_and_put_after_leader_kill() {
    let _heavy = HEAVY.lock().await;
    let mut cluster = LocalCluster::start(ClusterOptions::default().nodes(3).binary(binary()))
        .await
        .unwrap();
    let eps = cluster.endpoints();

    let put = dcoord(&eps, &["put", "/cli/k", "hello"]);
    assert!(put.status.success(), "{put:?}");
    assert_eq!(stdout(&put), "", "put prints no data");
    let get = dcoord(&eps, &["get", "/cli/k"]);
    assert_eq!(get.status.code(), Some(0), "{get:?}");
    assert_eq!(
        stdout(&get),
        "hello",
        "only the value on stdout, byte for byte"
    );

    let missing = dcoord(&eps, &["get", "/cli/missing"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(stdout(&missing), "");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    let bad = dcoord(&eps, &["watch", "--prefix", "cli/"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must start and end with '/'"));

    // watch in the background, then write.
    let out = watch_one(&eps, &[], "/cli/w/x", "v1").await;
    assert!(out.status.success());
    assert!(
        stdout(&out).ends_with("\tPUT\t/cli/w/x\tv1\n"),
        "{}",
        stdout(&out)
    );
    let out = watch_one(&eps, &["-o", "json"], "/cli/w/y", "v2").await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["key"].as_str(), v["value"].as_str()),
        (Some("PUT"), Some("/cli/w/y"), Some("v2"))
    );
    assert!(v["revision"].as_u64().unwrap() > 0);

    assert!(dcoord(&eps, &["del", "/cli/k"]).status.success());
    assert_eq!(dcoord(&eps, &["get", "/cli/k"]).status.code(), Some(1));

    // SIGKILL the leader; the next `dcoord put` must succeed.
    let store = cluster.store().await.unwrap();
    let leader = store.leader_id().await.unwrap();
    cluster.kill(leader).unwrap();
    let killed = Instant::now();
    let put = dcoord(&eps, &["put", "/cli/after", "ok", "--timeout", "30"]);
    let took = killed.elapsed();
    println!("`dcoord put` after SIGKILL of leader {leader}: {took:?}");
    assert!(put.status.success(), "{put:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(stdout(&dcoord(&eps, &["get", "/cli/after"])), "ok");
}

#[test]
fn cli_unreachable_cluster_exits_3_without_hanging() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let start = Instant::now();
    let out = Command::new(binary())
        .args(["get", "/x", "--timeout", "1", "--endpoints", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
    assert!(start.elapsed() < Duration::from_secs(10));
    // Which host, and why: nothing listens there; a name that does not resolve says so.
    assert!(
        stderr(&out).contains("connection refused"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(binary())
        .args([
            "get",
            "/x",
            "--timeout",
            "1",
            "--endpoints",
            "no-such-host.invalid:9081",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // Without a network the resolver may not answer in time: that is said too.
    let err = stderr(&out);
    assert!(
        err.contains("no-such-host.invalid:9081: cannot resolve")
            || err.contains("no-such-host.invalid:9081: name lookup took over"),
        "{err}"
    );
}

#[tokio::test]
async fn cli_config_set_get_watch_refuses_values_that_do_not_parse() {
    let cluster = tokio::task::spawn_blocking(common::shared_cluster)
        .await
        .unwrap();
    let eps = cluster.endpoints();
    let key = format!("/cli/{}/app.toml", uuid::Uuid::new_v4().simple());

    let missing = dcoord(&eps, &["config", "get", &key]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let set = dcoord(&eps, &["config", "set", &key, "max_items = 3"]);
    assert!(set.status.success(), "{set:?}");
    let bad = dcoord(&eps, &["config", "set", &key, "max_items = = 3"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nothing written"),
        "{bad:?}"
    );
    let get = dcoord(&eps, &["config", "get", &key]);
    assert_eq!(stdout(&get), "max_items = 3\n", "{get:?}");
    let watch = dcoord(&eps, &["config", "watch", &key, "--count", "1"]);
    assert!(watch.status.success(), "{watch:?}");
    assert_eq!(stdout(&watch), "{\"max_items\":3}\n");
}

#[tokio::test]
async fn cluster_stops_cleanly_on_sigterm_and_a_second_one_refuses_its_endpoints_file() {
    let _heavy = HEAVY.lock().await;
    // Its own temp dir: the endpoints file and the data dir live there.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dcoord-cluster.endpoints");
    let mut cluster = tokio::process::Command::new(binary())
        .args(["cluster", "--nodes", "1"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !file.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the cluster publishes its endpoints");

    // `dcoord status` finds the cluster (and its admin endpoints) through the file.
    let status = Command::new(binary())
        .args(["status"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let text = stdout(&status);
    assert!(text.contains("\tserving\tleader 1\tmembers 1="), "{text}");
    assert!(text.contains("node 1\tapplied index "), "{text}");
    let json = Command::new(binary())
        .args(["status", "-o", "json"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["endpoints"][0]["leader"], 1, "{v}");
    assert!(v["nodes"][0]["applied_index"].as_u64().unwrap() > 0, "{v}");
    let down = Command::new(binary())
        .args([
            "status",
            "--endpoints",
            "127.0.0.1:1",
            "--admin",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(
        stdout(&down).contains("127.0.0.1:1\tdown"),
        "{}",
        stdout(&down)
    );

    let second = Command::new(binary())
        .args(["cluster", "--nodes", "1"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stderr).contains("another `dcoord cluster`"));

    let pid = cluster.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(60), cluster.wait())
        .await
        .expect("the cluster stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "endpoints file and data dir removed: {left:?}"
    );

    // A file left by a cluster that is gone is refused, not used.
    std::fs::write(&file, format!("pid {pid}\n127.0.0.1:1\n")).unwrap();
    let stale = Command::new(binary())
        .args(["get", "/x"])
        .env("TMPDIR", tmp.path())
        .env_remove("DCOORD_ENDPOINTS")
        .output()
        .unwrap();
    assert_eq!(stale.status.code(), Some(2), "{stale:?}");
    assert!(
        stderr(&stale).contains("stale endpoints file"),
        "{}",
        stderr(&stale)
    );
}

#[tokio::test]
async fn a_healthy_node_prints_nothing_on_stdout_no_errors_no_colours_and_says_when_it_serves() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut node = tokio::process::Command::new(binary())
        .args(["node", "--id", "1", "--listen", &listen, "--dir"])
        .arg(dir.path())
        .env_remove("DCOORD_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(node.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            let ready = line.contains("serving (leader: node 1)");
            seen.push(line);
            if ready {
                return;
            }
        }
        panic!("the node exited: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no ready line: {seen:?}"));
    let pid = node.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    while let Some(line) = stderr.next_line().await.unwrap() {
        seen.push(line);
    }
    let status = node.wait().await.unwrap();
    let mut stdout = String::new();
    node.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    assert!(status.success(), "{status:?} {seen:?}");
    assert_eq!(stdout, "", "d-engine's prints stay off stdout");
    let log = seen.join("\n");
    assert!(
        !log.contains("ERROR"),
        "a healthy start and stop log no errors:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "no colours when stderr is not a terminal:\n{log}"
    );
    assert_eq!(log.matches("serving (leader").count(), 1, "{log}");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn get_is_binary_safe_lists_a_prefix_and_speaks_json() {
    let (store, endpoints) = common::shared_remote().await;
    let eps: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let base = format!("/cli-{}/", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();

    // 35 KiB of every byte value: out exactly as it went in.
    let bytes: Vec<u8> = (0..35 * 1024).map(|i| (i % 256) as u8).collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &bytes).unwrap();
    let blob = format!("{base}blob");
    let put = dcoord(&eps, &["put", &blob, "--file", file.to_str().unwrap()]);
    assert!(put.status.success(), "{put:?}");
    let get = dcoord(&eps, &["get", &blob]);
    assert!(
        get.stdout == bytes,
        "get returned {} bytes",
        get.stdout.len()
    );
    let json = dcoord(&eps, &["get", &blob, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let b64 = v["value_base64"].as_str().expect("binary values as base64");
    assert_eq!(b64.len(), bytes.len().div_ceil(3) * 4);

    // A prefix, in key order; and as JSON, one object per line.
    for (k, v) in [("a", "1"), ("b", "two")] {
        assert!(
            dcoord(&eps, &["put", &format!("{base}ls/{k}"), v])
                .status
                .success()
        );
    }
    let ls = dcoord(&eps, &["get", "--prefix", &format!("{base}ls/")]);
    assert_eq!(stdout(&ls), format!("{base}ls/a\n1\n{base}ls/b\ntwo\n"));
    let ls = dcoord(
        &eps,
        &["get", "--prefix", &format!("{base}ls/"), "-o", "json"],
    );
    let lines: Vec<serde_json::Value> = stdout(&ls)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["value"], "two");

    // Lock info and queue stats as JSON; `--wait` gives up with 125 while another holds it.
    let lock = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let s = common::session(store.clone()).await;
    let held = dcoord::lock::Mutex::new(&s, &lock)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let info = dcoord(&eps, &["lock", "info", &lock, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        (v["token"].as_u64(), v["holder"].as_str()),
        (Some(held.fencing_token()), Some(s.id().as_str()))
    );
    let other = dcoord(&eps, &["lock", "info", &lock, "--root", "/other-root/"]);
    assert!(
        stdout(&other).starts_with("token 0\n"),
        "another root, another lock: {other:?}"
    );
    let waited = Command::new(binary())
        .args([
            "lock",
            &lock,
            "--wait",
            "1s",
            "--endpoints",
            &endpoints,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(waited.status.code(), Some(125), "{waited:?}");
    assert!(
        stderr(&waited).contains("not granted within"),
        "{}",
        stderr(&waited)
    );
    held.release().await.unwrap();
    let stats = dcoord(&eps, &["queue", "stats", &lock, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["ready"], 0);

    // $DCOORD_ENDPOINTS instead of the flag.
    let env = Command::new(binary())
        .args(["get", &format!("{base}ls/a")])
        .env("DCOORD_ENDPOINTS", &endpoints)
        .output()
        .unwrap();
    assert_eq!(stdout(&env), "1");
}

#[test]
fn help_shows_examples_and_the_exit_codes() {
    let help = Command::new(binary()).arg("--help").output().unwrap();
    let text = stdout(&help);
    assert!(
        text.contains("Examples:") && text.contains("Exit codes:"),
        "{text}"
    );
    assert!(text.contains("124 lock lost"), "{text}");
    let lock = Command::new(binary())
        .args(["lock", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&lock).contains("--kill-after"), "{}", stdout(&lock));
    assert!(
        stdout(&lock).contains("[env: DCOORD_ENDPOINTS"),
        "{}",
        stdout(&lock)
    );
}

#[test]
fn bad_endpoints_and_yaml_keys_are_refused_with_the_cause() {
    for (endpoints, says) in [
        ("", "endpoint \"\""),
        ("nohost", "host:port"),
        ("h:0", "not a port"),
    ] {
        let o = Command::new(binary())
            .args(["get", "/x", "--endpoints", endpoints])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert!(stderr(&o).contains(says), "{endpoints:?}: {}", stderr(&o));
    }
    let o = Command::new(binary())
        .args([
            "config",
            "set",
            "/x/flags.yaml",
            "a: 1",
            "--endpoints",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        stderr(&o).contains("YAML is not supported"),
        "{}",
        stderr(&o)
    );
}
