//! Single-flight blob downloads: one upstream GET per digest however many
//! clients ask at once. The download runs in its own task (it outlives the
//! client that started it), writes to a spool file while hashing, and commits
//! only when size and digest match (and the blob fits the cache at all).
//! Clients follow it as it arrives ([`Source`]).
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

use crate::cache::store::{BlobFile, BlobStore, ContentKey, Index, Spool};
use crate::error::Error;
use crate::hashing::Hasher;
use crate::metrics::Metrics;
use crate::reference::Digest;
use recent::Recent;
use writer::SpoolWriter;

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
    /// Woken after a commit or a failed write, so eviction runs.
    space_changed: Arc<Notify>,
    /// Vouches for what a download committed, so it is not hashed again.
    verifier: Arc<Verifier>,
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
            space_changed,
            verifier,
            metrics,
            active: Mutex::new(HashMap::new()),
            commits: watch::Sender::new(0),
        }
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
                Ok(size) => {
                    // Every byte is verified: followers get their last byte
                    // now, not after the commit's fsync. The download stays
                    // in the map until the commit ends, so a request in
                    // between follows the spool, and one after it finds the
                    // committed blob.
                    let _committing = Committing::start(&this.commits);
                    running.tx.send_replace(Progress::Verified { size });
                    this.keep(spool, &digest, size).await;
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
        if size > self.keep_limit {
            // Said when it was found out (at the headers, or at the budget).
            tracing::debug!(%digest, size, "a blob larger than the cache is not kept");
            return;
        }
        match self.store.commit_blob(spool, digest).await {
            Ok(()) => {
                self.index
                    .record(&ContentKey::blob(digest), size, SystemTime::now())
                    .await;
                self.verifier.vouch(digest).await;
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
        recent: &Recent,
        fetch: F,
        read_timeout: Duration,
        tx: &watch::Sender<Progress>,
    ) -> Result<u64, Error>
    where
        F: Future<Output = Result<Fill, Error>>,
    {
        let mut fill = fetch.await?;
        self.metrics.fill(fill.origin.label());
        let mut sink = fill.sink.take();
        let mut writer = SpoolWriter::new(&spool.file);
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
                Ok(size) => sink.verified(*size).await,
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
    ) -> Result<u64, Error> {
        use futures_util::StreamExt;
        let size = fill.size;
        let origin = fill.origin;
        // Known too large to keep: no spool (it would fill the disk, or make
        // eviction empty the cache, for bytes that are dropped at the end).
        let mut spooled = size.is_none_or(|s| s <= self.keep_limit);
        if !spooled {
            recent.unspool();
            tracing::warn!(%digest, size, limit = self.keep_limit, "blob larger than the cache; streamed to its clients without being kept");
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
                if let Some(landed) = writer.finish().await.map_err(storage)? {
                    recent.landed(landed);
                }
                recent.unspool();
                spooled = false;
                tracing::warn!(%digest, limit = self.keep_limit, "blob without Content-Length passed the cache budget; streamed on without being kept");
            }
            if spooled {
                // Its write starts once the one before it landed, and runs
                // while this task hashes it and receives the next.
                let landed = writer.write(chunk.clone(), offset).await.map_err(storage)?;
                if let Some(landed) = landed {
                    recent.landed(landed);
                }
            } else if !recent.room().await {
                return Err(Error::Internal(format!(
                    "every client left the download of {digest}, too large to keep"
                )));
            }
            hasher.update(&chunk);
        }
        if let Some(landed) = writer.finish().await.map_err(storage)? {
            recent.landed(landed);
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
        Ok(received)
    }
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
