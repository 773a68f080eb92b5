//! [`Upload`]: one blob streamed into the bucket as a multipart upload, in
//! parts of [`PART_SIZE`] cut from the chunks as they come, one part in
//! flight while the next fills; completed only once the caller verified the
//! bytes, and recorded meanwhile by a marker object so that an upload its
//! replica abandoned (a crash) can be found and aborted.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::{MultipartId, ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;

use super::{Inner, Marker};
use crate::cache::store::Kind;
use crate::cluster::SharedError;
use crate::reference::Digest;

/// Bytes of every part but the last. S3 wants 5 MiB at least (the last part
/// excepted), and some services parts of equal size: every full part is
/// exactly this.
pub(super) const PART_SIZE: usize = 8 << 20;

/// A blob being uploaded. Dropping it without [`complete`](Upload::complete)
/// or [`abort`](Upload::abort) leaves the upload and its marker in the
/// bucket, as a crash would, for [`Bucket::pending_uploads`] to find.
///
/// [`Bucket::pending_uploads`]: super::Bucket::pending_uploads
pub struct Upload {
    inner: Arc<Inner>,
    digest: Digest,
    path: Path,
    id: MultipartId,
    marker: Path,
    /// The part filling, at most [`PART_SIZE`] bytes.
    filling: Vec<Bytes>,
    filled: usize,
    /// Parts uploaded, in order.
    parts: Vec<PartId>,
    /// The part uploading, which is `parts.len()`.
    in_flight: Option<JoinHandle<Result<PartId, object_store::Error>>>,
    /// A part failed: the object would miss bytes, so it is never completed.
    broken: bool,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("digest", &self.digest)
            .field("parts", &self.parts.len())
            .field("in_flight", &self.in_flight.is_some())
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Creates the multipart upload, then its marker; a marker that cannot
    /// be written aborts the upload.
    pub(super) async fn start(
        inner: Arc<Inner>,
        digest: &Digest,
        holder: &str,
    ) -> Result<Self, SharedError> {
        let path = inner.path(Kind::Blob, digest);
        let id = inner
            .multipart
            .create_multipart(&path)
            .await
            .map_err(|e| inner.fail(format_args!("start the upload of blob {digest}"), e))?;
        let marker = inner.marker_path(digest);
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let body = serde_json::to_vec(&Marker {
            path: path.to_string(),
            multipart_id: id.clone(),
            holder: holder.to_owned(),
            started,
        })
        .map_err(|e| SharedError::bucket(format!("upload marker of blob {digest}: {e}")))?;
        if let Err(e) = inner.store.put(&marker, PutPayload::from(body)).await {
            let e = inner.fail(format_args!("write {marker}"), e);
            if let Err(abort) = inner.multipart.abort_multipart(&path, &id).await {
                tracing::warn!(%digest, error = %inner.fail("abort", abort),
                    "upload without a marker left in the bucket (a lifecycle rule for incomplete multipart uploads removes it)");
            }
            return Err(e);
        }
        Ok(Self {
            inner,
            digest: digest.clone(),
            path,
            id,
            marker,
            filling: Vec::new(),
            filled: 0,
            parts: Vec::new(),
            in_flight: None,
            broken: false,
        })
    }

    /// Appends bytes, sending each part as it fills. Waits for the part in
    /// flight only once the next one is full, so at most two parts are held.
    pub async fn push(&mut self, mut chunk: Bytes) -> Result<(), SharedError> {
        self.check()?;
        while !chunk.is_empty() {
            let room = PART_SIZE - self.filled;
            if chunk.len() < room {
                self.filled += chunk.len();
                self.filling.push(chunk);
                break;
            }
            self.filling.push(chunk.split_to(room));
            self.filled = PART_SIZE;
            self.send_part().await?;
        }
        Ok(())
    }

    /// Sends what is left as the last part and completes the upload, then
    /// deletes the marker. On failure the upload is aborted.
    pub async fn complete(mut self) -> Result<(), SharedError> {
        if let Err(e) = self.finish().await {
            self.release().await;
            return Err(e);
        }
        if let Err(e) = self.inner.delete(&self.marker).await {
            // The blob is committed; the marker's later abort finds no upload.
            tracing::warn!(digest = %self.digest, error = %self.inner.fail(format_args!("delete {}", self.marker), e),
                "upload marker left behind");
        }
        Ok(())
    }

