//! The objects of hosted blob uploads in the bucket, so that an upload's
//! requests may land on any replica: under `upload-chunks/<id>/`, a `repo`
//! object naming the repository, and one object per chunk received, named
//! by the offset it starts at (twenty digits, so names sort as offsets do).
//! Names come only from a parsed [`UploadId`] and numbers.
//!
//! Mechanism only: which chunk is expected next, and what completes an
//! upload, are the caller's.

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

use super::{is_not_found, Bucket, Inner};
use crate::cluster::SharedError;
use crate::reference::UploadId;

const AREA: &str = "upload-chunks";
const REPO: &str = "repo";

/// One chunk of an upload in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub size: u64,
}

/// What the bucket holds of one upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadObjects {
    /// The chunks, by offset.
    pub chunks: Vec<Chunk>,
    /// The newest object's modification: when the upload was last touched.
    pub touched: Option<std::time::SystemTime>,
}

impl UploadObjects {
    /// Bytes received, when the chunks follow each other from 0; `None`
    /// when one is missing or overlaps (a chunk still being written).
    pub fn received(&self) -> Option<u64> {
        let mut end = 0;
        for c in &self.chunks {
            if c.offset != end {
                return None;
            }
            end += c.size;
        }
        Some(end)
    }
}

/// A chunk being written; abort it unless it is finished.
pub struct ChunkWriter {
    writer: BufWriter,
    inner: std::sync::Arc<Inner>,
    what: String,
}

impl ChunkWriter {
    pub async fn put(&mut self, bytes: Bytes) -> Result<(), SharedError> {
        let what = &self.what;
        self.writer
            .put(bytes)
            .await
            .map_err(|e| self.inner.fail(what, e))
    }

    pub async fn finish(mut self) -> Result<(), SharedError> {
        self.writer
            .shutdown()
            .await
            .map_err(|e| SharedError::bucket(format!("{}: {e}", self.what)))
    }

    pub async fn abort(mut self) {
        if let Err(e) = self.writer.abort().await {
            tracing::debug!(what = %self.what, error = %self.inner.fail("abort", e), "chunk not aborted");
        }
    }
}

impl Inner {
    fn upload_dir(&self, id: &UploadId) -> Path {
        self.prefix.clone().join(AREA).join(id.as_str())
    }

    fn chunk_path(&self, id: &UploadId, offset: u64) -> Path {
        self.upload_dir(id).join(format!("{offset:020}"))
    }
}

impl Bucket {
    /// Starts an upload's objects: its repository.
    pub async fn start_chunks(&self, id: &UploadId, repo: &str) -> Result<(), SharedError> {
        let inner = &self.inner;
        let path = inner.upload_dir(id).join(REPO);
        inner
            .store
            .put(&path, PutPayload::from(Bytes::from(repo.to_owned())))
            .await
            .map_err(|e| inner.fail(format_args!("start upload {id}"), e))?;
        Ok(())
    }

    /// The repository an upload is for; `None` when there is no such upload.
    pub async fn chunks_repo(&self, id: &UploadId) -> Result<Option<String>, SharedError> {
        let inner = &self.inner;
        let path = inner.upload_dir(id).join(REPO);
        match inner.store.get(&path).await {
            Ok(got) => {
                let body = got
                    .bytes()
                    .await
                    .map_err(|e| inner.fail(format_args!("read upload {id}"), e))?;
                Ok(Some(String::from_utf8_lossy(&body).into_owned()))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(inner.fail(format_args!("read upload {id}"), e)),
        }
    }

    /// The chunks of an upload, by offset.
    pub async fn chunks(&self, id: &UploadId) -> Result<UploadObjects, SharedError> {
        let inner = &self.inner;
        let dir = inner.upload_dir(id);
        let listed: Vec<_> = inner
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| inner.fail(format_args!("list upload {id}"), e))?;
        let mut out = UploadObjects::default();
        for meta in listed {
            let modified = std::time::SystemTime::from(meta.last_modified);
            out.touched = Some(out.touched.map_or(modified, |t| t.max(modified)));
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if let Ok(offset) = name.parse::<u64>() {
                out.chunks.push(Chunk {
                    offset,
                    size: meta.size,
                });
            }
        }
        out.chunks.sort_by_key(|c| c.offset);
        Ok(out)
    }

