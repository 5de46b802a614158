//! Crash recovery of d-engine 0.2.4's file state machine, made correct.
//!
//! `FileStateMachine` writes every applied chunk to `wal.log` before applying it, and
//! checkpoints (`state.data` + `metadata.bin` = last applied index) every 1000 entries or
//! 10 s. On startup it loads the checkpoint, replays the WAL into memory, and clears the
//! WAL, but leaves `last_applied` at the CHECKPOINT's index. Raft then applies the log
//! entries after that index a second time, onto a state that already contains them. Puts and
//! deletes come out the same; a compare-and-swap does not: `CAS(B→C)` that failed the first
//! time succeeds when the key already holds the later `B`. The replica diverges from the
//! others for good, and once it leads, its reads and CASes are evaluated against that state
//! (the soak saw lock records 10 s old and lost keys; `tests/conformance.rs` pins it).
//!
//! There is a second hole: the replay clears the WAL without writing a checkpoint, so until
//! the next checkpoint (up to 10 s) the replayed entries exist only in memory. A second crash
//! in that window loses them for good (the soak saw a restarted node serve a lock record 39 s
//! old after being killed twice in 4 s).
//!
//! The repair, before the state machine opens, with the node down:
//! - `wal.log` becomes every entry since the last checkpoint: the entries carried from the
//!   previous start (kept in `wal.dcoord-carry`, valid while `metadata.bin` still holds the
//!   index this repair wrote, i.e. no checkpoint happened since) followed by the current WAL
//!   up to its last complete entry. WAL entries are absolute (a CAS is logged as the insert
//!   it made, or as a no-op), so replaying one twice is harmless.
//! - `metadata.bin` becomes the last entry of that WAL (never lower than it was), so Raft
//!   resumes after it. The entries are committed (the state machine only sees committed
//!   entries), so skipping their second application is what Raft intends.
//! - `wal.dcoord-carry` keeps that WAL for the next start.
//!
//! `DCOORD_NO_WAL_REPAIR=1` turns it off (for the conformance test that shows the bug).

use std::path::Path;

use crate::error::{Error, Result};

/// The index and term of the last complete entry in a WAL image, parsed exactly as d-engine's
/// `replay_wal` parses it (it stops at the first incomplete entry or unknown opcode).
pub(crate) fn last_wal_entry(buf: &[u8]) -> Option<(u64, u64)> {
    complete_prefix(buf).map(|(index, term, _)| (index, term))
}

/// The last complete entry's index and term, and where it ends.
fn complete_prefix(buf: &[u8]) -> Option<(u64, u64, usize)> {
    let u64_at = |pos: usize| u64::from_be_bytes(buf[pos..pos + 8].try_into().unwrap());
    let mut pos = 0;
    let mut last = None;
    while pos + 17 < buf.len() {
        let (index, term, op) = (u64_at(pos), u64_at(pos + 8), buf[pos + 16]);
        // Opcodes 0..=5: NOOP, INSERT, DELETE, CONFIG, CAS (legacy), CAS failed.
        if op > 5 {
            break;
        }
        pos += 17;
        if pos + 8 > buf.len() {
            break;
        }
        let key_len = u64_at(pos) as usize;
        pos += 8;
        if key_len > buf.len() - pos {
            break;
        }
        pos += key_len;
        if pos + 8 > buf.len() {
            break;
        }
        let value_len = u64_at(pos) as usize;
        pos += 8;
        if value_len > buf.len() - pos {
            break;
        }
        pos += value_len;
        if pos + 8 > buf.len() {
            break;
        }
        pos += 8;
        last = Some((index, term, pos));
    }
    last
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("cannot read", path, e)),
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename).
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".dcoord-tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot replace", path, e))
}

