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
//! The repair: before the state machine opens, set `metadata.bin` to the last complete WAL
//! entry, exactly the state the replay will produce, so Raft resumes after it. The entries
//! are committed (the state machine only sees committed entries), so skipping their second
//! application is what Raft intends. `DCOORD_NO_WAL_REPAIR=1` turns it off (for the
//! conformance test that shows the bug).

use std::path::Path;

use crate::error::{Error, Result};

/// The index and term of the last complete entry in a WAL image, parsed exactly as d-engine's
/// `replay_wal` parses it (it stops at the first incomplete entry or unknown opcode).
pub(crate) fn last_wal_entry(buf: &[u8]) -> Option<(u64, u64)> {
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
        last = Some((index, term));
    }
    last
}

/// Makes `metadata.bin` in the state machine directory `dir` agree with what the WAL replay
/// will restore. Returns the (old, new) applied index when it changed something.
pub(crate) fn repair_state_machine(dir: &Path) -> Result<Option<(u64, u64)>> {
    if std::env::var_os("DCOORD_NO_WAL_REPAIR").is_some_and(|v| v == "1") {
        return Ok(None);
    }
    let wal = match std::fs::read(dir.join("wal.log")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot read", dir.join("wal.log"), e)),
    };
    let Some((index, term)) = last_wal_entry(&wal) else {
        return Ok(None);
    };
    let meta_path = dir.join("metadata.bin");
    let applied = match std::fs::read(&meta_path) {
        Ok(b) if b.len() >= 16 => u64::from_be_bytes(b[..8].try_into().unwrap()),
        Ok(_) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io("cannot read", meta_path, e)),
    };
    if index <= applied {
        return Ok(None);
    }
    let mut bytes = index.to_be_bytes().to_vec();
    bytes.extend_from_slice(&term.to_be_bytes());
    let tmp = dir.join("metadata.bin.dcoord-tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| Error::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, &meta_path).map_err(|e| Error::io("cannot replace", &meta_path, e))?;
    tracing::warn!(
        dir = %dir.display(),
        "unclean shutdown: the state machine's WAL runs to index {index}; recorded it as applied \
         (was {applied}) so Raft does not apply those entries twice"
    );
    Ok(Some((applied, index)))
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
}
