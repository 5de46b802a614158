//! Replica checks: every node of a cluster holds the same state and a raft log without holes.
//!
//! A node dcoord runs with an admin address (`dcoord node --admin ADDR`; every node of a
//! [`super::LocalCluster`] has one) serves a read-only view of its own replica over HTTP:
//! - `GET /v1/replica`: a [`ReplicaSummary`] (applied index, key count, digests, raft log
//!   bounds and holes);
//! - `GET /v1/replica/keys`: [`ReplicaKeys`], every key (hex) with a hash of its value;
//! - `GET /v1/replica/digests`: [`ReplicaDigests`], the state digest after each of the node's
//!   last 4096 applied entries.
//!
//! [`check`] compares the nodes in full when they stand at one applied index, and by digest at
//! every index they all remember while writes go on.
//!
//! # Guarantees
//! - A node's view is one read transaction of its state machine: the applied index and the
//!   keys belong together.
//! - [`check`] passes only when every listed node answered, no raft log has a hole, and
//!   either all stand at one applied index with the same keys, values and TTL state, or they
//!   hold the same state digest at every index they all remember. Otherwise it fails
//!   naming the node and the keys (missing, extra, different value) or the missing index range.
//!
//! # NOT guaranteed
//! - While writes go on, nodes are compared by digest only (no key names on a difference), and
//!   only if their last 4096 applied indexes overlap: a node further behind is waited for, and
//!   the check fails naming each node's applied index if it does not catch up in time.
//! - Digests are 64-bit FNV-1a: good against accidents, not against an adversary.
//! - The admin endpoint has no authentication: bind it to a private address.
//!
//! # Failure modes
//! - A node that does not answer: the check fails after its timeout naming the node and the
//!   error.

mod admin;

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

pub(crate) use admin::serve;

/// What `GET /v1/replica` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSummary {
    /// The node's id.
    pub node: u32,
    /// The last applied raft index.
    pub applied_index: u64,
    /// The term of that entry.
    pub applied_term: u64,
    /// How many keys the state machine holds.
    pub keys: u64,
    /// The state digest recomputed from the table (XOR over every key of FNV-1a of the key and
    /// its value), hex.
    pub kv_digest: String,
    /// The digest the state machine maintains as it applies, at `applied_index`, hex. It
    /// equals `kv_digest` unless the node itself is broken.
    pub maintained_digest: String,
    /// FNV-1a over the TTL bookkeeping and the replicated clock, hex.
    pub ttl_digest: String,
    /// The lowest and highest index in the node's raft log.
    pub log_bounds: Option<(u64, u64)>,
    /// Missing index ranges inside the bounds (inclusive).
    pub log_holes: Vec<(u64, u64)>,
}

/// What `GET /v1/replica/digests` answers: the state digest after each recent applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDigests {
    /// The node's id.
    pub node: u32,
    /// (index, digest hex), oldest first.
    pub digests: Vec<(u64, String)>,
}

/// What `GET /v1/replica/keys` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaKeys {
    /// The node's id.
    pub node: u32,
    /// The applied index the keys belong to.
    pub applied_index: u64,
    /// Every key (hex) with the FNV-1a hash of its value (hex), in key order.
    pub entries: Vec<(String, String)>,
}

/// What a passing [`check`] saw.
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    /// Every node's summary, in the order asked.
    pub nodes: Vec<ReplicaSummary>,
    /// When the nodes were compared by digest history (writes going on): the lowest and
    /// highest common index and how many indexes were compared. `None`: compared in full at
    /// one applied index.
    pub agreed: Option<(u64, u64, usize)>,
}

impl fmt::Display for ReplicaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(first) = self.nodes.first() else {
            return write!(f, "no nodes");
        };
        if let Some((lo, hi, n)) = self.agreed {
            write!(
                f,
                "{} node(s) hold the same state at each of {n} applied indexes {lo}..={hi} \
                 (compared by digest while writes go on); raft logs without holes:",
                self.nodes.len()
            )?;
            for s in &self.nodes {
                write!(f, " node {} applied {};", s.node, s.applied_index)?;
            }
            return Ok(());
        }
        write!(
            f,
            "{} node(s) agree at applied index {} (term {}): {} keys, kv digest {}, ttl digest {}; \
             raft logs without holes:",
            self.nodes.len(),
            first.applied_index,
            first.applied_term,
            first.keys,
            first.kv_digest,
            first.ttl_digest
        )?;
        for n in &self.nodes {
            match n.log_bounds {
                Some((a, b)) => write!(f, " node {} {a}..={b};", n.node)?,
                None => write!(f, " node {} empty;", n.node)?,
            }
        }
        Ok(())
    }
}