/// Makes the state machine directory `dir` recover correctly (see the module docs). Returns
/// the (old, new) applied index when it moved it.
pub(crate) fn repair_state_machine(dir: &Path) -> Result<Option<(u64, u64)>> {
    if std::env::var_os("DCOORD_NO_WAL_REPAIR").is_some_and(|v| v == "1") {
        return Ok(None);
    }
    let (wal_path, meta_path, carry_path) = (
        dir.join("wal.log"),
        dir.join("metadata.bin"),
        dir.join("wal.dcoord-carry"),
    );
    let wal = read_or_empty(&wal_path)?;
    let meta = read_or_empty(&meta_path)?;
    let carry = read_or_empty(&carry_path)?;
    let be = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
    let (applied, applied_term) = if meta.len() >= 16 {
        (be(&meta[..8]), be(&meta[8..16]))
    } else {
        (0, 0)
    };
    // Carried entries still count only if no checkpoint happened since they were carried.
    let carried = match carry.len() >= 8 && be(&carry[..8]) == applied {
        true => &carry[8..],
        false => &[][..],
    };
    let mut combined = carried.to_vec();
    if let Some((_, _, end)) = complete_prefix(&wal) {
        combined.extend_from_slice(&wal[..end]);
    }
    let Some((index, term)) = last_wal_entry(&combined) else {
        let _ = std::fs::remove_file(&carry_path);
        return Ok(None);
    };
    let (new_index, new_term) = if index > applied {
        (index, term)
    } else {
        (applied, applied_term)
    };
    // Order matters if this is interrupted: the WAL first (replaying an entry twice is
    // harmless), then the metadata, then the carry.
    if combined != wal {
        replace(&wal_path, &combined)?;
    }
    let mut new_meta = new_index.to_be_bytes().to_vec();
    new_meta.extend_from_slice(&new_term.to_be_bytes());
    if new_meta != meta {
        replace(&meta_path, &new_meta)?;
    }
    let mut new_carry = new_index.to_be_bytes().to_vec();
    new_carry.extend_from_slice(&combined);
    replace(&carry_path, &new_carry)?;
    if new_index == applied {
        return Ok(None);
    }
    tracing::warn!(
        dir = %dir.display(),
        "unclean shutdown: the state machine's WAL runs to index {new_index}; recorded it as \
         applied (was {applied}) so Raft does not apply those entries twice"
    );
    Ok(Some((applied, new_index)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(buf: &mut Vec<u8>, index: u64, term: u64, op: u8, key: &[u8], value: &[u8]) {
        buf.extend_from_slice(&index.to_be_bytes());
        buf.extend_from_slice(&term.to_be_bytes());
        buf.push(op);
        buf.extend_from_slice(&(key.len() as u64).to_be_bytes());
        buf.extend_from_slice(key);
        buf.extend_from_slice(&(value.len() as u64).to_be_bytes());
        buf.extend_from_slice(value);
        buf.extend_from_slice(&0u64.to_be_bytes());
    }

    #[test]
    fn finds_the_last_complete_entry_and_ignores_a_torn_tail() {
        let mut wal = Vec::new();
        entry(&mut wal, 7, 2, 1, b"/a", b"1");
        entry(&mut wal, 8, 2, 0, b"", b"");
        entry(&mut wal, 9, 3, 2, b"/a", b"");
        assert_eq!(last_wal_entry(&wal), Some((9, 3)));
        let full = wal.len();
        entry(&mut wal, 10, 3, 1, b"/b", b"value");
        for cut in full..wal.len() {
            assert_eq!(last_wal_entry(&wal[..cut]), Some((9, 3)), "cut at {cut}");
        }
        assert_eq!(last_wal_entry(&[]), None);
    }

    #[test]
    fn moves_metadata_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Vec::new();
        entry(&mut wal, 41, 5, 1, b"/k", b"v");
        std::fs::write(dir.path().join("wal.log"), &wal).unwrap();
        let meta = |i: u64, t: u64| [i.to_be_bytes(), t.to_be_bytes()].concat();
        std::fs::write(dir.path().join("metadata.bin"), meta(30, 4)).unwrap();
        assert_eq!(repair_state_machine(dir.path()).unwrap(), Some((30, 41)));
        assert_eq!(
            std::fs::read(dir.path().join("metadata.bin")).unwrap(),
            meta(41, 5)
        );
        // Already consistent: untouched.
        assert_eq!(repair_state_machine(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("metadata.bin"), meta(50, 6)).unwrap();
        assert_eq!(repair_state_machine(dir.path()).unwrap(), None);
        assert_eq!(
            std::fs::read(dir.path().join("metadata.bin")).unwrap(),
            meta(50, 6)
        );
    }

    #[test]
    fn entries_replayed_and_cleared_come_back_after_a_second_crash() {
        let dir = tempfile::tempdir().unwrap();
        let meta = |i: u64, t: u64| [i.to_be_bytes(), t.to_be_bytes()].concat();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        entry(&mut first, 11, 1, 1, b"/k", b"a");
        entry(&mut first, 12, 1, 1, b"/k", b"b");
        entry(&mut second, 13, 1, 1, b"/j", b"c");
        std::fs::write(dir.path().join("metadata.bin"), meta(10, 1)).unwrap();
        std::fs::write(dir.path().join("wal.log"), &first).unwrap();
        assert_eq!(repair_state_machine(dir.path()).unwrap(), Some((10, 12)));
        // d-engine replays, clears the WAL, applies entry 13, and is killed before a checkpoint.
        std::fs::write(dir.path().join("wal.log"), &second).unwrap();
        assert_eq!(repair_state_machine(dir.path()).unwrap(), Some((12, 13)));
        let wal = std::fs::read(dir.path().join("wal.log")).unwrap();
        assert_eq!(wal, [first.clone(), second.clone()].concat());
        // A checkpoint since (metadata moved on): the carried entries are dropped.
        std::fs::write(dir.path().join("metadata.bin"), meta(20, 2)).unwrap();
        std::fs::write(dir.path().join("wal.log"), b"").unwrap();
        assert_eq!(repair_state_machine(dir.path()).unwrap(), None);
        assert!(!dir.path().join("wal.dcoord-carry").exists());
        assert_eq!(
            std::fs::read(dir.path().join("metadata.bin")).unwrap(),
            meta(20, 2)
        );
    }
}
