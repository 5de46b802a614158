//! Group commit: concurrent writes of one store handle travel together as one transaction.
//!
//! Requests of a handle are limited to [`MAX_IN_FLIGHT`] at a time (a request slot). A write
//! (put, delete, compare-and-swap) that finds a slot free takes it; otherwise it waits, and
//! when a request comes back one waiting caller takes the slot. Whoever takes a slot yields to
//! the scheduler [`LINGER_YIELDS`] times, then gathers every write waiting by then and sends
//! them, its own included, as one [`Store::transact`] (one Raft entry instead of one each).
//! The yields let the callers the last request just answered, which usually write again at
//! once (a producer's next enqueue, a consumer's next claim or ack), join this request rather
//! than wait a whole round for the next one.
//!
//! If the transaction applies, every write in it did. If it is refused (one expectation did
//! not hold, so nothing was written), a linearizable read of its keys finds the writes whose
//! expectation does not hold: each is answered false (what its own CAS would have answered at
//! the moment of the read), and the others are sent again together (after a few refusals, one
//! by one). So each caller gets an answer its own write could have had. An unknown outcome is
//! every write's unknown outcome ([`crate::Error::Ambiguous`]).
//!
//! So a caller sees exactly the semantics of its own single write; only writes that were
//! concurrent anyway share an entry. A lone write is delayed only by the yields: microseconds
//! on an idle runtime, but on a busy multi-threaded one each yield can wait behind the other
//! tasks ready on its worker (tokio runs a yielded task once the worker's queue is empty, or
//! at its periodic maintenance) while the slot stays unused.
//!
//! # Cancel safety
//! A write whose caller is dropped while it waits, or while it holds a slot and yields, is
//! taken out and never sent (the slot is freed; no other write is affected). One whose caller
//! is dropped while it is in flight is in an unknown state (as every dropped write). When the
//! caller that sends a group is dropped, the others in it get [`crate::Error::Ambiguous`].

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, oneshot};

use super::txn::{self, Expect, TxnOp};
use crate::error::{Error, Result};

#[cfg(doc)]
use super::Store;

/// Requests of one handle in flight before writes start to wait and group.
///
/// One: measured with bench-etcd (e) on 2026-12-03 (3-node queue throughput, same run order:
/// 1 in flight 2862 msg/s, 2: 2643, 4: 2489, 8: 2191); fewer, larger Raft entries win, and a
/// lone write goes after only the [`LINGER_YIELDS`]. Checked again with the yields on
/// 2026-12-07: 2 in flight was not better.
pub(crate) const MAX_IN_FLIGHT: usize = 1;
/// Scheduler yields between taking the request slot and gathering the group.
///
/// Without them, the first caller to find the slot free sent at once, usually alone or with
/// the writes that had waited through the last round; the callers that round answered wrote
/// again a moment later and waited a whole round more. With a producer keeping 8 enqueues in
/// flight on a handle shared with two consumers, only about half of them rode each request.
/// Measured with bench-etcd `--only e,h` and full runs, alternating (2026-12-07): 0 yields
/// gave about 3.3 enqueues per request and queue (e) 2.2× etcd on 3 nodes with the producer
/// running; 3 gave about 6.3 per request and 2.9–4.0× (semaphore (h) 7.1–7.2× → 8.8–11.9×).
/// 2 and 5 were not better than 3.
const LINGER_YIELDS: usize = 3;
/// Most writes in one group.
const MAX_GROUP: usize = 256;
/// Most encoded bytes in one group.
const MAX_GROUP_BYTES: usize = 1 << 20;

/// What a backend provides: its writes sent directly.
#[async_trait]
pub(crate) trait Direct: Send + Sync {
    /// The store's name in spans and metrics.
    fn name(&self) -> &'static str;
    /// One write, on its own: a put, a delete or a compare-and-swap (a conditional delete is
    /// sent as a transaction of one).
    async fn write_one(&self, op: &TxnOp) -> Result<bool>;
    /// A transaction's wire form, as a CAS of [`txn::TXN_KEY`].
    async fn write_txn(&self, wire: Vec<u8>) -> Result<bool>;
    /// A linearizable read of several keys.
    async fn read(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>>;
}

/// Sends `op` on its own with `d`.
pub(crate) async fn send_one<D: Direct>(d: &D, op: &TxnOp) -> Result<bool> {
    match (&op.expect, &op.write) {
        (Expect::Value(_), None) => d.write_txn(txn::encode(std::slice::from_ref(op))).await,
        _ => d.write_one(op).await,
    }
}

/// A handle's group commit.
pub(crate) struct Group {
    /// Off: every write is sent on its own at once.
    on: bool,
    st: Mutex<State>,
    free: Notify,
    /// Whether the servers apply transactions (a stock d-engine refuses every one).
    txn: OnceCell<bool>,
    /// Whether they apply transactions with an otherwise branch (dcoord's since it knows them).
    txn_or: OnceCell<bool>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Group")
            .field("in_flight", &st.in_flight)
            .field("waiting", &st.waiting.len())
            .finish()
    }
}

