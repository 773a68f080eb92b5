//! Hosted repositories: what clients push here, kept apart from the cache
//! under `<data_dir>/hosted/` (its own content-addressed store, index and
//! uploads), so the cache's eviction never sees it and `hosted.max_size`
//! counts it alone. Commits go through the same `BlobStore` as the cache's
//! (fsync, rename, fsync of the directory), and every blob is verified
//! against its digest before it is committed.
//!
//! The index's memberships are the repositories' links (as distribution's
//! `_layers` and `_manifests/revisions`): a repository holds the blobs
//! uploaded or mounted into it and the manifests pushed to it; a delete
//! drops the link, and only a collection removes bytes nothing links.

pub mod gc;
pub mod uploads;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

use crate::cache::download::Verifier;
use crate::cache::store::disk::DiskStore;
use crate::cache::store::local_index::LocalIndex;
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Flush, Index, StoredManifest};
use crate::cluster::bucket::Bucket;
use crate::cluster::hosted_store::{spool_verified, HostedTiers};
use crate::cluster::hosted_uploads::BucketUploads;
use crate::cluster::Health;
use crate::config::HostedConfig;
use crate::error::Error;
use crate::reference::{Digest, RepoName};

pub use uploads::{DiskUploads, UploadArea};

/// Where a write began, as far as the index's failures go.
#[derive(Debug, Clone, Copy)]
pub struct WriteMark(u64);

/// The directory under the data dir.
pub const DIR: &str = "hosted";

/// The hosted repositories' store, index and uploads.
pub struct Hosted {
    pub config: HostedConfig,
    pub store: Arc<dyn BlobStore>,
    pub index: Arc<dyn Index>,
    /// Redis, when the index is there: its writes fail silently, so a
    /// push checks it is up before it answers.
    pub shared: Option<Arc<Health>>,
    /// Whether the store is the bucket's (its failures are 503s).
    shared_store: bool,
    pub verifier: Arc<Verifier>,
    pub uploads: Box<dyn UploadArea>,
    /// Held for reading by every check-and-link (an upload's completion, a
    /// mount, a manifest's commit), for writing by a collection from its mark
    /// to the end of its sweep: see [`gc`].
    pub commits: tokio::sync::RwLock<()>,
    /// `<data_dir>/hosted`.
    root: PathBuf,
    /// Something was deleted since the last collection.
    collect_soon: AtomicBool,
    /// What each stored manifest references (a manifest never changes
    /// under its digest), so collections read each manifest once per
    /// process.
    references: gc::References,
}

impl Hosted {
    /// Opens (creating) `<data_dir>/hosted`: everything on this disk.
    pub async fn open(data_dir: &Path, config: &HostedConfig) -> io::Result<Self> {
        let root = data_dir.join(DIR);
        let disk = DiskStore::open(&root)?;
        disk.clean_temp(None).await?;
        let found = disk.scan().await?;
        let index = Arc::new(LocalIndex::load(&root.join("index.json"), found));
        let uploads = Box::new(DiskUploads::open(&root.join("uploads"))?);
        Ok(Self::assemble(
            config,
            root,
            Arc::new(disk),
            index,
            uploads,
            None,
            false,
        ))
    }

