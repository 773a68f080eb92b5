//! Hosted uploads of a replica ([`BucketUploads`]): kept in the bucket, so
//! that each request of one upload may reach another replica (a balancer's
//! round robin). Each `PATCH` becomes one chunk object at the offset the
//! upload had reached; the completion streams the chunks in order through a
//! hash into a local spool, which the hosted store commits (to the bucket,
//! then the local disk) once the digest matched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use http_body_util::BodyExt;

use super::bucket::Bucket;
use super::SharedError;
use crate::cache::store::BlobStore;
use crate::error::Error;
use crate::hashing::Hasher;
use crate::hosted::uploads::{Completed, Expected, Room, Status, UploadArea};
use crate::reference::{Digest, RepoName, UploadId};
use crate::response::Body;

pub struct BucketUploads {
    bucket: Bucket,
    /// Where a completed upload is spooled before its commit.
    local: Arc<dyn BlobStore>,
    /// Bytes this replica wrote into uploads in progress (a share of the
    /// cluster's; the quota check is per replica's view).
    bytes: AtomicU64,
}

impl BucketUploads {
    pub fn new(bucket: Bucket, local: Arc<dyn BlobStore>) -> Self {
        Self {
            bucket,
            local,
            bytes: AtomicU64::new(0),
        }
    }

    /// Checks the upload is `repo`'s, and how far it got.
    async fn received(&self, id: &UploadId, repo: &RepoName) -> Result<u64, Error> {
        match self.bucket.chunks_repo(id).await.map_err(unavailable)? {
            Some(owner) if owner == repo.as_str() => {}
            _ => {
                return Err(Error::BlobUploadUnknown(format!(
                    "no upload {id} for {repo}"
                )))
            }
        }
        let objects = self.bucket.chunks(id).await.map_err(unavailable)?;
        objects.received().ok_or_else(|| {
            Error::BlobUploadInvalid(format!(
                "upload {id} has a chunk being written or missing; retry its status"
            ))
        })
    }

    async fn remove(&self, id: &UploadId, received: u64) {
        if let Err(e) = self.bucket.delete_chunks(id).await {
            tracing::warn!(%id, error = %e, "upload not removed from the bucket");
        }
        self.release(received);
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }
}

#[async_trait::async_trait]
impl UploadArea for BucketUploads {
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    async fn create(&self, repo: &RepoName) -> Result<UploadId, Error> {
        let id = UploadId::new();
        self.bucket
            .start_chunks(&id, repo.as_str())
            .await
            .map_err(unavailable)?;
        Ok(id)
    }

    async fn status(&self, id: &UploadId, repo: &RepoName) -> Result<Status, Error> {
        Ok(Status {
            received: self.received(id, repo).await?,
        })
    }

    async fn append(
        &self,
        id: &UploadId,
        repo: &RepoName,
        expected: Expected,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Status, Error> {
        let received = self.received(id, repo).await?;
        if let Some(start) = expected {
            if start != received {
                return Err(Error::UploadRangeInvalid { received });
            }
        }
        let Some(body) = body else {
            return Ok(Status { received });
        };
        let mut frames = body.into_data_stream();
        let mut writer = None;
        let mut written = 0u64;
        let result: Result<(), Error> = async {
            while let Some(chunk) = frames.next().await {
                let chunk = chunk.map_err(|e| {
                    Error::BlobUploadInvalid(format!("the request body broke off: {e}"))
                })?;
                if chunk.is_empty() {
                    continue;
                }
                let len = chunk.len() as u64;
                let reserved = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
                written += len;
                room(reserved)?;
                let w = writer.get_or_insert_with(|| self.bucket.chunk_writer(id, received));
                w.put(chunk).await.map_err(unavailable)?;
            }
            Ok(())
        }
        .await;
        match (result, writer) {
            (Ok(()), Some(w)) => w.finish().await.map_err(unavailable)?,
            (Ok(()), None) => {}
            (Err(e), w) => {
                if let Some(w) = w {
                    w.abort().await;
                }
                // Nothing of this body landed.
                self.release(written);
                if matches!(e, Error::Denied(_)) {
                    self.remove(id, received).await;
                }
                return Err(e);
            }
        }
        Ok(Status {
            received: received + written,
        })
    }

    async fn complete(
        &self,
        id: &UploadId,
        repo: &RepoName,
        digest: &Digest,
        body: Option<Body>,
        room: Room<'_>,
    ) -> Result<Completed, Error> {
        self.append(id, repo, None, body, room).await?;
        let received = self.received(id, repo).await?;
        let objects = self.bucket.chunks(id).await.map_err(unavailable)?;
        let spool = self
            .local
            .spool()
            .await
            .map_err(|e| Error::internal("spooling an upload", e))?;
        let mut hasher = Hasher::new(digest.algorithm());
        for chunk in &objects.chunks {
            let mut bytes = self
                .bucket
                .read_chunk(id, chunk.offset)
                .await
                .map_err(unavailable)?;
            while let Some(b) = bytes.next().await {
                let b = b.map_err(unavailable)?;
                hasher.update(&b);
                let file = spool.file.clone();
                tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    (&*file).write_all(&b)
                })
                .await
                .map_err(|e| Error::internal("spooling an upload", e))?
                .map_err(|e| Error::internal("spooling an upload", e))?;
            }
        }
        let actual = hasher.finish();
        self.remove(id, received).await;
        if actual != *digest {
            return Err(Error::DigestInvalid(format!(
                "the upload's {received} bytes hash to {actual}, not {digest}"
            )));
        }
        Ok(Completed {
            spool,
            size: received,
        })
    }

    async fn cancel(&self, id: &UploadId, repo: &RepoName) -> Result<(), Error> {
        let received = self.received(id, repo).await.unwrap_or(0);
        if self
            .bucket
            .chunks_repo(id)
            .await
            .map_err(unavailable)?
            .as_deref()
            != Some(repo.as_str())
        {
            return Err(Error::BlobUploadUnknown(format!(
                "no upload {id} for {repo}"
            )));
        }
        self.remove(id, received).await;
        Ok(())
    }

    async fn expire(&self, ttl: Duration) -> usize {
        let ids = match self.bucket.chunk_uploads().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::debug!(error = %e, "uploads in the bucket not listed");
                return 0;
            }
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for id in ids {
            let Ok(objects) = self.bucket.chunks(&id).await else {
                continue;
            };
            let old = objects
                .touched
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= ttl);
            if old {
                self.remove(&id, 0).await;
                removed += 1;
            }
        }
        removed
    }
}

