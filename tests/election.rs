//! `election::Election`: the contract, on the in-memory store (paused time, fault injection),
//! the embedded engine, a 3-node cluster with its Raft leader killed, and `dcoord elect`
//! processes SIGKILLed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Cuttable, long_session, session};
use dcoord::Error;
use dcoord::election::{Election, Leader};
use dcoord::lock::{fenced_get, fenced_put};
use dcoord::semaphore::Semaphore;
use dcoord::store::Store;
use dcoord::testing::MemStore;
use tokio::sync::watch;
use tokio::time::Instant;

/// `candidates` sessions campaign `terms` times each. Never two leaders at once (an
/// in-process counter), every term writes a fenced register, and tokens strictly increase.
async fn candidates_never_overlap(
    store: Arc<dyn Store>,
    ns: &str,
    candidates: usize,
    terms: usize,
) {
    let name = format!("el-{}", uuid::Uuid::new_v4().simple());
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let register = format!("{ns}register");
    let mut tasks = Vec::new();
    for c in 0..candidates {
        let store = store.clone();
        let (name, inside, tokens, register) = (
            name.clone(),
            inside.clone(),
            tokens.clone(),
            register.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let s = long_session(store).await;
            let election = Election::new(&s, &name).unwrap();
            for t in 0..terms {
                let lead = election.campaign(format!("c{c}")).await.unwrap();
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                tokens.lock().unwrap().push(lead.token());
                lead.fenced_put(register.as_bytes(), format!("{c}/{t}").as_bytes())
                    .await
                    .unwrap();
                let named = election.leader().await.unwrap().expect("a leader");
                assert_eq!(
                    (named.token, &named.value[..]),
                    (lead.token(), format!("c{c}").as_bytes())
                );
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                lead.resign().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), candidates * terms);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "terms not strictly increasing: {tokens:?}"
    );
    let last = fenced_get(&*store, register.as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.token, *tokens.last().unwrap());
}

#[tokio::test(start_paused = true)]
async fn mem_candidates_never_overlap_and_terms_increase() {
    candidates_never_overlap(Arc::new(MemStore::new()), "/t/", 6, 10).await;
}

#[tokio::test]
async fn embedded_candidates_never_overlap_and_terms_increase() {
    let f = common::fixture(common::Backend::Embedded).await;
    candidates_never_overlap(f.store.clone(), &f.ns, 6, 10).await;
}

#[tokio::test]
async fn cluster_candidates_never_overlap_and_terms_increase() {
    let f = common::fixture(common::Backend::Cluster).await;
    candidates_never_overlap(f.store.clone(), &f.ns, 4, 5).await;
}

/// Waits until `rx` shows a leader satisfying `pred`.
async fn until_leader(
    rx: &mut watch::Receiver<Option<Leader>>,
    pred: impl Fn(&Option<Leader>) -> bool,
) -> Option<Leader> {
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|l| pred(l)))
        .await
        .expect("the observer converges")
        .expect("the observer runs")
        .clone()
}