    /// Aborts the upload and deletes its marker; failures are logged, and
    /// leave the marker when the upload itself could not be aborted.
    pub async fn abort(mut self) {
        self.release().await;
    }

    fn check(&self) -> Result<(), SharedError> {
        if self.broken {
            return Err(SharedError::bucket(format!(
                "upload of blob {}: an earlier part failed",
                self.digest
            )));
        }
        Ok(())
    }

    /// Waits for the part in flight, then sends the filled one.
    async fn send_part(&mut self) -> Result<(), SharedError> {
        self.wait_in_flight().await?;
        let payload: PutPayload = std::mem::take(&mut self.filling).into_iter().collect();
        self.filled = 0;
        let (multipart, path, id, index) = (
            self.inner.multipart.clone(),
            self.path.clone(),
            self.id.clone(),
            self.parts.len(),
        );
        self.in_flight = Some(tokio::spawn(async move {
            multipart.put_part(&path, &id, index, payload).await
        }));
        Ok(())
    }

    async fn wait_in_flight(&mut self) -> Result<(), SharedError> {
        let Some(task) = self.in_flight.take() else {
            return Ok(());
        };
        let index = self.parts.len();
        let part = match task.await {
            Ok(Ok(part)) => part,
            Ok(Err(e)) => {
                self.broken = true;
                return Err(self.inner.fail(self.part_name(index), e));
            }
            Err(e) => {
                self.broken = true;
                return Err(SharedError::bucket(format!(
                    "{}: {e}",
                    self.part_name(index)
                )));
            }
        };
        self.parts.push(part);
        Ok(())
    }

    fn part_name(&self, index: usize) -> String {
        format!("part {} of blob {}", index + 1, self.digest)
    }

    async fn finish(&mut self) -> Result<(), SharedError> {
        self.check()?;
        self.wait_in_flight().await?;
        let inner = self.inner.clone();
        if self.parts.is_empty() && self.filled == 0 {
            // The empty blob: S3 completes no upload without a part, and not
            // every service takes an empty one. A plain put, and the upload
            // goes.
            inner
                .store
                .put(&self.path, PutPayload::default())
                .await
                .map_err(|e| inner.fail(format_args!("put blob {}", self.digest), e))?;
            self.release().await;
            return Ok(());
        }
        if self.filled > 0 {
            let payload: PutPayload = std::mem::take(&mut self.filling).into_iter().collect();
            self.filled = 0;
            let part = inner
                .multipart
                .put_part(&self.path, &self.id, self.parts.len(), payload)
                .await
                .map_err(|e| inner.fail(self.part_name(self.parts.len()), e))?;
            self.parts.push(part);
        }
        inner
            .multipart
            .complete_multipart(&self.path, &self.id, std::mem::take(&mut self.parts))
            .await
            .map_err(|e| {
                inner.fail(
                    format_args!("complete the upload of blob {}", self.digest),
                    e,
                )
            })?;
        Ok(())
    }

    /// Aborts the multipart upload, then deletes the marker (kept if the
    /// abort failed, so that a later cleanup retries it). Logs, never fails.
    async fn release(&mut self) {
        if let Some(task) = self.in_flight.take() {
            task.abort();
            let _ = task.await;
        }
        let inner = &self.inner;
        match inner.multipart.abort_multipart(&self.path, &self.id).await {
            Ok(()) => {}
            Err(e) if super::is_not_found(&e) => {}
            Err(e) => {
                tracing::warn!(digest = %self.digest, error = %inner.fail("abort the upload", e),
                    "upload left in the bucket, with its marker, for a later cleanup");
                return;
            }
        }
        if let Err(e) = inner.delete(&self.marker).await {
            tracing::warn!(digest = %self.digest, error = %inner.fail(format_args!("delete {}", self.marker), e),
                "upload marker left behind");
        }
    }

    /// Parts sent or in flight.
    #[cfg(test)]
    pub(super) fn parts_started(&self) -> usize {
        self.parts.len() + usize::from(self.in_flight.is_some())
    }
}
