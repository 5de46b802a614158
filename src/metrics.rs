//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: install any recorder
//! (`metrics-exporter-prometheus`, `metrics-exporter-statsd`, ...) and dcoord's series appear;
//! without one they record nothing. Names follow Prometheus conventions
//! (`_total` counters, `_seconds` histograms); each event costs a label lookup (well under a
//! microsecond without a recorder, next to store calls of tens of microseconds and more;
//! measured in the README). The per-handle stats structs (`Mutex::stats`,
//! `WorkQueue::stats`, ...) stay the programmatic view.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `dcoord_store_request_seconds` | histogram | `store`, `op`, `outcome` | one call of the embedded or remote store (after the remote store's retries), by `ok` / `ambiguous` / `unavailable` / `error` |
//! | `dcoord_lock_wait_seconds` | histogram | `lock` | from `acquire()` to the grant |
//! | `dcoord_lock_acquired_total` | counter | `lock` | grants to this process |
//! | `dcoord_lock_handoffs_total` | counter | `lock` | releases that handed the lock to a waiter in the same write |
//! | `dcoord_lock_takeovers_total` | counter | `lock` | takeover writes that removed dead holders |
//! | `dcoord_queue_depth` | gauge | `queue` | messages ready, delayed or in flight, as this consumer sees them |
//! | `dcoord_queue_enqueued_total` | counter | `queue` | enqueues that created a message |
//! | `dcoord_queue_acked_total` | counter | `queue` | acks |
//! | `dcoord_queue_redeliveries_total` | counter | `queue` | messages taken over from dead consumers |
//! | `dcoord_queue_dead_letters_total` | counter | `queue` | messages moved to the dead letters |
//! | `dcoord_config_applied_total` | counter | `config` | values applied (the label is the source: a key or a prefix) |
//! | `dcoord_config_rejections_total` | counter | `config` | values that failed to decode or validate |
//! | `dcoord_watch_relists_total` | counter | `reason` | reconcile relists (`start`, `transport`, `periodic`, ...) |
//! | `dcoord_session_renew_failures_total` | counter | | failed session renewals |
//! | `dcoord_session_lost_total` | counter | | sessions lost |
//! | `dcoord_node_*` | gauges | | a node's own figures, see [`describe`] (`dcoord node --metrics-addr`) |
//!
//! # Not guaranteed
//! - Label values are names the application chose (lock, queue, key names): keep their number
//!   bounded, as with any Prometheus label.
//! - Handles are looked up on every event, so a recorder installed late still sees everything
//!   from then on; nothing is counted before it is installed.

use std::time::Instant;

/// The store call histogram.
pub const STORE_REQUEST_SECONDS: &str = "dcoord_store_request_seconds";
/// Time from `acquire()` to the grant.
pub const LOCK_WAIT_SECONDS: &str = "dcoord_lock_wait_seconds";
/// Grants to this process.
pub const LOCK_ACQUIRED_TOTAL: &str = "dcoord_lock_acquired_total";
/// Releases that handed the lock to a waiter in the same write.
pub const LOCK_HANDOFFS_TOTAL: &str = "dcoord_lock_handoffs_total";
/// Locks taken over from dead holders.
pub const LOCK_TAKEOVERS_TOTAL: &str = "dcoord_lock_takeovers_total";
/// Messages ready, delayed or in flight.
pub const QUEUE_DEPTH: &str = "dcoord_queue_depth";
/// Enqueues that created a message.
pub const QUEUE_ENQUEUED_TOTAL: &str = "dcoord_queue_enqueued_total";
/// Acks.
pub const QUEUE_ACKED_TOTAL: &str = "dcoord_queue_acked_total";
/// Messages taken over from dead consumers.
pub const QUEUE_REDELIVERIES_TOTAL: &str = "dcoord_queue_redeliveries_total";
/// Messages moved to the dead letters.
pub const QUEUE_DEAD_LETTERS_TOTAL: &str = "dcoord_queue_dead_letters_total";
/// Config values applied.
pub const CONFIG_APPLIED_TOTAL: &str = "dcoord_config_applied_total";
/// Config values refused.
pub const CONFIG_REJECTIONS_TOTAL: &str = "dcoord_config_rejections_total";
/// Reconcile relists.
pub const WATCH_RELISTS_TOTAL: &str = "dcoord_watch_relists_total";
/// Failed session renewals.
pub const SESSION_RENEW_FAILURES_TOTAL: &str = "dcoord_session_renew_failures_total";
/// Sessions lost.
pub const SESSION_LOST_TOTAL: &str = "dcoord_session_lost_total";
/// A node's last applied raft index.
pub const NODE_APPLIED_INDEX: &str = "dcoord_node_applied_index";
/// The term of a node's last applied entry.
pub const NODE_APPLIED_TERM: &str = "dcoord_node_applied_term";
/// A node's last raft log index (entries it holds; the commit index lies between the applied
/// index and this).
pub const NODE_LAST_LOG_INDEX: &str = "dcoord_node_last_log_index";
/// The term of a node's last log entry (its current term is at least this; it is higher during
/// an election that has not yet appended anything).
pub const NODE_TERM: &str = "dcoord_node_term";
/// The leader a node follows (0: none known, or not serving).
pub const NODE_LEADER_ID: &str = "dcoord_node_leader_id";
/// 1 while the node leads.
pub const NODE_IS_LEADER: &str = "dcoord_node_is_leader";
/// 1 while the node serves (answers through its Raft loop).
pub const NODE_SERVING: &str = "dcoord_node_serving";
/// The number of keys a node's state machine holds.
pub const NODE_KEYS: &str = "dcoord_node_keys";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Seconds,
}

