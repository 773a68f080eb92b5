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

pub mod uploads;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::cache::download::Verifier;
use crate::cache::store::disk::DiskStore;
use crate::cache::store::local_index::LocalIndex;
use crate::cache::store::{BlobFile, BlobStore, ContentKey, Flush, Index, StoredManifest};
use crate::config::HostedConfig;
use crate::error::Error;
use crate::reference::{Digest, RepoName};

pub use uploads::{DiskUploads, UploadArea};

/// The directory under the data dir.
pub const DIR: &str = "hosted";

/// The hosted repositories' store, index and uploads.
pub struct Hosted {
    pub config: HostedConfig,
    pub store: Arc<dyn BlobStore>,
    pub index: Arc<LocalIndex>,
    pub verifier: Arc<Verifier>,
    pub uploads: Box<dyn UploadArea>,
    /// Held by a manifest's commit (its references checked, then linked) and
    /// by a collection's mark, so a collection never removes what a
    /// manifest being pushed references.
    pub commits: tokio::sync::RwLock<()>,
}

impl Hosted {
    /// Opens (creating) `<data_dir>/hosted`.
    pub async fn open(data_dir: &Path, config: &HostedConfig) -> io::Result<Self> {
        let root = data_dir.join(DIR);
        let disk = DiskStore::open(&root)?;
        disk.clean_temp(None).await?;
        let found = disk.scan().await?;
        let index = Arc::new(LocalIndex::load(&root.join("index.json"), found));
        let store: Arc<dyn BlobStore> = Arc::new(disk);
        let verifier = Arc::new(Verifier::new(store.clone(), index.clone()));
        Ok(Self {
            config: config.clone(),
            uploads: Box::new(DiskUploads::open(&root.join("uploads"))?),
            store,
            index,
            verifier,
            commits: tokio::sync::RwLock::new(()),
        })
    }

    /// Whether `repo`, as the client named it, is hosted here.
    pub fn hosts(&self, repo: &RepoName) -> bool {
        self.config.hosts(repo.as_str())
    }

    /// Bytes the hosted content takes: committed items and uploads.
    pub async fn usage(&self) -> u64 {
        let items: u64 = self
            .index
            .contents()
            .await
            .iter()
            .map(|(_, e)| e.size)
            .sum();
        items + self.uploads.bytes()
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
            .map_err(|e| Error::internal("hosted storage", e))
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
            .map_err(|e| Error::internal("hosted storage", e))
    }

    /// Records a committed item and links it to `repo`, durably.
    pub async fn link(&self, repo: &RepoName, key: ContentKey, size: u64) -> Result<(), Error> {
        self.index.record(&key, size, SystemTime::now()).await;
        self.index.add_holds(repo, vec![key.digest]).await;
        self.persist().await
    }

    /// Writes the index now: a push is answered only once it would survive
    /// a crash.
    pub async fn persist(&self) -> Result<(), Error> {
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
    pub async fn adopt(
        &self,
        repo: &RepoName,
        digest: &Digest,
        blob: BlobFile,
    ) -> Result<(), Error> {
        let key = ContentKey::blob(digest);
        let present = self
            .store
            .contains(&key)
            .await
            .map_err(|e| Error::internal("hosted storage", e))?;
        if !present {
            self.room(self.usage().await, blob.size)?;
            let spool = self
                .store
                .spool()
                .await
                .map_err(|e| Error::internal("hosted storage", e))?;
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
            let (spool, matches) =
                copied.map_err(|e| Error::internal("copying a mounted blob", e))?;
            if !matches {
                return Err(Error::Internal(format!(
                    "the cached copy of {digest} does not hash to its digest"
                )));
            }
            self.store
                .commit_blob(spool, digest)
                .await
                .map_err(|e| Error::internal("hosted storage", e))?;
        }
        let size = match self.index.entry(&key).await {
            Some(e) => e.size,
            None => self
                .store
                .open_blob(digest)
                .await
                .map_err(|e| Error::internal("hosted storage", e))?
                .map_or(0, |b| b.size),
        };
        self.link(repo, key, size).await
    }
}
