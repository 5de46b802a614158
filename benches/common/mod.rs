//! Helpers shared by the benchmark programs.
#![allow(dead_code)]

use std::time::Duration;

use dcoord::engine::{ClusterOptions, LocalCluster};

/// The `p` quantile (0..=1) of sorted samples.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The value after `--name` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A local 3-node cluster of this build's `dcoord` binary.
pub async fn cluster() -> LocalCluster {
    LocalCluster::start(
        ClusterOptions::default()
            .nodes(3)
            .binary(env!("CARGO_BIN_EXE_dcoord")),
    )
    .await
    .unwrap()
}

/// Logs to stderr, filtered by `DCOORD_LOG` (default `warn`).
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DCOORD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
}
