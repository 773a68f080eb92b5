//! Single-flight blob downloads: one upstream GET per digest however many
//! clients ask at once. The download runs in its own task (it outlives the
//! client that started it), writes to a spool file while hashing, and commits
//! only when size and digest match (and the blob fits the cache at all).
//! Clients follow it as it arrives ([`Source`]). A spool write that fails (a
//! full disk) costs the cache the blob, never the clients: the download goes
//! on from memory at the slowest client's pace and keeps nothing.
//!
//! Mechanism only: which repository may read a blob is decided by the caller.

mod fill;
mod recent;
mod source;
mod verify;
mod writer;

pub use fill::{Fill, Origin, Sink};
pub use source::Source;
pub use verify::Verifier;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};

use crate::cache::policy;
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Index, Spool};
use crate::config::MinFree;
use crate::error::Error;
use crate::hashing::Hasher;
use crate::metrics::Metrics;
use crate::reference::Digest;
use recent::Recent;
use writer::{SpoolWriter, WriteFn};

/// A verified download, and whether its spool holds the whole blob to commit.
#[derive(Debug, Clone, Copy)]
struct Received {
    size: u64,
    /// `None`: spooled whole; else why it is not kept.
    not_kept: Option<&'static str>,
}

/// Where a download stands; followers watch it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// `received` bytes have arrived (each in the recent chunks or the
    /// spool); `size` from the upstream's Content-Length.
    Streaming { size: Option<u64>, received: u64 },
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
    recent: Arc<Recent>,
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

    /// Whether every byte has arrived and verified (the commit may still be
    /// running): a client joining now is served as from the cache.
    pub fn is_verified(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Verified { .. })
    }

    /// A source to stream this download to a client from its start;
    /// `None` when it has no spool and has dropped bytes already.
    fn source(&self) -> Option<Source> {
        let reader = self.recent.attach()?;
        Some(Source {
            file: self.file.clone(),
            gate: source::Gate::Download {
                progress: self.progress.clone(),
                recent: self.recent.clone(),
                reader: Arc::new(reader),
            },
        })
    }
}

/// The result of asking for a blob that was not cached a moment ago.
#[derive(Debug)]
pub enum Joined {
    /// It has been committed since.
    Cached(BlobFile),
    /// A download to follow, and this client's source of it; `started`
    /// when this call started it.
    Download {
        download: Arc<Download>,
        source: Source,
        started: bool,
    },
}

/// The downloads in flight, by digest.
pub struct Downloads {
    store: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    /// A blob larger than this is served but not kept.
    keep_limit: u64,
    /// Downloads at once; past it a new one is refused (`Error::Busy`).
    max_active: usize,
    /// What to leave free on the store's filesystem: a blob that would not
    /// fit beside it is not spooled.
    min_free: MinFree,
    /// Woken after a commit or a failed write, so eviction runs.
    space_changed: Arc<Notify>,
    /// Vouches for what a download committed, so it is not hashed again.
    verifier: Arc<Verifier>,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Verified downloads whose commit has not ended.
    commits: watch::Sender<usize>,
    /// How chunks reach a spool (a failing one in tests).
    spool_write: WriteFn,
}

