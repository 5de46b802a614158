//! The one error type of dcoord: see [`Error`] for what to do with each variant.

use std::path::PathBuf;

use d_engine::ClientApiError;

/// `Result` with dcoord's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in dcoord.
///
/// Variants are split by what the caller should do next:
///
/// | variant | what it means | what to do |
/// |---|---|---|
/// | [`Error::InvalidKey`], [`Error::InvalidPrefix`], [`Error::ValueTooLarge`], [`Error::InvalidArgument`] | bad input; nothing was sent | fix the input |
/// | [`Error::Unavailable`] | the store could not be reached in time; nothing was applied | retry later |
/// | [`Error::Ambiguous`] | a write was sent but its outcome is unknown | re-read, then decide |
/// | [`Error::WatchCanceled`], [`Error::WatchEnded`], [`Error::WatchTransport`] | a watch stream ended | re-watch and re-scan (`reconcile` does it) |
/// | [`Error::Stopped`] | the embedded engine was stopped | nothing: the store is gone |
/// | [`Error::Lagged`] | a change subscriber fell behind | re-read the mirror's snapshot |
/// | [`Error::Decode`] | a stored value is not what the recipe wrote | inspect the key; nothing was changed |
/// | [`Error::Fenced`] | a newer lock holder already wrote the key | stop: you no longer hold the lock |
/// | [`Error::LockLost`] | the lock record shows this grant is over (taken over, or released) | stop: you no longer hold the lock |
/// | [`Error::SessionLost`] | the session's lease ran out (or it was closed) | start a new session |
/// | [`Error::ReplicaMismatch`] | a replica check found nodes that differ | wipe the named node's data dir; it catches up |
/// | [`Error::Engine`], [`Error::Config`], [`Error::Io`], [`Error::PortInUse`] | everything else | read the message |
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key is empty, too long, or otherwise unusable. Nothing was written.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key, lossily decoded for display.
        key: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A watch prefix is not '/'-bounded (it must start and end with '/'), or a scan prefix is
    /// empty. Nothing was registered.
    #[error("invalid prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The prefix, lossily decoded for display.
        prefix: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A value is larger than [`crate::keys::MAX_VALUE_LEN`]. Nothing was written.
    #[error("value for key {key:?} is {size} bytes, over the limit of {limit} bytes")]
    ValueTooLarge {
        /// The key the value was meant for.
        key: String,
        /// The value's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// Any other argument that cannot be used (a zero TTL, an empty endpoint list, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The store could not serve the operation before its deadline (no leader, endpoints
    /// unreachable, ...). The operation was NOT applied: retrying is safe.
    #[error("store unavailable during {op}: {message}")]
    Unavailable {
        /// The operation that failed (`put`, `get`, `connect`, ...).
        op: &'static str,
        /// What the last attempt saw.
        message: String,
        /// The last d-engine error, if there was one.
        #[source]
        source: Option<Box<ClientApiError>>,
    },

    /// A write was sent but its outcome is unknown (a timeout after sending, or the connection
    /// dropped before the answer). It may or may not have been applied: re-read to find out.
    /// dcoord never retries such a write as if it had failed.
    #[error("outcome of {op} on key {key:?} is unknown: {message}")]
    Ambiguous {
        /// The write (`put`, `delete`, `compare_and_swap`, ...).
        op: &'static str,
        /// The key written.
        key: String,
        /// What the store said.
        message: String,
        /// The d-engine error, if there was one.
        #[source]
        source: Option<Box<ClientApiError>>,
    },

    /// The server cancelled the watch because the watcher fell behind (its buffer overflowed).
    /// Events may have been lost: re-watch and re-scan.
    #[error("watch on {target} canceled by the server (watcher fell behind)")]
    WatchCanceled {
        /// The watched key or prefix.
        target: String,
    },

    /// The watch stream ended without an error from the server (engine stopped, server closed
    /// the stream). Re-watch and re-scan.
    #[error("watch on {target} ended: {reason}")]
    WatchEnded {
        /// The watched key or prefix.
        target: String,
        /// Why, as far as dcoord knows.
        reason: String,
    },

    /// The watch stream failed in transport (the serving node died, the connection reset).
    /// Re-watch and re-scan.
    #[error("watch on {target} failed: {message}")]
    WatchTransport {
        /// The watched key or prefix.
        target: String,
        /// The transport error.
        message: String,
    },

    /// The replicas of a cluster differ (keys, values, TTL state) or a node's raft log has a
    /// hole: see [`crate::engine::replica::check`].
    #[error("replicas differ: {report}")]
    ReplicaMismatch {
        /// Which nodes, keys and index ranges.
        report: String,
    },

    /// The embedded engine behind this store has been stopped.
    #[error("the embedded engine is stopped")]
    Stopped,

    /// A subscriber to a mirror's changes fell behind and missed `skipped` changes. The mirror
    /// itself is intact: re-read its snapshot, then keep reading changes.
    #[error("a subscriber to {target} fell {skipped} changes behind; re-read the snapshot")]
    Lagged {
        /// The mirrored key or prefix.
        target: String,
        /// How many changes it missed.
        skipped: u64,
    },

    /// A value stored by (or for) a recipe does not decode. Nothing was changed.
    #[error("cannot decode the value of {key:?}: {reason}")]
    Decode {
        /// The key, lossily decoded for display.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A fenced write was rejected: the key was already written under a newer fencing token,
    /// so the lock this token came from has moved on. Nothing was written.
    #[error(
        "fenced write to {key:?} rejected: token {token} is older than the stored token {stored}"
    )]
    Fenced {
        /// The key, lossily decoded for display.
        key: String,
        /// The token of the rejected write.
        token: u64,
        /// The newer token stored with the key.
        stored: u64,
    },

    /// A lock guard was used after the lock record showed its grant over: taken over by a
    /// waiter that saw this session dead, or already released. Nothing was written.
    #[error("lock {lock:?}: the grant with token {token} is over (taken over or released)")]
    LockLost {
        /// The lock's name.
        lock: String,
        /// The fencing token of the grant that is over.
        token: u64,
    },
    /// A queue message this consumer held was taken over by another consumer (this one was
    /// considered dead, or the message was changed by someone else). Its effects may be
    /// repeated by the new holder.
    #[error("queue message {id:?} is no longer held by this consumer")]
    ClaimLost {
        /// The message id.
        id: String,
    },

    /// A coordination session is gone (its renewals failed for longer than its lease allows,
    /// or it was closed). Whatever it held may now belong to someone else; start a new one.
    #[error("session {id} is {state}")]
    SessionLost {
        /// The session's id.
        id: String,
        /// "lost" or "closed".
        state: &'static str,
    },

    /// d-engine returned an error that is none of the above.
    #[error("d-engine error during {op}: {message}")]
    Engine {
        /// The operation.
        op: &'static str,
        /// d-engine's message.
        message: String,
        /// The d-engine error.
        #[source]
        source: Option<Box<ClientApiError>>,
    },

    /// A node or cluster configuration is invalid, or the engine refused to start.
    #[error("configuration error: {0}")]
    Config(String),

    /// A file or directory could not be used.
    #[error("{what} {path:?}: {source}")]
    Io {
        /// What dcoord was doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A listen address is already taken by another process.
    #[error("address {addr} is already in use")]
    PortInUse {
        /// The address.
        addr: std::net::SocketAddr,
    },
}

impl Error {
    /// True when retrying the same call later may succeed and cannot do harm: the store was
    /// unavailable (nothing applied), or a watch ended (re-watch).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::WatchCanceled { .. }
                | Error::WatchEnded { .. }
                | Error::WatchTransport { .. }
        )
    }

    /// True when a write may or may not have been applied: the caller must re-read.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Error::Ambiguous { .. })
    }

    /// True for the three ways a watch stream can end.
    pub fn is_watch_end(&self) -> bool {
        matches!(
            self,
            Error::WatchCanceled { .. } | Error::WatchEnded { .. } | Error::WatchTransport { .. }
        )
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Lossy display form of a key, for error messages.
pub(crate) fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// `e` and every error in its source chain, joined by ": " (tonic's transport errors say only
/// "transport error"; the reason, a refused certificate say, is in the chain).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
