//! The soak's client processes (`dcoord soak-worker ROLE`): each runs one recipe against the
//! cluster and appends what happened to its history file, one JSON line per event, written
//! with a single `write` so a SIGKILL never leaves half a line behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dcoord::config::{ConfigEvent, ConfigOptions, ConfigWatch, Source, Status};
use dcoord::election::Election;
use dcoord::lock::{Mutex, fenced_put};
use dcoord::queue::{Message, QueueOptions, WorkQueue};
use dcoord::semaphore::Semaphore;
use dcoord::session::{Session, SessionOptions};
use dcoord::store::{RemoteOptions, RemoteStore, Store};
use dcoord::{Error, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::check::{Ev, Line};
use super::{
    CONFIG_KEY, EFFECTS, ELECTION, ELECTION_REGISTER, LOCK, PERMITS, QUEUE, REGISTER, SEMAPHORE,
};

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Appends history lines to a file.
#[derive(Clone)]
pub struct History {
    w: String,
    file: Arc<StdMutex<File>>,
}

impl History {
    /// Opens (appending) the history file of worker `w`.
    pub fn open(path: &Path, w: &str) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io {
                what: "cannot open history file",
                path: path.into(),
                source: e,
            })?;
        Ok(History {
            w: w.to_string(),
            file: Arc::new(StdMutex::new(file)),
        })
    }

    /// Records `ev` now.
    pub fn log(&self, ev: Ev) {
        self.log_at(now_us(), ev);
    }

    fn log_at(&self, at: u64, ev: Ev) {
        let line = Line {
            w: self.w.clone(),
            at,
            ev,
        };
        let mut bytes = serde_json::to_vec(&line).expect("a history line serializes");
        bytes.push(b'\n');
        let _ = self.file.lock().unwrap().write_all(&bytes);
    }

    fn error(&self, what: &str, e: &Error) {
        self.log(Ev::Error {
            what: what.into(),
            error: e.to_string(),
        });
    }
}

/// The config value the soak publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakConfig {
    /// Increases with every write.
    pub n: u64,
}

/// A queue message's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Sequence number.
    pub i: u64,
    /// Handlers always fail a poison job.
    pub poison: bool,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Role {
    /// Takes the lock, writes the fenced register, releases; forever.
    Lock,
    /// Consumes the queue with the idempotent-effect helper.
    Consumer,
    /// Follows the config key.
    Watcher,
    /// Campaigns, writes the leaders' fenced register, resigns; forever.
    Elector,
    /// Takes 1 or 2 of the semaphore's permits, holds them a moment, releases; forever.
    Permit,
}

/// Runs a worker until killed.
///
/// # Errors
/// Only when it cannot start (history file, cluster unreachable for 60 s).
pub async fn run(
    role: Role,
    name: &str,
    endpoints: &[String],
    history: &Path,
    lease: Duration,
) -> Result<()> {
    let h = History::open(history, name)?;
    let store: Arc<dyn Store> = Arc::new(
        RemoteStore::connect(
            endpoints,
            RemoteOptions::default().op_deadline(Duration::from_secs(60)),
        )
        .await?,
    );
    match role {
        Role::Lock => lock_worker(store, h, lease).await,
        Role::Consumer => consumer(store, h, lease).await,
        Role::Watcher => watcher(store, h).await,
        Role::Elector => elector(store, h, lease).await,
        Role::Permit => permit_worker(store, h, lease).await,
    }
}