/// Waits until `election` has `n` candidates queued behind the leader.
async fn until_candidates(election: &Election, n: usize, secs: u64) {
    tokio::time::timeout(Duration::from_secs(secs), async {
        while election.candidates().await.unwrap().len() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never {n} candidates"));
}

#[tokio::test(start_paused = true)]
async fn candidates_lead_in_campaign_order_and_observers_see_each_term_and_value() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let election = Election::new(&a, "fifo").unwrap();
    let mut observed = election.observe().await.unwrap();
    assert_eq!(*observed.borrow(), None, "nobody leads yet");
    let mut lead = election.campaign("a:1").await.unwrap();
    let seen = until_leader(&mut observed, |l| l.is_some()).await.unwrap();
    assert_eq!(
        (seen.session.as_str(), &seen.value[..]),
        (a.id().as_str(), &b"a:1"[..])
    );
    // A proclaimed value reaches observers; the term (token) stays.
    lead.proclaim("a:2").await.unwrap();
    let seen = until_leader(&mut observed, |l| {
        l.as_ref().is_some_and(|l| l.value == "a:2")
    })
    .await;
    assert_eq!(seen.unwrap().token, lead.token());
    // Three more candidates, in order.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let s = session(store.clone()).await;
        let order = order.clone();
        let e = Election::new(&s, "fifo").unwrap();
        tasks.push(tokio::spawn(async move {
            let lead = e.campaign(format!("c{i}")).await.unwrap();
            order.lock().unwrap().push((i, lead.token()));
            lead.resign().await.unwrap();
            drop(s);
        }));
        until_candidates(&election, i + 1, 1).await;
    }
    let first = lead.token();
    lead.resign().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let expected: Vec<_> = (0..3).map(|i| (i, first + 1 + i as u64)).collect();
    assert_eq!(order, expected, "served in campaign order, one term each");
    until_leader(&mut observed, |l| l.is_none()).await;
    assert_eq!(election.leader().await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_leader_is_replaced_one_lease_after_its_last_heartbeat() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lead = Election::new(&a, "crash")
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let token = lead.token();
    let watcher = session(store.clone()).await;
    let mut observed = Election::new(&watcher, "crash")
        .unwrap()
        .observe()
        .await
        .unwrap();
    assert_eq!(observed.borrow().as_ref().map(|l| l.token), Some(token));
    // A crash: no resignation, no more renewals.
    std::mem::forget(lead);
    let crashed = Instant::now();
    a.orphan();
    // With no candidate left, an observer still sees the dead leader go.
    until_leader(&mut observed, |l| l.is_none()).await;
    let gone = crashed.elapsed();
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&gone),
        "the observer saw the leader go after {gone:?} (lease 2 s)"
    );
    let b = session(store.clone()).await;
    let lead = Election::new(&b, "crash")
        .unwrap()
        .campaign("b")
        .await
        .unwrap();
    assert!(lead.token() > token);
    let seen = until_leader(&mut observed, |l| l.is_some()).await.unwrap();
    assert_eq!((seen.session, seen.token), (b.id(), lead.token()));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_candidate_takes_over_from_a_crashed_leader_after_its_lease() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let lead = Election::new(&a, "takeover")
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let token = lead.token();
    let b = session(store.clone()).await;
    let eb = Election::new(&b, "takeover").unwrap();
    let queued = eb.clone();
    let campaign = tokio::spawn(async move { (eb.campaign("b").await.unwrap(), Instant::now()) });
    until_candidates(&queued, 1, 1).await;
    std::mem::forget(lead);
    let crashed = Instant::now();
    a.orphan();
    let (lead, at) = campaign.await.unwrap();
    let took = at - crashed;
    assert!(lead.token() > token);
    assert!(
        (Duration::from_millis(1300)..=Duration::from_millis(2500)).contains(&took),
        "took over after {took:?} (lease 2 s)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_learns_it_lost_before_another_leads() {
    let mem = MemStore::new();
    let cut = Arc::new(AtomicBool::new(false));
    let a = session(Arc::new(Cuttable::new(mem.clone(), cut.clone()))).await;
    let la = Election::new(&a, "part")
        .unwrap()
        .campaign("a")
        .await
        .unwrap();
    let b = session(Arc::new(mem.clone())).await;
    let eb = Election::new(&b, "part").unwrap();
    let queued = eb.clone();
    let waiter = tokio::spawn(async move {
        let l = eb.campaign("b").await.unwrap();
        (Instant::now(), l)
    });
    until_candidates(&queued, 1, 1).await;
    cut.store(true, Ordering::SeqCst);
    la.lost().await;
    let lost_at = Instant::now();
    assert!(la.is_lost());
    let (led_at, lb) = waiter.await.unwrap();
    assert!(
        lost_at < led_at,
        "lost at {lost_at:?}, next term at {led_at:?}"
    );
    assert!(lb.token() > la.token());
    lb.fenced_put(b"/data/x", b"b").await.unwrap();
    cut.store(false, Ordering::SeqCst);
    let err = fenced_put(&mem, b"/data/x", la.token(), b"stale")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    // The old leader's resignation never ends the new term.
    la.resign().await.unwrap();
    let now = Election::new(&b, "part")
        .unwrap()
        .leader()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.token, lb.token());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_campaign_leaves_no_residue() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = session(store.clone()).await;
    let ea = Election::new(&a, "cancel").unwrap();
    let lead = ea.campaign("a").await.unwrap();
    let b = session(store.clone()).await;
    let eb = Election::new(&b, "cancel").unwrap();
    let res = tokio::time::timeout(Duration::from_millis(500), eb.campaign("b")).await;
    assert!(res.is_err(), "a leads: the campaign times out");
    until_candidates(&ea, 0, 1).await;
    lead.resign().await.unwrap();
    assert_eq!(ea.leader().await.unwrap(), None, "b was never made leader");
    let c = session(store.clone()).await;
    let lc = Election::new(&c, "cancel")
        .unwrap()
        .try_campaign("c")
        .await
        .unwrap();
    assert!(lc.is_some(), "nobody is left in front of c");
}

