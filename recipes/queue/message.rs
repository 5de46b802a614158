//! The message record: one key per message, header + payload, changed only by CAS. Pure code.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, show};

/// Where a message is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub(crate) enum State {
    /// Waiting to be claimed (not before `Header::not_before_ms`).
    Ready,
    /// Held by a consumer's session.
    Claimed { session: String },
    /// Gave up after too many attempts (or the payload does not decode).
    Dead { error: String },
    /// Acked; kept as a tombstone so a retried enqueue of the same id is not redone.
    Done { at_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) v: u32,
    pub(crate) id: String,
    pub(crate) prio: i32,
    pub(crate) ts_ms: u64,
    pub(crate) producer: String,
    pub(crate) n: u64,
    pub(crate) not_before_ms: u64,
    pub(crate) attempts: u32,
    pub(crate) state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    /// A fresh random number on every change of state: it makes every write's bytes unique,
    /// so a record never returns to bytes it held before (a release would otherwise recreate
    /// the pre-claim record exactly). That is what lets an unknown outcome be settled by
    /// re-sending the CAS ([`crate::store::Cas`]). 0 in a record just enqueued.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) w: u64,
}

fn is_zero(w: &u64) -> bool {
    *w == 0
}

impl Header {
    pub(crate) const VERSION: u32 = 1;
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) header: Header,
    pub(crate) payload: Bytes,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let h = serde_json::to_vec(&self.header).expect("a header always serializes");
        let mut out = Vec::with_capacity(4 + h.len() + self.payload.len());
        out.extend_from_slice(&(h.len() as u32).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.payload);
        out
    }

    pub(crate) fn decode(key: &[u8], raw: &Bytes) -> Result<Record> {
        let bad = |reason: String| Error::Decode {
            key: show(key),
            reason: format!("not a dcoord queue message: {reason}"),
        };
        if raw.len() < 4 {
            return Err(bad("too short".into()));
        }
        let len = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        if raw.len() < 4 + len {
            return Err(bad("truncated header".into()));
        }
        let header: Header =
            serde_json::from_slice(&raw[4..4 + len]).map_err(|e| bad(e.to_string()))?;
        if header.v != Header::VERSION {
            return Err(bad(format!("version {} is not supported", header.v)));
        }
        Ok(Record {
            header,
            payload: raw.slice(4 + len..),
        })
    }

    /// A copy with a fresh write id (see [`Header::w`]), for the next state.
    fn changed(&self) -> Record {
        let mut r = self.clone();
        r.header.w = fastrand::u64(1..);
        r
    }

    /// Claimed by `session`: one more attempt.
    pub(crate) fn claim(&self, session: &str) -> Record {
        let mut r = self.changed();
        r.header.attempts += 1;
        r.header.state = State::Claimed {
            session: session.to_string(),
        };
        r
    }

    pub(crate) fn claimed_by(&self, session: &str) -> bool {
        matches!(&self.header.state, State::Claimed { session: s } if s == session)
    }

    /// Acked: a tombstone without the payload.
    pub(crate) fn done(&self, now_ms: u64) -> Record {
        let mut r = self.changed();
        r.header.state = State::Done { at_ms: now_ms };
        r.payload = Bytes::new();
        r
    }

    /// Failed: back to Ready after `retry_at_ms`, or Dead once `max_attempts` are used.
    pub(crate) fn fail(&self, error: &str, max_attempts: u32, retry_at_ms: u64) -> Record {
        let mut r = self.changed();
        r.header.last_error = Some(error.to_string());
        if r.header.attempts >= max_attempts {
            r.header.state = State::Dead {
                error: error.to_string(),
            };
        } else {
            r.header.state = State::Ready;
            r.header.not_before_ms = retry_at_ms;
        }
        r
    }

    /// Straight to the dead letters (a payload that cannot be decoded).
    pub(crate) fn dead(&self, error: &str) -> Record {
        let mut r = self.changed();
        r.header.last_error = Some(error.to_string());
        r.header.state = State::Dead {
            error: error.to_string(),
        };
        r
    }

    /// Given back unprocessed (the consumer stopped): Ready again, the attempt not counted.
    /// `None` unless it is claimed: a done, dead or ready record is never made ready by this
    /// (a done tombstone has no payload left to deliver).
    pub(crate) fn release(&self) -> Option<Record> {
        if !matches!(self.header.state, State::Claimed { .. }) {
            return None;
        }
        let mut r = self.changed();
        r.header.attempts = r.header.attempts.saturating_sub(1);
        r.header.state = State::Ready;
        Some(r)
    }

    /// Out of the dead letters, with a fresh attempt budget.
    pub(crate) fn redrive(&self) -> Record {
        let mut r = self.changed();
        r.header.attempts = 0;
        r.header.not_before_ms = 0;
        r.header.state = State::Ready;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            header: Header {
                v: 1,
                id: "a".into(),
                prio: 0,
                ts_ms: 1,
                producer: "p".into(),
                n: 0,
                not_before_ms: 0,
                attempts: 0,
                state: State::Ready,
                last_error: None,
                w: 0,
            },
            payload: Bytes::from_static(b"\x00\xffbinary"),
        }
    }

    #[test]
    fn round_trips_binary_payloads() {
        let r = rec();
        assert_eq!(Record::decode(b"k", &Bytes::from(r.encode())).unwrap(), r);
        assert!(Record::decode(b"k", &Bytes::from_static(b"xx")).is_err());
    }

    #[test]
    fn failing_retries_then_goes_dead() {
        let r = rec().claim("s");
        assert_eq!(r.header.attempts, 1);
        let r = r.fail("boom", 2, 99);
        assert_eq!(
            (r.header.state.clone(), r.header.not_before_ms),
            (State::Ready, 99)
        );
        let r = r.claim("s").fail("boom again", 2, 99);
        assert_eq!(
            r.header.state,
            State::Dead {
                error: "boom again".into()
            }
        );
        assert_eq!(r.redrive().header.attempts, 0);
    }

    #[test]
    fn only_a_claim_can_be_released() {
        let claimed = rec().claim("s");
        let back = claimed.release().expect("a claim is released");
        assert_eq!((back.header.state, back.header.attempts), (State::Ready, 0));
        assert_eq!(back.payload, rec().payload);
        assert_eq!(
            claimed.done(5).release(),
            None,
            "a done tombstone stays done"
        );
        assert_eq!(claimed.dead("bad").release(), None);
        assert_eq!(rec().release(), None);
    }

    #[test]
    fn every_change_writes_new_bytes() {
        let r = rec();
        let claimed = r.claim("s");
        let back = claimed.release().unwrap();
        assert_ne!(
            back.encode(),
            r.encode(),
            "a release is not the pre-claim record"
        );
        assert_ne!(
            back.claim("s").encode(),
            claimed.encode(),
            "nor a re-claim the claim"
        );
        assert_ne!(r.claim("s").fail("x", 5, 0).encode(), r.encode());
    }
}
