//! The short fault soak: `dcoord soak` for 90 s of faults on a 3-node cluster of child
//! processes, with lock, queue and config client processes (see `src/soak/`). It prints its
//! summary table and exits 1 on any violation, with the history that shows it.
//!
//! This run leaves out the node SIGKILL + restart faults: d-engine 0.2.4 can lose acknowledged
//! writes across a node restart (it acknowledges before writing to disk, and its crash
//! recovery has holes; see README "Non-guarantees" and `tests/conformance.rs`), which the
//! soak's store probe reports as a violation of the store itself, about once per 25 restarts.
//! A test that fails on the engine's known data loss one run in ten would be a flaky test.
//! Nodes are still paused (SIGSTOP past the election timeout: leader changes); clients are
//! killed and paused; bad input is written. `dcoord soak` without `--faults` runs all kinds.

use std::process::Command;

#[test]
fn short_soak_finds_no_violation() {
    let out = Command::new(env!("CARGO_BIN_EXE_dcoord"))
        .args([
            "soak",
            "--duration",
            "90s",
            "--faults",
            "pause-node,kill-lock-worker,pause-lock-worker,kill-consumer,pause-consumer,\
             kill-watcher,bad-input",
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