#[tokio::test(start_paused = true)]
async fn observers_converge_after_lost_watch_events() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let a = session(store.clone()).await;
    let ea = Election::new(&a, "lossy").unwrap();
    let watcher = session(store.clone()).await;
    let mut observed = Election::new(&watcher, "lossy")
        .unwrap()
        .observe()
        .await
        .unwrap();
    // Every event of the next writes is lost: the campaign's and the proclamation's.
    mem.drop_next_events(10);
    let mut lead = ea.campaign("v1").await.unwrap();
    lead.proclaim("v2").await.unwrap();
    let seen = until_leader(&mut observed, |l| {
        l.as_ref().is_some_and(|l| l.value == "v2")
    })
    .await;
    assert_eq!(seen.unwrap().token, lead.token());
    // A cancelled watch is relisted too.
    mem.cancel_watches();
    lead.resign().await.unwrap();
    until_leader(&mut observed, |l| l.is_none()).await;
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_a_clear_error_and_foreign_bytes_are_left_alone() {
    let mem = MemStore::new();
    let s = session(Arc::new(mem.clone())).await;
    let err = Election::new(&s, "no/slashes").unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let e = Election::new(&s, "big").unwrap();
    let err = e.campaign(vec![0u8; 100 * 1024]).await.unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    assert_eq!(e.leader().await.unwrap(), None, "nothing was written");
    let key = format!("{}elections/foreign/rec", s.root());
    mem.put(key.as_bytes(), b"not a record").await.unwrap();
    let e = Election::new(&s, "foreign").unwrap();
    let err = e.campaign("x").await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert!(err.to_string().contains(&key), "{err}");
    let err = e.leader().await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert_eq!(
        &mem.get(key.as_bytes(), dcoord::store::Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap()[..],
        b"not a record",
        "left alone"
    );
}

/// The Raft leader SIGKILLed while candidates campaign and semaphore contenders take permits:
/// never two leaders, terms still increase, never more than N permits held, and the replicas
/// agree afterwards.
#[tokio::test]
async fn raft_leader_kill_during_campaigns_keeps_one_leader_per_term() {
    let _heavy = common::HEAVY.lock().await;
    let (mut cluster, remote) = common::own_cluster().await;
    let raft_leader = remote.leader_id().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(remote);
    let inside = Arc::new(AtomicUsize::new(0));
    let terms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..3 {
        let (store, inside, terms, stop) =
            (store.clone(), inside.clone(), terms.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = long_session(store.clone()).await;
            while !stop.load(Ordering::SeqCst) {
                let election = Election::new(&s, "raft-kill").unwrap();
                match election.campaign(format!("c{c}")).await {
                    Ok(lead) => {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                        terms.lock().unwrap().push(lead.token());
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        let _ = lead.resign().await;
                    }
                    Err(Error::SessionLost { .. }) => s = long_session(store.clone()).await,
                    Err(e) if e.is_retryable() || e.is_ambiguous() => {}
                    Err(e) => panic!("campaign: {e}"),
                }
            }
        }));
    }
    // Beside them, semaphore contenders: never more than 2 of 2 permits held.
    let held = Arc::new(AtomicUsize::new(0));
    let grants = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let (store, held, grants, stop) =
            (store.clone(), held.clone(), grants.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = long_session(store.clone()).await;
            while !stop.load(Ordering::SeqCst) {
                let sem = Semaphore::new(&s, "raft-kill", 2).unwrap();
                match sem.acquire(1).await {
                    Ok(p) => {
                        assert!(
                            held.fetch_add(1, Ordering::SeqCst) < 2,
                            "3 of 2 permits held"
                        );
                        grants.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        held.fetch_sub(1, Ordering::SeqCst);
                        let _ = p.release().await;
                    }
                    Err(Error::SessionLost { .. }) => s = long_session(store.clone()).await,
                    Err(e) if e.is_retryable() || e.is_ambiguous() => {}
                    Err(e) => panic!("semaphore: {e}"),
                }
            }
        }));
    }
    let count = |t: &Arc<std::sync::Mutex<Vec<u64>>>| t.lock().unwrap().len();
    tokio::time::timeout(
        Duration::from_secs(120),
        common::until(|| count(&terms) >= 20),
    )
    .await
    .expect("terms before the kill");
    cluster.kill(raft_leader).unwrap();
    let before = count(&terms);
    let killed = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(90),
        common::until(|| count(&terms) >= before + 20),
    )
    .await
    .unwrap_or_else(|_| panic!("no new terms after the kill\n{}", cluster.log_tails(40)));
    let permits_before = grants.load(Ordering::SeqCst);
    tokio::time::timeout(
        Duration::from_secs(60),
        common::until(|| grants.load(Ordering::SeqCst) >= permits_before + 10),
    )
    .await
    .expect("semaphore grants resume after the kill");
    println!("terms resumed within {:?} of the kill", killed.elapsed());
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("candidate stops")
            .unwrap();
    }
    let terms = terms.lock().unwrap().clone();
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "terms not strictly increasing: {terms:?}"
    );
    cluster.restart(raft_leader).unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    cluster
        .check_replicas(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("replicas after the kill: {e}"));
}