    /// The hosted repositories of a replica: content in the bucket's hosted
    /// area (`bucket` is that area) with this disk's `<data_dir>/hosted` as
    /// a copy, uploads in the bucket, and the index in Redis (or, for a
    /// bucket without Redis, which only one replica may use, on this disk).
    pub async fn open_shared(
        data_dir: &Path,
        config: &HostedConfig,
        bucket: Bucket,
        redis: Option<(Arc<dyn Index>, Arc<Health>)>,
        holder: String,
    ) -> io::Result<Self> {
        let root = data_dir.join(DIR);
        let disk = DiskStore::open(&root)?;
        disk.clean_temp(None).await?;
        let local: Arc<dyn BlobStore> = Arc::new(disk);
        let store = Arc::new(HostedTiers {
            local: local.clone(),
            bucket: bucket.clone(),
            holder,
        });
        let uploads = Box::new(BucketUploads::new(bucket, local));
        let (index, shared) = match redis {
            Some((index, health)) => (index, Some(health)),
            None => {
                let found = store.scan().await?;
                let index: Arc<dyn Index> =
                    Arc::new(LocalIndex::load(&root.join("index.json"), found));
                (index, None)
            }
        };
        Ok(Self::assemble(
            config, root, store, index, uploads, shared, true,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: &HostedConfig,
        root: PathBuf,
        store: Arc<dyn BlobStore>,
        index: Arc<dyn Index>,
        uploads: Box<dyn UploadArea>,
        shared: Option<Arc<Health>>,
        shared_store: bool,
    ) -> Self {
        let verifier = Arc::new(Verifier::new(store.clone(), index.clone()));
        Self {
            config: config.clone(),
            uploads,
            store,
            index,
            shared,
            shared_store,
            verifier,
            commits: tokio::sync::RwLock::new(()),
            root,
            collect_soon: AtomicBool::new(false),
            references: gc::references_memory(),
        }
    }

    /// A failure of the hosted store: the bucket's is a 503 (the client may
    /// retry), the disk's a 500.
    pub fn storage(&self, e: io::Error) -> Error {
        if self.shared_store {
            tracing::warn!(error = %e, "hosted storage: the bucket failed");
            Error::SharedUnavailable("the hosted repositories' bucket did not answer".into())
        } else {
            Error::internal("hosted storage", e)
        }
    }

    /// `err` for something not found, unless the index could not be asked:
    /// then the answer is 503, never a 404 a client would take as final.
    pub fn unknown(&self, err: Error) -> Error {
        match &self.shared {
            Some(h) if !h.is_up() => Error::SharedUnavailable(
                "the hosted repositories' index (Redis) does not answer".into(),
            ),
            _ => err,
        }
    }

    /// Whether `repo`, as the client named it, is hosted here.
    pub fn hosts(&self, repo: &RepoName) -> bool {
        self.config.hosts(repo.as_str())
    }

    /// Bytes the committed hosted items take, as the quota counts them; 0
    /// without a quota (nothing to count against, and with Redis the sum
    /// reads the whole index).
    pub async fn committed(&self) -> u64 {
        if self.config.max_size.is_none() {
            return 0;
        }
        self.index
            .contents()
            .await
            .iter()
            .map(|(_, e)| e.size)
            .sum()
    }

    /// Bytes the hosted content takes: committed items and uploads.
    pub async fn usage(&self) -> u64 {
        self.committed().await + self.uploads.bytes()
    }

    /// Refuses `more` bytes that would take the hosted content past
    /// `hosted.max_size`.
    pub fn room(&self, used: u64, more: u64) -> Result<(), Error> {
        match self.config.max_size {
            Some(max) if used.saturating_add(more) > max.0 => Err(Error::Denied(format!(
                "quota exceeded: the hosted repositories hold {used} bytes, and {more} more \
                 would pass hosted.max_size ({} bytes)",
                max.0
            ))),
            _ => Ok(()),
        }
    }

    /// The blob `digest` of `repo`, if the repository holds it.
    pub async fn blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobFile>, Error> {
        if !self.index.holds(repo, digest).await {
            return Ok(None);
        }
        self.store
            .open_blob(digest)
            .await
            .map_err(|e| self.storage(e))
    }

    /// The size of the blob `digest` of `repo`, if the repository holds it
    /// and the store has it: a check that reads no bytes (on a replica, it
    /// fetches nothing from the bucket).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, Error> {
        let key = ContentKey::blob(digest);
        if !self.index.holds(repo, digest).await
            || !self
                .store
                .contains(&key)
                .await
                .map_err(|e| self.storage(e))?
        {
            return Ok(None);
        }
        if let Some(e) = self.index.entry(&key).await {
            return Ok(Some(e.size));
        }
        Ok(self
            .store
            .open_blob(digest)
            .await
            .map_err(|e| self.storage(e))?
            .map(|b| b.size))
    }

    /// The manifest `digest` of `repo`, if the repository holds it.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, Error> {
        if !self.index.holds(repo, digest).await {
            return Ok(None);
        }
        self.store
            .get_manifest(digest)
            .await
            .map_err(|e| self.storage(e))
    }

    /// Records a committed item and links it to `repo`, durably.
    pub async fn link(&self, repo: &RepoName, key: ContentKey, size: u64) -> Result<(), Error> {
        let mark = self.write_mark();
        self.index.record(&key, size, SystemTime::now()).await;
        self.index.add_holds(repo, vec![key.digest]).await;
        self.persist(mark).await
    }

    /// Taken before a write's index calls, for [`persist`](Self::persist).
    pub fn write_mark(&self) -> WriteMark {
        WriteMark(self.shared.as_ref().map_or(0, |h| h.errors()))
    }

