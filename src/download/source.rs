//! Streaming a blob to one client: from a committed file, or following a
//! download as it arrives (from its window of recent chunks when the client
//! keeps up, else from the spool), the last byte held back until the
//! download is verified.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::recent::Recent;
use super::Progress;
use crate::store::BlobFile;

/// Bytes to stream to one client: a committed blob, or a download to follow.
#[derive(Debug, Clone)]
pub struct Source {
    pub(super) file: Arc<std::fs::File>,
    /// Following a download: its progress and its recent chunks.
    pub(super) following: Option<(watch::Receiver<Progress>, Arc<Recent>)>,
}

impl From<BlobFile> for Source {
    fn from(b: BlobFile) -> Self {
        Source {
            file: b.file,
            following: None,
        }
    }
}

/// Largest read handed to the client at once.
const READ_CHUNK: u64 = 256 * 1024;

impl Source {
    /// Streams bytes `start..end` (to the blob's end when `end` is `None`).
    /// Following a download, the last byte is held back until the blob is
    /// verified: a failed download ends the stream with an error, so a client
    /// never sees a clean end of a wrong or short body.
    pub fn stream(
        self,
        start: u64,
        end: Option<u64>,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
        futures_util::stream::unfold(Some((self, start, end)), |state| async move {
            let (mut src, pos, end) = state?;
            match src.next_chunk(pos, end).await {
                Ok(Some(bytes)) => {
                    let next = pos + bytes.len() as u64;
                    Some((Ok(bytes), Some((src, next, end))))
                }
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    async fn next_chunk(&mut self, pos: u64, end: Option<u64>) -> std::io::Result<Option<Bytes>> {
        loop {
            // How far the client may read now, and the final end once known.
            let (limit, final_end) = match &mut self.following {
                None => {
                    let e = end.unwrap_or(pos);
                    (e, Some(e))
                }
                Some((rx, _)) => match &*rx.borrow_and_update() {
                    Progress::Connecting => (0, None),
                    Progress::Streaming { received, .. } => {
                        let cap = end.map_or(*received, |e| e.min(*received));
                        let held_back = match end {
                            Some(e) if cap < e => cap,
                            _ => cap.saturating_sub(1),
                        };
                        (held_back, None)
                    }
                    Progress::Verified { size } => {
                        let e = end.map_or(*size, |e| e.min(*size));
                        (e, Some(e))
                    }
                    Progress::Failed(e) => {
                        return Err(std::io::Error::other(format!(
                            "upstream download failed: {e}"
                        )))
                    }
                },
            };
            if pos < limit {
                let len = (limit - pos).min(READ_CHUNK);
                // A byte the download received is in its recent chunks until
                // its spool write has landed.
                if let Some((_, recent)) = &self.following {
                    if let Some(bytes) = recent.get(pos, pos + len) {
                        return Ok(Some(bytes));
                    }
                }
                return read_at(&self.file, pos, len).await.map(Some);
            }
            if final_end.is_some_and(|e| pos >= e) {
                return Ok(None);
            }
            let Some((rx, _)) = &mut self.following else {
                return Ok(None);
            };
            if rx.changed().await.is_err() {
                return Err(std::io::Error::other("download ended without a result"));
            }
        }
    }
}

/// Reads `len` bytes at `pos`: straight from the page cache when they are
/// there, else on the blocking pool (a disk read must not stall a worker).
async fn read_at(file: &Arc<std::fs::File>, pos: u64, len: u64) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    if let Some(n) = read_cached(file, pos, &mut buf) {
        buf.truncate(n);
        return Ok(Bytes::from(buf));
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], pos + filled as u64)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cached blob is shorter than recorded",
                ));
            }
            filled += n;
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Reads into `buf` from the page cache without waiting for the disk
/// (`RWF_NOWAIT`): the bytes read, or `None` when they are not cached or the
/// kernel cannot tell, so the caller reads them on the blocking pool. Saves a
/// thread hand-off per chunk on the hot path, where a cache hit's pages are
/// usually in memory.
fn read_cached(file: &std::fs::File, pos: u64, buf: &mut [u8]) -> Option<usize> {
    let n = rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(buf)],
        pos,
        rustix::io::ReadWriteFlags::NOWAIT,
    )
    .ok()?;
    (n > 0).then_some(n)
}
