//! d-engine's `StateMachine` trait for [`RedbStateMachine`].

use std::path::PathBuf;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use d_engine_core::{ApplyEntry, ApplyResult, Error, ScanResult, StateMachine};
use d_engine_proto::common::LogId;
use d_engine_proto::server::storage::SnapshotMetadata;
use redb::ReadableTableMetadata;
use tracing::warn;

use super::codec::{read_applied, term_at};
use super::util::{Ctx, lock};
use super::{KV, META, RedbStateMachine, TERMS};

#[async_trait]
impl StateMachine for RedbStateMachine {
    async fn start(&self) -> Result<(), Error> {
        self.inner.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) -> Result<(), Error> {
        self.inner.running.store(false, Ordering::SeqCst);
        self.sync()
    }

    fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::SeqCst)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.inner.read(|txn| {
            let kv = txn.open_table(KV).ctx("open kv")?;
            Ok(kv
                .get(key)
                .ctx("get")?
                .map(|g| Bytes::copy_from_slice(g.value())))
        })
    }

    fn entry_term(&self, index: u64) -> Option<u64> {
        if index == 0 || index > lock(&self.inner.applied).index {
            return None;
        }
        self.inner
            .read(|txn| term_at(&txn.open_table(TERMS).ctx("open terms")?, index))
            .unwrap_or_else(|e| {
                warn!(%e, index, "entry_term: read failed");
                None
            })
    }

    /// d-engine 0.2.4 calls this from its own `sm-apply` OS thread, one chunk at a time, so
    /// the blocking commit runs inline.
    async fn apply_chunk(&self, chunk: &[ApplyEntry]) -> Result<Vec<ApplyResult>, Error> {
        self.inner.apply(chunk)
    }

    fn len(&self) -> usize {
        self.inner
            .read(|txn| txn.open_table(KV).ctx("open kv")?.len().ctx("len"))
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(0)
    }

    /// The applied index is part of the committed state; an outside update is ignored (d-engine
    /// 0.2.4 never calls this).
    fn update_last_applied(&self, _last_applied: LogId) {}

    fn last_applied(&self) -> LogId {
        *lock(&self.inner.applied)
    }

    fn persist_last_applied(&self, _last_applied: LogId) -> Result<(), Error> {
        Ok(())
    }

    fn update_last_snapshot_metadata(&self, metadata: &SnapshotMetadata) -> Result<(), Error> {
        self.inner.store_snapshot_meta(metadata)
    }

    fn snapshot_metadata(&self) -> Option<SnapshotMetadata> {
        self.inner
            .snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn persist_last_snapshot_metadata(&self, metadata: &SnapshotMetadata) -> Result<(), Error> {
        self.inner.store_snapshot_meta(metadata)
    }

    async fn apply_snapshot_from_file(
        &self,
        metadata: &SnapshotMetadata,
        snapshot_dir: PathBuf,
    ) -> Result<(), Error> {
        let inner = self.inner.clone();
        let metadata = metadata.clone();
        tokio::task::spawn_blocking(move || inner.install(&metadata, &snapshot_dir)).await?
    }

    async fn generate_snapshot_data(
        &self,
        snapshot_dir: PathBuf,
        last_included: LogId,
    ) -> Result<Bytes, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.generate(&snapshot_dir, last_included)).await?
    }

    fn save_hard_state(&self) -> Result<(), Error> {
        self.sync()
    }

    fn flush(&self) -> Result<(), Error> {
        self.sync()
    }

    async fn flush_async(&self) -> Result<(), Error> {
        let sm = self.clone();
        tokio::task::spawn_blocking(move || sm.sync()).await?
    }

    async fn reset(&self) -> Result<(), Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.reset()).await?
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<ScanResult, Error> {
        self.inner.read(|txn| {
            let revision = read_applied(&txn.open_table(META).ctx("open meta")?)?.index;
            let kv = txn.open_table(KV).ctx("open kv")?;
            let mut entries = Vec::new();
            for item in kv.range(prefix..).ctx("scan")? {
                let (k, v) = item.ctx("scan")?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                entries.push((
                    Bytes::copy_from_slice(k.value()),
                    Bytes::copy_from_slice(v.value()),
                ));
            }
            Ok(ScanResult { entries, revision })
        })
    }

    /// Nothing expires outside Raft (replicas would diverge): see the module docs.
    async fn lease_background_cleanup(&self) -> Result<Vec<Bytes>, Error> {
        Ok(Vec::new())
    }
}