    /// Writes the index now: a push is answered only once it would survive
    /// a crash. With Redis, whose writes fail silently, any Redis failure
    /// since `mark` (ours, or another request's: the answer errs on the side
    /// of a retry) fails the request with 503 rather than acknowledge a write
    /// that may not have landed.
    pub async fn persist(&self, mark: WriteMark) -> Result<(), Error> {
        if let Some(h) = &self.shared {
            if !h.is_up() || h.errors() != mark.0 {
                return Err(Error::SharedUnavailable(
                    "the hosted repositories' index (Redis) does not answer; push again".into(),
                ));
            }
        }
        self.index
            .flush(Flush::Changes)
            .await
            .map_err(|e| Error::internal("writing the hosted index", e))
    }
}

impl Hosted {
    /// Copies a blob this mirror holds elsewhere (the cache) into the hosted
    /// store, hashing it on the way, and links it to `repo`: a mount from a
    /// mirrored repository. The cache may evict its copy; this one stays.
    /// The copy runs outside [`commits`](Self::commits), so a collection
    /// does not wait for it; the check, the commit and the link run inside.
    pub async fn adopt(
        &self,
        repo: &RepoName,
        digest: &Digest,
        blob: BlobFile,
    ) -> Result<(), Error> {
        let key = ContentKey::blob(digest);
        {
            let _link = self.commits.read().await;
            if let Some(size) = self.stored_size(&key).await? {
                return self.link(repo, key, size).await;
            }
        }
        self.room(self.usage().await, blob.size)?;
        let size = blob.size;
        let spool = self.store.spool().await.map_err(|e| self.storage(e))?;
        let (algorithm, wanted) = (digest.algorithm(), digest.clone());
        let copied = tokio::task::spawn_blocking(move || -> io::Result<_> {
            use std::io::{Read, Write};
            let mut reader = blob.reader();
            let mut out = &*spool.file;
            let mut h = crate::hashing::Hasher::new(algorithm);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            Ok((spool, h.finish() == wanted))
        })
        .await
        .map_err(|e| Error::internal("copying a mounted blob", e))?;
        let (spool, matches) = copied.map_err(|e| Error::internal("copying a mounted blob", e))?;
        if !matches {
            return Err(Error::Internal(format!(
                "the cached copy of {digest} does not hash to its digest"
            )));
        }
        // A commit of the same digest meanwhile is replaced by the same bytes.
        let _link = self.commits.read().await;
        self.store
            .commit_blob(spool, digest)
            .await
            .map_err(|e| self.storage(e))?;
        self.link(repo, key, size).await
    }

    /// A mount from a mirrored repository on a replica whose disk lacks the
    /// cached blob: copied from the cache's bucket (`cache`), hashed on the
    /// way, into the hosted store, and linked to `repo`. `false` when the
    /// bucket has no good copy either (the client then uploads it). Locked
    /// as [`adopt`](Self::adopt) is.
    pub async fn adopt_from_bucket(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cache: &Bucket,
    ) -> Result<bool, Error> {
        let key = ContentKey::blob(digest);
        {
            let _link = self.commits.read().await;
            if let Some(size) = self.stored_size(&key).await? {
                self.link(repo, key, size).await?;
                return Ok(true);
            }
        }
        let read = cache
            .read(digest, None)
            .await
            .map_err(|e| self.storage(io::Error::other(e.to_string())))?;
        let Some(read) = read else {
            return Ok(false);
        };
        self.room(self.usage().await, read.size)?;
        let size = read.size;
        let spool = spool_verified(&*self.store, digest, read.stream)
            .await
            .map_err(|e| self.storage(e))?;
        let Some(spool) = spool else {
            tracing::warn!(%digest, "the cache's copy in the bucket does not hash to its digest; not mounted");
            return Ok(false);
        };
        let _link = self.commits.read().await;
        self.store
            .commit_blob(spool, digest)
            .await
            .map_err(|e| self.storage(e))?;
        self.link(repo, key, size).await?;
        Ok(true)
    }

    /// The bytes a committed blob takes, if it is committed.
    async fn stored_size(&self, key: &ContentKey) -> Result<Option<u64>, Error> {
        if !self
            .store
            .contains(key)
            .await
            .map_err(|e| self.storage(e))?
        {
            return Ok(None);
        }
        if let Some(e) = self.index.entry(key).await {
            return Ok(Some(e.size));
        }
        let blob = self
            .store
            .open_blob(&key.digest)
            .await
            .map_err(|e| self.storage(e))?;
        Ok(blob.map(|b| b.size))
    }
}
