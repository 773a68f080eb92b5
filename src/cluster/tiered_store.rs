//! The [`BlobStore`] of a replica: its local disk, with the shared bucket
//! behind it for manifests (blobs reach the bucket through
//! [`Tiers`](super::tiers::Tiers), as they stream). A manifest missing
//! locally is read from the bucket (verified against its digest there) and
//! kept locally; a manifest stored is stored in both. The bucket failing
//! costs only the sharing: the registry then asks the upstream.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::bucket::Bucket;
use super::Health;
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Found, Index, Spool, StoredManifest};
use crate::reference::Digest;

pub struct TieredStore {
    pub local: Arc<dyn BlobStore>,
    pub bucket: Arc<Bucket>,
    pub bucket_health: Arc<Health>,
    /// The bucket's sizes and access times, when shared.
    pub shared: Option<Arc<dyn Index>>,
    /// Whether a manifest read from the bucket is kept on the local disk
    /// (not for `ls`, which only looks).
    pub keep_locally: bool,
}

#[async_trait]
impl BlobStore for TieredStore {
    async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        self.local.open_blob(digest).await
    }

    async fn spool(&self) -> io::Result<Spool> {
        self.local.spool().await
    }

    async fn commit_blob(&self, spool: Spool, digest: &Digest) -> io::Result<()> {
        self.local.commit_blob(spool, digest).await
    }

    async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        if let Some(m) = self.local.get_manifest(digest).await? {
            return Ok(Some(m));
        }
        let m = match self.bucket.get_manifest(digest).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.bucket_health.ok();
                return Ok(None);
            }
            Err(e) => {
                let e = self.bucket_health.failed(e);
                tracing::debug!(%digest, error = %e, "manifest not read from the bucket");
                return Ok(None);
            }
        };
        self.bucket_health.ok();
        if let Some(shared) = &self.shared {
            shared
                .touch(&ContentKey::manifest(digest), SystemTime::now())
                .await;
        }
        // Kept locally too; the caller records it in the local index.
        if !self.keep_locally {
            return Ok(Some(m));
        }
        if let Err(e) = self.local.put_manifest(digest, &m).await {
            tracing::warn!(%digest, error = %e, "cannot keep a manifest from the bucket locally");
        }
        Ok(Some(m))
    }

    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<u64> {
        match self.bucket.put_manifest(digest, manifest).await {
            Ok(size) => {
                self.bucket_health.ok();
                if let Some(shared) = &self.shared {
                    shared
                        .record(&ContentKey::manifest(digest), size, SystemTime::now())
                        .await;
                }
            }
            Err(e) => {
                let e = self.bucket_health.failed(e);
                tracing::warn!(%digest, error = %e, "manifest not stored in the bucket");
            }
        }
        self.local.put_manifest(digest, manifest).await
    }

    async fn contains(&self, key: &ContentKey) -> io::Result<bool> {
        self.local.contains(key).await
    }

    async fn remove(&self, key: &ContentKey) -> io::Result<()> {
        self.local.remove(key).await
    }

    async fn scan(&self) -> io::Result<Vec<Found>> {
        self.local.scan().await
    }

    async fn temp_bytes(&self) -> io::Result<u64> {
        self.local.temp_bytes().await
    }

    async fn clean_temp(&self, older_than: Option<Duration>) -> io::Result<usize> {
        self.local.clean_temp(older_than).await
    }

    async fn fs_space(&self) -> io::Result<Option<crate::cache::policy::FsSpace>> {
        self.local.fs_space().await
    }
}