impl Downloads {
    pub fn new(
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
        keep_limit: u64,
        max_active: usize,
        space_changed: Arc<Notify>,
        verifier: Arc<Verifier>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            index,
            keep_limit,
            max_active,
            min_free: MinFree::Bytes(0),
            space_changed,
            verifier,
            metrics,
            active: Mutex::new(HashMap::new()),
            commits: watch::Sender::new(0),
            spool_write: writer::write_all_at(),
        }
    }

    /// These downloads, leaving `min_free` free on the store's filesystem
    /// (none by default).
    pub fn with_min_free(mut self, min_free: MinFree) -> Self {
        self.min_free = min_free;
        self
    }

    /// These downloads with spool writes made by `write`, for tests.
    #[cfg(test)]
    pub(crate) fn with_spool_write(mut self, write: WriteFn) -> Self {
        self.spool_write = write;
        self
    }

    /// Downloads over `store` and `index` with no budget and 8 at once,
    /// for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self::new(
            store.clone(),
            index.clone(),
            u64::MAX,
            8,
            Arc::new(Notify::new()),
            Arc::new(Verifier::new(store, index)),
            metrics,
        ))
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Download>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the download of `digest`, or starts one that awaits `fetch`
    /// (the upstream GET, or another tier's read) in a task of its own and
    /// gives up when the body stalls for `read_timeout`.
    pub async fn join_or_start<F>(
        self: &Arc<Self>,
        digest: &Digest,
        read_timeout: Duration,
        fetch: F,
    ) -> Result<Joined, Error>
    where
        F: Future<Output = Result<Fill, Error>> + Send + 'static,
    {
        if let Some(joined) = self.join(digest) {
            return Ok(joined);
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
            recent: Arc::new(Recent::default()),
        });
        let source = download
            .source()
            .ok_or_else(|| Error::Internal("a new download cannot be read".into()))?;
        {
            let mut active = self.active();
            if let Some(joined) = Self::join_in(&active, digest) {
                return Ok(joined);
            }
            if active.len() >= self.max_active {
                return Err(Error::Busy(format!(
                    "{} blob downloads in flight (cache.max_downloads)",
                    active.len()
                )));
            }
            // Replaces a download that can no longer serve from the start.
            active.insert(digest.clone(), download.clone());
        }
        let this = self.clone();
        let digest = digest.clone();
        let entry = download.clone();
        tokio::spawn(async move {
            // Whatever ends this task, a panic included, takes the download
            // out of the map and tells its followers.
            let mut running = Running {
                downloads: &this,
                digest: &digest,
                entry: &entry,
                tx,
            };
            let outcome = this
                .transfer(
                    &digest,
                    &spool,
                    &entry.recent,
                    fetch,
                    read_timeout,
                    &running.tx,
                )
                .await;
            match outcome {
                Ok(Received { size, not_kept }) => {
                    // Every byte is verified: followers get their last byte
                    // now, not after the commit's fsync. The download stays
                    // in the map until the commit ends, so a request in
                    // between follows the spool, and one after it finds the
                    // committed blob.
                    let _committing = Committing::start(&this.commits);
                    running.tx.send_replace(Progress::Verified { size });
                    match not_kept {
                        None => this.keep(spool, &digest, size).await,
                        // Its followers read the unlinked spool to its end.
                        Some(reason) => {
                            this.metrics.not_kept(reason);
                            drop(spool);
                        }
                    }
                    this.leave(&digest, &entry);
                }
                Err(e) => {
                    spool.discard();
                    tracing::warn!(%digest, error = %e, "blob download failed; nothing cached");
                    running.fail(e);
                }
            }
            this.space_changed.notify_one();
        });
        Ok(Joined::Download {
            download,
            source,
            started: true,
        })
    }

    /// Whether a download of `digest` runs (whether or not it can still
    /// serve from the start).
    pub fn is_running(&self, digest: &Digest) -> bool {
        self.active().contains_key(digest)
    }

    /// How many downloads run now.
    pub fn in_flight(&self) -> usize {
        self.active().len()
    }

    /// Joins the download of `digest`, if one runs that can serve from the
    /// start.
    pub fn join(&self, digest: &Digest) -> Option<Joined> {
        Self::join_in(&self.active(), digest)
    }

    fn join_in(active: &HashMap<Digest, Arc<Download>>, digest: &Digest) -> Option<Joined> {
        let download = active.get(digest)?;
        let source = download.source()?;
        Some(Joined::Download {
            download: download.clone(),
            source,
            started: false,
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
        match self.store.commit_blob(spool, digest).await {
            Ok(()) => {
                self.index
                    .record(&ContentKey::blob(digest), size, SystemTime::now())
                    .await;
                self.verifier.vouch(digest).await;
            }
            Err(e) => {
                self.metrics.not_kept("commit_failed");
                tracing::warn!(%digest, error = %e, "cannot commit a downloaded blob; its clients have it, the cache does not");
            }
        }
    }

    /// Streams the upstream body into the spool; the size when it verified.
    async fn transfer<F>(
        &self,
        digest: &Digest,
        spool: &Spool,
        recent: &Recent,
        fetch: F,
        read_timeout: Duration,
        tx: &watch::Sender<Progress>,
    ) -> Result<Received, Error>
    where
        F: Future<Output = Result<Fill, Error>>,
    {
        let mut fill = fetch.await?;
        self.metrics.fill(fill.origin.label());
        let mut sink = fill.sink.take();
        let mut writer = SpoolWriter::with(&spool.file, self.spool_write.clone());
        let result = self
            .receive(
                digest,
                &mut fill,
                read_timeout,
                &mut writer,
                recent,
                &mut sink,
                tx,
            )
            .await;
        if result.is_err() {
            // Let a write still in flight land before the spool is discarded,
            // so the space it takes is freed with the rest.
            writer.abandon().await;
        }
        if let Some(sink) = sink {
            match &result {
                Ok(r) => sink.verified(r.size).await,
                Err(e) => sink.failed(e).await,
            }
        }
        result
    }

    /// Receives the body. Each chunk goes to the recent chunks, where
    /// followers take it at once, and to the spool, written on the blocking
    /// pool while this task hashes it and receives the next one.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        digest: &Digest,
        fill: &mut Fill,
        read_timeout: Duration,
        writer: &mut SpoolWriter<'_>,
        recent: &Recent,
        sink: &mut Option<Box<dyn Sink>>,
        tx: &watch::Sender<Progress>,
    ) -> Result<Received, Error> {
        use futures_util::StreamExt;
        let size = fill.size;
        let origin = fill.origin;
        // Known too large to keep: no spool (it would fill the disk, or make
        // eviction empty the cache, for bytes that are dropped at the end).
        let mut not_kept = None;
        let mut spooled = match size {
            Some(s) if s > self.keep_limit => {
                tracing::warn!(%digest, size, limit = self.keep_limit, "blob larger than the cache; streamed to its clients without being kept");
                false
            }
            Some(s) => match self.store.fs_space().await {
                Ok(Some(space))
                    if !policy::fits_disk(s, space, self.min_free.bytes(space.size)) =>
                {
                    tracing::warn!(%digest, size, fs_size = space.size, min_free = %self.min_free, "blob larger than the cache's filesystem leaves room for (cache.min_free); streamed to its clients without being kept");
                    false
                }
                _ => true,
            },
            None => true,
        };
        if !spooled {
            not_kept = Some("too_large");
            recent.unspool();
        }
        tx.send_replace(Progress::Streaming { size, received: 0 });
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received: u64 = 0;
        loop {
            let chunk = tokio::time::timeout(read_timeout, fill.body.next())
                .await
                .map_err(|_| {
                    Error::UpstreamTimeout(format!(
                        "{} sent nothing for {} while sending {digest}",
                        origin.label(),
                        humantime::format_duration(read_timeout)
                    ))
                })?
                .transpose()?;
            let Some(chunk) = chunk else { break };
            let end = received + chunk.len() as u64;
            if size.is_some_and(|s| end > s) {
                return Err(Error::UpstreamFailed(format!(
                    "{} sent more bytes than announced for {digest}",
                    origin.label()
                )));
            }
            if origin == Origin::Upstream {
                self.metrics.upstream_bytes(chunk.len() as u64);
            }
            if let Some(sink) = sink {
                sink.push(&chunk).await;
            }
            // Followers may take the chunk at once, from memory.
            recent.push(received, chunk.clone());
            let offset = received;
            received = end;
            tx.send_replace(Progress::Streaming { size, received });
            if spooled && received > self.keep_limit {
                // No Content-Length, and now past the budget: what is spooled
                // stays for the readers behind; the rest streams from memory.
                if let Err(e) = land(writer.finish().await, recent) {
                    self.spool_failed(digest, &e);
                }
                recent.unspool();
                spooled = false;
                not_kept.get_or_insert("too_large");
                tracing::warn!(%digest, limit = self.keep_limit, "blob without Content-Length passed the cache budget; streamed on without being kept");
            }
            if spooled {
                // Its write starts once the one before it landed, and runs
                // while this task hashes it and receives the next.
                if let Err(e) = land(writer.write(chunk.clone(), offset).await, recent) {
                    // What landed stays readable for the readers behind;
                    // this chunk and the rest stream from memory.
                    self.spool_failed(digest, &e);
                    recent.unspool();
                    spooled = false;
                    not_kept = Some("no_space");
                }
            }
            if !spooled && !recent.room().await {
                return Err(Error::Internal(format!(
                    "every client left the download of {digest}, which is not being kept"
                )));
            }
            hasher.update(&chunk);
        }
        if let Err(e) = land(writer.finish().await, recent) {
            // Every chunk is still in memory past what landed: the readers
            // get them; the cache does not get the blob.
            self.spool_failed(digest, &e);
            recent.unspool();
            not_kept = Some("no_space");
        }
        if size.is_some_and(|s| s != received) {
            return Err(Error::UpstreamFailed(format!(
                "{} body of {digest} ended after {received} bytes",
                origin.label()
            )));
        }
        let got = hasher.finish();
        if got != *digest {
            self.metrics.verification_failure("download");
            return Err(Error::UpstreamFailed(format!(
                "{} sent content with digest {got} for {digest}",
                origin.label()
            )));
        }
        Ok(Received {
            size: received,
            not_kept,
        })
    }

    /// A spool write failed: said once per download, and eviction woken, as
    /// the disk is likely full.
    fn spool_failed(&self, digest: &Digest, e: &std::io::Error) {
        tracing::warn!(%digest, error = %e, "cannot write the spool; the download goes on to its clients without being kept");
        self.space_changed.notify_one();
    }
}

