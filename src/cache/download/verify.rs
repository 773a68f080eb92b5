//! The check of committed blobs: each is hashed once per process before this
//! process vouches for it, beside the first clients that stream it rather
//! than before their headers (a 12 GiB layer hashed first would outlast a
//! client's response-header timeout). Those clients get every byte but the
//! last at once, and the last when the hash matched; a damaged file is
//! removed from the store and the index, and its clients' bodies abort.
//!
//! Mechanism only: the caller decides which repository may read a blob.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::source::{Gate, Source};
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Index};
use crate::hashing::Hasher;
use crate::reference::Digest;

/// Where a committed file's check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Running,
    Intact,
    Damaged,
}

/// Committed blobs this process has found intact, and the checks running.
pub struct Verifier {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    intact: moka::future::Cache<Digest, ()>,
    running: Mutex<HashMap<Digest, watch::Receiver<Check>>>,
    /// Where a damaged file is counted, when set.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Verifier {
    pub fn new(store: Arc<dyn BlobStore>, index: Arc<dyn Index>) -> Self {
        Self {
            store,
            index,
            intact: moka::future::Cache::new(1_000_000),
            running: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Counts the damaged files it finds in `metrics`.
    pub fn counting(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, watch::Receiver<Check>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source to serve a committed blob from: open when it is known
    /// intact, else gated on its check, which this call starts unless one is
    /// running (concurrent first hits share one hash).
    pub async fn source(self: &Arc<Self>, digest: &Digest, blob: BlobFile) -> Source {
        if self.intact.contains_key(digest) {
            return Source::from(blob);
        }
        let rx = {
            let mut running = self.running();
            match running.get(digest) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(Check::Running);
                    running.insert(digest.clone(), rx.clone());
                    tokio::spawn(self.clone().check(digest.clone(), blob.clone(), tx));
                    rx
                }
            }
        };
        Source {
            file: blob.file,
            gate: Gate::Check(rx),
        }
    }

    async fn check(self: Arc<Self>, digest: Digest, blob: BlobFile, tx: watch::Sender<Check>) {
        let expected = digest.clone();
        let hashed = tokio::task::spawn_blocking(move || hash(&blob, &expected)).await;
        let verdict = match hashed {
            Ok(Ok(true)) => {
                self.intact.insert(digest.clone(), ()).await;
                Check::Intact
            }
            Ok(Ok(false)) => {
                if let Some(m) = &self.metrics {
                    m.verification_failure("cached_blob");
                }
                tracing::warn!(%digest, "cached blob does not match its digest; removing it, the next request fetches it again");
                self.discard(&digest).await;
                Check::Damaged
            }
            Ok(Err(e)) => {
                tracing::warn!(%digest, error = %e, "cannot read a cached blob; removing it, the next request fetches it again");
                self.discard(&digest).await;
                Check::Damaged
            }
            Err(e) => {
                tracing::error!(%digest, error = %e, "checking a cached blob failed");
                Check::Damaged
            }
        };
        // Out of the map before the verdict is out: a request after a
        // failed check must find the file gone, not join this check.
        self.running().remove(&digest);
        tx.send_replace(verdict);
    }

    async fn discard(&self, digest: &Digest) {
        let key = ContentKey::blob(digest);
        if let Err(e) = self.store.remove(&key).await {
            tracing::warn!(%digest, error = %e, "cannot remove a damaged blob");
        }
        self.index.forget(&key).await;
    }

    /// Records a blob whose bytes were verified as they were committed.
    pub async fn vouch(&self, digest: &Digest) {
        self.intact.insert(digest.clone(), ()).await;
    }

    /// Forgets a blob that left the store: if it comes back, it is checked.
    pub async fn forget(&self, digest: &Digest) {
        self.intact.invalidate(digest).await;
    }
}

/// Whether `blob` hashes to `digest` over exactly its recorded size.
fn hash(blob: &BlobFile, digest: &Digest) -> std::io::Result<bool> {
    let mut hasher = Hasher::new(digest.algorithm());
    let mut reader = blob.reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok(total == blob.size && hasher.finish() == *digest)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use futures_util::StreamExt;

    use super::*;
    use crate::cache::store::disk::DiskStore;
    use crate::cache::store::local_index::LocalIndex;
    use crate::hashing::digest_of;
    use crate::reference::Algorithm;

    async fn body(source: Source, size: u64) -> Result<Vec<u8>, Vec<u8>> {
        let mut stream = Box::pin(source.stream(0, Some(size)));
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => got.extend_from_slice(&c),
                Err(_) => return Err(got),
            }
        }
        Ok(got)
    }

    #[tokio::test]
    async fn one_hash_vouches_for_a_blob_and_a_damaged_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let verifier = Arc::new(Verifier::new(store.clone(), index.clone()));
        let data = vec![7u8; 3 << 20];
        let digest = digest_of(Algorithm::Sha256, &data);
        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(&data, 0).unwrap();
        store.commit_blob(spool, &digest).await.unwrap();

        let blob = store.open_blob(&digest).await.unwrap().unwrap();
        let first = verifier.source(&digest, blob.clone()).await;
        assert!(matches!(first.gate, Gate::Check(_)));
        assert_eq!(body(first, blob.size).await.unwrap(), data);
        let again = verifier.source(&digest, blob).await;
        assert!(matches!(again.gate, Gate::Open), "hashed twice");

        // The same bytes with one flipped, under a digest not yet vouched for.
        let mut bad = data.clone();
        bad[1 << 20] ^= 1;
        let wrong = digest_of(Algorithm::Sha256, b"other");
        let spool = store.spool().await.unwrap();
        spool.file.write_all_at(&bad, 0).unwrap();
        store.commit_blob(spool, &wrong).await.unwrap();
        let key = ContentKey::blob(&wrong);
        index
            .record(&key, bad.len() as u64, std::time::SystemTime::now())
            .await;
        let blob = store.open_blob(&wrong).await.unwrap().unwrap();
        let got = body(verifier.source(&wrong, blob).await, bad.len() as u64).await;
        let sent = got.expect_err("a damaged blob's body ended cleanly");
        assert!(
            sent.len() < bad.len(),
            "the last byte of a damaged blob was sent"
        );
        assert!(
            store.open_blob(&wrong).await.unwrap().is_none(),
            "damaged file kept"
        );
        assert!(index.entry(&key).await.is_none(), "index still claims it");
    }
}