#[derive(Default)]
struct State {
    in_flight: usize,
    next: u64,
    waiting: Vec<Waiting>,
}

struct Waiting {
    id: u64,
    op: TxnOp,
    tx: oneshot::Sender<Result<bool>>,
}

impl Default for Group {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Group {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            st: Mutex::default(),
            free: Notify::new(),
            txn: OnceCell::new(),
            txn_or: OnceCell::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `d`'s servers apply transactions: asked once, with an empty transaction (which
    /// dcoord's state machine applies and a stock one refuses).
    pub(crate) async fn supports_txn<D: Direct>(&self, d: &D) -> Result<bool> {
        self.txn
            .get_or_try_init(|| d.write_txn(txn::encode(&[])))
            .await
            .copied()
    }

    /// Whether `d`'s servers apply transactions with an otherwise branch: asked once, with an
    /// empty one (applied since the state machine knows them, refused before).
    pub(crate) async fn supports_txn_or<D: Direct>(&self, d: &D) -> Result<bool> {
        self.txn_or
            .get_or_try_init(|| d.write_txn(txn::encode_or(&[], &[])))
            .await
            .copied()
    }

    /// Writes `op` (see the module docs); the answer its own write would have had.
    pub(crate) async fn write<D: Direct>(&self, d: &D, op: TxnOp) -> Result<bool> {
        if !self.on {
            return send_one(d, &op).await;
        }
        let start = {
            let mut st = self.lock();
            if st.in_flight < MAX_IN_FLIGHT {
                st.in_flight += 1;
                Err(Slot(self))
            } else {
                st.next += 1;
                let id = st.next;
                let (tx, rx) = oneshot::channel();
                st.waiting.push(Waiting {
                    id,
                    op: op.clone(),
                    tx,
                });
                Ok((id, rx))
            }
        };
        let (id, rx) = match start {
            Ok(waiting) => waiting,
            Err(slot) => {
                let others = self.gather(Some(&op)).await;
                return self.lead(slot, d, Some(op), others).await;
            }
        };
        let mut wait = Wait {
            group: self,
            id,
            rx,
        };
        loop {
            tokio::select! {
                r = &mut wait.rx => {
                    self.kick();
                    return r.unwrap_or_else(|_| Err(Error::Ambiguous {
                        op: "write",
                        key: crate::error::show(&op.key),
                        message: "the request that carried this write in a group was dropped".into(),
                        source: None,
                    }));
                }
                () = self.free.notified() => {
                    let slot = {
                        let mut st = self.lock();
                        if st.in_flight >= MAX_IN_FLIGHT || st.waiting.is_empty() {
                            continue;
                        }
                        st.in_flight += 1;
                        Slot(self)
                    };
                    let others = self.gather(None).await;
                    if others.is_empty() {
                        // Nothing waits any more: ours went in the last request (whose
                        // answer `rx` has, or will have), and the rest were taken by another
                        // slot's caller or dropped while we yielded.
                        continue;
                    }
                    // Ours is among them unless another caller sent it already.
                    let _ = self.lead(slot, d, None, others).await;
                }
            }
        }
    }

    /// Notifies a waiting caller if a request could be sent now.
    fn kick(&self) {
        let st = self.lock();
        if st.in_flight < MAX_IN_FLIGHT && !st.waiting.is_empty() {
            self.free.notify_one();
        }
    }

    /// With a slot held: lets the tasks that are ready run (see [`LINGER_YIELDS`]), so their
    /// writes queue, then takes the writes waiting to go with `own`. If this future is dropped,
    /// nothing was taken (the caller's slot is freed with it).
    async fn gather(&self, own: Option<&TxnOp>) -> Vec<Waiting> {
        for _ in 0..LINGER_YIELDS {
            tokio::task::yield_now().await;
        }
        take(&mut self.lock(), own)
    }