/// Records in `recent` where a spool write reported landing.
fn land(landed: std::io::Result<Option<u64>>, recent: &Recent) -> std::io::Result<()> {
    if let Some(landed) = landed? {
        recent.landed(landed);
    }
    Ok(())
}

/// A download task's hold on its entry in the map and on its followers.
/// Dropped, by a return or a panic, it takes the entry out of the map, and
/// unless the download verified, its followers learn that it failed.
struct Running<'a> {
    downloads: &'a Downloads,
    digest: &'a Digest,
    entry: &'a Arc<Download>,
    tx: watch::Sender<Progress>,
}

impl Running<'_> {
    /// Leaves the map, then publishes the failure: a request that arrives
    /// after it must start a new download, not join this one.
    fn fail(&mut self, e: Error) {
        self.downloads.leave(self.digest, self.entry);
        self.tx.send_replace(Progress::Failed(e));
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let ended = matches!(
            *self.tx.borrow(),
            Progress::Verified { .. } | Progress::Failed(_)
        );
        if !ended {
            tracing::error!(digest = %self.digest, "blob download task ended without a result");
            self.fail(Error::Internal(
                "the download ended without a result".into(),
            ));
        }
        self.downloads.leave(self.digest, self.entry);
    }
}

/// Counts a verified download as committing until dropped (even by a panic),
/// for [`Downloads::settle`].
struct Committing<'a>(&'a watch::Sender<usize>);

