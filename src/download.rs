//! Single-flight blob downloads: one upstream GET per digest however many
//! clients ask at once. The download runs in its own task (it outlives the
//! client that started it), writes to a spool file while hashing, and commits
//! only when size and digest match (and the blob fits the cache at all).
//! Clients follow the spool as it grows.
//!
//! Mechanism only: which repository may read a blob is decided by the caller.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::error::Error;
use crate::hashing::Hasher;
use crate::metrics::Metrics;
use crate::reference::Digest;
use crate::store::{BlobFile, BlobStore, ContentKey, Index, Spool};
use crate::upstream::transport_error;

/// Where a download stands; followers watch it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// `written` bytes are in the spool; `size` from the upstream's Content-Length.
    Streaming { size: Option<u64>, written: u64 },
    /// Verified: every byte may be served. The commit to the store follows
    /// (unless the blob is larger than the whole cache) and does not hold
    /// followers up.
    Verified { size: u64 },
    /// Nothing was cached; followers must abort.
    Failed(Error),
}

/// One download in flight, shared by every client of its digest.
#[derive(Debug)]
pub struct Download {
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

impl Download {
    /// Waits for the upstream's answer: the blob size when known.
    pub async fn size(&self) -> Result<Option<u64>, Error> {
        let mut rx = self.progress.clone();
        loop {
            match &*rx.borrow_and_update() {
                Progress::Connecting => {}
                Progress::Streaming { size, .. } => return Ok(*size),
                Progress::Verified { size } => return Ok(Some(*size)),
                Progress::Failed(e) => return Err(e.clone()),
            }
            rx.changed()
                .await
                .map_err(|_| Error::Internal("download ended without a result".into()))?;
        }
    }