// Other processes: `dcoord elect` campaigning, observing, SIGKILLed; `dcoord semaphore`.

mod process {
    use super::*;
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::process::{Child, ChildStdout};

    fn spawn(
        args: &[&str],
        endpoints: &str,
        command: &[&str],
    ) -> (Child, Lines<BufReader<ChildStdout>>) {
        let mut child = common::dcoord_child(args, endpoints, command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    }

    async fn line(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> String {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line: {what}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stdout ended: {what}"))
    }

    fn token(line: &str, name: &str) -> u64 {
        let mut parts = line.splitn(3, ' ');
        assert_eq!(parts.next(), Some(name), "{line}");
        parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{line}"))
    }

    /// A leader process SIGKILLed: a listener sees it go one lease later, and the waiting
    /// candidate process leads with a higher token. Nothing is printed before leading.
    #[tokio::test]
    async fn a_sigkilled_leader_process_is_replaced_and_listeners_see_each_change() {
        let (_store, endpoints) = common::shared_remote().await;
        let name = format!("cli-{}", uuid::Uuid::new_v4().simple());
        let (mut first, mut first_out) = spawn(
            &["elect", &name, "host-a:1", "--lease", "2"],
            &endpoints,
            &[],
        );
        let led = line(&mut first_out, "the first candidate leads").await;
        let t1 = token(&led, &name);
        assert!(led.ends_with(" host-a:1"), "{led}");
        let (_listener, mut heard) = spawn(
            &["elect", "--listen", &name, "--lease", "2"],
            &endpoints,
            &[],
        );
        assert_eq!(line(&mut heard, "the current leader").await, led);
        let (_second, mut second_out) = spawn(
            &["elect", &name, "host-b:2", "--lease", "2", "-o", "json"],
            &endpoints,
            &[],
        );
        // The second candidate queues; it prints nothing while it waits.
        let s = session(_store.clone()).await;
        let election = Election::new(&s, &name).unwrap();
        until_candidates(&election, 1, 30).await;
        first.start_kill().unwrap();
        let killed = std::time::Instant::now();
        let json: serde_json::Value =
            serde_json::from_str(&line(&mut second_out, "the second candidate leads").await)
                .unwrap();
        let took = killed.elapsed();
        let t2 = json["token"].as_u64().unwrap();
        assert!(t2 > t1, "{json}");
        assert_eq!(json["value"], "host-b:2");
        println!("SIGKILLed leader replaced after {took:?} (lease 2 s)");
        assert!(
            took < Duration::from_secs(2) + Duration::from_secs(10),
            "{took:?}"
        );
        // The listener saw the new term (perhaps `NAME -` in between, if it saw the death first).
        loop {
            let l = line(&mut heard, "the listener sees the new term").await;
            if l == format!("{name} -") {
                continue;
            }
            assert_eq!(token(&l, &name), t2, "{l}");
            assert!(l.ends_with(" host-b:2"), "{l}");
            break;
        }
    }

    /// `dcoord semaphore --permits 2`: four processes, at most two running at once (each
    /// holds a marker file while it runs), all exit 0; then `semaphore info`.
    #[tokio::test]
    async fn semaphore_processes_never_run_more_than_n_at_once() {
        let (_store, endpoints) = common::shared_remote().await;
        let name = format!("cli-sem-{}", uuid::Uuid::new_v4().simple());
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "touch {d}/$$; n=$(ls {d} | wc -l); echo $n >> {d}.peaks; sleep 0.3; rm {d}/$$",
            d = dir.path().display()
        );
        let mut children = Vec::new();
        for _ in 0..4 {
            let child = common::dcoord_child(
                &["semaphore", &name, "--permits", "2"],
                &endpoints,
                &["sh", "-c", &script],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
            children.push(child);
        }
        for mut c in children {
            let status = tokio::time::timeout(Duration::from_secs(60), c.wait())
                .await
                .expect("the command ran")
                .unwrap();
            assert!(status.success(), "{status}");
        }
        let peaks = std::fs::read_to_string(format!("{}.peaks", dir.path().display())).unwrap();
        let peaks: Vec<u32> = peaks.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(peaks.len(), 4, "{peaks:?}");
        assert!(
            peaks.iter().all(|p| *p <= 2),
            "more than 2 at once: {peaks:?}"
        );
        let out = tokio::process::Command::new(common::binary())
            .args([
                "semaphore",
                "info",
                &name,
                "--permits",
                "2",
                "-o",
                "json",
                "--endpoints",
                &endpoints,
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (info["available"].as_u64(), info["token"].as_u64()),
            (Some(2), Some(4)),
            "{info}"
        );
        // A holder process SIGKILLed: its permit is taken back after its lease.
        let one = format!("{name}-one");
        let mut holder = common::dcoord_child(
            &[
                "semaphore",
                &one,
                "--permits",
                "1",
                "--lease",
                "2",
                "--print-token",
            ],
            &endpoints,
            &["sleep", "1000"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
        let mut out = BufReader::new(holder.stdout.take().unwrap()).lines();
        let t1: u64 = line(&mut out, "the holder's token").await.parse().unwrap();
        holder.start_kill().unwrap();
        let killed = std::time::Instant::now();
        let next = tokio::process::Command::new(common::binary())
            .args([
                "semaphore",
                &one,
                "--permits",
                "1",
                "--wait",
                "30s",
                "--print-token",
                "--endpoints",
                &endpoints,
                "--",
                "true",
            ])
            .output()
            .await
            .unwrap();
        assert!(
            next.status.success(),
            "{}",
            String::from_utf8_lossy(&next.stderr)
        );
        let t2: u64 = String::from_utf8_lossy(&next.stdout)
            .trim()
            .parse()
            .unwrap();
        assert!(t2 > t1);
        println!(
            "a SIGKILLed permit holder's permit granted again after {:?} (lease 2 s)",
            killed.elapsed()
        );
        // Another N is refused with a clear message, and changes nothing.
        let out = tokio::process::Command::new(common::binary())
            .args([
                "semaphore",
                &name,
                "--permits",
                "3",
                "--endpoints",
                &endpoints,
                "--",
                "true",
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("capacity 2"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Candidates with values near the 64 KiB limit make a record of several hundred KiB: a write
/// of it that also takes new arrivals in (and deletes their keys, now garbage) would be a
/// transaction over the 1 MiB limit (it carries the expected record and the new one), so it
/// goes as a plain CAS, and every candidate still leads in turn.
#[tokio::test(start_paused = true)]
async fn large_candidate_values_keep_the_election_moving() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let led = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // A first wave queues up behind the first leader; a second arrives while they wait, and
    // is taken in by a write of the large record.
    for (i, arrive_ms) in [0u64, 0, 0, 0, 0, 0, 0, 30, 30, 30, 30]
        .into_iter()
        .enumerate()
    {
        let session = long_session(store.clone()).await;
        let led = led.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(arrive_ms)).await;
            let election = Election::new(&session, "big").unwrap();
            let value = vec![b'a' + i as u8; 64 * 1024];
            let leading = election.campaign(&value).await?;
            led.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            leading.resign().await
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        for t in tasks {
            t.await
                .unwrap()
                .expect("a candidate with a large value campaigns and resigns");
        }
    })
    .await
    .expect("every candidate led in turn");
    assert_eq!(led.load(Ordering::SeqCst), 11);
}