    /// Sends `own` and `others` in the request `_slot` (freed when this returns or is dropped);
    /// answers the others, returns `own`'s answer (false when there is none).
    async fn lead<D: Direct>(
        &self,
        _slot: Slot<'_>,
        d: &D,
        own: Option<TxnOp>,
        others: Vec<Waiting>,
    ) -> Result<bool> {
        let mut ops: Vec<TxnOp> = own.into_iter().collect();
        let has_own = !ops.is_empty();
        ops.extend(others.iter().map(|w| w.op.clone()));
        let results = self.send(d, &ops).await;
        let mut results = results.into_iter();
        let own = if has_own { results.next() } else { None };
        for (w, r) in others.into_iter().zip(results) {
            let _ = w.tx.send(r);
        }
        own.unwrap_or(Ok(false))
    }

    /// Sends `ops`: alone, or as one transaction, or (no transactions) one by one.
    ///
    /// A refused transaction wrote nothing; a linearizable read then tells which writes could
    /// not apply (their expectation does not hold in the state read: each is answered false,
    /// as its own CAS at that moment would have been), and the rest are sent again together.
    /// After [`ROUNDS`] refusals (or a failed read) what is left is sent write by write.
    async fn send<D: Direct>(&self, d: &D, ops: &[TxnOp]) -> Vec<Result<bool>> {
        if let [op] = ops {
            return vec![send_one(d, op).await];
        }
        match self.supports_txn(d).await {
            Ok(true) => {}
            Ok(false) => return one_by_one(d, ops.iter().collect()).await,
            Err(e) => return ops.iter().map(|op| Err(share(&e, op))).collect(),
        }
        let mut answers: Vec<Option<Result<bool>>> = ops.iter().map(|_| None).collect();
        let mut left: Vec<usize> = (0..ops.len()).collect();
        for _ in 0..ROUNDS {
            if left.len() < 2 {
                break;
            }
            let group: Vec<TxnOp> = left.iter().map(|&i| ops[i].clone()).collect();
            let sent = super::observed(d.name(), "transact", &group[0].key, async {
                d.write_txn(txn::encode(&group)).await
            })
            .await;
            match sent {
                Ok(true) => {
                    left.drain(..).for_each(|i| answers[i] = Some(Ok(true)));
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    left.drain(..)
                        .for_each(|i| answers[i] = Some(Err(share(&e, &ops[i]))));
                    break;
                }
            }
            let keys: Vec<Bytes> = group.iter().map(|op| op.key.clone()).collect();
            let Ok(now) = d.read(&keys).await else {
                break;
            };
            let mut still = Vec::with_capacity(left.len());
            for (i, current) in left.drain(..).zip(now) {
                if ops[i].expect.holds(current.as_deref()) {
                    still.push(i);
                } else {
                    answers[i] = Some(Ok(false));
                }
            }
            left = still;
        }
        let rest = one_by_one(d, left.iter().map(|&i| &ops[i]).collect()).await;
        for (i, r) in left.into_iter().zip(rest) {
            answers[i] = Some(r);
        }
        answers
            .into_iter()
            .map(|a| a.expect("every write answered"))
            .collect()
    }
}

/// Refused transactions before the writes left are sent one by one.
const ROUNDS: usize = 3;

/// Each write on its own, all at once.
async fn one_by_one<D: Direct>(d: &D, ops: Vec<&TxnOp>) -> Vec<Result<bool>> {
    futures::future::join_all(ops.into_iter().map(|op| send_one(d, op))).await
}

/// Takes waiting writes for one group: as many as fit, no key twice (nor `own`'s).
fn take(st: &mut State, own: Option<&TxnOp>) -> Vec<Waiting> {
    if st.waiting.is_empty() {
        return Vec::new();
    }
    let mut keys: HashSet<Bytes> = own.iter().map(|o| o.key.clone()).collect();
    let mut bytes = own.map_or(0, TxnOp::encoded_len);
    let mut count = usize::from(own.is_some());
    let mut taken = Vec::new();
    let mut left = Vec::new();
    for w in std::mem::take(&mut st.waiting) {
        let len = w.op.encoded_len();
        let fits = count < MAX_GROUP && (count == 0 || bytes + len <= MAX_GROUP_BYTES);
        if fits && keys.insert(w.op.key.clone()) {
            count += 1;
            bytes += len;
            taken.push(w);
        } else {
            left.push(w);
        }
    }
    st.waiting = left;
    taken
}

/// The same error for one write of a group.
fn share(e: &Error, op: &TxnOp) -> Error {
    let key = crate::error::show(&op.key);
    match e {
        Error::Ambiguous { op, message, .. } => Error::Ambiguous {
            op,
            key,
            message: format!("sent in a group: {message}"),
            source: None,
        },
        Error::Unavailable { op, message, .. } => Error::Unavailable {
            op,
            message: message.clone(),
            source: None,
        },
        Error::Stopped => Error::Stopped,
        other => Error::Engine {
            op: "transact",
            message: other.to_string(),
            source: None,
        },
    }
}

/// A request slot, freed on drop (a waiting caller is then told).
struct Slot<'a>(&'a Group);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.in_flight -= 1;
        if !st.waiting.is_empty() {
            self.0.free.notify_one();
        }
    }
}

