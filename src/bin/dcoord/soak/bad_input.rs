//! The nemesis's bad-input probes.

use std::sync::Mutex as StdMutex;

use dcoord::Error;
use dcoord::lock::Mutex;
use dcoord::queue::{EnqueueOptions, QueueOptions, WorkQueue};
use dcoord::session::Session;
use dcoord::store::{Consistency, Store};

use super::check::Violation;
use super::{CONFIG_KEY, QUEUE_MESSAGES, Record};

/// One bad-input probe: each must be refused with a clear error and leave nothing behind.
/// Some probes also add messages the queue must dead-letter.
pub(super) async fn bad_input(
    session: &Session,
    queue: &WorkQueue,
    store: &dyn Store,
    probe: u32,
    record: &StdMutex<Record>,
    rng: &mut fastrand::Rng,
    out: &mut Vec<Violation>,
) -> String {
    let garbage: Vec<u8> = (0..rng.usize(1..200)).map(|_| rng.u8(..) | 0x80).collect();
    let mut fail = |what: &str, detail: String| {
        out.push(Violation {
            invariant: "bad input: refused with a clear error, nothing half-written",
            detail: format!("{what}: {detail}"),
        })
    };
    match probe % 5 {
        0 => {
            // Invalid names.
            match Mutex::new(session, "no spaces/or slashes") {
                Err(Error::InvalidArgument(_)) => {}
                other => fail("lock name", format!("{other:?}")),
            }
            match WorkQueue::open(session, "bad queue name", QueueOptions::default()).await {
                Err(Error::InvalidArgument(_)) => {}
                other => fail("queue name", format!("{:?}", other.map(|_| ()))),
            }
            "invalid names".into()
        }
        1 => {
            // An oversized payload: refused before anything is written.
            let id = format!("big-{probe}");
            match queue
                .enqueue(&vec![7u8; 2 << 20], EnqueueOptions::default().id(&id))
                .await
            {
                Err(Error::ValueTooLarge { .. }) => {}
                other => fail("oversized enqueue", format!("{other:?}")),
            }
            let key = format!("{QUEUE_MESSAGES}{id}");
            if let Ok(Some(_)) = store.get(key.as_bytes(), Consistency::Linearizable).await {
                fail("oversized enqueue", format!("{key} exists"));
            }
            "oversized payload".into()
        }
        2 => {
            // Garbage in a lock record: a clear error, and the bytes are left alone.
            let key = b"/dcoord/locks/victim/rec";
            if store.put(key, &garbage).await.is_ok() {
                match Mutex::new(session, "victim") {
                    Ok(m) => match m.try_acquire().await {
                        Err(Error::Decode { .. }) => {}
                        other => fail("garbage lock record", format!("{other:?}")),
                    },
                    Err(e) => fail("lock victim", e.to_string()),
                }
                match store.get(key, Consistency::Linearizable).await {
                    Ok(Some(v)) if v[..] == garbage[..] => {}
                    other => fail("garbage lock record was changed", format!("{other:?}")),
                }
            }
            "garbage lock record".into()
        }
        3 => {
            // Garbage over the config value: watchers keep the last good value; the writer's
            // next publish replaces it.
            let _ = store.put(CONFIG_KEY.as_bytes(), &garbage).await;
            "garbage config value".into()
        }
        _ => {
            // A garbage key among the queue's messages, and a message whose payload is not a
            // job: the first is skipped, the second dead-lettered with its decode error.
            let _ = store
                .put(format!("{QUEUE_MESSAGES}junk-{probe}").as_bytes(), &garbage)
                .await;
            let id = format!("undecodable-{probe}");
            match queue
                .enqueue(b"not json at all", EnqueueOptions::default().id(&id))
                .await
            {
                Ok(_) => {
                    let mut r = record.lock().unwrap();
                    r.facts.confirmed.insert(id.clone());
                    r.facts.poison.insert(id);
                }
                Err(e) => {
                    record.lock().unwrap().facts.unconfirmed.insert(id);
                    eprintln!("soak: enqueue of an undecodable message failed: {e}");
                }
            }
            "garbage queue entries".into()
        }
    }
}
