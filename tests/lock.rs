//! `lock::Mutex`: the contract, on the in-memory store (paused time) and the real engine.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Cuttable, long_session, session};
use dcoord::Error;
use dcoord::lock::{Mutex, fenced_get, fenced_put};
use dcoord::store::{Consistency, Store};
use dcoord::testing::MemStore;
use tokio::time::Instant;

/// `contenders` participants, each with its own session (as separate processes would have),
/// take the lock `rounds` times each. Mutual exclusion is checked by an in-process counter and
/// by a fenced key; tokens must strictly increase in grant order.
async fn contenders_exclude_each_other(
    store: Arc<dyn Store>,
    ns: &str,
    contenders: usize,
    rounds: usize,
) {
    let name = format!("mx-{}", uuid::Uuid::new_v4().simple());
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fenced = format!("{ns}fenced");
    let mut tasks = Vec::new();
    for c in 0..contenders {
        let store = store.clone();
        let (name, inside, tokens, fenced) =
            (name.clone(), inside.clone(), tokens.clone(), fenced.clone());
        tasks.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let lock = Mutex::new(&s, &name).unwrap();
            for r in 0..rounds {
                let g = lock.acquire().await.unwrap();
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                tokens.lock().unwrap().push(g.fencing_token());
                g.fenced_put(fenced.as_bytes(), format!("{c}/{r}").as_bytes())
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), contenders * rounds);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not strictly increasing: {tokens:?}"
    );
    let last = fenced_get(&*store, fenced.as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.token, *tokens.last().unwrap());
}

#[tokio::test(start_paused = true)]
async fn mem_contenders_exclude_each_other_with_increasing_tokens() {
    contenders_exclude_each_other(Arc::new(MemStore::new()), "/t/", 8, 25).await;
}

#[tokio::test]
async fn embedded_contenders_exclude_each_other_with_increasing_tokens() {
    let f = common::fixture(common::Backend::Embedded).await;
    contenders_exclude_each_other(f.store.clone(), &f.ns, 8, 25).await;
}

#[tokio::test]
async fn cluster_contenders_exclude_each_other_with_increasing_tokens() {
    let f = common::fixture(common::Backend::Cluster).await;
    contenders_exclude_each_other(f.store.clone(), &f.ns, 8, 10).await;
}