impl<'a> Committing<'a> {
    fn start(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

fn storage(e: std::io::Error) -> Error {
    Error::internal("cache storage", e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::disk::DiskStore;
    use crate::cache::store::local_index::LocalIndex;

    /// A spool whose writes fail for space after 3 MiB (as a full disk's
    /// would) costs the cache the blob, never its clients: one client keeping
    /// up and one starting far behind (from the spool up to what landed, then
    /// from memory) both get every byte; nothing is committed, the spool is
    /// gone, and the metrics say why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_write_failing_for_space_streams_on_without_keeping() {
        use futures_util::StreamExt;
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let metrics = Arc::new(Metrics::new());
        let fail_at = 3 * MIB;
        let write: WriteFn = Arc::new(move |f, data, offset| {
            if offset + data.len() as u64 > fail_at {
                return Err(std::io::Error::from(rustix::io::Errno::NOSPC));
            }
            f.write_all_at(data, offset)
        });
        let downloads = Arc::new(
            Downloads::new(
                store.clone(),
                index.clone(),
                u64::MAX,
                8,
                Arc::new(Notify::new()),
                Arc::new(Verifier::new(store.clone(), index.clone())),
                metrics.clone(),
            )
            .with_spool_write(write),
        );
        let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        let digest = crate::hashing::digest_of(crate::reference::Algorithm::Sha256, &data);
        let chunks: Vec<Result<bytes::Bytes, Error>> = data
            .chunks(64 * 1024)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let fill = Fill {
            origin: Origin::Upstream,
            size: Some(data.len() as u64),
            body: futures_util::stream::iter(chunks).boxed(),
            sink: None,
        };
        let Joined::Download {
            download,
            source: first,
            ..
        } = downloads
            .join_or_start(&digest, Duration::from_secs(5), async move { Ok(fill) })
            .await
            .unwrap()
        else {
            panic!("nothing is cached");
        };
        let Some(Joined::Download { source: behind, .. }) = downloads.join(&digest) else {
            panic!("the download cannot be joined");
        };
        let read = |source: Source| async move {
            let mut got = Vec::new();
            let mut stream = std::pin::pin!(source.stream(0, Some(8 * MIB)));
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.expect("a clean body"));
            }
            got
        };
        let keeping_up = tokio::spawn(read(first));
        // The other starts once the download is well past what landed.
        let mut progress = download.progress.clone();
        progress
            .wait_for(|p| match p {
                Progress::Streaming { received, .. } => *received >= 6 * MIB,
                _ => true,
            })
            .await
            .unwrap();
        let lagging = read(behind).await;
        assert!(lagging == data, "the lagging client got other bytes");
        assert!(
            keeping_up.await.unwrap() == data,
            "the first client got other bytes"
        );
        for _ in 0..100 {
            if !downloads.is_running(&digest) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!downloads.is_running(&digest));
        assert!(store.open_blob(&digest).await.unwrap().is_none(), "kept");
        assert!(index.contents().await.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let text = metrics.encode();
        assert!(
            text.contains("regmirror_downloads_not_kept_total{reason=\"no_space\"} 1"),
            "{text}"
        );
    }

    /// A download task that panics must not leave its digest unfetchable.
    #[tokio::test]
    async fn a_panicking_download_leaves_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index: Arc<dyn Index> = Arc::new(LocalIndex::in_memory());
        let downloads = Downloads::for_tests(store, index, Arc::new(Metrics::new()));
        let digest = crate::hashing::digest_of(crate::reference::Algorithm::Sha256, b"x");
        let timeout = Duration::from_secs(5);
        let Joined::Download {
            download, started, ..
        } = downloads
            .join_or_start(&digest, timeout, async { panic!("a bug in the fetch") })
            .await
            .unwrap()
        else {
            panic!("nothing is cached");
        };
        assert!(started);
        let err = download
            .size()
            .await
            .expect_err("a panicked download succeeded");
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        let Joined::Download { started, .. } = downloads
            .join_or_start(&digest, timeout, async {
                Err(Error::UpstreamFailed("second try".into()))
            })
            .await
            .unwrap()
        else {
            panic!("nothing is cached");
        };
        assert!(started, "a new request joined the dead download");
    }
}