async fn session(store: &Arc<dyn Store>, lease: Duration, h: &History) -> Session {
    loop {
        match Session::start(store.clone(), SessionOptions::default().lease(lease)).await {
            Ok(s) => return s,
            Err(e) => {
                h.error("session start", &e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a failed acquire means for a worker's loop: a new session (the old one is lost), a
/// pause (the store is unavailable or the outcome unknown), or the end.
async fn failed(
    h: &History,
    what: &str,
    e: Error,
    s: &mut Session,
    store: &Arc<dyn Store>,
    lease: Duration,
) -> Result<()> {
    match e {
        Error::SessionLost { .. } => {
            h.log(Ev::Error {
                what: what.into(),
                error: "session lost; starting a new one".into(),
            });
            *s = session(store, lease, h).await;
            Ok(())
        }
        e if e.is_retryable() || e.is_ambiguous() => {
            h.error(what, &e);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        }
        e => {
            h.error(&format!("{what} (fatal)"), &e);
            Err(e)
        }
    }
}

/// A holder's write to a fenced register, store-side fence only (no local "am I lost?"
/// check): a paused holder's write must be refused by the register itself.
async fn write_register(store: &dyn Store, h: &History, register: &str, token: u64) {
    let sent = now_us();
    let value = format!("{}:{token}", h.w);
    match fenced_put(store, register.as_bytes(), token, value.as_bytes()).await {
        Ok(()) => h.log(Ev::FenceOk { token, sent }),
        Err(Error::Fenced { stored, .. }) => h.log(Ev::FenceRejected { token, stored }),
        Err(e) => h.error("fenced_put", &e),
    }
}

async fn lock_worker(store: Arc<dyn Store>, h: History, lease: Duration) -> Result<()> {
    let mut s = session(&store, lease, &h).await;
    h.log(Ev::Ready);
    loop {
        let lock = Mutex::new(&s, LOCK)?;
        let asked = now_us();
        match lock.acquire().await {
            Ok(g) => {
                let token = g.fencing_token();
                h.log(Ev::Grant { token, asked });
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..80))).await;
                write_register(&*store, &h, REGISTER, token).await;
                match g.release().await {
                    Ok(()) => h.log(Ev::Release { token }),
                    Err(e) => h.error("release", &e),
                }
            }
            Err(e) => failed(&h, "acquire", e, &mut s, &store, lease).await?,
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
    }
}

async fn elector(store: Arc<dyn Store>, h: History, lease: Duration) -> Result<()> {
    let mut s = session(&store, lease, &h).await;
    h.log(Ev::Ready);
    loop {
        let election = Election::new(&s, ELECTION)?;
        let asked = now_us();
        match election.campaign(h.w.as_bytes()).await {
            Ok(lead) => {
                let token = lead.token();
                h.log(Ev::Grant { token, asked });
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..80))).await;
                write_register(&*store, &h, ELECTION_REGISTER, token).await;
                match lead.resign().await {
                    Ok(()) => h.log(Ev::Release { token }),
                    Err(e) => h.error("resign", &e),
                }
            }
            Err(e) => failed(&h, "campaign", e, &mut s, &store, lease).await?,
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
    }
}

async fn permit_worker(store: Arc<dyn Store>, h: History, lease: Duration) -> Result<()> {
    let mut s = session(&store, lease, &h).await;
    h.log(Ev::Ready);
    loop {
        let sem = Semaphore::new(&s, SEMAPHORE, PERMITS)?;
        let n = fastrand::u64(1..=PERMITS);
        let asked = now_us();
        match sem.acquire(n).await {
            Ok(p) => {
                let token = p.fencing_token();
                h.log(Ev::Permit { token, asked, n });
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..80))).await;
                // The end of the counted hold: taken first, then checked still valid.
                let at = now_us();
                let valid = !p.is_lost();
                h.log_at(at, Ev::PermitEnd { token, valid });
                match p.release().await {
                    Ok(()) => h.log(Ev::Release { token }),
                    Err(e) => h.error("release", &e),
                }
            }
            Err(e) => failed(&h, "acquire", e, &mut s, &store, lease).await?,
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
    }
}

async fn consumer(store: Arc<dyn Store>, h: History, lease: Duration) -> Result<()> {
    loop {
        let s = session(&store, lease, &h).await;
        let options = QueueOptions::default()
            .max_attempts(3)
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .rescan_every(Duration::from_secs(5));
        let q = match WorkQueue::open(&s, QUEUE, options).await {
            Ok(q) => q,
            Err(e) => {
                h.error("open", &e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        h.log(Ev::Ready);
        let hh = h.clone();
        let handler = move |msg: Message, job: Job| {
            let h = hh.clone();
            async move {
                if job.poison {
                    msg.poison("a poison job");
                    return Err("poison".to_string());
                }
                // Some work, so that kills and pauses catch messages in flight.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..60))).await;
                let key = format!("{EFFECTS}{}", msg.id);
                match msg.effect_once(key.as_bytes(), h.w.as_bytes()).await {
                    Ok(wrote) => {
                        h.log(Ev::Handled {
                            id: msg.id.clone(),
                            attempt: msg.attempt,
                            wrote,
                        });
                        Ok(())
                    }
                    Err(e) => {
                        h.error("effect_once", &e);
                        Err(e.to_string())
                    }
                }
            }
        };
        let lost = s.clone();
        match q
            .run_json(4, handler, async move { lost.lost().await })
            .await
        {
            Ok(_) => h.log(Ev::Error {
                what: "run".into(),
                error: "session lost; starting a new one".into(),
            }),
            Err(e) => h.error("run", &e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watcher(store: Arc<dyn Store>, h: History) -> Result<()> {
    let cfg =
        ConfigWatch::<SoakConfig>::open(store, Source::key(CONFIG_KEY), ConfigOptions::default())
            .await?;
    h.log(Ev::Ready);
    // The value in force at start, if any; then every change. Subscribing AFTER reading it
    // means every event seen is at least as new (one that slips in between is only missed).
    if let Some(v) = cfg.current() {
        let rev = match cfg.status() {
            Status::Current { revision } => revision,
            _ => 0,
        };
        h.log(Ev::Applied { n: v.n, rev });
    }
    let mut events = Box::pin(cfg.events());
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ConfigEvent::Applied { new, revision, .. }) => h.log(Ev::Applied {
                n: new.n,
                rev: revision,
            }),
            Ok(ConfigEvent::Rejected {
                error, revision, ..
            }) => h.log(Ev::Rejected {
                rev: revision,
                error,
            }),
            Ok(ConfigEvent::Missing { .. }) => {}
            Err(e) => h.error("config events", &e),
        }
    }
    Err(Error::Stopped)
}
