//! # dcoord
//!
//! Coordination recipes (a fair fenced lock, a durable work queue, config hot-reload, ...) on
//! [d-engine](https://crates.io/crates/d-engine), the Raft KV store with watch streams. Runs
//! d-engine embedded in your process by default; moves to a d-engine cluster over gRPC without
//! code changes: every recipe works on an `Arc<dyn` [`store::Store`]`>`.
//!
//! - [`store`]: the primitives (get, put, CAS, scan, watch) over the embedded engine, a remote
//!   cluster, or (feature `test-util`) an in-memory store with fault injection.
//! - [`engine`]: start an embedded node, a standalone node, or a local N-node cluster.
//! - [`reconcile`]: the one watch loop every recipe uses ([`reconcile::watcher`],
//!   [`reconcile::Mirror`]), correct despite d-engine's lossy watches.
//! - [`session`]: a process identity with a liveness lease, shared by the recipes.
//! - [`keys`]: the rules for keys, prefixes, values and names.
//!
//! The recipes, each on a [`session::Session`] (or, for config, a store):
//! - [`lock`]: a fair (FIFO) mutex with fencing tokens; a crashed holder is taken over one
//!   lease after its last heartbeat.
//! - [`queue`]: a work queue with at-least-once delivery, one holder per message at a time,
//!   retries with backoff, dead letters and idempotent enqueue.
//! - [`config`]: a typed configuration value, validated before it is applied, that never goes
//!   backwards.
//!
//! ```
//! # #[tokio::main] async fn main() -> dcoord::Result<()> {
//! use dcoord::store::{Consistency, Store};
//! let dir = tempfile::tempdir().unwrap();
//! let node = dcoord::engine::EmbeddedNode::start(dir.path()).await?;
//! let store = node.dyn_store();
//! assert!(store.compare_and_swap(b"/demo/owner", None, b"me").await?);
//! assert!(!store.compare_and_swap(b"/demo/owner", None, b"you").await?);
//! node.stop().await?;
//! # Ok(()) }
//! ```

pub mod engine;
mod error;
mod fair;
pub mod keys;
pub mod metrics;
mod presence;
pub mod reconcile;
pub mod session;
pub mod store;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;

#[path = "../recipes/mod.rs"]
mod recipes;
pub use recipes::*;

pub use error::{Error, Result};