/// Every series: name, kind, help text.
const SERIES: &[(&str, Kind, &str)] = &[
    (
        STORE_REQUEST_SECONDS,
        Kind::Seconds,
        "One store call, after retries.",
    ),
    (
        LOCK_WAIT_SECONDS,
        Kind::Seconds,
        "From acquire() to the grant.",
    ),
    (
        LOCK_ACQUIRED_TOTAL,
        Kind::Counter,
        "Lock grants to this process.",
    ),
    (
        LOCK_HANDOFFS_TOTAL,
        Kind::Counter,
        "Releases that handed the lock to a waiter.",
    ),
    (
        LOCK_TAKEOVERS_TOTAL,
        Kind::Counter,
        "Takeover writes that removed dead holders.",
    ),
    (
        QUEUE_DEPTH,
        Kind::Gauge,
        "Messages ready, delayed or in flight.",
    ),
    (
        QUEUE_ENQUEUED_TOTAL,
        Kind::Counter,
        "Enqueues that created a message.",
    ),
    (QUEUE_ACKED_TOTAL, Kind::Counter, "Messages acked."),
    (
        QUEUE_REDELIVERIES_TOTAL,
        Kind::Counter,
        "Messages taken over from dead consumers.",
    ),
    (
        QUEUE_DEAD_LETTERS_TOTAL,
        Kind::Counter,
        "Messages moved to the dead letters.",
    ),
    (
        CONFIG_APPLIED_TOTAL,
        Kind::Counter,
        "Config values applied.",
    ),
    (
        CONFIG_REJECTIONS_TOTAL,
        Kind::Counter,
        "Config values that failed to decode or validate.",
    ),
    (
        WATCH_RELISTS_TOTAL,
        Kind::Counter,
        "Reconcile relists (new watch and scan), by reason.",
    ),
    (
        SESSION_RENEW_FAILURES_TOTAL,
        Kind::Counter,
        "Failed session renewals.",
    ),
    (SESSION_LOST_TOTAL, Kind::Counter, "Sessions lost."),
    (
        NODE_APPLIED_INDEX,
        Kind::Gauge,
        "The node's last applied raft index.",
    ),
    (
        NODE_APPLIED_TERM,
        Kind::Gauge,
        "The term of the node's last applied entry.",
    ),
    (
        NODE_LAST_LOG_INDEX,
        Kind::Gauge,
        "The node's last raft log index.",
    ),
    (
        NODE_TERM,
        Kind::Gauge,
        "The term of the node's last log entry.",
    ),
    (
        NODE_LEADER_ID,
        Kind::Gauge,
        "The leader the node follows (0: none).",
    ),
    (NODE_IS_LEADER, Kind::Gauge, "1 while the node leads."),
    (NODE_SERVING, Kind::Gauge, "1 while the node serves."),
    (NODE_KEYS, Kind::Gauge, "Keys in the node's state machine."),
];

/// Registers a description (Prometheus `# HELP`) and unit for every dcoord series with the
/// installed recorder. Call it once after installing one; optional.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for &(name, kind, help) in SERIES {
        match kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Seconds => describe_histogram!(name, Unit::Seconds, help),
        }
    }
}

/// `outcome` label of a store call.
pub(crate) fn outcome<T>(r: &crate::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) if e.is_ambiguous() => "ambiguous",
        Err(e) if e.is_retryable() => "unavailable",
        Err(_) => "error",
    }
}

/// Records one store call that started at `started`.
pub(crate) fn store_call<T>(
    store: &'static str,
    op: &'static str,
    started: Instant,
    r: &crate::Result<T>,
) {
    metrics::histogram!(STORE_REQUEST_SECONDS, "store" => store, "op" => op, "outcome" => outcome(r))
        .record(started.elapsed().as_secs_f64());
}

/// Adds one to a counter labelled `label = value`.
pub(crate) fn count(name: &'static str, label: &'static str, value: &str) {
    metrics::counter!(name, label => value.to_string()).increment(1);
}