    /// The source to stream this download to a client from.
    pub fn source(&self) -> Source {
        Source {
            file: self.file.clone(),
            progress: Some(self.progress.clone()),
        }
    }
}

/// The result of asking for a blob that was not cached a moment ago.
#[derive(Debug)]
pub enum Joined {
    /// It has been committed since.
    Cached(BlobFile),
    /// A download to follow; `started` when this call started it.
    Download {
        download: Arc<Download>,
        started: bool,
    },
}

/// The downloads in flight, by digest.
pub struct Downloads {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    /// A blob larger than this is served but not kept.
    keep_limit: u64,
    /// Woken after a commit or a failed write, so eviction runs.
    space_changed: Arc<Notify>,
    /// Digests whose cached file is known intact; a commit adds to it.
    verified: moka::future::Cache<Digest, ()>,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Verified downloads whose commit has not ended.
    commits: watch::Sender<usize>,
}

impl Downloads {
    pub fn new(
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
        keep_limit: u64,
        space_changed: Arc<Notify>,
        verified: moka::future::Cache<Digest, ()>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            index,
            keep_limit,
            space_changed,
            verified,
            metrics,
            active: Mutex::new(HashMap::new()),
            commits: watch::Sender::new(0),
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Download>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the download of `digest`, or starts one that sends `fetch`
    /// (the upstream GET) in a task of its own and gives up when the body
    /// stalls for `read_timeout`.
    pub async fn join_or_start<F>(
        self: &Arc<Self>,
        digest: &Digest,
        read_timeout: Duration,
        fetch: F,
    ) -> Result<Joined, Error>
    where
        F: Future<Output = Result<reqwest::Response, Error>> + Send + 'static,
    {
        if let Some(d) = self.active().get(digest) {
            return Ok(Joined::Download {
                download: d.clone(),
                started: false,
            });
        }
        // A download may have committed since the caller looked.
        if let Some(blob) = self.store.open_blob(digest).await.map_err(storage)? {
            return Ok(Joined::Cached(blob));
        }
        let spool = self.store.spool().await.map_err(storage)?;
        let (tx, rx) = watch::channel(Progress::Connecting);
        let download = Arc::new(Download {
            file: spool.file.clone(),
            progress: rx,
        });
        {
            let mut active = self.active();
            if let Some(d) = active.get(digest) {
                return Ok(Joined::Download {
                    download: d.clone(),
                    started: false,
                });
            }
            active.insert(digest.clone(), download.clone());
        }
        let this = self.clone();
        let digest = digest.clone();
        let entry = download.clone();
        tokio::spawn(async move {
            let outcome = this
                .transfer(&digest, &spool, fetch, read_timeout, &tx)
                .await;
            match outcome {
                Ok(size) => {
                    // Every byte is verified: followers get their last byte
                    // now, not after the commit's fsync. The download stays
                    // in the map until the commit ends, so a request in
                    // between follows the spool, and one after it finds the
                    // committed blob.
                    this.commits.send_modify(|n| *n += 1);
                    tx.send_replace(Progress::Verified { size });
                    this.keep(spool, &digest, size).await;
                    this.leave(&digest, &entry);
                    this.commits.send_modify(|n| *n -= 1);
                }
                Err(e) => {
                    spool.discard();
                    tracing::warn!(%digest, error = %e, "blob download failed; nothing cached");
                    // Leave the map before the failure is published: a
                    // request that arrives after it must start a new
                    // download, not join this one.
                    this.leave(&digest, &entry);
                    tx.send_replace(Progress::Failed(e));
                }
            }
            this.space_changed.notify_one();
        });
        Ok(Joined::Download {
            download,
            started: true,
        })
    }

    /// Removes `entry` from the map, unless a newer download took its place.
    fn leave(&self, digest: &Digest, entry: &Arc<Download>) {
        let mut active = self.active();
        if active.get(digest).is_some_and(|d| Arc::ptr_eq(d, entry)) {
            active.remove(digest);
        }
    }

    /// Waits until no verified download is still being committed (at
    /// shutdown, so a blob a client has received is kept).
    pub async fn settle(&self) {
        let mut rx = self.commits.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Commits a verified spool and records it, unless it is larger than the
    /// cache: then its followers still read it from the unlinked spool. A
    /// failed commit only costs the cache the blob: its followers already
    /// have every byte.
    async fn keep(&self, spool: Spool, digest: &Digest, size: u64) {
        if size > self.keep_limit {
            tracing::warn!(%digest, size, limit = self.keep_limit, "blob larger than the cache; served without being kept");
            return;
        }
        match self.store.commit_blob(spool, digest).await {
            Ok(()) => {
                self.index
                    .touch(&ContentKey::blob(digest), size, SystemTime::now())
                    .await;
                self.verified.insert(digest.clone(), ()).await;
            }
            Err(e) => {
                tracing::error!(%digest, error = %e, "cannot commit a downloaded blob; it is not cached");
            }
        }
    }

    /// Streams the upstream body into the spool; the size when it verified.
    async fn transfer<F>(
        &self,
        digest: &Digest,
        spool: &Spool,
        fetch: F,
        read_timeout: Duration,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, Error>
    where
        F: Future<Output = Result<reqwest::Response, Error>>,
    {
        let mut resp = fetch.await?;
        let size = resp.content_length();
        tx.send_replace(Progress::Streaming { size, written: 0 });
        let mut writer = SpoolWriter::new(&spool.file);
        let result = self
            .receive(digest, &mut resp, size, read_timeout, &mut writer, tx)
            .await;
        if result.is_err() {
            // Let a write still in flight land before the spool is discarded,
            // so the space it takes is freed with the rest.
            writer.abandon().await;
        }
        result
    }

    /// Receives the body: each chunk is hashed while it is written, and the
    /// next is received while the previous write lands. Followers see a byte
    /// only once it is in the spool.
    async fn receive(
        &self,
        digest: &Digest,
        resp: &mut reqwest::Response,
        size: Option<u64>,
        read_timeout: Duration,
        writer: &mut SpoolWriter<'_>,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, Error> {
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received: u64 = 0;
        loop {
            let chunk = tokio::time::timeout(read_timeout, resp.chunk())
                .await
                .map_err(|_| {
                    Error::UpstreamTimeout(format!(
                        "upstream sent nothing for {} while sending {digest}",
                        humantime::format_duration(read_timeout)
                    ))
                })?
                .map_err(transport_error)?;
            let Some(chunk) = chunk else { break };
            let end = received + chunk.len() as u64;
            if size.is_some_and(|s| end > s) {
                return Err(Error::UpstreamFailed(format!(
                    "upstream sent more bytes than announced for {digest}"
                )));
            }
            self.metrics.upstream_bytes(chunk.len() as u64);
            let previous = writer.start(chunk.clone(), received);
            hasher.update(&chunk);
            if let Some(landed) = SpoolWriter::land(previous).await.map_err(storage)? {
                tx.send_replace(Progress::Streaming {
                    size,
                    written: landed,
                });
            }
            received = end;
        }
        if let Some(landed) = writer.finish().await.map_err(storage)? {
            tx.send_replace(Progress::Streaming {
                size,
                written: landed,
            });
        }
        if size.is_some_and(|s| s != received) {
            return Err(Error::UpstreamFailed(format!(
                "upstream body of {digest} ended after {received} bytes"
            )));
        }
        let got = hasher.finish();
        if got != *digest {
            return Err(Error::UpstreamFailed(format!(
                "upstream sent content with digest {got} for {digest}"
            )));
        }
        Ok(received)
    }
}

/// A spool write on the blocking pool, and the offset the spool is complete
/// to once it lands.
type Write = (tokio::task::JoinHandle<std::io::Result<()>>, u64);

/// Writes a download's chunks to its spool on the blocking pool, keeping one
/// write in flight so receiving and hashing the next chunk overlap it.
struct SpoolWriter<'a> {
    file: &'a Arc<std::fs::File>,
    in_flight: Option<Write>,
}

impl<'a> SpoolWriter<'a> {
    fn new(file: &'a Arc<std::fs::File>) -> Self {
        Self {
            file,
            in_flight: None,
        }
    }

    /// Starts writing `data` at `offset`; hands back the write before it,
    /// to be [`land`](Self::land)ed.
    fn start(&mut self, data: Bytes, offset: u64) -> Option<Write> {
        let file = self.file.clone();
        let end = offset + data.len() as u64;
        let handle = tokio::task::spawn_blocking(move || file.write_all_at(&data, offset));
        self.in_flight.replace((handle, end))
    }

    /// Waits for a write: the offset the spool is complete to after it.
    async fn land(write: Option<Write>) -> std::io::Result<Option<u64>> {
        let Some((handle, end)) = write else {
            return Ok(None);
        };
        handle.await.map_err(std::io::Error::other)??;
        Ok(Some(end))
    }

    /// Waits for the last write.
    async fn finish(&mut self) -> std::io::Result<Option<u64>> {
        Self::land(self.in_flight.take()).await
    }

    /// Waits for the write in flight, whatever its result.
    async fn abandon(&mut self) {
        let _ = self.finish().await;
    }
}

fn storage(e: std::io::Error) -> Error {
    Error::internal("cache storage", e)
}

/// Bytes to stream to one client: a committed blob, or a download to follow.
#[derive(Debug, Clone)]
pub struct Source {
    file: Arc<std::fs::File>,
    progress: Option<watch::Receiver<Progress>>,
}

impl From<BlobFile> for Source {
    fn from(b: BlobFile) -> Self {
        Source {
            file: b.file,
            progress: None,
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
            let (limit, final_end) = match &mut self.progress {
                None => {
                    let e = end.unwrap_or(pos);
                    (e, Some(e))
                }
                Some(rx) => match &*rx.borrow_and_update() {
                    Progress::Connecting => (0, None),
                    Progress::Streaming { written, .. } => {
                        let cap = end.map_or(*written, |e| e.min(*written));
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
                return read_at(&self.file, pos, len).await.map(Some);
            }
            if final_end.is_some_and(|e| pos >= e) {
                return Ok(None);
            }
            let Some(rx) = &mut self.progress else {
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
    if let Some(bytes) = read_cached(file, pos, len) {
        return Ok(bytes);
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
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

/// Reads from the page cache without waiting for the disk (`RWF_NOWAIT`):
/// `None` when the bytes are not all cached or the kernel cannot tell, so
/// the caller reads them on the blocking pool. Saves a thread hand-off per
/// chunk on the hot path, where a cache hit's pages are usually in memory.
fn read_cached(file: &std::fs::File, pos: u64, len: u64) -> Option<Bytes> {
    let mut buf = vec![0u8; len as usize];
    let n = rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        pos,
        rustix::io::ReadWriteFlags::NOWAIT,
    )
    .ok()?;
    if n == 0 {
        return None;
    }
    buf.truncate(n);
    Some(Bytes::from(buf))
}
