//! The short fault soak: `dcoord soak` for 90 s of faults on a 3-node cluster of child
//! processes, with lock, queue and config client processes (see `src/soak/`). It prints its
//! summary table and exits 1 on any violation, with the history that shows it.
//!
//! This run injects client faults and bad input only, no node faults: d-engine 0.2.4 has
//! known engine-level failures under node faults that the full soak reports, and a test that
//! fails on them one run in ten would be a flaky test:
//! - across a node SIGKILL + restart it can lose acknowledged writes (it acknowledges before
//!   writing to disk, and its crash recovery has holes; see README "Non-guarantees" and
//!   `tests/conformance.rs`): the store probe reports it, about once per 20-30 restarts;
//! - after a leader is paused (SIGSTOP) and resumed, the cluster can stay without a working
//!   leader for good (the resumed leader keeps its term while the others cycle between
//!   candidate and follower in that same term; d-engine #31 describes a similar deadlock).
//!
//! Leader kills are covered by the recipe tests (`tests/lock.rs`, `queue.rs`, `config.rs`,
//! `reconcile.rs`). `dcoord soak` without `--faults` runs every kind.

use std::process::Command;

#[test]
fn short_soak_finds_no_violation() {
    let out = Command::new(env!("CARGO_BIN_EXE_dcoord"))
        .args([
            "soak",
            "--duration",
            "90s",
            "--faults",
            "kill-lock-worker,pause-lock-worker,kill-consumer,pause-consumer,kill-watcher,\
             bad-input",
        ])
        .output()
        .expect("dcoord soak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "dcoord soak failed ({}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    assert!(stdout.contains("violations: 0"), "{stdout}");
}
