//! Streaming a blob to one client: from a committed file, or following a
//! download as it arrives (from its window of recent chunks when the client
//! keeps up, else from the spool as far as it has landed). The last byte is
//! held back until the bytes are known good: until the download verified,
//! or, for a committed file not yet hashed by this process, until its check
//! passed.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::recent::{Lookup, Reader, Recent};
use super::verify::Check;
use super::Progress;
use crate::cache::store::BlobFile;

/// Bytes to stream to one client: a committed blob, or a download to follow.
#[derive(Debug, Clone)]
pub struct Source {
    pub(super) file: Arc<std::fs::File>,
    pub(super) gate: Gate,
}

/// What a stream waits for before its last byte.
#[derive(Debug, Clone)]
pub(super) enum Gate {
    /// A committed file known intact: nothing.
    Open,
    /// A download: its progress, its recent chunks, and this client's
    /// place in them.
    Download {
        progress: watch::Receiver<Progress>,
        recent: Arc<Recent>,
        reader: Arc<Reader>,
    },
    /// A committed file whose hash is being checked.
    Check(watch::Receiver<Check>),
}

impl From<BlobFile> for Source {
    /// A committed blob known intact.
    fn from(b: BlobFile) -> Self {
        Source {
            file: b.file,
            gate: Gate::Open,
        }
    }
}

/// Largest read handed to the client at once.
const READ_CHUNK: u64 = 256 * 1024;

impl Source {
    /// Streams bytes `start..end` (to the blob's end when `end` is `None`,
    /// which only a download of unknown size may be). The last byte is held
    /// back until the bytes are known good: a failed download or check ends
    /// the stream with an error, so a client never sees a clean end of a
    /// wrong or short body.
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
                    if let Gate::Download { reader, .. } = &src.gate {
                        reader.advance(next);
                    }
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
            let (limit, final_end) = match &mut self.gate {
                Gate::Open => {
                    let e = end.unwrap_or(pos);
                    (e, Some(e))
                }
                Gate::Check(rx) => {
                    let e = end.unwrap_or(pos);
                    match *rx.borrow_and_update() {
                        Check::Running => (e.saturating_sub(1), None),
                        Check::Intact => (e, Some(e)),
                        Check::Damaged => return Err(std::io::Error::other(
                            "cached blob does not match its digest; removed, to be fetched again",
                        )),
                    }
                }
                Gate::Download { progress, .. } => match &*progress.borrow_and_update() {
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
                let read_end = match &self.gate {
                    Gate::Download { recent, .. } => match recent.lookup(pos, pos + len) {
                        Lookup::Memory(bytes) => return Ok(Some(bytes)),
                        Lookup::Spool { end } => end,
                        Lookup::Nowhere => {
                            // Every received byte is kept or landed, and
                            // without a spool kept until this reader passed it.
                            return Err(std::io::Error::other(format!(
                                "byte {pos} of a download is neither in memory nor in its spool"
                            )));
                        }
                    },
                    Gate::Open | Gate::Check(_) => pos + len,
                };
                return read_at(&self.file, pos, read_end - pos).await.map(Some);
            }
            if final_end.is_some_and(|e| pos >= e) {
                return Ok(None);
            }
            let changed = match &mut self.gate {
                Gate::Open => return Ok(None),
                Gate::Check(rx) => rx.changed().await,
                Gate::Download { progress, .. } => progress.changed().await,
            };
            if changed.is_err() {
                return Err(std::io::Error::other("blob source ended without a result"));
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
    tokio::task::spawn_blocking(move || match file.read_exact_at(&mut buf, pos) {
        Ok(()) => Ok(Bytes::from(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "cached blob is shorter than recorded",
        )),
        Err(e) => Err(e),
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

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    /// A follower that fell out of the window while the two newest chunks
    /// are unlanded, one of them already written out of order past a hole:
    /// it must get exactly the bytes the download received, never the
    /// hole's zeros nor a short read.
    #[tokio::test]
    async fn a_lagging_follower_never_reads_past_the_landed_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap(),
        );
        // Three ~400 KiB chunks; the window holds only the newest two.
        let len = 400 * 1024;
        let chunks: Vec<Bytes> = (1..=3u8).map(|i| Bytes::from(vec![i; len])).collect();
        let data: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let recent = Arc::new(Recent::default());
        for (i, c) in chunks.iter().enumerate() {
            recent.push((i * len) as u64, c.clone());
        }
        // Chunk 0 landed; chunk 2's write landed before chunk 1's.
        file.write_all_at(&chunks[0], 0).unwrap();
        file.write_all_at(&chunks[2], 2 * len as u64).unwrap();
        recent.landed(len as u64);
        let (tx, rx) = watch::channel(Progress::Streaming {
            size: Some(data.len() as u64),
            received: data.len() as u64,
        });
        let source = Source {
            file: file.clone(),
            gate: Gate::Download {
                progress: rx,
                recent: recent.clone(),
                reader: Arc::new(recent.attach().unwrap()),
            },
        };
        let mut body = Box::pin(source.stream(100, Some(data.len() as u64)));
        let mut got = Vec::new();
        // Everything but the held-back last byte is readable now.
        while got.len() < data.len() - 101 {
            got.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
        file.write_all_at(&chunks[1], len as u64).unwrap();
        recent.landed(3 * len as u64);
        tx.send_replace(Progress::Verified {
            size: data.len() as u64,
        });
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got.len(), data.len() - 100);
        assert!(
            got == data[100..],
            "a follower read bytes the spool did not hold"
        );
    }

    /// A committed file whose check is running: every byte but the last at
    /// once; the last when the check passes, an error when it fails.
    #[tokio::test]
    async fn a_checked_file_holds_back_its_last_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        for (verdict, ok) in [(Check::Intact, true), (Check::Damaged, false)] {
            let (tx, rx) = watch::channel(Check::Running);
            let source = Source {
                file: file.clone(),
                gate: Gate::Check(rx),
            };
            let mut body = Box::pin(source.stream(0, Some(10)));
            assert_eq!(&body.next().await.unwrap().unwrap()[..], b"012345678");
            tx.send_replace(verdict);
            match body.next().await {
                Some(Ok(last)) => {
                    assert!(ok, "a damaged file's last byte was sent");
                    assert_eq!(&last[..], b"9");
                    assert!(body.next().await.is_none());
                }
                Some(Err(_)) => assert!(!ok, "an intact file's stream failed"),
                None => panic!("the stream ended cleanly without its last byte"),
            }
        }
    }
}