/// Waits until the lock has `n` waiters.
async fn wait_waiters(lock: &Mutex, n: usize) {
    loop {
        if lock.info().await.unwrap().waiters.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn release_hands_lock_to_waiters_in_arrival_order() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lock_a = Mutex::new(&a, "fifo").unwrap();
    let g = lock_a.acquire().await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let s = session(store.clone()).await;
        let order = order.clone();
        let lock = Mutex::new(&s, "fifo").unwrap();
        tasks.push(tokio::spawn(async move {
            let g = lock.acquire().await.unwrap();
            order.lock().unwrap().push((i, g.fencing_token()));
            g.release().await.unwrap();
            drop(s);
        }));
        wait_waiters(&lock_a, i + 1).await;
    }
    let first = g.fencing_token();
    g.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let expected: Vec<_> = (0..5).map(|i| (i, first + 1 + i as u64)).collect();
    assert_eq!(order, expected, "served in arrival order, one grant each");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holder_is_taken_over_after_its_lease() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let g = Mutex::new(&a, "crash").unwrap().acquire().await.unwrap();
    let token = g.fencing_token();
    // A crash: no release, no more renewals.
    std::mem::forget(g);
    let crashed = Instant::now();
    a.orphan();
    let b = session(store.clone()).await;
    let g = Mutex::new(&b, "crash").unwrap().acquire().await.unwrap();
    let waited = crashed.elapsed();
    assert!(g.fencing_token() > token);
    // The last renewal was at most a third of the lease before the crash.
    assert!(
        waited >= Duration::from_millis(1300),
        "took over too early: {waited:?}"
    );
    assert!(
        waited <= Duration::from_millis(2500),
        "took over too late: {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_holder_learns_it_lost_the_lock_before_anyone_takes_it() {
    let mem = MemStore::new();
    let cut = Arc::new(AtomicBool::new(false));
    let a_store: Arc<dyn Store> = Arc::new(Cuttable::new(mem.clone(), cut.clone()));
    let a = session(a_store).await;
    let ga = Mutex::new(&a, "part").unwrap().acquire().await.unwrap();
    let b = session(Arc::new(mem.clone())).await;
    let lock_b = Mutex::new(&b, "part").unwrap();
    let waiter = tokio::spawn(async move {
        let g = lock_b.acquire().await.unwrap();
        (Instant::now(), g)
    });
    tokio::time::timeout(
        Duration::from_secs(1),
        wait_waiters(&Mutex::new(&b, "part").unwrap(), 1),
    )
    .await
    .expect("b waits behind a");
    cut.store(true, Ordering::SeqCst);
    ga.lost().await;
    let lost_at = Instant::now();
    assert!(ga.is_lost());
    let (granted_at, gb) = waiter.await.unwrap();
    assert!(
        lost_at < granted_at,
        "holder learned at {lost_at:?}, waiter granted at {granted_at:?}"
    );
    assert!(gb.fencing_token() > ga.fencing_token());
    // The new holder writes; the old one, back from its partition, is fenced off.
    gb.fenced_put(b"/data/x", b"new").await.unwrap();
    cut.store(false, Ordering::SeqCst);
    let err = fenced_put(&mem, b"/data/x", ga.fencing_token(), b"stale")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    let err = ga.fenced_put(b"/data/x", b"stale").await.unwrap_err();
    assert!(matches!(err, Error::SessionLost { .. }), "{err}");
    assert_eq!(
        fenced_get(&mem, b"/data/x").await.unwrap().unwrap().value,
        "new"
    );
    // Its release is a no-op: it never releases the new grant.
    ga.release().await.unwrap();
    assert_eq!(
        Mutex::new(&b, "part").unwrap().info().await.unwrap().holder,
        Some(b.id())
    );
}

/// A slot of our own session that nobody here owns (a leave that never got written) must not
/// block us behind our own live session: the next acquire removes it at once.
#[tokio::test(start_paused = true)]
async fn an_abandoned_slot_of_our_own_session_is_cleaned_up() {
    let mem = MemStore::new();
    let s = session(Arc::new(mem.clone())).await;
    let id = s.id();
    let key = format!("{}locks/orphan/rec", s.root());
    let phantom = format!(
        r#"{{"v":2,"seq":1,"epoch":7,"holder":{{"session":"{id}","ticket":0}},"queue":[],"absorbed":{{"{id}":0}}}}"#
    );
    mem.put(key.as_bytes(), phantom.as_bytes()).await.unwrap();
    let started = Instant::now();
    let lock = Mutex::new(&s, "orphan").unwrap();
    let g = tokio::time::timeout(s.lease() * 3, lock.acquire())
        .await
        .expect("stuck behind our own abandoned slot")
        .unwrap();
    assert!(
        started.elapsed() < s.lease() / 2,
        "waited {:?} behind our own abandoned slot",
        started.elapsed()
    );
    assert_eq!(g.fencing_token(), 8);
    g.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_acquire_leaves_no_residue() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lock_a = Mutex::new(&a, "cancel").unwrap();
    let g = lock_a.acquire().await.unwrap();
    let b = session(store.clone()).await;
    let lock_b = Mutex::new(&b, "cancel").unwrap();
    let res = tokio::time::timeout(Duration::from_millis(500), lock_b.acquire()).await;
    assert!(res.is_err(), "held by a: the acquire times out");
    // The dropped acquire's entry is removed in the background.
    tokio::time::timeout(Duration::from_secs(1), wait_waiters(&lock_a, 0))
        .await
        .expect("entry removed");
    g.release().await.unwrap();
    let c = session(store.clone()).await;
    let started = Instant::now();
    let gc = Mutex::new(&c, "cancel")
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    assert!(gc.is_some(), "nobody is left in front of c");
    assert!(started.elapsed() < Duration::from_millis(100));
}

/// A free lock whose grab has an unknown outcome and lands late is granted, not reported
/// taken (by our own phantom grant, which then blocked everyone for a lease).
#[tokio::test(start_paused = true)]
async fn a_grab_that_lands_late_is_a_grant() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let a = session(store.clone()).await;
    let lock = Mutex::new(&a, "late").unwrap();
    mem.late_next_writes(1);
    let g = lock.try_acquire().await.unwrap();
    let g = g.expect("the lock was free and our grab applied");
    assert_eq!(lock.info().await.unwrap().waiters.len(), 0);
    g.release().await.unwrap();
    let b = session(store.clone()).await;
    let started = Instant::now();
    let again = Mutex::new(&b, "late").unwrap().acquire().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "released at once, not one lease later: {:?}",
        started.elapsed()
    );
    again.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn try_acquire_returns_none_while_held() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let b = session(store.clone()).await;
    let g = Mutex::new(&a, "try")
        .unwrap()
        .try_acquire()
        .await
        .unwrap()
        .unwrap();
    let lock_b = Mutex::new(&b, "try").unwrap();
    assert!(lock_b.try_acquire().await.unwrap().is_none());
    assert!(
        lock_b.info().await.unwrap().waiters.is_empty(),
        "try_acquire never queues"
    );
    g.release().await.unwrap();
    assert!(lock_b.try_acquire().await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_guard_releases_in_the_background() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lock = Mutex::new(&a, "drop").unwrap();
    drop(lock.acquire().await.unwrap());
    let g = tokio::time::timeout(Duration::from_millis(200), lock.acquire())
        .await
        .expect("released without waiting for the lease")
        .unwrap();
    assert_eq!(g.fencing_token(), 2);
}