    /// A writer for the chunk starting at `offset`.
    pub fn chunk_writer(&self, id: &UploadId, offset: u64) -> ChunkWriter {
        let inner = &self.inner;
        ChunkWriter {
            writer: BufWriter::new(inner.store.clone(), inner.chunk_path(id, offset)),
            inner: inner.clone(),
            what: format!("write upload {id} at {offset}"),
        }
    }

    /// The bytes of one chunk.
    pub async fn read_chunk(
        &self,
        id: &UploadId,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, SharedError>>, SharedError> {
        let inner = self.inner.clone();
        let what = format!("read upload {id} at {offset}");
        let got = inner
            .reader
            .get(&inner.chunk_path(id, offset))
            .await
            .map_err(|e| inner.fail(&what, e))?;
        Ok(got
            .into_stream()
            .map_err(move |e| inner.fail(&what, e))
            .boxed())
    }

    /// Deletes every object of an upload.
    pub async fn delete_chunks(&self, id: &UploadId) -> Result<(), SharedError> {
        let inner = &self.inner;
        let listed: Vec<_> = inner
            .store
            .list(Some(&inner.upload_dir(id)))
            .try_collect()
            .await
            .map_err(|e| inner.fail(format_args!("list upload {id}"), e))?;
        for meta in listed {
            inner
                .delete(&meta.location)
                .await
                .map_err(|e| inner.fail(format_args!("delete {}", meta.location), e))?;
        }
        Ok(())
    }

    /// The ids of the uploads with objects in the bucket.
    pub async fn chunk_uploads(&self) -> Result<Vec<UploadId>, SharedError> {
        let inner = &self.inner;
        let area = inner.prefix.clone().join(AREA);
        let listed = inner
            .store
            .list_with_delimiter(Some(&area))
            .await
            .map_err(|e| inner.fail("list uploads", e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter_map(|n| UploadId::parse(n).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_listed_by_offset_and_deleted_whole() {
        let bucket = Bucket::in_memory();
        let id = UploadId::new();
        assert_eq!(bucket.chunks_repo(&id).await.unwrap(), None);
        bucket.start_chunks(&id, "myorg/app").await.unwrap();
        assert_eq!(
            bucket.chunks_repo(&id).await.unwrap().as_deref(),
            Some("myorg/app")
        );
        for (offset, bytes) in [(0u64, &b"hello "[..]), (6, &b"world"[..])] {
            let mut w = bucket.chunk_writer(&id, offset);
            w.put(Bytes::copy_from_slice(bytes)).await.unwrap();
            w.finish().await.unwrap();
        }
        let objects = bucket.chunks(&id).await.unwrap();
        assert_eq!(objects.received(), Some(11));
        let mut all = Vec::new();
        for c in &objects.chunks {
            let mut s = bucket.read_chunk(&id, c.offset).await.unwrap();
            while let Some(b) = s.next().await {
                all.extend_from_slice(&b.unwrap());
            }
        }
        assert_eq!(all, b"hello world");
        assert_eq!(bucket.chunk_uploads().await.unwrap(), vec![id.clone()]);
        bucket.delete_chunks(&id).await.unwrap();
        assert_eq!(bucket.chunks(&id).await.unwrap(), UploadObjects::default());
        assert!(bucket.chunk_uploads().await.unwrap().is_empty());
    }

    #[test]
    fn a_gap_or_overlap_is_no_count() {
        let with = |chunks: &[(u64, u64)]| UploadObjects {
            chunks: chunks
                .iter()
                .map(|&(offset, size)| Chunk { offset, size })
                .collect(),
            touched: None,
        };
        assert_eq!(with(&[]).received(), Some(0));
        assert_eq!(with(&[(0, 3), (3, 2)]).received(), Some(5));
        assert_eq!(with(&[(0, 3), (4, 2)]).received(), None);
        assert_eq!(with(&[(0, 3), (2, 2)]).received(), None);
    }
}
