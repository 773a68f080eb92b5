//! The hosted repositories' [`BlobStore`] of a replica ([`HostedTiers`]):
//! the bucket's hosted area is the truth, the replica's own hosted store on
//! disk a copy of what it served. A commit is answered only once the bucket
//! has the item (uploaded from the verified spool), then it is kept
//! locally; a read the disk lacks is fetched from the bucket, hashed, and
//! kept locally only when its digest matched. Unlike the cache's tiers, a
//! bucket that fails fails the request: a push must not be acknowledged
//! that the other replicas cannot see.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::bucket::Bucket;
use super::SharedError;
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Found, Spool, StoredManifest};
use crate::hashing::Hasher;
use crate::reference::Digest;

pub struct HostedTiers {
    pub local: Arc<dyn BlobStore>,
    pub bucket: Bucket,
    /// This replica, as its upload markers name it.
    pub holder: String,
}

fn io_err(e: SharedError) -> io::Error {
    io::Error::other(e.to_string())
}

impl HostedTiers {
    /// Copies the blob from the bucket to the local disk, verified; `false`
    /// when the bucket has none (or a damaged one, which is removed).
    async fn fetch_blob(&self, digest: &Digest) -> io::Result<bool> {
        let Some(read) = self.bucket.read(digest, None).await.map_err(io_err)? else {
            return Ok(false);
        };
        let Some(spool) = spool_verified(&*self.local, digest, read.stream).await? else {
            tracing::warn!(%digest, "damaged hosted blob in the bucket; removing it");
            self.bucket
                .remove(&ContentKey::blob(digest))
                .await
                .map_err(io_err)?;
            return Ok(false);
        };
        self.local.commit_blob(spool, digest).await?;
        Ok(true)
    }

    /// After the bucket failed a commit's upload with `e`: a concurrent
    /// commit of the same digest (another push of the same layer, through
    /// any replica) may have completed first, and stores such as Garage then
    /// refuse the other upload's parts and completion. When the bucket holds
    /// the blob, of the spool's size (verified by its committer), the commit
    /// is done and kept locally; otherwise it failed with `e`.
    async fn committed_meanwhile(
        &self,
        spool: Spool,
        digest: &Digest,
        e: SharedError,
    ) -> io::Result<()> {
        let size = spool.file.metadata()?.len();
        match self.bucket.head(&ContentKey::blob(digest)).await {
            Ok(Some(held)) if held == size => {
                tracing::debug!(%digest, error = %e, "another commit of the blob completed first");
            }
            _ => return Err(io_err(e)),
        }
        self.local.commit_blob(spool, digest).await
    }
}

/// Spools a blob's bytes from `stream` into a spool of `store`, hashing
/// them; the spool when they hash to `digest`, `None` when they do not.
pub async fn spool_verified(
    store: &dyn BlobStore,
    digest: &Digest,
    mut stream: BoxStream<'static, Result<Bytes, SharedError>>,
) -> io::Result<Option<Spool>> {
    let spool = store.spool().await?;
    let mut hasher = Hasher::new(digest.algorithm());
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(io_err)?;
        hasher.update(&bytes);
        let file = spool.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            (&*file).write_all(&bytes)
        })
        .await
        .map_err(io::Error::other)??;
    }
    Ok((hasher.finish() == *digest).then_some(spool))
}

#[async_trait]
impl BlobStore for HostedTiers {
    async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        if let Some(b) = self.local.open_blob(digest).await? {
            return Ok(Some(b));
        }
        if !self.fetch_blob(digest).await? {
            return Ok(None);
        }
        self.local.open_blob(digest).await
    }

    async fn spool(&self) -> io::Result<Spool> {
        self.local.spool().await
    }

    async fn commit_blob(&self, spool: Spool, digest: &Digest) -> io::Result<()> {
        let mut upload = self
            .bucket
            .upload(digest, &self.holder)
            .await
            .map_err(io_err)?;
        let mut reader = BlobFile {
            file: spool.file.clone(),
            size: 0,
        }
        .reader();
        loop {
            let (r, chunk) = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut buf = vec![0u8; 1 << 20];
                let n = reader.read(&mut buf);
                (
                    reader,
                    n.map(|n| {
                        buf.truncate(n);
                        buf
                    }),
                )
            })
            .await
            .map_err(io::Error::other)?;
            reader = r;
            let chunk = match chunk {
                Ok(c) if c.is_empty() => break,
                Ok(c) => c,
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            };
            if let Err(e) = upload.push(chunk.into()).await {
                upload.abort().await;
                return self.committed_meanwhile(spool, digest, e).await;
            }
        }
        if let Err(e) = upload.complete().await {
            return self.committed_meanwhile(spool, digest, e).await;
        }
        self.local.commit_blob(spool, digest).await
    }

    async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        if let Some(m) = self.local.get_manifest(digest).await? {
            return Ok(Some(m));
        }
        let Some(m) = self.bucket.get_manifest(digest).await.map_err(io_err)? else {
            return Ok(None);
        };
        if let Err(e) = self.local.put_manifest(digest, &m).await {
            tracing::warn!(%digest, error = %e, "cannot keep a hosted manifest locally");
        }
        Ok(Some(m))
    }

    async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<u64> {
        let size = self
            .bucket
            .put_manifest(digest, manifest)
            .await
            .map_err(io_err)?;
        self.local.put_manifest(digest, manifest).await?;
        Ok(size)
    }

    async fn contains(&self, key: &ContentKey) -> io::Result<bool> {
        if self.local.contains(key).await? {
            return Ok(true);
        }
        Ok(self.bucket.head(key).await.map_err(io_err)?.is_some())
    }

    async fn remove(&self, key: &ContentKey) -> io::Result<()> {
        self.bucket.remove(key).await.map_err(io_err)?;
        self.local.remove(key).await
    }

    async fn scan(&self) -> io::Result<Vec<Found>> {
        self.bucket.scan().await.map_err(io_err)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::disk::DiskStore;
    use crate::hashing::digest_of;
    use crate::reference::Algorithm;

    fn replica(bucket: &Bucket, dir: &std::path::Path) -> HostedTiers {
        HostedTiers {
            local: Arc::new(DiskStore::open(dir).unwrap()),
            bucket: bucket.clone(),
            holder: "test".into(),
        }
    }

    /// What one replica committed, another reads from the bucket and keeps.
    #[tokio::test]
    async fn a_commit_reaches_the_bucket_and_another_replica_reads_it() {
        let bucket = Bucket::in_memory();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (one, two) = (replica(&bucket, d1.path()), replica(&bucket, d2.path()));
        let bytes = vec![7u8; 3 << 20];
        let digest = digest_of(Algorithm::Sha256, &bytes);
        let spool = one.spool().await.unwrap();
        {
            use std::io::Write;
            (&*spool.file).write_all(&bytes).unwrap();
        }
        one.commit_blob(spool, &digest).await.unwrap();
        assert!(two.contains(&ContentKey::blob(&digest)).await.unwrap());
        let got = two.open_blob(&digest).await.unwrap().unwrap();
        assert_eq!(got.size, bytes.len() as u64);
        assert!(two.local.open_blob(&digest).await.unwrap().is_some());
        let m = StoredManifest {
            media_type: crate::manifest::OCI_MANIFEST.into(),
            bytes: bytes::Bytes::from_static(b"{}"),
        };
        let md = digest_of(Algorithm::Sha256, b"{}");
        one.put_manifest(&md, &m).await.unwrap();
        assert_eq!(two.get_manifest(&md).await.unwrap(), Some(m));
    }
}