#[tokio::test(start_paused = true)]
async fn foreign_bytes_in_the_record_are_an_error_and_are_left_alone() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let a = session(store.clone()).await;
    let lock = Mutex::new(&a, "garbage").unwrap();
    store.put(lock.key(), b"not a lock").await.unwrap();
    let err = lock.acquire().await.unwrap_err();
    assert!(
        matches!(err, Error::Decode { .. }) && err.to_string().contains("locks/garbage"),
        "{err}"
    );
    assert_eq!(
        store
            .get(lock.key(), Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap(),
        "not a lock"
    );
    let err = Mutex::new(&a, "bad/name").unwrap_err();
    assert!(err.to_string().contains("bad/name"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn fenced_put_rejects_older_tokens_and_foreign_values() {
    let mem = MemStore::new();
    fenced_put(&mem, b"/f", 5, b"five").await.unwrap();
    fenced_put(&mem, b"/f", 5, b"five again").await.unwrap();
    let err = fenced_put(&mem, b"/f", 4, b"four").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Fenced {
                token: 4,
                stored: 5,
                ..
            }
        ),
        "{err}"
    );
    fenced_put(&mem, b"/f", 6, b"six").await.unwrap();
    assert_eq!(fenced_get(&mem, b"/f").await.unwrap().unwrap().value, "six");
    mem.put(b"/g", b"raw").await.unwrap();
    let err = fenced_put(&mem, b"/g", 9, b"x").await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_fenced_write_overtaken_on_its_way_never_lands_over_a_later_one() {
    let mem = MemStore::new();
    fenced_put(&mem, b"/f", 7, b"x").await.unwrap();
    // The write of y is still on its way when its client gives up; the re-send applies, the
    // holder writes x again, and only then does the first request reach the store.
    mem.overtaken_next_writes(1, 2);
    fenced_put(&mem, b"/f", 7, b"y").await.unwrap();
    fenced_put(&mem, b"/f", 7, b"x").await.unwrap();
    assert_eq!(
        fenced_get(&mem, b"/f").await.unwrap().unwrap().value,
        "x",
        "the holder's last write stands"
    );
}

// ---------------------------------------------------------------------------------------------
// Other processes: `dcoord lock NAME -- CMD` holding the lock, SIGKILLed or SIGSTOPped.

mod process {
    use super::*;
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// `dcoord lock NAME --lease 2 --print-token -- cat` against the shared cluster; returns
    /// the child and the fencing token it printed.
    async fn holder(endpoints: &str, name: &str) -> (tokio::process::Child, u64) {
        let args = ["lock", name, "--lease", "2", "--print-token"];
        let mut child = common::dcoord_child(&args, endpoints, &["cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the holder prints its token")
            .unwrap()
            .expect("a token line");
        (child, line.trim().parse().unwrap())
    }

    fn signal(child: &tokio::process::Child, sig: &str) {
        let pid = child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    #[tokio::test]
    async fn a_sigkilled_holder_process_is_taken_over_after_its_lease() {
        let (store, endpoints) = common::shared_remote().await;
        let name = format!("kill-{}", uuid::Uuid::new_v4().simple());
        let (mut child, token) = holder(&endpoints, &name).await;
        let s = session(store.clone()).await;
        let lock = Mutex::new(&s, &name).unwrap();
        let waiter = tokio::spawn(async move {
            let g = lock.acquire().await.unwrap();
            (std::time::Instant::now(), g)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        child.kill().await.unwrap(); // SIGKILL
        let killed = std::time::Instant::now();
        let (granted, g) = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("taken over")
            .unwrap();
        let took = granted - killed;
        println!("lease 2 s: SIGKILLed holder taken over after {took:?}");
        assert!(g.fencing_token() > token);
        assert!(
            took <= Duration::from_secs(2) + Duration::from_secs(3),
            "{took:?}"
        );
        g.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_paused_holder_loses_the_lock_and_its_fenced_write_is_rejected() {
        let (store, endpoints) = common::shared_remote().await;
        let name = format!("pause-{}", uuid::Uuid::new_v4().simple());
        let data = format!("/t/{name}/data");
        let (mut child, old_token) = holder(&endpoints, &name).await;
        fenced_put(&*store, data.as_bytes(), old_token, b"old holder")
            .await
            .unwrap();
        signal(&child, "-STOP");
        let paused = std::time::Instant::now();
        let s = session(store.clone()).await;
        let g = tokio::time::timeout(
            Duration::from_secs(30),
            Mutex::new(&s, &name).unwrap().acquire(),
        )
        .await
        .expect("taken over from the paused holder")
        .unwrap();
        println!(
            "paused holder's lock taken over after {:?}",
            paused.elapsed()
        );
        assert!(g.fencing_token() > old_token);
        g.fenced_put(data.as_bytes(), b"new holder").await.unwrap();
        // Keep the command's stdin open: `Child::wait` would close it, and `cat` would then
        // exit 0 on its own, racing the lost-lock exit this test is about.
        let _stdin = child.stdin.take();
        signal(&child, "-CONT");
        // On resume the old holder finds its lease gone: it stops its command and exits 124.
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("the resumed holder exits")
            .unwrap();
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
            .await
            .unwrap();
        assert_eq!(status.code(), Some(124), "stderr: {stderr}");
        assert!(stderr.contains("lost"), "{stderr}");
        // Its fenced write, with its old token, is rejected.
        let err = fenced_put(&*store, data.as_bytes(), old_token, b"stale")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{err}");
        assert_eq!(
            fenced_get(&*store, data.as_bytes())
                .await
                .unwrap()
                .unwrap()
                .value,
            "new holder"
        );
        g.release().await.unwrap();
    }

    /// Whether process `pid` still runs (a zombie does not).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
                Some(!matches!(state, "Z" | "X"))
            })
            .unwrap_or(false)
    }

    /// `dcoord lock NAME --lease 2 -- sh -c '...'`: the script starts `sleep 600` in the
    /// background (a grandchild of dcoord), writes its pid to `dir/bg.pid`, then runs `then`.
    /// Returns the child and the grandchild's pid.
    async fn holder_with_grandchild(
        endpoints: &str,
        name: &str,
        dir: &std::path::Path,
        then: &str,
    ) -> (tokio::process::Child, u32) {
        let pidfile = dir.join("bg.pid");
        let script = format!(
            "sleep 600 & echo $! > {}.tmp; mv {0}.tmp {0}; {then}",
            pidfile.display()
        );
        let child = common::dcoord_child(
            &["lock", name, "--lease", "2"],
            endpoints,
            &["sh", "-c", &script],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let pid = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(text) = std::fs::read_to_string(&pidfile)
                    && let Ok(pid) = text.trim().parse()
                {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the command starts its background child");
        (child, pid)
    }

    async fn output(child: tokio::process::Child) -> (Option<i32>, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("dcoord exits")
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[tokio::test]
    async fn a_sigkilled_holder_stops_its_whole_command_before_anyone_else_holds_the_lock() {
        let (store, endpoints) = common::shared_remote().await;
        let dir = tempfile::tempdir().unwrap();
        let name = format!("kill-group-{}", uuid::Uuid::new_v4().simple());
        let (mut child, bg) = holder_with_grandchild(&endpoints, &name, dir.path(), "wait").await;
        let s = session(store.clone()).await;
        let lock = Mutex::new(&s, &name).unwrap();
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let g = lock.acquire().await.unwrap();
                // The first thing the next holder sees: is the old command still running?
                (running(bg), g)
            })
        };
        tokio::time::timeout(Duration::from_secs(30), wait_waiters(&lock, 1))
            .await
            .expect("the waiter queues");
        assert!(running(bg));
        child.kill().await.unwrap(); // SIGKILL of dcoord: its supervisor must stop the group
        let (still_running, g) = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("taken over")
            .unwrap();
        assert!(
            !still_running,
            "the old holder's grandchild ran on into the next grant"
        );
        g.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_lost_lock_stops_the_command_s_whole_group_and_exits_124() {
        let (_, endpoints) = common::shared_remote().await;
        let dir = tempfile::tempdir().unwrap();
        let name = format!("lost-group-{}", uuid::Uuid::new_v4().simple());
        let (child, bg) = holder_with_grandchild(&endpoints, &name, dir.path(), "wait").await;
        // Paused past its 2 s lease, dcoord finds its session lost when it resumes.
        signal(&child, "-STOP");
        tokio::time::sleep(Duration::from_secs(3)).await;
        signal(&child, "-CONT");
        let (code, _, stderr) = output(child).await;
        assert_eq!(code, Some(124), "{stderr}");
        assert!(!running(bg), "the lost holder's grandchild runs on");
    }

    #[tokio::test]
    async fn background_children_stop_when_the_command_exits_and_its_code_passes_through() {
        let (_, endpoints) = common::shared_remote().await;
        let dir = tempfile::tempdir().unwrap();
        let name = format!("exit-{}", uuid::Uuid::new_v4().simple());
        let (child, bg) = holder_with_grandchild(&endpoints, &name, dir.path(), "exit 3").await;
        let (code, stdout, stderr) = output(child).await;
        assert_eq!(code, Some(3), "{stderr}");
        assert_eq!(stdout, "", "nothing on stdout but the command's own output");
        assert!(!running(bg), "the background child outlived the lock");
    }

    #[tokio::test]
    async fn sigterm_reaches_the_command_s_trap_and_dcoord_exits_143() {
        let (_, endpoints) = common::shared_remote().await;
        let dir = tempfile::tempdir().unwrap();
        let (ready, trapped) = (dir.path().join("ready"), dir.path().join("trapped"));
        let script = format!(
            "trap 'echo yes > {}; exit 0' TERM; touch {}; while :; do sleep 0.05; done",
            trapped.display(),
            ready.display()
        );
        let name = format!("term-{}", uuid::Uuid::new_v4().simple());
        let child = common::dcoord_child(&["lock", &name], &endpoints, &["sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), common::until(|| ready.exists()))
            .await
            .expect("the command runs");
        signal(&child, "-TERM");
        let (code, _, stderr) = output(child).await;
        assert_eq!(code, Some(143), "{stderr}");
        assert_eq!(
            std::fs::read_to_string(&trapped).unwrap(),
            "yes\n",
            "the trap ran"
        );
    }

    #[tokio::test]
    async fn exit_codes_follow_the_command_and_a_missing_one_takes_no_token() {
        let (store, endpoints) = common::shared_remote().await;
        let name = format!("codes-{}", uuid::Uuid::new_v4().simple());
        let run = |command: &'static [&'static str]| {
            let child = common::dcoord_child(&["lock", &name], &endpoints, command)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            output(child)
        };
        let (code, _, stderr) = run(&["/nonexistent/command"]).await;
        assert_eq!(code, Some(127), "{stderr}");
        let s = session(store.clone()).await;
        let lock = Mutex::new(&s, &name).unwrap();
        assert_eq!(lock.info().await.unwrap().token, 0, "no token was taken");
        let (code, _, stderr) = run(&["sh", "-c", "kill -9 $$"]).await;
        assert_eq!(code, Some(128 + 9), "{stderr}");
        let (code, stdout, stderr) = run(&["echo", "hi"]).await;
        assert_eq!((code, stdout.as_str()), (Some(0), "hi\n"), "{stderr}");
    }

    /// Raft leader SIGKILLed while contenders run: never two holders, tokens still increase.
    #[tokio::test]
    async fn leader_kill_during_contention_keeps_mutual_exclusion() {
        // Warnings (background releases that fail, ...) go to the test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("dcoord=debug,lock=debug")
            .with_test_writer()
            .try_init();
        let _heavy = common::HEAVY.lock().await;
        let (mut cluster, remote) = common::own_cluster().await;
        let leader = remote.leader_id().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(remote);
        let inside = Arc::new(AtomicUsize::new(0));
        let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // What each contender is doing, for the failure message.
        let states = Arc::new(std::sync::Mutex::new(vec![String::new(); 4]));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (store, inside, grants, stop, states) = (
                store.clone(),
                inside.clone(),
                grants.clone(),
                stop.clone(),
                states.clone(),
            );
            let set = move |what: String| states.lock().unwrap()[i] = what;
            tasks.push(tokio::spawn(async move {
                let mut s = long_session(store.clone()).await;
                let mut errors = 0;
                while !stop.load(Ordering::SeqCst) {
                    let lock = Mutex::new(&s, "leader-kill").unwrap();
                    set(format!("{} acquiring", s.id()));
                    match lock.acquire().await {
                        Ok(g) => {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                            grants.lock().unwrap().push(g.fencing_token());
                            set(format!("{} holding {}", s.id(), g.fencing_token()));
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            tracing::debug!(token = g.fencing_token(), "test: releasing");
                            if let Err(e) = g.release().await {
                                set(format!("{} release failed: {e}", s.id()));
                                errors += 1;
                            }
                        }
                        Err(Error::SessionLost { .. }) => {
                            set(format!("{} session lost", s.id()));
                            s = long_session(store.clone()).await;
                        }
                        Err(e) if e.is_retryable() || e.is_ambiguous() => {
                            set(format!("{} acquire failed: {e}", s.id()));
                            errors += 1
                        }
                        Err(e) => panic!("acquire: {e}"),
                    }
                }
                errors
            }));
        }
        let count = |g: &Arc<std::sync::Mutex<Vec<u64>>>| g.lock().unwrap().len();
        common::until(|| count(&grants) >= 40).await;
        cluster.kill(leader).unwrap();
        let killed = std::time::Instant::now();
        let before = count(&grants);
        while count(&grants) < before + 40 {
            if killed.elapsed() > Duration::from_secs(60) {
                let rec = store
                    .get(b"/dcoord/locks/leader-kill/rec", Consistency::Linearizable)
                    .await;
                let arrivals = store.scan_prefix(b"/dcoord/locks/leader-kill/w/").await;
                let sessions = store.scan_prefix(b"/dcoord/sessions/").await;
                panic!(
                    "no progress after the kill ({} grants since; last tokens {:?})\nrecord: {rec:?}\n\
                     arrivals: {arrivals:?}\nsessions: {sessions:?}\ncontenders: {:#?}\n\
                     finished: {:?}",
                    count(&grants) - before,
                    grants
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>(),
                    states.lock().unwrap(),
                    tasks.iter().map(|t| t.is_finished()).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "grants resumed; {} more within {:?} of the kill",
            count(&grants) - before,
            killed.elapsed()
        );
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("contender stops")
                .unwrap();
        }
        let grants = grants.lock().unwrap().clone();
        assert!(
            grants.windows(2).all(|w| w[0] < w[1]),
            "tokens not strictly increasing: {grants:?}"
        );
    }
}

/// The record forgets dead sessions once it remembers many (pruning, at a takeover). A
/// leftover arrival key of a forgotten session (its slot taken in long ago, the key not yet
/// deleted) must go with the pruning write: left behind, it would be taken in again as a
/// ghost waiter, granted ahead of the live waiter, and only reaped one more takeover later.
#[tokio::test(start_paused = true)]
async fn a_takeover_that_forgets_dead_sessions_deletes_their_leftover_arrivals() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let name = "ghost";
    // The session the leftover belongs to: taken in once, then gone (no heartbeat).
    let p = session(store.clone()).await;
    let lock = Mutex::new(&p, name).unwrap();
    lock.acquire().await.unwrap().release().await.unwrap();
    let base = format!("{}locks/{name}/", p.root());
    let rec = store
        .get(format!("{base}rec").as_bytes(), Consistency::Linearizable)
        .await
        .unwrap()
        .expect("the lock's record");
    let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap();
    let ticket = rec["absorbed"][p.id()]
        .as_u64()
        .expect("the record saw p's slot");
    let leftover = format!("{base}w/{}.{ticket}", p.id());
    p.close().await.unwrap();
    // Enough other sessions, closed too, for the record to prune.
    for _ in 0..256 {
        let s = session(store.clone()).await;
        let g = Mutex::new(&s, name).unwrap().acquire().await.unwrap();
        g.release().await.unwrap();
        s.close().await.unwrap();
    }
    // A holder that crashes, and the leftover, which no write has seen yet.
    let d = session(store.clone()).await;
    let held = Mutex::new(&d, name).unwrap().acquire().await.unwrap();
    let token = held.fencing_token();
    std::mem::forget(held);
    d.orphan();
    store.put(leftover.as_bytes(), b"w").await.unwrap();
    // The live waiter takes over from the crashed holder, and nobody comes in between.
    let w = session(store.clone()).await;
    let g = tokio::time::timeout(
        Duration::from_secs(30),
        Mutex::new(&w, name).unwrap().acquire(),
    )
    .await
    .expect("a takeover within 30 s")
    .unwrap();
    assert_eq!(
        g.fencing_token(),
        token + 1,
        "a ghost waiter was granted between the crashed holder and the live waiter"
    );
    let left = store
        .get(leftover.as_bytes(), Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(left, None, "the forgotten session's arrival key is deleted");
    g.release().await.unwrap();
}