/// The bucket failed: the client may retry.
fn unavailable(e: SharedError) -> Error {
    tracing::warn!(error = %e, "hosted upload: the bucket failed");
    Error::SharedUnavailable("the bucket did not answer".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::disk::DiskStore;
    use crate::hashing::digest_of;
    use crate::reference::Algorithm;
    use crate::response;
    use bytes::Bytes;

    fn body(bytes: &'static [u8]) -> Option<Body> {
        Some(response::full(Bytes::from_static(bytes)))
    }

    fn any(_: u64) -> Result<(), Error> {
        Ok(())
    }

    /// Two replicas over one bucket: chunks sent to either continue the
    /// same upload, and either completes it.
    #[tokio::test]
    async fn an_upload_continues_on_another_replica() {
        let bucket = Bucket::in_memory();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = BucketUploads::new(
            bucket.clone(),
            Arc::new(DiskStore::open(d1.path()).unwrap()),
        );
        let two = BucketUploads::new(bucket, Arc::new(DiskStore::open(d2.path()).unwrap()));
        let app = RepoName::parse("myorg/app").unwrap();
        let id = one.create(&app).await.unwrap();
        one.append(&id, &app, Some(0), body(b"hello "), &any)
            .await
            .unwrap();
        assert_eq!(two.status(&id, &app).await.unwrap().received, 6);
        assert!(matches!(
            two.append(&id, &app, Some(0), body(b"again"), &any).await,
            Err(Error::UploadRangeInvalid { received: 6 })
        ));
        let other = RepoName::parse("other/app").unwrap();
        assert!(matches!(
            two.status(&id, &other).await,
            Err(Error::BlobUploadUnknown(_))
        ));
        let digest = digest_of(Algorithm::Sha256, b"hello world");
        let done = two
            .complete(&id, &app, &digest, body(b"world"), &any)
            .await
            .unwrap();
        assert_eq!(done.size, 11);
        assert_eq!(std::fs::read(done.spool.path()).unwrap(), b"hello world");
        assert!(matches!(
            one.status(&id, &app).await,
            Err(Error::BlobUploadUnknown(_))
        ));
    }

    #[tokio::test]
    async fn wrong_bytes_leave_nothing_in_the_bucket() {
        let bucket = Bucket::in_memory();
        let d = tempfile::tempdir().unwrap();
        let uploads =
            BucketUploads::new(bucket.clone(), Arc::new(DiskStore::open(d.path()).unwrap()));
        let app = RepoName::parse("myorg/app").unwrap();
        let id = uploads.create(&app).await.unwrap();
        let wrong = digest_of(Algorithm::Sha256, b"other");
        assert!(matches!(
            uploads
                .complete(&id, &app, &wrong, body(b"abc"), &any)
                .await,
            Err(Error::DigestInvalid(_))
        ));
        assert!(bucket.chunk_uploads().await.unwrap().is_empty());
    }
}
