//! The short fault soak: `dcoord soak` for 90 s of faults on a 3-node cluster of child
//! processes, with lock, queue and config client processes (see `src/soak/`). It prints its
//! summary table and exits 1 on any violation, with the history that shows it.

use std::process::Command;

#[test]
fn short_soak_finds_no_violation() {
    let out = Command::new(env!("CARGO_BIN_EXE_dcoord"))
        .args(["soak", "--duration", "90s"])
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