/// A waiting write: taken out of the queue if its caller goes away before it is sent.
struct Wait<'a> {
    group: &'a Group,
    id: u64,
    rx: oneshot::Receiver<Result<bool>>,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let mut st = self.group.lock();
        st.waiting.retain(|w| w.id != self.id);
        // A notification meant for us goes to the next waiter.
        if st.in_flight < MAX_IN_FLIGHT && !st.waiting.is_empty() {
            self.group.free.notify_one();
        }
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::{Consistency, Store};
    use crate::testing::MemStore;

    /// The group over the in-memory store (its faults included).
    struct OnMem(MemStore);

    #[async_trait]
    impl Direct for OnMem {
        fn name(&self) -> &'static str {
            "mem"
        }
        async fn write_one(&self, op: &TxnOp) -> Result<bool> {
            match (&op.expect, &op.write) {
                (Expect::Any, Some(v)) => self.0.put(&op.key, v).await.map(|()| true),
                (Expect::Any, None) => self.0.delete(&op.key).await.map(|()| true),
                (Expect::Absent, Some(v)) => self.0.compare_and_swap(&op.key, None, v).await,
                (Expect::Value(x), Some(v)) => self.0.compare_and_swap(&op.key, Some(x), v).await,
                (_, None) => self.0.transact(std::slice::from_ref(op)).await,
            }
        }
        async fn write_txn(&self, wire: Vec<u8>) -> Result<bool> {
            let ops: Vec<TxnOp> = txn::decode(&wire)
                .expect("a transaction")
                .into_iter()
                .map(|o| TxnOp {
                    key: Bytes::copy_from_slice(o.key),
                    expect: match o.expect {
                        None => Expect::Any,
                        Some(None) => Expect::Absent,
                        Some(Some(v)) => Expect::Value(Bytes::copy_from_slice(v)),
                    },
                    write: o.write.map(Bytes::copy_from_slice),
                })
                .collect();
            if ops.is_empty() {
                return Ok(true); // the probe
            }
            self.0.transact(&ops).await
        }
        async fn read(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>> {
            self.0.get_many(keys, Consistency::Linearizable).await
        }
    }

    fn key(i: usize) -> Bytes {
        Bytes::from(format!("k{i}"))
    }

    async fn value(mem: &MemStore, i: usize) -> Option<Bytes> {
        mem.get(&key(i), Consistency::Linearizable).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_writes_share_an_entry_and_each_gets_its_own_answer() {
        let mem = MemStore::new();
        mem.set_latency(Duration::from_millis(5));
        for i in 0..32 {
            mem.put(&key(i), b"0").await.unwrap();
        }
        let (d, g) = (OnMem(mem.clone()), Group::default());
        let before = mem.op_counts().writes;
        // Every third expects the wrong bytes: its group is refused, a read decides.
        let answers = futures::future::join_all((0..32).map(|i| {
            let expected: &[u8] = if i % 3 == 0 { b"wrong" } else { b"0" };
            g.write(&d, TxnOp::cas(key(i), Some(expected), "1"))
        }))
        .await;
        for (i, a) in answers.into_iter().enumerate() {
            assert_eq!(a.unwrap(), i % 3 != 0, "write {i}");
            let want: &[u8] = if i % 3 == 0 { b"0" } else { b"1" };
            assert_eq!(value(&mem, i).await.unwrap(), want, "write {i}");
        }
        // All 32 in one group (the first lingered while the others queued), refused once,
        // then the 21 whose expectation holds applied together.
        let writes = mem.op_counts().writes - before;
        assert_eq!(writes, 2, "{writes} writes");
    }

    #[tokio::test(start_paused = true)]
    async fn writers_answered_by_a_request_ride_the_next_one_together() {
        let mem = MemStore::new();
        mem.set_latency(Duration::from_millis(5));
        let (d, g) = (Arc::new(OnMem(mem.clone())), Arc::new(Group::default()));
        let before = mem.op_counts().writes;
        // 8 writers, each writing again as soon as its last write is answered (a producer
        // with 8 enqueues in flight).
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (d, g) = (d.clone(), g.clone());
                tokio::spawn(async move {
                    for i in 0..10 {
                        let k = Bytes::from(format!("w{w}-{i}"));
                        assert!(g.write(&*d, TxnOp::cas(k, None, "1")).await.unwrap());
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        // One request per round, all 8 in each: without the linger the leader of a round went
        // alone and the other 7 waited a round more (about twice the requests).
        let writes = mem.op_counts().writes - before;
        assert_eq!(writes, 10, "{writes} writes");
        assert_eq!(mem.scan_prefix(b"w").await.unwrap().entries.len(), 80);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_outcome_is_every_writes_unknown_outcome() {
        let mem = MemStore::new();
        mem.set_latency(Duration::from_millis(5));
        let (d, g) = (OnMem(mem.clone()), Group::default());
        // All 8 travel in one request (the first lingers while the others queue).
        mem.ambiguous_next_writes(1);
        let answers =
            futures::future::join_all((0..8).map(|i| g.write(&d, TxnOp::cas(key(i), None, "1"))))
                .await;
        for (i, a) in answers.into_iter().enumerate() {
            assert!(
                matches!(a, Err(Error::Ambiguous { .. })),
                "write {i}: {a:?}"
            );
            // (applied, as the fault says: each caller's re-sent CAS would find it so)
            assert_eq!(value(&mem, i).await.unwrap(), "1");
        }
        // Unavailable: nothing applied, every write told so.
        mem.fail_next_ops(1);
        let answers =
            futures::future::join_all((8..12).map(|i| g.write(&d, TxnOp::cas(key(i), None, "1"))))
                .await;
        for (i, a) in answers.into_iter().enumerate() {
            assert!(
                matches!(a, Err(Error::Unavailable { .. })),
                "write {i}: {a:?}"
            );
            assert_eq!(value(&mem, i + 8).await, None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_write_whose_caller_is_dropped_is_never_sent() {
        let mem = MemStore::new();
        mem.set_latency(Duration::from_millis(5));
        let (d, g) = (OnMem(mem.clone()), Group::default());
        let mut first = Box::pin(g.write(&d, TxnOp::put(key(0), "a")));
        // Past its yields: in flight, alone.
        for _ in 0..=LINGER_YIELDS {
            assert!(futures::poll!(&mut first).is_pending());
            tokio::task::yield_now().await;
        }
        let mut dropped = Box::pin(g.write(&d, TxnOp::put(key(1), "b")));
        assert!(futures::poll!(&mut dropped).is_pending());
        assert_eq!(g.lock().waiting.len(), 1);
        drop(dropped);
        assert!(g.lock().waiting.is_empty());
        let third = g.write(&d, TxnOp::put(key(2), "c"));
        let (a, c) = tokio::join!(first, third);
        assert!(a.unwrap() && c.unwrap());
        assert_eq!(value(&mem, 1).await, None);
        assert_eq!(value(&mem, 2).await.unwrap(), "c");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_dropped_while_it_holds_the_slot_sends_nothing_and_frees_it() {
        let mem = MemStore::new();
        mem.set_latency(Duration::from_millis(5));
        let (d, g) = (OnMem(mem.clone()), Group::default());
        let before = mem.op_counts().writes;
        let mut dropped = Box::pin(g.write(&d, TxnOp::put(key(0), "a")));
        let mut second = Box::pin(g.write(&d, TxnOp::put(key(1), "b")));
        // `dropped` took the slot and yields; `second` waits for it.
        assert!(futures::poll!(&mut dropped).is_pending());
        assert!(futures::poll!(&mut second).is_pending());
        {
            let st = g.lock();
            assert_eq!((st.in_flight, st.waiting.len()), (1, 1));
        }
        drop(dropped);
        assert_eq!(g.lock().in_flight, 0);
        assert!(second.await.unwrap());
        assert_eq!(value(&mem, 0).await, None);
        assert_eq!(value(&mem, 1).await.unwrap(), "b");
        assert_eq!(mem.op_counts().writes - before, 1);
    }

    #[tokio::test]
    async fn a_conditional_delete_alone_is_a_transaction_of_one() {
        let mem = MemStore::new();
        let (d, g) = (OnMem(mem.clone()), Group::default());
        mem.put(&key(0), b"x").await.unwrap();
        assert!(!g.write(&d, TxnOp::delete_if(key(0), "y")).await.unwrap());
        assert!(g.write(&d, TxnOp::delete_if(key(0), "x")).await.unwrap());
        assert_eq!(value(&mem, 0).await, None);
    }
}