/// One node's summary, read from its admin address (`host:port`).
///
/// # Errors
/// [`Error::Unavailable`] naming the address and what went wrong.
///
/// # Cancel safety
/// Dropping the future has no effect (it only reads).
pub async fn summary(admin: &str) -> Result<ReplicaSummary> {
    get_json(admin, "/v1/replica")
        .await
        .map_err(|message| Error::Unavailable {
            op: "replica summary",
            message: format!("{admin}: {message}"),
            source: None,
        })
}

/// Compares the replicas behind `admins` (each node's admin address, `host:port`).
///
/// Reads every node's summary every 100 ms until all answer at one applied index, then
/// compares them; on a difference it reads every node's keys and names them.
///
/// # Errors
/// [`Error::ReplicaMismatch`] naming the nodes and keys that differ or the holes in a raft log;
/// [`Error::Unavailable`] when some node did not answer, or the nodes never stood at one
/// applied index, within `timeout` (naming each node's last answer).
///
/// # Cancel safety
/// Dropping the future has no effect (it only reads).
pub async fn check(admins: &[String], timeout: Duration) -> Result<ReplicaReport> {
    if admins.is_empty() {
        return Err(Error::InvalidArgument(
            "a replica check needs at least one node's admin address".into(),
        ));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let answers = futures::future::join_all(
            admins
                .iter()
                .map(|a| get_json::<ReplicaSummary>(a, "/v1/replica")),
        )
        .await;
        let summaries: Vec<ReplicaSummary> = answers.iter().flatten().cloned().collect();
        if summaries.len() == admins.len() {
            let holes: Vec<String> = summaries
                .iter()
                .flat_map(|s| {
                    s.log_holes.iter().map(move |(a, b)| {
                        format!("node {}: raft log is missing entries {a}..={b}", s.node)
                    })
                })
                .collect();
            if !holes.is_empty() {
                return Err(Error::ReplicaMismatch {
                    report: holes.join("; "),
                });
            }
            let broken: Vec<String> = summaries
                .iter()
                .filter(|s| !s.maintained_digest.is_empty() && s.maintained_digest != s.kv_digest)
                .map(|s| {
                    format!(
                        "node {}: its maintained digest {} is not the digest {} of its state at \
                         index {}",
                        s.node, s.maintained_digest, s.kv_digest, s.applied_index
                    )
                })
                .collect();
            if !broken.is_empty() {
                return Err(Error::ReplicaMismatch {
                    report: broken.join("; "),
                });
            }
            let first = &summaries[0];
            if summaries
                .iter()
                .any(|s| s.applied_index != first.applied_index)
                && let Some(outcome) = compare_histories(admins).await
            {
                return outcome;
            }
            if summaries
                .iter()
                .all(|s| s.applied_index == first.applied_index)
            {
                let same = |s: &ReplicaSummary| {
                    (s.applied_term, s.keys, &s.kv_digest, &s.ttl_digest)
                        == (
                            first.applied_term,
                            first.keys,
                            &first.kv_digest,
                            &first.ttl_digest,
                        )
                };
                if summaries.iter().all(same) {
                    return Ok(ReplicaReport {
                        nodes: summaries,
                        agreed: None,
                    });
                }
                if let Some(report) = explain(admins, &summaries).await {
                    return Err(Error::ReplicaMismatch { report });
                }
                // The keys were read at another index: read everything again.
            }
        }
        if Instant::now() >= deadline {
            let report: Vec<String> = admins
                .iter()
                .zip(&answers)
                .map(|(a, r)| match r {
                    Ok(s) => format!("node {} ({a}): applied {}", s.node, s.applied_index),
                    Err(e) => format!("{a}: {e}"),
                })
                .collect();
            return Err(Error::Unavailable {
                op: "replica check",
                message: format!(
                    "the nodes did not stand at one applied index within {timeout:?}: {}",
                    report.join("; ")
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the nodes stand at different indexes: compares their digest histories at every index
/// all of them remember. `None` when they share no index (try again later).
async fn compare_histories(admins: &[String]) -> Option<Result<ReplicaReport>> {
    let answers = futures::future::join_all(
        admins
            .iter()
            .map(|a| get_json::<ReplicaDigests>(a, "/v1/replica/digests")),
    )
    .await;
    let histories: Vec<ReplicaDigests> = answers
        .into_iter()
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let maps: Vec<std::collections::BTreeMap<u64, &str>> = histories
        .iter()
        .map(|h| h.digests.iter().map(|(i, d)| (*i, d.as_str())).collect())
        .collect();
    let common: Vec<u64> = maps[0]
        .keys()
        .copied()
        .filter(|i| maps[1..].iter().all(|m| m.contains_key(i)))
        .collect();
    let (&lo, &hi) = (common.first()?, common.last()?);
    for &i in &common {
        let d0 = maps[0][&i];
        if let Some((h, m)) = histories.iter().zip(&maps).find(|(_, m)| m[&i] != d0) {
            return Some(Err(Error::ReplicaMismatch {
                report: format!(
                    "at applied index {i}: node {} has state digest {}, node {} has {} (the \
                     nodes applied the same entries and hold different states)",
                    h.node, m[&i], histories[0].node, d0
                ),
            }));
        }
    }
    let mut nodes = Vec::new();
    for a in admins {
        nodes.push(get_json::<ReplicaSummary>(a, "/v1/replica").await.ok()?);
    }
    Some(Ok(ReplicaReport {
        nodes,
        agreed: Some((lo, hi, common.len())),
    }))
}

/// Names what differs between replicas that report the same applied index; `None` if the keys
/// could not be read at that one index (the nodes moved on meanwhile).
async fn explain(admins: &[String], summaries: &[ReplicaSummary]) -> Option<String> {
    let index = summaries[0].applied_index;
    let answers = futures::future::join_all(
        admins
            .iter()
            .map(|a| get_json::<ReplicaKeys>(a, "/v1/replica/keys")),
    )
    .await;
    let keys: Vec<ReplicaKeys> = answers
        .into_iter()
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    if keys.iter().any(|k| k.applied_index != index) {
        return None;
    }
    let mut lines = Vec::new();
    // Compare against a node whose digest most nodes share, so the odd one is the one named.
    let votes = |d: &str| summaries.iter().filter(|s| s.kv_digest == d).count();
    let at = (0..summaries.len())
        .max_by_key(|&i| (votes(&summaries[i].kv_digest), std::cmp::Reverse(i)))
        .unwrap_or(0);
    let base = &keys[at];
    let base_map: std::collections::BTreeMap<&str, &str> = base
        .entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for other in keys.iter().filter(|k| k.node != base.node) {
        let map: std::collections::BTreeMap<&str, &str> = other
            .entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut missing = Vec::new();
        let mut extra = Vec::new();
        let mut differ = Vec::new();
        for (k, v) in &base_map {
            match map.get(k) {
                None => missing.push(show(k)),
                Some(w) if w != v => differ.push(show(k)),
                Some(_) => {}
            }
        }
        for k in map.keys() {
            if !base_map.contains_key(k) {
                extra.push(show(k));
            }
        }
        let mut parts = Vec::new();
        for (what, list) in [
            ("lacks", missing),
            ("has extra", extra),
            ("has other values for", differ),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {} key(s) {}", list.len(), preview(&list)));
            }
        }
        if !parts.is_empty() {
            lines.push(format!(
                "node {} vs node {}: {}",
                other.node,
                base.node,
                parts.join(", ")
            ));
        }
    }
    let b = &summaries[at];
    for s in summaries {
        if s.ttl_digest != b.ttl_digest {
            lines.push(format!(
                "node {} vs node {}: TTL state differs",
                s.node, b.node
            ));
        }
        if s.applied_term != b.applied_term {
            lines.push(format!(
                "node {} applied index {index} in term {}, node {} in term {}",
                s.node, s.applied_term, b.node, b.applied_term
            ));
        }
    }
    if lines.is_empty() {
        lines.push("the digests differ but every key matches (a hash collision?)".into());
    }
    Some(format!("at applied index {index}: {}", lines.join("; ")))
}

fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", … ({} more)", keys.len() - SHOWN));
    }
    s
}

/// A hex key shown as text when it is UTF-8, else as hex.
fn show(hex_key: &str) -> String {
    let bytes: Option<Vec<u8>> = (0..hex_key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex_key.get(i..i + 2)?, 16).ok())
        .collect();
    match bytes.map(String::from_utf8) {
        Some(Ok(s)) => format!("{s:?}"),
        _ => format!("0x{hex_key}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET path` over HTTP/1.0 to `addr`, decoded from JSON; errors as text.
async fn get_json<T: serde::de::DeserializeOwned>(
    addr: &str,
    path: &str,
) -> std::result::Result<T, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 10 s"))??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: not an HTTP response"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(body)
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("GET {path}: bad JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shown_as_text_or_hex() {
        assert_eq!(show(&hex(b"/a/b")), "\"/a/b\"");
        assert_eq!(show(&hex(&[0xff, 0x00])), "0xff00");
        let many: Vec<String> = (0..7).map(|i| i.to_string()).collect();
        assert_eq!(preview(&many), "0, 1, 2, 3, 4, … (2 more)");
    }
}
