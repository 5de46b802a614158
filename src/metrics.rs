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

/// Registers a description (Prometheus `# HELP`) and unit for every dcoord series with the
/// installed recorder. Call it once after installing one; optional.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        STORE_REQUEST_SECONDS,
        Unit::Seconds,
        "One store call, after retries."
    );
    describe_histogram!(
        LOCK_WAIT_SECONDS,
        Unit::Seconds,
        "From acquire() to the grant."
    );
    describe_counter!(LOCK_ACQUIRED_TOTAL, "Lock grants to this process.");
    describe_counter!(
        LOCK_HANDOFFS_TOTAL,
        "Releases that handed the lock to a waiter."
    );
    describe_counter!(LOCK_TAKEOVERS_TOTAL, "Locks taken over from dead holders.");
    describe_gauge!(QUEUE_DEPTH, "Messages ready, delayed or in flight.");
    describe_counter!(QUEUE_ENQUEUED_TOTAL, "Enqueues that created a message.");
    describe_counter!(QUEUE_ACKED_TOTAL, "Messages acked.");
    describe_counter!(
        QUEUE_REDELIVERIES_TOTAL,
        "Messages taken over from dead consumers."
    );
    describe_counter!(
        QUEUE_DEAD_LETTERS_TOTAL,
        "Messages moved to the dead letters."
    );
    describe_counter!(CONFIG_APPLIED_TOTAL, "Config values applied.");
    describe_counter!(
        CONFIG_REJECTIONS_TOTAL,
        "Config values that failed to decode or validate."
    );
    describe_counter!(
        WATCH_RELISTS_TOTAL,
        "Reconcile relists (new watch and scan), by reason."
    );
    describe_counter!(SESSION_RENEW_FAILURES_TOTAL, "Failed session renewals.");
    describe_counter!(SESSION_LOST_TOTAL, "Sessions lost.");
    describe_gauge!(NODE_APPLIED_INDEX, "The node's last applied raft index.");
    describe_gauge!(
        NODE_APPLIED_TERM,
        "The term of the node's last applied entry."
    );
    describe_gauge!(NODE_LAST_LOG_INDEX, "The node's last raft log index.");
    describe_gauge!(NODE_TERM, "The term of the node's last log entry.");
    describe_gauge!(NODE_LEADER_ID, "The leader the node follows (0: none).");
    describe_gauge!(NODE_IS_LEADER, "1 while the node leads.");
    describe_gauge!(NODE_SERVING, "1 while the node serves.");
    describe_gauge!(NODE_KEYS, "Keys in the node's state machine.");
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
